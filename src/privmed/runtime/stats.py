"""What a session cost: one typed record used by every report (CLI summary, validation store,
segmentation summary, benchmarks), written to JSON with ``to_dict`` and read back with
``from_dict``.

Times are seconds, bytes are what each role sent (frame headers included), rounds are the
data owner's communication rounds. ``layers`` are per plan node summed over the batches of
the session, ``batches`` per batch of the stream (one image each with ``chunk=1``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

ROLES = ("data-owner", "model-owner", "dealer")


@dataclass
class LayerCost:
    id: str
    op: str
    onnx: str = ""
    kind: str = ""
    elements: int = 0
    time_s: float = 0.0
    rounds: int = 0
    bytes: int = 0
    bytes_by_role: dict[str, int] = field(default_factory=dict)


@dataclass
class BatchCost:
    index: int
    n: int
    time_s: float
    rounds: int = 0
    bytes: int = 0


@dataclass
class PlanInfo:
    """What the data owner accepted: the public plan's fingerprint and size."""

    fingerprint: str = ""
    frac_bits: int = 0
    nodes: int = 0
    comparisons: int = 0


@dataclass
class SessionStats:
    """The cost of one session (or one plaintext run: no bytes, no rounds, no roles)."""

    wall_s: float
    online_s: float
    rounds: int = 0
    bytes_sent: dict[str, int] = field(default_factory=dict)
    peak_rss_mb: dict[str, float] = field(default_factory=dict)
    cpu_s: dict[str, float] = field(default_factory=dict)
    plan: PlanInfo | None = None
    layers: list[LayerCost] = field(default_factory=list)
    batches: list[BatchCost] = field(default_factory=list)
    # two-party mode: the input-independent phase (HE on masks, OT material) inside wall_s
    offline_s: float = 0.0
    offline_bytes: int = 0
    # two-party mode: bytes of the online phases (both roles), and how many batches took their
    # offline material from a store made earlier by ``--precompute`` (their offline_s is the load)
    online_bytes: int = 0
    precomputed_batches: int = 0
    store: dict[str, Any] = field(default_factory=dict)  # the data owner's store: dir, sets used and left, fallback note

    @property
    def bytes_total(self) -> int:
        return sum(self.bytes_sent.values())

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["bytes_total"] = self.bytes_total
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> SessionStats:
        plan = raw.get("plan")
        return cls(
            wall_s=float(raw.get("wall_s", 0.0)), online_s=float(raw.get("online_s", 0.0)), rounds=int(raw.get("rounds", 0)),
            bytes_sent={str(k): int(v) for k, v in raw.get("bytes_sent", {}).items()},
            peak_rss_mb={str(k): float(v) for k, v in raw.get("peak_rss_mb", {}).items()},
            cpu_s={str(k): float(v) for k, v in raw.get("cpu_s", {}).items()},
            plan=PlanInfo(**plan) if plan else None,
            layers=[LayerCost(**layer) for layer in raw.get("layers", [])],
            batches=[BatchCost(**b) for b in raw.get("batches", [])],
            offline_s=float(raw.get("offline_s", 0.0)), offline_bytes=int(raw.get("offline_bytes", 0)),
            online_bytes=int(raw.get("online_bytes", 0)), precomputed_batches=int(raw.get("precomputed_batches", 0)),
            store=dict(raw.get("store", {})),
        )  # fmt: skip


def merge_roles(per_role: dict[str, dict[str, Any]], wall_s: float) -> SessionStats:
    """One record from the three roles' own stats (``privmed.runtime.session``): totals, per
    role, per layer (the data owner's view, the model owner's time and every role's bytes)
    and per batch."""
    do, mo, de = per_role["data-owner"], per_role["model-owner"], per_role["dealer"]
    mo_layers = {layer["id"]: layer for layer in mo["layers"]}
    de_layers = {layer["id"]: layer for layer in de["layers"]}
    layers = []
    for layer in do["layers"]:
        m = mo_layers.get(layer["id"], {})
        dealer = int(de_layers.get(layer["id"], {}).get("bytes_sent", 0))
        by_role = {"data-owner": layer["bytes_sent"], "model-owner": m.get("bytes_sent", 0), "dealer": dealer}
        layers.append(LayerCost(
            id=layer["id"], op=layer["op"], onnx=layer["onnx"], kind=layer.get("kind", ""), elements=layer["elements"],
            time_s=max(layer["time_s"], m.get("time_s", 0.0)), rounds=layer["rounds"], bytes=sum(by_role.values()),
            bytes_by_role=by_role,
        ))  # fmt: skip
    batches = []
    for i, b in enumerate(do.get("batches", [])):
        other = sum(s["batches"][i]["bytes_sent"] for s in (mo, de) if i < len(s.get("batches", [])))
        batches.append(BatchCost(b["index"], b["n"], b["time_s"], b["rounds"], b["bytes_sent"] + other))
    plan = do.get("plan")
    return SessionStats(
        wall_s=round(wall_s, 3), online_s=do["wall_s"], rounds=do["rounds"],
        bytes_sent={r: int(s["bytes_sent"]) for r, s in per_role.items()},
        peak_rss_mb={r: float(s["peak_rss_mb"]) for r, s in per_role.items()},
        cpu_s={r: float(s.get("cpu_s", 0.0)) for r, s in per_role.items()},
        plan=PlanInfo(**plan) if plan else None, layers=layers, batches=batches,
    )  # fmt: skip
