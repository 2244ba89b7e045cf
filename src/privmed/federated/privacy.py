"""Privacy accounting for DP-SGD at one site, cumulative over all rounds of a run.

Each site keeps its own ledger file (the site, not the server, is the party whose patients
the guarantee protects, so it must not rely on the server to count). The ledger holds the
budget and the schedule fixed when the run first touched the site, and the list of
(noise multiplier, sample rate, steps) that Opacus actually ran, one entry per local
training round, including rounds that were later lost to a crash: the data was used, so
the cost is real. A resumed run reopens the same file and keeps counting.

Accounting: Rényi DP of the subsampled Gaussian mechanism (Mironov 2017; Mironov, Talwar
and Zhang 2019) through Opacus' ``RDPAccountant``, converted to (epsilon, delta) with
Opacus' conversion (Balle et al. 2020). ``epsilon_of`` (the reported epsilon) is the same
computation as ``PrivacyEngine(accountant="rdp").get_epsilon``; the tests check the equality.
``epsilon_upper_bound`` restricts the minimum over RDP orders to the integer ones, which
is >= ``epsilon_of`` and 20x faster; calibration and the stop decision use it.

Hard stop: ``PrivacyLedger.check_next_round`` raises ``PrivacyBudgetExhausted`` when one more
round at the fixed schedule could take epsilon past the budget, before any data is touched.

Ledger JSON (``<state_dir>/<run_name>.privacy.json``)::

    {"format": "privmed-privacy-ledger", "version": 1, "site": str, "run_name": str,
     "epsilon_budget": float, "delta": float, "max_grad_norm": float,
     "noise_multiplier": float, "sample_rate": float, "steps_per_round": int,
     "entries": [{"round": int, "noise_multiplier": float, "sample_rate": float,
                  "steps": int}, ...]}
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from privmed.errors import ConfigError, InputError, PrivmedError
from privmed.federated.config import MIN_NOISE_MULTIPLIER, DPConfig

__all__ = [
    "PrivacyBudgetExhausted",
    "PrivacyLedger",
    "PrivacySpent",
    "calibrate_noise_multiplier",
    "epsilon_of",
    "epsilon_upper_bound",
    "sampling_schedule",
]

FORMAT = "privmed-privacy-ledger"
VERSION = 1
# the integer orders among Opacus' RDPAccountant.DEFAULT_ALPHAS (2..10 and 12..63)
INTEGER_ORDERS = [float(a) for a in range(2, 11)] + [float(a) for a in range(12, 64)]


class PrivacyBudgetExhausted(PrivmedError):
    """One more round would spend more than the site's (epsilon, delta) budget."""


@dataclass(frozen=True)
class PrivacySpent:
    """The numbers printed with every DP result."""

    epsilon: float
    delta: float
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int

    def line(self) -> str:
        return (
            f"epsilon={self.epsilon:.4f} delta={self.delta:g} "
            f"noise_multiplier={self.noise_multiplier:.4f} clipping_norm={self.max_grad_norm:g} "
            f"sample_rate={self.sample_rate:.4f} steps={self.steps}"
        )

    def as_dict(self) -> dict[str, float | int]:
        return {
            "epsilon": self.epsilon,
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "max_grad_norm": self.max_grad_norm,
            "sample_rate": self.sample_rate,
            "steps": self.steps,
        }


def sampling_schedule(n_train: int, batch_size: int, local_epochs: int) -> tuple[float, int]:
    """(sample rate, steps per round) exactly as ``local.client_update`` runs them.

    The site samples each example independently at rate ``q = 1 / ceil(n / batch)`` and runs
    ``ceil(n / batch)`` steps per epoch (``noise.PoissonSampler``, from the crypto PRG), and
    the accountant is stepped at that same rate. (Opacus' own loader and accountant hook
    would use ``int(1 / q)`` steps at rate ``1 / int(1 / q)``, which differs from this for
    some batch counts, e.g. 93; ``client_update`` replaces both.)
    """
    if n_train < 1 or batch_size < 1 or local_epochs < 1:
        raise InputError(
            f"DP schedule: expected n, batch size, epochs >= 1, got {n_train}, {batch_size}, {local_epochs}"
        )
    batches = math.ceil(n_train / batch_size)
    return 1.0 / batches, local_epochs * batches


