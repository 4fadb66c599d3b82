"""Helpers for testing one layer type without the compiler.

Build a :class:`~pacnet.registry.LayerSpec` the way the compiler would hand it to a type
(params validated against the type's JSON schema, Caffe defaults filled in, the layer's
``check()`` run), then infer, build and run it::

    from layer_helpers import make_spec, run_layer, layer_error

    spec = make_spec("Convolution", num_output=8, kernel_size=3, pad=1)
    (y,) = run_layer(spec, torch.randn(2, 3, 5, 5, dtype=torch.float64))

    with layer_error("kernel_size"):          # a PacnetError naming layer 'l'
        make_spec("Convolution", num_output=8, kernel_size=0)

Stable API (other layer families' tests rely on it):

* ``make_spec(type_name, name="l", phase="test", n_bottoms=1, n_tops=1, **params)``
* ``defaults(type_name)`` -> the schema defaults of the type's params
* ``infer(spec, *shapes)`` -> list of top shapes
* ``build(spec, *shapes, dtype=None)`` -> the built ``nn.Module``
* ``run_layer(spec, *tensors, module=None)`` -> list of top tensors (asserts ``infer``)
* ``layer_error(match=None, layer="l", cls=PacnetError)`` -> ``pytest.raises`` context
* ``single_thread``: a module-scoped fixture; import it into a test module
  (``from layer_helpers import single_thread  # noqa: F401``) and that module runs with
  ``torch.set_num_threads(1)`` (restored after).  Tiny float64 ops are ~100x faster
  single-threaded on a loaded 2-core machine.

Every parameter a test passes to ``make_spec`` counts as "written by the user"
(``spec.has(key)`` is True, with a fake location ``<test>:<n>``); defaults do not.
"""

from __future__ import annotations

import contextlib
import copy
from types import MappingProxyType
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Type

import jsonschema
import pytest
import torch

from pacnet.errors import Location, PacnetError, SchemaError
from pacnet.registry import LayerSpec, get
from pacnet.schema import fill_defaults

Shape = Tuple[int, ...]

__all__ = ["make_spec", "defaults", "infer", "build", "run_layer", "layer_error",
           "bottom_names", "top_names", "single_thread"]


def defaults(type_name: str) -> Dict[str, Any]:
    """The ``default`` of every parameter of ``type_name`` that has one (deep copies)."""
    return fill_defaults({}, get(type_name).schema())


