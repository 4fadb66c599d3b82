"""PAC kernels for CUDA, written with ``numba.cuda`` (the NVIDIA ``numba-cuda`` package).

Importing this module imports ``numba.cuda``; :mod:`pacnet.kernels.pac.ops` does so only when
a CUDA tensor reaches a PAC op.  Every kernel is a gather (no atomics, deterministic):

* ``pac_dist``: one thread per output pixel computes all its ``kh*kw`` distances, centre
  features read once per tap and channel; the backward is one thread per output pixel for the
  centre gradient, then one thread per input pixel gathering the taps that read it.
* ``pac_conv2d``: one thread per output pixel and group of ``_OB`` output channels, so each
  ``K * x`` product is loaded once and used ``_OB`` times.  Backward: input gradient one thread
  per input pixel (gather over taps and output channels), K gradient one thread per (tap,
  output pixel), weight gradient one block per weight element reducing over batch and pixels
  (per-thread partial sums, then a tree in shared memory).
* ``pac_pool2d`` (and the shared-filter, depthwise ``pac_conv2d``): one thread per output
  element; backward gathers like the convolution.

These are the straightforward "one thread per output element" kernels: memory stays
input/output sized, but they do not use shared-memory tiles or tensor cores (see
``shared/specs/kernels.md`` §C.3/C.5 for what a faster version needs).

Launches go on torch's current stream for the tensors' device; outputs are allocated with
``torch.empty`` (torch's caching allocator).  Tensors are handed over with
``cuda.as_cuda_array(t, sync=False)``.  Under the simulator (``NUMBA_ENABLE_CUDASIM=1``, set
before numba is imported) the functions take CPU tensors and pass ``.numpy()`` views, which is
how the test suite checks these kernels without a GPU.  float16/bfloat16 inputs are computed
in float32 and cast back; accumulators have the compute dtype (float32 or float64).
"""

from __future__ import annotations

import functools
import warnings
from typing import Dict

import numba
import numpy as np
import torch
from numba import cuda

from .tensors import prep

_SIM = bool(numba.config.ENABLE_CUDASIM)
# Threads per block (a power of two: also the size of the weight-gradient reduction tree).
# The simulator runs one Python thread per CUDA thread, so it gets small blocks.
_TPB = 32 if _SIM else 128
_OB = 4  # output channels per thread in the convolution forward

if not _SIM and getattr(cuda, "implementation", None) != "NVIDIA":  # pragma: no cover
    warnings.warn("numba.cuda is numba's deprecated built-in CUDA target; install the NVIDIA "
                  "'numba-cuda' package (pip install 'numba-cuda[cu12]') for the PAC kernels",
                  RuntimeWarning, stacklevel=2)


# ----------------------------------------------------------------------------- device helpers

@cuda.jit(device=True, inline=True)
def _src(o, t, s, p, d, n):
    """Input index read by output index ``o`` at tap ``t``, or -1 outside the image."""
    i = o * s - p + t * d
    if i < 0 or i >= n:
        return -1
    return i


@cuda.jit(device=True, inline=True)
def _dst(i, t, s, p, d, n_out):
    """Output index whose tap ``t`` reads input index ``i``, or -1 if there is none."""
    q = i + p - t * d
    if q < 0 or q % s != 0:
        return -1
    o = q // s
    if o >= n_out:
        return -1
    return o


# ----------------------------------------------------------------------------- pac_dist

