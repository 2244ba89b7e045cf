"""Frozen public feature extractors and parts for DP training.

``Scattering2D``: the 2D scattering transform of Mallat (2012) / Bruna & Mallat (2013),
``S = [x, |x * psi_{j1,t1}|, ||x * psi_{j1,t1}| * psi_{j2,t2}|] * phi_J`` subsampled by
``2^J``, with kymatio's Morlet filter bank (``kymatio.scattering2d.filter_bank``, computed
once from J, L: no data enters it). This is the handcrafted front end of Tramer & Boneh
(ICLR 2021, "Differentially private learning needs better features"): DP-SGD then trains
only a small head on top, so the noise is spread over ~10^4 instead of all parameters.
kymatio computes the same transform with FFTs (``view_as_complex``), which ONNX cannot
express; here every filter is a real convolution kernel (the centred, cropped inverse FFT
of kymatio's Fourier-domain filter) and the modulus is ``sqrt(re^2 + im^2)``, so the
extractor exports to ONNX with the head. Boundaries: reflection padding at full
resolution (kymatio subsamples between layers and pads once), so values near the edge
differ from kymatio's; ``tests/unit/test_models_scatter.py`` bounds the difference.

``WSConv2d``: a convolution with weight standardisation (Qiao et al. 2019; used with
GroupNorm for DP-SGD by De et al. 2022): the kernel of each output channel is centred and
scaled to unit variance in the forward pass, which keeps activations well scaled when
DP noise perturbs the raw weights.

``ScatterHead``: the DP-trained part on top of the 81 scattering channels (J=2, L=8).
"""

from __future__ import annotations

import math
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "ScatterHead",
    "Scattering2D",
    "WSConv2d",
    "fold_weight_standardization",
    "register_opacus_grad_sampler",
    "scattering_channels",
]

# kymatio's filters are built on this grid; the Morlet supports used here (J <= 3) are far
# smaller, so cropping the spatial kernels loses less than 1e-4 of their energy.
_FILTER_GRID = 64


def scattering_channels(J: int, L: int) -> int:
    """Channels of an order-2 scattering: 1 + J L + L^2 J (J - 1) / 2."""
    return 1 + J * L + L * L * J * (J - 1) // 2


def _spatial_kernel(filter_hat: np.ndarray, size: int) -> np.ndarray:
    """Complex spatial kernel of a Fourier-domain filter, centred, cropped to size x size and
    flipped (torch's conv2d is a correlation; the transform needs a convolution)."""
    kernel = np.fft.fftshift(np.fft.ifft2(filter_hat))
    c, h = _FILTER_GRID // 2, size // 2
    return kernel[c - h : c + h + 1, c - h : c + h + 1][::-1, ::-1].copy()


