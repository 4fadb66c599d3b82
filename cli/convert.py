"""``pacnet convert NET.prototxt``: turn a Caffe net (and its weights) into pacnet files.

    pacnet convert deploy.prototxt -o deploy.yaml
    pacnet convert train.prototxt --var NUM_LABELS=21 --var EXP=voc12 -o train.yaml
    pacnet convert deploy.prototxt --weights model.caffemodel -o model.safetensors

The net becomes pacnet YAML (Caffe's upgrade rules applied; data layers become
``inputs:`` plus a ``data:`` record).  Without a ``.yaml`` output and without
``--weights`` the YAML goes to stdout.  ``--weights`` builds the net (``--phase``,
``--input`` apply) and maps every Caffe blob onto its state_dict key; the result goes to
the ``.safetensors`` output (default: next to the caffemodel).  Files are written
atomically: an error never leaves a partial file behind.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import warnings
from typing import Dict, List, Optional, Tuple

from pacnet.errors import PacnetError, UnusedVariableWarning


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="convert a Caffe prototxt (and .caffemodel) to pacnet YAML "
                                       "(and safetensors)",
                       description=__doc__.splitlines()[0])
    p.add_argument("net", metavar="NET.prototxt", help="Caffe net definition (text)")
    p.add_argument("-o", "--output", action="append", default=[], metavar="FILE",
                   help="output file: NET.yaml for the net, W.safetensors for the weights; "
                        "give it once for each")
    p.add_argument("--var", action="append", default=[], metavar="NAME=VALUE", dest="vars",
                   help="value of a ${NAME} template variable; repeatable")
    p.add_argument("--weights", metavar="W.caffemodel", help="Caffe weights to convert")
    p.add_argument("--phase", choices=("train", "test"), default="test",
                   help="phase the net is built in to map the weights (default test)")
    p.add_argument("--input", "-i", action="append", default=[], metavar="NAME=NxCxHxW",
                   help="concrete input shape when building for --weights; repeatable")
    p.add_argument("--strict", action="store_true",
                   help="with --weights: fail when a net blob gets no weights or a caffemodel "
                        "layer has no place in the net")
    p.set_defaults(run=run)


def _outputs(items: List[str]) -> Tuple[Optional[str], Optional[str]]:
    yaml_out = weights_out = None
    for item in items:
        low = item.lower()
        if low.endswith((".yaml", ".yml")):
            if yaml_out is not None:
                raise PacnetError(f"two YAML outputs given: {yaml_out} and {item}")
            yaml_out = item
        elif low.endswith(".safetensors"):
            if weights_out is not None:
                raise PacnetError(f"two weights outputs given: {weights_out} and {item}")
            weights_out = item
        else:
            raise PacnetError(f"-o {item}: cannot tell what to write from the extension",
                              hint="use NET.yaml for the net and W.safetensors for the weights")
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


def _check_folder(path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise PacnetError(f"cannot write {path}: folder {folder} does not exist")


def _show_list(label: str, items: List[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return f"{label} ({len(items)}): {shown}{more}"


def run(args: argparse.Namespace) -> int:
    from pacnet.atomic import atomic_write
    from pacnet.caffe_import import convert_to_yaml_text, load_prototxt
    from pacnet.cli.common import parse_inputs

    src = args.net
    if src.lower().endswith((".yaml", ".yml")):
        raise PacnetError(f"{src} is already a pacnet net; convert reads Caffe .prototxt files",
                          hint="use 'pacnet build' to check it")
    yaml_out, weights_out = _outputs(args.output)
    if weights_out is not None and not args.weights:
        raise PacnetError(f"-o {weights_out}: no --weights to convert",
                          hint="add --weights W.caffemodel")
    vars = _raw_vars(args.vars)
    inputs = parse_inputs(args.input)
    if args.weights and weights_out is None:
        weights_out = os.path.splitext(args.weights)[0] + ".safetensors"
    for out in (yaml_out, weights_out):
        if out is not None:
            _check_folder(out)
            if os.path.abspath(out) in (os.path.abspath(src),
                                        os.path.abspath(args.weights or src)):
                raise PacnetError(f"-o {out} would overwrite an input file")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.simplefilter("error", UnusedVariableWarning)  # a --var nothing uses: exit 2
        net, _ = load_prototxt(src, vars)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)

    text = convert_to_yaml_text(net, header=f"converted from {os.path.basename(src)} by pacnet convert")

    mapped = None
    if args.weights:
        from pacnet.api import build
        from pacnet.caffemodel import map_blobs, read_caffemodel, save_safetensors

        model = read_caffemodel(args.weights)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # already shown above
            # meta: shapes, dtypes and shared-tensor identity without allocating anything
            built = build(src, vars=vars, inputs=inputs, phase=args.phase, fuse=False,
                          device="meta")
        mapped = map_blobs(model, built)
        if not mapped.loaded:
            raise PacnetError(f"no layer of {args.weights} matches a layer of {src}",
                              hint="is it the caffemodel of this net? names must match, "
                                   "template variables such as ${EXP} included")
        if args.strict and (mapped.missing or mapped.unexpected):
            parts = []
            if mapped.missing:
                parts.append(_show_list("net blobs without weights", mapped.missing))
            if mapped.unexpected:
                parts.append(_show_list("caffemodel layers not in the net", mapped.unexpected))
            raise PacnetError("; ".join(parts), hint="drop --strict to convert what matches")

    # Write only once everything has been read and checked.
    if yaml_out is not None:
        with atomic_write(yaml_out) as fh:
            fh.write(text)
        print(f"wrote {yaml_out} ({len(net['layers'])} layers)", file=sys.stderr)
    elif not args.weights:
        sys.stdout.write(text)
    if mapped is not None:
        save_safetensors(mapped.tensors, weights_out, metadata={
            "format": "pt", "source": os.path.basename(args.weights), "net": os.path.basename(src)})
        print(f"wrote {weights_out} ({len(mapped.tensors)} tensors from {len(mapped.loaded)} layers)",
              file=sys.stderr)
        if mapped.missing:
            print("warning: " + _show_list("net blobs without weights (keep their fillers)",
                                           mapped.missing), file=sys.stderr)
        if mapped.unexpected:
            print("warning: " + _show_list("caffemodel layers not in the net (skipped)",
                                           mapped.unexpected), file=sys.stderr)
    return 0
