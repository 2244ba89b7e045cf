"""The scatter recipe as an attack target: frozen public scattering + the recipe's own head."""

from __future__ import annotations

import numpy as np
import torch

from privmed.attacks.experiment import AttackPlan, build_global_model
from privmed.attacks.updates import SiteProtocol, site_update, trainable_names


def _recipe_head(image_size: int, outputs: int):
    from privmed.federated.baselines import initial_model
    from privmed.federated.config import FederatedConfig

    config = FederatedConfig(
        model="small-cnn", rounds=1, labels=tuple("abcd"[:outputs]), sites=("s1", "s2"),
        image_size=image_size, recipe="scatter", secagg=None,
    )  # fmt: skip
    return initial_model(config)


def test_scatter_target_update_is_the_recipe_heads_update_on_its_features():
    # Prepare: 2 images of 16x16 (the recipe needs a multiple of 8), 4 findings.
    from privmed.federated.arrays import get_arrays
    from privmed.federated.local import LocalTraining, client_update

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 1, 16, 16)).astype(np.float32)
    y = np.array([[1, 0, 1, 0], [0, 0, 1, 1]], dtype=np.float32)
    target = build_global_model(AttackPlan(model="scatter", image_size=16), 4)
    head = _recipe_head(16, 4)
    protocol = SiteProtocol(local_steps=1, lr=0.5)
    # Execute: what the attacked site sends, and the recipe's update (head on cached features).
    sent = site_update(target, x, y, protocol, noise_seed=0)
    with torch.no_grad():  # the recipe's features, from the extractor feature_extractor built
        features = target[0](torch.from_numpy(x)).numpy()
    oracle = client_update(head, get_arrays(head), features, y, LocalTraining(1, 2, 0.5), data_seed=0).delta
    # Assert: only the head travels, with the head's names, shapes and (1e-5) values.
    head_names = [n for n, _ in head.named_parameters()]
    assert trainable_names(target) == [f"1.{n}" for n in head_names]
    assert [tuple(u.shape) for u in sent] == [tuple(p.shape) for p in head.parameters()]
    for a, b in zip(sent, oracle, strict=True):
        assert torch.allclose(a, torch.from_numpy(b), rtol=1e-4, atol=1e-5)
