"""Two-party computation on additive shares over Z_2^l (the plan's ``ring_bits``) with a dealer.

Modules, in dependency order:

- ``party``       ``Party``: index (0 = data owner, 1 = model owner), peer channel, correlation
                  source, round counter; ``exchange`` helpers.
- ``correlated``  the correlated-randomness interface (``CorrelationSource``), the seed-expanded
                  material each protocol consumes, and the dealer that produces it
                  (a dealer-free source implements the same interface).
- ``linear``      linear layers with the model owner's private weights (Beaver-style masking).
- ``arith``       products and squares of two secret tensors (Beaver triples, broadcasting).
- ``nonlinear``   masked opening, exact truncation, ReLU / LeakyReLU / max / sign via chunked
                  comparison, and the reveal to the data owner.
- ``norm``        instance / group normalisation on shares (the reference algorithm's ops as
                  protocols).
- ``approx``      Sigmoid / Tanh / Erf / SiLU / GELU as public piecewise cubics on shares
                  (comparisons select the interval, Beaver products evaluate the cubic).
"""
