"""Privacy accounting for DP-SGD: epsilon of a history, noise calibration, the budget error.

The persisted per-site ledger that uses these functions is ``ledger.PrivacyLedger``.

Accounting: Rényi DP of the subsampled Gaussian mechanism (Mironov 2017; Mironov, Talwar
and Zhang 2019) through Opacus' ``RDPAccountant``, converted to (epsilon, delta) with
Opacus' conversion (Balle et al. 2020). ``epsilon_of`` (the reported epsilon) is the same
computation as ``PrivacyEngine(accountant="rdp").get_epsilon``; the tests check the equality.
``epsilon_upper_bound`` restricts the minimum over RDP orders to the integer ones, which
is >= ``epsilon_of`` and 20x faster; calibration and the stop decision use it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from privmed.errors import ConfigError, InputError, PrivmedError
from privmed.federated.config import MIN_NOISE_MULTIPLIER, DPConfig

__all__ = [
    "PrivacyBudgetExhausted",
    "PrivacySpent",
    "calibrate_noise_multiplier",
    "epsilon_of",
    "epsilon_upper_bound",
    "sampling_schedule",
]

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
