"""Pixel-adaptive layers: ``PacConv``, ``PacConvTranspose``, ``PacPool`` and ``PacKernel``.

The built modules *are* :class:`pacnet.pac.PacConv2d` / ``PacConvTranspose2d`` /
``PacPool2d`` (subclassed only to take the bottoms positionally), so a layer's
``state_dict`` keys are ``<layer>.weight``, ``<layer>.bias``, ``<layer>.inv_alpha``,
``<layer>.inv_lambda``, ``<layer>.smooth_kernel`` with the original NVlabs/pacnet names
and shapes: an original module's weights load into a layer unchanged.

Bottoms of the PAC layers: ``input`` (N x C x H x W) then either

* a **guide** (4-D, N x Cg x H x W; for ``PacConvTranspose`` at the *output* size), from
  which the layer computes its adaptive kernel, optionally followed by a **mask**
  (N x 1 x H x W at the input size, 1 = valid; then a second top may return the output
  mask N x 1 x H' x W'), or
* a precomputed **kernel** K (6-D, N x 1 x kh x kw x H' x W', e.g. the top of a
  ``PacKernel`` layer, so one K can feed several PAC layers).

Which one is decided by the rank of the second bottom: 4-D is a guide, 6-D a kernel
(the two cannot be confused, so no parameter is needed).

Parameter names follow Caffe where it has them: ``num_output``, ``kernel_size`` /
``kernel_h`` + ``kernel_w``, ``pad`` / ``pad_h`` + ``pad_w``, ``stride`` / ``stride_h`` +
``stride_w``, ``dilation``, ``bias_term``, ``weight_filler``, ``bias_filler``; the
transposed layer's extra rows/columns are ``output_pad`` (PyTorch's ``output_padding``).
The PAC-specific ones keep the original's names: ``kernel_type``, ``smooth_kernel_type``,
``normalize_kernel``, ``shared_filters``, ``channel_wise``, and ``filler`` (the original's
named initialisations: uniform, linear, crf, crf_perturbed, pool, crf_pool).  A Caffe
``weight_filler`` / ``bias_filler``, when written, replaces ``filler`` for that blob.
The original's conventions hold: the transposed weight is not flipped, ``PacPool`` is a
weighted sum unless ``normalize_kernel`` and its stride defaults to 1 (as Caffe's Pooling).
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Tuple

import torch
from torch import nn

from pacnet import pac
from pacnet.errors import PacnetValueError
from pacnet.layers.common import (POSITIVE_INT, conv_out, fill_, filler, filler_problem,
                                  int_or_pair, numel, spatial_pair)
from pacnet.registry import Layer, LayerSpec, Shape, register

# ----------------------------------------------------------------------------- schema


def _int(description: str, minimum: int) -> dict:
    return {"type": "integer", "minimum": minimum, "description": description}


GEOMETRY = {
    "kernel_size": int_or_pair("filter size (odd), one value or [h, w] (or kernel_h/kernel_w)",
                               minimum=1),
    "kernel_h": _int("filter height (with kernel_w, instead of kernel_size)", 1),
    "kernel_w": _int("filter width (with kernel_h, instead of kernel_size)", 1),
    "pad": int_or_pair("zero padding on both sides, one value or [h, w] (default 0); at most "
                       "dilation*(kernel_size-1)/2 except for transposed layers"),
    "pad_h": _int("padding of the height (with pad_w, instead of pad)", 0),
    "pad_w": _int("padding of the width (with pad_h, instead of pad)", 0),
    "stride": int_or_pair("stride, one value or [h, w] (default 1)", minimum=1),
    "stride_h": _int("vertical stride (with stride_w, instead of stride)", 1),
    "stride_w": _int("horizontal stride (with stride_h, instead of stride)", 1),
    "dilation": int_or_pair("spacing of the filter taps, one value or [h, w] (default 1)",
                            minimum=1),
}

KERNEL_PARAMS = {
    "kernel_type": {"type": "string", "default": "gaussian",
                    "description": "adaptive kernel of the squared guide distance D: 'gaussian' "
                                   "= exp(-D/2), or 'inv_{alpha}_{lambda}' = alpha + "
                                   "(D + 1e-4)^(lambda/2) (learnable alpha, lambda) with "
                                   "optional '_asym' (only guide values above the centre "
                                   "count) and '_fixed' (alpha, lambda constant)"},
    "smooth_kernel_type": {"type": "string", "default": "none",
                           "description": "centre feature: 'none' (the centre tap), "
                                          "'gaussian' (fixed 3x3 binomial), 'average_{w}' "
                                          "(fixed w x w box) or 'full_{w}' (learnable w x w) "
                                          "smoothing of the guide; w odd"},
    "normalize_kernel": {"type": "boolean", "default": False,
                         "description": "divide the kernel by its sum over the in-image taps "
                                        "(a weighted average instead of a weighted sum)"},
}

OUTPUT_PAD = int_or_pair("extra rows/columns at the bottom/right of a transposed output "
                         "(PyTorch's output_padding), smaller than stride or dilation",
                         default=0)

CONV_PARAMS = {
    "num_output": {**POSITIVE_INT, "description": "number of output channels O"},
    **GEOMETRY,
    "bias_term": {"type": "boolean", "default": True,
                  "description": "add a learned bias per output channel"},
    **KERNEL_PARAMS,
    "shared_filters": {"type": "boolean", "default": False,
                       "description": "one k x k filter applied depthwise (needs num_output = "
                                      "input channels); weight blob 1 x 1 x kh x kw"},
    "filler": {"enum": list(pac._FILLERS), "default": "uniform",
               "description": "the original's initialisation: uniform U(+-1/sqrt(C*kh*kw)) "
                              "(times C when shared), linear (bilinear upsampling, transposed "
                              "only), crf / crf_perturbed (PacCRF), pool / crf_pool (fixed "
                              "ones, without the centre for crf_pool; needs shared_filters)"},
    # No default: absent means "use the PAC filler".
    "weight_filler": {k: v for k, v in filler("Caffe filler of the weight blob; replaces "
                                              "'filler' when written").items() if k != "default"},
    "bias_filler": {k: v for k, v in filler("Caffe filler of the bias blob; replaces 'filler' "
                                            "when written").items() if k != "default"},
}


# ----------------------------------------------------------------------------- helpers


class _Geometry:
    def __init__(self, spec: LayerSpec, transposed: bool = False) -> None:
        self.kernel = spatial_pair(spec, "kernel_size", "kernel_h", "kernel_w", None)
        self.pad = spatial_pair(spec, "pad", "pad_h", "pad_w", 0)
        self.stride = spatial_pair(spec, "stride", "stride_h", "stride_w", 1)
        self.dilation = spatial_pair(spec, "dilation", "dilation_h", "dilation_w", 1)
        op = spec.get("output_pad", 0) if transposed else 0
        if isinstance(op, int):
            self.output_pad = (op, op)
        else:
            self.output_pad = (int(op[0]), int(op[-1]))
        self.transposed = transposed

    def out_size(self, hw) -> Tuple[int, int]:
        if self.transposed:
            return tuple((hw[i] - 1) * self.stride[i] - 2 * self.pad[i]
                         + self.dilation[i] * (self.kernel[i] - 1) + 1 + self.output_pad[i]
                         for i in range(2))
        return tuple(conv_out(hw[i], self.kernel[i], self.pad[i], self.stride[i], self.dilation[i])
                     for i in range(2))

    def nonempty_out_size(self, spec: LayerSpec, hw, what: str = "input") -> Tuple[int, int]:
        """:meth:`out_size`, refused with the layer's shape error when it would be empty."""
        out_hw = self.out_size(hw)
        if min(out_hw) < 1:
            raise spec.shape_error(f"output would be empty ({out_hw[0]}x{out_hw[1]}) for {what} "
                                   f"{hw[0]}x{hw[1]}", hint=f"use a larger {what} or a smaller "
                                                            f"kernel, dilation or pad")
        return out_hw


