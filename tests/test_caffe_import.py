"""Caffe prototxt -> pacnet net dict: flattening, upgrades, data layers, marks, YAML, real graphs."""

import collections
import json
import os
import re
import textwrap
import warnings

import pytest
import yaml

from pacnet.caffe_import import (
    convert_text, convert_to_yaml_text, load_prototxt, unknown_types,
)
from pacnet.errors import LoadError, PacnetError

GRAPHS = "/work/shared/graphs"
if not os.path.isdir(GRAPHS):
    GRAPHS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "graphs")
needs_graphs = pytest.mark.skipif(not os.path.isdir(GRAPHS), reason="shared graphs not available")


def conv(text, vars=None, file="net.prototxt"):
    return convert_text(textwrap.dedent(text), vars, file=file)


def layer(net, name):
    (found,) = [l for l in net["layers"] if l["name"] == name]
    return found


# ----------------------------------------------------------------------------- layer fields

def test_params_are_lifted_flat_with_caffe_names():
    net, _ = conv('''
        name: "n"
        input: "data" input_dim: 1 input_dim: 3 input_dim: 8 input_dim: 8
        layer {
          name: "c" type: "Convolution" bottom: "data" top: "c"
          param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 name: "cb" }
          convolution_param {
            num_output: 21 kernel_size: 3 pad: 1 pad: 2 bias_term: false
            weight_filler { type: "gaussian" std: 0.01 }
          }
        }
        layer { name: "p" type: "Pooling" bottom: "c" top: "p"
                pooling_param { pool: AVE kernel_size: 2 stride: 2 } }
        layer { name: "e" type: "Eltwise" bottom: "p" bottom: "p" top: "e"
                eltwise_param { operation: SUM coeff: 0.5 coeff: 2 } }
        layer { name: "e1" type: "Eltwise" bottom: "e" top: "e1" eltwise_param { coeff: 1 } }
    ''')
    assert net["name"] == "n" and net["pacnet_version"] == 1
    assert net["inputs"] == {"data": [1, 3, 8, 8]}
    c = layer(net, "c")
    assert list(c) == ["name", "type", "bottom", "top", "param", "num_output", "kernel_size",
                       "pad", "bias_term", "weight_filler"]
    assert c["param"] == [{"lr_mult": 1, "decay_mult": 1},
                          {"name": "cb", "lr_mult": 2, "decay_mult": 0}]
    assert c["kernel_size"] == 3 and c["pad"] == [1, 2] and c["bias_term"] is False
    assert c["weight_filler"] == {"type": "gaussian", "std": 0.01}
    assert layer(net, "p")["pool"] == "AVE"
    e = layer(net, "e")
    assert e["bottom"] == ["p", "p"] and e["operation"] == "SUM" and e["coeff"] == [0.5, 2]
    assert layer(net, "e1")["coeff"] == [1]          # a repeated proto field stays a list


def test_a_param_block_of_another_type_is_ignored_with_a_warning_never_applied(tmp_path, capsys):
    text = (
        'name: "t"\ninput: "data" input: "label"\n'
        'input_dim: 1 input_dim: 3 input_dim: 28 input_dim: 28 input_dim: 1 input_dim: 1\n'
        'input_dim: 28 input_dim: 28\n'
        'layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"\n'
        '  convolution_param { num_output: 4 kernel_size: 3 pad: 1 }\n'
        '  pooling_param { stride: 2 pad: 0 kernel_size: 5 } }\n'
        'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "conv1" bottom: "label"\n'
        '  loss_param { ignore_label: 255 } softmax_param { axis: 1 } }\n')
    with pytest.warns(UserWarning, match=r"t.prototxt:7:3: layer 'conv1' \(Convolution\): "
                                         r"pooling_param ignored: it belongs to another"):
        net, _ = convert_text(text, file="t.prototxt")
    assert layer(net, "conv1") == {"name": "conv1", "type": "Convolution", "bottom": "data",
                                   "top": "conv1", "num_output": 4, "kernel_size": 3, "pad": 1}
    assert layer(net, "loss")["ignore_label"] == 255 and layer(net, "loss")["axis"] == 1
    src = tmp_path / "t.prototxt"
    src.write_text(text)
    assert pacnet.build(str(src), device="meta").shapes["conv1"] == (1, 4, 28, 28)  # Caffe's
    out = tmp_path / "t.yaml"
    assert main(["convert", str(src), "-o", str(out)]) == 0
    assert "pooling_param ignored" in capsys.readouterr().err
    assert "stride" not in out.read_text()
    # a *_param no layer type has is an error, as Caffe refuses to parse it
    src.write_text(text.replace("pooling_param", "poolng_param"))
    with pytest.raises(LoadError, match="unknown LayerParameter field 'poolng_param'") as err:
        pacnet.build(str(src))
    assert err.value.location.line == 7 and "did you mean 'pooling_param'" in str(err.value)


def test_rules_loss_weight_propagate_down_and_shapes():
    net, _ = conv('''
        layer { name: "in" type: "Input" top: "data" top: "label"
                input_param { shape { dim: 2 dim: 3 dim: 5 dim: 5 } shape { dim: 2 dim: 1 dim: 5 dim: 5 } } }
        layer { name: "one" type: "Input" top: "x" input_param { shape { dim: 1 } } }
        layer { name: "r" type: "Reshape" bottom: "x" top: "y" reshape_param { shape { dim: 0 dim: -1 } } }
        layer { name: "l" type: "SoftmaxWithLoss" bottom: "data" bottom: "label" top: "loss"
                loss_weight: 0.5 propagate_down: true propagate_down: 0
                include { phase: TRAIN stage: "a" stage: "b" min_level: 1 }
                loss_param { ignore_label: 255 normalize: false } }
        layer { name: "x2" type: "Silence" bottom: "loss"
                exclude { phase: TEST } exclude { not_stage: "deploy" max_level: 3 } }
    ''')
    assert layer(net, "in")["shape"] == [[2, 3, 5, 5], [2, 1, 5, 5]]
    assert layer(net, "one")["shape"] == [[1]]
    assert layer(net, "r")["shape"] == [0, -1]
    loss = layer(net, "l")
    assert loss["loss_weight"] == 0.5
    assert loss["propagate_down"] == [True, False]
    assert loss["include"] == {"phase": "train", "stage": ["a", "b"], "min_level": 1}
    assert loss["ignore_label"] == 255 and loss["normalize"] is False
    assert layer(net, "x2")["exclude"] == [{"phase": "test"}, {"not_stage": ["deploy"], "max_level": 3}]
    assert list(loss)[:7] == ["name", "type", "bottom", "top", "include", "loss_weight", "propagate_down"]


