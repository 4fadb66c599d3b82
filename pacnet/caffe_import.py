"""Caffe ``NetParameter`` (prototxt) -> pacnet net dict, with Caffe's upgrade rules.

:func:`load_prototxt` parses a prototxt (:mod:`pacnet.prototxt`) and converts it into the
pacnet graph format (v1), the same plain dict a YAML net file loads into::

    name: fcn8s
    pacnet_version: 1
    inputs: {data: [1, 3, H, W], label: [1, 1, H, W]}
    dims: {H: 500, W: 500}
    data: [{name: data, type: Python, tops: [data, label], params: {...}}]
    layers:
    - {name: conv1_1, type: Convolution, bottom: data, top: conv1_1,
       param: [{lr_mult: 1, decay_mult: 1}, ...], num_output: 64, pad: 100, kernel_size: 3}

What the conversion does (``upgrade_proto.cpp`` semantics where Caffe has them):

* every ``*_param`` message the layer's type reads (``Layer.caffe_messages``) is lifted flat
  to the layer with Caffe's field names; a field written once stays a scalar, a repeated one
  becomes a list (a few repeated proto fields are always lists, see ``_ALWAYS_LIST``);
  ``BlobShape`` becomes a list of dims; enums stay identifier strings; the same field set
  differently by two messages is an error.  Another type's message (a ``pooling_param`` on
  a Convolution) is ignored with a located warning, as Caffe ignores it; a ``*_param`` no
  type has is an error, as Caffe cannot parse it;
* V1 ``layers { type: ENUM }`` nets: enum -> V2 type name (BVLC's table plus DeepLab's
  ``IMAGE_SEG_DATA``, ``SEG_ACCURACY``, ``INTERP``, ``MAT_WRITE``), ``blobs_lr`` ->
  ``param.lr_mult``, ``weight_decay`` -> ``param.decay_mult``, ``param: "name"`` ->
  ``param.name``; DeepLab-v1 ``hole``/``hole_h``/``hole_w`` -> ``dilation``;
* BatchNorm with 3 ``param`` specs: lr_mult and decay_mult forced to 0 (``UpgradeNetBatchNorm``);
* net-level ``input`` + ``input_shape``/``input_dim`` -> the ``inputs:`` section;
* data layers (ImageSegData, ImageData, TwoImageData, Data, MemoryData, Python data layers)
  -> ``inputs:`` entries with shapes from their params, plus a ``data:`` record the trainer
  uses; ``Input`` and ``DummyData`` stay layers;
* sinks without tops (MatWrite, HDF5Output) are dropped with a warning; a Caffe ``Python``
  layer that is not a data layer is refused (pacnet never imports code named by a net file).

Location marks map paths such as ``("layers", 3)`` or ``("layers", 3, "kernel_size")`` to
the :class:`~pacnet.errors.Location` of what was written, so later passes can point at
prototxt lines.
"""

from __future__ import annotations

import gc
import math
import os
import re
import warnings
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from pacnet import registry
from pacnet.errors import LoadError, Location, did_you_mean
from pacnet.prototxt import Field, Message, parse, read_text

__all__ = [
    "load_prototxt", "convert", "convert_text", "convert_to_yaml_text", "unknown_types",
    "unique_layer_names",
    "V1_TYPES", "DATA_TYPES", "SINK_TYPES", "DEFAULT_SPATIAL",
]

Marks = Dict[Tuple[Any, ...], Location]

# V1LayerParameter.LayerType -> V2 type string (BVLC upgrade_proto.cpp UpgradeV1LayerType),
# plus the DeepLab fork's additions.  Numbers are kept for binary (.caffemodel) V1 nets.
V1_TYPES: Dict[str, Tuple[int, str]] = {
    "NONE": (0, ""),
    "ABSVAL": (35, "AbsVal"),
    "ACCURACY": (1, "Accuracy"),
    "ARGMAX": (30, "ArgMax"),
    "BNLL": (2, "BNLL"),
    "CONCAT": (3, "Concat"),
    "CONTRASTIVE_LOSS": (37, "ContrastiveLoss"),
    "CONVOLUTION": (4, "Convolution"),
    "DATA": (5, "Data"),
    "DECONVOLUTION": (39, "Deconvolution"),
    "DROPOUT": (6, "Dropout"),
    "DUMMY_DATA": (32, "DummyData"),
    "EUCLIDEAN_LOSS": (7, "EuclideanLoss"),
    "ELTWISE": (25, "Eltwise"),
    "EXP": (38, "Exp"),
    "FLATTEN": (8, "Flatten"),
    "HDF5_DATA": (9, "HDF5Data"),
    "HDF5_OUTPUT": (10, "HDF5Output"),
    "HINGE_LOSS": (28, "HingeLoss"),
    "IM2COL": (11, "Im2col"),
    "IMAGE_DATA": (12, "ImageData"),
    "INFOGAIN_LOSS": (13, "InfogainLoss"),
    "INNER_PRODUCT": (14, "InnerProduct"),
    "LRN": (15, "LRN"),
    "MEMORY_DATA": (29, "MemoryData"),
    "MULTINOMIAL_LOGISTIC_LOSS": (16, "MultinomialLogisticLoss"),
    "MVN": (34, "MVN"),
    "POOLING": (17, "Pooling"),
    "POWER": (26, "Power"),
    "RELU": (18, "ReLU"),
    "SIGMOID": (19, "Sigmoid"),
    "SIGMOID_CROSS_ENTROPY_LOSS": (27, "SigmoidCrossEntropyLoss"),
    "SILENCE": (36, "Silence"),
    "SOFTMAX": (20, "Softmax"),
    "SOFTMAX_LOSS": (21, "SoftmaxWithLoss"),
    "SPLIT": (22, "Split"),
    "SLICE": (33, "Slice"),
    "TANH": (23, "TanH"),
    "WINDOW_DATA": (24, "WindowData"),
    "THRESHOLD": (31, "Threshold"),
    # DeepLab fork (its 39 collides with BVLC's DECONVOLUTION; matters only for binary files)
    "IMAGE_SEG_DATA": (39, "ImageSegData"),
    "SEG_ACCURACY": (40, "SegAccuracy"),
    "INTERP": (41, "Interp"),
    "MAT_WRITE": (43, "MatWrite"),
}

