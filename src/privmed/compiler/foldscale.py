"""Fold a positive per-channel scale in front of a ReLU into the next linear layer.

A BatchNorm whose input is not a convolution's output (DenseNet's norm on the concatenated
features, pre-activation ResNets) lowers to a private per-channel affine a * x + b, a Beaver
product with the model owner's a (one round, two ring elements per element), then a ReLU.
When every a_c > 0, ReLU(a x + b) = a ReLU(x + b / a): the affine becomes a public shift of x
to scale 2f and a private bias b / a (both local, no message), and a moves into the weights
of the linear layers that read the ReLU (input channel c of each multiplied by a_c).

Which layers were folded is visible in the plan (an ``upscale`` and a ``bias`` instead of a
``linear`` of kind ``channel_scale``): one bit per layer that depends on the weights (all of
that layer's scales positive and at least ``MIN_SCALE``), like the integer widths listed in
``privmed.ir.plan``. ``MIN_SCALE`` keeps the precision of the folded weights: a W is encoded
with the same f fractional bits as W, so a small a would lose relative precision.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from privmed.ir.plan import Node

MIN_SCALE = 1.0 / 16


def _consumers(nodes: list[Node]) -> dict[str, list[Node]]:
    out: dict[str, list[Node]] = {n.id: [] for n in nodes}
    for n in nodes:
        for src in n.inputs:
            out[src].append(n)
    return out


def _rewire(readers: list[Node], old: str, new: str) -> None:
    """Make ``readers`` read ``new`` wherever they read ``old``."""
    for reader in readers:
        reader.inputs = [new if i == old else i for i in reader.inputs]


def _scalable(n: Node, channels: int) -> bool:
    """A linear layer whose input channel axis can absorb a per-channel factor."""
    if n.op != "linear" or len(n.inputs) != 1:
        return False
    kind = n.attrs.get("kind")
    if kind == "conv":
        return int(n.attrs.get("spec", {}).get("groups", 1)) == 1 and n.attrs["w_shape"][1] == channels
    return kind == "matmul" and n.attrs["w_shape"][0] == channels


def fold_positive_scales(nodes: list[Node], float_weight: dict[str, np.ndarray], float_bias: dict[str, np.ndarray], output: str) -> int:
    """Rewrite ``nodes`` in place (before calibration; scales are still multiples k of f).
    Returns the number of folded layers."""
    by_id = {n.id: n for n in nodes}
    cons = _consumers(nodes)
    folded = 0
    for cs in list(nodes):
        if cs.op != "linear" or cs.attrs.get("kind") != "channel_scale" or cs.scale != 2 or by_id[cs.inputs[0]].scale != 1:
            continue
        users = cons[cs.id]
        if len(users) != 1 or users[0].op != "relu" or users[0].attrs.get("shift_k") != 1 or users[0].id == output:
            continue
        relu = users[0]
        channels = int(cs.shape[0])
        a = np.asarray(float_weight[cs.id], dtype=np.float64).reshape(-1)
        if a.size != channels or not np.all(a >= MIN_SCALE):
            continue
        readers = cons[relu.id]
        if not readers or not all(_scalable(r, channels) for r in readers) or (len(cs.shape) != 1 and any(r.attrs["kind"] == "matmul" for r in readers)):
            continue
        for r in readers:
            w = float_weight[r.id]
            float_weight[r.id] = w * (a.reshape((1, channels) + (1,) * (w.ndim - 2)) if r.attrs["kind"] == "conv" else a.reshape(channels, 1))
        onnx: Any = cs.attrs.get("onnx", "")
        b = float_bias.pop(cs.id, None)
        del float_weight[cs.id]
        cs.op, cs.attrs = "upscale", {"shift_k": 1, "onnx": onnx}
        if b is not None:
            bias = Node(f"{cs.id}_b"[:32], "bias", [cs.id], list(cs.shape), 2, {"onnx": onnx})
            float_bias[bias.id] = np.asarray(b, dtype=np.float64) / a.reshape((channels,) + (1,) * (len(cs.shape) - 1))
            nodes.insert(nodes.index(cs) + 1, bias)
            relu.inputs = [bias.id if src == cs.id else src for src in relu.inputs]
        folded += 1
    return folded


def drop_round_trips(nodes: list[Node], output: str) -> int:
    """Remove every ``upscale`` by f whose input is a truncation by f of a value already at the
    upscale's own scale: upscale(trunc(x)) = floor(x / 2^f) 2^f is x without its low f bits,
    so its readers read x itself (exact where the round trip was off by up to 2 units of f).

    A folded scale (``fold_positive_scales``) leaves this pair wherever its input was at scale
    2f: DenseNet's dense layers read a concatenation of convolution outputs at 2f, which the
    BatchNorm's product needed at f; once folded, each layer truncated the whole concatenation
    only to shift it back (6.8 million of DenseNet-121's 8.3 million truncated elements at
    224x224). A truncation left without readers is removed with it. Rewrites ``nodes`` in
    place (before calibration); returns the number of upscales removed.
    """
    by_id = {n.id: n for n in nodes}
    cons = _consumers(nodes)
    removed: set[str] = set()
    for up in nodes:
        if up.op != "upscale" or up.attrs.get("shift_k") != 1 or up.id == output:
            continue
        tr = by_id[up.inputs[0]]
        if tr.op != "trunc" or tr.attrs.get("shift_k") != 1 or by_id[tr.inputs[0]].scale != up.scale:
            continue
        src = tr.inputs[0]
        _rewire(cons[up.id], up.id, src)
        cons[src] += cons[up.id]
        cons[tr.id].remove(up)
        removed.add(up.id)
        if not cons[tr.id] and tr.id != output:
            cons[src].remove(tr)
            removed.add(tr.id)
    nodes[:] = [n for n in nodes if n.id not in removed]
    return sum(1 for i in removed if by_id[i].op == "upscale")


def maxpool_before_relu(nodes: list[Node], output: str) -> int:
    """Swap ReLU -> MaxPool into MaxPool -> ReLU where the max-pool is the ReLU's only reader:
    ReLU is monotone, so max(ReLU(x)) = ReLU(max(x)) (edge padding repeats window values), and
    the ReLU then compares a window's one output instead of its every input: a ResNet or
    DenseNet stem (3x3 stride-2 pool) runs a quarter of its first ReLU. A fused truncation
    stays with the ReLU, so the max-pool sees the input at 2f; its comparisons then skip the
    low f bits (``calibrate.finalize`` sets ``drop``), as the fused ReLU's own do, so they
    cost what they cost at f. Rewrites ``nodes`` in place (before calibration); returns the
    number of pairs swapped."""
    by_id = {n.id: n for n in nodes}
    cons = _consumers(nodes)
    swapped = 0
    for pool in list(nodes):
        if pool.op != "maxpool":
            continue
        relu = by_id[pool.inputs[0]]
        if relu.op != "relu" or relu.id == output or cons[relu.id] != [pool] or relu.attrs.get("shift_k") not in (0, 1):
            continue
        src = by_id[relu.inputs[0]]
        if src.scale != relu.scale + relu.attrs["shift_k"]:
            continue
        _rewire(cons[pool.id], pool.id, relu.id)
        pool.inputs, pool.scale = [src.id], src.scale
        relu.inputs, relu.shape = [pool.id], list(pool.shape)
        nodes.remove(relu)
        nodes.insert(nodes.index(pool) + 1, relu)
        cons = _consumers(nodes)
        swapped += 1
    return swapped


def lift_concats(nodes: list[Node], output: str) -> int:
    """Keep a concatenation at scale 2f when every reader only shifts it there: its inputs that
    were truncations of 2f values (convolution outputs) are read untruncated, its other inputs
    at f are shifted up (local), and its readers' upscales go. A concatenation qualifies when
    each of its readers is an upscale by f or another qualifying concatenation (DenseNet's
    first dense block: the stem's pool at f joined by convolution outputs at 2f; the later
    blocks start from an average pool at 2f and need no lift). Rewrites ``nodes`` in place
    (before calibration, after ``drop_round_trips``); returns the number of concatenations
    lifted."""
    by_id = {n.id: n for n in nodes}
    cons = _consumers(nodes)

    def shifts_back(reader: Node) -> bool:
        return reader.op == "upscale" and reader.attrs.get("shift_k") == 1 and reader.id != output

    def truncated_2f(n: Node) -> bool:
        return n.op == "trunc" and n.attrs.get("shift_k") == 1 and by_id[n.inputs[0]].scale == 2

    lifted: set[str] = set()
    for cat in reversed(nodes):
        if (cat.op == "concat" and cat.scale == 1 and cat.id != output and cons[cat.id]
                and all(shifts_back(r) or r.id in lifted for r in cons[cat.id])
                and any(truncated_2f(by_id[i]) for i in cat.inputs)):  # fmt: skip
            lifted.add(cat.id)
    removed: set[str] = set()
    for cat in [n for n in nodes if n.id in lifted]:
        new_inputs = []
        for j, src_id in enumerate(cat.inputs):
            src = by_id[src_id]
            if truncated_2f(src):
                new_inputs.append(src.inputs[0])
                cons[src.id].remove(cat)
                if not cons[src.id] and src.id != output:
                    removed.add(src.id)
            elif src_id in lifted:
                new_inputs.append(src_id)
            else:
                up = Node(f"{cat.id[:28]}_u{j}", "upscale", [src_id], list(src.shape), 2, {"shift_k": 1, "onnx": cat.attrs.get("onnx", "")})
                nodes.insert(nodes.index(cat), up)
                by_id[up.id] = up
                new_inputs.append(up.id)
        cat.inputs, cat.scale = new_inputs, 2
        for reader in cons[cat.id]:
            if reader.id in lifted:
                continue
            _rewire(cons[reader.id], reader.id, cat.id)
            removed.add(reader.id)
    nodes[:] = [n for n in nodes if n.id not in removed]
    return len(lifted)


def pool_before_pointwise_conv(nodes: list[Node], output: str) -> int:
    """Average-pool before a 1x1 convolution instead of after it: both are linear and the conv
    acts per pixel, so pool(conv(x) + b) = conv(pool(x)) + b when the pool has no padding.
    The conv then runs on 1 / (kernel area) of the pixels, and the truncation the pool needs
    in front of it (its input at f) becomes the conv's (on C_in pixels / area instead of
    C_out pixels): DenseNet's transitions (256 -> 128 channels, 2x2 pool) truncate half as many
    elements and multiply a quarter. Applied only where the truncation does not grow
    (C_in <= C_out * area). Rewrites ``nodes`` in place (before calibration); returns the
    number of pairs moved."""
    by_id = {n.id: n for n in nodes}
    cons = _consumers(nodes)
    moved = 0
    for conv in list(nodes):
        spec = conv.attrs.get("spec", {})
        if not (conv.op == "linear" and conv.attrs.get("kind") == "conv" and len(cons[conv.id]) == 1 and conv.scale == 2
                and all(v == 1 for v in spec.get("kernel", [0])) and all(v == 1 for v in spec.get("strides", [0]))
                and not any(spec.get("pads", [1])) and spec.get("groups") == 1 and conv.id != output):  # fmt: skip
            continue
        tr = cons[conv.id][0]
        if tr.op != "trunc" or tr.attrs.get("shift_k") != 1 or len(cons[tr.id]) != 1 or tr.id == output:
            continue
        pool = cons[tr.id][0]
        if pool.op != "avgpool" or any(pool.attrs["pads"]) or pool.id == output:
            continue
        src = by_id[conv.inputs[0]]
        area = int(np.prod(pool.attrs["kernel"]))
        if src.scale != 1 or src.shape[0] > conv.shape[0] * area:
            continue
        spatial = list(pool.shape[1:])
        readers = cons[pool.id]
        pool.inputs, pool.shape = [src.id], [src.shape[0], *spatial]
        tr.inputs, tr.shape = [pool.id], list(pool.shape)
        conv.inputs, conv.shape = [tr.id], [conv.shape[0], *spatial]
        _rewire(readers, pool.id, conv.id)
        for n in (pool, tr, conv):
            nodes.remove(n)
        first_reader = min(nodes.index(r) for r in readers) if readers else len(nodes)
        nodes[first_reader:first_reader] = [pool, tr, conv]
        cons = _consumers(nodes)
        moved += 1
    return moved
