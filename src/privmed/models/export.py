"""ONNX export of zoo models: the only form in which a model leaves privmed.

Exporter choice (measured with torch 2.13): the TorchScript-based exporter
(``torch.onnx.export(..., dynamo=False)``) gives clean static graphs (BatchNorm folded into
the preceding Conv, adaptive pools as plain AveragePool/GlobalAveragePool) and needs no
extra package. The torch.export-based exporter (torch's default since 2.9) needs
``onnxscript``, which is not installed here. The legacy exporter prints a
DeprecationWarning that we silence locally.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from privmed.errors import InputError, ModelError

log = logging.getLogger(__name__)

OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "output"


def preprocess_path(onnx_path: str | Path) -> Path:
    """Where the preprocessing description of ``model.onnx`` lives: ``model.preprocess.json``."""
    onnx_path = Path(onnx_path)
    return onnx_path.with_name(onnx_path.stem + ".preprocess.json")


def _preprocess_text(preprocess: Any) -> str:
    """JSON text of a ``privmed.data.preprocess.Preprocess`` (``to_json``) or a mapping."""
    if hasattr(preprocess, "to_json"):
        text = preprocess.to_json()
        return text if isinstance(text, str) else json.dumps(text, indent=2)
    if isinstance(preprocess, Mapping):
        return json.dumps(dict(preprocess), indent=2)
    raise InputError(
        f"preprocess: expected a Preprocess (with to_json) or a mapping, got {type(preprocess).__name__}"
    )


def export_onnx(
    model: nn.Module,
    input_shape: tuple[int, ...],
    path: str | Path,
    preprocess: Any = None,
    *,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Export ``model`` in eval mode to ONNX (opset 17) with a static ``input_shape``.

    Parameters
    ----------
    model : the network; its training flag is restored afterwards.
    input_shape : full input shape including the batch, e.g. ``(1, 1, 64, 64)``.
    path : destination ``.onnx`` file (parent folders are created).
    preprocess : optional preprocessing description (``Preprocess`` or a JSON-able mapping),
        written next to the model as ``<stem>.preprocess.json``.
    metadata : optional string key/values stored in the ONNX ``metadata_props``
        (privmed uses ``privmed.labels``, ``privmed.task``, ``privmed.output``).

    Returns
    -------
    Path of the written ``.onnx`` file. The graph has one input ``"input"`` and one output
    ``"output"`` and passes ``onnx.checker.check_model``; raises ModelError otherwise.
    """
    import onnx

    path = Path(path)
    if any(int(s) < 1 for s in input_shape):
        raise InputError(f"export {path.name}: expected positive input shape, got {input_shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    try:
        example = torch.zeros(tuple(int(s) for s in input_shape), dtype=torch.float32)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # legacy-exporter deprecation + tracer warnings
            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=False,
                opset_version=OPSET,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                do_constant_folding=True,
            )
    except Exception as exc:  # the exporter raises many types; report one line
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"export {path}: torch.onnx.export failed: {first_line}") from exc
    finally:
        model.train(was_training)

    proto = onnx.load(str(path))
    _inline_initializer_identities(proto)
    if metadata:
        for key, value in metadata.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = str(key), str(value)
    proto.producer_name = "privmed"
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ModelError(f"export {path}: exported graph fails onnx.checker: {exc}") from exc
    onnx.save(proto, str(path))
    if preprocess is not None:
        preprocess_path(path).write_text(_preprocess_text(preprocess) + "\n")
    log.info("exported %s (%d bytes, ops %s)", path, path.stat().st_size, op_counts(path))
    return path


def _inline_initializer_identities(proto: Any) -> None:
    """Replace ``Identity(initializer)`` nodes by a copy of the initializer, in place.

    The TorchScript exporter shares equal constant tensors (e.g. two folded Conv biases that
    are both zero at initialisation) and re-exposes the duplicate through an Identity node;
    copying the tensor keeps the graph a plain chain of compute ops.
    """
    graph = proto.graph
    initializers = {t.name: t for t in graph.initializer}
    keep = []
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in initializers:
            copy = graph.initializer.add()
            copy.CopyFrom(initializers[node.input[0]])
            copy.name = node.output[0]
        else:
            keep.append(node)
    if len(keep) != len(graph.node):
        del graph.node[:]
        graph.node.extend(keep)


def op_counts(path: str | Path) -> dict[str, int]:
    """Number of nodes of each op type in an ONNX file's main graph, most frequent first."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return dict(Counter(node.op_type for node in graph.node).most_common())


def read_metadata(path: str | Path) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file as a dict."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {entry.key: entry.value for entry in proto.metadata_props}
