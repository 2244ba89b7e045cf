"""Load and check an ONNX model; fold what is exact before lowering.

Every unsupported op in the graph is reported at once, with node names, before any party
starts. Exact rewrites done here, in float64 on the model owner's machine:

- Identity / Dropout / Cast-to-float are removed;
- BatchNormalization directly after a Conv, ConvTranspose or Gemm whose output has no other
  consumer is folded into that layer's weights and bias;
- x * Sigmoid(x) becomes one ``Swish`` node (SiLU) and torch's GELU export
  x * (Erf(x / sqrt(2)) + 1) * 0.5 one ``Gelu`` node: one approximation each instead of an
  approximation followed by a secret product (cheaper, and the error is not multiplied by |x|);
- a LayerNorm exported before opset 17 (ReduceMean, Sub, Pow 2, ReduceMean, Add eps, Sqrt,
  Div, then the optional Mul by the scale and Add of the bias) becomes one LayerNormalization.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from privmed.errors import ModelError

OPSET_MIN, OPSET_MAX = 13, 21

# The ops that may act on a secret tensor are the lowering's own (privmed.compiler.lower.SECRET_OPS).
# Ops evaluated at compile time; allowed only on constants (shapes are static).
CONST_OPS = {
    "Constant", "Shape", "Gather", "Cast", "Slice", "ConstantOfShape", "Range", "Concat", "Unsqueeze",
    "Squeeze", "Reshape", "Mul", "Add", "Sub", "Div", "Equal", "Where", "Expand", "Identity",
    "ReduceProd", "Floor", "Sqrt", "Neg", "Mod", "Not", "ScatterND",
}


@dataclass
class OnnxNode:
    op: str
    name: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass
class OnnxGraph:
    nodes: list[OnnxNode]
    consts: dict[str, np.ndarray]
    input_name: str
    input_shape: list[int]
    output_name: str
    opset: int
    name: str


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for a in node.attribute:
        v = onnx.helper.get_attribute_value(a)
        if isinstance(v, bytes):
            v = v.decode()
        elif isinstance(v, onnx.TensorProto):
            v = numpy_helper.to_array(v)
        elif isinstance(v, list | tuple):
            v = [x.decode() if isinstance(x, bytes) else x for x in v]
        out[a.name] = v
    return out


def load(path: Path, input_shape: list[int] | None = None) -> OnnxGraph:
    """Read and validate ``path``; raise ModelError listing every problem found."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path}: model file not found")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # noqa: BLE001 - onnx raises many kinds (DecodeError, ...)
        raise ModelError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {str(exc)[:120]})") from exc
    if not model.graph.node:
        raise ModelError(f"{path}: ONNX graph has no nodes (corrupt or empty model)")
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if not OPSET_MIN <= opset <= OPSET_MAX:
        raise ModelError(f"{path}: ONNX opset {opset} is not supported (expected {OPSET_MIN}-{OPSET_MAX})")
    g = model.graph
    consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    inputs = [i for i in g.input if i.name not in consts]
    if len(inputs) != 1 or len(g.output) != 1:
        raise ModelError(f"{path}: expected one input and one output, got {len(inputs)} inputs and {len(g.output)} outputs")
    inp = inputs[0]
    dims = [d.dim_value if d.dim_value > 0 else -1 for d in inp.type.tensor_type.shape.dim]
    if input_shape is not None:
        shape = list(input_shape)
    else:
        if any(d < 0 for d in dims[1:]):
            raise ModelError(f"{path}: input {inp.name!r} has symbolic dims {dims}; give --input-shape")
        shape = dims[1:]
    nodes = [OnnxNode(n.op_type, n.name or f"{n.op_type}_{i}", list(n.input), list(n.output), _attrs(n)) for i, n in enumerate(g.node)]
    graph = OnnxGraph(nodes, consts, inp.name, shape, g.output[0].name, opset, g.name or path.stem)
    _fold_batchnorm(graph)
    _fuse_activations(graph)
    _fuse_layernorm(graph)
    return graph


def consumers(graph: OnnxGraph) -> dict[str, list[OnnxNode]]:
    out: dict[str, list[OnnxNode]] = {}
    for n in graph.nodes:
        for i in n.inputs:
            out.setdefault(i, []).append(n)
    return out


