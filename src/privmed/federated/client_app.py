"""A hospital as a Flower ``ClientApp``: local training, evaluation and the site's own policy.

Message flow per round (Flower legacy messages, as ``SecAggPlusWorkflow`` requires):

1. TRAIN with ``secaggplus_configs`` (stages setup, share_keys, collect_masked_vectors,
   unmask; Bell et al. 2020): handled by Flower's ``secaggplus_mod``; at
   collect_masked_vectors it calls ``SiteClient.fit`` and masks what fit returns.
2. TRAIN without it (SecAgg+ off): ``SiteClient.fit`` directly, only if the site allows it.
3. EVALUATE: ``SiteClient.evaluate`` on the site's held-out images.

``site_policy_mod`` runs first and enforces the site's policy before any data is touched:
a site that requires SecAgg+ refuses a plain training request (so a server cannot
downgrade it), the SecAgg+ reconstruction threshold must exceed half the sampled sites,
and the run's DP settings must meet the site's minimum. The site derives its noise
multiplier and keeps its privacy ledger itself (``privacy``); it never takes either from
the server.

Where a site's settings come from: in deployment the SuperNode's ``--node-config``
(``data-dir``, ``site``, ``state-dir``, ``require-secagg``, ``require-dp``,
``max-epsilon``, ``dp-total-epsilon``, ``dp-total-delta``, ``threads``), see
``node_config_site``; in simulation ``SimulationSites`` maps the partition id to a site of
the study. The total budget bounds every run on the site's data set together (``ledger``).

What the server sees from a site: the masked update (SecAgg+) or the update itself, the
training-set size, the DP numbers (data independent), the round's training loss only
without DP, and per-site test AUROC with score histograms (test images are not covered by
the DP guarantee).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context, Message
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from privmed.errors import ConfigError, ProtocolError
from privmed.federated.config import FederatedConfig, SecAggConfig
from privmed.federated.ledger import SiteBudget

log = logging.getLogger(__name__)

__all__ = [
    "SimulationSites",
    "SiteClient",
    "SiteSpec",
    "make_client_app",
    "node_config_site",
    "round_data_seed",
]


@dataclass(frozen=True)
class SiteSpec:
    """Everything a site decides for itself."""

    data_dir: Path
    site: str
    state_dir: Path
    require_secagg: bool = True
    require_dp: bool = False
    max_epsilon: float = math.inf
    threads: int = 1
    total: SiteBudget = SiteBudget()
    feature_cache: Path | None = None  # frozen-feature cache (default: state_dir)
    # replaces sitedata.load_site (same arguments); the in-process benchmark passes a
    # memoising loader so that 2,000-image sites are not re-read from PNG every message
    loader: Callable[..., Any] | None = None


SiteResolver = Callable[[Context], SiteSpec]


def _flag(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ConfigError(f"node config {key}: expected true or false, got {value!r}")


def node_config_site(context: Context) -> SiteSpec:
    """SiteSpec from a SuperNode's ``--node-config`` (deployment)."""
    cfg = context.node_config
    missing = [k for k in ("data-dir", "site", "state-dir") if k not in cfg]
    if missing:
        raise ConfigError(f"SuperNode --node-config: missing {missing}")
    return SiteSpec(
        data_dir=Path(str(cfg["data-dir"])),
        site=str(cfg["site"]),
        state_dir=Path(str(cfg["state-dir"])),
        require_secagg=_flag(cfg.get("require-secagg", True), "require-secagg"),
        require_dp=_flag(cfg.get("require-dp", False), "require-dp"),
        max_epsilon=float(cfg.get("max-epsilon", math.inf)),
        threads=int(cfg.get("threads", 1)),
        total=SiteBudget(
            float(cfg.get("dp-total-epsilon", SiteBudget.epsilon)), float(cfg.get("dp-total-delta", SiteBudget.delta))
        ),
    )


@dataclass(frozen=True)
class SimulationSites:
    """Simulation: partition id i is ``sites[i]`` of the study in ``data_dir``."""

    data_dir: Path
    sites: tuple[str, ...]
    run_dir: Path
    require_secagg: bool
    require_dp: bool
    max_epsilon: float = math.inf
    threads: int = 1
    total: SiteBudget = SiteBudget()

    def __call__(self, context: Context) -> SiteSpec:
        from privmed.federated.checkpoint import RunDir

        pid = int(context.node_config["partition-id"])
        if not 0 <= pid < len(self.sites):
            raise ConfigError(f"simulation: partition id {pid} outside the {len(self.sites)} sites")
        site = self.sites[pid]
        return SiteSpec(
            data_dir=self.data_dir,
            site=site,
            state_dir=RunDir(self.run_dir).site_state_dir(site),
            require_secagg=self.require_secagg,
            require_dp=self.require_dp,
            max_epsilon=self.max_epsilon,
            threads=self.threads,
            total=self.total,
        )


