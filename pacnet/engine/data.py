"""The ``data:`` section: validate it, make the data set and the loader for a phase.

A net file's ``data:`` section names a data set and its options; ``train:``, ``val:`` and
``test:`` sub-sections override options for one phase::

    data:
      dataset: voc
      root: ~/data/VOCdevkit/VOC2012
      sbd_root: ~/data/benchmark_RELEASE
      mean_value: [104.008, 116.669, 122.675]   # BGR, DeepLab
      batch_size: 10
      train: {image_set: train_aug, crop_size: 321, mirror: true, scale_factors: [0.5, 0.75, 1, 1.25, 1.5]}
      test:  {image_set: val, crop_size: 513}

:func:`make_dataset` validates it (JSON schema per data set, Draft 2020-12; mistakes
raise :class:`~pacnet.errors.SchemaError` naming ``data.<field>``) and returns a
:class:`~pacnet.engine.datasets.BlobDataset`.  :func:`make_loader` wraps it: training reads
an endless, per-epoch reshuffled stream (:class:`StreamSampler`), whose position is one
integer to checkpoint; testing reads each sample once, split over DDP ranks.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from pacnet.engine import _schema
from pacnet.engine.datasets import (
    BlobDataset, NYUDepthV2, Sintel, SyntheticDepth, SyntheticEmbedding, SyntheticSegmentation,
    SyntheticVideo, VOCSegmentation,
)
from pacnet.engine.transforms import LOWRES_MODES, JointTransform, SegTransform
from pacnet.errors import DataError, SchemaError

__all__ = ["DATASETS", "DATASET_INFO", "PHASES", "data_schema", "missing_section", "parse_data",
           "make_dataset", "StreamSampler",
           "make_loader", "collate", "input_shapes"]

PHASES = ("train", "val", "test")


def _p(kind: Any, description: str, default: Any = None, **extra: Any) -> Dict[str, Any]:
    out: Dict[str, Any] = ({"type": kind} if isinstance(kind, str) else dict(kind))
    out["description"] = description
    if default is not None:
        out["default"] = default
    out.update(extra)
    return out


_SIZE = {"anyOf": [{"type": "integer", "minimum": 0},
                   {"type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 2, "maxItems": 2}]}

_COMMON = {
    "batch_size": _p("integer", "samples per batch (per process under DDP)", 1, minimum=1),
    "num_workers": _p("integer", "DataLoader worker processes", 0, minimum=0),
    "shuffle": _p("boolean", "training stream: reshuffle every epoch (Caffe ImageSegData shuffle)", True),
    "seed": _p("integer", "seed of the synthetic scenes and of the augmentation stream", 0),
    "blobs": _p({"type": "object", "additionalProperties": {"type": "string"}},
                "rename sample keys to the net's input blobs, e.g. {guide: image, gt: label}"),
    "metric": _p({"enum": ["auto", "miou", "rmse", "epe", "none"]},
                 "what testing measures: miou (segmentation), rmse (depth), epe (flow); auto picks "
                 "by data set", "auto"),
    "predict": _p("string", "the test net's output blob the metric reads (default: its only "
                  "output that is not a loss)"),
    "eval_border": _p("integer", "pixels on each side left out of rmse/epe (default 6 for nyu, "
                      "as the PAC paper, else 0)", minimum=0),
}

_SEG = {
    "crop_size": _p(_SIZE, "crop height and width (0 = no crop); random in train, centred in test", 0),
    "crop_height": _p("integer", "crop height, instead of crop_size", minimum=1),
    "crop_width": _p("integer", "crop width, instead of crop_size", minimum=1),
    "mean_value": _p({"type": "array", "items": {"type": "number"}, "minItems": 1, "maxItems": 3},
                     "per-channel means subtracted, in the net's channel order (BGR for Caffe "
                     "nets; DeepLab 104.008, 116.669, 122.675)"),
    "scale": _p("number", "multiplies (pixel - mean)", 1.0),
    "mirror": _p("boolean", "random horizontal flip of image and label", False),
    "scale_factors": _p({"type": "array", "items": {"type": "number", "exclusiveMinimum": 0}},
                        "pick one uniformly and resize image (bilinear) and label (nearest) first", []),
    "ignore_label": _p("integer", "label of pixels to ignore (padding, VOC void)", 255),
    "bgr": _p("boolean", "give the image in BGR order like Caffe's OpenCV reader", True),
}

_JOINT = {
    "factor": _p("integer", "upsampling factor: the target is 1/factor of the guide's size", 8, minimum=1),
    "crop_size": _p(_SIZE, "crop (a multiple of factor; 0 = none); random in train, centred in test", 0),
    "mirror": _p("boolean", "random horizontal flip", False),
    "lowres_mode": _p({"enum": list(LOWRES_MODES)}, "how the low-res target is made: center (every "
                      "factor-th pixel at (factor-1)//2, NYU), last, bilinear (anti-aliased, Sintel), nearest"),
    "normalize_target": _p("boolean", "normalise target and gt per sample by the low-res min/max "
                           "(PAC paper); gt_raw and target_range keep the units", True),
}

_SYNTH = {
    "size": _p("integer", "number of scenes in the set", 100, minimum=1),
    "height": _p("integer", "scene height in pixels", 64, minimum=8),
    "width": _p("integer", "scene width in pixels", 64, minimum=8),
}

_SCENE = {
    "texture": _p("number", "amplitude of the guide's in-region stripes", 0.06, minimum=0),
    "noise": _p("number", "standard deviation of the guide's pixel noise", 0.02, minimum=0),
}

DATASETS: Dict[str, Dict[str, Any]] = {
    "synthetic_depth": {**_SYNTH, **_JOINT, **_SCENE},
    "synthetic_video": {
        **_SYNTH, **_JOINT, **_SCENE,
        "frames": _p("integer", "frames T per clip (samples are 3 x T x H x W guides and "
                     "1 x T x H x W depths)", 8, minimum=1),
        "speed": _p({"type": "array", "items": {"type": "number", "minimum": 0}, "minItems": 2,
                     "maxItems": 2}, "[min, max] speed of an object in pixels per frame",
                    [0.25, 1.5]),
        "pan": _p("number", "the camera pans by up to this many pixels per frame", 0.5, minimum=0),
        "drift": _p("number", "an object's depth changes by up to this fraction of the depth "
                    "range per frame", 0.01, minimum=0),
        "per_frame": _p("boolean", "every frame a sample of its own (3 x H x W guides, size * "
                        "frames samples): the same scenes for an image net run frame by frame",
                        False),
    },
    "synthetic_seg": {
        **_SYNTH, **_SEG,
        "num_classes": _p("integer", "classes including background 0", 5, minimum=2),
        "ignore_border": _p("integer", "width of an ignore_label band along object boundaries", 0, minimum=0),
        "objects": _p({"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 2,
                       "maxItems": 2}, "[min, max] objects per scene", [1, 4]),
    },
    "synthetic_embedding": {
        **_SYNTH, **_SEG,
        "num_classes": _p("integer", "region ids per scene are below this (background 0)", 8, minimum=2),
        "ignore_border": _p("integer", "width of an ignore_label band along region boundaries", 0, minimum=0),
        "objects": _p({"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 2,
                       "maxItems": 2}, "[min, max] objects per scene", [2, 6]),
    },
    "voc": {
        **_SEG,
        "root": _p("string", "the VOC2012 folder (JPEGImages/, SegmentationClass/, ImageSets/)"),
        "sbd_root": _p("string", "SBD benchmark_RELEASE folder (for the *_aug image sets and .mat labels)"),
        "list": _p("string", "Caffe list file of 'image [label]' lines relative to root "
                   "(instead of image_set)"),
        "image_set": _p("string", "ImageSets/Segmentation name: train, val, trainval, test, or "
                        "train_aug / trainval_aug with SBD (default: train in train, val in test)"),
        "label_dir": _p("string", "folder of the label PNGs of image-set ids", "SegmentationClass"),
        "label_type": _p({"enum": ["auto", "PIXEL", "IMAGE", "NONE"]},
                         "PIXEL label images, IMAGE one number per image, NONE no labels "
                         "(all ignore_label), auto from the list", "auto"),
        "num_classes": _p("integer", "classes including background", 21, minimum=2),
        "new_height": _p("integer", "resize every image to this height on read (0 = keep)", 0, minimum=0),
        "new_width": _p("integer", "resize every image to this width on read (0 = keep)", 0, minimum=0),
    },
    "nyu": {
        **_JOINT,
        "root": _p("string", "folder holding nyu_depth_v2_labeled.mat, or the .mat file"),
        "subset": _p({"enum": ["train", "val", "test", "all"]},
                     "train (first train_count images), val, test (the rest), all; default by phase"),
        "train_count": _p("integer", "images in the training part (the paper: 1000 of 1449)", 1000, minimum=0),
        "val_ratio": _p("number", "fraction of the training part held out as val", 0.0, minimum=0,
                        exclusiveMaximum=1),
    },
    "sintel": {
        **_JOINT,
        "root": _p("string", "the MPI-Sintel-complete folder"),
        "pass": _p({"enum": ["clean", "final", "albedo"]}, "which rendering of the frames guides", "clean"),
        "subset": _p({"enum": ["train", "val", "trainval"]}, "default: train in train, val in test"),
        "split_file": _p("string", "one line per flow file: 1 = train, 2 = val (NVlabs Sintel_train_val.txt)"),
        "val_sequences": _p({"type": "array", "items": {"type": "string"}},
                            "scene names held out as val (instead of split_file)"),
    },
}

# What each data set is for, what a sample gives and the files it reads: the docs of the
# `data:` section (README, `pacnet datasets`) are generated from this and DATASETS.
DATASET_INFO: Dict[str, Dict[str, str]] = {
    "synthetic_depth": {
        "task": "joint depth upsampling (built in, no download)",
        "gives": "guide, target, gt, gt_raw, target_range",
        "layout": "procedural scenes drawn from (seed, split, index): piecewise-planar depth "
                  "1-10 m with an RGB guide whose regions follow the depth edges",
    },
    "synthetic_video": {
        "task": "joint depth upsampling of video clips (built in, no download)",
        "gives": "guide (3 x T x H x W), target, gt, gt_raw, target_range; with per_frame, "
                 "every frame as an image sample",
        "layout": "the synthetic depth scenes in motion, drawn from (seed, split, index): objects "
                  "slide and drift in depth over a panning background, textures move with "
                  "their surfaces, noise is new every frame",
    },
    "synthetic_seg": {
        "task": "semantic segmentation (built in, no download)",
        "gives": "data, label, data_dim",
        "layout": "procedural scenes of num_classes - 1 object classes on background 0, drawn from "
                  "(seed, split, index)",
    },
    "synthetic_embedding": {
        "task": "segmentation-aware embeddings (built in, no download)",
        "gives": "data, label (region ids), data_dim",
        "layout": "procedural scenes whose label is a region id per object (segaware embs, "
                  "DistLoss)",
    },
    "voc": {
        "task": "semantic segmentation: PASCAL VOC 2012, optionally with SBD",
        "gives": "data, label, data_dim",
        "layout": "root: VOC2012/ with JPEGImages/<id>.jpg, SegmentationClass/<id>.png, "
                  "ImageSets/Segmentation/<image_set>.txt (a VOCdevkit/ holding VOC2012/ works "
                  "too); sbd_root: benchmark_RELEASE/dataset/ with img/, cls/<id>.mat, train.txt, "
                  "val.txt (image sets train_aug, trainval_aug); or list: a Caffe ImageSegData "
                  "list of '/JPEGImages/x.jpg /SegmentationClassAug/x.png' lines relative to root",
    },
    "nyu": {
        "task": "joint depth upsampling: NYU Depth v2 (the PAC paper's split)",
        "gives": "guide, target, gt, gt_raw, target_range",
        "layout": "root: the folder holding nyu_depth_v2_labeled.mat (or the file): 1449 RGB-D "
                  "images, the first train_count train, the rest test",
    },
    "sintel": {
        "task": "joint optical-flow upsampling: MPI-Sintel",
        "gives": "guide, target, gt, gt_raw, target_range",
        "layout": "root: MPI-Sintel-complete/ with training/<pass>/<scene>/frame_XXXX.png and "
                  "training/flow/<scene>/frame_XXXX.flo; train/val from split_file (NVlabs "
                  "Sintel_train_val.txt) or val_sequences",
    },
}

# Options whose default depends on the data set (applied after validation).
_LOWRES_DEFAULT = {"synthetic_depth": "center", "synthetic_video": "center", "nyu": "center",
                   "sintel": "bilinear"}
_REQUIRED = {"voc": ["root"], "nyu": ["root"], "sintel": ["root"]}
_AUTO_METRIC = {"synthetic_depth": "rmse", "synthetic_video": "rmse", "nyu": "rmse",
                "sintel": "epe", "synthetic_seg": "miou", "voc": "miou",
                "synthetic_embedding": "none"}
#: The joint-upsampling data sets (JointTransform samples: guide, target, gt, ...).
JOINT_DATASETS = ("synthetic_depth", "synthetic_video", "nyu", "sintel")
_SYNTHETIC_JOINT = ("synthetic_depth", "synthetic_video")


def data_schema(dataset: str) -> Dict[str, Any]:
    """The JSON schema of a ``data:`` section for ``dataset`` (one of :data:`DATASETS`)."""
    own = DATASETS[dataset]
    phase = {"type": "object", "additionalProperties": False, "properties": {**_COMMON, **own},
             "description": "options for one phase, overriding the section's"}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": f"data ({dataset})",
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "dataset": _p({"enum": list(DATASETS)}, "which data set: " + ", ".join(DATASETS)),
            **_COMMON, **own,
            **{ph: {**phase, "description": f"options for the {ph} phase"} for ph in PHASES},
        },
        "required": ["dataset"],
    }


def missing_section(inputs: Sequence[str] = (), source: Optional[str] = None) -> SchemaError:
    """The error for a net without a ``data:`` section, with an example that fits its
    ``inputs`` (joint upsampling: guide and target; segmentation: an image blob)."""
    names = set(inputs)
    if {"guide", "target"} <= names:
        example = ("data: {dataset: synthetic_depth, factor: 8} (built in; nyu and sintel read the "
                   "real data sets)")
    elif names:
        image = "data" if "data" in names else sorted(names)[0]
        rename = "" if image == "data" else f", blobs: {{data: {image}}}"
        example = (f"data: {{dataset: voc, root: data/VOCdevkit/VOC2012{rename}}}, or to try it "
                   f"without downloading: data: {{dataset: synthetic_seg, num_classes: 21, "
                   f"crop_size: 64{rename}}}")
    else:
        example = "data: {dataset: NAME, ...}"
    return _schema.error(["data"], "missing: this command needs a data section naming a data set",
                         hint=f"add e.g. {example}; 'pacnet datasets' lists the data sets",
                         source=source)


def parse_data(raw: Optional[Mapping[str, Any]], phase: str, *, root: Sequence[Any] = ("data",),
               locate: Optional[_schema.Locate] = None, source: Optional[str] = None) -> Dict[str, Any]:
    """Validate a ``data:`` section and return the resolved options of ``phase``
    (section options, then the phase's overrides, then defaults).  Raises SchemaError."""
    if locate is None:
        locate = _schema.marked_locator(raw, root)
    if phase not in PHASES:
        raise DataError(f"unknown phase {phase!r}; use one of {', '.join(PHASES)}")
    if raw is None:
        raise missing_section(source=source)
    if isinstance(raw, list) and raw and all(isinstance(r, Mapping) and {"type", "tops"} <= set(r)
                                             for r in raw):
        kinds = ", ".join(sorted({f"{r['type']} '{r.get('name')}'" for r in raw}))
        raise _schema.error(list(root), f"this section lists the Caffe data layers of a converted "
                            f"prototxt ({kinds}); pacnet reads data through a data set, which it "
                            "does not name",
                            hint="replace it with a data set section, e.g. data: {dataset: voc, "
                                 "root: VOC2012, list: train.txt, crop_size: 321, mean_value: "
                                 "[104.008, 116.669, 122.675], mirror: true} ('pacnet datasets' "
                                 "lists them and their fields)",
                            locate=locate, source=source)
    if not isinstance(raw, Mapping):
        raise _schema.error(list(root), f"expected a mapping, got {_schema.kind_of(raw)}",
                            locate=locate, source=source)
    head = {"type": "object", "required": ["dataset"],
            "properties": {"dataset": data_schema("voc")["properties"]["dataset"]}}
    _schema.validate({"dataset": raw.get("dataset")} if "dataset" in raw else {}, head, root=root,
                     locate=locate, source=source)
    name = raw["dataset"]
    schema = data_schema(name)
    _schema.validate(raw, schema, root=root, locate=locate, source=source)
    merged: Dict[str, Any] = {k: copy.deepcopy(v) for k, v in raw.items() if k not in PHASES}
    origin = {k: tuple(root) + (k,) for k in merged}
    for key, value in (raw.get(phase) or {}).items():
        merged[key] = copy.deepcopy(value)
        origin[key] = tuple(root) + (phase, key)
    out = _schema.fill_defaults(merged, {"properties": schema["properties"]})
    out = {k: v for k, v in out.items() if k not in PHASES}

    def fail(key: str, message: str, hint: Optional[str] = None) -> SchemaError:
        return _schema.error(origin.get(key, tuple(root) + (key,)), message, hint=hint,
                             locate=locate, source=source)

    for key in _REQUIRED.get(name, []):
        if key not in out:
            raise fail(key, f"is required for dataset {name!r}", hint=schema["properties"][key]["description"])
    if "eval_border" not in out:
        out["eval_border"] = 6 if name == "nyu" else 0
    if out["metric"] == "auto":
        out["metric"] = _AUTO_METRIC[name]
    if out["metric"] == "miou" and name not in ("voc", "synthetic_seg", "synthetic_embedding"):
        raise fail("metric", f"miou needs class labels, which dataset {name!r} does not have")
    if out["metric"] in ("rmse", "epe") and name not in JOINT_DATASETS:
        raise fail("metric", f"{out['metric']} needs a joint-upsampling data set, not {name!r}")
    if name in _LOWRES_DEFAULT and "lowres_mode" not in out:
        out["lowres_mode"] = _LOWRES_DEFAULT[name]
    if "crop_height" in out or "crop_width" in out:
        if ("crop_height" in out) != ("crop_width" in out):
            raise fail("crop_height" if "crop_height" in out else "crop_width",
                       "crop_height and crop_width go together")
        if "crop_size" in origin:
            raise fail("crop_height", "give crop_size or crop_height/crop_width, not both")
        out["crop_size"] = [out.pop("crop_height"), out.pop("crop_width")]
    crop = out.get("crop_size", 0)
    out["crop_size"] = list(crop) if isinstance(crop, list) else ([crop, crop] if crop else [0, 0])
    if "factor" in out and any(c % out["factor"] for c in out["crop_size"]):
        raise fail("crop_size", f"must be a multiple of factor {out['factor']}, got {crop}")
    if name in _SYNTHETIC_JOINT and (out["height"] % out["factor"] or out["width"] % out["factor"]):
        raise fail("factor", f"must divide height and width ({out['height']} x {out['width']})")
    for key in ("objects", "speed"):
        if key in out and out[key][0] > out[key][1]:
            raise fail(key, f"min {out[key][0]} is larger than max {out[key][1]}")
    if (out.get("new_height", 0) > 0) != (out.get("new_width", 0) > 0):
        raise fail("new_height", "new_height and new_width go together")
    if name == "sintel" and "split_file" in out and "val_sequences" in out:
        raise fail("val_sequences", "give split_file or val_sequences, not both")
    if name == "voc" and "list" in out and "image_set" in origin:
        raise fail("list", "give list or image_set, not both")
    out["_phase"] = phase
    return out


def make_dataset(data_cfg: Optional[Mapping[str, Any]], split: str, *, locate: Optional[_schema.Locate] = None,
                 source: Optional[str] = None) -> BlobDataset:
    """The data set of the ``data:`` section for ``split`` (``train``, ``val`` or ``test``).

    Augmentation follows the phase: random crops only in ``train`` (centred otherwise);
    ``mirror``/``scale_factors`` wherever they are set (write them under ``train:``).
    Raises :class:`SchemaError` for a bad section and :class:`DataError` for missing or
    corrupt files.
    """
    o = parse_data(data_cfg, split, locate=locate, source=source)
    name, train = o["dataset"], split == "train"
    common = {"seed": o["seed"], "blobs": o.get("blobs")}
    if name in JOINT_DATASETS:
        joint = JointTransform(o["factor"], crop=o["crop_size"], mirror=o["mirror"],
                               lowres_mode=o["lowres_mode"], normalize=o["normalize_target"], train=train)
        if name == "synthetic_depth":
            return SyntheticDepth(o["size"], o["height"], o["width"], transform=joint, texture=o["texture"],
                                  noise=o["noise"], split=split, **common)
        if name == "synthetic_video":
            return SyntheticVideo(o["size"], o["height"], o["width"], frames=o["frames"],
                                  transform=joint, speed=tuple(o["speed"]), pan=o["pan"],
                                  drift=o["drift"], texture=o["texture"], noise=o["noise"],
                                  per_frame=o["per_frame"], split=split, **common)
        if name == "nyu":
            return NYUDepthV2(o["root"], transform=joint, subset=o.get("subset", "train" if train else
                              ("val" if split == "val" else "test")), train_count=o["train_count"],
                              val_ratio=o["val_ratio"], **common)
        return Sintel(o["root"], transform=joint, subset=o.get("subset", "train" if train else "val"),
                      render_pass=o["pass"], split_file=o.get("split_file"),
                      val_sequences=o.get("val_sequences", ()), **common)
    seg = SegTransform(crop=o["crop_size"], mean=o.get("mean_value"), scale=o["scale"], mirror=o["mirror"],
                       scale_factors=o["scale_factors"], ignore_label=o["ignore_label"], train=train)
    if name in ("synthetic_seg", "synthetic_embedding"):
        cls = SyntheticSegmentation if name == "synthetic_seg" else SyntheticEmbedding
        return cls(o["size"], o["height"], o["width"], num_classes=o["num_classes"], transform=seg,
                   ignore_border=o["ignore_border"], bgr=o["bgr"], objects=tuple(o["objects"]),
                   split=split, **common)
    image_set = o.get("image_set") or ("train" if train else "val")
    return VOCSegmentation(o["root"], transform=seg, list_file=o.get("list"), image_set=image_set,
                           sbd_root=o.get("sbd_root"), label_dir=o["label_dir"], label_type=o["label_type"],
                           num_classes=o["num_classes"], bgr=o["bgr"],
                           resize_to=(o["new_height"], o["new_width"]), **common)


# --------------------------------------------------------------------------- loading


class StreamSampler(Sampler):
    """An endless stream of ``(index, position)`` keys for training (Caffe reads its data
    layer as a stream, iteration after iteration, reshuffling every epoch).

    Position ``p`` of this rank is global position ``g = p * world_size + rank``; epoch
    ``g // n`` uses a permutation drawn from ``(seed, epoch)``.  The sample and its
    augmentation are pure functions of ``g``, so resuming only needs ``start`` (samples
    this rank consumed so far), and every rank reads a different part of each epoch.
    """

    def __init__(self, n: int, *, seed: int = 0, shuffle: bool = True, start: int = 0, rank: int = 0,
                 world_size: int = 1) -> None:
        if n <= 0:
            raise DataError("the training set is empty")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} outside world size {world_size}")
        self.n, self.seed, self.shuffle = int(n), int(seed), bool(shuffle)
        self.start, self.rank, self.world_size = int(start), int(rank), int(world_size)
        self._epoch, self._perm = -1, None

    def order(self, epoch: int) -> np.ndarray:
        """The sample order of ``epoch``."""
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = (np.random.default_rng([self.seed, 7, epoch]).permutation(self.n)
                          if self.shuffle else np.arange(self.n))
        return self._perm

    def key(self, position: int) -> Tuple[int, int]:
        g = position * self.world_size + self.rank
        epoch, k = divmod(g, self.n)
        return int(self.order(epoch)[k]), g

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        for p in itertools.count(self.start):
            yield self.key(p)


