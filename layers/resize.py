"""Interp (DeepLab's bilinear resize, align-corners), Resize (PyTorch's interpolate) and Crop (BVLC).

Interp follows ``interp_layer.cpp`` + ``util/interp.cpp`` of the DeepLab-v2 fork
(caffe.md §5.1): crop by the non-positive ``pad_beg``/``pad_end``, then resize bilinearly
with align-corners geometry (source row = h' (H_eff - 1) / (H' - 1)).  The output size is
taken, in this order of precedence, from: shrink only -> (H_eff - 1) / s + 1; zoom only ->
H_eff + (H_eff - 1)(z - 1); height and width; shrink and zoom -> shrink, then zoom.  Crop
follows ``crop_layer.cpp`` (caffe.md §7.5) and crops blobs of any rank.  Resize is not
in Caffe: it is ``F.interpolate`` (bilinear on 4-D bottoms, trilinear on 5-D ones, nearest
on both; half-pixel or align-corners geometry; a scale factor or a size), which the
PyTorch-era nets (PAC joint upsampling, mmseg heads, video and volume nets) use.
"""

from __future__ import annotations

import math
from typing import Any, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.symbolic_shapes import statically_known_true

from pacnet.layers.common import (SPATIAL_AXES, blob_kind, check_same_rank, numel, per_axis,
                                  size_str, spatial_rank)
from pacnet.errors import ShapeError
from pacnet.registry import Layer, LayerSpec, Shape, register

# ----------------------------------------------------------------------------- Interp


def _given(spec: LayerSpec, key: str) -> bool:
    # Caffe's Interp tests has_<field>(), so "given" means written, not "non-default";
    # the schema gives these keys no default, hence "not None" == "written".
    return spec.get(key) is not None


def interp_factors(spec: LayerSpec) -> Tuple[Optional[int], ...]:
    """``(shrink_factor, zoom_factor, height, width)`` as written (None where not given)."""
    return tuple(int(spec[k]) if _given(spec, k) else None
                 for k in ("shrink_factor", "zoom_factor", "height", "width"))


def interp_out(h_eff, w_eff, shrink: Optional[int], zoom: Optional[int], height: Optional[int],
               width: Optional[int]) -> Optional[Tuple[Any, Any, str]]:
    """Caffe's Interp output size for an effective (cropped) input of ``h_eff x w_eff``
    (ints, or symbolic sizes while tracing) and the rule used; None if no rule applies."""
    if shrink is not None and zoom is None:
        return (h_eff - 1) // shrink + 1, (w_eff - 1) // shrink + 1, "shrink_factor"
    if zoom is not None and shrink is None:
        return h_eff + (h_eff - 1) * (zoom - 1), w_eff + (w_eff - 1) * (zoom - 1), "zoom_factor"
    if height is not None and width is not None:
        return height, width, "height"
    if shrink is not None and zoom is not None:
        h, w = (h_eff - 1) // shrink + 1, (w_eff - 1) // shrink + 1
        return h + (h - 1) * (zoom - 1), w + (w - 1) * (zoom - 1), "shrink_factor"
    return None


def interp_size(spec: LayerSpec, h_eff: int, w_eff: int) -> Tuple[int, int, str]:
    """Caffe's Interp output size for an effective (cropped) input, and the rule used."""
    out = interp_out(h_eff, w_eff, *interp_factors(spec))
    if out is None:
        raise spec.error("Interp needs shrink_factor, zoom_factor, or height and width",
                         key="height" if _given(spec, "height") or _given(spec, "width") else None,
                         hint="give e.g. 'zoom_factor: 8' or both 'height' and 'width'")
    return out