# V1 enum number -> V2 type (binary V1 nets).  39 is Deconvolution in BVLC and ImageSegData
# in DeepLab; a layer that carries blobs is the Deconvolution.
V1_TYPE_NUMBERS: Dict[int, str] = {}
for _name, (_num, _v2) in V1_TYPES.items():
    if _name not in ("IMAGE_SEG_DATA",):
        V1_TYPE_NUMBERS.setdefault(_num, _v2)

# Data layers become graph inputs.  Value: how their tops are shaped (see _data_inputs).
DATA_TYPES = ("ImageSegData", "ImageData", "TwoImageData", "Data", "MemoryData", "Python")
SINK_TYPES = ("MatWrite", "HDF5Output")

# Symbolic spatial size of data layers that do not crop (FCN's voc_layers read whole images):
# PASCAL VOC images are at most 500 x 500, the size FCN's deploy net is declared with.
DEFAULT_SPATIAL = 500

# LayerParameter fields that are not per-type messages.
_LAYER_KEYS = ("name", "type", "bottom", "top", "include", "exclude", "param",
               "loss_weight", "propagate_down")
_RESERVED = frozenset(_LAYER_KEYS) | {"phase", "blobs"}
# Memory hints of the segaware fork ("SID memory compact"); meaningless for pacnet.
_IGNORED_LAYER_FIELDS = frozenset({"deletetop", "deletebottom", "pullsfrom"})
# V1-only fields (handled by the upgrade) and DeepLab-v1's V1 extras.
_V1_FIELDS = frozenset({"blobs_lr", "weight_decay", "blob_share_mode"})
_V1_IGNORED = frozenset({"strict_dim"})

_NET_IGNORED = frozenset({"force_backward", "debug_info"})
_SOLVER_KEYS = frozenset({"base_lr", "lr_policy", "max_iter", "train_net", "net", "test_iter",
                          "solver_mode", "snapshot_prefix", "train_net_param", "net_param"})

# Repeated proto fields that stay lists even when written once (per message).
_ALWAYS_LIST = {
    ("input_param", "shape"), ("dummy_data_param", "shape"), ("dummy_data_param", "data_filler"),
    ("eltwise_param", "coeff"), ("slice_param", "slice_point"),
    ("transform_param", "mean_value"), ("transform_param", "scale_factors"),
    ("seg_accuracy_param", "ignore_label"),
}
# Bool fields a prototxt may write as 0/1.
_BOOL_FIELDS = frozenset({
    "bias_term", "use_global_stats", "mirror", "shuffle", "global_pooling", "normalize",
    "frozen", "reset", "bottom_is_im2col", "remove_center", "remove_bounds", "scale_term",
    "first_is_color", "second_is_color", "is_color", "force_color", "force_gray", "has_label",
    "stable_prod_grad", "transpose", "force_nd_im2col", "out_max_val", "update_global_stats",
    "share_in_parallel", "across_channels", "normalize_variance", "cache_images",
    "propagate_down", "normalized_convolution",
})
# Enums a prototxt may write by number.
_ENUM_NUMBERS = {
    "pool": ("MAX", "AVE", "STOCHASTIC"),
    "operation": None,  # PROD/SUM/MAX for Eltwise, SUM/MAX for ChannelReduce: ambiguous
    "phase": ("TRAIN", "TEST"),
    "normalization": ("FULL", "VALID", "BATCH_SIZE", "NONE"),
    "variance_norm": ("FAN_IN", "FAN_OUT", "AVERAGE"),
    "share_mode": ("STRICT", "PERMISSIVE"),
    "round_mode": ("CEIL", "FLOOR"),
    "label_type": ("NONE", "IMAGE", "PIXEL"),
}
_BLOB_SHAPE_FIELDS = frozenset({"shape", "input_shape"})


#: LayerParameter messages of BVLC Caffe and of the forks pacnet imports (DeepLab, PSPNet,
#: segaware) that no registered type reads: data layers, sinks, types pacnet lacks.
_OTHER_MESSAGES = frozenset({
    "transform_param", "data_param", "image_data_param", "hdf5_data_param", "hdf5_output_param",
    "memory_data_param", "window_data_param", "python_param", "mat_write_param",
    "two_image_data_param", "contrastive_loss_param", "hinge_loss_param",
    "infogain_loss_param", "lrn_param", "mvn_param", "spp_param", "threshold_param",
    "recurrent_param", "embed_param", "elu_param", "clip_param", "swish_param",
    "parameter_param", "sigmoid_param", "accuracy_param", "dense_crf_param",
})


def _known_messages() -> frozenset:
    """Every ``*_param`` message a prototxt layer may carry (read or not)."""
    return _OTHER_MESSAGES.union(*(t.caffe_messages() for t in registry.types().values()))


def _warn(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=3)