@cuda.jit(cache=True)
def _dist_fwd(f, ctr, has_ctr, kh, kw, sh, sw, ph, pw, dh, dw, asym, cw, zero, D):
    B, Cg, H, W = f.shape
    oh = D.shape[4]
    ow = D.shape[5]
    i = cuda.grid(1)
    if i >= B * oh * ow:
        return
    xo = i % ow
    y = (i // ow) % oh
    b = i // (ow * oh)
    cyi = _src(y, kh // 2, sh, ph, dh, H)
    cxi = _src(xo, kw // 2, sw, pw, dw, W)
    for ty in range(kh):
        iy = _src(y, ty, sh, ph, dh, H)
        for tx in range(kw):
            ix = _src(xo, tx, sw, pw, dw, W)
            acc = zero
            for cg in range(Cg):
                c = zero
                if has_ctr:
                    c = ctr[b, cg, y, xo]
                elif cyi >= 0 and cxi >= 0:
                    c = f[b, cg, cyi, cxi]
                v = zero
                if iy >= 0 and ix >= 0:
                    v = f[b, cg, iy, ix]
                diff = v - c
                if asym and diff < 0:
                    diff = zero
                if cw:
                    D[b, cg, ty, tx, y, xo] = diff * diff
                else:
                    acc += diff * diff
            if not cw:
                D[b, 0, ty, tx, y, xo] = acc


@cuda.jit(cache=True)
def _dist_bwd_ctr(gD, f, ctr, has_ctr, kh, kw, sh, sw, ph, pw, dh, dw, asym, cw, zero, gc):
    """gc[b, cg, y, x] = -sum_t 2 * diff * gD (the gradient w.r.t. the centre features)."""
    B, Cg, H, W = f.shape
    oh = gD.shape[4]
    ow = gD.shape[5]
    i = cuda.grid(1)
    if i >= B * Cg * oh * ow:
        return
    xo = i % ow
    y = (i // ow) % oh
    cg = (i // (ow * oh)) % Cg
    b = i // (ow * oh * Cg)
    dc = cg if cw else 0
    c = zero
    if has_ctr:
        c = ctr[b, cg, y, xo]
    else:
        cyi = _src(y, kh // 2, sh, ph, dh, H)
        cxi = _src(xo, kw // 2, sw, pw, dw, W)
        if cyi >= 0 and cxi >= 0:
            c = f[b, cg, cyi, cxi]
    acc = zero
    for ty in range(kh):
        iy = _src(y, ty, sh, ph, dh, H)
        for tx in range(kw):
            ix = _src(xo, tx, sw, pw, dw, W)
            v = zero
            if iy >= 0 and ix >= 0:
                v = f[b, cg, iy, ix]
            diff = v - c
            if asym and diff < 0:
                diff = zero
            acc -= (diff + diff) * gD[b, dc, ty, tx, y, xo]
    gc[b, cg, y, xo] = acc


@cuda.jit(cache=True)
def _dist_bwd_guide(gD, f, ctr, has_ctr, kh, kw, sh, sw, ph, pw, dh, dw, asym, cw, zero, gc,
                    gf):
    """gf[b, cg, iy, ix]: the taps that read this pixel, plus (no given centre) the centre term."""
    B, Cg, H, W = f.shape
    oh = gD.shape[4]
    ow = gD.shape[5]
    i = cuda.grid(1)
    if i >= B * Cg * H * W:
        return
    ix = i % W
    iy = (i // W) % H
    cg = (i // (W * H)) % Cg
    b = i // (W * H * Cg)
    dc = cg if cw else 0
    v = f[b, cg, iy, ix]
    acc = zero
    for ty in range(kh):
        y = _dst(iy, ty, sh, ph, dh, oh)
        if y < 0:
            continue
        cyi = _src(y, kh // 2, sh, ph, dh, H)
        for tx in range(kw):
            xo = _dst(ix, tx, sw, pw, dw, ow)
            if xo < 0:
                continue
            c = zero
            if has_ctr:
                c = ctr[b, cg, y, xo]
            else:
                cxi = _src(xo, kw // 2, sw, pw, dw, W)
                if cyi >= 0 and cxi >= 0:
                    c = f[b, cg, cyi, cxi]
            diff = v - c
            if asym and diff < 0:
                diff = zero
            acc += (diff + diff) * gD[b, dc, ty, tx, y, xo]
    if not has_ctr:
        y = _dst(iy, kh // 2, sh, ph, dh, oh)
        xo = _dst(ix, kw // 2, sw, pw, dw, ow)
        if y >= 0 and xo >= 0:
            acc += gc[b, cg, y, xo]
    gf[b, cg, iy, ix] = acc


# ----------------------------------------------------------------------------- pac_conv2d

@cuda.jit(cache=True)
def _conv_fwd(x, K, Wt, bias, sh, sw, ph, pw, dh, dw, zero, out):
    B, C, H, W = x.shape
    O = Wt.shape[0]
    kh = Wt.shape[2]
    kw = Wt.shape[3]
    oh = out.shape[2]
    ow = out.shape[3]
    ng = (O + _OB - 1) // _OB
    i = cuda.grid(1)
    if i >= B * ng * oh * ow:
        return
    xo = i % ow
    y = (i // ow) % oh
    g = (i // (ow * oh)) % ng
    b = i // (ow * oh * ng)
    o0 = g * _OB
    # clamp the weight rows read by a partial last group; only valid outputs are written
    o1 = min(o0 + 1, O - 1)
    o2 = min(o0 + 2, O - 1)
    o3 = min(o0 + 3, O - 1)
    a0 = zero
    a1 = zero
    a2 = zero
    a3 = zero
    for ty in range(kh):
        iy = _src(y, ty, sh, ph, dh, H)
        if iy < 0:
            continue
        for tx in range(kw):
            ix = _src(xo, tx, sw, pw, dw, W)
            if ix < 0:
                continue
            k = K[b, 0, ty, tx, y, xo]
            for c in range(C):
                v = k * x[b, c, iy, ix]
                a0 += Wt[o0, c, ty, tx] * v
                a1 += Wt[o1, c, ty, tx] * v
                a2 += Wt[o2, c, ty, tx] * v
                a3 += Wt[o3, c, ty, tx] * v
    out[b, o0, y, xo] = a0 + bias[o0]
    if o0 + 1 < O:
        out[b, o0 + 1, y, xo] = a1 + bias[o1]
    if o0 + 2 < O:
        out[b, o0 + 2, y, xo] = a2 + bias[o2]
    if o0 + 3 < O:
        out[b, o0 + 3, y, xo] = a3 + bias[o3]


@cuda.jit(cache=True)
def _conv_bwd_x(gout, K, Wt, sh, sw, ph, pw, dh, dw, zero, gx):
    B, C, H, W = gx.shape
    O = Wt.shape[0]
    kh = Wt.shape[2]
    kw = Wt.shape[3]
    oh = gout.shape[2]
    ow = gout.shape[3]
    i = cuda.grid(1)
    if i >= B * C * H * W:
        return
    ix = i % W
    iy = (i // W) % H
    c = (i // (W * H)) % C
    b = i // (W * H * C)
    acc = zero
    for ty in range(kh):
        y = _dst(iy, ty, sh, ph, dh, oh)
        if y < 0:
            continue
        for tx in range(kw):
            xo = _dst(ix, tx, sw, pw, dw, ow)
            if xo < 0:
                continue
            s = zero
            for o in range(O):
                s += Wt[o, c, ty, tx] * gout[b, o, y, xo]
            acc += K[b, 0, ty, tx, y, xo] * s
    gx[b, c, iy, ix] = acc


@cuda.jit(cache=True)
def _conv_bwd_k(gout, x, Wt, sh, sw, ph, pw, dh, dw, zero, gK):
    B, C, H, W = x.shape
    O = Wt.shape[0]
    kh = Wt.shape[2]
    kw = Wt.shape[3]
    oh = gout.shape[2]
    ow = gout.shape[3]
    i = cuda.grid(1)
    if i >= B * kh * kw * oh * ow:
        return
    xo = i % ow
    y = (i // ow) % oh
    t = (i // (ow * oh)) % (kh * kw)
    b = i // (ow * oh * kh * kw)
    ty = t // kw
    tx = t % kw
    iy = _src(y, ty, sh, ph, dh, H)
    ix = _src(xo, tx, sw, pw, dw, W)
    acc = zero
    if iy >= 0 and ix >= 0:
        for c in range(C):
            s = zero
            for o in range(O):
                s += Wt[o, c, ty, tx] * gout[b, o, y, xo]
            acc += x[b, c, iy, ix] * s
    gK[b, 0, ty, tx, y, xo] = acc


@cuda.jit(cache=True)
def _conv_bwd_w(gout, x, K, sh, sw, ph, pw, dh, dw, zero, gW):
    """One block per weight element: sum over batch and output pixels of g * K * x(pos)."""
    O, C, kh, kw = gW.shape
    B, _, H, W = x.shape
    oh = gout.shape[2]
    ow = gout.shape[3]
    e = cuda.blockIdx.x
    tx = e % kw
    ty = (e // kw) % kh
    c = (e // (kw * kh)) % C
    o = e // (kw * kh * C)
    tid = cuda.threadIdx.x
    n = B * oh * ow
    acc = zero
    j = tid
    while j < n:
        xo = j % ow
        y = (j // ow) % oh
        b = j // (ow * oh)
        iy = _src(y, ty, sh, ph, dh, H)
        ix = _src(xo, tx, sw, pw, dw, W)
        if iy >= 0 and ix >= 0:
            acc += gout[b, o, y, xo] * K[b, 0, ty, tx, y, xo] * x[b, c, iy, ix]
        j += _TPB
    part = cuda.shared.array(_TPB, numba.float64)
    part[tid] = acc
    cuda.syncthreads()
    step = _TPB // 2
    while step > 0:
        if tid < step:
            part[tid] += part[tid + step]
        cuda.syncthreads()
        step //= 2
    if tid == 0:
        gW[o, c, ty, tx] = part[0]


# ----------------------------------------------------------------------------- pac_pool2d
# (also the depthwise shared-filter convolution: tap weights tw [kh*kw] and a bias [C])

@cuda.jit(cache=True)
def _pool_fwd(x, K, tw, bias, kh, kw, sh, sw, ph, pw, dh, dw, zero, out):
    B, C, H, W = x.shape
    kc = K.shape[1]
    oh = out.shape[2]
    ow = out.shape[3]
    i = cuda.grid(1)
    if i >= B * C * oh * ow:
        return
    xo = i % ow
    y = (i // ow) % oh
    c = (i // (ow * oh)) % C
    b = i // (ow * oh * C)
    kk = c if kc > 1 else 0
    acc = zero
    for ty in range(kh):
        iy = _src(y, ty, sh, ph, dh, H)
        if iy < 0:
            continue
        for tx in range(kw):
            ix = _src(xo, tx, sw, pw, dw, W)
            if ix < 0:
                continue
            acc += tw[ty * kw + tx] * K[b, kk, ty, tx, y, xo] * x[b, c, iy, ix]
    out[b, c, y, xo] = acc + bias[c]


@cuda.jit(cache=True)
def _pool_bwd_x(gout, K, tw, kh, kw, sh, sw, ph, pw, dh, dw, zero, gx):
    B, C, H, W = gx.shape
    kc = K.shape[1]
    oh = gout.shape[2]
    ow = gout.shape[3]
    i = cuda.grid(1)
    if i >= B * C * H * W:
        return
    ix = i % W
    iy = (i // W) % H
    c = (i // (W * H)) % C
    b = i // (W * H * C)
    kk = c if kc > 1 else 0
    acc = zero
    for ty in range(kh):
        y = _dst(iy, ty, sh, ph, dh, oh)
        if y < 0:
            continue
        for tx in range(kw):
            xo = _dst(ix, tx, sw, pw, dw, ow)
            if xo < 0:
                continue
            acc += gout[b, c, y, xo] * (tw[ty * kw + tx] * K[b, kk, ty, tx, y, xo])
    gx[b, c, iy, ix] = acc


@cuda.jit(cache=True)
def _pool_bwd_q(gout, x, kh, kw, sh, sw, ph, pw, dh, dw, zero, gq):
    """gq[b, kk, t, y, x] = sum over the channels sharing K channel kk of gout * x(pos)."""
    B, C, H, W = x.shape
    kc = gq.shape[1]
    oh = gout.shape[2]
    ow = gout.shape[3]
    i = cuda.grid(1)
    if i >= B * kc * kh * kw * oh * ow:
        return
    xo = i % ow
    y = (i // ow) % oh
    t = (i // (ow * oh)) % (kh * kw)
    kk = (i // (ow * oh * kh * kw)) % kc
    b = i // (ow * oh * kh * kw * kc)
    ty = t // kw
    tx = t % kw
    iy = _src(y, ty, sh, ph, dh, H)
    ix = _src(xo, tx, sw, pw, dw, W)
    acc = zero
    if iy >= 0 and ix >= 0:
        if kc > 1:
            acc = gout[b, kk, y, xo] * x[b, kk, iy, ix]
        else:
            for c in range(C):
                acc += gout[b, c, y, xo] * x[b, c, iy, ix]
    gq[b, kk, ty, tx, y, xo] = acc


# ----------------------------------------------------------------------------- torch wrappers

_streams: Dict[int, object] = {}


def _arr(t: torch.Tensor):
    if _SIM:
        return t.numpy()
    return cuda.as_cuda_array(t, sync=False)


def _zero(t: torch.Tensor):
    return np.float64(0) if t.dtype == torch.float64 else np.float32(0)


def _launch(kernel, n_threads: int, device: torch.device, *args, blocks=None):
    """Launch ``kernel`` over ``n_threads`` threads (or ``blocks`` blocks) on torch's stream."""
    if blocks is None:
        blocks = (n_threads + _TPB - 1) // _TPB
    if blocks == 0:
        return
    if _SIM:
        kernel[blocks, _TPB](*args)
        return
    ptr = torch.cuda.current_stream(device).cuda_stream
    stream = _streams.get(ptr)
    if stream is None:
        stream = _streams[ptr] = cuda.external_stream(ptr)
    kernel[blocks, _TPB, stream](*args)


def _on_device(fn):
    """Run a wrapper with the first tensor argument's GPU current, so that numba wraps the
    tensors and launches in that device's (primary) context, also from autograd's threads."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if _SIM:
            return fn(*args, **kwargs)
        dev = next(a.device for a in args if isinstance(a, torch.Tensor))
        with torch.cuda.device(dev):
            return fn(*args, **kwargs)
    return wrapper


def _new(shape, like: torch.Tensor, zero: bool = False) -> torch.Tensor:
    fn = torch.zeros if zero else torch.empty
    return fn(shape, dtype=like.dtype, device=like.device)


@_on_device
def pac_dist_fwd(guide, center, kernel_size, stride, padding, dilation, asym, channel_wise):
    """CUDA ``pac_dist``: ``[b, Cg, H, W] -> [b, 1|Cg, kh, kw, oh, ow]``."""
    dtype = guide.dtype
    f, ctr = prep(guide, center)
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    B, Cg, H, W = f.shape
    oh = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    D = _new((B, Cg if channel_wise else 1, kh, kw, oh, ow), f)
    ctr_a = _arr(ctr if ctr is not None else _new((1, 1, 1, 1), f))
    _launch(_dist_fwd, B * oh * ow, f.device, _arr(f), ctr_a, ctr is not None, kh, kw, sh, sw,
            ph, pw, dh, dw, bool(asym), bool(channel_wise), _zero(f), _arr(D))
    return D.to(dtype)


@_on_device
def pac_dist_bwd(grad, guide, center, kernel_size, stride, padding, dilation, asym,
                 channel_wise):
    """Gradients of ``pac_dist``: ``(grad_guide [b,Cg,H,W], grad_center [b,Cg,oh,ow])``."""
    dtype = guide.dtype
    gD, f, ctr = prep(grad, guide, center)
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    B, Cg, H, W = f.shape
    oh, ow = gD.shape[4], gD.shape[5]
    gc = _new((B, Cg, oh, ow), f)
    gf = _new((B, Cg, H, W), f)
    args = (_arr(gD), _arr(f), _arr(ctr if ctr is not None else _new((1, 1, 1, 1), f)),
            ctr is not None, kh, kw, sh, sw, ph, pw, dh, dw, bool(asym), bool(channel_wise),
            _zero(f), _arr(gc))
    _launch(_dist_bwd_ctr, B * Cg * oh * ow, f.device, *args)
    _launch(_dist_bwd_guide, B * Cg * H * W, f.device, *args, _arr(gf))
    return gf.to(dtype), gc.to(dtype)


@_on_device
def pac_conv2d_fwd(x, K, weight, bias, stride, padding, dilation, shared_filters):
    """CUDA ``pac_conv2d``: ``[b, C, H, W] -> [b, O, oh, ow]``."""
    if shared_filters:
        return pac_pool2d_fwd(x, K, tuple(weight.shape[-2:]), stride, padding, dilation,
                              weight=weight, bias=bias)
    dtype = x.dtype
    xc, Kc, w, bc = prep(x, K, weight, bias)
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    O = w.shape[0]
    B = xc.shape[0]
    oh, ow = Kc.shape[4], Kc.shape[5]
    if bc is None:
        bc = _new((O,), xc, zero=True)
    out = _new((B, O, oh, ow), xc)
    ng = (O + _OB - 1) // _OB
    _launch(_conv_fwd, B * ng * oh * ow, xc.device, _arr(xc), _arr(Kc), _arr(w), _arr(bc),
            sh, sw, ph, pw, dh, dw, _zero(xc), _arr(out))
    return out.to(dtype)


def pac_conv2d_add_(out, x, K, weight, stride, padding, dilation, shared_filters, alpha):
    """``out += alpha * pac_conv2d(x, K, weight)``: the product is computed by
    :func:`pac_conv2d_fwd`, then added (no accumulating CUDA kernel yet)."""
    out.add_(pac_conv2d_fwd(x, K, weight, None, stride, padding, dilation, shared_filters),
             alpha=alpha)


@_on_device
def pac_conv2d_bwd(grad, x, K, weight, stride, padding, dilation, shared_filters,
                   needs=(True, True, True)):
    """Gradients of ``pac_conv2d`` w.r.t. ``(x, K, weight)``; ``None`` where not needed."""
    if shared_filters:
        return pac_pool2d_bwd(grad, x, K, tuple(weight.shape[-2:]), stride, padding, dilation,
                              needs=needs, weight=weight)
    need_x, need_k, need_w = (bool(v) for v in needs)
    dtypes = (x.dtype, K.dtype, weight.dtype)
    g, xc, Kc, w = prep(grad, x, K, weight)
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    O, C, kh, kw = w.shape
    B, _, H, W = xc.shape
    oh, ow = g.shape[2], g.shape[3]
    z = _zero(xc)
    gx = gK = gW = None
    if need_x:
        gx = _new(xc.shape, xc)
        _launch(_conv_bwd_x, B * C * H * W, xc.device, _arr(g), _arr(Kc), _arr(w),
                sh, sw, ph, pw, dh, dw, z, _arr(gx))
        gx = gx.to(dtypes[0])
    if need_k:
        gK = _new(Kc.shape, xc)
        _launch(_conv_bwd_k, B * kh * kw * oh * ow, xc.device, _arr(g), _arr(xc), _arr(w),
                sh, sw, ph, pw, dh, dw, z, _arr(gK))
        gK = gK.to(dtypes[1])
    if need_w:
        gW = _new(w.shape, xc)
        _launch(_conv_bwd_w, 0, xc.device, _arr(g), _arr(xc), _arr(Kc), sh, sw, ph, pw, dh, dw,
                z, _arr(gW), blocks=O * C * kh * kw)
        gW = gW.to(dtypes[2])
    return gx, gK, gW


@_on_device
def pac_pool2d_fwd(x, K, kernel_size, stride, padding, dilation, weight=None, bias=None):
    """CUDA ``pac_pool2d`` (and, with ``weight`` [1,1,kh,kw], shared-filter ``pac_conv2d``)."""
    dtype = x.dtype
    xc, Kc, w, bc = prep(x, K, weight, bias)
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    B, C = xc.shape[:2]
    oh, ow = Kc.shape[4], Kc.shape[5]
    tw = w.reshape(kh * kw) if w is not None else torch.ones(kh * kw, dtype=xc.dtype,
                                                             device=xc.device)
    if bc is None:
        bc = _new((C,), xc, zero=True)
    out = _new((B, C, oh, ow), xc)
    _launch(_pool_fwd, B * C * oh * ow, xc.device, _arr(xc), _arr(Kc), _arr(tw), _arr(bc),
            kh, kw, sh, sw, ph, pw, dh, dw, _zero(xc), _arr(out))
    return out.to(dtype)


@_on_device
def pac_pool2d_bwd(grad, x, K, kernel_size, stride, padding, dilation,
                   needs=(True, True, False), weight=None):
    """Gradients of ``pac_pool2d`` w.r.t. ``(x, K[, tap weight])``; ``None`` where not needed."""
    need_x, need_k = bool(needs[0]), bool(needs[1])
    need_w = weight is not None and bool(needs[2])
    dtypes = (x.dtype, K.dtype, weight.dtype if weight is not None else None)
    g, xc, Kc, w = prep(grad, x, K, weight)
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    B, C, H, W = xc.shape
    oh, ow = g.shape[2], g.shape[3]
    kc = Kc.shape[1]
    tw = w.reshape(kh * kw) if w is not None else torch.ones(kh * kw, dtype=xc.dtype,
                                                             device=xc.device)
    z = _zero(xc)
    gx = gK = gW = None
    if need_x:
        gx = _new(xc.shape, xc)
        _launch(_pool_bwd_x, B * C * H * W, xc.device, _arr(g), _arr(Kc), _arr(tw),
                kh, kw, sh, sw, ph, pw, dh, dw, z, _arr(gx))
        gx = gx.to(dtypes[0])
    if need_k or need_w:
        # gq = dL/d(tw*K); K-sized, like K itself
        gq = _new(Kc.shape, xc)
        _launch(_pool_bwd_q, B * kc * kh * kw * oh * ow, xc.device, _arr(g), _arr(xc),
                kh, kw, sh, sw, ph, pw, dh, dw, z, _arr(gq))
        if need_k:
            gK = (gq * tw.view(1, 1, kh, kw, 1, 1)).to(dtypes[1])
        if need_w:
            gW = (gq * Kc).sum(dim=(0, 1, 4, 5)).reshape(1, 1, kh, kw).to(dtypes[2])
    return gx, gK, gW
