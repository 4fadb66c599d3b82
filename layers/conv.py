"""Convolution, Deconvolution and InnerProduct: Caffe's learnable linear layers.

Sizes follow BVLC ``conv_layer.cpp`` / ``deconv_layer.cpp`` (caffe.md §7.1), weight layouts
equal PyTorch's, so Caffe blobs load unchanged:

* Convolution   weight ``[O, C/g, kh, kw]``, out = floor((in + 2p - E) / s) + 1
* Deconvolution weight ``[C, O/g, kh, kw]``, out = s (in - 1) + E - 2p
* InnerProduct  weight ``[O, K]`` (``[K, O]`` with ``transpose``)

with E = d (k - 1) + 1.  Weights start from Caffe's fillers (default constant 0: a layer
without ``weight_filler`` starts at zero, as in Caffe).  Only 2-D spatial convolution
(``axis: 1``, N x C x H x W bottoms) is supported.
"""

from __future__ import annotations

import math
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from pacnet.layers.common import (POSITIVE_INT, conv_out, fill_, filler,
                                  filler_problem, int_or_pair, numel, spatial_pair)
from pacnet.errors import ShapeError
from pacnet.registry import Layer, LayerSpec, Shape, register

# ----------------------------------------------------------------------------- schema


def _int(description: str, minimum: int) -> dict:
    return {"type": "integer", "minimum": minimum, "description": description}


CONV_PARAMS = {
    "num_output": {**POSITIVE_INT, "description": "number of output channels O"},
    "bias_term": {"type": "boolean", "default": True,
                  "description": "add a learned bias per output channel"},
    "kernel_size": int_or_pair("kernel size, one value or [h, w] (or use kernel_h/kernel_w)",
                               minimum=1),
    "kernel_h": _int("kernel height (with kernel_w, instead of kernel_size)", 1),
    "kernel_w": _int("kernel width (with kernel_h, instead of kernel_size)", 1),
    "pad": int_or_pair("zero padding added on both sides, one value or [h, w] (default 0)"),
    "pad_h": _int("padding of the height (with pad_w, instead of pad)", 0),
    "pad_w": _int("padding of the width (with pad_h, instead of pad)", 0),
    "stride": int_or_pair("stride, one value or [h, w] (default 1)", minimum=1),
    "stride_h": _int("vertical stride (with stride_w, instead of stride)", 1),
    "stride_w": _int("horizontal stride (with stride_h, instead of stride)", 1),
    "dilation": int_or_pair("kernel dilation, one value or [h, w] (default 1)", minimum=1),
    "group": {**POSITIVE_INT, "default": 1,
              "description": "number of groups; C and num_output must both be multiples"},
    "weight_filler": filler("initialiser of the weight blob (Caffe default: constant 0)"),
    "bias_filler": filler("initialiser of the bias blob (Caffe default: constant 0)"),
    "engine": {"enum": ["DEFAULT", "CAFFE", "CUDNN"], "default": "DEFAULT",
               "description": "Caffe implementation choice; ignored (PyTorch picks the kernel)"},
    "axis": {"type": "integer", "default": 1,
             "description": "the channel axis; only 1 (N x C x H x W) is supported"},
    "force_nd_im2col": {"type": "boolean", "default": False,
                        "description": "Caffe implementation choice; ignored"},
    "bottom_is_im2col": {"type": "boolean", "default": False,
                         "description": "segaware: the bottom is an Im2col blob N x (C*kh*kw) x H x W; "
                                        "computes a 1x1 conv with the weight viewed as "
                                        "[O, C*kh*kw, 1, 1] (Convolution only)"},
}


class _ConvGeometry:
    """The resolved 2-D parameters of a Convolution/Deconvolution spec."""

    def __init__(self, spec: LayerSpec) -> None:
        self.kernel = spatial_pair(spec, "kernel_size", "kernel_h", "kernel_w", None)
        self.pad = spatial_pair(spec, "pad", "pad_h", "pad_w", 0)
        self.stride = spatial_pair(spec, "stride", "stride_h", "stride_w", 1)
        self.dilation = spatial_pair(spec, "dilation", "dilation_h", "dilation_w", 1)
        self.group = int(spec["group"])
        self.num_output = int(spec["num_output"])
        self.bias = bool(spec["bias_term"])

    @property
    def effective(self) -> Tuple[int, int]:
        return tuple(d * (k - 1) + 1 for k, d in zip(self.kernel, self.dilation))


def _check_conv_common(spec: LayerSpec) -> _ConvGeometry:
    geo = _ConvGeometry(spec)
    if int(spec["axis"]) != 1:
        raise spec.error(f"only axis 1 (N x C x H x W) is supported, got axis {spec['axis']}",
                         key="axis", hint="remove 'axis' or set it to 1")
    if geo.num_output % geo.group:
        raise spec.error(f"num_output {geo.num_output} is not a multiple of group {geo.group}",
                         key="num_output", hint="make num_output divisible by group")
    return geo