def round_data_seed(seed: int, server_round: int, site: str) -> int:
    """Seed of a site's data order in a round (plain SGD): SHA-256 of (seed, round, site)."""
    digest = hashlib.sha256(f"{seed}:{server_round}:{site}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def _check_policy(spec: SiteSpec, cfg: FederatedConfig) -> None:
    """Refuse a run that does not meet the site's own privacy policy."""
    cfg.check()
    if spec.site not in cfg.sites:
        raise ConfigError(f"site {spec.site!r} is not one of the run's sites {list(cfg.sites)}")
    if spec.require_secagg and cfg.secagg is None:
        raise ConfigError(f"site {spec.site}: requires SecAgg+, the run has it off")
    if spec.require_dp and cfg.dp is None:
        raise ConfigError(f"site {spec.site}: requires DP-SGD, the run has it off")
    if cfg.dp is not None and cfg.dp.epsilon > spec.max_epsilon:
        raise ConfigError(
            f"site {spec.site}: run asks for epsilon={cfg.dp.epsilon:g}, the site allows at most"
            f" {spec.max_epsilon:g}"
        )


class SiteClient(NumPyClient):
    """``fit`` = one round of ``client_update`` under the site's ledger; ``evaluate`` = AUROC."""

    def __init__(self, spec: SiteSpec) -> None:
        self.spec = spec

    def _setup(self, config: dict[str, Any]) -> tuple[FederatedConfig, int, Any, Any]:
        import torch

        from privmed.federated.recipes import site_inputs
        from privmed.federated.sitedata import load_site

        torch.set_num_threads(max(1, self.spec.threads))
        cfg = FederatedConfig.from_flat(config, source="server instructions")
        _check_policy(self.spec, cfg)
        server_round = config.get("server-round")
        if not isinstance(server_round, int) or server_round < 1:
            raise ProtocolError(f"server instructions: expected server-round >= 1, got {server_round!r}")
        data = (self.spec.loader or load_site)(
            self.spec.data_dir, self.spec.site, labels=cfg.labels,
            image_size=cfg.image_size, test_fraction=cfg.test_fraction,
        )
        data = site_inputs(cfg.recipe, data, self.spec.feature_cache or self.spec.state_dir, cfg.augment_mult)
        model = cfg.build_model()
        return cfg, server_round, data, model

    def _global(self, model: Any, parameters: Sequence[np.ndarray], server_round: int) -> list[np.ndarray]:
        from privmed.federated.arrays import check_arrays, get_arrays

        return check_arrays(parameters, get_arrays(model), what=f"round {server_round} global weights")

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        from privmed.federated.ledger import PrivacyLedger
        from privmed.federated.local import DPSGD, LocalTraining, client_update
        from privmed.federated.privacy import PrivacyBudgetExhausted

        cfg, server_round, data, model = self._setup(config)
        global_arrays = self._global(model, parameters, server_round)
        training = LocalTraining(cfg.local_epochs, cfg.batch_size, cfg.lr)
        metrics: dict[str, Any] = {"site": self.spec.site, "n-train": data.n_train}
        if cfg.dp is None:
            update = client_update(
                model, global_arrays, data.x_train, data.y_train, training,
                data_seed=round_data_seed(cfg.seed, server_round, self.spec.site),
            )
            metrics["train-loss"] = update.train_loss
        else:
            ledger = PrivacyLedger.open(
                self.spec.state_dir, site=self.spec.site, dataset=data.fingerprint,
                run_name=cfg.run_name, dp=cfg.dp, n_train=data.n_train, batch_size=cfg.batch_size,
                local_epochs=cfg.local_epochs, rounds=cfg.rounds, total=self.spec.total,
            )
            ledger.check_next_round()  # raises PrivacyBudgetExhausted before touching data
            update = client_update(
                model, global_arrays, data.x_train, data.y_train, training,
                dp=DPSGD(ledger.noise_multiplier, ledger.max_grad_norm),
            )
            spent = ledger.record(server_round, update.privacy_history)
            try:
                next_eps = ledger.check_next_round()
            except PrivacyBudgetExhausted:
                next_eps = -1.0  # the server stops before the next round
            metrics.update({f"dp-{k.replace('_', '-')}": v for k, v in spent.as_dict().items()})
            metrics["dp-epsilon-next"] = next_eps
            metrics["dp-budget"] = cfg.dp.epsilon
            # integer-order bound: Opacus' fractional orders cost ~0.5 s per call
            metrics["dp-site-total-epsilon"] = ledger.total_spent_bound()
            metrics["dp-site-total-budget"] = ledger.total.epsilon
            log.info("site %s round %d: %s", self.spec.site, server_round, spent.line())
        if cfg.secagg is not None:
            _check_secagg_range(self.spec.site, update.delta, data.n_train, cfg.secagg)
        return update.delta, data.n_train, metrics

    def evaluate(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[float, int, dict[str, Any]]:
        from privmed.federated.arrays import set_arrays
        from privmed.federated.local import predict_proba
        from privmed.federated.metrics import auroc_per_label, score_histograms

        cfg, server_round, data, model = self._setup(config)
        set_arrays(model, self._global(model, parameters, server_round))
        probs = predict_proba(model, data.x_test)
        known = ~np.isnan(data.y_test)
        eps = 1e-7
        bce = -(np.where(known, data.y_test, 0) * np.log(probs + eps)
                + np.where(known, 1 - data.y_test, 0) * np.log(1 - probs + eps))
        loss = float(bce[known].mean()) if known.any() else 0.0
        aurocs = auroc_per_label(data.y_test, probs)
        hist = score_histograms(data.y_test, probs)
        return loss, data.n_test, {
            "site": self.spec.site,
            "auroc": json.dumps([a if math.isfinite(a) else None for a in aurocs]),
            "hist": hist.astype("<i8").tobytes(),
            "n-test": data.n_test,
        }


def _check_secagg_range(site: str, delta: Sequence[np.ndarray], n: int, secagg: SecAggConfig) -> None:
    """Refuse to send an update SecAgg+ would clip (Flower clips silently)."""
    if n > secagg.max_weight:
        raise ConfigError(
            f"site {site}: {n} training images > SecAgg+ max weight {secagg.max_weight:g}"
            " (the weighted sum would overflow); raise --secagg-max-weight"
        )
    largest = max(float(np.abs(d).max()) for d in delta if d.size) * n / secagg.max_weight
    if largest >= secagg.clipping_range:
        raise ConfigError(
            f"site {site}: weighted update entry {largest:.3g} >= SecAgg+ clipping range"
            f" {secagg.clipping_range:g}; lower the learning rate or raise --secagg-clip"
        )


def site_policy_mod(spec: SiteSpec, msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Route TRAIN messages through ``secaggplus_mod`` or refuse them (see module docstring)."""
    if msg.metadata.message_type != "train":
        return call_next(msg, ctxt)
    records = msg.content.config_records
    if RECORD_KEY_CONFIGS in records:
        sa = records[RECORD_KEY_CONFIGS]
        if sa.get(Key.STAGE) == Stage.SETUP:
            threshold, sampled = sa.get(Key.THRESHOLD), sa.get(Key.SAMPLE_NUMBER)
            if not (isinstance(threshold, int) and isinstance(sampled, int) and 2 * threshold > sampled):
                raise ProtocolError(
                    f"site {spec.site}: SecAgg+ threshold {threshold!r} of {sampled!r} sites is not a"
                    " majority; refusing"
                )
        return secaggplus_mod(msg, ctxt, call_next)
    if spec.require_secagg:
        raise ProtocolError(f"site {spec.site}: requires SecAgg+, server sent a plain training request")
    fit_config = records.get("fitins.config")
    if fit_config is not None and fit_config.get("secagg") is True:
        raise ProtocolError(f"site {spec.site}: run declares SecAgg+ but the request is plain")
    return call_next(msg, ctxt)


def make_client_app(resolver: SiteResolver, extra_mods: Sequence[Mod] = ()) -> ClientApp:
    """The site ``ClientApp``. ``extra_mods`` run outermost (tests use one to drop a site)."""

    def client_fn(context: Context) -> Any:
        return SiteClient(resolver(context)).to_client()

    def policy(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        return site_policy_mod(resolver(ctxt), msg, ctxt, call_next)

    return ClientApp(client_fn=client_fn, mods=[*extra_mods, policy])


# Deployment entry point for ``flower-supernode`` / ``flwr run`` (pyproject: clientapp).
app = make_client_app(node_config_site)
