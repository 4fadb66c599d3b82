"""Dense PAC-CRF layers: ``PacCRF`` and ``PacCRFLoose`` (mean-field inference as a layer).

The modules are :class:`pacnet.crf.PacCRF` / :class:`pacnet.crf.PacCRFLoose` themselves
(subclassed only to take the bottoms positionally), so a layer's ``state_dict`` keys are
``<layer>.`` followed by the original paccrf's keys (``unary_weight``,
``messengers.<i>.weight``, ``compat.<i>.weight``, ``pairwise_weights.<i>``; for the loose
type under ``steps.<j>.``), and the original's weights load into it directly.

Configuration, two ways:

* ``pairwise_kernels``: a list of ``{kernel_size, dilation, blur, compat_type,
  spatial_filter, pairwise_weight}`` (the arguments of ``add_pairwise_kernel``; absent
  fields take its defaults 3, 1, 1, '4d', true, 1.0);
* ``model``: the original's shorthand, e.g. ``crfi5p4d5641p4d5161`` (see
  :func:`pacnet.crf.parse_crf_name`), which gives the step count and the kernels.

``PositionFeatures`` gives the pixel coordinates of a blob (the original's
``create_position_feats``), the position part of a CRF's edge features.

Precedence: ``model`` supplies ``num_steps`` and the kernels; a ``num_steps`` written
next to it overrides the model's step count; ``pairwise_kernels`` and ``model`` together
are an error (neither silently wins).  A loose model (``...l p...``) needs type
``PacCRFLoose`` and a tied one ``PacCRF``.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Tuple

import torch
from torch import nn

from pacnet.crf import (COMPAT_TYPES, FINAL_OUTPUTS, PacCRF, PacCRFLoose, create_position_feats,
                        parse_crf_name)
from pacnet.crf import _blurred_size  # the pooled size of a blurred kernel
from pacnet.errors import PacnetError, PacnetValueError
from pacnet.layers.common import numel
from pacnet.registry import Layer, LayerSpec, Shape, register

_KERNEL_DEFAULTS = dict(kernel_size=3, dilation=1, blur=1, compat_type="4d", spatial_filter=True,
                        pairwise_weight=1.0)

KERNEL = {
    "type": "object",
    "description": "one pairwise kernel (PacCRF.add_pairwise_kernel)",
    "properties": {
        "kernel_size": {"type": "integer", "minimum": 1, "default": 3,
                        "description": "window size k (odd): the message sums over k x k neighbours"},
        "dilation": {"type": "integer", "minimum": 1, "default": 1,
                     "description": "spacing of the window's taps, in (blurred) pixels"},
        "blur": {"type": "integer", "minimum": 1, "default": 1,
                 "description": "average-pool features and Q by this factor before message "
                                "passing and upsample the message back (bilinear)"},
        "compat_type": {"enum": list(COMPAT_TYPES), "default": "4d",
                        "description": "4d: full C x C x k x k filter; 2d: shared k x k filter "
                                       "then a learned C x C compatibility; potts: shared "
                                       "filter, negated weight; na: plain convolution "
                                       "ignoring the features; none: shared filter, no "
                                       "compatibility (the original's fall-through)"},
        "spatial_filter": {"type": "boolean", "default": True,
                           "description": "shared filters: learnable (true) or a fixed box "
                                          "with a zero centre (false); ignored by 4d and na"},
        "pairwise_weight": {"type": "number", "default": 1.0,
                            "description": "factor of this kernel's message (negated for potts); "
                                           "learned only for potts without spatial_filter"},
    },
    "additionalProperties": False,
}

PARAMS = {
    "num_steps": {"type": "integer", "minimum": 1, "default": 5,
                  "description": "mean-field iterations (overrides the step count of model)"},
    "final_output": {"enum": list(FINAL_OUTPUTS), "default": "log_Q",
                     "description": "the top: log_Q (logits of the last step), softmax or "
                                    "log_softmax over the classes"},
    "perturbed_init": {"type": "boolean", "default": True,
                       "description": "add U(-5e-4, 5e-4) to the filter and compat inits"},
    "fixed_weighting": {"type": "boolean", "default": False,
                        "description": "unary_weight (and every pairwise weight) is a constant"},
    "unary_weight": {"type": "number", "default": 1.0,
                     "description": "factor of the unary in every step after the first "
                                    "(the first starts from the unweighted unary)"},
    "pairwise_kernels": {"type": "array", "items": KERNEL, "minItems": 1,
                         "description": "the pairwise kernels, in order"},
    "model": {"type": "string",
              "description": "the original's shorthand instead of pairwise_kernels, e.g. "
                             "crfi5p4d5641p4d5161 (5 steps, 4d 5x5 kernels with dilation 64 "
                             "and 16, blur 1); crf...l for PacCRFLoose"},
}


def _config(spec: LayerSpec) -> Tuple[int, List[Dict[str, Any]]]:
    """``(num_steps, kernels)`` of a layer, from ``model`` and/or the explicit params."""
    loose_type = spec.type == "PacCRFLoose"
    num_steps = int(spec["num_steps"])
    model = spec.get("model")
    if model is not None:
        if spec.has("pairwise_kernels"):
            raise spec.error("give either model or pairwise_kernels, not both",
                             key="pairwise_kernels",
                             hint=f"model {model!r} already defines the kernels; remove one")
        try:
            loose, steps, kernels = parse_crf_name(model)
        except PacnetValueError as err:
            raise spec.error(err.message, key="model", hint=err.hint) from None
        if loose != loose_type:
            want = "PacCRFLoose" if loose else "PacCRF"
            raise spec.error(
                f"model {model!r} is a {'loose' if loose else 'tied'} CRF but the layer is "
                f"{spec.type}", key="model",
                hint=f"use type {want}, or " + ("drop the 'l'" if loose else
                                                "add 'l' before the first 'p'") + " in the model")
        if not spec.has("num_steps"):
            num_steps = steps
    else:
        kernels = [{**_KERNEL_DEFAULTS, **k} for k in (spec.get("pairwise_kernels") or [])]
        if not kernels:
            raise spec.error("a CRF needs pairwise_kernels or model",
                             hint="e.g. model: crfi5p4d5641p4d5161, or pairwise_kernels: "
                                  "[{kernel_size: 5, dilation: 16}]")
    return num_steps, kernels


def _needs_features(kernel: Dict[str, Any]) -> bool:
    return kernel["compat_type"] != "na"


class _Bottoms:
    """``forward(unary, *features)`` for the CRF modules; located runtime errors."""

    def _setup(self, spec: LayerSpec) -> None:
        self._layer = (spec.name, spec.type, spec.location)

    def forward(self, unary: torch.Tensor, *features: torch.Tensor) -> torch.Tensor:
        feats = features[0] if len(features) == 1 else (list(features) if features else None)
        try:
            return super().forward(unary, feats)
        except PacnetError as err:
            name, type_name, location = self._layer
            raise err.at(location=location, layer=name, layer_type=type_name) from None


class PacCRFModule(_Bottoms, PacCRF):
    """:class:`pacnet.crf.PacCRF` taking ``(unary, feat)`` or ``(unary, feat_0, ..., feat_n-1)``."""


class PacCRFLooseModule(_Bottoms, PacCRFLoose):
    """:class:`pacnet.crf.PacCRFLoose` taking ``(unary, feat)`` or ``(unary, feat_0, ...)``."""


class _CRFLayer(Layer):
    params = PARAMS
    bottoms = (1, None)
    tops = (1, 1)
    # No blobs: the learnable tensors depend on the kernel list (messengers.<i>.weight,
    # compat.<i>.weight, pairwise_weights.<i>, unary_weight), so there is no fixed Caffe
    # blob order for ``param:`` entries to refer to.  They train with lr_mult/decay_mult 1.
    blobs = ()
    module_class: type = PacCRFModule

    def check(self, spec: LayerSpec) -> None:
        _, kernels = _config(spec)
        for i, k in enumerate(kernels):
            if k["kernel_size"] % 2 == 0:
                raise spec.error(f"pairwise kernel {i}: kernel_size must be odd, got "
                                 f"{k['kernel_size']}", key="pairwise_kernels",
                                 hint="a pairwise window has a centre pixel; use 3, 5, 7, ...")
            if not math.isfinite(float(k["pairwise_weight"])):
                raise spec.error(f"pairwise kernel {i}: pairwise_weight must be finite, got "
                                 f"{k['pairwise_weight']}", key="pairwise_kernels")
        if not math.isfinite(float(spec["unary_weight"])):
            raise spec.error(f"unary_weight must be finite, got {spec['unary_weight']}",
                             key="unary_weight")
        n_bottoms = len(spec.bottoms)
        need = any(_needs_features(k) for k in kernels)
        allowed = {2, 1 + len(kernels)} | ({1} if not need else set())
        if n_bottoms not in allowed:
            raise spec.error(
                f"has {n_bottoms} bottoms; a CRF with {len(kernels)} pairwise kernel(s) takes "
                f"the unary and one shared feature blob"
                + (f", or the unary and {len(kernels)} feature blobs (one per kernel)"
                   if len(kernels) > 1 else ""), key="bottom",
                hint="bottom: [unary, features]")

    def infer(self, spec: LayerSpec, shapes: List[Shape]) -> List[Shape]:
        unary = shapes[0]
        if len(unary) != 4:
            raise spec.shape_error(f"the unary (bottom 0) must be 4-D N x C x H x W, got "
                                   f"{list(unary)}")
        _, kernels = _config(spec)
        for j, s in enumerate(shapes[1:], start=1):
            if len(s) != 4 or s[0] != unary[0] or tuple(s[2:]) != tuple(unary[2:]):
                raise spec.shape_error(
                    f"edge features (bottom {j}) must be [{unary[0]}, F, {unary[2]}, "
                    f"{unary[3]}] (the unary's N, H, W), got {list(s)}",
                    hint="resize the features to the unary (e.g. Interp)")
        return [tuple(unary)]

    def build(self, spec: LayerSpec, shapes: List[Shape]) -> nn.Module:
        self.infer(spec, shapes)
        num_steps, kernels = _config(spec)
        module = self.module_class(
            shapes[0][1], num_steps, final_output=spec["final_output"],
            perturbed_init=bool(spec["perturbed_init"]),
            fixed_weighting=bool(spec["fixed_weighting"]),
            unary_weight=float(spec["unary_weight"]), pairwise_kernels=kernels)
        module._setup(spec)
        return module

    def flops(self, spec: LayerSpec, shapes: List[Shape], out_shapes: List[Shape]) -> int:
        num_steps, kernels = _config(spec)
        n, c, h, w = shapes[0]
        total = 0
        per_step = 6 * n * c * h * w  # softmax, unary scaling, subtractions (roughly)
        for i, k in enumerate(kernels):
            taps = k["kernel_size"] ** 2
            pix = n * numel(_blurred_size((h, w), k["blur"]))
            if k["compat_type"] in ("4d", "na"):
                per_step += 2 * c * c * taps * pix
            else:
                per_step += 3 * c * taps * pix
                if k["compat_type"] == "2d":
                    per_step += 2 * c * c * pix
            if _needs_features(k):
                f = shapes[min(1 + i, len(shapes) - 1)][1] if len(shapes) > 1 else 0
                total += (3 * f + 2) * taps * pix  # the gaussian kernel, once
        return total + num_steps * per_step


@register("PacCRF")
class PacCRFLayer(_CRFLayer):
    """Mean-field PAC-CRF (NVlabs/pacnet ``PacCRF``): unary N x C x H x W + edge features -> N x C x H x W.

    Bottoms: the unary logits (N x C x H x W) and either one edge-feature blob
    N x F x H x W shared by every pairwise kernel or one per kernel (same N, H, W).
    Each step: ``Q = softmax(logQ)``, ``logQ = unary_weight * unary - sum_i w_i m_i(Q)``
    with ``m_i`` a pixel-adaptive filtering of Q by ``exp(-|f(p) - f(q)|^2 / 2)`` over a
    dilated k x k window (fused kernels); the first step starts from the unweighted
    unary.  Top: logQ, softmax or log_softmax (``final_output``).  Configure with
    ``pairwise_kernels`` or the original's ``model`` shorthand.  Parameters are named as
    the original's (``<layer>.messengers.<i>.weight``, ...), initialised by its CRF
    fillers; no ``param:`` blobs (the count depends on the kernels).
    """

    module_class = PacCRFModule


@register("PacCRFLoose")
class PacCRFLooseLayer(_CRFLayer):
    """PAC-CRF with separate parameters per mean-field step (NVlabs/pacnet ``PacCRFLoose``).

    Same bottoms, top and parameters as ``PacCRF``; the module holds ``num_steps`` one-step
    CRFs (``<layer>.steps.<j>.messengers.<i>.weight``, ...), each initialised on its own.
    A ``model`` shorthand must be a loose one (``crfi5lp...``).
    """

    module_class = PacCRFLooseModule


class PositionFeaturesModule(nn.Module):
    """``x`` N x C x H x W -> its pixel coordinates N x 2 x H x W ([y, x] / scale)."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return create_position_feats(x.shape[-2:], self.scale, bs=x.shape[0], device=x.device,
                                     dtype=x.dtype)

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


