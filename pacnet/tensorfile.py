"""Tensor files pacnet writes and reads: safetensors with a SHA-256 checksum, verified on load.

:func:`write_safetensors` is the one writer of every safetensors file pacnet makes
(checkpoints, converted weights).  It writes the format itself, so the bytes are a function
of the tensors alone (keys in sorted order, metadata sorted; the same weights give the same
file), streams each tensor from its own memory, goes through :mod:`pacnet.atomic` (temp
file, fsync, rename, the umask's permissions) and records in the metadata::

    pacnet.sha256   SHA-256 of the tensors (see :func:`tensor_digest`)

:func:`read_safetensors` is the one reader: it opens the file with the ``safetensors``
library (which checks the layout), recomputes the digest and refuses a mismatch with a
:class:`~pacnet.errors.DataError` naming the file.  Files without a checksum (written by
other tools) are read as they are.  A file that is not safetensors at all -- a PyTorch
``.pth``, a Caffe ``.caffemodel``, HDF5 -- is named for what it is, with what to do.

The digest covers what the tensors *are*, not how a file lays them out: for each key in
sorted order its name, dtype, shape and little-endian bytes.  :func:`content_digest` extends
it to nested training states (dicts, lists, numbers, strings, tensors), which
:mod:`pacnet.engine.checkpoint` stores inside each state file.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch

from pacnet.errors import DamagedFileError, DataError, PacnetValueError

__all__ = ["CHECKSUM_KEY", "write_safetensors", "read_safetensors", "tensor_digest",
           "content_digest", "identify"]

CHECKSUM_KEY = "pacnet.sha256"
_ALIASES = "pacnet.aliases"  # written by pacnet <= 0.1 for shared blobs; still read

_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2", torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
}

if sys.byteorder != "little":  # pragma: no cover - every platform torch ships for is little-endian
    raise ImportError("pacnet's safetensors writer needs a little-endian machine")


def _raw(t: torch.Tensor):
    """The bytes of ``t`` (row-major, as safetensors stores them) without copying a
    contiguous CPU tensor."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return t.contiguous().reshape(-1).view(torch.uint8).numpy()


def _feed_tensor(h: "hashlib._Hash", t: torch.Tensor) -> None:
    h.update(f"{_DTYPES.get(t.dtype, str(t.dtype))}{list(t.shape)}".encode())
    h.update(_raw(t))


