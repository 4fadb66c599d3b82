"""Segaware benchmark: the Caffe-style segmentation-aware conv chain vs the fused PAC op, and
the NormConvMeanfield CRF on the fused kernels vs the unfold reference.

1. conv3 of the segaware VGG (C = O = 256, k = 3, dilation 2, pad 2, 81 x 81, b = 1,
   64-d embedding), forward + backward:

   * ``unfused``: what the prototxt computes, layer by layer -- Im2col(x) [b, C*9, H, W],
     Im2dist(emb), Scale λ, Exp(-.), Tile x C [b, C*9, H, W], Eltwise PROD, Convolution
     with ``bottom_is_im2col`` (a 1x1 conv over the C*9 channels);
   * ``fused``: ``pac_conv2d(x, exp(-λ·Im2dist(emb)), W, b)`` on the fused PAC kernel;
   * the same layer as pacnet compiles it from YAML (the ``segaware_conv`` block of
     nets/common/segaware_blocks.yaml after an Im2dist): ``pacnet.build(..., fuse=False)``
     (the chain as written) and the default build (the fusion pass's SegawareConvolution).

   The hand-written unfused chain is the strongest baseline (F.unfold, one repeat, one
   1x1 conv); its three GEMMs (forward, weight and input gradients) are also the floor of
   the fused op, which does the same multiply-adds.

2. NormConvMeanfield as in ``res/*`` (C = 21, T = 2, bilateral k13 d9 pad 54 on 66-d
   features, spatial k5 on xy), forward + backward, at ``--crf-size``: the fused kernels
   (``PACNET_BACKEND`` unset) vs the plain-torch reference (``PACNET_BACKEND=reference``).

Each variant runs in its own subprocesses, so its peak memory is its own: peak RSS growth
over the inputs on CPU (``ru_maxrss``), ``torch.cuda.max_memory_allocated`` on CUDA.  It
runs in ``--rounds`` processes interleaved with the other variants' (so a slow spell of a
shared machine hits all variants alike); the time reported is the median over rounds of each
process's median step, the peak the largest.  Every process first runs the variant once on a
tiny input (kernel compilation stays out of the peak) and ``--warmup`` untimed steps (the
first large GEMMs run up to 2x slower while clocks and MKL's buffers settle).  Ratios are
against the unfused/reference variant measured in the same run.

Usage: ``python benchmarks/segaware.py [--repeats 7] [--warmup 3] [--rounds 3]
[--device cpu|cuda] [--crf-size 97] [--skip-crf]``.
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

import torch


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------- the variants

def _conv3_inputs(device, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    C, O, H = 256, 256, 81
    x = torch.randn(1, C, H, H, generator=gen, dtype=dtype).to(device).requires_grad_()
    emb = torch.randn(1, 64, H, H, generator=gen, dtype=dtype).to(device).requires_grad_()
    w = (torch.randn(O, C, 3, 3, generator=gen, dtype=dtype) * 0.01).to(device).requires_grad_()
    b = torch.zeros(O, dtype=dtype, device=device).requires_grad_()
    lam = torch.tensor(0.05, dtype=dtype, device=device).requires_grad_()
    return x, emb, w, b, lam


def conv3_unfused(x, emb, w, b, lam):
    import torch.nn.functional as F
    from pacnet.kernels.segaware.ops import im2dist

    n, c, h, wd = x.shape
    cols = F.unfold(x, 3, dilation=2, padding=2).reshape(n, c * 9, h, wd)      # Im2col
    dist = im2dist(emb, 3, 2, 1, 2, "L1")                                       # Im2dist
    mask = torch.exp(-(lam * dist))                                             # Scale, Exp
    tiled = mask.repeat(1, c, 1, 1)                                             # Tile x C
    prod = cols * tiled                                                         # Eltwise PROD
    return F.conv2d(prod, w.reshape(w.shape[0], -1, 1, 1), b)                   # bottom_is_im2col


def conv3_fused(x, emb, w, b, lam):
    from pacnet.kernels.pac.ops import pac_conv2d
    from pacnet.kernels.segaware.ops import im2dist

    n, _, h, wd = x.shape
    mask = torch.exp(-(lam * im2dist(emb, 3, 2, 1, 2, "L1")))
    return pac_conv2d(x, mask.reshape(n, 1, 3, 3, h, wd), w, b, 1, 2, 2)


_CONV3_NET = """
_base_: {blocks}
name: segaware_conv3
pacnet_version: 1
inputs: {{x: [1, 256, 81, 81], emb: [1, 64, 81, 81]}}
layers:
  - {{name: emb_dist3, type: Im2dist, bottom: emb, top: emb_dist3, kernel_size: 3, pad: 2,
     dilation: 2, norm: L1}}
  - {{name: conv3_2, type: segaware_conv, bottom: [x, emb_dist3], top: conv3_2,
     mask: emb_dist3_2, channels: 256, num_output: 256, pad: 2, dilation: 2}}
