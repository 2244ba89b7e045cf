"""A site's privacy ledger: one file per (site, data set), cumulative over every run.

The site, not the server, is the party whose patients the guarantee protects, so it counts
itself and must not let the server decide what is counted. Two budgets apply to every DP
round a site trains:

- the **run's** (epsilon, delta), sent by the server: fixes the run's noise multiplier the
  first time the run touches the site, and stops the run at its end;
- the **site's total** (epsilon, delta), configured by the site (``privmed federate site
  --dp-total-epsilon``), over all runs ever trained on this data set: the hard stop a
  server cannot reset.

The file is keyed by SHA-256 of (site, data set fingerprint) (``sitedata.dataset_fingerprint``,
computed at the site from its own image ids), never by anything the server sends: a server
that renames its run gets a new *run* entry in the same file, whose rounds add to the same
total. The run name is only a JSON key, checked against ``config.RUN_NAME_PATTERN``, never
part of a path. Every round that ran is recorded, including rounds later lost to a crash
(the data was used, so the cost is real).

Composition: the total is the RDP composition of every recorded (noise multiplier, sample
rate, steps) entry, converted at the site's delta (``privacy.epsilon_of``). Rounds of
different runs on the same records compose exactly like rounds of one run, so this is a
valid bound on the site's patients for every run recorded here.

Not guaranteed: a *different* data set of the same site (images added or removed) has its
own ledger; patients in both data sets are then covered by the sum of the two ledgers'
totals, which no single file states. Deleting the state folder resets the count: the folder
belongs to the site, not to the server.

Ledger JSON (``<state_dir>/privacy-ledger-<key>.json``, ``key`` = first 32 hex digits)::

    {"format": "privmed-privacy-ledger", "version": 2, "site": str, "dataset": str (sha256),
     "total_epsilon": float, "total_delta": float,
     "runs": {run_name: {"epsilon_budget", "delta", "max_grad_norm", "noise_multiplier",
                         "sample_rate", "steps_per_round"}},
     "entries": [{"run": str, "round": int, "noise_multiplier": float, "sample_rate": float,
                  "steps": int}, ...]}
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from privmed.errors import ConfigError, InputError
from privmed.federated.config import DPConfig, check_run_name
from privmed.federated.privacy import (
    PrivacyBudgetExhausted,
    PrivacySpent,
    calibrate_noise_multiplier,
    epsilon_of,
    epsilon_upper_bound,
    sampling_schedule,
)

__all__ = ["PrivacyLedger", "SiteBudget", "ledger_path"]

FORMAT = "privmed-privacy-ledger"
VERSION = 2
_RUN_KEYS = (
    "epsilon_budget",
    "delta",
    "max_grad_norm",
    "noise_multiplier",
    "sample_rate",
    "steps_per_round",
)


@dataclass(frozen=True)
class SiteBudget:
    """The site's own total (epsilon, delta) over all runs on one data set."""

    epsilon: float = 8.0
    delta: float = 1e-5

    def check(self) -> None:
        DPConfig(self.epsilon, self.delta, 1.0).check()


def ledger_path(state_dir: str | Path, site: str, dataset: str) -> Path:
    """``<state_dir>/privacy-ledger-<32 hex>.json``: a function of site and data set only."""
    key = hashlib.sha256(f"privmed-ledger-v2\0{site}\0{dataset}".encode()).hexdigest()[:32]
    return Path(state_dir) / f"privacy-ledger-{key}.json"


