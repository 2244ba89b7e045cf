"""ONNX -> IR (``privmed.ir``) -> passes -> public plan + private weights.

Modules, in dependency order:

- ``onnx_front`` load and check an ONNX model; fold exact BatchNorm; list unsupported ops.
- ``constfold``  compile-time evaluation of shape arithmetic (Shape, Gather, Concat, ...).
- ``approx``     fits the public piecewise-cubic tables of Sigmoid / Tanh / Erf / SiLU / GELU / exp.
- ``lower_base`` the lowering's state and helpers (``Ref``, ``emit``, scales, reshapes, private linear layers).
- ``lower_nonlinear``, ``lower_norm``, ``lower_tokens``  the lowering of activations and secret
                 products, of the normalisations, and of transformer token ops (mixins of ``Lowerer``).
- ``lower``      ONNX nodes -> IR nodes with fixed-point scales and truncation placement (``Lowerer``).
- ``foldscale``  passes on the lowered IR, before calibration: positive BatchNorm scales before a
                 ReLU folded into the next linear layer; upscale(trunc(x)) round trips dropped;
                 concatenations kept at 2f where every reader shifts them there; a max-pool moved
                 before its ReLU; an average pool moved before a 1x1 convolution.
- ``calibrate``  float execution of the IR on a calibration input: bounds, frac bits, comparison widths.
- ``compile``    the whole pipeline: ``compile_model(path, ...) -> (Plan, PrivateWeights, report)``.
"""
