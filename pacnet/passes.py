"""Graph passes run between graph building and code generation (e.g. fusion).

A pass takes the IR :class:`~pacnet.graph.Graph` and the bound input shapes and returns a
new Graph computing the same numbers.  Built-in passes live in their own modules and
register themselves; :func:`passes` imports them on first use.
"""

from __future__ import annotations

import importlib
from typing import Callable, List, Mapping, Tuple

from pacnet.graph import Graph

GraphPass = Callable[[Graph, Mapping[str, Tuple[int, ...]]], Graph]
_PASSES: List[Tuple[str, GraphPass]] = []
_BUILTIN = ("pacnet.fusion",)
_loaded = False


def register_pass(name: str, fn: GraphPass) -> None:
    """Add a graph pass; ``build(..., fuse=False)`` skips all of them."""
    if any(n == name for n, _ in _PASSES):
        raise RuntimeError(f"graph pass {name!r} registered twice")
    _PASSES.append((name, fn))


def passes() -> List[Tuple[str, GraphPass]]:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in _BUILTIN:
            importlib.import_module(module)
    return list(_PASSES)