def test_enum_numbers_and_bool_numbers():
    net, _ = conv('''
        layer { name: "p" type: "Pooling" bottom: "d" top: "p" pooling_param { pool: 1 global_pooling: 1 } }
        layer { name: "s" type: "Scale" bottom: "p" top: "s" include { phase: 0 }
                param { share_mode: 1 } scale_param { bias_term: 0 } }
    ''')
    assert layer(net, "p")["pool"] == "AVE" and layer(net, "p")["global_pooling"] is True
    s = layer(net, "s")
    assert s["include"] == {"phase": "train"} and s["bias_term"] is False
    assert s["param"] == [{"share_mode": "PERMISSIVE"}]


def test_param_messages_setting_one_field_differently_is_an_error():
    text = '''
        layer { name: "d" type: "ImageSegData" top: "data" top: "label"
                transform_param { crop_size: 321 mirror: true }
                image_data_param { batch_size: 2 crop_size: 321 mirror: false } }
    '''
    with pytest.raises(LoadError) as e:
        conv(text)
    msg = str(e.value)
    assert "image_data_param.mirror = False conflicts with transform_param.mirror = True (line 3)" in msg
    assert e.value.location.line == 4 and e.value.layer == "d"
    # the same value twice is fine (crop_size above agrees)
    net, _ = conv(text.replace("mirror: false", "mirror: true"))
    assert net["data"][0]["params"]["crop_size"] == 321


@pytest.mark.parametrize("text,fragment,line", [
    ('layer { name: "a" type: "ReLU" bottm: "x" }', "unknown LayerParameter field 'bottm'", 1),
    ('layer { name: "a" type: "ReLU" relu_param: 1 }', "'relu_param' must be a message", 1),
    ('layer {\n name: "a"\n}', "layer has no type", 1),
    ('layer { type: "ReLU" }', "layer has no name", 1),
    ('layer { name: "a" type: "ReLU" phase: TRAIN }', "layer-level 'phase' is not supported", 1),
    ('layer { name: "a" type: "ReLU"\n include { phase: TRAIN } exclude { phase: TEST } }',
     "include rules or exclude rules, not both", 2),
    ('layer { name: "a" type: "ReLU"\n include { phase: VAL } }', "phase must be TRAIN or TEST", 2),
    ('layer { name: "a" type: "ReLU"\n include { stages: "x" } }', "NetStateRule has no field 'stages'", 2),
    ('layer { name: "a" type: "ReLU"\n param { lr: 1 } }', "ParamSpec has no field 'lr'", 2),
    ('layer { name: "a" type: "ReLU"\n blobs_lr: 1 }', "'blobs_lr' is a legacy V1 field", 2),
    ('layer { name: "a" type: "Convolution"\n blobs { data: 1 } }', "weights (blobs) inside a prototxt", 2),
    ('layer { name: "a" type: "ReLU" top: x }', "top must be a quoted blob name", 1),
    ('layer { name: "a" type: "Python" bottom: "x" top: "y"\n'
     ' python_param { module: "m" layer: "L" } }', "Caffe Python layer (m.L) cannot be imported", 1),
    ('layer { name: "a" type: "Eltwise" eltwise_param {\n name: "x" } }',
     "eltwise_param.name cannot be written flat", 2),
    ('base_lr: 0.1\nlr_policy: "fixed"\nnet: "x.prototxt"', "this is a solver prototxt", 1),
    ('layer { name: "a" type: "ReLU" }\nlayers { name: "b" type: RELU }', "mixes V2 'layer' and legacy V1", 2),
    ('nam: "x"', "unknown NetParameter field 'nam'", 1),
    ('input: "data"\ninput_dim: 1 input_dim: 3', "1 input(s) need 4 input_dim values, got 2", 2),
    ('input: "data"', "net-level 'input' without input_shape or input_dim", 1),
    ('input_dim: 1', "'input_dim' without 'input'", 1),
    ('layer { name: "d" type: "ImageSegData" top: "a" top: "b" top: "c" top: "d" }',
     "ImageSegData has at most 3 tops", 1),
])
def test_conversion_errors_are_located(text, fragment, line):
    with pytest.raises(LoadError) as e:
        convert_text(text, file="x.prototxt")
    assert fragment in str(e.value)
    assert e.value.location.file == "x.prototxt" and e.value.location.line == line, str(e.value)


# ----------------------------------------------------------------------------- upgrades

