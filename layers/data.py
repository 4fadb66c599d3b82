"""Input and DummyData: layers with no bottoms whose tops have shapes fixed by parameters.

* ``Input`` (BVLC ``input_layer.cpp``) only declares graph inputs.  The compiler turns its
  tops into graph placeholders with the declared shapes; the layer has no computation.
* ``DummyData`` (BVLC ``dummy_data_layer.cpp``) produces blobs from fillers.  As in Caffe,
  blobs with a ``constant`` filler hold the same values on every forward, blobs with any
  other filler are refilled (in train and test alike).  The segaware ``xy`` filler
  (segaware.md §2.9) writes pixel coordinates: channel 0 = column index x, channel 1 =
  row index y, unnormalised.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from pacnet.errors import GraphError, PacnetError
from pacnet.layers.common import FILLER, fill_, filler_problem
from pacnet.registry import Layer, LayerSpec, Shape, register

_DIMS = {"type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 1}
_BLOB_SHAPE = {"anyOf": [
    _DIMS,
    {"type": "object", "properties": {"dim": {"anyOf": [_DIMS, {"type": "integer", "minimum": 1}]}},
     "required": ["dim"], "additionalProperties": False},
]}
SHAPES = {
    "description": "blob shape(s): one list of dims shared by every top, or one per top "
                   "([[1, 3, 500, 500]]; Caffe's {dim: [...]} form is accepted too)",
    "anyOf": [_BLOB_SHAPE, {"type": "array", "items": _BLOB_SHAPE, "minItems": 1}],
}
# Input shapes may also use symbolic dims (N, H, ...), bound at build time like `inputs:`.
_SYM_DIMS = {"type": "array", "minItems": 1, "items": {"anyOf": [
    {"type": "integer", "minimum": 1}, {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*$"}]}}
_SYM_BLOB_SHAPE = {"anyOf": [
    _SYM_DIMS,
    {"type": "object", "properties": {"dim": {"anyOf": [_SYM_DIMS, {"type": "integer", "minimum": 1}]}},
     "required": ["dim"], "additionalProperties": False},
]}
INPUT_SHAPES = {
    "description": "blob shape(s): one list of dims shared by every top, or one per top "
                   "([[N, 3, H, W]]; ints or symbolic dims bound at build time; Caffe's "
                   "{dim: [...]} form is accepted too)",
    "anyOf": [_SYM_BLOB_SHAPE, {"type": "array", "items": _SYM_BLOB_SHAPE, "minItems": 1}],
}


def _dims(value: Any) -> Tuple[int, ...]:
    if isinstance(value, dict):
        value = value["dim"]
    if isinstance(value, int):
        return (int(value),)
    return tuple(d if isinstance(d, str) else int(d) for d in value)


def blob_shapes(spec: LayerSpec, key: str = "shape") -> List[Tuple[int, ...]]:
    """The list of shapes written in ``spec[key]`` (one shape or a list of shapes)."""
    value = spec.get(key)
    if value is None:
        return []
    if isinstance(value, dict) or (isinstance(value, list) and value and isinstance(value[0], (int, str))):
        return [_dims(value)]
    return [_dims(v) for v in value]


def _n_tops(spec: LayerSpec) -> int:
    return max(1, len(spec.tops))


def _per_top(spec: LayerSpec, values: Sequence[Any], key: str, what: str) -> List[Any]:
    n = _n_tops(spec)
    if len(values) == 1:
        return list(values) * n
    if len(values) == n:
        return list(values)
    raise spec.error(f"give {what} once, or once per top ({n}); got {len(values)}", key=key,
                     hint=f"the layer has {n} top(s)")


# ----------------------------------------------------------------------------- Input


class InputPlaceholder(nn.Module):
    """Stands for an ``Input`` layer; never called (its tops are graph inputs)."""

    def __init__(self, error: PacnetError) -> None:
        super().__init__()
        self.error = error

    def forward(self, *args: Any) -> torch.Tensor:
        raise self.error


@register("Input")
class Input(Layer):
    """Declares graph inputs (Caffe ``Input``): no bottoms, no computation.

    Shapes: () -> one blob per top with the declared ``shape`` (one shape shared by every
    top, or one per top), e.g. ``shape: [[1, 3, 500, 500]]``.  The compiler makes each top a
    graph input (placeholder) with that shape, exactly like an entry of the net's
    ``inputs:`` section; ``infer()`` returns the declared shapes and ``build()`` is not
    used by the compiler (the module it returns raises a GraphError if called).
    """

    params = {"shape": INPUT_SHAPES}
    required = ("shape",)
    bottoms = (0, 0)
    tops = (1, None)

    def check(self, spec: LayerSpec) -> None:
        _per_top(spec, blob_shapes(spec), "shape", "shape")

    def infer(self, spec: LayerSpec, shapes: List[Shape]) -> List[Shape]:
        return _per_top(spec, blob_shapes(spec), "shape", "shape")

    def build(self, spec: LayerSpec, shapes: List[Shape]) -> nn.Module:
        tops = ", ".join(repr(t) for t in spec.tops) or "its tops"
        return InputPlaceholder(spec.error(
            f"an Input layer has no computation: {tops} are graph inputs", cls=GraphError,
            hint="pass the input tensors to the compiled net instead of calling this module"))

    def flops(self, spec: LayerSpec, shapes: List[Shape], out_shapes: List[Shape]) -> int:
        return 0


# ----------------------------------------------------------------------------- DummyData


def xy_grid(shape: Sequence[int]) -> torch.Tensor:
    """The segaware XY filler for an N x 2 x H x W blob: [x, y] pixel indices per image.

    Caffe's XYFiller writes image n > 0 at a wrong offset (``n*c*H*W`` with c the loop
    variable), so only image 0 is right there; here every image gets the coordinates.
    """
    n, c, h, w = (int(d) for d in shape)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                            indexing="ij")
    return torch.stack([xs, ys]).expand(n, 2, h, w).clone()


class DummyDataModule(nn.Module):
    """Produces the DummyData tops, filled on every call in the module's dtype (Caffe refills
    every forward unless the filler is 'constant', whose values are the same each time; a
    constant made in float32 and converted would not be exact in float64): random fillers
    draw from torch's global RNG.  The segaware ``xy`` grid (integers) is a buffer."""

    def __init__(self, shapes: Sequence[Shape], fillers: Sequence[Optional[Dict[str, Any]]]) -> None:
        super().__init__()
        self.shapes = [tuple(s) for s in shapes]
        self.fillers = [dict(f or {"type": "constant", "value": 0.0}) for f in fillers]
        # dtype/device anchor for the filled tops: follows module.to(...)
        self.register_buffer("anchor", torch.empty(0), persistent=False)
        for i, (shape, f) in enumerate(zip(self.shapes, self.fillers)):
            if f.get("type") == "xy":
                self.register_buffer(f"top{i}", xy_grid(shape).to(torch.get_default_dtype()),
                                     persistent=False)

    def forward(self):
        outs = []
        for i, shape in enumerate(self.shapes):
            if self.fillers[i].get("type") == "xy":
                outs.append(getattr(self, f"top{i}").clone())
            else:
                t = torch.empty(shape, dtype=self.anchor.dtype, device=self.anchor.device)
                outs.append(fill_(t, self.fillers[i]))
        return outs[0] if len(outs) == 1 else tuple(outs)

    def extra_repr(self) -> str:
        kinds = [f.get("type", "constant") for f in self.fillers]
        return f"shapes={self.shapes}, fillers={kinds}"


