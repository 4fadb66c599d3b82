"""SegawareConvolution: a convolution whose taps are weighted by a per-pixel mask.

This is what the segmentation-aware conv of Harley et al. computes with five Caffe layers
(``Im2col(x)``, ``Tile(mask)``, ``Eltwise PROD``, ``Convolution(bottom_is_im2col)``):

    out[n, o, y] = bias[o] + sum_{c, t} W[o, c, t] * mask[n, t, y] * x[n, c, pos(y, t)]

with ``pos(y, t) = y*stride - pad + t*dilation`` (zero padding), ``t`` running over the
``kh*kw`` taps in row-major order.  It runs on the fused PAC kernel
(:func:`pacnet.kernels.pac.ops.pac_conv2d`), so the ``C*k*k``-channel column tensor is never
built whole (the CPU kernel builds it one block of about 16 MiB at a time).  The fusion pass (:mod:`pacnet.fusion`) rewrites the Caffe chain into this layer;
it can also be written directly.

Blobs are those of ``Convolution`` (``weight`` [O, C, kh, kw], ``bias`` [O]), so weights
of the unfused net (and Caffe models) load unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from pacnet.layers.common import ConvGeometry, numel, spatial_rank
from pacnet.layers.conv import CONV_PARAMS, _check_conv_common, _init
from pacnet.registry import Layer, register


class SegawareConv2d(nn.Module):
    """Mask-weighted convolution.  Shapes: x N x C x H x W, mask N x (kh*kw) x H' x W'
    -> N x O x H' x W'."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride, padding, dilation,
                 bias: bool):
        super().__init__()
        self.kernel_size, self.stride, self.padding, self.dilation = kernel_size, stride, padding, dilation
        self.weight = nn.Parameter(torch.zeros(out_channels, in_channels, *kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        from pacnet.kernels.pac.ops import pac_conv2d

        n, _, h, w = mask.shape
        kernel = mask.reshape(n, 1, self.kernel_size[0], self.kernel_size[1], h, w)
        return pac_conv2d(x, kernel, self.weight, self.bias, self.stride, self.padding, self.dilation)


@register("SegawareConvolution")
class SegawareConvolution(Layer):
    """Convolution with taps weighted by a per-pixel mask (the fused segaware conv).

    Bottoms: ``x`` N x C x H x W and ``mask`` N x (kh*kw) x H' x W' (H', W' the conv output
    size).  Top: N x num_output x H' x W'.  Equal to Im2col(x) * Tile(mask, C) followed by a
    ``bottom_is_im2col`` Convolution with the same weights.  Parameters as Convolution
    (``group`` must be 1; kernel sizes odd).
    """

    params = {k: v for k, v in CONV_PARAMS.items() if k != "bottom_is_im2col"}
    required = ("num_output",)
    bottoms = (2, 2)
    blobs = ("weight", "bias")

    def check(self, spec):
        _check_conv_common(spec)
        geo = ConvGeometry.of(spec, 2)  # the fused kernel is 2-D
        if int(spec["group"]) != 1:
            raise spec.error("group must be 1", key="group")
        if any(k % 2 == 0 for k in geo.kernel):
            raise spec.error(f"kernel size must be odd, got {list(geo.kernel)}", key="kernel_size")

    def infer(self, spec, shapes):
        spatial_rank(spec, shapes[0], "x bottom", ranks=(2,))
        geo = ConvGeometry.of(spec, 2)
        (n, _, h, w), mask = shapes[0], shapes[1]
        oh, ow = geo.out_size((h, w))
        expected = (n, numel(geo.kernel), oh, ow)
        if tuple(mask) != expected:
            raise spec.shape_error(f"mask must be {expected} (N x kh*kw x H' x W'), got {tuple(mask)}")
        return [(n, int(spec["num_output"]), oh, ow)]

    def build(self, spec, shapes):
        geo = ConvGeometry.of(spec, 2)
        module = SegawareConv2d(shapes[0][1], int(spec["num_output"]), geo.kernel, geo.stride,
                                geo.pad, geo.dilation, bool(spec["bias_term"]))
        return _init(module, spec)

    def flops(self, spec, shapes, out_shapes):
        n, o, oh, ow = out_shapes[0]
        return 2 * n * o * oh * ow * shapes[0][1] * numel(ConvGeometry.of(spec, 2).kernel)
