"""Pooling (Caffe, exact) and AdaptivePooling (mmseg-style heads).

Caffe's pooling (``pooling_layer.cpp``, caffe.md §7.2) differs from PyTorch's defaults:

* out = ceil((in + 2p - k) / s) + 1 (``round_mode: CEIL``, the default; FLOOR uses floor);
* clip rule, only when pad_h or pad_w is non-zero (on *both* axes then): if
  (out - 1) s >= in + p, out -= 1;
* MAX windows are clipped to the image (padding never wins);
* AVE divides by (hend - hstart)(wend - wstart) with hend = min(hstart + k, in + p) taken
  *before* clipping to the image: padded zeros count, the ceil overhang does not.

Where PyTorch's ``max_pool2d``/``avg_pool2d(ceil_mode, count_include_pad=True)`` compute
exactly that (p <= k/2 and the same output size), the module calls them.  Otherwise
(p > k/2, which PyTorch rejects), and whenever torch.export or torch.compile traces it, it
pads explicitly to Caffe's windows (-inf for MAX, 0 for AVE; a negative pad crops), pools
with p = 0 and rescales AVE means to Caffe's divisors, all sized from the input at hand.

One Caffe behaviour is refused: with pad 0, CEIL rounding and stride > kernel, Caffe can
emit a last window that starts past the input (MAX gives -FLT_MAX, AVE divides by zero).
That is never intended, so shape inference raises a ShapeError naming the fixes.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from pacnet.layers.common import int_or_pair, numel, spatial_pair
from pacnet.registry import Layer, LayerSpec, Shape, register

Pair = Tuple[int, int]


def caffe_pool_out(size: int, kernel: int, pad: int, stride: int, ceil: bool,
                   clip: bool) -> int:
    """Caffe's pooled size along one axis; ``clip`` = (pad_h or pad_w non-zero)."""
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