def _check_bottom(spec: LayerSpec, shape: Shape, what: str = "N x C x H x W") -> None:
    if len(shape) != 4:
        raise spec.shape_error(f"needs a 4-D bottom ({what}), got shape {list(shape)}",
                               hint="only 2-D spatial convolution is supported")


def _check_fillers(spec: LayerSpec, weight_shape: Shape, num_output: int) -> None:
    problem = filler_problem(spec["weight_filler"], weight_shape)
    if problem:
        raise spec.error(f"weight_filler: {problem}", key="weight_filler")
    if spec["bias_term"]:
        problem = filler_problem(spec["bias_filler"], (num_output,))
        if problem:
            raise spec.error(f"bias_filler: {problem}", key="bias_filler")


def _init(module: nn.Module, spec: LayerSpec) -> nn.Module:
    fill_(module.weight.data, spec["weight_filler"])
    if getattr(module, "bias", None) is not None:
        fill_(module.bias.data, spec["bias_filler"])
    return module


# ----------------------------------------------------------------------------- Convolution


class Im2colConv(nn.Module):
    """A convolution whose bottom is already an im2col blob (segaware ``bottom_is_im2col``).

    ``weight`` keeps Caffe's shape ``[O, C/g, kh, kw]``; forward is a 1x1 grouped conv with
    it viewed as ``[O, C*kh*kw/g, 1, 1]``, so the output has the bottom's spatial size.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: Tuple[int, int],
                 groups: int, bias: bool) -> None:
        super().__init__()
        kh, kw = kernel
        self.groups = groups
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // (kh * kw * groups), kh, kw))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.reshape(self.weight.shape[0], -1, 1, 1)
        return F.conv2d(x, w, self.bias, groups=self.groups)

    def extra_repr(self) -> str:
        return f"weight={list(self.weight.shape)}, groups={self.groups}, bias={self.bias is not None}"


@register("Convolution")
class Convolution(Layer):
    """2-D convolution (Caffe ``Convolution``).

    Shapes: N x C x H x W -> N x num_output x H' x W' with
    H' = floor((H + 2 pad_h - (dilation_h (kernel_h - 1) + 1)) / stride_h) + 1 (W' alike).
    Blobs: ``weight`` [num_output, C/group, kernel_h, kernel_w], ``bias`` [num_output].

    With ``bottom_is_im2col: true`` (segaware) the bottom is an Im2col blob
    N x (C*kh*kw) x H x W and the output is N x num_output x H x W: a 1x1 conv with the
    weight viewed as [num_output, C*kh*kw/group, 1, 1]; pad, stride and dilation play no
    part.  The weight blob keeps the shape [num_output, C/group, kh, kw].
    """

    params = CONV_PARAMS
    required = ("num_output",)
    bottoms = (1, 1)
    tops = (1, 1)
    blobs = ("weight", "bias")

    def check(self, spec: LayerSpec) -> None:
        geo = _check_conv_common(spec)
        # Fillers are checked against the real weight shape in infer(); here only what
        # needs no bottom shape.
        if spec["weight_filler"].get("type") == "bilinear" and geo.kernel[0] != geo.kernel[1]:
            raise spec.error("weight_filler: the bilinear filler needs a square kernel, got "
                             f"{geo.kernel[0]}x{geo.kernel[1]}", key="weight_filler")

    def _weight_shape(self, spec: LayerSpec, shape: Shape) -> Shape:
        geo = _ConvGeometry(spec)
        c = shape[1]
        if spec["bottom_is_im2col"]:
            kk = geo.kernel[0] * geo.kernel[1]
            if c % (kk * geo.group):
                raise spec.shape_error(
                    f"bottom_is_im2col: bottom channels {c} are not a multiple of "
                    f"kernel_h*kernel_w*group = {kk * geo.group}",
                    hint="the bottom must be an Im2col blob with the same kernel_size")
            return (geo.num_output, c // (kk * geo.group)) + geo.kernel
        if c % geo.group:
            raise spec.shape_error(f"bottom channels {c} are not a multiple of group {geo.group}",
                                   hint="make the input channels divisible by group")
        return (geo.num_output, c // geo.group) + geo.kernel

    def infer(self, spec: LayerSpec, shapes: List[Shape]) -> List[Shape]:
        (shape,) = shapes
        _check_bottom(spec, shape)
        geo = _ConvGeometry(spec)
        weight_shape = self._weight_shape(spec, shape)
        _check_fillers(spec, weight_shape, geo.num_output)
        n, _, h, w = shape
        if spec["bottom_is_im2col"]:
            return [(n, geo.num_output, h, w)]
        ho, wo = (conv_out(size, k, p, s, d) for size, k, p, s, d in
                  zip((h, w), geo.kernel, geo.pad, geo.stride, geo.dilation))
        if ho < 1 or wo < 1:
            eh, ew = geo.effective
            raise spec.shape_error(
                f"output would be empty ({ho}x{wo}): input {h}x{w} with padding {geo.pad} "
                f"is smaller than the dilated kernel {eh}x{ew}",
                hint="use a larger input, more padding or a smaller kernel/dilation")
        return [(n, geo.num_output, ho, wo)]

    def build(self, spec: LayerSpec, shapes: List[Shape]) -> nn.Module:
        self.infer(spec, shapes)
        geo = _ConvGeometry(spec)
        c = shapes[0][1]
        if spec["bottom_is_im2col"]:
            module = Im2colConv(c, geo.num_output, geo.kernel, geo.group, geo.bias)
        else:
            module = nn.Conv2d(c, geo.num_output, geo.kernel, stride=geo.stride, padding=geo.pad,
                               dilation=geo.dilation, groups=geo.group, bias=geo.bias)
        return _init(module, spec)

    def flops(self, spec: LayerSpec, shapes: List[Shape], out_shapes: List[Shape]) -> int:
        weight_shape = self._weight_shape(spec, shapes[0])
        per_output = numel(weight_shape[1:])  # multiply-adds per output element
        out = numel(out_shapes[0])
        return 2 * per_output * out + (out if spec["bias_term"] else 0)


# ----------------------------------------------------------------------------- Deconvolution


@register("Deconvolution")
class Deconvolution(Layer):
    """2-D transposed convolution (Caffe ``Deconvolution`` = ``nn.ConvTranspose2d``).

    Shapes: N x C x H x W -> N x num_output x H' x W' with
    H' = stride_h (H - 1) + dilation_h (kernel_h - 1) + 1 - 2 pad_h (W' alike).
    Blobs: ``weight`` [C, num_output/group, kernel_h, kernel_w] (Caffe's and PyTorch's
    layout), ``bias`` [num_output].  With ``weight_filler: {type: bilinear}`` every
    (in, out) slice gets the same bilinear kernel, so use ``group: C`` (num_output = C) for
    per-channel upsampling, as Caffe's filler documentation says.
    """

    params = {k: v for k, v in CONV_PARAMS.items()}
    params["num_output"] = {**POSITIVE_INT, "description": "number of output channels O"}
    params["weight_filler"] = filler("initialiser of the weight blob [C, O/g, kh, kw] "
                                     "(Caffe default: constant 0; 'bilinear' for upsampling)")
    params["bottom_is_im2col"] = {"type": "boolean", "default": False,
                                  "description": "not supported for Deconvolution (must be false)"}
    required = ("num_output",)
    bottoms = (1, 1)
    tops = (1, 1)
    caffe_params = ("convolution_param",)
    blobs = ("weight", "bias")

    def check(self, spec: LayerSpec) -> None:
        geo = _check_conv_common(spec)
        if spec["bottom_is_im2col"]:
            raise spec.error("bottom_is_im2col is only supported by Convolution",
                             key="bottom_is_im2col", hint="remove bottom_is_im2col")
        if spec["weight_filler"].get("type") == "bilinear" and geo.kernel[0] != geo.kernel[1]:
            raise spec.error("weight_filler: the bilinear filler needs a square kernel, got "
                             f"{geo.kernel[0]}x{geo.kernel[1]}", key="weight_filler")

    def infer(self, spec: LayerSpec, shapes: List[Shape]) -> List[Shape]:
        (shape,) = shapes
        _check_bottom(spec, shape)
        geo = _ConvGeometry(spec)
        n, c, h, w = shape
        if c % geo.group:
            raise spec.shape_error(f"bottom channels {c} are not a multiple of group {geo.group}",
                                   hint="make the input channels divisible by group")
        _check_fillers(spec, (c, geo.num_output // geo.group) + geo.kernel, geo.num_output)
        ho, wo = (s * (size - 1) + e - 2 * p for size, s, e, p in
                  zip((h, w), geo.stride, geo.effective, geo.pad))
        if ho < 1 or wo < 1:
            raise spec.shape_error(f"output would be empty ({ho}x{wo}) for input {h}x{w}: "
                                   f"pad {geo.pad} crops more than the upsampled map",
                                   hint="reduce pad")
        return [(n, geo.num_output, ho, wo)]

    def build(self, spec: LayerSpec, shapes: List[Shape]) -> nn.Module:
        self.infer(spec, shapes)
        geo = _ConvGeometry(spec)
        module = nn.ConvTranspose2d(shapes[0][1], geo.num_output, geo.kernel, stride=geo.stride,
                                    padding=geo.pad, dilation=geo.dilation, groups=geo.group,
                                    bias=geo.bias)
        return _init(module, spec)

    def flops(self, spec: LayerSpec, shapes: List[Shape], out_shapes: List[Shape]) -> int:
        geo = _ConvGeometry(spec)
        # every input element is multiplied into O/g * kh * kw outputs
        macs = numel(shapes[0]) * (geo.num_output // geo.group) * geo.kernel[0] * geo.kernel[1]
        return 2 * macs + (numel(out_shapes[0]) if geo.bias else 0)


# ----------------------------------------------------------------------------- InnerProduct


class InnerProductModule(nn.Module):
    """y = x.flatten(axis) @ W^T + b, reshaped to x.shape[:axis] + (O,)."""

    def __init__(self, in_features: int, out_features: int, axis: int, transpose: bool,
                 bias: bool) -> None:
        super().__init__()
        self.axis = axis
        self.transpose = transpose
        shape = (in_features, out_features) if transpose else (out_features, in_features)
        self.weight = nn.Parameter(torch.empty(shape))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:self.axis]
        flat = x.reshape(math.prod(lead), -1)
        w = self.weight if self.transpose else self.weight.t()
        y = flat @ w
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, y.shape[-1])

    def extra_repr(self) -> str:
        return (f"weight={list(self.weight.shape)}, axis={self.axis}, transpose={self.transpose}, "
                f"bias={self.bias is not None}")


@register("InnerProduct")
class InnerProduct(Layer):
    """Fully connected layer (Caffe ``InnerProduct``).

    Shapes: D0 x ... x D(a-1) x Da x ... -> D0 x ... x D(a-1) x num_output, where a =
    ``axis`` (negative counts from the end) and K = Da * ... * D(last) inputs are flattened.
    Blobs: ``weight`` [num_output, K] ([K, num_output] with ``transpose: true``),
    ``bias`` [num_output].
    """

    params = {
        "num_output": {**POSITIVE_INT, "description": "number of outputs"},
        "bias_term": {"type": "boolean", "default": True, "description": "add a learned bias"},
        "weight_filler": filler("initialiser of the weight blob (Caffe default: constant 0)"),
        "bias_filler": filler("initialiser of the bias blob (Caffe default: constant 0)"),
        "axis": {"type": "integer", "default": 1,
                 "description": "first axis flattened into the K inputs (negative: from the end)"},
        "transpose": {"type": "boolean", "default": False,
                      "description": "store the weight as [K, num_output] instead of [num_output, K]"},
    }
    required = ("num_output",)
    bottoms = (1, 1)
    tops = (1, 1)
    blobs = ("weight", "bias")

    def check(self, spec: LayerSpec) -> None:
        if spec["weight_filler"].get("type") == "bilinear":
            raise spec.error("weight_filler: the bilinear filler needs a 4-D blob; the "
                             "InnerProduct weight is 2-D", key="weight_filler",
                             hint="use gaussian, xavier or msra")
        problem = filler_problem(spec["weight_filler"], (1, 1))  # the rest is shape-free
        if problem:
            raise spec.error(f"weight_filler: {problem}", key="weight_filler")
        if spec["bias_term"]:
            problem = filler_problem(spec["bias_filler"], (1,))
            if problem:
                raise spec.error(f"bias_filler: {problem}", key="bias_filler")

    def _axis(self, spec: LayerSpec, shape: Shape) -> int:
        axis = int(spec["axis"])
        ndim = len(shape)
        if not -ndim <= axis < ndim:
            raise spec.error(f"axis {axis} is out of range for a {ndim}-D bottom {list(shape)}",
                             key="axis", hint=f"use an axis in [{-ndim}, {ndim - 1}]",
                             cls=ShapeError)
        return axis % ndim

    def infer(self, spec: LayerSpec, shapes: List[Shape]) -> List[Shape]:
        (shape,) = shapes
        axis = self._axis(spec, shape)
        return [tuple(shape[:axis]) + (int(spec["num_output"]),)]

    def build(self, spec: LayerSpec, shapes: List[Shape]) -> nn.Module:
        (shape,) = shapes
        axis = self._axis(spec, shape)
        k = numel(shape[axis:])
        module = InnerProductModule(k, int(spec["num_output"]), axis, bool(spec["transpose"]),
                                    bool(spec["bias_term"]))
        return _init(module, spec)

    def flops(self, spec: LayerSpec, shapes: List[Shape], out_shapes: List[Shape]) -> int:
        axis = self._axis(spec, shapes[0])
        k = numel(shapes[0][axis:])
        out = numel(out_shapes[0])
        return 2 * k * out + (out if spec["bias_term"] else 0)
