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
runs as GEMMs (the BLAS torch uses, MKL on x86-64, called from inside the Numba kernels
through :mod:`pacnet.kernels.blas`) over *tiles* of the output -- bands of rows of one image
-- whose K-modulated columns each thread builds into its own cache-sized scratch
(``_TILE_BYTES``) and contracts at once, the whole forward in one parallel region.  See the
section ``pac_conv`` below for the exact formulas.

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
from pacnet.kernels.blas import gemm
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
# The contraction over R = C*k3 (k3 = kd*kh*kw taps) for every output pixel is a matrix
# product, left to the BLAS GEMM torch uses (:mod:`pacnet.kernels.blas`: MKL, several times
# the speed of hand-written loops), called from inside the kernels.  The output is cut into
# *tiles*: bands of ``nr`` output rows of one image (``P = nr*ow`` pixels, the last band
# shorter).  Per tile a thread builds the K-modulated columns
# ``cols[c*k3 + t, p] = K[b, t, p] * x[b, c, pos(p, t)]`` (0 outside the image) in its own
# [R, P] scratch and contracts them at once:
#   forward   out[b, :, tile]  = W2 @ cols                  (W2 = weight as [O, R])
#   backward  gW[chunk]       += g[b, :, tile] @ cols^T     (cols rebuilt, not saved)
#             G                = W2^T @ g[b, :, tile]       [R, P], in the same scratch
#             gK[b, t, p]      = sum_c G[c*k3 + t, p] * x[b, c, pos(p, t)]
#             gx[b, c, pos]   += G[c*k3 + t, p] * K[b, t, p]
# One parallel region runs the whole forward (each thread a chunk of tiles, no barrier
# between a tile's columns and its GEMM), and the backward one region per *phase*: the
# scatter into gx of two tiles of one image races only when their rows are close, so tile
# ``j`` runs in phase ``j % nphase``, with enough phases (2 for a 2-D layer) that tiles of
# one phase never touch the same input row.  Every thread accumulates the weight gradient
# of its chunk in its own partial sum, added up in a fixed order afterwards: results are
# deterministic for a given thread count.  (Fewer regions matter: each ends at a barrier,
# and with another process on the cores a barrier waits for a descheduled thread, a
# scheduler slice of milliseconds, so a layer cut into ~100 regions ran 3-8x slower.)
# x/gx [B, C, D*H, W]; K/gK [B, 1, k3, rows, ow]; out/g flat [B*O*rows*ow]; cols/G [R, P].

@njit(cache=True)
def _run(z, y, tz, ty, left, fast, ss, ps, ds, ins, oh):
    """``(q, n)``: the input row ``q`` that tap ``(tz, ty)`` of output row ``(z, y)`` reads
    (-1 outside the input) and how many output rows from there (at most ``left``) are done
    as one *run*.  With ``fast`` (stride 1 along H and W, input and output rows of one width,
    see :func:`_fast`) the rows of a run read consecutive input rows, so their taps are one
    contiguous stretch of the input (with a few wrong values where a row's window hangs over
    its edge, which the callers zero): a run goes to the end of the plane or of the input's
    rows.  Otherwise a run is one row."""
    q = _in_row(z, y, tz, ty, ss, ps, ds, ins)
    if q < 0 or not fast:
        return q, 1
    return q, min(left, oh - y, ins[1] - (y - ps[1] + ty * ds[1]))


@njit(cache=True)
def _fast(ss, ins, ow):
    """Whether runs of rows are contiguous stretches of the input (see :func:`_run`)."""
    return ss[1] == 1 and ss[2] == 1 and ins[2] == ow


@njit(cache=True)
def _next(z, y, n, oh):
    """Output row ``(z, y)`` moved on by ``n`` rows of a run (never past its plane's end)."""
    y += n
    if y >= oh:
        y -= oh
        z += 1
    return z, y


