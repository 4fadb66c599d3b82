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

Every row runs ``--procs`` fresh subprocesses (reference and fused alternate, so machine
noise hits both alike).  Each one builds the CRF and its inputs, warms up on a 64x64 image
(compiles or loads the Numba kernels), then resets the kernel's peak-RSS counter
(``/proc/self/clear_refs`` = 5, so ``ru_maxrss``/VmHWM restart from the current RSS) and runs
``--repeats`` timed passes at full size.  Reported: the median time per pass (median over
processes of the per-process medians, with min-max of all passes) and the extra peak memory
= peak RSS during the passes - RSS just before them (median over processes).  Outputs of
the two paths are compared by checksum.

Memory is measured under two glibc settings: ``default``, and ``pinned``
(``MALLOC_MMAP_THRESHOLD_=1048576``, one pass per process).  By default glibc raises its mmap
threshold as large blocks are freed, after which blocks of up to 32 MiB come from the heap,
whose freed chunks stay resident: a loop that allocates and frees such blocks in a shifting
pattern grows RSS past its live tensors.  The reference's 0.5 GiB column tensors are always
mmapped and returned when freed.  The fused inference loop allocates nothing large after
its first step (messages accumulated in place by ``pac_conv2d_add_``, Q and logQ buffers
refilled, the kernel's column scratch a reused workspace), so its default figure is close to
the pinned one.  Pinned, RSS follows the live tensors of both paths.

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

# glibc serves the fused path's 20-30 MiB tensors from its heap once its dynamic mmap
# threshold has grown, and freed heap chunks stay resident; the reference's 0.5 GiB column
# tensors are always mmapped and returned on free.  "pinned" fixes the threshold at 1 MiB, so
# RSS follows the live tensors for both paths.
MALLOC = {"default": {}, "pinned": {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}}


def run_worker(path: str, mode: str, size: int, repeats: int, malloc: str, args) -> dict:
    env = dict(os.environ, NUMBA_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads),
               **MALLOC[malloc])
    env.pop("PACNET_BACKEND", None)  # the fused path must run the fused kernels
    if malloc == "default":
        env.pop("MALLOC_MMAP_THRESHOLD_", None)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", path, mode, str(size),
           "--repeats", str(repeats), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"worker {path} {mode} {size} ({malloc} malloc) failed "
                         f"(exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


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
    parser.add_argument("--malloc", default="default,pinned",
                        help="glibc settings to measure under (pinned: 1 pass per process)")
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
          f"b=1, float32, {args.threads} threads; {args.procs} fresh processes per row, "
          f"{args.repeats} timed passes each (1 with pinned malloc) after a "
          f"{WARM_SIZE}x{WARM_SIZE} warm-up; reference and fused processes alternate")
    print(f"{'mode':<6} {'size':>5} {'malloc':<8} {'path':<10} {'time/pass':>10} "
          f"{'(min-max)':>15} {'extra peak RSS':>15}", flush=True)
    verdicts = []
    for mode in args.modes.split(","):
        size = args.size if mode == "infer" else args.train_size
        for malloc in args.malloc.split(","):
            repeats = args.repeats if malloc == "default" else 1
            raw = {"reference": [], "fused": []}
            for _ in range(args.procs):
                for path in raw:
                    raw[path].append(run_worker(path, mode, size, repeats, malloc, args))
            res = {p: summary(r) for p, r in raw.items()}
            for path, r in res.items():
                print(f"{mode:<6} {size:>5} {malloc:<8} {path:<10} {r['time']:>9.2f}s "
                      f"({r['tmin']:>6.2f}-{r['tmax']:<6.2f}) {r['peak']:>11.0f} MiB"
                      + ("" if r["exact"] else "  [ru_maxrss not reset]"), flush=True)
            ref, fus = res["reference"], res["fused"]
            rel = abs(fus["checksum"][0] - ref["checksum"][0]) / max(ref["checksum"][1], 1e-30)
            verdicts.append(f"{mode} {size}x{size} {malloc:<8} speedup {ref['time'] / fus['time']:5.2f}x "
                            f"(target >= 3)   extra peak {fus['peak'] / max(ref['peak'], 1e-9):.3f} "
                            f"of the reference's (target <= 0.125)   checksum rel. diff {rel:.1e}")
    print("\n".join(verdicts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
