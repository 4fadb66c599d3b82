"""``pacnet`` entry point: one argparse sub-command per module of this package.

Each verb module (``build.py``, ``train.py``, ...) defines ``add_parser(subparsers)``
(registering its sub-parser with ``set_defaults(run=...)``) and a ``run(args) -> int``.
User mistakes arrive here as :class:`~pacnet.errors.PacnetError` and are printed in one
or two lines with exit code 2; anything else is a bug and keeps its traceback.  A reader
that closes the pipe early (``pacnet build NET --json | head``) ends the command quietly
with 141, the status of a Unix tool stopped by SIGPIPE.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import warnings
from typing import List, Optional

from pacnet import __version__
from pacnet.errors import PacnetError, UnusedVariableWarning

# Verb modules in the order their commands are listed by --help.
VERBS = ("build", "layers", "datasets", "convert", "hotswap", "train", "test", "time", "export")

DESCRIPTION = ("pacnet: a Caffe-style graph compiler for PyTorch. Nets are YAML (or Caffe "
               ".prototxt) graphs of primitive layers; pixel-adaptive, segmentation-aware and "
               "dense-CRF layers run on fused kernels.")
EPILOG = ("Run 'pacnet COMMAND --help' for a command's options, e.g. 'pacnet build "
          "deeplab/deeplab_v1_largefov' or 'pacnet train "
          "nets/jointupsample/pac_joint_upsample_x8.yaml'.")


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so ``main`` can return the code."""

    def error(self, message: str):
        raise PacnetError(f"{self.prog}: {message}", hint=f"see '{self.prog} --help'")


def make_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pacnet", description=DESCRIPTION, epilog=EPILOG)
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


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    # pacnet's warnings carry their own location (file:line of the net); the Python source
    # line that raised them means nothing to a user.
    print(f"warning: {message}", file=file or sys.stderr)


def main(argv: Optional[List[str]] = None) -> int:
    """Run the CLI on ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        # A --var nothing uses is a typo here (the API only warns): an error, exit 2.
        warnings.filterwarnings("error", category=UnusedVariableWarning)
        return _main(argv)


def _main(argv: Optional[List[str]]) -> int:
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
    except BrokenPipeError:
        return _closed_pipe()


def _closed_pipe() -> int:
    """The reader of stdout went away: send the rest of the output to /dev/null (so the
    interpreter's last flush does not fail too) and exit as a Unix tool killed by SIGPIPE."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # stdout is not a file (e.g. captured by a test)
        pass
    return 128 + int(getattr(signal, "SIGPIPE", 13))


def entry_point() -> None:
    sys.exit(main())
