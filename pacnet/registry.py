"""The layer-type registry: one place that says what every layer type is.

A layer type is a subclass of :class:`Layer` registered with :func:`register`.  Like
Caffe's layer contract, the framework calls its hooks in a fixed order:

1. the JSON schema of its ``params`` validates the layer's own keys (defaults filled);
2. :meth:`Layer.check` does the semantic checks a schema cannot express;
3. :meth:`Layer.infer` maps bottom shapes to top shapes (pure; no tensors);
4. :meth:`Layer.build` returns the ``torch.nn.Module`` that computes it.

The module's ``forward(*bottoms)`` takes one tensor per bottom and returns one tensor
(one top) or a tuple with one tensor per top.  Its learnable blobs, in Caffe's blob
order, are the attributes named in :attr:`Layer.blobs`; the compiler shares them
across layers by ``param.name`` and applies ``lr_mult``/``decay_mult`` to them.

Example::

    @register("AbsVal")
    class AbsVal(Layer):
        \"\"\"y = |x|.  Shapes: any -> same.\"\"\"
        def infer(self, spec, shapes):
            return [shapes[0]]
        def build(self, spec, shapes):
            return Elementwise(torch.abs)
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple, Type

from pacnet.errors import Location, PacnetError, SchemaError, ShapeError, did_you_mean
from pacnet.frozen import FrozenDict

Shape = Tuple[int, ...]


@dataclass(frozen=True)
class LayerSpec:
    """One layer as the compiler hands it to its type: validated, defaults filled.

    ``params`` holds only the type's own parameters (Caffe's ``<type>_param`` fields,
    written flat).  ``locations`` maps a parameter key to where it was written, so
    :meth:`error` can point at the offending line.
    """

    name: str
    type: str
    params: Mapping[str, Any]
    bottoms: Tuple[str, ...] = ()
    tops: Tuple[str, ...] = ()
    phase: str = "test"
    location: Optional[Location] = None
    locations: Mapping[str, Location] = field(default_factory=FrozenDict)

    def __getitem__(self, key: str) -> Any:
        return self.params[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.params.get(key, default)

    def has(self, key: str) -> bool:
        """True when ``key`` was written by the user (not only filled as a default)."""
        return key in self.locations

    def error(self, message: str, *, key: Optional[str] = None, hint: Optional[str] = None,
              cls: Type[PacnetError] = SchemaError) -> PacnetError:
        """An error about this layer, located at ``key``'s line when known."""
        where = self.locations.get(key, self.location) if key else self.location
        return cls(message, location=where, layer=self.name, layer_type=self.type, hint=hint)

    def shape_error(self, message: str, *, hint: Optional[str] = None) -> PacnetError:
        return self.error(message, hint=hint, cls=ShapeError)


class NamedBySpec:
    """``name`` and ``type`` of a record that holds its layer's :class:`LayerSpec` as ``spec``."""

    spec: LayerSpec

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def type(self) -> str:
        return self.spec.type


