"""Federated rounds through real Flower workflows and mods, sites in this process.

Transport: ``privmed.federated.inprocess`` (Flower's simulation engine needs Ray, too slow
for this tier; tests/e2e runs it). Everything above the transport is the code users run:
``DefaultWorkflow`` + ``SecAggPlusWorkflow`` on the server, ``secaggplus_mod`` + the site
policy mod + ``SiteClient`` at the sites, checkpoints, ledgers.

Oracle for the aggregate: each site's update recomputed here with ``client_update`` (plain
SGD is deterministic given the round's data seed) and averaged with ``weighted_average``.
SecAgg+ error bound (Flower's quantisation, see ``SecAggPlusWorkflow.unmask_stage``): site i
sends round(n_i / W * Q) =: q_i times its update, stochastically rounded on a grid of step
2c/Q; the server divides the sum by R = sum q_i, so per entry
|secure - plain| <= 2 c N / R + max|x| * sum_i |q_i / R - n_i / sum n|  (+ float32 rounding).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from privmed.federated.checkpoint import RunDir
from privmed.federated.client_app import SimulationSites, SiteSpec, make_client_app, round_data_seed
from privmed.federated.config import DPConfig, FederatedConfig
from privmed.federated.inprocess import run_in_process
from privmed.federated.ledger import SiteBudget
from privmed.federated.server_app import make_server_app
from privmed.federated.simulate import prepare_config


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the sites train with 1 thread; the oracle must too
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def study3(tmp_path_factory) -> Path:
    from privmed.data.synth import synth_chest_study

    return synth_chest_study(tmp_path_factory.mktemp("s3") / "study", sites=3, n_per_site=24, size=32, seed=1)


@pytest.fixture(scope="module")
def study4(tmp_path_factory) -> Path:
    from privmed.data.synth import synth_chest_study

    return synth_chest_study(tmp_path_factory.mktemp("s4") / "study", sites=4, n_per_site=20, size=32, seed=2)


def _config(study: Path, out: Path, *, rounds: int = 1, secagg: bool = True, dp: DPConfig | None = None) -> FederatedConfig:
    return prepare_config(study, out, model="small-cnn", rounds=rounds, secagg=secagg, dp=dp,
                          image_size=32, features=(8, 16, 16), batch_size=8, lr=0.05)  # fmt: skip


def _run(study: Path, out: Path, cfg: FederatedConfig, *, mods=(), require_secagg: bool | None = None) -> dict:
    sites = SimulationSites(
        data_dir=study, sites=cfg.sites, run_dir=out,
        require_secagg=cfg.secagg is not None if require_secagg is None else require_secagg,
        require_dp=cfg.dp is not None, max_epsilon=cfg.dp.epsilon if cfg.dp else math.inf,
        total=SiteBudget(cfg.dp.epsilon, cfg.dp.delta) if cfg.dp else SiteBudget(),
    )  # fmt: skip
    run_in_process(make_server_app(out, cfg, connect_timeout=30), make_client_app(sites, mods), len(cfg.sites))
    return RunDir(out).status()


def _drop_mod(partitions: set[int], stage: str = Stage.COLLECT_MASKED_VECTORS):
    """A Flower mod that makes the sites with these partition ids fail at ``stage``."""

    def mod(msg, ctxt, call_next):
        records = msg.content.config_records
        if (int(ctxt.node_config["partition-id"]) in partitions and RECORD_KEY_CONFIGS in records
                and records[RECORD_KEY_CONFIGS].get(Key.STAGE) == stage):  # fmt: skip
            raise ConnectionError("site went offline")
        return call_next(msg, ctxt)

    return mod


def _plain_aggregate(study: Path, cfg: FederatedConfig, global_w: list[np.ndarray], sites: list[str], rnd: int = 1):
    """Oracle: each site's update recomputed here, then plaintext FedAvg."""
    from privmed.federated.arrays import weighted_average
    from privmed.federated.local import LocalTraining, client_update
    from privmed.federated.sitedata import load_site

    updates, weights = [], []
    for site in sites:
        data = load_site(study, site, labels=cfg.labels, image_size=cfg.image_size, test_fraction=cfg.test_fraction)
        update = client_update(cfg.build_model(), global_w, data.x_train, data.y_train,
                               LocalTraining(cfg.local_epochs, cfg.batch_size, cfg.lr),
                               data_seed=round_data_seed(cfg.seed, rnd, site))  # fmt: skip
        updates.append(update.delta)
        weights.append(update.num_examples)
    return weighted_average(updates, weights), updates, weights