def _as_spec_error(spec: LayerSpec, key: Optional[str], fn: Callable[[], Any]) -> Any:
    """Run ``fn``; a PacnetValueError from the Python API becomes this layer's error."""
    try:
        return fn()
    except PacnetValueError as err:
        raise spec.error(err.message, key=key, hint=err.hint) from None


def _check_common(spec: LayerSpec, transposed: bool) -> _Geometry:
    geo = _Geometry(spec, transposed)
    _as_spec_error(spec, "kernel_size", lambda: pac._odd_kernel(geo.kernel))
    if transposed:
        _as_spec_error(spec, "output_pad", lambda: pac._check_output_padding(
            geo.output_pad, geo.stride, geo.dilation))
    else:
        _as_spec_error(spec, "pad", lambda: pac._check_padding_limit(geo.pad, geo.kernel,
                                                                     geo.dilation))
    _as_spec_error(spec, "kernel_type", lambda: pac._parse_kernel_type(spec["kernel_type"]))
    _as_spec_error(spec, "smooth_kernel_type",
                   lambda: pac._parse_smooth_kernel_type(spec["smooth_kernel_type"]))
    return geo


def _check_mask_tops(spec: LayerSpec, n_data_bottoms: int) -> None:
    if len(spec.tops) == 2 and len(spec.bottoms) <= n_data_bottoms:
        raise spec.error("a second top (the output mask) needs a mask bottom",
                         hint=f"add the mask as bottom {n_data_bottoms + 1} or remove the "
                              "second top")


