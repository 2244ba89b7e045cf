"""Cryptographic building blocks.

Modules, in dependency order:

- ``prg``      AES-128-CTR pseudorandom generator (``cryptography``), labelled independent streams.
- ``sharing``  additive secret sharing over Z_2^64 and XOR sharing of bits.
- ``certs``    a small X.509 CA for the three parties (mutual TLS), and ephemeral session certificates.
"""