@njit(cache=True)
def _zero_edges(a, n, ow, lo, hi):
    """Zero the columns outside ``[lo, hi)`` of the ``n`` rows (of ``ow``) of flat ``a``."""
    for i in range(n):
        a[i * ow:i * ow + lo] = 0
        a[i * ow + hi:(i + 1) * ow] = 0


@njit(cache=True)
def _tap_cols(t, ks, ss, ps, ds, ins, ow):
    """Tap ``t``'s ``(tz, ty, lo, hi, st)``: its depth and height offsets, the output columns
    ``[lo, hi)`` whose input column is inside the input, and the input column ``st`` of
    output column ``lo``."""
    tz, ty, tx = _tap(t, ks)
    off = tx * ds[2] - ps[2]
    lo, hi = _jrange(off, ss[2], ins[2], ow)
    return tz, ty, lo, hi, lo * ss[2] + off


@njit(cache=True)
def _cols_row(r, x, K, b, r0, nr, ks, ss, ps, ds, ins, oh, cols):
    """Row ``r = c*k3 + t`` of the modulated columns ``cols`` [R, nr*ow] of output rows
    ``[r0, r0+nr)`` of image ``b``."""
    rows, ow = K.shape[3], K.shape[4]
    k3 = K.shape[2]
    sw = ss[2]
    c = r // k3
    t = r % k3
    tz, ty, lo, hi, st = _tap_cols(t, ks, ss, ps, ds, ins, ow)
    m = hi - lo
    fast = _fast(ss, ins, ow)
    xf = x[b, c].reshape(x.shape[2] * x.shape[3])
    kf = K[b, 0, t].reshape(rows * ow)
    z = r0 // oh
    y = r0 - z * oh
    rr = 0
    while rr < nr:
        q, n = _run(z, y, tz, ty, nr - rr, fast, ss, ps, ds, ins, oh)
        dst = cols[r, rr * ow:(rr + n) * ow]
        if q < 0 or m <= 0:
            dst[:] = 0
        else:
            e = (n - 1) * ow + hi  # the run's taps: dst[lo:e]
            xs = q * ins[2] + st
            k0 = (r0 + rr) * ow
            if sw == 1:
                _mul(dst[lo:e], kf[k0 + lo:k0 + e], xf[xs:xs + e - lo], e - lo)
            else:
                _mul(dst[lo:hi], kf[k0 + lo:k0 + hi], xf[xs:xs + (m - 1) * sw + 1:sw], m)
            _zero_edges(dst, n, ow, lo, hi)
        z, y = _next(z, y, n, oh)
        rr += n


@njit(cache=True)
def _cols_grad_x_plane(c, G, K, b, r0, nr, ks, ss, ps, ds, ins, oh, gx):
    """``gx[b, c] +=`` the tile's column gradient ``G`` [R, nr*ow] times ``K``, scattered
    back.  Zeroes the entries of ``G``'s rows ``c*k3 + t`` whose taps lie outside the input
    (so run after the kernel gradient, which reads them)."""
    rows, ow = K.shape[3], K.shape[4]
    k3 = K.shape[2]
    sw = ss[2]
    fast = _fast(ss, ins, ow)
    gxf = gx[b, c].reshape(gx.shape[2] * gx.shape[3])
    for t in range(k3):
        tz, ty, lo, hi, st = _tap_cols(t, ks, ss, ps, ds, ins, ow)
        m = hi - lo
        if m <= 0:
            continue
        kf = K[b, 0, t].reshape(rows * ow)
        z = r0 // oh
        y = r0 - z * oh
        rr = 0
        while rr < nr:
            q, n = _run(z, y, tz, ty, nr - rr, fast, ss, ps, ds, ins, oh)
            if q >= 0:
                g = G[c * k3 + t, rr * ow:(rr + n) * ow]
                xs = q * ins[2] + st
                k0 = (r0 + rr) * ow
                if sw == 1:
                    e = (n - 1) * ow + hi
                    if n > 1:
                        _zero_edges(g, n, ow, lo, hi)
                    _fma(gxf[xs:xs + e - lo], g[lo:e], kf[k0 + lo:k0 + e], e - lo)
                else:
                    _fma(gxf[xs:xs + (m - 1) * sw + 1:sw], g[lo:hi], kf[k0 + lo:k0 + hi], m)
            z, y = _next(z, y, n, oh)
            rr += n