class InterpModule(nn.Module):
    """Crop ``[-pad_beg, H + pad_end)`` on both axes, then bilinear align-corners resize to
    Caffe's size for the cropped input (``factors``: see :func:`interp_out`), or to the
    spatial size of a second bottom."""

    def __init__(self, pad_beg: int, pad_end: int, factors: Tuple[Optional[int], ...]) -> None:
        super().__init__()
        self.pad_beg, self.pad_end, self.factors = pad_beg, pad_end, factors

    def forward(self, x: torch.Tensor, like: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not x.is_floating_point():  # Caffe blobs are floats; labels pass through as floats
            x = x.to(torch.get_default_dtype())
        crop = self.pad_beg + self.pad_end
        he, we = x.shape[2] + crop, x.shape[3] + crop
        x = x[:, :, -self.pad_beg:he - self.pad_beg, -self.pad_beg:we - self.pad_beg]
        size = tuple(like.shape[2:4]) if like is not None else interp_out(he, we, *self.factors)[:2]
        if statically_known_true(size[0] == he) and statically_known_true(size[1] == we):
            return x  # Caffe copies when the sizes are equal
        return F.interpolate(x, size=size, mode="bilinear", align_corners=True)

    def extra_repr(self) -> str:
        return f"pad_beg={self.pad_beg}, pad_end={self.pad_end}, factors={self.factors}"


@register("Interp")
class Interp(Layer):
    """Bilinear resize with align-corners geometry (DeepLab ``Interp``).

    Shapes: N x C x H x W -> N x C x H' x W'.  With H_eff = H + pad_beg + pad_end (pads
    <= 0 crop; the input is read from row/column -pad_beg), H' is, by precedence:
    shrink only (H_eff - 1) / shrink_factor + 1 (integer division); zoom only
    H_eff + (H_eff - 1)(zoom_factor - 1); ``height``/``width``; shrink and zoom: shrink
    first, then zoom on the shrunk size.  Parameters a rule ignores are ignored, as in
    Caffe.  With a second bottom (as in the PSPNet-era forks) the output takes its H x W
    and no size parameter may be given.

    Values: out[h'] = (1 - l) in[h0] + l in[h0 + 1], source row h' (H_eff - 1) / (H' - 1)
    (0 when H' = 1), = ``F.interpolate(..., align_corners=True)``.  Shrinking by s is an
    exact subsample (every s-th pixel) when (H_eff - 1) is divisible by (H' - 1): that is
    how DeepLab shrinks label maps.  Caffe computes the source position in float32 even for
    double blobs; this layer uses the tensor's precision (differences ~1e-7 in float64).
    """

    params = {
        "height": {"type": "integer", "minimum": 1,
                   "description": "output height (used with width when no shrink/zoom is given)"},
        "width": {"type": "integer", "minimum": 1,
                  "description": "output width (used with height when no shrink/zoom is given)"},
        "zoom_factor": {"type": "integer", "minimum": 1,
                        "description": "upsample: H' = H + (H - 1)(z - 1)  (unset by default)"},
        "shrink_factor": {"type": "integer", "minimum": 1,
                          "description": "downsample: H' = (H - 1) / s + 1  (unset by default)"},
        "pad_beg": {"type": "integer", "maximum": 0, "default": 0,
                    "description": "<= 0: rows/columns cropped at the top/left before resizing"},
        "pad_end": {"type": "integer", "maximum": 0, "default": 0,
                    "description": "<= 0: rows/columns cropped at the bottom/right before resizing"},
    }
    bottoms = (1, 2)
    tops = (1, 1)

    def check(self, spec: LayerSpec) -> None:
        size_keys = [k for k in ("shrink_factor", "zoom_factor", "height", "width") if _given(spec, k)]
        if len(spec.bottoms) > 1:
            if size_keys:
                raise spec.error(f"with a second bottom the output size comes from it; "
                                 f"remove {size_keys[0]}", key=size_keys[0])
            return
        interp_size(spec, 2, 2)  # raises when no rule applies

    def _eff(self, spec: LayerSpec, shape: Shape) -> Tuple[int, int]:
        if len(shape) != 4:
            raise spec.shape_error(f"needs a 4-D bottom (N x C x H x W), got shape {list(shape)}")
        crop = int(spec["pad_beg"]) + int(spec["pad_end"])
        he, we = shape[2] + crop, shape[3] + crop
        if he < 1 or we < 1:
            raise spec.shape_error(
                f"pad_beg + pad_end = {crop} crops the whole {shape[2]}x{shape[3]} input",
                hint="use smaller (less negative) pads")
        return he, we

    def gradient_bottoms(self, spec: LayerSpec) -> Tuple[bool, ...]:
        return (True,) + (False,) * (len(spec.bottoms) - 1)  # a reference shape

    def infer(self, spec: LayerSpec, shapes: List[Shape]) -> List[Shape]:
        shape = shapes[0]
        he, we = self._eff(spec, shape)
        if len(shapes) > 1:
            like = shapes[1]
            if len(like) != 4 or like[0] != shape[0] or min(like[2:]) < 1:
                raise spec.shape_error(f"the second bottom must be N x * x H' x W' with N = "
                                       f"{shape[0]}, got {list(like)}")
            return [(shape[0], shape[1], like[2], like[3])]
        ho, wo, rule = interp_size(spec, he, we)
        if ho < 1 or wo < 1:
            raise spec.shape_error(f"output would be empty ({ho}x{wo})", hint=f"check {rule}")
        return [(shape[0], shape[1], ho, wo)]

    def build(self, spec: LayerSpec, shapes: List[Shape]) -> nn.Module:
        self.infer(spec, shapes)
        return InterpModule(int(spec["pad_beg"]), int(spec["pad_end"]), interp_factors(spec))

    def flops(self, spec: LayerSpec, shapes: List[Shape], out_shapes: List[Shape]) -> int:
        return 8 * numel(out_shapes[0])  # 4 multiply-adds per output value


# ----------------------------------------------------------------------------- Resize


class ResizeModule(nn.Module):
    """``F.interpolate`` to a fixed size, by a scale factor, or to a second bottom's
    spatial size."""

    def __init__(self, mode: str, align_corners: Optional[bool], size: Optional[Tuple[int, ...]],
                 scale: Optional[Tuple[float, ...]]) -> None:
        super().__init__()
        self.mode, self.align_corners, self.size, self.scale = mode, align_corners, size, scale

    def forward(self, x: torch.Tensor, like: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not x.is_floating_point():
            x = x.to(torch.get_default_dtype())
        if like is not None:
            return F.interpolate(x, size=tuple(like.shape[2:]), mode=self.mode,
                                 align_corners=self.align_corners)
        if self.scale is not None:
            # The scale itself (not out/in) sets the sampling positions, as F.interpolate
            # with scale_factor does: src = (dst + 0.5) / scale - 0.5.
            return F.interpolate(x, scale_factor=self.scale, mode=self.mode, align_corners=self.align_corners)
        return F.interpolate(x, size=self.size, mode=self.mode, align_corners=self.align_corners)

    def extra_repr(self) -> str:
        how = f"scale_factor={self.scale}" if self.scale is not None else (
            f"size={self.size}" if self.size is not None else "size=bottom 1")
        return f"mode={self.mode!r}, {how}, align_corners={self.align_corners}"


#: The spatial rank each mode resizes (None: any).
_MODE_RANK = {"bilinear": 2, "trilinear": 3, "nearest": None}
_LINEAR_MODE = {2: "bilinear", 3: "trilinear"}
_SCALE_ITEM = {"type": "number", "exclusiveMinimum": 0}


@register("Resize")
class Resize(Layer):
    """Bilinear, trilinear or nearest resize as PyTorch's ``F.interpolate`` (not in Caffe).

    Shapes: N x C x H x W -> N x C x H' x W' (``bilinear``, ``nearest``), or
    N x C x D x H x W -> N x C x D' x H' x W' (``trilinear``, ``nearest``), with exactly
    one of: ``scale_factor`` s (one number for every spatial axis, or one per axis):
    out = floor(in s), PyTorch's rule; ``height`` and ``width`` (and, for 5-D bottoms,
    ``depth``, by default the bottom's D: ``trilinear`` with D' = D resizes every frame
    bilinearly); a second bottom of the same rank, whose spatial size the output takes.

    Values: ``F.interpolate(x, ..., mode, align_corners)``.  Bilinear and trilinear with
    ``align_corners: false`` (the default) sample at src = (dst + 0.5) / s - 0.5 (clamped
    at 0) on every axis, the half-pixel geometry of PyTorch/mmseg/PAC; with a scale factor,
    s is the given factor, not out / in (they differ when in s is not an integer).
    ``align_corners: true`` is DeepLab's ``Interp`` geometry.  Nearest takes
    src = floor(dst / s) and has no align_corners.  Unlike Interp, a resize to the same size
    is not skipped for ``scale_factor`` != 1 (it cannot be) and the FLOPs count 4
    multiply-adds per output value for bilinear, 8 for trilinear, none for nearest.
    """

    params = {
        "mode": {"enum": list(_MODE_RANK), "default": "bilinear",
                 "description": "interpolation: bilinear (4-D bottoms), trilinear (5-D) or "
                                "nearest (both)"},
        "scale_factor": {"description": "out = floor(in * scale_factor); one number for every "
                                        "spatial axis, or one per axis ([h, w] or [d, h, w])",
                         "oneOf": [_SCALE_ITEM, {"type": "array", "items": _SCALE_ITEM,
                                                 "minItems": 1, "maxItems": max(SPATIAL_AXES)}]},
        "height": {"type": "integer", "minimum": 1, "description": "output height (with width)"},
        "width": {"type": "integer", "minimum": 1, "description": "output width (with height)"},
        "depth": {"type": "integer", "minimum": 1,
                  "description": "output depth D' of a 5-D bottom (with height and width; "
                                 "default: the bottom's depth)"},
        "align_corners": {"type": "boolean", "default": False,
                          "description": "bilinear/trilinear only: corner pixels aligned "
                                         "(Interp's geometry) instead of half-pixel centres "
                                         "(PyTorch's default)"},
    }
    bottoms = (1, 2)
    tops = (1, 1)

    def check(self, spec: LayerSpec) -> None:
        has_scale = spec.get("scale_factor") is not None
        has_h, has_w = spec.get("height") is not None, spec.get("width") is not None
        if has_h != has_w:
            raise spec.error("height and width go together", key="height" if has_h else "width",
                             hint="give both, or a scale_factor instead")
        if spec.get("depth") is not None and not has_h:
            raise spec.error("depth goes with height and width", key="depth",
                             hint="give height and width too, or a scale_factor instead")
        ways = [w for w, on in (("scale_factor", has_scale), ("height", has_h),
                                ("a second bottom", len(spec.bottoms) > 1)) if on]
        if len(ways) != 1:
            key = "scale_factor" if has_scale else ("height" if has_h else None)
            if not ways:
                raise spec.error("Resize needs scale_factor, height and width, or a second bottom",
                                 hint="e.g. 'scale_factor: 0.5' or 'height: 64, width: 64'")
            raise spec.error(f"give one output size, not {' and '.join(ways)}", key=key,
                             hint="remove all but one of scale_factor, height/width, the second bottom")
        if spec["mode"] == "nearest" and spec.has("align_corners") and spec["align_corners"]:
            raise spec.error("align_corners applies to trilinear or bilinear only",
                             key="align_corners", hint="remove it, or use a linear mode")
        # a rank the parameters already fix must be the mode's
        written = 3 if spec.get("depth") is not None else len(self._scale_values(spec))
        mode_rank = _MODE_RANK[spec["mode"]]
        if mode_rank is not None and written in SPATIAL_AXES and written != mode_rank:
            key = "depth" if spec.get("depth") is not None else "scale_factor"
            raise spec.error(f"mode {spec['mode']} resizes {blob_kind(mode_rank)} bottoms, but "
                             f"{key} is written for {blob_kind(written)} ones", key=key,
                             hint=f"use mode: {_LINEAR_MODE[written]} (or nearest)")

    @staticmethod
    def _scale_values(spec: LayerSpec) -> Tuple[float, ...]:
        s = spec.get("scale_factor")
        if s is None:
            return ()
        return (float(s),) if isinstance(s, (int, float)) else tuple(float(v) for v in s)

    def _rank(self, spec: LayerSpec, shape: Shape) -> int:
        rank = spatial_rank(spec, shape)
        mode_rank = _MODE_RANK[spec["mode"]]
        if mode_rank is not None and rank != mode_rank:
            raise spec.error(f"mode {spec['mode']} resizes {blob_kind(mode_rank)} bottoms, but "
                             f"this bottom is {blob_kind(rank)} {list(shape)}", key="mode",
                             cls=ShapeError, hint=f"use mode: {_LINEAR_MODE[rank]} (or nearest)")
        return rank

    def gradient_bottoms(self, spec: LayerSpec) -> Tuple[bool, ...]:
        return (True,) + (False,) * (len(spec.bottoms) - 1)  # a reference shape

    def infer(self, spec: LayerSpec, shapes: List[Shape]) -> List[Shape]:
        shape = tuple(shapes[0])
        rank = self._rank(spec, shape)
        if len(shapes) > 1:
            like = tuple(shapes[1])
            check_same_rank(spec, [shape, like])
            if like[0] != shape[0]:
                raise spec.shape_error(f"the second bottom must have the batch size N = "
                                       f"{shape[0]} of the first, got {list(like)}")
            return [shape[:2] + like[2:]]
        sizes = shape[2:]
        if spec.get("scale_factor") is not None:
            scale = per_axis(spec, "scale_factor", self._scale_values(spec), rank)
            out = tuple(math.floor(n * s) for n, s in zip(sizes, scale))
            if min(out) < 1:
                raise spec.shape_error(f"scale_factor {list(scale)} makes the {size_str(sizes)} "
                                       f"input empty ({size_str(out)})",
                                       hint="use a larger scale_factor")
        else:
            if spec.get("depth") is not None and rank != 3:
                raise spec.error(f"depth is for 5-D bottoms, but this bottom is {blob_kind(rank)}",
                                 key="depth", cls=ShapeError, hint="remove depth")
            out = (int(spec["height"]), int(spec["width"]))
            if rank == 3:
                out = (int(spec.get("depth") or sizes[0]),) + out
        return [shape[:2] + out]

    def build(self, spec: LayerSpec, shapes: List[Shape]) -> nn.Module:
        out = self.infer(spec, shapes)[0]
        mode = spec["mode"]
        align = bool(spec["align_corners"]) if mode != "nearest" else None
        scale = None
        if len(shapes) == 1 and spec.get("scale_factor") is not None:
            scale = per_axis(spec, "scale_factor", self._scale_values(spec), len(out) - 2)
        size = tuple(out[2:]) if len(shapes) == 1 and scale is None else None
        return ResizeModule(mode, align, size, scale)

    def flops(self, spec: LayerSpec, shapes: List[Shape], out_shapes: List[Shape]) -> int:
        # 2^rank taps: one multiply-add each
        taps = {"bilinear": 4, "trilinear": 8, "nearest": 0}[spec["mode"]]
        return 2 * taps * numel(out_shapes[0])


# ----------------------------------------------------------------------------- Crop


class CropModule(nn.Module):
    """``a[..., o_i : o_i + size_i, ...]`` on the axes from ``axis`` on, ``size_i`` = ``b``'s."""

    def __init__(self, axis: int, offsets: Tuple[int, ...]) -> None:
        super().__init__()
        self.axis, self.offsets = axis, offsets

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        sizes = b.shape[self.axis:]
        index = [slice(None)] * self.axis + [slice(o, o + s) for o, s in zip(self.offsets, sizes)]
        return a[tuple(index)]

    def extra_repr(self) -> str:
        return f"axis={self.axis}, offsets={self.offsets}"


@register("Crop")
class Crop(Layer):
    """Crop bottom 0 to the shape of bottom 1 on the axes from ``axis`` on (BVLC ``Crop``).

    Shapes: A (bottom 0), B (bottom 1, same number of axes) -> A[:axis] + B[axis:].
    Cropped axis i keeps A's indices offset_i .. offset_i + B[i] - 1, where ``offset`` is
    none (all 0), one value (for every cropped axis) or one value per axis from ``axis`` on;
    offset_i + B[i] must be <= A[i].
    """

    params = {
        "axis": {"type": "integer", "default": 2,
                 "description": "first axis to crop (negative: from the end); the axes before it "
                                "keep bottom 0's size"},
        "offset": {"description": "crop start: none (0), one value for every cropped axis, "
                                  "or one per cropped axis",
                   "oneOf": [{"type": "integer", "minimum": 0},
                             {"type": "array", "items": {"type": "integer", "minimum": 0}}]},
    }
    bottoms = (2, 2)
    tops = (1, 1)

    def _plan(self, spec: LayerSpec, shapes: List[Shape]) -> Tuple[int, Tuple[int, ...], Tuple[int, ...]]:
        a, b = shapes
        check_same_rank(spec, shapes)
        ndim = len(a)
        axis = int(spec["axis"])
        if not -ndim <= axis < ndim:
            raise spec.shape_error(f"axis {axis} is out of range for {ndim}-D bottoms",
                                   hint=f"use an axis in [{-ndim}, {ndim - 1}]")
        axis %= ndim
        n_crop = ndim - axis
        raw = spec.get("offset")
        if raw is None or raw == []:
            offsets = (0,) * n_crop
        elif isinstance(raw, int) or len(raw) == 1:
            offsets = (int(raw if isinstance(raw, int) else raw[0]),) * n_crop
        elif len(raw) == n_crop:
            offsets = tuple(int(o) for o in raw)
        else:
            raise spec.error(f"offset has {len(raw)} values but {n_crop} axes are cropped "
                             f"(axis {axis} of {ndim}-D bottoms)", key="offset",
                             hint=f"give one offset, or exactly {n_crop}")
        for i, o in enumerate(offsets):
            d = axis + i
            if o + b[d] > a[d]:
                raise spec.shape_error(
                    f"crop of axis {d} does not fit: offset {o} + size {b[d]} > {a[d]} "
                    f"(bottom shapes {list(a)} and {list(b)})",
                    hint="reduce offset, or check the sizes of the bottoms")
        return axis, offsets, tuple(b[axis:])

    def gradient_bottoms(self, spec: LayerSpec) -> Tuple[bool, ...]:
        return (True, False)  # the reference shape gets none

    def infer(self, spec: LayerSpec, shapes: List[Shape]) -> List[Shape]:
        axis, _, sizes = self._plan(spec, shapes)
        return [tuple(shapes[0][:axis]) + sizes]

    def build(self, spec: LayerSpec, shapes: List[Shape]) -> nn.Module:
        axis, offsets, _ = self._plan(spec, shapes)
        return CropModule(axis, offsets)

    def flops(self, spec: LayerSpec, shapes: List[Shape], out_shapes: List[Shape]) -> int:
        return 0
