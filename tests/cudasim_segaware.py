"""Run the segaware CUDA kernels under the Numba CUDA simulator and compare with the reference.

Run by tests/test_segaware_kernels.py in a subprocess with NUMBA_ENABLE_CUDASIM=1 (the
variable must be set before numba is imported).  The simulator runs one Python thread per
CUDA thread, so the shapes are tiny.  Prints "cudasim segaware: all ... passed" on success,
exits non-zero on the first mismatch.
"""

from __future__ import annotations

import os
import sys
import time

GPU = "--gpu" in sys.argv  # the same checks on a real GPU (benchmarks/gpu.py runs them)
if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1" and not GPU:
    sys.exit("run with NUMBA_ENABLE_CUDASIM=1 (or --gpu on a machine with a GPU)")
DEVICE = "cuda" if GPU else "cpu"

import torch  # noqa: E402

from pacnet.kernels.segaware import cuda as kcuda  # noqa: E402
from pacnet.kernels.segaware import reference as ref  # noqa: E402

assert kcuda.SIMULATOR or GPU

# (H, W, kernel, pad, stride, dilation): same padding, an even kernel with stride 2 and
# dilation, padding beyond (k//2)*d (centres outside the image).
GEOMETRIES = [
    (4, 5, (3, 3), (1, 1), (1, 1), (1, 1)),
    (5, 4, (2, 3), (1, 2), (2, 1), (1, 2)),
    (4, 4, (3, 3), (3, 2), (1, 2), (1, 1)),
]


def close(name, got, want, tol=1e-12):
    if got.shape != want.shape or not torch.allclose(got, want, rtol=tol, atol=tol):
        diff = (got - want).abs().max().item() if got.shape == want.shape else "shape"
        sys.exit(f"MISMATCH {name}: {diff}")


def hw(h, w, k, p, s, d):
    return ref.out_size(h, k[0], p[0], s[0], d[0]), ref.out_size(w, k[1], p[1], s[1], d[1])


def main() -> None:
    start = time.time()
    gen = torch.Generator().manual_seed(0)
    checks = 0
    for h, w, k, p, s, d in GEOMETRIES:
        emb = torch.randn(1, 2, h, w, generator=gen, dtype=torch.float64).to(DEVICE)
        out_hw = hw(h, w, k, p, s, d)
        for norm, rc, rb in ((1, True, False), (2, False, True)):
            got = emb.new_empty((1, k[0] * k[1], *out_hw))
            kcuda.im2dist_forward(emb, got, k, p, s, d, norm, rc, rb, ref.BIG)
            close(f"im2dist {k}{p}{s}{d} L{norm}", got,
                  ref.im2dist(emb, k, p, s, d, norm, rc, rb))
            g = torch.randn(got.shape, generator=gen, dtype=torch.float64).to(DEVICE)
            gE = torch.empty_like(emb)
            kcuda.im2dist_backward(g, emb, gE, k, p, s, d, norm)
            close(f"im2dist_backward {k}{p}{s}{d} L{norm}", gE,
                  ref.im2dist_backward(g, emb, k, p, s, d, norm, rc, rb))
            checks += 2
        labels = torch.randint(0, 3, (1, 1, h, w), generator=gen).double().to(DEVICE)
        labels[0, 0, 0, 0] = 255
        for ignore in (None, 255):
            got = torch.empty((1, k[0] * k[1], *out_hw), dtype=torch.float64, device=DEVICE)
            kcuda.im2parity_forward(labels.to(torch.int32), got, k, p, s, d, ignore is not None,
                                    ignore or 0, ref.NO_PAIR if ignore is None else ignore)
            close(f"im2parity {k}{p}{s}{d} ignore={ignore}", got,
                  ref.im2parity(labels, k, p, s, d, ignore))
            checks += 1
        x = torch.randn(1, 2, h, w, generator=gen, dtype=torch.float64).to(DEVICE)
        wts = torch.randn(1, k[0] * k[1], *out_hw, generator=gen, dtype=torch.float64).to(DEVICE)
        got = x.new_empty((1, 2, *out_hw))
        kcuda.local_weighted_sum_forward(x, wts, got, k, p, s, d)
        close(f"local_weighted_sum {k}{p}{s}{d}", got,
              ref.local_weighted_sum(x, wts, k, p, s, d))
        g = torch.randn(got.shape, generator=gen, dtype=torch.float64).to(DEVICE)
        gx, gw = torch.empty_like(x), torch.empty_like(wts)
        kcuda.local_weighted_sum_backward(g, x, wts, gx, gw, k, p, s, d)
        rx, rw = ref.local_weighted_sum_backward(g, x, wts, k, p, s, d)
        close(f"local_weighted_sum_backward x {k}{p}{s}{d}", gx, rx)
        close(f"local_weighted_sum_backward w {k}{p}{s}{d}", gw, rw)
        checks += 3
    # float32 kernels keep float32 outputs
    emb = torch.randn(1, 2, 4, 4, generator=gen).to(DEVICE)
    got = emb.new_empty((1, 9, 4, 4))
    kcuda.im2dist_forward(emb, got, (3, 3), (1, 1), (1, 1), (1, 1), 2, True, True, ref.BIG)
    close("im2dist float32", got, ref.im2dist(emb, (3, 3), (1, 1), (1, 1), (1, 1), 2, True, True),
          tol=1e-5)
    checks += 1
    print(f"cudasim segaware: all {checks} checks passed in {time.time() - start:.1f}s")


if __name__ == "__main__":
    main()