class _Converter:
    def __init__(self, file: Optional[str]) -> None:
        self.file = file
        self.marks: Marks = {}

    # ------------------------------------------------------------------ helpers
    def loc(self, f: Union[Field, Message]) -> Location:
        return Location(self.file, f.line, f.col)

    def err(self, message: str, where: Union[Field, Message, None] = None, *,
            layer: Optional[str] = None, layer_type: Optional[str] = None,
            hint: Optional[str] = None) -> LoadError:
        loc = self.loc(where) if where is not None else Location(self.file)
        return LoadError(message, location=loc, layer=layer, layer_type=layer_type, hint=hint)

    def scalar(self, f: Field, key: str, who: Optional[str] = None) -> Any:
        """A plain Python value for a scalar field (bools and enum numbers resolved)."""
        v = f.value
        k = f.kind
        if k == "ident":
            if v in ("true", "True", "t"):
                return True
            if v in ("false", "False", "f"):
                return False
            return str(v)
        if k == "int":
            if key in _BOOL_FIELDS and v in (0, 1):
                return bool(v)
            names = _ENUM_NUMBERS.get(key)
            if names is not None and 0 <= v < len(names):
                return names[v]
        if k == "float" and (math.isinf(v) or math.isnan(v)) and key in _BOOL_FIELDS:
            raise self.err(f"{key} must be true or false, got {v}", f, layer=who)
        return v

    def value(self, f: Field, key: str, who: Optional[str]) -> Any:
        if f.kind != "message":
            return self.scalar(f, key, who)
        msg: Message = f.value
        if key in _BLOB_SHAPE_FIELDS:
            return self.blob_shape(msg, who)
        return self.message_dict(msg, who)

    def blob_shape(self, msg: Message, who: Optional[str]) -> List[int]:
        dims = []
        for g in msg:
            if g.name != "dim":
                raise self.err(f"BlobShape has no field '{g.name}'", g, layer=who,
                               hint="a shape is written 'shape { dim: 1 dim: 3 ... }'")
            if g.kind != "int":
                raise self.err(f"dim must be an integer, got {g.value!r}", g, layer=who)
            dims.append(g.value)
        return dims

    def message_dict(self, msg: Message, who: Optional[str]) -> Dict[str, Any]:
        """A nested message (a filler, ...) as a plain dict; repeated fields -> lists."""
        out: Dict[str, Any] = {}
        counts: Dict[str, int] = {}
        for g in msg:
            counts[g.name] = counts.get(g.name, 0) + 1
        for g in msg:
            v = self.value(g, g.name, who)
            if counts[g.name] > 1:
                out.setdefault(g.name, []).append(v)
            else:
                out[g.name] = v
        return out

    # ------------------------------------------------------------------ net
    def convert(self, root: Message, default_name: str) -> Dict[str, Any]:
        names = set(root.names())
        if names & _SOLVER_KEYS and not (names & {"layer", "layers"}):
            raise self.err("this is a solver prototxt, not a net", root,
                           hint="convert the net file it names (train_net/net) instead")
        if "layer" in names and "layers" in names:
            f = root.field("layers")
            raise self.err("the net mixes V2 'layer' and legacy V1 'layers' entries", f,
                           hint="Caffe refuses this too; write all layers one way")
        net: Dict[str, Any] = {}
        name_f = root.field("name")
        net["name"] = str(name_f.value) if name_f is not None else default_name
        if name_f is not None:
            self.marks[("name",)] = self.loc(name_f)
        net["pacnet_version"] = 1
        inputs: Dict[str, List[Any]] = {}
        dims: Dict[str, int] = {}
        data: List[Dict[str, Any]] = []
        layers: List[Dict[str, Any]] = []

        known_net = {"name", "layer", "layers", "input", "input_shape", "input_dim", "state"}
        for f in root:
            if f.name in known_net:
                continue
            if f.name in _NET_IGNORED:
                continue
            hint = did_you_mean(f.name, sorted(known_net | _NET_IGNORED))
            raise self.err(f"unknown NetParameter field '{f.name}'", f, hint=hint)
        state = root.field("state")
        if state is not None:
            _warn(f"{self.loc(state)}: net-level 'state' ignored: pass the phase/stages to "
                  f"pacnet.build instead")

        self.net_inputs(root, inputs)

        v1 = "layers" in names
        for f in root:
            if f.name not in ("layer", "layers"):
                continue
            if f.kind != "message":
                raise self.err(f"'{f.name}' must be a message: {f.name} {{ ... }}", f)
            layer = self.layer(f, v1)
            if layer is None:
                continue
            ltype = layer["type"]
            if ltype in SINK_TYPES:
                _warn(f"{self.loc(f)}: layer '{layer['name']}' ({ltype}) dropped: it only writes "
                      f"files, which pacnet leaves to 'pacnet test'")
                continue
            if ltype in DATA_TYPES and not layer.get("bottom"):
                self.data_layer(layer, f, inputs, dims, data)
                continue
            if ltype == "Python":
                raise self.err(
                    f"Caffe Python layer ({layer.get('module', '?')}.{layer.get('layer', '?')}) "
                    f"cannot be imported", f, layer=layer["name"], layer_type="Python",
                    hint="pacnet never imports or runs code named by a net file; replace it "
                         "with pacnet layer types")
            idx = len(layers)
            pending = self._pending
            self.marks[("layers", idx)] = self.loc(f)
            for key, loc in pending.items():
                self.marks[("layers", idx) + key] = loc
            layers.append(layer)

        if inputs:
            net["inputs"] = inputs
            self.marks.setdefault(("inputs",), self.marks.get(("inputs", next(iter(inputs)))))
        if dims:
            net["dims"] = dims
        if data:
            net["data"] = data
        self.rename_duplicates(layers)
        net["layers"] = layers
        self.marks[("layers",)] = self.loc(root)
        if self.marks.get(("inputs",)) is None:
            self.marks.pop(("inputs",), None)
        return net

    def rename_duplicates(self, layers: List[Dict[str, Any]]) -> None:
        """Caffe accepts several layers with one name (segaware's vgg/res nets have them);
        pacnet keys modules and weights by name, so later ones get ``_2``, ``_3``, ..."""
        new = unique_layer_names([l["name"] for l in layers])
        renamed = []
        for i, (layer, name) in enumerate(zip(layers, new)):
            if name != layer["name"]:
                loc = self.marks.get(("layers", i, "name"))
                renamed.append(f"{layer['name']} (line {loc.line if loc else '?'}) -> {name}")
                layer["name"] = name
        if renamed:
            _warn(f"{self.file or '<input>'}: renamed {len(renamed)} duplicate layer name(s) "
                  f"(Caffe allows them, pacnet names modules and weights by them): "
                  + ", ".join(renamed))

    def net_inputs(self, root: Message, inputs: Dict[str, List[Any]]) -> None:
        names = root.all("input")
        if not names:
            for key in ("input_shape", "input_dim"):
                f = root.field(key)
                if f is not None:
                    raise self.err(f"'{key}' without 'input'", f,
                                   hint="name the input blob: input: \"data\"")
            return
        shapes = root.all("input_shape")
        dims = root.all("input_dim")
        if shapes and dims:
            raise self.err("give input_shape or input_dim, not both", dims[0])
        if shapes:
            if len(shapes) != len(names):
                raise self.err(f"{len(names)} input(s) but {len(shapes)} input_shape(s)", shapes[0],
                               hint="give one input_shape per input")
            per = [self.blob_shape(s.value, None) if s.kind == "message" else None for s in shapes]
            if any(p is None for p in per):
                raise self.err("input_shape must be a message: input_shape { dim: ... }", shapes[0])
        elif dims:
            if len(dims) != 4 * len(names):
                raise self.err(f"{len(names)} input(s) need {4 * len(names)} input_dim values, "
                               f"got {len(dims)}", dims[0],
                               hint="input_dim gives N, C, H, W for each input in order")
            bad = [d for d in dims if d.kind != "int"]
            if bad:
                raise self.err(f"input_dim must be an integer, got {bad[0].value!r}", bad[0])
            vals = [d.value for d in dims]
            per = [vals[4 * i:4 * i + 4] for i in range(len(names))]
        else:
            raise self.err("net-level 'input' without input_shape or input_dim", names[0],
                           hint="add input_dim: N, C, H, W (four lines) or input_shape { dim: ... }")
        for f, shape in zip(names, per):
            if f.kind != "string":
                raise self.err("input must be a quoted blob name", f)
            if f.value in inputs:
                raise self.err(f"input '{f.value}' declared twice", f)
            inputs[f.value] = list(shape)
            self.marks[("inputs", f.value)] = self.loc(f)

    # ------------------------------------------------------------------ layers
    def layer(self, lf: Field, v1: bool) -> Optional[Dict[str, Any]]:
        msg: Message = lf.value
        self._pending: Dict[Tuple[Any, ...], Location] = {}
        pend = self._pending
        name_f = msg.field("name")
        type_f = msg.field("type")
        name = str(name_f.value) if name_f is not None else None
        if type_f is None:
            raise self.err("layer has no type", lf, layer=name,
                           hint="add type: \"Convolution\" (or another type)")
        ltype = self.layer_type(type_f, v1, name)
        if name is None:
            raise self.err("layer has no name", lf, layer_type=ltype,
                           hint="add name: \"...\"; names key the weights and the errors")
        if name_f.kind != "string":
            raise self.err(f"layer name must be a quoted string, got {name_f.value!r}", name_f)
        pend[("name",)] = self.loc(name_f)
        pend[("type",)] = self.loc(type_f)
        out: Dict[str, Any] = {"name": name, "type": ltype}

        bottoms = [f for f in msg if f.name == "bottom"]
        tops = [f for f in msg if f.name == "top"]
        for key, fl in (("bottom", bottoms), ("top", tops)):
            if not fl:
                continue
            vals = []
            for i, f in enumerate(fl):
                if f.kind != "string":
                    raise self.err(f"{key} must be a quoted blob name, got {f.value!r}", f,
                                   layer=name, layer_type=ltype)
                vals.append(f.value)
                pend[(key, i)] = self.loc(f)
            out[key] = vals[0] if len(vals) == 1 else vals
            pend[(key,)] = self.loc(fl[0])

        for key in ("include", "exclude"):
            rules = msg.all(key)
            if not rules:
                continue
            conv = [self.rule(r, name, ltype) for r in rules]
            out[key] = conv[0] if len(conv) == 1 else conv
            pend[(key,)] = self.loc(rules[0])
        if "include" in out and "exclude" in out:
            raise self.err("a layer may have include rules or exclude rules, not both",
                           msg.field("exclude"), layer=name, layer_type=ltype)

        params = self.param_specs(msg, v1, name, ltype)
        if params:
            if ltype == "BatchNorm" and len(params) == 3:
                for p in params:  # UpgradeNetBatchNorm
                    p["lr_mult"] = 0
                    p["decay_mult"] = 0
            out["param"] = params

        lw = msg.all("loss_weight")
        if lw:
            vals = []
            for f in lw:
                if f.kind not in ("int", "float"):
                    raise self.err(f"loss_weight must be a number, got {f.value!r}", f, layer=name)
                vals.append(f.value)
            out["loss_weight"] = vals[0] if len(vals) == 1 else vals
            pend[("loss_weight",)] = self.loc(lw[0])
        pd = msg.all("propagate_down")
        if pd:
            vals = []
            for f in pd:
                v = self.scalar(f, "propagate_down", name)
                if not isinstance(v, bool):
                    raise self.err(f"propagate_down must be true or false, got {f.value!r}", f,
                                   layer=name)
                vals.append(v)
            out["propagate_down"] = vals
            pend[("propagate_down",)] = self.loc(pd[0])

        self.lift_params(msg, out, v1, name, ltype)
        return out

    def layer_type(self, f: Field, v1: bool, name: Optional[str]) -> str:
        v = f.value
        if f.kind == "ident" or (v1 and f.kind == "int"):
            if f.kind == "int":
                t = V1_TYPE_NUMBERS.get(v)
                if t is None:
                    raise self.err(f"unknown V1 layer type number {v}", f, layer=name)
                return t
            entry = V1_TYPES.get(str(v))
            if entry is not None and entry[1]:
                return entry[1]
            if v1:
                raise self.err(f"unknown V1 layer type {v}", f, layer=name,
                               hint=did_you_mean(str(v), V1_TYPES) or
                               "V1 types are enums such as CONVOLUTION, POOLING, RELU")
            return str(v)
        if f.kind != "string":
            raise self.err(f"layer type must be a quoted string, got {v!r}", f, layer=name)
        return v

    def rule(self, f: Field, who: str, ltype: str) -> Dict[str, Any]:
        if f.kind != "message":
            raise self.err(f"'{f.name}' must be a message: {f.name} {{ phase: TRAIN }}", f,
                           layer=who, layer_type=ltype)
        out: Dict[str, Any] = {}
        for g in f.value:
            if g.name == "phase":
                v = self.scalar(g, "phase", who)
                if v not in ("TRAIN", "TEST"):
                    raise self.err(f"phase must be TRAIN or TEST, got {g.value!r}", g, layer=who)
                out["phase"] = v.lower()
            elif g.name in ("stage", "not_stage"):
                if g.kind != "string":
                    raise self.err(f"{g.name} must be a quoted string, got {g.value!r}", g, layer=who)
                out.setdefault(g.name, []).append(g.value)
            elif g.name in ("min_level", "max_level"):
                if g.kind != "int":
                    raise self.err(f"{g.name} must be an integer, got {g.value!r}", g, layer=who)
                out[g.name] = g.value
            else:
                raise self.err(f"NetStateRule has no field '{g.name}'", g, layer=who,
                               layer_type=ltype,
                               hint=did_you_mean(g.name, ["phase", "stage", "not_stage",
                                                          "min_level", "max_level"]))
        return out

    def param_specs(self, msg: Message, v1: bool, who: str, ltype: str) -> List[Dict[str, Any]]:
        specs: List[Dict[str, Any]] = []
        pend = self._pending
        first: Optional[Field] = None

        def slot(i: int) -> Dict[str, Any]:
            while len(specs) <= i:
                specs.append({})
            return specs[i]

        counters = {"name": 0, "lr_mult": 0, "decay_mult": 0, "share_mode": 0}
        for f in msg:
            n = f.name
            if n == "param":
                first = first or f
                if f.kind == "message":  # V2 ParamSpec
                    spec: Dict[str, Any] = {}
                    for g in f.value:
                        if g.name == "name":
                            if g.kind != "string":
                                raise self.err("param name must be a quoted string", g, layer=who)
                            spec["name"] = g.value
                        elif g.name in ("lr_mult", "decay_mult"):
                            if g.kind not in ("int", "float"):
                                raise self.err(f"{g.name} must be a number, got {g.value!r}", g,
                                               layer=who)
                            spec[g.name] = g.value
                        elif g.name == "share_mode":
                            spec["share_mode"] = self.scalar(g, "share_mode", who)
                        else:
                            raise self.err(f"ParamSpec has no field '{g.name}'", g, layer=who,
                                           layer_type=ltype,
                                           hint=did_you_mean(g.name, ["name", "lr_mult",
                                                                      "decay_mult", "share_mode"]))
                    ordered = {k: spec[k] for k in ("name", "lr_mult", "decay_mult", "share_mode")
                               if k in spec}
                    pend[("param", len(specs))] = self.loc(f)
                    specs.append(ordered)
                elif f.kind == "string" and v1:  # V1: param: "shared_name"
                    i = counters["name"]
                    counters["name"] += 1
                    pend.setdefault(("param", i), self.loc(f))
                    slot(i)["name"] = f.value
                else:
                    raise self.err("param must be a message: param { lr_mult: 1 }", f, layer=who)
            elif n in ("blobs_lr", "weight_decay", "blob_share_mode"):
                if not v1:
                    raise self.err(f"'{n}' is a legacy V1 field", f, layer=who, layer_type=ltype,
                                   hint={"blobs_lr": "use param { lr_mult: ... }",
                                         "weight_decay": "use param { decay_mult: ... }"}.get(
                                       n, "use param { share_mode: ... }"))
                first = first or f
                key = {"blobs_lr": "lr_mult", "weight_decay": "decay_mult",
                       "blob_share_mode": "share_mode"}[n]
                if key == "share_mode":
                    v = self.scalar(f, "share_mode", who)
                else:
                    if f.kind not in ("int", "float"):
                        raise self.err(f"{n} must be a number, got {f.value!r}", f, layer=who)
                    v = f.value
                i = counters[key]
                counters[key] += 1
                pend.setdefault(("param", i), self.loc(f))
                slot(i)[key] = v
        if first is not None:
            pend[("param",)] = self.loc(first)
        if v1:
            specs = [{k: s[k] for k in ("name", "lr_mult", "decay_mult", "share_mode") if k in s}
                     for s in specs]
        return specs

    def lift_params(self, msg: Message, out: Dict[str, Any], v1: bool, who: str,
                    ltype: str) -> None:
        pend = self._pending
        origin: Dict[str, Tuple[str, Field]] = {}
        registered = registry.types().get(ltype)
        read = registered.caffe_messages() if registered is not None else None
        for f in msg:
            n = f.name
            if n in _RESERVED or n in _IGNORED_LAYER_FIELDS or n in _V1_FIELDS:
                if n == "phase":
                    raise self.err("layer-level 'phase' is not supported", f, layer=who,
                                   layer_type=ltype,
                                   hint="use include { phase: TRAIN } (or TEST) to select phases")
                if n == "blobs":
                    raise self.err("weights (blobs) inside a prototxt are not supported", f,
                                   layer=who, layer_type=ltype,
                                   hint="convert the .caffemodel with 'pacnet convert --weights'")
                continue
            if v1 and n in _V1_IGNORED:
                continue
            if not n.endswith("_param"):
                raise self.err(f"unknown LayerParameter field '{n}'", f, layer=who,
                               layer_type=ltype,
                               hint=did_you_mean(n, list(_LAYER_KEYS)) or
                               "per-type settings go inside a '<type>_param { ... }' message")
            if f.kind != "message":
                raise self.err(f"'{n}' must be a message: {n} {{ ... }}", f, layer=who,
                               layer_type=ltype)
            if read is not None and n not in read:
                if n not in _known_messages():
                    close = did_you_mean(n, _known_messages())
                    raise self.err(f"unknown LayerParameter field '{n}'", f, layer=who,
                                   layer_type=ltype, hint=(close + " " if close else "")
                                   + f"({ltype} reads {', '.join(read)})")
                _warn(f"{self.loc(f)}: layer '{who}' ({ltype}): {n} ignored: it belongs to "
                      f"another layer type ({ltype} reads {', '.join(read)}), and Caffe "
                      f"ignores it too")
                continue
            sub: Message = f.value
            counts: Dict[str, int] = {}
            for g in sub:
                counts[g.name] = counts.get(g.name, 0) + 1
            lifted: Dict[str, Any] = {}
            where: Dict[str, Field] = {}
            for g in sub:
                key = g.name
                if n == "convolution_param" and key in ("hole", "hole_h", "hole_w"):
                    continue
                v = self.value(g, key, who)
                if counts[key] > 1 or (n, key) in _ALWAYS_LIST:
                    lifted.setdefault(key, []).append(v)
                else:
                    lifted[key] = v
                where.setdefault(key, g)
            if n == "convolution_param":
                self.hole(sub, lifted, where, who, ltype)
            for key, v in lifted.items():
                g = where[key]
                if key in _RESERVED:
                    raise self.err(f"{n}.{key} cannot be written flat: '{key}' is a layer key",
                                   g, layer=who, layer_type=ltype)
                if key in origin:
                    prev_msg, prev_f = origin[key]
                    if out[key] != v:
                        raise self.err(
                            f"{n}.{key} = {v!r} conflicts with {prev_msg}.{key} = {out[key]!r} "
                            f"(line {prev_f.line}); pacnet writes both as '{key}'", g, layer=who,
                            layer_type=ltype, hint="make them agree or remove one")
                    continue
                origin[key] = (n, g)
                out[key] = v
                pend[(key,)] = self.loc(g)

    def hole(self, sub: Message, lifted: Dict[str, Any], where: Dict[str, Field], who: str,
             ltype: str) -> None:
        """DeepLab-v1 ``hole``/``hole_h``/``hole_w`` -> ``dilation``."""
        hole = sub.field("hole")
        hh, hw = sub.field("hole_h"), sub.field("hole_w")
        if hole is None and hh is None and hw is None:
            return
        if "dilation" in lifted:
            raise self.err("give hole or dilation, not both", hole or hh or hw, layer=who,
                           layer_type=ltype)
        for f in (hole, hh, hw):
            if f is not None and (f.kind != "int" or f.value < 1):
                raise self.err(f"{f.name} must be a positive integer, got {f.value!r}", f,
                               layer=who, layer_type=ltype)
        if hole is not None:
            if hh is not None or hw is not None:
                raise self.err("give hole or hole_h/hole_w, not both", hole, layer=who,
                               layer_type=ltype)
            lifted["dilation"] = hole.value
            where["dilation"] = hole
        else:
            h = hh.value if hh is not None else 1
            w = hw.value if hw is not None else 1
            lifted["dilation"] = h if h == w else [h, w]
            where["dilation"] = hh or hw

    # ------------------------------------------------------------------ data layers
    def data_layer(self, layer: Dict[str, Any], f: Field, inputs: Dict[str, List[Any]],
                   dims: Dict[str, int], data: List[Dict[str, Any]]) -> None:
        name, ltype = layer["name"], layer["type"]
        tops = layer.get("top")
        tops = [tops] if isinstance(tops, str) else list(tops or [])
        if not tops:
            raise self.err("data layer has no tops", f, layer=name, layer_type=ltype)
        params = {k: v for k, v in layer.items() if k not in _RESERVED}
        shapes = self.data_shapes(layer, params, tops, f, dims)
        entry: Dict[str, Any] = {"name": name, "type": ltype, "tops": tops}
        for key in ("include", "exclude"):
            if key in layer:
                entry[key] = layer[key]
        entry["params"] = params
        j = len(data)
        self.marks[("data", j)] = self.loc(f)
        for key, loc in self._pending.items():
            if len(key) == 1 and key[0] in params:
                self.marks[("data", j, "params", key[0])] = loc
        data.append(entry)
        for i, (top, shape) in enumerate(zip(tops, shapes)):
            top_loc = self._pending.get(("top", i), self.loc(f))
            if top in inputs:
                old = inputs[top]
                if old != shape:
                    merged = []
                    for k, (a, b) in enumerate(zip(old, shape)):
                        if a == b:
                            merged.append(a)
                            continue
                        sym = "N" if k == 0 else ("C" if k == 1 else ("H" if k == 2 else "W"))
                        if isinstance(a, int):
                            dims.setdefault(sym, a)
                        merged.append(sym)
                    if len(old) != len(shape):
                        raise self.err(f"data layers give blob '{top}' shapes of different rank: "
                                       f"{old} and {shape}", f, layer=name, layer_type=ltype)
                    inputs[top] = merged
                continue
            inputs[top] = shape
            self.marks[("inputs", top)] = top_loc

    def data_shapes(self, layer: Dict[str, Any], params: Dict[str, Any], tops: List[str],
                    f: Field, dims: Dict[str, int]) -> List[List[Any]]:
        ltype, name = layer["type"], layer["name"]

        def intparam(key: str, default: int) -> int:
            v = params.get(key, default)
            if isinstance(v, str) and "${" in v:
                raise self.err(f"{key} is {v}, a template variable without a value; the conversion "
                               "needs it for the input shapes", f, layer=name, layer_type=ltype,
                               hint=f"pass --var {v.strip('${}')}=VALUE")
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise self.err(f"{key} must be a non-negative integer, got {v!r}", f, layer=name,
                               layer_type=ltype)
            return v

        def spatial() -> Tuple[Any, Any]:
            ch, cw = intparam("crop_height", 0), intparam("crop_width", 0)
            cs = intparam("crop_size", 0)
            if ch or cw:
                if not (ch and cw):
                    raise self.err("crop_height and crop_width must be given together", f,
                                   layer=name, layer_type=ltype)
                return ch, cw
            if cs:
                return cs, cs
            nh, nw = intparam("new_height", 0), intparam("new_width", 0)
            if nh and nw:
                return nh, nw
            dims.setdefault("H", DEFAULT_SPATIAL)
            dims.setdefault("W", DEFAULT_SPATIAL)
            return "H", "W"

        if ltype == "MemoryData":
            b = intparam("batch_size", 0)
            c, h, w = intparam("channels", 0), intparam("height", 0), intparam("width", 0)
            if not (b and c and h and w):
                raise self.err("MemoryData needs batch_size, channels, height and width", f,
                               layer=name, layer_type=ltype)
            shapes = [[b, c, h, w], [b]]
        elif ltype == "Python":
            h, w = spatial()
            shapes = [[1, 3, h, w]] + [[1, 1, h, w]] * (len(tops) - 1)
        elif ltype == "Data":
            b = intparam("batch_size", 0)
            if not b:
                raise self.err("Data layer needs batch_size", f, layer=name, layer_type=ltype)
            h, w = spatial()
            shapes = [[b, 3, h, w], [b]]
        elif ltype == "ImageData":
            b = intparam("batch_size", 1)
            h, w = spatial()
            c = 1 if params.get("is_color") is False else 3
            shapes = [[b, c, h, w], [b]]
        else:  # ImageSegData, TwoImageData: image, pixel label, (ImageSegData) data_dim
            b = intparam("batch_size", 1)
            h, w = spatial()
            c = 1 if params.get("first_is_color") is False else 3
            lc = 3 if params.get("second_is_color") is True else 1
            shapes = [[b, c, h, w], [b, lc, h, w], [b, 1, 1, 2]]
        if len(tops) > len(shapes):
            raise self.err(f"{ltype} has at most {len(shapes)} tops, got {len(tops)}", f,
                           layer=name, layer_type=ltype)
        return [list(s) for s in shapes[:len(tops)]]


