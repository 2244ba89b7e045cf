"""DP accounting (against Opacus' own accountants), budget stop, non-private refusals."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from privmed.errors import ConfigError, InputError
from privmed.federated.config import DPConfig, FederatedConfig, SecAggConfig
from privmed.federated.ledger import PrivacyLedger, SiteBudget, ledger_path
from privmed.federated.local import DPSGD, LocalTraining, client_update
from privmed.federated.privacy import (
    PrivacyBudgetExhausted,
    calibrate_noise_multiplier,
    epsilon_of,
    epsilon_upper_bound,
    sampling_schedule,
)

N_TRAIN, BATCH, EPOCHS, ROUNDS = 20, 8, 1, 3
DATASET = "0" * 64
TOTAL = SiteBudget(epsilon=50.0, delta=1e-3)  # these tests are about the run's budget


def _open(state, **kwargs) -> PrivacyLedger:
    """Site "a"'s ledger on DATASET with a loose total budget unless given."""
    return PrivacyLedger.open(state, **{"site": "a", "dataset": DATASET, "total": TOTAL, **kwargs})


def _tiny_site(seed: int = 0) -> tuple[torch.nn.Module, np.ndarray, np.ndarray]:
    from privmed.models.zoo import build_model

    torch.manual_seed(seed)
    model = build_model("small-cnn", 1, 2, norm="group", features=(4, 8))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N_TRAIN, 1, 16, 16)).astype(np.float32)
    y = (rng.random((N_TRAIN, 2)) < 0.5).astype(np.float32)
    return model, x, y


