"""DP-SGD noise and Poisson sampling from the crypto PRG (privmed.federated.noise) and their
use in client_update: distribution, construction, no torch RNG, Opacus hook, accounting."""

from __future__ import annotations

import inspect
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from scipy import stats

from privmed.crypto.prg import PRG
from privmed.federated import noise as noise_mod
from privmed.federated.arrays import federated_names, get_arrays, set_arrays
from privmed.federated.local import DPSGD, LocalTraining, client_update
from privmed.federated.noise import (
    NOISE_LABEL,
    SAMPLING_LABEL,
    PoissonSampler,
    box_muller,
    gaussian_noise,
    insecure_seeded_prg,
    install_prg_noise,
)
from privmed.federated.privacy import sampling_schedule

KEY = bytes(range(16))
# Fixed keys make every statistical test deterministic; each threshold is one a correct
# sampler passes with probability >= 0.999 for a random key (p-value > 1e-3, or a 5-sigma
# bound on a mean or standard deviation).
P_MIN = 1e-3


def _small_cnn(k: int = 3) -> torch.nn.Module:
    from privmed.models.zoo import build_model

    torch.manual_seed(0)
    return build_model("small-cnn", 1, k, norm="group", features=(4, 8))


def _data(n: int, side: int = 16, k: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random((n, k)) < 0.5).astype(np.float32)
    return rng.standard_normal((n, 1, side, side)).astype(np.float32), y


