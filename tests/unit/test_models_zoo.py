"""Zoo networks: names, output shapes, normalisation choices."""

from __future__ import annotations

import pytest
import torch

from privmed.errors import InputError
from privmed.models.zoo import MODEL_NAMES, build_model

# (name, spatial_dims, input side): the smallest sides each network accepts, to stay fast.
CASES = [
    ("small-cnn", 2, 64),
    ("small-cnn", 3, 64),
    ("resnet18", 2, 32),
    ("densenet121", 2, 32),
    ("unet2d", 2, 32),
    ("unet3d", 3, 16),
]


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.mark.parametrize(("name", "dims", "side"), CASES)
def test_forward_shape(name: str, dims: int, side: int) -> None:
    torch.manual_seed(0)
    model = build_model(name, 2, 3, spatial_dims=dims).eval()
    x = torch.randn((2, 2) + (side,) * dims)

    with torch.no_grad():
        y = model(x)

    if name.startswith("unet"):
        assert y.shape == (2, 3) + (side,) * dims
    else:
        assert y.shape == (2, 3)
    assert torch.isfinite(y).all()


def test_unet_name_fixes_dimensionality() -> None:
    conv3d = [m for m in build_model("unet3d", 1, 2).modules() if isinstance(m, torch.nn.Conv3d)]
    conv2d = [
        m
        for m in build_model("unet2d", 1, 2, spatial_dims=3).modules()
        if isinstance(m, torch.nn.Conv3d)
    ]
    assert conv3d and not conv2d


def test_unknown_name_lists_known_names() -> None:
    with pytest.raises(InputError) as info:
        build_model("vgg16", 1, 2)
    message = str(info.value)
    assert "vgg16" in message
    for name in MODEL_NAMES:
        assert name in message


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"norm": "layer"}, "unknown norm"),
        ({"spatial_dims": 1}, "spatial_dims"),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], fragment: str) -> None:
    with pytest.raises(InputError, match=fragment):
        build_model("small-cnn", 1, 2, **kwargs)  # type: ignore[arg-type]


def test_densenet_refuses_no_norm() -> None:
    with pytest.raises(InputError, match="densenet121"):
        build_model("densenet121", 1, 2, norm="none")


@pytest.mark.parametrize("name", ["small-cnn", "resnet18", "densenet121", "unet2d"])
def test_group_norm_models_pass_opacus_validator(name: str) -> None:
    """Opacus (the DP-SGD oracle) rejects BatchNorm; norm="group" must satisfy it."""
    from opacus.validators import ModuleValidator

    batch_errors = ModuleValidator.validate(build_model(name, 1, 2), strict=False)
    group_errors = ModuleValidator.validate(build_model(name, 1, 2, norm="group"), strict=False)

    assert batch_errors  # the validator does catch BatchNorm, so the check below can fail
    assert group_errors == []


def test_small_cnn_features_override() -> None:
    model = build_model("small-cnn", 1, 4, features=(4, 8, 8))
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]

    assert [c.out_channels for c in convs] == [4, 8, 8]
    assert model(torch.zeros(1, 1, 32, 32)).shape == (1, 4)