def unique_layer_names(names: Sequence[str]) -> List[str]:
    """The k-th layer (k >= 2) of a repeated name becomes ``<name>_<k>`` (more suffix if
    that is taken too).  :mod:`pacnet.caffemodel` maps repeated names the same way."""
    taken = set(names)
    seen: Dict[str, int] = {}
    out = []
    for name in names:
        k = seen.get(name, 0) + 1
        seen[name] = k
        if k == 1:
            out.append(name)
            continue
        new = f"{name}_{k}"
        while new in taken:
            new += "_"
        taken.add(new)
        out.append(new)
    return out


def convert(root: Message, *, file: Optional[str] = None,
            default_name: str = "net") -> Tuple[Dict[str, Any], Marks]:
    """A parsed NetParameter tree -> ``(net_dict, marks)``."""
    c = _Converter(file)
    net = c.convert(root, default_name)
    return net, c.marks


def convert_text(text: str, vars: Optional[Mapping[str, Any]] = None, *, file: Optional[str] = None,
                 keep_unset: bool = False) -> Tuple[Dict[str, Any], Marks]:
    """Parse and convert prototxt text.  ``keep_unset``: template variables without a value
    stay ``${NAME}`` in the net and are listed as ``vars: {NAME: null}`` (to be set when the
    net is loaded) instead of being an error."""
    stem = os.path.splitext(os.path.basename(file))[0] if file else "net"
    # Parsing allocates ~10 small objects per line and creates no garbage cycles; with
    # torch loaded, the collector's full passes over its big heap would double the time.
    enabled = gc.isenabled()
    gc.disable()
    try:
        unset: Optional[Dict[str, int]] = {} if keep_unset else None
        root = parse(text, vars, file=file, keep_unset=unset)
        net, marks = convert(root, file=file, default_name=stem)
        if unset:
            net["vars"] = {name: None for name in sorted(unset, key=unset.get)}
        return net, marks
    finally:
        if enabled:
            gc.enable()