V1_NET = '''
name: "legacy"
layers {
  name: "data" type: IMAGE_SEG_DATA top: "data" top: "label"
  image_data_param { source: "${LIST}" batch_size: 30 label_type: PIXEL }
  transform_param { mean_value: 104.008 mean_value: 116.669 mean_value: 122.675 crop_size: 321 mirror: true }
  include: { phase: TRAIN }
}
layers {
  bottom: "data" top: "fc6" name: "fc6" type: CONVOLUTION
  blobs_lr: 1 blobs_lr: 2 weight_decay: 1 weight_decay: 0
  param: "fc6_w" param: "fc6_b"
  strict_dim: false
  convolution_param { num_output: 1024 pad: 12 hole: 12 kernel_size: 3 }
}
layers { bottom: "fc6" top: "fc6" name: "relu6" type: RELU }
layers { bottom: "fc6" top: "p" name: "p" type: POOLING pooling_param { pool: AVE kernel_size: 3 stride: 8 pad: 1 } }
layers { bottom: "p" top: "fc8" name: "fc8" type: CONVOLUTION blobs_lr: 10
         convolution_param { num_output: ${NUM_LABELS} kernel_size: 1 hole_h: 2 hole_w: 3 } }
layers { bottom: "label" top: "ls" name: "ls" type: INTERP interp_param { shrink_factor: 8 } }
layers { bottom: "fc8" bottom: "ls" name: "loss" type: SOFTMAX_LOSS softmaxloss_param { ignore_label: 255 }
         include: { phase: TRAIN } }
layers { bottom: "fc8" bottom: "ls" top: "acc" name: "acc" type: SEG_ACCURACY
         seg_accuracy_param { ignore_label: 255 } }
layers { bottom: "fc8" name: "mat" type: MAT_WRITE mat_write_param { prefix: "out/" } }
'''


def test_v1_upgrade():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        net, marks = conv(V1_NET, {"LIST": "l.txt", "NUM_LABELS": 21}, file="v1.prototxt")
    assert [l["type"] for l in net["layers"]] == [
        "Convolution", "ReLU", "Pooling", "Convolution", "Interp", "SoftmaxWithLoss", "SegAccuracy"]
    fc6 = layer(net, "fc6")
    assert fc6["param"] == [{"name": "fc6_w", "lr_mult": 1, "decay_mult": 1},
                            {"name": "fc6_b", "lr_mult": 2, "decay_mult": 0}]
    assert fc6["dilation"] == 12 and "hole" not in fc6 and "strict_dim" not in fc6
    fc8 = layer(net, "fc8")
    assert fc8["param"] == [{"lr_mult": 10}] and fc8["dilation"] == [2, 3]
    assert fc8["num_output"] == 21
    assert layer(net, "loss")["ignore_label"] == 255
    assert layer(net, "acc")["ignore_label"] == [255]
    assert net["inputs"] == {"data": [30, 3, 321, 321], "label": [30, 1, 321, 321]}
    (d,) = net["data"]
    assert d["type"] == "ImageSegData" and d["tops"] == ["data", "label"]
    assert d["include"] == {"phase": "train"}
    assert d["params"]["mean_value"] == [104.008, 116.669, 122.675] and d["params"]["source"] == "l.txt"
    assert d["params"]["label_type"] == "PIXEL"
    # the MatWrite sink is dropped with a warning naming it and its line
    (w,) = [c for c in caught if "MatWrite" in str(c.message)]
    lines = textwrap.dedent(V1_NET).splitlines()
    mat_line = 1 + next(i for i, l in enumerate(lines) if 'name: "mat"' in l)
    assert w.category is UserWarning and "'mat'" in str(w.message)
    assert f"v1.prototxt:{mat_line}:1:" in str(w.message)
    fc6_line = 1 + next(i for i, l in enumerate(lines) if 'name: "fc6"' in l)
    assert marks[("layers", 0)].line == fc6_line - 1
    assert marks[("layers", 0, "dilation")].line == fc6_line + 4
    assert marks[("layers", 0, "param", 1)].line == fc6_line + 1


def test_v1_unknown_enum():
    with pytest.raises(LoadError, match="unknown V1 layer type CONVOLUTON") as e:
        convert_text('layers { name: "a" type: CONVOLUTON }')
    assert "CONVOLUTION" in str(e.value)


def test_hole_and_dilation_together_is_an_error():
    with pytest.raises(LoadError, match="hole or dilation"):
        convert_text('layers { name: "a" type: CONVOLUTION convolution_param { hole: 2 dilation: 2 } }')


def test_batchnorm_with_three_params_is_frozen():
    net, _ = conv('''
        layer { name: "bn" type: "BatchNorm" bottom: "x" top: "x"
                param { lr_mult: 1 name: "m" } param { lr_mult: 1 } param { lr_mult: 1 decay_mult: 1 }
                batch_norm_param { use_global_stats: true } }
        layer { name: "bn2" type: "BatchNorm" bottom: "x" top: "x" param { lr_mult: 1 } }
    ''')
    assert layer(net, "bn")["param"] == [{"name": "m", "lr_mult": 0, "decay_mult": 0},
                                         {"lr_mult": 0, "decay_mult": 0},
                                         {"lr_mult": 0, "decay_mult": 0}]
    assert layer(net, "bn2")["param"] == [{"lr_mult": 1}]


def test_net_inputs_from_input_shape():
    net, marks = conv('''
        input: "a"
        input_shape { dim: 1 dim: 2 }
        input: "b"
        input_shape { dim: 3 }
    ''')
    assert net["inputs"] == {"a": [1, 2], "b": [3]}
    assert marks[("inputs", "b")].line == 4
    with pytest.raises(LoadError, match="2 input"):
        conv('input: "a" input: "b" input_shape { dim: 1 }')


# ----------------------------------------------------------------------------- data layers

def test_data_layers_become_inputs():
    net, marks = conv('''
        layer { name: "data" type: "Python" top: "data" top: "label"
                python_param { module: "voc_layers" layer: "SBDDSegDataLayer"
                               param_str: "{'split': 'train', 'seed': 1337}" } }
        layer { name: "r" type: "ReLU" bottom: "data" top: "r" }
    ''')
    assert net["inputs"] == {"data": [1, 3, "H", "W"], "label": [1, 1, "H", "W"]}
    assert net["dims"] == {"H": 500, "W": 500}
    assert net["data"] == [{"name": "data", "type": "Python", "tops": ["data", "label"],
                            "params": {"module": "voc_layers", "layer": "SBDDSegDataLayer",
                                       "param_str": "{'split': 'train', 'seed': 1337}"}}]
    assert [l["name"] for l in net["layers"]] == ["r"]
    # (line 1 of the dedented text is empty)
    assert marks[("inputs", "label")].line == 2 and marks[("layers", 0)].line == 5
    assert marks[("data", 0, "params", "module")].line == 3 and marks[("data", 0)].line == 2


