"""Blob plumbing: combine, split, reshape and reduce blobs; Softmax; the Non-local primitives.

Caffe types follow BVLC ``src/caffe/layers/*_layer.cpp`` (shape checks, legacy
``concat_dim``/``slice_dim``, Reshape's 0/-1 rule, ArgMax's output layout and tie order,
Eltwise MAX's gradient routing).  ``Permute`` (SSD's Caffe fork), ``MatMul`` and the
composite ``NonLocal2d`` (mmcv ``NonLocal2d`` semantics) are not in BVLC Caffe: the
Non-local block cannot be written with stock Caffe types (spec section 4).

Shapes that depend on the input (Reshape, Flatten) are recomputed from the actual input in
``forward`` with the same pure function ``infer`` uses, so a net can change its input
size between batches as Caffe's Reshape allows.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from pacnet.errors import ShapeError
from pacnet.layers.common import (as_list, canonical_axis, check_same_rank, fill_, filler, numel,
                                  repeated)
from pacnet.registry import Layer, register

Shape = Tuple[int, ...]

_ENGINE = {"enum": ["DEFAULT", "CAFFE", "CUDNN"], "default": "DEFAULT",
           "description": "Caffe's implementation choice; accepted and ignored"}


def _n_tops(spec, fallback: int = 1) -> int:
    return len(spec.tops) if spec.tops else fallback


def _fmt(shapes: Sequence[Sequence[int]]) -> str:
    return ", ".join(str(list(s)) for s in shapes)


class _Located:
    """Mixin for modules that may raise at run time: remembers the layer for the message."""

    def _locate(self, spec) -> None:
        self._layer_name, self._layer_type = spec.name, spec.type

    def _fail(self, message: str, hint: Optional[str] = None):
        return ShapeError(message, layer=self._layer_name, layer_type=self._layer_type, hint=hint)


# ----------------------------------------------------------------------------- Eltwise

class EltwiseModule(nn.Module):
    def __init__(self, operation: str, coeffs: Optional[List[float]]):
        super().__init__()
        self.operation = operation
        self.coeffs = coeffs

    def forward(self, *xs):
        if self.operation == "PROD":
            y = xs[0] * xs[1]
            for x in xs[2:]:
                y = y * x
            return y
        if self.operation == "MAX":
            # Caffe's routing: bottom 1 wins a tie with bottom 0; later bottoms only win when
            # strictly greater.  where() sends the whole gradient to the winner, as Caffe does.
            y = torch.where(xs[0] > xs[1], xs[0], xs[1])
            for x in xs[2:]:
                y = torch.where(x > y, x, y)
            return y
        if self.coeffs is None:
            y = xs[0] + xs[1]
            for x in xs[2:]:
                y = y + x
            return y
        y = xs[0] * self.coeffs[0]
        for c, x in zip(self.coeffs[1:], xs[1:]):
            y = y + x * c
        return y

    def extra_repr(self):
        return f"operation={self.operation}, coeffs={self.coeffs}"


@register("Eltwise")
class Eltwise(Layer):
    """Element-wise SUM (optionally weighted by ``coeff``), PROD or MAX of 2+ bottoms.

    Shapes: K bottoms of one identical shape -> that shape (no broadcasting, as Caffe).
    """

    params = {
        "operation": {"enum": ["PROD", "SUM", "MAX"], "default": "SUM",
                      "description": "element-wise operation"},
        "coeff": repeated({"type": "number"}, "SUM only: one weight per bottom (default all 1)"),
        "stable_prod_grad": {"type": "boolean", "default": True,
                             "description": "Caffe's PROD gradient variant; autograd's product rule is "
                                            "the stable one, so this is accepted and has no effect"},
    }
    bottoms = (2, None)

    def check(self, spec):
        coeff = as_list(spec.get("coeff"))
        if coeff and spec["operation"] != "SUM":
            raise spec.error(f"coeff is only allowed with operation SUM, not {spec['operation']}",
                             key="coeff", hint="remove coeff or use operation: SUM")
        if coeff and spec.bottoms and len(coeff) != len(spec.bottoms):
            raise spec.error(f"coeff has {len(coeff)} values for {len(spec.bottoms)} bottoms", key="coeff",
                             hint="give one coeff per bottom")

    def infer(self, spec, shapes):
        coeff = as_list(spec.get("coeff"))
        if coeff and len(coeff) != len(shapes):
            raise spec.error(f"coeff has {len(coeff)} values for {len(shapes)} bottoms", key="coeff",
                             hint="give one coeff per bottom")
        first = tuple(shapes[0])
        check_same_rank(spec, shapes)
        for i, s in enumerate(shapes[1:], 1):
            if tuple(s) != first:
                raise spec.shape_error(
                    f"bottoms must have identical shapes, got {_fmt(shapes)} (bottom {i} differs)",
                    hint="Eltwise does not broadcast; resize or crop the bottoms to one shape")
        return [first]

    def build(self, spec, shapes):
        coeff = [float(c) for c in as_list(spec.get("coeff"))]
        if coeff and all(c == 1.0 for c in coeff):
            coeff = []
        return EltwiseModule(spec["operation"], coeff or None)

    def flops(self, spec, shapes, out_shapes):
        per = 2 if as_list(spec.get("coeff")) else 1
        return per * (len(shapes) - 1) * numel(out_shapes[0])


# ----------------------------------------------------------------------------- Concat / Slice / Split

def _legacy_axis(spec, ndim: int, legacy_key: str) -> int:
    """``axis`` or its legacy non-negative spelling (``concat_dim`` / ``slice_dim``)."""
    legacy = spec.get(legacy_key)
    if legacy is not None:
        if legacy >= ndim:
            raise spec.error(f"{legacy_key} {legacy} is out of range for a {ndim}-D bottom",
                             key=legacy_key, cls=ShapeError)
        return int(legacy)
    return canonical_axis(spec, int(spec["axis"]), ndim)


def _check_axis_or_legacy(spec, legacy_key: str) -> None:
    if spec.get(legacy_key) is not None and spec.has("axis"):
        raise spec.error(f"give either axis or {legacy_key}, not both", key=legacy_key,
                         hint=f"{legacy_key} is the legacy spelling of axis; keep axis")


class ConcatModule(nn.Module):
    def __init__(self, axis: int):
        super().__init__()
        self.axis = axis

    def forward(self, *xs):
        if len(xs) == 1:
            return xs[0]
        return torch.cat(xs, dim=self.axis)

    def extra_repr(self):
        return f"axis={self.axis}"


@register("Concat")
class Concat(Layer):
    """Concatenate bottoms along ``axis``.

    Shapes: bottoms equal except on ``axis`` -> the sum of their ``axis`` dims there.
    """

    params = {
        "axis": {"type": "integer", "default": 1,
                 "description": "axis to concatenate along (negative counts from the end)"},
        "concat_dim": {"type": "integer", "minimum": 0,
                       "description": "legacy spelling of axis (non-negative only)"},
    }
    bottoms = (1, None)

    def check(self, spec):
        _check_axis_or_legacy(spec, "concat_dim")

    def infer(self, spec, shapes):
        first = tuple(shapes[0])
        check_same_rank(spec, shapes)
        axis = _legacy_axis(spec, len(first), "concat_dim")
        total = 0
        for i, s in enumerate(shapes):
            s = tuple(s)
            if len(s) != len(first) or s[:axis] != first[:axis] or s[axis + 1:] != first[axis + 1:]:
                raise spec.shape_error(
                    f"bottom {i} of shape {list(s)} does not match bottom 0 {list(first)} outside axis {axis}",
                    hint="all bottoms must agree on every axis except the concatenation axis")
            total += s[axis]
        return [first[:axis] + (total,) + first[axis + 1:]]

    def build(self, spec, shapes):
        return ConcatModule(_legacy_axis(spec, len(shapes[0]), "concat_dim"))

    def flops(self, spec, shapes, out_shapes):
        return 0


class SliceModule(nn.Module):
    def __init__(self, axis: int, sizes: Optional[List[int]], n_tops: int):
        super().__init__()
        self.axis, self.sizes, self.n_tops = axis, sizes, n_tops

    def forward(self, x):
        if self.n_tops == 1:
            return x
        sizes = self.sizes or [x.shape[self.axis] // self.n_tops] * self.n_tops
        return tuple(torch.split(x, sizes, dim=self.axis))

    def extra_repr(self):
        return f"axis={self.axis}, sizes={self.sizes}, n_tops={self.n_tops}"


@register("Slice")
class Slice(Layer):
    """Cut a blob along ``axis`` at ``slice_point`` s (or into equal parts, one per top).

    Shapes: ... x D x ... -> one top per piece, ... x d_i x ...
    """

    params = {
        "axis": {"type": "integer", "default": 1,
                 "description": "axis to slice along (negative counts from the end)"},
        "slice_dim": {"type": "integer", "minimum": 0, "description": "legacy spelling of axis (non-negative only)"},
        "slice_point": repeated({"type": "integer", "minimum": 1},
                                "indices where a new top starts (one fewer than tops); none = equal split"),
    }
    tops = (1, None)

    def check(self, spec):
        _check_axis_or_legacy(spec, "slice_dim")
        points = as_list(spec.get("slice_point"))
        if points:
            if spec.tops and len(points) != len(spec.tops) - 1:
                raise spec.error(f"{len(points)} slice_point(s) for {len(spec.tops)} tops", key="slice_point",
                                 hint="give one slice_point fewer than there are tops")
            if any(b <= a for a, b in zip(points, points[1:])):
                raise spec.error(f"slice_point must increase strictly, got {points}", key="slice_point")

    def _sizes(self, spec, shape: Shape) -> Tuple[int, List[int]]:
        axis = _legacy_axis(spec, len(shape), "slice_dim")
        dim = shape[axis]
        points = [int(p) for p in as_list(spec.get("slice_point"))]
        n = _n_tops(spec, len(points) + 1)
        if points:
            if len(points) != n - 1:
                raise spec.error(f"{len(points)} slice_point(s) for {n} tops", key="slice_point",
                                 hint="give one slice_point fewer than there are tops")
            if points[-1] >= dim or any(b <= a for a, b in zip([0] + points, points)):
                raise spec.error(f"slice_point {points} must increase strictly within (0, {dim}) "
                                 f"on axis {axis} of {list(shape)}", key="slice_point", cls=ShapeError)
            edges = [0] + points + [dim]
            return axis, [b - a for a, b in zip(edges, edges[1:])]
        if dim % n:
            raise spec.shape_error(f"{n} tops do not divide axis {axis} of size {dim} evenly",
                                   hint="give slice_point, or a number of tops dividing the axis")
        return axis, [dim // n] * n

    def infer(self, spec, shapes):
        shape = tuple(shapes[0])
        axis, sizes = self._sizes(spec, shape)
        return [shape[:axis] + (d,) + shape[axis + 1:] for d in sizes]

    def build(self, spec, shapes):
        axis, sizes = self._sizes(spec, tuple(shapes[0]))
        explicit = sizes if as_list(spec.get("slice_point")) else None
        return SliceModule(axis, explicit, len(sizes))

    def flops(self, spec, shapes, out_shapes):
        return 0


class SplitModule(nn.Module):
    def __init__(self, n_tops: int):
        super().__init__()
        self.n_tops = n_tops

    def forward(self, x):
        # Caffe's Split shares the data; autograd sums the gradients of the copies.
        return x if self.n_tops == 1 else tuple(x for _ in range(self.n_tops))


@register("Split")
class Split(Layer):
    """Hand the bottom to every top (gradients summed).  Shapes: S -> S, S, ... (one per top)."""

    tops = (1, None)

    def infer(self, spec, shapes):
        return [tuple(shapes[0])] * _n_tops(spec)

    def build(self, spec, shapes):
        return SplitModule(_n_tops(spec))

    def flops(self, spec, shapes, out_shapes):
        return 0


# ----------------------------------------------------------------------------- Tile

class TileModule(nn.Module):
    def __init__(self, axis: int, tiles: int):
        super().__init__()
        self.axis, self.tiles = axis, tiles

    def forward(self, x):
        reps = [1] * x.dim()
        reps[self.axis] = self.tiles
        return x.repeat(reps)

    def extra_repr(self):
        return f"axis={self.axis}, tiles={self.tiles}"


@register("Tile")
class Tile(Layer):
    """Repeat the whole blob ``tiles`` times along ``axis`` ([a b c] -> [a b c a b c]).

    Shapes: ... x D x ... -> ... x (tiles * D) x ...
    """

    params = {
        "axis": {"type": "integer", "default": 1, "description": "axis to repeat along"},
        "tiles": {"type": "integer", "minimum": 1, "description": "number of copies"},
    }
    required = ("tiles",)

    def infer(self, spec, shapes):
        shape = tuple(shapes[0])
        axis = canonical_axis(spec, int(spec["axis"]), len(shape))
        return [shape[:axis] + (shape[axis] * int(spec["tiles"]),) + shape[axis + 1:]]

    def build(self, spec, shapes):
        return TileModule(canonical_axis(spec, int(spec["axis"]), len(shapes[0])), int(spec["tiles"]))

    def flops(self, spec, shapes, out_shapes):
        return 0


# ----------------------------------------------------------------------------- Reshape / Flatten

def reshape_shape(dims: Sequence[int], axis: int, num_axes: int, shape: Shape) -> Shape:
    """Caffe's Reshape rule (reshape_layer.cpp); ValueError(message) when it does not fit.

    Axes ``[axis, axis + num_axes)`` of ``shape`` are replaced by ``dims``, where 0 copies
    the input dim at the same position and one -1 is inferred from the element count.
    """
    ndim = len(shape)
    start = axis if axis >= 0 else ndim + axis + 1
    if not 0 <= start <= ndim:
        raise ValueError(f"axis {axis} is out of range for a {ndim}-D bottom")
    end = ndim if num_axes == -1 else start + num_axes
    if end > ndim:
        raise ValueError(f"axis + num_axes = {end} exceeds the {ndim} axes of the bottom")
    top = list(shape[:start]) + list(dims) + list(shape[end:])
    inferred = None
    for i, d in enumerate(dims):
        if d == 0:
            if start + i >= ndim:
                raise ValueError(f"dim {i} is 0 (copy) but the bottom has no axis {start + i}")
            top[start + i] = shape[start + i]
        elif d == -1:
            inferred = start + i
    if inferred is not None:
        # lists, not generators: torch.compile traces this at every call
        known = math.prod([d for i, d in enumerate(top) if i != inferred])
        total = math.prod(shape)
        if known == 0 or total % known:
            raise ValueError(f"cannot infer the -1 dim: {total} elements are not divisible by {known}")
        top[inferred] = total // known
    if math.prod(top) != math.prod(shape):
        raise ValueError(f"{list(shape)} ({math.prod(shape)} elements) cannot become {top} "
                         f"({math.prod(top)} elements)")
    return tuple([int(d) for d in top])


def _reshape_dims(spec) -> List[int]:
    shape = spec["shape"]
    if isinstance(shape, dict):
        shape = shape.get("dim", [])
    return [int(d) for d in as_list(shape)]


class ReshapeModule(nn.Module, _Located):
    def __init__(self, spec, dims: List[int], axis: int, num_axes: int):
        super().__init__()
        self._locate(spec)
        self.dims, self.axis, self.num_axes = dims, axis, num_axes

    def forward(self, x):
        try:
            target = reshape_shape(self.dims, self.axis, self.num_axes, tuple(x.shape))
        except ValueError as e:
            raise self._fail(str(e)) from None
        return x.reshape(target)

    def extra_repr(self):
        return f"dims={self.dims}, axis={self.axis}, num_axes={self.num_axes}"


_DIM_LIST = {"type": "array", "items": {"type": "integer", "minimum": -1}}


@register("Reshape")
class Reshape(Layer):
    """Change a blob's shape without copying: ``shape`` replaces axes [axis, axis + num_axes).

    In ``shape``, 0 copies the bottom dim at that position and one -1 is inferred.  Shapes:
    e.g. N x C x H x W with shape [0, -1] -> N x (C*H*W); with axis 1, num_axes 1, shape
    [2, -1]: N x C x H x W -> N x 2 x C/2 x H x W.
    """

    params = {
        "shape": {"description": "the new dims (BlobShape): a list, or {dim: [...]} as in prototxt",
                  "oneOf": [{"type": "integer", "minimum": -1}, _DIM_LIST,
                            {"type": "object", "properties": {
                                "dim": {"oneOf": [{"type": "integer", "minimum": -1}, _DIM_LIST]}},
                             "additionalProperties": False}]},
        "axis": {"type": "integer", "default": 0,
                 "description": "first axis replaced; negative counts from the end (-1 = after the last)"},
        "num_axes": {"type": "integer", "minimum": -1, "default": -1,
                     "description": "number of axes replaced (-1 = all from axis on)"},
    }
    required = ("shape",)

    def check(self, spec):
        if _reshape_dims(spec).count(-1) > 1:
            raise spec.error("shape may contain at most one -1 (inferred) dim", key="shape")

    def infer(self, spec, shapes):
        try:
            return [reshape_shape(_reshape_dims(spec), int(spec["axis"]), int(spec["num_axes"]), tuple(shapes[0]))]
        except ValueError as e:
            raise spec.error(str(e), key="shape", cls=ShapeError,
                             hint="0 copies a bottom dim, -1 is inferred; the element count must not change") from None

    def build(self, spec, shapes):
        self.check(spec)
        return ReshapeModule(spec, _reshape_dims(spec), int(spec["axis"]), int(spec["num_axes"]))

    def flops(self, spec, shapes, out_shapes):
        return 0


def flatten_shape(axis: int, end_axis: int, shape: Shape) -> Shape:
    """Caffe's Flatten rule; ValueError(message) when the axes do not fit."""
    ndim = len(shape)
    for key, a in (("axis", axis), ("end_axis", end_axis)):
        if not -ndim <= a < ndim:
            raise ValueError(f"{key} {a} is out of range for a {ndim}-D bottom")
    start, end = axis % ndim, end_axis % ndim
    if end < start - 1:
        raise ValueError(f"end_axis {end_axis} comes before axis {axis}")
    return tuple(shape[:start]) + (math.prod(shape[start:end + 1]),) + tuple(shape[end + 1:])


