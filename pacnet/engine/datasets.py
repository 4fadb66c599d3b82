"""torch Datasets whose samples are dicts of tensors keyed by blob name.

All of them derive from :class:`BlobDataset`: ``dataset[i]`` is sample ``i`` with
augmentation drawn from a generator seeded by ``(seed, i)``; ``dataset[(i, position)]``
draws it from ``(seed, position)`` instead, which is how the training stream
(:class:`pacnet.engine.data.StreamSampler`) gets fresh augmentation every epoch while
staying a pure function of the seed and the stream position (so resuming is exact and
worker processes do not matter).  ``blobs`` renames the sample keys to the net's input
blob names.

Built-in synthetic sets (no download):
  :class:`SyntheticDepth` (joint depth upsampling), :class:`SyntheticVideo` (the same for
  video clips of moving scenes), :class:`SyntheticSegmentation`, :class:`SyntheticEmbedding`
  (region ids for DistLoss).
Real data, in their distributed layouts:
  :class:`VOCSegmentation` (PASCAL VOC 2012 + SBD), :class:`NYUDepthV2` (labeled ``.mat``),
  :class:`Sintel` (MPI-Sintel flow).

Sample keys: segmentation sets give ``data`` (3 x H x W, Caffe-transformed), ``label``
(1 x H x W, float like a Caffe blob) and ``data_dim`` (1 x 1 x 2); joint-upsampling sets
give ``guide``, ``target``, ``gt``, ``gt_raw``, ``target_range`` (see
:class:`~pacnet.engine.transforms.JointTransform`; clips ``C x T x H x W``).
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from pacnet.engine import formats
from pacnet.engine.synthetic import depth_scene, seg_scene, video_scene
from pacnet.engine.transforms import JointTransform, SegTransform, resize
from pacnet.errors import DataError

__all__ = [
    "BlobDataset", "SyntheticDepth", "SyntheticVideo", "SyntheticSegmentation",
    "SyntheticEmbedding",
    "VOCSegmentation", "NYUDepthV2", "Sintel", "VOC_CLASSES", "check_labels",
]

VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
               "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
               "sheep", "sofa", "train", "tvmonitor")

# Stream draws and fixed-index draws use different generator streams.
_INDEX, _STREAM = 0, 1


class BlobDataset(torch.utils.data.Dataset):
    """Base class: ``load(index, rng) -> dict of numpy arrays``; ``__getitem__`` seeds the
    generator, renames keys by ``blobs`` and converts to tensors."""

    def __init__(self, *, seed: int = 0, blobs: Optional[Mapping[str, str]] = None) -> None:
        self.seed = int(seed)
        self.blobs = dict(blobs or {})

    def __len__(self) -> int:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def load(self, index: int, rng: np.random.Generator) -> Dict[str, np.ndarray]:  # pragma: no cover
        raise NotImplementedError

    def sample_id(self, index: int) -> str:
        """A name for sample ``index`` (a file stem for real data), e.g. for prediction files."""
        return f"{index:06d}"

    def __getitem__(self, key: Any) -> Dict[str, torch.Tensor]:
        if isinstance(key, tuple):
            index, position = int(key[0]), int(key[1])
            rng = np.random.default_rng([self.seed, _STREAM, position])
        else:
            index = int(key)
            rng = np.random.default_rng([self.seed, _INDEX, index])
        n = len(self)
        if not 0 <= index < n:
            raise IndexError(f"sample {index} out of range for {n} samples")
        sample = self.load(index, rng)
        return {self.blobs.get(k, k): torch.from_numpy(np.ascontiguousarray(v)) for k, v in sample.items()}


def check_labels(label: np.ndarray, num_classes: int, ignore_label: int, source: str) -> None:
    """Raise a DataError naming ``source`` when a label is neither a class nor ignored."""
    bad = ((label >= num_classes) | (label < 0)) & (label != ignore_label)
    if bad.any():
        values = sorted({int(v) for v in np.unique(label[bad])})
        raise DataError(f"label map {source} has values {values[:8]} outside 0..{num_classes - 1} "
                        f"(ignore_label {ignore_label})",
                        hint="check num_classes and ignore_label, or the label file")


# --------------------------------------------------------------------------- synthetic


class _Synthetic(BlobDataset):
    """Scenes are a function of (seed, split, index): the same index is always the same
    scene, and train and test scenes differ."""

    def __init__(self, size: int, height: int, width: int, *, split: str = "train", **kw: Any) -> None:
        super().__init__(**kw)
        self.size, self.height, self.width = int(size), int(height), int(width)
        self._split_tag = {"train": 11, "val": 12, "test": 13}.get(split, 14)

    def __len__(self) -> int:
        return self.size

    def scene_rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self._split_tag, index])


class SyntheticDepth(_Synthetic):
    """Joint depth upsampling on procedural scenes (:func:`~pacnet.engine.synthetic.depth_scene`):
    keys ``guide``, ``target``, ``gt``, ``gt_raw``, ``target_range``; depth in metres (1..10)."""

    def __init__(self, size: int = 64, height: int = 64, width: int = 64, *, transform: JointTransform,
                 texture: float = 0.06, noise: float = 0.02, **kw: Any) -> None:
        super().__init__(size, height, width, **kw)
        self.transform, self.texture, self.noise = transform, texture, noise

    def load(self, index: int, rng: np.random.Generator) -> Dict[str, np.ndarray]:
        guide, depth, _ = depth_scene(self.scene_rng(index), self.height, self.width,
                                      texture=self.texture, noise=self.noise)
        return self.transform(guide, depth, rng)


class SyntheticVideo(_Synthetic):
    """Joint depth upsampling of video clips on moving procedural scenes
    (:func:`~pacnet.engine.synthetic.video_scene`): keys as :class:`SyntheticDepth`, each
    with the ``frames`` axis after the channels (``guide`` 3 x T x H x W, ``target``
    1 x T x H/f x W/f, ``gt`` and ``gt_raw`` 1 x T x H x W, ``target_range`` 1 x 2 over the
    clip); depth in metres (1..10).

    With ``per_frame`` every frame of every clip is a sample of its own (``size * frames``
    image samples as :class:`SyntheticDepth`'s, clip ``i // frames``, frame
    ``i % frames``): the same scenes for an image net applied frame by frame.
    """

    def __init__(self, size: int = 64, height: int = 64, width: int = 64, *, frames: int = 8,
                 transform: JointTransform, speed: Tuple[float, float] = (0.25, 1.5),
                 pan: float = 0.5, drift: float = 0.01, texture: float = 0.06, noise: float = 0.02,
                 per_frame: bool = False, **kw: Any) -> None:
        super().__init__(size, height, width, **kw)
        self.frames, self.transform = int(frames), transform
        self.speed, self.pan = (float(speed[0]), float(speed[1])), float(pan)
        self.drift = float(drift)
        self.texture, self.noise = texture, noise
        self.per_frame = bool(per_frame)
        self._last: Tuple[int, Any] = (-1, None)  # the last clip made (frames come in order)

    def __len__(self) -> int:
        return self.size * (self.frames if self.per_frame else 1)

    def clip(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        """Clip ``index`` before the transform: (guide 3 x T x H x W, depth 1 x T x H x W)."""
        if self._last[0] != index:
            guide, depth, _ = video_scene(self.scene_rng(index), self.frames, self.height,
                                          self.width, speed=self.speed, pan=self.pan,
                                          drift=self.drift, texture=self.texture,
                                          noise=self.noise)
            self._last = (index, (guide, depth))
        return self._last[1]

    def load(self, index: int, rng: np.random.Generator) -> Dict[str, np.ndarray]:
        if not self.per_frame:
            return self.transform(*self.clip(index), rng)
        clip, frame = divmod(index, self.frames)
        guide, depth = self.clip(clip)
        return self.transform(guide[:, frame], depth[:, frame], rng)


class SyntheticSegmentation(_Synthetic):
    """Semantic segmentation on procedural scenes: keys ``data``, ``label``, ``data_dim``.
    The image goes through the Caffe :class:`~pacnet.engine.transforms.SegTransform`
    (in BGR when ``bgr``, like Caffe's OpenCV reader)."""

    instances = False

    def __init__(self, size: int = 64, height: int = 64, width: int = 64, *, num_classes: int = 5,
                 transform: SegTransform, ignore_border: int = 0, bgr: bool = True,
                 objects: Tuple[int, int] = (1, 4), **kw: Any) -> None:
        super().__init__(size, height, width, **kw)
        if num_classes < 2:
            raise DataError(f"num_classes must be at least 2, got {num_classes}")
        self.num_classes, self.transform = int(num_classes), transform
        self.ignore_border, self.bgr, self.objects = int(ignore_border), bool(bgr), tuple(objects)

    def load(self, index: int, rng: np.random.Generator) -> Dict[str, np.ndarray]:
        image, label = seg_scene(self.scene_rng(index), self.height, self.width, self.num_classes,
                                 n_objects=self.objects, ignore_border=self.ignore_border,
                                 ignore_label=self.transform.ignore_label, instances=self.instances)
        if self.bgr:
            image = image[::-1]
        data, label, dim = self.transform(image, label, rng)
        return {"data": data, "label": label, "data_dim": dim}


class SyntheticEmbedding(SyntheticSegmentation):
    """Images with region-id labels (0 = background, objects 1..k, each its own colour) for
    learning embeddings with Im2parity/Im2dist/DistLoss (segaware ``embs``).  Two pixels
    should embed close iff they carry the same id.  ``num_classes`` bounds the ids."""

    instances = True


# --------------------------------------------------------------------------- VOC + SBD


def _read_lines(path: str, what: str) -> List[str]:
    formats.require_file(path, what)
    try:
        with open(path, "r", encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read {what} {path}: {err}") from None


class VOCSegmentation(BlobDataset):
    """PASCAL VOC 2012 segmentation, optionally augmented with SBD (Hariharan et al.).

    ``root`` is the ``VOC2012`` folder (``JPEGImages/``, ``SegmentationClass/``,
    ``ImageSets/Segmentation/*.txt``; a ``VOCdevkit`` folder holding ``VOC2012`` works too).
    Samples come from either

    * ``list_file``: Caffe ``ImageSegData`` lines ``/JPEGImages/x.jpg /SegmentationClassAug/x.png``
      relative to ``root`` (second column: a label image or ``.mat``, an integer for a
      whole-image label, or absent), or
    * ``image_set``: ids from ``ImageSets/Segmentation/<image_set>.txt``; ``train_aug`` is
      VOC train + SBD train + SBD val - VOC val (10582 ids), ``trainval_aug`` adds VOC val.
      An id's label is ``<label_dir>/<id>.png`` (default ``SegmentationClass``), else SBD
      ``cls/<id>.mat`` (``GTcls.Segmentation``) with the SBD image.

    ``label_type``: ``auto`` (from the list), ``PIXEL``, ``IMAGE``, ``NONE`` (labels all
    ``ignore_label``, e.g. the test set).  Label values must be < ``num_classes`` or equal
    ``ignore_label``.  Missing files are reported when the data set is created.
    """

    def __init__(self, root: str, *, transform: SegTransform, list_file: Optional[str] = None,
                 image_set: str = "train", sbd_root: Optional[str] = None, label_dir: str = "SegmentationClass",
                 label_type: str = "auto", num_classes: int = 21, bgr: bool = True,
                 resize_to: Tuple[int, int] = (0, 0), **kw: Any) -> None:
        super().__init__(**kw)
        self.root = self._voc_root(os.path.expanduser(str(root)))
        self.transform, self.num_classes = transform, int(num_classes)
        self.bgr, self.resize_to, self.label_type = bool(bgr), tuple(resize_to), label_type
        self.sbd = self._sbd_root(os.path.expanduser(str(sbd_root))) if sbd_root else None
        # entries: (id, image path, label path or None, whole-image label or None)
        if list_file:
            self.entries = self._from_list(os.path.expanduser(str(list_file)))
        else:
            self.entries = self._from_image_set(image_set, label_dir)
        if not self.entries:
            raise DataError(f"no samples in {list_file or image_set!r} under {self.root}")
        self._check_files()

    @staticmethod
    def _voc_root(root: str) -> str:
        if not os.path.isdir(root):
            raise DataError(f"VOC folder not found: {root}",
                            hint="root is the VOC2012 folder holding JPEGImages/ and SegmentationClass/")
        if not os.path.isdir(os.path.join(root, "JPEGImages")) and os.path.isdir(os.path.join(root, "VOC2012")):
            root = os.path.join(root, "VOC2012")
        return root

    @staticmethod
    def _sbd_root(root: str) -> str:
        if os.path.isdir(os.path.join(root, "dataset", "cls")):
            root = os.path.join(root, "dataset")
        if not os.path.isdir(os.path.join(root, "cls")):
            raise DataError(f"SBD folder not found or incomplete: {root} has no cls/ folder",
                            hint="sbd_root is benchmark_RELEASE (or its dataset/ folder) with img/ and cls/")
        return root

    def _from_list(self, path: str) -> List[Tuple[str, str, Optional[str], Optional[int]]]:
        entries = []
        for n, line in enumerate(_read_lines(path, "list file"), start=1):
            parts = line.split()
            if len(parts) > 2:
                raise DataError(f"{path}:{n}: expected 'image [label]', got {len(parts)} columns")
            image = parts[0]
            if "/" not in image and "." not in os.path.basename(image):
                entries.append(self._id_entry(image, "SegmentationClass"))
                continue
            image_path = os.path.join(self.root, image.lstrip("/"))
            label_path, whole = None, None
            if len(parts) == 2 and self.label_type != "NONE":
                second = parts[1]
                if second.lstrip("-").isdigit():
                    whole = int(second)
                    if self.label_type == "PIXEL":
                        raise DataError(f"{path}:{n}: label_type PIXEL but the label column is a number")
                else:
                    label_path = os.path.join(self.root, second.lstrip("/"))
            elif self.label_type in ("PIXEL", "IMAGE"):
                raise DataError(f"{path}:{n}: label_type {self.label_type} but the line has no label column")
            stem = os.path.splitext(os.path.basename(image))[0]
            entries.append((stem, image_path, label_path, whole))
        return entries

    def _id_entry(self, ident: str, label_dir: str) -> Tuple[str, str, Optional[str], Optional[int]]:
        image = os.path.join(self.root, "JPEGImages", ident + ".jpg")
        if self.label_type == "NONE":
            return ident, image, None, None
        label = os.path.join(self.root, label_dir, ident + ".png")
        if not os.path.exists(label) and self.sbd is not None:
            mat = os.path.join(self.sbd, "cls", ident + ".mat")
            if os.path.exists(mat):
                sbd_image = os.path.join(self.sbd, "img", ident + ".jpg")
                return ident, sbd_image if os.path.exists(sbd_image) else image, mat, None
        return ident, image, label, None

    def _ids(self, name: str) -> List[str]:
        path = os.path.join(self.root, "ImageSets", "Segmentation", name + ".txt")
        return [line.split()[0] for line in _read_lines(path, f"image set '{name}'")]

    def _from_image_set(self, image_set: str, label_dir: str):
        if image_set in ("train_aug", "trainval_aug"):
            if self.sbd is None:
                raise DataError(f"image set {image_set!r} needs SBD", hint="set sbd_root to benchmark_RELEASE")
            sbd = set()
            for name in ("train", "val"):
                sbd.update(l.split()[0] for l in _read_lines(os.path.join(self.sbd, name + ".txt"),
                                                             f"SBD {name} list"))
            val = set(self._ids("val"))
            ids = (set(self._ids("train")) | sbd) - val
            if image_set == "trainval_aug":
                ids |= val
            ids = sorted(ids)
        else:
            ids = self._ids(image_set)
            if image_set == "test" and self.label_type == "auto":
                self.label_type = "NONE"
        return [self._id_entry(i, label_dir) for i in ids]

    def _check_files(self) -> None:
        missing = [p for _, img, lab, _ in self.entries for p in (img, lab) if p and not os.path.isfile(p)]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise DataError(f"missing data file: {missing[0]}{more}",
                            hint="check root/sbd_root and the list file; labels of SBD ids come from "
                                 "sbd_root/cls/<id>.mat")

    def __len__(self) -> int:
        return len(self.entries)

    def sample_id(self, index: int) -> str:
        return self.entries[index][0]

    def read_label(self, path: str) -> np.ndarray:
        if path.endswith(".mat"):
            mat = formats.load_mat(path, ["GTcls"])
            try:
                seg = mat["GTcls"]["Segmentation"][0, 0]
            except (KeyError, IndexError, ValueError, TypeError):
                raise DataError(f"SBD file {path} has no GTcls.Segmentation",
                                hint="SBD class labels live in dataset/cls/*.mat") from None
            seg = np.asarray(seg)
            if seg.ndim != 2 or not np.issubdtype(seg.dtype, np.number):
                raise DataError(f"SBD file {path}: GTcls.Segmentation is not a 2-D label map")
            return seg
        return formats.read_label_png(path)

    def load(self, index: int, rng: np.random.Generator) -> Dict[str, np.ndarray]:
        ident, image_path, label_path, whole = self.entries[index]
        image = formats.read_image(image_path).transpose(2, 0, 1).astype(np.float32)
        h, w = image.shape[1:]
        if label_path is not None:
            label = self.read_label(label_path).astype(np.float32)
            if label.shape != (h, w):
                raise DataError(f"label {label_path} is {label.shape[0]} x {label.shape[1]} but its image "
                                f"{image_path} is {h} x {w}")
            check_labels(label, self.num_classes, self.transform.ignore_label, label_path)
        elif whole is not None:
            label = np.full((h, w), whole, np.float32)
            check_labels(label[:1, :1], self.num_classes, self.transform.ignore_label, f"list entry {ident}")
        else:
            label = None
        if self.resize_to[0] and self.resize_to[1]:
            image = resize(image, self.resize_to, "bilinear")
            label = None if label is None else resize(label[None], self.resize_to, "nearest")[0]
        if self.bgr:
            image = image[::-1]
        data, label, dim = self.transform(image, label, rng)
        return {"data": data, "label": label, "data_dim": dim}


# --------------------------------------------------------------------------- NYU Depth v2


class NYUDepthV2(BlobDataset):
    """NYU Depth v2 labeled set (``nyu_depth_v2_labeled.mat``, 1449 RGB-D images 480 x 640)
    for joint depth upsampling, split like the PAC paper: the first ``train_count`` (1000)
    images train (the last ``val_ratio`` of them form ``val``), the rest test.

    Reads the distributed v7.3 (HDF5) file with h5py (opened lazily in each worker), or a
    v5/v7 re-save with scipy.  Uses the ``images`` (RGB uint8) and ``depths`` (metres)
    variables; keys as :class:`~pacnet.engine.transforms.JointTransform`.
    """

    FILE = "nyu_depth_v2_labeled.mat"

    def __init__(self, root: str, *, transform: JointTransform, subset: str = "train",
                 train_count: int = 1000, val_ratio: float = 0.0, **kw: Any) -> None:
        super().__init__(**kw)
        root = os.path.expanduser(str(root))
        self.path = root if root.endswith(".mat") else os.path.join(root, self.FILE)
        formats.require_file(self.path, "NYU Depth v2 file",
                             hint=f"root is the folder holding {self.FILE} (or the .mat file itself)")
        self.transform = transform
        self.kind = formats.mat_kind(self.path)
        self._h5 = None
        self._arrays = None
        if self.kind == "hdf5":
            f = formats.open_mat_hdf5(self.path)
            try:
                total = self._check_shapes(f, hdf5=True)
            finally:
                f.close()
        else:
            self._arrays = formats.load_mat(self.path, ["images", "depths"])
            total = self._check_shapes(self._arrays, hdf5=False)
        train_count = int(train_count)
        n_train = int(train_count * (1 - val_ratio))
        bounds = {"train": (0, n_train), "val": (n_train, train_count), "test": (train_count, total),
                  "all": (0, total)}
        if subset not in bounds:
            raise DataError(f"unknown NYU subset {subset!r}; use train, val, test or all")
        lo, hi = bounds[subset]
        hi = min(hi, total)
        if hi <= lo:
            raise DataError(f"NYU subset {subset!r} of {self.path} is empty ({total} images, "
                            f"train_count {train_count}, val_ratio {val_ratio})",
                            hint="the labeled file has 1449 images; set train_count for smaller files")
        self.offset, self.count, self.subset = lo, hi - lo, subset

    def _check_shapes(self, f: Any, hdf5: bool) -> int:
        for name in ("images", "depths"):
            if name not in f:
                raise DataError(f"NYU file {self.path} has no variable {name!r}",
                                hint="use nyu_depth_v2_labeled.mat (the labeled set)")
        images, depths = f["images"], f["depths"]
        if hdf5:  # MATLAB H x W x 3 x N stored column-major: N x 3 x W x H
            ok = len(images.shape) == 4 and images.shape[1] == 3 and len(depths.shape) == 3 \
                and depths.shape[0] == images.shape[0] and depths.shape[1:] == images.shape[2:]
            n = images.shape[0] if ok else 0
        else:  # scipy keeps MATLAB's order: H x W x 3 x N and H x W x N
            images = np.asarray(images)
            depths = np.asarray(depths)
            if images.ndim == 3 and depths.ndim == 2:  # a single image saved without the N axis
                images, depths = images[..., None], depths[..., None]
                self._arrays = {"images": images, "depths": depths}
            ok = images.ndim == 4 and images.shape[2] == 3 and depths.ndim == 3 \
                and depths.shape[2] == images.shape[3] and depths.shape[:2] == images.shape[:2]
            n = images.shape[3] if ok else 0
        if not ok:
            raise DataError(f"NYU file {self.path}: unexpected shapes images {tuple(images.shape)}, "
                            f"depths {tuple(depths.shape)}",
                            hint="expected MATLAB H x W x 3 x N images and H x W x N depths")
        return int(n)

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state["_h5"] = None  # h5py handles do not cross processes; reopen in the worker
        return state

    def __len__(self) -> int:
        return self.count

    def sample_id(self, index: int) -> str:
        return f"{self.offset + index:04d}"

    def raw(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        """(RGB ``3 x H x W`` uint8, depth ``H x W`` float32) of sample ``index``."""
        i = self.offset + index
        try:
            if self.kind == "hdf5":
                if self._h5 is None:
                    self._h5 = formats.open_mat_hdf5(self.path)
                rgb = np.asarray(self._h5["images"][i]).transpose(0, 2, 1)
                depth = np.asarray(self._h5["depths"][i], dtype=np.float32).T
            else:
                rgb = np.asarray(self._arrays["images"][:, :, :, i]).transpose(2, 0, 1)
                depth = np.asarray(self._arrays["depths"][:, :, i], dtype=np.float32)
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            raise DataError(f"cannot read image {i} of {self.path}: {err}",
                            hint="the file is corrupt or truncated; re-download it") from None
        if not np.isfinite(depth).all():
            raise DataError(f"image {i} of {self.path} has non-finite depth values")
        return rgb, depth

    def load(self, index: int, rng: np.random.Generator) -> Dict[str, np.ndarray]:
        rgb, depth = self.raw(index)
        return self.transform(rgb.astype(np.float32) / 255.0, depth[None], rng)


# --------------------------------------------------------------------------- Sintel


class Sintel(BlobDataset):
    """MPI-Sintel optical flow for joint flow upsampling (the PAC paper's second task).

    ``root`` is ``MPI-Sintel-complete`` with ``training/<pass>/<scene>/frame_XXXX.png`` and
    ``training/flow/<scene>/frame_XXXX.flo``; each flow goes with the first frame of its
    pair (every frame of a scene but the last).  ``pass`` is clean, final or albedo.
    Subsets: ``trainval`` (all), or ``train``/``val`` from ``split_file`` (one number per
    flow in scene/frame order: 1 = train, 2 = val; NVlabs' ``Sintel_train_val.txt``) or
    from ``val_sequences`` (scene names held out).
    """

    def __init__(self, root: str, *, transform: JointTransform, subset: str = "train",
                 render_pass: str = "clean", split_file: Optional[str] = None,
                 val_sequences: Sequence[str] = (), **kw: Any) -> None:
        super().__init__(**kw)
        root = os.path.expanduser(str(root))
        base = os.path.join(root, "training")
        frames_dir, flow_dir = os.path.join(base, render_pass), os.path.join(base, "flow")
        for folder in (frames_dir, flow_dir):
            if not os.path.isdir(folder):
                raise DataError(f"Sintel folder not found: {folder}",
                                hint="root is MPI-Sintel-complete (holding training/<pass>/ and training/flow/)")
        self.transform = transform
        pairs: List[Tuple[str, str, str]] = []  # (scene, frame png, flow file)
        for scene in sorted(os.listdir(flow_dir)):
            flows = sorted(f for f in os.listdir(os.path.join(flow_dir, scene)) if f.endswith(".flo"))
            scene_frames = os.path.join(frames_dir, scene)
            if not os.path.isdir(scene_frames):
                raise DataError(f"Sintel scene {scene!r} has flow but no frames: {scene_frames} is missing")
            frames = sorted(f for f in os.listdir(scene_frames) if f.endswith(".png"))
            if len(frames) != len(flows) + 1:
                raise DataError(f"Sintel scene {scene!r}: {len(frames)} frames in {scene_frames} but "
                                f"{len(flows)} flows (expected one fewer than frames)")
            for frame, flow in zip(frames[:-1], flows):
                pairs.append((scene, os.path.join(scene_frames, frame), os.path.join(flow_dir, scene, flow)))
        if not pairs:
            raise DataError(f"no Sintel flow files under {flow_dir}")
        if subset in ("train", "val"):
            if split_file:
                values = [v.split()[0] for v in _read_lines(os.path.expanduser(str(split_file)), "split file")]
                if len(values) != len(pairs):
                    raise DataError(f"split file {split_file} has {len(values)} entries for {len(pairs)} "
                                    "flow files", hint="one line (1 = train, 2 = val) per flow file")
                want = "1" if subset == "train" else "2"
                pairs = [p for p, v in zip(pairs, values) if v.split(".")[0] == want]
            elif val_sequences:
                known = {p[0] for p in pairs}
                unknown = [s for s in val_sequences if s not in known]
                if unknown:
                    raise DataError(f"val_sequences names unknown Sintel scene {unknown[0]!r}",
                                    hint="scenes: " + ", ".join(sorted(known)))
                held = set(val_sequences)
                pairs = [p for p in pairs if (p[0] in held) == (subset == "val")]
            else:
                raise DataError(f"Sintel subset {subset!r} needs split_file or val_sequences",
                                hint="or use subset 'trainval' for every flow")
        elif subset != "trainval":
            raise DataError(f"unknown Sintel subset {subset!r}; use train, val or trainval "
                            "(the test set has no ground-truth flow)")
        if not pairs:
            raise DataError(f"Sintel subset {subset!r} is empty")
        self.pairs, self.subset = pairs, subset

    def __len__(self) -> int:
        return len(self.pairs)

    def sample_id(self, index: int) -> str:
        scene, frame, _ = self.pairs[index]
        return f"{scene}/{os.path.splitext(os.path.basename(frame))[0]}"

    def load(self, index: int, rng: np.random.Generator) -> Dict[str, np.ndarray]:
        _, frame, flow_path = self.pairs[index]
        rgb = formats.read_image(frame).transpose(2, 0, 1).astype(np.float32) / 255.0
        flow = formats.read_flo(flow_path).transpose(2, 0, 1)
        if flow.shape[1:] != rgb.shape[1:]:
            raise DataError(f"flow {flow_path} is {flow.shape[1]} x {flow.shape[2]} but frame {frame} "
                            f"is {rgb.shape[1]} x {rgb.shape[2]}")
        return self.transform(rgb, flow, rng)
