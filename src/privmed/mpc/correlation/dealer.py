"""The dealer's side: the corrections of one request, sent to the model owner.

The dealer does not keep a schedule of its own: it runs the parties' plan walk with the
recording protocol set (``privmed.mpc.protocols.Schedule``), which calls ``serve`` with each
request in the order the parties consume them.
"""

from __future__ import annotations

from privmed.crypto.prg import PRG, StreamKey
from privmed.mpc.correlation.expand import (
    linear_correction,
    nonlinear_correction,
    product_correction,
    thresholds_correction,
)
from privmed.mpc.correlation.requests import Purpose, Request
from privmed.net.channel import Channel


def serve(req: Request, prgs: tuple[PRG, PRG, PRG], to_model_owner: Channel) -> None:
    """Compute and send the model owner's correction(s) for ``req``.

    ``prgs`` = (seed PRG shared with party 0, with party 1, the dealer's private PRG).
    """
    prg0, prg1, private = prgs
    if req.product is not None:
        to_model_owner.send_ring(f"{req.label}/P", product_correction(req, prg0, prg1), req.ring)
    elif req.linear is not None:
        to_model_owner.send_ring(f"{req.label}/C", linear_correction(req, prg0, prg1), req.ring)
    elif req.thresholds is not None:
        bits_key = StreamKey(req.key.batch, req.key.node, Purpose.DEALER_BITS, req.key.step)
        c_hat, sign_tables, sign_bits = thresholds_correction(req.thresholds, prg0.stream(req.key), prg1.stream(req.key), private.stream(bits_key))
        to_model_owner.send_ring(f"{req.label}/A", c_hat, req.ring)
        to_model_owner.send(f"{req.label}/T", sign_tables)
        to_model_owner.send(f"{req.label}/B", sign_bits)
    else:
        assert req.nonlinear is not None
        bits_key = StreamKey(req.key.batch, req.key.node, Purpose.DEALER_BITS, req.key.step)
        wide, msb, tables, packed = nonlinear_correction(
            req.nonlinear, prg0.stream(req.key), prg1.stream(req.key), private.stream(bits_key), req.ring
        )
        if wide.size:
            to_model_owner.send_ring(f"{req.label}/A", wide, req.ring)
        if msb.size:
            to_model_owner.send_ring(f"{req.label}/M", msb, req.nonlinear.shift)
        to_model_owner.send(f"{req.label}/B", packed)
        if tables is not None:
            to_model_owner.send(f"{req.label}/T", tables)
