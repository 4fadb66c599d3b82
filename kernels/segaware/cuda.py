"""Numba-CUDA kernels of the segaware primitives.

Import this module only when a CUDA tensor arrives (``numba.cuda`` is heavy and may be
absent); :mod:`.ops` does so through :func:`pacnet.kernels.runtime.cuda_module`.  These
primitives have no contraction (they are memory-bound gathers), so they run one thread per
output element (forward) or per input element (backward gathers, no atomics, deterministic),
launched on torch's current stream with the tensors' device current; outputs come from
torch's caching allocator.  Under ``NUMBA_ENABLE_CUDASIM=1`` (tests) the launchers take CPU
tensors and pass NumPy views (the simulator cannot take torch tensors).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numba import config as _numba_config
from numba import cuda

from pacnet.kernels import runtime
from pacnet.kernels.runtime import as_array, on_device

SIMULATOR = bool(_numba_config.ENABLE_CUDASIM)

if not SIMULATOR and getattr(cuda, "implementation", None) != "NVIDIA":  # pragma: no cover
    # Without numba-cuda's import hook (e.g. ``python -S``) numba falls back to its
    # deprecated built-in CUDA target without a word; refuse instead.
    raise ImportError("pacnet's CUDA kernels need the 'numba-cuda' package "
                      "(pip install 'numba-cuda[cu12]'); numba.cuda is the deprecated built-in target")

THREADS = 256


@cuda.jit(device=True, inline=True)
def _sign_or_value(d, norm, zero, one):
    if norm == 1:
        if d > zero:
            return one
        if d < zero:
            return -one
        return zero
    return d


# ----------------------------------------------------------------------------- kernels

@cuda.jit(cache=True)
def _im2dist_fwd(E, out, kh, kw, ph, pw, sh, sw, dh, dw, norm, remove_center, remove_bounds,
                 zero, half, big):
    idx = cuda.grid(1)
    N, C, H, W = E.shape
    K = out.shape[1]
    Ho = out.shape[2]
    Wo = out.shape[3]
    if idx >= N * K * Ho * Wo:
        return
    x = idx % Wo
    t = idx // Wo
    y = t % Ho
    t = t // Ho
    o = t % K
    n = t // K
    ci = kh // 2
    cj = kw // 2
    i = o // kw
    j = o % kw
    cy = y * sh - ph + ci * dh
    cx = x * sw - pw + cj * dw
    ny = y * sh - ph + i * dh
    nx = x * sw - pw + j * dw
    v = zero
    if cy >= 0 and cy < H and cx >= 0 and cx < W:
        if remove_center and o == ci * kw + cj:
            v = big
        elif ny >= 0 and ny < H and nx >= 0 and nx < W:
            for c in range(C):
                d = E[n, c, cy, cx] - E[n, c, ny, nx]
                if norm == 1:
                    v += abs(d)
                else:
                    v += half * d * d
        elif remove_bounds:
            v = big
    out[n, o, y, x] = v


@cuda.jit(cache=True)
def _im2dist_bwd(G, E, gE, kh, kw, ph, pw, sh, sw, dh, dw, norm, zero, one):
    idx = cuda.grid(1)
    N, C, H, W = E.shape
    K = G.shape[1]
    Ho = G.shape[2]
    Wo = G.shape[3]
    if idx >= N * C * H * W:
        return
    px = idx % W
    t = idx // W
    py = t % H
    t = t // H
    c = t % C
    n = t // C
    ci = kh // 2
    cj = kw // 2
    ctr = ci * kw + cj
    ep = E[n, c, py, px]
    acc = zero
    # (a) p is the centre of output (y, x).
    ty = py + ph - ci * dh
    tx = px + pw - cj * dw
    if ty >= 0 and tx >= 0 and ty % sh == 0 and tx % sw == 0 and ty // sh < Ho and tx // sw < Wo:
        y = ty // sh
        x = tx // sw
        for o in range(K):
            if o != ctr:
                ny = py + (o // kw - ci) * dh
                nx = px + (o % kw - cj) * dw
                if ny >= 0 and ny < H and nx >= 0 and nx < W:
                    acc += _sign_or_value(ep - E[n, c, ny, nx], norm, zero, one) * G[n, o, y, x]
    # (b) p is the neighbour of tap o at output (y, x).
    for o in range(K):
        if o != ctr:
            i = o // kw
            j = o % kw
            ty = py + ph - i * dh
            tx = px + pw - j * dw
            if ty >= 0 and tx >= 0 and ty % sh == 0 and tx % sw == 0:
                y = ty // sh
                x = tx // sw
                cy = py + (ci - i) * dh
                cx = px + (cj - j) * dw
                if y < Ho and x < Wo and cy >= 0 and cy < H and cx >= 0 and cx < W:
                    acc -= _sign_or_value(E[n, c, cy, cx] - ep, norm, zero, one) * G[n, o, y, x]
    gE[n, c, py, px] = acc


@cuda.jit(cache=True)
def _im2parity_fwd(Lab, out, kh, kw, ph, pw, sh, sw, dh, dw, has_ignore, ignore_label,
                   outside, one, zero):
    idx = cuda.grid(1)
    N = Lab.shape[0]
    H = Lab.shape[2]
    W = Lab.shape[3]
    K = out.shape[1]
    Ho = out.shape[2]
    Wo = out.shape[3]
    if idx >= N * K * Ho * Wo:
        return
    x = idx % Wo
    t = idx // Wo
    y = t % Ho
    t = t // Ho
    o = t % K
    n = t // K
    cy = y * sh - ph + (kh // 2) * dh
    cx = x * sw - pw + (kw // 2) * dw
    ny = y * sh - ph + (o // kw) * dh
    nx = x * sw - pw + (o % kw) * dw
    if cy < 0 or cy >= H or cx < 0 or cx >= W:
        out[n, o, y, x] = outside
        return
    lc = Lab[n, 0, cy, cx]
    ln = 0
    if ny >= 0 and ny < H and nx >= 0 and nx < W:
        ln = Lab[n, 0, ny, nx]
    if has_ignore and (ln == ignore_label or lc == ignore_label):
        out[n, o, y, x] = one * ignore_label
    elif ln == lc:
        out[n, o, y, x] = one
    else:
        out[n, o, y, x] = zero


@cuda.jit(cache=True)
def _lws_fwd(X, Wt, out, kh, kw, ph, pw, sh, sw, dh, dw, zero):
    idx = cuda.grid(1)
    N, C, H, W = X.shape
    K = Wt.shape[1]
    Ho = out.shape[2]
    Wo = out.shape[3]
    if idx >= N * C * Ho * Wo:
        return
    x = idx % Wo
    t = idx // Wo
    y = t % Ho
    t = t // Ho
    c = t % C
    n = t // C
    acc = zero
    for o in range(K):
        ny = y * sh - ph + (o // kw) * dh
        nx = x * sw - pw + (o % kw) * dw
        if ny >= 0 and ny < H and nx >= 0 and nx < W:
            acc += Wt[n, o, y, x] * X[n, c, ny, nx]
    out[n, c, y, x] = acc


@cuda.jit(cache=True)
def _lws_bwd_w(G, X, gW, kh, kw, ph, pw, sh, sw, dh, dw, zero):
    idx = cuda.grid(1)
    N, C, H, W = X.shape
    K = gW.shape[1]
    Ho = gW.shape[2]
    Wo = gW.shape[3]
    if idx >= N * K * Ho * Wo:
        return
    x = idx % Wo
    t = idx // Wo
    y = t % Ho
    t = t // Ho
    o = t % K
    n = t // K
    ny = y * sh - ph + (o // kw) * dh
    nx = x * sw - pw + (o % kw) * dw
    acc = zero
    if ny >= 0 and ny < H and nx >= 0 and nx < W:
        for c in range(C):
            acc += G[n, c, y, x] * X[n, c, ny, nx]
    gW[n, o, y, x] = acc


@cuda.jit(cache=True)
def _lws_bwd_x(G, Wt, gX, kh, kw, ph, pw, sh, sw, dh, dw, zero):
    idx = cuda.grid(1)
    N, C, H, W = gX.shape
    K = Wt.shape[1]
    Ho = Wt.shape[2]
    Wo = Wt.shape[3]
    if idx >= N * C * H * W:
        return
    px = idx % W
    t = idx // W
    py = t % H
    t = t // H
    c = t % C
    n = t // C
    acc = zero
    for o in range(K):
        ty = py + ph - (o // kw) * dh
        tx = px + pw - (o % kw) * dw
        if ty >= 0 and tx >= 0 and ty % sh == 0 and tx % sw == 0:
            y = ty // sh
            x = tx // sw
            if y < Ho and x < Wo:
                acc += Wt[n, o, y, x] * G[n, c, y, x]
    gX[n, c, py, px] = acc


# ----------------------------------------------------------------------------- launchers
# Each launcher takes contiguous tensors in the compute dtype (:mod:`.ops` prepares them) and
# runs with their device current, on torch's current stream (pacnet.kernels.runtime).

def _scalars(dtype: torch.dtype, *values: float):
    np_type = np.float32 if dtype == torch.float32 else np.float64
    return tuple(np_type(v) for v in values)


def _launch(kernel, total: int, device: torch.device, *args) -> None:
    runtime.launch(kernel, math.ceil(total / THREADS), THREADS, device, *args)


@on_device
def im2dist_forward(emb, out, kernel, pad, stride, dilation, norm, remove_center,
                    remove_bounds, big):
    zero, half, big = _scalars(emb.dtype, 0.0, 0.5, big)
    _launch(_im2dist_fwd, out.numel(), emb.device, as_array(emb), as_array(out), *kernel,
            *pad, *stride, *dilation, int(norm), bool(remove_center), bool(remove_bounds), zero,
            half, big)


@on_device
def im2dist_backward(grad, emb, gE, kernel, pad, stride, dilation, norm):
    zero, one = _scalars(emb.dtype, 0.0, 1.0)
    _launch(_im2dist_bwd, gE.numel(), emb.device, as_array(grad), as_array(emb), as_array(gE),
            *kernel, *pad, *stride, *dilation, int(norm), zero, one)


@on_device
def im2parity_forward(labels_i32, out, kernel, pad, stride, dilation, has_ignore,
                      ignore_label, outside):
    outside, one, zero = _scalars(out.dtype, outside, 1.0, 0.0)
    _launch(_im2parity_fwd, out.numel(), out.device, as_array(labels_i32), as_array(out),
            *kernel, *pad, *stride, *dilation, bool(has_ignore), int(ignore_label), outside, one,
            zero)


@on_device
def local_weighted_sum_forward(x, weights, out, kernel, pad, stride, dilation):
    (zero,) = _scalars(x.dtype, 0.0)
    _launch(_lws_fwd, out.numel(), x.device, as_array(x), as_array(weights), as_array(out),
            *kernel, *pad, *stride, *dilation, zero)


@on_device
def local_weighted_sum_backward(grad, x, weights, gx, gw, kernel, pad, stride, dilation):
    (zero,) = _scalars(x.dtype, 0.0)
    _launch(_lws_bwd_x, gx.numel(), x.device, as_array(grad), as_array(weights), as_array(gx),
            *kernel, *pad, *stride, *dilation, zero)
    _launch(_lws_bwd_w, gw.numel(), x.device, as_array(grad), as_array(x), as_array(gw),
            *kernel, *pad, *stride, *dilation, zero)