@register("PositionFeatures")
class PositionFeatures(Layer):
    """Pixel coordinates of the bottom, for a CRF's edge features (NVlabs/pacnet's
    ``create_position_feats``): N x C x H x W -> N x 2 x H x W, channel 0 the row index y,
    channel 1 the column index x (0-based), each divided by ``scale``.  Only the bottom's
    shape is used (no gradient flows into it)."""

    params = {"scale": {"type": "number", "exclusiveMinimum": 0, "default": 1.0,
                        "description": "divisor of the coordinates (pixels per unit)"}}
    bottoms = (1, 1)
    tops = (1, 1)

    def gradient_bottoms(self, spec: LayerSpec) -> Tuple[bool, ...]:
        return (False,)  # only the bottom's shape is read

    def infer(self, spec: LayerSpec, shapes: List[Shape]) -> List[Shape]:
        shape = shapes[0]
        if len(shape) != 4:
            raise spec.shape_error(f"the bottom must be 4-D N x C x H x W, got {list(shape)}")
        return [(shape[0], 2, shape[2], shape[3])]

    def build(self, spec: LayerSpec, shapes: List[Shape]) -> nn.Module:
        return PositionFeaturesModule(float(spec["scale"]))

    def flops(self, spec: LayerSpec, shapes: List[Shape], out_shapes: List[Shape]) -> int:
        return 0

