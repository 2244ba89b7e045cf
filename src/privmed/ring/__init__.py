"""Z_2^64 arithmetic on numpy uint64 arrays.

Modules, in dependency order:

- ``fixed``   fixed-point encode/decode, signed views, arithmetic shift.
- ``linalg``  exact ring matmul, Nd convolution (with stride/padding/dilation/groups),
              transposed convolution and per-channel scaling, computed with float64 GEMMs
              on 16-bit limbs (exact because every partial sum stays below 2^53).
"""