def test_noise_is_normal_with_the_requested_std():
    # Prepare / Execute: 10^5 noise coordinates and 10^5 single Box-Muller draws.
    n, std = 100_000, 0.7
    noise = gaussian_noise(PRG(KEY).stream(NOISE_LABEL), std, (n,), torch.float64).numpy()
    words = torch.from_numpy(PRG(KEY).stream("single draws").uint64(n).view(np.int64)) & ((1 << 53) - 1)
    z_cos, z_sin = (z.numpy() for z in box_muller(words[: n // 2], words[n // 2 :]))
    # Assert: Kolmogorov-Smirnov against N(0, std^2) and N(0, 1); mean within 5 std/sqrt(n);
    # sample std within 5/sqrt(2n) relative (its standard error for a Gaussian).
    assert stats.kstest(noise, "norm", args=(0.0, std)).pvalue > P_MIN
    assert abs(noise.mean()) < 5 * std / math.sqrt(n)
    assert noise.std() == pytest.approx(std, rel=5 / math.sqrt(2 * n))
    assert np.abs(noise).max() <= 2 * math.sqrt(106 * math.log(2)) * std  # the float64 tail bound
    draws = np.concatenate([z_cos, z_sin])
    assert stats.kstest(draws, "norm").pvalue > P_MIN
    # the two outputs of a pair are independent: correlation within 5/sqrt(n/2)
    assert abs(np.corrcoef(z_cos, z_sin)[0, 1]) < 5 / math.sqrt(n / 2)


def test_noise_is_the_sum_of_four_box_muller_draws_over_two():
    # Prepare: 15 coordinates = 8 coordinate pairs = 64 words of the same stream.
    std, shape = 1.3, (3, 5)
    words = [int(w) & ((1 << 53) - 1) for w in PRG(KEY).stream(NOISE_LABEL).uint64(64)]
    # Execute: the construction written out with Python floats, one draw at a time.
    oracle = []
    for pair in range(8):
        cos_sum = sin_sum = 0.0
        for draw in range(4):
            k1, k2 = words[8 * pair + 2 * draw], words[8 * pair + 2 * draw + 1]
            radius = math.sqrt(-2.0 * math.log((k1 + 1) / 2**53))
            cos_sum += radius * math.cos(2 * math.pi * k2 / 2**53)
            sin_sum += radius * math.sin(2 * math.pi * k2 / 2**53)
        oracle += [std * cos_sum / 2, std * sin_sum / 2]
    expected = np.array(oracle[:15]).reshape(shape)
    ours64 = gaussian_noise(PRG(KEY).stream(NOISE_LABEL), std, shape, torch.float64)
    ours32 = gaussian_noise(PRG(KEY).stream(NOISE_LABEL), std, shape)
    # Assert: libm vs torch's vectorised log/cos/sin differ by ~1 ulp (1e-15 relative);
    # the float32 result is the float64 one rounded (1 float32 ulp = 1.2e-7 relative).
    np.testing.assert_allclose(ours64.numpy(), expected, rtol=1e-12, atol=1e-15)
    assert ours32.dtype == torch.float32
    np.testing.assert_allclose(ours32.numpy(), expected.astype(np.float32), rtol=2.4e-7, atol=0)


def test_noise_does_not_depend_on_the_chunk_size_and_std_zero_consumes_nothing(monkeypatch):
    reference = gaussian_noise(PRG(KEY).stream(NOISE_LABEL), 1.0, (1001,))
    monkeypatch.setattr(noise_mod, "_CHUNK_PAIRS", 7)
    stream = PRG(KEY).stream(NOISE_LABEL)
    assert torch.count_nonzero(gaussian_noise(stream, 0.0, (50,))) == 0
    assert torch.equal(gaussian_noise(stream, 1.0, (1001,)), reference)
    with pytest.raises(ValueError, match="std"):
        gaussian_noise(stream, float("nan"), (2,))


def test_poisson_inclusion_frequency_is_the_sample_rate():
    # Prepare: 64 examples, q = 1/7, two epochs of 250 steps from one stream.
    n, q, steps = 64, 1 / 7, 250
    sampler = PoissonSampler(PRG(KEY).stream(SAMPLING_LABEL), num_samples=n, sample_rate=q, steps=steps)
    # Execute
    epochs = [list(sampler), list(sampler)]
    masks = np.zeros((2 * steps, n), dtype=bool)
    for row, idx in enumerate(epochs[0] + epochs[1]):
        assert idx.dtype == torch.int64
        masks[row, idx.numpy()] = True
    # Assert: the threshold gives q exactly; the inclusion count is Binomial(2 steps n, q)
    # overall, and each example's count over its 500 draws is Binomial(500, q): the sum of
    # squared standardised counts is chi^2 with n degrees of freedom (500 q = 71, so the
    # normal approximation holds); epochs differ.
    assert Fraction(sampler.threshold, 2**64) == Fraction(q)
    assert stats.binomtest(int(masks.sum()), masks.size, q).pvalue > P_MIN
    draws = 2 * steps
    per_example = masks.sum(axis=0)
    chi2 = float(((per_example - draws * q) ** 2).sum() / (draws * q * (1 - q)))
    assert stats.chi2.sf(chi2, n) > P_MIN
    assert any(not torch.equal(a, b) for a, b in zip(*epochs, strict=True))


def test_poisson_empty_batches_have_their_binomial_frequency_and_q_one_takes_all():
    sampler = PoissonSampler(PRG(KEY).stream(SAMPLING_LABEL), num_samples=3, sample_rate=1 / 3, steps=3000)
    empty = sum(len(idx) == 0 for idx in sampler)
    assert stats.binomtest(empty, 3000, (2 / 3) ** 3).pvalue > P_MIN
    full = PoissonSampler(PRG(KEY).stream(SAMPLING_LABEL), num_samples=5, sample_rate=1.0, steps=4)
    assert full.inclusion_probability() == 1.0
    assert all(idx.tolist() == [0, 1, 2, 3, 4] for idx in full)
    with pytest.raises(ValueError, match="sample rate"):
        PoissonSampler(PRG(KEY).stream(SAMPLING_LABEL), num_samples=5, sample_rate=0.0, steps=1)


def test_dp_client_update_never_touches_torch_rng(monkeypatch):
    # Prepare: every torch sampling entry point Opacus or a DataLoader would use raises.
    import opacus.optimizers.optimizer as opacus_optimizer

    def refuse(*args, **kwargs):
        raise AssertionError("torch RNG called during DP-SGD")

    for name in ("normal", "rand", "randn", "randint", "randperm", "bernoulli"):
        monkeypatch.setattr(torch, name, refuse)
    monkeypatch.setattr(opacus_optimizer, "_generate_noise", refuse)
    model = _small_cnn()
    x, y = _data(12)
    state_before = torch.random.get_rng_state()
    # Execute: fresh key (the production path), two epochs.
    update = client_update(model, get_arrays(model), x, y, LocalTraining(2, 4, 0.05), dp=DPSGD(1.0, 1.0))
    # Assert: the default generator did not advance, and training happened.
    assert torch.equal(torch.random.get_rng_state(), state_before)
    assert update.steps == 6 and update.privacy_history == [(1.0, 1 / 3, 6)]
    assert all(np.all(np.isfinite(d)) for d in update.delta)


def test_insecure_seed_reproduces_and_fresh_keys_differ():
    model = _small_cnn()
    x, y = _data(12)

    def run(seed: int | None) -> list[np.ndarray]:
        dp = DPSGD(1.0, 1.0)
        return client_update(model, get_arrays(model), x, y, LocalTraining(1, 4, 0.05), dp=dp,
                             insecure_noise_seed=seed).delta  # fmt: skip

    def same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
        return all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))

    assert same(run(5), run(5))
    assert not same(run(5), run(6))
    assert not same(run(None), run(None))
    assert insecure_seeded_prg(5).seed != insecure_seeded_prg(6).seed


def test_dp_step_is_clipped_per_sample_gradients_plus_the_prg_noise():
    """One step on 2 images (q = 1: both always sampled): delta = -lr (sum_i clip(g_i) + z) / 2
    with z recomputed from the insecure seed's noise stream. Fails if Opacus stops calling
    the installed add_noise, or calls it after the 1/batch scaling."""
    # Prepare
    model = _small_cnn()
    x, y = _data(2, seed=3)
    lr, sigma, clip, seed = 0.1, 1.3, 0.05, 11
    # Execute
    update = client_update(model, get_arrays(model), x, y, LocalTraining(1, 2, lr),
                           dp=DPSGD(sigma, clip), insecure_noise_seed=seed)  # fmt: skip
    # Oracle: per-sample gradients by plain autograd, Opacus' flat clipping factor
    # min(1, C / (|g_i| + 1e-6)), noise in model.parameters() order from the same stream.
    ref = _small_cnn()
    set_arrays(ref, get_arrays(model))
    params = [p for p in ref.parameters() if p.requires_grad]
    clipped = [torch.zeros_like(p) for p in params]
    for i in range(2):
        logits = ref(torch.from_numpy(x[i : i + 1]))
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            logits, torch.from_numpy(y[i : i + 1]), reduction="sum") / y.shape[1]  # fmt: skip
        grads = torch.autograd.grad(loss, params)
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
        factor = min(1.0, clip / (float(norm) + 1e-6))
        assert factor < 1.0  # clipping is active, so the test checks it
        clipped = [c + factor * g for c, g in zip(clipped, grads, strict=True)]
    stream = insecure_seeded_prg(seed).stream(NOISE_LABEL)
    noisy = [c + gaussian_noise(stream, sigma * clip, c.shape) for c in clipped]
    expected = {name: -lr * g / 2 for (name, _), g in zip(ref.named_parameters(), noisy, strict=True)}
    # Assert: float32 sums in a different order (abs. error ~1e-8 on entries ~1e-2).
    assert update.steps == 1
    for name, delta in zip(federated_names(model), update.delta, strict=True):
        np.testing.assert_allclose(delta, expected[name].numpy(), rtol=1e-5, atol=1e-7)


