"""Benchmark: a PacConv3d layer's forward+backward, fused Numba kernels vs the 3-D unfold reference.

``PacConv3d(16, 16, 3, padding=1)`` (gaussian kernel of a 4-channel guide; the layer's
``pac_dist -> exp(-0.5 D) -> pac_conv`` ops) on a 32^3 volume, batch 1, float32, with
gradients for the input, the guide, the weight and the bias, on the CPU with 2 threads for
torch and for Numba.  The reference is ``PACNET_BACKEND=reference``: the same ops as plain
torch (F.pad and a Tensor.unfold chain: the 27 taps of every voxel materialised).
Targets (issue 16): fused >= 4x faster, with <= 1/10 of the reference's extra memory.

Method as benchmarks/pac.py (whose machinery this uses): every (backend, size) case in a
fresh process, the two backends alternating; a warm-up, then ``--repeats`` timed iterations;
the table shows the median (and min-max) over all of a case's iterations, the extra peak
RSS of the timed iterations, what autograd saves, and reference / fused ratios from the same
run.  Exit status 1 when a target is missed.

    python benchmarks/pac3d.py                        # 32^3, 2 processes x 4 iterations
    python benchmarks/pac3d.py --sizes 16 32 48 --procs 3 --repeats 5

Measured (AMD EPYC, 2 cores, otherwise quiet: load average 0.9-1.3; torch 2.13 CPU, numba
0.68), ``--procs 3 --repeats 5 --sizes 32 48``:

    size  backend    forward s  fwd+bwd s (min-max)  extra peak MiB  saved MiB
    32^3 reference      0.119  0.315 (0.257-0.343)           218.0       73.3
    32^3 numba          0.018  0.051 (0.044-0.059)            14.0        5.9
         ratio           6.7x                 6.2x           15.6x      12.4x
    48^3 ratio           9.9x                10.1x            9.6x      12.4x

3-D rows are short (32 voxels at 32^3), so ``pac_conv`` does the rows of a tile that read
consecutive input rows as runs, one contiguous stretch each (before that: 3.1-4.0x at 32^3).
At 48^3 the fused extra peak (68 MiB: the adaptive kernel K alone is 12 MiB, plus the
per-thread tiles) is just over 1/10 of the reference's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from pac import compare, measure_step, set_threads  # noqa: E402

BATCH, C_IN, C_OUT, K, PAD, GUIDE = 1, 16, 16, 3, 1, 4
SPEED_TARGET, MEMORY_TARGET = 4.0, 10.0


def worker(size: int, repeats: int, threads: int) -> dict:
    backend = set_threads(threads)
    import torch

    from pacnet.pac import PacConv3d

    torch.manual_seed(0)
    layer = PacConv3d(C_IN, C_OUT, K, padding=PAD)

    def make(s):
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(BATCH, C_IN, s, s, s, generator=gen).requires_grad_()
        f = (0.5 * torch.randn(BATCH, GUIDE, s, s, s, generator=gen)).requires_grad_()
        return (x, f), torch.randn(BATCH, C_OUT, s, s, s, generator=gen)

    def step(x, f):
        layer.zero_grad(set_to_none=True)
        return layer(x, f)

    return {"backend": backend, **measure_step(step, make, size, repeats)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[32])
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--procs", type=int, default=2, help="fresh processes per case")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(args.worker, args.repeats, args.threads)))
        return 0
    print(f"PacConv3d({C_IN}, {C_OUT}, {K}, padding={PAD}), guide {GUIDE} ch, batch {BATCH}, "
          f"float32, {args.threads} threads; load average {os.getloadavg()[0]:.1f}")
    ratios = compare(args.sizes, 3, args.repeats, args.procs, args.threads, __file__)
    missed = [f"{size}^3: {r['fwd+bwd']:.1f}x faster, {r['memory']:.1f}x less extra memory"
              for size, r in ratios.items()
              if r["fwd+bwd"] < SPEED_TARGET or r["memory"] < MEMORY_TARGET]
    print(f"targets: >= {SPEED_TARGET:g}x faster, <= 1/{MEMORY_TARGET:g} of the extra memory: "
          + ("missed at " + "; ".join(missed) if missed else "met"))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
