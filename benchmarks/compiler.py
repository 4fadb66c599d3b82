"""Compiler benchmark: build time of a ~460-layer net and forward overhead of the generated code.

1. Load + validate + graph + shapes + codegen of DeepLab v2 ResNet-101 (written with
   blocks, 455 layers) on the meta device — the whole compiler, no weight initialisation —
   and, for reference, the same build with parameters allocated and Caffe-initialised.
   Target: < 1 s (interpreter start and ``import torch`` excluded).
2. The compiled module's forward vs a hand-written ``nn.Module`` doing the same ops with the
   same weights (eval, no grad).  Target: within 2 %.

Usage: ``python benchmarks/compiler.py [--size 321] [--repeats 5]``.  Prints medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
NET = os.path.join(HERE, "..", "nets", "deeplab", "deeplab_v2_resnet101.yaml")


class HandWrittenDeepLab(nn.Module):
    """DeepLab v2 ResNet-101 ASPP written directly in PyTorch, reading the compiled net's
    weights (so both compute the same numbers)."""

    def __init__(self, net):
        super().__init__()
        self.p = {k: v for k, v in net.state_dict().items()}

    def conv_bn(self, x, conv, bn, scale, stride=1, pad=0, dilation=1, relu=True):
        p = self.p
        x = F.conv2d(x, p[f"{conv}.weight"], None, stride, pad, dilation)
        sf = p[f"{bn}.scale_factor"][0]
        inv = 0.0 if sf == 0 else 1.0 / sf
        x = F.batch_norm(x, p[f"{bn}.mean"] * inv, p[f"{bn}.var"] * inv, None, None, False, 0.0, 1e-5)
        x = x * p[f"{scale}.weight"].view(1, -1, 1, 1) + p[f"{scale}.bias"].view(1, -1, 1, 1)
        return F.relu(x) if relu else x

    def bottleneck(self, x, name, ident, stride=1, dilation=1, proj=False):
        short = self.conv_bn(x, f"{name}_branch1", f"bn{ident}_branch1", f"scale{ident}_branch1",
                             stride, relu=False) if proj else x
        y = self.conv_bn(x, f"{name}_branch2a", f"bn{ident}_branch2a", f"scale{ident}_branch2a", stride)
        y = self.conv_bn(y, f"{name}_branch2b", f"bn{ident}_branch2b", f"scale{ident}_branch2b", 1,
                         dilation, dilation)
        y = self.conv_bn(y, f"{name}_branch2c", f"bn{ident}_branch2c", f"scale{ident}_branch2c", relu=False)
        return F.relu(short + y)

    def forward(self, data):
        x = self.conv_bn(data, "conv1", "bn_conv1", "scale_conv1", 2, 3)
        x = F.max_pool2d(x, 3, 2, 1, ceil_mode=True)
        x = self.bottleneck(x, "res2a", "2a", proj=True)
        x = self.bottleneck(x, "res2b", "2b")
        x = self.bottleneck(x, "res2c", "2c")
        x = self.bottleneck(x, "res3a", "3a", stride=2, proj=True)
        for i in range(1, 4):
            x = self.bottleneck(x, f"res3b{i}", f"3b{i}")
        x = self.bottleneck(x, "res4a", "4a", dilation=2, proj=True)
        for i in range(1, 23):
            x = self.bottleneck(x, f"res4b{i}", f"4b{i}", dilation=2)
        x = self.bottleneck(x, "res5a", "5a", dilation=4, proj=True)
        x = self.bottleneck(x, "res5b", "5b", dilation=4)
        x = self.bottleneck(x, "res5c", "5c", dilation=4)
        p = self.p
        fc1 = sum(F.conv2d(x, p[f"fc1_c{i}.weight"], p[f"fc1_c{i}.bias"], 1, r, r)
                  for i, r in enumerate((6, 12, 18, 24)))
        h, w = fc1.shape[-2:]
        return F.interpolate(fc1, size=((h - 1) * 8 + 1, (w - 1) * 8 + 1), mode="bilinear",
                             align_corners=True)


def median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=321)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    import pacnet
    from pacnet.api import parameter_count

    pacnet.build(NET, device="meta")  # warm imports and the registry
    t_meta = median_time(lambda: pacnet.build(NET, device="meta"), args.repeats)
    t_full = median_time(lambda: pacnet.build(NET), max(1, args.repeats // 2))
    net = pacnet.build(NET, inputs={"data": (1, 3, args.size, args.size)})
    n_layers = len(net.ir.nodes)
    print(f"build of {os.path.basename(NET)}: {n_layers} layers, {parameter_count(net):,} params")
    print(f"  compile (meta device, no init): {t_meta * 1000:8.1f} ms   target < 1000 ms")
    print(f"  compile + allocate + Caffe init: {t_full * 1000:8.1f} ms")

    # Give the weights non-trivial values so both forwards do real work.
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if name.endswith("scale_factor"):
                t.fill_(1.0)
            elif name.endswith(".var"):
                t.uniform_(0.5, 1.5)
            else:
                t.normal_(0, 0.02)
    hand = HandWrittenDeepLab(net).eval()
    net.eval()
    x = torch.randn(1, 3, args.size, args.size)
    with torch.no_grad():
        ref = hand(x)
        out = net(x)["fc1_interp"]
        err = (out - ref).abs().max().item() / max(ref.abs().max().item(), 1e-12)
        # Interleave the two so machine noise hits both alike.
        t_hand, t_net = [], []
        for _ in range(args.repeats):
            t_hand.append(median_time(lambda: hand(x), 1))
            t_net.append(median_time(lambda: net(x), 1))
    mh, mn = statistics.median(t_hand), statistics.median(t_net)
    print(f"forward 1x3x{args.size}x{args.size} (eval, no grad, {args.threads} threads), medians of {args.repeats}:")
    print(f"  hand-written nn.Module: {mh * 1000:8.1f} ms")
    print(f"  pacnet compiled:        {mn * 1000:8.1f} ms   ratio {mn / mh:.3f} (target <= 1.02)")
    print(f"  max relative difference: {err:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
