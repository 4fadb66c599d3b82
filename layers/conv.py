"""Convolution, Deconvolution and InnerProduct: Caffe's learnable linear layers.

Sizes follow BVLC ``conv_layer.cpp`` / ``deconv_layer.cpp`` (caffe.md §7.1), weight layouts
equal PyTorch's, so Caffe blobs load unchanged:

* Convolution   weight ``[O, C/g, *k]``, out = floor((in + 2p - E) / s) + 1
* Deconvolution weight ``[C, O/g, *k]``, out = s (in - 1) + E - 2p
* InnerProduct  weight ``[O, K]`` (``[K, O]`` with ``transpose``)

with E = d (k - 1) + 1 per spatial axis.  Like Caffe's N-D convolution, Convolution and
Deconvolution take 4-D (N x C x H x W) or 5-D (N x C x D x H x W) bottoms: the number of
spatial axes comes from the bottom, and ``kernel_size``/``pad``/``stride``/``dilation``
give one value for every axis or one per axis (``kernel_h``/``kernel_w`` and the other
``_h``/``_w`` keys are 2-D only).  Weights start from Caffe's fillers (default constant 0:
a layer without ``weight_filler`` starts at zero, as in Caffe).  The channel axis is 1
(``axis: 1``).
"""

from __future__ import annotations

import math
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from pacnet.layers.common import (POSITIVE_INT, ConvGeometry, fill_, filler, filler_problem,
                                  int_or_list, int_or_pair, numel, size_str, spatial,
                                  spatial_rank)
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
             "description": "the channel axis; only 1 (N x C x ...) is supported"},
    "force_nd_im2col": {"type": "boolean", "default": False,
                        "description": "Caffe implementation choice; ignored"},
    "bottom_is_im2col": {"type": "boolean", "default": False,
                         "description": "segaware: the bottom is an Im2col blob N x (C*kh*kw) x H x W; "
                                        "computes a 1x1 conv with the weight viewed as "
                                        "[O, C*kh*kw, 1, 1] (Convolution only)"},
}
"""Caffe's ConvolutionParameter for the 2-D layers that take it (the segaware types)."""

ND_CONV_PARAMS = {
    **CONV_PARAMS,
    "kernel_size": int_or_list("kernel size: one value for every spatial axis, or one per axis "
                               "([h, w] or [d, h, w]); 2-D also kernel_h/kernel_w", minimum=1),
    "pad": int_or_list("zero padding added on both sides: one value for every axis or one per "
                       "axis (default 0)"),
    "stride": int_or_list("stride: one value for every axis or one per axis (default 1)",
                          minimum=1),
    "dilation": int_or_list("kernel dilation: one value for every axis or one per axis "
                            "(default 1)", minimum=1),
}
"""The same for Convolution and Deconvolution, which take 4-D and 5-D bottoms (Caffe's
N-D convolution): the spatial fields take one value per axis of either."""

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_DECONV = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


def _check_conv_common(spec: LayerSpec) -> None:
    """``check()`` of both types: everything that needs no bottom shape."""
    if int(spec["axis"]) != 1:
        raise spec.error(f"only axis 1 (N x C x ...) is supported, got axis {spec['axis']}",
                         key="axis", hint="remove 'axis' or set it to 1")
    num_output, group = int(spec["num_output"]), int(spec["group"])
    if num_output % group:
        raise spec.error(f"num_output {num_output} is not a multiple of group {group}",
                         key="num_output", hint="make num_output divisible by group")
    spatial(spec, "kernel_size", "kernel_h", "kernel_w", None)  # required, in one form
    rank = ConvGeometry.written_rank(spec)
    # Caffe's bilinear filler fills square 2-D kernels only; a blob of the wrong rank is
    # refused in infer() (filler_problem), a kernel written with its rank already here.
    kind = spec["weight_filler"].get("type")
    if kind in ("bilinear", "bilinear_diagonal") and rank is not None:
        kernel = spatial(spec, "kernel_size", "kernel_h", "kernel_w", None, rank)
        if rank != 2:
            raise spec.error(f"weight_filler: the {kind} filler needs a square 2-D kernel, got "
                             f"{size_str(kernel)}", key="weight_filler",
                             hint="for a fixed 3-D upsampling use a Resize layer with mode: "
                                  "trilinear")
        if kernel[0] != kernel[1]:
            raise spec.error(f"weight_filler: the {kind} filler needs a square kernel, got "
                             f"{size_str(kernel)}", key="weight_filler")


