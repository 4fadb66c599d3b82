"""``pacnet`` entry point: one argparse sub-command per module of this package.

Each verb module (``build.py``, ``train.py``, ...) defines ``add_parser(subparsers)``
(registering its sub-parser with ``set_defaults(run=...)``) and a ``run(args) -> int``.
User mistakes arrive here as :class:`~pacnet.errors.PacnetError` and are printed in one
or two lines with exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

from pacnet import __version__
from pacnet.errors import PacnetError

# Verb modules in the order their commands are listed by --help.
VERBS = ("build", "layers", "convert", "hotswap", "train", "test", "time", "export")


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so ``main`` can return the code."""

    def error(self, message: str):
        raise PacnetError(f"{self.prog}: {message}", hint=f"see '{self.prog} --help'")


def make_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pacnet", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"pacnet {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="COMMAND", parser_class=_Parser)
    for verb in VERBS:
        try:
            module = importlib.import_module(f"pacnet.cli.{verb}")
        except ModuleNotFoundError as err:
            if err.name == f"pacnet.cli.{verb}":
                continue  # verb not part of this build
            raise
        module.add_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run the CLI on ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    parser = make_parser()
    try:
        args = parser.parse_args(argv)
        if not getattr(args, "run", None):
            parser.print_help()
            return 2
        return int(args.run(args) or 0)
    except SystemExit as stop:  # --help / --version
        return int(stop.code or 0)
    except PacnetError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def entry_point() -> None:
    sys.exit(main())
