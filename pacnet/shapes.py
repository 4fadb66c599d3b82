"""Shape inference: bind symbolic input dims, then run each layer's pure ``infer`` in order."""

from __future__ import annotations

import operator
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from pacnet import registry
from pacnet.errors import PacnetError, PacnetValueError, SchemaError, ShapeError, did_you_mean
from pacnet.graph import BlobRef, Graph

Shape = Tuple[int, ...]

#: Larger blobs are almost certainly a mistake (e.g. a pad of 10000); refuse before allocating.
MAX_BLOB_ELEMENTS = 2 ** 40


def bind_inputs(graph: Graph, given: Optional[Mapping[str, Sequence[int]]] = None) -> Dict[str, Shape]:
    """Concrete input shapes.

    The declared shapes (``inputs:``, Input layers, a prototxt's ``input_dim``) are defaults,
    as Caffe's input blobs are, which every user reshapes: a shape in ``given`` (``inputs=``,
    ``--input``) replaces its input's declared one, any number of its axes included, as long
    as it has as many axes.  The symbolic dims it binds (``N``, ``H``...) apply to the other
    inputs too; the rest come from the ``dims:`` defaults.
    """
    env: Dict[str, int] = dict(graph.dims)
    binder: Dict[str, Tuple[str, int]] = {}  # symbolic dim -> (input, axis) that bound it
    shapes: Dict[str, Shape] = {}
    for name, raw in (given or {}).items():
        if name not in graph.inputs:
            raise SchemaError(f"the net has no input blob {name!r}",
                              hint=did_you_mean(name, graph.inputs) or
                              f"its inputs are: {', '.join(graph.inputs) or 'none'}")
        declared = graph.inputs[name]
        shape = _given_shape(name, raw)
        if len(shape) != len(declared):
            raise ShapeError(f"input {name!r} is given {len(shape)} axes {_fmt(shape)}, the net "
                             f"declares {len(declared)} {_fmt(declared)}",
                             location=graph.input_locations.get(name),
                             hint=f"give all {len(declared)} axes")
        for axis, (sym, value) in enumerate(zip(declared, shape)):
            if not isinstance(sym, str):
                continue
            if sym in binder and env[sym] != value:
                other, other_axis = binder[sym]
                raise ShapeError(
                    f"inputs {other!r} and {name!r} give the dim {sym} two values: {env[sym]} "
                    f"(axis {other_axis} of {other!r}) and {value} (axis {axis} of {name!r})",
                    location=graph.input_locations.get(name),
                    hint=f"both are declared with {sym}: give them the same size there")
            env[sym] = value
            binder[sym] = (name, axis)
        shapes[name] = shape
    bound: Dict[str, Shape] = {}
    for name, declared in graph.inputs.items():
        if name not in shapes:
            unbound = [d for d in declared if isinstance(d, str) and d not in env]
            if unbound:
                raise SchemaError(
                    f"input {name!r} has symbolic dim {unbound[0]!r} with no value",
                    location=graph.input_locations.get(name),
                    hint=f"give input {name!r} a shape (--input {name}=" + "x".join(
                        str(d) if isinstance(d, int) else "?" for d in declared)
                    + f", or inputs={{'{name}': (...)}} in Python), or add 'dims: "
                      f"{{{unbound[0]}: <value>}}' to the net file")
            shapes[name] = tuple(env[d] if isinstance(d, str) else int(d) for d in declared)
        shape = shapes[name]
        for axis, d in enumerate(shape):
            if d <= 0:
                raise ShapeError(f"input {name!r} {_fmt(shape)} has size {d} on axis {axis}",
                                 location=graph.input_locations.get(name),
                                 hint="every axis needs a size of at least 1")
        bound[name] = shape
    return bound


def _given_shape(name: str, raw: Any) -> Shape:
    """A given shape as a tuple of ints (anything else is a user error)."""
    try:
        if isinstance(raw, (str, bytes)) or any(isinstance(d, bool) for d in raw):
            raise TypeError
        return tuple(operator.index(d) for d in raw)
    except TypeError:
        raise PacnetValueError(f"the shape of input {name!r} must be a sequence of ints, got "
                               f"{raw!r}",
                               hint=f"e.g. inputs={{'{name}': (1, 3, 224, 224)}}") from None


def infer_shapes(graph: Graph, input_shapes: Mapping[str, Shape]) -> Dict[BlobRef, Shape]:
    """Shape of every blob version; a located ShapeError at the first layer that does not fit.

    When the inputs are not the declared ones and the net builds at the declared ones, the
    error's hint names the layers that keep their output size whatever the input (fixed
    pooling bins, fixed resize targets): the net needs its declared size there."""
    shapes: Dict[BlobRef, Shape] = {}
    try:
        _infer_into(shapes, graph, input_shapes)
    except ShapeError as err:
        raise _explain_fixed_sizes(err, graph, input_shapes, shapes) from None
    return shapes


def _explain_fixed_sizes(err: ShapeError, graph: Graph, input_shapes: Mapping[str, Shape],
                         partial: Mapping[BlobRef, Shape]) -> ShapeError:
    try:
        declared = bind_inputs(graph)
        if declared == dict(input_shapes) or err.layer is None:
            return err
        reference: Dict[BlobRef, Shape] = {}
        _infer_into(reference, graph, declared)
    except PacnetError:
        return err  # the net does not build at its declared size either
    upstream = _ancestors(graph, err.layer)
    fixed = [n for n in graph.nodes if n.name in upstream and all(t in partial for t in n.outputs)
             and any(partial[b] != reference[b] for b in n.inputs)
             and all(partial[t] == reference[t] for t in n.outputs)]
    if not fixed:
        return err
    named = ", ".join(f"{n.name!r} ({n.type}{_line(n)})" for n in fixed[-3:])
    sizes = ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in declared.items())
    hint = (f"this net needs its declared input size ({sizes}): {named} give the same output "
            f"size whatever the input (fixed kernels or output sizes)")
    return ShapeError(err.message, location=err.location, layer=err.layer,
                      layer_type=err.layer_type, hint=hint)


def _line(node) -> str:
    loc = node.spec.location
    return f", line {loc.line}" if loc is not None and loc.line else ""


def _ancestors(graph: Graph, layer: str) -> set:
    """Names of the layers whose outputs reach ``layer`` (and ``layer`` itself)."""
    producer = {t: n for n in graph.nodes for t in n.outputs}
    todo = [n for n in graph.nodes if n.name == layer]
    seen = {layer}
    while todo:
        node = todo.pop()
        for b in node.inputs:
            up = producer.get(b)
            if up is not None and up.name not in seen:
                seen.add(up.name)
                todo.append(up)
    return seen


def _infer_into(shapes: Dict[BlobRef, Shape], graph: Graph,
                input_shapes: Mapping[str, Shape]) -> None:
    shapes.update({BlobRef(n): tuple(s) for n, s in input_shapes.items()})
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
