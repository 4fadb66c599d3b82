"""The custom layers of aharley/segaware ("Segmentation-aware convolutional networks").

Types: ``Im2col``, ``Im2dist``, ``Im2parity``, ``DistLoss``, ``ChannelReduce``,
``NormConv`` and ``NormConvMeanfield``, with the fork's exact math (``../shared/specs/
segaware.md`` §2).  Parameters are flat with the fork's field names: the prototxt
importer lifts ``convolution_param``, ``im2dist_param``, ``im2parity_param``,
``dist_loss_param``, ``channel_reduce_param``, ``norm_conv_param`` and
``norm_conv_meanfield_param`` fields to the layer level.  Fields the fork parses but
never reads (e.g. a DistLoss's ``convolution_param``, an Im2col's ``num_output``) are
accepted and ignored, so its configs import unchanged.

Where the fork is buggy these layers compute what it meant and say so in the type's
docstring: DistLoss averages over the whole batch (the fork's GPU path only sees image
0), Im2parity defines the centre-outside value, ChannelReduce checks the divisor the
right way round.  The hot paths (Im2dist, Im2parity, the mean-field message passing) run
on the fused kernels of :mod:`pacnet.kernels.segaware`.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from pacnet.errors import PacnetError
from pacnet.kernels.segaware import ops
from pacnet.kernels.segaware.reference import out_size
from pacnet.layers.common import (NON_NEGATIVE_INT, POSITIVE_INT, conv_out, fill_, filler,
                                  filler_problem, numel, spatial_pair)
from pacnet.layers.conv import CONV_PARAMS
from pacnet.registry import Layer, LayerSpec, Shape, register

Pair = Tuple[int, int]

__all__ = ["DistLossFunction", "dist_loss_reported", "dist_loss_trained"]

# ----------------------------------------------------------------------------- shared pieces

_GEOMETRY_KEYS = ("kernel_size", "kernel_h", "kernel_w", "pad", "pad_h", "pad_w", "stride",
                  "stride_h", "stride_w", "dilation", "axis")


def _conv_fields(ignored_note: str) -> Dict[str, dict]:
    """Caffe's ConvolutionParameter fields: the geometry (read) and the rest (ignored)."""
    fields = {}
    for key, schema in CONV_PARAMS.items():
        schema = dict(schema)
        if key not in _GEOMETRY_KEYS:
            schema["description"] = f"{ignored_note}: accepted and ignored"
        fields[key] = schema
    return fields


NORM = {"enum": ["L1", "L2", 1, 2], "default": "L2",
        "description": "L1: sum over channels of |E(centre) - E(neighbour)|; "
                       "L2: half the squared Euclidean distance (no square root)"}
REMOVE_CENTER = {"type": "boolean", "default": False,
                 "description": "give the centre tap the distance BIG (FLT_MAX/100) so it drops out"}
REMOVE_BOUNDS = {"type": "boolean", "default": False,
                 "description": "give out-of-image neighbours the distance BIG (else 0: they "
                                "look maximally similar)"}


class _Geometry:
    """Resolved 2-D kernel/pad/stride/dilation of a spec with Caffe's conv fields."""

    def __init__(self, spec: LayerSpec) -> None:
        self.kernel = spatial_pair(spec, "kernel_size", "kernel_h", "kernel_w", None)
        self.pad = spatial_pair(spec, "pad", "pad_h", "pad_w", 0)
        self.stride = spatial_pair(spec, "stride", "stride_h", "stride_w", 1)
        self.dilation = spatial_pair(spec, "dilation", "dilation_h", "dilation_w", 1)

    @property
    def taps(self) -> int:
        return self.kernel[0] * self.kernel[1]

    def out(self, h: int, w: int) -> Pair:
        return (conv_out(h, self.kernel[0], self.pad[0], self.stride[0], self.dilation[0]),
                conv_out(w, self.kernel[1], self.pad[1], self.stride[1], self.dilation[1]))

    def args(self) -> Tuple[Pair, Pair, Pair, Pair]:
        return self.kernel, self.pad, self.stride, self.dilation


def _check_geometry(spec: LayerSpec) -> _Geometry:
    geo = _Geometry(spec)
    if spec.get("axis", 1) != 1:
        raise spec.error(f"only axis 1 (N x C x H x W) is supported, got axis {spec['axis']}",
                         key="axis", hint="remove 'axis' or set it to 1")
    return geo


def _check_4d(spec: LayerSpec, shape: Shape, what: str) -> None:
    if len(shape) != 4:
        raise spec.shape_error(f"{what} must be 4-D (N x C x H x W), got shape {list(shape)}")


def _out_hw(spec: LayerSpec, geo: _Geometry, shape: Shape, what: str = "bottom") -> Pair:
    _check_4d(spec, shape, what)
    ho, wo = geo.out(shape[2], shape[3])
    if ho < 1 or wo < 1:
        ext = tuple(d * (k - 1) + 1 for k, d in zip(geo.kernel, geo.dilation))
        raise spec.shape_error(
            f"output would be empty ({ho}x{wo}): {what} {shape[2]}x{shape[3]} with pad "
            f"{list(geo.pad)} is smaller than the dilated kernel {ext[0]}x{ext[1]}",
            hint="use more padding or a smaller kernel_size/dilation")
    return ho, wo