def load_prototxt(path: Union[str, os.PathLike], vars: Optional[Mapping[str, Any]] = None, *,
                  keep_unset: bool = False) -> Tuple[Dict[str, Any], Marks]:
    """Read a Caffe net prototxt -> ``(net_dict, marks)`` in pacnet's graph format."""
    p = os.fspath(path)
    return convert_text(read_text(p), vars, file=p, keep_unset=keep_unset)


def unknown_types(net: Mapping[str, Any], known: Iterable[str]) -> Dict[str, List[str]]:
    """Layer types of ``net`` not in ``known``: type -> names of the layers using it."""
    known = set(known)
    out: Dict[str, List[str]] = {}
    for layer in net.get("layers", []):
        t = layer.get("type")
        if t not in known:
            out.setdefault(t, []).append(layer.get("name"))
    return out


# ----------------------------------------------------------------------------- YAML text

_PLAIN = re.compile(r"[A-Za-z_/][A-Za-z0-9_./\-]*\Z")
_YAML_SPECIAL = frozenset(
    "y yes n no true false on off null ~".split()
    + "Y Yes N No True False On Off Null NULL TRUE FALSE YES NO ON OFF".split())
_FLOW_WIDTH = 96


def _yaml_scalar(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return ".nan"
        if math.isinf(v):
            return ".inf" if v > 0 else "-.inf"
        r = repr(v)
        if "e" in r or "E" in r:
            mant, exp = r.lower().split("e")
            if "." not in mant:
                mant += ".0"
            if exp[0] not in "+-":
                exp = "+" + exp
            r = f"{mant}e{exp}"
        elif "." not in r:
            r += ".0"
        return r
    s = str(v)
    if _PLAIN.match(s) and s not in _YAML_SPECIAL:
        return s
    out = ['"']
    for ch in s:
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _flow(v: Any) -> str:
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{_yaml_scalar(k)}: {_flow(x)}" for k, x in v.items()) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_flow(x) for x in v) + "]"
    return _yaml_scalar(v)


