"""What a federated run is: model, schedule, SecAgg+ and DP settings, and their checks.

One frozen ``FederatedConfig`` describes a run. It travels as a flat mapping of TOML-able
scalars (``to_flat`` / ``from_flat``): in Flower's run config (``flwr run --run-config``),
in every round's ``FitIns.config`` sent to the sites, and in ``RUN_DIR/manifest.json``.

The checks here refuse configurations that claim differential privacy but are not private
(the failure of the system privmed replaces, whose shipped DP-SGD settings added
essentially no noise): clipping off or infinite, epsilon so large that the bound means
nothing, delta not far below 1/n, or a noise multiplier below ``MIN_NOISE_MULTIPLIER``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from privmed.errors import ConfigError

__all__ = [
    "MAX_EPSILON",
    "MIN_NOISE_MULTIPLIER",
    "RUN_NAME_PATTERN",
    "DPConfig",
    "FederatedConfig",
    "SecAggConfig",
    "check_run_name",
    "safe_run_name",
]

# An (epsilon, delta) bound with epsilon above this says nothing useful about a patient:
# e^50 bounds the likelihood ratio of any outcome with and without them by ~5e21.
MAX_EPSILON = 50.0
# Below this the Gaussian noise is under a third of the clipping norm per step; for any
# realistic schedule the RDP bound then exceeds MAX_EPSILON, i.e. DP in name only.
MIN_NOISE_MULTIPLIER = 0.3
# Run names come from the server and end up in site-side files and logs: letters, digits,
# '.', '_', '-' only, not starting with '.', so '../x', '/etc/x' or '' can never be a name.
RUN_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_run_name(name: object) -> str:
    """Return ``name`` if it matches ``^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$``; ConfigError otherwise."""
    if not isinstance(name, str) or RUN_NAME_PATTERN.fullmatch(name) is None:
        raise ConfigError(
            f"run name {name!r}: expected 1-64 characters from A-Z a-z 0-9 . _ - starting with a"
            " letter or digit"
        )
    return name


def safe_run_name(text: str, suffix: str) -> str:
    """A valid run name from a folder name and a random suffix (unsafe characters -> '-')."""
    stem = re.sub(r"[^A-Za-z0-9._-]", "-", text).lstrip("._-")[: 63 - len(suffix)] or "run"
    return check_run_name(f"{stem}-{suffix}")


@dataclass(frozen=True)
class DPConfig:
    """DP-SGD at every site (Opacus): per-sample clipping to ``max_grad_norm`` plus Gaussian
    noise of std ``noise_multiplier * max_grad_norm``, calibrated per site so that the whole
    run (all rounds) costs at most (``epsilon``, ``delta``) for any one training record.
    """

    epsilon: float
    delta: float
    max_grad_norm: float

    def check(self) -> None:
        """Raise ConfigError for a setting that would be non-private while claiming DP."""
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ConfigError(
                f"DP max-grad-norm: expected a finite clipping norm > 0, got {self.max_grad_norm}"
                " (no clipping means no sensitivity bound and no privacy)"
            )
        if not (math.isfinite(self.epsilon) and 0 < self.epsilon <= MAX_EPSILON):
            raise ConfigError(
                f"DP epsilon: expected 0 < epsilon <= {MAX_EPSILON:g}, got {self.epsilon}"
                " (a larger epsilon is not a meaningful privacy guarantee)"
            )
        if not (0 < self.delta < 1e-2):
            raise ConfigError(f"DP delta: expected 0 < delta < 0.01, got {self.delta}")


@dataclass(frozen=True)
class SecAggConfig:
    """Flower SecAgg+ (Bell et al. 2020) parameters; see ``flwr.server.workflow.SecAggPlusWorkflow``.

    ``clipping_range`` bounds every entry of ``(n_site / max_weight) * update``; sites refuse
    to send an update that would be clipped, rather than corrupt the aggregate silently.
    ``max_weight`` must be >= every site's training-set size (sites check); precision is best
    when it is close to the largest one. Quantisation step: ``2 * clipping_range /
    quantization_range``.
    """

    reconstruction_threshold: float = 0.67
    clipping_range: float = 8.0
    quantization_range: int = 2**22
    max_weight: float = 1000.0
    timeout: float = 300.0

    def check(self, num_sites: int) -> None:
        if num_sites < 3:
            raise ConfigError(
                f"SecAgg+: expected at least 3 sites, got {num_sites} (with 2 sites the sum"
                " reveals the other site's update to each site)"
            )
        if not 0 < self.reconstruction_threshold <= 1:
            raise ConfigError(
                "SecAgg+ reconstruction threshold: expected a fraction in (0, 1], got "
                f"{self.reconstruction_threshold}"
            )
        if not (self.clipping_range > 0 and self.max_weight >= 1 and self.timeout > 0):
            raise ConfigError(
                "SecAgg+: expected clipping-range > 0, max-weight >= 1 and timeout > 0, got "
                f"{self.clipping_range}, {self.max_weight}, {self.timeout}"
            )
        if num_sites * self.quantization_range >= 2**32:
            raise ConfigError(
                f"SecAgg+: {num_sites} sites x quantization range {self.quantization_range}"
                " overflows the 2^32 modulus"
            )

    def threshold_for(self, num_sites: int) -> int:
        """Shares needed to unmask: ``max(2, round(fraction * num_sites))`` as Flower rounds it."""
        return max(2, round(self.reconstruction_threshold * num_sites))


@dataclass(frozen=True)
class FederatedConfig:
    """One federated training run.

    Attributes
    ----------
    model : zoo name ("small-cnn", "resnet18", "densenet121", ...).
    rounds : federated rounds.
    labels : finding names, in output order (all sites must use exactly these).
    sites : site names, in client order (partition id i is ``sites[i]`` in simulation).
    image_size : square side the images are resized to.
    features : layer widths for "small-cnn" (``build_model(features=...)``); () = defaults.
    local_epochs, batch_size, lr : local SGD at each site per round (plain SGD: with DP the
        expected Poisson batch is ``batch_size``).
    norm : "group" (default), "none" (small-cnn: DP-trainable and servable by the secure
        engine) or "batch" (not with DP).
    recipe : "end-to-end" (``model`` trained whole) or "scatter" (frozen scattering
        features + a small DP-trained head); see ``recipes``.
    train_params : "all", "norms-head" or "head": the parameters local training updates.
    augment_mult : augmented views per training image (1 = off); each example's gradient is
        the mean over its views before clipping (``local``, ``recipes.augmented_views``).
    ema : decay of an exponential moving average of the global weights over rounds (0 =
        off). The sites train from the plain global weights; evaluation and the exported
        model use the average (post-processing of released models: no privacy cost).
    test_fraction : share of each site's images held out (by a hash of the image id).
    seed : seeds model initialisation and data order (not DP noise, see ``local``).
    run_name : identifies the run in every site's privacy ledger (``check_run_name``); the
        site's cumulative budget does not depend on it (``ledger``).
    secagg, dp : None for off.
    """

    model: str
    rounds: int
    labels: tuple[str, ...]
    sites: tuple[str, ...]
    image_size: int = 64
    features: tuple[int, ...] = ()
    local_epochs: int = 1
    batch_size: int = 16
    lr: float = 0.05
    norm: str = "group"
    recipe: str = "end-to-end"
    train_params: str = "all"
    ema: float = 0.0
    augment_mult: int = 1
    test_fraction: float = 0.2
    seed: int = 0
    run_name: str = "run"
    secagg: SecAggConfig | None = field(default_factory=SecAggConfig)
    dp: DPConfig | None = None

    def check(self) -> None:
        """Raise ConfigError on an inconsistent or non-private configuration."""
        check_run_name(self.run_name)
        if self.rounds < 1 or self.local_epochs < 1 or self.batch_size < 1:
            raise ConfigError(
                "expected rounds, local epochs and batch size >= 1, got "
                f"{self.rounds}, {self.local_epochs}, {self.batch_size}"
            )
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"learning rate: expected a finite value > 0, got {self.lr}")
        if not self.labels:
            raise ConfigError("labels: expected at least one finding")
        if len(self.sites) < 2:
            raise ConfigError(f"sites: expected at least 2 sites, got {list(self.sites)}")
        if len(set(self.sites)) != len(self.sites):
            raise ConfigError(f"sites: names must be unique, got {list(self.sites)}")
        if not 0 < self.test_fraction < 1:
            raise ConfigError(f"test fraction: expected 0 < f < 1, got {self.test_fraction}")
        if any(w < 1 for w in self.features):
            raise ConfigError(f"features: expected positive widths, got {list(self.features)}")
        from privmed.federated.recipes import RECIPES, TRAIN_PARAMS

        if self.recipe not in RECIPES:
            raise ConfigError(f"recipe: expected one of {', '.join(RECIPES)}, got {self.recipe!r}")
        if self.train_params not in TRAIN_PARAMS:
            raise ConfigError(f"train-params: expected one of {', '.join(TRAIN_PARAMS)}, got {self.train_params!r}")
        if not 1 <= self.augment_mult <= 6:
            raise ConfigError(f"augment-mult: expected 1..6 views, got {self.augment_mult}")
        if not 0.0 <= self.ema < 1.0:
            raise ConfigError(f"ema: expected a decay in [0, 1), got {self.ema}")
        self._check_size()
        if self.norm not in ("group", "batch", "none"):
            raise ConfigError(f"norm: expected 'group', 'batch' or 'none', got {self.norm!r}")
        if self.secagg is not None:
            self.secagg.check(len(self.sites))
        if self.dp is not None:
            self.dp.check()
            if self.norm == "batch":
                raise ConfigError(
                    "DP-SGD needs norm='group' (or 'none'): BatchNorm mixes samples, so"
                    " per-sample clipping would not bound one record's influence"
                )

    def _check_size(self) -> None:
        from privmed.federated.recipes import SCATTER_J
        from privmed.models.zoo import min_input_side

        if self.recipe == "scatter":
            side, what = 2**SCATTER_J * 2, "the scatter recipe"
        else:
            side, what = min_input_side(self.model, self.features or None), f"model {self.model}"
        if self.image_size < side or self.image_size % side:
            raise ConfigError(f"image size {self.image_size}: {what} needs a multiple of {side}")

    def build_model(self) -> Any:
        """A fresh network of this run: what the sites train and exchange (the zoo model on
        1-channel images, or the scatter head on scattering features), one output per label,
        with only ``train_params`` trainable."""
        from privmed.federated.recipes import SCATTER_J, SCATTER_L, select_trainable
        from privmed.models.scatter import ScatterHead, scattering_channels
        from privmed.models.zoo import build_model

        model: Any
        if self.recipe == "scatter":
            side = self.image_size // 2**SCATTER_J
            model = ScatterHead(scattering_channels(SCATTER_J, SCATTER_L), len(self.labels), side)
        else:
            model = build_model(
                self.model, 1, len(self.labels), norm=self.norm, features=self.features or None
            )
        return select_trainable(model, self.train_params)

    # -- flat form: Flower run config / FitIns.config / manifest -------------------------
    def to_flat(self) -> dict[str, int | float | str | bool]:
        """Flat mapping with TOML scalar values; ``from_flat`` inverts it exactly."""
        flat: dict[str, int | float | str | bool] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("secagg", "dp"):
                flat[f.name] = value is not None
                if value is not None:
                    for k, v in asdict(value).items():
                        flat[f"{f.name}-{k}"] = v
            elif isinstance(value, tuple):
                flat[f.name] = "|".join(str(v) for v in value)
            else:
                flat[f.name] = value
        return {k.replace("_", "-"): v for k, v in flat.items()}

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any], *, source: str = "run config") -> FederatedConfig:
        """Parse ``to_flat`` output (extra keys ignored); raise ConfigError on missing/wrong keys."""
        data = {str(k).replace("-", "_"): v for k, v in flat.items()}

        for name, default in (("recipe", "end-to-end"), ("train_params", "all"), ("ema", 0.0), ("augment_mult", 1)):
            data.setdefault(name, default)  # runs started before recipes existed

        def take(name: str, kind: type) -> Any:
            if name not in data:
                raise ConfigError(f"{source}: missing key {name.replace('_', '-')!r}")
            value = data[name]
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise ConfigError(
                    f"{source}: key {name.replace('_', '-')!r}: expected {kind.__name__}, "
                    f"got {type(value).__name__}"
                )
            return value

        def sub(prefix: str, klass: type) -> Any:
            if not take(prefix, bool):
                return None
            kwargs = {
                f.name: take(f"{prefix}_{f.name}", _kind(f.type)) for f in fields(klass)
            }
            return klass(**kwargs)

        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if f.name == "secagg":
                kwargs[f.name] = sub("secagg", SecAggConfig)
            elif f.name == "dp":
                kwargs[f.name] = sub("dp", DPConfig)
            elif f.name in ("labels", "sites", "features"):
                text = take(f.name, str)
                parts = tuple(text.split("|")) if text else ()
                if f.name == "features":
                    try:
                        parts = tuple(int(p) for p in parts)  # type: ignore[misc]
                    except ValueError:
                        raise ConfigError(f"{source}: features: expected integers, got {text!r}") from None
                kwargs[f.name] = parts
            else:
                kwargs[f.name] = take(f.name, _kind(f.type))
        return cls(**kwargs)

    def with_rounds(self, rounds: int) -> FederatedConfig:
        return replace(self, rounds=rounds)


def _kind(annotation: Any) -> type:
    """Python type of a dataclass field annotation (annotations are strings here)."""
    name = str(annotation)
    for kind in (bool, int, float, str):
        if name == kind.__name__:
            return kind
    raise TypeError(f"unsupported field type {annotation!r}")
