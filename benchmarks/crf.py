"""PAC-CRF benchmark: the fused CRF vs the ConvCRF-style unfold reference, time and peak memory.

Setting (the paper's best PAC-CRF, ``crfi5p4d5641p4d5161``): 21 classes, two ``4d`` 5x5
pairwise kernels with dilations 64 and 16, blur 1, 5 mean-field steps, one 512x512 image,
float32, 2 threads (torch and Numba).

* ``fused``: ``PacCRF.forward`` -- message passing on the fused PAC kernels
  (``pac_conv2d`` with full filters), no unfolded tensors.
* ``reference``: ``PacCRF.forward(..., reference=True)`` -- the same loop with ConvCRF-style
  message passing: ``F.unfold`` of Q (``C*k*k x H*W`` columns), times the Gaussian kernel,
  contracted with the filter (a GEMM); plain torch autograd.

Modes: ``infer`` (``torch.no_grad()`` forward) at ``--size`` and ``train`` (forward +
backward to the unary, the features and every parameter) at ``--train-size`` (default 256:
the reference keeps about 1 GiB of columns per kernel and step at 512x512, 11 GiB in all).

Every (path, mode) runs in ``--procs`` fresh subprocesses.  Each one builds the CRF and its
inputs, warms up on a 64x64 image (compiles or loads the Numba kernels), then resets the
kernel's peak-RSS counter (``/proc/self/clear_refs`` = 5, so ``ru_maxrss``/VmHWM restart
from the current RSS) and runs ``--repeats`` timed passes at full size.  Reported: the median
time per pass (median over processes of the per-process medians, with min-max of all
passes) and the extra peak memory = peak RSS during the passes - RSS just before them
(median over processes).  Outputs of the two paths are compared by checksum.

Targets on CPU: fused >= 3x faster than the reference, extra peak <= 1/8 of the reference's.

Usage: ``python benchmarks/crf.py [--size 512] [--train-size 256] [--repeats 3] [--procs 3]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

MODEL = "crfi5p4d5641p4d5161"
CLASSES = 21
WARM_SIZE = 64


# ----------------------------------------------------------------------------- worker

def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_peak() -> bool:
    """Restart the peak-RSS counter at the current RSS; False where the kernel forbids it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _inputs(size: int, seed: int):
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(seed)
    unary = torch.randn(1, CLASSES, size, size, generator=gen) * 2
    # A piecewise-smooth "image" in 0..255 as the original's features (image / 30).
    img = torch.rand(1, 3, size // 16 + 1, size // 16 + 1, generator=gen) * 255
    img = F.interpolate(img, size=(size, size), mode="bilinear", align_corners=False)
    img = img + torch.randn(1, 3, size, size, generator=gen) * 4
    return unary, img / 30.0


def worker(path: str, mode: str, size: int, repeats: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    import numba

    numba.set_num_threads(threads)
    from pacnet.crf import PacCRF, parse_crf_name

    reference = path == "reference"
    _, steps, kernels = parse_crf_name(MODEL)
    torch.manual_seed(0)
    crf = PacCRF(CLASSES, steps, pairwise_kernels=kernels)

    def run(unary, feat, grad):
        if mode == "infer":
            with torch.no_grad():
                return crf(unary, feat, reference=reference)
        u = unary.detach().requires_grad_()
        f = feat.detach().requires_grad_()
        crf.zero_grad(set_to_none=True)
        out = crf(u, f, reference=reference)
        out.backward(grad)
        return out.detach()

    warm = _inputs(WARM_SIZE, 1)
    run(*warm, torch.ones(1, CLASSES, WARM_SIZE, WARM_SIZE))
    unary, feat = _inputs(size, 0)
    grad = torch.randn(unary.shape, generator=torch.Generator().manual_seed(2))
    del warm
    import gc

    gc.collect()
    rss0 = _status_kib("VmRSS")
    exact = _reset_peak()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss if not exact else rss0
    times = []
    out = None
    for _ in range(repeats):
        out = None
        t0 = time.perf_counter()
        out = run(unary, feat, grad)
        times.append(time.perf_counter() - t0)
    peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, _status_kib("VmHWM"))
    return {"times": times, "extra_peak_mib": (peak - base) / 1024, "rss_before_mib": rss0 / 1024,
            "exact_peak": exact, "checksum": [float(out.double().sum()),
                                              float(out.double().abs().sum())]}


# ----------------------------------------------------------------------------- driver

def run_case(path: str, mode: str, size: int, args) -> list:
    env = dict(os.environ, NUMBA_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads))
    results = []
    for _ in range(args.procs):
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", path, mode, str(size),
               "--repeats", str(args.repeats), "--threads", str(args.threads)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr)
            raise SystemExit(f"worker {path} {mode} {size} failed (exit {proc.returncode})")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return results


