"""Pieces shared by layer families: schema fragments, Caffe's spatial parameters, fillers.

Caffe writes spatial sizes three ways: ``kernel_size: 3`` (every spatial axis),
``kernel_size: [3, 5]`` / ``[3, 5, 5]`` (one per axis: Caffe's N-D convolution) or, in 2-D
only, ``kernel_h: 3  kernel_w: 5``.  The layers that take both 4-D (N x C x H x W) and 5-D
(N x C x D x H x W) bottoms learn the number of spatial axes from the bottom
(:func:`spatial_rank`) and resolve a parameter to one value per axis with :func:`spatial`;
:class:`ConvGeometry` holds a convolution's four of them.  :func:`spatial_pair` is the
2-D-only form.  Fillers follow ``include/caffe/filler.hpp`` exactly; note Caffe's default
filler is ``constant 0``, not PyTorch's Kaiming init.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple

import torch

from pacnet.errors import ShapeError
from pacnet.registry import LayerSpec

# ----------------------------------------------------------------------------- schema bits

#: The spatial axes of the blobs the N-D layers take, by their number (the spatial rank).
SPATIAL_AXES = {2: ("H", "W"), 3: ("D", "H", "W")}

POSITIVE_INT = {"type": "integer", "minimum": 1}
NON_NEGATIVE_INT = {"type": "integer", "minimum": 0}


def _int_or_list(description: str, minimum: int, default: Any, max_items: int) -> dict:
    item = {"type": "integer", "minimum": minimum}
    schema = {
        "description": description,
        "oneOf": [item, {"type": "array", "items": item, "minItems": 1, "maxItems": max_items}],
    }
    if default is not None:
        schema["default"] = default
    return schema


def int_or_pair(description: str, minimum: int = 0, default: Any = None) -> dict:
    """Schema of a Caffe spatial field: one int for both axes, or a list of one or two."""
    return _int_or_list(description, minimum, default, 2)


def int_or_list(description: str, minimum: int = 0, default: Any = None) -> dict:
    """Schema of a Caffe N-D spatial field (``kernel_size``, ``pad``, ``stride``,
    ``dilation``): one int for every spatial axis, or a list of one to three values.
    How many the bottom allows (1, or its number of spatial axes) is :func:`spatial`'s
    check, made once the bottom's shape is known."""
    return _int_or_list(description, minimum, default, max(SPATIAL_AXES))


def repeated(item: dict, description: str, default: Any = None) -> dict:
    """Schema of a Caffe ``repeated`` field: one value, or a list of them (prototxt writes
    a field given once as a single value).  Read it back with :func:`as_list`."""
    schema = {"description": description,
              "oneOf": [item, {"type": "array", "items": item}]}
    if default is not None:
        schema["default"] = default
    return schema


def as_list(value: Any) -> list:
    """A repeated field's values as a list (None -> [], a single value -> [value])."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


FILLER = {
    "description": "Caffe FillerParameter: how a blob is initialised",
    "type": "object",
    "properties": {
        "type": {"enum": ["constant", "gaussian", "uniform", "xavier", "msra", "bilinear",
                          "bilinear_diagonal", "positive_unitball", "xy"], "default": "constant",
                 "description": "bilinear: the upsampling kernel in every (out, in) slice (for "
                                "group = channels); bilinear_diagonal: the kernel in slices "
                                "[c, c] only, zeros elsewhere (a dense C x C upsampling "
                                "deconvolution that starts as per-channel bilinear)"},
        "value": {"type": "number", "default": 0.0},
        "min": {"type": "number", "default": 0.0},
        "max": {"type": "number", "default": 1.0},
        "mean": {"type": "number", "default": 0.0},
        "std": {"type": "number", "default": 1.0, "exclusiveMinimum": 0},
        "sparse": {"type": "integer", "default": -1},
        "variance_norm": {"enum": ["FAN_IN", "FAN_OUT", "AVERAGE"], "default": "FAN_IN"},
    },
    "additionalProperties": False,
}


def filler(description: str, default_type: str = "constant", **defaults: Any) -> dict:
    """A FILLER schema whose default is ``{type: default_type, **defaults}``."""
    schema = dict(FILLER)
    schema["description"] = description
    schema["default"] = {"type": default_type, **defaults}
    return schema


def blob_kind(rank: int) -> str:
    """``'4-D (N x C x H x W)'`` for spatial rank 2, ``'5-D (N x C x D x H x W)'`` for 3."""
    return f"{rank + 2}-D (N x C x {' x '.join(SPATIAL_AXES[rank])})"


def spatial_rank(spec: LayerSpec, shape: Sequence[int], what: str = "bottom",
                 ranks: Iterable[int] = (2, 3)) -> int:
    """The number of spatial axes of an N x C x [D x] H x W blob, one of ``ranks``; a blob
    of any other rank is the layer's :class:`~pacnet.errors.ShapeError`."""
    ranks = tuple(ranks)
    rank = len(shape) - 2
    if rank not in ranks:
        kinds = " or a ".join(blob_kind(r) for r in ranks)
        raise spec.shape_error(f"needs a {kinds} {what}, got shape {list(shape)}")
    return rank


