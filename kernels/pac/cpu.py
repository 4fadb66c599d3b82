"""Fused PAC kernels for the CPU, written with Numba (``@njit(parallel=True)``).

One code path serves every spatial rank (1-D, 2-D, 3-D): the kernels index a 3-D window
geometry (:class:`~pacnet.kernels.pac.geometry.Geometry`: 2-D is depth 1, 1-D depth and
height 1) over inputs viewed as ``[B, C, D*H, W]``, adaptive kernels as
``[B, kc, kd*kh*kw, od*oh, ow]`` and outputs as ``[B, O, od*oh, ow]``: an output *row* is
one ``(z, y)`` pair, and each of its taps reads one input row ``iz*H + iy`` (or none).
None of these kernels materialises a whole ``[b, C*k^r, out]`` column tensor.

``pac_dist`` and ``pac_pool`` (also the depthwise, shared-filter ``pac_conv``) split the
work into output rows; per row they gather the taps into small scratch rows and accumulate
in loops whose innermost loop runs over contiguous memory (so LLVM vectorises it without
``fastmath``).

``pac_conv`` contracts over ``C*k^r`` for every output pixel, which is a matrix product; it
runs as GEMMs (``torch.mm``/``bmm``, i.e. MKL or OpenBLAS) over *blocks* of the output -- a
few whole images, or a band of rows of one -- whose K-modulated columns are built by a Numba
kernel into one block-sized scratch buffer (``_BLOCK_BYTES``), a per-thread workspace kept
between calls (:func:`pacnet.kernels.runtime.release_workspace` frees it).  See the section
``pac_conv`` below for the exact formulas.

Backward passes scatter into the input gradient.  In ``pac_dist`` and ``pac_pool``, to do
that without atomics, output rows are grouped into *bands* (:meth:`Geometry.band_unit`: whole
output planes when there are several, else rows) long enough that two bands that are not
neighbours never touch the same input row, so even bands run in parallel, then odd bands.
Within a band, rows run in order, and each chunk of bands has a fixed partial sum, so
results are deterministic for a given thread count.

Every parallel driver (``prange`` over rows or chunks, calling a serial per-item function) has
a serial twin, used for small inputs (below ``runtime.PARALLEL_MIN_WORK`` multiply-adds,
where waking the thread pool costs more than it saves) and in forked child processes; the
parallel drivers run on torch's OpenMP pool (:func:`pacnet.kernels.runtime.parallel`).

The Python functions at the bottom take and return torch tensors (CPU).  float16/bfloat16
inputs (and a float32 ``K`` beside them) are computed in float32 and the results cast back
to the inputs' dtypes.  Arguments are assumed valid: the public wrappers in
:mod:`pacnet.kernels.pac.ops` check them.
"""

from __future__ import annotations

import math
from typing import Tuple

import numpy as np
import torch
from numba import njit, prange

from pacnet.kernels import runtime
from pacnet.kernels.runtime import CPU_DTYPES, prep

from .geometry import Geometry

_OPTS = dict(parallel=True, cache=True, fastmath=False, nogil=True)


# ----------------------------------------------------------------------------- helpers
# Numba wraps negative indices, and the select that does it (``i < 0 ? i + n : i``) stops
# LLVM from vectorising a loop whose index carries a runtime offset (measured 16x slower).
# So inner loops run ``j`` over ``range(m)`` on row *views* that already start at the right
# place.  A stride-1 view and a strided view are different Numba types, so every gather and
# scatter is written as ``if sw == 1: helper(contiguous view) else: helper(strided view)``.
#
# Geometry arguments are the 3-tuples of Geometry: ks, ss, ps, ds (depth, height, width),
# ins = (D, H, W) and oh, the output rows per plane (row = z*oh + y).

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
def _tap(t, ks):
    """Tap ``t`` of a ``ks = (kd, kh, kw)`` window as ``(tz, ty, tx)``."""
    khw = ks[1] * ks[2]
    tz = t // khw
    ty = (t - tz * khw) // ks[2]
    return tz, ty, t - tz * khw - ty * ks[2]


@njit(cache=True)
def _in_row(z, y, tz, ty, ss, ps, ds, ins):
    """The input row ``iz*H + iy`` that tap ``(tz, ty)`` of output row ``(z, y)`` reads, or
    -1 outside the input."""
    iz = z * ss[0] - ps[0] + tz * ds[0]
    iy = y * ss[1] - ps[1] + ty * ds[1]
    if iz < 0 or iz >= ins[0] or iy < 0 or iy >= ins[1]:
        return -1
    return iz * ins[1] + iy


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
def _taps(row, ow, ks, ss, ps, ds, ins, oh, tab):
    """The tap table ``tab`` [4, k3] of output row ``row``: per tap ``t`` the in-input output
    columns ``[tab[0, t], tab[1, t])``, the input column ``tab[2, t]`` of column
    ``tab[0, t]`` and the input row ``tab[3, t]`` it reads (0 when outside, with an empty
    range)."""
    z = row // oh
    y = row - z * oh
    kh, kw = ks[1], ks[2]
    for tz in range(ks[0]):
        for ty in range(kh):
            q = _in_row(z, y, tz, ty, ss, ps, ds, ins)
            for tx in range(kw):
                t = (tz * kh + ty) * kw + tx
                off = tx * ds[2] - ps[2]
                lo, hi = _jrange(off, ss[2], ins[2], ow)
                if q < 0:
                    hi = lo
                tab[0, t] = lo
                tab[1, t] = hi
                tab[2, t] = lo * ss[2] + off
                tab[3, t] = max(q, 0)