class FlattenModule(nn.Module, _Located):
    def __init__(self, spec, axis: int, end_axis: int):
        super().__init__()
        self._locate(spec)
        self.axis, self.end_axis = axis, end_axis

    def forward(self, x):
        try:
            return x.reshape(flatten_shape(self.axis, self.end_axis, tuple(x.shape)))
        except ValueError as e:
            raise self._fail(str(e)) from None

    def extra_repr(self):
        return f"axis={self.axis}, end_axis={self.end_axis}"


@register("Flatten")
class Flatten(Layer):
    """Merge axes ``axis .. end_axis`` into one.  Shapes: N x C x H x W -> N x (C*H*W) by default."""

    params = {
        "axis": {"type": "integer", "default": 1, "description": "first axis merged"},
        "end_axis": {"type": "integer", "default": -1, "description": "last axis merged (-1 = the last)"},
    }

    def infer(self, spec, shapes):
        try:
            return [flatten_shape(int(spec["axis"]), int(spec["end_axis"]), tuple(shapes[0]))]
        except ValueError as e:
            raise spec.error(str(e), key="axis", cls=ShapeError) from None

    def build(self, spec, shapes):
        return FlattenModule(spec, int(spec["axis"]), int(spec["end_axis"]))

    def flops(self, spec, shapes, out_shapes):
        return 0