_LEGACY = ("num", "channels", "height", "width")
_INT_OR_LIST = {"anyOf": [{"type": "integer", "minimum": 1},
                          {"type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 1}]}


@register("DummyData")
class DummyData(Layer):
    """Blobs from fillers (Caffe ``DummyData``): no bottoms, one or more tops.

    Shapes: () -> one blob per top, from ``shape`` (one shared or one per top) or the
    legacy 4-D ``num``/``channels``/``height``/``width`` (each once or once per top).
    ``data_filler``: none (constant 0), one shared by every top, or one per top; constant
    blobs keep their values, the others are refilled on every forward, as in Caffe.  The
    ``xy`` filler needs N x 2 x H x W and gives channel 0 = x (column), 1 = y (row) for
    every image (Caffe's own filler gets images n > 0 wrong).
    """

    params = {
        "shape": SHAPES,
        "num": {**_INT_OR_LIST, "description": "legacy: N of each top (once or per top)"},
        "channels": {**_INT_OR_LIST, "description": "legacy: C of each top (once or per top)"},
        "height": {**_INT_OR_LIST, "description": "legacy: H of each top (once or per top)"},
        "width": {**_INT_OR_LIST, "description": "legacy: W of each top (once or per top)"},
        "data_filler": {"description": "filler(s): none = constant 0, one shared, or one per top",
                        "anyOf": [FILLER, {"type": "array", "items": FILLER}]},
    }
    bottoms = (0, 0)
    tops = (1, None)

    def _shapes(self, spec: LayerSpec) -> List[Tuple[int, ...]]:
        legacy = [k for k in _LEGACY if spec.get(k) is not None]
        if legacy and spec.get("shape") is not None:
            raise spec.error(f"give either shape or the legacy {'/'.join(_LEGACY)}, not both",
                             key="shape")
        if legacy:
            missing = [k for k in _LEGACY if spec.get(k) is None]
            if missing:
                raise spec.error(f"the legacy form needs all of num, channels, height, width; "
                                 f"missing {', '.join(missing)}", key=legacy[0],
                                 hint="or write shape: [[N, C, H, W]]")
            cols = []
            for k in _LEGACY:
                v = spec[k]
                cols.append(_per_top(spec, [v] if isinstance(v, int) else v, k, k))
            return [tuple(int(c[i]) for c in cols) for i in range(_n_tops(spec))]
        shapes = blob_shapes(spec)
        if not shapes:
            raise spec.error("DummyData needs shape (or num/channels/height/width)",
                             hint="e.g. shape: [[1, 2, 257, 257]]")
        return _per_top(spec, shapes, "shape", "shape")

    def _fillers(self, spec: LayerSpec) -> List[Optional[Dict[str, Any]]]:
        raw = spec.get("data_filler")
        if raw is None or raw == []:
            return [None] * _n_tops(spec)
        return _per_top(spec, [raw] if isinstance(raw, dict) else raw, "data_filler", "data_filler")

    def check(self, spec: LayerSpec) -> None:
        for i, (shape, f) in enumerate(zip(self._shapes(spec), self._fillers(spec))):
            problem = filler_problem(f, shape, allow_xy=True)
            if problem:
                raise spec.error(f"data_filler of top {i}: {problem}", key="data_filler")

    def infer(self, spec: LayerSpec, shapes: List[Shape]) -> List[Shape]:
        return self._shapes(spec)

    def build(self, spec: LayerSpec, shapes: List[Shape]) -> nn.Module:
        self.check(spec)
        return DummyDataModule(self._shapes(spec), self._fillers(spec))

    def flops(self, spec: LayerSpec, shapes: List[Shape], out_shapes: List[Shape]) -> int:
        return 0