def _secagg_bound(cfg: FederatedConfig, weights: list[int], updates: list[list[np.ndarray]]) -> float:
    assert cfg.secagg is not None
    q_range, c, w_max = cfg.secagg.quantization_range, cfg.secagg.clipping_range, cfg.secagg.max_weight
    q = [round(n / w_max * q_range) for n in weights]
    r = sum(q)
    x_max = max(float(np.abs(a).max()) for u in updates for a in u)
    ratio_err = sum(abs(qi / r - n / sum(weights)) for qi, n in zip(q, weights, strict=True))
    return 2 * c * len(weights) / r + x_max * ratio_err + 1e-6 * x_max


def _secure_aggregate(out: Path, rnd: int = 1) -> list[np.ndarray]:
    run = RunDir(out)
    _, before, _ = run.load_round(rnd - 1)
    _, after, _ = run.load_round(rnd)
    return [a.astype(np.float64) - b.astype(np.float64) for a, b in zip(after, before, strict=True)]


def test_secure_aggregate_equals_plain_fedavg_within_quantisation(study3, tmp_path):
    cfg = _config(study3, tmp_path / "run")
    assert _run(study3, tmp_path / "run", cfg)["state"] == "complete"
    _, w0, _ = RunDir(tmp_path / "run").load_round(0)
    plain, updates, weights = _plain_aggregate(study3, cfg, w0, list(cfg.sites))
    bound = _secagg_bound(cfg, weights, updates)
    secure = _secure_aggregate(tmp_path / "run")
    worst = max(float(np.abs(s - p).max()) for s, p in zip(secure, plain, strict=True))
    assert worst <= bound
    # not vacuous: the aggregate is far above the bound, and an unweighted mean is outside it
    assert max(float(np.abs(p).max()) for p in plain) > 1000 * bound
    unweighted = [np.mean([u[j] for u in updates], axis=0) for j in range(len(plain))]
    assert max(float(np.abs(s - u).max()) for s, u in zip(secure, unweighted, strict=True)) > bound
    metrics = RunDir(tmp_path / "run").load_round(1)[2]
    assert metrics["sites_aggregated"] == list(cfg.sites)
    assert set(metrics["evaluation"]) == set(cfg.sites)
    assert 0.0 <= metrics["pooled_auroc_macro"] <= 1.0


def test_dropped_site_within_threshold_does_not_stop_the_round(study4, tmp_path):
    """4 sites, threshold 3: the 4th drops after sharing its keys; its pairwise masks are
    removed with the others' shares and the aggregate is FedAvg over the 3 that stayed."""
    cfg = _config(study4, tmp_path / "run")
    assert cfg.secagg is not None and cfg.secagg.threshold_for(4) == 3
    status = _run(study4, tmp_path / "run", cfg, mods=[_drop_mod({3})])
    assert status["state"] == "complete", status
    metrics = RunDir(tmp_path / "run").load_round(1)[2]
    kept = list(cfg.sites[:3])
    assert metrics["sites_aggregated"] == kept
    _, w0, _ = RunDir(tmp_path / "run").load_round(0)
    plain, updates, weights = _plain_aggregate(study4, cfg, w0, kept)
    secure = _secure_aggregate(tmp_path / "run")
    bound = _secagg_bound(cfg, weights, updates)
    assert max(float(np.abs(s - p).max()) for s, p in zip(secure, plain, strict=True)) <= bound


def test_drops_beyond_threshold_fail_the_round_without_a_checkpoint(study4, tmp_path):
    cfg = _config(study4, tmp_path / "run")
    status = _run(study4, tmp_path / "run", cfg, mods=[_drop_mod({2, 3})])
    assert status["state"] == "failed"
    assert "round 1" in status["message"] and "site went offline" in status["message"]
    assert RunDir(tmp_path / "run").completed_rounds() == [0]


def test_site_requiring_secagg_refuses_a_plain_run(study3, tmp_path):
    cfg = _config(study3, tmp_path / "run", secagg=False)
    status = _run(study3, tmp_path / "run", cfg, require_secagg=True)
    assert status["state"] == "failed"
    assert "requires SecAgg+" in status["message"]
    assert RunDir(tmp_path / "run").completed_rounds() == [0]


class Crash(BaseException):
    """Stands for the server process dying: nothing catches it, nothing runs after it."""


