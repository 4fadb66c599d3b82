"""A row-major GEMM that Numba kernels call, also inside ``prange`` loops: the BLAS torch uses.

The CPU kernels contract their column tiles with :func:`gemm` *inside* one parallel region,
each thread on its own tiles, instead of leaving the region for a ``torch.mm`` per tile: every
region ends at a barrier, and with another process on the cores each barrier waits for a
descheduled thread (see :mod:`pacnet.kernels.pac.cpu`).  Called inside an OpenMP region of
torch's pool (:func:`pacnet.kernels.runtime.use_torch_threads`), MKL runs single-threaded on
the calling thread, as a nested region does.

Where the GEMM comes from: torch's x86-64 builds link MKL into ``libtorch_cpu`` and export
its Fortran ``sgemm_``/``dgemm_``; :func:`load` registers their addresses with LLVM under the
names the kernels call (``pacnet_sgemm``, ``pacnet_dgemm``), so the compiled kernels stay
cacheable (``cache=True``: they refer to the names, which are bound again in every process
before a kernel is loaded).  Where torch exports no BLAS, the names are bound to a plain
Numba GEMM (correct, slower): :data:`SOURCE` says which one runs.
"""

from __future__ import annotations

import ctypes
import os
import sys

import llvmlite.binding as llvm
import numpy as np
from numba import carray, cfunc, njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

__all__ = ["gemm", "load", "SOURCE"]

_P8, _PI = types.CPointer(types.uint8), types.CPointer(types.int32)


def _signature(dt):
    p = types.CPointer(dt)
    # Fortran ?gemm_(transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc), LP64
    return types.void(_P8, _P8, _PI, _PI, _PI, p, p, _PI, p, _PI, p, p, _PI)


_SIGS = {"pacnet_sgemm": _signature(types.float32), "pacnet_dgemm": _signature(types.float64)}
_sgemm = types.ExternalFunction("pacnet_sgemm", _SIGS["pacnet_sgemm"])
_dgemm = types.ExternalFunction("pacnet_dgemm", _SIGS["pacnet_dgemm"])

SOURCE = None  # the library whose GEMM the kernels call, or "numba" (set by load())


def _torch_blas():
    """``(sgemm_, dgemm_)`` addresses exported by torch's CPU library, with its path, or None."""
    import torch
    name = {"darwin": "libtorch_cpu.dylib", "win32": "torch_cpu.dll"}.get(sys.platform,
                                                                          "libtorch_cpu.so")
    path = os.path.join(os.path.dirname(torch.__file__), "lib", name)
    try:
        lib = ctypes.CDLL(path)
        return (ctypes.cast(lib.sgemm_, ctypes.c_void_p).value,
                ctypes.cast(lib.dgemm_, ctypes.c_void_p).value, path)
    except (OSError, AttributeError):
        return None


def load() -> str:
    """Bind ``pacnet_sgemm``/``pacnet_dgemm`` (once per process) and return :data:`SOURCE`."""
    global SOURCE
    if SOURCE is None:
        found = _torch_blas()
        if found is not None:
            llvm.add_symbol("pacnet_sgemm", found[0])
            llvm.add_symbol("pacnet_dgemm", found[1])
            SOURCE = found[2]
        else:
            llvm.add_symbol("pacnet_sgemm", _fallback(types.float32).address)
            llvm.add_symbol("pacnet_dgemm", _fallback(types.float64).address)
            SOURCE = "numba"
    return SOURCE


# ----------------------------------------------------------------------------- the Numba side

@intrinsic
def _ptr(typingctx, arr):
    """The data pointer of an array, typed as a pointer to its dtype."""
    sig = types.CPointer(arr.dtype)(arr)

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        return ary.data
    return sig, codegen


