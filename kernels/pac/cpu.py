"""Fused PAC kernels for the CPU, written with Numba (``@njit(parallel=True)``).

None of these kernels materialises a ``[b, C*kh*kw, oh*ow]`` column tensor.  Work is split
into output rows; for each row (or a tile of ``_TILE`` output columns of it) and each input
channel the kernels gather the ``kh*kw x tile`` taps into a small scratch buffer that stays in
L1, and contract it with the weights in register-blocked loops whose innermost loop runs over
contiguous memory (so LLVM vectorises it without ``fastmath``).  Extra memory is a few
``kh*kw x tile`` buffers per thread, plus one partial sum of the weight gradient per chunk of
work (at most one chunk per thread).

Backward passes scatter into the input gradient.  To do that without atomics, output rows are
grouped into *bands* of at least ``(kh-1)*dh // sh + 1`` rows: two bands that are not
neighbours never touch the same input row, so even bands run in parallel, then odd bands.
Within a band, rows run in order, and each chunk of bands has a fixed partial sum, so results
are deterministic for a given thread count.

Every parallel driver (``prange`` over rows or chunks, calling a serial per-item function) has
a serial twin, used for small inputs (below ``PARALLEL_MIN_WORK`` multiply-adds, where waking
the thread pool costs more than it saves) and in forked child processes (see ``_PID``).

The Python functions at the bottom take and return torch tensors (CPU).  float16/bfloat16
inputs are computed in float32 and the results cast back.  Arguments are assumed valid: the
public wrappers in :mod:`pacnet.kernels.pac.ops` check them.
"""

from __future__ import annotations

import math
import os
from typing import Optional, Tuple

import numba
import numpy as np
import torch
from numba import njit, prange

_TILE = 128  # output columns per scratch tile; the scratch is kh*kw x _TILE per channel
_OPTS = dict(parallel=True, cache=True, fastmath=False, nogil=True)


# ----------------------------------------------------------------------------- helpers
# Numba wraps negative indices, and the select that does it (``i < 0 ? i + n : i``) stops
# LLVM from vectorising a loop whose index carries a runtime offset (measured 16x slower).
# So inner loops run ``j`` over ``range(m)`` on row *views* that already start at the right
# place.  A stride-1 view and a strided view are different Numba types, so every gather and
# scatter is written as ``if sw == 1: helper(contiguous view) else: helper(strided view)``.

