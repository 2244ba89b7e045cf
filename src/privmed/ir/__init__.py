"""The IR below the protocols: what a plan is, and what a receiver checks of it.

Modules, in dependency order:

- ``plan``    ``Node``, ``Plan`` (public, canonical JSON, SHA-256 fingerprint) and ``PrivateWeights``.
- ``ops``     the meaning of plan attributes shared by every executor (conv spec, pooling divisor, post-op).
- ``shapes``  one shape rule per op: the compiler emits shapes with it, receivers recompute them.
- ``check``   the checks a receiver runs on a peer's plan before anything is drawn or opened.
- ``approx``  smooth activations as public piecewise cubics over an ops interface (float, fixed point, shares).
- ``softmax`` softmax inside the network over the same ops interface (max tree, exp cubic, Newton 1/S).
- ``norm``    the instance-norm algorithm over an ops interface (run in float, fixed point and on shares).
- ``walk``    runs a plan node by node with a backend (float, fixed-point reference, secure).
"""
