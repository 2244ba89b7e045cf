"""Secure segmentation of CT/MR volumes: 2D, tri-axial 2.5D and 3D U-Nets (``privmed segment``).

The data owner reads a volume, cuts it into slices or patches, and streams them through ONE
secure session (``privmed.runtime.launch.run_local_session`` with ``chunk``); the network's
class probabilities are revealed to the data owner only, fused back into a label map and
written with the input's geometry. The same pre/post-processing runs the model in plaintext
with onnxruntime for comparison.

Modules, in dependency order (each imports only those above it, plus the data, compiler,
runtime and models layers):

- ``volume``    read_volume (NIfTI file or DICOM series folder, with affine), write_mask, voxel_ml.
- ``views``     pure geometry: axial/coronal/sagittal slice stacks, sliding-window boxes,
                Gaussian/constant blending weights, padding.
- ``model``     load_model: public facts of a segmentation ONNX (input, classes, final op)
                and its ``<model>.preprocess.json``; which model each mode needs.
- ``engines``   SecureEngine (three parties, streamed batches) and PlaintextEngine
                (onnxruntime) behind one ``run(model, inputs)``; to_probabilities.
- ``pipeline``  prepare (volume -> inputs), assemble (outputs -> fused probabilities),
                segment_volume (both around an engine).
- ``summary``   class volumes in ml, lesion volume, infected fraction; per slice/patch costs.
- ``training``  small U-Nets trained on the inputs each mode feeds them (tri-axial slices,
                3-D patches), exported to ONNX with preprocessing (model owner, plaintext).

Importing this package imports nothing heavy.
"""
