"""Numba CPU kernels of the segaware primitives (``@njit(parallel=True, cache=True)``).

The functions work on NumPy views of contiguous torch tensors and write into
preallocated outputs; :mod:`.ops` allocates with ``torch.empty`` and validates first.
Semantics are those of :mod:`.reference` (the oracle).

Every kernel is a per-row function (``_<name>_row``) with a parallel driver (``<name>``,
``prange`` over rows) and a serial twin (``<name>_serial``), chosen per call by
:func:`pacnet.kernels.runtime.pick`: small calls and calls in forked children (where GNU
OpenMP aborts) run serially, the others on torch's OpenMP pool.

Layout choices: every parallel loop runs over rows (``n, channel, y``) so each thread
owns the row it writes (no races, no atomics, deterministic), and the innermost loop
runs over ``x`` on contiguous memory.  Backward passes are *gathers* written as a loop
over the output columns ``x`` that map to this row's pixels (the map ``x -> px`` is
injective for a fixed tap), so they stay race-free for any stride.  Scalars that enter
arithmetic (``zero``, ``half``, ``big``) are passed in the array's dtype so float32
kernels stay float32.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(cache=True, inline="always")
def _span(n_out, size, off, stride):
    """``[lo, hi)`` of ``x`` in ``[0, n_out)`` with ``0 <= x*stride + off < size``."""
    if off >= 0:
        lo = 0
    else:
        lo = (-off + stride - 1) // stride
    last = size - 1 - off
    if last < 0:
        return 0, 0
    hi = last // stride + 1
    if hi > n_out:
        hi = n_out
    if lo > hi:
        lo = hi
    return lo, hi


# ----------------------------------------------------------------------------- Im2dist

@njit(cache=True)
def _im2dist_forward_row(row, E, out, kh, kw, ph, pw, sh, sw, dh, dw, norm, remove_center,
                         remove_bounds, zero, half, big):
    N, C, H, W = E.shape
    K = out.shape[1]
    Ho = out.shape[2]
    Wo = out.shape[3]
    ci = kh // 2
    cj = kw // 2
    ctr = ci * kw + cj
    y = row % Ho
    t = row // Ho
    o = t % K
    n = t // K
    i = o // kw
    j = o % kw
    cy = y * sh - ph + ci * dh
    ny = y * sh - ph + i * dh
    cy_in = cy >= 0 and cy < H
    ny_in = ny >= 0 and ny < H
    coff = -pw + cj * dw
    noff = -pw + j * dw
    # Constant entries first (the out-of-image and centre rules), then accumulate
    # the distances over the (interval) of x where both pixels are inside.
    for x in range(Wo):
        cx = x * sw + coff
        nx = x * sw + noff
        v = zero
        if cy_in and cx >= 0 and cx < W:
            if remove_center and o == ctr:
                v = big
            elif not (ny_in and nx >= 0 and nx < W):
                if remove_bounds:
                    v = big
        out[n, o, y, x] = v
    if not (cy_in and ny_in) or (remove_center and o == ctr):
        return
    clo, chi = _span(Wo, W, coff, sw)
    nlo, nhi = _span(Wo, W, noff, sw)
    lo = max(clo, nlo)
    hi = min(chi, nhi)
    orow = out[n, o, y]
    if norm == 1:
        for c in range(C):
            erc = E[n, c, cy]
            ern = E[n, c, ny]
            for x in range(lo, hi):
                orow[x] += abs(erc[x * sw + coff] - ern[x * sw + noff])
    else:
        for c in range(C):
            erc = E[n, c, cy]
            ern = E[n, c, ny]
            for x in range(lo, hi):
                d = erc[x * sw + coff] - ern[x * sw + noff]
                orow[x] += half * d * d


@njit(parallel=True, cache=True)
def im2dist_forward(E, out, kh, kw, ph, pw, sh, sw, dh, dw, norm, remove_center, remove_bounds,
                    zero, half, big):
    N, C, H, W = E.shape
    K = out.shape[1]
    Ho = out.shape[2]
    for row in prange(N * K * Ho):
        _im2dist_forward_row(row, E, out, kh, kw, ph, pw, sh, sw, dh, dw, norm, remove_center,
                             remove_bounds, zero, half, big)


@njit(cache=True)
def im2dist_forward_serial(E, out, kh, kw, ph, pw, sh, sw, dh, dw, norm, remove_center,
                           remove_bounds, zero, half, big):
    N, C, H, W = E.shape
    K = out.shape[1]
    Ho = out.shape[2]
    for row in range(N * K * Ho):
        _im2dist_forward_row(row, E, out, kh, kw, ph, pw, sh, sw, dh, dw, norm, remove_center,
                             remove_bounds, zero, half, big)


@njit(cache=True)
def _im2dist_backward_row(row, G, E, gE, kh, kw, ph, pw, sh, sw, dh, dw, norm, zero):
    N, C, H, W = E.shape
    K = G.shape[1]
    Ho = G.shape[2]
    Wo = G.shape[3]
    ci = kh // 2
    cj = kw // 2
    ctr = ci * kw + cj
    py = row % H
    t = row // H
    c = t % C
    n = t // C
    grow = gE[n, c, py]
    for px in range(W):
        grow[px] = zero
    erow = E[n, c, py]
    coff = -pw + cj * dw
    # (a) this row holds the centre of output row y: +s(E_p - E_nb) * G.
    ty = py + ph - ci * dh
    if ty >= 0 and ty % sh == 0 and ty // sh < Ho:
        y = ty // sh
        for o in range(K):
            if o == ctr:
                continue            # centre tap: Δ ≡ 0, or removed
            i = o // kw
            j = o % kw
            ny = py + (i - ci) * dh
            if ny < 0 or ny >= H:
                continue
            noff = -pw + j * dw
            clo, chi = _span(Wo, W, coff, sw)
            nlo, nhi = _span(Wo, W, noff, sw)
            nrow = E[n, c, ny]
            gorow = G[n, o, y]
            if norm == 1:
                for x in range(max(clo, nlo), min(chi, nhi)):
                    pc = x * sw + coff
                    grow[pc] += np.sign(erow[pc] - nrow[x * sw + noff]) * gorow[x]
            else:
                for x in range(max(clo, nlo), min(chi, nhi)):
                    pc = x * sw + coff
                    grow[pc] += (erow[pc] - nrow[x * sw + noff]) * gorow[x]
    # (b) this row holds the neighbour of tap o for output row y: -s(E_c - E_p) * G.
    for o in range(K):
        if o == ctr:
            continue
        i = o // kw
        j = o % kw
        ty = py + ph - i * dh
        if ty < 0 or ty % sh != 0 or ty // sh >= Ho:
            continue
        y = ty // sh
        cy = py + (ci - i) * dh
        if cy < 0 or cy >= H:
            continue
        noff = -pw + j * dw
        clo, chi = _span(Wo, W, coff, sw)
        nlo, nhi = _span(Wo, W, noff, sw)
        crow = E[n, c, cy]
        gorow = G[n, o, y]
        if norm == 1:
            for x in range(max(clo, nlo), min(chi, nhi)):
                pn = x * sw + noff
                grow[pn] -= np.sign(crow[x * sw + coff] - erow[pn]) * gorow[x]
        else:
            for x in range(max(clo, nlo), min(chi, nhi)):
                pn = x * sw + noff
                grow[pn] -= (crow[x * sw + coff] - erow[pn]) * gorow[x]


@njit(parallel=True, cache=True)
def im2dist_backward(G, E, gE, kh, kw, ph, pw, sh, sw, dh, dw, norm, zero):
    """``gE = d(sum G * im2dist(E)) / dE``; one thread per input row ``(n, c, py)``."""
    N, C, H, W = E.shape
    for row in prange(N * C * H):
        _im2dist_backward_row(row, G, E, gE, kh, kw, ph, pw, sh, sw, dh, dw, norm, zero)


@njit(cache=True)
def im2dist_backward_serial(G, E, gE, kh, kw, ph, pw, sh, sw, dh, dw, norm, zero):
    N, C, H, W = E.shape
    for row in range(N * C * H):
        _im2dist_backward_row(row, G, E, gE, kh, kw, ph, pw, sh, sw, dh, dw, norm, zero)


# ----------------------------------------------------------------------------- Im2parity

@njit(cache=True)
def _im2parity_forward_row(row, Lab, out, kh, kw, ph, pw, sh, sw, dh, dw, has_ignore,
                           ignore_label, outside, one, zero):
    H = Lab.shape[2]
    W = Lab.shape[3]
    K = out.shape[1]
    Ho = out.shape[2]
    Wo = out.shape[3]
    ci = kh // 2
    cj = kw // 2
    ig = ignore_label
    igf = one * ignore_label
    y = row % Ho
    t = row // Ho
    o = t % K
    n = t // K
    i = o // kw
    j = o % kw
    cy = y * sh - ph + ci * dh
    ny = y * sh - ph + i * dh
    for x in range(Wo):
        cx = x * sw - pw + cj * dw
        nx = x * sw - pw + j * dw
        if cy < 0 or cy >= H or cx < 0 or cx >= W:
            out[n, o, y, x] = outside
            continue
        lc = Lab[n, 0, cy, cx]
        ln = 0
        if ny >= 0 and ny < H and nx >= 0 and nx < W:
            ln = Lab[n, 0, ny, nx]
        if has_ignore and (ln == ig or lc == ig):
            out[n, o, y, x] = igf
        elif ln == lc:
            out[n, o, y, x] = one
        else:
            out[n, o, y, x] = zero


@njit(parallel=True, cache=True)
def im2parity_forward(Lab, out, kh, kw, ph, pw, sh, sw, dh, dw, has_ignore, ignore_label, outside,
                      one, zero):
    """``Lab``: int32 ``N x 1 x H x W``; ``out``: float ``N x K x Ho x Wo``."""
    N = Lab.shape[0]
    K = out.shape[1]
    Ho = out.shape[2]
    for row in prange(N * K * Ho):
        _im2parity_forward_row(row, Lab, out, kh, kw, ph, pw, sh, sw, dh, dw, has_ignore,
                               ignore_label, outside, one, zero)


@njit(cache=True)
def im2parity_forward_serial(Lab, out, kh, kw, ph, pw, sh, sw, dh, dw, has_ignore, ignore_label,
                             outside, one, zero):
    N = Lab.shape[0]
    K = out.shape[1]
    Ho = out.shape[2]
    for row in range(N * K * Ho):
        _im2parity_forward_row(row, Lab, out, kh, kw, ph, pw, sh, sw, dh, dw, has_ignore,
                               ignore_label, outside, one, zero)


# ----------------------------------------------------------------------------- local weighted sum

@njit(cache=True)
def _local_weighted_sum_forward_row(row, X, Wt, out, kh, kw, ph, pw, sh, sw, dh, dw, zero):
    N, C, H, W = X.shape
    K = Wt.shape[1]
    Ho = out.shape[2]
    Wo = out.shape[3]
    y = row % Ho
    t = row // Ho
    c = t % C
    n = t // C
    orow = out[n, c, y]
    for x in range(Wo):
        orow[x] = zero
    for o in range(K):
        i = o // kw
        j = o % kw
        ny = y * sh - ph + i * dh
        if ny < 0 or ny >= H:
            continue
        noff = -pw + j * dw
        lo, hi = _span(Wo, W, noff, sw)
        xrow = X[n, c, ny]
        wrow = Wt[n, o, y]
        for x in range(lo, hi):
            orow[x] += wrow[x] * xrow[x * sw + noff]


@njit(parallel=True, cache=True)
def local_weighted_sum_forward(X, Wt, out, kh, kw, ph, pw, sh, sw, dh, dw, zero):
    N, C, H, W = X.shape
    Ho = out.shape[2]
    for row in prange(N * C * Ho):
        _local_weighted_sum_forward_row(row, X, Wt, out, kh, kw, ph, pw, sh, sw, dh, dw, zero)


@njit(cache=True)
def local_weighted_sum_forward_serial(X, Wt, out, kh, kw, ph, pw, sh, sw, dh, dw, zero):
    N, C, H, W = X.shape
    Ho = out.shape[2]
    for row in range(N * C * Ho):
        _local_weighted_sum_forward_row(row, X, Wt, out, kh, kw, ph, pw, sh, sw, dh, dw, zero)


@njit(cache=True)
def _local_weighted_sum_backward_weights_row(row, G, X, gW, kh, kw, ph, pw, sh, sw, dh, dw, zero):
    N, C, H, W = X.shape
    K = gW.shape[1]
    Ho = gW.shape[2]
    Wo = gW.shape[3]
    y = row % Ho
    t = row // Ho
    o = t % K
    n = t // K
    i = o // kw
    j = o % kw
    grow = gW[n, o, y]
    for x in range(Wo):
        grow[x] = zero
    ny = y * sh - ph + i * dh
    if ny < 0 or ny >= H:
        return
    noff = -pw + j * dw
    lo, hi = _span(Wo, W, noff, sw)
    for c in range(C):
        xrow = X[n, c, ny]
        gorow = G[n, c, y]
        for x in range(lo, hi):
            grow[x] += gorow[x] * xrow[x * sw + noff]


@njit(parallel=True, cache=True)
def local_weighted_sum_backward_weights(G, X, gW, kh, kw, ph, pw, sh, sw, dh, dw, zero):
    N, C, H, W = X.shape
    K = gW.shape[1]
    Ho = gW.shape[2]
    for row in prange(N * K * Ho):
        _local_weighted_sum_backward_weights_row(row, G, X, gW, kh, kw, ph, pw, sh, sw, dh, dw,
                                                 zero)


@njit(cache=True)
def local_weighted_sum_backward_weights_serial(G, X, gW, kh, kw, ph, pw, sh, sw, dh, dw, zero):
    N, C, H, W = X.shape
    K = gW.shape[1]
    Ho = gW.shape[2]
    for row in range(N * K * Ho):
        _local_weighted_sum_backward_weights_row(row, G, X, gW, kh, kw, ph, pw, sh, sw, dh, dw,
                                                 zero)


@njit(cache=True)
def _local_weighted_sum_backward_input_row(row, G, Wt, gX, kh, kw, ph, pw, sh, sw, dh, dw, zero):
    N, C, H, W = gX.shape
    K = Wt.shape[1]
    Ho = Wt.shape[2]
    Wo = Wt.shape[3]
    py = row % H
    t = row // H
    c = t % C
    n = t // C
    grow = gX[n, c, py]
    for px in range(W):
        grow[px] = zero
    for o in range(K):
        i = o // kw
        j = o % kw
        ty = py + ph - i * dh
        if ty < 0 or ty % sh != 0 or ty // sh >= Ho:
            continue
        y = ty // sh
        noff = -pw + j * dw
        lo, hi = _span(Wo, W, noff, sw)
        wrow = Wt[n, o, y]
        gorow = G[n, c, y]
        for x in range(lo, hi):
            grow[x * sw + noff] += wrow[x] * gorow[x]


@njit(parallel=True, cache=True)
def local_weighted_sum_backward_input(G, Wt, gX, kh, kw, ph, pw, sh, sw, dh, dw, zero):
    N, C, H, W = gX.shape
    for row in prange(N * C * H):
        _local_weighted_sum_backward_input_row(row, G, Wt, gX, kh, kw, ph, pw, sh, sw, dh, dw, zero)


@njit(cache=True)
def local_weighted_sum_backward_input_serial(G, Wt, gX, kh, kw, ph, pw, sh, sw, dh, dw, zero):
    N, C, H, W = gX.shape
    for row in range(N * C * H):
        _local_weighted_sum_backward_input_row(row, G, Wt, gX, kh, kw, ph, pw, sh, sw, dh, dw, zero)

