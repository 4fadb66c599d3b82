"""Pooling (Caffe, exact, 2-D and 3-D) and AdaptivePooling (mmseg-style heads).

Caffe's pooling (``pooling_layer.cpp``, caffe.md §7.2) differs from PyTorch's defaults:

* out = ceil((in + 2p - k) / s) + 1 (``round_mode: CEIL``, the default; FLOOR uses floor);
* clip rule, only when some pad is non-zero (on *every* axis then): if
  (out - 1) s >= in + p, out -= 1;
* MAX windows are clipped to the image (padding never wins);
* AVE divides by the product over the axes of (end - start) with end = min(start + k,
  in + p) taken *before* clipping to the image: padded zeros count, the ceil overhang
  does not.

BVLC's Pooling is 2-D; on 5-D bottoms (N x C x D x H x W) the same rules apply to each of
the three spatial axes, as in the N-D pooling of the Caffe forks for volumes (one
``kernel_size``/``stride``/``pad`` value for every axis or one per axis).

Where PyTorch's ``max_pool2d``/``avg_pool2d`` (``3d``) with ``ceil_mode`` and
``count_include_pad=True`` compute exactly that (p <= k/2 and the same output size), the
module calls them.  Otherwise (p > k/2, which PyTorch rejects) it pads explicitly (-inf for
MAX, 0 for AVE), pools with p = 0, crops to Caffe's size and divides AVE sums by Caffe's
divisors.

One Caffe behaviour is refused: with pad 0, CEIL rounding and stride > kernel, Caffe can
emit a last window that starts past the input (MAX gives -FLT_MAX, AVE divides by zero).
That is never intended, so shape inference raises a ShapeError naming the fixes.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from pacnet.layers.common import (SPATIAL_AXES, int_or_list, int_or_pair, numel, size_str,
                                  spatial, spatial_pair, spatial_rank, written_rank)
from pacnet.registry import Layer, LayerSpec, Shape, register

Pair = Tuple[int, int]
Sizes = Tuple[int, ...]

_MAX_POOL = {2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOL = {2: F.avg_pool2d, 3: F.avg_pool3d}


def caffe_pool_out(size: int, kernel: int, pad: int, stride: int, ceil: bool,
                   clip: bool) -> int:
    """Caffe's pooled size along one axis; ``clip`` = (some pad non-zero)."""
    num = size + 2 * pad - kernel
    out = (-(-num // stride) if ceil else num // stride) + 1
    if clip and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def _torch_pool_out(size: int, kernel: int, pad: int, stride: int, ceil: bool) -> int:
    # aten/src/ATen/native/Pool.h: pooling_output_shape (dilation 1)
    out = (size + 2 * pad - (kernel - 1) - 1 + (stride - 1 if ceil else 0)) // stride + 1
    if ceil and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def ave_divisors(size: int, out: int, kernel: int, pad: int, stride: int) -> List[int]:
    """Caffe's AVE divisor along one axis for each output index."""
    divs = []
    for i in range(out):
        start = i * stride - pad
        end = min(start + kernel, size + pad)
        divs.append(end - start)
    return divs


class CaffePool(nn.Module):
    """MAX/AVE pooling over 2 or 3 spatial axes with Caffe's sizes and divisors (see the
    module docstring).

    ``explicit=False`` calls PyTorch's pooling directly (only valid where it agrees with
    Caffe); ``explicit=True`` pads, pools with p = 0, crops and divides.  With ``mask``
    (MAX only) it also returns Caffe's argmax top: the flat index of each maximum in its
    input plane or volume (h*W + w, or (d*H + h)*W + w), as a float tensor.
    """

    def __init__(self, pool: str, kernel: Sizes, stride: Sizes, pad: Sizes, in_size: Sizes,
                 out_size: Sizes, ceil: bool, explicit: bool, mask: bool = False) -> None:
        super().__init__()
        self.pool, self.kernel, self.stride, self.pad = pool, kernel, stride, pad
        self.in_size, self.out_size, self.ceil = in_size, out_size, ceil
        self.explicit, self.mask = explicit, mask
        # padding at the far end of each axis so that every Caffe window lies inside
        self.extra = tuple(max(0, (o - 1) * s + k - p - n) for o, s, k, p, n in
                           zip(out_size, stride, kernel, pad, in_size))
        if explicit and pool == "AVE":
            div = torch.ones((), dtype=torch.float64)
            for axis in range(len(kernel)):
                d = ave_divisors(in_size[axis], out_size[axis], kernel[axis], pad[axis],
                                 stride[axis])
                div = div[..., None] * torch.tensor(d, dtype=torch.float64)
            self.register_buffer("divisor", div.float(), persistent=False)

    def extra_repr(self) -> str:
        return (f"{self.pool}, kernel={self.kernel}, stride={self.stride}, pad={self.pad}, "
                f"out={self.out_size}, ceil={self.ceil}, explicit={self.explicit}")

    def forward(self, x: torch.Tensor):
        rank = len(self.kernel)
        max_pool, avg_pool = _MAX_POOL[rank], _AVG_POOL[rank]
        if not self.explicit:
            if self.pool == "MAX":
                if self.mask:
                    y, idx = max_pool(x, self.kernel, self.stride, self.pad, ceil_mode=self.ceil,
                                      return_indices=True)
                    return y, idx.to(y.dtype)
                return max_pool(x, self.kernel, self.stride, self.pad, ceil_mode=self.ceil)
            return avg_pool(x, self.kernel, self.stride, self.pad, ceil_mode=self.ceil,
                            count_include_pad=True)
        # F.pad lists (begin, end) pairs from the last axis backwards
        padding = [q for p, e in zip(reversed(self.pad), reversed(self.extra)) for q in (p, e)]
        crop = (slice(None), slice(None)) + tuple(slice(0, o) for o in self.out_size)
        if self.pool == "MAX":
            xp = F.pad(x, padding, value=float("-inf"))
            if self.mask:
                y, idx = max_pool(xp, self.kernel, self.stride, return_indices=True)
                y, idx = y[crop], idx[crop]
                # the flat index into the padded input -> into the input
                flat, scale = torch.zeros_like(idx), 1
                for padded, p, n in reversed(list(zip(xp.shape[2:], self.pad, self.in_size))):
                    flat += (idx % padded - p) * scale
                    idx = idx // padded
                    scale *= n
                return y, flat.to(y.dtype)
            return max_pool(xp, self.kernel, self.stride)[crop]
        xp = F.pad(x, padding)
        sums = avg_pool(xp, self.kernel, self.stride, divisor_override=1)[crop]
        return sums / self.divisor.to(sums.dtype)


_POOL_INT = {"type": "integer", "minimum": 1}
_FORMS = (("kernel_size", "kernel_h", "kernel_w"), ("stride", "stride_h", "stride_w"),
          ("pad", "pad_h", "pad_w"))


@register("Pooling")
class Pooling(Layer):
    """Caffe pooling (MAX or AVE), bit-for-bit Caffe's sizes, windows and AVE divisors.

    Shapes: N x C x H x W -> N x C x H' x W', or N x C x D x H x W -> N x C x D' x H' x W'
    (the rules of each axis applied to all three), with per axis
    out = ceil((in + 2 pad - kernel) / stride) + 1 (floor with ``round_mode: FLOOR``),
    minus 1 when some pad > 0 and (out - 1) stride >= in + pad; ``global_pooling``: every
    spatial size 1.  A second top (MAX only) is Caffe's argmax mask: the flat index of
    each maximum in its input plane (h*W + w) or volume ((d*H + h)*W + w), same shape as
    the first top, as floats.  STOCHASTIC pooling is not supported.
    """

    params = {
        "pool": {"enum": ["MAX", "AVE", "STOCHASTIC"], "default": "MAX",
                 "description": "MAX or AVE (STOCHASTIC is rejected)"},
        "kernel_size": int_or_list("window size: one value for every spatial axis or one per "
                                   "axis ([h, w] or [d, h, w]; 2-D also kernel_h/kernel_w); "
                                   "required unless global_pooling", minimum=1),
        "kernel_h": {**_POOL_INT, "description": "window height (2-D, with kernel_w)"},
        "kernel_w": {**_POOL_INT, "description": "window width (2-D, with kernel_h)"},
        "stride": int_or_list("stride: one value for every axis or one per axis (default 1)",
                              minimum=1),
        "stride_h": {**_POOL_INT, "description": "vertical stride (2-D, with stride_w)"},
        "stride_w": {**_POOL_INT, "description": "horizontal stride (2-D, with stride_h)"},
        "pad": int_or_list("implicit padding on both sides: one value for every axis or one per "
                           "axis (default 0); must be < kernel"),
        "pad_h": {"type": "integer", "minimum": 0,
                  "description": "vertical padding (2-D, with pad_w)"},
        "pad_w": {"type": "integer", "minimum": 0,
                  "description": "horizontal padding (2-D, with pad_h)"},
        "global_pooling": {"type": "boolean", "default": False,
                           "description": "pool every spatial axis to size 1 (no kernel, pad 0, "
                                          "stride 1)"},
        "round_mode": {"enum": ["CEIL", "FLOOR"], "default": "CEIL",
                       "description": "rounding of the output size (Caffe's default CEIL)"},
        "engine": {"enum": ["DEFAULT", "CAFFE", "CUDNN"], "default": "DEFAULT",
                   "description": "Caffe implementation choice; ignored"},
    }
    bottoms = (1, 1)
    tops = (1, 2)

    def _geometry(self, spec: LayerSpec, rank: Optional[int],
                  sizes: Optional[Sequence[int]] = None
                  ) -> Tuple[Optional[Sizes], Sizes, Sizes]:
        """(kernel, stride, pad) for ``rank`` spatial axes (None: as written, see
        :func:`~pacnet.layers.common.spatial`); with ``global_pooling`` the kernel is
        ``sizes`` (None while they are unknown)."""
        if spec["global_pooling"]:
            kernel = tuple(sizes) if sizes is not None else None
        else:
            kernel = spatial(spec, "kernel_size", "kernel_h", "kernel_w", None, rank)
        stride = spatial(spec, "stride", "stride_h", "stride_w", 1, rank)
        pad = spatial(spec, "pad", "pad_h", "pad_w", 0, rank)
        return kernel, stride, pad

    def check(self, spec: LayerSpec) -> None:
        if spec["pool"] == "STOCHASTIC":
            raise spec.error("STOCHASTIC pooling is not supported", key="pool",
                             hint="use pool: MAX or pool: AVE")
        if len(spec.tops) > 1 and spec["pool"] != "MAX":
            raise spec.error(f"a second top (the argmax mask) needs pool: MAX, got {spec['pool']}",
                             key="pool", hint="remove the second top")
        if spec["global_pooling"]:
            given = [k for k in ("kernel_size", "kernel_h", "kernel_w") if spec.get(k) is not None]
            if given:
                raise spec.error("with global_pooling the kernel size is the input size; "
                                 f"remove {given[0]}", key=given[0])
        kernel, stride, pad = self._geometry(spec, written_rank(spec, _FORMS))
        if spec["global_pooling"]:
            if any(pad) or any(s != 1 for s in stride):
                key = "pad" if any(pad) else "stride"
                raise spec.error("global_pooling needs pad 0 and stride 1", key=key,
                                 hint=f"remove {key}")
            return
        for axis, (k, p) in enumerate(zip(kernel, pad)):
            if p >= k:
                if spec.get("pad_h") is not None:
                    key = f"pad_{'hw'[axis]}"
                    shown = f"{key} {p} >= kernel_{'hw'[axis]} {k}"
                else:
                    key = "pad"
                    along = f" along {SPATIAL_AXES[len(pad)][axis]}" if len(pad) > 1 else ""
                    shown = f"pad {p} >= kernel {k}{along}"
                raise spec.error(f"pad must be smaller than the kernel, got {shown}", key=key,
                                 hint=f"use pad <= {k - 1}")

    def _sizes(self, spec: LayerSpec, shape: Shape):
        rank = spatial_rank(spec, shape)
        sizes = tuple(shape[2:])
        kernel, stride, pad = self._geometry(spec, rank, sizes)
        ceil = spec["round_mode"] == "CEIL"
        clip = any(pad)
        out = tuple(caffe_pool_out(n, k, p, s, ceil, clip)
                    for n, k, p, s in zip(sizes, kernel, pad, stride))
        if min(out) < 1:
            raise spec.shape_error(
                f"output would be empty ({size_str(out)}): input {size_str(sizes)} with pad "
                f"{list(pad)} is smaller than the kernel {list(kernel)}",
                hint="use a smaller kernel_size or more padding")
        for axis, o, s, p, n, k in zip(SPATIAL_AXES[rank], out, stride, pad, sizes, kernel):
            if (o - 1) * s - p >= n:
                raise spec.shape_error(
                    f"Caffe's last pooling window along {axis} starts at {(o - 1) * s} past the "
                    f"input size {n} (kernel {k}, stride {s}, pad 0, CEIL rounding): Caffe "
                    "outputs -FLT_MAX (MAX) or divides by 0 (AVE) there",
                    hint="use round_mode: FLOOR, a kernel_size >= stride, or pad: 1")
        return sizes, kernel, stride, pad, ceil, out

    def infer(self, spec: LayerSpec, shapes: List[Shape]) -> List[Shape]:
        (shape,) = shapes
        *_, out = self._sizes(spec, shape)
        top = (shape[0], shape[1]) + out
        return [top] * len(spec.tops or (None,))

    def build(self, spec: LayerSpec, shapes: List[Shape], explicit: Optional[bool] = None) -> nn.Module:
        """The pooling module; ``explicit`` forces (True) or forbids (False) the padded
        lowering, default: only where PyTorch's own pooling would differ from Caffe."""
        sizes, kernel, stride, pad, ceil, out = self._sizes(spec, shapes[0])
        native_ok = all(p <= k // 2 and _torch_pool_out(n, k, p, s, ceil) == o
                        for n, k, p, s, o in zip(sizes, kernel, pad, stride, out))
        if len(sizes) == 3 and spec["pool"] == "AVE":
            # avg_pool3d refuses an input smaller than the kernel, even when padded
            native_ok = native_ok and all(n >= k for n, k in zip(sizes, kernel))
        if explicit is None:
            explicit = not native_ok
        elif not explicit and not native_ok:
            raise ValueError("PyTorch's pooling cannot reproduce Caffe here; use explicit=True")
        return CaffePool(spec["pool"], kernel, stride, pad, sizes, out, ceil, explicit,
                         mask=len(spec.tops) > 1)

    def flops(self, spec: LayerSpec, shapes: List[Shape], out_shapes: List[Shape]) -> int:
        _, kernel, *_ = self._sizes(spec, shapes[0])
        return numel(out_shapes[0]) * numel(kernel)


class AdaptivePool2d(nn.Module):
    """``nn.AdaptiveAvgPool2d`` / ``nn.AdaptiveMaxPool2d`` behind one name."""

    def __init__(self, pool: str, output_size: Pair) -> None:
        super().__init__()
        self.pool, self.output_size = pool, output_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool == "AVE":
            return F.adaptive_avg_pool2d(x, self.output_size)
        return F.adaptive_max_pool2d(x, self.output_size)

    def extra_repr(self) -> str:
        return f"{self.pool}, output_size={self.output_size}"


@register("AdaptivePooling")
class AdaptivePooling(Layer):
    """Adaptive pooling to a fixed output size (not in Caffe; mmseg's PPM / ASPP image pool).

    Shapes: N x C x H x W -> N x C x oh x ow.  Output cell i pools input rows
    floor(i H / oh) .. ceil((i + 1) H / oh) - 1 (PyTorch's adaptive bins; columns alike).
    At H divisible by oh this equals Caffe AVE/MAX pooling with kernel = stride = H / oh.
    """

    params = {
        "output_size": int_or_pair("output size, one value or [oh, ow]", minimum=1),
        "pool": {"enum": ["AVE", "MAX"], "default": "AVE", "description": "average or max"},
    }
    required = ("output_size",)
    bottoms = (1, 1)
    tops = (1, 1)

    def _out(self, spec: LayerSpec) -> Pair:
        return spatial_pair(spec, "output_size", "output_h", "output_w", None)

    def infer(self, spec: LayerSpec, shapes: List[Shape]) -> List[Shape]:
        (shape,) = shapes
        if len(shape) != 4:
            raise spec.shape_error(f"needs a 4-D bottom (N x C x H x W), got shape {list(shape)}")
        if min(shape[2:]) < 1:
            raise spec.shape_error(f"needs a non-empty input plane, got {list(shape)}")
        return [(shape[0], shape[1]) + self._out(spec)]

    def build(self, spec: LayerSpec, shapes: List[Shape]) -> nn.Module:
        self.infer(spec, shapes)
        return AdaptivePool2d(spec["pool"], self._out(spec))

    def flops(self, spec: LayerSpec, shapes: List[Shape], out_shapes: List[Shape]) -> int:
        oh, ow = self._out(spec)
        h, w = shapes[0][2:]
        # each output cell reads about ceil(H/oh) x ceil(W/ow) inputs
        return numel(out_shapes[0]) * math.ceil(h / oh) * math.ceil(w / ow)