def test_opacus_dp_optimizer_calls_add_noise_between_clipping_and_scaling():
    """What install_prg_noise relies on in Opacus 1.6 (see its docstring)."""
    from opacus.optimizers import DPOptimizer, DPPerLayerOptimizer

    source = inspect.getsource(DPOptimizer.pre_step)
    order = [source.index(call) for call in
             ("self.clip_and_accumulate()", "self.add_noise()", "self.scale_grad()", "self.step_hook(self)")]  # fmt: skip
    assert order == sorted(order)
    assert "self.pre_step()" in inspect.getsource(DPOptimizer.step)
    # the hook refuses optimizers whose noise path differs or that carry their own generator
    params = [torch.nn.Parameter(torch.zeros(2))]
    stream = PRG(KEY).stream(NOISE_LABEL)
    per_layer = DPPerLayerOptimizer(torch.optim.SGD(params, lr=0.1), noise_multiplier=1.0,
                                    max_grad_norm=[1.0], expected_batch_size=1)  # fmt: skip
    with pytest.raises(TypeError, match="DPOptimizer"):
        install_prg_noise(per_layer, stream)
    seeded = DPOptimizer(torch.optim.SGD(params, lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0,
                         expected_batch_size=1, generator=torch.Generator())  # fmt: skip
    with pytest.raises(ValueError, match="generator"):
        install_prg_noise(seeded, stream)


@pytest.mark.parametrize(("n", "batch", "epochs"), [(93, 1, 1), (3, 1, 4)])
def test_accountant_history_is_the_sampling_schedule(n, batch, epochs):
    """The accountant sees the sampler's q and one entry per step taken, empty batches
    included. n = 93 batches is a case where Opacus' own hook would account 1/92 over 92
    steps (1 / (1 / 93) rounds below 93)."""
    # Prepare: a linear model (fast); for n = 3, a seed whose sampling has an empty batch.
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    x, y = _data(n, side=2, k=2)
    q, steps = sampling_schedule(n, batch, epochs)
    seed = next(s for s in range(50) if any(len(idx) == 0 for idx in PoissonSampler(
        insecure_seeded_prg(s).stream(SAMPLING_LABEL), num_samples=n, sample_rate=q, steps=steps)))  # fmt: skip
    # Execute
    update = client_update(model, get_arrays(model), x, y, LocalTraining(epochs, batch, 0.1),
                           dp=DPSGD(0.8, 1.0), insecure_noise_seed=seed)  # fmt: skip
    # Assert
    assert update.steps == steps
    assert update.privacy_history == [(0.8, q, steps)]
    assert all(np.all(np.isfinite(d)) for d in update.delta)