"""


def conv3_net(device, fuse):
    """The conv3 layer compiled from YAML by pacnet, with or without the fusion pass."""
    import tempfile

    import pacnet

    here = os.path.dirname(os.path.abspath(__file__))
    blocks = os.path.join(here, "..", "nets", "common", "segaware_blocks.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "conv3.yaml")
        with open(path, "w") as f:
            f.write(_CONV3_NET.format(blocks=os.path.abspath(blocks)))
        net = pacnet.build(path, phase="train", fuse=fuse, device=device)
    return net


def _crf_inputs(device, size, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1)
    c = 21
    unary = torch.randn(1, c, size, size, generator=gen, dtype=dtype).to(device).requires_grad_()
    emb = torch.randn(1, 64, size, size, generator=gen, dtype=dtype) * 0.01
    ys, xs = torch.meshgrid(torch.arange(size, dtype=dtype), torch.arange(size, dtype=dtype),
                            indexing="ij")
    xy = torch.stack([xs, ys])[None]
    embxy = torch.cat([200 * emb, 0.05 * xy], 1).to(device).requires_grad_()
    return unary, embxy, (0.05 * xy).to(device)


def crf_module(size, device):
    from pacnet import registry
    from pacnet.registry import LayerSpec

    params = dict(num_iterations=2, kernel_size=[13, 5], pad=[54, 2], dilation=[9, 1],
                  scale=[1.0, 1.0], remove_center=[True, True], remove_bounds=[True, True])
    spec = LayerSpec(name="crf", type="NormConvMeanfield", params=params,
                     bottoms=("unary", "Q0", "embxy", "xy"), tops=("crf",))
    shapes = [(1, 21, size, size)] * 2 + [(1, 66, size, size), (1, 2, size, size)]
    return registry.get("NormConvMeanfield").build(spec, shapes).to(device)


# ----------------------------------------------------------------------------- one variant (child)

def run_variant(name: str, device: str, repeats: int, warmup: int, crf_size: int) -> dict:
    dev = torch.device(device)
    if name.startswith("conv3_net"):
        net = conv3_net(dev, fuse=name == "conv3_net_fused")
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(1, 256, 81, 81, generator=gen).to(dev).requires_grad_()
        emb = torch.randn(1, 64, 81, 81, generator=gen).to(dev).requires_grad_()
        net(x=x[..., :9, :9], emb=emb[..., :9, :9])["conv3_2"].sum().backward()  # load kernels

        def step():
            net(x=x, emb=emb)["conv3_2"].sum().backward()
            x.grad = emb.grad = None
            net.zero_grad(set_to_none=True)
    elif name.startswith("conv3"):
        fn = conv3_unfused if name == "conv3_unfused" else conv3_fused
        small = [t.detach()[..., :9, :9].clone().requires_grad_()
                 if t.dim() == 4 and t.shape[-1] == 81 else t for t in _conv3_inputs(dev)]
        fn(*small).sum().backward()                       # compile/load the kernels
        inputs = _conv3_inputs(dev)

        def step():
            fn(*inputs).sum().backward()
            for t in inputs:
                t.grad = None
    else:
        module = crf_module(crf_size, dev)
        tiny = crf_module(9, dev)
        u, e, s = _crf_inputs(dev, 9)
        tiny(u, u, e, s).sum().backward()                 # compile/load the kernels
        unary, embxy, xy = _crf_inputs(dev, crf_size)

        def step():
            module(unary, unary, embxy, xy).sum().backward()
            unary.grad = embxy.grad = None
            module.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_mib()
    step()
    sync()
    peak = ((torch.cuda.max_memory_allocated() - base) / 2**20 if dev.type == "cuda"
            else _peak_rss_mib() - base)
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return {"name": name, "ms": 1e3 * statistics.median(times), "peak_mib": peak}


# ----------------------------------------------------------------------------- driver

def _child(name, args, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--device", args.device,
           "--repeats", str(args.repeats), "--warmup", str(args.warmup),
           "--crf-size", str(args.crf_size)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        return {"name": name, "error": tail[0]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _rounds(variants, args):
    """Run every ``(name, label, env)`` variant ``args.rounds`` times, interleaved (so a slow
    spell of a shared machine hits all variants alike); per variant the median time over the
    rounds and the largest peak."""
    runs = {name: [] for name, _, _ in variants}
    for _ in range(args.rounds):
        for name, _, env in variants:
            runs[name].append(_child(name.split("@")[0], args, env))
    rows = []
    for name, label, _ in variants:
        ok = [r for r in runs[name] if "error" not in r]
        if not ok:
            rows.append({**runs[name][0], "name": name, "label": label})
            continue
        rows.append({"name": name, "label": label,
                     "ms": statistics.median(r["ms"] for r in ok),
                     "peak_mib": max(r["peak_mib"] for r in ok)})
    return rows


def _table(title, rows, base):
    print(f"\n{title}")
    print(f"{'variant':<28}{'fwd+bwd ms':>12}{'peak MiB':>11}{'time ratio':>12}{'mem ratio':>11}")
    ref = next((r for r in rows if r["name"] == base and "error" not in r), None)
    for r in rows:
        if "error" in r:
            print(f"{r['label']:<28}  unavailable: {r['error']}")
            continue
        tr = f"{ref['ms'] / r['ms']:.2f}x" if ref else "-"
        mr = f"{ref['peak_mib'] / max(r['peak_mib'], 1e-3):.1f}x" if ref else "-"
        print(f"{r['label']:<28}{r['ms']:>12.1f}{r['peak_mib']:>11.1f}{tr:>12}{mr:>11}")
    print("(ratios: the unfused/reference variant divided by this one; > 1 = faster / smaller)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--crf-size", type=int, default=97)
    parser.add_argument("--skip-crf", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_variant(args.child, args.device, args.repeats, args.warmup,
                                      args.crf_size)))
        return 0

    print(f"segaware benchmark on {args.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats} steps per process, "
          f"median over {args.rounds} interleaved rounds")
    rows = _rounds([("conv3_unfused", "unfused chain, hand-written", None),
                    ("conv3_fused", "fused im2dist + pac_conv2d", None),
                    ("conv3_net_unfused", "pacnet.build(fuse=False)", None),
                    ("conv3_net_fused", "pacnet.build() (fused)", None)], args)
    _table("conv3 (C=O=256, k3 d2, 81x81, b=1): forward + backward", rows, "conv3_unfused")
    if not args.skip_crf:
        rows = _rounds([("crf@reference", "reference (unfold)", {"PACNET_BACKEND": "reference"}),
                        ("crf@fused", "fused numba", {"PACNET_BACKEND": ""})], args)
        _table(f"NormConvMeanfield res/* (C=21, T=2, k13 d9 + k5, {args.crf_size}x{args.crf_size}): "
               "forward + backward", rows, "crf@reference")
    return 0


if __name__ == "__main__":
    sys.exit(main())