def _check_4d(spec: LayerSpec, shape: Shape, what: str) -> None:
    if len(shape) != 4:
        raise spec.shape_error(f"{what} must be 4-D (N x C x H x W), got shape {list(shape)}")


def _check_guide_or_kernel(spec: LayerSpec, shapes: List[Shape], guide_hw, out_hw,
                           kernel_channels: Tuple[int, ...], guide_what: str,
                           mask_hw) -> bool:
    """Check bottoms 1 (guide or K) and 2 (mask); True when bottom 1 is a kernel."""
    n = shapes[0][0]
    kh, kw = _Geometry(spec).kernel
    second = shapes[1]
    if len(second) == 6:
        expect = (n, kernel_channels[0], kh, kw) + tuple(out_hw)
        if second[0] != n or second[1] not in kernel_channels or tuple(second[2:]) != expect[2:]:
            chans = "|".join(str(c) for c in kernel_channels)
            raise spec.shape_error(
                f"the kernel bottom must be [{n}, {chans}, {kh}, {kw}, {out_hw[0]}, {out_hw[1]}], "
                f"got {list(second)}",
                hint="compute it with a PacKernel layer with the same kernel_size, stride, pad "
                     "and dilation")
        if len(shapes) > 2:
            raise spec.error("a mask bottom cannot be used with a precomputed kernel bottom",
                             hint="give the mask to the PacKernel layer instead")
        return True
    if len(second) != 4:
        raise spec.shape_error(f"bottom 2 must be a 4-D guide or a 6-D kernel, got shape "
                               f"{list(second)}")
    if second[0] != n or tuple(second[2:]) != tuple(guide_hw):
        raise spec.shape_error(f"the guide must be [{n}, Cg, {guide_hw[0]}, {guide_hw[1]}] "
                               f"({guide_what}), got {list(second)}",
                               hint="resize the guide to that size")
    if len(shapes) > 2:
        mask = shapes[2]
        if tuple(mask) != (n, 1) + tuple(mask_hw):
            raise spec.shape_error(f"the mask must be [{n}, 1, {mask_hw[0]}, {mask_hw[1]}], got "
                                   f"{list(mask)}")
    return False


def _kernel_flops(spec: LayerSpec, n: int, cg: int, geo: _Geometry, out_hw) -> int:
    """Distances (3 per guide channel and tap) plus the kernel function, per K element."""
    taps = geo.kernel[0] * geo.kernel[1] * out_hw[0] * out_hw[1] * n
    return taps * (3 * cg + 2) + (taps * 2 if spec["normalize_kernel"] else 0)


def _mask_to_4d(m: torch.Tensor) -> torch.Tensor:
    return m.reshape(m.shape[0], 1, m.shape[-2], m.shape[-1])


class _LayerForward:
    """forward(input, guide_or_kernel[, mask]) for the PAC modules, fixed at build time."""

    _kernel_input: bool = False
    _mask_top: bool = False

    def forward(self, input: torch.Tensor, second: torch.Tensor,
                mask: Optional[torch.Tensor] = None):
        if self._kernel_input:
            return super().forward(input, None, kernel=second)
        out = super().forward(input, second, mask=mask)
        if isinstance(out, tuple):
            out, out_mask = out
            return (out, _mask_to_4d(out_mask)) if self._mask_top else out
        return out


