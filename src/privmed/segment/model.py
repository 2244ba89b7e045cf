"""What the data owner knows about a segmentation model: its public shape facts, never its weights.

From the ONNX file the data owner reads only what the public plan reveals anyway (input and
output shapes, the final activation) plus the class names stored in the model's metadata
(``privmed.labels``, written by privmed's trainers), and the preprocessing description
``<model>.preprocess.json``. In a deployment the vendor ships exactly these two facts to the
hospital with the model's plan; here both sit next to the ONNX file.

Modes and the models they need:

- ``2d`` and ``tri-axial``: a 2-D network, input ``(C, S, S)``; slices are resized to S x S;
- ``3d``: a 3-D network, input ``(C, P, P, P)``; P is the sliding-window patch.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from privmed.engines import ModelCard, sha256_file
from privmed.errors import InputError, ModelError

if TYPE_CHECKING:
    from privmed.data.preprocess import Preprocess

log = logging.getLogger(__name__)

MODES = ("2d", "tri-axial", "3d")
FINAL_ACTIVATIONS = ("Softmax", "Sigmoid")


@dataclass(frozen=True)
class SegmentationModel:
    """Public facts of a segmentation ONNX model plus its preprocessing.

    Attributes
    ----------
    path : the ONNX file.
    input_shape : per-sample input ``(C, *spatial)``.
    spatial_dims : 2 or 3.
    num_outputs : output channels K (classes incl. background for Softmax; 1 for a binary Sigmoid).
    final : "Softmax", "Sigmoid" or "none" (raw logits; the data owner applies the activation).
    classes : class names indexed by label value, background first.
    preprocess : ``privmed.data.preprocess.Preprocess`` from ``<model>.preprocess.json``.
    card : the ``privmed.engines.ModelCard`` the engines run.
    work_elements : per-sample size of the largest linear-layer work array (``work_elements``),
        the quantity that sets a party's peak memory per slice/patch in the secure engine.
    """

    path: Path
    input_shape: tuple[int, ...]
    spatial_dims: int
    num_outputs: int
    final: str
    classes: tuple[str, ...]
    preprocess: Preprocess
    work_elements: int = 0
    card: ModelCard | None = None  # what the engines run (privmed.engines)

    @property
    def side(self) -> tuple[int, ...]:
        """Spatial input size of the network (slice S x S or patch P x P x P)."""
        return self.input_shape[1:]

    def check_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise InputError(f"--mode {mode!r}: expected one of {', '.join(MODES)}")
        want = 3 if mode == "3d" else 2
        if self.spatial_dims != want:
            kind = "3-D U-Net (input C x P x P x P)" if want == 3 else "2-D U-Net (input C x S x S)"
            raise ModelError(
                f"{self.path}: --mode {mode} needs a {kind}, got a {self.spatial_dims}-D model "
                f"with input {self.input_shape}"
            )


def _labels(meta: dict[str, str], k: int, path: Path) -> tuple[str, ...]:
    """Class names by label value; ``privmed.labels`` lists them for Softmax outputs."""
    n_labels = 2 if k == 1 else k
    raw = meta.get("privmed.labels")
    if raw:
        try:
            names = [str(v) for v in json.loads(raw)]
        except (ValueError, TypeError):
            raise ModelError(f"{path}: metadata privmed.labels is not a JSON list") from None
        if len(names) == n_labels:
            return tuple(names)
        if k == 1 and len(names) == 1:
            return ("background", names[0])
        log.warning("%s: %d class names for %d outputs; using numbers", path, len(names), k)
    return ("background",) + tuple(f"class_{i}" for i in range(1, n_labels))


def _output_shape(model: object, path: Path) -> list[int]:
    out = model.graph.output[0]  # type: ignore[attr-defined]
    dims = [d.dim_value if d.dim_value > 0 else -1 for d in out.type.tensor_type.shape.dim]
    if not dims:
        raise ModelError(f"{path}: the output has no shape information")
    return dims


def work_elements(proto: object, input_shape: Sequence[int]) -> int:
    """Largest per-sample work array of a Conv / ConvTranspose / Gemm / MatMul, in elements.

    A convolution on shares is computed as a matrix product over unfolded patches: output
    positions x (input channels / groups) x kernel volume elements (a transposed convolution:
    input positions x output channels / groups x kernel volume). The secure engine holds a few
    64-bit copies of that array per party; measured on 2-D and 3-D U-Nets, a party's peak
    memory grows by about 64 bytes per work element per sample in a batch (docs/segment.md).
    Elementwise layers are counted by their output size.
    """
    import onnx
    from onnx import shape_inference

    model = proto  # shapes are static here: the batch is fixed to 1 for inference
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)  # type: ignore[arg-type]
    dims = fixed.graph.input[0].type.tensor_type.shape.dim
    for d, v in zip(dims, [1, *input_shape], strict=False):
        d.ClearField("dim_param")
        d.dim_value = int(v)
    try:
        inferred = shape_inference.infer_shapes(fixed)
    except Exception:  # noqa: BLE001 - a model shape inference cannot follow: no estimate
        return 0
    shapes: dict[str, list[int]] = {}
    for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        shapes[vi.name] = [d.dim_value for d in vi.type.tensor_type.shape.dim]
    consts = {t.name: list(t.dims) for t in inferred.graph.initializer}
    largest = 0
    for node in inferred.graph.node:
        out = shapes.get(node.output[0], [])
        size = math.prod(out) if out and min(out) > 0 else 0
        if node.op_type in ("Conv", "ConvTranspose") and len(node.input) > 1 and node.input[1] in consts:
            w = consts[node.input[1]]
            groups = next((a.i for a in node.attribute if a.name == "group"), 1) or 1
            kernel = math.prod(w[2:])
            if node.op_type == "Conv" and out:
                size = math.prod(out[2:]) * w[1] * kernel
            elif node.op_type == "ConvTranspose":
                inp = shapes.get(node.input[0], [])
                size = math.prod(inp[2:]) * w[1] * kernel if inp else size
            size = size // max(1, groups) if node.op_type == "ConvTranspose" else size
        elif node.op_type in ("Gemm", "MatMul") and len(node.input) > 1:
            inp = shapes.get(node.input[0], [])
            size = max(size, math.prod(inp) if inp else 0)
        largest = max(largest, size)
    return int(largest)


def _input_dims(proto: object) -> list[int]:
    inp = proto.graph.input[0]  # type: ignore[attr-defined]
    return [d.dim_value if d.dim_value > 0 else -1 for d in inp.type.tensor_type.shape.dim]


def load_model(
    path: str | Path, preprocess: str | Path | None = None, patch: int | None = None
) -> SegmentationModel:
    """Inspect ``path`` (ONNX) and load its preprocessing; one-line errors for anything wrong.

    ``patch`` (3-D) is checked against a static input side, or fills in a symbolic one. A
    symbolic 2-D input takes its size from the preprocessing description.
    """
    import onnx

    from privmed.compiler import onnx_front
    from privmed.data.preprocess import Preprocess, sidecar_path

    p = Path(path)
    if not p.is_file():
        raise ModelError(f"{p}: model file not found")
    try:
        proto = onnx.load(str(p), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - onnx raises DecodeError and friends
        raise ModelError(f"{p}: not a readable ONNX model ({type(exc).__name__})") from None
    if len(proto.graph.input) < 1 or len(proto.graph.output) != 1:
        raise ModelError(f"{p}: expected one input and one output")
    pre_path = Path(preprocess) if preprocess else sidecar_path(p)
    if not pre_path.is_file():
        raise InputError(
            f"{pre_path}: preprocessing description not found (expected next to {p.name} or given with --preprocess)"
        )
    pre = Preprocess.load(pre_path)
    in_dims = _input_dims(proto)
    if len(in_dims) not in (4, 5) or in_dims[1] < 1:
        raise ModelError(f"{p}: not a segmentation model: expected an input (N, C, H, W) or (N, C, D, H, W), got {in_dims}")
    spatial = in_dims[2:]
    if patch is not None and any(d > 0 and d != patch for d in spatial):
        raise InputError(f"--patch {patch}: {p.name} takes a fixed input of {tuple(spatial)}")
    if any(d < 0 for d in spatial):
        fill = patch if patch is not None else None
        if fill is None and pre.size is not None and len(pre.size) == len(spatial):
            spatial = [d if d > 0 else int(s) for d, s in zip(spatial, pre.size, strict=True)]
        elif fill is None:
            raise ModelError(f"{p}: the input size is symbolic {tuple(in_dims)}; give --patch")
        else:
            spatial = [d if d > 0 else int(fill) for d in spatial]
    graph = onnx_front.load(p, [in_dims[1], *spatial])
    shape = tuple(int(s) for s in graph.input_shape)
    out = _output_shape(proto, p)
    if len(out) != len(shape) + 1 or any(o > 0 and o != s for o, s in zip(out[2:], shape[1:], strict=True)):
        raise ModelError(
            f"{p}: not a segmentation model: expected an output (N, K, {', '.join(map(str, shape[1:]))}), got {tuple(out)}"
        )
    k = int(out[1])
    if k < 1:
        raise ModelError(f"{p}: the number of output classes is symbolic ({out})")
    producer = {o: n.op_type for n in proto.graph.node for o in n.output}
    final = producer.get(proto.graph.output[0].name, "")
    final = final if final in FINAL_ACTIVATIONS else "none"
    if final == "Softmax" and k == 1:
        raise ModelError(f"{p}: a Softmax over one output channel is constant; expected K >= 2")
    if final == "Sigmoid" and k > 1:
        raise ModelError(f"{p}: {k} Sigmoid outputs are multi-label; expected a Softmax over classes or one Sigmoid channel")
    meta = {m.key: m.value for m in proto.metadata_props}
    dims = len(shape) - 1
    if pre.spatial_dims != dims:
        raise InputError(f"{pre_path}: describes {pre.spatial_dims}-D inputs but {p.name} is a {dims}-D model")
    if pre.channels != shape[0]:
        raise InputError(f"{pre_path}: gives {pre.channels} channels but {p.name} takes {shape[0]}")
    if pre.size is not None and tuple(pre.size) != shape[1:] and dims == 2:
        raise InputError(f"{pre_path}: size {tuple(pre.size)} differs from the model input {shape[1:]}")
    # 3-D: the json's size is the training crop; inference runs patches of the model's side
    pre = replace(pre, size=shape[1:])
    card = ModelCard.from_proto(p, proto, sha256_file(p), shape)
    return SegmentationModel(p, shape, dims, k, final, _labels(meta, k, p), pre, work_elements(proto, shape), card)
