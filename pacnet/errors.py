"""Errors a user can cause, each carrying where it happened and what to do about it.

Every mistake in a net file, a command line or a data/weights file raises a
:class:`PacnetError` (or a subclass).  The message is built from plain parts so the
CLI can print it in one or two lines::

    net.yaml:12:5: layer 'conv1' (Convolution): kernel_size must be odd, got 4
      hint: use kernel_size 3 or 5

Code inside pacnet never formats locations by hand: it creates a :class:`Location`
(usually from the loader's line marks) and passes it here.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Iterable, Optional


@dataclass(frozen=True)
class Location:
    """A place in a user file: ``file`` (path as given), 1-based ``line`` and ``col``."""

    file: Optional[str] = None
    line: Optional[int] = None
    col: Optional[int] = None

    def __str__(self) -> str:
        parts = [self.file or "<input>"]
        if self.line is not None:
            parts.append(str(self.line))
            if self.col is not None:
                parts.append(str(self.col))
        return ":".join(parts)


class PacnetError(Exception):
    """A mistake in user input: a net file, an argument, a data or weights file.

    ``message`` says what is wrong, ``hint`` what to do; ``location`` and ``layer``
    say where.  ``str(err)`` renders all of it on at most two lines.
    """

    exit_code = 2

    def __init__(
        self,
        message: str,
        *,
        location: Optional[Location] = None,
        layer: Optional[str] = None,
        layer_type: Optional[str] = None,
        hint: Optional[str] = None,
    ) -> None:
        self.message = message
        self.location = location
        self.layer = layer
        self.layer_type = layer_type
        self.hint = hint
        super().__init__(self._render())

    def _render(self) -> str:
        head = []
        if self.location is not None:
            head.append(f"{self.location}:")
        if self.layer is not None:
            who = f"layer '{self.layer}'"
            if self.layer_type:
                who += f" ({self.layer_type})"
            head.append(who + ":")
        text = " ".join(head + [self.message])
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text

    def at(self, location: Optional[Location] = None, layer: Optional[str] = None,
           layer_type: Optional[str] = None) -> "PacnetError":
        """Return a copy of this error with missing location/layer details filled in."""
        return type(self)(
            self.message,
            location=self.location or location,
            layer=self.layer or layer,
            layer_type=self.layer_type or layer_type,
            hint=self.hint,
        )


class LoadError(PacnetError):
    """A file cannot be read or parsed (missing, malformed YAML/prototxt, corrupt weights)."""


class SchemaError(PacnetError):
    """A net or solver description does not match its schema (types, unknown keys, ranges)."""


class GraphError(PacnetError):
    """The layer graph is inconsistent (dangling bottoms, cycles, duplicate producers)."""


class ShapeError(PacnetError):
    """Blob shapes do not fit a layer (mismatched sizes, empty outputs)."""


class PacnetValueError(PacnetError, ValueError):
    """A bad argument to a Python API function (e.g. a PAC op); also a ``ValueError``."""


class DataError(PacnetError):
    """A data set, image, label or checkpoint file is missing, corrupt or out of range."""


class UnusedVariableWarning(PacnetError, UserWarning):
    """Template variables given (``vars=``, ``--var``) that no ``${NAME}`` of the net uses.

    A warning from the Python API (one vars dict may serve a family of nets, as Caffe's
    experiment scripts substitute one set into train, test and deploy files); the CLI
    turns it into an error (exit 2), where a name is typed for one net and a misspelt one
    would otherwise be ignored."""


class DamagedFileError(DataError):
    """A file pacnet wrote fails its checksum or no longer parses: it was damaged after it
    was written (disk, copy, transfer), or two files that belong together were mixed up."""


class OutputError(PacnetError):
    """A file cannot be written: a missing folder, a folder in its place, no permission, a
    full disk."""


class ExportError(PacnetError):
    """A net or module cannot be exported (an op or layer with no ONNX translation, a shape
    that cannot be dynamic, a file that cannot be written)."""


def did_you_mean(word: str, choices: Iterable[str]) -> Optional[str]:
    """Return a "did you mean ...?" hint for ``word`` among ``choices``, or None."""
    close = difflib.get_close_matches(str(word), list(choices), n=3, cutoff=0.6)
    if not close:
        return None
    return "did you mean " + " or ".join(repr(c) for c in close) + "?"
