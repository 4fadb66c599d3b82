"""``pacnet build NET``: validate, compile and show every layer's output shape.

The table is Caffe's Net::Init log as a table: layer, type, bottoms -> tops, output
shape, parameters, FLOPs and activation memory, with totals.
"""

from __future__ import annotations

import argparse
import json
from typing import List

from pacnet.cli.common import add_net_arguments, build_from_args, console, description, write_output
from pacnet.errors import OutputError, PacnetError

# Output formats of Graphviz's dot program chosen by --dot's extension.
PICTURES = ("svg", "png", "pdf", "jpg", "jpeg", "gif", "ps", "eps")


def add_parser(sub) -> None:
    p = sub.add_parser("build", help="validate and compile a net; show shapes, params, FLOPs",
                       description=description(__doc__))
    add_net_arguments(p)
    p.add_argument("--code", action="store_true", help="print the generated forward() code")
    p.add_argument("--dot", metavar="FILE",
                   help="write the layer graph: Graphviz DOT text (FILE.dot, FILE.gv, or - for "
                        "stdout instead of the table), or a picture rendered by Graphviz's dot "
                        "program ("
                        + ", ".join("FILE." + e for e in PICTURES) + ")")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(run=run)


def human(n: float, unit: str = "", base: int = 1000) -> str:
    """1234567 -> '1.23M' (base 1000) or bytes with base 1024 -> '1.2 MiB'."""
    if base == 1024:
        for suffix in ("B", "KiB", "MiB", "GiB", "TiB"):
            if abs(n) < 1024 or suffix == "TiB":
                return f"{n:.0f} {suffix}" if suffix == "B" else f"{n:.1f} {suffix}"
            n /= 1024
    for suffix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000 or suffix == "T":
            return (f"{n:.0f}" if suffix == "" else f"{n:.2f}{suffix}") + unit
        n /= 1000
    return str(n)


def _shape(s) -> str:
    return "×".join(str(d) for d in s) if s else "scalar"


def run(args: argparse.Namespace) -> int:
    from pacnet.api import parameter_count, summarize

    if args.dot == "-" and (args.json or args.code):
        other = "--json" if args.json else "--code"
        raise PacnetError(f"--dot - and {other} would both print to stdout",
                          hint="write the graph to a file: --dot graph.dot")
    if args.dot and args.dot != "-":
        _picture_format(args.dot)  # refuse an unknown extension before building
    # Nothing is run: build on the meta device (no allocation, no initialisation).
    net = build_from_args(args, device="meta")
    rows = summarize(net)
    total_params = parameter_count(net)
    total_flops = sum(r.flops for r in rows)
    total_mem = sum(r.memory for r in rows) + sum(4 * _numel(s) for s in net.inputs.values())

    if args.dot:
        write_dot(net, args.dot)
        if args.dot == "-":
            return 0
    if args.json:
        print(json.dumps({
            "name": net.ir.name,
            "phase": net.ir.phase,
            "inputs": {k: list(v) for k, v in net.inputs.items()},
            "outputs": [r.name for r in net.ir.outputs],
            "blobs": {k: list(v) for k, v in net.shapes.items()},
            "params": total_params,
            "flops": total_flops,
            "memory": total_mem,
            "loss_weights": dict(net.loss_weights),
            "never_learn": list(net.backward_needs.never_learn),
            "layers": [{"name": r.name, "type": r.type, "bottoms": list(r.bottoms), "tops": list(r.tops),
                        "shapes": [list(s) for s in r.shapes], "params": r.params, "flops": r.flops,
                        "memory": r.memory, "fused": r.fused, "backward": r.backward}
                       for r in rows],
        }, indent=None))
        return 0
    if args.code:
        print(net.code)
        return 0

    from rich.table import Table

    # Caffe's "needs backward computation", shown when a loss is there to send gradients.
    backward = bool(net.loss_weights)
    table = Table(title=f"{net.ir.name} ({net.ir.phase})", show_lines=False, header_style="bold")
    columns = [("layer", "left"), ("type", "left"), ("bottoms → tops", "left"),
               ("output shape", "left"), ("params", "right"), ("FLOPs", "right"),
               ("memory", "right")] + ([("backward", "center")] if backward else [])
    for col, justify in columns:
        table.add_column(col, justify=justify, overflow="fold")
    for name, shape in net.inputs.items():
        table.add_row(name, "input", "", _shape(shape), "", "", human(4 * _numel(shape), base=1024),
                      *([""] if backward else []))
    for r in rows:
        kind = r.type + (" (fused)" if r.fused else "")
        flow = f"{', '.join(r.bottoms)} → {', '.join(r.tops)}"
        table.add_row(r.name, kind, flow, "  ".join(_shape(s) for s in r.shapes),
                      human(r.params) if r.params else "", human(r.flops) if r.flops else "",
                      human(r.memory, base=1024),
                      *(["yes" if r.backward else "no"] if backward else []))
    table.add_section()
    needing = sum(r.backward for r in rows)
    table.add_row("total", f"{len(rows)} layers", f"outputs: {', '.join(o.name for o in net.ir.outputs)}",
                  "", human(total_params), human(total_flops), human(total_mem, base=1024),
                  *([f"{needing} yes"] if backward else []))
    console(width=max(100, _terminal_width())).print(table)
    for r in rows:
        if r.fused:
            print(f"fused: {r.name}: {r.fused}")
    if backward:
        idle = [r.name for r in rows if not r.backward]
        if idle:
            print(f"no backward computation ({len(idle)} layers): {_listed(idle)}")
        never = net.backward_needs.never_learn
        if never:
            print(f"learnable blobs no loss reaches, which never learn ({len(never)}): "
                  f"{_listed(never)}")
    return 0


