"""Model zoo, training and ONNX export (plaintext, on the model owner's side).

Modules, in dependency order (each imports only those above it):

- ``zoo``      build_model(name, ...): DenseNet-121, ResNet-18, small CNN, 2D/3D U-Net (MONAI).
- ``export``   export_onnx(model, input_shape, path, preprocess): opset-17 ONNX + preprocess json.
- ``arrays``   Study / NIfTI pairs -> preprocessed float32 arrays, site-held-out splits.
- ``objectives`` masked BCE, AUROC per finding, Dice per class, intensity augmentation.
- ``loop``     generic epoch loop: batches, validation metric, early stopping, epoch reports.
- ``train``    train_classifier / train_segmenter: data -> trained model -> ONNX + metrics.json.

Importing this package imports nothing heavy (torch and MONAI load with the submodules).
"""