class PacConv2dLayer(_LayerForward, pac.PacConv2d):
    """:class:`~pacnet.pac.PacConv2d` taking its bottoms positionally (same state_dict)."""


class PacConvTranspose2dLayer(_LayerForward, pac.PacConvTranspose2d):
    """:class:`~pacnet.pac.PacConvTranspose2d` taking its bottoms positionally (same state_dict)."""


class PacPool2dLayer(_LayerForward, pac.PacPool2d):
    """:class:`~pacnet.pac.PacPool2d` taking its bottoms positionally (same state_dict)."""


class PacKernel2d(pac._PacConvNd):
    """The adaptive kernel of a guide as a module: ``forward(guide[, mask]) -> K[, mask]``.

    Holds ``inv_alpha``/``inv_lambda`` (vectors of length Cg for a channel-wise learnable
    inv kernel) and ``smooth_kernel`` like the PAC modules; the output mask is
    ``N x 1 x H' x W'``.
    """

    def __init__(self, kernel_size, stride=1, padding=0, output_padding=0, dilation=1,
                 kernel_type="gaussian", smooth_kernel_type="none", channel_wise=False,
                 normalize_kernel=False, transposed=False, channels=-1, mask_top=False):
        super().__init__(-1, channels, kernel_size, stride, padding, dilation, transposed,
                         output_padding, False, True, kernel_type, smooth_kernel_type,
                         channel_wise, normalize_kernel, False, "uniform", False)
        self._mask_top = mask_top

    def forward(self, guide: torch.Tensor, mask: Optional[torch.Tensor] = None):
        kernel, out_mask = self.compute_kernel(guide, mask)
        if out_mask is not None and self._mask_top:
            return kernel, _mask_to_4d(out_mask)
        return kernel


def _fill_caffe(module: nn.Module, spec: LayerSpec) -> None:
    if spec.get("weight_filler") is not None:
        fill_(module.weight.data, spec["weight_filler"])
    if spec.get("bias_filler") is not None and module.bias is not None:
        fill_(module.bias.data, spec["bias_filler"])


# ----------------------------------------------------------------------------- PacConv


