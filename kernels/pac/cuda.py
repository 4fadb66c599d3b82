"""PAC kernels for CUDA: ``pac_conv`` as block GEMMs on cuBLAS, gathers in ``numba.cuda``.

Importing this module imports ``numba.cuda`` (the NVIDIA ``numba-cuda`` package);
:mod:`pacnet.kernels.pac.ops` does so only when a CUDA tensor reaches a PAC op.

``pac_conv`` mirrors the CPU design (:mod:`.cpu`).  The output is taken in tiles -- groups
of whole images, or bands of output rows of one image -- whose K-modulated columns
``cols[i, c*k3 + t, q] = K[b, t, q] * x[b, c, pos(q, t)]`` (0 outside the image) a Numba
kernel writes into a workspace from torch's caching allocator, bounded by
:func:`pacnet.kernels.runtime.workspace_limit` (256 MiB by default; if it cannot be had, the
tiles shrink before the call fails).  cuBLAS contracts (``torch.matmul``/``baddbmm``/
``addmm``; TF32 where torch allows it):

    forward    out[i, :, tile]  = W2 @ cols[i] (+ bias)          W2 = weight as [O, C*k3]
    add_       out[i, :, tile] += alpha * W2 @ cols[i]            (in place, no temporary)
    backward   gW              += g[i, :, tile] @ cols[i]^T
               G[i]             = W2^T @ g[i, :, tile]            [C*k3, tile], once per tile
               gx[b, c, p]     += sum over the taps t and outputs q that read p of
                                  G[i, c*k3 + t, q] * K[b, t, q]  (a gather: one thread per
                                  input element, no atomics, deterministic)
               gK[b, t, q]      = sum_c G[i, c*k3 + t, q] * x[b, c, pos(q, t)]

``G`` is computed once per tile and shared by both gathers (it reuses the column
workspace).  Float16/bfloat16 inputs keep half precision in the columns, ``G`` and the GEMMs
(tensor cores, float32 accumulation inside cuBLAS and in the gathers; the weight gradient
and the input gradient accumulate in float32 across tiles); ``K`` may be float32 beside
half data.  bfloat16 arrays reach Numba as their int16 bits (Numba has no bfloat16 arrays)
and are converted in registers.

Every kernel is written once, for the geometry of a 3-D window (:mod:`.geometry`:
``(depth, height, width)`` kernel sizes, strides, paddings, dilations; a 2-D call has depth 1,
a 1-D call depth and height 1), so it serves every spatial rank: ``x`` is viewed as
``[B, C, D, H, W]``, ``K`` as ``[B, 1|C, kd*kh*kw, od*oh, ow]`` and outputs as
``[B, C, od*oh, ow]`` (output "rows" are the flattened ``(z, y)`` pairs).  The GEMM path's
launch grids are 3-D (``x`` over output/input columns, ``y`` over rows, ``z`` over channels
or images, with grid-stride loops), so no thread decomposes a flat index by division.

``pac_dist`` and ``pac_pool`` (also the shared-filter, depthwise ``pac_conv``) are
memory-bound gathers without a contraction: one thread per output element (backward: per
input element), computed in float32/float64.

Launches go on torch's current stream with the tensors' device current
(:mod:`pacnet.kernels.runtime`).  Under the simulator (``NUMBA_ENABLE_CUDASIM=1``, set before
numba is imported) the functions take CPU tensors, which is how the test suite checks these
kernels without a GPU.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from numba import cuda

from pacnet.kernels import runtime
from pacnet.kernels.runtime import as_array, on_device, prep

from .geometry import Geometry

_SIM = bool(numba.config.ENABLE_CUDASIM)
# Threads per block of the one-thread-per-element kernels.  The simulator runs one Python
# thread per CUDA thread, so it gets small blocks.
_TPB = 32 if _SIM else 128
# 2-D blocks of the column and gather kernels: 32 columns (a warp: coalesced rows) x _BY rows.
_BY = 2 if _SIM else 8
_MAX_GRID_YZ = 65535

if not _SIM and getattr(cuda, "implementation", None) != "NVIDIA":  # pragma: no cover
    # Without numba-cuda's import hook (e.g. ``python -S``) numba falls back to its
    # deprecated built-in CUDA target without a word; refuse instead.
    raise ImportError("pacnet's CUDA kernels need the 'numba-cuda' package "
                      "(pip install 'numba-cuda[cu12]'); numba.cuda is the deprecated "
                      "built-in target")


# ----------------------------------------------------------------------------- bfloat16 bits
# A bfloat16 is the top half of a float32: widen by shifting its 16 bits up; narrow with
# round-to-nearest-even on the dropped half (NaN kept a quiet NaN).

if _SIM:
    def _bf16_to_f32(bits):
        return np.array([(int(bits) & 0xFFFF) << 16], np.uint32).view(np.float32)[0]

    def _f32_to_bf16(v):
        u = int(np.array([v], np.float32).view(np.uint32)[0])
        if (u & 0x7FFFFFFF) > 0x7F800000:
            return np.int16(np.uint16(0x7FC0).astype(np.int16))
        u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        return np.uint16(u & 0xFFFF).astype(np.int16)
else:
    from numba.cuda import libdevice

    @cuda.jit(device=True, inline=True)
    def _bf16_to_f32(bits):
        return libdevice.int_as_float(numba.int32((numba.int32(bits) & 0xFFFF) << 16))

    @cuda.jit(device=True, inline=True)
    def _f32_to_bf16(v):
        u = numba.int64(libdevice.float_as_int(numba.float32(v))) & 0xFFFFFFFF
        if (u & 0x7FFFFFFF) > 0x7F800000:
            return numba.int16(0x7FC0)
        u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        return numba.int16(u & 0xFFFF)


@cuda.jit(device=True, inline=True)
def _ld(v, bf, zero):
    """An array element as the accumulation type (``zero``'s): bfloat16 bits widened."""
    if bf:
        return zero + _bf16_to_f32(v)
    return zero + v


@cuda.jit(device=True, inline=True)
def _st(v, bf):
    """A value in the storage type of an array holding bfloat16 bits (``bf``) or floats."""
    if bf:
        return _f32_to_bf16(v)
    return v


# ----------------------------------------------------------------------------- pac_conv

@cuda.jit(device=True, inline=True)
def _tap(t, ks):
    """Tap ``t`` of a ``ks = (kd, kh, kw)`` window as ``(tz, ty, tx)``."""
    khw = ks[1] * ks[2]
    tz = t // khw
    ty = (t - tz * khw) // ks[2]
    return tz, ty, t - tz * khw - ty * ks[2]


# Geometry tuples ks, ss, ps, ds are (depth, height, width); oh is the output height (rows
# are z*oh + y).  x [B, C, D, H, W]; K [B, 1, k3, rows, ow]; cols/G [nb, R=C*k3, nrows, ow]
# for the tile of images i0 .. i0+nb-1 and output rows row0 .. row0+nrows-1.

@cuda.jit(cache=True)
def _cols(x, K, i0, row0, ks, ss, ps, ds, oh, bf, kbf, zero, cols):
    """grid (R, rows/_BY, images), block (32, _BY): the modulated columns of one tile."""
    r = cuda.blockIdx.x
    k3 = ks[0] * ks[1] * ks[2]
    c = r // k3
    t = r - c * k3
    tz, ty, tx = _tap(t, ks)
    D, H, W = x.shape[2], x.shape[3], x.shape[4]
    nrows, ow = cols.shape[2], cols.shape[3]
    ib = cuda.blockIdx.z
    while ib < cols.shape[0]:
        b = i0 + ib
        rr = cuda.blockIdx.y * cuda.blockDim.y + cuda.threadIdx.y
        while rr < nrows:
            row = row0 + rr
            z = row // oh
            y = row - z * oh
            iz = z * ss[0] - ps[0] + tz * ds[0]
            iy = y * ss[1] - ps[1] + ty * ds[1]
            inside = iz >= 0 and iz < D and iy >= 0 and iy < H
            xo = cuda.threadIdx.x
            while xo < ow:
                ix = xo * ss[2] - ps[2] + tx * ds[2]
                v = zero
                if inside and ix >= 0 and ix < W:
                    v = _ld(K[b, 0, t, row, xo], kbf, zero) * _ld(x[b, c, iz, iy, ix], bf, zero)
                cols[ib, r, rr, xo] = _st(v, bf)
                xo += cuda.blockDim.x
            rr += cuda.gridDim.y * cuda.blockDim.y
        ib += cuda.gridDim.z


@cuda.jit(cache=True)
def _grad_x(G, K, i0, row0, ks, ss, ps, ds, oh, bf, kbf, zero, gx):
    """grid (W/32, D*H/_BY, images*C), block (32, _BY): ``gx[b, c, p] +=`` the tile's taps
    that read input element ``p``, gathered (each thread owns its element)."""
    C, D, H, W = gx.shape[1], gx.shape[2], gx.shape[3], gx.shape[4]
    nrows, ow = G.shape[2], G.shape[3]
    od = K.shape[3] // oh
    k3 = ks[0] * ks[1] * ks[2]
    ix = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if ix >= W:
        return
    ic = cuda.blockIdx.z
    while ic < G.shape[0] * C:
        ib = ic // C
        c = ic - ib * C
        b = i0 + ib
        q = cuda.blockIdx.y * cuda.blockDim.y + cuda.threadIdx.y
        while q < D * H:
            iz = q // H
            iy = q - iz * H
            acc = zero
            for tz in range(ks[0]):
                oz = iz + ps[0] - tz * ds[0]
                if oz < 0 or oz % ss[0] != 0 or oz // ss[0] >= od:
                    continue
                oz //= ss[0]
                for ty in range(ks[1]):
                    oy = iy + ps[1] - ty * ds[1]
                    if oy < 0 or oy % ss[1] != 0 or oy // ss[1] >= oh:
                        continue
                    rr = oz * oh + oy // ss[1] - row0
                    if rr < 0 or rr >= nrows:
                        continue
                    t0 = (tz * ks[1] + ty) * ks[2]
                    for tx in range(ks[2]):
                        ox = ix + ps[2] - tx * ds[2]
                        if ox < 0:
                            break  # ox only decreases with tx
                        if ss[2] != 1:
                            if ox % ss[2] != 0:
                                continue
                            ox //= ss[2]
                        if ox < ow:
                            acc += (_ld(G[ib, c * k3 + t0 + tx, rr, ox], bf, zero)
                                    * _ld(K[b, 0, t0 + tx, rr + row0, ox], kbf, zero))
            gx[b, c, iz, iy, ix] += acc
            q += cuda.gridDim.y * cuda.blockDim.y
        ic += cuda.gridDim.z


@cuda.jit(cache=True)
def _grad_k(G, x, i0, row0, ks, ss, ps, ds, oh, bf, kbf, zero, gK):
    """grid (ow/32, rows/_BY, images*k3), block (32, _BY):
    ``gK[b, 0, t, q] = sum_c G[i, c*k3 + t, q] * x[b, c, pos(q, t)]``."""
    C, D, H, W = x.shape[1], x.shape[2], x.shape[3], x.shape[4]
    nrows, ow = G.shape[2], G.shape[3]
    k3 = ks[0] * ks[1] * ks[2]
    xo = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if xo >= ow:
        return
    it = cuda.blockIdx.z
    while it < G.shape[0] * k3:
        ib = it // k3
        t = it - ib * k3
        b = i0 + ib
        tz, ty, tx = _tap(t, ks)
        ix = xo * ss[2] - ps[2] + tx * ds[2]
        rr = cuda.blockIdx.y * cuda.blockDim.y + cuda.threadIdx.y
        while rr < nrows:
            row = row0 + rr
            z = row // oh
            y = row - z * oh
            iz = z * ss[0] - ps[0] + tz * ds[0]
            iy = y * ss[1] - ps[1] + ty * ds[1]
            acc = zero
            if iz >= 0 and iz < D and iy >= 0 and iy < H and ix >= 0 and ix < W:
                for c in range(C):
                    acc += (_ld(G[ib, c * k3 + t, rr, xo], bf, zero)
                            * _ld(x[b, c, iz, iy, ix], bf, zero))
            gK[b, 0, t, row, xo] = _st(acc, kbf)
            rr += cuda.gridDim.y * cuda.blockDim.y
        it += cuda.gridDim.z


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


@cuda.jit(device=True, inline=True)
def _centre(f, ctr, has_ctr, b, cg, row, z, y, xo, ks, ss, ps, ds, zero):
    """The centre feature of output ``(row = (z, y), xo)``: given (``ctr``), or the centre
    tap of ``f`` (0 outside the input)."""
    if has_ctr:
        return zero + ctr[b, cg, row, xo]
    czi = _src(z, ks[0] // 2, ss[0], ps[0], ds[0], f.shape[2])
    cyi = _src(y, ks[1] // 2, ss[1], ps[1], ds[1], f.shape[3])
    cxi = _src(xo, ks[2] // 2, ss[2], ps[2], ds[2], f.shape[4])
    if czi >= 0 and cyi >= 0 and cxi >= 0:
        return zero + f[b, cg, czi, cyi, cxi]
    return zero


@cuda.jit(device=True, inline=True)
def _diff(f, b, cg, iz, iy, ix, c, asym, zero):
    """``f`` at input ``(iz, iy, ix)`` (0 when an index is -1: outside) minus the centre
    ``c``; negative differences are 0 with ``asym``."""
    v = zero
    if iz >= 0 and iy >= 0 and ix >= 0:
        v = zero + f[b, cg, iz, iy, ix]
    diff = v - c
    if asym and diff < 0:
        diff = zero
    return diff


# ----------------------------------------------------------------------------- pac_dist
# One thread per output element (backward: per input element).  f/gf [B, Cg, D, H, W];
# ctr/gc [B, Cg, rows, ow]; D/gD [B, 1|Cg, k3, rows, ow], rows = od*oh (row = z*oh + y).

@cuda.jit(cache=True)
def _dist_fwd(f, ctr, has_ctr, ks, ss, ps, ds, oh, asym, cw, zero, D):
    B, Cg, Di, H, W = f.shape
    rows, ow = D.shape[3], D.shape[4]
    i = cuda.grid(1)
    if i >= B * rows * ow:
        return
    xo = i % ow
    row = (i // ow) % rows
    b = i // (ow * rows)
    z = row // oh
    y = row - z * oh
    t = 0
    for tz in range(ks[0]):
        iz = _src(z, tz, ss[0], ps[0], ds[0], Di)
        for ty in range(ks[1]):
            iy = _src(y, ty, ss[1], ps[1], ds[1], H)
            for tx in range(ks[2]):
                ix = _src(xo, tx, ss[2], ps[2], ds[2], W)
                acc = zero
                for cg in range(Cg):
                    c = _centre(f, ctr, has_ctr, b, cg, row, z, y, xo, ks, ss, ps, ds, zero)
                    diff = _diff(f, b, cg, iz, iy, ix, c, asym, zero)
                    if cw:
                        D[b, cg, t, row, xo] = diff * diff
                    else:
                        acc += diff * diff
                if not cw:
                    D[b, 0, t, row, xo] = acc
                t += 1


@cuda.jit(cache=True)
def _dist_bwd_ctr(gD, f, ctr, has_ctr, ks, ss, ps, ds, oh, asym, cw, zero, gc):
    """gc[b, cg, row, x] = -sum_t 2 * diff * gD (the gradient w.r.t. the centre features)."""
    B, Cg, Di, H, W = f.shape
    rows, ow = gD.shape[3], gD.shape[4]
    i = cuda.grid(1)
    if i >= B * Cg * rows * ow:
        return
    xo = i % ow
    row = (i // ow) % rows
    cg = (i // (ow * rows)) % Cg
    b = i // (ow * rows * Cg)
    z = row // oh
    y = row - z * oh
    dc = cg if cw else 0
    c = _centre(f, ctr, has_ctr, b, cg, row, z, y, xo, ks, ss, ps, ds, zero)
    acc = zero
    t = 0
    for tz in range(ks[0]):
        iz = _src(z, tz, ss[0], ps[0], ds[0], Di)
        for ty in range(ks[1]):
            iy = _src(y, ty, ss[1], ps[1], ds[1], H)
            for tx in range(ks[2]):
                ix = _src(xo, tx, ss[2], ps[2], ds[2], W)
                diff = _diff(f, b, cg, iz, iy, ix, c, asym, zero)
                acc -= (diff + diff) * gD[b, dc, t, row, xo]
                t += 1
    gc[b, cg, row, xo] = acc


@cuda.jit(cache=True)
def _dist_bwd_guide(gD, f, ctr, has_ctr, ks, ss, ps, ds, oh, asym, cw, zero, gc, gf):
    """gf[b, cg, iz, iy, ix]: the taps that read this element, plus (no given centre) the
    centre term."""
    B, Cg, Di, H, W = f.shape
    rows, ow = gD.shape[3], gD.shape[4]
    od = rows // oh
    i = cuda.grid(1)
    if i >= B * Cg * Di * H * W:
        return
    ix = i % W
    iy = (i // W) % H
    iz = (i // (W * H)) % Di
    cg = (i // (W * H * Di)) % Cg
    b = i // (W * H * Di * Cg)
    dc = cg if cw else 0
    acc = zero
    for tz in range(ks[0]):
        z = _dst(iz, tz, ss[0], ps[0], ds[0], od)
        if z < 0:
            continue
        for ty in range(ks[1]):
            y = _dst(iy, ty, ss[1], ps[1], ds[1], oh)
            if y < 0:
                continue
            row = z * oh + y
            for tx in range(ks[2]):
                xo = _dst(ix, tx, ss[2], ps[2], ds[2], ow)
                if xo < 0:
                    continue
                c = _centre(f, ctr, has_ctr, b, cg, row, z, y, xo, ks, ss, ps, ds, zero)
                diff = _diff(f, b, cg, iz, iy, ix, c, asym, zero)
                acc += (diff + diff) * gD[b, dc, (tz * ks[1] + ty) * ks[2] + tx, row, xo]
    if not has_ctr:
        z = _dst(iz, ks[0] // 2, ss[0], ps[0], ds[0], od)
        y = _dst(iy, ks[1] // 2, ss[1], ps[1], ds[1], oh)
        xo = _dst(ix, ks[2] // 2, ss[2], ps[2], ds[2], ow)
        if z >= 0 and y >= 0 and xo >= 0:
            acc += gc[b, cg, z * oh + y, xo]
    gf[b, cg, iz, iy, ix] = acc


# ----------------------------------------------------------------------------- pac_pool
# (also the depthwise shared-filter convolution: tap weights tw [k3] and a bias [C])
# x/gx [B, C, D, H, W]; K/gq [B, 1|C, k3, rows, ow]; out/gout [B, C, rows, ow].

@cuda.jit(cache=True)
def _pool_fwd(x, K, tw, bias, ks, ss, ps, ds, oh, zero, out):
    B, C, Di, H, W = x.shape
    kc = K.shape[1]
    rows, ow = out.shape[2], out.shape[3]
    i = cuda.grid(1)
    if i >= B * C * rows * ow:
        return
    xo = i % ow
    row = (i // ow) % rows
    c = (i // (ow * rows)) % C
    b = i // (ow * rows * C)
    z = row // oh
    y = row - z * oh
    kk = c if kc > 1 else 0
    acc = zero
    for tz in range(ks[0]):
        iz = _src(z, tz, ss[0], ps[0], ds[0], Di)
        if iz < 0:
            continue
        for ty in range(ks[1]):
            iy = _src(y, ty, ss[1], ps[1], ds[1], H)
            if iy < 0:
                continue
            t0 = (tz * ks[1] + ty) * ks[2]
            for tx in range(ks[2]):
                ix = _src(xo, tx, ss[2], ps[2], ds[2], W)
                if ix < 0:
                    continue
                acc += tw[t0 + tx] * K[b, kk, t0 + tx, row, xo] * x[b, c, iz, iy, ix]
    out[b, c, row, xo] = acc + bias[c]


@cuda.jit(cache=True)
def _pool_bwd_x(gout, K, tw, ks, ss, ps, ds, oh, zero, gx):
    B, C, Di, H, W = gx.shape
    kc = K.shape[1]
    rows, ow = gout.shape[2], gout.shape[3]
    od = rows // oh
    i = cuda.grid(1)
    if i >= B * C * Di * H * W:
        return
    ix = i % W
    iy = (i // W) % H
    iz = (i // (W * H)) % Di
    c = (i // (W * H * Di)) % C
    b = i // (W * H * Di * C)
    kk = c if kc > 1 else 0
    acc = zero
    for tz in range(ks[0]):
        z = _dst(iz, tz, ss[0], ps[0], ds[0], od)
        if z < 0:
            continue
        for ty in range(ks[1]):
            y = _dst(iy, ty, ss[1], ps[1], ds[1], oh)
            if y < 0:
                continue
            row = z * oh + y
            t0 = (tz * ks[1] + ty) * ks[2]
            for tx in range(ks[2]):
                xo = _dst(ix, tx, ss[2], ps[2], ds[2], ow)
                if xo < 0:
                    continue
                acc += gout[b, c, row, xo] * (tw[t0 + tx] * K[b, kk, t0 + tx, row, xo])
    gx[b, c, iz, iy, ix] = acc


@cuda.jit(cache=True)
def _pool_bwd_q(gout, x, ks, ss, ps, ds, oh, zero, gq):
    """gq[b, kk, t, row, x] = sum over the channels sharing K channel kk of gout * x(pos)."""
    B, C, Di, H, W = x.shape
    kc, k3 = gq.shape[1], gq.shape[2]
    rows, ow = gout.shape[2], gout.shape[3]
    i = cuda.grid(1)
    if i >= B * kc * k3 * rows * ow:
        return
    xo = i % ow
    row = (i // ow) % rows
    t = (i // (ow * rows)) % k3
    kk = (i // (ow * rows * k3)) % kc
    b = i // (ow * rows * k3 * kc)
    z = row // oh
    tz, ty, tx = _tap(t, ks)
    iz = _src(z, tz, ss[0], ps[0], ds[0], Di)
    iy = _src(row - z * oh, ty, ss[1], ps[1], ds[1], H)
    ix = _src(xo, tx, ss[2], ps[2], ds[2], W)
    acc = zero
    if iz >= 0 and iy >= 0 and ix >= 0:
        if kc > 1:
            acc = gout[b, kk, row, xo] * x[b, kk, iz, iy, ix]
        else:
            for c in range(C):
                acc += gout[b, c, row, xo] * x[b, c, iz, iy, ix]
    gq[b, kk, t, row, xo] = acc


# ----------------------------------------------------------------------------- torch wrappers
# Geometry arguments are sequences of r ints (r = the spatial rank); Geometry turns them
# into the kernels' 3-D tuples.

def _launch(kernel, n_threads: int, device: torch.device, *args) -> None:
    """A one-thread-per-element kernel over ``n_threads`` threads."""
    runtime.launch(kernel, (n_threads + _TPB - 1) // _TPB, _TPB, device, *args)


def _zero(dtype: torch.dtype):
    """The accumulation type's zero: float64 for float64 data, float32 for everything else."""
    return np.float64(0) if dtype == torch.float64 else np.float32(0)


def _new(shape, like: torch.Tensor, zero: bool = False) -> torch.Tensor:
    fn = torch.zeros if zero else torch.empty
    return fn(shape, dtype=like.dtype, device=like.device)


def _gemm_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the GEMM path keeps data in: half types stay half (tensor cores)."""
    return dtype if dtype in runtime.HALF_DTYPES + runtime.CPU_DTYPES else torch.float32


def _grid(n: int, per: int) -> int:
    return max(1, min(_MAX_GRID_YZ, (n + per - 1) // per))


def _geo(x: torch.Tensor, kernel_size, stride, padding, dilation) -> Geometry:
    return Geometry.of(x.shape[2:], kernel_size, stride, padding, dilation)


def _args(geo: Geometry) -> tuple:
    """The geometry arguments of every kernel: ks, ss, ps, ds and oh."""
    return geo.ks, geo.ss, geo.ps, geo.ds, geo.outs[1]


def _vol(t: torch.Tensor, geo: Geometry):
    """An input-sized ``[B, C, *sizes]`` tensor as the kernels' ``[B, C, D, H, W]`` array."""
    return as_array(t.view(t.shape[0], t.shape[1], *geo.ins))


def _rows(t: torch.Tensor, geo: Geometry, taps: bool = False):
    """An output-sized ``[B, C, (*k,) *out]`` tensor as ``[B, C, (k3,) rows, ow]``."""
    lead = (t.shape[0], t.shape[1]) + ((geo.taps,) if taps else ())
    return as_array(t.view(*lead, geo.rows, geo.outs[2]))


def _out_shape(geo: Geometry, b: int, c: int) -> tuple:
    return (b, c) + geo.outs[3 - geo.rank:]


class _Conv:
    """One ``pac_conv`` call's prepared tensors and geometry, as the GEMM kernels see them:
    ``x5 [B, C, D, H, W]``, ``K5 [B, 1, k3, od*oh, ow]``, ``W2 [O, C*k3]`` in the compute dtype
    (``K`` in float32 beside half data if given so)."""

    def __init__(self, x, K, weight, stride, padding, dilation):
        dt = _gemm_dtype(x.dtype)
        kdt = torch.float32 if dt in runtime.HALF_DTYPES and K.dtype == torch.float32 else dt
        xc, w = prep(x, weight, dtype=dt)
        (Kc,) = prep(K, dtype=kdt)
        geo = Geometry.of(xc.shape[2:], w.shape[2:], stride, padding, dilation)
        B, C = xc.shape[:2]
        self.out_sizes = geo.outs[3 - geo.rank:]
        self.oh, self.ow = geo.outs[1], geo.outs[2]
        self.dtype, self.device = dt, xc.device
        self.x5 = xc.view(B, C, *geo.ins)
        self.K5 = Kc.view(B, 1, geo.taps, geo.rows, self.ow)
        self.W2 = w.reshape(w.shape[0], -1)
        self.geo = (geo.ks, geo.ss, geo.ps, geo.ds)
        self.flags = (dt == torch.bfloat16, kdt == torch.bfloat16, _zero(dt))

    def tiles(self):
        """The output tiles and a workspace for one tile's columns; the tiles shrink (down to
        one output row) when the workspace cannot be allocated."""
        B, R = self.x5.shape[0], self.W2.shape[1]
        rows, ow = self.K5.shape[3], self.ow
        limit = runtime.workspace_limit()
        while True:
            tiles, numel = runtime.row_blocks(B, R, rows, ow, self.dtype.itemsize, limit)
            try:
                return tiles, runtime.workspace(numel, self.dtype, self.device)
            except torch.cuda.OutOfMemoryError:
                if numel <= R * ow:
                    raise
                limit = numel * self.dtype.itemsize // 2

    def args(self, b0, r0):
        return (b0, r0) + self.geo + (self.oh,) + self.flags

    def columns(self, ws, b0, nb, r0, nr):
        """Build the tile's modulated columns into ``ws``; returns them ``[nb, R, nr*ow]``."""
        R, ow = self.W2.shape[1], self.ow
        cols = ws[:nb * R * nr * ow].view(nb, R, nr, ow)
        runtime.launch(_cols, (R, _grid(nr, _BY), min(nb, _MAX_GRID_YZ)), (32, _BY),
                       self.device, as_array(self.x5), as_array(self.K5), *self.args(b0, r0),
                       as_array(cols))
        return cols.view(nb, R, nr * ow)


def _tile(flat: torch.Tensor, b0: int, nb: int, r0: int, nr: int, ow: int) -> torch.Tensor:
    return flat[b0:b0 + nb, :, r0 * ow:(r0 + nr) * ow]


def _forward_into(cv: _Conv, flat, bias=None, alpha=None) -> None:
    """``flat [B, O, rows*ow] = W2 @ cols (+ bias)`` tile by tile; with ``alpha``,
    ``flat += alpha * W2 @ cols`` in place."""
    tiles, ws = cv.tiles()
    for b0, nb, r0, nr in tiles:
        cols = cv.columns(ws, b0, nb, r0, nr)
        dst = _tile(flat, b0, nb, r0, nr, cv.ow)
        w = cv.W2.expand(nb, -1, -1)
        if alpha is not None:
            dst.baddbmm_(w, cols, alpha=alpha)
        elif bias is None:
            torch.matmul(cv.W2, cols, out=dst)
        else:
            torch.baddbmm(bias.view(1, -1, 1), w, cols, out=dst)


@on_device
def pac_conv_fwd(x, K, weight, bias, stride, padding, dilation, shared_filters):
    """CUDA ``pac_conv``: ``[b, C, *sizes] -> [b, O, *out]`` (see the module docstring)."""
    if shared_filters:
        return pac_pool_fwd(x, K, tuple(weight.shape[2:]), stride, padding, dilation,
                            weight=weight, bias=bias)
    cv = _Conv(x, K, weight, stride, padding, dilation)
    (bc,) = prep(bias, dtype=cv.dtype)
    B, O = x.shape[0], weight.shape[0]
    out = torch.empty((B, O, cv.K5.shape[3] * cv.ow), dtype=cv.dtype, device=cv.device)
    _forward_into(cv, out, bias=bc)
    return out.view(B, O, *cv.out_sizes).to(x.dtype)


@on_device
def pac_conv_add_(out, x, K, weight, stride, padding, dilation, shared_filters, alpha):
    """``out += alpha * pac_conv(x, K, weight)`` in place: the GEMMs accumulate straight
    into ``out`` (contiguous, of ``x``'s dtype); shared filters add a computed product."""
    if shared_filters or out.dtype != _gemm_dtype(x.dtype):
        out.add_(pac_conv_fwd(x, K, weight, None, stride, padding, dilation, shared_filters),
                 alpha=alpha)
        return
    cv = _Conv(x, K, weight, stride, padding, dilation)
    _forward_into(cv, out.view(out.shape[0], out.shape[1], -1), alpha=alpha)


@on_device
def pac_conv_bwd(grad, x, K, weight, stride, padding, dilation, shared_filters,
                 needs=(True, True, True)):
    """Gradients of ``pac_conv`` w.r.t. ``(x, K, weight)``; ``None`` where not needed.
    ``G = W2^T g`` is formed once per tile and shared by the ``x`` and ``K`` gathers."""
    if shared_filters:
        return pac_pool_bwd(grad, x, K, tuple(weight.shape[2:]), stride, padding, dilation,
                            needs=needs, weight=weight)
    need_x, need_k, need_w = (bool(v) for v in needs)
    cv = _Conv(x, K, weight, stride, padding, dilation)
    (g,) = prep(grad, dtype=cv.dtype)
    B, O = g.shape[:2]
    acc = torch.float32 if cv.dtype in runtime.HALF_DTYPES else cv.dtype
    flat = g.view(B, O, -1)
    gx = torch.zeros(cv.x5.shape, dtype=acc, device=cv.device) if need_x else None
    gK = torch.empty(cv.K5.shape, dtype=cv.K5.dtype, device=cv.device) if need_k else None
    gW2 = torch.zeros(cv.W2.shape, dtype=acc, device=cv.device) if need_w else None
    R, ow = cv.W2.shape[1], cv.ow
    tiles, ws = cv.tiles()
    for b0, nb, r0, nr in tiles:
        gb = _tile(flat, b0, nb, r0, nr, ow)
        if need_w:
            cols = cv.columns(ws, b0, nb, r0, nr)
            for i in range(nb):
                if acc == cv.dtype:
                    gW2.addmm_(gb[i], cols[i].t())
                else:  # half GEMM (float32 accumulation inside), summed over tiles in float32
                    gW2 += torch.mm(gb[i], cols[i].t())
        if need_x or need_k:
            G = ws[:nb * R * nr * ow].view(nb, R, nr * ow)
            torch.matmul(cv.W2.t(), gb, out=G)
            Ga = as_array(G.view(nb, R, nr, ow))
            if need_x:
                C, D, H, W = cv.x5.shape[1:]
                runtime.launch(_grad_x, (_grid(W, 32), _grid(D * H, _BY),
                                         min(nb * C, _MAX_GRID_YZ)),
                               (32, _BY), cv.device, Ga, as_array(cv.K5), *cv.args(b0, r0),
                               as_array(gx))
            if need_k:
                k3 = R // cv.x5.shape[1]
                runtime.launch(_grad_k, (_grid(ow, 32), _grid(nr, _BY),
                                         min(nb * k3, _MAX_GRID_YZ)),
                               (32, _BY), cv.device, Ga, as_array(cv.x5), *cv.args(b0, r0),
                               as_array(gK))
    return (gx.view(x.shape).to(x.dtype) if need_x else None,
            gK.view(K.shape).to(K.dtype) if need_k else None,
            gW2.view(weight.shape).to(weight.dtype) if need_w else None)


@on_device
def pac_dist_fwd(guide, center, kernel_size, stride, padding, dilation, asym, channel_wise):
    """CUDA ``pac_dist``: ``[b, Cg, *sizes] -> [b, 1|Cg, *k, *out]``."""
    dtype = guide.dtype
    f, ctr = prep(guide, center)
    geo = _geo(f, kernel_size, stride, padding, dilation)
    B, Cg = f.shape[:2]
    D = _new((B, Cg if channel_wise else 1) + tuple(kernel_size) + geo.outs[3 - geo.rank:], f)
    ctr_a = _rows(ctr, geo) if ctr is not None else as_array(_new((1, 1, 1, 1), f))
    _launch(_dist_fwd, B * geo.rows * geo.outs[2], f.device, _vol(f, geo), ctr_a,
            ctr is not None, *_args(geo), bool(asym), bool(channel_wise), _zero(f.dtype),
            _rows(D, geo, taps=True))
    return D.to(dtype)


@on_device
def pac_dist_bwd(grad, guide, center, kernel_size, stride, padding, dilation, asym,
                 channel_wise):
    """Gradients of ``pac_dist``: ``(grad_guide [b, Cg, *sizes], grad_center [b, Cg, *out])``."""
    dtype = guide.dtype
    gD, f, ctr = prep(grad, guide, center)
    geo = _geo(f, kernel_size, stride, padding, dilation)
    B, Cg = f.shape[:2]
    gc = _new(_out_shape(geo, B, Cg), f)
    gf = _new(f.shape, f)
    args = (_rows(gD, geo, taps=True), _vol(f, geo),
            _rows(ctr, geo) if ctr is not None else as_array(_new((1, 1, 1, 1), f)),
            ctr is not None, *_args(geo), bool(asym), bool(channel_wise), _zero(f.dtype),
            _rows(gc, geo))
    _launch(_dist_bwd_ctr, B * Cg * geo.rows * geo.outs[2], f.device, *args)
    _launch(_dist_bwd_guide, f.numel(), f.device, *args, _vol(gf, geo))
    return gf.to(dtype), gc.to(dtype)


@on_device
def pac_pool_fwd(x, K, kernel_size, stride, padding, dilation, weight=None, bias=None):
    """CUDA ``pac_pool`` (and, with ``weight`` [1, 1, *k], shared-filter ``pac_conv``);
    computed in float32 (float64 for float64 data), results in ``x``'s dtype."""
    dtype = x.dtype
    xc, Kc, w, bc = prep(x, K, weight, bias)
    geo = _geo(xc, kernel_size, stride, padding, dilation)
    B, C = xc.shape[:2]
    tw = w.reshape(-1) if w is not None else torch.ones(geo.taps, dtype=xc.dtype,
                                                        device=xc.device)
    if bc is None:
        bc = _new((C,), xc, zero=True)
    out = _new(_out_shape(geo, B, C), xc)
    _launch(_pool_fwd, out.numel(), xc.device, _vol(xc, geo), _rows(Kc, geo, taps=True),
            as_array(tw), as_array(bc), *_args(geo), _zero(xc.dtype), _rows(out, geo))
    return out.to(dtype)


@on_device
def pac_pool_bwd(grad, x, K, kernel_size, stride, padding, dilation,
                 needs=(True, True, False), weight=None):
    """Gradients of ``pac_pool`` w.r.t. ``(x, K[, tap weight])``; ``None`` where not needed."""
    need_x, need_k = bool(needs[0]), bool(needs[1])
    need_w = weight is not None and bool(needs[2])
    dtypes = (x.dtype, K.dtype, weight.dtype if weight is not None else None)
    g, xc, Kc, w = prep(grad, x, K, weight)
    geo = _geo(xc, kernel_size, stride, padding, dilation)
    tw = w.reshape(-1) if w is not None else torch.ones(geo.taps, dtype=xc.dtype,
                                                        device=xc.device)
    z = _zero(xc.dtype)
    gx = gK = gW = None
    if need_x:
        gx = _new(xc.shape, xc)
        _launch(_pool_bwd_x, xc.numel(), xc.device, _rows(g, geo), _rows(Kc, geo, taps=True),
                as_array(tw), *_args(geo), z, _vol(gx, geo))
        gx = gx.to(dtypes[0])
    if need_k or need_w:
        # gq = dL/d(tw*K); K-sized, like K itself
        gq = _new(Kc.shape, xc)
        _launch(_pool_bwd_q, gq.numel(), xc.device, _rows(g, geo), _vol(xc, geo),
                *_args(geo), z, _rows(gq, geo, taps=True))
        tws = tw.view(1, 1, *kernel_size, *(1,) * geo.rank)
        if need_k:
            gK = (gq * tws).to(dtypes[1])
        if need_w:
            gW = (gq * Kc).sum(dim=(0, 1) + tuple(range(2 + geo.rank, 2 + 2 * geo.rank))
                               ).view(w.shape).to(dtypes[2])
    return gx, gK, gW