@intrinsic
def _offset(typingctx, ptr, n):
    """``ptr + n`` elements."""
    sig = ptr(ptr, n)

    def codegen(context, builder, signature, args):
        return cgutils.pointer_add(builder, args[0], builder.mul(
            args[1], context.get_constant(signature.args[1], context.get_abi_sizeof(
                context.get_data_type(signature.args[0].dtype)))))
    return sig, codegen


def gemm(ta, tb, m, n, k, alpha, a, a0, lda, b, b0, ldb, beta, c, c0, ldc):
    """Row-major ``C = alpha * op(A) @ op(B) + beta * C`` on flat arrays: ``op(A)`` is
    ``m x k``, ``op(B)`` ``k x n`` and ``C`` ``m x n``, stored from elements ``a0``, ``b0``,
    ``c0`` with row strides ``lda``, ``ldb``, ``ldc``; ``ta``/``tb`` say whether A/B are
    stored transposed.  Only inside Numba kernels; the arrays share one float dtype."""
    raise NotImplementedError("pacnet.kernels.blas.gemm runs inside Numba kernels only")


@overload(gemm, jit_options={"cache": True})
def _gemm_impl(ta, tb, m, n, k, alpha, a, a0, lda, b, b0, ldb, beta, c, c0, ldc):
    dt = c.dtype
    fn = _sgemm if dt == types.float32 else _dgemm
    npdt = np.float32 if dt == types.float32 else np.float64

    def impl(ta, tb, m, n, k, alpha, a, a0, lda, b, b0, ldb, beta, c, c0, ldc):
        # column-major C^T = op(B)^T op(A)^T: the Fortran call takes B first
        ch = np.empty(2, np.uint8)
        ch[0] = 84 if tb else 78  # 'T' / 'N'
        ch[1] = 84 if ta else 78
        dims = np.empty(6, np.int32)
        dims[0] = n
        dims[1] = m
        dims[2] = k
        dims[3] = ldb
        dims[4] = lda
        dims[5] = ldc
        sc = np.empty(2, npdt)
        sc[0] = alpha
        sc[1] = beta
        pd = _ptr(dims)
        fn(_ptr(ch), _offset(_ptr(ch), 1), pd, _offset(pd, 1), _offset(pd, 2), _ptr(sc),
           _offset(_ptr(b), b0), _offset(pd, 3), _offset(_ptr(a), a0), _offset(pd, 4),
           _offset(_ptr(sc), 1), _offset(_ptr(c), c0), _offset(pd, 5))
    return impl


def _fallback(dt):
    """A plain Numba ``?gemm_`` (column-major, Fortran arguments) for builds of torch that
    export no BLAS."""
    @cfunc(_signature(dt), cache=True)
    def fortran_gemm(transa, transb, pm, pn, pk, palpha, pa, plda, pb, pldb, pbeta, pc, pldc):
        _col_gemm(transa[0] == 84, transb[0] == 84, pm[0], pn[0], pk[0], palpha[0], pa,
                  plda[0], pb, pldb[0], pbeta[0], pc, pldc[0])
    return fortran_gemm


@njit(cache=True)
def _col_gemm(ta, tb, m, n, k, alpha, pa, lda, pb, ldb, beta, pc, ldc):
    # column-major: C[i, j] at pc[i + j*ldc]; A[i, l] at pa[i + l*lda] (or pa[l + i*lda])
    cm = carray(pc, (n * ldc,))
    am = carray(pa, ((k if not ta else m) * lda,))
    bm = carray(pb, ((n if not tb else k) * ldb,))
    for j in range(n):
        col = cm[j * ldc:j * ldc + m]
        for i in range(m):
            col[i] = col[i] * beta if beta != 0 else 0
        for l in range(k):
            blj = bm[l + j * ldb] if not tb else bm[j + l * ldb]
            s = alpha * blj
            if s == 0:
                continue
            if not ta:
                arow = am[l * lda:l * lda + m]
                for i in range(m):
                    col[i] += s * arow[i]
            else:
                for i in range(m):
                    col[i] += s * am[l + i * lda]


load()
