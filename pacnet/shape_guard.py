"""Calls of a compiled net at input shapes other than the ones it was built for.

A layer's module is built for the shapes its bottoms had at build time.  Most modules do
not depend on them (a convolution computes the same thing at any size), but some do: a
``Crop`` to a fixed size, pooling bins turned into a kernel size, a resize to a size
computed from the input.  Called at another size, such a module would compute something
other than what the net file says, without a word.

:func:`check_input_shapes` decides, for new input shapes, whether the net as built computes
what the file says at those shapes: it infers every blob's shape (a located ``ShapeError``
where a layer does not fit), builds the layers' modules for them without allocating
anything (``device="meta"``) and compares each with the module the net holds: the same
type, the same plain attributes (sizes, strides, modes...), the same parameter and buffer
shapes.  Any difference is a :class:`~pacnet.errors.ShapeError` naming the layer and
saying to build the net for those shapes.  Verdicts are cached per input signature, so a
training loop pays once per distinct batch shape.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from torch import nn

from pacnet.errors import PacnetError, ShapeError

Shape = Tuple[int, ...]
Signature = Tuple[Tuple[str, Shape], ...]

# nn.Module's own bookkeeping (hooks, registries, the training flag): not a layer's config.
_MODULE_STATE = frozenset(vars(nn.Module())) | {"training"}
_CACHE_SIZE = 32


def _plain(value: Any) -> Any:
    """A comparable, hashable picture of an attribute value."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (tuple, list)):
        return tuple(_plain(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((str(k), _plain(v)) for k, v in value.items()))
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape))
    if isinstance(value, (torch.dtype, torch.device, torch.Size)):
        return str(value)
    return type(value).__qualname__


def module_config(module: nn.Module) -> Tuple[Any, ...]:
    """What a module computes, apart from the values of its parameters and buffers: per
    submodule its type, its plain attributes and the shapes of its tensors."""
    parts = []
    for name, m in module.named_modules():
        attrs = tuple(sorted((k, _plain(v)) for k, v in vars(m).items()
                             if k not in _MODULE_STATE and not k.startswith("_forward")))
        tensors = tuple(sorted((k, tuple(t.shape)) for k, t in
                               [*m._parameters.items(), *m._buffers.items()] if t is not None))
        parts.append((name, type(m).__qualname__, attrs, tensors))
    return tuple(parts)


def signature(net: nn.Module, args: Tuple[Any, ...], kwargs: Mapping[str, Any]
              ) -> Optional[Signature]:
    """The input shapes of a call, by input blob, or None when they cannot be read as
    plain sizes (symbolic shapes while tracing, arguments that are not tensors)."""
    from pacnet.codegen import _identifier

    names = list(net.inputs)
    values = dict(zip(names, args))
    by_keyword = {_identifier(name): name for name in names}
    for key, value in kwargs.items():
        values[by_keyword.get(key, key)] = value
    out = []
    for name in names:
        value = values.get(name)
        if not isinstance(value, torch.Tensor):
            return None
        dims = tuple(value.shape)
        if not all(type(d) is int for d in dims):
            return None
        out.append((name, dims))
    return tuple(out)


def check_input_shapes(net: nn.Module, shapes: Mapping[str, Shape]) -> None:
    """Raise a PacnetError unless ``net`` computes what its file says at input ``shapes``
    (input blob -> shape; inputs left out keep their build shapes)."""
    sig = tuple((name, tuple(int(d) for d in shapes.get(name, net.inputs[name])))
                for name in net.inputs)
    cache: Dict[Signature, Optional[PacnetError]] = net.__dict__.setdefault("_shape_verdicts", {})
    if sig not in cache:
        cache[sig] = _verdict(net, dict(sig))
        while len(cache) > _CACHE_SIZE:
            cache.pop(next(iter(cache)))
    if cache[sig] is not None:
        raise cache[sig]


def _verdict(net: nn.Module, shapes: Mapping[str, Shape]) -> Optional[PacnetError]:
    from pacnet.codegen import build_modules, module_name
    from pacnet.shapes import bind_inputs, infer_shapes

    graph = net.ir
    built = ", ".join(f"{n} {_fmt(s)}" for n, s in net.inputs.items())
    called = ", ".join(f"{n} {_fmt(s)}" for n, s in shapes.items() if s != net.inputs[n])
    how = "build the net for these shapes (pacnet.build(..., inputs={...}))"
    try:
        bound = bind_inputs(graph, shapes)
        blob_shapes = infer_shapes(graph, bound)
        with torch.device("meta"):
            modules = build_modules(graph, blob_shapes)
    except PacnetError as err:
        return type(err)(f"the net built for {built} was called with {called}: {err.message}",
                         location=err.location, layer=err.layer, layer_type=err.layer_type,
                         hint=err.hint)
    for node in graph.nodes:
        held = getattr(net, module_name(node.name))
        if module_config(held) != module_config(modules[node.name]):
            return ShapeError(f"the net was built for {built} and called with {called}: this "
                              f"layer was built for its bottoms' sizes then and would not "
                              f"compute what the net file says at these",
                              location=node.spec.location, layer=node.name,
                              layer_type=node.type, hint=how)
    return None


def _fmt(shape: Shape) -> str:
    return "x".join(str(d) for d in shape)


def guard_hook(net: nn.Module, args: Tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
    """Forward pre-hook of every Net: calls at the build shapes pass at once; other shapes
    go through :func:`check_input_shapes` (skipped while torch.compile or torch.export
    trace the net: they see the shapes they specialise on)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return None
    sig = signature(net, args, kwargs)
    if sig is None or all(shape == tuple(net.inputs[name]) for name, shape in sig):
        return None
    check_input_shapes(net, dict(sig))
    return None
