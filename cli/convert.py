"""``pacnet convert``: Caffe nets, weights and solvers, or another framework's weights, to
pacnet files.

    pacnet convert deploy.prototxt -o deploy.yaml
    pacnet convert train.prototxt --var NUM_LABELS=21 -o train.yaml   # other ${VARS} stay vars:
    pacnet convert deploy.prototxt --weights model.caffemodel -o model.safetensors
    pacnet convert jointupsample/pac_joint_upsample_x8 --weights x8_pac_weights_epoch_5000.pth
    pacnet convert fcn/fcn8s --weights fcn8s-heavy-pascal.caffemodel -o fcn8s.safetensors
    pacnet convert solver.prototxt -o solver.yaml                     # a solver: section

A ``.prototxt`` net becomes pacnet YAML (Caffe's upgrade rules applied; data layers become
``inputs:`` plus a ``data:`` record).  Template variables given no ``--var`` stay ``${NAME}``
in the YAML and are listed under ``vars:`` as ``null``, to be set when the net is used
(``pacnet train train.yaml --var DATA_ROOT=...``).  A Caffe ``solver.prototxt`` becomes a
``solver:`` section (for ``pacnet train NET --solver``, or to paste into a net).
``--weights`` builds the net (``--phase``, ``--input`` apply) and maps every Caffe blob onto
its state_dict key; the result goes to the ``.safetensors`` output (default: next to the
weights file), with its SHA-256 checksum.  ``-o -`` prints the YAML.

A pacnet net (YAML or a zoo name) takes ``--weights`` in the formats of
:mod:`pacnet.weights` (``.pth``, ``.pt``, ``.pth.tar``, safetensors; several files
comma-separated are one set) mapped by the net's ``weights_from`` rules, or a
``.caffemodel`` mapped by layer name; strict by default (every blob of the net given,
every entry used; ``--no-strict`` writes what matches).

Everything is read and checked before anything is written, and all outputs are written
together: a failed conversion writes nothing.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import warnings
from typing import Dict, List, Optional, Tuple

from pacnet.cli.common import description, parse_inputs, write_output
from pacnet.errors import PacnetError, UnusedVariableWarning


def add_parser(sub) -> None:
    p = sub.add_parser("convert", description=description(__doc__),
                       help="convert a Caffe prototxt (and .caffemodel) or solver.prototxt to "
                            "pacnet YAML (and safetensors), or .pth weights of a net to "
                            "safetensors")
    p.add_argument("net", metavar="NET", help="Caffe net definition or solver (.prototxt), or a "
                                              "pacnet net (YAML or zoo name) whose weights to "
                                              "convert")
    p.add_argument("-o", "--output", action="append", default=[], metavar="FILE",
                   help="output file: NET.yaml (or - for stdout) for the net or solver, "
                        "W.safetensors for the weights; give it once for each")
    p.add_argument("--var", action="append", default=[], metavar="NAME=VALUE", dest="vars",
                   help="value of a ${NAME} template variable; repeatable (unset ones stay vars:)")
    p.add_argument("--weights", metavar="W",
                   help="weights to convert: W.caffemodel, or for a pacnet net also "
                        "W.pth/.pt/.pth.tar/.safetensors (a,b for several)")
    p.add_argument("--phase", choices=("train", "test"), default="test",
                   help="phase the net is built in to map the weights (default test)")
    p.add_argument("--input", "-i", action="append", default=[], metavar="NAME=NxCxHxW",
                   help="concrete input shape when building for --weights; repeatable")
    p.add_argument("--strict", action=argparse.BooleanOptionalAction, default=None,
                   help="with --weights: fail when a net blob gets no weights or an entry of the "
                        "weights has no place in the net (default: on for a pacnet net, off for "
                        "a .prototxt)")
    p.set_defaults(run=run)


def _outputs(items: List[str]) -> Tuple[Optional[str], Optional[str]]:
    yaml_out = weights_out = None
    for item in items:
        low = item.lower()
        if low.endswith((".yaml", ".yml")) or item == "-":
            if yaml_out is not None:
                raise PacnetError(f"two YAML outputs given: {yaml_out} and {item}")
            yaml_out = item
        elif low.endswith(".safetensors"):
            if weights_out is not None:
                raise PacnetError(f"two weights outputs given: {weights_out} and {item}")
            weights_out = item
        else:
            raise PacnetError(f"-o {item}: cannot tell what to write from the extension",
                              hint="use NET.yaml (or -) for the net and W.safetensors for the "
                                   "weights")
    return yaml_out, weights_out


def _raw_vars(items: List[str]) -> Dict[str, str]:
    """``NAME=VALUE`` pairs kept as typed text: a prototxt template is text, so ``--var
    NET_ID=01`` must give ``01`` (Caffe's scripts substitute with sed), not the number 1."""
    out: Dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise PacnetError(f"--var {item!r}: expected NAME=VALUE with NAME a letter or '_' "
                              f"followed by letters, digits or '_'", hint="e.g. --var NUM_LABELS=21")
        out[name] = value
    return out


def _show_list(label: str, items: List[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return f"{label} ({len(items)}): {shown}{more}"


def _checked(mapped, weights: str, net: str, strict: bool):
    """``mapped`` (caffemodel blobs mapped onto a net) unless nothing matched or, when
    ``strict``, a net blob got no weights or a caffemodel layer has no place."""
    if not mapped.loaded:
        raise PacnetError(f"no layer of {weights} matches a layer of {net}",
                          hint="is it the caffemodel of this net? names must match, "
                               "template variables such as ${EXP} included")
    if strict and (mapped.missing or mapped.unexpected):
        parts = []
        if mapped.missing:
            parts.append(_show_list("net blobs without weights", mapped.missing))
        if mapped.unexpected:
            parts.append(_show_list("caffemodel layers not in the net", mapped.unexpected))
        raise PacnetError("; ".join(parts), hint="without --strict, what matches is converted")
    return mapped


def _solver_text(src: str, vars: Dict[str, str]) -> str:
    """The YAML ``solver:`` section of a Caffe solver prototxt (validated).  Caffe's fields
    that pacnet ignores (the net files, snapshot_prefix, solver_mode, ...) are left out;
    template variables without a value stay, listed under ``vars:``."""
    from pacnet.caffe_import import convert_to_yaml_text
    from pacnet.engine.solver import IGNORED_FIELDS, read_solver_file

    section = read_solver_file(src, vars, keep_unset=True)
    dropped = [k for k in section if k in IGNORED_FIELDS]
    section = {k: v for k, v in section.items() if k not in IGNORED_FIELDS}
    unset = sorted({m for v in section.values() for m in re.findall(r"\$\{(\w+)\}", str(v))})
    header = (f"converted from {os.path.basename(src)} by pacnet convert: use it with 'pacnet "
              "train NET --solver FILE', or paste the solver: section into the net")
    if dropped:
        header += f"\nleft out (pacnet takes them from the command line): {', '.join(dropped)}"
    out = {"vars": {name: None for name in unset}} if unset else {}
    out["solver"] = section
    return convert_to_yaml_text(out, header=header)


def _is_solver(src: str) -> bool:
    from pacnet.engine.solver import is_solver_prototxt
    from pacnet.prototxt import parse, read_text

    try:
        return is_solver_prototxt(parse(read_text(src), file=src, keep_unset={}))
    except PacnetError:
        return False  # not parseable as a whole: converting it as a net reports why


def run(args: argparse.Namespace) -> int:
    from pacnet.atomic import atomic_files, check_writable
    from pacnet.caffe_import import convert_to_yaml_text, load_prototxt

    src = args.net
    if not src.lower().endswith((".prototxt", ".pt.txt")):
        return _convert_weights(args)
    yaml_out, weights_out = _outputs(args.output)
    if weights_out is not None and not args.weights:
        raise PacnetError(f"-o {weights_out}: no --weights to convert",
                          hint="add --weights W.caffemodel")
    vars = _raw_vars(args.vars)
    inputs = parse_inputs(args.input)
    if args.weights and weights_out is None:
        weights_out = os.path.splitext(args.weights)[0] + ".safetensors"
    for out in (yaml_out, weights_out):
        if out is not None and out != "-":
            check_writable(out)
            if os.path.abspath(out) in (os.path.abspath(src), os.path.abspath(args.weights or src)):
                raise PacnetError(f"-o {out} would overwrite an input file")

    if _is_solver(src):
        if args.weights:
            raise PacnetError(f"{src} is a Caffe solver: --weights goes with the net's prototxt",
                              hint=f"convert the solver alone: pacnet convert {src} -o solver.yaml")
        text = _solver_text(src, vars)
        write_output(yaml_out or "-", text)
        if yaml_out not in (None, "-"):
            print(f"wrote {yaml_out} (solver)", file=sys.stderr)
        return 0

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.simplefilter("error", UnusedVariableWarning)  # a --var nothing uses: exit 2
        net, _ = load_prototxt(src, vars, keep_unset=True)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    header = f"converted from {os.path.basename(src)} by pacnet convert"
    if net.get("vars"):
        header += ("\nvars: template variables that had no --var; set each when using the net "
                   "(--var NAME=VALUE), or write its value here")
    text = convert_to_yaml_text(net, header=header)

    mapped = None
    if args.weights:
        from pacnet.api import build
        from pacnet.caffemodel import map_blobs, read_caffemodel

        model = read_caffemodel(args.weights)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # already shown above
            # meta: shapes, dtypes and shared-tensor identity without allocating anything
            built = build(src, vars=vars, inputs=inputs, phase=args.phase, fuse=False,
                          device="meta")
        mapped = _checked(map_blobs(model, built), args.weights, src, bool(args.strict))

    # Everything has been read and checked: write all outputs, or none.
    if yaml_out is None and mapped is None:
        yaml_out = "-"
    with atomic_files() as stage:
        if yaml_out not in (None, "-"):
            write_output(yaml_out, text, stage=stage)
        if mapped is not None:
            from pacnet.tensorfile import write_safetensors

            write_safetensors(weights_out, mapped.tensors, stage=stage, metadata={
                "source": os.path.basename(args.weights), "net": os.path.basename(src),
                "converter": "pacnet convert"})
    if yaml_out == "-":
        write_output("-", text)
    elif yaml_out is not None:
        print(f"wrote {yaml_out} ({len(net['layers'])} layers)", file=sys.stderr)
    if mapped is not None:
        print(f"wrote {weights_out} ({len(mapped.tensors)} tensors from {len(mapped.loaded)} layers)",
              file=sys.stderr)
        if mapped.missing:
            print("warning: " + _show_list("net blobs without weights (keep their fillers)",
                                           mapped.missing), file=sys.stderr)
        if mapped.unexpected:
            print("warning: " + _show_list("caffemodel layers not in the net (skipped)",
                                           mapped.unexpected), file=sys.stderr)
    return 0


_WEIGHT_SUFFIXES = (".pth.tar", ".pth", ".pt", ".tar", ".bin", ".caffemodel", ".safetensors")


def _convert_weights(args: argparse.Namespace) -> int:
    """The pacnet-net mode: map --weights onto the built net and write its blobs."""
    from pacnet.api import build
    from pacnet.cli.common import parse_inputs
    from pacnet.weights import convert

    if not args.weights:
        raise PacnetError(f"{args.net} is already a pacnet net: convert takes its weights "
                          "(--weights W.pth) or a Caffe .prototxt",
                          hint="use 'pacnet build' to check the net itself")
    yaml_out, out = _outputs(args.output)
    if yaml_out is not None:
        raise PacnetError(f"-o {yaml_out}: {args.net} is already pacnet YAML",
                          hint="give -o W.safetensors for the weights")
    files = [f for f in args.weights.split(",") if f]
    if out is None:
        if len(files) > 1:
            raise PacnetError("several weights files: name the output", hint="-o W.safetensors")
        stem = files[0]
        for suffix in _WEIGHT_SUFFIXES:
            if stem.lower().endswith(suffix):
                stem = stem[: -len(suffix)]
                break
        out = stem + ".safetensors"
    strict = True if args.strict is None else args.strict
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # meta: shapes, dtypes and shared-tensor identity without allocating anything
        net = build(args.net, vars=_raw_vars(args.vars), inputs=parse_inputs(args.input),
                    phase=args.phase, fuse=False, device="meta")
    if any(f.lower().endswith(".caffemodel") for f in files):
        written, summary, missing, unused = _caffemodel_onto(net, files, out, strict)
    else:
        result = convert(net, files, out, strict=strict)
        written, summary = len(result.tensors), result.summary()
        missing, unused = result.missing, [k for f in result.files for k in f.unexpected]
    print(f"wrote {out} ({written} blobs of {net.ir.name}; {summary})", file=sys.stderr)
    if missing:
        print("warning: " + _show_list("net blobs without weights (keep their fillers)", missing),
              file=sys.stderr)
    if unused:
        print("warning: " + _show_list("entries not in the net (skipped)", unused), file=sys.stderr)
    return 0


def _caffemodel_onto(net, files: List[str], out: str,
                     strict: bool) -> Tuple[int, str, List[str], List[str]]:
    """A .caffemodel mapped onto a pacnet net by layer name (pacnet.caffemodel)."""
    from pacnet.atomic import check_writable
    from pacnet.caffemodel import map_blobs, read_caffemodel
    from pacnet.tensorfile import write_safetensors

    if len(files) > 1:
        raise PacnetError("give one .caffemodel", hint="convert other files separately")
    if os.path.abspath(out) == os.path.abspath(files[0]):
        raise PacnetError(f"-o {out} would overwrite an input file")
    check_writable(out)
    mapped = _checked(map_blobs(read_caffemodel(files[0]), net), files[0], net.ir.name, strict)
    write_safetensors(out, mapped.tensors, {
        "source": os.path.basename(files[0]), "net": net.ir.name, "converter": "pacnet convert"})
    return (len(mapped.tensors), f"{os.path.basename(files[0])}: {len(mapped.loaded)} layers",
            mapped.missing, mapped.unexpected)
