"""Read Caffe ``.caffemodel`` weights and map them onto a compiled pacnet net.

A ``.caffemodel`` is a binary ``NetParameter``.  No ``protoc`` and no generated code: the
few messages needed are declared at run time with ``descriptor_pb2`` (see
:func:`schema`), and only the fields every Caffe fork agrees on are decoded --
``NetParameter.layer`` (100) / legacy ``layers`` (2), ``LayerParameter.name/type/blobs``
(1/2/7) and ``param.name`` (6.1), V1 ``name/type/blobs/param`` (4/5/6/1001), V0 inside V1,
and ``BlobProto``.  Everything else is skipped as an unknown field, which is what makes
files from the DeepLab/PSPNet/segaware forks readable although their custom messages reuse
field numbers in incompatible ways (caffe.md §5.6, segaware.md §6).

Reading is fast for big files: ``BlobProto.data`` is a packed ``repeated float`` on the
wire, i.e. one length-delimited record, so the fast schema declares it as ``bytes`` and
hands the raw little-endian buffer to numpy.  A blob written unpacked (legal protobuf,
never written by Caffe) is re-decoded with the exact schema.

Mapping onto a net (:func:`map_blobs`): a Caffe layer's blob *i* goes to the pacnet
state_dict key ``<layer>.<blobs[i]>`` of its type (``pacnet.registry``).  Caffe shapes
(including the legacy 4-D num/channels/height/width form) are reshaped to the target shape
when they agree up to size-1 axes; anything else is refused, naming layer, blob index and
both shapes.  BatchNorm's third blob is the scale factor and is kept as a blob (pacnet's
BatchNorm divides by it like Caffe); PSPNet's BN has 4 blobs (slope, bias, mean, var);
Deconvolution weights are (in, out/group, kh, kw) in both Caffe and PyTorch.  Blobs shared
by ``param.name`` are one tensor in the net: every Caffe copy is checked against it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from pacnet.errors import LoadError, Location, ShapeError

__all__ = [
    "CaffeLayer", "CaffeModel", "MappedWeights", "read_caffemodel", "parse_caffemodel",
    "map_blobs", "convert_caffemodel", "schema", "write_caffemodel",
]

# ----------------------------------------------------------------------------- schema

_F = None  # FieldDescriptorProto, bound lazily


def _build_schema():
    """Message classes of the minimal caffe schema, two flavours sharing one pool.

    ``exact``: BlobProto data as ``repeated float [packed]`` (the real declaration; used to
    write test files and to decode unpacked data).  ``fast``: data as ``repeated bytes``.
    """
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    OPT, REP = F.LABEL_OPTIONAL, F.LABEL_REPEATED

    def add_file(package: str, fast: bool) -> descriptor_pb2.FileDescriptorProto:
        fd = descriptor_pb2.FileDescriptorProto(name=f"{package}.proto", package=package,
                                                syntax="proto2")

        def msg(name, fields):
            m = fd.message_type.add(name=name)
            for fname, num, label, ftype, extra in fields:
                f = m.field.add(name=fname, number=num, label=label, type=ftype)
                if ftype == F.TYPE_MESSAGE:
                    f.type_name = f".{package}.{extra}"
                elif extra == "packed":
                    f.options.packed = True
            return m

        msg("BlobShape", [("dim", 1, REP, F.TYPE_INT64, "packed")])
        if fast:
            data = [("data", 5, REP, F.TYPE_BYTES, None), ("double_data", 8, REP, F.TYPE_BYTES, None)]
        else:
            data = [("data", 5, REP, F.TYPE_FLOAT, "packed"),
                    ("double_data", 8, REP, F.TYPE_DOUBLE, "packed")]
        msg("BlobProto", [
            ("num", 1, OPT, F.TYPE_INT32, None), ("channels", 2, OPT, F.TYPE_INT32, None),
            ("height", 3, OPT, F.TYPE_INT32, None), ("width", 4, OPT, F.TYPE_INT32, None),
            ("shape", 7, OPT, F.TYPE_MESSAGE, "BlobShape"),
        ] + data)
        msg("ParamSpec", [("name", 1, OPT, F.TYPE_STRING, None)])
        msg("LayerParameter", [
            ("name", 1, OPT, F.TYPE_STRING, None), ("type", 2, OPT, F.TYPE_STRING, None),
            ("param", 6, REP, F.TYPE_MESSAGE, "ParamSpec"),
            ("blobs", 7, REP, F.TYPE_MESSAGE, "BlobProto"),
        ])
        msg("V0LayerParameter", [
            ("name", 1, OPT, F.TYPE_STRING, None), ("type", 2, OPT, F.TYPE_STRING, None),
            ("blobs", 50, REP, F.TYPE_MESSAGE, "BlobProto"),
        ])
        msg("V1LayerParameter", [
            ("layer", 1, OPT, F.TYPE_MESSAGE, "V0LayerParameter"),
            ("name", 4, OPT, F.TYPE_STRING, None),
            # an enum in caffe.proto; read as its number so unknown fork values survive
            ("type", 5, OPT, F.TYPE_INT32, None),
            ("blobs", 6, REP, F.TYPE_MESSAGE, "BlobProto"),
            ("param", 1001, REP, F.TYPE_STRING, None),
        ])
        msg("NetParameter", [
            ("name", 1, OPT, F.TYPE_STRING, None),
            ("layers", 2, REP, F.TYPE_MESSAGE, "V1LayerParameter"),
            ("layer", 100, REP, F.TYPE_MESSAGE, "LayerParameter"),
        ])
        return fd

    pool = descriptor_pool.DescriptorPool()
    classes = {}
    for package, fast in (("pacnet_caffe", False), ("pacnet_caffe_fast", True)):
        pool.Add(add_file(package, fast))
        classes[package] = {
            name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{package}.{name}"))
            for name in ("BlobShape", "BlobProto", "ParamSpec", "LayerParameter",
                         "V0LayerParameter", "V1LayerParameter", "NetParameter")}
    return classes["pacnet_caffe"], classes["pacnet_caffe_fast"]


_SCHEMA = None


def schema(fast: bool = False) -> Dict[str, Any]:
    """The runtime message classes by name (``NetParameter``, ``LayerParameter``,
    ``V1LayerParameter``, ``BlobProto``, ``BlobShape``, ...)."""
    global _SCHEMA
    if _SCHEMA is None:
        _SCHEMA = _build_schema()
    return _SCHEMA[1] if fast else _SCHEMA[0]


# ----------------------------------------------------------------------------- reading

@dataclass
class CaffeLayer:
    """One layer of a caffemodel: its name, type (V2 string), blobs and param names.

    ``blobs`` are float32/float64 numpy arrays in Caffe's shape (legacy blobs are 4-D).
    """

    name: str
    type: str
    blobs: List[np.ndarray]
    param_names: Tuple[str, ...] = ()
    index: int = 0


@dataclass
class CaffeModel:
    name: str
    layers: List[CaffeLayer]
    file: Optional[str] = None
    v1: bool = False

    def by_name(self) -> Dict[str, CaffeLayer]:
        return {layer.name: layer for layer in self.layers}


# Length-delimited fields that hold messages (the ones worth descending into when looking
# for the broken spot): message kind -> {field number: (name, message kind)}.
_NESTED = {
    "NetParameter": {100: ("layer", "LayerParameter"), 2: ("layers", "V1LayerParameter")},
    "LayerParameter": {7: ("blobs", "BlobProto")},
    "V1LayerParameter": {6: ("blobs", "BlobProto"), 1: ("layer", "V0LayerParameter")},
    "V0LayerParameter": {50: ("blobs", "BlobProto")},
    "BlobProto": {7: ("shape", "BlobShape")},
    "BlobShape": {},
}


class _WireError(Exception):
    def __init__(self, offset: int, message: str) -> None:
        super().__init__(message)
        self.offset, self.message = offset, message


def _varint(data: bytes, p: int, end: int) -> Tuple[int, int]:
    """(value, next offset) of the varint at ``p``; IndexError/ValueError when malformed."""
    shift = value = 0
    while True:
        if p >= end:
            raise IndexError(p)
        b = data[p]
        value |= (b & 0x7F) << shift
        p += 1
        if not b & 0x80:
            return value, p
        shift += 7
        if shift > 63:
            raise ValueError(p)


def _records(data: bytes, start: int, end: int) -> Iterator[Tuple[int, int, int, int, int]]:
    """The wire records of ``data[start:end]``: (record offset, field number, wire type,
    payload start, payload end).  Raises :class:`_WireError` at the first malformed one."""
    pos = start
    while pos < end:
        rec = pos
        try:
            key, pos = _varint(data, pos, end)
        except (IndexError, ValueError):
            raise _WireError(rec, "a field tag is cut off or malformed") from None
        number, wire = key >> 3, key & 7
        if number == 0:
            raise _WireError(rec, "field number 0 (not a protobuf message)")
        try:
            if wire == 0:
                _, nxt = _varint(data, pos, end)
                lo = pos
            elif wire == 1:
                lo, nxt = pos, pos + 8
            elif wire == 2:
                length, lo = _varint(data, pos, end)
                nxt = lo + length
                if nxt > end:
                    raise _WireError(rec, f"field {number} claims {length} bytes but only "
                                          f"{end - lo} remain (truncated file?)")
            elif wire == 5:
                lo, nxt = pos, pos + 4
            else:
                raise _WireError(rec, f"field {number} has invalid wire type {wire}")
        except (IndexError, ValueError):
            raise _WireError(rec, f"field {number} is cut off") from None
        if nxt > end:
            raise _WireError(rec, f"field {number} is cut off (truncated file?)")
        yield rec, number, wire, lo, nxt
        pos = nxt


def _wire_problem(data: bytes, start: int = 0, end: Optional[int] = None,
                  kind: str = "NetParameter", where: str = "") -> Optional[Tuple[int, str]]:
    """Walk the wire records of ``data[start:end]`` (a ``kind`` message), descending into
    the messages of :data:`_NESTED`; return (absolute offset, what is wrong) or None."""
    counts: Dict[int, int] = {}
    try:
        for _, number, wire, lo, hi in _records(data, start, len(data) if end is None else end):
            sub = _NESTED.get(kind, {}).get(number) if wire == 2 else None
            if sub is not None:
                i = counts.get(number, 0)
                counts[number] = i + 1
                found = _wire_problem(data, lo, hi, sub[1], f"{where}{sub[0]} {i}: ")
                if found is not None:
                    return found
    except _WireError as err:
        return err.offset, where + err.message
    return None


def _offset(data: bytes, path: Sequence[Tuple[int, int]]) -> Optional[int]:
    """Byte offset of the payload of the field reached by ``path``, a sequence of (field
    number, occurrence) from the top message down: ``((100, 3), (1, 0))`` is the name of
    the fourth V2 layer.  None when there is no such field."""
    lo, hi = 0, len(data)
    for number, index in path:
        for _, num, _, plo, phi in _records(data, lo, hi):
            if num == number:
                if index == 0:
                    lo, hi = plo, phi
                    break
                index -= 1
        else:
            return None
    return lo


class _Locator:
    """Byte offsets into a caffemodel's bytes, computed only for an error message."""

    def __init__(self, data: bytes, file: Optional[str]) -> None:
        self.data, self.file = data, file

    def error(self, message: str, path: Sequence[Tuple[int, int]], extra: int = 0,
              **kw: Any) -> LoadError:
        offset = _offset(self.data, path)
        where = f" (byte offset {offset + extra} of {len(self.data)})" if offset is not None else ""
        kw.setdefault("hint", "the file is corrupt or truncated; download or convert it again")
        return LoadError(message + where, location=Location(self.file), **kw)

    def text(self, value: Any, what: str, path: Sequence[Tuple[int, int]]) -> str:
        """``value`` of a string field, refused when it is not UTF-8 (protobuf then gives bytes)."""
        if isinstance(value, bytes):
            raise self.error(f"{what} is not UTF-8 text ({value[:40]!r})", path)
        return value