def spatial(spec: LayerSpec, name: str, h_key: Optional[str], w_key: Optional[str],
            default: Optional[int], rank: Optional[int] = None) -> Tuple[int, ...]:
    """Caffe's spatial parameter ``name`` as one value per spatial axis.

    Written as one value for every axis, as one value per axis (the N-D form), or, in 2-D
    only, as ``h_key`` + ``w_key``; absent, it is ``default`` on every axis (None: the
    parameter is required).  With ``rank`` (2 or 3, from the bottom) the result has
    ``rank`` values and a form that does not fit the bottom is a located ShapeError saying
    which bottom it would fit.  With ``rank`` None (in ``check()``, before shapes are
    known) only the form is checked, and the values come back as written.
    """
    value = spec.get(name)
    has_hw = h_key is not None and (spec.get(h_key) is not None or spec.get(w_key) is not None)
    if value is not None and has_hw:
        raise spec.error(f"give either {name} or {h_key}/{w_key}, not both", key=name)
    if has_hw:
        if spec.get(h_key) is None or spec.get(w_key) is None:
            raise spec.error(f"{h_key} and {w_key} must be given together", key=h_key)
        if rank is not None and rank != 2:
            raise spec.error(f"{h_key}/{w_key} are for 2-D bottoms, but this bottom is "
                             f"{blob_kind(rank)}", key=h_key, cls=ShapeError,
                             hint=f"write {name}: [{', '.join(SPATIAL_AXES[rank]).lower()}] "
                                  "(or one value for every axis)")
        return int(spec[h_key]), int(spec[w_key])
    if value is None:
        if default is None:
            raise spec.error(f"{name} is required", key=name)
        values: Tuple[int, ...] = (default,)
    elif isinstance(value, int):
        values = (value,)
    else:
        values = tuple(int(v) for v in value)
    return values if rank is None else per_axis(spec, name, values, rank)


def per_axis(spec: LayerSpec, name: str, values: Sequence[Any], rank: int) -> Tuple[Any, ...]:
    """``values`` of parameter ``name`` (one for every axis, or one per axis) as ``rank``
    values; any other count is a ShapeError located at ``name`` that says which bottom
    that many values are for."""
    values = tuple(values)
    if len(values) == rank:
        return values
    if len(values) == 1:
        return values * rank
    fits = len(values) if len(values) in SPATIAL_AXES else None
    raise spec.error(
        f"{name} has {len(values)} values {list(values)}, but the bottom is {blob_kind(rank)} "
        f"with {rank} spatial axes", key=name, cls=ShapeError,
        hint=f"give one value for every axis or {rank} ([{', '.join(SPATIAL_AXES[rank]).lower()}])"
             + (f"; {len(values)} values are for a {blob_kind(fits)} bottom" if fits else ""))


