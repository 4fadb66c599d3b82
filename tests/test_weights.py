"""pacnet.weights: reading .pth/.pt/.pth.tar/safetensors safely, the weights_from rules, the
checks and their messages, and that nothing is loaded or written when a check fails."""

import argparse
import os
import pickle
import zipfile

import pytest
import torch
from torch import nn

import pacnet
from pacnet.engine.checkpoint import load_weights as read_safetensors
from pacnet.engine.checkpoint import save_weights
from pacnet.errors import DataError, LoadError, OutputError, SchemaError
from pacnet.weights import convert, match, read_state_dict, suggest_nets

# A small net whose layer names differ from its source model's module names.
NET = {
    "name": "tiny", "pacnet_version": 1,
    "inputs": {"data": [1, 2, 6, 6]},
    "weights_from": {"orig": {
        "model": "Tiny(nn.Module)",
        "rename": [
            {"from": "body.*", "to": "body/*"},
            {"from": "scales.*", "to": "scale/*.weight", "transform": "reciprocal"},
            {"from": "head.w", "to": "head.weight", "transform": [{"transpose": [1, 0, 2, 3]}]},
            {"from": "head.b", "to": "head.bias", "transform": {"reshape": [3]}},
        ],
        "ignore": ["unused.*"],
    }},
    "layers": [
        {"name": "body/conv", "type": "Convolution", "bottom": "data", "top": "a", "num_output": 4,
         "kernel_size": 3, "pad": 1},
        {"name": "scale/0", "type": "Scale", "bottom": "a", "top": "b", "axis": 1, "num_axes": 1},
        {"name": "head", "type": "Convolution", "bottom": "b", "top": "c", "num_output": 3, "kernel_size": 1},
    ],
}


def _original(seed=0):
    """The source model's state_dict for NET."""
    g = torch.Generator().manual_seed(seed)
    return {"body.conv.weight": torch.randn(4, 2, 3, 3, generator=g), "body.conv.bias": torch.randn(4, generator=g),
            "scales.0": torch.rand(4, generator=g) + 0.5, "head.w": torch.randn(4, 3, 1, 1, generator=g),
            "head.b": torch.randn(1, 3, generator=g), "unused.thing": torch.zeros(2)}


def _net(**kw):
    return pacnet.build(NET, **kw)


def test_rules_rename_transform_and_ignore(tmp_path):
    path = tmp_path / "tiny.pth"
    state = _original()
    torch.save(state, path)
    net = _net()
    result = pacnet.load_weights(net, path)
    got = net.state_dict()
    torch.testing.assert_close(got["body/conv.weight"], state["body.conv.weight"])
    torch.testing.assert_close(got["scale/0.weight"], 1 / state["scales.0"])
    torch.testing.assert_close(got["head.weight"], state["head.w"].permute(1, 0, 2, 3))
    torch.testing.assert_close(got["head.bias"], state["head.b"].reshape(3))
    (f,) = result.files
    assert f.source.name == "orig" and f.ignored == ["unused.thing"] and not result.missing
    assert f.origin["scale/0.weight"] == "scales.0"
    assert "tiny.pth: 5 blobs (as Tiny(nn.Module), 1 ignored)" == result.summary()


def test_the_nets_own_names_load_too_and_win_ties(tmp_path):
    net = _net()
    path = str(tmp_path / "own.safetensors")
    save_weights(path, {k: torch.full_like(v, 0.25) for k, v in net.state_dict().items()})
    other = _net()
    result = pacnet.load_weights(other, path)
    assert result.files[0].source.name == "pacnet"
    assert all((v == 0.25).all() for v in other.state_dict().values())


@pytest.mark.parametrize("layout", ["zip", "legacy", "state_dict", "model", "nested", "module", "safetensors"])
def test_file_layouts(tmp_path, layout):
    state = _original()
    path = str(tmp_path / "w.pth.tar")
    if layout == "legacy":  # the format of torch < 1.6, which wrote the original's published files
        torch.save(state, path, _use_new_zipfile_serialization=False)
    elif layout == "state_dict":
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.9)
        torch.save({"state_dict": state, "epoch": 30, "optimizer": opt.state_dict(), "arch": "tiny"}, path)
    elif layout == "model":
        torch.save({"model": state, "iteration": 5}, path)
    elif layout == "nested":
        torch.save({"model": {"state_dict": state}}, path)
    elif layout == "module":  # saved from a DataParallel / DDP wrapper
        torch.save({f"module.{k}": v for k, v in state.items()}, path)
    elif layout == "safetensors":
        path = str(tmp_path / "w.safetensors")
        save_weights(path, state)
    else:
        torch.save(state, path)
    read = read_state_dict(path)
    assert set(read) == set(state)
    for key, value in state.items():
        torch.testing.assert_close(read[key], value)


