"""ONNX -> IR (``privmed.ir``) -> passes -> public plan + private weights.

Modules, in dependency order:

- ``onnx_front`` load and check an ONNX model; fold exact BatchNorm; list unsupported ops.
- ``constfold``  compile-time evaluation of shape arithmetic (Shape, Gather, Concat, ...).
- ``lower``      ONNX nodes -> IR nodes with fixed-point scales and truncation placement.
- ``calibrate``  float execution of the IR on a calibration input: bounds, frac bits, comparison widths.
- ``compile``    the whole pipeline: ``compile_model(path, ...) -> (Plan, PrivateWeights, report)``.
"""
