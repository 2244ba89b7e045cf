"""ONNX -> typed IR -> passes -> public plan + private weights.

Modules, in dependency order:

- ``plan``       the IR: ``Node`` and ``Plan`` (public, JSON) and ``PrivateWeights`` (model owner only).
- ``onnx_front`` load and check an ONNX model; fold constants and exact BatchNorm; list unsupported ops.
- ``lower``      ONNX nodes -> IR nodes with fixed-point scales and truncation placement.
- ``calibrate``  float execution of the IR on a calibration input: bounds, frac bits, comparison widths.
- ``compile``    the whole pipeline: ``compile_model(path, ...) -> (Plan, PrivateWeights, report)``.
"""