class Layer:
    """Base class of every layer type.  Subclasses override the class attributes and hooks.

    Class attributes:
      ``params``: JSON-schema ``properties`` of the type's own parameters, each with a
        ``description`` and, where Caffe has one, a ``default``.
      ``required``: names of parameters that must be given.
      ``bottoms`` / ``tops``: allowed counts as ``(min, max)``; ``max`` None = unbounded.
      ``blobs``: attribute names of the learnable blobs of the built module, in Caffe order
        (what ``param:`` entries and ``.caffemodel`` blobs refer to by index).
      ``loss``: a loss layer (default ``loss_weight`` 1 on top 0; its tops may be omitted).
      ``caffe_params``: the Caffe ``*_param`` messages whose fields the type reads (the
        prototxt importer writes them flat; another type's message is ignored with a
        warning, as Caffe ignores it).  Empty: the type name in snake case
        (``InnerProduct`` -> ``inner_product_param``).  Loss layers also read ``loss_param``.
    """

    type: ClassVar[str] = ""
    params: ClassVar[Dict[str, dict]] = {}
    required: ClassVar[Tuple[str, ...]] = ()
    bottoms: ClassVar[Tuple[int, Optional[int]]] = (1, 1)
    tops: ClassVar[Tuple[int, Optional[int]]] = (1, 1)
    blobs: ClassVar[Tuple[str, ...]] = ()
    loss: ClassVar[bool] = False
    caffe_params: ClassVar[Tuple[str, ...]] = ()

    def check(self, spec: LayerSpec) -> None:
        """Semantic checks beyond the schema; raise ``spec.error(...)``."""

    def infer(self, spec: LayerSpec, shapes: List[Shape]) -> List[Shape]:
        """Top shapes from bottom shapes.  Must agree exactly with what ``build`` computes."""
        raise NotImplementedError(f"{type(self).__name__}.infer")

    def build(self, spec: LayerSpec, shapes: List[Shape]):
        """The ``torch.nn.Module`` computing this layer for bottoms of ``shapes``."""
        raise NotImplementedError(f"{type(self).__name__}.build")

    def flops(self, spec: LayerSpec, shapes: List[Shape], out_shapes: List[Shape]) -> int:
        """Multiply-adds counted as 2 FLOPs; default one FLOP per output element."""
        return sum(_numel(s) for s in out_shapes)

    def gradient_bottoms(self, spec: LayerSpec) -> Tuple[bool, ...]:
        """Per bottom: whether the built module passes a gradient into it.  False where a
        bottom is only read as labels, indices or a reference shape; the compiler's
        backward-need analysis (:mod:`pacnet.backward`) relies on it."""
        return (True,) * len(spec.bottoms)

    @classmethod
    def schema(cls) -> dict:
        """The JSON schema (Draft 2020-12) object for this type's own parameters."""
        return {
            "type": "object",
            "properties": dict(cls.params),
            "required": list(cls.required),
            "additionalProperties": False,
        }

    @classmethod
    def caffe_messages(cls) -> Tuple[str, ...]:
        """The ``*_param`` messages of a prototxt layer of this type that pacnet reads."""
        own = cls.caffe_params or (re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", cls.type).lower()
                                   + "_param",)
        return own + (("loss_param",) if cls.loss and "loss_param" not in own else ())

    @classmethod
    def doc(cls) -> str:
        return inspect.cleandoc(cls.__doc__ or "")


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


_REGISTRY: Dict[str, Layer] = {}
_ORIGIN: Dict[str, str] = {}


def register(type_name: str):
    """Class decorator: register a :class:`Layer` subclass under ``type_name``."""

    def deco(cls: Type[Layer]) -> Type[Layer]:
        origin = f"{cls.__module__}.{cls.__qualname__}"
        if type_name in _REGISTRY and _ORIGIN[type_name] != origin:
            raise RuntimeError(
                f"layer type {type_name!r} registered twice: first by {_ORIGIN[type_name]}, "
                f"again by {origin}")
        cls.type = type_name
        _REGISTRY[type_name] = cls()
        _ORIGIN[type_name] = origin
        return cls

    return deco


_loaded = False


def _load_builtin_layers() -> None:
    """Import every module of ``pacnet.layers`` once, so their types register themselves."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    import pacnet.layers as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"pacnet.layers.{info.name}")


def get(type_name: str, *, location: Optional[Location] = None,
        layer: Optional[str] = None) -> Layer:
    """The registered layer type ``type_name``; an unknown type is a located error."""
    _load_builtin_layers()
    try:
        return _REGISTRY[type_name]
    except KeyError:
        hint = did_you_mean(type_name, _REGISTRY) or "run 'pacnet layers' to list the known types"
        raise SchemaError(f"unknown layer type {type_name!r}", location=location, layer=layer,
                          hint=hint) from None


def types() -> Mapping[str, Layer]:
    """All registered layer types by name."""
    _load_builtin_layers()
    return MappingProxyType(_REGISTRY)
