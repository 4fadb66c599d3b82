"""pacnet.tensorfile: the one safetensors writer (atomic, checksummed, reproducible bytes) and
the one reader (verifies the checksum, names what a file is when it is not safetensors)."""

import os
import pickle
import struct

import pytest
import torch

from pacnet.errors import DamagedFileError, DataError, OutputError, PacnetValueError
from pacnet.tensorfile import (CHECKSUM_KEY, content_digest, identify, read_safetensors, tensor_digest,
                               write_safetensors)

TENSORS = {"b.weight": torch.randn(3, 4), "a.bias": torch.arange(5), "scalar": torch.tensor(2.5),
           "empty": torch.zeros(0, 3), "half": torch.randn(4, dtype=torch.bfloat16),
           "mask": torch.tensor([True, False]), "view": torch.randn(4, 6)[:, ::2]}


def test_round_trip_through_the_safetensors_library(tmp_path):
    from safetensors.torch import load_file

    path = str(tmp_path / "w.safetensors")
    checksum = write_safetensors(path, TENSORS, {"iteration": 3})
    loaded = load_file(path)  # the format is the library's own
    assert sorted(loaded) == sorted(TENSORS)
    for key, value in TENSORS.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key
    tensors, meta = read_safetensors(path)
    assert meta == {"format": "pt", "iteration": "3", CHECKSUM_KEY: checksum}
    assert checksum == tensor_digest(TENSORS) == tensor_digest(tensors)


def test_the_bytes_depend_on_the_tensors_only(tmp_path):
    write_safetensors(str(tmp_path / "a.safetensors"), TENSORS, {"x": 1, "y": 2})
    shuffled = dict(reversed(list(TENSORS.items())))
    shuffled["view"] = TENSORS["view"].contiguous()
    write_safetensors(str(tmp_path / "b.safetensors"), shuffled, {"y": 2, "x": 1})
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_the_digest_sees_names_dtypes_shapes_and_values():
    base = tensor_digest({"a": torch.zeros(2, 3)})
    assert base != tensor_digest({"b": torch.zeros(2, 3)})
    assert base != tensor_digest({"a": torch.zeros(3, 2)})
    assert base != tensor_digest({"a": torch.zeros(2, 3, dtype=torch.float64)})
    assert base != tensor_digest({"a": torch.zeros(2, 3).index_fill_(1, torch.tensor([2]), 1e-30)})
    assert content_digest({"a": 1}) != content_digest({"a": 1.0}) != content_digest({"a": True})
    assert content_digest({1: [1, 2]}) != content_digest({1: (1, 2)})
    assert content_digest({"x": 1, "y": None}) == content_digest({"y": None, "x": 1})
    with pytest.raises(PacnetValueError, match="cannot checksum a object"):
        content_digest({"a": object()})


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    write_safetensors(str(path), {"a": torch.ones(2)})
    before = path.read_bytes()
    import pacnet.atomic

    def boom(tmp):  # the data did not fit when flushed to disk
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pacnet.atomic, "_sync", boom)
    with pytest.raises(OutputError, match=r"cannot write .*w.safetensors: No space left on device"):
        write_safetensors(str(path), {"a": torch.zeros(2)})
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["w.safetensors"]
    monkeypatch.undo()
    with pytest.raises(OutputError, match="folder .*no does not exist"):
        write_safetensors(str(tmp_path / "no" / "x.safetensors"), {"a": torch.ones(1)})
    with pytest.raises(OutputError, match="it is a folder"):
        write_safetensors(str(tmp_path), {"a": torch.ones(1)})
    with pytest.raises(PacnetValueError, match="not a tensor"):
        write_safetensors(str(path), {"a": [1.0]})


def test_damage_is_refused_naming_the_file(tmp_path):
    path = str(tmp_path / "w.safetensors")
    write_safetensors(path, {"w": torch.randn(256)})
    raw = bytearray(open(path, "rb").read())
    damaged = bytearray(raw)
    damaged[-200:-136] = bytes(64)  # inside the tensor data: still parses
    open(path, "wb").write(damaged)
    with pytest.raises(DamagedFileError, match=f"weights file {path} is corrupt: its tensors do not match"):
        read_safetensors(path)
    damaged = bytearray(raw)
    damaged[20:30] = b"\x00" * 10  # inside the JSON header
    open(path, "wb").write(damaged)
    with pytest.raises(DamagedFileError, match=f"weights file {path} is damaged"):
        read_safetensors(path)
    open(path, "wb").write(raw[: len(raw) // 2])
    with pytest.raises(DamagedFileError, match="is damaged"):
        read_safetensors(path)
    with pytest.raises(DataError, match="weights file not found"):
        read_safetensors(str(tmp_path / "missing.safetensors"))
    with pytest.raises(DataError, match="give a file, not a folder"):
        read_safetensors(str(tmp_path))


def test_other_formats_are_named_for_what_they_are(tmp_path):
    zipped, legacy = tmp_path / "model.pth", tmp_path / "old.pt"
    torch.save({"w": torch.zeros(1)}, zipped)
    torch.save({"w": torch.zeros(1)}, legacy, _use_new_zipfile_serialization=False)
    h5 = tmp_path / "w.h5"
    h5.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(32))
    caffe = tmp_path / "w.caffemodel"
    caffe.write_bytes(b"\n\x05tiny\x12\x00" + bytes(16))
    pkl = tmp_path / "w.pkl"
    pkl.write_bytes(pickle.dumps({"w": 1}, protocol=4))
    cases = {zipped: "a PyTorch file saved with torch.save", legacy: "a Python pickle", h5: "an HDF5 file",
             caffe: "a Caffe .caffemodel", pkl: "a Python pickle"}
    for path, what in cases.items():
        assert identify(str(path)).startswith(what)
        with pytest.raises(DataError, match=f"{path} is {what}") as info:
            read_safetensors(str(path))
        assert "not a safetensors weights file" in str(info.value) and "damaged" not in str(info.value)
    with pytest.raises(DataError, match="pacnet convert NET.prototxt --weights"):
        read_safetensors(str(caffe))
    header = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    good = tmp_path / "ok.safetensors"
    good.write_bytes(struct.pack("<Q", len(header)) + header + bytes(4))
    assert identify(str(good)) is None
    tensors, meta = read_safetensors(str(good))  # another tool's file: no checksum, read as it is
    assert tensors["a"].tolist() == [0.0] and CHECKSUM_KEY not in meta
