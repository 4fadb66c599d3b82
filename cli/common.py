"""Argument helpers shared by the verbs (net source, inputs, overrides, vars)."""

from __future__ import annotations

import argparse
import re
import sys
from typing import Dict, Optional, Sequence, Tuple

from pacnet.errors import PacnetError
from pacnet.load import parse_assignment


def description(doc: str) -> str:
    """The first line of a verb module's docstring as help text: reStructuredText's
    ``literal`` and :role:`target` markup taken out."""
    line = doc.strip().splitlines()[0]
    line = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", line)
    return line.replace("``", "")


_CONSOLE = None


def console(width: Optional[int] = None, **kw):
    """A rich Console on stdout whose closed pipe raises BrokenPipeError (rich's own
    handling exits with 1); :func:`pacnet.cli.main.main` turns it into the SIGPIPE status."""
    global _CONSOLE
    if _CONSOLE is None:
        from rich.console import Console

        class PipeConsole(Console):
            def on_broken_pipe(self) -> None:
                raise BrokenPipeError(32, "Broken pipe")

        _CONSOLE = PipeConsole
    return _CONSOLE(file=sys.stdout, width=width, **kw)


def int_at_least(minimum: int):
    """An argparse ``type``: an integer ``>= minimum`` (a clear usage error otherwise)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def add_net_arguments(parser: argparse.ArgumentParser, *, phase: str = "test") -> None:
    """NET, --input, --phase, --set, --var, --no-fuse: how every verb names a net."""
    parser.add_argument("net", metavar="NET", help="net file: YAML (.yaml/.yml) or Caffe .prototxt")
    parser.add_argument("--input", "-i", action="append", default=[], metavar="NAME=NxCxHxW",
                        help="concrete shape of an input blob (binds symbolic dims); repeatable")
    parser.add_argument("--phase", choices=("train", "test"), default=phase,
                        help=f"Caffe phase for include/exclude rules (default {phase})")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override a value, e.g. layers.conv1.num_output=32 or dims.H=128; repeatable")
    parser.add_argument("--var", action="append", default=[], metavar="NAME=VALUE", dest="vars",
                        help="value of a ${NAME} template variable; repeatable")
    parser.add_argument("--no-fuse", action="store_true", help="keep the graph as written (no fusion passes)")


_SHAPE = re.compile(r"^\d+(x\d+)*$")


def parse_inputs(items: Sequence[str]) -> Dict[str, Tuple[int, ...]]:
    shapes: Dict[str, Tuple[int, ...]] = {}
    for item in items:
        if "=" not in item:
            raise PacnetError(f"--input {item!r}: expected NAME=NxCxHxW", hint="e.g. --input data=1x3x224x224")
        name, dims = item.split("=", 1)
        dims = dims.strip().lower().replace(",", "x")
        if not _SHAPE.match(dims):
            raise PacnetError(f"--input {item!r}: the shape must be positive integers joined by 'x'",
                              hint="e.g. --input data=1x3x224x224")
        shape = tuple(int(d) for d in dims.split("x"))
        if any(d <= 0 for d in shape):
            raise PacnetError(f"--input {item!r}: dims must be positive")
        shapes[name.strip()] = shape
    return shapes


def parse_assignments(items: Sequence[str], flag: str, *, typed: bool = True) -> Dict[str, object]:
    """``KEY=VALUE`` items to a dict; values parsed as YAML scalars when ``typed``, else kept as
    text (template variables: a prototxt's ``${ID}`` = ``01`` must stay ``01``)."""
    out: Dict[str, object] = {}
    for item in items:
        try:
            key, value = parse_assignment(item)
        except PacnetError as err:
            raise PacnetError(f"{flag} {item!r}: {err.message}", hint="use KEY=VALUE") from None
        out[key] = value if typed else item.split("=", 1)[1]
    return out


def build_from_args(args: argparse.Namespace, *, phase: Optional[str] = None, device=None):
    """Compile the net named by the common arguments."""
    from pacnet.api import build

    return build(args.net, inputs=parse_inputs(args.input), phase=phase or args.phase,
                 vars=parse_assignments(args.vars, "--var", typed=False),
                 overrides=parse_assignments(args.overrides, "--set"), fuse=not args.no_fuse,
                 device=device)


def write_output(path: str, data, *, stage=None) -> None:
    """Write ``data`` (text or bytes) to the output ``path``: ``-`` is stdout, anything else
    a file written atomically (a missing folder or a folder in its place is an OutputError
    saying so).  ``stage``: join a :func:`pacnet.atomic.atomic_files` block instead."""
    from pacnet.atomic import atomic_save

    if path == "-":
        if isinstance(data, bytes):
            sys.stdout.flush()
            sys.stdout.buffer.write(data)
        else:
            sys.stdout.write(data)
        sys.stdout.flush()
        return

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data if isinstance(data, bytes) else data.encode("utf-8"))

    (stage or atomic_save)(path, write)