class _PacConvBase(Layer):
    transposed = False
    module_cls: type = PacConv2dLayer
    bottoms = (2, 3)
    tops = (1, 2)
    blobs = ("weight", "bias", "inv_alpha", "inv_lambda", "smooth_kernel")
    required = ("num_output",)

    def check(self, spec: LayerSpec) -> None:
        _check_common(spec, self.transposed)
        _check_mask_tops(spec, 2)
        if spec["filler"] in ("pool", "crf_pool") and spec.get("weight_filler") is not None:
            raise spec.error(f"weight_filler cannot be used with filler {spec['filler']!r} "
                             "(the weight is a fixed buffer of ones)", key="weight_filler")

    def _weight_shape(self, spec: LayerSpec, c: int) -> Shape:
        geo = _Geometry(spec)
        o = int(spec["num_output"])
        if spec["shared_filters"]:
            return (1, 1) + geo.kernel
        return ((c, o) if self.transposed else (o, c)) + geo.kernel

    def _module(self, spec: LayerSpec, c: int) -> nn.Module:
        geo = _Geometry(spec, self.transposed)
        kwargs = dict(stride=geo.stride, padding=geo.pad, dilation=geo.dilation,
                      bias=bool(spec["bias_term"]), kernel_type=spec["kernel_type"],
                      smooth_kernel_type=spec["smooth_kernel_type"],
                      normalize_kernel=bool(spec["normalize_kernel"]),
                      shared_filters=bool(spec["shared_filters"]), filler=spec["filler"])
        if self.transposed:
            kwargs["output_padding"] = geo.output_pad
        key = "filler" if spec["filler"] != "uniform" else "num_output"
        return _as_spec_error(spec, key, lambda: self.module_cls(
            c, int(spec["num_output"]), geo.kernel, **kwargs))

    def infer(self, spec: LayerSpec, shapes: List[Shape]) -> List[Shape]:
        _check_4d(spec, shapes[0], "the input (bottom 1)")
        geo = _Geometry(spec, self.transposed)
        n, c, h, w = shapes[0]
        out_hw = geo.nonempty_out_size(spec, (h, w))
        guide_hw = out_hw if self.transposed else (h, w)
        what = "the output size" if self.transposed else "the input size"
        _check_guide_or_kernel(spec, shapes, guide_hw, out_hw, (1,), what, (h, w))
        if spec["shared_filters"] and int(spec["num_output"]) != c:
            raise spec.error(f"shared_filters needs num_output == input channels ({c}), got "
                             f"{spec['num_output']}", key="shared_filters",
                             hint="a shared filter is applied depthwise")
        for key in ("weight_filler", "bias_filler"):
            if spec.get(key) is not None:
                shape = self._weight_shape(spec, c) if key == "weight_filler" else \
                    (int(spec["num_output"]),)
                problem = filler_problem(spec[key], shape)
                if problem:
                    raise spec.error(f"{key}: {problem}", key=key)
        # The constructor's remaining checks (filler preconditions) on a bodiless module.
        with torch.device("meta"):
            self._module(spec, c)
        tops = [(n, int(spec["num_output"])) + tuple(out_hw)]
        if len(spec.tops) == 2:
            tops.append((n, 1) + tuple(out_hw))
        return tops

    def build(self, spec: LayerSpec, shapes: List[Shape]) -> nn.Module:
        self.infer(spec, shapes)
        module = self._module(spec, shapes[0][1])
        _fill_caffe(module, spec)
        module._kernel_input = len(shapes[1]) == 6
        module._mask_top = len(spec.tops) == 2
        return module

    def flops(self, spec: LayerSpec, shapes: List[Shape], out_shapes: List[Shape]) -> int:
        geo = _Geometry(spec, self.transposed)
        n, c = shapes[0][:2]
        out_hw = out_shapes[0][2:]
        taps = geo.kernel[0] * geo.kernel[1]
        o = int(spec["num_output"])
        # K * x per input channel and tap, then the multiply-adds with the weight
        per_pixel = c * taps * (3 if spec["shared_filters"] else 2 * o + 1)
        total = n * out_hw[0] * out_hw[1] * per_pixel
        if spec["bias_term"]:
            total += numel(out_shapes[0])
        if len(shapes[1]) == 4:
            total += _kernel_flops(spec, n, shapes[1][1], geo, out_hw)
        return total


@register("PacConv")
class PacConv(_PacConvBase):
    """Pixel-adaptive convolution (:class:`pacnet.pac.PacConv2d`).

    Bottoms: input N x C x H x W, then a guide N x Cg x H x W (optionally followed by a
    mask N x 1 x H x W) or a precomputed kernel N x 1 x kh x kw x H' x W'.
    Tops: N x num_output x H' x W' with H' = floor((H + 2 pad - dilation (k - 1) - 1) /
    stride) + 1 (as Convolution); with a mask, an optional second top, the output mask
    N x 1 x H' x W'.  pad must be at most dilation*(kernel_size-1)/2.
    Blobs: ``weight`` [num_output, C, kh, kw] ([1, 1, kh, kw] shared), ``bias``
    [num_output], then, when the kernel type has them, ``inv_alpha``, ``inv_lambda``
    (0-dim) and a ``full_{w}`` ``smooth_kernel`` [1, 1, w, w].
    """

    params = CONV_PARAMS


@register("PacConvTranspose")
class PacConvTranspose(_PacConvBase):
    """Pixel-adaptive transposed convolution (:class:`pacnet.pac.PacConvTranspose2d`).

    Bottoms: input N x C x H x W, then a guide N x Cg x H' x W' at the **output** size
    (optionally followed by a mask N x 1 x H x W at the input size) or a precomputed kernel
    N x 1 x kh x kw x H' x W' (``PacKernel`` with ``transposed: true``).
    Tops: N x num_output x H' x W', H' = (H - 1) stride - 2 pad + dilation (k - 1) + 1 +
    output_pad (as nn.ConvTranspose2d); optional output mask N x 1 x H' x W'.
    Blobs: ``weight`` [C, num_output, kh, kw] (not flipped: with K = 1 this is
    Deconvolution with the weight flipped), ``bias``, then ``inv_alpha``, ``inv_lambda``,
    ``smooth_kernel`` when present.  Any pad is allowed (it crops the output).
    """

    params = {**CONV_PARAMS, "output_pad": OUTPUT_PAD}
    transposed = True
    module_cls = PacConvTranspose2dLayer


