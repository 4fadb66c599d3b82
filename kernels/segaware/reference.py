"""Plain-torch oracle of the segmentation-aware primitives (aharley/segaware semantics).

Every function here takes already-validated arguments (see :mod:`.ops` for the checks)
and is written for clarity, not memory: it unfolds its input into ``[N, C, k*k, L]``
columns.  The fused Numba backends (:mod:`.cpu`, :mod:`.cuda`) are tested against it.

Geometry arguments are ``(h, w)`` pairs.  Output size per axis is Caffe's
``floor((in + 2p - (d(k-1)+1)) / s) + 1``.  A kernel offset ``(i, j)`` is output
channel ``o = i*kw + j``.  For output location ``(y, x)``:

* neighbour pixel ``n = (y*sh - ph + i*dh, x*sw - pw + j*dw)``;
* centre pixel ``c = (y*sh - ph + (kh//2)*dh, x*sw - pw + (kw//2)*dw)`` (offset
  ``ctr = (kh//2)*kw + kw//2``; for even k this is the offset k/2, not symmetric).
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

#: The fork's "infinite distance", ``FLT_MAX/100`` evaluated in float32 (≈ 3.4028e36).
BIG = float(np.float32(np.finfo(np.float32).max) / np.float32(100))

#: ``norm`` codes, as in the fork's ``Im2distParameter.Norm`` enum.
L1 = 1
L2 = 2

#: Im2parity's value where the centre pixel lies outside the image and no ignore label is
#: set (the fork writes an uninitialised int there).  A non-zero value reads as "same
#: label" in DistLoss, whose distance there is 0, so such entries add nothing.
NO_PAIR = -1.0

Pair = Tuple[int, int]


def out_size(size: int, kernel: int, pad: int, stride: int, dilation: int) -> int:
    """Caffe's convolution output size along one axis."""
    return (size + 2 * pad - (dilation * (kernel - 1) + 1)) // stride + 1