def rand(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A reproducible standard-normal tensor (its own generator: tests stay independent)."""
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed), dtype=dtype)


def bottom_names(n: int) -> Tuple[str, ...]:
    """The bottom blob names ``make_spec`` uses: ``("b0", "b1", ...)``."""
    return tuple(f"b{i}" for i in range(n))


def top_names(name: str, n: int) -> Tuple[str, ...]:
    """The top blob names ``make_spec`` uses: ``(name,)`` for one top, else ``name_0, ...``."""
    return (name,) if n == 1 else tuple(f"{name}_{i}" for i in range(n))


def _validate(type_name: str, name: str, params: Dict[str, Any], location: Location) -> None:
    layer = get(type_name)
    validator = jsonschema.Draft202012Validator(layer.schema())
    errors = sorted(validator.iter_errors(params), key=lambda e: list(e.absolute_path))
    if errors:
        err = errors[0]
        where = "/".join(str(p) for p in err.absolute_path) or "params"
        raise SchemaError(f"{where}: {err.message}", location=location, layer=name,
                          layer_type=type_name)


def make_spec(type_name: str, name: str = "l", phase: str = "test", n_bottoms: int = 1,
              n_tops: int = 1, *, _check: bool = True, **params: Any) -> LayerSpec:
    """A validated :class:`LayerSpec` of ``type_name`` with ``params`` plus schema defaults.

    ``params`` are validated with the type's JSON schema (a violation raises
    :class:`~pacnet.errors.SchemaError` naming the layer, as the compiler's validator
    does), the arity is checked against ``bottoms``/``tops``, and the type's ``check()``
    runs unless ``_check=False``.  Bottoms are named ``b0, b1, ...``; the top is ``name``
    (or ``name_0, name_1, ...`` when ``n_tops > 1``).
    """
    layer = get(type_name)
    location = Location("<test>", 1, 1)
    _validate(type_name, name, params, location)
    lo, hi = layer.bottoms
    if n_bottoms < lo or (hi is not None and n_bottoms > hi):
        raise SchemaError(f"takes {lo}..{hi if hi is not None else 'any'} bottoms, got {n_bottoms}",
                          location=location, layer=name, layer_type=type_name)
    lo, hi = layer.tops
    if n_tops < lo or (hi is not None and n_tops > hi):
        raise SchemaError(f"takes {lo}..{hi if hi is not None else 'any'} tops, got {n_tops}",
                          location=location, layer=name, layer_type=type_name)
    full = fill_defaults(copy.deepcopy(params), layer.schema())
    locations = {key: Location("<test>", i + 2, 5) for i, key in enumerate(params)}
    spec = LayerSpec(
        name=name,
        type=type_name,
        params=MappingProxyType(full),
        bottoms=bottom_names(n_bottoms),
        tops=top_names(name, n_tops),
        phase=phase,
        location=location,
        locations=MappingProxyType(locations),
    )
    if _check:
        layer.check(spec)
    return spec


def infer(spec: LayerSpec, *shapes: Sequence[int]) -> List[Shape]:
    """The type's ``infer()`` for bottoms of ``shapes``, as a list of tuples."""
    out = get(spec.type).infer(spec, [tuple(int(d) for d in s) for s in shapes])
    return [tuple(int(d) for d in s) for s in out]


def build(spec: LayerSpec, *shapes: Sequence[int],
          dtype: Optional[torch.dtype] = None) -> torch.nn.Module:
    """The type's module for bottoms of ``shapes``, converted to ``dtype`` when given."""
    module = get(spec.type).build(spec, [tuple(int(d) for d in s) for s in shapes])
    if not isinstance(module, torch.nn.Module):
        raise AssertionError(f"{spec.type}.build returned {type(module).__name__}, not a Module")
    if dtype is not None:
        module = module.to(dtype)
    return module


def run_layer(spec: LayerSpec, *tensors: torch.Tensor,
              module: Optional[torch.nn.Module] = None) -> List[torch.Tensor]:
    """Build (unless ``module`` is given) and run the layer; return its tops as a list.

    The module is converted to the dtype of the first floating-point bottom (so float64
    bottoms give a float64 computation).  Asserts that the number and shapes of the tops
    equal what ``infer()`` says.
    """
    shapes = [tuple(t.shape) for t in tensors]
    expected = infer(spec, *shapes)
    if module is None:
        dtype = next((t.dtype for t in tensors if t.is_floating_point()), None)
        module = build(spec, *shapes, dtype=dtype)
    out = module(*tensors)
    tops = list(out) if isinstance(out, (tuple, list)) else [out]
    assert len(tops) == len(expected), (
        f"{spec.type} returned {len(tops)} tops, infer() says {len(expected)}")
    for i, (t, s) in enumerate(zip(tops, expected)):
        assert tuple(t.shape) == s, f"{spec.type} top {i}: module gives {tuple(t.shape)}, infer() says {s}"
    return tops


@contextlib.contextmanager
def layer_error(match: Optional[str] = None, layer: str = "l",
                cls: Type[PacnetError] = PacnetError) -> Iterator[Any]:
    """``pytest.raises(cls, match=match)`` that also checks the error names ``layer``."""
    with pytest.raises(cls, match=match) as info:
        yield info
    err = info.value
    assert err.layer == layer, f"error does not name layer {layer!r}: {err}"
    assert f"layer '{layer}'" in str(err), str(err)


@pytest.fixture(scope="module", autouse=True)
def single_thread() -> Iterator[None]:
    """Run the importing test module with one torch thread (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
