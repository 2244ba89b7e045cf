"""Building blocks of the dealer-free two-party mode (issue 14): HE linear layers and OT-based
comparisons between the data owner and the model owner, with no third party.

Modules, in dependency order:

- ``seal_io``      BFV parameter set (N = 8192, log2 q = 218, t = 2^l) and raw numpy <-> SEAL
                   conversion through TenSEAL's ``sealapi`` (imported lazily: optional extra).
- ``he_encoding``  Cheetah's coefficient packing of convolutions and matrix products (pure).
- ``he_layers``    every linear-layer kind as a stride-1 2-D / 3-D conv or a matmul (public data movement).
- ``he_linear``    shares over Z_2^l of L(W, x) by BFV with the model owner's plaintext weights
                   (offline on a random mask, then ``online_linear``: one message); its three
                   steps also as functions (``send_inputs``, ``evaluate``, ``recv_outputs``).
- ``he_offline``   a batch's HE layers beside its OT steps: ciphertexts of every layer first, the
                   model owner's products in a worker thread, the replies after.
- ``ot``           base OT (Chou-Orlandi over X25519), IKNP OT extension, 1-out-of-16 OT.
- ``compare``      CrypTFlow2's millionaires' protocol, AND triples by OT, DReLU / ReLU / MUX on
                   arithmetic shares over Z_2^l, bit-to-arithmetic conversion, truncation
                   and extension to a wider ring (one COT each), max by a ReLU tree.
- ``offline``      ReLU split into input-independent material (all OT extension) and a light
                   online phase (Beaver's OT precomputation).
- ``arith``        products of two secrets by Gilboa's OT multiplication; Beaver triples offline.
- ``stored``       one batch's offline material and IKNP state as named numpy arrays and back,
                   checked against the plan's schedule (``--precompute``).

(Also ``silent_ot``, ``products``, ``scale`` and ``protocols``: docs/twoparty.md lists every
module; ``protocols.TwoPartyOnline`` is what the runtime runs.)
"""