def centre_offset(kernel: Sequence[int]) -> int:
    """Output channel of the centre tap ``(kh//2, kw//2)``."""
    return (kernel[0] // 2) * kernel[1] + kernel[1] // 2


def _unfold(x: torch.Tensor, kernel: Pair, pad: Pair, stride: Pair, dilation: Pair) -> torch.Tensor:
    return F.unfold(x, tuple(kernel), dilation=tuple(dilation), padding=tuple(pad),
                    stride=tuple(stride))


def _masks(shape: Sequence[int], kernel: Pair, pad: Pair, stride: Pair, dilation: Pair,
           device: torch.device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(valid, cvalid, is_ctr)``: neighbour inside ``[1,K,L]``, centre inside ``[1,1,L]``,
    centre offset ``[1,K,1]``."""
    H, W = int(shape[-2]), int(shape[-1])
    K = kernel[0] * kernel[1]
    ones = torch.ones(1, 1, H, W, dtype=torch.float64, device=device)
    valid = _unfold(ones, kernel, pad, stride, dilation) > 0.5            # [1, K, L]
    ctr = centre_offset(kernel)
    cvalid = valid[:, ctr:ctr + 1]                                       # [1, 1, L]
    is_ctr = (torch.arange(K, device=device) == ctr).view(1, K, 1)
    return valid, cvalid, is_ctr


def _columns(x: torch.Tensor, kernel: Pair, pad: Pair, stride: Pair, dilation: Pair) -> torch.Tensor:
    N, C = x.shape[:2]
    K = kernel[0] * kernel[1]
    return _unfold(x, kernel, pad, stride, dilation).view(N, C, K, -1)


def _out_hw(x: torch.Tensor, kernel: Pair, pad: Pair, stride: Pair, dilation: Pair) -> Pair:
    return (out_size(x.shape[-2], kernel[0], pad[0], stride[0], dilation[0]),
            out_size(x.shape[-1], kernel[1], pad[1], stride[1], dilation[1]))


# ----------------------------------------------------------------------------- Im2dist

def im2dist(emb: torch.Tensor, kernel: Pair, pad: Pair, stride: Pair, dilation: Pair,
            norm: int, remove_center: bool, remove_bounds: bool) -> torch.Tensor:
    """Local distances ``N x C x H x W -> N x k*k x Ho x Wo`` (differentiable by autograd).

    Per output ``(o, y, x)``: 0 if the centre is outside the image; else BIG if
    ``remove_center`` and ``o`` is the centre tap; else, if the neighbour is inside,
    ``sum_c |E_c(centre) - E_c(nb)|`` (L1) or ``1/2 sum_c (E_c(centre) - E_c(nb))^2`` (L2);
    else (neighbour outside) BIG if ``remove_bounds`` else 0.
    """
    N = emb.shape[0]
    Ho, Wo = _out_hw(emb, kernel, pad, stride, dilation)
    ctr = centre_offset(kernel)
    cols = _columns(emb, kernel, pad, stride, dilation)                  # [N, C, K, L]
    diff = cols[:, :, ctr:ctr + 1] - cols
    dist = diff.abs().sum(1) if norm == L1 else 0.5 * (diff * diff).sum(1)  # [N, K, L]
    valid, cvalid, is_ctr = _masks(emb.shape, kernel, pad, stride, dilation, emb.device)
    keep = valid & cvalid
    const = torch.zeros(keep.shape, dtype=emb.dtype, device=emb.device)
    if remove_center:
        keep = keep & ~is_ctr
        const = torch.where(is_ctr & cvalid, torch.full_like(const, BIG), const)
    if remove_bounds:
        const = torch.where(~valid & cvalid, torch.full_like(const, BIG), const)
    out = torch.where(keep, dist, const)
    return out.reshape(N, -1, Ho, Wo)


def im2dist_backward(grad: torch.Tensor, emb: torch.Tensor, kernel: Pair, pad: Pair,
                     stride: Pair, dilation: Pair, norm: int, remove_center: bool,
                     remove_bounds: bool) -> torch.Tensor:
    """Gradient of :func:`im2dist` w.r.t. ``emb`` (masked and constant entries give none;
    L1 uses sign(0) = 0, as the fork's GPU code)."""
    N, C, H, W = emb.shape
    K = kernel[0] * kernel[1]
    ctr = centre_offset(kernel)
    cols = _columns(emb, kernel, pad, stride, dilation)
    L = cols.shape[-1]
    valid, cvalid, is_ctr = _masks(emb.shape, kernel, pad, stride, dilation, emb.device)
    keep = valid & cvalid
    if remove_center:
        keep = keep & ~is_ctr
    g = grad.reshape(N, K, L) * keep
    diff = cols[:, :, ctr:ctr + 1] - cols
    s = torch.sign(diff) if norm == L1 else diff
    t = s * g[:, None]                                                   # [N, C, K, L]
    gcols = -t
    gcols[:, :, ctr] += t.sum(2)
    return F.fold(gcols.reshape(N, C * K, L), (H, W), tuple(kernel), dilation=tuple(dilation),
                  padding=tuple(pad), stride=tuple(stride))


# ----------------------------------------------------------------------------- Im2parity

def parity_dtype(labels: torch.Tensor) -> torch.dtype:
    """Im2parity's output dtype: the labels' own floating dtype, else the default dtype."""
    return labels.dtype if labels.is_floating_point() else torch.get_default_dtype()


def im2parity(labels: torch.Tensor, kernel: Pair, pad: Pair, stride: Pair, dilation: Pair,
              ignore_label: Optional[int]) -> torch.Tensor:
    """Same-label indicator ``N x 1 x H x W -> N x k*k x Ho x Wo``.

    Labels are compared as C ints (truncated toward zero).  With the centre inside the
    image: the neighbour's label (0 when it is outside the image) equal to the centre's
    gives 1, else 0; if ``ignore_label`` is set and either label equals it, the value is
    ``ignore_label``.  Centre outside: ``ignore_label`` if set, else :data:`NO_PAIR`.
    """
    N = labels.shape[0]
    Ho, Wo = _out_hw(labels, kernel, pad, stride, dilation)
    ctr = centre_offset(kernel)
    lab = labels.to(torch.int64).to(torch.float64)                       # C's (int) cast
    cols = _columns(lab, kernel, pad, stride, dilation)[:, 0]            # [N, K, L], pad = 0
    centre = cols[:, ctr:ctr + 1]
    par = (cols == centre).to(torch.float64)
    if ignore_label is not None:
        ig = float(ignore_label)
        par = torch.where((cols == ig) | (centre == ig), torch.full_like(par, ig), par)
    _, cvalid, _ = _masks(labels.shape, kernel, pad, stride, dilation, labels.device)
    outside = float(ignore_label) if ignore_label is not None else NO_PAIR
    par = torch.where(cvalid, par, torch.full_like(par, outside))
    return par.to(parity_dtype(labels)).reshape(N, -1, Ho, Wo)


# ----------------------------------------------------------------------------- local weighted sum

def local_weighted_sum(x: torch.Tensor, weights: torch.Tensor, kernel: Pair, pad: Pair,
                       stride: Pair, dilation: Pair) -> torch.Tensor:
    """``out[n,c,y,x] = sum_o weights[n,o,y,x] * x[n,c,nb(y,x,o)]`` (0 outside the image).

    ``N x C x H x W`` and ``N x k*k x Ho x Wo`` -> ``N x C x Ho x Wo``.  This is NormConv
    with an all-ones depthwise kernel: the message passing of NormConvMeanfield.
    """
    N, C = x.shape[:2]
    K = kernel[0] * kernel[1]
    Ho, Wo = _out_hw(x, kernel, pad, stride, dilation)
    cols = _columns(x, kernel, pad, stride, dilation)
    out = (cols * weights.reshape(N, 1, K, -1)).sum(2)
    return out.reshape(N, C, Ho, Wo)


def local_weighted_sum_backward(grad: torch.Tensor, x: torch.Tensor, weights: torch.Tensor,
                                kernel: Pair, pad: Pair, stride: Pair,
                                dilation: Pair) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(grad_x, grad_weights)`` of :func:`local_weighted_sum`."""
    N, C, H, W = x.shape
    K = kernel[0] * kernel[1]
    cols = _columns(x, kernel, pad, stride, dilation)                    # [N, C, K, L]
    L = cols.shape[-1]
    g = grad.reshape(N, C, 1, L)
    grad_w = (g * cols).sum(1).reshape(weights.shape)
    gcols = (g * weights.reshape(N, 1, K, L)).reshape(N, C * K, L)
    grad_x = F.fold(gcols, (H, W), tuple(kernel), dilation=tuple(dilation), padding=tuple(pad),
                    stride=tuple(stride))
    return grad_x, grad_w