@njit(cache=True)
def _cols_grad_k_tap(t, G, x, b, r0, nr, ks, ss, ps, ds, ins, oh, gK):
    """``gK[b, 0, t, row] = sum_c G[c*k3 + t, row] * x[b, c, pos(row, t)]`` for the tile's
    rows ``row`` in ``[r0, r0+nr)``."""
    C = x.shape[1]
    k3, rows, ow = gK.shape[2], gK.shape[3], gK.shape[4]
    sw = ss[2]
    tz, ty, lo, hi, st = _tap_cols(t, ks, ss, ps, ds, ins, ow)
    m = hi - lo
    fast = _fast(ss, ins, ow)
    gkf = gK[b, 0, t].reshape(rows * ow)
    z = r0 // oh
    y = r0 - z * oh
    rr = 0
    while rr < nr:
        q, n = _run(z, y, tz, ty, nr - rr, fast, ss, ps, ds, ins, oh)
        seg = gkf[(r0 + rr) * ow:(r0 + rr + n) * ow]
        seg[:] = 0
        if q >= 0 and m > 0:
            e = (n - 1) * ow + hi
            xs = q * ins[2] + st
            for c in range(C):
                xf = x[b, c].reshape(x.shape[2] * x.shape[3])
                gr = G[c * k3 + t, rr * ow:(rr + n) * ow]
                if sw == 1:
                    _fma(seg[lo:e], gr[lo:e], xf[xs:xs + e - lo], e - lo)
                else:
                    _fma(seg[lo:hi], gr[lo:hi], xf[xs:xs + (m - 1) * sw + 1:sw], m)
            if n > 1:
                _zero_edges(seg, n, ow, lo, hi)
        z, y = _next(z, y, n, oh)
        rr += n