def _norm(spec: LayerSpec, key: str = "norm") -> int:
    value = spec[key]
    return {"L1": 1, "L2": 2, 1: 1, 2: 2}[value]


class _Located(nn.Module):
    """Base of the modules here: a runtime PacnetError names the layer it came from."""

    def __init__(self, spec: LayerSpec) -> None:
        super().__init__()
        self._layer = (spec.name, spec.type, spec.location)

    def _raise(self, err: PacnetError):
        name, type_name, location = self._layer
        raise err.at(location=location, layer=name, layer_type=type_name) from None


# ----------------------------------------------------------------------------- Im2col

class Im2colModule(_Located):
    """``F.unfold`` reshaped to ``N x (C*kh*kw) x Ho x Wo`` (channel-major)."""

    def __init__(self, spec: LayerSpec, geo: _Geometry) -> None:
        super().__init__(spec)
        self.kernel, self.pad, self.stride, self.dilation = geo.args()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        ho = out_size(h, self.kernel[0], self.pad[0], self.stride[0], self.dilation[0])
        wo = out_size(w, self.kernel[1], self.pad[1], self.stride[1], self.dilation[1])
        cols = F.unfold(x, self.kernel, dilation=self.dilation, padding=self.pad,
                        stride=self.stride)
        return cols.reshape(n, c * self.kernel[0] * self.kernel[1], ho, wo)

    def extra_repr(self) -> str:
        return (f"kernel={self.kernel}, pad={self.pad}, stride={self.stride}, "
                f"dilation={self.dilation}")


@register("Im2col")
class Im2col(Layer):
    """Unfold each kernel window into channels (Caffe ``Im2col``, with dilation).

    Shapes: N x C x H x W -> N x (C*kh*kw) x Ho x Wo, Ho = floor((H + 2p - (d(kh-1)+1))/s) + 1.
    Channel ``c*kh*kw + i*kw + j`` holds the input at tap (i, j) of channel c, or 0 outside
    the image (channel-major; equals ``F.unfold`` reshaped).  Backward is col2im
    (scatter-add).  ``num_output``, ``bottom_is_im2col`` and the other non-geometry
    convolution fields are ignored, as in the fork.
    """

    caffe_params = ("convolution_param",)

    params = _conv_fields("Im2col reads only kernel, pad, stride, dilation and axis")
    bottoms = (1, 1)
    tops = (1, 1)

    def check(self, spec: LayerSpec) -> None:
        _check_geometry(spec)

    def infer(self, spec: LayerSpec, shapes: List[Shape]) -> List[Shape]:
        geo = _Geometry(spec)
        ho, wo = _out_hw(spec, geo, shapes[0])
        n, c = shapes[0][:2]
        return [(n, c * geo.taps, ho, wo)]

    def build(self, spec: LayerSpec, shapes: List[Shape]) -> nn.Module:
        self.infer(spec, shapes)
        return Im2colModule(spec, _Geometry(spec))

    def flops(self, spec, shapes, out_shapes) -> int:
        return 0


# ----------------------------------------------------------------------------- Im2dist

class Im2distModule(_Located):
    """Calls the fused :func:`pacnet.kernels.segaware.ops.im2dist`."""

    def __init__(self, spec: LayerSpec, geo: _Geometry, norm: int, remove_center: bool,
                 remove_bounds: bool) -> None:
        super().__init__(spec)
        self.kernel, self.pad, self.stride, self.dilation = geo.args()
        self.norm = norm
        self.remove_center = remove_center
        self.remove_bounds = remove_bounds

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        try:
            return ops.im2dist(emb, self.kernel, self.pad, self.stride, self.dilation, self.norm,
                               self.remove_center, self.remove_bounds)
        except PacnetError as err:
            self._raise(err)

    def extra_repr(self) -> str:
        return (f"kernel={self.kernel}, pad={self.pad}, stride={self.stride}, "
                f"dilation={self.dilation}, norm=L{self.norm}, remove_center={self.remove_center}, "
                f"remove_bounds={self.remove_bounds}")


@register("Im2dist")
class Im2dist(Layer):
    """Distances between each pixel's embedding and its k x k neighbours' (segaware).

    Shapes: N x C x H x W -> N x (kh*kw) x Ho x Wo (Ho as for a convolution).  Channel
    ``i*kw + j`` at (y, x) compares the centre pixel ``(y*s - p + (kh//2)*d, ...)`` with the
    neighbour at tap (i, j), **summed over the C channels**: L1 ``sum |Δ|`` or L2
    ``1/2 sum Δ²`` (half the squared distance, no root).  Rules, in order: centre outside
    the image -> 0 for every tap; ``remove_center`` and the centre tap -> BIG
    (FLT_MAX/100 ≈ 3.4e36); neighbour inside -> the distance; neighbour outside -> BIG
    with ``remove_bounds``, else 0.  Constant entries pass no gradient; L1 uses sign(0)=0
    (the fork's GPU backward; its CPU backward differs and is treated as a bug).
    """

    caffe_params = ("convolution_param", "im2dist_param")

    params = {
        **_conv_fields("Im2dist reads only kernel, pad, stride, dilation and axis"),
        "norm": NORM,
        "remove_center": REMOVE_CENTER,
        "remove_bounds": REMOVE_BOUNDS,
    }
    bottoms = (1, 1)
    tops = (1, 1)

    def check(self, spec: LayerSpec) -> None:
        _check_geometry(spec)

    def infer(self, spec: LayerSpec, shapes: List[Shape]) -> List[Shape]:
        geo = _Geometry(spec)
        ho, wo = _out_hw(spec, geo, shapes[0], "embedding")
        return [(shapes[0][0], geo.taps, ho, wo)]

    def build(self, spec: LayerSpec, shapes: List[Shape]) -> nn.Module:
        self.infer(spec, shapes)
        return Im2distModule(spec, _Geometry(spec), _norm(spec), bool(spec["remove_center"]),
                             bool(spec["remove_bounds"]))

    def flops(self, spec, shapes, out_shapes) -> int:
        return 3 * numel(out_shapes[0]) * shapes[0][1]