@njit(cache=True)
def _jrange(off, s, n_in, n_out):
    """Output columns ``j`` in ``[0, n_out)`` whose input column ``j*s + off`` is in the image."""
    lo = 0
    if off < 0:
        lo = (-off + s - 1) // s
    last = n_in - 1 - off
    hi = 0
    if last >= 0:
        hi = min(n_out, last // s + 1)
    if hi < lo:
        hi = lo
    return lo, hi


@njit(cache=True)
def _band_item(it, nitems_band, phase, L):
    """Map a work item of one phase to (batch index, first output row of its band)."""
    b = it // nitems_band
    band = 2 * (it % nitems_band) + phase
    return b, band * L


@njit(cache=True)
def _copy(dst, a, m):
    for j in range(m):
        dst[j] = a[j]


@njit(cache=True)
def _add(dst, a, m):
    for j in range(m):
        dst[j] += a[j]


@njit(cache=True)
def _mul(dst, a, b, m):
    for j in range(m):
        dst[j] = a[j] * b[j]


@njit(cache=True)
def _fma(dst, a, b, m):
    for j in range(m):
        dst[j] += a[j] * b[j]


@njit(cache=True)
def _taps(y, x0, n, kh, kw, sh, sw, ph, pw, dh, dw, H, W, lo_t, hi_t, st_t, iy_t):
    """Per tap ``t``: input row ``iy_t``, the in-image output columns ``[lo_t, hi_t)`` of the
    tile ``[x0, x0+n)`` of output row ``y``, and the input column ``st_t`` of column ``lo_t``."""
    for ty in range(kh):
        iy = y * sh - ph + ty * dh
        for tx in range(kw):
            t = ty * kw + tx
            off = x0 * sw + tx * dw - pw
            lo, hi = _jrange(off, sw, W, n)
            if iy < 0 or iy >= H:
                hi = lo
            lo_t[t] = lo
            hi_t[t] = hi
            st_t[t] = lo * sw + off
            iy_t[t] = iy


# ----------------------------------------------------------------------------- pac_dist

@njit(**_OPTS)
def _dist_fwd(f, ctr, has_ctr, kh, kw, sh, sw, ph, pw, dh, dw, asym, cw, D):
    for it in prange(f.shape[0] * D.shape[4]):
        _dist_fwd_row(it, f, ctr, has_ctr, kh, kw, sh, sw, ph, pw, dh, dw, asym, cw, D)


@njit(cache=True)
def _dist_fwd_serial(f, ctr, has_ctr, kh, kw, sh, sw, ph, pw, dh, dw, asym, cw, D):
    for it in range(f.shape[0] * D.shape[4]):
        _dist_fwd_row(it, f, ctr, has_ctr, kh, kw, sh, sw, ph, pw, dh, dw, asym, cw, D)


@njit(cache=True)
def _dist_fwd_row(it, f, ctr, has_ctr, kh, kw, sh, sw, ph, pw, dh, dw, asym, cw, D):
    B, Cg, H, W = f.shape
    oh, ow = D.shape[4], D.shape[5]
    k2 = kh * kw
    c_t = (kh // 2) * kw + kw // 2  # the centre tap
    b = it // oh
    y = it % oh
    lo_t = np.empty(k2, np.int64)
    hi_t = np.empty(k2, np.int64)
    st_t = np.empty(k2, np.int64)
    iy_t = np.empty(k2, np.int64)
    _taps(y, 0, ow, kh, kw, sh, sw, ph, pw, dh, dw, H, W, lo_t, hi_t, st_t, iy_t)
    cbuf = np.zeros((Cg, ow), dtype=f.dtype)
    lo = lo_t[c_t]
    m = hi_t[c_t] - lo
    st = st_t[c_t]
    for cg in range(Cg):
        if has_ctr:
            _copy(cbuf[cg], ctr[b, cg, y], ow)
        elif m > 0:
            fr = f[b, cg, iy_t[c_t]]
            if sw == 1:
                _copy(cbuf[cg, lo:lo + m], fr[st:st + m], m)
            else:
                _copy(cbuf[cg, lo:lo + m], fr[st:st + (m - 1) * sw + 1:sw], m)
    acc = np.empty(ow, dtype=f.dtype)
    for t in range(k2):
        lo = lo_t[t]
        m = hi_t[t] - lo
        st = st_t[t]
        for cg in range(Cg):
            cr = cbuf[cg]
            for j in range(ow):
                acc[j] = -cr[j]  # f - c, with f = 0 outside the image
            if m > 0:
                fr = f[b, cg, iy_t[t]]
                if sw == 1:
                    _add(acc[lo:lo + m], fr[st:st + m], m)
                else:
                    _add(acc[lo:lo + m], fr[st:st + (m - 1) * sw + 1:sw], m)
            if asym:
                for j in range(ow):
                    if acc[j] < 0:
                        acc[j] = 0
            dr = D[b, cg if cw else 0, t // kw, t % kw, y]
            if cw or cg == 0:
                _mul(dr, acc, acc, ow)
            else:
                _fma(dr, acc, acc, ow)


@njit(**_OPTS)
def _dist_bwd(gD, f, ctr, has_ctr, kh, kw, sh, sw, ph, pw, dh, dw, asym, cw,
              L, nbands, nchunks, gf, gc):
    for phase in range(2):
        for ch in prange(nchunks):
            _dist_bwd_chunk(ch, phase, gD, f, ctr, has_ctr, kh, kw, sh, sw, ph, pw, dh, dw, asym,
                            cw, L, nbands, nchunks, gf, gc)


@njit(cache=True)
def _dist_bwd_serial(gD, f, ctr, has_ctr, kh, kw, sh, sw, ph, pw, dh, dw, asym, cw,
                     L, nbands, nchunks, gf, gc):
    for phase in range(2):
        for ch in range(nchunks):
            _dist_bwd_chunk(ch, phase, gD, f, ctr, has_ctr, kh, kw, sh, sw, ph, pw, dh, dw, asym,
                            cw, L, nbands, nchunks, gf, gc)


@njit(cache=True)
def _dist_bwd_chunk(ch, phase, gD, f, ctr, has_ctr, kh, kw, sh, sw, ph, pw, dh, dw, asym, cw,
                    L, nbands, nchunks, gf, gc):
    B, Cg, H, W = f.shape
    oh, ow = gD.shape[4], gD.shape[5]
    k2 = kh * kw
    c_t = (kh // 2) * kw + kw // 2
    nb = (nbands - phase + 1) // 2
    nitems = B * nb
    lo_t = np.empty(k2, np.int64)
    hi_t = np.empty(k2, np.int64)
    st_t = np.empty(k2, np.int64)
    iy_t = np.empty(k2, np.int64)
    cbuf = np.empty((Cg, ow), dtype=f.dtype)
    gcb = np.empty((Cg, ow), dtype=f.dtype)
    e = np.empty(ow, dtype=f.dtype)
    for it in range(ch * nitems // nchunks, (ch + 1) * nitems // nchunks):
        b, y0 = _band_item(it, nb, phase, L)
        for y in range(y0, min(oh, y0 + L)):
            _taps(y, 0, ow, kh, kw, sh, sw, ph, pw, dh, dw, H, W, lo_t, hi_t, st_t, iy_t)
            loc = lo_t[c_t]
            mc = hi_t[c_t] - loc
            stc = st_t[c_t]
            cbuf[:, :] = 0
            gcb[:, :] = 0
            for cg in range(Cg):
                if has_ctr:
                    _copy(cbuf[cg], ctr[b, cg, y], ow)
                elif mc > 0:
                    fr = f[b, cg, iy_t[c_t]]
                    if sw == 1:
                        _copy(cbuf[cg, loc:loc + mc], fr[stc:stc + mc], mc)
                    else:
                        _copy(cbuf[cg, loc:loc + mc], fr[stc:stc + (mc - 1) * sw + 1:sw],
                              mc)
            for t in range(k2):
                lo = lo_t[t]
                m = hi_t[t] - lo
                st = st_t[t]
                for cg in range(Cg):
                    cr = cbuf[cg]
                    for j in range(ow):
                        e[j] = -cr[j]
                    if m > 0:
                        fr = f[b, cg, iy_t[t]]
                        if sw == 1:
                            _add(e[lo:lo + m], fr[st:st + m], m)
                        else:
                            _add(e[lo:lo + m], fr[st:st + (m - 1) * sw + 1:sw], m)
                    if asym:
                        for j in range(ow):
                            if e[j] < 0:
                                e[j] = 0
                    # e <- dD/d f(tap) = 2 * diff * gD;  dD/d centre = -e
                    gr = gD[b, cg if cw else 0, t // kw, t % kw, y]
                    gcr = gcb[cg]
                    for j in range(ow):
                        v = (e[j] + e[j]) * gr[j]
                        e[j] = v
                        gcr[j] -= v
                    if m > 0:
                        gfr = gf[b, cg, iy_t[t]]
                        if sw == 1:
                            _add(gfr[st:st + m], e[lo:lo + m], m)
                        else:
                            _add(gfr[st:st + (m - 1) * sw + 1:sw], e[lo:lo + m], m)
            for cg in range(Cg):
                _copy(gc[b, cg, y], gcb[cg], ow)
                if not has_ctr and mc > 0:
                    gfr = gf[b, cg, iy_t[c_t]]
                    if sw == 1:
                        _add(gfr[stc:stc + mc], gcb[cg, loc:loc + mc], mc)
                    else:
                        _add(gfr[stc:stc + (mc - 1) * sw + 1:sw], gcb[cg, loc:loc + mc],
                             mc)


# ----------------------------------------------------------------------------- pac_conv2d

@njit(**_OPTS)
def _conv_fwd(x, K, W2, bias, kh, kw, sh, sw, ph, pw, dh, dw, T, out):
    ntiles = (out.shape[3] + T - 1) // T
    for it in prange(x.shape[0] * out.shape[2] * ntiles):
        _conv_fwd_tile(it, x, K, W2, bias, kh, kw, sh, sw, ph, pw, dh, dw, T, out)


@njit(cache=True)
def _conv_fwd_serial(x, K, W2, bias, kh, kw, sh, sw, ph, pw, dh, dw, T, out):
    ntiles = (out.shape[3] + T - 1) // T
    for it in range(x.shape[0] * out.shape[2] * ntiles):
        _conv_fwd_tile(it, x, K, W2, bias, kh, kw, sh, sw, ph, pw, dh, dw, T, out)


@njit(cache=True)
def _conv_fwd_tile(it, x, K, W2, bias, kh, kw, sh, sw, ph, pw, dh, dw, T, out):
    B, C, H, Wd = x.shape
    O = W2.shape[0]
    oh, ow = out.shape[2], out.shape[3]
    k2 = kh * kw
    ntiles = (ow + T - 1) // T
    O4 = O - O % 4
    b = it // (oh * ntiles)
    y = (it // ntiles) % oh
    x0 = (it % ntiles) * T
    n = min(T, ow - x0)
    lo_t = np.empty(k2, np.int64)
    hi_t = np.empty(k2, np.int64)
    st_t = np.empty(k2, np.int64)
    iy_t = np.empty(k2, np.int64)
    _taps(y, x0, n, kh, kw, sh, sw, ph, pw, dh, dw, H, Wd, lo_t, hi_t, st_t, iy_t)
    # A private copy of the tile's K rows: in K they lie oh*ow apart and would evict
    # each other from the caches while every channel rereads them.
    Kt = np.empty((k2, n), dtype=x.dtype)
    for t in range(k2):
        _copy(Kt[t], K[b, 0, t // kw, t % kw, y, x0:x0 + n], n)
    S = np.zeros((k2, n), dtype=x.dtype)  # columns outside the image stay 0
    acc = np.zeros((O, n), dtype=x.dtype)
    for c in range(C):
        # S[t, j] = K[t, y, x0+j] * x[c, pos(y, t)]
        for t in range(k2):
            lo = lo_t[t]
            m = hi_t[t] - lo
            st = st_t[t]
            if m > 0:
                xr = x[b, c, iy_t[t]]
                if sw == 1:
                    _mul(S[t, lo:lo + m], Kt[t, lo:lo + m], xr[st:st + m], m)
                else:
                    _mul(S[t, lo:lo + m], Kt[t, lo:lo + m], xr[st:st + (m - 1) * sw + 1:sw],
                         m)
        # acc[O, n] += W2[:, c*k2:(c+1)*k2] @ S, four output channels per pass over S
        r0 = c * k2
        for o in range(0, O4, 4):
            for t in range(k2):
                w0 = W2[o, r0 + t]
                w1 = W2[o + 1, r0 + t]
                w2 = W2[o + 2, r0 + t]
                w3 = W2[o + 3, r0 + t]
                for j in range(n):
                    s = S[t, j]
                    acc[o, j] += w0 * s
                    acc[o + 1, j] += w1 * s
                    acc[o + 2, j] += w2 * s
                    acc[o + 3, j] += w3 * s
        for o in range(O4, O):
            for t in range(k2):
                w0 = W2[o, r0 + t]
                for j in range(n):
                    acc[o, j] += w0 * S[t, j]
    for o in range(O):
        orow = out[b, o, y, x0:x0 + n]
        bo = bias[o]
        for j in range(n):
            orow[j] = acc[o, j] + bo


@njit(**_OPTS)
def _conv_bwd(gout, x, K, WT, kh, kw, sh, sw, ph, pw, dh, dw, T, L, nbands, nchunks,
              need_x, need_k, need_w, gx, gK, gWp):
    for phase in range(2):
        for ch in prange(nchunks):
            _conv_bwd_chunk(ch, phase, gout, x, K, WT, kh, kw, sh, sw, ph, pw, dh, dw, T, L,
                            nbands, nchunks, need_x, need_k, need_w, gx, gK, gWp)


@njit(cache=True)
def _conv_bwd_serial(gout, x, K, WT, kh, kw, sh, sw, ph, pw, dh, dw, T, L, nbands, nchunks,
                     need_x, need_k, need_w, gx, gK, gWp):
    for phase in range(2):
        for ch in range(nchunks):
            _conv_bwd_chunk(ch, phase, gout, x, K, WT, kh, kw, sh, sw, ph, pw, dh, dw, T, L,
                            nbands, nchunks, need_x, need_k, need_w, gx, gK, gWp)


@njit(cache=True)
def _conv_bwd_chunk(ch, phase, gout, x, K, WT, kh, kw, sh, sw, ph, pw, dh, dw, T, L, nbands,
                    nchunks, need_x, need_k, need_w, gx, gK, gWp):
    B, C, H, Wd = x.shape
    O = WT.shape[1]
    oh, ow = gout.shape[2], gout.shape[3]
    k2 = kh * kw
    k24 = k2 - k2 % 4
    ntiles = (ow + T - 1) // T
    need_g = need_x or need_k
    nb = (nbands - phase + 1) // 2
    nitems = B * nb
    lo_t = np.empty(k2, np.int64)
    hi_t = np.empty(k2, np.int64)
    st_t = np.empty(k2, np.int64)
    iy_t = np.empty(k2, np.int64)
    Kt = np.empty((k2, T), dtype=x.dtype)
    X = np.empty((k2, T), dtype=x.dtype)
    S = np.empty((k2, T), dtype=x.dtype)
    G = np.empty((k2, T), dtype=x.dtype)
    gk = np.empty((k2, T), dtype=x.dtype)
    g2 = np.empty((O, T), dtype=x.dtype)
    gT = np.empty((T, O), dtype=x.dtype)
    gw = gWp[ch]
    for it in range(ch * nitems // nchunks, (ch + 1) * nitems // nchunks):
        b, y0 = _band_item(it, nb, phase, L)
        for y in range(y0, min(oh, y0 + L)):
            for tile in range(ntiles):
                x0 = tile * T
                n = min(T, ow - x0)
                _taps(y, x0, n, kh, kw, sh, sw, ph, pw, dh, dw, H, Wd,
                      lo_t, hi_t, st_t, iy_t)
                for t in range(k2):
                    _copy(Kt[t], K[b, 0, t // kw, t % kw, y, x0:x0 + n], n)
                for o in range(O):
                    _copy(g2[o], gout[b, o, y, x0:x0 + n], n)
                if need_w:
                    for j in range(n):
                        for o in range(O):
                            gT[j, o] = g2[o, j]
                X[:, :] = 0  # columns outside the image stay 0 for every channel
                if need_k:
                    gk[:, :] = 0
                for c in range(C):
                    # X[t, j] = x[c, pos(y, t)]
                    for t in range(k2):
                        lo = lo_t[t]
                        m = hi_t[t] - lo
                        st = st_t[t]
                        if m > 0:
                            xr = x[b, c, iy_t[t]]
                            if sw == 1:
                                _copy(X[t, lo:lo + m], xr[st:st + m], m)
                            else:
                                _copy(X[t, lo:lo + m], xr[st:st + (m - 1) * sw + 1:sw], m)
                    r0 = c * k2
                    if need_w:
                        # gW^T[r0+t, :] += (K*X)[t, :] @ gT, inner loop over O
                        for t in range(k2):
                            _mul(S[t], Kt[t], X[t], n)
                        for t in range(0, k24, 4):
                            for j in range(n):
                                s0 = S[t, j]
                                s1 = S[t + 1, j]
                                s2 = S[t + 2, j]
                                s3 = S[t + 3, j]
                                for o in range(O):
                                    g = gT[j, o]
                                    gw[r0 + t, o] += s0 * g
                                    gw[r0 + t + 1, o] += s1 * g
                                    gw[r0 + t + 2, o] += s2 * g
                                    gw[r0 + t + 3, o] += s3 * g
                        for t in range(k24, k2):
                            for j in range(n):
                                s0 = S[t, j]
                                for o in range(O):
                                    gw[r0 + t, o] += s0 * gT[j, o]
                    if need_g:
                        # G[t, j] = sum_o W[o, c, t] * gout[o, y, x0+j]
                        G[:, :] = 0
                        for t in range(0, k24, 4):
                            for o in range(O):
                                w0 = WT[r0 + t, o]
                                w1 = WT[r0 + t + 1, o]
                                w2 = WT[r0 + t + 2, o]
                                w3 = WT[r0 + t + 3, o]
                                for j in range(n):
                                    g = g2[o, j]
                                    G[t, j] += w0 * g
                                    G[t + 1, j] += w1 * g
                                    G[t + 2, j] += w2 * g
                                    G[t + 3, j] += w3 * g
                        for t in range(k24, k2):
                            for o in range(O):
                                w0 = WT[r0 + t, o]
                                for j in range(n):
                                    G[t, j] += w0 * g2[o, j]
                        if need_k:
                            for t in range(k2):
                                _fma(gk[t], G[t], X[t], n)
                        if need_x:
                            for t in range(k2):
                                lo = lo_t[t]
                                m = hi_t[t] - lo
                                st = st_t[t]
                                if m > 0:
                                    gxr = gx[b, c, iy_t[t]]
                                    if sw == 1:
                                        _fma(gxr[st:st + m], G[t, lo:lo + m],
                                             Kt[t, lo:lo + m], m)
                                    else:
                                        _fma(gxr[st:st + (m - 1) * sw + 1:sw],
                                             G[t, lo:lo + m], Kt[t, lo:lo + m], m)
                if need_k:
                    for t in range(k2):
                        _copy(gK[b, 0, t // kw, t % kw, y, x0:x0 + n], gk[t], n)


# ----------------------------------------------------------------------------- pac_pool2d
# (also the depthwise, shared-filter pac_conv2d: tap weights ``tw`` [kh*kw] and a bias)

@njit(**_OPTS)
def _pool_fwd(x, K, tw, bias, kh, kw, sh, sw, ph, pw, dh, dw, out):
    for it in prange(x.shape[0] * out.shape[2]):
        _pool_fwd_row(it, x, K, tw, bias, kh, kw, sh, sw, ph, pw, dh, dw, out)


@njit(cache=True)
def _pool_fwd_serial(x, K, tw, bias, kh, kw, sh, sw, ph, pw, dh, dw, out):
    for it in range(x.shape[0] * out.shape[2]):
        _pool_fwd_row(it, x, K, tw, bias, kh, kw, sh, sw, ph, pw, dh, dw, out)


@njit(cache=True)
def _pool_fwd_row(it, x, K, tw, bias, kh, kw, sh, sw, ph, pw, dh, dw, out):
    B, C, H, Wd = x.shape
    kc = K.shape[1]
    oh, ow = out.shape[2], out.shape[3]
    k2 = kh * kw
    b = it // oh
    y = it % oh
    lo_t = np.empty(k2, np.int64)
    hi_t = np.empty(k2, np.int64)
    st_t = np.empty(k2, np.int64)
    iy_t = np.empty(k2, np.int64)
    _taps(y, 0, ow, kh, kw, sh, sw, ph, pw, dh, dw, H, Wd, lo_t, hi_t, st_t, iy_t)
    WK = np.empty((k2, ow), dtype=x.dtype)
    acc = np.empty(ow, dtype=x.dtype)
    for c in range(C):
        if c == 0 or kc > 1:
            kk = c if kc > 1 else 0
            for t in range(k2):
                wt = tw[t]
                kr = K[b, kk, t // kw, t % kw, y]
                wr = WK[t]
                for j in range(ow):
                    wr[j] = wt * kr[j]
        acc[:] = 0
        for t in range(k2):
            lo = lo_t[t]
            m = hi_t[t] - lo
            st = st_t[t]
            if m > 0:
                xr = x[b, c, iy_t[t]]
                if sw == 1:
                    _fma(acc[lo:lo + m], WK[t, lo:lo + m], xr[st:st + m], m)
                else:
                    _fma(acc[lo:lo + m], WK[t, lo:lo + m], xr[st:st + (m - 1) * sw + 1:sw], m)
        orow = out[b, c, y]
        bc = bias[c]
        for j in range(ow):
            orow[j] = acc[j] + bc


@njit(**_OPTS)
def _pool_bwd(gout, x, K, tw, kh, kw, sh, sw, ph, pw, dh, dw, L, nbands, nchunks,
              need_x, need_k, need_w, gx, gK, gtp):
    for phase in range(2):
        for ch in prange(nchunks):
            _pool_bwd_chunk(ch, phase, gout, x, K, tw, kh, kw, sh, sw, ph, pw, dh, dw, L, nbands,
                            nchunks, need_x, need_k, need_w, gx, gK, gtp)


@njit(cache=True)
def _pool_bwd_serial(gout, x, K, tw, kh, kw, sh, sw, ph, pw, dh, dw, L, nbands, nchunks,
                     need_x, need_k, need_w, gx, gK, gtp):
    for phase in range(2):
        for ch in range(nchunks):
            _pool_bwd_chunk(ch, phase, gout, x, K, tw, kh, kw, sh, sw, ph, pw, dh, dw, L, nbands,
                            nchunks, need_x, need_k, need_w, gx, gK, gtp)


@njit(cache=True)
def _pool_bwd_chunk(ch, phase, gout, x, K, tw, kh, kw, sh, sw, ph, pw, dh, dw, L, nbands,
                    nchunks, need_x, need_k, need_w, gx, gK, gtp):
    B, C, H, Wd = x.shape
    kc = K.shape[1]
    oh, ow = gout.shape[2], gout.shape[3]
    k2 = kh * kw
    need_q = need_k or need_w
    nb = (nbands - phase + 1) // 2
    nitems = B * nb
    lo_t = np.empty(k2, np.int64)
    hi_t = np.empty(k2, np.int64)
    st_t = np.empty(k2, np.int64)
    iy_t = np.empty(k2, np.int64)
    WK = np.empty((k2, ow), dtype=x.dtype)
    gq = np.empty((k2, ow), dtype=x.dtype)
    gtw = gtp[ch]
    for it in range(ch * nitems // nchunks, (ch + 1) * nitems // nchunks):
        b, y0 = _band_item(it, nb, phase, L)
        for y in range(y0, min(oh, y0 + L)):
            _taps(y, 0, ow, kh, kw, sh, sw, ph, pw, dh, dw, H, Wd, lo_t, hi_t, st_t, iy_t)
            for c in range(C):
                kk = c if kc > 1 else 0
                first = c == 0 or kc > 1
                if need_x and first:
                    for t in range(k2):
                        wt = tw[t]
                        kr = K[b, kk, t // kw, t % kw, y]
                        wr = WK[t]
                        for j in range(ow):
                            wr[j] = wt * kr[j]
                if need_q and first:
                    gq[:, :] = 0  # gq[t, j] = sum over the channels sharing K of g * x
                gr = gout[b, c, y]
                for t in range(k2):
                    lo = lo_t[t]
                    m = hi_t[t] - lo
                    st = st_t[t]
                    if m == 0:
                        continue
                    if need_q:
                        xr = x[b, c, iy_t[t]]
                        if sw == 1:
                            _fma(gq[t, lo:lo + m], gr[lo:lo + m], xr[st:st + m], m)
                        else:
                            _fma(gq[t, lo:lo + m], gr[lo:lo + m],
                                 xr[st:st + (m - 1) * sw + 1:sw], m)
                    if need_x:
                        gxr = gx[b, c, iy_t[t]]
                        if sw == 1:
                            _fma(gxr[st:st + m], gr[lo:lo + m], WK[t, lo:lo + m], m)
                        else:
                            _fma(gxr[st:st + (m - 1) * sw + 1:sw], gr[lo:lo + m],
                                 WK[t, lo:lo + m], m)
                if need_q and (c == C - 1 or kc > 1):
                    for t in range(k2):
                        if need_k:
                            gkr = gK[b, kk, t // kw, t % kw, y]
                            wt = tw[t]
                            for j in range(ow):
                                gkr[j] = wt * gq[t, j]
                        if need_w:
                            kr = K[b, kk, t // kw, t % kw, y]
                            s = gtw[t]
                            for j in range(ow):
                                s += kr[j] * gq[t, j]
                            gtw[t] = s


# ----------------------------------------------------------------------------- torch wrappers

# Below this many multiply-adds a call runs on one thread: waking the thread pool costs more
# than it saves (and much more on a busy machine).  Tests set it to 0 to exercise the
# parallel drivers on small inputs.
PARALLEL_MIN_WORK = 1 << 17


def _threads() -> int:
    return max(1, int(numba.get_num_threads()))


# With the GNU OpenMP threading layer, a process forked after the parent ran a parallel
# kernel aborts ("fork() called from a process already using GNU OpenMP") as soon as it enters
# a parallel region; fork-based DataLoader workers do exactly that.  In a forked child the
# serial drivers are used instead.
_PID = os.getpid()


def _parallel(work: int) -> bool:
    return work >= PARALLEL_MIN_WORK and _threads() > 1 and os.getpid() == _PID


def _plan_bands(B: int, oh: int, kh: int, sh: int, dh: int,
                parallel: bool = True) -> Tuple[int, int, int]:
    """Band length, band count and chunk count for a race-free backward scatter."""
    n = _threads() if parallel else 1
    lmin = (kh - 1) * dh // sh + 1
    per_image = math.ceil(4 * n / max(B, 1))  # aim at >= 4 work items per thread in all
    if per_image <= 1 or oh <= lmin:
        L, nbands = max(oh, 1), 1
    else:
        L = max(lmin, math.ceil(oh / per_image))
        nbands = math.ceil(oh / L)
    items = B * ((nbands + 1) // 2)
    return L, nbands, max(1, min(n, items))


_COMPUTE = (torch.float32, torch.float64)


def _prep(*ts: Optional[torch.Tensor]):
    """Contiguous tensors in a dtype Numba computes in (half types -> float32)."""
    out = []
    for t in ts:
        if t is None:
            out.append(None)
            continue
        t = t.detach()
        if t.dtype not in _COMPUTE:
            t = t.float()
        out.append(t.contiguous())
    return out


def _np(t: torch.Tensor) -> np.ndarray:
    return t.numpy()


def _dummy(like: torch.Tensor, ndim: int) -> np.ndarray:
    return np.zeros((1,) * ndim, dtype=_np(like).dtype)


def pac_dist_fwd(guide, center, kernel_size, stride, padding, dilation, asym, channel_wise):
    """Numba CPU ``pac_dist``: ``[b, Cg, H, W] -> [b, 1|Cg, kh, kw, oh, ow]``."""
    dtype = guide.dtype
    f, ctr = _prep(guide, center)
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    B, Cg, H, W = f.shape
    oh = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    D = torch.empty((B, Cg if channel_wise else 1, kh, kw, oh, ow), dtype=f.dtype)
    run = _dist_fwd if _parallel(B * Cg * kh * kw * oh * ow) else _dist_fwd_serial
    run(_np(f), _np(ctr) if ctr is not None else _dummy(f, 4), ctr is not None,
        kh, kw, sh, sw, ph, pw, dh, dw, bool(asym), bool(channel_wise), _np(D))
    return D.to(dtype)


def pac_dist_bwd(grad, guide, center, kernel_size, stride, padding, dilation, asym,
                 channel_wise):
    """Gradients of ``pac_dist``: ``(grad_guide [b,Cg,H,W], grad_center [b,Cg,oh,ow])``.

    Without a given centre the centre term is folded into ``grad_guide`` and ``grad_center``
    is still returned (it is the gradient w.r.t. the implicit centre taps).
    """
    dtype = guide.dtype
    gD, f, ctr = _prep(grad, guide, center)
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    B, Cg, H, W = f.shape
    oh, ow = gD.shape[4], gD.shape[5]
    gf = torch.zeros_like(f)
    gc = torch.empty((B, Cg, oh, ow), dtype=f.dtype)
    par = _parallel(B * Cg * kh * kw * oh * ow)
    L, nbands, nchunks = _plan_bands(B, oh, kh, sh, dh, par)
    run = _dist_bwd if par else _dist_bwd_serial
    run(_np(gD), _np(f), _np(ctr) if ctr is not None else _dummy(f, 4), ctr is not None,
        kh, kw, sh, sw, ph, pw, dh, dw, bool(asym), bool(channel_wise),
        L, nbands, nchunks, _np(gf), _np(gc))
    return gf.to(dtype), gc.to(dtype)


def pac_conv2d_fwd(x, K, weight, bias, stride, padding, dilation, shared_filters):
    """Numba CPU ``pac_conv2d``: ``[b, C, H, W] -> [b, O, oh, ow]``."""
    dtype = x.dtype
    if shared_filters:
        return pac_pool2d_fwd(x, K, tuple(weight.shape[-2:]), stride, padding, dilation,
                              weight=weight, bias=bias)
    xc, Kc, w, bc = _prep(x, K, weight, bias)
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    O, C, kh, kw = w.shape
    B = xc.shape[0]
    oh, ow = Kc.shape[4], Kc.shape[5]
    out = torch.empty((B, O, oh, ow), dtype=xc.dtype)
    W2 = w.reshape(O, C * kh * kw)
    if bc is None:
        bc = torch.zeros(O, dtype=xc.dtype)
    run = _conv_fwd if _parallel(B * O * C * kh * kw * oh * ow) else _conv_fwd_serial
    run(_np(xc), _np(Kc), _np(W2), _np(bc), kh, kw, sh, sw, ph, pw, dh, dw,
        min(_TILE, max(ow, 1)), _np(out))
    return out.to(dtype)


def pac_conv2d_bwd(grad, x, K, weight, stride, padding, dilation, shared_filters,
                   needs=(True, True, True)):
    """Gradients of ``pac_conv2d`` w.r.t. ``(x, K, weight)``; ``None`` where not needed.

    The bias gradient is ``grad.sum((0, 2, 3))`` and is left to the caller.
    """
    if shared_filters:
        return pac_pool2d_bwd(grad, x, K, tuple(weight.shape[-2:]), stride, padding, dilation,
                              needs=needs, weight=weight)
    need_x, need_k, need_w = (bool(v) for v in needs)
    dtypes = (x.dtype, K.dtype, weight.dtype)
    g, xc, Kc, w = _prep(grad, x, K, weight)
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    O, C, kh, kw = w.shape
    B, _, H, W = xc.shape
    oh, ow = g.shape[2], g.shape[3]
    R = C * kh * kw
    par = _parallel(B * O * R * oh * ow)
    L, nbands, nchunks = _plan_bands(B, oh, kh, sh, dh, par)
    gx = torch.zeros_like(xc) if need_x else torch.zeros((1, 1, 1, 1), dtype=xc.dtype)
    gK = torch.empty_like(Kc) if need_k else torch.zeros((1,) * 6, dtype=xc.dtype)
    gWp = torch.zeros((nchunks if need_w else 1, R if need_w else 1, O), dtype=xc.dtype)
    WT = w.reshape(O, R).t().contiguous()
    run = _conv_bwd if par else _conv_bwd_serial
    run(_np(g), _np(xc), _np(Kc), _np(WT), kh, kw, sh, sw, ph, pw, dh, dw,
        min(_TILE, max(ow, 1)), L, nbands, nchunks, need_x, need_k, need_w,
        _np(gx), _np(gK), _np(gWp))
    gW = gWp.sum(0).t().contiguous().reshape(O, C, kh, kw) if need_w else None
    return (gx.to(dtypes[0]) if need_x else None,
            gK.to(dtypes[1]) if need_k else None,
            gW.to(dtypes[2]) if need_w else None)


def pac_pool2d_fwd(x, K, kernel_size, stride, padding, dilation, weight=None, bias=None):
    """Numba CPU ``pac_pool2d`` (and, with ``weight`` [1,1,kh,kw], shared-filter ``pac_conv2d``)."""
    dtype = x.dtype
    xc, Kc, w, bc = _prep(x, K, weight, bias)
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    B, C = xc.shape[:2]
    oh, ow = Kc.shape[4], Kc.shape[5]
    tw = w.reshape(kh * kw) if w is not None else torch.ones(kh * kw, dtype=xc.dtype)
    out = torch.empty((B, C, oh, ow), dtype=xc.dtype)
    if bc is None:
        bc = torch.zeros(C, dtype=xc.dtype)
    run = _pool_fwd if _parallel(B * C * kh * kw * oh * ow) else _pool_fwd_serial
    run(_np(xc), _np(Kc), _np(tw), _np(bc), kh, kw, sh, sw, ph, pw, dh, dw, _np(out))
    return out.to(dtype)


def pac_pool2d_bwd(grad, x, K, kernel_size, stride, padding, dilation,
                   needs=(True, True, False), weight=None):
    """Gradients of ``pac_pool2d`` w.r.t. ``(x, K[, tap weight])``; ``None`` where not needed."""
    need_x, need_k = bool(needs[0]), bool(needs[1])
    need_w = weight is not None and bool(needs[2])
    dtypes = (x.dtype, K.dtype, weight.dtype if weight is not None else None)
    g, xc, Kc, w = _prep(grad, x, K, weight)
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    B = xc.shape[0]
    oh = g.shape[2]
    tw = w.reshape(kh * kw) if w is not None else torch.ones(kh * kw, dtype=xc.dtype)
    par = _parallel(B * xc.shape[1] * kh * kw * oh * g.shape[3])
    L, nbands, nchunks = _plan_bands(B, oh, kh, sh, dh, par)
    gx = torch.zeros_like(xc) if need_x else torch.zeros((1, 1, 1, 1), dtype=xc.dtype)
    gK = torch.empty_like(Kc) if need_k else torch.zeros((1,) * 6, dtype=xc.dtype)
    gtp = torch.zeros((nchunks, kh * kw), dtype=xc.dtype)
    run = _pool_bwd if par else _pool_bwd_serial
    run(_np(g), _np(xc), _np(Kc), _np(tw), kh, kw, sh, sw, ph, pw, dh, dw,
        L, nbands, nchunks, need_x, need_k, need_w, _np(gx), _np(gK), _np(gtp))
    gW = gtp.sum(0).reshape(1, 1, kh, kw) if need_w else None
    return (gx.to(dtypes[0]) if need_x else None,
            gK.to(dtypes[1]) if need_k else None,
            gW.to(dtypes[2]) if need_w else None)
