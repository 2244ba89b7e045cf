"""Checking a plan received from a peer, before anything is drawn, allocated or opened.

A plan comes from the model owner, who may be hostile. The data owner's secrets are protected
only if every value it opens is masked by fresh randomness of exactly the value's shape, so a
receiver accepts a plan only if:

1. the JSON is at most ``MAX_PLAN_BYTES`` and has exactly the expected keys and types;
2. node ids are unique and match ``ID_PATTERN`` (short, no separators), inputs refer to
   *earlier* nodes (topological order), each op has its arity;
3. every node's attributes pass the op's schema (``SCHEMA``: required keys, types, ranges; no
   unknown keys), the integer caps below bound every dimension and element count, and the
   comparison widths fit the plan's ring (``_check_ring``);
4. there is exactly one ``input`` node, first, of the shape the receiver expects, and exactly
   one ``output`` node, last, named by ``output_name`` (it is revealed to the data owner only);
5. every declared shape equals the shape recomputed by ``privmed.ir.shapes.infer_shape`` from
   the input shape and the attributes (the same function the compiler emits shapes with).

Any violation raises ``PlanError`` with one line naming the node and the rule.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any

from privmed.errors import ProtocolError
from privmed.ir.approx import FUNCTIONS
from privmed.ir.plan import PLAN_VERSION, Node, Plan
from privmed.ir.shapes import ShapeError, elements, infer_shape

MAX_PLAN_BYTES = 16 << 20  # DenseNet-121's plan is ~0.2 MB; resize index lists dominate large ones
MAX_NODES = 50_000
MAX_RANK = 6  # per sample
MAX_DIM = 1 << 24
MAX_ELEMENTS = 1 << 28  # per sample and node (2 GiB of ring elements)
MAX_TEXT = 256
ID_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,31}")
MIN_FRAC_BITS, MAX_FRAC_BITS = 6, 20
MAX_INTERVALS, MAX_DEGREE = 64, 5  # piecewise-polynomial tables of approx nodes
MAX_TAPS = 4  # interpolation taps per axis (linear 2, cubic 4)
PLAN_KEYS = {"version", "model_name", "frac_bits", "ring_bits", "input_name", "input_shape", "output_name", "nodes"}
MIN_RING_BITS, MAX_RING_BITS = 32, 64
NODE_KEYS = {"id", "op", "inputs", "shape", "scale", "attrs"}


class PlanError(ProtocolError):
    """A received plan breaks a rule; the session is refused before anything is opened."""


Rule = Callable[[Any], str | None]  # returns a problem, or None


def _int(lo: int, hi: int) -> Rule:
    def rule(v: Any) -> str | None:
        if type(v) is not int or not lo <= v <= hi:
            return f"must be an integer in [{lo}, {hi}], got {v!r}"
        return None
    return rule


def _float(lo: float, hi: float) -> Rule:
    def rule(v: Any) -> str | None:
        if type(v) not in (int, float) or not math.isfinite(v) or not lo <= v <= hi:
            return f"must be a finite number in [{lo}, {hi}], got {v!r}"
        return None
    return rule


def _bool(v: Any) -> str | None:
    return None if type(v) is bool else f"must be true or false, got {v!r}"


def _enum(*values: str) -> Rule:
    def rule(v: Any) -> str | None:
        return None if v in values and type(v) is str else f"must be one of {list(values)}, got {v!r}"
    return rule


def _ints(lo: int, hi: int, min_len: int = 0, max_len: int = MAX_RANK) -> Rule:
    def rule(v: Any) -> str | None:
        if type(v) is not list or not min_len <= len(v) <= max_len:
            return f"must be a list of {min_len}..{max_len} integers, got {_short(v)}"
        bad = next((x for x in v if type(x) is not int or not lo <= x <= hi), None)
        if bad is not None:
            return f"entries must be integers in [{lo}, {hi}], got {bad!r}"
        return None
    return rule


def _floats(lo: float, hi: float, min_len: int, max_len: int) -> Rule:
    def rule(v: Any) -> str | None:
        if type(v) is not list or not min_len <= len(v) <= max_len:
            return f"must be a list of {min_len}..{max_len} numbers, got {_short(v)}"
        bad = next((x for x in v if type(x) not in (int, float) or not math.isfinite(x) or not lo <= x <= hi), None)
        if bad is not None:
            return f"entries must be finite numbers in [{lo}, {hi}], got {bad!r}"
        return None
    return rule


def _coeffs(v: Any) -> str | None:
    if type(v) is not list or not 2 <= len(v) <= MAX_INTERVALS:
        return f"must be one coefficient list per interval (2..{MAX_INTERVALS}), got {_short(v)}"
    for row in v:
        problem = _floats(-1e6, 1e6, 2, MAX_DEGREE + 1)(row)
        if problem:
            return problem
    if len({len(row) for row in v}) != 1:
        return "every interval must have the same number of coefficients"
    return None


def _text(v: Any) -> str | None:
    if type(v) is not str or len(v) > MAX_TEXT or not v.isprintable():
        return f"must be printable text of at most {MAX_TEXT} characters, got {_short(v)}"
    return None


def _spec(v: Any) -> str | None:
    if type(v) is not dict or set(v) != {"kernel", "strides", "pads", "dilations", "groups", "output_padding"}:
        return f"must be a convolution spec, got {_short(v)}"
    rules = {"kernel": _ints(1, 64, 1, 3), "strides": _ints(1, 64, 1, 3), "pads": _ints(0, 1024, 2, 6),
             "dilations": _ints(1, 64, 1, 3), "groups": _int(1, MAX_DIM), "output_padding": _ints(0, 64, 0, 3)}
    for key, rule in rules.items():
        problem = rule(v[key])
        if problem:
            return f"{key} {problem}"
    n = len(v["kernel"])
    if len(v["strides"]) != n or len(v["dilations"]) != n or len(v["pads"]) != 2 * n:
        return "strides, dilations and pads must match the kernel's rank"
    return None


def _slices(v: Any) -> str | None:
    if type(v) is not list or not 1 <= len(v) <= MAX_RANK:
        return f"must be one [start, stop, step] per dim, got {_short(v)}"
    for s in v:
        problem = _ints(0, MAX_DIM, 3, 3)(s)
        if problem:
            return problem
    return None


def _indices(v: Any) -> str | None:
    if type(v) is not list or not 1 <= len(v) <= MAX_RANK - 1:
        return f"must be one index list per spatial dim, got {_short(v)}"
    for ind in v:
        problem = _ints(0, MAX_DIM, 1, MAX_DIM)(ind)
        if problem:
            return problem
    return None


def _per_axis_taps(entry: Rule) -> Rule:
    """One list per spatial dim of 1..MAX_TAPS lists, each checked by ``entry``."""
    def rule(v: Any) -> str | None:
        if type(v) is not list or not 1 <= len(v) <= MAX_RANK - 1:
            return f"must be one list of taps per spatial dim, got {_short(v)}"
        for axis in v:
            if type(axis) is not list or not 1 <= len(axis) <= MAX_TAPS:
                return f"each spatial dim must have 1..{MAX_TAPS} taps, got {_short(axis)}"
            for t in axis:
                problem = entry(t)
                if problem:
                    return problem
        return None
    return rule


EINSUM = re.compile(r"([a-y]{1,6}),([a-y]{1,6})->([a-y]{0,6})")


def _equation(v: Any) -> str | None:
    """Two operands and an output over the letters a-y (z is the batch axis), no letter twice
    in one operand (no diagonals), every output letter from an input."""
    m = EINSUM.fullmatch(v) if type(v) is str else None
    if m is None or any(len(set(g)) != len(g) for g in m.groups()) or not set(m[3]) <= set(m[1]) | set(m[2]):
        return f"must be an einsum equation 'ab,bc->ac' over a-y without repeated letters, got {_short(v)}"
    return None


def _post(v: Any) -> str | None:
    if type(v) is not dict or not set(v) <= {"kind", "axis"} or "kind" not in v:
        return f"must be {{kind, axis}}, got {_short(v)}"
    return _enum("none", "sigmoid", "softmax")(v["kind"]) or (_int(-MAX_RANK - 1, MAX_RANK)(v["axis"]) if "axis" in v else None)


SHIFT, WIDTH = _int(0, 60), _int(4, 60)
WINDOW = {"kernel": _ints(1, 1024, 1, 3), "strides": _ints(1, 1024, 1, 3), "pads": _ints(0, 1024, 2, 6)}
SCHEMA: dict[str, dict[str, Rule]] = {
    "input": {},
    "linear": {"kind": _enum("conv", "conv_transpose", "matmul", "channel_scale"), "w_shape": _ints(1, MAX_DIM, 1, MAX_RANK)},
    "bias": {},
    "relu": {"shift": SHIFT, "bits": WIDTH, "drop": SHIFT},
    "leaky_relu": {"shift": SHIFT, "bits": WIDTH, "drop": SHIFT, "alpha": _float(-1e6, 1e6)},
    "prelu": {"shift": SHIFT, "bits": WIDTH, "drop": SHIFT, "w_shape": _ints(1, MAX_DIM, 1, 1)},
    "trunc": {"shift": SHIFT},
    "upscale": {"shift": SHIFT},
    "maxpool": {**WINDOW, "dilations": _ints(1, 64, 1, 3), "bits": WIDTH, "drop": _int(0, 60)},
    "avgpool": {**WINDOW, "count_include_pad": _bool},
    "instnorm": {"eps": _float(1e-12, 1.0), "affine": _bool, "kind": _enum("channel_scale"), "w_shape": _ints(1, MAX_DIM, 1, 1),
                 "frac_bits": _int(MIN_FRAC_BITS, MAX_FRAC_BITS), "k_lo": _int(-64, 64), "k_hi": _int(-64, 64),
                 "iters": _int(0, 8), "sign_bits": WIDTH, "sum_first": _bool, "pre": _int(0, 30)},
    "add": {"signs": _ints(-1, 1, 2, 2)},
    "concat": {"axis": _int(0, MAX_RANK - 1)},
    "reshape": {"to": _ints(1, MAX_DIM, 1, MAX_RANK)},
    "transpose": {"perm": _ints(0, MAX_RANK - 1, 1, MAX_RANK)},
    "slice": {"slices": _slices},
    "pad": {"pads": _ints(0, 1 << 16, 2, 2 * MAX_RANK), "mode": _enum("constant", "reflect", "edge"), "value": _float(-1e9, 1e9)},
    "resize": {"indices": _indices},
    "interp": {"taps": _per_axis_taps(_ints(0, MAX_DIM, 1, MAX_DIM)), "weights": _per_axis_taps(_floats(-2.0, 2.0, 1, MAX_DIM))},
    "approx": {"fn": _enum(*FUNCTIONS), "knots": _floats(-1024.0, 1024.0, 1, MAX_INTERVALS - 1),
               "centers": _floats(-1024.0, 1024.0, 2, MAX_INTERVALS), "coeffs": _coeffs, "bits": WIDTH},
    "softmax": {"axis": _int(0, MAX_RANK - 1), "knots": _floats(-1024.0, 1024.0, 1, MAX_INTERVALS - 1),
                "centers": _floats(-1024.0, 1024.0, 2, MAX_INTERVALS), "coeffs": _coeffs, "bits": WIDTH, "iters": _int(1, 8)},
    "mul": {},
    "einsum": {"equation": _equation},
    "output": {"post": _post},
}
OPTIONAL: dict[str, dict[str, Rule]] = {"linear": {"spec": _spec}}
ARITY = {"input": (0, 0), "add": (2, 2), "mul": (2, 2), "einsum": (2, 2), "concat": (1, 1024)}


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _fail(node: Node | None, rule: str) -> PlanError:
    where = f"node {node.id} ({node.op})" if node is not None else "plan"
    return PlanError(f"refused the model owner's plan: {where}: {rule}")


def _check_attrs(node: Node, frac_bits: int) -> None:
    schema, optional = SCHEMA[node.op], OPTIONAL.get(node.op, {})
    a = node.attrs
    if type(a) is not dict:
        raise _fail(node, "attrs must be an object")
    unknown = set(a) - set(schema) - set(optional) - {"onnx"}
    missing = set(schema) - set(a)
    if unknown or missing:
        raise _fail(node, f"attributes {sorted(missing)} missing, {sorted(unknown)} not allowed")
    for key, rule in [*schema.items(), *((k, r) for k, r in optional.items() if k in a), *((("onnx", _text),) if "onnx" in a else ())]:
        problem = rule(a[key])
        if problem:
            raise _fail(node, f"{key} {problem}")
    op = node.op
    if op == "linear" and (("spec" in a) != (a["kind"] in ("conv", "conv_transpose"))):
        raise _fail(node, "a convolution spec is required for conv kinds and only for them")
    if op in ("relu", "leaky_relu", "prelu") and (a["drop"] != a["shift"] or a["bits"] <= a["drop"] or (a["bits"] - a["drop"]) % 4):
        raise _fail(node, "comparison window must be drop = shift < bits with bits - drop a multiple of 4")
    if op == "maxpool" and (a["bits"] <= a["drop"] or (a["bits"] - a["drop"]) % 4):
        raise _fail(node, "comparison window must be drop < bits with bits - drop a multiple of 4")
    if op == "instnorm" and (a["frac_bits"] != frac_bits or a["k_lo"] > a["k_hi"] or a["sign_bits"] % 4):
        raise _fail(node, "instnorm frac_bits must equal the plan's, k_lo <= k_hi, sign_bits a multiple of 4")
    if op == "add" and a["signs"][0] != 1 or op == "add" and a["signs"][1] == 0:
        raise _fail(node, "signs must be [1, 1] or [1, -1]")
    if op in ("approx", "softmax") and not _table_fits(a):
        raise _fail(node, "approx needs increasing knots on the 2^-6 grid, one center (on the grid) and one "
                          "coefficient list per interval, and a comparison width that is a multiple of 4")
    if op in ("maxpool", "avgpool") and not (len(a["strides"]) == len(a["kernel"]) and len(a["pads"]) == 2 * len(a["kernel"])):
        raise _fail(node, "strides and pads must match the kernel's rank")


def _table_fits(a: dict[str, Any]) -> bool:
    knots, centers = a["knots"], a["centers"]
    on_grid = all(float(v) * 64 == int(float(v) * 64) for v in [*knots, *centers])  # exact at every frac_bits >= 6
    increasing = all(p < q for p, q in zip(knots, knots[1:], strict=False))
    return on_grid and increasing and len(centers) == len(knots) + 1 == len(a["coeffs"]) and a["bits"] % 4 == 0


def _check_node_fields(node: Node) -> None:
    if type(node.id) is not str or not ID_PATTERN.fullmatch(node.id):
        raise PlanError(f"refused the model owner's plan: node id {_short(node.id)} does not match {ID_PATTERN.pattern}")
    if node.op not in SCHEMA:
        raise _fail(node, f"unknown op {_short(node.op)}")
    if type(node.inputs) is not list or not all(type(i) is str for i in node.inputs):
        raise _fail(node, "inputs must be a list of node ids")
    lo, hi = ARITY.get(node.op, (1, 1))
    if not lo <= len(node.inputs) <= hi:
        raise _fail(node, f"takes {lo}..{hi} inputs, got {len(node.inputs)}")
    problem = _ints(1, MAX_DIM, 1, MAX_RANK)(node.shape)
    if problem:
        raise _fail(node, f"shape {problem}")
    if elements(node.shape) > MAX_ELEMENTS:
        raise _fail(node, f"shape {node.shape} has more than {MAX_ELEMENTS} elements")
    problem = _int(0, 62)(node.scale)
    if problem:
        raise _fail(node, f"scale {problem}")


WIDE_ONLY = {"instnorm", "approx", "softmax"}  # their internal sums and powers are bounded for Z_2^64 only


def _check_ring(node: Node, ring_bits: int) -> None:
    """Rule 3 for the ring: a comparison of width l needs l <= ring_bits - 3 (the sign is bit
    l of x + 2^(ring_bits - 2)); norms and polynomials need Z_2^64."""
    if ring_bits == 64:
        return
    if node.op in WIDE_ONLY:
        raise _fail(node, f"needs ring_bits 64, the plan says {ring_bits}")
    width = node.attrs.get("bits")
    if type(width) is int and width > ring_bits - 3:
        raise _fail(node, f"comparison width {width} does not fit ring_bits {ring_bits} (at most ring_bits - 3)")


def check_plan(plan: Plan, input_shape: list[int] | None = None) -> None:
    """Raise ``PlanError`` unless ``plan`` satisfies rules 2-5 of the module docstring.

    ``input_shape`` is the per-sample shape the receiver expects (the data owner's image);
    None checks the plan against its own declared input shape (the dealer, the compiler).
    """
    for key, rule in (("frac_bits", _int(MIN_FRAC_BITS, MAX_FRAC_BITS)), ("ring_bits", _int(MIN_RING_BITS, MAX_RING_BITS)),
                      ("model_name", _text), ("input_name", _text),
                      ("output_name", _text), ("input_shape", _ints(1, MAX_DIM, 1, MAX_RANK))):
        problem = rule(getattr(plan, key))
        if problem:
            raise _fail(None, f"{key} {problem}")
    if plan.version != PLAN_VERSION:
        raise _fail(None, f"version {plan.version!r}, expected {PLAN_VERSION}")
    if input_shape is not None and list(plan.input_shape) != list(input_shape):
        raise _fail(None, f"input shape {plan.input_shape} is not the agreed {list(input_shape)}")
    if not 2 <= len(plan.nodes) <= MAX_NODES:
        raise _fail(None, f"must have 2..{MAX_NODES} nodes, got {len(plan.nodes)}")
    shapes: dict[str, list[int]] = {}
    last = len(plan.nodes) - 1
    for i, node in enumerate(plan.nodes):
        _check_node_fields(node)
        if node.id in shapes:
            raise _fail(node, "duplicate node id")
        if (node.op == "input") != (i == 0):
            raise _fail(node, "the first node, and only it, must be the input")
        if (node.op == "output") != (i == last):
            raise _fail(node, "the last node, and only it, must be the output (revealed to the data owner only)")
        _check_attrs(node, plan.frac_bits)
        _check_ring(node, plan.ring_bits)
        missing = [src for src in node.inputs if src not in shapes]
        if missing:
            raise _fail(node, f"inputs {missing} are not earlier nodes (plans are in topological order)")
        if node.op == "input":
            expected = list(plan.input_shape)
        else:
            try:
                expected = infer_shape(node.op, [shapes[s] for s in node.inputs], node.attrs)
            except ShapeError as exc:
                raise _fail(node, str(exc)) from None
        if list(node.shape) != expected:
            raise _fail(node, f"declared shape {node.shape} but its inputs and attributes give {expected}")
        shapes[node.id] = list(node.shape)
    if plan.nodes[last].id != plan.output_name:
        raise _fail(plan.nodes[last], f"output_name {_short(plan.output_name)} does not name the output node")


def parse_plan(text: str | bytes, input_shape: list[int] | None = None) -> Plan:
    """Parse and check a plan received from a peer (rule 1, then ``check_plan``)."""
    if len(text) > MAX_PLAN_BYTES:
        raise _fail(None, f"{len(text)} bytes, more than {MAX_PLAN_BYTES}")
    try:
        raw = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise _fail(None, f"not valid JSON ({exc})") from None
    if type(raw) is not dict or set(raw) != PLAN_KEYS:
        raise _fail(None, f"top-level keys must be {sorted(PLAN_KEYS)}")
    if type(raw["nodes"]) is not list or len(raw["nodes"]) > MAX_NODES:
        raise _fail(None, f"nodes must be a list of at most {MAX_NODES}")
    nodes = []
    for k, n in enumerate(raw["nodes"]):
        if type(n) is not dict or set(n) != NODE_KEYS:
            raise _fail(None, f"node #{k} must have exactly the keys {sorted(NODE_KEYS)}")
        nodes.append(Node(**n))
    plan = Plan(nodes=nodes, frac_bits=raw["frac_bits"], input_name=raw["input_name"], input_shape=raw["input_shape"],
                output_name=raw["output_name"], model_name=raw["model_name"], version=raw["version"], ring_bits=raw["ring_bits"])
    check_plan(plan, input_shape)
    return plan


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")