def _emit(lines: List[str], key: Optional[str], v: Any, indent: int, first_prefix: str = "") -> None:
    """Append ``key: v`` at column ``indent`` (after ``first_prefix``, e.g. ``"- "``): block
    style, or flow style when the container fits on the line."""
    col = indent + len(first_prefix)  # the column of the key; children go deeper
    head = " " * indent + first_prefix + (f"{_yaml_scalar(key)}:" if key is not None else "")
    if isinstance(v, (Mapping, list, tuple)):
        flow = _flow(v)
        if key is None:  # a list item: flow style even when long (keeps nesting simple)
            lines.append(head + flow)
            return
        if len(head) + 1 + len(flow) <= _FLOW_WIDTH or not v:
            lines.append(f"{head} {flow}")
            return
        lines.append(head)
        if isinstance(v, Mapping):
            for k, x in v.items():
                _emit(lines, k, x, col + 2)
            return
        for x in v:
            if isinstance(x, Mapping) and x and col + 4 + len(_flow(x)) > _FLOW_WIDTH:
                items = list(x.items())
                _emit(lines, items[0][0], items[0][1], col + 2, "- ")
                for k, y in items[1:]:
                    _emit(lines, k, y, col + 4)
            else:
                _emit(lines, None, x, col + 2, "- ")
        return
    lines.append(f"{head} {_yaml_scalar(v)}")


