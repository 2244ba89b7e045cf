"""Plaintext executors of a plan: the living definition of every op and the test oracle.

Modules, in dependency order:

- ``norm``       the fixed-point instance-normalisation algorithm (Newton 1/sqrt), shared with
                 the secure runtime.
- ``executors``  ``FloatBackend`` (float64, used for calibration) and ``FixedBackend``
                 (exact fixed-point in Z_2^64 with floor truncation: the secure result must
                 equal it up to the documented +1-ulp truncation error per truncation).
"""