def _geometry(spec: LayerSpec, shape: Shape) -> ConvGeometry:
    """The geometry for a bottom of ``shape`` (4-D or 5-D; anything else is refused)."""
    return ConvGeometry.of(spec, spatial_rank(spec, shape))


def _check_groups(spec: LayerSpec, channels: int) -> None:
    group = int(spec["group"])
    if channels % group:
        raise spec.shape_error(f"bottom channels {channels} are not a multiple of group {group}",
                               hint="make the input channels divisible by group")


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
    """2-D or 3-D convolution (Caffe ``Convolution``, its N-D form for 5-D bottoms).

    Shapes: N x C x H x W -> N x num_output x H' x W', or N x C x D x H x W ->
    N x num_output x D' x H' x W', with per spatial axis
    out = floor((in + 2 pad - (dilation (kernel - 1) + 1)) / stride) + 1.
    Blobs: ``weight`` [num_output, C/group, *kernel], ``bias`` [num_output].

    With ``bottom_is_im2col: true`` (segaware, 4-D only) the bottom is an Im2col blob
    N x (C*kh*kw) x H x W and the output is N x num_output x H x W: a 1x1 conv with the
    weight viewed as [num_output, C*kh*kw/group, 1, 1]; pad, stride and dilation play no
    part.  The weight blob keeps the shape [num_output, C/group, kh, kw].
    """

    params = ND_CONV_PARAMS
    required = ("num_output",)
    bottoms = (1, 1)
    tops = (1, 1)
    blobs = ("weight", "bias")

    def check(self, spec: LayerSpec) -> None:
        _check_conv_common(spec)

    def _geometry(self, spec: LayerSpec, shape: Shape) -> ConvGeometry:
        if spec["bottom_is_im2col"]:
            # an Im2col blob is 4-D; say so rather than "4-D or 5-D"
            spatial_rank(spec, shape, "Im2col bottom (bottom_is_im2col)", ranks=(2,))
        return _geometry(spec, shape)

    def _weight_shape(self, spec: LayerSpec, shape: Shape, geo: ConvGeometry) -> Shape:
        num_output, group, c = int(spec["num_output"]), int(spec["group"]), shape[1]
        if spec["bottom_is_im2col"]:
            kk = numel(geo.kernel)
            if c % (kk * group):
                raise spec.shape_error(
                    f"bottom_is_im2col: bottom channels {c} are not a multiple of "
                    f"kernel_h*kernel_w*group = {kk * group}",
                    hint="the bottom must be an Im2col blob with the same kernel_size")
            return (num_output, c // (kk * group)) + geo.kernel
        _check_groups(spec, c)
        return (num_output, c // group) + geo.kernel

    def infer(self, spec: LayerSpec, shapes: List[Shape]) -> List[Shape]:
        (shape,) = shapes
        geo = self._geometry(spec, shape)
        num_output = int(spec["num_output"])
        _check_fillers(spec, self._weight_shape(spec, shape, geo), num_output)
        sizes = tuple(shape[2:])
        if spec["bottom_is_im2col"]:
            return [(shape[0], num_output) + sizes]
        out = geo.out_size(sizes)
        if min(out) < 1:
            raise spec.shape_error(
                f"output would be empty ({size_str(out)}): input {size_str(sizes)} with padding "
                f"{list(geo.pad)} is smaller than the dilated kernel {size_str(geo.effective)}",
                hint="use a larger input, more padding or a smaller kernel/dilation")
        return [(shape[0], num_output) + out]

    def build(self, spec: LayerSpec, shapes: List[Shape]) -> nn.Module:
        self.infer(spec, shapes)
        geo = self._geometry(spec, shapes[0])
        c, num_output = shapes[0][1], int(spec["num_output"])
        group, bias = int(spec["group"]), bool(spec["bias_term"])
        if spec["bottom_is_im2col"]:
            module = Im2colConv(c, num_output, geo.kernel, group, bias)
        else:
            module = _CONV[geo.rank](c, num_output, geo.kernel, stride=geo.stride,
                                     padding=geo.pad, dilation=geo.dilation, groups=group,
                                     bias=bias)
        return _init(module, spec)

    def flops(self, spec: LayerSpec, shapes: List[Shape], out_shapes: List[Shape]) -> int:
        geo = self._geometry(spec, shapes[0])
        per_output = numel(self._weight_shape(spec, shapes[0], geo)[1:])  # multiply-adds
        out = numel(out_shapes[0])
        return 2 * per_output * out + (out if spec["bias_term"] else 0)


# ----------------------------------------------------------------------------- Deconvolution


@register("Deconvolution")
class Deconvolution(Layer):
    """2-D or 3-D transposed convolution (Caffe ``Deconvolution`` = ``nn.ConvTranspose2d``
    / ``nn.ConvTranspose3d``).

    Shapes: N x C x H x W -> N x num_output x H' x W', or N x C x D x H x W ->
    N x num_output x D' x H' x W', with per spatial axis
    out = stride (in - 1) + dilation (kernel - 1) + 1 - 2 pad.
    Blobs: ``weight`` [C, num_output/group, *kernel] (Caffe's and PyTorch's layout),
    ``bias`` [num_output].  With ``weight_filler: {type: bilinear}`` (2-D, square kernels)
    every (in, out) slice gets the same bilinear kernel, so use ``group: C``
    (num_output = C) for per-channel upsampling, as Caffe's filler documentation says;
    ``bilinear_diagonal`` starts a dense (group 1) C -> C deconvolution as the same
    per-channel upsampling, the form of FCN's learnable upscore layers.
    """

    params = dict(ND_CONV_PARAMS)
    params["num_output"] = {**POSITIVE_INT, "description": "number of output channels O"}
    params["weight_filler"] = filler("initialiser of the weight blob [C, O/g, *kernel] "
                                     "(Caffe default: constant 0; 'bilinear' or "
                                     "'bilinear_diagonal' for 2-D upsampling)")
    params["bottom_is_im2col"] = {"type": "boolean", "default": False,
                                  "description": "not supported for Deconvolution (must be false)"}
    required = ("num_output",)
    bottoms = (1, 1)
    tops = (1, 1)
    caffe_params = ("convolution_param",)
    blobs = ("weight", "bias")

    def check(self, spec: LayerSpec) -> None:
        _check_conv_common(spec)
        if spec["bottom_is_im2col"]:
            raise spec.error("bottom_is_im2col is only supported by Convolution",
                             key="bottom_is_im2col", hint="remove bottom_is_im2col")

    def infer(self, spec: LayerSpec, shapes: List[Shape]) -> List[Shape]:
        (shape,) = shapes
        geo = _geometry(spec, shape)
        num_output, c = int(spec["num_output"]), shape[1]
        _check_groups(spec, c)
        _check_fillers(spec, (c, num_output // int(spec["group"])) + geo.kernel, num_output)
        sizes = tuple(shape[2:])
        out = geo.transposed_out_size(sizes)
        if min(out) < 1:
            raise spec.shape_error(f"output would be empty ({size_str(out)}) for input "
                                   f"{size_str(sizes)}: pad {list(geo.pad)} crops more than the "
                                   "upsampled map", hint="reduce pad")
        return [(shape[0], num_output) + out]

    def build(self, spec: LayerSpec, shapes: List[Shape]) -> nn.Module:
        self.infer(spec, shapes)
        geo = _geometry(spec, shapes[0])
        module = _DECONV[geo.rank](shapes[0][1], int(spec["num_output"]), geo.kernel,
                                   stride=geo.stride, padding=geo.pad, dilation=geo.dilation,
                                   groups=int(spec["group"]), bias=bool(spec["bias_term"]))
        return _init(module, spec)

    def flops(self, spec: LayerSpec, shapes: List[Shape], out_shapes: List[Shape]) -> int:
        geo = _geometry(spec, shapes[0])
        # every input element is multiplied into O/g * prod(kernel) outputs
        per_input = int(spec["num_output"]) // int(spec["group"]) * numel(geo.kernel)
        macs = numel(shapes[0]) * per_input
        return 2 * macs + (numel(out_shapes[0]) if spec["bias_term"] else 0)


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
        if spec["weight_filler"].get("type") in ("bilinear", "bilinear_diagonal"):
            raise spec.error(f"weight_filler: the {spec['weight_filler']['type']} filler needs a "
                             "4-D blob; the InnerProduct weight is 2-D", key="weight_filler",
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