class Scattering2D(nn.Module):
    """Order-2 scattering of (N, 1, H, W) images -> (N, C, H / 2^J, W / 2^J), frozen.

    Channel order as kymatio: order 0; order 1 by (j1, theta1); order 2 by (j1, theta1, j2,
    theta2) with j2 > j1. H and W must be multiples of 2^J. No trainable parameters.
    """

    def __init__(self, J: int = 2, L: int = 8, psi_size: int = 13) -> None:
        super().__init__()
        from kymatio.scattering2d.filter_bank import filter_bank

        if J < 1 or L < 1 or psi_size % 2 == 0:
            raise ValueError(f"scattering: expected J, L >= 1 and an odd kernel size, got {J}, {L}, {psi_size}")
        self.J, self.L = J, L
        bank = filter_bank(_FILTER_GRID, _FILTER_GRID, J, L)
        phi_size = 2 * math.ceil(3 * 0.8 * 2**J) + 1  # +-3 sigma of the low pass
        self.psi_pad, self.phi_pad = psi_size // 2, phi_size // 2
        kernels = [(int(p["j"]), _spatial_kernel(p["levels"][0], psi_size)) for p in bank["psi"]]
        scales = [j for j, _ in kernels]

        def conv_weight(which: list[int], copies: int) -> torch.Tensor:
            # [re, im] of every psi in ``which``, repeated for ``copies`` grouped input channels
            one = np.stack([part for n in which for part in (kernels[n][1].real, kernels[n][1].imag)])
            return torch.as_tensor(np.tile(one, (copies, 1, 1))[:, None], dtype=torch.float32)

        self.register_buffer("order1_weight", conv_weight(list(range(len(kernels))), 1))
        # order 2 from the order-1 channels of scale j1 (positions ``first``) to every later scale
        self.order2: list[tuple[int, int]] = []  # (offset of the j1 channels in order 1, count)
        for j1 in range(J - 1):
            first = [n for n, j in enumerate(scales) if j == j1]
            later = [n for n, j in enumerate(scales) if j > j1]
            self.register_buffer(f"order2_weight_{j1}", conv_weight(later, len(first)))
            self.order2.append((first[0], len(first)))
        self.out_channels = scattering_channels(J, L)
        phi = _spatial_kernel(bank["phi"]["levels"][0], phi_size).real
        self.register_buffer(
            "phi_weight", torch.as_tensor(np.tile(phi[None, None], (self.out_channels, 1, 1, 1)), dtype=torch.float32)
        )

    def _modulus_conv(self, u: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """|u_c * psi| for every input channel c and psi of ``weight`` ([re, im] pairs, c-major)."""
        padded = F.pad(u, (self.psi_pad,) * 4, mode="reflect")
        z = F.conv2d(padded, weight, groups=u.shape[1])
        re, im = z[:, 0::2], z[:, 1::2]
        return torch.sqrt(re * re + im * im)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 1 or x.shape[2] % 2**self.J or x.shape[3] % 2**self.J:
            raise ValueError(f"scattering: expected (N, 1, H, W) with H, W multiples of {2**self.J}, got {tuple(x.shape)}")
        order1 = self._modulus_conv(x, cast(torch.Tensor, self.order1_weight))
        parts = [x, order1]
        for j1, (offset, count) in enumerate(self.order2):
            weight = cast(torch.Tensor, getattr(self, f"order2_weight_{j1}"))
            parts.append(self._modulus_conv(order1[:, offset : offset + count], weight))
        u = torch.cat(parts, dim=1)
        padded = F.pad(u, (self.phi_pad,) * 4, mode="reflect")
        return F.conv2d(padded, cast(torch.Tensor, self.phi_weight), stride=2**self.J, groups=self.out_channels)


class WSConv2d(nn.Conv2d):
    """Conv2d with weight standardisation: each output channel's kernel minus its mean,
    divided by sqrt(its variance + 1e-5), in every forward pass (groups = dilation = 1)."""

    def standardized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(w_hat, s): the standardised kernel and each output channel's sqrt(var + 1e-5)."""
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        scale = torch.sqrt(w.var(dim=(1, 2, 3), keepdim=True, unbiased=False) + 1e-5)
        return (w - mean) / scale, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.groups != 1 or self.dilation != (1, 1):
            raise ValueError("WSConv2d: only groups=1, dilation=1")
        return F.conv2d(x, self.standardized()[0], self.bias, self.stride, self.padding)


def fold_weight_standardization(model: nn.Module) -> nn.Module:
    """Replace (in place) every WSConv2d by a plain Conv2d holding its standardised kernel:
    the same function, exported as one Conv instead of reductions over the weights."""
    for name, child in list(model.named_children()):
        if isinstance(child, WSConv2d):
            conv = nn.Conv2d(child.in_channels, child.out_channels, cast(Any, child.kernel_size),
                             cast(Any, child.stride), cast(Any, child.padding), bias=child.bias is not None)  # fmt: skip
            with torch.no_grad():
                conv.weight.copy_(child.standardized()[0])
                if child.bias is not None and conv.bias is not None:
                    conv.bias.copy_(child.bias)
            setattr(model, name, conv)
        else:
            fold_weight_standardization(child)
    return model


def _ws_conv_grad_sample(
    layer: WSConv2d, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[Any, torch.Tensor]:
    """Per-sample gradients of a WSConv2d for Opacus (its generic functorch path is ~5x slower).

    1. per-sample gradient g w.r.t. the standardised kernel: unfold the input and contract
       with the output gradient, as Opacus does for Conv2d;
    2. back through the standardisation (per output channel, m weights):
       dL/dw = (g - mean(g) - w_hat * mean(g * w_hat)) / s, from
       d w_hat_i / d w_j = (delta_ij - 1/m) / s - w_hat_i w_hat_j / (m s).
    """
    x = activations[0].to(backprops.dtype)
    n = x.shape[0]
    out: dict[Any, torch.Tensor] = {}
    if n == 0:
        out[layer.weight] = torch.zeros_like(layer.weight).unsqueeze(0)
        if layer.bias is not None and layer.bias.requires_grad:
            out[layer.bias] = torch.zeros_like(layer.bias).unsqueeze(0)
        return out
    cols = F.unfold(x, layer.kernel_size, padding=cast(Any, layer.padding), stride=layer.stride)  # (n, i*k*k, L)
    grads = backprops.reshape(n, layer.out_channels, -1)  # (n, o, L)
    if layer.weight.requires_grad:
        g = torch.einsum("nol,npl->nop", grads, cols)  # w.r.t. w_hat, (n, o, i*k*k)
        with torch.no_grad():
            w_hat, scale = layer.standardized()
        w_hat, scale = w_hat.reshape(1, layer.out_channels, -1), scale.reshape(1, layer.out_channels, 1)
        dw = (g - g.mean(dim=2, keepdim=True) - w_hat * (g * w_hat).mean(dim=2, keepdim=True)) / scale
        out[layer.weight] = dw.reshape(n, *layer.weight.shape)
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = grads.sum(dim=2)
    return out


def register_opacus_grad_sampler() -> None:
    """Register ``_ws_conv_grad_sample`` for WSConv2d with Opacus (idempotent)."""
    from opacus.grad_sample.utils import register_grad_sampler

    register_grad_sampler(WSConv2d)(_ws_conv_grad_sample)


class ScatterHead(nn.Module):
    """The DP-trained head on scattering features (N, C, h, w) -> (N, outputs) logits.

    GroupNorm without parameters on the frozen features (a per-image, data-independent
    normalisation, as Tramer & Boneh), a 3x3 convolution (weight-standardised by default)
    with GroupNorm and ReLU, an average pool to 2x2 and a linear layer ``head``. ``side`` is
    the features' spatial side (image side / 4), even; the pool is a fixed AvgPool so that
    the ONNX graph has static shapes.
    """

    def __init__(
        self, in_channels: int, outputs: int, side: int, width: int = 16, standardize: bool = True
    ) -> None:
        super().__init__()
        if side < 2 or side % 2:
            raise ValueError(f"scatter head: expected an even feature side >= 2, got {side}")
        groups = 27 if in_channels % 27 == 0 else 1
        conv = WSConv2d if standardize else nn.Conv2d
        self.features = nn.Sequential(
            nn.GroupNorm(groups, in_channels, affine=False),
            conv(in_channels, width, 3, padding=1),
            nn.GroupNorm(max(1, width // 4), width),
            nn.ReLU(),
            nn.AvgPool2d(side // 2),
            nn.Flatten(),
        )
        self.head = nn.Linear(4 * width, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
