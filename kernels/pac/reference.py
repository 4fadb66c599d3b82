"""Plain-torch PAC primitives: the oracle every fused backend is tested against.

Written with ``F.unfold`` and broadcasting so that autograd provides the backward.  They
materialise ``[b, C*kh*kw, oh*ow]`` column tensors, so they are memory hungry by design;
use them for checking, not for training large images.

Notation (shared with :mod:`pacnet.kernels.pac.ops`): an output pixel ``o`` reads input
position ``pos(o, t) = o*s - p + t*d`` for tap ``t``; positions outside the image read 0.
All sizes follow the ``nn.Conv2d`` rule ``(H + 2p - d(k-1) - 1) // s + 1``.  Arguments are
assumed valid (the public wrappers in ``ops.py`` check them).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

Pair = Sequence[int]


def out_size(hw: Sequence[int], kernel_size: Pair, stride: Pair, padding: Pair,
             dilation: Pair) -> tuple:
    """Output ``(oh, ow)`` of a Conv2d-style window over an ``(H, W)`` input."""
    return tuple((hw[i] + 2 * padding[i] - dilation[i] * (kernel_size[i] - 1) - 1) // stride[i] + 1
                 for i in range(2))


def _cols(t: torch.Tensor, kernel_size: Pair, stride: Pair, padding: Pair,
          dilation: Pair) -> torch.Tensor:
    """``t`` [b, C, H, W] -> taps [b, C, kh, kw, oh, ow] (zero padding)."""
    b, c = t.shape[:2]
    oh, ow = out_size(t.shape[-2:], kernel_size, stride, padding, dilation)
    cols = F.unfold(t, tuple(kernel_size), dilation=tuple(dilation), padding=tuple(padding),
                    stride=tuple(stride))
    return cols.view(b, c, kernel_size[0], kernel_size[1], oh, ow)


def pac_dist(guide: torch.Tensor, center: Optional[torch.Tensor], kernel_size: Pair,
             stride: Pair, padding: Pair, dilation: Pair, asym: bool = False,
             channel_wise: bool = False) -> torch.Tensor:
    """Squared guide differences ``[b, 1 | Cg, kh, kw, oh, ow]`` (see ``ops.pac_dist``)."""
    cols = _cols(guide, kernel_size, stride, padding, dilation)
    if center is None:
        center = cols[:, :, kernel_size[0] // 2, kernel_size[1] // 2]
    diff = cols - center[:, :, None, None]
    if asym:
        diff = torch.relu(diff)
    sq = diff * diff
    return sq if channel_wise else sq.sum(dim=1, keepdim=True)


def pac_conv2d(x: torch.Tensor, K: torch.Tensor, weight: torch.Tensor,
               bias: Optional[torch.Tensor], stride: Pair, padding: Pair, dilation: Pair,
               shared_filters: bool = False) -> torch.Tensor:
    """Pixel-adaptive cross-correlation ``[b, C, H, W] -> [b, O, oh, ow]`` (``ops.pac_conv2d``)."""
    kh, kw = weight.shape[-2:]
    b, c = x.shape[:2]
    cols = _cols(x, (kh, kw), stride, padding, dilation)
    oh, ow = cols.shape[-2:]
    prod = (cols * K).reshape(b, c, kh * kw, oh * ow)
    if shared_filters:
        out = torch.einsum("bctl,t->bcl", prod, weight.reshape(kh * kw))
    else:
        out = torch.einsum("bctl,oct->bol", prod, weight.reshape(weight.shape[0], c, kh * kw))
    out = out.reshape(b, -1, oh, ow)
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    return out


def pac_pool2d(x: torch.Tensor, K: torch.Tensor, kernel_size: Pair, stride: Pair,
               padding: Pair, dilation: Pair) -> torch.Tensor:
    """Pixel-adaptive weighted sum ``[b, C, H, W] -> [b, C, oh, ow]`` (see ``ops.pac_pool2d``)."""
    cols = _cols(x, kernel_size, stride, padding, dilation)
    return (cols * K).sum(dim=(2, 3))