# ----------------------------------------------------------------------------- Silence

class SilenceModule(nn.Module):
    def forward(self, *xs):
        return ()


@register("Silence")
class Silence(Layer):
    """Consume bottoms so they are not net outputs; no tops.  Shapes: any -> nothing."""

    bottoms = (1, None)
    tops = (0, 0)

    def infer(self, spec, shapes):
        return []

    def build(self, spec, shapes):
        return SilenceModule()

    def flops(self, spec, shapes, out_shapes):
        return 0


# ----------------------------------------------------------------------------- Reduction

class ReductionModule(nn.Module):
    def __init__(self, operation: str, axis: int, coeff: float):
        super().__init__()
        self.operation, self.axis, self.coeff = operation, axis, float(coeff)

    def forward(self, x):
        flat = x.reshape(tuple(x.shape[:self.axis]) + (-1,))
        if self.operation == "ASUM":
            flat = flat.abs()
        elif self.operation == "SUMSQ":
            flat = flat * flat
        y = flat.mean(dim=-1) if self.operation == "MEAN" else flat.sum(dim=-1)
        return y * self.coeff if self.coeff != 1.0 else y

    def extra_repr(self):
        return f"operation={self.operation}, axis={self.axis}, coeff={self.coeff}"


@register("Reduction")
class Reduction(Layer):
    """Reduce all axes from ``axis`` on: SUM, ASUM (sum |x|), SUMSQ (sum x^2) or MEAN, times coeff.

    Shapes: d0 x ... x d(n-1) -> d0 x ... x d(axis-1) (axis 0 -> a 0-dim scalar).
    """

    params = {
        "operation": {"enum": ["SUM", "ASUM", "SUMSQ", "MEAN"], "default": "SUM",
                      "description": "reduction applied over the trailing axes"},
        "axis": {"type": "integer", "default": 0,
                 "description": "first reduced axis; all following axes are reduced too"},
        "coeff": {"type": "number", "default": 1.0, "description": "multiplies the result"},
    }

    def infer(self, spec, shapes):
        shape = tuple(shapes[0])
        return [shape[:canonical_axis(spec, int(spec["axis"]), len(shape))]]

    def build(self, spec, shapes):
        return ReductionModule(spec["operation"], canonical_axis(spec, int(spec["axis"]), len(shapes[0])),
                               spec["coeff"])

    def flops(self, spec, shapes, out_shapes):
        return 2 * numel(shapes[0])


