"""``pacnet time NET``: Caffe's ``caffe time``: per-layer forward timings, total forward and backward.

    pacnet time nets/jointupsample/pac_joint_upsample_x8.yaml --input guide=1x3x256x256 --iterations 5
    pacnet time NET --phase test --device cuda

The net is built for ``--phase`` (default train, as Caffe) with the shapes of its ``dims:``
(``--input`` overrides them) and fed uniform random inputs.  Per-layer forward times come
from module hooks (``pacnet.engine.trainer.benchmark``, averaged over ``--iterations``);
the totals -- forward, forward+backward, and backward as their difference -- are measured
separately, without hooks, by ``torch.utils.benchmark.Timer`` (CUDA synchronised).  The
backward pass is that of the net's weighted loss, or of the sum of its outputs when it
has no loss; it is left out when nothing needs a gradient.
"""

from __future__ import annotations

import argparse
import sys
from typing import Dict

from pacnet.cli.common import add_net_arguments, build_from_args, description, int_at_least


def add_parser(sub) -> None:
    p = sub.add_parser("time", help="time the forward/backward passes of a net, per layer (caffe time)",
                       description=description(__doc__))
    add_net_arguments(p, phase="train")
    p.add_argument("--iterations", "-n", type=int_at_least(1), default=10, metavar="N",
                   help="timed passes per measurement (default 10)")
    p.add_argument("--warmup", type=int_at_least(0), default=2, metavar="N", help="untimed passes first (default 2)")
    p.add_argument("--device", metavar="D", help="cpu, cuda or cuda:N (default: a GPU if there is one)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pacnet.cli.train import short_openmp_spin

    short_openmp_spin()  # before torch loads (see there); GOMP_SPINCOUNT=300000 times the default
    import torch
    from rich.table import Table
    from torch.utils import benchmark as tbench

    from pacnet.cli.build import _shape
    from pacnet.cli.train import console, fmt
    from pacnet.codegen import module_name
    from pacnet.engine.trainer import benchmark, pick_device, total_loss

    device = pick_device(args.device)
    net = build_from_args(args, device=device)
    gen = torch.Generator().manual_seed(0)
    inputs = {name: torch.rand(shape, generator=gen).to(device) for name, shape in net.inputs.items()}
    feed = [inputs[n] for n in net.inputs]
    backward = any(p.requires_grad for p in net.parameters())
    # Per-layer times with the forward as in training (autograd recording when there is a backward).
    per_layer = benchmark(net, inputs, iterations=args.iterations, warmup=args.warmup, backward=backward)["layers"]

    def forward():
        with torch.set_grad_enabled(backward):
            return net(*feed)

    def forward_backward():
        net.zero_grad(set_to_none=True)
        out = net(*feed)
        loss = total_loss(net, out) if net.loss_weights else sum(
            v.float().sum() for v in out.values() if v.is_floating_point())
        loss.backward()

    def measure(fn) -> float:
        timer = tbench.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
        return timer.timeit(args.iterations).mean * 1000.0

    fwd_ms = measure(forward)
    fb_ms = measure(forward_backward) if backward else None

    types: Dict[str, str] = {}
    shapes: Dict[str, str] = {}
    for node in net.ir.nodes:
        types[module_name(node.name)] = node.type
        shapes[module_name(node.name)] = "  ".join(_shape(net.blob_shapes[t]) for t in node.outputs)
    layer_total = sum(per_layer.values()) or 1.0
    inputs_text = ", ".join(f"{k} {_shape(v)}" for k, v in net.inputs.items())
    con = console()
    table = Table(title=f"{net.ir.name} ({net.ir.phase}) on {device}: {inputs_text}; "
                        f"mean of {args.iterations} passes", header_style="bold")
    for col, justify in (("layer", "left"), ("type", "left"), ("output shape", "left"),
                         ("forward ms", "right"), ("% of layers", "right")):
        table.add_column(col, justify=justify, overflow="fold")
    for name, ms in per_layer.items():
        table.add_row(name, types.get(name, ""), shapes.get(name, ""), f"{ms:.3f}", f"{100 * ms / layer_total:.1f}")
    table.add_section()
    table.add_row("sum of layers", "", "", f"{sum(per_layer.values()):.3f}", "100.0")
    table.add_row("forward", "", "", f"{fwd_ms:.3f}", "")
    if fb_ms is not None:
        table.add_row("backward", "", "", f"{max(fb_ms - fwd_ms, 0.0):.3f}", "")
        table.add_row("forward-backward", "", "", f"{fb_ms:.3f}", "")
    con.print(table)
    print(f"forward {fmt(fwd_ms)} ms" + (f", backward {fmt(max(fb_ms - fwd_ms, 0.0))} ms, forward-backward "
                                         f"{fmt(fb_ms)} ms" if fb_ms is not None else ", no backward (nothing "
                                         "needs a gradient)") + f" (torch.utils.benchmark, {args.iterations} passes)",
          file=sys.stdout)
    return 0
