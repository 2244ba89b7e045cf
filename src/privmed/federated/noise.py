"""DP-SGD randomness from the crypto PRG: Gaussian noise and Poisson sampling.

DP-SGD (Abadi et al. 2016) is private only if the adversary cannot predict which examples
enter a step (the subsampling amplification) nor the Gaussian noise added to the summed
clipped gradients. Both therefore come from ``privmed.crypto.prg`` (AES-128-CTR, one
labelled stream each), keyed by 16 bytes of ``os.urandom`` per ``client_update``
(``PRG.fresh()``); ``insecure_seeded_prg`` derives the key from an integer instead
(SHA-256), for tests and attack studies only. Neither torch's nor numpy's generators are
used. Stream labels: ``SAMPLING_LABEL`` (one n-word draw per step) and ``NOISE_LABEL``
(consumed step by step, parameter by parameter in the optimizer's order).

Gaussian noise, ``gaussian_noise(stream, std, shape, dtype)``:

1. Read 64-bit words from the stream in order; keep the low 53 bits of each, k in
   [0, 2^53). A Box-Muller pair (Box & Muller 1958) takes two words:
   U1 = (k1 + 1) 2^-53 in (0, 1], U2 = k2 2^-53 in [0, 1), R = sqrt(-2 ln U1),
   theta = 2 pi U2; R cos(theta) and R sin(theta) are two independent N(0, 1) draws
   (exactly, for real uniforms). Computed in float64.
2. Floating-point mitigation, as Opacus' ``secure_mode`` (Holohan & Braghin 2021,
   arXiv 2107.10138, section 5.1, with n = 2): each noise coordinate is the sum of
   2n = 4 independent N(0, std^2) draws divided by 2, which is again N(0, std^2). The
   floating-point attacks (Mironov 2012; Jin et al. 2021, arXiv 2112.05307) tell
   neighbouring inputs apart by finding which floating-point draws could have produced an
   output; for a sum of 2n draws that search costs about 2^(p (2n - 1)) = 2^159 with
   p = 53 (Holohan & Braghin; Opacus' note) instead of a table look-up. Coordinates go in
   pairs (2i, 2i + 1) over 4 Box-Muller pairs
   (8 words): coordinate 2i sums the four cosine outputs, 2i + 1 the four sine outputs, so
   the four draws of one coordinate come from four distinct pairs. An odd last coordinate
   drops its sine partner.
3. Multiply by std in float64, cast to the gradient dtype at the end.

Cost: 32 keystream bytes (~10 ns) and two each of log, sqrt, cos, sin in float64 per
coordinate: about 0.1 us per parameter per step on one core of the development machine
(small-cnn, 17 k parameters: 4 ms; ResNet-18, 11 M: 0.9-1.1 s), ten times the single
MT19937 ``torch.normal`` draw Opacus made before (0.1 s for ResNet-18). Measurements in
docs/federated.md ("Cost of the DP randomness").

What remains (not mitigated): the output is a float64 computation, not an exact sampler.
U1 >= 2^-53 truncates every draw at |z| <= sqrt(106 ln 2) = 8.57 (the mass of the radius
beyond is 2^-53), so a noise coordinate never exceeds 17.15 std; log, cos and sin are
correct to about 1 ulp. The 2n-sum makes the floating-point attack computationally
infeasible; it is not the exact discrete Gaussian of Canonne, Kamath and Steinke (2020).

Poisson sampling, ``PoissonSampler``: each step, each of the n examples is included
independently iff its fresh 64-bit word is below floor(q 2^64), probability exactly q for
q >= 2^-12 (within 2^-64 below), and with probability 1 for q = 1; an empty draw is an
empty batch and the step still happens, as in Opacus' ``UniformWithReplacementSampler``.
"""

from __future__ import annotations

import hashlib
import math
import types
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from privmed.crypto.prg import PRG, Stream

__all__ = [
    "NOISE_LABEL",
    "SAMPLING_LABEL",
    "PoissonSampler",
    "box_muller",
    "gaussian_noise",
    "insecure_seeded_prg",
    "install_prg_noise",
]

NOISE_LABEL = "privmed/dp-sgd/gaussian-noise"
SAMPLING_LABEL = "privmed/dp-sgd/poisson-sampling"
DRAWS_PER_COORDINATE = 4  # 2n with n = 2 (Holohan & Braghin 2021, section 5.1)
_LOW53 = (1 << 53) - 1
_TWO_POW_M53 = 2.0**-53
# coordinate pairs per chunk: 1 MiB of keystream, float64 temporaries of 0.5 MiB
_CHUNK_PAIRS = 1 << 14


def insecure_seeded_prg(seed: int) -> PRG:
    """A PRG keyed by SHA-256 of ``seed``: reproducible, therefore INSECURE.

    For tests and attack studies only: anyone who knows or guesses the seed predicts the
    noise and the sampling, and the DP guarantee is void.
    """
    digest = hashlib.sha256(b"privmed insecure DP-SGD seed\x00" + str(int(seed)).encode()).digest()
    return PRG(digest[:16])