@pytest.mark.parametrize("body,expected", [
    ('type: "ImageData" top: "d" top: "l" image_data_param { batch_size: 4 new_height: 10 new_width: 12 }',
     {"d": [4, 3, 10, 12], "l": [4]}),
    ('type: "ImageData" top: "d" image_data_param { is_color: false } transform_param { crop_size: 7 }',
     {"d": [1, 1, 7, 7]}),
    ('type: "Data" top: "d" top: "l" data_param { batch_size: 64 } transform_param { crop_size: 227 }',
     {"d": [64, 3, 227, 227], "l": [64]}),
    ('type: "MemoryData" top: "d" top: "l" memory_data_param { batch_size: 2 channels: 1 height: 28 width: 28 }',
     {"d": [2, 1, 28, 28], "l": [2]}),
    ('type: "ImageSegData" top: "d" top: "l" top: "dim" transform_param { crop_height: 9 crop_width: 11 }',
     {"d": [1, 3, 9, 11], "l": [1, 1, 9, 11], "dim": [1, 1, 1, 2]}),
    ('type: "TwoImageData" top: "d" top: "l" two_image_data_param { second_is_color: true }'
     ' image_data_param { batch_size: 2 } transform_param { crop_size: 5 }',
     {"d": [2, 3, 5, 5], "l": [2, 3, 5, 5]}),
])
def test_data_layer_shapes(body, expected):
    net, _ = conv(f'layer {{ name: "x" {body} }}')
    assert net["inputs"] == expected
    assert net["layers"] == []


def test_train_and_test_data_layers_merge_into_symbolic_dims():
    net, _ = conv('''
        layer { name: "d" type: "Data" top: "data" top: "label" include { phase: TRAIN }
                data_param { batch_size: 64 } transform_param { crop_size: 28 } }
        layer { name: "d" type: "Data" top: "data" top: "label" include { phase: TEST }
                data_param { batch_size: 100 } transform_param { crop_size: 28 } }
    ''')
    assert net["inputs"] == {"data": ["N", 3, 28, 28], "label": ["N"]}
    assert net["dims"] == {"N": 64}
    assert [d["include"] for d in net["data"]] == [{"phase": "train"}, {"phase": "test"}]


def test_dummydata_and_input_stay_layers():
    net, _ = conv('''
        layer { type: "DummyData" name: "xy" top: "xy"
                dummy_data_param { shape { dim: 1 dim: 2 dim: 4 dim: 4 } data_filler { type: "xy" } } }
    ''')
    assert net["layers"] == [{"name": "xy", "type": "DummyData", "top": "xy",
                              "shape": [[1, 2, 4, 4]], "data_filler": [{"type": "xy"}]}]
    assert "inputs" not in net


# ----------------------------------------------------------------------------- templates

def test_unset_variables_listed_together(tmp_path):
    p = tmp_path / "t.prototxt"
    p.write_text('name: "${NET_ID}"\nlayer { name: "fc_${EXP}" type: "Convolution"\n'
                 '  convolution_param { num_output: ${NUM_LABELS} } }\n')
    with pytest.raises(LoadError) as e:
        load_prototxt(p, {"EXP": "voc12"})
    assert "unset template variables: NET_ID (line 1), NUM_LABELS (line 3)" in str(e.value)
    net, _ = load_prototxt(p, {"EXP": "voc12", "NET_ID": "n", "NUM_LABELS": 21})
    assert net["name"] == "n" and net["layers"][0]["name"] == "fc_voc12"
    assert net["layers"][0]["num_output"] == 21


def test_default_name_is_the_file_stem(tmp_path):
    p = tmp_path / "deploy.prototxt"
    p.write_text('layer { name: "a" type: "ReLU" bottom: "x" top: "x" }')
    assert load_prototxt(p)[0]["name"] == "deploy"


# ----------------------------------------------------------------------------- YAML text

def test_yaml_text_round_trips_and_is_readable():
    with pytest.warns(UserWarning, match="MatWrite"):
        net, _ = conv(V1_NET, {"LIST": "a list: with 'quotes' # and hash", "NUM_LABELS": 21})
    net["layers"][0]["odd"] = {"s": "yes", "n": None, "f": 1e-5, "g": 2.0, "inf": float("inf"),
                               "t": "tab\there", "num": "1.5", "empty": [], "neg": -3}
    text = convert_to_yaml_text(net, header="converted from v1.prototxt\nby pacnet")
    assert yaml.safe_load(text) == net
    assert text.startswith("# converted from v1.prototxt\n# by pacnet\nname: legacy\npacnet_version: 1\n")
    assert "\n- name: fc6\n  type: Convolution\n  bottom: data\n  top: fc6\n" in text
    assert "  param: [{name: fc6_w, lr_mult: 1, decay_mult: 1}, {name: fc6_b, lr_mult: 2, decay_mult: 0}]\n" in text
    assert "inputs:\n  data: [30, 3, 321, 321]\n" in text
    assert "  include: {phase: train}\n" in text


def test_yaml_long_values_go_block_style():
    net = {"name": "x", "pacnet_version": 1, "layers": [
        {"name": "a", "type": "T", "param": [{"name": "p" * 90, "lr_mult": 1}, {"name": "q" * 40}],
         "big": {"k" * 50: 1, "z" * 50: [1, 2]}, "long": list(range(40))}]}
    text = convert_to_yaml_text(net)
    assert yaml.safe_load(text) == net
    assert "  param:\n    - name: " + "p" * 90 + "\n      lr_mult: 1\n    - {name: " + "q" * 40 + "}\n" in text
    assert "  big:\n    " in text