def check_same_rank(spec: LayerSpec, shapes: Sequence[Sequence[int]]) -> None:
    """Bottoms that must have one number of axes: the first that differs from bottom 0 is
    a ShapeError naming both (a 4-D blob meeting a 5-D one, say)."""
    first = len(shapes[0])
    for i, shape in enumerate(shapes[1:], 1):
        if len(shape) != first:
            ranks = {first - 2, len(shape) - 2}
            hint = ("a 2-D branch (N x C x H x W) meets a 3-D one (N x C x D x H x W) here"
                    if ranks == set(SPATIAL_AXES) else None)
            raise spec.shape_error(f"bottom {i} of shape {list(shape)} ({len(shape)}-D) does not "
                                   f"match bottom 0 {list(shapes[0])} ({first}-D): the bottoms "
                                   "need the same number of axes", hint=hint)


def written_rank(spec: LayerSpec, forms: Sequence[Tuple[str, Optional[str], Optional[str]]]
                 ) -> Optional[int]:
    """The spatial rank the spatial parameters ``forms`` (``(name, h_key, w_key)``) imply as
    written: the length of their lists of two or more values (2 for the h/w keys), or None
    when each is one value.  Lists of different lengths are an error at the second one,
    before any bottom is known."""
    rank, first = None, None
    for name, h_key, w_key in forms:
        if spec.get(name) is None and (h_key is None or (spec.get(h_key) is None
                                                          and spec.get(w_key) is None)):
            continue
        values = spatial(spec, name, h_key, w_key, 0)
        if len(values) < 2:
            continue
        key = name if spec.get(name) is not None else h_key
        if rank is None:
            rank, first = len(values), key
        elif len(values) != rank:
            raise spec.error(f"{key} has {len(values)} values but {first} has {rank}", key=key,
                             hint="give every spatial parameter one value or one per spatial "
                                  "axis of the bottom")
    return rank


def spatial_pair(spec: LayerSpec, name: str, h_key: str, w_key: str,
                 default: Optional[int]) -> Tuple[int, int]:
    """Resolve Caffe's ``name`` / ``[h, w]`` / ``h_key`` + ``w_key`` forms to ``(h, w)``."""
    return spatial(spec, name, h_key, w_key, default, rank=2)