# ----------------------------------------------------------------------------- PacPool


@register("PacPool")
class PacPool(Layer):
    """Pixel-adaptive pooling (:class:`pacnet.pac.PacPool2d`): a kernel-weighted **sum**.

    Bottoms: input N x C x H x W, then a guide N x Cg x H x W (Cg = C with channel_wise;
    optionally followed by a mask N x 1 x H x W) or a precomputed kernel
    N x (1|C) x kh x kw x H' x W' (C only with channel_wise).
    Tops: N x C x H' x W' (the Convolution size rule; stride defaults to 1); optional
    output mask N x 1 x H' x W'.  With normalize_kernel the sum becomes a weighted average
    over in-image taps.  Blobs: ``inv_alpha``, ``inv_lambda`` (length C for a channel-wise
    learnable inv kernel), ``smooth_kernel``, when the kernel type has them.
    """

    params = {
        "kernel_size": GEOMETRY["kernel_size"],
        **{k: v for k, v in GEOMETRY.items() if k != "kernel_size"},
        **KERNEL_PARAMS,
        "channel_wise": {"type": "boolean", "default": False,
                         "description": "one kernel per channel (the guide must have C "
                                        "channels)"},
    }
    bottoms = (2, 3)
    tops = (1, 2)
    blobs = ("inv_alpha", "inv_lambda", "smooth_kernel")

    def check(self, spec: LayerSpec) -> None:
        _check_common(spec, False)
        _check_mask_tops(spec, 2)

    def infer(self, spec: LayerSpec, shapes: List[Shape]) -> List[Shape]:
        _check_4d(spec, shapes[0], "the input (bottom 1)")
        geo = _Geometry(spec)
        n, c, h, w = shapes[0]
        out_hw = geo.nonempty_out_size(spec, (h, w))
        cw = bool(spec["channel_wise"])
        is_kernel = _check_guide_or_kernel(spec, shapes, (h, w), out_hw, (1, c) if cw else (1,),
                                           "the input size", (h, w))
        if cw and not is_kernel and shapes[1][1] != c:
            raise spec.shape_error(f"channel_wise needs a guide with the input's {c} channels, "
                                   f"got {shapes[1][1]}")
        tops = [(n, c) + tuple(out_hw)]
        if len(spec.tops) == 2:
            tops.append((n, 1) + tuple(out_hw))
        return tops

    def build(self, spec: LayerSpec, shapes: List[Shape]) -> nn.Module:
        self.infer(spec, shapes)
        geo = _Geometry(spec)
        c = shapes[0][1]
        module = _as_spec_error(spec, None, lambda: PacPool2dLayer(
            geo.kernel, stride=geo.stride, padding=geo.pad, dilation=geo.dilation,
            kernel_type=spec["kernel_type"], smooth_kernel_type=spec["smooth_kernel_type"],
            channel_wise=bool(spec["channel_wise"]),
            normalize_kernel=bool(spec["normalize_kernel"]),
            out_channels=c if spec["channel_wise"] else -1))
        module._kernel_input = len(shapes[1]) == 6
        module._mask_top = len(spec.tops) == 2
        return module

    def flops(self, spec: LayerSpec, shapes: List[Shape], out_shapes: List[Shape]) -> int:
        geo = _Geometry(spec)
        n = shapes[0][0]
        total = 2 * numel(out_shapes[0]) * geo.kernel[0] * geo.kernel[1]
        if len(shapes[1]) == 4:
            total += _kernel_flops(spec, n, shapes[1][1], geo, out_shapes[0][2:])
        return total


# ----------------------------------------------------------------------------- PacKernel