def tensor_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """Hex SHA-256 of ``tensors``: for each key in sorted order, the key, the dtype, the shape
    and the raw bytes (each length-delimited by the structure of what precedes it)."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        name = key.encode("utf-8")
        h.update(struct.pack("<Q", len(name)) + name)
        _feed_tensor(h, tensors[key])
    return h.hexdigest()


def _feed(h: "hashlib._Hash", value: Any) -> None:
    if isinstance(value, torch.Tensor):
        h.update(b"T")
        _feed_tensor(h, value)
    elif isinstance(value, Mapping):
        h.update(b"D%d:" % len(value))
        for key in sorted(value, key=lambda k: (type(k).__name__, repr(k))):
            _feed(h, key)
            _feed(h, value[key])
    elif isinstance(value, (list, tuple)):
        h.update((b"L" if isinstance(value, list) else b"U") + b"%d:" % len(value))
        for item in value:
            _feed(h, item)
    elif value is None or isinstance(value, bool):
        h.update(b"N" if value is None else (b"B1" if value else b"B0"))
    elif isinstance(value, int):
        h.update(b"I%d;" % value)
    elif isinstance(value, float):
        h.update(b"F" + float.hex(value).encode() + b";")
    elif isinstance(value, (str, bytes)):
        raw = value.encode("utf-8") if isinstance(value, str) else value
        h.update((b"S" if isinstance(value, str) else b"Y") + b"%d:" % len(raw) + raw)
    else:
        raise PacnetValueError(f"cannot checksum a {type(value).__name__} (plain data and tensors "
                               "only)")


def content_digest(value: Any) -> str:
    """Hex SHA-256 of nested plain data with tensors (what ``torch.load(weights_only=True)``
    gives back): dict keys in a fixed order, types kept apart (1, 1.0 and True differ)."""
    h = hashlib.sha256()
    _feed(h, value)
    return h.hexdigest()


# --------------------------------------------------------------------------- writing


def write_safetensors(path: str, tensors: Mapping[str, torch.Tensor],
                      metadata: Optional[Mapping[str, Any]] = None, *,
                      stage: Optional[Callable[[str, Callable[[str], None]], None]] = None) -> str:
    """Write ``tensors`` to ``path`` as safetensors, atomically, with their checksum in the
    metadata; return the checksum.  Every key is stored (tensors shared between keys are
    written once per key).  ``metadata`` values are stored as strings.  ``stage``: the
    ``stage`` of a :func:`pacnet.atomic.atomic_files` block this file joins."""
    from pacnet.atomic import atomic_save

    items = []
    offset = 0
    header: Dict[str, Any] = {}
    for key in sorted(tensors):
        t = tensors[key]
        if not isinstance(key, str) or not isinstance(t, torch.Tensor):
            raise PacnetValueError(f"cannot save {key!r} to {path}: not a tensor named by a string "
                                   f"({type(t).__name__})")
        code = _DTYPES.get(t.dtype)
        if code is None:
            raise PacnetValueError(f"cannot save {key!r} to {path}: safetensors has no {t.dtype}")
        size = t.numel() * t.element_size()
        header[key] = {"dtype": code, "shape": list(t.shape),
                       "data_offsets": [offset, offset + size]}
        items.append((key, t))
        offset += size
    checksum = tensor_digest(tensors)
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta.setdefault("format", "pt")
    meta[CHECKSUM_KEY] = checksum
    text = json.dumps({"__metadata__": dict(sorted(meta.items())), **header},
                      separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data start 8-byte aligned, as safetensors writes

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(text)))
            f.write(text)
            for _, t in items:
                f.write(_raw(t))

    (stage or atomic_save)(path, write)
    return checksum


# --------------------------------------------------------------------------- reading


_MAGIC = (
    (b"PK\x03\x04", "a PyTorch file saved with torch.save (a zip archive: .pth, .pt, .pth.tar)"),
    (b"\x89HDF\r\n\x1a\n", "an HDF5 file (Keras .h5, a Caffe HDF5 snapshot, MATLAB v7.3)"),
    (b"\x93NUMPY", "a NumPy .npy array"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"GGUF", "a GGUF file"),
)


def identify(path: str) -> Optional[str]:
    """What the file at ``path`` is when it is not safetensors (``"a PyTorch file ..."``),
    or None when it looks like safetensors or is not recognised."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return None
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return what
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "a Python pickle (an old torch.save file, .pth/.pt/.pkl)"
    if len(head) >= 9 and head[8:9] == b"{" and 8 + struct.unpack("<Q", head[:8])[0] <= size:
        return None  # a safetensors header
    if path.lower().endswith(".caffemodel"):
        return "a Caffe .caffemodel"
    if head.lstrip().startswith((b"name:", b"layer", b"input", b"#", b"{", b"---")):
        return "a text file"
    return None


def _advice(what: str, path: str) -> str:
    if "PyTorch" in what or "pickle" in what:
        return ("pacnet reads weights as safetensors: save the state_dict with "
                "safetensors.torch.save_file(state_dict, 'W.safetensors') (keys '<layer>.<blob>', "
                "as 'pacnet build NET --json' lists them)")
    if "caffemodel" in what:
        return f"convert it first: pacnet convert NET.prototxt --weights {path} -o W.safetensors"
    return "give a .safetensors file (pacnet convert makes one from Caffe weights)"


def read_safetensors(path: str, device: Any = "cpu", *, what: str = "weights file"
                     ) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Read a safetensors file: (tensors, metadata).  The checksum in the metadata, when
    there is one, is verified; aliases of files from pacnet <= 0.1 are restored.  Raises
    :class:`DataError` naming ``path`` (with ``what`` it is) when the file is missing, not
    safetensors, damaged or fails its checksum."""
    from safetensors import SafetensorError, safe_open

    if not os.path.isfile(path):
        folder = os.path.isdir(path)
        raise DataError(f"{what} not found: {path}",
                        hint="give a file, not a folder" if folder else "check the path")
    foreign = identify(path)
    if foreign is not None:
        raise DataError(f"{path} is {foreign}, not a safetensors {what}",
                        hint=_advice(foreign, path))
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as err:
        reason = str(err).strip() or type(err).__name__
        raise DamagedFileError(f"{what} {path} is damaged: {reason}",
                               hint="the file was cut short or overwritten; write or copy it "
                                    "again") from None
    expected = meta.get(CHECKSUM_KEY)
    if expected is not None and tensor_digest(tensors) != expected:
        raise DamagedFileError(f"{what} {path} is corrupt: its tensors do not match the SHA-256 "
                               "checksum written with them",
                               hint="the file was damaged after it was written (disk, copy or "
                                    "transfer); write or copy it again")
    if _ALIASES in meta:
        try:
            for alias, owner in json.loads(meta[_ALIASES]).items():
                tensors[alias] = tensors[owner]
        except (ValueError, KeyError, AttributeError, TypeError):
            raise DamagedFileError(f"{what} {path} has a damaged alias table") from None
    if str(device) != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return tensors, meta