def test_crash_resume_keeps_counting_privacy_and_stops_at_budget(study3, tmp_path):
    """DP run planned for 3 rounds. The server dies in round 2 after every site trained
    (and counted) it. Resuming restarts round 2 from the round-1 checkpoint; each site's
    ledger counts the lost round too, so after round 2 the sites' projected epsilon for a
    3rd round exceeds the budget and the run stops before it, with Opacus' epsilon <= budget."""
    from privmed.federated.ledger import PrivacyLedger
    from privmed.federated.privacy import epsilon_of, epsilon_upper_bound

    out = tmp_path / "run"
    dp = DPConfig(epsilon=4.0, delta=1e-3, max_grad_norm=1.0)
    cfg = _config(study3, out, rounds=3, dp=dp)

    def crash_in_round_2(msg, ctxt, call_next):
        stage = msg.content.config_records.get(RECORD_KEY_CONFIGS, {}).get(Key.STAGE)
        if msg.metadata.group_id == "2" and stage == Stage.UNMASK:
            raise Crash()
        return call_next(msg, ctxt)

    with pytest.raises(Crash):
        _run(study3, out, cfg, mods=[crash_in_round_2])
    run = RunDir(out)
    assert run.last_round() == 1 and run.status()["state"] == "running"
    round1 = hashlib.sha256((out / "rounds" / "round-0001.npz").read_bytes()).hexdigest()

    def ledger(site: str) -> PrivacyLedger:
        (path,) = run.site_state_dir(site).glob("privacy-ledger-*.json")
        return PrivacyLedger._load(path, cfg.run_name)

    assert [len(ledger(s).entries) for s in cfg.sites] == [2, 2, 2]

    resumed = _config(study3, out, rounds=3, dp=dp)
    assert resumed.run_name == cfg.run_name
    status = _run(study3, out, resumed)
    assert status["state"] == "stopped-budget", status
    assert "before round 3" in status["message"]
    assert run.completed_rounds() == [0, 1, 2]
    assert hashlib.sha256((out / "rounds" / "round-0001.npz").read_bytes()).hexdigest() == round1
    metrics = run.load_round(2)[2]
    for site in cfg.sites:
        book = ledger(site)
        assert [e["round"] for e in book.entries] == [1, 2, 2]
        eps = epsilon_of(book.history(), dp.delta)
        assert metrics["fit"][site]["dp-epsilon"] == pytest.approx(eps, rel=1e-9)
        assert metrics["fit"][site]["dp-steps"] == 3 * book.steps_per_round
        assert eps <= dp.epsilon
        one_more = book.history() + [(book.noise_multiplier, book.sample_rate, book.steps_per_round)]
        assert epsilon_upper_bound(one_more, dp.delta) > dp.epsilon


def test_extending_a_dp_run_past_its_schedule_stops_before_the_extra_round(study3, tmp_path):
    """The noise was fixed for 1 round; asking for a 2nd round later is refused up front."""
    out = tmp_path / "run"
    dp = DPConfig(epsilon=3.0, delta=1e-3, max_grad_norm=1.0)
    assert _run(study3, out, _config(study3, out, rounds=1, dp=dp))["state"] == "complete"
    status = _run(study3, out, _config(study3, out, rounds=2, dp=dp))
    assert status["state"] == "stopped-budget" and "before round 2" in status["message"]
    assert RunDir(out).completed_rounds() == [0, 1]


def test_a_renamed_run_cannot_reset_a_sites_budget_and_training_stops_with_a_message(study3, tmp_path):
    """Each site keeps its ledger in its own state folder across runs (as a SuperNode does)
    with a total budget of epsilon 3. Run 1 (1 round at epsilon 3) spends it; the server then
    submits the same training under a new run name: every site refuses before training, and
    the run stops at the budget with the site's reason."""
    state = tmp_path / "site-state"
    dp = DPConfig(epsilon=3.0, delta=1e-3, max_grad_norm=1.0)

    def resolver(context) -> SiteSpec:
        site = ("site_a", "site_b", "site_c")[int(context.node_config["partition-id"])]
        return SiteSpec(data_dir=study3, site=site, state_dir=state / site, require_dp=True,
                        total=SiteBudget(3.0, 1e-3))  # fmt: skip

    names = []
    for out in (tmp_path / "run-1", tmp_path / "run-2"):
        cfg = _config(study3, out, rounds=1, dp=dp)
        names.append(cfg.run_name)
        run_in_process(make_server_app(out, cfg, connect_timeout=30), make_client_app(resolver), 3)
    assert names[0] != names[1]
    assert RunDir(tmp_path / "run-1").status()["state"] == "complete"
    status = RunDir(tmp_path / "run-2").status()
    assert status["state"] == "stopped-budget", status
    assert "total privacy budget of this data set exhausted" in status["message"]
    assert RunDir(tmp_path / "run-2").completed_rounds() == [0]
    for site in ("site_a", "site_b", "site_c"):
        (ledger,) = (state / site).glob("privacy-ledger-*.json")  # one ledger, both runs
        assert sorted(json.loads(ledger.read_text())["runs"]) == sorted(names)
        assert len(json.loads(ledger.read_text())["entries"]) == 1