_LAYER_ORDER = ("name", "type", "bottom", "top", "include", "exclude", "param", "loss_weight",
                "propagate_down")


def convert_to_yaml_text(net: Mapping[str, Any], header: Optional[str] = None) -> str:
    """Readable pacnet YAML for a net dict: one block per layer, short values in flow style."""
    lines: List[str] = []
    if header:
        lines.extend("# " + h if h else "#" for h in header.splitlines())
    order = ["name", "pacnet_version", "vars", "inputs", "dims", "data", "solver"]
    keys = [k for k in order if k in net] + [k for k in net if k not in order and k != "layers"]
    for k in keys:
        v = net[k]
        if k == "data" and isinstance(v, list):
            lines.append("data:")
            for entry in v:
                items = list(entry.items())
                _emit(lines, items[0][0], items[0][1], 0, "- ")
                for ek, ev in items[1:]:
                    _emit(lines, ek, ev, 2)
            continue
        if k in ("inputs", "dims", "vars") and isinstance(v, Mapping) and v:
            lines.append(f"{k}:")  # one entry per line: these sections are read most
            for name, shape in v.items():
                _emit(lines, name, shape, 2)
            continue
        _emit(lines, k, v, 0)
    if "layers" in net:
        lines.append("layers:")
        for layer in net["layers"]:
            lines.append("")
            keys = [k for k in _LAYER_ORDER if k in layer] + \
                   [k for k in layer if k not in _LAYER_ORDER]
            _emit(lines, keys[0], layer[keys[0]], 0, "- ")
            for k in keys[1:]:
                _emit(lines, k, layer[k], 2)
    return "\n".join(lines) + "\n"
