"""``pacnet export NET -o NET.onnx``: the net as an ONNX file that runs in stock onnxruntime.

    pacnet export jointupsample/pac_joint_upsample_x8 -o x8.onnx --verify
    pacnet export NET --weights work_dirs/NAME -o NET.onnx --input data=1x3x513x513
    pacnet export NET -o NET.onnx --dynamic          # batch (and H, W where the net allows)
    pacnet export NET -o NET.onnx --dynamic N        # exactly these dims (or an error)

pacnet's ops become ``pacnet::*`` nodes defined by ONNX functions of standard ops (Netron
shows each as one node to expand); inputs and outputs keep the net's blob names.  The file
is written only once onnxruntime loads it (and, with ``--dynamic``, agrees with PyTorch at a
second size).  ``--verify`` runs it in onnxruntime (CPU) on
random inputs of the net's shapes and prints the largest error of every output against
PyTorch; the exit code is 1 when one is beyond ``atol + rtol * max|output|``.
"""

from __future__ import annotations

import argparse
import os
import sys

from pacnet.cli.common import add_net_arguments, build_from_args


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="export a net to ONNX (runs in stock onnxruntime)",
                       description=__doc__.splitlines()[0])
    add_net_arguments(p)
    p.add_argument("-o", "--output", metavar="FILE",
                   help="the .onnx file to write (default: <net name>.onnx)")
    p.add_argument("--weights", metavar="W",
                   help="weights to export: a .safetensors file, a checkpoint or a work dir "
                        "(default: the net's own initialisation)")
    p.add_argument("--opset", type=int, metavar="N",
                   help="ONNX opset of the standard ops (default: torch.onnx's, at least 18)")
    p.add_argument("--dynamic", nargs="?", const="", metavar="DIMS",
                   help="make the batch and the other input dims dynamic where the net allows "
                        "(the rest stay fixed, with a note naming the layer that fixes them); "
                        "or exactly the named dims of the net's inputs, e.g. --dynamic N,H,W")
    p.add_argument("--verify", action="store_true",
                   help="run the file in onnxruntime and compare every output with PyTorch")
    p.add_argument("--rtol", type=float, default=1e-4, metavar="R",
                   help="--verify tolerance relative to the output's largest value (1e-4)")
    p.add_argument("--atol", type=float, default=1e-5, metavar="A",
                   help="--verify absolute tolerance (1e-5)")
    p.set_defaults(run=run)


def _shape(shape) -> str:
    return "×".join(str(d) for d in shape) if shape else "scalar"


def run(args: argparse.Namespace) -> int:
    from pacnet.cli.train import short_openmp_spin

    short_openmp_spin()  # before torch loads (see there)
    from rich.table import Table

    from pacnet.cli.train import console
    from pacnet.engine.trainer import apply_weights
    from pacnet.export import export_onnx

    net = build_from_args(args)
    weights = apply_weights(net, args.weights) if args.weights else None
    path = args.output or f"{net.ir.name}.onnx"
    dynamic = None
    if args.dynamic is not None:
        dynamic = [d.strip() for d in args.dynamic.split(",") if d.strip()] or True
    result = export_onnx(net, path, opset=args.opset, dynamic=dynamic, verify=args.verify,
                         rtol=args.rtol, atol=args.atol)
    size = sum(os.path.getsize(f) for f in (result.path, result.path + ".data")
               if os.path.exists(f))
    print(f"wrote {result.path} ({size / 2**20:.1f} MiB, opset {result.opset})")
    print(f"weights: {weights or 'the net initialisation (no --weights)'}")
    print("inputs:  " + ", ".join(f"{k} {_shape(v)}" for k, v in result.inputs.items()))
    print("outputs: " + ", ".join(f"{k} {_shape(v)}" for k, v in result.outputs.items()))
    if result.functions:
        print("pacnet functions: " + ", ".join(result.functions))
    for note in result.notes:
        print(f"note: {note}")
    if result.checks is None:
        return 0
    table = Table(title=f"onnxruntime vs PyTorch (atol {args.atol:g}, rtol {args.rtol:g})",
                  header_style="bold")
    for col, justify in (("output", "left"), ("shape", "left"), ("max abs error", "right"),
                         ("max rel error", "right"), ("", "left")):
        table.add_column(col, justify=justify)
    for c in result.checks:
        table.add_row(c.name, _shape(c.shape), f"{c.max_abs:.3g}", f"{c.max_rel:.3g}",
                      "ok" if c.ok else "[bold red]beyond tolerance[/]")
    console().print(table)
    if not result.verified:
        bad = ", ".join(c.name for c in result.checks if not c.ok)
        print(f"verification failed: {bad} beyond tolerance", file=sys.stderr)
        return 1
    return 0
