"""What a site sends vs the attacker's replica; secure aggregate; DP noise; label recovery."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from privmed.attacks.labels import assign_labels, label_count_accuracy, recover_label_counts
from privmed.attacks.updates import (
    MOMENTUM,
    SiteProtocol,
    aggregate_updates,
    attacker_state,
    simulate_update,
    site_update,
)
from privmed.errors import InputError


def _model(k: int = 4):
    from privmed.models.zoo import build_model

    torch.manual_seed(0)
    return build_model("small-cnn", 1, k, norm="group", features=(4, 8))


def _batch(n: int, k: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 1, 16, 16)).astype(np.float32)
    y = (rng.random((n, k)) < 0.5).astype(np.float32)
    return x, y


def test_momentum_matches_the_federated_trainer():
    from privmed.federated import local

    assert MOMENTUM == local.MOMENTUM


@pytest.mark.parametrize("steps", [1, 3])
def test_attacker_replica_equals_what_the_site_sends_without_dp(steps):
    # Prepare
    model = _model()
    x, y = _batch(3)
    protocol = SiteProtocol(local_steps=steps, lr=0.05)
    # Execute: the real message (privmed.federated client_update) and the replica.
    sent = site_update(model, x, y, protocol, noise_seed=0)
    params, buffers = attacker_state(model)
    replica = simulate_update(model, params, buffers, torch.from_numpy(x), torch.from_numpy(y), protocol)
    # Assert: same function; float32 summation order is the only difference.
    assert len(sent) == len(replica)
    for a, b in zip(sent, replica, strict=True):
        assert torch.allclose(a, b.detach(), rtol=1e-4, atol=1e-7)


def test_aggregate_is_fedavg_of_the_federated_oracle():
    from privmed.federated.arrays import weighted_average

    model = _model()
    updates = [site_update(model, *_batch(2, seed=s), SiteProtocol(), noise_seed=s) for s in range(3)]
    weights = [2.0, 5.0, 3.0]
    ours = aggregate_updates(updates, weights)
    oracle = weighted_average([[u.numpy() for u in upd] for upd in updates], weights)
    for a, b in zip(ours, oracle, strict=True):
        np.testing.assert_allclose(a.numpy(), b, rtol=1e-5, atol=1e-8)


def test_dp_update_is_clipped_gradient_plus_calibrated_gaussian_noise():
    # Prepare: one image, one step: delta = -lr * (clip(g) + N(0, sigma^2 C^2 I)).
    model = _model()
    x, y = _batch(1)
    lr, sigma, clip = 0.05, 1.0, 0.5
    clean = site_update(model, x, y, SiteProtocol(lr=lr), noise_seed=0)
    noisy = site_update(model, x, y, SiteProtocol(lr=lr, dp_sigma=sigma, clip_norm=clip), noise_seed=0)
    again = site_update(model, x, y, SiteProtocol(lr=lr, dp_sigma=sigma, clip_norm=clip), noise_seed=0)
    # Execute: recover the noise with a clipped gradient computed independently.
    gradient = torch.cat([-u.flatten() / lr for u in clean])
    clipped = gradient * min(1.0, clip / float(gradient.norm()))
    noise = torch.cat([-u.flatten() / lr for u in noisy]) - clipped
    # Assert: reproducible for a fixed seed; noise mean ~0 and std ~sigma*C per coordinate
    # (P coordinates: the std estimate is within 5 / sqrt(2P) relative at > 5 sigma).
    assert all(torch.equal(a, b) for a, b in zip(noisy, again, strict=True))
    p = noise.numel()
    assert abs(float(noise.mean())) < 5 * sigma * clip / math.sqrt(p)
    assert float(noise.std()) == pytest.approx(sigma * clip, rel=5 / math.sqrt(2 * p))


def test_labels_exact_at_batch_one_and_counts_for_a_batch():
    model = _model()
    prior = torch.zeros(1, 16, 16)
    protocol = SiteProtocol()
    for seed in range(4):
        x, y = _batch(1, seed=seed)
        estimate = recover_label_counts(model, site_update(model, x, y, protocol, 0), protocol, 1, 4, prior)
        assert estimate.counts.tolist() == y[0].astype(int).tolist()
    # Batch: n_k = N sigma(f(prior))_k - N K g_k. Oracle: the same algebra with the true
    # logits, i.e. truth + N (sigma(f(prior)) - mean_i sigma(f(x_i))), rounded.
    x, y = _batch(6, seed=9)
    prior = torch.from_numpy(_batch(1, seed=50)[0][0])
    estimate = recover_label_counts(model, site_update(model, x, y, protocol, 0), protocol, 6, 4, prior)
    with torch.no_grad():
        p_prior = torch.sigmoid(model.train()(prior[None]))[0].double()
        p_true = torch.sigmoid(model(torch.from_numpy(x))).double().mean(0)
    oracle = torch.round(torch.from_numpy(y.sum(0)).double() + 6 * (p_prior - p_true)).clamp(0, 6)
    assert estimate.counts.tolist() == oracle.int().tolist()
    assert label_count_accuracy(estimate, y) == float(np.mean(oracle.numpy() == y.sum(0)))
    drawn = assign_labels(estimate, np.random.default_rng(0))
    assert drawn.shape == (6, 4) and drawn.sum(axis=0).tolist() == estimate.counts.tolist()


def test_bad_protocol_and_batch_are_input_errors():
    with pytest.raises(InputError, match="local steps"):
        SiteProtocol(local_steps=0)
    with pytest.raises(InputError, match="known labels"):
        y = np.full((1, 4), np.nan, dtype=np.float32)
        site_update(_model(), _batch(1)[0], y, SiteProtocol(), 0)


def test_head_input_is_read_exactly_off_a_batch_one_update_and_not_under_dp():
    from privmed.attacks.labels import head_input, recover_head_input

    model = _model()
    x, y = _batch(1)
    truth = head_input(model, torch.from_numpy(x), 4)[0]
    assert truth.shape == (8 * 4 * 4,)  # last width x pool grid

    def error(sigma: float, n: int = 1) -> float:
        xs, ys = _batch(n)
        update = site_update(model, xs, ys, SiteProtocol(dp_sigma=sigma), noise_seed=3)
        got = recover_head_input(model, update, 4)
        feats = head_input(model, torch.from_numpy(xs), 4)
        return float(((feats - got).norm(dim=1) / feats.norm(dim=1)).min())

    # float32 ratio of two update entries: a few ulp of relative error
    assert error(0.0) < 1e-4  # measured 5.8e-7
    # DP noise (std sigma * clip on every coordinate of dW and db) swamps one image's row
    assert error(1.0) > 0.5  # measured 1.5-2.8 over three noise seeds
    # 8 images mix into one d-weighted average: no single image's features
    assert error(0.0, n=8) > 0.3  # measured 0.69