# ----------------------------------------------------------------------------- Im2parity

class Im2parityModule(_Located):
    def __init__(self, spec: LayerSpec, geo: _Geometry, ignore_label: Optional[int]) -> None:
        super().__init__(spec)
        self.kernel, self.pad, self.stride, self.dilation = geo.args()
        self.ignore_label = ignore_label

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        try:
            return ops.im2parity(labels, self.kernel, self.pad, self.stride, self.dilation,
                                 self.ignore_label)
        except PacnetError as err:
            self._raise(err)

    def extra_repr(self) -> str:
        return (f"kernel={self.kernel}, pad={self.pad}, stride={self.stride}, "
                f"dilation={self.dilation}, ignore_label={self.ignore_label}")


@register("Im2parity")
class Im2parity(Layer):
    """Whether each pixel's label equals its k x k neighbours' (segaware).

    Shapes: N x 1 x H x W labels (float or integer, compared as ints) -> N x (kh*kw) x
    Ho x Wo in the labels' float dtype (the default dtype for integer labels).  With the
    centre inside the image: 1 if the neighbour's label equals the centre's, else 0; an
    out-of-image neighbour counts as label 0 (background); with ``ignore_label``, the value
    is ``ignore_label`` wherever either label equals it.  Centre outside the image (pad >
    (k//2)*d): ``ignore_label`` if set, else -1 (the fork leaves it uninitialised; -1 reads
    as "same label" in DistLoss, whose distance there is 0, so it adds nothing).  The fork
    accepts C > 1 and keeps the last channel; here the label map must have one channel.
    No gradient (the fork: NOT_IMPLEMENTED).
    """

    caffe_params = ("convolution_param", "im2parity_param")

    params = {
        **_conv_fields("Im2parity reads only kernel, pad, stride, dilation and axis"),
        "ignore_label": {**NON_NEGATIVE_INT,
                         "description": "label whose pairs are marked with this value instead "
                                        "of 0/1 (unset: no label is ignored, as in every "
                                        "segaware config, so 255 acts as a class)"},
    }
    bottoms = (1, 1)
    tops = (1, 1)

    def check(self, spec: LayerSpec) -> None:
        _check_geometry(spec)

    def gradient_bottoms(self, spec: LayerSpec) -> Tuple[bool, ...]:
        return (False,)  # labels

    def infer(self, spec: LayerSpec, shapes: List[Shape]) -> List[Shape]:
        geo = _Geometry(spec)
        ho, wo = _out_hw(spec, geo, shapes[0], "label map")
        if shapes[0][1] != 1:
            raise spec.shape_error(
                f"the label map must have 1 channel (N x 1 x H x W), got shape {list(shapes[0])}",
                hint="feed the label blob itself (the fork silently used the last channel)")
        return [(shapes[0][0], geo.taps, ho, wo)]

    def build(self, spec: LayerSpec, shapes: List[Shape]) -> nn.Module:
        self.infer(spec, shapes)
        return Im2parityModule(spec, _Geometry(spec), spec.get("ignore_label"))


# ----------------------------------------------------------------------------- DistLoss

def _parity_masks(parity: torch.Tensor, ignore_label: Optional[int]):
    # The fork reads the parity into an int (truncation) before comparing.
    p = torch.trunc(parity) if parity.is_floating_point() else parity
    same = p != 0
    keep = torch.ones_like(same) if ignore_label is None else p != ignore_label
    return same, keep


def dist_loss_reported(dist: torch.Tensor, parity: torch.Tensor, alpha: float, beta: float,
                       ignore_label: Optional[int] = None) -> torch.Tensor:
    """The loss the fork reports: ``1/count sum [same relu(d-α) + diff relu(β-d)]``."""
    same, keep = _parity_masks(parity, ignore_label)
    hinge = torch.where(same, torch.relu(dist - alpha), torch.relu(beta - dist))
    return (hinge * keep).sum() / dist.numel()


def dist_loss_trained(dist: torch.Tensor, parity: torch.Tensor, alpha: float, beta: float,
                      ignore_label: Optional[int] = None) -> torch.Tensor:
    """The loss whose gradient the fork computes: ``1/count sum 1/2 [same relu(d-α)² +
    diff relu(β-d)²]``."""
    same, keep = _parity_masks(parity, ignore_label)
    hinge = torch.where(same, torch.relu(dist - alpha), torch.relu(beta - dist))
    return (0.5 * hinge * hinge * keep).sum() / dist.numel()