def test_ledger_epsilon_equals_opacus_accountants_over_rounds(tmp_path):
    """Prepare: a site runs 3 DP rounds of real Opacus training; its ledger is reopened from
    disk every round (as a resumed run would). Oracle: one Opacus RDPAccountant stepped once
    per optimizer step, and Opacus' low-level compute_rdp/get_privacy_spent."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    from privmed.federated.arrays import add_arrays, get_arrays

    dp = DPConfig(epsilon=4.0, delta=1e-3, max_grad_norm=1.0)
    model, x, y = _tiny_site()
    weights = get_arrays(model)
    stepped = RDPAccountant()
    for r in range(1, ROUNDS + 1):
        ledger = _open(tmp_path, run_name="run", dp=dp, n_train=N_TRAIN,
                                    batch_size=BATCH, local_epochs=EPOCHS, rounds=ROUNDS)  # fmt: skip
        ledger.check_next_round()
        update = client_update(model, weights, x, y, LocalTraining(EPOCHS, BATCH, 0.05),
                               dp=DPSGD(ledger.noise_multiplier, dp.max_grad_norm), insecure_noise_seed=r)  # fmt: skip
        ledger.record(r, update.privacy_history)
        weights = add_arrays(weights, update.delta)
        for _ in range(update.steps):
            stepped.step(noise_multiplier=ledger.noise_multiplier, sample_rate=ledger.sample_rate)

    ledger = _open(tmp_path, run_name="run", dp=dp, n_train=N_TRAIN,
                                batch_size=BATCH, local_epochs=EPOCHS, rounds=ROUNDS)  # fmt: skip
    spent = ledger.spent()
    q, steps_per_round = sampling_schedule(N_TRAIN, BATCH, EPOCHS)
    assert (ledger.sample_rate, ledger.steps_per_round) == (q, steps_per_round) == (1 / 3, 3)
    assert spent.steps == ROUNDS * steps_per_round == len(ledger.entries) * 3
    oracle = stepped.get_epsilon(delta=dp.delta)
    rdp = compute_rdp(q=q, noise_multiplier=ledger.noise_multiplier, steps=spent.steps,
                      orders=RDPAccountant.DEFAULT_ALPHAS)  # fmt: skip
    low_level, _ = get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=dp.delta)
    assert spent.epsilon == pytest.approx(oracle, rel=1e-12)
    assert spent.epsilon == pytest.approx(float(low_level), rel=1e-12)
    # calibrated for exactly ROUNDS rounds on the integer-order bound: never above the
    # budget, and the fractional orders only tighten it by a few percent
    assert 0.95 * dp.epsilon <= spent.epsilon <= epsilon_upper_bound(ledger.history(), dp.delta) <= dp.epsilon


def test_budget_stop_before_exceeding_and_ledger_untouched(tmp_path):
    dp = DPConfig(epsilon=2.0, delta=1e-3, max_grad_norm=1.0)
    ledger = _open(tmp_path, run_name="r", dp=dp, n_train=N_TRAIN,
                                batch_size=BATCH, local_epochs=EPOCHS, rounds=2)  # fmt: skip
    entry = [(ledger.noise_multiplier, ledger.sample_rate, ledger.steps_per_round)]
    for r in (1, 2):
        projected = ledger.check_next_round()
        after = ledger.record(r, entry)
        assert after.epsilon <= projected == pytest.approx(epsilon_upper_bound(ledger.history(), dp.delta))
        assert projected <= dp.epsilon
    before = ledger.path.read_bytes()
    with pytest.raises(PrivacyBudgetExhausted, match=r"one more round would spend epsilon up to .* > budget 2"):
        ledger.check_next_round()
    assert ledger.path.read_bytes() == before
    # the refused round would indeed have exceeded the budget (Opacus' own number)
    assert epsilon_of(ledger.history() + entry, dp.delta) > dp.epsilon


def test_ledger_refuses_a_changed_schedule_on_resume(tmp_path):
    dp = DPConfig(epsilon=2.0, delta=1e-3, max_grad_norm=1.0)
    _open(tmp_path, run_name="r", dp=dp, n_train=N_TRAIN, batch_size=BATCH,
                       local_epochs=1, rounds=2)  # fmt: skip
    with pytest.raises(ConfigError, match="cannot change its DP schedule"):
        _open(tmp_path, run_name="r", dp=dp, n_train=N_TRAIN, batch_size=4,
                           local_epochs=1, rounds=2)  # fmt: skip
    body = json.loads(ledger_path(tmp_path, "a", DATASET).read_text())
    assert body["format"] == "privmed-privacy-ledger" and body["entries"] == [] and list(body["runs"]) == ["r"]


@pytest.mark.parametrize(
    ("dp", "match"),
    [
        (DPConfig(8.0, 1e-5, 0.0), "clipping norm"),
        (DPConfig(8.0, 1e-5, math.inf), "clipping norm"),
        (DPConfig(1e6, 1e-5, 1.0), "epsilon"),
        (DPConfig(8.0, 0.5, 1.0), "delta"),
    ],
)
def test_non_private_dp_configurations_are_refused(dp, match):
    with pytest.raises(ConfigError, match=match):
        dp.check()


def test_noise_multiplier_near_zero_is_refused():
    # epsilon 50 over a single full-batch step needs sigma ~0.1: DP in name only
    with pytest.raises(ConfigError, match="DP in name only"):
        calibrate_noise_multiplier(DPConfig(50.0, 1e-5, 1.0), sample_rate=1.0, steps=1)
    with pytest.raises(InputError, match="noise multiplier"):
        DPSGD(noise_multiplier=0.0, max_grad_norm=1.0)


def test_delta_must_be_below_one_over_n(tmp_path):
    with pytest.raises(ConfigError, match="well below 1/n"):
        _open(tmp_path, run_name="r", dp=DPConfig(2.0, 0.009, 1.0),
                           n_train=200, batch_size=8, local_epochs=1, rounds=1)  # fmt: skip


def test_config_flat_roundtrip_and_checks():
    cfg = FederatedConfig(model="small-cnn", rounds=3, labels=("a", "b"), sites=("s1", "s2", "s3"),
                          image_size=32, features=(8, 16, 16), secagg=SecAggConfig(max_weight=40.0),
                          dp=DPConfig(4.0, 1e-5, 1.2))  # fmt: skip
    cfg.check()
    flat = cfg.to_flat()
    assert all(isinstance(v, (bool, int, float, str)) for v in flat.values())
    assert FederatedConfig.from_flat(flat) == cfg
    with pytest.raises(ConfigError, match="at least 3 sites"):
        FederatedConfig(model="small-cnn", rounds=1, labels=("a",), sites=("s1", "s2"), image_size=32,
                        features=(8, 16, 16)).check()  # fmt: skip
    with pytest.raises(ConfigError, match="norm='group'"):
        FederatedConfig(model="small-cnn", rounds=1, labels=("a",), sites=("s1", "s2", "s3"), image_size=32,
                        features=(8, 16, 16), norm="batch", dp=DPConfig(4.0, 1e-5, 1.0)).check()  # fmt: skip
    with pytest.raises(ConfigError, match="multiple of 32"):
        FederatedConfig(model="resnet18", rounds=1, labels=("a",), sites=("s1", "s2", "s3"), image_size=48).check()


def _spend_run(state, run_name: str, dp: DPConfig, total: SiteBudget, rounds: int) -> PrivacyLedger:
    """Open ``run_name`` and record ``rounds`` rounds at its calibrated schedule."""
    ledger = _open(state, run_name=run_name, dp=dp, total=total, n_train=N_TRAIN, batch_size=BATCH,
                   local_epochs=EPOCHS, rounds=rounds)  # fmt: skip
    for r in range(1, rounds + 1):
        ledger.check_next_round()
        ledger.record(r, [(ledger.noise_multiplier, ledger.sample_rate, ledger.steps_per_round)])
    return ledger


def test_a_server_renaming_the_run_does_not_reset_the_sites_spent_budget(tmp_path):
    """Prepare: a site with total budget epsilon 3 trains a 2-round run at epsilon 3. Execute:
    the server comes back with the same run under another name. Assert: same ledger file,
    the old rounds count, and the renamed run is refused before its first round."""
    dp, total = DPConfig(3.0, 1e-3, 1.0), SiteBudget(3.0, 1e-3)
    first = _spend_run(tmp_path, "study-run-1", dp, total, rounds=2)
    spent = first.total_spent()
    assert 2.5 < spent <= 3.0

    renamed = _open(tmp_path, run_name="study-run-2", dp=dp, total=total, n_train=N_TRAIN,
                    batch_size=BATCH, local_epochs=EPOCHS, rounds=2)  # fmt: skip
    assert renamed.path == first.path and list(tmp_path.iterdir()) == [first.path]
    assert renamed.history() == [] and len(renamed.total_history()) == 2
    assert renamed.total_spent() == pytest.approx(spent, rel=1e-12)
    with pytest.raises(PrivacyBudgetExhausted, match=r"total privacy budget of this data set exhausted: spent epsilon 2\.\d+ of 3 .* over 2 rounds of 1 runs; .* refusing to train"):
        renamed.check_next_round()
    # oracle: Opacus' epsilon of the 2 recorded rounds + the refused one exceeds the total
    step = (renamed.noise_multiplier, renamed.sample_rate, renamed.steps_per_round)
    assert epsilon_of(first.total_history() + [step], total.delta) > total.epsilon


def test_total_budget_spans_runs_and_another_data_set_has_its_own_ledger(tmp_path):
    dp, total = DPConfig(2.0, 1e-3, 1.0), SiteBudget(3.0, 1e-3)
    _spend_run(tmp_path, "a1", dp, total, rounds=1)
    _spend_run(tmp_path, "a2", dp, total, rounds=1)  # 2 rounds at epsilon 2 each compose to 2.73 < 3 (RDP)
    with pytest.raises(PrivacyBudgetExhausted, match="total privacy budget"):
        _spend_run(tmp_path, "a3", dp, total, rounds=1)
    other = PrivacyLedger.open(tmp_path, site="a", dataset="1" * 64, total=total, run_name="a3", dp=dp,
                               n_train=N_TRAIN, batch_size=BATCH, local_epochs=EPOCHS, rounds=1)  # fmt: skip
    assert other.path != ledger_path(tmp_path, "a", DATASET) and other.total_history() == []
    assert other.check_next_round() <= dp.epsilon


@pytest.mark.parametrize("name", ["../x", "..", "/etc/x", "a/b", "", ".hidden", "a b", "x" * 65, "run\n"])
def test_unsafe_run_names_are_refused_before_anything_is_written(tmp_path, name):
    from privmed.federated.config import check_run_name

    state = tmp_path / "state"
    with pytest.raises(ConfigError, match=r"run name .*: expected 1-64 characters"):
        _open(state, run_name=name, dp=DPConfig(2.0, 1e-3, 1.0), n_train=N_TRAIN, batch_size=BATCH,
              local_epochs=EPOCHS, rounds=1)  # fmt: skip
    assert list(tmp_path.iterdir()) == []
    cfg = FederatedConfig(model="small-cnn", rounds=1, labels=("a",), sites=("s1", "s2", "s3"),
                          image_size=32, features=(8, 16, 16), run_name=name)  # fmt: skip
    with pytest.raises(ConfigError, match="run name"):
        FederatedConfig.from_flat(cfg.to_flat(), source="server instructions").check()
    assert check_run_name("study-1.a_b") == "study-1.a_b"


def test_dataset_fingerprint_ignores_order_and_split_but_not_the_images():
    from privmed.federated.sitedata import dataset_fingerprint

    base = dataset_fingerprint("a", ["img1", "img2"])
    assert dataset_fingerprint("a", ["img2", "img1"]) == base
    assert dataset_fingerprint("a", ["img1", "img2", "img3"]) != base
    assert dataset_fingerprint("b", ["img1", "img2"]) != base
    assert dataset_fingerprint("a", ["img1img2"]) != dataset_fingerprint("a", ["img1", "img2"])
