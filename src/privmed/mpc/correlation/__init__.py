"""Correlated randomness: what each protocol consumes, and where it comes from.

Modules, in dependency order:

- ``requests``  the shapes of one correlation (``LinearSpec``, ``NonlinearSpec``, ``ProductSpec``),
  a ``Request`` with its message label and ``StreamKey``, and ``require_shape``.
- ``expand``    seed expansion (identical in a party and the dealer) and the dealer's corrections.
- ``source``    the interface the protocols see (``CorrelationSource``) and its dealer
  implementation (``DealerSource``); a dealer-free source implements the same three methods.
- ``dealer``    the dealer's side: the corrections of one request, sent to the model owner.

The order in which a session consumes correlations is not written down anywhere: the dealer
runs the same plan walk as the parties with a recording protocol set
(``privmed.mpc.protocols.Schedule``) and serves each request as it is recorded.
"""