def _blob_array(blob, exact_cls, where: str, at: _Locator,
                path: Tuple[Tuple[int, int], ...]) -> np.ndarray:
    if blob.HasField("shape"):
        shape = tuple(int(d) for d in blob.shape.dim)
    elif any(blob.HasField(k) for k in ("num", "channels", "height", "width")):
        shape = (blob.num, blob.channels, blob.height, blob.width)
    else:
        shape = None
    if any(d < 0 for d in (shape or ())):
        raise at.error(f"{where}: negative dimension in blob shape {list(shape)}", path)
    fbytes = b"".join(blob.data)
    dbytes = b"".join(blob.double_data)
    count = int(np.prod(shape, dtype=np.int64)) if shape is not None else None
    field, width = 5, 4
    if fbytes and len(fbytes) % 4 == 0 and (count is None or len(fbytes) == 4 * count):
        arr = np.frombuffer(fbytes, dtype="<f4").astype(np.float32)
    elif dbytes and len(dbytes) % 8 == 0 and (count is None or len(dbytes) == 8 * count):
        arr = np.frombuffer(dbytes, dtype="<f8").astype(np.float64)
        field, width = 8, 8
    else:
        # Unpacked or oddly split data: decode this blob with the exact schema.
        exact = exact_cls()
        try:
            exact.ParseFromString(blob.SerializeToString())
        except Exception:
            raise at.error(f"{where}: blob data is corrupt", path) from None
        if len(exact.data):
            arr = np.asarray(exact.data, dtype=np.float32)
        elif len(exact.double_data):
            arr = np.asarray(exact.double_data, dtype=np.float64)
            field = 8
        else:
            arr = np.zeros(0, dtype=np.float32)
        width = 0  # no single packed record to point into
    if shape is None:
        shape = (arr.size,)
    if arr.size != int(np.prod(shape, dtype=np.int64)):
        raise at.error(f"{where}: blob shape {list(shape)} needs "
                       f"{int(np.prod(shape, dtype=np.int64))} values, the file has {arr.size}",
                       path + ((field, 0),))
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        first = int(bad[0])
        raise at.error(f"{where}: {bad.size} value(s) are not finite (value {first} of {arr.size} "
                       f"is {arr[first]})", path + ((field, 0),), extra=first * width,
                       hint="the file is corrupt, or the model diverged while training")
    return arr.reshape(shape)