def summary(results: list) -> dict:
    per_proc = [statistics.median(r["times"]) for r in results]
    every = [t for r in results for t in r["times"]]
    return {"time": statistics.median(per_proc), "tmin": min(every), "tmax": max(every),
            "peak": statistics.median(r["extra_peak_mib"] for r in results),
            "exact": all(r["exact_peak"] for r in results), "checksum": results[0]["checksum"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--train-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--procs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--modes", default="infer,train")
    parser.add_argument("--worker", nargs=3, metavar=("PATH", "MODE", "SIZE"))
    args = parser.parse_args(argv)
    if args.worker:
        path, mode, size = args.worker
        print(json.dumps(worker(path, mode, int(size), args.repeats, args.threads)))
        return 0

    import pacnet.kernels.pac as kernels

    if not hasattr(kernels, "pac_conv2d"):
        print("pacnet.kernels.pac has no pac_conv2d yet: nothing to benchmark", file=sys.stderr)
        return 1
    print(f"PAC-CRF {MODEL}: {CLASSES} classes, 2 x 4d 5x5 kernels (dilation 64, 16), 5 steps, "
          f"b=1, float32, {args.threads} threads; {args.procs} processes x {args.repeats} passes "
          f"(after a {WARM_SIZE}x{WARM_SIZE} warm-up)")
    if os.environ.get("PACNET_BACKEND"):
        print(f"PACNET_BACKEND={os.environ['PACNET_BACKEND']}")
    rows = []
    for mode in args.modes.split(","):
        size = args.size if mode == "infer" else args.train_size
        res = {p: summary(run_case(p, mode, size, args)) for p in ("reference", "fused")}
        rows.append((mode, size, res))
    print(f"{'mode':<6} {'size':>5} {'path':<10} {'time/pass (s)':>14} {'min-max':>15} "
          f"{'extra peak':>11} {'time ratio':>11} {'mem ratio':>10}")
    for mode, size, res in rows:
        ref, fus = res["reference"], res["fused"]
        for path in ("reference", "fused"):
            r = res[path]
            ratio_t = ref["time"] / r["time"]
            ratio_m = r["peak"] / ref["peak"] if ref["peak"] > 0 else float("nan")
            print(f"{mode:<6} {size:>5} {path:<10} {r['time']:>14.3f} "
                  f"{r['tmin']:>7.2f}-{r['tmax']:<7.2f} {r['peak']:>7.0f} MiB "
                  f"{ratio_t:>10.2f}x {ratio_m:>10.3f}")
        rel = abs(fus["checksum"][0] - ref["checksum"][0]) / max(abs(ref["checksum"][1]), 1e-30)
        print(f"       {'':>5} speedup {ref['time'] / fus['time']:.2f}x (target >= 3), extra peak "
              f"{fus['peak'] / max(ref['peak'], 1e-9):.3f} of the reference's (target <= 0.125), "
              f"checksum rel. diff {rel:.1e}"
              + ("" if ref["exact"] and fus["exact"] else "  [peak: ru_maxrss delta, not reset]"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
