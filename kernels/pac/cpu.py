"""Fused PAC kernels for the CPU, written with Numba (``@njit(parallel=True)``).

None of these kernels materialises a whole ``[b, C*kh*kw, oh*ow]`` column tensor.

``pac_dist`` and ``pac_pool2d`` (also the depthwise, shared-filter ``pac_conv2d``) split the
work into output rows; per row they gather the ``kh*kw`` taps into small scratch rows and
accumulate in loops whose innermost loop runs over contiguous memory (so LLVM vectorises it
without ``fastmath``).

``pac_conv2d`` contracts over ``C*kh*kw`` for every output pixel, which is a matrix product;
it runs as GEMMs (``torch.mm``/``bmm``, i.e. MKL or OpenBLAS) over *blocks* of the output --
a few whole images, or a band of rows of one -- whose K-modulated columns are built by a
Numba kernel into one block-sized scratch buffer (``_BLOCK_BYTES``), a per-thread workspace
kept between calls (:func:`pacnet.kernels.runtime.release_workspace` frees it).  See the section
``pac_conv2d`` below for the exact formulas.

Backward passes scatter into the input gradient.  In ``pac_dist`` and ``pac_pool2d``, to do
that without atomics, output rows are grouped into *bands* of at least
``(kh-1)*dh // sh + 1`` rows: two bands that are not neighbours never touch the same input row,
so even bands run in parallel, then odd bands.  Within a band, rows run in order, and each
chunk of bands has a fixed partial sum, so results are deterministic for a given thread count.

Every parallel driver (``prange`` over rows or chunks, calling a serial per-item function) has
a serial twin, used for small inputs (below ``runtime.PARALLEL_MIN_WORK`` multiply-adds,
where waking the thread pool costs more than it saves) and in forked child processes; the
parallel drivers run on torch's OpenMP pool (:func:`pacnet.kernels.runtime.parallel`).

The Python functions at the bottom take and return torch tensors (CPU).  float16/bfloat16
inputs (and a float32 ``K`` beside them) are computed in float32 and the results cast back
to the inputs' dtypes.  Arguments are assumed valid: the
public wrappers in :mod:`pacnet.kernels.pac.ops` check them.
"""

from __future__ import annotations

import math
from typing import Tuple

import numpy as np
import torch
from numba import njit, prange

from pacnet.kernels import runtime
from pacnet.kernels.runtime import CPU_DTYPES, prep

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
# The contraction over C*kh*kw is left to torch.mm/bmm (MKL or OpenBLAS, several times the
# speed of hand-written loops).  The output is taken in *blocks*: ``nb`` whole images, or one
# image's band of ``ny`` output rows when a whole image is too big (``P = ny*ow`` pixels per
# image).  Per block a [nb, C*kh*kw, P] scratch holds the K-modulated columns
# ``cols[i, c*k2 + t, p] = K[b0+i, t, p] * x[b0+i, c, pos(p, t)]`` (0 outside the image), and
#   forward   out[i, :, block]  = W2 @ cols[i]
#   backward  gW               += g[i, :, block] @ cols[i]^T     (cols rebuilt, not saved)
#             G[i]              = W2^T @ g[i, :, block]          [C*kh*kw, P]
#             gK[i, t, p]       = sum_c G[i, c*k2 + t, p] * x[i, c, pos(p, t)]
#             gx[i, c, pos]    += G[i, c*k2 + t, p] * K[i, t, p]
# Blocks run one after another, so the scatter into gx never races; inside a block it runs
# in parallel over (image, channel) pairs, each owning a plane of gx, and gK over
# (image, tap, row) triples.  Sums run in a fixed order, so results are deterministic.

@njit(cache=True)
def _cols_row(it, x, K, b0, y0, ny, kh, kw, sh, sw, ph, pw, dh, dw, cols):
    """Row ``r = c*k2 + t`` of image ``b0 + i`` (``it = i*R + r``) of the modulated columns
    of output rows ``[y0, y0+ny)``."""
    H, Wd = x.shape[2], x.shape[3]
    ow = K.shape[5]
    k2 = kh * kw
    R = cols.shape[1]
    i = it // R
    r = it % R
    b = b0 + i
    c = r // k2
    ty = (r % k2) // kw
    tx = r % kw
    off = tx * dw - pw
    lo, hi = _jrange(off, sw, Wd, ow)
    m = hi - lo
    st = lo * sw + off
    for yy in range(ny):
        y = y0 + yy
        iy = y * sh - ph + ty * dh
        row = cols[i, r, yy * ow:(yy + 1) * ow]
        if iy < 0 or iy >= H or m <= 0:
            row[:] = 0
            continue
        row[:lo] = 0
        row[hi:] = 0
        xr = x[b, c, iy]
        if sw == 1:
            _mul(row[lo:hi], K[b, 0, ty, tx, y, lo:hi], xr[st:st + m], m)
        else:
            _mul(row[lo:hi], K[b, 0, ty, tx, y, lo:hi], xr[st:st + (m - 1) * sw + 1:sw], m)


