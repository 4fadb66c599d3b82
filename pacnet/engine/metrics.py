"""Evaluation metrics accumulated over batches (and over DDP ranks).

* :class:`ConfusionMatrix`: semantic segmentation -- pixel accuracy, mean class accuracy,
  mean IoU (VOC's measure) and per-class IoU from a ``K x K`` confusion matrix; pixels
  labelled ``ignore_label`` are skipped.
* :class:`RMSE`: depth; the PAC paper's measure, the root of the mean squared error of
  each image (summed over channels) averaged over images; ``border`` pixels excluded.
* :class:`EPE`: optical flow; mean end-point error per image averaged over images;
  pixels with unknown flow (|gt| > 1e9, Middlebury's marker) are excluded.

RMSE and EPE take images (``N x C x H x W``) or clips (``N x C x T x H x W``); every frame
of a clip counts as an image, so a video model and an image model applied frame by frame
are measured alike.
* :class:`Average`: a running mean of a scalar (a test loss).

Each has ``update(...)``, ``compute() -> dict of floats``, ``reset()`` and
``all_reduce()`` (sums the accumulators across ranks; a no-op unless
``torch.distributed`` is initialised), so a test loop is: update per batch, all_reduce
once, compute.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

import torch

from pacnet.errors import DataError, PacnetValueError

__all__ = ["all_reduce_", "ConfusionMatrix", "RMSE", "EPE", "Average", "make_metric", "METRICS"]


def all_reduce_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` in place over all ranks; unchanged when not distributed."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl" and not tensor.is_cuda:  # NCCL reduces CUDA tensors only
            moved = tensor.cuda()
            dist.all_reduce(moved, op=dist.ReduceOp.SUM)
            tensor.copy_(moved.cpu())
        else:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def _labels(x: torch.Tensor, what: str) -> torch.Tensor:
    """``N x H x W`` integer labels from ``N x 1 x H x W`` or ``N x H x W``."""
    if x.dim() == 4 and x.shape[1] == 1:
        x = x[:, 0]
    if x.dim() != 3:
        raise PacnetValueError(f"{what} must be N x H x W or N x 1 x H x W, got {tuple(x.shape)}")
    if x.is_floating_point():
        x = x.round()
    return x.long()


class ConfusionMatrix:
    """Accumulates ``counts[true, predicted]`` over ``num_classes`` classes.

    ``update(pred, label)``: ``pred`` is ``N x K x H x W`` scores (argmax over K) or
    ``N x H x W`` / ``N x 1 x H x W`` class ids; ``label`` ``N x H x W`` or
    ``N x 1 x H x W`` (float allowed, like Caffe blobs).  A label that is neither a class
    nor ``ignore_label`` raises DataError.  Classes absent from both the labels and the
    predictions have no IoU/accuracy and are left out of the means (``nan`` per class).
    """

    def __init__(self, num_classes: int, ignore_label: Optional[int] = 255) -> None:
        if num_classes < 1:
            raise PacnetValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_label = ignore_label
        self.counts = torch.zeros(self.num_classes, self.num_classes, dtype=torch.float64)

    def reset(self) -> None:
        self.counts.zero_()

    @torch.no_grad()
    def update(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        k = self.num_classes
        if pred.dim() == 4 and pred.shape[1] > 1:
            if pred.shape[1] != k:
                raise PacnetValueError(f"scores have {pred.shape[1]} channels for {k} classes")
            pred = pred.argmax(1)
        pred, label = _labels(pred, "prediction"), _labels(label, "label")
        if pred.shape != label.shape:
            raise PacnetValueError(f"prediction {tuple(pred.shape)} and label {tuple(label.shape)} differ in shape")
        label = label.to(pred.device)
        valid = label != self.ignore_label if self.ignore_label is not None else torch.ones_like(label, dtype=torch.bool)
        bad = valid & ((label < 0) | (label >= k))
        if bool(bad.any()):
            value = int(label[bad][0])
            raise DataError(f"label value {value} is outside 0..{k - 1} and not ignore_label {self.ignore_label}",
                            hint="check num_classes and ignore_label")
        pred = pred.clamp(0, k - 1)
        idx = label[valid] * k + pred[valid]
        self.counts += torch.bincount(idx, minlength=k * k).reshape(k, k).cpu().double()

    def all_reduce(self) -> "ConfusionMatrix":
        self.counts = all_reduce_(self.counts)
        return self

    def compute(self) -> Dict[str, Any]:
        """``pixel_accuracy``, ``mean_accuracy``, ``mean_iou`` (floats, nan with no pixels),
        ``iou`` and ``accuracy`` (per-class lists, nan where undefined)."""
        c = self.counts
        tp = c.diag()
        gt = c.sum(1)
        pr = c.sum(0)
        total = c.sum()
        union = gt + pr - tp
        iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, math.nan))
        acc = torch.where(gt > 0, tp / gt.clamp(min=1), torch.full_like(tp, math.nan))
        return {
            "pixel_accuracy": float(tp.sum() / total) if total > 0 else math.nan,
            "mean_accuracy": float(torch.nanmean(acc)) if bool((gt > 0).any()) else math.nan,
            "mean_iou": float(torch.nanmean(iou)) if bool((union > 0).any()) else math.nan,
            "iou": [float(v) for v in iou],
            "accuracy": [float(v) for v in acc],
        }


def _crop(x: torch.Tensor, border: int) -> torch.Tensor:
    return x[..., border:x.shape[-2] - border, border:x.shape[-1] - border] if border > 0 else x


def _frames(pred: torch.Tensor, gt: torch.Tensor, what: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """``pred`` and ``gt`` of one shape as images: N x C x H x W as they are, clips
    N x C x T x H x W as N*T frames."""
    if pred.shape != gt.shape or pred.dim() not in (4, 5):
        raise PacnetValueError(f"{what}: prediction {tuple(pred.shape)} and ground truth {tuple(gt.shape)} "
                               "must both be N x C x H x W (images) or N x C x T x H x W (clips)")
    if pred.dim() == 5:
        pred, gt = (t.transpose(1, 2).flatten(0, 1) for t in (pred, gt))
    return pred, gt


class _PerImageMean:
    """Accumulates a per-image value: ``[sum over images, number of images]``."""

    name = "value"

    def __init__(self) -> None:
        self.state = torch.zeros(2, dtype=torch.float64)

    def reset(self) -> None:
        self.state.zero_()

    def all_reduce(self):
        self.state = all_reduce_(self.state)
        return self

    def _add(self, per_image: torch.Tensor) -> None:
        self.state += torch.stack([per_image.double().sum().cpu(), torch.tensor(float(per_image.numel()),
                                                                                dtype=torch.float64)])

    def compute(self) -> Dict[str, float]:
        total, n = self.state.tolist()
        return {self.name: total / n if n else math.nan}


class RMSE(_PerImageMean):
    """Root mean squared error per image, averaged over images (PAC ``th_rmse``):
    ``sqrt(sum_c mean_hw (pred - gt)^2)``; ``border`` pixels on each side excluded
    (NYU: 6).  Inputs ``N x C x H x W`` in the same units (metres), or clips
    ``N x C x T x H x W`` (every frame an image)."""

    name = "rmse"

    def __init__(self, border: int = 0) -> None:
        super().__init__()
        self.border = int(border)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, gt: torch.Tensor) -> None:
        pred, gt = _frames(pred, gt, "RMSE")
        d = _crop(pred.double(), self.border) - _crop(gt.double().to(pred.device), self.border)
        if d.numel() == 0:
            raise PacnetValueError(f"RMSE: border {self.border} leaves no pixels of {tuple(gt.shape[-2:])}")
        self._add(d.pow(2).mean(dim=(2, 3)).sum(1).sqrt())


class EPE(_PerImageMean):
    """Mean end-point error ``|pred - gt|_2`` per image over valid pixels, averaged over
    images.  Inputs ``N x 2 x H x W`` (u, v), or clips ``N x 2 x T x H x W`` (every frame
    an image); pixels whose ground truth exceeds ``unknown`` in magnitude (Middlebury marks
    unknown flow with 1e10) are excluded."""

    name = "epe"

    def __init__(self, border: int = 0, unknown: float = 1e9) -> None:
        super().__init__()
        self.border, self.unknown = int(border), float(unknown)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, gt: torch.Tensor) -> None:
        pred, gt = _frames(pred, gt, "EPE")
        if pred.shape[1] != 2:
            raise PacnetValueError(f"EPE needs 2-channel flow (u, v), got {pred.shape[1]} channels")
        pred, gt = _crop(pred.double(), self.border), _crop(gt.double().to(pred.device), self.border)
        valid = (gt.abs() <= self.unknown).all(1)
        err = (pred - gt).pow(2).sum(1).sqrt()
        count = valid.flatten(1).sum(1)
        per_image = (err * valid).flatten(1).sum(1) / count.clamp(min=1)
        self._add(per_image[count > 0])


class Average(_PerImageMean):
    """Running (weighted) mean of a scalar, e.g. the test loss: ``update(value, weight=1)``."""

    def __init__(self, name: str = "loss") -> None:
        super().__init__()
        self.name = name

    def update(self, value: Any, weight: float = 1.0) -> None:
        v = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
        self.state += torch.tensor([v * weight, float(weight)], dtype=torch.float64)


METRICS = {"confusion": ConfusionMatrix, "miou": ConfusionMatrix, "rmse": RMSE, "epe": EPE, "average": Average}


def make_metric(name: str, **kwargs: Any):
    """A metric by name (``miou``/``confusion``, ``rmse``, ``epe``, ``average``)."""
    if name not in METRICS:
        from pacnet.errors import did_you_mean

        raise PacnetValueError(f"unknown metric {name!r}; known: {', '.join(METRICS)}",
                               hint=did_you_mean(name, METRICS))
    return METRICS[name](**kwargs)
