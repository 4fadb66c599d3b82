"""Plain-torch PAC primitives: the oracle every fused backend is tested against.

Written with ``F.pad``, ``Tensor.unfold`` and broadcasting so that autograd provides the
backward, for any number ``r`` of spatial axes (1-D ``[b, C, W]``, 2-D ``[b, C, H, W]``,
3-D ``[b, C, D, H, W]``).  They materialise ``[b, C, *k, *out]`` tap tensors, so they are
memory hungry by design; use them for checking, not for training large inputs.

Notation (shared with :mod:`pacnet.kernels.pac.ops`): along each spatial axis an output
index ``o`` reads input index ``pos(o, t) = o*s - p + t*d`` for tap ``t``; indices outside
the input read 0.  All sizes follow the ``nn.ConvNd`` rule ``(n + 2p - d(k-1) - 1) // s + 1``.
Geometry arguments are sequences of ``r`` ints; arguments are assumed valid (the public
wrappers in ``ops.py`` check them).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

Ints = Sequence[int]


def out_size(sizes: Ints, kernel_size: Ints, stride: Ints, padding: Ints,
             dilation: Ints) -> tuple:
    """Output sizes of a ConvNd-style window over an input of spatial ``sizes``."""
    return tuple((sizes[i] + 2 * padding[i] - dilation[i] * (kernel_size[i] - 1) - 1)
                 // stride[i] + 1 for i in range(len(sizes)))


def taps(t: torch.Tensor, kernel_size: Ints, stride: Ints, padding: Ints,
         dilation: Ints) -> torch.Tensor:
    """``t`` ``[b, C, *sizes]`` -> its window taps ``[b, C, *k, *out]`` (zero padding)."""
    r = t.dim() - 2
    pads = [q for i in reversed(range(r)) for q in (padding[i], padding[i])]
    t = F.pad(t, pads)
    for i in range(r):  # each unfold appends one window axis: [b, C, *out, *extent]
        t = t.unfold(2 + i, dilation[i] * (kernel_size[i] - 1) + 1, stride[i])
    t = t[(slice(None),) * (2 + r) + tuple(slice(None, None, d) for d in dilation)]
    return t.permute(0, 1, *range(2 + r, 2 + 2 * r), *range(2, 2 + r))


def pac_dist(guide: torch.Tensor, center: Optional[torch.Tensor], kernel_size: Ints,
             stride: Ints, padding: Ints, dilation: Ints, asym: bool = False,
             channel_wise: bool = False) -> torch.Tensor:
    """Squared guide differences ``[b, 1 | Cg, *k, *out]`` (see ``ops.pac_dist``)."""
    r = guide.dim() - 2
    cols = taps(guide, kernel_size, stride, padding, dilation)
    if center is None:
        center = cols[(slice(None), slice(None)) + tuple(k // 2 for k in kernel_size)]
    diff = cols - center[(slice(None), slice(None)) + (None,) * r]
    if asym:
        diff = torch.relu(diff)
    sq = diff * diff
    return sq if channel_wise else sq.sum(dim=1, keepdim=True)


def pac_conv(x: torch.Tensor, K: torch.Tensor, weight: torch.Tensor,
             bias: Optional[torch.Tensor], stride: Ints, padding: Ints, dilation: Ints,
             shared_filters: bool = False) -> torch.Tensor:
    """Pixel-adaptive cross-correlation ``[b, C, *sizes] -> [b, O, *out]`` (``ops.pac_conv``)."""
    r = x.dim() - 2
    k = tuple(weight.shape[2:])
    b, c = x.shape[:2]
    cols = taps(x, k, stride, padding, dilation)
    out_sizes = cols.shape[2 + r:]
    prod = (cols * K).reshape(b, c, -1, out_sizes.numel())
    if shared_filters:
        out = torch.einsum("bctl,t->bcl", prod, weight.reshape(-1))
    else:
        out = torch.einsum("bctl,oct->bol", prod, weight.reshape(weight.shape[0], c, -1))
    out = out.reshape(b, -1, *out_sizes)
    if bias is not None:
        out = out + bias.view(1, -1, *(1,) * r)
    return out


def pac_pool(x: torch.Tensor, K: torch.Tensor, kernel_size: Ints, stride: Ints,
             padding: Ints, dilation: Ints) -> torch.Tensor:
    """Pixel-adaptive weighted sum ``[b, C, *sizes] -> [b, C, *out]`` (``ops.pac_pool``)."""
    r = x.dim() - 2
    cols = taps(x, kernel_size, stride, padding, dilation)
    return (cols * K).sum(dim=tuple(range(2, 2 + r)))