@dataclass
class PrivacyLedger:
    """One site's persisted DP account on one data set, seen from one run (module docstring)."""

    path: Path
    site: str
    dataset: str
    run_name: str
    total: SiteBudget
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    entries: list[dict[str, Any]] = field(default_factory=list)

    # -- the run's schedule (fixed when the run first touched this data set) --------------
    @property
    def _run(self) -> dict[str, Any]:
        return self.runs[self.run_name]

    @property
    def epsilon_budget(self) -> float:
        return float(self._run["epsilon_budget"])

    @property
    def delta(self) -> float:
        return float(self._run["delta"])

    @property
    def max_grad_norm(self) -> float:
        return float(self._run["max_grad_norm"])

    @property
    def noise_multiplier(self) -> float:
        return float(self._run["noise_multiplier"])

    @property
    def sample_rate(self) -> float:
        return float(self._run["sample_rate"])

    @property
    def steps_per_round(self) -> int:
        return int(self._run["steps_per_round"])

    # -- opening ---------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        state_dir: str | Path,
        *,
        site: str,
        dataset: str,
        run_name: str,
        dp: DPConfig,
        n_train: int,
        batch_size: int,
        local_epochs: int,
        rounds: int,
        total: SiteBudget | None = None,
    ) -> PrivacyLedger:
        """Load the ledger of (site, data set) or create it, and the entry of ``run_name``.

        A new run's noise multiplier is the smallest that keeps ``rounds`` rounds within
        ``dp.epsilon``; a known run must ask for the same schedule (ConfigError otherwise).
        ``total`` is the site's configured total budget (default ``SiteBudget()``); the
        site's current setting replaces the stored one (it is the site's decision).
        """
        check_run_name(run_name)
        total = total or SiteBudget()
        total.check()
        if 1.0 / n_train <= dp.delta:
            raise ConfigError(
                f"site {site}: DP delta={dp.delta:g} must be well below 1/n = 1/{n_train}"
                " (delta >= 1/n allows releasing a record outright)"
            )
        path = ledger_path(state_dir, site, dataset)
        if path.exists():
            ledger = cls._load(path, run_name)
            if (ledger.site, ledger.dataset) != (site, dataset):
                raise InputError(
                    f"{path}: ledger of ({ledger.site}, {ledger.dataset[:12]}), not of ({site}, {dataset[:12]})"
                )
            ledger.total = total
        else:
            ledger = cls(path=path, site=site, dataset=dataset, run_name=run_name, total=total)
        q, steps = sampling_schedule(n_train, batch_size, local_epochs)
        if run_name in ledger.runs:
            run = ledger.runs[run_name]
            stored = tuple(
                float(run[k]) for k in ("epsilon_budget", "delta", "max_grad_norm", "sample_rate")
            )
            wanted = (dp.epsilon, dp.delta, dp.max_grad_norm, q)
            if (
                not all(
                    math.isclose(a, b, rel_tol=1e-12) for a, b in zip(stored, wanted, strict=True)
                )
                or int(run["steps_per_round"]) != steps
            ):
                raise ConfigError(
                    f"{path}: run {run_name} was opened with (epsilon, delta, clip, sample rate, steps)"
                    f" = {stored + (int(run['steps_per_round']),)}, this run asks for"
                    f" {wanted + (steps,)}; a resumed run cannot change its DP schedule"
                )
        else:
            sigma = calibrate_noise_multiplier(dp, q, steps * rounds)
            ledger.runs[run_name] = {
                "epsilon_budget": dp.epsilon, "delta": dp.delta, "max_grad_norm": dp.max_grad_norm,
                "noise_multiplier": sigma, "sample_rate": q, "steps_per_round": steps,
            }  # fmt: skip
        ledger.save()
        return ledger

    @classmethod
    def _load(cls, path: Path, run_name: str) -> PrivacyLedger:
        try:
            body = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"{path}: unreadable privacy ledger ({exc})") from None
        if (
            not isinstance(body, dict)
            or body.get("format") != FORMAT
            or body.get("version") != VERSION
        ):
            raise InputError(f"{path}: expected a {FORMAT} v{VERSION} file")
        try:
            runs = {
                str(k): {key: v[key] for key in _RUN_KEYS} for k, v in dict(body["runs"]).items()
            }
            entries = [
                {"run": str(e["run"]), "round": int(e["round"]), "noise_multiplier": float(e["noise_multiplier"]),
                 "sample_rate": float(e["sample_rate"]), "steps": int(e["steps"])}
                for e in body["entries"]
            ]  # fmt: skip
            return cls(
                path=path, site=str(body["site"]), dataset=str(body["dataset"]), run_name=run_name,
                total=SiteBudget(float(body["total_epsilon"]), float(body["total_delta"])),
                runs=runs, entries=entries,
            )  # fmt: skip
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{path}: malformed privacy ledger ({exc})") from None

    def save(self) -> None:
        """Write atomically (temp file + fsync + rename): a crash never leaves half a ledger."""
        body = {
            "format": FORMAT, "version": VERSION, "site": self.site, "dataset": self.dataset,
            "total_epsilon": self.total.epsilon, "total_delta": self.total.delta,
            "runs": self.runs, "entries": self.entries,
        }  # fmt: skip
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(body, fh, indent=2)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)

    # -- accounting ------------------------------------------------------------------------
    def history(self) -> list[tuple[float, float, int]]:
        """This run's entries as an Opacus accountant history."""
        return [
            (e["noise_multiplier"], e["sample_rate"], e["steps"])
            for e in self.entries
            if e["run"] == self.run_name
        ]

    def total_history(self) -> list[tuple[float, float, int]]:
        """Every run's entries on this data set."""
        return [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in self.entries]

    def spent(self) -> PrivacySpent:
        """What this run has spent so far (at the run's delta)."""
        return PrivacySpent(
            epsilon=epsilon_of(self.history(), self.delta),
            delta=self.delta,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.max_grad_norm,
            sample_rate=self.sample_rate,
            steps=sum(int(t) for _, _, t in self.history()),
        )

    def total_spent(self) -> float:
        """Epsilon spent on this data set over all runs, at the site's total delta."""
        return epsilon_of(self.total_history(), self.total.delta)

    def total_spent_bound(self) -> float:
        """``epsilon_upper_bound`` of ``total_spent`` (>= it; integer orders only, 20x faster)."""
        return epsilon_upper_bound(self.total_history(), self.total.delta)

    def check_next_round(self) -> float:
        """The run's ``epsilon_upper_bound`` after one more round; PrivacyBudgetExhausted if
        that round would exceed the run's budget or the site's total budget.

        The run bound is the one the noise was calibrated with, so the planned rounds always
        pass and a round lost to a crash (already counted) makes the last planned round fail.
        """
        step = [(self.noise_multiplier, self.sample_rate, self.steps_per_round)]
        total_bound = epsilon_upper_bound(self.total_history() + step, self.total.delta)
        if total_bound > self.total.epsilon:
            raise PrivacyBudgetExhausted(
                f"site {self.site}: total privacy budget of this data set exhausted: spent epsilon"
                f" {self.total_spent():.4f} of {self.total.epsilon:g} (delta {self.total.delta:g}) over"
                f" {len(self.entries)} rounds of {len({e['run'] for e in self.entries})} runs; one more"
                f" round would reach {total_bound:.4f}; refusing to train"
            )
        bound = epsilon_upper_bound(self.history() + step, self.delta)
        if bound > self.epsilon_budget:
            raise PrivacyBudgetExhausted(
                f"site {self.site}: one more round would spend epsilon up to {bound:.4f} > budget"
                f" {self.epsilon_budget:g} at delta={self.delta:g} (spent so far"
                f" {self.spent().epsilon:.4f} in {len(self.history())} rounds); stopping"
            )
        return bound

    def record(
        self, server_round: int, history: Sequence[tuple[float, float, int]]
    ) -> PrivacySpent:
        """Append what Opacus ran in one round (its accountant's history) and save."""
        for sigma, q, steps in history:
            if not math.isclose(float(sigma), self.noise_multiplier) or not math.isclose(
                float(q), self.sample_rate
            ):
                raise ConfigError(
                    f"site {self.site}: Opacus ran (sigma={sigma}, q={q}), ledger schedule is"
                    f" (sigma={self.noise_multiplier}, q={self.sample_rate})"
                )
            self.entries.append(
                {"run": self.run_name, "round": int(server_round), "noise_multiplier": float(sigma),
                 "sample_rate": float(q), "steps": int(steps)}
            )  # fmt: skip
        self.save()
        return self.spent()