class CaffePool2d(nn.Module):
    """MAX/AVE pooling with Caffe's sizes and divisors (see the module docstring).

    ``explicit=False`` calls PyTorch's pooling directly where it agrees with Caffe for the
    input's size (and pads explicitly where not); ``explicit=True`` always pads, pools with
    p = 0 and divides.  The explicit path
    computes its sizes from the input it is given, so it serves every input size and is
    what ``torch.export``/``torch.compile`` trace (PyTorch's ``ceil_mode`` relies on a clip
    rule that ONNX's shape inference does not know).  With ``mask`` (MAX only) it also
    returns Caffe's argmax top: the flat index h*W + w into the input plane, as a float
    tensor.
    """

    def __init__(self, pool: str, kernel: Pair, stride: Pair, pad: Pair, ceil: bool,
                 explicit: bool, mask: bool = False) -> None:
        super().__init__()
        self.pool, self.kernel, self.stride, self.pad = pool, kernel, stride, pad
        self.ceil, self.explicit, self.mask = ceil, explicit, mask
        self.clip = pad != (0, 0)

    def extra_repr(self) -> str:
        return (f"{self.pool}, kernel={self.kernel}, stride={self.stride}, pad={self.pad}, "
                f"ceil={self.ceil}, explicit={self.explicit}")

    def _sizes(self, hw):
        """Caffe's output size and the bottom/right padding (negative: a crop) that puts its
        last window's end at the padded input's end, per axis; ints or symbolic sizes."""
        outs, extras = [], []
        for n, k, s, p in zip(hw, self.kernel, self.stride, self.pad):
            num = n + 2 * p - k
            out = (num + s - 1) // s + 1 if self.ceil else num // s + 1
            if self.clip:  # Caffe drops a last window that starts in the padding
                out = torch.sym_min(out, (n + p - 1) // s + 1)
            outs.append(out)
            extras.append((out - 1) * s + k - n - p)
        return outs, extras

    def _native_fits(self, hw) -> bool:
        """Whether PyTorch's own pooling computes Caffe's windows for this input size."""
        outs, _ = self._sizes(hw)
        return all(p <= k // 2 and _torch_pool_out(n, k, p, s, self.ceil) == o
                   for n, k, p, s, o in zip(hw, self.kernel, self.pad, self.stride, outs))

    def forward(self, x: torch.Tensor):
        if (not self.explicit and not torch.compiler.is_compiling()
                and self._native_fits(x.shape[-2:])):
            if self.pool == "MAX":
                if self.mask:
                    y, idx = F.max_pool2d(x, self.kernel, self.stride, self.pad,
                                          ceil_mode=self.ceil, return_indices=True)
                    return y, idx.to(y.dtype)
                return F.max_pool2d(x, self.kernel, self.stride, self.pad, ceil_mode=self.ceil)
            return F.avg_pool2d(x, self.kernel, self.stride, self.pad, ceil_mode=self.ceil,
                                count_include_pad=True)
        (ph, pw), (h, w) = self.pad, x.shape[-2:]
        (ho, wo), (eh, ew) = self._sizes((h, w))
        if self.pool == "MAX":
            xp = F.pad(x, (pw, ew, ph, eh), value=float("-inf"))
            if self.mask:
                y, idx = F.max_pool2d(xp, self.kernel, self.stride, return_indices=True)
                wp = xp.shape[-1]
                idx = (idx // wp - ph) * w + (idx % wp - pw)
                return y, idx.to(y.dtype)
            return F.max_pool2d(xp, self.kernel, self.stride)
        # AVE: the window mean times k*k / Caffe's divisor, min(k, n + 2p - i*s) per axis
        mean = F.avg_pool2d(F.pad(x, (pw, ew, ph, eh)), self.kernel, self.stride)
        counts = [torch.clamp(n + 2 * p - s * torch.arange(o, device=x.device, dtype=x.dtype),
                              max=k)
                  for n, o, k, s, p in zip((h, w), (ho, wo), self.kernel, self.stride, self.pad)]
        area = self.kernel[0] * self.kernel[1]
        return mean * (area / (counts[0][:, None] * counts[1][None, :]))


_POOL_INT = {"type": "integer", "minimum": 1}


@register("Pooling")
class Pooling(Layer):
    """Caffe pooling (MAX or AVE), bit-for-bit Caffe's sizes, windows and AVE divisors.

    Shapes: N x C x H x W -> N x C x H' x W' with
    H' = ceil((H + 2 pad_h - kernel_h) / stride_h) + 1 (floor with ``round_mode: FLOOR``),
    minus 1 when pad_h or pad_w > 0 and (H' - 1) stride_h >= H + pad_h (W' alike);
    ``global_pooling``: H' = W' = 1.  A second top (MAX only) is Caffe's argmax mask:
    the index h*W + w of each maximum in its input plane, N x C x H' x W', as floats.
    STOCHASTIC pooling is not supported.
    """

    params = {
        "pool": {"enum": ["MAX", "AVE", "STOCHASTIC"], "default": "MAX",
                 "description": "MAX or AVE (STOCHASTIC is rejected)"},
        "kernel_size": int_or_pair("window size, one value or [h, w] (or kernel_h/kernel_w); "
                                   "required unless global_pooling", minimum=1),
        "kernel_h": {**_POOL_INT, "description": "window height (with kernel_w)"},
        "kernel_w": {**_POOL_INT, "description": "window width (with kernel_h)"},
        "stride": int_or_pair("stride, one value or [h, w] (default 1)", minimum=1),
        "stride_h": {**_POOL_INT, "description": "vertical stride (with stride_w)"},
        "stride_w": {**_POOL_INT, "description": "horizontal stride (with stride_h)"},
        "pad": int_or_pair("implicit padding on both sides, one value or [h, w] (default 0); "
                           "must be < kernel"),
        "pad_h": {"type": "integer", "minimum": 0, "description": "vertical padding (with pad_w)"},
        "pad_w": {"type": "integer", "minimum": 0, "description": "horizontal padding (with pad_h)"},
        "global_pooling": {"type": "boolean", "default": False,
                           "description": "pool the whole H x W plane to 1 x 1 (no kernel, pad 0, stride 1)"},
        "round_mode": {"enum": ["CEIL", "FLOOR"], "default": "CEIL",
                       "description": "rounding of the output size (Caffe's default CEIL)"},
        "engine": {"enum": ["DEFAULT", "CAFFE", "CUDNN"], "default": "DEFAULT",
                   "description": "Caffe implementation choice; ignored"},
    }
    bottoms = (1, 1)
    tops = (1, 2)

    def _geometry(self, spec: LayerSpec, hw: Optional[Pair] = None) -> Tuple[Pair, Pair, Pair]:
        if spec["global_pooling"]:
            kernel = hw if hw is not None else (1, 1)
        else:
            kernel = spatial_pair(spec, "kernel_size", "kernel_h", "kernel_w", None)
        stride = spatial_pair(spec, "stride", "stride_h", "stride_w", 1)
        pad = spatial_pair(spec, "pad", "pad_h", "pad_w", 0)
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
        kernel, stride, pad = self._geometry(spec)
        if spec["global_pooling"] and (pad != (0, 0) or stride != (1, 1)):
            key = "pad" if pad != (0, 0) else "stride"
            raise spec.error("global_pooling needs pad 0 and stride 1", key=key,
                             hint=f"remove {key}")
        for axis, k, p in zip("hw", kernel, pad):
            if not spec["global_pooling"] and p >= k:
                key = "pad" if spec.get("pad") is not None else f"pad_{axis}"
                raise spec.error(f"pad must be smaller than the kernel, got pad_{axis} {p} >= "
                                 f"kernel_{axis} {k}", key=key, hint=f"use pad <= {k - 1}")

    def _sizes(self, spec: LayerSpec, shape: Shape):
        if len(shape) != 4:
            raise spec.shape_error(f"needs a 4-D bottom (N x C x H x W), got shape {list(shape)}")
        hw = (shape[2], shape[3])
        kernel, stride, pad = self._geometry(spec, hw)
        ceil = spec["round_mode"] == "CEIL"
        clip = pad != (0, 0)
        out = tuple(caffe_pool_out(n, k, p, s, ceil, clip)
                    for n, k, p, s in zip(hw, kernel, pad, stride))
        if min(out) < 1:
            raise spec.shape_error(
                f"output would be empty ({out[0]}x{out[1]}): input {hw[0]}x{hw[1]} with pad "
                f"{list(pad)} is smaller than the kernel {list(kernel)}",
                hint="use a smaller kernel_size or more padding")
        for axis, o, s, p, n, k in zip("hw", out, stride, pad, hw, kernel):
            if (o - 1) * s - p >= n:
                raise spec.shape_error(
                    f"Caffe's last pooling window along {'H' if axis == 'h' else 'W'} starts at "
                    f"{(o - 1) * s} past the input size {n} (kernel {k}, stride {s}, pad 0, "
                    "CEIL rounding): Caffe outputs -FLT_MAX (MAX) or divides by 0 (AVE) there",
                    hint="use round_mode: FLOOR, a kernel_size >= stride, or pad: 1")
        return hw, kernel, stride, pad, ceil, out

    def infer(self, spec: LayerSpec, shapes: List[Shape]) -> List[Shape]:
        (shape,) = shapes
        *_, out = self._sizes(spec, shape)
        top = (shape[0], shape[1]) + out
        return [top] * len(spec.tops or (None,))

    def build(self, spec: LayerSpec, shapes: List[Shape], explicit: Optional[bool] = None) -> nn.Module:
        """The pooling module; ``explicit`` forces (True) or forbids (False) the padded
        lowering, default: only where PyTorch's own pooling would differ from Caffe."""
        hw, kernel, stride, pad, ceil, out = self._sizes(spec, shapes[0])
        native_ok = all(p <= k // 2 and _torch_pool_out(n, k, p, s, ceil) == o
                        for n, k, p, s, o in zip(hw, kernel, pad, stride, out))
        if explicit is None:
            explicit = not native_ok
        elif not explicit and not native_ok:
            raise ValueError("PyTorch's pooling cannot reproduce Caffe here; use explicit=True")
        return CaffePool2d(spec["pool"], kernel, stride, pad, ceil, explicit,
                           mask=len(spec.tops) > 1)

    def flops(self, spec: LayerSpec, shapes: List[Shape], out_shapes: List[Shape]) -> int:
        hw, kernel, *_ = self._sizes(spec, shapes[0])
        return numel(out_shapes[0]) * kernel[0] * kernel[1]


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
