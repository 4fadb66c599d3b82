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
``count_include_pad=True`` compute exactly that for the input at hand (p <= k/2 and the
same output size), the module calls them.  Otherwise (p > k/2, which PyTorch rejects), and
whenever torch.export or torch.compile traces it, it pads explicitly to Caffe's windows
(-inf for MAX, 0 for AVE; a negative pad crops), pools with p = 0 and rescales AVE means to
Caffe's divisors.  Every size comes from the input, so one module serves any input size.

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


class CaffePool(nn.Module):
    """MAX/AVE pooling over 2 or 3 spatial axes with Caffe's sizes and divisors (see the
    module docstring), sized from each input.

    ``kernel`` None pools every spatial axis whole (``global_pooling``).  ``explicit``:
    None calls PyTorch's pooling where it agrees with Caffe for the input's size and pads
    explicitly elsewhere (and always while torch.export/torch.compile trace it: PyTorch's
    ``ceil_mode`` relies on a clip rule that ONNX's shape inference does not know); True
    always pads, pools with p = 0 and divides; False always calls PyTorch's pooling (only
    valid where it agrees with Caffe).  With ``mask`` (MAX only) it also returns Caffe's
    argmax top: the flat index of each maximum in its input plane or volume (h*W + w, or
    (d*H + h)*W + w), as a float tensor.
    """

    def __init__(self, pool: str, kernel: Optional[Sizes], stride: Sizes, pad: Sizes,
                 ceil: bool, explicit: Optional[bool] = None, mask: bool = False) -> None:
        super().__init__()
        self.pool, self.kernel, self.stride, self.pad = pool, kernel, stride, pad
        self.ceil, self.explicit, self.mask = ceil, explicit, mask
        self.clip = any(pad)

    def extra_repr(self) -> str:
        kernel = "global" if self.kernel is None else self.kernel
        return (f"{self.pool}, kernel={kernel}, stride={self.stride}, pad={self.pad}, "
                f"ceil={self.ceil}, explicit={self.explicit}")

    def _sizes(self, sizes):
        """(kernel, Caffe's output size, the far-end padding (negative: a crop) that ends
        the last window at the padded input's end), per axis; ints or symbolic sizes."""
        kernel = tuple(sizes) if self.kernel is None else self.kernel
        outs, extras = [], []
        for n, k, s, p in zip(sizes, kernel, self.stride, self.pad):
            num = n + 2 * p - k
            out = (num + s - 1) // s + 1 if self.ceil else num // s + 1
            if self.clip:  # Caffe drops a last window that starts in the padding
                out = torch.sym_min(out, (n + p - 1) // s + 1)
            outs.append(out)
            extras.append((out - 1) * s + k - n - p)
        return kernel, outs, extras

    def _native_fits(self, sizes) -> bool:
        """Whether PyTorch's own pooling computes Caffe's windows for this input size."""
        kernel, outs, _ = self._sizes(sizes)
        fits = all(p <= k // 2 and _torch_pool_out(n, k, p, s, self.ceil) == o
                   for n, k, p, s, o in zip(sizes, kernel, self.pad, self.stride, outs))
        if len(sizes) == 3 and self.pool == "AVE":
            # avg_pool3d refuses an input smaller than the kernel, even when padded
            fits = fits and all(n >= k for n, k in zip(sizes, kernel))
        return fits

    def native_path(self, sizes) -> bool:
        """Whether an input of these spatial sizes goes through PyTorch's own pooling."""
        if self.explicit is not None:
            return not self.explicit
        return not torch.compiler.is_compiling() and self._native_fits(tuple(sizes))

    def forward(self, x: torch.Tensor):
        sizes = tuple(x.shape[2:])
        max_pool, avg_pool = _MAX_POOL[len(sizes)], _AVG_POOL[len(sizes)]
        kernel, outs, extras = self._sizes(sizes)
        if self.native_path(sizes):
            if self.pool == "MAX":
                if self.mask:
                    y, idx = max_pool(x, kernel, self.stride, self.pad, ceil_mode=self.ceil,
                                      return_indices=True)
                    return y, idx.to(y.dtype)
                return max_pool(x, kernel, self.stride, self.pad, ceil_mode=self.ceil)
            return avg_pool(x, kernel, self.stride, self.pad, ceil_mode=self.ceil,
                            count_include_pad=True)
        # F.pad lists (begin, end) pairs from the last axis backwards
        padding = [q for p, e in zip(reversed(self.pad), reversed(extras)) for q in (p, e)]
        if self.pool == "MAX":
            xp = F.pad(x, padding, value=float("-inf"))
            if not self.mask:
                return max_pool(xp, kernel, self.stride)
            y, idx = max_pool(xp, kernel, self.stride, return_indices=True)
            # the flat index into the padded input -> into the input
            flat, scale = torch.zeros_like(idx), 1
            for padded, p, n in reversed(list(zip(xp.shape[2:], self.pad, sizes))):
                flat += (idx % padded - p) * scale
                idx = idx // padded
                scale *= n
            return y, flat.to(y.dtype)
        # AVE: the window mean times the window volume / Caffe's divisor, which is the
        # product over the axes of min(k, n + 2p - i*s) (padded zeros count, the overhang not)
        mean = avg_pool(F.pad(x, padding), kernel, self.stride)
        divisor, volume = None, 1
        for n, o, k, s, p in zip(sizes, outs, kernel, self.stride, self.pad):
            count = torch.clamp(n + 2 * p - s * torch.arange(o, device=x.device, dtype=x.dtype),
                                max=k)
            divisor = count if divisor is None else divisor[..., None] * count
            volume *= k
        return mean * (volume / divisor)


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
        lowering, default: only where PyTorch's own pooling would differ from Caffe for the
        input at hand (:class:`CaffePool`)."""
        sizes, kernel, stride, pad, ceil, out = self._sizes(spec, shapes[0])
        native_ok = all(p <= k // 2 and _torch_pool_out(n, k, p, s, ceil) == o
                        for n, k, p, s, o in zip(sizes, kernel, pad, stride, out))
        if len(sizes) == 3 and spec["pool"] == "AVE":
            # avg_pool3d refuses an input smaller than the kernel, even when padded
            native_ok = native_ok and all(n >= k for n, k in zip(sizes, kernel))
        if explicit is False and not native_ok:
            raise ValueError("PyTorch's pooling cannot reproduce Caffe here; use explicit=True")
        return CaffePool(spec["pool"], None if spec["global_pooling"] else kernel, stride, pad,
                         ceil, explicit, mask=len(spec.tops) > 1)

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