def conv_out(size: int, kernel: int, pad: int, stride: int, dilation: int = 1) -> int:
    """Caffe/PyTorch convolution output size: floor((in + 2p - d(k-1) - 1) / s) + 1."""
    return (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1


@dataclass(frozen=True)
class ConvGeometry:
    """A convolution's window over ``rank`` spatial axes, one value per axis each: Caffe's
    ConvolutionParameter geometry (``kernel_size``, ``pad``, ``stride``, ``dilation`` in
    any of their forms), PyTorch's ``ConvNd``/``ConvTransposeNd`` arguments."""

    kernel: Tuple[int, ...]
    pad: Tuple[int, ...]
    stride: Tuple[int, ...]
    dilation: Tuple[int, ...]

    #: The parameters as (name, h_key, w_key); Caffe has no dilation_h/dilation_w.
    FORMS = (("kernel_size", "kernel_h", "kernel_w"), ("pad", "pad_h", "pad_w"),
             ("stride", "stride_h", "stride_w"), ("dilation", None, None))

    @classmethod
    def of(cls, spec: LayerSpec, rank: int) -> "ConvGeometry":
        """The geometry of ``spec`` for a bottom of ``rank`` spatial axes (:func:`spatial`)."""
        return cls(*(spatial(spec, name, h, w, default, rank) for (name, h, w), default
                     in zip(cls.FORMS, (None, 0, 1, 1))))

    @classmethod
    def written_rank(cls, spec: LayerSpec) -> Optional[int]:
        """The rank the parameters imply as written (:func:`written_rank`), for ``check()``."""
        return written_rank(spec, cls.FORMS)

    @property
    def rank(self) -> int:
        return len(self.kernel)

    @property
    def effective(self) -> Tuple[int, ...]:
        """The dilated kernel extent E = d (k - 1) + 1 per axis."""
        return tuple(d * (k - 1) + 1 for k, d in zip(self.kernel, self.dilation))

    def out_size(self, sizes: Sequence[int]) -> Tuple[int, ...]:
        """Convolution output size per axis (:func:`conv_out`)."""
        return tuple(conv_out(n, k, p, s, d) for n, k, p, s, d in
                     zip(sizes, self.kernel, self.pad, self.stride, self.dilation))

    def transposed_out_size(self, sizes: Sequence[int],
                            output_pad: Optional[Sequence[int]] = None) -> Tuple[int, ...]:
        """Transposed-convolution output size per axis: s (in - 1) + E - 2p + output_pad."""
        output_pad = output_pad or (0,) * self.rank
        return tuple(s * (n - 1) + e - 2 * p + o for n, s, e, p, o in
                     zip(sizes, self.stride, self.effective, self.pad, output_pad))


def size_str(sizes: Sequence[int]) -> str:
    """Spatial sizes as ``'4x8x8'``."""
    return "x".join(str(int(n)) for n in sizes)


def numel(shape: Sequence[int]) -> int:
    return math.prod(int(d) for d in shape)


def canonical_axis(spec: LayerSpec, axis: int, ndim: int, key: str = "axis") -> int:
    """Caffe's ``CanonicalAxisIndex``: ``axis`` in ``[-ndim, ndim)`` -> ``[0, ndim)``.

    Out of range is a :class:`~pacnet.errors.ShapeError` located at ``key``.
    """
    if not -ndim <= axis < ndim:
        raise spec.error(f"{key} {axis} is out of range for a {ndim}-D bottom",
                         key=key, hint=f"use an axis in [{-ndim}, {ndim - 1}]", cls=ShapeError)
    return axis + ndim if axis < 0 else axis


# ----------------------------------------------------------------------------- fillers

def _fans(shape: Sequence[int]) -> Tuple[int, int]:
    count = numel(shape)
    fan_in = count // shape[0] if len(shape) > 0 and shape[0] else count
    fan_out = count // shape[1] if len(shape) > 1 and shape[1] else count
    return fan_in, fan_out


@torch.no_grad()
def fill_(tensor: torch.Tensor, spec: Optional[Dict[str, Any]],
          generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Fill ``tensor`` in place as Caffe's filler ``spec`` does (None = constant 0).

    ``xavier`` and ``msra`` take n from ``variance_norm`` (FAN_IN = count/shape[0],
    FAN_OUT = count/shape[1], AVERAGE = their mean); ``bilinear`` fills every
    (out, in) slice of a square 4-D blob with the same upsampling kernel;
    ``bilinear_diagonal`` only the slices ``[c, c]`` (zeros elsewhere), as
    fcn.berkeleyvision.org's ``surgery.interp`` initialises FCN's dense upscore layers.
    """
    if tensor.is_meta:  # nothing to fill (pacnet build compiles on the meta device)
        return tensor
    spec = dict(spec or {})
    kind = spec.get("type", "constant")
    # Draw in the blob's own precision (as Caffe does): float64 draws of a 40M-parameter net
    # cost seconds.
    draw = tensor.dtype if tensor.dtype.is_floating_point else torch.float64
    shape = tuple(tensor.shape)
    if kind == "constant":
        tensor.fill_(float(spec.get("value", 0.0)))
    elif kind == "uniform":
        lo, hi = float(spec.get("min", 0.0)), float(spec.get("max", 1.0))
        tensor.copy_(torch.rand(shape, generator=generator, dtype=draw) * (hi - lo) + lo)
    elif kind == "gaussian":
        mean, std = float(spec.get("mean", 0.0)), float(spec.get("std", 1.0))
        values = torch.randn(shape, generator=generator, dtype=draw) * std + mean
        sparse = int(spec.get("sparse", -1))
        if sparse >= 0 and len(shape) >= 2:
            # Caffe keeps each weight with probability sparse / num_outputs (shape[0]).
            non_zero_prob = min(1.0, sparse / shape[0])
            keep = torch.rand(shape, generator=generator, dtype=draw) < non_zero_prob
            values = values * keep
        tensor.copy_(values)
    elif kind in ("xavier", "msra"):
        fan_in, fan_out = _fans(shape)
        norm = spec.get("variance_norm", "FAN_IN")
        n = {"FAN_IN": fan_in, "FAN_OUT": fan_out, "AVERAGE": (fan_in + fan_out) / 2.0}[norm]
        if kind == "xavier":
            scale = math.sqrt(3.0 / n)
            values = (torch.rand(shape, generator=generator, dtype=draw) * 2 - 1) * scale
        else:
            values = torch.randn(shape, generator=generator, dtype=draw) * math.sqrt(2.0 / n)
        tensor.copy_(values)
    elif kind == "positive_unitball":
        values = torch.rand(shape, generator=generator, dtype=draw)
        rows = values.reshape(shape[0], -1) if len(shape) else values.reshape(1, -1)
        rows = rows / rows.sum(dim=1, keepdim=True)
        tensor.copy_(rows.reshape(shape))
    elif kind == "bilinear":
        if len(shape) != 4 or shape[2] != shape[3]:
            raise ValueError(f"bilinear filler needs a square 4-D blob, got {list(shape)}")
        tensor.copy_(bilinear_kernel(shape[2]).expand(shape))
    elif kind == "bilinear_diagonal":
        problem = filler_problem(spec, shape)
        if problem:
            raise ValueError(problem)
        tensor.zero_()
        kernel = bilinear_kernel(shape[2]).to(tensor.dtype)
        for c in range(shape[0]):
            tensor[c, c] = kernel
    elif kind == "xy":
        raise ValueError("the 'xy' filler fills data blobs (DummyData), not weights")
    else:
        raise ValueError(f"unknown filler type {kind!r}")
    return tensor


def filler_problem(spec: Optional[Dict[str, Any]], shape: Sequence[int],
                   allow_xy: bool = False) -> Optional[str]:
    """Why Caffe's filler ``spec`` cannot fill a blob of ``shape`` (None when it can).

    Mirrors the CHECKs of ``filler.hpp``: ``sparse`` only for gaussian, ``bilinear`` only
    for square 4-D blobs, ``uniform`` needs min <= max, ``xy`` only for data blobs
    (``allow_xy``) of shape N x 2 x H x W.
    """
    spec = dict(spec or {})
    kind = spec.get("type", "constant")
    shape = tuple(int(d) for d in shape)
    if kind != "gaussian" and int(spec.get("sparse", -1)) != -1:
        return f"'sparse' is only supported by the gaussian filler, not {kind!r}"
    if kind in ("bilinear", "bilinear_diagonal") and (len(shape) != 4 or shape[2] != shape[3]):
        return f"the {kind} filler needs a square 4-D blob, got shape {list(shape)}"
    if kind == "bilinear_diagonal" and shape[0] != shape[1]:
        return (f"the bilinear_diagonal filler needs as many inputs as outputs (a C x C x K x K "
                f"blob), got shape {list(shape)}")
    if kind == "uniform" and float(spec.get("min", 0.0)) > float(spec.get("max", 1.0)):
        return "the uniform filler needs min <= max"
    if kind == "xy":
        if not allow_xy:
            return "the 'xy' filler fills data blobs (DummyData), not learnable weights"
        if len(shape) != 4 or shape[1] != 2:
            return f"the 'xy' filler needs an N x 2 x H x W blob, got shape {list(shape)}"
    return None


def bilinear_kernel(size: int) -> torch.Tensor:
    """Caffe's bilinear upsampling kernel (size x size): f = ceil(K/2), c = (2f-1-f%2)/(2f).

    This ``c`` is the one in ``filler.hpp``; it equals (K-1)/(2f) for the kernel sizes
    Caffe documents (K = 2*factor - factor%2) and differs for the others (K=3 gives taps
    0.25, 0.75, 0.75).
    """
    f = math.ceil(size / 2.0)
    c = (2 * f - 1 - f % 2) / (2.0 * f)
    taps = torch.tensor([1 - abs(i / f - c) for i in range(size)], dtype=torch.float64)
    return taps[:, None] * taps[None, :]