def _merged(history: Sequence[tuple[float, float, int]]) -> list[tuple[float, float, int]]:
    """Entries with equal (sigma, q) summed into one: RDP is linear in the number of steps,
    and Opacus' own accountant merges consecutive equal steps the same way."""
    steps: dict[tuple[float, float], int] = {}
    for sigma, q, t in history:
        key = (float(sigma), float(q))
        steps[key] = steps.get(key, 0) + int(t)
    return [(sigma, q, t) for (sigma, q), t in steps.items()]


def epsilon_of(history: Sequence[tuple[float, float, int]], delta: float) -> float:
    """Epsilon at ``delta`` after the (noise multiplier, sample rate, steps) entries:
    Opacus' ``RDPAccountant`` with its default orders (the number every report prints)."""
    from opacus.accountants import RDPAccountant

    if not history:
        return 0.0
    accountant = RDPAccountant()
    accountant.history = _merged(history)
    return float(accountant.get_epsilon(delta=delta))


def epsilon_upper_bound(history: Sequence[tuple[float, float, int]], delta: float) -> float:
    """The same conversion over only the integer orders among Opacus' defaults.

    A minimum over a subset of orders, hence >= ``epsilon_of``; 20x faster (no fractional-order
    series). Used to calibrate the noise and to decide the hard stop, so both err on the safe side.
    """
    from opacus.accountants import RDPAccountant

    if not history:
        return 0.0
    accountant = RDPAccountant()
    accountant.history = _merged(history)
    return float(accountant.get_epsilon(delta=delta, alphas=INTEGER_ORDERS))


def calibrate_noise_multiplier(dp: DPConfig, sample_rate: float, steps: int) -> float:
    """Smallest noise multiplier (to 0.005 in epsilon) whose ``epsilon_upper_bound`` after
    ``steps`` steps at ``sample_rate`` is within budget (so ``epsilon_of`` is too), by
    bisection. Refuses a result below MIN_NOISE_MULTIPLIER."""

    def eps(sigma: float) -> float:
        return epsilon_upper_bound([(sigma, sample_rate, steps)], dp.delta)

    low, high = 0.05, 1.0
    while eps(high) > dp.epsilon:
        low, high = high, 2 * high
        if high > 1e4:
            raise ConfigError(f"DP: no noise multiplier reaches epsilon={dp.epsilon:g}")
    while eps(low) <= dp.epsilon and low > 1e-3:
        low /= 2  # the budget allows even less noise: widen the bracket downwards
    while dp.epsilon - eps(high) > 0.005 and high - low > 1e-4:
        mid = (low + high) / 2
        low, high = (low, mid) if eps(mid) <= dp.epsilon else (mid, high)
    if high < MIN_NOISE_MULTIPLIER:
        raise ConfigError(
            f"DP: epsilon={dp.epsilon:g} over {steps} steps at sample rate {sample_rate:.4f}"
            f" needs noise multiplier {high:.3f} < {MIN_NOISE_MULTIPLIER}: refusing a"
            " configuration that is DP in name only (lower epsilon or add rounds/steps)"
        )
    return high


