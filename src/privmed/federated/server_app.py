"""The federation server as a Flower ``ServerApp``: FedAvg on updates, through SecAgg+.

One round r (``RoundStrategy`` called by Flower's ``DefaultWorkflow``):

1. fit: every site receives the global weights w_{r-1} and the run configuration and
   returns its update (``client_app.SiteClient.fit``). With SecAgg+ (Flower's
   ``SecAggPlusWorkflow``, Bell et al. 2020: 4 message rounds per site - setup, share keys,
   collect masked vectors, unmask) the server learns only sum_i n_i * update_i / sum_i n_i;
   without, it averages the plain updates (``arrays.weighted_average``).
2. w_r = w_{r-1} + aggregate.
3. evaluate: every site scores w_r on its held-out images and returns its AUROC and score
   histograms; the pooled AUROC is computed from the summed histograms.
4. checkpoint: ``RunDir.save_round`` commits w_r with the round's metrics. Only then is
   round r complete; a crash before that re-runs round r on resume.

Stops: all rounds done ("complete"); a site's next round would exceed its DP budget, as
projected by the site itself ("stopped-budget", checked before the round starts); a round
fails (too few sites, SecAgg+ halted, a site error) or sites do not connect within the
deadline ("failed", with the first site error as message).

``make_server_app(run_dir, config)`` is used by the simulation; ``app`` (run config keys of
``FederatedConfig.to_flat`` plus ``run-dir``) by the deployment engine (``flwr run``).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server import Grid, LegacyContext, ServerApp, ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

from privmed.errors import ConfigError, PeerError, ProtocolError
from privmed.federated.arrays import add_arrays, check_arrays, weighted_average
from privmed.federated.checkpoint import RunDir
from privmed.federated.config import FederatedConfig
from privmed.federated.metrics import BINS, auroc_from_histograms, macro_mean
from privmed.federated.peers import DeadlineGrid, failure_text, json_default, parse_evaluation

log = logging.getLogger(__name__)

__all__ = ["RoundStrategy", "app", "make_server_app", "run_server"]

CONNECT_TIMEOUT_S = 600
RoundCallback = Callable[[dict[str, Any]], None]


class RoundStrategy(Strategy):
    """FedAvg of site updates with checkpoints, resume and stops (see module docstring)."""

    def __init__(
        self,
        config: FederatedConfig,
        run_dir: RunDir,
        names: list[str],
        weights: list[np.ndarray],
        start_round: int,
        on_round: RoundCallback | None = None,
        connect_timeout: float = CONNECT_TIMEOUT_S,
    ) -> None:
        self.config = config
        self.run_dir = run_dir
        self.names = names
        self.weights = weights
        self.start_round = start_round
        self.on_round = on_round
        self.connect_timeout = connect_timeout
        self.pending: tuple[int, list[np.ndarray], dict[str, Any]] | None = None
        # moving average of the global weights (config.ema > 0): what is evaluated and exported
        self.ema: list[np.ndarray] | None = run_dir.ema_weights(config.ema, start_round) if config.ema else None
        self.stop_state: str | None = None  # "stopped-budget" | "failed"
        self.stop_message = ""
        self.next_epsilon: dict[str, float] = {}
        self.round_started = time.monotonic()

    # -- helpers -------------------------------------------------------------------------
    def _abs(self, server_round: int) -> int:
        return self.start_round + server_round

    def _stop(self, state: str, message: str) -> None:
        if self.stop_state is None:
            self.stop_state, self.stop_message = state, message
            log.warning("federated run %s: %s", state, message)

    def _instructions(self, server_round: int) -> dict[str, Scalar]:
        flat: dict[str, Scalar] = dict(self.config.to_flat())
        flat["server-round"] = self._abs(server_round)
        return flat

    def _all_sites(self, client_manager: ClientManager) -> list[ClientProxy]:
        need = len(self.config.sites)
        deadline = time.monotonic() + self.connect_timeout
        # Flower's DefaultWorkflow refreshes the node list when num_available() is called
        # (or every 5 s); ClientManager.wait_for alone would wait for that refresh.
        while client_manager.num_available() < need and time.monotonic() < deadline:
            time.sleep(0.2)
        if client_manager.num_available() < need:
            self._stop(
                "failed",
                f"only {client_manager.num_available()} of {need} sites connected within"
                f" {self.connect_timeout:g} s",
            )
            return []
        nodes = list(client_manager.all().values())
        if len(nodes) != need:
            # without SuperNode authentication an extra node could join; refuse to guess
            self._stop("failed", f"{len(nodes)} nodes connected, the run has {need} sites")
            return []
        return nodes

    # -- Strategy interface --------------------------------------------------------------
    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return ndarrays_to_parameters(self.weights)

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        if self.stop_state is not None:
            return []
        over = {s: e for s, e in self.next_epsilon.items() if e < 0 or (
            self.config.dp is not None and e > self.config.dp.epsilon)}
        if over:
            self._stop(
                "stopped-budget",
                f"before round {self._abs(server_round)}: one more round would exceed epsilon="
                f"{self.config.dp.epsilon if self.config.dp else math.nan:g} at sites {sorted(over)}",
            )
            return []
        self.round_started = time.monotonic()
        proxies = self._all_sites(client_manager)
        ins = FitIns(parameters, self._instructions(server_round))
        return [(p, ins) for p in proxies]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        r = self._abs(server_round)
        if failures:
            reasons = "; ".join(failure_text(f) for f in failures[:3])
            if "PrivacyBudgetExhausted" in reasons:
                self._stop("stopped-budget", f"round {r}: {reasons}")
                return None, {}
            log.warning("round %d: %d site failures: %s", r, len(failures), reasons)
        needed = self.config.secagg.threshold_for(len(self.config.sites)) if self.config.secagg else len(self.config.sites)
        if len(results) < needed:
            reasons = "; ".join(failure_text(f) for f in failures[:3]) or "no reason given"
            self._stop("failed", f"round {r}: {len(results)} site results, need {needed}: {reasons}")
            return None, {}
        fit_metrics: dict[str, dict[str, Any]] = {}
        for _, res in results:
            site = res.metrics.get("site")
            if site not in self.config.sites or site in fit_metrics:
                raise ProtocolError(
                    f"round {r}: result from site {site!r}: expected one result from each of"
                    f" {list(self.config.sites)}"
                )
            fit_metrics[site] = {k: v for k, v in res.metrics.items() if k != "site"}
            fit_metrics[site]["n-train"] = int(res.num_examples)
            numbers = {k: v for k, v in res.metrics.items() if k.startswith("dp-") or k == "train-loss"}
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers.values()):
                raise ProtocolError(f"round {r}: site {site}: expected numeric DP/loss metrics, got {numbers}")
            if "dp-epsilon-next" in numbers:
                self.next_epsilon[site] = float(numbers["dp-epsilon-next"])
        updates = [check_arrays(parameters_to_ndarrays(res.parameters), self.weights, what=f"round {r} update")
                   for _, res in results]
        if self.config.secagg is not None:
            # SecAgg+ hands every result the same unmasked weighted mean
            if any(not all(np.array_equal(a, b) for a, b in zip(u, updates[0], strict=True)) for u in updates):
                raise ProtocolError(f"round {r}: SecAgg+ results disagree on the aggregate")
            aggregate = updates[0]
        else:
            aggregate = weighted_average(updates, [res.num_examples for _, res in results])
        new_weights = add_arrays(self.weights, aggregate)
        self.pending = (r, new_weights, {"fit": fit_metrics, "sites_aggregated": sorted(fit_metrics)})
        return ndarrays_to_parameters(new_weights), {}

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        r = self._abs(server_round)
        if self.pending is None or self.pending[0] != r:
            if self.stop_state is None:
                self._stop("failed", f"round {r}: aggregation did not complete (SecAgg+ halted or sites failed)")
            return []
        if self.ema is not None:
            parameters = ndarrays_to_parameters(self._ema_after(self.ema, self.pending[1]))
        ins = EvaluateIns(parameters, self._instructions(server_round))
        return [(p, ins) for p in self._all_sites(client_manager)]

    def _ema_after(self, ema: list[np.ndarray], new_weights: list[np.ndarray]) -> list[np.ndarray]:
        """The moving average once ``new_weights`` is committed (as ``RunDir.ema_weights``)."""
        d = self.config.ema
        return [(d * np.asarray(e, np.float64) + (1 - d) * np.asarray(w, np.float64)).astype(np.float32)
                for e, w in zip(ema, new_weights, strict=True)]  # fmt: skip

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        r = self._abs(server_round)
        if self.pending is None or self.pending[0] != r:
            return None, {}
        _, new_weights, fit_info = self.pending
        k = len(self.config.labels)
        per_site: dict[str, Any] = {}
        pooled = np.zeros((k, 2, BINS), dtype=np.int64)
        for _, res in results:
            site, aurocs, hist = parse_evaluation(res, k)
            if site not in self.config.sites or site in per_site:
                raise ProtocolError(f"round {r}: evaluation from unexpected or repeated site {site!r}")
            per_site[site] = {"auroc": aurocs, "auroc_macro": macro_mean([a if a is not None else math.nan for a in aurocs]),
                              "n_test": int(res.num_examples), "loss": float(res.loss)}
            pooled += hist
        pooled_auroc = auroc_from_histograms(pooled)
        metrics = {
            "round": r,
            **fit_info,
            "evaluation": per_site,
            "evaluation_failures": [failure_text(f) for f in failures],
            "pooled_auroc": [a if math.isfinite(a) else None for a in pooled_auroc],
            "pooled_auroc_macro": macro_mean(pooled_auroc),
            "seconds": time.monotonic() - self.round_started,
        }
        metrics = json.loads(json.dumps(metrics, default=json_default).replace("NaN", "null"))
        self.run_dir.save_round(r, self.names, new_weights, metrics)
        if self.ema is not None:
            self.ema = self._ema_after(self.ema, new_weights)
        self.weights, self.pending = new_weights, None
        if self.on_round is not None:
            self.on_round(metrics)
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        return None


def run_server(
    grid: Grid,
    context: Context,
    config: FederatedConfig,
    run_dir: str | Path,
    on_round: RoundCallback | None = None,
    connect_timeout: float = CONNECT_TIMEOUT_S,
) -> str:
    """Run (or resume) the rounds in ``run_dir``; return the final state written to status.json."""
    import torch

    from privmed.federated.arrays import federated_names, get_arrays

    config.check()
    rd = RunDir(run_dir)
    config = rd.open(config)
    if rd.last_round() < 0:
        torch.manual_seed(config.seed)
        model = config.build_model()
        rd.save_round(0, federated_names(model), get_arrays(model), {"initial": True})
    start = rd.last_round()
    names, weights, last_metrics = rd.load_round(start)
    if start >= config.rounds:
        rd.write_status("complete", f"all {config.rounds} rounds already completed")
        return "complete"
    rd.write_status("running", f"resuming after round {start}" if start else "")
    strategy = RoundStrategy(config, rd, names, weights, start, on_round, connect_timeout)
    # the sites' own projections from the last completed round: a resumed or extended run
    # stops before a round that some site already said would exceed its budget
    for site, fit in last_metrics.get("fit", {}).items():
        if "dp-epsilon-next" in fit:
            strategy.next_epsilon[site] = float(fit["dp-epsilon-next"])
    timeout = config.secagg.timeout if config.secagg else 600.0
    legacy = LegacyContext(
        context=context,
        config=ServerConfig(num_rounds=config.rounds - start, round_timeout=timeout),
        strategy=strategy,
    )
    fit_workflow = None
    if config.secagg is not None:
        fit_workflow = SecAggPlusWorkflow(
            num_shares=1.0,
            reconstruction_threshold=config.secagg.reconstruction_threshold,
            max_weight=config.secagg.max_weight,
            clipping_range=config.secagg.clipping_range,
            quantization_range=config.secagg.quantization_range,
            timeout=config.secagg.timeout,
        )
    deadline_grid = DeadlineGrid(grid, timeout)
    try:
        DefaultWorkflow(fit_workflow=fit_workflow)(deadline_grid, legacy)  # type: ignore[arg-type]
    except Exception as exc:
        strategy._stop("failed", f"{type(exc).__name__}: {exc}")
    state = strategy.stop_state or "complete"
    if state != "complete" and deadline_grid.problems:
        strategy.stop_message += " | site errors: " + "; ".join(dict.fromkeys(deadline_grid.problems))
        if state == "failed" and any("PrivacyBudgetExhausted" in p for p in deadline_grid.problems):
            state = "stopped-budget"
    if state == "complete" and rd.last_round() < config.rounds:
        state, strategy.stop_message = "failed", f"only {rd.last_round()} of {config.rounds} rounds completed"
    rd.write_status(state, strategy.stop_message)
    return state


def make_server_app(
    run_dir: str | Path, config: FederatedConfig, on_round: RoundCallback | None = None,
    connect_timeout: float = CONNECT_TIMEOUT_S,
) -> ServerApp:
    """ServerApp for the simulation engine (configuration given directly)."""
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        run_server(grid, context, config, run_dir, on_round, connect_timeout)

    return server_app


def _log_round(metrics: dict[str, Any]) -> None:
    from flwr.common.logger import log as flwr_log

    from privmed.federated.report import round_line

    flwr_log(logging.INFO, "%s", round_line(metrics))


# Deployment entry point for ``flwr run`` (pyproject: serverapp).
app = ServerApp()


@app.main()
def _deployment_main(grid: Grid, context: Context) -> None:
    run_config = dict(context.run_config)
    if "run-dir" not in run_config:
        raise ConfigError("run config: missing 'run-dir' (where the server keeps checkpoints)")
    config = FederatedConfig.from_flat(run_config)
    state = run_server(grid, context, config, str(run_config["run-dir"]), _log_round)
    if state == "failed":
        raise PeerError(RunDir(str(run_config["run-dir"])).status().get("message", "run failed"))
