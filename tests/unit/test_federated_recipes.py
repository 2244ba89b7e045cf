"""DP recipes: the accountant's plan, trainable subsets, the frozen-feature cache, config."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from privmed.errors import ConfigError
from privmed.federated.config import DPConfig, FederatedConfig
from privmed.federated.recipes import BATCHES, ROUNDS, plan_dp, select_trainable, site_inputs


def test_plan_spends_at_most_epsilon_and_has_the_least_total_noise():
    """Oracle: Opacus' RDP accountant for the chosen schedule, and a brute-force search of
    eta = sigma / (q sqrt(steps)) over the same candidates."""
    from opacus.accountants import RDPAccountant

    from privmed.federated.privacy import calibrate_noise_multiplier, sampling_schedule

    n, eps, delta = 128, 8.0, 1e-5
    plan = plan_dp(eps, delta, n)
    acc = RDPAccountant()
    acc.history = [(plan.noise_multiplier, plan.sample_rate, plan.steps)]
    assert acc.get_epsilon(delta) <= eps
    q, per_round = sampling_schedule(n, plan.batch_size, 1)
    assert (plan.sample_rate, plan.steps) == (q, plan.rounds * per_round)
    etas = []
    for batch in (b for b in BATCHES if b <= n / 2):
        for rounds in ROUNDS:
            q, per_round = sampling_schedule(n, batch, 1)
            if rounds * per_round >= 20:
                sigma = calibrate_noise_multiplier(DPConfig(eps, delta, 1.0), q, rounds * per_round)
                etas.append(sigma / (q * math.sqrt(rounds * per_round)))
    assert plan.eta == pytest.approx(min(etas))
    assert f"batch {plan.batch_size}" in plan.reason and "Sander et al. 2023" in plan.reason
    # a smaller budget needs more noise
    assert plan_dp(2.0, delta, n).noise_multiplier > plan.noise_multiplier


def test_plan_refuses_a_site_too_small_for_any_schedule():
    with pytest.raises(ConfigError, match="no batch size / rounds schedule"):
        plan_dp(8.0, 1e-5, 20)


def test_head_only_training_leaves_every_other_parameter_unchanged_under_dp():
    from privmed.federated.arrays import get_arrays
    from privmed.federated.local import DPSGD, LocalTraining, client_update
    from privmed.models.zoo import build_model

    torch.manual_seed(0)
    model = select_trainable(build_model("small-cnn", 1, 2, norm="group", features=(4, 8)), "head")
    names = [n for n, _ in model.named_parameters()]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((24, 1, 16, 16)).astype(np.float32)
    y = (rng.random((24, 2)) < 0.5).astype(np.float32)
    update = client_update(model, get_arrays(model), x, y, LocalTraining(1, 8, 0.1),
                           dp=DPSGD(1.0, 1.0), insecure_noise_seed=1)  # fmt: skip
    moved = {n for n, d in zip(names, update.delta, strict=True) if np.abs(d).max() > 0}
    assert moved == {"head.weight", "head.bias"}

    norms = select_trainable(build_model("small-cnn", 1, 2, norm="group", features=(4, 8)), "norms-head")
    trainable = [n for n, p in norms.named_parameters() if p.requires_grad]
    assert "head.weight" in trainable and all(".conv." not in n for n in trainable)
    assert any(".adn.N." in n for n in trainable)


def test_frozen_features_are_computed_once_and_cached_at_the_site(tmp_path, monkeypatch):
    from privmed.federated import recipes
    from privmed.federated.sitedata import SiteData

    rng = np.random.default_rng(0)
    data = SiteData("a", ("f",), rng.standard_normal((6, 1, 16, 16)).astype(np.float32),
                    np.zeros((6, 1), np.float32), rng.standard_normal((3, 1, 16, 16)).astype(np.float32),
                    np.zeros((3, 1), np.float32), fingerprint="ab" * 32)  # fmt: skip
    first = site_inputs("scatter", data, tmp_path)
    assert first.x_train.shape == (6, 81, 4, 4) and first.x_test.shape == (3, 81, 4, 4)
    assert len(list(tmp_path.glob("features-*.npz"))) == 1

    def no_extractor(recipe: str) -> None:
        raise AssertionError("features recomputed despite the cache")

    monkeypatch.setattr(recipes, "feature_extractor", no_extractor)
    again = site_inputs("scatter", data, tmp_path)
    np.testing.assert_array_equal(again.x_train, first.x_train)
    assert site_inputs("end-to-end", data, tmp_path) is data


def test_recipe_is_part_of_the_run_config_and_old_manifests_still_load():
    cfg = FederatedConfig(model="small-cnn", rounds=2, labels=("a", "b"), sites=("s1", "s2", "s3"),
                          image_size=32, recipe="scatter", dp=DPConfig(8.0, 1e-5, 1.0))  # fmt: skip
    cfg.check()
    flat = cfg.to_flat()
    assert flat["recipe"] == "scatter" and FederatedConfig.from_flat(flat) == cfg
    old = {k: v for k, v in flat.items() if k not in ("recipe", "train-params")}
    assert FederatedConfig.from_flat(old).recipe == "end-to-end"
    head = cfg.build_model()
    assert sum(p.numel() for p in head.parameters()) < 20_000
    with pytest.raises(ConfigError, match="recipe"):
        FederatedConfig(model="small-cnn", rounds=1, labels=("a",), sites=("s1", "s2", "s3"),
                        image_size=32, recipe="magic").check()  # fmt: skip
    with pytest.raises(ConfigError, match="multiple of 8"):
        FederatedConfig(model="small-cnn", rounds=1, labels=("a",), sites=("s1", "s2", "s3"),
                        image_size=36, recipe="scatter").check()  # fmt: skip


def test_augmentation_multiplicity_clips_the_mean_gradient_over_each_images_views():
    """One DP step on 2 images x 3 views (q = 1). Oracle: per view gradients by autograd,
    averaged per image, clipped as one example (Opacus' factor min(1, C / (|g| + 1e-6))),
    summed, plus the noise recomputed from the insecure seed's stream, / 2."""
    from privmed.federated.arrays import federated_names, get_arrays, set_arrays
    from privmed.federated.local import DPSGD, LocalTraining, client_update
    from privmed.federated.noise import NOISE_LABEL, gaussian_noise, insecure_seeded_prg
    from privmed.federated.recipes import augmented_views
    from privmed.models.zoo import build_model

    torch.manual_seed(0)
    model = build_model("small-cnn", 1, 3, norm="group", features=(4, 8))
    rng = np.random.default_rng(3)
    images = rng.standard_normal((2, 1, 16, 16)).astype(np.float32)
    y = (rng.random((2, 3)) < 0.5).astype(np.float32)
    x = augmented_views(images, 3)
    assert x.shape == (2, 3, 1, 16, 16)
    np.testing.assert_array_equal(x[:, 1], images[..., ::-1])
    lr, sigma, clip, seed = 0.1, 1.3, 0.05, 11
    update = client_update(model, get_arrays(model), x, y, LocalTraining(1, 2, lr),
                           dp=DPSGD(sigma, clip), insecure_noise_seed=seed)  # fmt: skip

    ref = build_model("small-cnn", 1, 3, norm="group", features=(4, 8))
    set_arrays(ref, get_arrays(model))
    params = list(ref.parameters())
    clipped = [torch.zeros_like(p) for p in params]
    for i in range(2):
        per_view = []
        for v in range(3):
            logits = ref(torch.from_numpy(np.ascontiguousarray(x[i, v : v + 1])))
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                logits, torch.from_numpy(y[i : i + 1]), reduction="sum") / 3  # fmt: skip
            per_view.append(torch.autograd.grad(loss, params))
        mean = [sum(g[k] for g in per_view) / 3 for k in range(len(params))]
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in mean))
        factor = min(1.0, clip / (float(norm) + 1e-6))
        assert factor < 1.0
        clipped = [c + factor * g for c, g in zip(clipped, mean, strict=True)]
    stream = insecure_seeded_prg(seed).stream(NOISE_LABEL)
    noisy = [c + gaussian_noise(stream, sigma * clip, c.shape) for c in clipped]
    expected = {n: -lr * g / 2 for (n, _), g in zip(ref.named_parameters(), noisy, strict=True)}
    assert update.steps == 1 and update.num_examples == 2
    for name, delta in zip(federated_names(model), update.delta, strict=True):
        np.testing.assert_allclose(delta, expected[name].numpy(), rtol=1e-5, atol=1e-7)
