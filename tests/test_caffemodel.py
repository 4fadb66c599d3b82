"""Binary .caffemodel reading and mapping onto compiled nets."""

import os
import struct

import numpy as np
import pytest
import torch

import pacnet
from pacnet.caffemodel import (
    convert_caffemodel, map_blobs, parse_caffemodel, read_caffemodel, schema,
    write_caffemodel,
)
from pacnet.errors import LoadError, ShapeError
from pacnet.tensorfile import write_safetensors

NET = """
name: "tiny"
input: "data"
input_dim: 1 input_dim: 4 input_dim: 6 input_dim: 6
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 6 kernel_size: 3 pad: 1 group: 2 } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1"
        batch_norm_param { use_global_stats: true } }
layer { name: "sc1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }
layer { name: "psp" type: "BN" bottom: "conv1" top: "conv1" bn_param { frozen: true } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "up" type: "Deconvolution" bottom: "conv1" top: "up"
        convolution_param { num_output: 4 kernel_size: 4 stride: 2 group: 2 } }
layer { name: "fc" type: "InnerProduct" bottom: "up" top: "fc" inner_product_param { num_output: 5 } }
"""

rng = np.random.default_rng(0)


def r(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def blobs():
    return {
        "conv1": [r(6, 2, 3, 3), r(6)],
        # BVLC BatchNorm: accumulated mean, var and the scale factor
        "bn1": [r(6), np.abs(r(6)) + 1, np.array([4.0], np.float32)],
        "sc1": [r(6), r(6)],
        "psp": [r(1, 6, 1, 1), r(1, 6, 1, 1), r(1, 6, 1, 1), np.abs(r(1, 6, 1, 1)) + 0.5],
        "up": [r(6, 2, 4, 4), r(4)],
        "fc": [r(5, 4 * 14 * 14), r(5)],
    }


TYPES = {"conv1": "Convolution", "bn1": "BatchNorm", "sc1": "Scale", "psp": "BN",
         "up": "Deconvolution", "fc": "InnerProduct"}


@pytest.fixture
def net_path(tmp_path):
    p = tmp_path / "tiny.prototxt"
    p.write_text(NET)
    return p


def model_bytes(b, **kw):
    return write_caffemodel([("data", "Input", []), ("relu1", "ReLU", [])] +
                            [(n, TYPES[n], v) for n, v in b.items()], **kw)


def reference_forward(b, x):
    """The tiny net computed by hand from the Caffe blobs (Caffe semantics)."""
    F = torch.nn.functional
    t = {k: [torch.from_numpy(a) for a in v] for k, v in b.items()}
    y = F.conv2d(x, t["conv1"][0], t["conv1"][1], padding=1, groups=2)
    s = 1.0 / t["bn1"][2][0]
    y = (y - (t["bn1"][0] * s)[None, :, None, None]) / torch.sqrt(t["bn1"][1] * s + 1e-5)[None, :, None, None]
    y = y * t["sc1"][0][None, :, None, None] + t["sc1"][1][None, :, None, None]
    sl, bi, mu, var = t["psp"]
    y = (y - mu) / torch.sqrt(var + 1e-5) * sl + bi
    y = y.relu()
    y = F.conv_transpose2d(y, t["up"][0], t["up"][1], stride=2, groups=2)
    return F.linear(y.reshape(1, -1), t["fc"][0], t["fc"][1])


@pytest.mark.parametrize("v1,legacy", [(False, False), (False, True), (True, False), (True, True)])
def test_round_trip_onto_a_net(net_path, tmp_path, v1, legacy):
    if v1:  # V1 has no enum for Scale/BN: those layers keep their V2 form in a V2 file only
        b = {k: v for k, v in blobs().items() if k in ("conv1", "up", "fc")}
    else:
        b = blobs()
    path = tmp_path / "w.caffemodel"
    types = dict(TYPES)
    data = write_caffemodel([(n, types[n], v) for n, v in b.items()], path, v1=v1, legacy_4d=legacy)
    assert path.read_bytes() == data
    model = read_caffemodel(path)
    assert model.v1 is v1
    assert [l.name for l in model.layers] == list(b)
    assert [l.type for l in model.layers] == [types[n] for n in b]
    if legacy:
        assert model.layers[0].blobs[1].shape == (1, 1, 1, 6)     # legacy 4-D bias
    net = pacnet.build(str(net_path))
    mapped = map_blobs(model, net)
    assert mapped.loaded == list(b)
    assert mapped.unexpected == []
    for name, arrays in b.items():
        for arr, attr in zip(arrays, pacnet.registry.get(types[name]).blobs):
            got = mapped.tensors[f"{name}.{attr}"]
            assert tuple(got.shape) == tuple(net.state_dict()[f"{name}.{attr}"].shape)
            np.testing.assert_array_equal(got.numpy().ravel(), arr.ravel())
    expected_missing = {f"{n}.{a}" for n in TYPES if n not in b
                        for a in pacnet.registry.get(TYPES[n]).blobs}
    assert set(mapped.missing) == expected_missing


def test_loaded_net_computes_what_caffe_would(net_path, tmp_path):
    b = blobs()
    (tmp_path / "w.caffemodel").write_bytes(model_bytes(b))
    net = pacnet.build(str(net_path))
    out = tmp_path / "w.safetensors"
    mapped = convert_caffemodel(tmp_path / "w.caffemodel", net, out)
    assert mapped.missing == [] and mapped.unexpected == []
    from safetensors.torch import load_file

    state = load_file(str(out))
    assert set(state) == set(net.state_dict())
    net.load_state_dict(state)
    net.eval()
    x = torch.randn(1, 4, 6, 6)
    torch.testing.assert_close(net(x)["fc"], reference_forward(b, x), rtol=1e-4, atol=1e-4)


def test_exact_schema_and_unpacked_floats_read_back():
    w = r(2, 3)
    fast = write_caffemodel([("fc", "InnerProduct", [w])])
    exact = write_caffemodel([("fc", "InnerProduct", [w])], exact=True)
    assert fast == exact
    # an unpacked float field (legal protobuf, never written by Caffe) decodes too
    S = schema()
    blob = S["BlobProto"]()
    blob.shape.dim.extend([2, 3])
    unpacked = b"".join(bytes([5 << 3 | 5]) + struct.pack("<f", v) for v in w.ravel())
    layer = S["LayerParameter"](name="fc", type="InnerProduct")
    layer_bytes = layer.SerializeToString()
    blob_bytes = blob.SerializeToString() + unpacked
    layer_bytes += bytes([7 << 3 | 2, len(blob_bytes)]) + blob_bytes
    data = bytes([0xA2, 0x06, len(layer_bytes)]) + layer_bytes  # field 100, wire type 2
    (got,) = parse_caffemodel(data).layers[0].blobs
    np.testing.assert_array_equal(got, w)


def test_double_data_and_unknown_fork_fields_are_tolerated():
    S = schema()
    net = S["NetParameter"](name="n")
    layer = net.layer.add(name="bias", type="Bias")
    blob = layer.blobs.add()
    blob.shape.dim.append(3)
    blob.double_data.extend([1.0, 2.0, 3.0])
    data = net.SerializeToString()
    # DeepLab's interp_param (143) / PSP's bn_param (152) inside the layer, an unknown
    # top-level field, and a varint where BVLC has a message: all skipped.
    extra = bytes([0xFA, 0x08, 2, 8, 1])            # field 143 (len 2): {1: 1}
    extra += bytes([0xC0, 0x09, 7])                 # field 152 as a varint
    layer_bytes = layer.SerializeToString() + extra
    data = bytes([0xA2, 0x06, len(layer_bytes)]) + layer_bytes + bytes([0xB8, 0x01, 5])  # field 23
    model = parse_caffemodel(data)
    (arr,) = model.layers[0].blobs
    assert arr.dtype == np.float64 and arr.tolist() == [1.0, 2.0, 3.0]


@pytest.mark.parametrize("cut", [1, 10, 50, 200])
def test_truncated_file_is_a_load_error_with_offset(tmp_path, cut):
    data = model_bytes(blobs())
    p = tmp_path / "cut.caffemodel"
    p.write_bytes(data[:-cut])
    with pytest.raises(LoadError) as e:
        read_caffemodel(p)
    msg = str(e.value)
    assert str(p) in msg
    assert "byte offset" in msg or "file has" in msg


def test_garbage_and_text_files(tmp_path):
    p = tmp_path / "g.caffemodel"
    p.write_bytes(b"\xff" * 16)
    with pytest.raises(LoadError, match=r"not a valid caffemodel: .* \(byte offset 0 of 16\)"):
        read_caffemodel(p)
    p.write_text('name: "deploy"\nlayer { }')
    with pytest.raises(LoadError, match="looks like a prototxt"):
        read_caffemodel(p)
    with pytest.raises(LoadError, match="no such file"):
        read_caffemodel(tmp_path / "none.caffemodel")


def test_blob_shape_and_data_disagree():
    S = schema()
    net = S["NetParameter"]()
    blob = net.layer.add(name="fc", type="InnerProduct").blobs.add()
    blob.shape.dim.extend([2, 3])
    blob.data.extend([1.0] * 5)
    with pytest.raises(LoadError, match=r"layer 0 'fc' blob 0: blob shape \[2, 3\] needs 6 values, the file has 5"):
        parse_caffemodel(net.SerializeToString())


def test_shape_mismatch_names_layer_blob_and_shapes(net_path, tmp_path):
    b = blobs()
    b["conv1"][0] = r(6, 4, 3, 3)          # dense weights for a group-2 conv
    net = pacnet.build(str(net_path))
    model = parse_caffemodel(model_bytes(b), file="w.caffemodel")
    with pytest.raises(ShapeError) as e:
        map_blobs(model, net)
    msg = str(e.value)
    assert "layer 'conv1' (Convolution)" in msg
    assert "blob 0 (weight) has shape [6, 4, 3, 3] in the caffemodel but [6, 2, 3, 3] in the net" in msg
    assert msg.startswith("w.caffemodel:")
    # and no file is written
    out = tmp_path / "w.safetensors"
    (tmp_path / "w.caffemodel").write_bytes(model_bytes(b))
    with pytest.raises(ShapeError):
        convert_caffemodel(tmp_path / "w.caffemodel", net, out)
    assert not out.exists() and os.listdir(tmp_path) == sorted(os.listdir(tmp_path)) and \
        [f for f in os.listdir(tmp_path) if f.startswith(".tmp")] == []


def test_too_many_blobs_and_missing_bias(tmp_path):
    net = pacnet.build({"inputs": {"data": [1, 2, 4, 4]}, "layers": [
        {"name": "c", "type": "Convolution", "bottom": "data", "top": "c", "num_output": 3,
         "kernel_size": 1, "bias_term": False}]})
    model = parse_caffemodel(write_caffemodel([("c", "Convolution", [r(3, 2, 1, 1), r(3)])]))
    # Blobs are numbered as the layer has them (no bias here): a bias blob is one too many.
    with pytest.raises(ShapeError, match="2 blobs for this layer, Convolution has 1 \\(weight\\)"):
        map_blobs(model, net)
    model = parse_caffemodel(write_caffemodel([("c", "Convolution", [r(3, 2, 1, 1), r(3), r(3)])]))
    with pytest.raises(ShapeError, match="3 blobs for this layer, Convolution has 1"):
        map_blobs(model, net)


def test_scale_with_a_second_bottom_takes_its_bias_as_blob_0():
    net = pacnet.build({"inputs": {"x": [1, 3, 2, 2], "s": [3]}, "layers": [
        {"name": "sc", "type": "Scale", "bottom": ["x", "s"], "top": "y", "bias_term": True}]})
    bias = r(3)
    mapped = map_blobs(parse_caffemodel(write_caffemodel([("sc", "Scale", [bias])])), net)
    assert mapped.loaded == ["sc"]
    torch.testing.assert_close(mapped.tensors["sc.bias"], torch.from_numpy(bias).float())


def test_missing_and_unexpected_layers_are_reported(net_path):
    b = {"conv1": blobs()["conv1"], "conv_gone": [r(2, 2, 1, 1)]}
    model = parse_caffemodel(write_caffemodel([("conv1", "Convolution", b["conv1"]),
                                               ("conv_gone", "Convolution", b["conv_gone"])]))
    mapped = map_blobs(model, pacnet.build(str(net_path)))
    assert mapped.unexpected == ["conv_gone"]
    assert mapped.loaded == ["conv1"]
    assert "fc.weight" in mapped.missing and "bn1.scale_factor" in mapped.missing
    assert "conv1.weight" not in mapped.missing


SHARED = {"inputs": {"a": [1, 2, 5, 5], "b": [1, 2, 5, 5]}, "layers": [
    {"name": "ca", "type": "Convolution", "bottom": "a", "top": "ya", "num_output": 3, "kernel_size": 3,
     "param": [{"name": "w"}, {"name": "bias"}]},
    {"name": "cb", "type": "Convolution", "bottom": "b", "top": "yb", "num_output": 3, "kernel_size": 3,
     "param": [{"name": "w"}, {"name": "bias"}]},
]}


def test_shared_params_load_once_and_must_agree(tmp_path):
    net = pacnet.build(SHARED)
    w, bias = r(3, 2, 3, 3), r(3)
    # Caffe writes the shared blobs under both layers
    model = parse_caffemodel(write_caffemodel([("ca", "Convolution", [w, bias]), ("cb", "Convolution", [w, bias])],
                                              param_names={"ca": ["w", "bias"], "cb": ["w", "bias"]}))
    assert model.layers[0].param_names == ("w", "bias")
    mapped = map_blobs(model, net)
    assert set(mapped.tensors) == {"ca.weight", "ca.bias", "cb.weight", "cb.bias"}
    out = tmp_path / "s.safetensors"
    write_safetensors(str(out), mapped.tensors)
    from safetensors.torch import load_file

    net.load_state_dict(load_file(str(out)))
    assert net.ca.weight is net.cb.weight
    np.testing.assert_array_equal(net.cb.weight.detach().numpy(), w)
    # only the owner in the file: the sharer's keys are filled through the shared tensor
    model = parse_caffemodel(write_caffemodel([("ca", "Convolution", [w, bias])]))
    mapped = map_blobs(model, net)
    assert mapped.missing == [] and set(mapped.tensors) == {"ca.weight", "ca.bias", "cb.weight", "cb.bias"}
    # different values for one shared tensor: refused
    model = parse_caffemodel(write_caffemodel([("ca", "Convolution", [w, bias]),
                                               ("cb", "Convolution", [w + 1, bias])]))
    with pytest.raises(LoadError, match="shares its tensor with layer 'ca' blob 0"):
        map_blobs(model, net)


def test_v1_enum_39_is_deconvolution_when_it_has_blobs():
    data = write_caffemodel([("up", 39, [r(2, 2, 4, 4)]), ("data", 39, [])], v1=True)
    model = parse_caffemodel(data)
    assert [l.type for l in model.layers] == ["Deconvolution", "ImageSegData"]


def test_repeated_layer_names_follow_the_import_renaming(tmp_path):
    p = tmp_path / "dup.prototxt"
    p.write_text('input: "data"\ninput_dim: 1 input_dim: 2 input_dim: 3 input_dim: 3\n'
                 'layer { name: "c" type: "Convolution" bottom: "data" top: "a"\n'
                 '        convolution_param { num_output: 2 kernel_size: 1 } }\n'
                 'layer { name: "c" type: "Convolution" bottom: "a" top: "b"\n'
                 '        convolution_param { num_output: 2 kernel_size: 1 } }\n')
    with pytest.warns(UserWarning, match="duplicate layer name"):
        net = pacnet.build(str(p))
    w1, w2 = r(2, 2, 1, 1), r(2, 2, 1, 1)
    model = parse_caffemodel(write_caffemodel([("c", "Convolution", [w1, r(2)]),
                                               ("c", "Convolution", [w2, r(2)])]))
    mapped = map_blobs(model, net)
    np.testing.assert_array_equal(mapped.tensors["c.weight"].numpy(), w1)
    np.testing.assert_array_equal(mapped.tensors["c_2.weight"].numpy(), w2)
    assert mapped.missing == [] and mapped.unexpected == []


# ----------------------------------------------------------------------------- CLI

from pacnet.cli.main import main  # noqa: E402


def test_cli_convert_weights(net_path, tmp_path, capsys):
    from safetensors.torch import load_file

    b = blobs()
    w = tmp_path / "tiny.caffemodel"
    w.write_bytes(model_bytes(b))
    yaml_out, st_out = tmp_path / "tiny.yaml", tmp_path / "out.safetensors"
    assert main(["convert", str(net_path), "--weights", str(w), "-o", str(st_out), "-o", str(yaml_out)]) == 0
    err = capsys.readouterr().err
    assert f"wrote {st_out} (" in err and "from 6 layers" in err and "warning" not in err
    state = load_file(str(st_out))
    np.testing.assert_array_equal(state["up.weight"].numpy(), b["up"][0])
    np.testing.assert_array_equal(state["psp.var"].numpy(), b["psp"][3])
    # the YAML and the weights go together
    net = pacnet.build(str(yaml_out))
    net.load_state_dict(state)
    net.eval()
    x = torch.randn(1, 4, 6, 6)
    torch.testing.assert_close(net(x)["fc"], reference_forward(b, x), rtol=1e-4, atol=1e-4)
    # default output next to the caffemodel; stdout stays clean
    assert main(["convert", str(net_path), "--weights", str(w)]) == 0
    out = capsys.readouterr()
    assert out.out == "" and (tmp_path / "tiny.safetensors").exists()


def test_cli_convert_weights_partial_and_strict(net_path, tmp_path, capsys):
    w = tmp_path / "part.caffemodel"
    w.write_bytes(write_caffemodel([("conv1", "Convolution", blobs()["conv1"]),
                                    ("old_fc", "InnerProduct", [r(3, 3)])]))
    st = tmp_path / "part.safetensors"
    assert main(["convert", str(net_path), "--weights", str(w), "--strict", "-o", str(st)]) == 2
    err = capsys.readouterr().err
    assert "error: net blobs without weights (" in err and "caffemodel layers not in the net (1): old_fc" in err
    assert not st.exists()
    assert main(["convert", str(net_path), "--weights", str(w), "-o", str(st)]) == 0
    err = capsys.readouterr().err
    assert "warning: net blobs without weights (keep their fillers) (" in err
    assert "warning: caffemodel layers not in the net (skipped) (1): old_fc" in err
    assert st.exists()


def test_cli_convert_weights_errors_leave_no_file(net_path, tmp_path, capsys):
    b = blobs()
    b["fc"][0] = r(5, 7)
    w = tmp_path / "bad.caffemodel"
    w.write_bytes(model_bytes(b))
    st, yml = tmp_path / "bad.safetensors", tmp_path / "bad.yaml"
    assert main(["convert", str(net_path), "--weights", str(w), "-o", str(st), "-o", str(yml)]) == 2
    err = capsys.readouterr().err
    assert "layer 'fc' (InnerProduct): blob 0 (weight) has shape [5, 7]" in err
    assert not st.exists() and not yml.exists()
    w.write_bytes(model_bytes(blobs())[:-100])
    assert main(["convert", str(net_path), "--weights", str(w), "-o", str(st)]) == 2
    assert "not a valid caffemodel: field 100 claims" in capsys.readouterr().err
    assert not st.exists()
    other = tmp_path / "other.caffemodel"
    other.write_bytes(write_caffemodel([("nothing", "Convolution", [r(1, 1, 1, 1)])]))
    assert main(["convert", str(net_path), "--weights", str(other), "-o", str(st)]) == 2
    assert "matches a layer of" in capsys.readouterr().err
    assert main(["convert", str(net_path), "--weights", str(net_path)]) == 2
    assert "looks like a prototxt" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["bad.caffemodel", "other.caffemodel", "tiny.prototxt"]


def test_corrupt_names_and_values_are_located_to_the_byte_and_nothing_is_written(net_path, tmp_path, capsys):
    w, st, yml = tmp_path / "bad.caffemodel", tmp_path / "bad.safetensors", tmp_path / "bad.yaml"
    good = model_bytes(blobs())
    at = good.find(b"relu1")
    w.write_bytes(good[:at] + b"\xff\xfe" + good[at + 2:])  # a layer name that is not UTF-8
    assert main(["convert", str(net_path), "--weights", str(w), "-o", str(st), "-o", str(yml)]) == 2
    err = capsys.readouterr().err
    assert f"the name of layer 1 is not UTF-8 text (b'\\xff\\xfelu1') (byte offset {at} of {len(good)})" in err
    assert "Traceback" not in err and not st.exists() and not yml.exists()
    b = blobs()
    b["sc1"][1][3] = np.inf
    data = model_bytes(b)
    w.write_bytes(data)
    assert main(["convert", str(net_path), "--weights", str(w), "-o", str(st), "-o", str(yml)]) == 2
    err = capsys.readouterr().err
    expected = data.find(b["sc1"][1].tobytes()) + 3 * 4
    assert (f"layer 4 'sc1' blob 1: 1 value(s) are not finite (value 3 of 6 is inf) "
            f"(byte offset {expected} of {len(data)})") in err
    assert not st.exists() and not yml.exists() and not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


def test_corrupt_nested_message_is_located():
    good = write_caffemodel([("a", "ReLU", []), ("conv", "Convolution", [r(2, 1, 1, 1)])])
    layer = bytes([0x0A, 1]) + b"c" + bytes([0x3A, 50]) + bytes(10)  # blob claims 50, has 10
    data = good + bytes([0xA2, 0x06, len(layer)]) + layer
    with pytest.raises(LoadError) as e:
        parse_caffemodel(data, file="x.caffemodel")
    msg = str(e.value)
    assert "layer 2: field 7 claims 50 bytes but only 10 remain" in msg
    assert f"(byte offset {len(good) + 3 + 3} of {len(data)})" in msg