def parse_caffemodel(data: bytes, *, file: Optional[str] = None) -> CaffeModel:
    """Decode caffemodel bytes (V2 ``layer`` or legacy V1 ``layers``).  Damage -- a garbled
    record, a name that is not UTF-8 text, a blob of the wrong size, a value that is not
    finite -- is a :class:`LoadError` that gives its byte offset."""
    from google.protobuf.message import DecodeError

    from pacnet.caffe_import import V1_TYPE_NUMBERS

    fast = schema(fast=True)
    exact_blob = schema()["BlobProto"]
    net = fast["NetParameter"]()
    try:
        net.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as err:
        offset, what = _wire_problem(data) or (0, "the data do not decode as a NetParameter")
        raise LoadError(f"not a valid caffemodel: {what} (byte offset {offset} of {len(data)})",
                        location=Location(file),
                        hint="the file is truncated or is not a Caffe NetParameter") from err
    if len(net.layer) and len(net.layers):
        raise LoadError("the caffemodel has both V2 'layer' and V1 'layers' entries",
                        location=Location(file))
    at = _Locator(data, file)
    layers: List[CaffeLayer] = []
    if len(net.layer) or not len(net.layers):
        for i, lp in enumerate(net.layer):
            top = ((100, i),)
            name = at.text(lp.name, f"the name of layer {i}", top + ((1, 0),))
            where = f"layer {i} '{name}'"
            ltype = at.text(lp.type, f"the type of {where}", top + ((2, 0),))
            params = tuple(at.text(p.name, f"param {k} name of {where}", top + ((6, k), (1, 0)))
                           for k, p in enumerate(lp.param))
            blobs = [_blob_array(b, exact_blob, f"{where} blob {j}", at, top + ((7, j),))
                     for j, b in enumerate(lp.blobs)]
            layers.append(CaffeLayer(name, ltype, blobs, params, i))
        return CaffeModel(at.text(net.name, "the net name", ((1, 0),)), layers, file, v1=False)
    for i, lp in enumerate(net.layers):
        top = ((2, i),)
        name, blobs_src, name_path, blob_path = lp.name, lp.blobs, top + ((4, 0),), top
        blob_field = 6
        if lp.HasField("layer") and not name:  # V0 wrapped in V1
            name, blobs_src = lp.layer.name, lp.layer.blobs
            name_path, blob_path, blob_field = top + ((1, 0), (1, 0)), top + ((1, 0),), 50
            ltype = at.text(lp.layer.type, f"the type of layer {i}", top + ((1, 0), (2, 0)))
        else:
            ltype = V1_TYPE_NUMBERS.get(lp.type, f"V1:{lp.type}")
            if lp.type == 39:  # BVLC Deconvolution or DeepLab ImageSegData (no blobs)
                ltype = "Deconvolution" if len(blobs_src) else "ImageSegData"
        name = at.text(name, f"the name of layer {i}", name_path)
        where = f"layer {i} '{name}'"
        params = tuple(at.text(p, f"param {k} name of {where}", top + ((1001, k),))
                       for k, p in enumerate(lp.param))
        blobs = [_blob_array(b, exact_blob, f"{where} blob {j}", at, blob_path + ((blob_field, j),))
                 for j, b in enumerate(blobs_src)]
        layers.append(CaffeLayer(name, ltype, blobs, params, i))
    return CaffeModel(at.text(net.name, "the net name", ((1, 0),)), layers, file, v1=True)


