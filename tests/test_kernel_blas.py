"""pacnet.kernels.blas: the row-major GEMM the CPU kernels call inside their parallel regions."""

from __future__ import annotations

import ctypes
import itertools

import numpy as np
import pytest
from numba import njit, prange, types

from pacnet.kernels import blas

CASES = list(itertools.product((np.float32, np.float64), (False, True), (False, True)))


@njit(parallel=True)
def _twice(ta, tb, m, n, k, alpha, a, a0, lda, b, b0, ldb, beta, c, c0, ldc):
    for i in prange(2):  # two threads, each on its own output
        blas.gemm(ta, tb, m, n, k, alpha, a, a0, lda, b, b0, ldb, beta, c[i], c0, ldc)


def _operands(rng, dt, ta, tb, m=5, n=7, k=3, pad=2):
    """A, B and two C's stored with offsets and row strides larger than the matrices."""
    ar, ac = (k, m) if ta else (m, k)
    br, bc = (n, k) if tb else (k, n)
    a = rng.standard_normal(3 + ar * (ac + pad)).astype(dt)
    b = rng.standard_normal(1 + br * (bc + pad)).astype(dt)
    c = rng.standard_normal((2, 4 + m * (n + pad))).astype(dt)
    view = (lambda buf, off, r, cols, ld:
            buf[off:off + r * ld].reshape(r, ld)[:, :cols])
    A, B = view(a, 3, ar, ac, ac + pad), view(b, 1, br, bc, bc + pad)
    want = c.copy()
    for i in range(2):
        C = view(want[i], 4, m, n, n + pad)
        C[...] = 0.5 * C + 1.5 * (A.T if ta else A) @ (B.T if tb else B)
    return (m, n, k, 1.5, a, 3, ac + pad, b, 1, bc + pad, 0.5, c, 4, n + pad), want


@pytest.mark.parametrize("dt, ta, tb", CASES)
def test_gemm_in_a_parallel_kernel_matches_numpy(dt, ta, tb):
    """Transposes, offsets, leading dimensions, alpha and beta, float32 and float64, from two
    threads of a prange at once."""
    args, want = _operands(np.random.default_rng(0), dt, ta, tb)
    _twice(ta, tb, *args)
    tol = 1e-5 if dt == np.float32 else 1e-12
    np.testing.assert_allclose(args[11], want, rtol=tol, atol=tol)


def test_gemm_comes_from_torchs_blas():
    """On torch's x86-64 builds the kernels call MKL's GEMM from libtorch_cpu."""
    assert blas.load() == blas.SOURCE
    if blas.SOURCE == "numba":
        pytest.skip("this build of torch exports no BLAS; the Numba GEMM runs")
    assert "torch_cpu" in blas.SOURCE


@pytest.mark.parametrize("dt, ta, tb", CASES)
def test_numba_fallback_is_a_fortran_gemm(dt, ta, tb):
    """The GEMM bound where torch exports none takes the Fortran ?gemm_ arguments (column
    major) and computes what numpy does."""
    nbt = types.float32 if dt == np.float32 else types.float64
    fn = blas._fallback(nbt).ctypes
    rng = np.random.default_rng(1)
    m, n, k = 4, 6, 3
    A = rng.standard_normal((k, m) if ta else (m, k)).astype(dt)  # row-major = op(A)
    B = rng.standard_normal((n, k) if tb else (k, n)).astype(dt)
    C = rng.standard_normal((m, n)).astype(dt)
    want = 0.25 * C + 2.0 * (A.T if ta else A) @ (B.T if tb else B)
    # row-major C is column-major C^T = op(B)^T op(A)^T: B goes first

    def p(arr):
        return arr.ctypes.data_as(ctypes.POINTER(np.ctypeslib.as_ctypes_type(arr.dtype)))

    ch = np.array([84 if tb else 78, 84 if ta else 78], np.uint8)
    dims = np.array([n, m, k, B.shape[1], A.shape[1], n], np.int32)
    sc = np.array([2.0, 0.25], dt)
    out = C.copy()
    fn(p(ch[0:]), p(ch[1:]), p(dims[0:]), p(dims[1:]), p(dims[2:]), p(sc[0:]), p(B),
       p(dims[3:]), p(A), p(dims[4:]), p(sc[1:]), p(out), p(dims[5:]))
    tol = 1e-5 if dt == np.float32 else 1e-12
    np.testing.assert_allclose(out, want, rtol=tol, atol=tol)