def _listed(names, limit: int = 12) -> str:
    more = len(names) - limit
    return ", ".join(names[:limit]) + (f", ... ({more} more)" if more > 0 else "")


def _terminal_width() -> int:
    import shutil

    return shutil.get_terminal_size((140, 20)).columns


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _picture_format(path: str):
    """The Graphviz output format of ``path`` by its extension, None for DOT text."""
    import os

    ext = os.path.splitext(path)[1].lower().lstrip(".")
    if ext in ("", "dot", "gv"):
        return None
    if ext in PICTURES:
        return "jpg" if ext == "jpeg" else ext
    raise PacnetError(f"--dot {path}: cannot tell the format from the extension '.{ext}'",
                      hint="use .dot or .gv for DOT text, or one of "
                           + ", ".join("." + e for e in PICTURES) + " for a picture")


def write_dot(net, path: str) -> None:
    """Write the graph of ``net`` to ``path`` (- = stdout): DOT text, or a picture rendered
    by Graphviz's ``dot`` program when the extension names one."""
    import shutil
    import subprocess

    text = to_dot(net)
    fmt = None if path == "-" else _picture_format(path)
    if fmt is None:
        write_output(path, text)
        return
    program = shutil.which("dot")
    if program is None:
        raise OutputError(f"--dot {path}: rendering a .{fmt} picture needs Graphviz's 'dot' "
                          "program, which is not on PATH",
                          hint="install Graphviz (apt install graphviz, brew install graphviz, "
                               "conda install graphviz), or write DOT text: --dot graph.dot")
    done = subprocess.run([program, f"-T{fmt}"], input=text.encode("utf-8"), capture_output=True)
    if done.returncode != 0:
        reason = done.stderr.decode("utf-8", "replace").strip().splitlines()
        raise OutputError(f"--dot {path}: Graphviz could not render the graph: "
                          f"{reason[0] if reason else f'dot exited with {done.returncode}'}")
    write_output(path, done.stdout)


def to_dot(net) -> str:
    """Graphviz dot text: boxes for layers, ellipses for blobs labelled with their shapes."""
    lines: List[str] = [f'digraph "{net.ir.name}" {{', "  rankdir=TB;"]
    g = net.ir.to_networkx()
    ids = {node: f"n{i}" for i, node in enumerate(g.nodes)}
    for node, data in g.nodes(data=True):
        kind, name = node
        if kind == "layer":
            lines.append(f'  {ids[node]} [shape=box, label="{name}\\n{data.get("type")}"];')
        else:
            shape = net.blob_shapes.get(_ref(name))
            label = name + (f"\\n{_shape(shape)}" if shape is not None else "")
            lines.append(f'  {ids[node]} [shape=ellipse, label="{label}"];')
    for u, v in g.edges():
        lines.append(f"  {ids[u]} -> {ids[v]};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _ref(text: str):
    from pacnet.graph import BlobRef

    name, _, version = text.partition("@")
    return BlobRef(name, int(version) if version else 0)