def read_caffemodel(path: Union[str, os.PathLike]) -> CaffeModel:
    """Read a ``.caffemodel`` file; a missing, truncated or garbled file is a :class:`LoadError`."""
    p = os.fspath(path)
    try:
        with open(p, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise LoadError(f"no such file: {p}", hint="check the weights path") from None
    except IsADirectoryError:
        raise LoadError(f"{p} is a directory, not a caffemodel") from None
    except OSError as err:
        raise LoadError(f"cannot read {p}: {err.strerror or err}") from None
    if data[:64].lstrip().startswith((b"name:", b"layer", b"input", b"#")):
        raise LoadError(f"{p} looks like a prototxt (text), not a binary caffemodel",
                        hint="the net goes first: pacnet convert NET.prototxt --weights W.caffemodel")
    return parse_caffemodel(data, file=p)


# ----------------------------------------------------------------------------- mapping

@dataclass
class MappedWeights:
    """The result of :func:`map_blobs`.

    ``tensors``: state_dict key -> tensor (target shape and dtype).  ``missing``: target
    keys of learnable blobs the caffemodel did not provide.  ``unexpected``: caffemodel
    layers with blobs that the net does not have.  ``loaded``: layer names used.
    """

    tensors: Dict[str, Any] = field(default_factory=dict)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    loaded: List[str] = field(default_factory=list)


def _squeezed(shape: Sequence[int]) -> Tuple[int, ...]:
    return tuple(int(d) for d in shape if int(d) != 1)


def _net_layers(net) -> List[Tuple[str, str]]:
    """(layer name, type) of every layer of a compiled net, in order."""
    ir = getattr(net, "ir", None)
    if ir is None:
        raise TypeError("map_blobs needs a net compiled by pacnet.build (it has no .ir)")
    return [(node.name, node.type) for node in ir.nodes]


def map_blobs(model: CaffeModel, net, *, strict_types: bool = False) -> MappedWeights:
    """Map a caffemodel's blobs onto ``net`` (a :class:`pacnet.codegen.Net`).

    Raises :class:`ShapeError` when a blob cannot take the target's shape (naming layer,
    blob index and both shapes), or when a layer has more blobs than its type.
    """
    import torch

    from pacnet import registry
    from pacnet.codegen import module_name

    state = net.state_dict(keep_vars=True)
    result = MappedWeights()
    layers = _net_layers(net)
    types = {name: ltype for name, ltype in layers}
    # keys that name one tensor object (weights shared by param.name)
    alias: Dict[int, List[str]] = {}
    for key, t in state.items():
        alias.setdefault(id(t), []).append(key)
    filled: Dict[int, Tuple[str, str, int]] = {}  # tensor id -> (key, layer, blob index)
    caffe_file = model.file

    from pacnet.caffe_import import unique_layer_names

    # Repeated layer names are renamed on import (``name_2``...): follow the same rule.
    net_names = unique_layer_names([layer.name for layer in model.layers])
    for layer, net_name in zip(model.layers, net_names):
        if not layer.blobs:
            continue
        if net_name != layer.name:
            layer = CaffeLayer(net_name, layer.type, layer.blobs, layer.param_names, layer.index)
        ltype = types.get(layer.name)
        if ltype is None:
            result.unexpected.append(layer.name)
            continue
        if strict_types and layer.type and layer.type != ltype:
            raise LoadError(f"layer '{layer.name}' is {layer.type} in the caffemodel but {ltype} "
                            f"in the net", location=Location(caffe_file))
        # Caffe numbers only the blobs a layer has (a Scale fed its scale by a second bottom
        # has its bias as blob 0), as pacnet.codegen.learnable_blobs does.
        names = [a for a in registry.get(ltype).blobs if f"{module_name(layer.name)}.{a}" in state]
        if len(layer.blobs) > len(names):
            raise ShapeError(
                f"the caffemodel has {len(layer.blobs)} blobs for this layer, {ltype} has "
                f"{len(names)} ({', '.join(names) or 'none'})", location=Location(caffe_file),
                layer=layer.name, layer_type=ltype,
                hint="is it the caffemodel of this net? (e.g. bias_term differs)")
        for i, (arr, attr) in enumerate(zip(layer.blobs, names)):
            key = f"{module_name(layer.name)}.{attr}"
            target = state.get(key)
            if target is None:
                raise ShapeError(
                    f"the caffemodel has blob {i} ({attr}) but the net's layer has none "
                    f"(shape {list(arr.shape)})", location=Location(caffe_file), layer=layer.name,
                    layer_type=ltype, hint="check bias_term and the layer's parameters")
            tshape = tuple(target.shape)
            if tuple(arr.shape) != tshape:
                if arr.size != target.numel() or _squeezed(arr.shape) != _squeezed(tshape):
                    raise ShapeError(
                        f"blob {i} ({attr}) has shape {list(arr.shape)} in the caffemodel but "
                        f"{list(tshape)} in the net", location=Location(caffe_file),
                        layer=layer.name, layer_type=ltype,
                        hint="the prototxt and the caffemodel do not match (num_output, "
                             "kernel_size, group, input channels?)")
                arr = arr.reshape(tshape)
            tensor = torch.from_numpy(np.array(arr, dtype=np.float64 if target.dtype ==
                                               torch.float64 else np.float32, copy=True))
            tensor = tensor.to(target.dtype)
            prev = filled.get(id(target))
            if prev is not None:
                pkey, players, pi = prev
                if not torch.equal(result.tensors[pkey], tensor):
                    raise LoadError(
                        f"layer '{layer.name}' blob {i} shares its tensor with layer "
                        f"'{players}' blob {pi} (param name), but the caffemodel gives them "
                        f"different values", location=Location(caffe_file),
                        hint="the net shares this blob by param.name; the caffemodel does not")
            else:
                filled[id(target)] = (key, layer.name, i)
            for k in alias.get(id(target), [key]):
                result.tensors[k] = tensor
        result.loaded.append(layer.name)

    for name, ltype in layers:
        for attr in registry.get(ltype).blobs:
            key = f"{module_name(name)}.{attr}"
            if key in state and key not in result.tensors:
                result.missing.append(key)
    return result


# ----------------------------------------------------------------------------- writing

def convert_caffemodel(caffemodel: Union[str, os.PathLike], net,
                       out: Optional[Union[str, os.PathLike]] = None) -> MappedWeights:
    """Read ``caffemodel``, map it onto ``net``; write ``out`` (.safetensors) if given.

    Nothing is written when reading or mapping fails.
    """
    model = read_caffemodel(caffemodel)
    mapped = map_blobs(model, net)
    if not mapped.loaded:
        raise LoadError(f"no layer of {os.fspath(caffemodel)} matches a layer of the net",
                        hint="is it the caffemodel of this net? layer names must match "
                             "(template variables such as ${EXP} included)")
    if out is not None:
        from pacnet.tensorfile import write_safetensors

        write_safetensors(os.fspath(out), mapped.tensors, metadata={
            "source": os.path.basename(os.fspath(caffemodel)), "converter": "pacnet convert"})
    return mapped


def write_caffemodel(layers: Sequence[Tuple[str, str, Sequence[np.ndarray]]],
                     path: Optional[Union[str, os.PathLike]] = None, *, v1: bool = False,
                     legacy_4d: bool = False, name: str = "net",
                     param_names: Optional[Mapping[str, Sequence[str]]] = None,
                     exact: bool = False) -> bytes:
    """Serialize ``(name, type, blobs)`` triples as a caffemodel (tests, tools).

    ``v1`` writes V1 ``layers`` (``type`` then must be a V1 enum number or a V2 type name
    known to the V1 table); ``legacy_4d`` writes num/channels/height/width instead of
    ``shape`` (blobs of up to 4 axes, padded with leading 1s).  The bytes are the same with
    either schema; ``exact`` goes through ``repeated float`` (slow, for cross-checks).
    """
    from pacnet.caffe_import import V1_TYPES

    s = schema(fast=not exact)
    net = s["NetParameter"](name=name)
    v2_to_num = {v2: num for num, v2 in V1_TYPES.values() if v2}
    v2_to_num["Deconvolution"] = 39
    for lname, ltype, blobs in layers:
        if v1:
            lp = net.layers.add(name=lname)
            lp.type = ltype if isinstance(ltype, int) else v2_to_num[ltype]
            for pn in (param_names or {}).get(lname, ()):
                lp.param.append(pn)
        else:
            lp = net.layer.add(name=lname, type=ltype)
            for pn in (param_names or {}).get(lname, ()):
                lp.param.add(name=pn)
        for arr in blobs:
            arr = np.asarray(arr)
            b = lp.blobs.add()
            if legacy_4d:
                if arr.ndim > 4:
                    raise ValueError("legacy blobs have at most 4 axes")
                dims = (1,) * (4 - arr.ndim) + tuple(arr.shape)
                b.num, b.channels, b.height, b.width = dims
            else:
                b.shape.dim.extend(int(d) for d in arr.shape)
            if arr.size == 0:
                continue
            if arr.dtype == np.float64:
                vals = arr.astype("<f8").ravel()
                if exact:
                    b.double_data.extend(vals.tolist())
                else:
                    b.double_data.append(vals.tobytes())
            else:
                vals = arr.astype("<f4").ravel()
                if exact:
                    b.data.extend(vals.tolist())
                else:
                    b.data.append(vals.tobytes())
    data = net.SerializeToString()
    if path is not None:
        from pacnet.atomic import atomic_write

        with atomic_write(os.fspath(path), "wb") as fh:
            fh.write(data)
    return data