@njit(cache=True)
def _centre(ks):
    """The centre tap's flat index."""
    return ((ks[0] // 2) * ks[1] + ks[1] // 2) * ks[2] + ks[2] // 2


# ----------------------------------------------------------------------------- pac_dist
# f [B, Cg, D*H, W]; ctr [B, Cg, rows, ow]; D [B, 1|Cg, k3, rows, ow]

@njit(**_OPTS)
def _dist_fwd(f, ctr, has_ctr, ks, ss, ps, ds, ins, oh, asym, cw, D):
    for it in prange(f.shape[0] * D.shape[3]):
        _dist_fwd_row(it, f, ctr, has_ctr, ks, ss, ps, ds, ins, oh, asym, cw, D)


@njit(cache=True)
def _dist_fwd_serial(f, ctr, has_ctr, ks, ss, ps, ds, ins, oh, asym, cw, D):
    for it in range(f.shape[0] * D.shape[3]):
        _dist_fwd_row(it, f, ctr, has_ctr, ks, ss, ps, ds, ins, oh, asym, cw, D)


@njit(cache=True)
def _dist_fwd_row(it, f, ctr, has_ctr, ks, ss, ps, ds, ins, oh, asym, cw, D):
    Cg = f.shape[1]
    rows, ow = D.shape[3], D.shape[4]
    k3 = D.shape[2]
    sw = ss[2]
    c_t = _centre(ks)
    b = it // rows
    row = it % rows
    tab = np.empty((4, k3), np.int64)
    _taps(row, ow, ks, ss, ps, ds, ins, oh, tab)
    cbuf = np.zeros((Cg, ow), dtype=f.dtype)
    lo = tab[0, c_t]
    m = tab[1, c_t] - lo
    st = tab[2, c_t]
    for cg in range(Cg):
        if has_ctr:
            _copy(cbuf[cg], ctr[b, cg, row], ow)
        elif m > 0:
            fr = f[b, cg, tab[3, c_t]]
            if sw == 1:
                _copy(cbuf[cg, lo:lo + m], fr[st:st + m], m)
            else:
                _copy(cbuf[cg, lo:lo + m], fr[st:st + (m - 1) * sw + 1:sw], m)
    acc = np.empty(ow, dtype=f.dtype)
    for t in range(k3):
        lo = tab[0, t]
        m = tab[1, t] - lo
        st = tab[2, t]
        for cg in range(Cg):
            cr = cbuf[cg]
            for j in range(ow):
                acc[j] = -cr[j]  # f - c, with f = 0 outside the image
            if m > 0:
                fr = f[b, cg, tab[3, t]]
                if sw == 1:
                    _add(acc[lo:lo + m], fr[st:st + m], m)
                else:
                    _add(acc[lo:lo + m], fr[st:st + (m - 1) * sw + 1:sw], m)
            if asym:
                for j in range(ow):
                    if acc[j] < 0:
                        acc[j] = 0
            dr = D[b, cg if cw else 0, t, row]
            if cw or cg == 0:
                _mul(dr, acc, acc, ow)
            else:
                _fma(dr, acc, acc, ow)


@njit(**_OPTS)
def _dist_bwd(gD, f, ctr, has_ctr, ks, ss, ps, ds, ins, oh, asym, cw,
              L, nbands, nchunks, gf, gc):
    for phase in range(2):
        for ch in prange(nchunks):
            _dist_bwd_chunk(ch, phase, gD, f, ctr, has_ctr, ks, ss, ps, ds, ins, oh, asym, cw,
                            L, nbands, nchunks, gf, gc)


@njit(cache=True)
def _dist_bwd_serial(gD, f, ctr, has_ctr, ks, ss, ps, ds, ins, oh, asym, cw,
                     L, nbands, nchunks, gf, gc):
    for phase in range(2):
        for ch in range(nchunks):
            _dist_bwd_chunk(ch, phase, gD, f, ctr, has_ctr, ks, ss, ps, ds, ins, oh, asym, cw,
                            L, nbands, nchunks, gf, gc)


@njit(cache=True)
def _dist_bwd_chunk(ch, phase, gD, f, ctr, has_ctr, ks, ss, ps, ds, ins, oh, asym, cw,
                    L, nbands, nchunks, gf, gc):
    B, Cg = f.shape[0], f.shape[1]
    k3, rows, ow = gD.shape[2], gD.shape[3], gD.shape[4]
    sw = ss[2]
    c_t = _centre(ks)
    nb = (nbands - phase + 1) // 2
    nitems = B * nb
    tab = np.empty((4, k3), np.int64)
    cbuf = np.empty((Cg, ow), dtype=f.dtype)
    gcb = np.empty((Cg, ow), dtype=f.dtype)
    e = np.empty(ow, dtype=f.dtype)
    for it in range(ch * nitems // nchunks, (ch + 1) * nitems // nchunks):
        b, r0 = _band_item(it, nb, phase, L)
        for row in range(r0, min(rows, r0 + L)):
            _taps(row, ow, ks, ss, ps, ds, ins, oh, tab)
            loc = tab[0, c_t]
            mc = tab[1, c_t] - loc
            stc = tab[2, c_t]
            cbuf[:, :] = 0
            gcb[:, :] = 0
            for cg in range(Cg):
                if has_ctr:
                    _copy(cbuf[cg], ctr[b, cg, row], ow)
                elif mc > 0:
                    fr = f[b, cg, tab[3, c_t]]
                    if sw == 1:
                        _copy(cbuf[cg, loc:loc + mc], fr[stc:stc + mc], mc)
                    else:
                        _copy(cbuf[cg, loc:loc + mc], fr[stc:stc + (mc - 1) * sw + 1:sw],
                              mc)
            for t in range(k3):
                lo = tab[0, t]
                m = tab[1, t] - lo
                st = tab[2, t]
                for cg in range(Cg):
                    cr = cbuf[cg]
                    for j in range(ow):
                        e[j] = -cr[j]
                    if m > 0:
                        fr = f[b, cg, tab[3, t]]
                        if sw == 1:
                            _add(e[lo:lo + m], fr[st:st + m], m)
                        else:
                            _add(e[lo:lo + m], fr[st:st + (m - 1) * sw + 1:sw], m)
                    if asym:
                        for j in range(ow):
                            if e[j] < 0:
                                e[j] = 0
                    # e <- dD/d f(tap) = 2 * diff * gD;  dD/d centre = -e
                    gr = gD[b, cg if cw else 0, t, row]
                    gcr = gcb[cg]
                    for j in range(ow):
                        v = (e[j] + e[j]) * gr[j]
                        e[j] = v
                        gcr[j] -= v
                    if m > 0:
                        gfr = gf[b, cg, tab[3, t]]
                        if sw == 1:
                            _add(gfr[st:st + m], e[lo:lo + m], m)
                        else:
                            _add(gfr[st:st + (m - 1) * sw + 1:sw], e[lo:lo + m], m)
            for cg in range(Cg):
                _copy(gc[b, cg, row], gcb[cg], ow)
                if not has_ctr and mc > 0:
                    gfr = gf[b, cg, tab[3, c_t]]
                    if sw == 1:
                        _add(gfr[stc:stc + mc], gcb[cg, loc:loc + mc], mc)
                    else:
                        _add(gfr[stc:stc + (mc - 1) * sw + 1:sw], gcb[cg, loc:loc + mc],
                             mc)


# ----------------------------------------------------------------------------- pac_conv
# The contraction over C*k3 (k3 = kd*kh*kw taps) is left to torch.mm/bmm (MKL or OpenBLAS,
# several times the speed of hand-written loops).  The output is taken in *blocks*: ``nb``
# whole images, or one image's band of ``nr`` output rows when a whole image is too big
# (``P = nr*ow`` pixels per image).  Per block a [nb, C*k3, P] scratch holds the K-modulated
# columns ``cols[i, c*k3 + t, p] = K[b0+i, t, p] * x[b0+i, c, pos(p, t)]`` (0 outside the
# image), and
#   forward   out[i, :, block]  = W2 @ cols[i]
#   backward  gW               += g[i, :, block] @ cols[i]^T     (cols rebuilt, not saved)
#             G[i]              = W2^T @ g[i, :, block]          [C*k3, P]
#             gK[i, t, p]       = sum_c G[i, c*k3 + t, p] * x[i, c, pos(p, t)]
#             gx[i, c, pos]    += G[i, c*k3 + t, p] * K[i, t, p]
# Blocks run one after another, so the scatter into gx never races; inside a block it runs
# in parallel over (image, channel) pairs, each owning a plane of gx, and gK over
# (image, tap, row) triples.  Sums run in a fixed order, so results are deterministic.
# x/gx [B, C, D*H, W]; K/gK [B, 1, k3, rows, ow]; cols/G [nb, C*k3, nr*ow].

@njit(cache=True)
def _cols_row(it, x, K, b0, r0, nr, ks, ss, ps, ds, ins, oh, cols):
    """Row ``r = c*k3 + t`` of image ``b0 + i`` (``it = i*R + r``) of the modulated columns
    of output rows ``[r0, r0+nr)``."""
    ow = K.shape[4]
    k3 = K.shape[2]
    R = cols.shape[1]
    sw = ss[2]
    i = it // R
    r = it % R
    b = b0 + i
    c = r // k3
    t = r % k3
    tz, ty, tx = _tap(t, ks)
    off = tx * ds[2] - ps[2]
    lo, hi = _jrange(off, sw, ins[2], ow)
    m = hi - lo
    st = lo * sw + off
    z = r0 // oh
    y = r0 - z * oh
    for rr in range(nr):
        q = _in_row(z, y, tz, ty, ss, ps, ds, ins)
        dst = cols[i, r, rr * ow:(rr + 1) * ow]
        if q < 0 or m <= 0:
            dst[:] = 0
        else:
            dst[:lo] = 0
            dst[hi:] = 0
            xr = x[b, c, q]
            kr = K[b, 0, t, r0 + rr, lo:hi]
            if sw == 1:
                _mul(dst[lo:hi], kr, xr[st:st + m], m)
            else:
                _mul(dst[lo:hi], kr, xr[st:st + (m - 1) * sw + 1:sw], m)
        y += 1
        if y == oh:
            y = 0
            z += 1


@njit(**_OPTS)
def _cols(x, K, b0, r0, nr, ks, ss, ps, ds, ins, oh, cols):
    for it in prange(cols.shape[0] * cols.shape[1]):
        _cols_row(it, x, K, b0, r0, nr, ks, ss, ps, ds, ins, oh, cols)


@njit(cache=True)
def _cols_serial(x, K, b0, r0, nr, ks, ss, ps, ds, ins, oh, cols):
    for it in range(cols.shape[0] * cols.shape[1]):
        _cols_row(it, x, K, b0, r0, nr, ks, ss, ps, ds, ins, oh, cols)


@njit(cache=True)
def _cols_grad_x_plane(it, G, K, b0, r0, nr, ks, ss, ps, ds, ins, oh, gx):
    """``gx[b0+i, c] +=`` the block's column gradient ``G[i]`` times ``K``, scattered back
    (``it = i*C + c``)."""
    C = gx.shape[1]
    ow = K.shape[4]
    k3 = K.shape[2]
    sw = ss[2]
    i = it // C
    c = it % C
    b = b0 + i
    for t in range(k3):
        tz, ty, tx = _tap(t, ks)
        off = tx * ds[2] - ps[2]
        lo, hi = _jrange(off, sw, ins[2], ow)
        m = hi - lo
        if m <= 0:
            continue
        st = lo * sw + off
        g = G[i, c * k3 + t]
        z = r0 // oh
        y = r0 - z * oh
        for rr in range(nr):
            q = _in_row(z, y, tz, ty, ss, ps, ds, ins)
            y += 1
            if y == oh:
                y = 0
                z += 1
            if q < 0:
                continue
            gxr = gx[b, c, q]
            gr = g[rr * ow + lo:rr * ow + hi]
            kr = K[b, 0, t, r0 + rr, lo:hi]
            if sw == 1:
                _fma(gxr[st:st + m], gr, kr, m)
            else:
                _fma(gxr[st:st + (m - 1) * sw + 1:sw], gr, kr, m)


@njit(cache=True)
def _cols_grad_k_row(it, G, x, b0, r0, nr, ks, ss, ps, ds, ins, oh, gK):
    """``gK[b0+i, 0, t, row] = sum_c G[i, c*k3 + t, row] * x[b0+i, c, pos(row, t)]``
    (``it`` enumerates ``(i, t, rr)``, ``row = r0 + rr``)."""
    C = x.shape[1]
    k3, ow = gK.shape[2], gK.shape[4]
    sw = ss[2]
    i = it // (k3 * nr)
    t = (it // nr) % k3
    rr = it % nr
    b = b0 + i
    row = r0 + rr
    tz, ty, tx = _tap(t, ks)
    z = row // oh
    q = _in_row(z, row - z * oh, tz, ty, ss, ps, ds, ins)
    off = tx * ds[2] - ps[2]
    lo, hi = _jrange(off, sw, ins[2], ow)
    m = hi - lo
    st = lo * sw + off
    gkr = gK[b, 0, t, row]
    gkr[:] = 0
    if q < 0 or m <= 0:
        return
    for c in range(C):
        xr = x[b, c, q]
        gr = G[i, c * k3 + t, rr * ow + lo:rr * ow + hi]
        if sw == 1:
            _fma(gkr[lo:hi], gr, xr[st:st + m], m)
        else:
            _fma(gkr[lo:hi], gr, xr[st:st + (m - 1) * sw + 1:sw], m)


@njit(**_OPTS)
def _cols_grad(G, x, K, b0, r0, nr, ks, ss, ps, ds, ins, oh, need_x, need_k, gx, gK):
    nb = G.shape[0]
    k3 = K.shape[2]
    if need_x:
        for it in prange(nb * x.shape[1]):
            _cols_grad_x_plane(it, G, K, b0, r0, nr, ks, ss, ps, ds, ins, oh, gx)
    if need_k:
        for it in prange(nb * k3 * nr):
            _cols_grad_k_row(it, G, x, b0, r0, nr, ks, ss, ps, ds, ins, oh, gK)


@njit(cache=True)
def _cols_grad_serial(G, x, K, b0, r0, nr, ks, ss, ps, ds, ins, oh, need_x, need_k, gx, gK):
    nb = G.shape[0]
    k3 = K.shape[2]
    if need_x:
        for it in range(nb * x.shape[1]):
            _cols_grad_x_plane(it, G, K, b0, r0, nr, ks, ss, ps, ds, ins, oh, gx)
    if need_k:
        for it in range(nb * k3 * nr):
            _cols_grad_k_row(it, G, x, b0, r0, nr, ks, ss, ps, ds, ins, oh, gK)


# ----------------------------------------------------------------------------- pac_pool
# (also the depthwise, shared-filter pac_conv: tap weights ``tw`` [k3] and a bias)
# x/gx [B, C, D*H, W]; K/gK [B, 1|C, k3, rows, ow]; out/gout [B, C, rows, ow].

@njit(**_OPTS)
def _pool_fwd(x, K, tw, bias, ks, ss, ps, ds, ins, oh, out):
    for it in prange(x.shape[0] * out.shape[2]):
        _pool_fwd_row(it, x, K, tw, bias, ks, ss, ps, ds, ins, oh, out)


@njit(cache=True)
def _pool_fwd_serial(x, K, tw, bias, ks, ss, ps, ds, ins, oh, out):
    for it in range(x.shape[0] * out.shape[2]):
        _pool_fwd_row(it, x, K, tw, bias, ks, ss, ps, ds, ins, oh, out)


@njit(cache=True)
def _pool_fwd_row(it, x, K, tw, bias, ks, ss, ps, ds, ins, oh, out):
    C = x.shape[1]
    kc, k3 = K.shape[1], K.shape[2]
    rows, ow = out.shape[2], out.shape[3]
    sw = ss[2]
    b = it // rows
    row = it % rows
    tab = np.empty((4, k3), np.int64)
    _taps(row, ow, ks, ss, ps, ds, ins, oh, tab)
    WK = np.empty((k3, ow), dtype=x.dtype)
    acc = np.empty(ow, dtype=x.dtype)
    for c in range(C):
        if c == 0 or kc > 1:
            kk = c if kc > 1 else 0
            for t in range(k3):
                wt = tw[t]
                kr = K[b, kk, t, row]
                wr = WK[t]
                for j in range(ow):
                    wr[j] = wt * kr[j]
        acc[:] = 0
        for t in range(k3):
            lo = tab[0, t]
            m = tab[1, t] - lo
            st = tab[2, t]
            if m > 0:
                xr = x[b, c, tab[3, t]]
                if sw == 1:
                    _fma(acc[lo:lo + m], WK[t, lo:lo + m], xr[st:st + m], m)
                else:
                    _fma(acc[lo:lo + m], WK[t, lo:lo + m], xr[st:st + (m - 1) * sw + 1:sw], m)
        orow = out[b, c, row]
        bc = bias[c]
        for j in range(ow):
            orow[j] = acc[j] + bc


@njit(**_OPTS)
def _pool_bwd(gout, x, K, tw, ks, ss, ps, ds, ins, oh, L, nbands, nchunks,
              need_x, need_k, need_w, gx, gK, gtp):
    for phase in range(2):
        for ch in prange(nchunks):
            _pool_bwd_chunk(ch, phase, gout, x, K, tw, ks, ss, ps, ds, ins, oh, L, nbands,
                            nchunks, need_x, need_k, need_w, gx, gK, gtp)


@njit(cache=True)
def _pool_bwd_serial(gout, x, K, tw, ks, ss, ps, ds, ins, oh, L, nbands, nchunks,
                     need_x, need_k, need_w, gx, gK, gtp):
    for phase in range(2):
        for ch in range(nchunks):
            _pool_bwd_chunk(ch, phase, gout, x, K, tw, ks, ss, ps, ds, ins, oh, L, nbands,
                            nchunks, need_x, need_k, need_w, gx, gK, gtp)


@njit(cache=True)
def _pool_bwd_chunk(ch, phase, gout, x, K, tw, ks, ss, ps, ds, ins, oh, L, nbands,
                    nchunks, need_x, need_k, need_w, gx, gK, gtp):
    B, C = x.shape[0], x.shape[1]
    kc, k3 = K.shape[1], K.shape[2]
    rows, ow = gout.shape[2], gout.shape[3]
    sw = ss[2]
    need_q = need_k or need_w
    nb = (nbands - phase + 1) // 2
    nitems = B * nb
    tab = np.empty((4, k3), np.int64)
    WK = np.empty((k3, ow), dtype=x.dtype)
    gq = np.empty((k3, ow), dtype=x.dtype)
    gtw = gtp[ch]
    for it in range(ch * nitems // nchunks, (ch + 1) * nitems // nchunks):
        b, r0 = _band_item(it, nb, phase, L)
        for row in range(r0, min(rows, r0 + L)):
            _taps(row, ow, ks, ss, ps, ds, ins, oh, tab)
            for c in range(C):
                kk = c if kc > 1 else 0
                first = c == 0 or kc > 1
                if need_x and first:
                    for t in range(k3):
                        wt = tw[t]
                        kr = K[b, kk, t, row]
                        wr = WK[t]
                        for j in range(ow):
                            wr[j] = wt * kr[j]
                if need_q and first:
                    gq[:, :] = 0  # gq[t, j] = sum over the channels sharing K of g * x
                gr = gout[b, c, row]
                for t in range(k3):
                    lo = tab[0, t]
                    m = tab[1, t] - lo
                    st = tab[2, t]
                    if m == 0:
                        continue
                    if need_q:
                        xr = x[b, c, tab[3, t]]
                        if sw == 1:
                            _fma(gq[t, lo:lo + m], gr[lo:lo + m], xr[st:st + m], m)
                        else:
                            _fma(gq[t, lo:lo + m], gr[lo:lo + m],
                                 xr[st:st + (m - 1) * sw + 1:sw], m)
                    if need_x:
                        gxr = gx[b, c, tab[3, t]]
                        if sw == 1:
                            _fma(gxr[st:st + m], gr[lo:lo + m], WK[t, lo:lo + m], m)
                        else:
                            _fma(gxr[st:st + (m - 1) * sw + 1:sw], gr[lo:lo + m],
                                 WK[t, lo:lo + m], m)
                if need_q and (c == C - 1 or kc > 1):
                    for t in range(k3):
                        if need_k:
                            gkr = gK[b, kk, t, row]
                            wt = tw[t]
                            for j in range(ow):
                                gkr[j] = wt * gq[t, j]
                        if need_w:
                            kr = K[b, kk, t, row]
                            s = gtw[t]
                            for j in range(ow):
                                s += kr[j] * gq[t, j]
                            gtw[t] = s


# ----------------------------------------------------------------------------- torch wrappers
# Threading, the small-work and forked-child policies, prep and workspaces come from
# pacnet.kernels.runtime (shared with the segaware kernels).  Geometry arguments are
# sequences of r ints (r = the spatial rank of x or the guide).

def _plan_bands(B: int, geo: Geometry, parallel: bool = True) -> Tuple[int, int, int]:
    """Band length (output rows), band count and chunk count for a race-free backward
    scatter (bands of :meth:`Geometry.band_unit`)."""
    n = runtime.threads() if parallel else 1
    unit, units, lmin = geo.band_unit()
    per_image = math.ceil(4 * n / max(B, 1))  # aim at >= 4 work items per thread in all
    if per_image <= 1 or units <= lmin:
        L, nbands = max(units, 1), 1
    else:
        L = max(lmin, math.ceil(units / per_image))
        nbands = math.ceil(units / L)
    items = B * ((nbands + 1) // 2)
    return L * unit, nbands, max(1, min(n, items))


def _np(t: torch.Tensor) -> np.ndarray:
    return t.numpy()


def _dummy(like: torch.Tensor, ndim: int) -> np.ndarray:
    return np.zeros((1,) * ndim, dtype=_np(like).dtype)


def _geo(x: torch.Tensor, kernel_size, stride, padding, dilation) -> Geometry:
    return Geometry.of(x.shape[2:], kernel_size, stride, padding, dilation)


def _args(geo: Geometry) -> tuple:
    """The geometry arguments of every kernel: ks, ss, ps, ds, ins, oh."""
    return geo.ks, geo.ss, geo.ps, geo.ds, geo.ins, geo.outs[1]


def _rows(t: torch.Tensor, geo: Geometry, out: bool = False) -> np.ndarray:
    """``t`` ``[B, C, *sizes]`` (input, or output with ``out``) as ``[B, C, rows, W]``."""
    rows, width = (geo.rows, geo.outs[2]) if out else (geo.in_rows, geo.ins[2])
    return _np(t.view(t.shape[0], t.shape[1], rows, width))


def _kernel(K: torch.Tensor, geo: Geometry) -> np.ndarray:
    """``K`` ``[B, kc, *k, *out]`` as ``[B, kc, k3, rows, ow]``."""
    return _np(K.view(K.shape[0], K.shape[1], geo.taps, geo.rows, geo.outs[2]))


def _out_shape(geo: Geometry, b: int, c: int) -> tuple:
    return (b, c) + geo.outs[3 - geo.rank:]


def pac_dist_fwd(guide, center, kernel_size, stride, padding, dilation, asym, channel_wise):
    """Numba CPU ``pac_dist``: ``[b, Cg, *sizes] -> [b, 1|Cg, *k, *out]``."""
    dtype = guide.dtype
    f, ctr = prep(guide, center)
    geo = _geo(f, kernel_size, stride, padding, dilation)
    B, Cg = f.shape[:2]
    D = torch.empty((B, Cg if channel_wise else 1) + tuple(kernel_size)
                    + geo.outs[3 - geo.rank:], dtype=f.dtype)
    run = _dist_fwd if runtime.parallel(B * Cg * geo.taps * geo.rows * geo.outs[2]) \
        else _dist_fwd_serial
    run(_rows(f, geo), _rows(ctr, geo, out=True) if ctr is not None else _dummy(f, 4),
        ctr is not None, *_args(geo), bool(asym), bool(channel_wise), _kernel(D, geo))
    return D.to(dtype)


def pac_dist_bwd(grad, guide, center, kernel_size, stride, padding, dilation, asym,
                 channel_wise):
    """Gradients of ``pac_dist``: ``(grad_guide [b, Cg, *sizes], grad_center [b, Cg, *out])``.

    Without a given centre the centre term is folded into ``grad_guide`` and ``grad_center``
    is still returned (it is the gradient w.r.t. the implicit centre taps).
    """
    dtype = guide.dtype
    gD, f, ctr = prep(grad, guide, center)
    geo = _geo(f, kernel_size, stride, padding, dilation)
    B, Cg = f.shape[:2]
    gf = torch.zeros_like(f)
    gc = torch.empty(_out_shape(geo, B, Cg), dtype=f.dtype)
    par = runtime.parallel(B * Cg * geo.taps * geo.rows * geo.outs[2])
    L, nbands, nchunks = _plan_bands(B, geo, par)
    run = _dist_bwd if par else _dist_bwd_serial
    run(_kernel(gD, geo), _rows(f, geo),
        _rows(ctr, geo, out=True) if ctr is not None else _dummy(f, 4), ctr is not None,
        *_args(geo), bool(asym), bool(channel_wise), L, nbands, nchunks, _rows(gf, geo),
        _rows(gc, geo, out=True))
    return gf.to(dtype), gc.to(dtype)


def pac_conv_fwd(x, K, weight, bias, stride, padding, dilation, shared_filters):
    """Numba CPU ``pac_conv``: ``[b, C, *sizes] -> [b, O, *out]``."""
    dtype = x.dtype
    if shared_filters:
        return pac_pool_fwd(x, K, tuple(weight.shape[2:]), stride, padding, dilation,
                            weight=weight, bias=bias)
    xc, Kc, w, bc = prep(x, K, weight, bias)
    geo = _geo(xc, tuple(w.shape[2:]), stride, padding, dilation)
    out = torch.empty(_out_shape(geo, xc.shape[0], w.shape[0]), dtype=xc.dtype)
    _conv_fwd_gemm(xc, Kc, w.reshape(w.shape[0], -1), bc, geo, out)
    return out.to(dtype)


def pac_conv_add_(out, x, K, weight, stride, padding, dilation, shared_filters, alpha):
    """``out += alpha * pac_conv(x, K, weight)`` in place, through the block GEMMs (no
    output-sized temporary); shared filters and half-precision ``out`` add a computed product."""
    if shared_filters or out.dtype not in CPU_DTYPES:
        out.add_(pac_conv_fwd(x, K, weight, None, stride, padding, dilation, shared_filters),
                 alpha=alpha)
        return
    xc, Kc, w = prep(x, K, weight)
    geo = _geo(xc, tuple(w.shape[2:]), stride, padding, dilation)
    _conv_fwd_gemm(xc, Kc, w.reshape(w.shape[0], -1), None, geo, out, alpha=alpha)


def pac_conv_bwd(grad, x, K, weight, stride, padding, dilation, shared_filters,
                 needs=(True, True, True)):
    """Gradients of ``pac_conv`` w.r.t. ``(x, K, weight)``; ``None`` where not needed.

    The bias gradient is ``grad`` summed over the batch and spatial axes and is left to the
    caller.
    """
    if shared_filters:
        return pac_pool_bwd(grad, x, K, tuple(weight.shape[2:]), stride, padding, dilation,
                            needs=needs, weight=weight)
    need_x, need_k, need_w = (bool(v) for v in needs)
    dtypes = (x.dtype, K.dtype, weight.dtype)
    g, xc, Kc, w = prep(grad, x, K, weight)
    geo = _geo(xc, tuple(w.shape[2:]), stride, padding, dilation)
    gx = torch.zeros_like(xc) if need_x else None
    gK = torch.empty_like(Kc) if need_k else None
    gW2 = torch.zeros((w.shape[0], w[0].numel()), dtype=xc.dtype) if need_w else None
    _conv_bwd_gemm(g, xc, Kc, w.reshape(w.shape[0], -1), geo, gx, gK, gW2)
    return (gx.to(dtypes[0]) if need_x else None,
            gK.to(dtypes[1]) if need_k else None,
            gW2.view(w.shape).to(dtypes[2]) if need_w else None)


_BLOCK_BYTES = 16 << 20  # one block's column scratch (large blocks keep the GEMMs efficient)


def _blocks(B: int, R: int, rows: int, ow: int, itemsize: int):
    """Blocks ``(b0, nb, r0, nr)`` whose ``[nb, R, nr*ow]`` column scratch fits
    ``_BLOCK_BYTES``: several whole images, or bands of rows of one; and the scratch size."""
    return runtime.row_blocks(B, R, rows, ow, itemsize, _BLOCK_BYTES)


def _conv_fwd_gemm(xc, Kc, W2, bc, geo, out, alpha=None):
    """Forward by block GEMMs into ``out`` [B, O, *out] (``W2`` [O, C*k3]); with ``alpha``,
    ``out += alpha * W2 @ cols`` instead."""
    B, O = out.shape[:2]
    R, rows, ow = W2.shape[1], geo.rows, geo.outs[2]
    blocks, size = _blocks(B, R, rows, ow, xc.element_size())
    scratch = runtime.workspace(size, xc.dtype, xc.device)
    fill = _cols if runtime.parallel(size) else _cols_serial
    xn, Kn = _rows(xc, geo), _kernel(Kc, geo)
    flat = out.view(B, O, rows * ow)
    for b0, nb, r0, nr in blocks:
        cols = scratch[:nb * R * nr * ow].view(nb, R, nr * ow)
        fill(xn, Kn, b0, r0, nr, *_args(geo), _np(cols))
        dst = flat[b0:b0 + nb, :, r0 * ow:(r0 + nr) * ow]
        if alpha is not None:
            dst.baddbmm_(W2.expand(nb, -1, -1), cols, alpha=alpha)
        elif bc is None:
            torch.matmul(W2, cols, out=dst)
        else:
            torch.baddbmm(bc[None, :, None], W2.expand(nb, -1, -1), cols, out=dst)


def _conv_bwd_gemm(g, xc, Kc, W2, geo, gx, gK, gW2):
    """Backward by block GEMMs: accumulates into ``gx`` and ``gW2`` [O, C*k3], fills ``gK``
    (each ``None`` when not wanted).  One scratch buffer holds a block's columns for the
    weight gradient, then its column gradient ``G``."""
    B, O = g.shape[:2]
    R, rows, ow = W2.shape[1], geo.rows, geo.outs[2]
    blocks, size = _blocks(B, R, rows, ow, xc.element_size())
    par = runtime.parallel(size)
    xn, Kn = _rows(xc, geo), _kernel(Kc, geo)
    flat = g.reshape(B, O, rows * ow)
    need_x, need_k = gx is not None, gK is not None
    scratch = runtime.workspace(size, xc.dtype, xc.device)
    gxn = _rows(gx, geo) if need_x else _dummy(xc, 4)
    gKn = _kernel(gK, geo) if need_k else _dummy(xc, 5)
    for b0, nb, r0, nr in blocks:
        gb = flat[b0:b0 + nb, :, r0 * ow:(r0 + nr) * ow]
        buf = scratch[:nb * R * nr * ow].view(nb, R, nr * ow)
        if gW2 is not None:
            (_cols if par else _cols_serial)(xn, Kn, b0, r0, nr, *_args(geo), _np(buf))
            for i in range(nb):
                gW2.addmm_(gb[i], buf[i].t())
        if need_x or need_k:
            torch.matmul(W2.t(), gb, out=buf)
            (_cols_grad if par else _cols_grad_serial)(
                _np(buf), xn, Kn, b0, r0, nr, *_args(geo), need_x, need_k, gxn, gKn)


def pac_pool_fwd(x, K, kernel_size, stride, padding, dilation, weight=None, bias=None):
    """Numba CPU ``pac_pool`` (and, with ``weight`` [1, 1, *k], shared-filter ``pac_conv``)."""
    dtype = x.dtype
    xc, Kc, w, bc = prep(x, K, weight, bias)
    geo = _geo(xc, kernel_size, stride, padding, dilation)
    B, C = xc.shape[:2]
    tw = w.reshape(-1) if w is not None else torch.ones(geo.taps, dtype=xc.dtype)
    out = torch.empty(_out_shape(geo, B, C), dtype=xc.dtype)
    if bc is None:
        bc = torch.zeros(C, dtype=xc.dtype)
    run = _pool_fwd if runtime.parallel(B * C * geo.taps * geo.rows * geo.outs[2]) \
        else _pool_fwd_serial
    run(_rows(xc, geo), _kernel(Kc, geo), _np(tw), _np(bc), *_args(geo),
        _rows(out, geo, out=True))
    return out.to(dtype)


def pac_pool_bwd(grad, x, K, kernel_size, stride, padding, dilation,
                 needs=(True, True, False), weight=None):
    """Gradients of ``pac_pool`` w.r.t. ``(x, K[, tap weight])``; ``None`` where not needed."""
    need_x, need_k = bool(needs[0]), bool(needs[1])
    need_w = weight is not None and bool(needs[2])
    dtypes = (x.dtype, K.dtype, weight.dtype if weight is not None else None)
    g, xc, Kc, w = prep(grad, x, K, weight)
    geo = _geo(xc, kernel_size, stride, padding, dilation)
    B = xc.shape[0]
    tw = w.reshape(-1) if w is not None else torch.ones(geo.taps, dtype=xc.dtype)
    par = runtime.parallel(B * xc.shape[1] * geo.taps * geo.rows * geo.outs[2])
    L, nbands, nchunks = _plan_bands(B, geo, par)
    gx = torch.zeros_like(xc) if need_x else None
    gK = torch.empty_like(Kc) if need_k else None
    gtp = torch.zeros((nchunks, geo.taps), dtype=xc.dtype)
    run = _pool_bwd if par else _pool_bwd_serial
    run(_rows(g, geo, out=True), _rows(xc, geo), _kernel(Kc, geo), _np(tw), *_args(geo),
        L, nbands, nchunks, need_x, need_k, need_w,
        _rows(gx, geo) if need_x else _dummy(xc, 4),
        _kernel(gK, geo) if need_k else _dummy(xc, 5), _np(gtp))
    gW = gtp.sum(0).view(w.shape) if need_w else None
    return (gx.to(dtypes[0]) if need_x else None,
            gK.to(dtypes[1]) if need_k else None,
            gW.to(dtypes[2]) if need_w else None)