def _fold_batchnorm(graph: OnnxGraph) -> None:
    """Fold BN into the preceding Conv/ConvTranspose/Gemm when exact (sole consumer)."""
    cons = consumers(graph)
    producer = {o: n for n in graph.nodes for o in n.outputs}
    drop: set[int] = set()
    for bn in graph.nodes:
        if bn.op != "BatchNormalization" or any(i not in graph.consts for i in bn.inputs[1:5]):
            continue
        prev = producer.get(bn.inputs[0])
        if prev is None or prev.op not in ("Conv", "ConvTranspose", "Gemm") or len(cons.get(bn.inputs[0], [])) != 1:
            continue
        if bn.inputs[0] == graph.output_name or len(prev.inputs) < 2 or prev.inputs[1] not in graph.consts:
            continue
        if prev.op == "Gemm" and (prev.attrs.get("transA", 0) or prev.attrs.get("alpha", 1.0) != 1.0 or prev.attrs.get("beta", 1.0) != 1.0):
            continue
        gamma, beta, mean, var = (graph.consts[i].astype(np.float64) for i in bn.inputs[1:5])
        a = gamma / np.sqrt(var + float(bn.attrs.get("epsilon", 1e-5)))
        w = graph.consts[prev.inputs[1]].astype(np.float64)
        if prev.op == "Conv":
            w = w * a.reshape((-1,) + (1,) * (w.ndim - 1))
        elif prev.op == "ConvTranspose":
            g = int(prev.attrs.get("group", 1))
            cin, mg = w.shape[0], w.shape[1]
            w = (w.reshape((g, cin // g, mg) + w.shape[2:]) * a.reshape((g, 1, mg) + (1,) * (w.ndim - 2))).reshape(w.shape)
        else:  # Gemm: y = x W^T (transB) or x W
            w = w * (a.reshape(-1, 1) if prev.attrs.get("transB", 0) else a.reshape(1, -1))
        b = graph.consts[prev.inputs[2]].astype(np.float64) if len(prev.inputs) > 2 and prev.inputs[2] else np.zeros_like(a)
        b = (b - mean) * a + beta
        wname, bname = f"{prev.name}__bnfold_w", f"{prev.name}__bnfold_b"
        graph.consts[wname], graph.consts[bname] = w, b
        prev.inputs = [prev.inputs[0], wname, bname]
        prev.outputs = [bn.outputs[0]]
        drop.add(id(bn))
    graph.nodes = [n for n in graph.nodes if id(n) not in drop]


def _const_value(graph: OnnxGraph, producer: dict[str, OnnxNode], name: str) -> np.ndarray | None:
    """The value of ``name`` if it is a constant (an initializer or a Constant node's output)."""
    if name in graph.consts:
        return graph.consts[name]
    p = producer.get(name)
    return np.asarray(p.attrs["value"]) if p is not None and p.op == "Constant" and "value" in p.attrs else None


def _sole_consumer(graph: OnnxGraph, cons: dict[str, list[OnnxNode]], name: str, op: str) -> OnnxNode | None:
    """The one node reading ``name``, if it is an ``op`` and ``name`` is not the graph output."""
    c = cons.get(name, [])
    return c[0] if len(c) == 1 and c[0].op == op and name != graph.output_name else None


def _fuse_activations(graph: OnnxGraph) -> None:
    """Swish and GELU subgraphs -> one node each (see the module docstring)."""
    cons = consumers(graph)
    producer = {o: n for n in graph.nodes for o in n.outputs}

    def value(name: str) -> np.ndarray | None:
        return _const_value(graph, producer, name)

    def near(name: str, target: float) -> bool:
        v = value(name)
        return v is not None and v.size == 1 and abs(float(v.reshape(-1)[0]) - target) < 1e-4 * abs(target)

    def other(n: OnnxNode, name: str) -> str | None:
        rest = [i for i in n.inputs if i != name]
        return rest[0] if len(n.inputs) == 2 and len(rest) == 1 else None

    def sole(name: str, op: str) -> OnnxNode | None:
        return _sole_consumer(graph, cons, name, op)

    drop: set[int] = set()
    for s in graph.nodes:
        if s.op == "Sigmoid" and s.outputs[0] != graph.output_name:
            x, muls = s.inputs[0], cons.get(s.outputs[0], [])
            if muls and all(m.op == "Mul" and sorted(m.inputs) == sorted([x, s.outputs[0]]) for m in muls):
                for m in muls:
                    m.op, m.inputs = "Swish", [x]
                drop.add(id(s))
        elif s.op == "Div" and near(s.inputs[1], float(np.sqrt(2.0))):
            x = s.inputs[0]
            erf = sole(s.outputs[0], "Erf")
            add = sole(erf.outputs[0], "Add") if erf else None
            mul = sole(add.outputs[0], "Mul") if add and near(other(add, erf.outputs[0]) or "", 1.0) else None  # type: ignore[union-attr]
            half = sole(mul.outputs[0], "Mul") if mul and other(mul, add.outputs[0]) == x else None  # type: ignore[union-attr]
            if half is not None and near(other(half, mul.outputs[0]) or "", 0.5):  # type: ignore[union-attr]
                half.op, half.inputs, half.attrs = "Gelu", [x], {}
                drop.update(id(n) for n in (s, erf, add, mul))
    graph.nodes = [n for n in graph.nodes if id(n) not in drop]


def _fuse_layernorm(graph: OnnxGraph) -> None:
    """The pre-opset-17 LayerNorm subgraph -> one LayerNormalization (module docstring)."""
    cons = consumers(graph)
    producer = {o: n for n in graph.nodes for o in n.outputs}

    def value(name: str) -> np.ndarray | None:
        return _const_value(graph, producer, name)

    def only(name: str, op: str) -> OnnxNode | None:
        return _sole_consumer(graph, cons, name, op)

    def axes(n: OnnxNode) -> list[int] | None:
        a = value(n.inputs[1]) if len(n.inputs) > 1 and n.inputs[1] else n.attrs.get("axes")
        return None if a is None or not n.attrs.get("keepdims", 1) else sorted(int(v) for v in np.asarray(a).reshape(-1))

    drop: set[int] = set()
    for mean in [n for n in graph.nodes if n.op == "ReduceMean"]:
        x, ax = mean.inputs[0], axes(mean)
        if ax is None or ax != list(range(-len(ax), 0)):
            continue  # normalised axes must be the trailing ones, given as negative numbers
        sub = only(mean.outputs[0], "Sub")
        if sub is None or sub.inputs != [x, mean.outputs[0]]:
            continue
        uses = cons.get(sub.outputs[0], [])
        pow_ = next((u for u in uses if u.op == "Pow"), None)
        div = next((u for u in uses if u.op == "Div" and u.inputs[0] == sub.outputs[0]), None)
        exponent = value(pow_.inputs[1]) if pow_ is not None else None
        if len(uses) != 2 or pow_ is None or div is None or exponent is None or float(exponent) != 2.0:
            continue
        var = only(pow_.outputs[0], "ReduceMean")
        add = only(var.outputs[0], "Add") if var is not None and axes(var) == ax else None
        eps = value(next((i for i in add.inputs if i != var.outputs[0]), "")) if add is not None and var is not None else None
        sqrt = only(add.outputs[0], "Sqrt") if add is not None and eps is not None and eps.size == 1 else None
        if sqrt is None or div.inputs[1] != sqrt.outputs[0] or add is None or var is None or eps is None:
            continue
        absorbed, scale, bias = [mean, sub, pow_, var, add, sqrt, div], np.array(1.0, np.float32), np.array(0.0, np.float32)
        mul = only(div.outputs[0], "Mul")
        gamma = value(next((i for i in mul.inputs if i != div.outputs[0]), "")) if mul is not None else None
        if mul is not None and gamma is not None:
            absorbed.append(mul)
            scale = gamma
            plus = only(mul.outputs[0], "Add")
            beta = value(next((i for i in plus.inputs if i != mul.outputs[0]), "")) if plus is not None else None
            if plus is not None and beta is not None:
                absorbed.append(plus)
                bias = beta
        last = absorbed.pop()  # becomes the LayerNormalization, keeping its output name
        graph.consts[f"{mean.name}__ln_scale"], graph.consts[f"{mean.name}__ln_bias"] = scale, bias
        last.op, last.inputs = "LayerNormalization", [x, f"{mean.name}__ln_scale", f"{mean.name}__ln_bias"]
        last.attrs = {"axis": ax[0], "epsilon": float(eps.reshape(-1)[0])}
        drop.update(id(n) for n in absorbed)
    graph.nodes = [n for n in graph.nodes if id(n) not in drop]