def collate(samples: List[Mapping[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Stack samples into a batch; samples of different sizes give a DataError with a hint."""
    keys = list(samples[0])
    out: Dict[str, torch.Tensor] = {}
    for key in keys:
        values = [s[key] for s in samples]
        shapes = {tuple(v.shape) for v in values}
        if len(shapes) > 1:
            raise DataError(f"cannot batch '{key}': samples have different sizes {sorted(shapes)[:3]}",
                            hint="set crop_size so every sample has the same size, or batch_size 1")
        out[key] = torch.stack(values)
    return out


def make_loader(dataset: BlobDataset, *, batch_size: int = 1, train: bool = True, seed: int = 0,
                shuffle: bool = True, start: int = 0, rank: int = 0, world_size: int = 1,
                num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """A DataLoader of dict batches.  ``train``: endless :class:`StreamSampler` from sample
    ``start`` (the trainer passes ``iterations * iter_size * batch_size`` when resuming).
    Otherwise each sample once in order, rank ``r`` taking samples ``r, r + world, ...``."""
    if train:
        sampler: Any = StreamSampler(len(dataset), seed=seed, shuffle=shuffle, start=start, rank=rank,
                                     world_size=world_size)
    else:
        sampler = list(range(rank, len(dataset), world_size))
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      collate_fn=collate, pin_memory=pin_memory, drop_last=False)


def input_shapes(dataset: BlobDataset, batch_size: int, names: Optional[Sequence[str]] = None
                 ) -> Dict[str, Tuple[int, ...]]:
    """Batch shapes of the blobs of sample 0 (``names`` limits them), for ``pacnet.build(inputs=...)``."""
    sample = dataset[0]
    return {k: (int(batch_size),) + tuple(v.shape) for k, v in sample.items() if names is None or k in names}
