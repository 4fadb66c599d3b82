"""Shape inference: bind symbolic input dims, then run each layer's pure ``infer`` in order."""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from pacnet import registry
from pacnet.errors import PacnetError, SchemaError, ShapeError
from pacnet.graph import BlobRef, Graph

Shape = Tuple[int, ...]

#: Larger blobs are almost certainly a mistake (e.g. a pad of 10000); refuse before allocating.
MAX_BLOB_ELEMENTS = 2 ** 40


def bind_inputs(graph: Graph, given: Optional[Mapping[str, Sequence[int]]] = None) -> Dict[str, Shape]:
    """Concrete input shapes: ``given`` (e.g. from ``--input``) first, then symbolic dims
    resolved from the ``dims:`` defaults and from the dims that ``given`` shapes bind."""
    given = dict(given or {})
    for name in given:
        if name not in graph.inputs:
            from pacnet.errors import did_you_mean

            raise SchemaError(f"--input {name}: the net has no input blob {name!r}",
                              hint=did_you_mean(name, graph.inputs) or
                              f"inputs are: {', '.join(graph.inputs) or 'none'}")
    env: Dict[str, int] = dict(graph.dims)
    # Dims bound by explicit shapes (e.g. --input data=1x3x64x64 binds N, H, W for 'label' too).
    for name, shape in given.items():
        declared = graph.inputs[name]
        shape = tuple(int(d) for d in shape)
        if len(shape) != len(declared):
            raise ShapeError(f"--input {name}: got {len(shape)} dims, the net declares {len(declared)} "
                             f"({'x'.join(map(str, declared))})", location=graph.input_locations.get(name))
        for sym, value in zip(declared, shape):
            if isinstance(sym, str):
                env[sym] = value
    bound: Dict[str, Shape] = {}
    for name, declared in graph.inputs.items():
        if name in given:
            shape = tuple(int(d) for d in given[name])
            for d_decl, d in zip(declared, shape):
                if isinstance(d_decl, int) and d_decl != d:
                    raise ShapeError(f"--input {name}: dim {d} does not match the declared {d_decl}",
                                     location=graph.input_locations.get(name))
        else:
            dims = []
            for d in declared:
                if isinstance(d, str):
                    if d not in env:
                        raise SchemaError(
                            f"input {name!r} has symbolic dim {d!r} with no value",
                            location=graph.input_locations.get(name),
                            hint=f"pass --input {name}=" + "x".join(str(x) if isinstance(x, int) else "?" for x in declared)
                                 + f" or add 'dims: {{{d}: <value>}}' to the net file")
                    dims.append(env[d])
                else:
                    dims.append(int(d))
            shape = tuple(dims)
        if any(d <= 0 for d in shape):
            raise ShapeError(f"input {name!r} has a non-positive dim: {list(shape)}",
                             location=graph.input_locations.get(name))
        bound[name] = shape
    return bound


def infer_shapes(graph: Graph, input_shapes: Mapping[str, Shape]) -> Dict[BlobRef, Shape]:
    """Shape of every blob version; a located ShapeError at the first layer that does not fit."""
    shapes: Dict[BlobRef, Shape] = {BlobRef(n): tuple(s) for n, s in input_shapes.items()}
    for node in graph.nodes:
        ltype = registry.get(node.type)
        in_shapes = [shapes[b] for b in node.inputs]
        try:
            out_shapes = ltype.infer(node.spec, list(in_shapes))
        except PacnetError as err:
            raise err.at(node.spec.location, node.name, node.type) from None
        if len(out_shapes) != len(node.outputs):
            raise RuntimeError(f"{node.type}.infer returned {len(out_shapes)} shapes for "
                               f"{len(node.outputs)} tops")  # a bug in the layer type
        for ref, shape in zip(node.outputs, out_shapes):
            shape = tuple(int(d) for d in shape)
            if any(d <= 0 for d in shape):
                bottoms = ", ".join(f"{b.name} {_fmt(s)}" for b, s in zip(node.inputs, in_shapes))
                raise ShapeError(f"output {ref.name!r} would have shape {_fmt(shape)} (from {bottoms})",
                                 location=node.spec.location, layer=node.name, layer_type=node.type,
                                 hint="the input is too small for this kernel/stride/crop; use a larger "
                                      "input or smaller kernel, stride or offset")
            n = 1
            for d in shape:
                n *= d
            if n > MAX_BLOB_ELEMENTS:
                raise ShapeError(f"output {ref.name!r} would have {n:,} elements {_fmt(shape)}",
                                 location=node.spec.location, layer=node.name, layer_type=node.type,
                                 hint="check pad/zoom/num_output for a typo")
            shapes[ref] = shape
    return shapes


def _fmt(shape: Sequence[Any]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def latest_shapes(graph: Graph, shapes: Mapping[BlobRef, Shape]) -> Dict[str, Shape]:
    """Blob name -> shape of its last version (what ``Net.shapes`` shows)."""
    out: Dict[str, Shape] = {}
    for name in graph.inputs:
        out[name] = shapes[BlobRef(name)]
    for node in graph.nodes:
        for ref in node.outputs:
            out[ref.name] = shapes[ref]
    return out