@register("PacKernel")
class PacKernel(Layer):
    """The adaptive kernel of a guide (:func:`pacnet.pac.packernel2d`), to feed PAC layers.

    Bottoms: guide N x Cg x H x W, optionally a mask N x 1 x Hm x Wm (the size of the PAC
    layer's *input*: H x W, or the low-resolution input when ``transposed``).
    Tops: K N x (1|Cg) x kh x kw x H' x W' (Cg with channel_wise) with H' the Convolution
    size rule, or H' = H when ``transposed`` (the guide is then at the transposed layer's
    output size and K is computed at stride 1 with "same" padding; stride, pad and
    output_pad describe that transposed layer).  With a mask, an optional second top: the
    output mask N x 1 x H' x W'.  Blobs: ``inv_alpha``, ``inv_lambda`` (length Cg for a
    channel-wise learnable inv kernel), ``smooth_kernel``, when the kernel type has them.
    """

    params = {
        **GEOMETRY,
        **KERNEL_PARAMS,
        "channel_wise": {"type": "boolean", "default": False,
                         "description": "one kernel per guide channel (for channel-wise PacPool)"},
        "transposed": {"type": "boolean", "default": False,
                       "description": "the kernel of a PacConvTranspose with these stride, pad, "
                                      "output_pad and dilation (guide at its output size)"},
        "output_pad": OUTPUT_PAD,
    }
    bottoms = (1, 2)
    tops = (1, 2)
    blobs = ("inv_alpha", "inv_lambda", "smooth_kernel")

    def check(self, spec: LayerSpec) -> None:
        _check_common(spec, bool(spec["transposed"]))
        _check_mask_tops(spec, 1)
        if not spec["transposed"] and spec.has("output_pad"):
            raise spec.error("output_pad only applies with transposed: true", key="output_pad")

    def _input_hw(self, spec: LayerSpec, geo: _Geometry, guide_hw) -> Tuple[int, int]:
        if not geo.transposed:
            return tuple(guide_hw)
        low = []
        for i in range(2):
            span = (guide_hw[i] - geo.output_pad[i] - 1 - (geo.kernel[i] - 1) * geo.dilation[i]
                    + 2 * geo.pad[i])
            if span < 0 or span % geo.stride[i]:
                raise spec.shape_error(
                    f"a guide of size {tuple(guide_hw)} is not the output size of a transposed "
                    f"convolution with kernel_size {geo.kernel}, stride {geo.stride}, pad "
                    f"{geo.pad}, output_pad {geo.output_pad}, dilation {geo.dilation}",
                    hint="give the guide at the PacConvTranspose layer's output size")
            low.append(span // geo.stride[i] + 1)
        return tuple(low)

    def infer(self, spec: LayerSpec, shapes: List[Shape]) -> List[Shape]:
        _check_4d(spec, shapes[0], "the guide (bottom 1)")
        geo = _Geometry(spec, bool(spec["transposed"]))
        n, cg, h, w = shapes[0]
        in_hw = self._input_hw(spec, geo, (h, w))
        out_hw = (h, w) if geo.transposed else geo.nonempty_out_size(spec, (h, w), "guide")
        if len(shapes) > 1 and tuple(shapes[1]) != (n, 1) + tuple(in_hw):
            raise spec.shape_error(f"the mask must be [{n}, 1, {in_hw[0]}, {in_hw[1]}] (the PAC "
                                   f"layer's input size), got {list(shapes[1])}")
        tops = [(n, cg if spec["channel_wise"] else 1) + geo.kernel + tuple(out_hw)]
        if len(spec.tops) == 2:
            tops.append((n, 1) + tuple(out_hw))
        return tops

    def build(self, spec: LayerSpec, shapes: List[Shape]) -> nn.Module:
        self.infer(spec, shapes)
        geo = _Geometry(spec, bool(spec["transposed"]))
        return _as_spec_error(spec, None, lambda: PacKernel2d(
            geo.kernel, geo.stride, geo.pad, geo.output_pad, geo.dilation,
            kernel_type=spec["kernel_type"], smooth_kernel_type=spec["smooth_kernel_type"],
            channel_wise=bool(spec["channel_wise"]),
            normalize_kernel=bool(spec["normalize_kernel"]), transposed=geo.transposed,
            channels=shapes[0][1], mask_top=len(spec.tops) == 2))

    def flops(self, spec: LayerSpec, shapes: List[Shape], out_shapes: List[Shape]) -> int:
        geo = _Geometry(spec, bool(spec["transposed"]))
        return _kernel_flops(spec, shapes[0][0], shapes[0][1], geo, out_shapes[0][-2:])