@njit(**_OPTS)
def _cols(x, K, b0, y0, ny, kh, kw, sh, sw, ph, pw, dh, dw, cols):
    for it in prange(cols.shape[0] * cols.shape[1]):
        _cols_row(it, x, K, b0, y0, ny, kh, kw, sh, sw, ph, pw, dh, dw, cols)


@njit(cache=True)
def _cols_serial(x, K, b0, y0, ny, kh, kw, sh, sw, ph, pw, dh, dw, cols):
    for it in range(cols.shape[0] * cols.shape[1]):
        _cols_row(it, x, K, b0, y0, ny, kh, kw, sh, sw, ph, pw, dh, dw, cols)


@njit(cache=True)
def _cols_grad_x_plane(it, G, K, b0, y0, ny, kh, kw, sh, sw, ph, pw, dh, dw, gx):
    """``gx[b0+i, c] +=`` the block's column gradient ``G[i]`` times ``K``, scattered back
    (``it = i*C + c``)."""
    C, H, Wd = gx.shape[1], gx.shape[2], gx.shape[3]
    ow = K.shape[5]
    k2 = kh * kw
    i = it // C
    c = it % C
    b = b0 + i
    for t in range(k2):
        ty = t // kw
        tx = t % kw
        off = tx * dw - pw
        lo, hi = _jrange(off, sw, Wd, ow)
        m = hi - lo
        if m <= 0:
            continue
        st = lo * sw + off
        g = G[i, c * k2 + t]
        for yy in range(ny):
            y = y0 + yy
            iy = y * sh - ph + ty * dh
            if iy < 0 or iy >= H:
                continue
            gxr = gx[b, c, iy]
            gr = g[yy * ow + lo:yy * ow + hi]
            if sw == 1:
                _fma(gxr[st:st + m], gr, K[b, 0, ty, tx, y, lo:hi], m)
            else:
                _fma(gxr[st:st + (m - 1) * sw + 1:sw], gr, K[b, 0, ty, tx, y, lo:hi], m)


