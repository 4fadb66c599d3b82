"""Losses and accuracy layers with Caffe's normalisation, label handling and metrics.

* ``SoftmaxWithLoss``: -sum log(max(p_label, FLT_MIN)) over non-ignored positions divided
  by the normaliser (FULL = outer * inner, VALID = non-ignored count (default),
  BATCH_SIZE = outer, NONE = 1; at least 1).  The deprecated ``normalize`` maps to VALID
  (true) or BATCH_SIZE (false) when ``normalization`` is not written.  Labels are cast to
  int by truncation, like Caffe's ``static_cast<int>``; a label outside [0, C) that is not
  the ignore label is a :class:`~pacnet.errors.DataError`, not a crash.
* ``EuclideanLoss``: sum (a - b)^2 / (2 N).
* ``SigmoidCrossEntropyLoss``: BVLC's newer layer (ignore_label; normalisation default
  BATCH_SIZE when neither ``normalization`` nor ``normalize`` is given).
* ``Accuracy``: Caffe's top-k rule (a prediction is correct when at most top_k classes
  score >= the true class), optional per-class accuracy top.
* ``SegAccuracy`` (DeepLab): confusion matrix over argmax predictions, top
  [pixel accuracy, mean class recall, mean IoU]; cleared on every forward unless
  ``reset: false``.

Loss tops are 0-dim tensors (shape ``()``).
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pacnet.errors import DataError, ShapeError
from pacnet.layers.common import as_list, canonical_axis, numel, repeated
from pacnet.registry import Layer, register

#: log(FLT_MIN): Caffe clamps probabilities at FLT_MIN (float's, also for double).
LOG_FLT_MIN = math.log(1.1754943508222875e-38)

_NORMALIZATION = ["FULL", "VALID", "BATCH_SIZE", "NONE"]
_IGNORE = {"type": "integer", "description": "label value that contributes nothing (unset = none)"}
_NORMALIZE = {"type": "boolean",
              "description": "deprecated: when normalization is not written, true = VALID, false = BATCH_SIZE"}


def _n_tops(spec) -> int:
    return len(spec.tops) if spec.tops else 1


class _Located:
    def _locate(self, spec) -> None:
        self._layer_name, self._layer_type = spec.name, spec.type

    def _data_error(self, message: str, hint: Optional[str] = None) -> DataError:
        return DataError(message, layer=self._layer_name, layer_type=self._layer_type, hint=hint)

    def _check_labels(self, labels: torch.Tensor, valid: torch.Tensor, classes: int) -> None:
        bad = valid & ((labels < 0) | (labels >= classes))
        if bool(bad.any()):
            value = int(labels[bad][0])
            raise self._data_error(
                f"label value {value} is outside [0, {classes}) and is not the ignore label",
                hint="fix the labels, or set ignore_label to that value")


def _valid(labels: torch.Tensor, ignore_label: Optional[int]) -> torch.Tensor:
    if ignore_label is None:
        return torch.ones_like(labels, dtype=torch.bool)
    return labels != ignore_label


def _resolve_normalization(spec, default: str) -> str:
    """``normalization`` if written (or defaulted by the schema), else the ``normalize`` mapping."""
    normalize = spec.get("normalize")
    written = spec.has("normalization")
    if normalize is not None and not written:
        return "VALID" if normalize else "BATCH_SIZE"
    return spec.get("normalization") or default


def _normalizer(mode: str, outer: int, inner: int, valid: torch.Tensor) -> torch.Tensor:
    if mode == "VALID":
        n = valid.sum().to(torch.float64)
    else:
        n = torch.tensor(float({"FULL": outer * inner, "BATCH_SIZE": outer, "NONE": 1}[mode]),
                         dtype=torch.float64, device=valid.device)
    return n.clamp(min=1.0)


def _outer_inner(shape: Sequence[int], axis: int):
    return math.prod(shape[:axis]), math.prod(shape[axis + 1:])


# ----------------------------------------------------------------------------- SoftmaxWithLoss

class SoftmaxWithLossModule(nn.Module, _Located):
    def __init__(self, spec, axis: int, ignore_label: Optional[int], normalization: str, n_tops: int):
        super().__init__()
        self._locate(spec)
        self.axis, self.ignore_label, self.normalization, self.n_tops = axis, ignore_label, normalization, n_tops

    def forward(self, scores, label):
        classes = scores.shape[self.axis]
        outer, inner = _outer_inner(scores.shape, self.axis)
        if label.numel() != outer * inner:
            raise self._data_error(f"label has {label.numel()} elements, the scores need {outer * inner}")
        logp = F.log_softmax(scores, dim=self.axis).reshape(outer, classes, inner)
        labels = label.detach().reshape(outer, inner).to(torch.int64)        # truncates, as static_cast<int>
        valid = _valid(labels, self.ignore_label)
        self._check_labels(labels, valid, classes)
        picked = logp.gather(1, torch.where(valid, labels, 0).unsqueeze(1)).squeeze(1)
        # Value clamped at log(FLT_MIN) as Caffe; gradient p - 1 unclamped, as Caffe's backward.
        picked = picked + (picked.clamp(min=LOG_FLT_MIN) - picked).detach()
        total = -torch.where(valid, picked, torch.zeros_like(picked)).sum()
        loss = total / _normalizer(self.normalization, outer, inner, valid).to(total.dtype)
        if self.n_tops == 2:
            return loss, F.softmax(scores, dim=self.axis)
        return loss

    def extra_repr(self):
        return f"axis={self.axis}, ignore_label={self.ignore_label}, normalization={self.normalization}"


def _label_count_check(spec, shapes, axis: int) -> None:
    outer, inner = _outer_inner(shapes[0], axis)
    if numel(shapes[1]) != outer * inner:
        raise spec.shape_error(
            f"label {list(shapes[1])} has {numel(shapes[1])} elements; scores {list(shapes[0])} with "
            f"axis {axis} need {outer * inner} (one per position)",
            hint="for N x C x H x W scores the label must be N x 1 x H x W (or N x H x W)")


@register("SoftmaxWithLoss")
class SoftmaxWithLoss(Layer):
    """Softmax over ``axis`` then the multinomial logistic loss against integer labels.

    Shapes: scores N x C x H x W (C on ``axis``), label with N*H*W elements -> loss ``()``;
    an optional second top gets the softmax probabilities (shape of the scores).
    """

    caffe_params = ("softmax_param", "loss_param", "softmaxloss_param")  # the last: DeepLab v1

    params = {
        "axis": {"type": "integer", "default": 1, "description": "class axis of the scores (softmax_param.axis)"},
        "ignore_label": _IGNORE,
        "normalization": {"enum": _NORMALIZATION, "default": "VALID",
                          "description": "divisor of the summed loss: FULL = all positions, VALID = "
                                         "non-ignored positions, BATCH_SIZE = outer count, NONE = 1"},
        "normalize": _NORMALIZE,
        "engine": {"enum": ["DEFAULT", "CAFFE", "CUDNN"], "default": "DEFAULT",
                   "description": "Caffe's softmax implementation choice; accepted and ignored"},
    }
    bottoms = (2, 2)
    tops = (1, 2)
    loss = True

    def gradient_bottoms(self, spec):
        return (True, False)  # the labels get none

    def infer(self, spec, shapes):
        axis = canonical_axis(spec, int(spec["axis"]), len(shapes[0]))
        _label_count_check(spec, shapes, axis)
        return [()] + ([tuple(shapes[0])] if _n_tops(spec) == 2 else [])

    def build(self, spec, shapes):
        axis = canonical_axis(spec, int(spec["axis"]), len(shapes[0]))
        return SoftmaxWithLossModule(spec, axis, spec.get("ignore_label"),
                                     _resolve_normalization(spec, "VALID"), _n_tops(spec))

    def flops(self, spec, shapes, out_shapes):
        return 6 * numel(shapes[0])


# ----------------------------------------------------------------------------- EuclideanLoss

class EuclideanLossModule(nn.Module):
    def forward(self, a, b):
        diff = a - b.reshape(a.shape)
        return (diff * diff).sum() / a.shape[0] / 2


@register("EuclideanLoss")
class EuclideanLoss(Layer):
    """loss = sum (a - b)^2 / (2 N).  Shapes: a, b with the same N and count -> ``()``."""

    bottoms = (2, 2)
    tops = (1, 1)
    loss = True

    def infer(self, spec, shapes):
        a, b = tuple(shapes[0]), tuple(shapes[1])
        if not a or not b or a[0] != b[0] or numel(a[1:]) != numel(b[1:]):
            raise spec.shape_error(f"bottoms {list(a)} and {list(b)} need the same first dim and count",
                                   hint="both bottoms must hold one value per prediction")
        return [()]

    def build(self, spec, shapes):
        return EuclideanLossModule()

    def flops(self, spec, shapes, out_shapes):
        return 3 * numel(shapes[0])


# ----------------------------------------------------------------------------- SigmoidCrossEntropyLoss

class SigmoidCrossEntropyLossModule(nn.Module):
    def __init__(self, ignore_label: Optional[int], normalization: str):
        super().__init__()
        self.ignore_label, self.normalization = ignore_label, normalization

    def forward(self, x, target):
        target = target.detach().reshape(x.shape).to(x.dtype)
        per = F.binary_cross_entropy_with_logits(x, target, reduction="none")
        outer = x.shape[0]
        inner = x.numel() // max(outer, 1)
        if self.ignore_label is not None:
            valid = target.to(torch.int64) != self.ignore_label
            per = torch.where(valid, per, torch.zeros_like(per))
        else:
            valid = torch.ones_like(per, dtype=torch.bool)
        return per.sum() / _normalizer(self.normalization, outer, inner, valid).to(per.dtype)

    def extra_repr(self):
        return f"ignore_label={self.ignore_label}, normalization={self.normalization}"


@register("SigmoidCrossEntropyLoss")
class SigmoidCrossEntropyLoss(Layer):
    """loss = -sum [t log sigmoid(x) + (1 - t) log(1 - sigmoid(x))] / normaliser (stable form).

    Shapes: logits and targets with the same count -> ``()``.  The normaliser counts
    outer = N, inner = count / N; unset normalization (and normalize) = BATCH_SIZE.
    """

    params = {
        "ignore_label": _IGNORE,
        "normalization": {"enum": _NORMALIZATION,
                          "description": "divisor of the summed loss (FULL, VALID, BATCH_SIZE, NONE); "
                                         "unset = BATCH_SIZE, as BVLC's layer"},
        "normalize": _NORMALIZE,
    }
    bottoms = (2, 2)
    tops = (1, 1)
    loss = True

    def gradient_bottoms(self, spec):
        return (True, False)  # the targets get none

    def infer(self, spec, shapes):
        a, b = tuple(shapes[0]), tuple(shapes[1])
        if not a or numel(a) != numel(b):
            raise spec.shape_error(f"logits {list(a)} and targets {list(b)} must have the same count")
        return [()]

    def build(self, spec, shapes):
        return SigmoidCrossEntropyLossModule(spec.get("ignore_label"),
                                             _resolve_normalization(spec, "BATCH_SIZE"))

    def flops(self, spec, shapes, out_shapes):
        return 6 * numel(shapes[0])


# ----------------------------------------------------------------------------- Accuracy

class AccuracyModule(nn.Module, _Located):
    def __init__(self, spec, axis: int, top_k: int, ignore_label: Optional[int], n_tops: int):
        super().__init__()
        self._locate(spec)
        self.axis, self.top_k, self.ignore_label, self.n_tops = axis, top_k, ignore_label, n_tops

    @torch.no_grad()
    def forward(self, scores, label):
        classes = scores.shape[self.axis]
        outer, inner = _outer_inner(scores.shape, self.axis)
        s = scores.reshape(outer, classes, inner)
        labels = label.reshape(outer, inner).to(torch.int64)
        valid = _valid(labels, self.ignore_label)
        self._check_labels(labels, valid, classes)
        safe = torch.where(valid, labels, 0)
        true_score = s.gather(1, safe.unsqueeze(1))
        # Caffe counts the classes scoring >= the true one (the true class included).
        correct = ((s >= true_score).sum(dim=1) <= self.top_k) & valid
        count = valid.sum()
        acc = (correct.sum().to(torch.float64) / count.clamp(min=1)).to(scores.dtype)
        if self.n_tops == 1:
            return acc
        per_count = torch.bincount(safe[valid], minlength=classes).to(torch.float64)
        per_correct = torch.bincount(safe[correct], minlength=classes).to(torch.float64)
        per_class = torch.where(per_count > 0, per_correct / per_count.clamp(min=1), 0.0)
        return acc, per_class.to(scores.dtype)

    def extra_repr(self):
        return f"axis={self.axis}, top_k={self.top_k}, ignore_label={self.ignore_label}"


@register("Accuracy")
class Accuracy(Layer):
    """Top-k classification accuracy (no gradient).

    Shapes: scores N x C x ... (C on ``axis``), label with one element per position ->
    accuracy ``()``; an optional second top gets the per-class accuracy (C,).
    """

    params = {
        "top_k": {"type": "integer", "minimum": 1, "default": 1,
                  "description": "correct when the true class is among the top_k scores"},
        "axis": {"type": "integer", "default": 1, "description": "class axis of the scores"},
        "ignore_label": _IGNORE,
    }
    bottoms = (2, 2)
    tops = (1, 2)

    def gradient_bottoms(self, spec):
        return (False, False)

    def infer(self, spec, shapes):
        axis = canonical_axis(spec, int(spec["axis"]), len(shapes[0]))
        _label_count_check(spec, shapes, axis)
        classes = shapes[0][axis]
        if int(spec["top_k"]) > classes:
            raise spec.error(f"top_k {spec['top_k']} exceeds the {classes} classes", key="top_k", cls=ShapeError)
        return [()] + ([(classes,)] if _n_tops(spec) == 2 else [])

    def build(self, spec, shapes):
        axis = canonical_axis(spec, int(spec["axis"]), len(shapes[0]))
        return AccuracyModule(spec, axis, int(spec["top_k"]), spec.get("ignore_label"), _n_tops(spec))

    def flops(self, spec, shapes, out_shapes):
        return numel(shapes[0])


# ----------------------------------------------------------------------------- SegAccuracy

def confusion_metrics(cm: torch.Tensor) -> List[float]:
    """DeepLab's ConfusionMatrix: [accuracy, avgRecall(false), avgJaccard] of a C x C matrix
    (rows = ground truth, columns = prediction), computed in float64.

    accuracy = trace / total (0 if empty); mean recall over classes present in the ground
    truth (0 if none); mean IoU over *all* classes, where a class with empty union counts 1.
    """
    cm = cm.to(torch.float64)
    total = cm.sum()
    diag = cm.diagonal()
    rows, cols = cm.sum(1), cm.sum(0)
    acc = diag.sum() / total if total > 0 else torch.zeros((), dtype=torch.float64)
    present = rows > 0
    recall = (diag[present] / rows[present]).mean() if present.any() else torch.zeros((), dtype=torch.float64)
    union = rows + cols - diag
    iou = torch.where(diag == union, torch.ones_like(diag), diag / union.clamp(min=1))
    return [float(acc), float(recall), float(iou.mean())]


class SegAccuracyModule(nn.Module, _Located):
    def __init__(self, spec, classes: int, ignore: Sequence[int], reset: bool):
        super().__init__()
        self._locate(spec)
        self.classes, self.ignore, self.reset = classes, sorted(set(int(i) for i in ignore)), bool(reset)
        self.register_buffer("confusion", torch.zeros(classes, classes, dtype=torch.int64), persistent=False)

    def clear(self) -> None:
        """Forget the accumulated confusion matrix (what ``reset: true`` does every forward)."""
        self.confusion.zero_()

    @torch.no_grad()
    def forward(self, scores, label):
        n, c = scores.shape[0], scores.shape[1]
        # Caffe's partial_sort with greater<pair<value, class>>: ties go to the larger class.
        pred = (c - 1) - scores.flip(1).argmax(dim=1).reshape(n, -1)
        gt = label.reshape(n, -1).to(torch.int64)
        valid = torch.ones_like(gt, dtype=torch.bool)
        for i in self.ignore:
            valid &= gt != i
        self._check_labels(gt, valid, c)
        counts = torch.bincount((gt[valid] * c + pred[valid]).to(torch.int64), minlength=c * c).reshape(c, c)
        if self.reset:
            self.confusion.zero_()
        self.confusion += counts.to(self.confusion.device)
        metrics = confusion_metrics(self.confusion)
        return torch.tensor(metrics, dtype=scores.dtype, device=scores.device).reshape(1, 1, 1, 3)

    def extra_repr(self):
        return f"classes={self.classes}, ignore_label={self.ignore}, reset={self.reset}"


@register("SegAccuracy")
class SegAccuracy(Layer):
    """Segmentation metrics from a confusion matrix of argmax predictions (DeepLab fork).

    Shapes: scores N x C x H x W, label N x 1 x H x W (or N x H x W) -> (1, 1, 1, 3) =
    [pixel accuracy, mean class recall, mean IoU].  Labels listed in ``ignore_label`` are
    skipped; others outside [0, C) are a DataError.  The matrix (module buffer
    ``confusion``) is cleared on every forward unless ``reset: false``, which accumulates
    over forwards until ``module.clear()``.  No gradient.
    """

    params = {
        "ignore_label": repeated({"type": "integer"}, "label values skipped (e.g. 255)", default=[]),
        "reset": {"type": "boolean", "default": True,
                  "description": "clear the confusion matrix on every forward (false = accumulate)"},
        "metric": {"enum": ["PixelAccuracy", "ClassAccuracy", "PixelIOU"], "default": "PixelAccuracy",
                   "description": "accepted for compatibility; the layer outputs all three metrics"},
    }
    bottoms = (2, 2)

    def gradient_bottoms(self, spec):
        return (False, False)

    def infer(self, spec, shapes):
        s, lab = tuple(shapes[0]), tuple(shapes[1])
        if len(s) != 4:
            raise spec.shape_error(f"scores must be N x C x H x W, got {list(s)}")
        n, _, h, w = s
        if lab not in ((n, 1, h, w), (n, h, w)):
            raise spec.shape_error(f"label {list(lab)} does not match scores {list(s)}",
                                   hint=f"the label must be {[n, 1, h, w]}")
        return [(1, 1, 1, 3)]

    def build(self, spec, shapes):
        return SegAccuracyModule(spec, shapes[0][1], as_list(spec.get("ignore_label")), spec["reset"])

    def flops(self, spec, shapes, out_shapes):
        return numel(shapes[0])