class _Marker:
    """Unpickling this would create a folder: the proof that code ran."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_files_that_need_code_are_refused_without_running_it(tmp_path):
    marker = str(tmp_path / "code_ran")
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": _original(), "x": _Marker(marker)}, evil)
    with pytest.raises(LoadError, match=r"needs code to load: unpickling it would call posix.mkdir") as info:
        read_state_dict(evil)
    assert "weights_only=True" in str(info.value) and not os.path.exists(marker)
    ns = tmp_path / "ns.pth.tar"
    torch.save({"state_dict": _original(), "args": argparse.Namespace(lr=0.1)}, ns)
    with pytest.raises(LoadError, match=r"would call argparse.Namespace") as info:
        read_state_dict(ns)
    assert "re-save its tensors" in info.value.hint
    whole = tmp_path / "model.pth"
    torch.save(nn.Conv2d(1, 1, 1), whole)
    with pytest.raises(LoadError, match=r"would call torch.nn.modules.conv.Conv2d"):
        read_state_dict(whole)


def test_corrupt_truncated_and_foreign_files(tmp_path):
    good = tmp_path / "good.pth"
    torch.save(_original(), good)
    legacy = tmp_path / "legacy.pth"
    torch.save(_original(), legacy, _use_new_zipfile_serialization=False)
    for src in (good, legacy):
        data = src.read_bytes()
        cut = tmp_path / f"cut_{src.name}"
        cut.write_bytes(data[: len(data) // 2])
        with pytest.raises(LoadError, match=r"is corrupt or truncated"):
            read_state_dict(cut)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(LoadError, match="is empty"):
        read_state_dict(empty)
    text = tmp_path / "net.pth"
    text.write_text("name: 'x'\nlayer { }\n")
    with pytest.raises(LoadError, match="neither a PyTorch") as info:
        read_state_dict(text)
    assert "text file" in info.value.hint
    caffe = tmp_path / "m.caffemodel"
    caffe.write_bytes(b"\n\x03net")
    with pytest.raises(LoadError, match="neither a PyTorch") as info:
        read_state_dict(caffe)
    assert "pacnet convert NET.prototxt --weights m.caffemodel" in info.value.hint
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps({"w": 1}, protocol=4))
    with pytest.raises(LoadError, match="corrupt or truncated"):
        read_state_dict(plain)
    not_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_dict)
    with pytest.raises(LoadError, match="holds a list, not a state_dict"):
        read_state_dict(not_dict)
    mixed = tmp_path / "mixed.pth"
    torch.save({"epoch": 3, "w": torch.zeros(1)}, mixed)
    with pytest.raises(LoadError, match=r"non-tensor entries 'epoch' \(int\)"):
        read_state_dict(mixed)
    with pytest.raises(LoadError, match="not found"):
        read_state_dict(tmp_path / "nope.pth")
    bad_zip = tmp_path / "zip.pth"
    with zipfile.ZipFile(bad_zip, "w") as z:
        z.writestr("x", "y")
    with pytest.raises(LoadError, match="corrupt or truncated"):
        read_state_dict(bad_zip)


def test_every_key_and_shape_is_checked_and_nothing_is_loaded_on_failure(tmp_path):
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    state = _original()
    cases = {
        "shape": ({**state, "body.conv.weight": torch.zeros(4, 2, 5, 5)},
                  r"body.conv.weight -> body/conv.weight has shape \[4, 2, 5, 5\] in the file but \[4, 2, 3, 3\]"),
        "extra": ({**state, "body.extra.weight": torch.zeros(1), "tail.x": torch.zeros(1)},
                  r"2 of its entries have no place in the net \(body.extra.weight -> body/extra.weight, tail.x\)"),
        "missing": ({k: v for k, v in state.items() if k != "head.b"},
                    r"net tiny has 1 blob\(s\) that missing.pth does not hold \(head.bias\)"),
        "nothing": ({"unused.a": torch.zeros(1)}, r"nothing.pth gives net tiny nothing"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / f"{name}.pth"
        torch.save(content, path)
        with pytest.raises(DataError, match=message):
            pacnet.load_weights(net, path)
        for key, value in net.state_dict().items():
            assert torch.equal(value, before[key]), (name, key)
    # not strict: missing blobs keep their values, the others are copied
    result = pacnet.load_weights(net, tmp_path / "missing.pth", strict=False)
    assert result.missing == ["head.bias"] and torch.equal(net.state_dict()["head.bias"], before["head.bias"])
    zero = tmp_path / "zero.pth"
    torch.save({**state, "scales.0": torch.zeros(4)}, zero)
    with pytest.raises(DataError, match="holds a zero, which has no reciprocal"):
        match(net, zero)


def test_several_files_are_one_set_later_ones_win(tmp_path):
    state = _original()
    body = {k: v for k, v in state.items() if k.startswith("body.")}
    rest = {k: v for k, v in state.items() if not k.startswith("body.")}
    a, b = tmp_path / "a.pth", tmp_path / "b.pth"
    torch.save(body, a)
    torch.save({**rest, "body.conv.bias": torch.full((4,), 7.0)}, b)
    net = _net()
    result = pacnet.load_weights(net, [a, b])
    assert not result.missing and (net.state_dict()["body/conv.bias"] == 7).all()
    with pytest.raises(DataError, match=r"3 blob\(s\) that a.pth does not hold \(scale/0.weight, head.weight"):
        pacnet.load_weights(net, [a])
    with pytest.raises(DataError, match=r"1 blob\(s\) that no given file holds \(head.bias\)"):
        torch.save({k: v for k, v in rest.items() if k != "head.b"}, b)
        pacnet.load_weights(net, [a, b])
    with pytest.raises(LoadError, match="declares no weights source 'caffe'") as info:
        match(net, [a], source="caffe")
    assert info.value.hint == "its sources: pacnet, orig"


def test_shared_blobs_are_one_tensor(tmp_path):
    net_def = {"name": "shared", "inputs": {"data": [1, 2, 4, 4]}, "layers": [
        {"name": "c1", "type": "Convolution", "bottom": "data", "top": "a", "num_output": 2, "kernel_size": 1,
         "param": [{"name": "w"}, {"name": "b"}]},
        {"name": "c2", "type": "Convolution", "bottom": "a", "top": "b", "num_output": 2, "kernel_size": 1,
         "param": [{"name": "w"}, {"name": "b"}]}]}
    net = pacnet.build(net_def)
    path = tmp_path / "shared.pth"
    torch.save({"c1.weight": torch.ones(2, 2, 1, 1), "c1.bias": torch.zeros(2)}, path)
    result = pacnet.load_weights(net, path)
    assert not result.missing and (net.state_dict()["c2.weight"] == 1).all()


def test_rules_are_checked_when_the_net_is_built():
    bad = dict(NET, weights_from={"orig": {"model": "x", "rename": [{"from": "a.*", "to": "b"}]}})
    with pytest.raises(SchemaError, match=r"weights_from.orig.rename\[0\]: 'to' 'b' has 0 '\*' but 'from' 'a.\*' has 1"):
        pacnet.build(bad, device="meta")
    typo = dict(NET, weights_from={"orig": {"model": "x", "renames": []}})
    with pytest.raises(SchemaError, match="renames"):
        pacnet.build(typo, device="meta")
    bad_transform = dict(NET, weights_from={"orig": {"model": "x", "rename": [
        {"from": "a", "to": "b", "transform": "inverse"}]}})
    with pytest.raises(SchemaError):
        pacnet.build(bad_transform, device="meta")


def test_convert_writes_the_nets_names_atomically_and_nothing_on_failure(tmp_path):
    src = tmp_path / "tiny.pth"
    torch.save(_original(), src)
    net = _net(device="meta")
    out = tmp_path / "tiny.safetensors"
    result = convert(net, src, out)
    tensors, meta = read_safetensors(str(out))
    assert set(tensors) == set(_net().state_dict()) and meta["weights_from"] == "orig"
    assert meta["source"] == "tiny.pth" and meta["net"] == "tiny" and len(result.tensors) == 5
    bad = tmp_path / "bad.pth"
    torch.save({"x": torch.zeros(1)}, bad)
    out2 = tmp_path / "bad.safetensors"
    with pytest.raises(DataError):
        convert(net, bad, out2)
    assert not out2.exists() and sorted(os.listdir(tmp_path)) == ["bad.pth", "tiny.pth", "tiny.safetensors"]
    with pytest.raises(LoadError, match="would overwrite an input file"):
        convert(net, out, out)
    with pytest.raises(OutputError, match="does not exist"):
        convert(net, src, tmp_path / "no" / "x.safetensors")


def test_a_file_of_another_zoo_net_is_named(tmp_path):
    x4 = pacnet.build("jointupsample/pac_joint_upsample_x4", device="meta")
    path = tmp_path / "x4.pth"
    torch.save({k.replace("/", "."): torch.zeros(v.shape) for k, v in x4.state_dict().items()}, path)
    assert suggest_nets([path])[:1] == ["jointupsample/pac_joint_upsample_x4"]
    x8 = pacnet.build("jointupsample/pac_joint_upsample_x8", device="meta")
    with pytest.raises(DataError, match=r"x4.pth does not fit net pac_joint_upsample_x8 \(mapped as NVlabs") as info:
        match(x8, path)
    assert info.value.hint.startswith("the file fits zoo net") and "jointupsample/pac_joint_upsample_x4" in info.value.hint


# ----------------------------------------------------------------------------- command line

X8 = "jointupsample/pac_joint_upsample_x8"


def _x8_original(tmp_path, seed=0):
    """A state_dict of the original PacJointUpsample(factor=8), as its published files."""
    from nvlabs_reference import JOINT_MODELS

    torch.manual_seed(seed)
    path = tmp_path / "x8_pac_weights_epoch_5000.pth"
    torch.save(JOINT_MODELS[X8]().state_dict(), path, _use_new_zipfile_serialization=False)
    return path


def test_cli_convert_test_and_train_take_the_originals_pth(tmp_path, capsys):
    from pacnet.cli.main import main

    pth = _x8_original(tmp_path)
    assert main(["convert", X8, "--weights", str(pth)]) == 0
    err = capsys.readouterr().err
    assert "wrote" in err and "x8_pac_weights_epoch_5000.safetensors (22 blobs of pac_joint_upsample_x8" in err
    assert "as NVlabs/pacnet task_jointUpsampling PacJointUpsample" in err
    converted, _ = read_safetensors(str(tmp_path / "x8_pac_weights_epoch_5000.safetensors"))
    original = torch.load(pth, weights_only=True)
    assert set(converted) == {k.replace(".", "/", 1) for k in original}
    torch.testing.assert_close(converted["up_convts/2.weight"], original["up_convts.2.weight"], rtol=0, atol=0)
    assert main(["test", X8, "--weights", str(pth), "--max-batches", "1"]) == 0
    assert "│ rmse " in capsys.readouterr().out
    run = tmp_path / "run"
    assert main(["train", X8, "--weights", str(pth), "--work-dir", str(run), "--max-iter", "1",
                 "--set", "solver.test_interval=0", "--no-tensorboard"]) == 0
    assert "initialised from" in capsys.readouterr().out


def test_cli_bad_weights_exit_2_and_write_nothing(tmp_path, capsys):
    from pacnet.cli.main import main

    evil = tmp_path / "evil.pth"
    torch.save({"x": _Marker(str(tmp_path / "code_ran"))}, evil)
    x4 = pacnet.build("jointupsample/pac_joint_upsample_x4", device="meta")
    other = tmp_path / "x4.pth"
    torch.save({k.replace("/", "."): torch.zeros(v.shape) for k, v in x4.state_dict().items()}, other)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(_x8_original(tmp_path).read_bytes()[:5000])
    cases = [(evil, "needs code to load"), (other, "the file fits zoo net"), (cut, "corrupt or truncated")]
    for path, message in cases:
        before = sorted(os.listdir(tmp_path))
        assert main(["convert", X8, "--weights", str(path), "-o", str(tmp_path / "out.safetensors")]) == 2
        assert message in capsys.readouterr().err
        assert main(["test", X8, "--weights", str(path)]) == 2
        assert message in capsys.readouterr().err
        assert sorted(os.listdir(tmp_path)) == before and not os.path.exists(tmp_path / "code_ran")
    assert main(["convert", X8]) == 2
    assert "is already a pacnet net: convert takes its weights (--weights W.pth)" in capsys.readouterr().err
    assert main(["convert", X8, "--weights", f"{other},{cut}"]) == 2
    assert "several weights files: name the output" in capsys.readouterr().err


def test_cli_convert_maps_a_caffemodel_onto_a_pacnet_net(tmp_path, capsys):
    import yaml

    from pacnet.caffemodel import write_caffemodel
    from pacnet.cli.main import main

    net_file = tmp_path / "tiny.yaml"
    net_file.write_text(yaml.safe_dump(NET))
    blobs = {k: v.numpy() for k, v in _net().state_dict().items()}
    layers = [("body/conv", "Convolution", [blobs["body/conv.weight"], blobs["body/conv.bias"]]),
              ("scale/0", "Scale", [blobs["scale/0.weight"]])]
    write_caffemodel(layers, tmp_path / "tiny.caffemodel")
    assert main(["convert", str(net_file), "--weights", str(tmp_path / "tiny.caffemodel")]) == 2
    assert "net blobs without weights (2): head.weight, head.bias" in capsys.readouterr().err
    assert not (tmp_path / "tiny.safetensors").exists()
    assert main(["convert", str(net_file), "--weights", str(tmp_path / "tiny.caffemodel"), "--no-strict"]) == 0
    assert "warning: net blobs without weights" in capsys.readouterr().err
    converted, _ = read_safetensors(str(tmp_path / "tiny.safetensors"))
    assert set(converted) == {"body/conv.weight", "body/conv.bias", "scale/0.weight"}