@njit(cache=True)
def _conv_fwd_chunk(ch, nchunks, x, K, w, bias, has_bias, alpha, beta, nr, ks, ss, ps, ds,
                    ins, oh, out):
    """Chunk ``ch`` of ``nchunks`` of the tiles: ``out = alpha * W2 @ cols + beta * out``
    (+ bias) for each (``out`` and ``w`` = W2 [O, R] flat)."""
    B = x.shape[0]
    rows, ow = K.shape[3], K.shape[4]
    R = x.shape[1] * K.shape[2]
    O = w.shape[0] // R
    T = (rows + nr - 1) // nr
    n = B * T
    plane = rows * ow
    buf = np.empty(R * nr * ow, dtype=x.dtype)
    for it in range(ch * n // nchunks, (ch + 1) * n // nchunks):
        b = it // T
        r0 = (it - b * T) * nr
        m = min(nr, rows - r0)
        P = m * ow
        cols = buf[:R * P].reshape((R, P))
        for r in range(R):
            _cols_row(r, x, K, b, r0, m, ks, ss, ps, ds, ins, oh, cols)
        c0 = b * O * plane + r0 * ow
        gemm(False, False, O, P, R, alpha, w, 0, R, buf, 0, P, beta, out, c0, plane)
        if has_bias:
            for o in range(O):
                seg = out[c0 + o * plane:c0 + o * plane + P]
                bo = bias[o]
                for j in range(P):
                    seg[j] += bo


@njit(**_OPTS)
def _conv_fwd(nchunks, x, K, w, bias, has_bias, alpha, beta, nr, ks, ss, ps, ds, ins, oh,
              out):
    for ch in prange(nchunks):
        _conv_fwd_chunk(ch, nchunks, x, K, w, bias, has_bias, alpha, beta, nr, ks, ss, ps,
                        ds, ins, oh, out)


@njit(cache=True)
def _conv_fwd_serial(nchunks, x, K, w, bias, has_bias, alpha, beta, nr, ks, ss, ps, ds, ins,
                     oh, out):
    for ch in range(nchunks):
        _conv_fwd_chunk(ch, nchunks, x, K, w, bias, has_bias, alpha, beta, nr, ks, ss, ps,
                        ds, ins, oh, out)


@njit(cache=True)
def _conv_bwd_chunk(ch, nchunks, ph, nphase, g, x, K, w, nr, ks, ss, ps, ds, ins, oh,
                    need_x, need_k, need_w, gx, gK, gWp):
    """Chunk ``ch`` of ``nchunks`` of the tiles of phase ``ph`` (tiles ``j`` with
    ``j % nphase == ph``): the weight gradient into ``gWp[ch]``, then ``G`` into ``gK`` and
    ``gx`` (``g`` and ``w`` flat)."""
    B, C = x.shape[0], x.shape[1]
    k3, rows, ow = K.shape[2], K.shape[3], K.shape[4]
    R = C * k3
    O = w.shape[0] // R
    T = (rows + nr - 1) // nr
    Tp = (T - ph + nphase - 1) // nphase
    n = B * Tp
    plane = rows * ow
    buf = np.empty(R * nr * ow, dtype=x.dtype)
    gw = gWp[ch]
    for it in range(ch * n // nchunks, (ch + 1) * n // nchunks):
        b = it // Tp
        r0 = (ph + (it - b * Tp) * nphase) * nr
        m = min(nr, rows - r0)
        P = m * ow
        G = buf[:R * P].reshape((R, P))
        g0 = b * O * plane + r0 * ow
        if need_w:
            for r in range(R):
                _cols_row(r, x, K, b, r0, m, ks, ss, ps, ds, ins, oh, G)
            gemm(False, True, O, R, P, 1.0, g, g0, plane, buf, 0, P, 1.0, gw, 0, R)
        if need_x or need_k:
            gemm(True, False, R, P, O, 1.0, w, 0, R, g, g0, plane, 0.0, buf, 0, P)
            if need_k:
                for t in range(k3):
                    _cols_grad_k_tap(t, G, x, b, r0, m, ks, ss, ps, ds, ins, oh, gK)
            if need_x:
                for c in range(C):
                    _cols_grad_x_plane(c, G, K, b, r0, m, ks, ss, ps, ds, ins, oh, gx)


@njit(**_OPTS)
def _conv_bwd(nchunks, nphase, g, x, K, w, nr, ks, ss, ps, ds, ins, oh, need_x, need_k,
              need_w, gx, gK, gWp):
    for ph in range(nphase):
        for ch in prange(nchunks):
            _conv_bwd_chunk(ch, nchunks, ph, nphase, g, x, K, w, nr, ks, ss, ps, ds, ins, oh,
                            need_x, need_k, need_w, gx, gK, gWp)


@njit(cache=True)
def _conv_bwd_serial(nchunks, nphase, g, x, K, w, nr, ks, ss, ps, ds, ins, oh, need_x, need_k,
                     need_w, gx, gK, gWp):
    for ph in range(nphase):
        for ch in range(nchunks):
            _conv_bwd_chunk(ch, nchunks, ph, nphase, g, x, K, w, nr, ks, ss, ps, ds, ins, oh,
                            need_x, need_k, need_w, gx, gK, gWp)


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
    _conv_fwd_tiles(xc, Kc, w.reshape(w.shape[0], -1), bc, geo, out)
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
    _conv_fwd_tiles(xc, Kc, w.reshape(w.shape[0], -1), None, geo, out, alpha=alpha)


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
    gW2 = _conv_bwd_tiles(g, xc, Kc, w.reshape(w.shape[0], -1), geo, gx, gK, need_w)
    return (gx.to(dtypes[0]) if need_x else None,
            gK.to(dtypes[1]) if need_k else None,
            gW2.view(w.shape).to(dtypes[2]) if need_w else None)


_TILE_BYTES = 4 << 20  # one tile's column scratch per thread (cache-sized, GEMM-efficient)


def _plan_tiles(B: int, R: int, geo: Geometry, itemsize: int, parallel: bool):
    """``(nr, nphase, nchunks)``: output rows per tile (a [R, nr*ow] scratch of about
    ``_TILE_BYTES``, and at least 4 tiles per thread when the output has that many rows),
    backward phases (tiles ``j`` and ``j + nphase`` of an image never scatter into the same
    input row) and chunks (one per thread, each with a tile of every phase)."""
    rows, ow = geo.rows, geo.outs[2]
    n = runtime.threads() if parallel else 1
    nr = max(1, min(rows, _TILE_BYTES // max(1, R * ow * itemsize)))
    if n > 1:
        nr = max(1, min(nr, B * rows // (4 * n)))
    T = -(-rows // nr)
    # output rows (z, y) and (z', y') scatter into one input row only when
    # |z - z'| <= lz and |y - y'| <= ly, i.e. when their flat rows are closer than `near`
    lz = (geo.ks[0] - 1) * geo.ds[0] // geo.ss[0]
    ly = (geo.ks[1] - 1) * geo.ds[1] // geo.ss[1]
    near = lz * geo.outs[1] + ly + 1
    nphase = min(T, 1 + -(-(near - 1) // nr))
    return nr, nphase, max(1, min(n, B * (T // nphase)))


def _conv_fwd_tiles(xc, Kc, W2, bc, geo, out, alpha=None):
    """Forward by tile GEMMs into ``out`` [B, O, *out] (``W2`` [O, C*k3]); with ``alpha``,
    ``out += alpha * W2 @ cols`` instead."""
    B = out.shape[0]
    R = W2.shape[1]
    par = runtime.parallel(B * out.shape[1] * R * geo.rows * geo.outs[2])
    nr, _, nchunks = _plan_tiles(B, R, geo, xc.element_size(), par)
    run = _conv_fwd if par else _conv_fwd_serial
    run(nchunks, _rows(xc, geo), _kernel(Kc, geo), _np(W2.reshape(-1)),
        _np(bc) if bc is not None else _dummy(xc, 1), bc is not None,
        1.0 if alpha is None else float(alpha), 0.0 if alpha is None else 1.0, nr,
        *_args(geo), _np(out.view(-1)))


def _conv_bwd_tiles(g, xc, Kc, W2, geo, gx, gK, need_w):
    """Backward by tile GEMMs: accumulates into ``gx``, fills ``gK`` (each ``None`` when not
    wanted) and returns the weight gradient [O, C*k3] (``None`` without ``need_w``)."""
    B, O = g.shape[:2]
    R = W2.shape[1]
    par = runtime.parallel(B * O * R * geo.rows * geo.outs[2])
    nr, nphase, nchunks = _plan_tiles(B, R, geo, xc.element_size(), par)
    gWp = torch.zeros((nchunks if need_w else 1, O * R if need_w else 1), dtype=xc.dtype)
    run = _conv_bwd if par else _conv_bwd_serial
    run(nchunks, nphase, _np(g.reshape(-1)), _rows(xc, geo), _kernel(Kc, geo),
        _np(W2.reshape(-1)), nr, *_args(geo), gx is not None, gK is not None, need_w,
        _rows(gx, geo) if gx is not None else _dummy(xc, 4),
        _kernel(gK, geo) if gK is not None else _dummy(xc, 5), _np(gWp))
    return gWp.sum(0).view(O, R) if need_w else None


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
