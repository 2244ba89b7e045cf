"""client_update, FedAvg oracle, pooled AUROC from histograms, site data checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from privmed.errors import InputError
from privmed.federated.arrays import get_arrays, set_arrays, weighted_average
from privmed.federated.local import DPSGD, LocalTraining, client_update, prepare_for_opacus
from privmed.federated.metrics import auroc_from_histograms, auroc_per_label, score_histograms


def _data(n: int = 12, side: int = 32, k: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random((n, k)) < 0.5).astype(np.float32)
    y[0, 1] = np.nan
    return rng.standard_normal((n, 1, side, side)).astype(np.float32), y


def test_client_update_is_local_minus_global_and_leaves_model_alone():
    from privmed.models.zoo import build_model

    torch.manual_seed(0)
    model = build_model("small-cnn", 1, 3, norm="group", features=(4, 8))
    before = get_arrays(model)
    x, y = _data(side=16)
    a = client_update(model, before, x, y, LocalTraining(2, 4, 0.05), data_seed=7)
    b = client_update(model, before, x, y, LocalTraining(2, 4, 0.05), data_seed=7)
    assert all(np.array_equal(p, q) for p, q in zip(before, get_arrays(model), strict=True))
    assert all(np.array_equal(p, q) for p, q in zip(a.delta, b.delta, strict=True))
    assert a.steps == 2 * 3 and a.num_examples == 12 and a.privacy_history == []
    assert max(float(np.abs(d).max()) for d in a.delta) > 0
    # oracle: the same SGD written out with torch directly
    torch.manual_seed(0)
    ref = build_model("small-cnn", 1, 3, norm="group", features=(4, 8))
    set_arrays(ref, before)
    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y)),
        batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(7))  # fmt: skip
    for _ in range(2):
        for xb, yb in loader:
            opt.zero_grad()
            known = ~torch.isnan(yb)
            bce = torch.nn.functional.binary_cross_entropy_with_logits(
                ref(xb), torch.nan_to_num(yb), reduction="none")  # fmt: skip
            ((bce * known).sum(1) / 3).mean().backward()
            opt.step()
    expected = [p - q for p, q in zip(get_arrays(ref), before, strict=True)]
    for d, e in zip(a.delta, expected, strict=True):
        np.testing.assert_allclose(d, e, atol=1e-6)


def test_dp_update_on_resnet18_reports_opacus_schedule():
    """ResNet-18 (GroupNorm) trains under Opacus after the in-place ops are rewritten, and the
    rewrite computes the same function."""
    from privmed.models.zoo import build_model

    torch.manual_seed(0)
    model = build_model("resnet18", 1, 3, norm="group")
    x, y = _data(n=8)
    with torch.no_grad():
        patched = prepare_for_opacus(build_model_copy(model))
        model.eval()
        patched.eval()
        before = model(torch.from_numpy(x[:2]))
        np.testing.assert_allclose(patched(torch.from_numpy(x[:2])).numpy(), before.numpy(), atol=1e-6)
    update = client_update(model, get_arrays(model), x, y, LocalTraining(1, 4, 0.01),
                           dp=DPSGD(1.0, 1.0), insecure_noise_seed=3)  # fmt: skip
    assert update.privacy_history == [(1.0, 0.5, 2)]
    assert all(np.all(np.isfinite(d)) for d in update.delta)


def build_model_copy(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model)


def test_dp_refuses_batchnorm():
    from privmed.errors import ModelError
    from privmed.models.zoo import build_model

    model = build_model("small-cnn", 1, 3, norm="batch", features=(4, 8))
    x, y = _data(side=16)
    with pytest.raises(ModelError, match="norm='group'"):
        client_update(model, get_arrays(model), x, y, LocalTraining(1, 4, 0.05), dp=DPSGD(1.0, 1.0))


def test_weighted_average_matches_numpy():
    rng = np.random.default_rng(1)
    ups = [[rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal(5).astype(np.float32)]
           for _ in range(3)]  # fmt: skip
    w = [10, 20, 31]
    out = weighted_average(ups, w)
    for j in range(2):
        ref = np.average(np.stack([u[j] for u in ups]).astype(np.float64), axis=0, weights=w)
        np.testing.assert_allclose(out[j], ref, rtol=1e-6)


def test_pooled_auroc_from_histograms_matches_sklearn():
    """Oracle: scikit-learn on the pooled scores. Histogram AUROC differs only by pairs that
    share a bin (counted 1/2), so the difference is at most half their share of all pairs."""
    rng = np.random.default_rng(2)
    sites = []
    for shift in (0.0, 0.3, -0.2):
        y = (rng.random((200, 2)) < 0.3).astype(np.float32)
        logits = rng.standard_normal((200, 2)) + 1.5 * y + shift
        sites.append((y, 1 / (1 + np.exp(-logits))))
    pooled_hist = sum(score_histograms(y, p) for y, p in sites)
    y_all = np.concatenate([y for y, _ in sites])
    p_all = np.concatenate([p for _, p in sites])
    exact = auroc_per_label(y_all, p_all)
    approx = auroc_from_histograms(pooled_hist)
    for k in range(2):
        tied = float(np.sum(pooled_hist[k, 0] * pooled_hist[k, 1]))
        bound = 0.5 * tied / (pooled_hist[k, 0].sum() * pooled_hist[k, 1].sum())
        assert abs(approx[k] - exact[k]) <= bound + 1e-12
        assert 0.6 < exact[k] < 0.95
    # scores on bin centres: ties are ties for sklearn too, so the two agree exactly
    centred = (np.floor(p_all * 1000) + 0.5) / 1000
    assert auroc_from_histograms(score_histograms(y_all, centred)) == pytest.approx(
        auroc_per_label(y_all, centred), abs=1e-12)  # fmt: skip


def test_load_site_refuses_mismatched_labels_and_empty_site(tmp_path):
    from privmed.data.synth import synth_chest_study
    from privmed.federated.sitedata import check_site, load_site, summarize_study

    study = synth_chest_study(tmp_path / "study", sites=3, n_per_site=12, size=32, seed=0)
    summary = summarize_study(study)
    with pytest.raises(InputError, match="the run trains on"):
        load_site(study, summary.sites[0], labels=("opacity", "fracture"), image_size=32, test_fraction=0.2)
    with pytest.raises(InputError, match="has no images"):
        check_site(study, "no_such_site")


def test_summarize_refuses_label_sets_that_differ_across_sites(monkeypatch):
    from privmed.data.datasets import Record, Study
    from privmed.federated import sitedata

    recs = []
    for s in ("a", "b", "c"):
        for i in range(20):
            labels = np.array([i % 2, np.nan if s == "c" else (i // 2) % 2], dtype=np.float32)
            recs.append(Record(f"{s}{i}", sitedata.Path(f"{s}{i}.png"), labels, s))
    monkeypatch.setattr(sitedata, "_load_study", lambda root: Study(sitedata.Path("x"), ["f1", "f2"], recs))
    with pytest.raises(InputError, match=r"site 'c' has no known labels for \['f2'\]"):
        sitedata.summarize_study("x")
    few = [Record(r.image_id, r.path, r.labels[:1], r.site) for r in recs if r.site != "b" or r.image_id == "b0"]
    monkeypatch.setattr(sitedata, "_load_study", lambda root: Study(sitedata.Path("x"), ["f1"], few))
    with pytest.raises(InputError, match="site 'b' has 1 images"):
        sitedata.summarize_study("x")
