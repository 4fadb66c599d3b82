"""Pieces shared by layer families: schema fragments, Caffe's spatial parameters, fillers.

Caffe writes 2-D sizes three ways: ``kernel_size: 3``, ``kernel_size: [3, 5]`` (one per
axis) or ``kernel_h: 3  kernel_w: 5``.  :func:`spatial_pair` resolves all of them to
``(h, w)``.  Fillers follow ``include/caffe/filler.hpp`` exactly; note Caffe's default
filler is ``constant 0``, not PyTorch's Kaiming init.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from pacnet.errors import ShapeError
from pacnet.registry import LayerSpec

# ----------------------------------------------------------------------------- schema bits

POSITIVE_INT = {"type": "integer", "minimum": 1}
NON_NEGATIVE_INT = {"type": "integer", "minimum": 0}


def int_or_pair(description: str, minimum: int = 0, default: Any = None) -> dict:
    """Schema of a Caffe spatial field: one int for both axes, or a list of one or two."""
    item = {"type": "integer", "minimum": minimum}
    schema = {
        "description": description,
        "oneOf": [item, {"type": "array", "items": item, "minItems": 1, "maxItems": 2}],
    }
    if default is not None:
        schema["default"] = default
    return schema


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
                          "positive_unitball", "xy"], "default": "constant"},
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


def spatial_pair(spec: LayerSpec, name: str, h_key: str, w_key: str,
                 default: Optional[int]) -> Tuple[int, int]:
    """Resolve Caffe's ``name`` / ``[h, w]`` / ``h_key`` + ``w_key`` forms to ``(h, w)``."""
    value = spec.get(name)
    has_hw = spec.get(h_key) is not None or spec.get(w_key) is not None
    if value is not None and has_hw:
        raise spec.error(f"give either {name} or {h_key}/{w_key}, not both", key=name)
    if has_hw:
        if spec.get(h_key) is None or spec.get(w_key) is None:
            raise spec.error(f"{h_key} and {w_key} must be given together", key=h_key)
        return int(spec[h_key]), int(spec[w_key])
    if value is None:
        if default is None:
            raise spec.error(f"{name} is required", key=name)
        return default, default
    if isinstance(value, int):
        return value, value
    if len(value) == 1:
        return int(value[0]), int(value[0])
    return int(value[0]), int(value[1])


def conv_out(size: int, kernel: int, pad: int, stride: int, dilation: int = 1) -> int:
    """Caffe/PyTorch convolution output size: floor((in + 2p - d(k-1) - 1) / s) + 1."""
    return (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1


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
    (out, in) slice of a square 4-D blob with the same upsampling kernel.
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
    if kind == "bilinear" and (len(shape) != 4 or shape[2] != shape[3]):
        return f"the bilinear filler needs a square 4-D blob, got shape {list(shape)}"
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