# ----------------------------------------------------------------------------- ArgMax

def _sorted_desc(x: torch.Tensor, dim: int, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-k values and indices along ``dim``, ties ordered by the larger index first.

    That is the order of Caffe's ``std::partial_sort(..., std::greater<pair<value, index>>)``.
    """
    size = x.shape[dim]
    values, idx = torch.sort(x.flip(dim), dim=dim, descending=True, stable=True)
    values, idx = values.narrow(dim, 0, k), idx.narrow(dim, 0, k)
    return values, (size - 1) - idx


class ArgMaxModule(nn.Module):
    def __init__(self, top_k: int, out_max_val: bool, axis: Optional[int], out_shape: Shape):
        super().__init__()
        self.top_k, self.out_max_val, self.axis = top_k, out_max_val, axis
        self.extra_axes = len(out_shape) - 3 if axis is None else 0

    def forward(self, x):
        if self.axis is not None:
            values, idx = _sorted_desc(x, self.axis, self.top_k)
            return values if self.out_max_val else idx.to(x.dtype)
        values, idx = _sorted_desc(x.reshape(x.shape[0], -1), 1, self.top_k)
        idx = idx.to(x.dtype)
        y = torch.stack([idx, values], dim=1) if self.out_max_val else idx.unsqueeze(1)
        return y.reshape(tuple(y.shape) + (1,) * self.extra_axes)

    def extra_repr(self):
        return f"top_k={self.top_k}, out_max_val={self.out_max_val}, axis={self.axis}"


@register("ArgMax")
class ArgMax(Layer):
    """Indices (or values) of the top_k largest entries; ties go to the larger index (Caffe).

    With ``axis``: ... x D x ... -> ... x top_k x ... (indices, or values if ``out_max_val``).
    Without: N x ... -> N x 1 x top_k (x 1 ...) of indices, or N x 2 x top_k (x 1 ...) of
    [indices; values] if ``out_max_val`` (at least 3 axes, as Caffe).  Indices are floats.
    """

    caffe_params = ("argmax_param",)

    params = {
        "out_max_val": {"type": "boolean", "default": False,
                        "description": "output the values (with axis) or [indices; values] (without)"},
        "top_k": {"type": "integer", "minimum": 1, "default": 1, "description": "number of maxima per position"},
        "axis": {"type": "integer",
                 "description": "axis to search; unset = over all axes but the first"},
    }

    def _geometry(self, spec, shape: Shape) -> Tuple[Optional[int], Shape]:
        k = int(spec["top_k"])
        if spec.get("axis") is not None:
            axis = canonical_axis(spec, int(spec["axis"]), len(shape))
            if k > shape[axis]:
                raise spec.error(f"top_k {k} exceeds the {shape[axis]} entries of axis {axis}", key="top_k",
                                 cls=ShapeError)
            return axis, shape[:axis] + (k,) + shape[axis + 1:]
        count = math.prod(shape[1:])
        if k > count:
            raise spec.error(f"top_k {k} exceeds the {count} entries per item", key="top_k", cls=ShapeError)
        out = [1] * max(len(shape), 3)
        out[0], out[2] = shape[0], k
        if spec["out_max_val"]:
            out[1] = 2
        return None, tuple(out)

    def gradient_bottoms(self, spec):
        return (bool(spec["out_max_val"]),)  # indices carry no gradient

    def infer(self, spec, shapes):
        return [self._geometry(spec, tuple(shapes[0]))[1]]

    def build(self, spec, shapes):
        axis, out = self._geometry(spec, tuple(shapes[0]))
        return ArgMaxModule(int(spec["top_k"]), bool(spec["out_max_val"]), axis, out)

    def flops(self, spec, shapes, out_shapes):
        return numel(shapes[0])


# ----------------------------------------------------------------------------- Softmax

class SoftmaxModule(nn.Module):
    def __init__(self, axis: int):
        super().__init__()
        self.axis = axis

    def forward(self, x):
        return F.softmax(x, dim=self.axis)

    def extra_repr(self):
        return f"axis={self.axis}"


@register("Softmax")
class Softmax(Layer):
    """y = exp(x) / sum over ``axis`` of exp(x) (max-subtracted).  Shapes: any -> same."""

    params = {
        "axis": {"type": "integer", "default": 1, "description": "axis normalised over"},
        "engine": _ENGINE,
    }

    def infer(self, spec, shapes):
        canonical_axis(spec, int(spec["axis"]), len(shapes[0]))
        return [tuple(shapes[0])]

    def build(self, spec, shapes):
        return SoftmaxModule(canonical_axis(spec, int(spec["axis"]), len(shapes[0])))

    def flops(self, spec, shapes, out_shapes):
        return 5 * numel(out_shapes[0])


# ----------------------------------------------------------------------------- Permute / MatMul

class PermuteModule(nn.Module):
    def __init__(self, order: List[int]):
        super().__init__()
        self.order = order

    def forward(self, x):
        return x.permute(*self.order)

    def extra_repr(self):
        return f"order={self.order}"


@register("Permute")
class Permute(Layer):
    """Reorder axes (SSD Caffe's Permute): top axis i is bottom axis order[i].

    Axes left out of ``order`` follow in their original order.  Shapes: e.g. N x C x H x W
    with order [0, 2, 3, 1] -> N x H x W x C.
    """

    params = {
        "order": repeated({"type": "integer", "minimum": 0},
                          "new order of the axes; missing axes are appended in their original order"),
    }

    def check(self, spec):
        order = as_list(spec.get("order"))
        if len(set(order)) != len(order):
            raise spec.error(f"order has duplicate axes: {order}", key="order")

    def _order(self, spec, ndim: int) -> List[int]:
        order = [int(o) for o in as_list(spec.get("order"))]
        bad = [o for o in order if o >= ndim]
        if bad:
            raise spec.error(f"order {order} names axis {bad[0]} of a {ndim}-D bottom", key="order",
                             cls=ShapeError)
        return order + [i for i in range(ndim) if i not in order]

    def infer(self, spec, shapes):
        shape = tuple(shapes[0])
        return [tuple(shape[o] for o in self._order(spec, len(shape)))]

    def build(self, spec, shapes):
        self.check(spec)
        return PermuteModule(self._order(spec, len(shapes[0])))

    def flops(self, spec, shapes, out_shapes):
        return 0


class MatMulModule(nn.Module):
    def __init__(self, transpose_a: bool, transpose_b: bool):
        super().__init__()
        self.transpose_a, self.transpose_b = transpose_a, transpose_b

    def forward(self, a, b):
        if self.transpose_a:
            a = a.transpose(-1, -2)
        if self.transpose_b:
            b = b.transpose(-1, -2)
        return torch.matmul(a, b)

    def extra_repr(self):
        return f"transpose_a={self.transpose_a}, transpose_b={self.transpose_b}"


@register("MatMul")
class MatMul(Layer):
    """Batched matrix product of the last two axes: C = op(A) @ op(B), op = transpose if asked.

    Shapes: A ... x M x K, B ... x K x N -> ... x M x N; the leading (batch) axes broadcast
    as in NumPy.  Not a BVLC type (the Non-local block needs it).
    """

    params = {
        "transpose_a": {"type": "boolean", "default": False, "description": "use A's last two axes swapped"},
        "transpose_b": {"type": "boolean", "default": False, "description": "use B's last two axes swapped"},
    }
    bottoms = (2, 2)

    def _dims(self, spec, shapes):
        a, b = tuple(shapes[0]), tuple(shapes[1])
        if len(a) < 2 or len(b) < 2:
            raise spec.shape_error(f"both bottoms need at least 2 axes, got {_fmt(shapes)}")
        m, k = (a[-1], a[-2]) if spec["transpose_a"] else (a[-2], a[-1])
        k2, n = (b[-1], b[-2]) if spec["transpose_b"] else (b[-2], b[-1])
        if k != k2:
            raise spec.shape_error(
                f"inner dims differ: A {list(a)} gives K={k}, B {list(b)} gives K={k2}",
                hint="check transpose_a / transpose_b")
        try:
            batch = tuple(torch.broadcast_shapes(a[:-2], b[:-2]))
        except RuntimeError:
            raise spec.shape_error(f"batch axes {list(a[:-2])} and {list(b[:-2])} do not broadcast") from None
        return batch, m, k, n

    def infer(self, spec, shapes):
        batch, m, _, n = self._dims(spec, shapes)
        return [batch + (m, n)]

    def build(self, spec, shapes):
        self._dims(spec, shapes)
        return MatMulModule(bool(spec["transpose_a"]), bool(spec["transpose_b"]))

    def flops(self, spec, shapes, out_shapes):
        batch, m, k, n = self._dims(spec, shapes)
        return 2 * numel(batch) * m * k * n


# ----------------------------------------------------------------------------- NonLocal2d

NL_MODES = ("embedded_gaussian", "gaussian", "dot_product", "concatenation")
_MSRA_FAN_OUT = {"type": "msra", "variance_norm": "FAN_OUT"}


def _conv1x1(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return F.conv2d(x, weight, bias)


class NonLocal2dModule(nn.Module):
    """mmcv ``NonLocal2d`` as one module; parameters are flat attributes (see NonLocal2d)."""

    def __init__(self, channels: int, inter: int, mode: str, use_scale: bool, sub_sample: bool,
                 zeros_init: bool, norm: bool, weight_filler, concat_filler):
        super().__init__()
        self.channels, self.inter, self.mode = channels, inter, mode
        self.use_scale, self.sub_sample, self.norm = use_scale, sub_sample, norm

        def conv(name, c_out, c_in, weight_spec, bias=True):
            setattr(self, f"{name}_weight", nn.Parameter(fill_(torch.empty(c_out, c_in, 1, 1), weight_spec)))
            if bias:
                setattr(self, f"{name}_bias", nn.Parameter(torch.zeros(c_out)))
            else:
                self.register_parameter(f"{name}_bias", None)

        # Registration order = mmcv's state_dict order (g, conv_out, theta, phi, concat_project).
        conv("g", inter, channels, weight_filler)
        if norm:
            # mmcv ConvModule with a norm: no conv bias, Kaiming (fan_out) conv init, and
            # zeros_init zeroes the norm's gamma instead of the conv.
            conv("out", channels, inter, _MSRA_FAN_OUT, bias=False)
            gamma = {"type": "constant", "value": 0.0} if zeros_init else weight_filler
            self.out_bn_weight = nn.Parameter(fill_(torch.empty(channels), gamma))
            self.out_bn_bias = nn.Parameter(torch.zeros(channels))
            self.register_buffer("out_bn_mean", torch.zeros(channels))
            self.register_buffer("out_bn_var", torch.ones(channels))
        else:
            conv("out", channels, inter, {"type": "constant", "value": 0.0} if zeros_init else weight_filler)
            self.register_parameter("out_bn_weight", None)
            self.register_parameter("out_bn_bias", None)
            self.register_buffer("out_bn_mean", None)
            self.register_buffer("out_bn_var", None)
        if mode != "gaussian":
            conv("theta", inter, channels, weight_filler)
            conv("phi", inter, channels, weight_filler)
        else:
            for name in ("theta_weight", "theta_bias", "phi_weight", "phi_bias"):
                self.register_parameter(name, None)
        if mode == "concatenation":
            self.concat_weight = nn.Parameter(fill_(torch.empty(1, 2 * inter, 1, 1), concat_filler))
        else:
            self.register_parameter("concat_weight", None)

    def _pool(self, t: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(t, 2) if self.sub_sample else t

    def forward(self, x):
        n, c, h, w = x.shape
        g_x = self._pool(_conv1x1(x, self.g_weight, self.g_bias)).reshape(n, self.inter, -1).transpose(1, 2)
        if self.mode == "gaussian":
            theta_x = x.reshape(n, c, -1).transpose(1, 2)                   # N x Lq x C
            phi_x = self._pool(x).reshape(n, c, -1)                         # N x C x Lk
            pairwise = torch.softmax(torch.matmul(theta_x, phi_x), dim=-1)
        else:
            theta = _conv1x1(x, self.theta_weight, self.theta_bias).reshape(n, self.inter, -1)
            phi = self._pool(_conv1x1(x, self.phi_weight, self.phi_bias)).reshape(n, self.inter, -1)
            if self.mode == "concatenation":
                # relu(w . [theta_i; phi_j]) = relu(w_theta . theta_i + w_phi . phi_j): the 1x1
                # concat_project conv without materialising N x 2C' x Lq x Lk.
                w_cat = self.concat_weight.reshape(2, self.inter)
                a = torch.einsum("c,ncl->nl", w_cat[0], theta)
                b = torch.einsum("c,ncl->nl", w_cat[1], phi)
                pairwise = F.relu(a[:, :, None] + b[:, None, :]) / phi.shape[-1]
            else:
                pairwise = torch.matmul(theta.transpose(1, 2), phi)         # N x Lq x Lk
                if self.mode == "embedded_gaussian":
                    if self.use_scale:
                        pairwise = pairwise / math.sqrt(self.inter)
                    pairwise = torch.softmax(pairwise, dim=-1)
                else:                                                       # dot_product
                    pairwise = pairwise / pairwise.shape[-1]
        y = torch.matmul(pairwise, g_x).transpose(1, 2).reshape(n, self.inter, h, w)
        out = _conv1x1(y, self.out_weight, self.out_bias)
        if self.norm:
            out = F.batch_norm(out, self.out_bn_mean, self.out_bn_var, self.out_bn_weight, self.out_bn_bias,
                               training=self.training, momentum=0.1, eps=1e-5)
        return x + out

    def extra_repr(self):
        return (f"channels={self.channels}, inter={self.inter}, mode={self.mode}, use_scale={self.use_scale}, "
                f"sub_sample={self.sub_sample}, norm={self.norm}")


@register("NonLocal2d")
class NonLocal2d(Layer):
    """Non-local block (Wang et al. 2018) with mmcv ``NonLocal2d`` semantics: x + W_z(y).

    y_i = sum_j f(theta_i, phi_j) g_j with C' = C // reduction; modes (f):
    ``embedded_gaussian`` softmax_j(theta_i . phi_j / sqrt(C') if use_scale),
    ``gaussian`` softmax_j(x_i . x_j) (no theta/phi convs, no scale),
    ``dot_product`` theta_i . phi_j / L_k, ``concatenation`` relu(w . [theta_i; phi_j]) / L_k.
    ``sub_sample`` max-pools (2x2) g and phi (x itself for gaussian).

    Shapes: N x C x H x W -> same.  Blobs (mmcv state_dict order; absent ones are None):
    ``g_weight`` (C' x C x 1 x 1), ``g_bias`` (C'), ``out_weight`` (C x C' x 1 x 1),
    ``out_bias`` (C; absent with ``norm``), ``out_bn_weight``, ``out_bn_bias`` (C; only with
    ``norm``), ``theta_weight``, ``theta_bias``, ``phi_weight``, ``phi_bias`` (not in
    gaussian mode), ``concat_weight`` (1 x 2C' x 1 x 1; concatenation only), then the
    buffers ``out_bn_mean``, ``out_bn_var`` (only with ``norm``).
    """

    params = {
        "mode": {"enum": list(NL_MODES), "default": "embedded_gaussian",
                 "description": "pairwise function f"},
        "reduction": {"type": "integer", "minimum": 1, "default": 2,
                      "description": "inner channels C' = C // reduction"},
        "use_scale": {"type": "boolean", "default": True,
                      "description": "embedded_gaussian only: divide theta . phi by sqrt(C')"},
        "sub_sample": {"type": "boolean", "default": False,
                       "description": "max-pool 2x2 the keys/values (g and phi)"},
        "zeros_init": {"type": "boolean", "default": True,
                       "description": "start as identity: zero the output conv (or its norm's gamma)"},
        "norm": {"type": "boolean", "default": False,
                 "description": "mmcv norm_cfg: a BatchNorm2d (PyTorch semantics, eps 1e-5, momentum 0.1) "
                                "after the output conv, which then has no bias (mmseg NLHead uses it)"},
        "weight_filler": filler("init of the g/theta/phi convs (and of the output conv or gamma "
                                "without zeros_init)", "gaussian", std=0.01),
        "concat_filler": filler("init of the concatenation projection (1 x 2C' x 1 x 1)", "msra",
                                variance_norm="FAN_OUT"),
    }
    blobs = ("g_weight", "g_bias", "out_weight", "out_bias", "out_bn_weight", "out_bn_bias",
             "theta_weight", "theta_bias", "phi_weight", "phi_bias", "concat_weight",
             "out_bn_mean", "out_bn_var")

    def _inter(self, spec, shape: Shape) -> int:
        if len(shape) != 4:
            raise spec.shape_error(f"needs an N x C x H x W bottom, got {list(shape)}")
        inter = shape[1] // int(spec["reduction"])
        if inter < 1:
            raise spec.error(f"reduction {spec['reduction']} leaves no inner channels for C = {shape[1]}",
                             key="reduction", cls=ShapeError, hint="use reduction <= C")
        if spec["sub_sample"] and (shape[2] < 2 or shape[3] < 2):
            raise spec.shape_error(f"sub_sample pools 2x2 and needs H, W >= 2, got {list(shape)}")
        return inter

    def infer(self, spec, shapes):
        self._inter(spec, tuple(shapes[0]))
        return [tuple(shapes[0])]

    def build(self, spec, shapes):
        shape = tuple(shapes[0])
        return NonLocal2dModule(shape[1], self._inter(spec, shape), spec["mode"], bool(spec["use_scale"]),
                                bool(spec["sub_sample"]), bool(spec["zeros_init"]), bool(spec["norm"]),
                                spec["weight_filler"], spec["concat_filler"])

    def flops(self, spec, shapes, out_shapes):
        n, c, h, w = shapes[0]
        inter = self._inter(spec, tuple(shapes[0]))
        lq = h * w
        lk = (h // 2) * (w // 2) if spec["sub_sample"] else lq
        mode = spec["mode"]
        convs = 2 * n * lq * c * inter * (1 if mode == "gaussian" else 3)      # g, theta, phi
        convs += 2 * n * lq * inter * c                                        # output conv
        d = c if mode == "gaussian" else inter
        affinity = 2 * n * lq * lk * (d if mode != "concatenation" else 2)
        return convs + affinity + 2 * n * lq * lk * inter + n * lq * c