# ----------------------------------------------------------------------------- real graphs

def _vars_for(path):
    text = open(path, encoding="utf-8").read()
    names = set(re.findall(r"\$\{(\w+)\}", text))
    values = {n: "x" for n in names}
    # the segaware res nets: xy grid at half the crop (321 train, 513 test)
    half = 257 if "test" in os.path.basename(path) else 161
    values.update(NUM_LABELS=21, EXP="voc12", CROP_SIZE=321, BATCH_SIZE=1, HALF_SIZE=half,
                  NET_ID="net")
    for n in names:
        if n.endswith(("_LR1", "_LR2", "_LR3")):
            values[n] = 1
        if n.startswith("MASK"):
            values[n] = {"SIZE": 5, "PAD": 2, "DILATION": 1}[n.rsplit("_", 1)[1]]
    return {k: v for k, v in values.items() if k in names}


# (file, layers after conversion, {type: count} spot checks) -- counts from caffe.md §1.2,
# §2.2, §3.1 and segaware.md §3, minus the data layers and MatWrite sinks removed.
REAL = [
    ("deeplab/v2_resnet101_aspp_msc/train.prototxt", 1368,
     {"Convolution": 324, "BatchNorm": 312, "Scale": 312, "ReLU": 300, "Eltwise": 103, "Interp": 6,
      "SoftmaxWithLoss": 4, "SegAccuracy": 4, "Pooling": 3}),
    ("deeplab/v2_resnet101_aspp_msc/test.prototxt", 1361,
     {"Convolution": 324, "BatchNorm": 312, "Eltwise": 103, "Interp": 5, "SegAccuracy": 1, "Silence": 1}),
    ("deeplab/v2_resnet101_deploy_derived/deploy.prototxt", 451,
     {"Convolution": 108, "BatchNorm": 104, "Scale": 104, "ReLU": 100, "Eltwise": 34, "Pooling": 1}),
    ("deeplab/v2_vgg16_aspp_l/train.prototxt", 64,
     {"Convolution": 25, "ReLU": 21, "Dropout": 8, "Pooling": 5, "Eltwise": 1, "Interp": 1,
      "SoftmaxWithLoss": 1, "SegAccuracy": 1, "Silence": 1}),
    ("deeplab/v2_vgg16_aspp_l/test.prototxt", 62, {"Convolution": 25, "Interp": 1, "Silence": 1}),
    ("deeplab/v1_largefov_legacy/train.prototxt", 42,
     {"Convolution": 16, "ReLU": 15, "Pooling": 6, "Dropout": 2, "Interp": 1,
      "SoftmaxWithLoss": 1, "SegAccuracy": 1}),
    ("deeplab/v1_largefov_legacy/test.prototxt", 41, {"Convolution": 16, "Silence": 1}),
    ("pspnet/pspnet101_VOC2012_473.prototxt", 375,
     {"Convolution": 112, "BN": 111, "ReLU": 107, "Eltwise": 33, "Pooling": 5, "Interp": 5,
      "Concat": 1, "Dropout": 1}),
    ("pspnet/pspnet101_cityscapes_713.prototxt", 375, {"Convolution": 112, "BN": 111}),
    ("pspnet/pspnet50_ADE20K_473.prototxt", 205,
     {"Convolution": 61, "BN": 60, "ReLU": 56, "Eltwise": 16, "Pooling": 5, "Interp": 5}),
    ("fcn/voc-fcn8s/train.prototxt", 49,
     {"Convolution": 18, "ReLU": 15, "Pooling": 5, "Deconvolution": 3, "Crop": 3, "Dropout": 2,
      "Eltwise": 2, "SoftmaxWithLoss": 1}),
    ("fcn/voc-fcn8s/val.prototxt", 49, {"Convolution": 18}),
    ("fcn/voc-fcn8s/deploy.prototxt", 47, {"Convolution": 18, "Crop": 3, "Input": 1}),
    ("fcn/voc-fcn8s-atonce/train.prototxt", 51, {"Scale": 2, "Convolution": 18}),
    ("fcn/voc-fcn8s-atonce/val.prototxt", 51, {"Scale": 2}),
    ("fcn/voc-fcn32s/train.prototxt", 41, {"Convolution": 16, "Deconvolution": 1, "Crop": 1}),
    ("fcn/voc-fcn32s/val.prototxt", 41, {"Deconvolution": 1}),
    ("segaware/config/embs/deploy.prototxt", 33,
     {"Convolution": 6, "Input": 2, "Slice": 2, "Im2dist": 2, "DistLoss": 1}),
    ("segaware/config/embs/test.prototxt", 21, {"Convolution": 6, "Interp": 3}),
    ("segaware/config/embs/train.prototxt", 27, {"Im2dist": 3, "DistLoss": 3}),
    ("segaware/config/vgg/deploy.prototxt", 156, {"Im2col": 14, "Tile": 14, "Input": 2}),
    ("segaware/config/vgg/test.prototxt", 127, {"Convolution": 24, "Scale": 6}),
    ("segaware/config/vgg/train.prototxt", 155, {"Convolution": 24, "SoftmaxWithLoss": 1}),
    ("segaware/config/res/deploy.prototxt", 1390,
     {"Convolution": 332, "BatchNorm": 312, "Input": 4, "DummyData": 1, "NormConvMeanfield": 1}),
    ("segaware/config/res/test.prototxt", 1407,
     {"Convolution": 332, "Eltwise": 107, "Interp": 10, "ChannelReduce": 3, "Silence": 2}),
    ("segaware/config/res/train.prototxt", 1402,
     {"Convolution": 332, "SoftmaxWithLoss": 5, "SegAccuracy": 5, "Interp": 12}),
]