def box_muller(k1: torch.Tensor, k2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independent N(0, 1) float64 tensors from 53-bit integers k1, k2 (Box & Muller 1958).

    Precondition: k1, k2 int64 in [0, 2^53), uniform and independent. U1 = (k1 + 1) 2^-53 is
    in (0, 1], so the log is finite; U2 = k2 2^-53. Returns (R cos theta, R sin theta).
    """
    radius = (k1.double() + 1.0).mul_(_TWO_POW_M53).log_().mul_(-2.0).sqrt_()
    theta = k2.double().mul_(2.0 * math.pi * _TWO_POW_M53)
    return radius * torch.cos(theta), radius.mul_(torch.sin(theta))


def _noise_pairs(stream: Stream, pairs: int) -> torch.Tensor:
    """(pairs, 2) float64: for each coordinate pair, the sums of 4 cosine and 4 sine draws."""
    words = torch.from_numpy(stream.uint64((pairs, DRAWS_PER_COORDINATE, 2)).view(np.int64))
    bits = words & _LOW53  # any 53 bits of a uniform word are uniform
    cos_draws, sin_draws = box_muller(bits[..., 0], bits[..., 1])  # (pairs, 4) each

    def four_sum(draws: torch.Tensor) -> torch.Tensor:  # ((z0 + z1) + z2) + z3, a fixed order
        return draws[:, 0] + draws[:, 1] + draws[:, 2] + draws[:, 3]

    return torch.stack([four_sum(cos_draws), four_sum(sin_draws)], dim=1)


def gaussian_noise(
    stream: Stream, std: float, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """N(0, std^2 I) of ``shape``, each coordinate the sum of 4 draws / 2 (module docstring).

    Consumes 8 ceil(D / 2) words of ``stream`` for D = prod(shape) coordinates, in row-major
    order, chunk by chunk (the chunk size does not change the result). std = 0 gives zeros
    and consumes nothing, as Opacus does.
    """
    if not (math.isfinite(std) and std >= 0):
        raise ValueError(f"gaussian_noise: expected a finite std >= 0, got {std}")
    count = math.prod(shape)
    if std == 0 or count == 0:
        return torch.zeros(shape, dtype=dtype)
    total_pairs = (count + 1) // 2
    sums = torch.empty((total_pairs, 2), dtype=torch.float64)
    for start in range(0, total_pairs, _CHUNK_PAIRS):
        stop = min(start + _CHUNK_PAIRS, total_pairs)
        sums[start:stop] = _noise_pairs(stream, stop - start)
    noise = sums.reshape(-1)[:count].mul_(std / 2.0)
    return noise.to(dtype).reshape(shape)


class PoissonSampler:
    """Batches of example indices for Poisson-subsampled DP-SGD, from a PRG stream.

    Each iteration (one epoch) yields ``steps`` int64 index tensors; example i is in a batch
    iff its word for that step is below floor(q 2^64), independently of every other example
    and step. The stream is consumed in order across epochs, so epochs differ.
    """

    def __init__(self, stream: Stream, *, num_samples: int, sample_rate: float, steps: int) -> None:
        if num_samples < 1 or steps < 1:
            raise ValueError(f"PoissonSampler: expected num_samples, steps >= 1, got {num_samples}, {steps}")
        if not (0.0 < sample_rate <= 1.0):
            raise ValueError(f"PoissonSampler: expected a sample rate in (0, 1], got {sample_rate}")
        self.stream = stream
        self.num_samples = num_samples
        self.sample_rate = sample_rate
        self.steps = steps
        self.threshold = math.floor(math.ldexp(sample_rate, 64))  # exact: ldexp scales by 2^64

    def inclusion_probability(self) -> float:
        """The exact probability that a given example enters a given batch."""
        return min(self.threshold, 2**64) / 2**64

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[torch.Tensor]:
        for _ in range(self.steps):
            words = self.stream.uint64(self.num_samples)
            if self.threshold >= 2**64:
                included = np.ones(self.num_samples, dtype=bool)
            else:
                included = words < np.uint64(self.threshold)
            yield torch.from_numpy(np.flatnonzero(included).astype(np.int64))


def _add_prg_noise(optimizer: Any, stream: Stream) -> None:
    """Opacus' ``DPOptimizer.add_noise`` with the noise drawn by ``gaussian_noise``.

    Same contract as the method it replaces: for each parameter in ``optimizer.params``
    order, p.grad = p.summed_grad + N(0, (noise_multiplier max_grad_norm)^2 I), refusing a
    summed gradient already used by a previous step (Opacus' ``_processed`` flag).
    """
    std = optimizer.noise_multiplier * optimizer.max_grad_norm
    for p in optimizer.params:
        summed = p.summed_grad
        if hasattr(summed, "_processed"):
            raise ValueError("DP-SGD: gradients were not cleared since the last step (call zero_grad)")
        noise = gaussian_noise(stream, std, summed.shape, summed.dtype).to(summed.device)
        p.grad = (summed + noise).view_as(p)
        summed._processed = True


def install_prg_noise(optimizer: Any, stream: Stream) -> None:
    """Make the ``DPOptimizer`` that Opacus' ``make_private`` returned draw its noise from
    ``stream`` (in place).

    Why this hook holds in Opacus 1.6: ``DPOptimizer.step`` calls ``pre_step``, which runs
    ``clip_and_accumulate`` (sets ``p.summed_grad``), the skip check, then ``self.add_noise()``
    by attribute look-up, then ``scale_grad`` and the accountant's step hook. An instance
    attribute ``add_noise`` therefore replaces exactly the noise and leaves clipping, scaling
    and accounting to Opacus. Only the plain ``DPOptimizer`` class (flat clipping, one
    process, hook-based per-sample gradients) is accepted: its subclasses change the noise or
    the clipping around it. tests/unit/test_federated_noise.py pins the call order and the
    result (one DP step = clipped per-sample gradients + this noise, scaled after).
    """
    from opacus.optimizers import DPOptimizer

    if type(optimizer) is not DPOptimizer:
        raise TypeError(f"install_prg_noise: expected opacus DPOptimizer, got {type(optimizer).__name__}")
    if optimizer.secure_mode or optimizer.generator is not None:
        raise ValueError("install_prg_noise: the optimizer must not carry its own noise generator")
    optimizer.add_noise = types.MethodType(lambda self: _add_prg_noise(self, stream), optimizer)
