"""Caffe-style data transforms, deterministic given a ``numpy.random.Generator``.

* :class:`SegTransform`: DeepLab's ``ImageSegData`` transform
  (``DataTransformer::TransformImgAndSeg``, caffe.md §5.3) for an image and its label map:
  random scale from ``scale_factors`` (image bilinear, label nearest), pad bottom/right to
  the crop (image with the mean, label with ``ignore_label``), crop (random in train,
  centred in test), random mirror, then ``(pixel - mean) * scale``.
* :class:`JointTransform`: the joint-upsampling sample of the PAC paper (pac.md §3):
  crop, mirror, low-res target by ``center`` sampling (NYU) or anti-aliased bilinear
  resize (Sintel), target normalised per sample by its own min/max; for an image
  (``C x H x W``) or a clip (``C x T x H x W``, every frame alike).
* :func:`lowres`, :func:`normalize_range`, :func:`denormalize`, :func:`resize`,
  :func:`resize_antialiased`: the pieces.

Arrays are numpy, channels first (``C x H x W``, clips ``C x T x H x W``), float32.
Randomness comes only from the generator passed in, so a sample is a pure function of
(data, generator seed).
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from pacnet.errors import DataError

__all__ = ["resize", "resize_antialiased", "SegTransform", "lowres", "normalize_range",
           "denormalize", "JointTransform", "LOWRES_MODES"]

LOWRES_MODES = ("center", "last", "bilinear", "nearest")


def resize(arr: np.ndarray, size: Tuple[int, int], mode: str) -> np.ndarray:
    """Resize ``C x H x W`` (or a clip ``C x T x H x W``, frame by frame) to ``size``
    (h, w).  ``bilinear`` is half-pixel (OpenCV INTER_LINEAR, align_corners=False,
    ``F.interpolate``); ``nearest`` picks ``floor(dst * src/dst)`` like OpenCV INTER_NEAREST."""
    h, w = size
    if arr.shape[-2:] == (h, w):
        return arr
    lead = arr.shape[:-2]
    t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    t = t.reshape((1, -1) + arr.shape[-2:])
    if mode == "nearest":
        out = F.interpolate(t, size=(h, w), mode="nearest")
    else:
        out = F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)
    return out[0].numpy().reshape(lead + (h, w))


def _mirror(coords: np.ndarray, n: int) -> np.ndarray:
    """Coordinates outside [0, n - 1] reflected about the edge pixels (d c b | a b c d | c b a)."""
    if n == 1:
        return np.zeros_like(coords)
    period = 2 * (n - 1)
    coords = np.abs(coords) % period
    return np.where(coords > n - 1, period - coords, coords)


def _antialias_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``n_out x n_in``: one axis of :func:`resize_antialiased` as a linear map."""
    scale = n_in / n_out
    eye = np.eye(n_in)
    sigma = max(0.0, (scale - 1) / 2)
    if sigma > 0:
        radius = int(4.0 * sigma + 0.5)
        taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
        taps /= taps.sum()
        index = _mirror(np.arange(-radius, n_in + radius), n_in).astype(np.int64)
        blur = np.zeros((n_in, n_in))
        for i in range(n_in):
            np.add.at(blur[i], index[i:i + 2 * radius + 1], taps)
        eye = blur
    coords = _mirror((np.arange(n_out) + 0.5) * scale - 0.5, n_in)
    lo = np.minimum(np.floor(coords).astype(np.int64), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = (coords - lo)[:, None]
    return (1 - frac) * eye[lo] + frac * eye[hi]


def resize_antialiased(arr: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """Resize ``C x H x W`` to ``size`` (h, w) as ``skimage.transform.resize(order=1,
    mode='reflect', anti_aliasing=True)``, which the PAC original makes its low-res inputs
    with: each axis is low-passed by a Gaussian of sigma ``max(0, (s - 1) / 2)`` (``s`` =
    in / out, truncated at 4 sigma) and sampled bilinearly at half-pixel positions, both
    with mirrored borders.  Computed in float64, returned as float32."""
    h, w = size
    rows = _antialias_matrix(arr.shape[1], h)
    cols = _antialias_matrix(arr.shape[2], w)
    out = np.einsum("yi,cij,xj->cyx", rows, np.asarray(arr, np.float64), cols, optimize=True)
    return out.astype(np.float32)


def _pair(value, name: str) -> Tuple[int, int]:
    if value is None:
        return 0, 0
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise DataError(f"{name} must be one size or [height, width], got {value!r}")
        return int(value[0]), int(value[1])
    return int(value), int(value)


class SegTransform:
    """Caffe's ``TransformImgAndSeg``.  Sizes in pixels; ``mean`` per channel in the
    image's channel order (BGR for Caffe nets); ``crop`` 0 = no crop.

    ``__call__(image, label, rng)`` takes ``3 x H x W`` float32 pixel values (0-255) and
    an ``H x W`` label map (or None: filled with ``ignore_label``), and returns
    ``(data 3 x h x w, label 1 x h x w, data_dim 1 x 1 x 2)``, all float32 (Caffe blobs);
    ``data_dim`` is ``[min(crop_h, H'), min(crop_w, W')]`` of the scaled image.
    """

    def __init__(self, *, crop: Sequence[int] | int | None = None, mean: Optional[Sequence[float]] = None,
                 scale: float = 1.0, mirror: bool = False, scale_factors: Sequence[float] = (),
                 ignore_label: int = 255, train: bool = True) -> None:
        self.crop_h, self.crop_w = _pair(crop, "crop_size")
        if (self.crop_h > 0) != (self.crop_w > 0):
            raise DataError(f"crop needs both a height and a width, got {self.crop_h} x {self.crop_w}")
        self.mean = None if not mean else np.asarray(mean, dtype=np.float32).reshape(-1, 1, 1)
        self.scale = float(scale)
        self.mirror = bool(mirror)
        self.scale_factors = tuple(float(s) for s in scale_factors)
        self.ignore_label = int(ignore_label)
        self.train = bool(train)

    def __call__(self, image: np.ndarray, label: Optional[np.ndarray], rng: np.random.Generator
                 ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        image = np.asarray(image, dtype=np.float32)
        c, h, w = image.shape
        if self.mean is not None and self.mean.shape[0] not in (1, c):
            raise DataError(f"mean_value has {self.mean.shape[0]} entries for a {c}-channel image")
        if label is None:
            label = np.full((h, w), self.ignore_label, dtype=np.float32)
        label = np.asarray(label, dtype=np.float32)
        if label.shape != (h, w):
            raise DataError(f"image is {h} x {w} but its label map is {label.shape[0]} x {label.shape[1]}")
        # 1. random scale
        if self.scale_factors:
            s = self.scale_factors[int(rng.integers(len(self.scale_factors)))]
            nh, nw = max(1, int(round(h * s))), max(1, int(round(w * s)))
            image = resize(image, (nh, nw), "bilinear")
            label = resize(label[None], (nh, nw), "nearest")[0]
            h, w = nh, nw
        data_dim = np.array([[[min(self.crop_h, h) if self.crop_h else h,
                               min(self.crop_w, w) if self.crop_w else w]]], dtype=np.float32)
        if self.crop_h:
            # 2. pad bottom/right: image with the mean (0 after subtraction), label with ignore
            ph, pw = max(self.crop_h - h, 0), max(self.crop_w - w, 0)
            if ph or pw:
                fill = self.mean if self.mean is not None else np.zeros((c, 1, 1), np.float32)
                padded = np.empty((c, h + ph, w + pw), np.float32)
                padded[:] = fill
                padded[:, :h, :w] = image
                image = padded
                lab = np.full((h + ph, w + pw), self.ignore_label, np.float32)
                lab[:h, :w] = label
                label = lab
                h, w = h + ph, w + pw
            # 3. crop: random in train, centred in test
            if self.train:
                y = int(rng.integers(h - self.crop_h + 1))
                x = int(rng.integers(w - self.crop_w + 1))
            else:
                y, x = (h - self.crop_h) // 2, (w - self.crop_w) // 2
            image = image[:, y:y + self.crop_h, x:x + self.crop_w]
            label = label[y:y + self.crop_h, x:x + self.crop_w]
        # 4. mirror (Caffe: whenever the flag is on, in any phase)
        if self.mirror and rng.integers(2):
            image = image[:, :, ::-1]
            label = label[:, ::-1]
        # 5. mean and scale
        if self.mean is not None:
            image = image - self.mean
        if self.scale != 1.0:
            image = image * self.scale
        return (np.ascontiguousarray(image, dtype=np.float32),
                np.ascontiguousarray(label[None], dtype=np.float32), data_dim)


def lowres(x: np.ndarray, factor: int, mode: str = "center") -> np.ndarray:
    """The low-resolution input of joint upsampling, ``C x ceil(H/f) x ceil(W/f)`` (a clip
    ``C x T x H x W`` frame by frame: ``C x T x ceil(H/f) x ceil(W/f)``).

    ``center``: every f-th pixel starting at ``(f-1)//2`` (NYU, PAC paper); ``last``:
    starting at ``f-1``; ``bilinear``: :func:`resize_antialiased` (Sintel); ``nearest``.
    A size that is not a multiple of f is first resized up to the next multiple with
    :func:`resize_antialiased`, as the original code does.
    """
    if mode not in LOWRES_MODES:
        raise DataError(f"unknown lowres_mode {mode!r}; use one of {', '.join(LOWRES_MODES)}")
    f = int(factor)
    lead, (h0, w0) = x.shape[:-2], x.shape[-2:]
    x = x.reshape((-1, h0, w0))  # the frames of a clip side by side with the channels
    h, w = math.ceil(h0 / f), math.ceil(w0 / f)
    if (h * f, w * f) != (h0, w0):
        x = resize_antialiased(x, (h * f, w * f))
    if mode in ("center", "last"):
        o = (f - 1) // 2 if mode == "center" else f - 1
        low = np.ascontiguousarray(x[:, o::f, o::f], dtype=np.float32)
    elif mode == "bilinear":
        low = resize_antialiased(x, (h, w))
    else:
        low = resize(x, (h, w), mode)
    return low.reshape(lead + (h, w))


def _per_channel(values: np.ndarray, ndim: int) -> np.ndarray:
    """A ``C`` vector shaped to broadcast over a ``C x ...`` array of ``ndim`` axes."""
    return values.reshape((-1,) + (1,) * (ndim - 1))


def normalize_range(low: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Per-channel min/max of ``low`` (``C x h x w``, or a clip ``C x T x h x w``: over all
    its frames) as ``C x 2``; a flat channel gets min - 0.5 and max + 0.5.  Returns
    (``(low - min) / (max - min)``, range)."""
    lo = low.reshape(low.shape[0], -1).min(axis=1).astype(np.float64)
    hi = low.reshape(low.shape[0], -1).max(axis=1).astype(np.float64)
    flat = lo == hi
    lo, hi = lo - 0.5 * flat, hi + 0.5 * flat
    rng = np.stack([lo, hi], axis=1)
    norm = (low - _per_channel(lo, low.ndim)) / _per_channel(hi - lo, low.ndim)
    return norm.astype(np.float32), rng.astype(np.float32)


def denormalize(x, value_range):
    """Undo :func:`normalize_range` on a batch: ``x`` ``N x C x H x W`` or a batch of clips
    ``N x C x T x H x W`` (tensor or array), ``value_range`` ``N x C x 2``; returns
    ``x * (max - min) + min``."""
    spread = tuple(value_range.shape[:-1]) + (1,) * (x.ndim - value_range.ndim + 1)
    lo = value_range[..., 0].reshape(spread)
    hi = value_range[..., 1].reshape(spread)
    return x * (hi - lo) + lo


class JointTransform:
    """The joint-upsampling sample (pac.md §3, NVlabs ``AssembleJointUpsamplingInputs``).

    ``__call__(guide, gt, rng)``: ``guide`` ``3 x H x W`` in [0, 1], ``gt`` ``C x H x W`` in
    its units (metres, pixels of flow), or clips ``3 x T x H x W`` and ``C x T x H x W``.
    Returns a dict (clips keep their ``T`` after the channels):

    * ``guide``: ``3 x H' x W'`` in [0, 1];
    * ``target``: ``C x H'/f x W'/f``, the low-res input (normalised if ``normalize``);
    * ``gt``: ``C x H' x W'`` in the same space as ``target`` (what a loss compares with);
    * ``gt_raw``: ``C x H' x W'`` in the original units (what metrics compare with after
      :func:`denormalize` of the output);
    * ``target_range``: ``C x 2`` (min, max) used to normalise (over a clip's frames);
      (0, 1) when not normalising.

    Crop: random in train, centred in test, the same window in every frame; must be a
    multiple of ``factor``.  Mirror: a random horizontal flip (of the whole clip) when on.
    Unlike the original, ``gt`` is not cropped by an evaluation border: metrics take a
    ``border`` argument instead, so shapes match the net.
    An uncropped image whose size is not a multiple of ``factor`` (Sintel's 436 rows) gets
    its low-res target from the size rounded up (:func:`lowres`) and, as the original's
    ``apply_model``, a ``guide`` resized (bilinear, half-pixel) to ``factor`` times the
    target; ``gt`` and ``gt_raw`` keep the image's size (the evaluator resizes the
    prediction back).  Training needs the sizes to agree: such images need a crop there.
    """

    def __init__(self, factor: int, *, crop: Sequence[int] | int | None = None, mirror: bool = False,
                 lowres_mode: str = "center", normalize: bool = True, train: bool = True) -> None:
        self.factor = int(factor)
        self.crop_h, self.crop_w = _pair(crop, "crop_size")
        if self.crop_h % self.factor or self.crop_w % self.factor:
            raise DataError(f"crop {self.crop_h} x {self.crop_w} is not a multiple of factor {self.factor}")
        if lowres_mode not in LOWRES_MODES:
            raise DataError(f"unknown lowres_mode {lowres_mode!r}; use one of {', '.join(LOWRES_MODES)}")
        self.mirror = bool(mirror)
        self.lowres_mode = lowres_mode
        self.normalize = bool(normalize)
        self.train = bool(train)

    def __call__(self, guide: np.ndarray, gt: np.ndarray, rng: np.random.Generator) -> Dict[str, np.ndarray]:
        guide = np.asarray(guide, np.float32)
        gt = np.asarray(gt, np.float32)
        if gt.ndim == 2:
            gt = gt[None]
        h, w = gt.shape[-2:]
        if guide.shape[1:] != gt.shape[1:]:
            raise DataError(f"guide is {' x '.join(map(str, guide.shape[1:]))} but the target is "
                            f"{' x '.join(map(str, gt.shape[1:]))}")
        if self.crop_h:
            if self.crop_h > h or self.crop_w > w:
                raise DataError(f"crop {self.crop_h} x {self.crop_w} is larger than the image {h} x {w}")
            if self.train:
                y, x = int(rng.integers(h - self.crop_h + 1)), int(rng.integers(w - self.crop_w + 1))
            else:
                y, x = (h - self.crop_h) // 2, (w - self.crop_w) // 2
            guide = guide[..., y:y + self.crop_h, x:x + self.crop_w]
            gt = gt[..., y:y + self.crop_h, x:x + self.crop_w]
        if self.mirror and rng.integers(2):
            guide, gt = guide[..., ::-1], gt[..., ::-1]
        low = lowres(np.ascontiguousarray(gt), self.factor, self.lowres_mode)
        size = tuple(d * self.factor for d in low.shape[-2:])
        if size != tuple(gt.shape[-2:]):
            if self.train:
                raise DataError(f"the image is {gt.shape[-2]} x {gt.shape[-1]}, not a multiple of "
                                f"factor {self.factor}: the prediction would not match it",
                                hint=f"train on crops (crop_size, a multiple of {self.factor})")
            guide = resize(guide, size, "bilinear")
        if self.normalize:
            target, value_range = normalize_range(low)
            lo, hi = (_per_channel(value_range[:, i], gt.ndim) for i in (0, 1))
            gt_norm = (gt - lo) / (hi - lo)
        else:
            target, gt_norm = low, gt
            value_range = np.tile(np.array([[0.0, 1.0]], np.float32), (gt.shape[0], 1))
        return {"guide": np.ascontiguousarray(guide, np.float32), "target": target,
                "gt": np.ascontiguousarray(gt_norm, np.float32), "gt_raw": np.ascontiguousarray(gt, np.float32),
                "target_range": value_range}