@needs_graphs
@pytest.mark.parametrize("rel,n_layers,types", REAL, ids=[r[0] for r in REAL])
def test_real_graph_converts(rel, n_layers, types):
    path = os.path.join(GRAPHS, rel)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        net, marks = load_prototxt(path, _vars_for(path))
    assert len(net["layers"]) == n_layers
    counts = collections.Counter(l["type"] for l in net["layers"])
    for t, n in types.items():
        assert counts[t] == n, (t, counts[t])
    # nothing disappears silently: layers + data layers + dropped sinks = what the file has
    sinks = sum("MatWrite" in str(w.message) for w in caught)
    written = len(re.findall(r"^\s*layers? \{", open(path, encoding="utf-8").read(), re.M))
    assert len(net["layers"]) + len(net.get("data", [])) + sinks == written
    assert marks[("layers", n_layers - 1)].file == path
    assert all(isinstance(l["name"], str) and isinstance(l["type"], str) for l in net["layers"])
    # every line mark points at a real 'layer'/'layers' line of the file
    lines = open(path, encoding="utf-8").read().splitlines()
    for i in (0, n_layers // 2, n_layers - 1):
        assert lines[marks[("layers", i)].line - 1].lstrip().startswith("layer"), (i, rel)
    if n_layers < 200:  # PyYAML is slow on the 1400-layer nets; the writer is the same code
        assert yaml.safe_load(convert_to_yaml_text(net)) == net


@needs_graphs
def test_real_graph_details():
    path = os.path.join(GRAPHS, "deeplab/v2_resnet101_aspp_msc/train.prototxt")
    msc, _ = load_prototxt(path, _vars_for(path))
    assert msc["inputs"] == {"data": [1, 3, 321, 321], "label": [1, 1, 321, 321]}
    bn = layer(msc, "bn_conv1")
    assert bn["use_global_stats"] is True
    assert all(p["lr_mult"] == 0 and p["decay_mult"] == 0 for p in bn["param"])
    assert layer(msc, "fc1_voc12_c0")["param"][0]["name"] == "fc1_voc12_c0_w"
    assert layer(msc, "fc_fusion")["operation"] == "MAX"
    assert layer(msc, "data_res075")["shrink_factor"] == 4 and layer(msc, "data_res075")["zoom_factor"] == 3
    psp, _ = load_prototxt(os.path.join(GRAPHS, "pspnet/pspnet101_VOC2012_473.prototxt"))
    assert psp["inputs"] == {"data": [1, 3, 473, 473]}
    b = layer(psp, "conv1_1_3x3_s2/bn")
    assert b["frozen"] is True and b["slope_filler"] == {"type": "constant", "value": 1}
    assert len(b["param"]) == 4
    fcn, _ = load_prototxt(os.path.join(GRAPHS, "fcn/voc-fcn8s/deploy.prototxt"))
    assert layer(fcn, "input")["shape"] == [[1, 3, 500, 500]]
    assert layer(fcn, "score")["offset"] == 31 and layer(fcn, "score")["axis"] == 2
    assert layer(fcn, "upscore8")["bias_term"] is False


def test_unknown_types_helper():
    net = {"layers": [{"name": "a", "type": "X"}, {"name": "b", "type": "ReLU"}, {"name": "c", "type": "X"}]}
    assert unknown_types(net, ["ReLU"]) == {"X": ["a", "c"]}


# ----------------------------------------------------------------------------- CLI

import pacnet  # noqa: E402
from pacnet.cli.main import main  # noqa: E402


def test_cli_convert_writes_yaml_that_builds(tmp_path, capsys):
    src = tmp_path / "net.prototxt"
    src.write_text(V1_NET)
    out = tmp_path / "net.yaml"
    assert main(["convert", str(src), "-o", str(out), "--var", "LIST=l.txt", "--var", "NUM_LABELS=21"]) == 0
    err = capsys.readouterr().err
    assert "warning:" in err and "'mat' (MatWrite) dropped" in err
    assert f"wrote {out} (7 layers)" in err
    text = out.read_text()
    assert text.startswith("# converted from net.prototxt by pacnet convert\nname: legacy\n")
    net = yaml.safe_load(text)
    with pytest.warns(UserWarning, match="MatWrite"):
        assert net == conv(V1_NET, {"LIST": "l.txt", "NUM_LABELS": 21})[0]
    built = pacnet.build(str(out), phase="train", device="meta")
    assert built.shapes["fc8"] == (30, 21, 41, 41) and built.shapes["ls"] == (30, 1, 41, 41)
    assert main(["build", str(out), "--phase", "train"]) == 0


def test_cli_convert_to_stdout(tmp_path, capsys):
    src = tmp_path / "d.prototxt"
    src.write_text('input: "data" input_dim: 1 input_dim: 3 input_dim: 4 input_dim: 4\n'
                   'layer { name: "r" type: "ReLU" bottom: "data" top: "r" }\n')
    assert main(["convert", str(src)]) == 0
    out = capsys.readouterr().out
    assert yaml.safe_load(out) == {"name": "d", "pacnet_version": 1, "inputs": {"data": [1, 3, 4, 4]},
                                   "layers": [{"name": "r", "type": "ReLU", "bottom": "data", "top": "r"}]}


@pytest.mark.parametrize("argv,fragment", [
    (["{src}", "-o", "{tmp}/x.txt"], "cannot tell what to write from the extension"),
    (["{src}", "-o", "{tmp}/a.yaml", "-o", "{tmp}/b.yaml"], "two YAML outputs"),
    (["{src}", "-o", "{tmp}/w.safetensors"], "no --weights to convert"),
    (["{src}", "-o", "{tmp}/missing/dir/x.yaml"], "does not exist"),
    (["{tmp}/net.yaml"], "already a pacnet net"),
    (["{tmp}/none.prototxt"], "no such file"),
    (["{src}", "--var", "NOEQUALS"], "--var 'NOEQUALS': expected NAME=VALUE"),
    (["{src}", "--var", "1X=2"], "--var '1X=2': expected NAME=VALUE"),
    (["{bad}", "-o", "{tmp}/bad.yaml"], "bad.prototxt:2:"),
    (["{src}", "--weights", "{tmp}/none.caffemodel"], "no such file"),
])
def test_cli_convert_user_errors(tmp_path, capsys, argv, fragment):
    src = tmp_path / "t.prototxt"
    src.write_text('name: "${NAME}"\nlayer { name: "r" type: "ReLU" bottom: "x" top: "x" }\n')
    bad = tmp_path / "bad.prototxt"
    bad.write_text('layer {\n  name "r"\n}\n')
    (tmp_path / "net.yaml").write_text("layers: []\n")
    args = [a.format(src=src, tmp=tmp_path, bad=bad) for a in argv]
    if "--var" not in args:
        args += ["--var", "NAME=n"]
    assert main(["convert"] + args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and fragment in err, err
    assert not (tmp_path / "bad.yaml").exists()
    assert [f for f in os.listdir(tmp_path) if f.startswith(".tmp")] == []


def test_cli_vars_are_text(tmp_path, capsys):
    src = tmp_path / "t.prototxt"
    src.write_text('name: "net_${ID}_${EQ}"\nlayer { name: "c${ID}" type: "Convolution"\n'
                   '  convolution_param { num_output: ${N} } }\n')
    assert main(["convert", str(src), "--var", "ID=01", "--var", "N=021", "--var", "EQ=x=y"]) == 0
    # (021 is octal in protobuf text, as Caffe reads it)
    net = yaml.safe_load(capsys.readouterr().out)
    assert net["name"] == "net_01_x=y" and net["layers"][0]["name"] == "c01"
    assert net["layers"][0]["num_output"] == 17
    assert main(["convert", str(src), "--var", "ID=01", "--var", "N=1", "--var", "EQ=a",
                 "--var", "NUM=3"]) == 2
    assert "NUM given, but no ${...} in the net uses it" in capsys.readouterr().err


def test_cli_convert_keeps_unset_vars_as_vars(tmp_path, capsys):
    src = tmp_path / "t.prototxt"
    src.write_text('name: "${NET_ID}"\nlayer { name: "fc_${EXP}" type: "Convolution" bottom: "data"\n'
                   '  top: "fc" convolution_param { num_output: ${NUM_LABELS} kernel_size: 1 } }\n'
                   'input: "data" input_dim: 1 input_dim: 3 input_dim: 4 input_dim: 4\n')
    out = tmp_path / "t.yaml"
    assert main(["convert", str(src), "--var", "EXP=voc12", "-o", str(out)]) == 0
    net = yaml.safe_load(out.read_text())
    assert net["vars"] == {"NET_ID": None, "NUM_LABELS": None}  # null: no default, must be set
    assert net["name"] == "${NET_ID}" and net["layers"][0]["num_output"] == "${NUM_LABELS}"
    assert net["layers"][0]["name"] == "fc_voc12"
    capsys.readouterr()
    assert main(["build", str(out)]) == 2
    err = capsys.readouterr().err
    assert "unset template variables: NET_ID (line 3), NUM_LABELS (line 16)" in err and "--var NAME=VALUE" in err
    assert main(["build", str(out), "--var", "NET_ID=n", "--var", "NUM_LABELS=21", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["blobs"]["fc"] == [1, 21, 4, 4]


def test_cli_convert_asks_for_a_variable_it_needs(tmp_path, capsys):
    src = tmp_path / "t.prototxt"
    src.write_text('layer { name: "data" type: "ImageSegData" top: "data" top: "label"\n'
                   '  transform_param { crop_size: ${CROP_SIZE} } image_data_param { batch_size: 2 } }\n')
    assert main(["convert", str(src)]) == 2
    err = capsys.readouterr().err
    assert "crop_size is ${CROP_SIZE}, a template variable without a value" in err
    assert "--var CROP_SIZE=VALUE" in err


def test_cli_convert_solver_prototxt(tmp_path, capsys):
    src = tmp_path / "solver.prototxt"
    src.write_text('train_net: "${NET_ROOT}/train.prototxt"\nlr_policy: "poly"\npower: 0.9\n'
                   'base_lr: ${LEARNING_RATE}\nmax_iter: 20000\nmomentum: 0.9\nweight_decay: 0.0005\n'
                   'snapshot_prefix: "model/train"\nsolver_mode: GPU\n')
    out = tmp_path / "solver.yaml"
    assert main(["convert", str(src), "-o", str(out)]) == 0
    text = out.read_text()
    assert "left out (pacnet takes them from the command line): train_net, snapshot_prefix, solver_mode" in text
    got = yaml.safe_load(text)
    assert got == {"vars": {"LEARNING_RATE": None}, "solver": {
        "lr_policy": "poly", "power": 0.9, "base_lr": "${LEARNING_RATE}", "max_iter": 20000, "momentum": 0.9,
        "weight_decay": 0.0005}}
    from pacnet.engine.solver import parse_solver, read_solver_file

    assert parse_solver(read_solver_file(str(out), {"LEARNING_RATE": "1e-3"})).base_lr == 1e-3
    assert parse_solver(read_solver_file(str(src), {"LEARNING_RATE": "1e-3", "NET_ROOT": "."})).power == 0.9
    src.write_text("lr_policy: \"step\"\nbase_lr: 0.1\nmax_iter: 10\n")  # step needs gamma, stepsize
    capsys.readouterr()
    assert main(["convert", str(src), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"error: {src}: solver.gamma: lr_policy 'step' needs 'gamma'" in err


# ----------------------------------------------------------------------------- builds

def _phase(rel):
    return "train" if os.path.basename(rel).startswith("train") else "test"


# Blob shapes Caffe computes (caffe.md §1.4, §2.4-2.5, §3.3; segaware.md §5), at the
# inputs the files declare (FCN's whole-image data layer: the 500 x 500 default).
SHAPES = {
    "fcn/voc-fcn8s/deploy.prototxt": {"pool2": (1, 128, 175, 175), "upscore2": (1, 21, 34, 34),
                                      "upscore_pool4": (1, 21, 70, 70),
                                      "upscore8": (1, 21, 568, 568), "score": (1, 21, 500, 500)},
    "fcn/voc-fcn8s/train.prototxt": {"pool2": (1, 128, 175, 175), "score": (1, 21, 500, 500),
                                     "loss": ()},
    "fcn/voc-fcn32s/val.prototxt": {"fc7": (1, 4096, 16, 16), "upscore": (1, 21, 544, 544),
                                    "score": (1, 21, 500, 500)},
    "pspnet/pspnet101_VOC2012_473.prototxt": {"conv5_3": (1, 2048, 60, 60),
                                              "conv5_3_pool6": (1, 2048, 6, 6),
                                              "conv5_3_concat": (1, 4096, 60, 60),
                                              "conv6": (1, 21, 60, 60),
                                              "conv6_interp": (1, 21, 473, 473)},
    "pspnet/pspnet101_cityscapes_713.prototxt": {"conv6": (1, 19, 90, 90),
                                                 "conv6_interp": (1, 19, 713, 713)},
    "pspnet/pspnet50_ADE20K_473.prototxt": {"conv6_interp": (1, 150, 473, 473)},
    "deeplab/v2_resnet101_aspp_msc/test.prototxt": {"res5c": (1, 2048, 65, 65),
                                                    "fc_fusion": (1, 21, 65, 65),
                                                    "fc1_interp": (1, 21, 513, 513)},
    "deeplab/v2_resnet101_aspp_msc/train.prototxt": {"data_res075": (1, 3, 241, 241),
                                                     "data_res05": (1, 3, 161, 161),
                                                     "fc1_voc12": (1, 21, 41, 41),
                                                     "fc1_voc12_res05": (1, 21, 21, 21),
                                                     "fc_fusion": (1, 21, 41, 41),
                                                     "label_shrink16": (1, 1, 21, 21), "loss": ()},
    "deeplab/v2_resnet101_deploy_derived/deploy.prototxt": {"fc1_voc12": (1, 21, 41, 41)},
    "deeplab/v2_vgg16_aspp_l/train.prototxt": {"pool5": (10, 512, 41, 41), "fc8_voc12": (10, 21, 41, 41)},
    "deeplab/v2_vgg16_aspp_l/test.prototxt": {"fc8_interp": (1, 21, 513, 513)},
    "deeplab/v1_largefov_legacy/train.prototxt": {"pool5a": (30, 512, 41, 41), "fc8_voc12": (30, 21, 41, 41)},
    "segaware/config/vgg/deploy.prototxt": {"fc8_interp": (1, 21, 321, 321)},
    "segaware/config/res/deploy.prototxt": {"crf_interp": (1, 21, 513, 513)},
    "segaware/config/res/test.prototxt": {"crf_interp": (1, 21, 513, 513)},
}


def _net_files():
    if not os.path.isdir(GRAPHS):
        return []
    out = []
    for root, _, files in os.walk(GRAPHS):
        for f in files:
            if f.endswith(".prototxt") and "solver" not in f:
                out.append(os.path.relpath(os.path.join(root, f), GRAPHS))
    return sorted(out)


@needs_graphs
@pytest.mark.parametrize("rel", _net_files())
def test_real_graph_builds_with_caffe_shapes(rel):
    from pacnet import registry

    path = os.path.join(GRAPHS, rel)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net_dict, _ = load_prototxt(path, _vars_for(path))
        missing = unknown_types(net_dict, registry.types())
        assert not missing, "layer types not registered: " + ", ".join(sorted(missing))
        net = pacnet.build(path, vars=_vars_for(path), phase=_phase(rel), device="meta")
    assert net.ir.outputs, rel
    for blob, shape in SHAPES.get(rel, {}).items():
        assert net.shapes[blob] == shape, (blob, net.shapes[blob], shape)


def test_compiler_errors_point_at_prototxt_lines(tmp_path):
    from pacnet.errors import GraphError, SchemaError

    p = tmp_path / "n.prototxt"
    p.write_text('input: "data"\ninput_dim: 1 input_dim: 3 input_dim: 8 input_dim: 8\n'
                 'layer {\n  name: "c" type: "Convolution" bottom: "data" top: "c"\n'
                 '  convolution_param {\n    num_output: 4\n    kernel_size: 0\n  }\n}\n')
    with pytest.raises(SchemaError) as e:
        pacnet.build(str(p), device="meta")
    assert (e.value.location.file, e.value.location.line, e.value.location.col) == (str(p), 7, 5)
    assert e.value.layer == "c"
    p.write_text('input: "data"\ninput_dim: 1 input_dim: 3 input_dim: 8 input_dim: 8\n'
                 'layer { name: "r" type: "Eltwise"\n  bottom: "data" bottom: "nothere" top: "r" }\n')
    with pytest.raises(PacnetError) as e:
        pacnet.build(str(p), device="meta")
    assert e.value.location.line == 4 and "nothere" in str(e.value)


def test_repeated_layer_names_are_renamed_with_a_warning():
    with pytest.warns(UserWarning, match=r"renamed 2 duplicate layer name\(s\).*relu \(line 3\) -> relu_2"):
        net, marks = conv('''
            layer { name: "relu" type: "ReLU" bottom: "x" top: "x" }
            layer { name: "relu" type: "ReLU" bottom: "x" top: "x" }
            layer { name: "relu_2" type: "ReLU" bottom: "x" top: "x" }
            layer { name: "relu" type: "ReLU" bottom: "x" top: "x" }
        ''')
    assert [l["name"] for l in net["layers"]] == ["relu", "relu_2_", "relu_2", "relu_3"]