@njit(cache=True)
def _cols_grad_k_row(it, G, x, b0, y0, ny, kh, kw, sh, sw, ph, pw, dh, dw, gK):
    """``gK[b0+i, 0, t, y] = sum_c G[i, c*k2 + t, y] * x[b0+i, c, pos(y, t)]``
    (``it`` enumerates ``(i, t, y)``)."""
    C, H, Wd = x.shape[1], x.shape[2], x.shape[3]
    ow = gK.shape[5]
    k2 = kh * kw
    i = it // (k2 * ny)
    t = (it // ny) % k2
    yy = it % ny
    b = b0 + i
    ty = t // kw
    tx = t % kw
    y = y0 + yy
    iy = y * sh - ph + ty * dh
    off = tx * dw - pw
    lo, hi = _jrange(off, sw, Wd, ow)
    m = hi - lo
    st = lo * sw + off
    gkr = gK[b, 0, ty, tx, y]
    gkr[:] = 0
    if iy < 0 or iy >= H or m <= 0:
        return
    for c in range(C):
        xr = x[b, c, iy]
        gr = G[i, c * k2 + t, yy * ow + lo:yy * ow + hi]
        if sw == 1:
            _fma(gkr[lo:hi], gr, xr[st:st + m], m)
        else:
            _fma(gkr[lo:hi], gr, xr[st:st + (m - 1) * sw + 1:sw], m)


@njit(**_OPTS)
def _cols_grad(G, x, K, b0, y0, ny, kh, kw, sh, sw, ph, pw, dh, dw, need_x, need_k, gx, gK):
    nb = G.shape[0]
    if need_x:
        for it in prange(nb * x.shape[1]):
            _cols_grad_x_plane(it, G, K, b0, y0, ny, kh, kw, sh, sw, ph, pw, dh, dw, gx)
    if need_k:
        for it in prange(nb * kh * kw * ny):
            _cols_grad_k_row(it, G, x, b0, y0, ny, kh, kw, sh, sw, ph, pw, dh, dw, gK)


@njit(cache=True)
def _cols_grad_serial(G, x, K, b0, y0, ny, kh, kw, sh, sw, ph, pw, dh, dw, need_x, need_k, gx,
                      gK):
    nb = G.shape[0]
    if need_x:
        for it in range(nb * x.shape[1]):
            _cols_grad_x_plane(it, G, K, b0, y0, ny, kh, kw, sh, sw, ph, pw, dh, dw, gx)
    if need_k:
        for it in range(nb * kh * kw * ny):
            _cols_grad_k_row(it, G, x, b0, y0, ny, kh, kw, sh, sw, ph, pw, dh, dw, gK)


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
# Threading, the small-work and forked-child policies, prep and workspaces come from
# pacnet.kernels.runtime (shared with the segaware kernels).

def _plan_bands(B: int, oh: int, kh: int, sh: int, dh: int,
                parallel: bool = True) -> Tuple[int, int, int]:
    """Band length, band count and chunk count for a race-free backward scatter."""
    n = runtime.threads() if parallel else 1
    lmin = (kh - 1) * dh // sh + 1
    per_image = math.ceil(4 * n / max(B, 1))  # aim at >= 4 work items per thread in all
    if per_image <= 1 or oh <= lmin:
        L, nbands = max(oh, 1), 1
    else:
        L = max(lmin, math.ceil(oh / per_image))
        nbands = math.ceil(oh / L)
    items = B * ((nbands + 1) // 2)
    return L, nbands, max(1, min(n, items))


def _np(t: torch.Tensor) -> np.ndarray:
    return t.numpy()


def _dummy(like: torch.Tensor, ndim: int) -> np.ndarray:
    return np.zeros((1,) * ndim, dtype=_np(like).dtype)


def pac_dist_fwd(guide, center, kernel_size, stride, padding, dilation, asym, channel_wise):
    """Numba CPU ``pac_dist``: ``[b, Cg, H, W] -> [b, 1|Cg, kh, kw, oh, ow]``."""
    dtype = guide.dtype
    f, ctr = prep(guide, center)
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    B, Cg, H, W = f.shape
    oh = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    D = torch.empty((B, Cg if channel_wise else 1, kh, kw, oh, ow), dtype=f.dtype)
    run = _dist_fwd if runtime.parallel(B * Cg * kh * kw * oh * ow) else _dist_fwd_serial
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
    gD, f, ctr = prep(grad, guide, center)
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    B, Cg, H, W = f.shape
    oh, ow = gD.shape[4], gD.shape[5]
    gf = torch.zeros_like(f)
    gc = torch.empty((B, Cg, oh, ow), dtype=f.dtype)
    par = runtime.parallel(B * Cg * kh * kw * oh * ow)
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
    xc, Kc, w, bc = prep(x, K, weight, bias)
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    O, C, kh, kw = w.shape
    out = torch.empty((xc.shape[0], O, Kc.shape[4], Kc.shape[5]), dtype=xc.dtype)
    _conv_fwd_gemm(xc, Kc, w.reshape(O, C * kh * kw), bc, (kh, kw, sh, sw, ph, pw, dh, dw), out)
    return out.to(dtype)


def pac_conv2d_add_(out, x, K, weight, stride, padding, dilation, shared_filters, alpha):
    """``out += alpha * pac_conv2d(x, K, weight)`` in place, through the block GEMMs (no
    output-sized temporary); shared filters and half-precision ``out`` add a computed product."""
    if shared_filters or out.dtype not in CPU_DTYPES:
        out.add_(pac_conv2d_fwd(x, K, weight, None, stride, padding, dilation, shared_filters),
                 alpha=alpha)
        return
    xc, Kc, w = prep(x, K, weight)
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    O, C, kh, kw = w.shape
    _conv_fwd_gemm(xc, Kc, w.reshape(O, C * kh * kw), None, (kh, kw, sh, sw, ph, pw, dh, dw),
                   out, alpha=alpha)


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
    g, xc, Kc, w = prep(grad, x, K, weight)
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    O, C, kh, kw = w.shape
    gx = torch.zeros_like(xc) if need_x else None
    gK = torch.empty_like(Kc) if need_k else None
    gW2 = torch.zeros((O, C * kh * kw), dtype=xc.dtype) if need_w else None
    _conv_bwd_gemm(g, xc, Kc, w.reshape(O, C * kh * kw), (kh, kw, sh, sw, ph, pw, dh, dw),
                   gx, gK, gW2)
    gW = gW2.reshape(O, C, kh, kw) if need_w else None
    return (gx.to(dtypes[0]) if need_x else None,
            gK.to(dtypes[1]) if need_k else None,
            gW.to(dtypes[2]) if need_w else None)


_BLOCK_BYTES = 16 << 20  # one block's column scratch (large blocks keep the GEMMs efficient)


def _blocks(B: int, R: int, oh: int, ow: int, itemsize: int):
    """Blocks ``(b0, nb, y0, ny)`` whose ``[nb, R, ny*ow]`` column scratch fits
    ``_BLOCK_BYTES``: several whole images, or bands of rows of one; and the scratch size."""
    return runtime.row_blocks(B, R, oh, ow, itemsize, _BLOCK_BYTES)


def _conv_fwd_gemm(xc, Kc, W2, bc, geo, out, alpha=None):
    """Forward by block GEMMs into ``out`` [B, O, oh, ow] (``geo`` = kh, kw, sh, sw, ph, pw,
    dh, dw; ``W2`` [O, C*kh*kw]); with ``alpha``, ``out += alpha * W2 @ cols`` instead."""
    B, O, oh, ow = out.shape
    R = W2.shape[1]
    blocks, size = _blocks(B, R, oh, ow, xc.element_size())
    scratch = runtime.workspace(size, xc.dtype, xc.device)
    fill = _cols if runtime.parallel(size) else _cols_serial
    xn, Kn = _np(xc), _np(Kc)
    flat = out.view(B, O, oh * ow)
    for b0, nb, y0, ny in blocks:
        cols = scratch[:nb * R * ny * ow].view(nb, R, ny * ow)
        fill(xn, Kn, b0, y0, ny, *geo, _np(cols))
        dst = flat[b0:b0 + nb, :, y0 * ow:(y0 + ny) * ow]
        if alpha is not None:
            dst.baddbmm_(W2.expand(nb, -1, -1), cols, alpha=alpha)
        elif bc is None:
            torch.matmul(W2, cols, out=dst)
        else:
            torch.baddbmm(bc[None, :, None], W2.expand(nb, -1, -1), cols, out=dst)


def _conv_bwd_gemm(g, xc, Kc, W2, geo, gx, gK, gW2):
    """Backward by block GEMMs: accumulates into ``gx`` and ``gW2`` [O, C*k2], fills ``gK``
    (each ``None`` when not wanted).  One scratch buffer holds a block's columns for the
    weight gradient, then its column gradient ``G``."""
    B, O, oh, ow = g.shape
    R = W2.shape[1]
    blocks, size = _blocks(B, R, oh, ow, xc.element_size())
    par = runtime.parallel(size)
    xn, Kn = _np(xc), _np(Kc)
    flat = g.reshape(B, O, oh * ow)
    need_x, need_k = gx is not None, gK is not None
    scratch = runtime.workspace(size, xc.dtype, xc.device)
    gxn = _np(gx) if need_x else _dummy(xc, 4)
    gKn = _np(gK) if need_k else _dummy(xc, 6)
    for b0, nb, y0, ny in blocks:
        gb = flat[b0:b0 + nb, :, y0 * ow:(y0 + ny) * ow]
        buf = scratch[:nb * R * ny * ow].view(nb, R, ny * ow)
        if gW2 is not None:
            (_cols if par else _cols_serial)(xn, Kn, b0, y0, ny, *geo, _np(buf))
            for i in range(nb):
                gW2.addmm_(gb[i], buf[i].t())
        if need_x or need_k:
            torch.matmul(W2.t(), gb, out=buf)
            (_cols_grad if par else _cols_grad_serial)(
                _np(buf), xn, Kn, b0, y0, ny, *geo, need_x, need_k, gxn, gKn)


def pac_pool2d_fwd(x, K, kernel_size, stride, padding, dilation, weight=None, bias=None):
    """Numba CPU ``pac_pool2d`` (and, with ``weight`` [1,1,kh,kw], shared-filter ``pac_conv2d``)."""
    dtype = x.dtype
    xc, Kc, w, bc = prep(x, K, weight, bias)
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    B, C = xc.shape[:2]
    oh, ow = Kc.shape[4], Kc.shape[5]
    tw = w.reshape(kh * kw) if w is not None else torch.ones(kh * kw, dtype=xc.dtype)
    out = torch.empty((B, C, oh, ow), dtype=xc.dtype)
    if bc is None:
        bc = torch.zeros(C, dtype=xc.dtype)
    run = _pool_fwd if runtime.parallel(B * C * kh * kw * oh * ow) else _pool_fwd_serial
    run(_np(xc), _np(Kc), _np(tw), _np(bc), kh, kw, sh, sw, ph, pw, dh, dw, _np(out))
    return out.to(dtype)


def pac_pool2d_bwd(grad, x, K, kernel_size, stride, padding, dilation,
                   needs=(True, True, False), weight=None):
    """Gradients of ``pac_pool2d`` w.r.t. ``(x, K[, tap weight])``; ``None`` where not needed."""
    need_x, need_k = bool(needs[0]), bool(needs[1])
    need_w = weight is not None and bool(needs[2])
    dtypes = (x.dtype, K.dtype, weight.dtype if weight is not None else None)
    g, xc, Kc, w = prep(grad, x, K, weight)
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    B = xc.shape[0]
    oh = g.shape[2]
    tw = w.reshape(kh * kw) if w is not None else torch.ones(kh * kw, dtype=xc.dtype)
    par = runtime.parallel(B * xc.shape[1] * kh * kw * oh * g.shape[3])
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
