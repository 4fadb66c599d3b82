"""Element-wise activations and Dropout, with Caffe's parameters and numerics.

Every type here maps a blob to a blob of the same shape.  The formulas follow BVLC
``src/caffe/layers/{relu,prelu,sigmoid,tanh,absval,power,exp,log,dropout}_layer.cpp``,
including their special cases (Power with ``scale`` or ``power`` 0 is a constant,
``base: -1`` means e, PReLU's gradient at 0 takes the negative slope).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pacnet.layers.common import fill_, filler, numel
from pacnet.registry import Layer, register

_ENGINE = {"enum": ["DEFAULT", "CAFFE", "CUDNN"], "default": "DEFAULT",
           "description": "Caffe's implementation choice; accepted and ignored (one implementation)"}


class _SameShape(Layer):
    """Shared shape rule: one bottom of any shape -> one top of the same shape."""

    def infer(self, spec, shapes):
        return [tuple(shapes[0])]


# ----------------------------------------------------------------------------- ReLU

class ReLUModule(nn.Module):
    def __init__(self, negative_slope: float = 0.0):
        super().__init__()
        self.negative_slope = float(negative_slope)

    def forward(self, x):
        if self.negative_slope == 0.0:
            return F.relu(x)
        # Caffe: max(x, 0) + slope * min(x, 0); gradient slope for x <= 0.
        return F.leaky_relu(x, self.negative_slope)

    def extra_repr(self):
        return f"negative_slope={self.negative_slope}"


@register("ReLU")
class ReLU(_SameShape):
    """y = max(x, 0) + negative_slope * min(x, 0) (leaky when negative_slope != 0).

    Shapes: any -> same.
    """

    caffe_params = ("relu_param",)

    params = {
        "negative_slope": {"type": "number", "default": 0.0,
                           "description": "slope for x < 0 (0 = plain ReLU)"},
        "engine": _ENGINE,
    }

    def build(self, spec, shapes):
        return ReLUModule(spec["negative_slope"])


# ----------------------------------------------------------------------------- PReLU

class PReLUModule(nn.Module):
    def __init__(self, channels: int, channel_shared: bool, weight_filler):
        super().__init__()
        # Caffe's blob: a scalar (shape ()) when shared, one slope per channel otherwise.
        shape = () if channel_shared else (channels,)
        self.weight = nn.Parameter(fill_(torch.empty(shape), weight_filler))
        self.channel_shared = channel_shared

    def forward(self, x):
        w = self.weight
        if not self.channel_shared:
            w = w.reshape((1, -1) + (1,) * (x.dim() - 2))
        # where(), not clamp(): the gradient at x == 0 is the slope, as in Caffe.
        return torch.where(x > 0, x, w * x)


@register("PReLU")
class PReLU(_SameShape):
    """y = x for x > 0, a_c * x otherwise; a learned slope per channel (axis 1) or shared.

    Shapes: N x C x ... -> same.  Blob ``weight``: (C,), or () with ``channel_shared``.
    """

    caffe_params = ("prelu_param",)

    params = {
        "channel_shared": {"type": "boolean", "default": False,
                           "description": "one slope for all channels instead of one per channel"},
        "filler": filler("initial slopes", "constant", value=0.25),
    }
    blobs = ("weight",)

    def infer(self, spec, shapes):
        if len(shapes[0]) < 2:
            raise spec.shape_error(f"needs a bottom with at least 2 axes (N x C x ...), got {list(shapes[0])}")
        return [tuple(shapes[0])]

    def build(self, spec, shapes):
        return PReLUModule(shapes[0][1], bool(spec["channel_shared"]), spec["filler"])

    def flops(self, spec, shapes, out_shapes):
        return 2 * numel(out_shapes[0])


# ----------------------------------------------------------------------------- Sigmoid, TanH, AbsVal

class SigmoidModule(nn.Module):
    def forward(self, x):
        return torch.sigmoid(x)


class TanHModule(nn.Module):
    def forward(self, x):
        return torch.tanh(x)


class AbsValModule(nn.Module):
    def forward(self, x):
        return torch.abs(x)


@register("Sigmoid")
class Sigmoid(_SameShape):
    """y = 1 / (1 + exp(-x)).  Shapes: any -> same."""

    params = {"engine": _ENGINE}

    def build(self, spec, shapes):
        return SigmoidModule()

    def flops(self, spec, shapes, out_shapes):
        return 4 * numel(out_shapes[0])


@register("TanH")
class TanH(_SameShape):
    """y = tanh(x).  Shapes: any -> same."""

    caffe_params = ("tanh_param",)

    params = {"engine": _ENGINE}

    def build(self, spec, shapes):
        return TanHModule()

    def flops(self, spec, shapes, out_shapes):
        return 4 * numel(out_shapes[0])


@register("AbsVal")
class AbsVal(_SameShape):
    """y = |x| (gradient sign(x), 0 at 0).  Shapes: any -> same."""

    def build(self, spec, shapes):
        return AbsValModule()


# ----------------------------------------------------------------------------- Power, Exp, Log

class PowerModule(nn.Module):
    def __init__(self, power: float, scale: float, shift: float):
        super().__init__()
        self.power, self.scale, self.shift = float(power), float(scale), float(shift)

    def forward(self, x):
        if self.scale == 0.0 or self.power == 0.0:
            # Caffe's special case: a constant blob (1 for power 0, shift^power otherwise)
            # whose gradient is 0.
            value = 1.0 if self.power == 0.0 else self.shift ** self.power
            return torch.where(torch.ones_like(x, dtype=torch.bool), torch.full_like(x, value), x)
        inner = x * self.scale + self.shift if (self.scale != 1.0 or self.shift != 0.0) else x
        if self.power == 1.0:
            return inner
        return torch.pow(inner, self.power)

    def extra_repr(self):
        return f"power={self.power}, scale={self.scale}, shift={self.shift}"


@register("Power")
class Power(_SameShape):
    """y = (shift + scale * x) ^ power.  Shapes: any -> same.

    ``scale`` 0 or ``power`` 0 give a constant (Caffe's special case).  A negative base with
    a fractional power is NaN, as in Caffe.
    """

    params = {
        "power": {"type": "number", "default": 1.0, "description": "exponent"},
        "scale": {"type": "number", "default": 1.0, "description": "multiplies x before the power"},
        "shift": {"type": "number", "default": 0.0, "description": "added to scale * x before the power"},
    }

    def build(self, spec, shapes):
        return PowerModule(spec["power"], spec["scale"], spec["shift"])

    def flops(self, spec, shapes, out_shapes):
        return 3 * numel(out_shapes[0])


def _check_base(spec):
    base = float(spec["base"])
    if base != -1.0 and base <= 0.0:
        raise spec.error(f"base must be -1 (meaning e) or > 0, got {base:g}", key="base",
                         hint="write base: -1 for the natural exponential/logarithm")
    return base


class ExpModule(nn.Module):
    def __init__(self, base: float, scale: float, shift: float):
        super().__init__()
        log_base = 1.0 if base == -1.0 else math.log(base)
        # Caffe: y = outer_scale * exp(inner_scale * x), inner = ln(base) * scale,
        # outer = base^shift (1 when shift is 0).
        self.inner_scale = log_base * float(scale)
        self.outer_scale = 1.0 if shift == 0.0 else math.exp(float(shift) * log_base)

    def forward(self, x):
        y = torch.exp(x * self.inner_scale if self.inner_scale != 1.0 else x)
        return y * self.outer_scale if self.outer_scale != 1.0 else y

    def extra_repr(self):
        return f"inner_scale={self.inner_scale}, outer_scale={self.outer_scale}"


@register("Exp")
class Exp(_SameShape):
    """y = base ^ (shift + scale * x); ``base: -1`` means e.  Shapes: any -> same."""

    params = {
        "base": {"type": "number", "default": -1.0, "description": "base of the power; -1 = e, otherwise > 0"},
        "scale": {"type": "number", "default": 1.0, "description": "multiplies x in the exponent"},
        "shift": {"type": "number", "default": 0.0, "description": "added to scale * x in the exponent"},
    }

    def check(self, spec):
        _check_base(spec)

    def build(self, spec, shapes):
        return ExpModule(_check_base(spec), spec["scale"], spec["shift"])

    def flops(self, spec, shapes, out_shapes):
        return 3 * numel(out_shapes[0])


class LogModule(nn.Module):
    def __init__(self, base: float, scale: float, shift: float):
        super().__init__()
        self.base_scale = 1.0 if base == -1.0 else 1.0 / math.log(base)
        self.scale, self.shift = float(scale), float(shift)

    def forward(self, x):
        inner = x * self.scale + self.shift if (self.scale != 1.0 or self.shift != 0.0) else x
        y = torch.log(inner)
        return y * self.base_scale if self.base_scale != 1.0 else y

    def extra_repr(self):
        return f"base_scale={self.base_scale}, scale={self.scale}, shift={self.shift}"


@register("Log")
class Log(_SameShape):
    """y = log_base(shift + scale * x); ``base: -1`` means e.  Shapes: any -> same."""

    params = {
        "base": {"type": "number", "default": -1.0,
                 "description": "base of the logarithm; -1 = e, otherwise > 0 and != 1"},
        "scale": {"type": "number", "default": 1.0, "description": "multiplies x inside the log"},
        "shift": {"type": "number", "default": 0.0, "description": "added to scale * x inside the log"},
    }

    def check(self, spec):
        if _check_base(spec) == 1.0:
            raise spec.error("base 1 has no logarithm", key="base", hint="use base -1 (e), 2, 10, ...")

    def build(self, spec, shapes):
        self.check(spec)
        return LogModule(float(spec["base"]), spec["scale"], spec["shift"])

    def flops(self, spec, shapes, out_shapes):
        return 3 * numel(out_shapes[0])


# ----------------------------------------------------------------------------- Dropout

class DropoutModule(nn.Module):
    def __init__(self, ratio: float):
        super().__init__()
        self.ratio = float(ratio)

    def forward(self, x):
        if not self.training or self.ratio == 0.0:
            return x
        # Inverted dropout: keep with probability 1 - ratio and scale by 1 / (1 - ratio).
        return F.dropout(x, self.ratio, training=True)

    def extra_repr(self):
        return f"dropout_ratio={self.ratio}"


@register("Dropout")
class Dropout(_SameShape):
    """Train: zero each element with probability dropout_ratio, scale the rest by
    1 / (1 - dropout_ratio).  Test (module in eval mode): identity.  Shapes: any -> same."""

    params = {
        "dropout_ratio": {"type": "number", "minimum": 0.0, "exclusiveMaximum": 1.0, "default": 0.5,
                          "description": "probability of dropping an element during training"},
    }

    def build(self, spec, shapes):
        return DropoutModule(spec["dropout_ratio"])

    def flops(self, spec, shapes, out_shapes):
        return numel(out_shapes[0])
