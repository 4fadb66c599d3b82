"""Pixel-adaptive layers: ``PacConv``, ``PacConvTranspose``, ``PacPool`` and ``PacKernel``,
on 4-D (N x C x H x W) and 5-D (N x C x D x H x W: volumes, video clips) bottoms.

The built modules *are* :class:`pacnet.pac.PacConv2d` / ``PacConvTranspose2d`` /
``PacPool2d`` (their ``...3d`` twins for 5-D bottoms; subclassed only to take the bottoms
positionally), so a layer's ``state_dict`` keys are ``<layer>.weight``, ``<layer>.bias``,
``<layer>.inv_alpha``, ``<layer>.inv_lambda``, ``<layer>.smooth_kernel`` with the original
NVlabs/pacnet names and shapes: an original module's weights load into a layer unchanged.

The number of spatial axes r (2 or 3) comes from the input (bottom 1), as for Caffe's N-D
Convolution.  Bottoms of the PAC layers: ``input`` (N x C x *sizes) then either

* a **guide** of the input's rank (N x Cg x *sizes; for ``PacConvTranspose`` at the
  *output* size), from which the layer computes its adaptive kernel, optionally followed by
  a **mask** (N x 1 x *sizes at the input size, 1 = valid; then a second top may return
  the output mask N x 1 x *out), or
* a precomputed **kernel** K ((2+2r)-D: N x 1 x *k x *out, e.g. the top of a ``PacKernel``
  layer, so one K can feed several PAC layers).

Which one is decided by the rank of the second bottom: (2+r)-D is a guide, (2+2r)-D a
kernel (the two cannot be confused, so no parameter is needed).

Parameter names follow Caffe where it has them: ``num_output``, ``kernel_size``, ``pad``,
``stride``, ``dilation`` (one value for every spatial axis, or one per axis: ``[h, w]``,
``[d, h, w]``; 2-D also ``kernel_h`` + ``kernel_w``, ``pad_h`` + ``pad_w``, ``stride_h`` +
``stride_w``), ``bias_term``, ``weight_filler``, ``bias_filler``; the transposed layer's
extra rows/columns (planes) are ``output_pad`` (PyTorch's ``output_padding``).
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
from pacnet.layers.common import (POSITIVE_INT, ConvGeometry, blob_kind, fill_, filler,
                                  filler_problem, int_or_list, numel, per_axis, size_str,
                                  spatial_rank, written_rank)
from pacnet.registry import Layer, LayerSpec, Shape, register

# ----------------------------------------------------------------------------- schema


def _int(description: str, minimum: int) -> dict:
    return {"type": "integer", "minimum": minimum, "description": description}


GEOMETRY = {
    "kernel_size": int_or_list("filter size (odd): one value for every spatial axis, or one "
                               "per axis ([h, w] or [d, h, w]); 2-D also kernel_h/kernel_w",
                               minimum=1),
    "kernel_h": _int("filter height (2-D, with kernel_w, instead of kernel_size)", 1),
    "kernel_w": _int("filter width (2-D, with kernel_h, instead of kernel_size)", 1),
    "pad": int_or_list("zero padding on both sides: one value for every axis or one per axis "
                       "(default 0); at most dilation*(kernel_size-1)/2 except for transposed "
                       "layers"),
    "pad_h": _int("padding of the height (2-D, with pad_w, instead of pad)", 0),
    "pad_w": _int("padding of the width (2-D, with pad_h, instead of pad)", 0),
    "stride": int_or_list("stride: one value for every axis or one per axis (default 1)",
                          minimum=1),
    "stride_h": _int("vertical stride (2-D, with stride_w, instead of stride)", 1),
    "stride_w": _int("horizontal stride (2-D, with stride_h, instead of stride)", 1),
    "dilation": int_or_list("spacing of the filter taps: one value for every axis or one per "
                            "axis (default 1)", minimum=1),
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
                                          "'gaussian' (fixed binomial 1/4, 1/2, 1/4 on every "
                                          "axis), 'average_{w}' (fixed box of width w) or "
                                          "'full_{w}' (learnable, width w) smoothing of the "
                                          "guide; w odd"},
    "normalize_kernel": {"type": "boolean", "default": False,
                         "description": "divide the kernel by its sum over the in-input taps "
                                        "(a weighted average instead of a weighted sum)"},
}

OUTPUT_PAD = int_or_list("extra rows/columns (planes) at the end of each axis of a transposed "
                         "output (PyTorch's output_padding): one value for every axis or one "
                         "per axis, smaller than stride or dilation", default=0)

CONV_PARAMS = {
    "num_output": {**POSITIVE_INT, "description": "number of output channels O"},
    **GEOMETRY,
    "bias_term": {"type": "boolean", "default": True,
                  "description": "add a learned bias per output channel"},
    **KERNEL_PARAMS,
    "shared_filters": {"type": "boolean", "default": False,
                       "description": "one filter applied depthwise (needs num_output = input "
                                      "channels); weight blob 1 x 1 x *kernel"},
    "filler": {"enum": list(pac._FILLERS), "default": "uniform",
               "description": "the original's initialisation: uniform U(+-1/sqrt(C*prod(k))) "
                              "(times C when shared), linear (bilinear/trilinear upsampling, "
                              "transposed only), crf / crf_perturbed (PacCRF; square/cubic "
                              "kernels), pool / crf_pool (fixed ones, without the centre for "
                              "crf_pool; needs shared_filters)"},
    # No default: absent means "use the PAC filler".
    "weight_filler": {k: v for k, v in filler("Caffe filler of the weight blob; replaces "
                                              "'filler' when written").items() if k != "default"},
    "bias_filler": {k: v for k, v in filler("Caffe filler of the bias blob; replaces 'filler' "
                                            "when written").items() if k != "default"},
}


# ----------------------------------------------------------------------------- helpers

_FORMS = ConvGeometry.FORMS + (("output_pad", None, None),)


class _Geometry:
    """A PAC layer's window for ``rank`` spatial axes: Caffe's geometry
    (:class:`~pacnet.layers.common.ConvGeometry`) and the transposed layer's ``output_pad``."""

    def __init__(self, spec: LayerSpec, rank: int, transposed: bool = False) -> None:
        geo = ConvGeometry.of(spec, rank)
        self.rank, self.transposed = rank, transposed
        self.kernel, self.pad, self.stride, self.dilation = (geo.kernel, geo.pad, geo.stride,
                                                             geo.dilation)
        op = spec.get("output_pad", 0) if transposed else 0
        self.output_pad = per_axis(spec, "output_pad", op if isinstance(op, list) else [op],
                                   rank)
        self._conv = geo

    @classmethod
    def as_written(cls, spec: LayerSpec, transposed: bool) -> "_Geometry":
        """The geometry before any bottom is known (for ``check()``): lists give the rank;
        single values stand for every axis (checked as one axis)."""
        return cls(spec, written_rank(spec, _FORMS if transposed else ConvGeometry.FORMS) or 1,
                   transposed)

    def out_size(self, sizes) -> Tuple[int, ...]:
        if self.transposed:
            return self._conv.transposed_out_size(sizes, self.output_pad)
        return self._conv.out_size(sizes)

    def nonempty_out_size(self, spec: LayerSpec, sizes, what: str = "input") -> Tuple[int, ...]:
        """:meth:`out_size`, refused with the layer's shape error when it would be empty."""
        out = self.out_size(sizes)
        if min(out) < 1:
            raise spec.shape_error(f"output would be empty ({size_str(out)}) for {what} "
                                   f"{size_str(sizes)}", hint=f"use a larger {what} or a smaller "
                                                              f"kernel, dilation or pad")
        return out

    def in_size(self, spec: LayerSpec, guide_sizes) -> Tuple[int, ...]:
        """The input size of a transposed layer whose output (guide) size is ``guide_sizes``
        (the guide's own size when not transposed)."""
        if not self.transposed:
            return tuple(guide_sizes)
        low = []
        for i, n in enumerate(guide_sizes):
            span = n - self.output_pad[i] - 1 - (self.kernel[i] - 1) * self.dilation[i] \
                + 2 * self.pad[i]
            if span < 0 or span % self.stride[i]:
                raise spec.shape_error(
                    f"a guide of size {size_str(guide_sizes)} is not the output size of a "
                    f"transposed convolution with kernel_size {list(self.kernel)}, stride "
                    f"{list(self.stride)}, pad {list(self.pad)}, output_pad "
                    f"{list(self.output_pad)}, dilation {list(self.dilation)}",
                    hint="give the guide at the PacConvTranspose layer's output size")
            low.append(span // self.stride[i] + 1)
        return tuple(low)

    def module_kwargs(self) -> dict:
        kwargs = dict(stride=self.stride, padding=self.pad, dilation=self.dilation)
        if self.transposed:
            kwargs["output_padding"] = self.output_pad
        return kwargs


def _as_spec_error(spec: LayerSpec, key: Optional[str], fn: Callable[[], Any]) -> Any:
    """Run ``fn``; a PacnetValueError from the Python API becomes this layer's error."""
    try:
        return fn()
    except PacnetValueError as err:
        raise spec.error(err.message, key=key, hint=err.hint) from None


def _check_common(spec: LayerSpec, transposed: bool) -> None:
    """The checks that need no bottom: odd kernel, padding limit (or output_pad), types."""
    geo = _Geometry.as_written(spec, transposed)
    _as_spec_error(spec, "kernel_size", lambda: pac._odd_kernel(geo.kernel, rank=geo.rank))
    if transposed:
        _as_spec_error(spec, "output_pad", lambda: pac._check_output_padding(
            geo.output_pad, geo.stride, geo.dilation))
    else:
        _as_spec_error(spec, "pad", lambda: pac._check_padding_limit(geo.pad, geo.kernel,
                                                                     geo.dilation))
    _as_spec_error(spec, "kernel_type", lambda: pac._parse_kernel_type(spec["kernel_type"]))
    _as_spec_error(spec, "smooth_kernel_type",
                   lambda: pac._parse_smooth_kernel_type(spec["smooth_kernel_type"]))


def _check_mask_tops(spec: LayerSpec, n_data_bottoms: int) -> None:
    if len(spec.tops) == 2 and len(spec.bottoms) <= n_data_bottoms:
        raise spec.error("a second top (the output mask) needs a mask bottom",
                         hint=f"add the mask as bottom {n_data_bottoms + 1} or remove the "
                              "second top")


def _dims(values) -> str:
    return ", ".join(str(v) for v in values)


def _check_guide_or_kernel(spec: LayerSpec, shapes: List[Shape], geo: _Geometry, guide_sizes,
                           out, kernel_channels: Tuple[int, ...], guide_what: str,
                           mask_sizes) -> bool:
    """Check bottoms 1 (guide or K) and 2 (mask); True when bottom 1 is a kernel."""
    n, r = shapes[0][0], geo.rank
    second = shapes[1]
    if len(second) == 2 + 2 * r:
        expect = (n,) + tuple(geo.kernel) + tuple(out)
        if second[1] not in kernel_channels or (second[0],) + tuple(second[2:]) != expect:
            chans = "|".join(str(c) for c in kernel_channels)
            raise spec.shape_error(
                f"the kernel bottom must be [{n}, {chans}, {_dims(geo.kernel)}, {_dims(out)}], "
                f"got {list(second)}",
                hint="compute it with a PacKernel layer with the same kernel_size, stride, pad "
                     "and dilation")
        if len(shapes) > 2:
            raise spec.error("a mask bottom cannot be used with a precomputed kernel bottom",
                             hint="give the mask to the PacKernel layer instead")
        return True
    if len(second) != 2 + r:
        other = {4: 2, 6: 2, 5: 3, 8: 3}.get(len(second))
        raise spec.shape_error(
            f"bottom 2 must be a {2 + r}-D guide or {'an' if r == 3 else 'a'} {2 + 2 * r}-D "
            f"kernel for the {blob_kind(r)} input, got shape {list(second)}",
            hint=(f"a {len(second)}-D bottom is for a {blob_kind(other)} input; guide and "
                  "input need the same number of axes" if other and other != r else None))
    if second[0] != n or tuple(second[2:]) != tuple(guide_sizes):
        raise spec.shape_error(f"the guide must be [{n}, Cg, {_dims(guide_sizes)}] "
                               f"({guide_what}), got {list(second)}",
                               hint="resize the guide to that size")
    if len(shapes) > 2:
        mask = shapes[2]
        if tuple(mask) != (n, 1) + tuple(mask_sizes):
            raise spec.shape_error(f"the mask must be [{n}, 1, {_dims(mask_sizes)}], got "
                                   f"{list(mask)}")
    return False


def _kernel_flops(spec: LayerSpec, n: int, cg: int, geo: _Geometry, out) -> int:
    """Distances (3 per guide channel and tap) plus the kernel function, per K element."""
    taps = numel(geo.kernel) * numel(out) * n
    return taps * (3 * cg + 2) + (taps * 2 if spec["normalize_kernel"] else 0)


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
            return (out, _mask_blob(out_mask, self.rank)) if self._mask_top else out
        return out


def _mask_blob(m: torch.Tensor, rank: int) -> torch.Tensor:
    """An output mask ``N x 1 x 1... x *out`` as the blob ``N x 1 x *out``."""
    return m.reshape(m.shape[0], 1, *m.shape[m.dim() - rank:])


class PacConv2dLayer(_LayerForward, pac.PacConv2d):
    """:class:`~pacnet.pac.PacConv2d` taking its bottoms positionally (same state_dict)."""


class PacConv3dLayer(_LayerForward, pac.PacConv3d):
    """:class:`~pacnet.pac.PacConv3d` taking its bottoms positionally (same state_dict)."""


class PacConvTranspose2dLayer(_LayerForward, pac.PacConvTranspose2d):
    """:class:`~pacnet.pac.PacConvTranspose2d` taking its bottoms positionally (same state_dict)."""


class PacConvTranspose3dLayer(_LayerForward, pac.PacConvTranspose3d):
    """:class:`~pacnet.pac.PacConvTranspose3d` taking its bottoms positionally (same state_dict)."""


class PacPool2dLayer(_LayerForward, pac.PacPool2d):
    """:class:`~pacnet.pac.PacPool2d` taking its bottoms positionally (same state_dict)."""


class PacPool3dLayer(_LayerForward, pac.PacPool3d):
    """:class:`~pacnet.pac.PacPool3d` taking its bottoms positionally (same state_dict)."""


class _PacKernelModule(pac._PacConvNd):
    """The adaptive kernel of a guide as a module: ``forward(guide[, mask]) -> K[, mask]``.

    Holds ``inv_alpha``/``inv_lambda`` (vectors of length Cg for a channel-wise learnable
    inv kernel) and ``smooth_kernel`` like the PAC modules; the output mask is
    ``N x 1 x *out``.
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
            return kernel, _mask_blob(out_mask, self.rank)
        return kernel


class PacKernel2d(_PacKernelModule):
    """:class:`_PacKernelModule` for 4-D guides (:func:`pacnet.pac.packernel2d`)."""

    rank = 2


class PacKernel3d(_PacKernelModule):
    """:class:`_PacKernelModule` for 5-D guides (:func:`pacnet.pac.packernel3d`)."""

    rank = 3


def _fill_caffe(module: nn.Module, spec: LayerSpec) -> None:
    if spec.get("weight_filler") is not None:
        fill_(module.weight.data, spec["weight_filler"])
    if spec.get("bias_filler") is not None and module.bias is not None:
        fill_(module.bias.data, spec["bias_filler"])


def _built(spec: LayerSpec, module: nn.Module, shapes: List[Shape], rank: int) -> nn.Module:
    module._kernel_input = len(shapes[1]) == 2 + 2 * rank
    module._mask_top = len(spec.tops) == 2
    return module


# ----------------------------------------------------------------------------- PacConv


class _PacConvBase(Layer):
    transposed = False
    modules = {2: PacConv2dLayer, 3: PacConv3dLayer}
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

    def _geometry(self, spec: LayerSpec, shapes: List[Shape]) -> _Geometry:
        return _Geometry(spec, spatial_rank(spec, shapes[0], "input (bottom 1)"),
                         self.transposed)

    def _weight_shape(self, spec: LayerSpec, c: int, geo: _Geometry) -> Shape:
        o = int(spec["num_output"])
        if spec["shared_filters"]:
            return (1, 1) + geo.kernel
        return ((c, o) if self.transposed else (o, c)) + geo.kernel

    def _module(self, spec: LayerSpec, c: int, geo: _Geometry) -> nn.Module:
        kwargs = dict(geo.module_kwargs(), bias=bool(spec["bias_term"]),
                      kernel_type=spec["kernel_type"],
                      smooth_kernel_type=spec["smooth_kernel_type"],
                      normalize_kernel=bool(spec["normalize_kernel"]),
                      shared_filters=bool(spec["shared_filters"]), filler=spec["filler"])
        key = "filler" if spec["filler"] != "uniform" else "num_output"
        return _as_spec_error(spec, key, lambda: self.modules[geo.rank](
            c, int(spec["num_output"]), geo.kernel, **kwargs))

    def infer(self, spec: LayerSpec, shapes: List[Shape]) -> List[Shape]:
        geo = self._geometry(spec, shapes)
        n, c = shapes[0][:2]
        sizes = tuple(shapes[0][2:])
        out = geo.nonempty_out_size(spec, sizes)
        guide_sizes = out if self.transposed else sizes
        what = "the output size" if self.transposed else "the input size"
        _check_guide_or_kernel(spec, shapes, geo, guide_sizes, out, (1,), what, sizes)
        if spec["shared_filters"] and int(spec["num_output"]) != c:
            raise spec.error(f"shared_filters needs num_output == input channels ({c}), got "
                             f"{spec['num_output']}", key="shared_filters",
                             hint="a shared filter is applied depthwise")
        for key in ("weight_filler", "bias_filler"):
            if spec.get(key) is not None:
                shape = self._weight_shape(spec, c, geo) if key == "weight_filler" else \
                    (int(spec["num_output"]),)
                problem = filler_problem(spec[key], shape)
                if problem:
                    raise spec.error(f"{key}: {problem}", key=key)
        # The constructor's remaining checks (filler preconditions) on a bodiless module.
        with torch.device("meta"):
            self._module(spec, c, geo)
        tops = [(n, int(spec["num_output"])) + out]
        if len(spec.tops) == 2:
            tops.append((n, 1) + out)
        return tops

    def build(self, spec: LayerSpec, shapes: List[Shape]) -> nn.Module:
        self.infer(spec, shapes)
        geo = self._geometry(spec, shapes)
        module = self._module(spec, shapes[0][1], geo)
        _fill_caffe(module, spec)
        return _built(spec, module, shapes, geo.rank)

    def flops(self, spec: LayerSpec, shapes: List[Shape], out_shapes: List[Shape]) -> int:
        geo = self._geometry(spec, shapes)
        n, c = shapes[0][:2]
        out = out_shapes[0][2:]
        o = int(spec["num_output"])
        # K * x per input channel and tap, then the multiply-adds with the weight
        per_position = c * numel(geo.kernel) * (3 if spec["shared_filters"] else 2 * o + 1)
        total = n * numel(out) * per_position
        if spec["bias_term"]:
            total += numel(out_shapes[0])
        if len(shapes[1]) == 2 + geo.rank:
            total += _kernel_flops(spec, n, shapes[1][1], geo, out)
        return total


@register("PacConv")
class PacConv(_PacConvBase):
    """Pixel-adaptive convolution (:class:`pacnet.pac.PacConv2d`, :class:`~pacnet.pac.PacConv3d`
    for 5-D bottoms).

    Bottoms: input N x C x *sizes (H x W or D x H x W), then a guide N x Cg x *sizes
    (optionally followed by a mask N x 1 x *sizes) or a precomputed kernel
    N x 1 x *kernel x *out.  Tops: N x num_output x *out with, per axis,
    out = floor((in + 2 pad - dilation (k - 1) - 1) / stride) + 1 (as Convolution); with a
    mask, an optional second top, the output mask N x 1 x *out.  pad must be at most
    dilation*(kernel_size-1)/2.  Blobs: ``weight`` [num_output, C, *kernel]
    ([1, 1, *kernel] shared), ``bias`` [num_output], then, when the kernel type has them,
    ``inv_alpha``, ``inv_lambda`` (0-dim) and a ``full_{w}`` ``smooth_kernel``
    [1, 1, w, w(, w)].
    """

    params = CONV_PARAMS


@register("PacConvTranspose")
class PacConvTranspose(_PacConvBase):
    """Pixel-adaptive transposed convolution (:class:`pacnet.pac.PacConvTranspose2d`,
    :class:`~pacnet.pac.PacConvTranspose3d` for 5-D bottoms).

    Bottoms: input N x C x *sizes, then a guide N x Cg x *out at the **output** size
    (optionally followed by a mask N x 1 x *sizes at the input size) or a precomputed kernel
    N x 1 x *kernel x *out (``PacKernel`` with ``transposed: true``).
    Tops: N x num_output x *out, per axis out = (in - 1) stride - 2 pad + dilation (k - 1) +
    1 + output_pad (as nn.ConvTranspose2d/3d); optional output mask N x 1 x *out.
    Blobs: ``weight`` [C, num_output, *kernel] (not flipped: with K = 1 this is
    Deconvolution with the weight flipped), ``bias``, then ``inv_alpha``, ``inv_lambda``,
    ``smooth_kernel`` when present.  Any pad is allowed (it crops the output).
    """

    params = {**CONV_PARAMS, "output_pad": OUTPUT_PAD}
    transposed = True
    modules = {2: PacConvTranspose2dLayer, 3: PacConvTranspose3dLayer}


# ----------------------------------------------------------------------------- PacPool


@register("PacPool")
class PacPool(Layer):
    """Pixel-adaptive pooling (:class:`pacnet.pac.PacPool2d`, :class:`~pacnet.pac.PacPool3d`
    for 5-D bottoms): a kernel-weighted **sum**.

    Bottoms: input N x C x *sizes, then a guide N x Cg x *sizes (Cg = C with channel_wise;
    optionally followed by a mask N x 1 x *sizes) or a precomputed kernel
    N x (1|C) x *kernel x *out (C only with channel_wise).
    Tops: N x C x *out (the Convolution size rule; stride defaults to 1); optional
    output mask N x 1 x *out.  With normalize_kernel the sum becomes a weighted average
    over in-input taps.  Blobs: ``inv_alpha``, ``inv_lambda`` (length C for a channel-wise
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
    modules = {2: PacPool2dLayer, 3: PacPool3dLayer}

    def check(self, spec: LayerSpec) -> None:
        _check_common(spec, False)
        _check_mask_tops(spec, 2)

    def _geometry(self, spec: LayerSpec, shapes: List[Shape]) -> _Geometry:
        return _Geometry(spec, spatial_rank(spec, shapes[0], "input (bottom 1)"))

    def infer(self, spec: LayerSpec, shapes: List[Shape]) -> List[Shape]:
        geo = self._geometry(spec, shapes)
        n, c = shapes[0][:2]
        sizes = tuple(shapes[0][2:])
        out = geo.nonempty_out_size(spec, sizes)
        cw = bool(spec["channel_wise"])
        is_kernel = _check_guide_or_kernel(spec, shapes, geo, sizes, out, (1, c) if cw else (1,),
                                           "the input size", sizes)
        if cw and not is_kernel and shapes[1][1] != c:
            raise spec.shape_error(f"channel_wise needs a guide with the input's {c} channels, "
                                   f"got {shapes[1][1]}")
        tops = [(n, c) + out]
        if len(spec.tops) == 2:
            tops.append((n, 1) + out)
        return tops

    def build(self, spec: LayerSpec, shapes: List[Shape]) -> nn.Module:
        self.infer(spec, shapes)
        geo = self._geometry(spec, shapes)
        c = shapes[0][1]
        module = _as_spec_error(spec, None, lambda: self.modules[geo.rank](
            geo.kernel, **geo.module_kwargs(), kernel_type=spec["kernel_type"],
            smooth_kernel_type=spec["smooth_kernel_type"],
            channel_wise=bool(spec["channel_wise"]),
            normalize_kernel=bool(spec["normalize_kernel"]),
            out_channels=c if spec["channel_wise"] else -1))
        return _built(spec, module, shapes, geo.rank)

    def flops(self, spec: LayerSpec, shapes: List[Shape], out_shapes: List[Shape]) -> int:
        geo = self._geometry(spec, shapes)
        total = 2 * numel(out_shapes[0]) * numel(geo.kernel)
        if len(shapes[1]) == 2 + geo.rank:
            total += _kernel_flops(spec, shapes[0][0], shapes[1][1], geo, out_shapes[0][2:])
        return total


# ----------------------------------------------------------------------------- PacKernel


@register("PacKernel")
class PacKernel(Layer):
    """The adaptive kernel of a guide (:func:`pacnet.pac.packernel2d`,
    :func:`~pacnet.pac.packernel3d` for 5-D guides), to feed PAC layers.

    Bottoms: guide N x Cg x *sizes (H x W or D x H x W), optionally a mask N x 1 x *m (the
    size of the PAC layer's *input*: the guide's, or the low-resolution input when
    ``transposed``).  Tops: K N x (1|Cg) x *kernel x *out (Cg with channel_wise) with out
    the Convolution size rule, or the guide's size when ``transposed`` (the guide is then at
    the transposed layer's output size and K is computed at stride 1 with "same" padding;
    stride, pad and output_pad describe that transposed layer).  With a mask, an optional
    second top: the output mask N x 1 x *out.  Blobs: ``inv_alpha``, ``inv_lambda`` (length
    Cg for a channel-wise learnable inv kernel), ``smooth_kernel``, when the kernel type has
    them.
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
    modules = {2: PacKernel2d, 3: PacKernel3d}

    def check(self, spec: LayerSpec) -> None:
        _check_common(spec, bool(spec["transposed"]))
        _check_mask_tops(spec, 1)
        if not spec["transposed"] and spec.has("output_pad"):
            raise spec.error("output_pad only applies with transposed: true", key="output_pad")

    def _geometry(self, spec: LayerSpec, shapes: List[Shape]) -> _Geometry:
        return _Geometry(spec, spatial_rank(spec, shapes[0], "guide (bottom 1)"),
                         bool(spec["transposed"]))

    def infer(self, spec: LayerSpec, shapes: List[Shape]) -> List[Shape]:
        geo = self._geometry(spec, shapes)
        n, cg = shapes[0][:2]
        sizes = tuple(shapes[0][2:])
        in_sizes = geo.in_size(spec, sizes)
        out = sizes if geo.transposed else geo.nonempty_out_size(spec, sizes, "guide")
        if len(shapes) > 1 and tuple(shapes[1]) != (n, 1) + in_sizes:
            raise spec.shape_error(f"the mask must be [{n}, 1, {_dims(in_sizes)}] (the PAC "
                                   f"layer's input size), got {list(shapes[1])}")
        tops = [(n, cg if spec["channel_wise"] else 1) + geo.kernel + out]
        if len(spec.tops) == 2:
            tops.append((n, 1) + out)
        return tops

    def build(self, spec: LayerSpec, shapes: List[Shape]) -> nn.Module:
        self.infer(spec, shapes)
        geo = self._geometry(spec, shapes)
        return _as_spec_error(spec, None, lambda: self.modules[geo.rank](
            geo.kernel, geo.stride, geo.pad, geo.output_pad, geo.dilation,
            kernel_type=spec["kernel_type"], smooth_kernel_type=spec["smooth_kernel_type"],
            channel_wise=bool(spec["channel_wise"]),
            normalize_kernel=bool(spec["normalize_kernel"]), transposed=geo.transposed,
            channels=shapes[0][1], mask_top=len(spec.tops) == 2))

    def flops(self, spec: LayerSpec, shapes: List[Shape], out_shapes: List[Shape]) -> int:
        geo = self._geometry(spec, shapes)
        return _kernel_flops(spec, shapes[0][0], shapes[0][1], geo,
                             out_shapes[0][2 + geo.rank:])