class DistLossFunction(torch.autograd.Function):
    """Forward: :func:`dist_loss_reported`; backward: the gradient of
    :func:`dist_loss_trained` (times the incoming gradient, i.e. the loss weight)."""

    @staticmethod
    def forward(ctx, dist, parity, alpha, beta, ignore_label):
        same, keep = _parity_masks(parity, ignore_label)
        over = torch.relu(dist - alpha)
        under = torch.relu(beta - dist)
        count = dist.numel()
        loss = (torch.where(same, over, under) * keep).sum() / count
        ctx.save_for_backward(torch.where(same, over, -under) * keep / count)
        return loss

    @staticmethod
    def backward(ctx, grad):
        (r,) = ctx.saved_tensors
        return grad * r, None, None, None, None


class DistLossModule(_Located):
    def __init__(self, spec: LayerSpec) -> None:
        super().__init__(spec)
        self.alpha = float(spec["alpha"])
        self.beta = float(spec["beta"])
        self.ignore_label = spec.get("ignore_label")

    def forward(self, dist: torch.Tensor, parity: torch.Tensor) -> torch.Tensor:
        return DistLossFunction.apply(dist, parity, self.alpha, self.beta, self.ignore_label)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, ignore_label={self.ignore_label}"


@register("DistLoss")
class DistLoss(Layer):
    """Contrastive hinge loss on embedding distances (segaware embedding training).

    Bottoms: ``dist`` N x K x H x W (Im2dist) and ``parity`` of the same shape (Im2parity).
    Top: a scalar.  Per element (skipping those whose parity equals ``ignore_label``):
    same label (parity != 0) costs ``max(d - alpha, 0)``, different label
    ``max(beta - d, 0)``; the loss is the sum over the **whole batch** divided by
    count = N*K*H*W (the fork's HEAD normalisation).

    The value is the hinge the fork REPORTS; the gradient is what the fork COMPUTES,
    ``(1/count) [same relu(d - alpha) - diff relu(beta - d)]``: the gradient of
    ``1/2 hinge²``, not of the reported hinge.  No gradient reaches the parity.
    Deviations from the fork: the gradient is scaled by the incoming gradient, so
    ``loss_weight`` works (the fork ignores it; identical at the default 1); every image
    of the batch counts (the fork's GPU kernel only reads image 0).  The convolution
    fields are parsed and ignored, as in the fork.
    """

    caffe_params = ("convolution_param", "dist_loss_param")

    params = {
        **_conv_fields("DistLoss parses convolution_param but never uses it"),
        "alpha": {"type": "number", "exclusiveMinimum": 0,
                  "description": "margin below which same-label distances cost nothing"},
        "beta": {"type": "number", "exclusiveMinimum": 0,
                 "description": "margin above which different-label distances cost nothing "
                                "(must exceed alpha)"},
        "ignore_label": {**NON_NEGATIVE_INT,
                         "description": "parity value to skip (its elements still count in "
                                        "the divisor, as in the fork)"},
    }
    required = ("alpha", "beta")
    bottoms = (2, 2)
    tops = (1, 1)
    loss = True

    def check(self, spec: LayerSpec) -> None:
        if not float(spec["beta"]) > float(spec["alpha"]):
            raise spec.error(f"beta ({spec['beta']}) must be greater than alpha ({spec['alpha']})",
                             key="beta", hint="alpha is the same-label margin, beta the "
                                              "different-label one; e.g. alpha 0.5, beta 2")

    def gradient_bottoms(self, spec: LayerSpec) -> Tuple[bool, ...]:
        return (True, False)  # the parity gets none

    def infer(self, spec: LayerSpec, shapes: List[Shape]) -> List[Shape]:
        dist, parity = shapes
        if tuple(dist) != tuple(parity):
            raise spec.shape_error(
                f"dist {list(dist)} and parity {list(parity)} must have the same shape",
                hint="give Im2dist and Im2parity the same kernel_size, pad, stride and dilation")
        return [()]

    def build(self, spec: LayerSpec, shapes: List[Shape]) -> nn.Module:
        self.infer(spec, shapes)
        return DistLossModule(spec)

    def flops(self, spec, shapes, out_shapes) -> int:
        return 3 * numel(shapes[0])


# ----------------------------------------------------------------------------- ChannelReduce

