"""Does data starve the model?  Training iterations/s with the real pipeline vs cached tensors.

Runs the main job's net (``nets/jointupsample/pac_joint_upsample_x8.yaml``, train phase)
on its own ``data:`` section: the same forward/backward/optimizer step, once fed by the
real pipeline (synthetic scene generation, crops, mirror, low-res sampling, collation,
DataLoader) and once by batches collected beforehand.  Target: ratio >= 0.90.
Medians over ``--repeats`` interleaved runs of ``--iterations`` steps each.

Usage: ``python benchmarks/data_pipeline.py [--net NET] [--iterations 30] [--repeats 3] [--workers 0]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
NET = os.path.join(HERE, "..", "nets", "jointupsample", "pac_joint_upsample_x8.yaml")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--net", default=NET)
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from pacnet.api import build
    from pacnet.engine.data import make_dataset, make_loader, parse_data
    from pacnet.engine.trainer import batch_shapes
    from pacnet.load import load

    tree = load(args.net)
    opts = parse_data(tree["data"], "train")
    dataset = make_dataset(tree["data"], "train")
    names = [n for n in (tree.get("inputs") or {})] + [
        l["top"] for l in tree["layers"] if l.get("type") == "Input"]
    net = build(args.net, phase="train", inputs=batch_shapes(dataset, names, opts["batch_size"]))
    inputs = list(net.inputs)
    optimizer = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-4)

    def step(batch):
        out = net(**{k: batch[k] for k in inputs})
        loss = net.total_loss(out)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def loader():
        return iter(make_loader(dataset, batch_size=opts["batch_size"], train=True, seed=0,
                                num_workers=args.workers))

    cached = []
    it = loader()
    for _ in range(args.iterations):
        cached.append(next(it))
    for batch in cached[:3]:  # warm up kernels (numba compilation) outside the timing
        step(batch)

    real_rates, cached_rates = [], []
    for _ in range(args.repeats):
        it = loader()
        t0 = time.perf_counter()
        for _ in range(args.iterations):
            step(next(it))
        real_rates.append(args.iterations / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        for batch in cached:
            step(batch)
        cached_rates.append(args.iterations / (time.perf_counter() - t0))
    real, ref = statistics.median(real_rates), statistics.median(cached_rates)
    print(f"{os.path.basename(args.net)}: batch {opts['batch_size']}, {args.iterations} iterations x "
          f"{args.repeats} repeats, {args.workers} workers, {args.threads} threads")
    print(f"  cached tensors: {ref:7.2f} it/s")
    print(f"  real pipeline:  {real:7.2f} it/s   ratio {real / ref:.3f} (target >= 0.90)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