@dataclass
class PrivacyLedger:
    """One site's persisted DP account for one run (see module docstring for the file)."""

    path: Path
    site: str
    run_name: str
    epsilon_budget: float
    delta: float
    max_grad_norm: float
    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    entries: list[dict[str, Any]] = field(default_factory=list)

    # -- opening ---------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        state_dir: str | Path,
        *,
        site: str,
        run_name: str,
        dp: DPConfig,
        n_train: int,
        batch_size: int,
        local_epochs: int,
        rounds: int,
    ) -> PrivacyLedger:
        """Load the ledger of (site, run) or create it, fixing the noise multiplier so that
        ``rounds`` rounds spend at most ``dp.epsilon``. A stored ledger must match ``dp`` and
        the sampling schedule; otherwise ConfigError (a resumed run cannot change them)."""
        if 1.0 / n_train <= dp.delta:
            raise ConfigError(
                f"site {site}: DP delta={dp.delta:g} must be well below 1/n = 1/{n_train}"
                " (delta >= 1/n allows releasing a record outright)"
            )
        path = Path(state_dir) / f"{run_name}.privacy.json"
        q, steps = sampling_schedule(n_train, batch_size, local_epochs)
        if path.exists():
            ledger = cls._load(path)
            stored = (ledger.epsilon_budget, ledger.delta, ledger.max_grad_norm, ledger.sample_rate)
            wanted = (dp.epsilon, dp.delta, dp.max_grad_norm, q)
            if ledger.site != site or not all(
                math.isclose(a, b, rel_tol=1e-12) for a, b in zip(stored, wanted, strict=True)
            ) or ledger.steps_per_round != steps:
                raise ConfigError(
                    f"{path}: ledger was opened with (epsilon, delta, clip, sample rate, steps)"
                    f" = {stored + (ledger.steps_per_round,)}, this run asks for"
                    f" {wanted + (steps,)}; a resumed run cannot change its DP schedule"
                )
            return ledger
        sigma = calibrate_noise_multiplier(dp, q, steps * rounds)
        ledger = cls(
            path=path,
            site=site,
            run_name=run_name,
            epsilon_budget=dp.epsilon,
            delta=dp.delta,
            max_grad_norm=dp.max_grad_norm,
            noise_multiplier=sigma,
            sample_rate=q,
            steps_per_round=steps,
        )
        ledger.save()
        return ledger

    @classmethod
    def _load(cls, path: Path) -> PrivacyLedger:
        try:
            body = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"{path}: unreadable privacy ledger ({exc})") from None
        if not isinstance(body, dict) or body.get("format") != FORMAT or body.get("version") != VERSION:
            raise InputError(f"{path}: expected a {FORMAT} v{VERSION} file")
        try:
            return cls(
                path=path,
                site=str(body["site"]),
                run_name=str(body["run_name"]),
                epsilon_budget=float(body["epsilon_budget"]),
                delta=float(body["delta"]),
                max_grad_norm=float(body["max_grad_norm"]),
                noise_multiplier=float(body["noise_multiplier"]),
                sample_rate=float(body["sample_rate"]),
                steps_per_round=int(body["steps_per_round"]),
                entries=[dict(e) for e in body["entries"]],
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{path}: malformed privacy ledger ({exc})") from None

    def save(self) -> None:
        """Write atomically (temp file + fsync + rename): a crash never leaves half a ledger."""
        body = {
            "format": FORMAT,
            "version": VERSION,
            "site": self.site,
            "run_name": self.run_name,
            "epsilon_budget": self.epsilon_budget,
            "delta": self.delta,
            "max_grad_norm": self.max_grad_norm,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "steps_per_round": self.steps_per_round,
            "entries": self.entries,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(body, fh, indent=2)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)

    # -- accounting ------------------------------------------------------------------------
    def history(self) -> list[tuple[float, float, int]]:
        return [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in self.entries]

    def spent(self) -> PrivacySpent:
        """What has been spent so far."""
        return PrivacySpent(
            epsilon=epsilon_of(self.history(), self.delta),
            delta=self.delta,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.max_grad_norm,
            sample_rate=self.sample_rate,
            steps=sum(int(e["steps"]) for e in self.entries),
        )

    def check_next_round(self) -> float:
        """``epsilon_upper_bound`` after one more round; PrivacyBudgetExhausted if over budget.

        The bound is the one the noise was calibrated with, so the planned rounds always pass
        and a round lost to a crash (already counted) makes the last planned round fail.
        """
        projected = self.history() + [(self.noise_multiplier, self.sample_rate, self.steps_per_round)]
        bound = epsilon_upper_bound(projected, self.delta)
        if bound > self.epsilon_budget:
            raise PrivacyBudgetExhausted(
                f"site {self.site}: one more round would spend epsilon up to {bound:.4f} > budget"
                f" {self.epsilon_budget:g} at delta={self.delta:g} (spent so far"
                f" {self.spent().epsilon:.4f} in {len(self.entries)} rounds); stopping"
            )
        return bound

    def record(self, server_round: int, history: Sequence[tuple[float, float, int]]) -> PrivacySpent:
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
                {"round": int(server_round), "noise_multiplier": float(sigma),
                 "sample_rate": float(q), "steps": int(steps)}
            )
        self.save()
        return self.spent()