class ChannelReduceModule(nn.Module):
    def __init__(self, num_channels: int, op: str) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.op = op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        groups = x.reshape(n, self.num_channels, c // self.num_channels, h, w)
        if self.op == "SUM":
            return groups.sum(2)
        # torch.max(dim) returns the first maximum and routes the gradient there, as the
        # fork's strict '>' scan does.
        return groups.max(2).values

    def extra_repr(self) -> str:
        return f"num_channels={self.num_channels}, operation={self.op}"


@register("ChannelReduce")
class ChannelReduce(Layer):
    """Sum or max over contiguous channel groups (segaware).

    Shapes: N x C x H x W -> N x num_channels x H x W; output channel g reduces input
    channels ``[g*G, (g+1)*G)``, G = C / num_channels.  After a Tile/Im2col (class-major
    layout) SUM gives a per-class sum over the k*k taps.  Backward: SUM copies the gradient
    to the group, MAX routes it to the first maximum.  The fork's divisor check is
    inverted (it aborts when num_channels == C); here C must be a multiple of num_channels.
    """

    params = {
        "num_channels": {**POSITIVE_INT, "default": 1, "description": "number of output channels"},
        "operation": {"enum": ["SUM", "MAX", 0, 1], "default": "MAX",
                      "description": "reduction over each group (SUM=0, MAX=1; Caffe default MAX)"},
    }
    bottoms = (1, 1)
    tops = (1, 1)

    def infer(self, spec: LayerSpec, shapes: List[Shape]) -> List[Shape]:
        (shape,) = shapes
        _check_4d(spec, shape, "bottom")
        k = int(spec["num_channels"])
        if shape[1] % k:
            raise spec.shape_error(
                f"bottom channels {shape[1]} are not a multiple of num_channels {k}",
                hint="num_channels must divide the channel count")
        return [(shape[0], k, shape[2], shape[3])]

    def build(self, spec: LayerSpec, shapes: List[Shape]) -> nn.Module:
        self.infer(spec, shapes)
        op = spec["operation"]
        op = {0: "SUM", 1: "MAX"}.get(op, op)
        return ChannelReduceModule(int(spec["num_channels"]), op)


# ----------------------------------------------------------------------------- NormConv

def _softmax_filter(dist: torch.Tensor, scale: Optional[torch.Tensor]) -> torch.Tensor:
    """Softmax over the taps of ``-scale * dist`` (``+dist`` without a scale, as the fork)."""
    logits = dist if scale is None else -scale.reshape(()) * dist
    return torch.softmax(logits, dim=1)


class NormConvModule(_Located):
    """``y = W (im2col(img) ⊙ softmax_taps(-s im2dist(emb))) + b``."""

    def __init__(self, spec: LayerSpec, geo: _Geometry, in_channels: int) -> None:
        super().__init__(spec)
        self.kernel, self.pad, self.stride, self.dilation = geo.args()
        self.group = int(spec["group"])
        self.norm = _norm(spec)
        self.remove_center = bool(spec["remove_center"])
        self.remove_bounds = bool(spec["remove_bounds"])
        out = int(spec["num_output"])
        self.weight = nn.Parameter(torch.empty(out, in_channels // self.group, *self.kernel))
        self.bias = nn.Parameter(torch.empty(out)) if spec["bias_term"] else None
        self.scale = nn.Parameter(torch.empty(1)) if spec["scale_term"] else None

    def forward(self, img: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        try:
            dist = ops.im2dist(emb, self.kernel, self.pad, self.stride, self.dilation, self.norm,
                               self.remove_center, self.remove_bounds)
        except PacnetError as err:
            self._raise(err)
        mask = _softmax_filter(dist, self.scale)                       # N x K x Ho x Wo
        n, c = img.shape[:2]
        k = self.kernel[0] * self.kernel[1]
        ho, wo = mask.shape[2:]
        cols = F.unfold(img, self.kernel, dilation=self.dilation, padding=self.pad,
                        stride=self.stride).reshape(n, c, k, ho * wo)
        cols = (cols * mask.reshape(n, 1, k, ho * wo)).reshape(n, self.group, -1, ho * wo)
        w = self.weight.reshape(self.group, self.weight.shape[0] // self.group, -1)
        y = torch.einsum("gok,ngkl->ngol", w, cols).reshape(n, -1, ho, wo)
        if self.bias is not None:
            y = y + self.bias.reshape(1, -1, 1, 1)
        return y

    def extra_repr(self) -> str:
        return (f"weight={list(self.weight.shape)}, bias={self.bias is not None}, "
                f"scale={self.scale is not None}, kernel={self.kernel}, pad={self.pad}, "
                f"stride={self.stride}, dilation={self.dilation}, group={self.group}, "
                f"norm=L{self.norm}, remove_center={self.remove_center}, "
                f"remove_bounds={self.remove_bounds}")


@register("NormConv")
class NormConv(Layer):
    """Normalised segmentation-aware convolution (segaware ``NormConv``).

    Bottoms: ``img`` N x C x H x W and ``emb`` N x E x H x W (same H, W).  Top:
    N x num_output x Ho x Wo.  Per location: ``D = Im2dist(emb)`` (norm, remove_center,
    remove_bounds), ``M = softmax over the k*k taps of -scale*D`` (``+D`` when
    ``scale_term`` is false: the fork's sign), ``y = W (Im2col(img) ⊙ M) + b``.  Removed
    taps (BIG) get weight 0; with the centre outside the image M is uniform.
    Blobs: ``weight`` [num_output, C/group, kh, kw], ``bias`` [num_output] (bias_term),
    ``scale`` [1] (scale_term; initialised by ``scale_filler``, Caffe default constant 0).
    No segaware config uses it directly (NormConvMeanfield builds its own).  Caffe blob
    order: a caffemodel of a layer with ``bias_term: false`` stores the scale as blob 1.
    """

    caffe_params = ("convolution_param", "norm_conv_param")

    params = {
        **CONV_PARAMS,
        "bottom_is_im2col": {"type": "boolean", "default": False,
                             "description": "not supported by NormConv (must be false)"},
        "scale_term": {"type": "boolean", "default": True,
                       "description": "learn the scalar s of softmax(-s * distance)"},
        "norm": NORM,
        "scale_filler": filler("initialiser of the scale blob (Caffe default: constant 0)"),
        "remove_center": REMOVE_CENTER,
        "remove_bounds": REMOVE_BOUNDS,
    }
    required = ("num_output",)
    bottoms = (2, 2)
    tops = (1, 1)
    blobs = ("weight", "bias", "scale")

    def check(self, spec: LayerSpec) -> None:
        _check_geometry(spec)
        if spec["bottom_is_im2col"]:
            raise spec.error("bottom_is_im2col is not supported by NormConv",
                             key="bottom_is_im2col", hint="feed the image itself")
        if int(spec["num_output"]) % int(spec["group"]):
            raise spec.error(f"num_output {spec['num_output']} is not a multiple of group "
                             f"{spec['group']}", key="num_output")
        problem = filler_problem(spec["scale_filler"], (1,))
        if problem:
            raise spec.error(f"scale_filler: {problem}", key="scale_filler")

    def infer(self, spec: LayerSpec, shapes: List[Shape]) -> List[Shape]:
        img, emb = shapes
        geo = _Geometry(spec)
        ho, wo = _out_hw(spec, geo, img, "image")
        _check_4d(spec, emb, "embedding")
        if tuple(img[2:]) != tuple(emb[2:]) or img[0] != emb[0]:
            raise spec.shape_error(
                f"image {list(img)} and embedding {list(emb)} must have the same N, H and W",
                hint="resize the embedding to the image (e.g. with Interp)")
        if img[1] % int(spec["group"]):
            raise spec.shape_error(f"image channels {img[1]} are not a multiple of group "
                                   f"{spec['group']}")
        weight = (int(spec["num_output"]), img[1] // int(spec["group"])) + geo.kernel
        problem = filler_problem(spec["weight_filler"], weight)
        if problem:
            raise spec.error(f"weight_filler: {problem}", key="weight_filler")
        return [(img[0], int(spec["num_output"]), ho, wo)]

    def build(self, spec: LayerSpec, shapes: List[Shape]) -> nn.Module:
        self.infer(spec, shapes)
        module = NormConvModule(spec, _Geometry(spec), shapes[0][1])
        fill_(module.weight.data, spec["weight_filler"])
        if module.bias is not None:
            fill_(module.bias.data, spec["bias_filler"])
        if module.scale is not None:
            fill_(module.scale.data, spec["scale_filler"])
        return module

    def flops(self, spec, shapes, out_shapes) -> int:
        n, o, ho, wo = out_shapes[0]
        k = _Geometry(spec).taps
        per_out = 2 * (shapes[0][1] // int(spec["group"])) * k
        return per_out * numel(out_shapes[0]) + n * k * ho * wo * (3 * shapes[1][1] + 4)


# ----------------------------------------------------------------------------- NormConvMeanfield

def _listed(spec: LayerSpec, key: str, default: Any) -> List[Any]:
    """A repeated NormConvMeanfield field as [bilateral, spatial]: 0 values -> default, 2 -> as
    given; the fork rejects any other count."""
    value = spec.get(key)
    if value is None:
        return [default, default]
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if len(values) == 0:
        return [default, default]
    if len(values) != 2:
        raise spec.error(
            f"{key} must be given twice, [bilateral, spatial], or not at all; got {value!r}",
            key=key, hint=f"e.g. {key}: [{values[0]!r}, {values[0]!r}] (index 0 configures the "
                          "filter on bottom 2, index 1 the one on bottom 3)")
    return values


def _repeated(item: dict, description: str, default: Any = None) -> dict:
    schema = {"description": description,
              "oneOf": [item, {"type": "array", "items": item, "maxItems": 2}]}
    if default is not None:
        schema["default"] = default
    return schema


class _FilterGeometry:
    def __init__(self, kernel: int, pad: int, stride: int, dilation: int) -> None:
        self.kernel = (kernel, kernel)
        self.pad = (pad, pad)
        self.stride = (stride, stride)
        self.dilation = (dilation, dilation)

    def out(self, h: int, w: int) -> Pair:
        return (conv_out(h, self.kernel[0], self.pad[0], self.stride[0], self.dilation[0]),
                conv_out(w, self.kernel[1], self.pad[1], self.stride[1], self.dilation[1]))

    def args(self):
        return self.kernel, self.pad, self.stride, self.dilation


def _meanfield_filters(spec: LayerSpec) -> Tuple[List[_FilterGeometry], List[float], List[bool],
                                                  List[bool]]:
    kernels = _listed(spec, "kernel_size", None)
    if kernels[0] is None:
        raise spec.error("kernel_size is required: [bilateral, spatial]", key="kernel_size",
                         hint="e.g. kernel_size: [13, 5]")
    pads = _listed(spec, "pad", 0)
    strides = _listed(spec, "stride", 1)
    dilations = _listed(spec, "dilation", None)
    if dilations[0] is None:
        raise spec.error("dilation is required: [bilateral, spatial] (the fork's default 0 "
                         "makes every tap the centre pixel)", key="dilation",
                         hint="e.g. dilation: [9, 1]")
    scales = [float(s) for s in _listed(spec, "scale", 0.0)]
    centers = [bool(v) for v in _listed(spec, "remove_center", True)]
    bounds = [bool(v) for v in _listed(spec, "remove_bounds", True)]
    for key, values, minimum in (("kernel_size", kernels, 1), ("pad", pads, 0),
                                 ("stride", strides, 1), ("dilation", dilations, 1)):
        for v in values:
            if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
                raise spec.error(f"{key} values must be integers >= {minimum}, got {v!r}", key=key)
    geos = [_FilterGeometry(kernels[i], pads[i], strides[i], dilations[i]) for i in range(2)]
    return geos, scales, centers, bounds


class NormConvMeanfieldModule(_Located):
    """Mean-field iterations with softmax-normalised bilateral and spatial filters."""

    def __init__(self, spec: LayerSpec, channels: int) -> None:
        super().__init__(spec)
        geos, scales, centers, bounds = _meanfield_filters(spec)
        self.num_iterations = int(spec["num_iterations"])
        self.bilateral, self.spatial = geos
        self.scales = scales
        self.remove_center = centers
        self.remove_bounds = bounds
        eye = torch.eye(channels).reshape(1, 1, channels, channels)
        self.spatial_weight = nn.Parameter(eye.clone())
        self.bilateral_weight = nn.Parameter(eye.clone())
        self.compatibility = nn.Parameter(-eye.clone())

    def _mask(self, features: torch.Tensor, index: int) -> torch.Tensor:
        geo = self.bilateral if index == 0 else self.spatial
        dist = ops.im2dist(features, *geo.args(), 2, self.remove_center[index],
                           self.remove_bounds[index])
        # -scale*D with D = BIG on removed taps: their softmax weight underflows to 0.
        return torch.softmax(-self.scales[index] * dist, dim=1)

    @staticmethod
    def _mix(matrix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``out[:, o] = sum_c matrix[o, c] x[:, c]`` (Caffe's gemm with the C x C blob)."""
        n, c, h, w = x.shape
        return torch.matmul(matrix.reshape(c, c), x.reshape(n, c, h * w)).reshape(n, c, h, w)

    def forward(self, unary: torch.Tensor, q0: torch.Tensor, embxy: torch.Tensor,
                xy: torch.Tensor) -> torch.Tensor:
        try:
            # The filters depend on the features only, so they are built once and shared
            # by all iterations (the fork recomputes identical ones in each).
            m_bilateral = self._mask(embxy, 0)
            m_spatial = self._mask(xy, 1)
            logits = q0
            for _ in range(self.num_iterations):
                q = torch.softmax(logits, dim=1)
                spatial = ops.local_weighted_sum(q, m_spatial, *self.spatial.args())
                bilateral = ops.local_weighted_sum(q, m_bilateral, *self.bilateral.args())
                message = (self._mix(self.spatial_weight, spatial)
                           + self._mix(self.bilateral_weight, bilateral))
                logits = unary - self._mix(self.compatibility, message)
            return logits
        except PacnetError as err:
            self._raise(err)

    def extra_repr(self) -> str:
        return (f"num_iterations={self.num_iterations}, bilateral=(k={self.bilateral.kernel[0]}, "
                f"pad={self.bilateral.pad[0]}, dilation={self.bilateral.dilation[0]}, "
                f"scale={self.scales[0]}), spatial=(k={self.spatial.kernel[0]}, "
                f"pad={self.spatial.pad[0]}, dilation={self.spatial.dilation[0]}, "
                f"scale={self.scales[1]}), remove_center={self.remove_center}, "
                f"remove_bounds={self.remove_bounds}")


_MF_IGNORED = "read by the fork's proto but never used by its code: accepted and ignored"


@register("NormConvMeanfield")
class NormConvMeanfield(Layer):
    """Segmentation-aware dense CRF: CRF-as-RNN mean field with normalised local filters.

    Bottoms: ``unary`` U N x C x H x W (logits), ``Q0`` N x C x H x W (logits of the first
    softmax; the configs pass U again), ``embxy`` F_b N x E_b x H x W (bilateral features,
    e.g. concat(λ_e·emb, λ_xy·xy)), ``xy`` F_s N x E_s x H x W (spatial features).
    Top: N x C x H x W logits (not normalised).  With ``L_-1 = Q0``, for t < T::

        Q_t = softmax_C(L_{t-1})
        m_t = W_G · Φ(Q_t; F_s, spatial) + W_B · Φ(Q_t; F_b, bilateral)
        L_t = U - μ · m_t

    ``Φ(Q; F)[c, p] = sum_q softmax_q(-scale · 1/2 ||F_p - F_q||²) Q[c, q]`` over the dilated
    k x k neighbourhood (L2 Im2dist; with remove_center/remove_bounds the centre and the
    out-of-image taps get weight 0; with scale 0 the weights are uniform over all k*k taps).
    W_G, W_B, μ are 1 x 1 x C x C channel-mixing matrices (out = M @ in).

    Parameters (repeated fields: index 0 = bilateral filter on bottom 2, index 1 = spatial
    filter on bottom 3; each given twice or not at all): ``num_iterations`` T (> 1),
    ``kernel_size``, ``pad`` (default 0), ``stride`` (default 1), ``dilation`` (required:
    the fork's default 0 is broken), ``scale`` (default 0: the fork stores 0.1 in an int),
    ``remove_center``/``remove_bounds`` (default true).  Each filter must keep the size
    (pad = dilation*(kernel_size-1)/2, stride 1).  The fork's ignored fields are accepted.
    Blobs: ``spatial_weight`` W_G and ``bilateral_weight`` W_B (init identity),
    ``compatibility`` μ (init -identity), each 1 x 1 x C x C.  Gradients reach all four
    bottoms and the three blobs.
    """

    params = {
        "num_iterations": {"type": "integer", "minimum": 2,
                           "description": "mean-field iterations T (the fork requires > 1)"},
        "kernel_size": _repeated({"type": "integer", "minimum": 1},
                                 "[bilateral, spatial] filter sizes k (square k x k)"),
        "pad": _repeated(dict(NON_NEGATIVE_INT), "[bilateral, spatial] zero padding (default 0)"),
        "stride": _repeated(dict(POSITIVE_INT), "[bilateral, spatial] stride (default 1)"),
        "dilation": _repeated(dict(POSITIVE_INT),
                              "[bilateral, spatial] dilation (required: the fork's default 0 "
                              "is broken)"),
        "scale": _repeated({"type": "number"},
                           "[bilateral, spatial] s of softmax(-s * 1/2||ΔF||²) (default 0, as "
                           "the fork's int-truncated 0.1)"),
        "remove_center": _repeated({"type": "boolean"},
                                   "[bilateral, spatial] drop the centre pixel (default true)"),
        "remove_bounds": _repeated({"type": "boolean"},
                                   "[bilateral, spatial] drop out-of-image pixels (default true)"),
        "compatibility_mode": {"enum": ["POTTS", 0], "description": _MF_IGNORED},
        "threshold": {"type": "number", "description": _MF_IGNORED},
        "spatial_filter_weight": {"type": "number", "description": _MF_IGNORED},
        "bilateral_filter_weight": {"type": "number", "description": _MF_IGNORED},
        "forced_spatial_filter_weight": {"type": "number", "description": _MF_IGNORED},
        "forced_bilateral_filter_weight": {"type": "number", "description": _MF_IGNORED},
        "iter_multiplier": {"type": "number", "description": _MF_IGNORED},
        "norm": _repeated({"enum": ["L1", "L2", 1, 2]}, f"always L2; {_MF_IGNORED}"),
        "scale_term": _repeated({"type": "boolean"}, f"always on; {_MF_IGNORED}"),
        "bias_term": _repeated({"type": "boolean"}, f"always off; {_MF_IGNORED}"),
        "group": _repeated(dict(POSITIVE_INT), f"always C; {_MF_IGNORED}"),
        "weight_filler": {"description": _MF_IGNORED},
        "bias_filler": {"description": _MF_IGNORED},
        "engine": {"enum": ["DEFAULT", "CAFFE", "CUDNN", 0, 1, 2], "description": _MF_IGNORED},
    }
    required = ("num_iterations", "kernel_size")
    bottoms = (4, 4)
    tops = (1, 1)
    blobs = ("spatial_weight", "bilateral_weight", "compatibility")

    def check(self, spec: LayerSpec) -> None:
        _meanfield_filters(spec)

    def infer(self, spec: LayerSpec, shapes: List[Shape]) -> List[Shape]:
        names = ("unary", "Q0", "embxy", "xy")
        for name, shape in zip(names, shapes):
            _check_4d(spec, shape, name)
        unary = tuple(shapes[0])
        if tuple(shapes[1]) != unary:
            raise spec.shape_error(f"Q0 {list(shapes[1])} must have the shape of unary {list(unary)}",
                                   hint="the configs feed the unary logits (via a Split) as Q0")
        for name, shape in zip(names[2:], shapes[2:]):
            if shape[0] != unary[0] or tuple(shape[2:]) != unary[2:]:
                raise spec.shape_error(
                    f"{name} {list(shape)} must have the N, H and W of unary {list(unary)}",
                    hint="resize the features to the unary (e.g. with Interp)")
        geos, _, _, _ = _meanfield_filters(spec)
        for name, geo in zip(("bilateral", "spatial"), geos):
            ho, wo = geo.out(unary[2], unary[3])
            if (ho, wo) != unary[2:]:
                k, d = geo.kernel[0], geo.dilation[0]
                raise spec.shape_error(
                    f"the {name} filter (kernel_size {k}, pad {geo.pad[0]}, stride "
                    f"{geo.stride[0]}, dilation {d}) maps {unary[2]}x{unary[3]} to {ho}x{wo}; "
                    "mean field needs the same size",
                    hint=f"use stride 1 and pad {d * (k - 1) // 2}" if (d * (k - 1)) % 2 == 0
                    else "use an odd kernel_size, stride 1 and pad dilation*(kernel_size-1)/2")
        return [unary]

    def build(self, spec: LayerSpec, shapes: List[Shape]) -> nn.Module:
        self.infer(spec, shapes)
        return NormConvMeanfieldModule(spec, shapes[0][1])

    def flops(self, spec, shapes, out_shapes) -> int:
        n, c, h, w = shapes[0]
        geos, _, _, _ = _meanfield_filters(spec)
        taps = [g.kernel[0] * g.kernel[1] for g in geos]
        px = n * h * w
        filters = sum(px * k * (3 * shapes[2 + i][1] + 4) for i, k in enumerate(taps))
        per_iter = px * (2 * c * sum(taps) + 3 * 2 * c * c + 4 * c)
        return filters + int(spec["num_iterations"]) * per_iter
