"""Normalisation and affine layers: BVLC ``BatchNorm``, ``Scale``, ``Bias`` and PSPNet's ``BN``.

Two BN flavours live in Caffe graphs and they differ in every detail that matters when
weights are imported (see the spec, section 5.2 and checklist item 5):

* BVLC ``BatchNorm`` (DeepLab, ResNet): no affine part (a ``Scale`` with ``bias_term``
  follows it), three blobs ``mean``, ``var`` and ``scale_factor``; the statistics used
  are ``blob / scale_factor`` (0 when ``scale_factor`` is 0); while training it accumulates
  ``scale_factor = maf * scale_factor + 1``, ``mean = batch_mean + maf * mean`` and
  ``var = m/(m-1) * batch_var + maf * var`` (m = elements per channel).
* PSPNet ``BN``: four blobs ``slope``, ``bias``, ``mean``, ``var`` (each 1 x C x 1 x 1) stored
  directly; ``stat = momentum * stat + (1 - momentum) * batch`` with the biased batch
  variance, so Caffe ``momentum: 0.95`` is PyTorch ``momentum=0.05``; ``frozen`` uses the
  stored statistics in both phases and freezes slope and bias.

Running statistics are buffers (not parameters), updated without autograd.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from pacnet.errors import ShapeError
from pacnet.layers.common import canonical_axis, fill_, filler, numel
from pacnet.registry import Layer, register


def _channel_view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """A per-channel vector as 1 x C x 1 x ... for broadcasting against an ndim-D blob."""
    return t.reshape((1, -1) + (1,) * (ndim - 2))


# ----------------------------------------------------------------------------- BatchNorm (BVLC)

class BatchNormModule(nn.Module):
    """BVLC BatchNorm.  ``use_global_stats`` None = follow ``self.training`` (Caffe's
    phase default): batch statistics while training, stored ones in eval mode."""

    def __init__(self, channels: int, use_global_stats: Optional[bool],
                 moving_average_fraction: float, eps: float):
        super().__init__()
        self.use_global_stats = use_global_stats
        self.moving_average_fraction = float(moving_average_fraction)
        self.eps = float(eps)
        # Caffe initialises all three blobs to 0 (the stats then read as 0 / 0 -> 0).
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("var", torch.zeros(channels))
        self.register_buffer("scale_factor", torch.zeros(1))

    def forward(self, x):
        global_stats = (not self.training) if self.use_global_stats is None else self.use_global_stats
        n = x.shape[0]
        c = x.shape[1] if x.dim() > 1 else 1
        flat = x.reshape(n, c, -1)
        if global_stats:
            sf = self.scale_factor[0]
            inv = torch.where(sf == 0, torch.zeros_like(sf), 1.0 / sf)
            mean, var = self.mean * inv, self.var * inv
            # One fused pass (inference hot path); same formula as below.
            y = F.batch_norm(flat, mean.to(x.dtype), var.to(x.dtype), None, None, False, 0.0, self.eps)
            return y.reshape(x.shape)
        else:
            mean = flat.mean(dim=(0, 2))
            var = (flat - mean[None, :, None]).pow(2).mean(dim=(0, 2))   # biased, as Caffe
            m = flat.shape[0] * flat.shape[2]
            correction = m / (m - 1) if m > 1 else 1.0
            maf = self.moving_average_fraction
            with torch.no_grad():
                self.scale_factor.mul_(maf).add_(1.0)
                self.mean.mul_(maf).add_(mean.detach().to(self.mean.dtype))
                self.var.mul_(maf).add_(var.detach().to(self.var.dtype), alpha=correction)
        y = (flat - mean[None, :, None]) / torch.sqrt(var[None, :, None] + self.eps)
        return y.reshape(x.shape)

    def extra_repr(self):
        return (f"use_global_stats={self.use_global_stats}, "
                f"moving_average_fraction={self.moving_average_fraction}, eps={self.eps}")


@register("BatchNorm")
class BatchNorm(Layer):
    """BVLC BatchNorm: y = (x - mean_c) / sqrt(var_c + eps), no affine part.

    Shapes: N x C x ... -> same (statistics per channel of axis 1 over all other axes).
    Blobs (buffers): ``mean`` (C,), ``var`` (C,), ``scale_factor`` (1,); the statistics
    used are ``mean / scale_factor`` and ``var / scale_factor`` (0 when the factor is 0).
    """

    params = {
        "use_global_stats": {
            "type": "boolean",
            "description": "use the stored statistics instead of the batch's; unset = true in "
                           "the test phase and false in train (follows the module's training flag)"},
        "moving_average_fraction": {
            "type": "number", "minimum": 0.0, "maximum": 1.0, "default": 0.999,
            "description": "decay of the accumulated statistics per training iteration"},
        "eps": {"type": "number", "minimum": 0.0, "default": 1e-5,
                "description": "added to the variance before the square root"},
    }
    blobs = ("mean", "var", "scale_factor")

    def infer(self, spec, shapes):
        if len(shapes[0]) < 1:
            raise spec.shape_error("needs a bottom with at least 1 axis")
        return [tuple(shapes[0])]

    def build(self, spec, shapes):
        shape = shapes[0]
        channels = shape[1] if len(shape) > 1 else 1
        return BatchNormModule(channels, spec.get("use_global_stats"),
                               spec["moving_average_fraction"], spec["eps"])

    def flops(self, spec, shapes, out_shapes):
        return 2 * numel(out_shapes[0])


# ----------------------------------------------------------------------------- Scale / Bias

def _affine_geometry(spec, shapes) -> Tuple[int, Tuple[int, ...]]:
    """(axis, shape of the scale/bias) for Caffe's Scale/Bias broadcast rule.

    With one bottom the blob covers ``num_axes`` axes of bottom 0 from ``axis`` (-1 = to the
    end); with two bottoms bottom 1 supplies it and must equal bottom 0's shape on the axes
    ``axis .. axis + bottom1.ndim``.  A scalar (0 axes) sets axis to 0, as Caffe does.
    """
    x = tuple(shapes[0])
    ndim = len(x)
    if len(shapes) > 1:
        s = tuple(shapes[1])
        if len(s) == 0:
            return 0, ()
        axis = canonical_axis(spec, int(spec["axis"]), ndim)
        if ndim < axis + len(s) or x[axis:axis + len(s)] != s:
            raise spec.shape_error(
                f"bottom 1 of shape {list(s)} does not match bottom 0 {list(x)} starting at axis {axis}",
                hint="bottom 1 must equal bottom 0's dims axis .. axis + its number of axes")
        return axis, s
    axis = canonical_axis(spec, int(spec["axis"]), ndim) if ndim else 0
    num_axes = int(spec["num_axes"])
    if num_axes == -1:
        blob = x[axis:]
    else:
        if ndim < axis + num_axes:
            raise spec.error(f"axis {axis} + num_axes {num_axes} exceeds the {ndim} axes of bottom 0",
                             key="num_axes", hint="lower num_axes or use -1 for all remaining axes",
                             cls=ShapeError)
        blob = x[axis:axis + num_axes]
    if len(blob) == 0:
        axis = 0
    return axis, tuple(blob)


def _view(t: torch.Tensor, axis: int, ndim: int) -> torch.Tensor:
    if t.dim() == 0:
        return t
    return t.reshape((1,) * axis + tuple(t.shape) + (1,) * (ndim - axis - t.dim()))


class ScaleModule(nn.Module):
    """y = x * scale (+ bias); scale is ``weight`` or the second bottom."""

    def __init__(self, axis: int, weight_shape: Optional[Sequence[int]], bias_shape: Optional[Sequence[int]],
                 weight_filler=None, bias_filler=None):
        super().__init__()
        self.axis = axis
        if weight_shape is None:
            self.register_parameter("weight", None)
        else:
            self.weight = nn.Parameter(fill_(torch.empty(tuple(weight_shape)), weight_filler))
        if bias_shape is None:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(fill_(torch.empty(tuple(bias_shape)), bias_filler))

    def forward(self, x, scale=None):
        s = self.weight if scale is None else scale
        y = x * _view(s, self.axis, x.dim())
        if self.bias is not None:
            y = y + _view(self.bias, self.axis, x.dim())
        return y

    def extra_repr(self):
        return f"axis={self.axis}"


class BiasModule(nn.Module):
    """y = x + bias; bias is ``bias`` or the second bottom."""

    def __init__(self, axis: int, bias_shape: Optional[Sequence[int]], bias_filler=None):
        super().__init__()
        self.axis = axis
        if bias_shape is None:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(fill_(torch.empty(tuple(bias_shape)), bias_filler))

    def forward(self, x, bias=None):
        b = self.bias if bias is None else bias
        return x + _view(b, self.axis, x.dim())

    def extra_repr(self):
        return f"axis={self.axis}"


_AXIS = {"type": "integer", "default": 1,
         "description": "first axis of bottom 0 the scale/bias applies to (negative counts from the end)"}
_NUM_AXES = {"type": "integer", "minimum": -1, "default": 1,
             "description": "number of axes the learned blob covers (0 = a scalar, -1 = all remaining); "
                            "ignored with a second bottom"}


@register("Scale")
class Scale(Layer):
    """y = x * s (+ b), s broadcast over the axes outside [axis, axis + num_axes).

    Shapes: bottom 0 any -> same; optional bottom 1 = the scale, whose shape must equal
    bottom 0's dims from ``axis`` on.  Blobs: ``weight`` (the learned scale; None with a
    second bottom), ``bias`` (with ``bias_term``; None otherwise).  Caffe numbers only the
    blobs a layer has, so with a second bottom and ``bias_term`` its blob 0 is the bias.
    """

    params = {
        "axis": _AXIS,
        "num_axes": _NUM_AXES,
        "filler": filler("initial scale (Caffe: constant 1 when not given)", "constant", value=1.0),
        "bias_term": {"type": "boolean", "default": False, "description": "also learn a bias of the scale's shape"},
        "bias_filler": filler("initial bias", "constant", value=0.0),
    }
    bottoms = (1, 2)
    blobs = ("weight", "bias")

    def infer(self, spec, shapes):
        _affine_geometry(spec, shapes)
        return [tuple(shapes[0])]

    def build(self, spec, shapes):
        axis, blob = _affine_geometry(spec, shapes)
        learned = len(shapes) == 1
        return ScaleModule(axis, blob if learned else None, blob if spec["bias_term"] else None,
                           spec["filler"], spec["bias_filler"])

    def flops(self, spec, shapes, out_shapes):
        return numel(out_shapes[0]) * (2 if spec["bias_term"] else 1)


@register("Bias")
class Bias(Layer):
    """y = x + b, b broadcast over the axes outside [axis, axis + num_axes).

    Shapes: bottom 0 any -> same; optional bottom 1 = the bias (shape = bottom 0's dims from
    ``axis`` on).  Blob: ``bias`` (absent, None, with a second bottom).
    """

    params = {
        "axis": _AXIS,
        "num_axes": _NUM_AXES,
        "filler": filler("initial bias", "constant", value=0.0),
    }
    bottoms = (1, 2)
    blobs = ("bias",)

    def infer(self, spec, shapes):
        _affine_geometry(spec, shapes)
        return [tuple(shapes[0])]

    def build(self, spec, shapes):
        axis, blob = _affine_geometry(spec, shapes)
        return BiasModule(axis, blob if len(shapes) == 1 else None, spec["filler"])


# ----------------------------------------------------------------------------- BN (PSPNet)

class BNModule(nn.Module):
    """PSPNet BN: y = slope * (x - mean) / sqrt(var + eps) + bias, per channel of axis 1."""

    def __init__(self, channels: int, momentum: float, eps: float, frozen: bool,
                 slope_filler=None, bias_filler=None):
        super().__init__()
        shape = (1, channels, 1, 1)
        self.momentum = float(momentum)
        self.eps = float(eps)
        self.frozen = bool(frozen)
        self.slope = nn.Parameter(fill_(torch.empty(shape), slope_filler), requires_grad=not frozen)
        self.bias = nn.Parameter(fill_(torch.empty(shape), bias_filler), requires_grad=not frozen)
        self.register_buffer("mean", torch.zeros(shape))
        # A frozen BN starts from var 1 (bn_layer.cpp), an unfrozen one from 0.
        self.register_buffer("var", torch.full(shape, 1.0 if frozen else 0.0))

    def forward(self, x):
        nd = x.dim()
        if self.frozen or not self.training:
            mean, var = _channel_view(self.mean, nd), _channel_view(self.var, nd)
        else:
            dims = [0] + list(range(2, nd))
            mean = x.mean(dim=dims, keepdim=True)
            var = (x - mean).pow(2).mean(dim=dims, keepdim=True)       # biased, as Caffe
            m = self.momentum
            with torch.no_grad():
                self.mean.mul_(m).add_(mean.detach().reshape(self.mean.shape).to(self.mean.dtype), alpha=1 - m)
                self.var.mul_(m).add_(var.detach().reshape(self.var.shape).to(self.var.dtype), alpha=1 - m)
        y = (x - mean) / torch.sqrt(var + self.eps)
        return y * _channel_view(self.slope, nd) + _channel_view(self.bias, nd)

    def extra_repr(self):
        return f"momentum={self.momentum}, eps={self.eps}, frozen={self.frozen}"


@register("BN")
class BN(Layer):
    """PSPNet's BN (bn_layer.cpp): y = slope * (x - mu) / sqrt(var + eps) + bias.

    mu/var are the stored statistics in the test phase (eval mode) or when ``frozen``, else
    the batch's (biased variance over N x H x W), accumulated as
    ``stat = momentum * stat + (1 - momentum) * batch``.  ``frozen`` also freezes slope and
    bias (``requires_grad`` False; Caffe forces their lr_mult to 0) and initialises var to 1.
    Shapes: N x C x ... -> same.  Blobs: ``slope``, ``bias`` (parameters), ``mean``, ``var``
    (buffers), each 1 x C x 1 x 1.
    """

    params = {
        "slope_filler": filler("initial slope (gamma); Caffe's default is constant 0, the PSPNet "
                               "files write constant 1", "constant", value=0.0),
        "bias_filler": filler("initial bias (beta)", "constant", value=0.0),
        "momentum": {"type": "number", "minimum": 0.0, "maximum": 1.0, "default": 0.9,
                     "description": "weight of the old statistic in the running average "
                                    "(Caffe's convention: 1 - PyTorch's momentum)"},
        "eps": {"type": "number", "minimum": 0.0, "default": 1e-5,
                "description": "added to the variance before the square root"},
        "frozen": {"type": "boolean", "default": False,
                   "description": "use the stored statistics in both phases and freeze slope and bias"},
        "engine": {"enum": ["DEFAULT", "CAFFE", "CUDNN"], "default": "DEFAULT",
                   "description": "Caffe's implementation choice; accepted and ignored"},
    }
    blobs = ("slope", "bias", "mean", "var")

    def infer(self, spec, shapes):
        if len(shapes[0]) < 2:
            raise spec.shape_error(f"needs a bottom with at least 2 axes (N x C x ...), got {list(shapes[0])}")
        return [tuple(shapes[0])]

    def build(self, spec, shapes):
        return BNModule(shapes[0][1], spec["momentum"], spec["eps"], spec["frozen"],
                        spec["slope_filler"], spec["bias_filler"])

    def flops(self, spec, shapes, out_shapes):
        return 4 * numel(out_shapes[0])