def test_scatter_recipe_round_through_secagg_with_dp_and_export(study3, tmp_path):
    """The default DP recipe through the real workflow: sites compute (and cache) frozen
    scattering features, train the head under DP-SGD, SecAgg+ aggregates; only head
    parameters travel; the exported ONNX (scattering + head + sigmoid) equals torch."""
    import onnxruntime as ort

    from privmed.data.preprocess import Preprocess, load_for_model
    from privmed.federated.arrays import set_arrays
    from privmed.federated.recipes import feature_extractor
    from privmed.federated.simulate import export_final_model

    out = tmp_path / "run"
    dp = DPConfig(epsilon=8.0, delta=1e-3, max_grad_norm=1.0)
    cfg = prepare_config(study3, out, model="small-cnn", rounds=1, secagg=True, dp=dp, image_size=32,
                         recipe="scatter", batch_size=8, lr=0.5)  # fmt: skip
    assert _run(study3, out, cfg)["state"] == "complete"
    run = RunDir(out)
    names, weights, metrics = run.load_round(1)
    assert sum(w.size for w in weights) < 20_000 and all(n.startswith(("features.", "head.")) for n in names)
    assert sorted(metrics["fit"]) == ["site_a", "site_b", "site_c"]
    assert all(0 < f["dp-epsilon"] <= 8.0 for f in metrics["fit"].values())
    for site in cfg.sites:
        assert len(list(run.site_state_dir(site).glob("features-*.npz"))) == 1

    onnx_path = export_final_model(run, cfg)
    image = next((study3 / "images").iterdir())
    x = load_for_model(image, Preprocess.load(out / "model.preprocess.json"))
    head = cfg.build_model()
    set_arrays(head, weights)
    with torch.no_grad():
        expected = torch.sigmoid(head(feature_extractor("scatter")(torch.from_numpy(x)))).numpy()
    got = ort.InferenceSession(str(onnx_path)).run(None, {"input": x.astype(np.float32)})[0]
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_ema_of_global_weights_is_what_sites_evaluate_and_what_is_exported(study3, tmp_path):
    """ema = 0.5 over 2 plain rounds. Oracle: the average recomputed by hand from the
    checkpoints, and site_a's AUROC of that average computed here with predict_proba."""
    from privmed.federated.arrays import set_arrays
    from privmed.federated.local import predict_proba
    from privmed.federated.metrics import auroc_per_label, macro_mean
    from privmed.federated.simulate import export_final_model
    from privmed.federated.sitedata import load_site

    out = tmp_path / "run"
    cfg = prepare_config(study3, out, model="small-cnn", rounds=2, secagg=True, image_size=32,
                         features=(8, 16, 16), batch_size=8, lr=0.05, ema=0.5)  # fmt: skip
    assert _run(study3, out, cfg)["state"] == "complete"
    run = RunDir(out)
    w = [run.load_round(r)[1] for r in (0, 1, 2)]
    by_hand = [0.25 * a + 0.25 * b + 0.5 * c for a, b, c in zip(*w, strict=True)]
    for got, want in zip(run.ema_weights(0.5, 2), by_hand, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-6)
    assert any(np.abs(e - c).max() > 1e-4 for e, c in zip(by_hand, w[2], strict=True))  # not the plain model

    site = load_site(study3, "site_a", labels=cfg.labels, image_size=32, test_fraction=cfg.test_fraction)
    model = cfg.build_model()
    set_arrays(model, run.ema_weights(0.5, 1))
    expected = macro_mean(auroc_per_label(site.y_test, predict_proba(model, site.x_test)))
    assert run.load_round(1)[2]["evaluation"]["site_a"]["auroc_macro"] == pytest.approx(expected, abs=2e-3)

    import onnxruntime as ort

    onnx_path = export_final_model(run, cfg)
    set_arrays(model, run.ema_weights(0.5, 2))
    got = ort.InferenceSession(str(onnx_path)).run(None, {"input": site.x_test[:1]})[0]
    np.testing.assert_allclose(got, predict_proba(model, site.x_test[:1]), atol=1e-5)
