"""The compiler pipeline: loading, blocks, inheritance, graph semantics, shapes, codegen, errors."""

import json
import textwrap

import pytest
import torch

import pacnet
from pacnet.cli.main import main
from pacnet.errors import GraphError, LoadError, PacnetError, SchemaError, ShapeError


def write(tmp_path, text, name="net.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip())
    return str(path)


TINY = """
name: tiny
pacnet_version: 1
inputs:
  data: [N, 3, H, W]
dims: {N: 2, H: 12, W: 10}
layers:
  - {name: conv1, type: Convolution, bottom: data, top: conv1, num_output: 4, kernel_size: 3, pad: 1,
     weight_filler: {type: gaussian, std: 0.1}, bias_filler: {type: constant, value: 0.5}}
  - {name: relu1, type: ReLU, bottom: conv1, top: conv1}
  - {name: conv2, type: Convolution, bottom: conv1, top: conv2, num_output: 2, kernel_size: 1,
     weight_filler: {type: xavier}}
"""


def test_build_runs_and_matches_hand_written_module(tmp_path):
    net = pacnet.build(write(tmp_path, TINY))
    assert net.shapes == {"data": (2, 3, 12, 10), "conv1": (2, 4, 12, 10), "conv2": (2, 2, 12, 10)}
    x = torch.randn(2, 3, 12, 10)
    out = net(x)
    assert set(out) == {"conv2"}
    sd = net.state_dict()
    assert set(sd) == {"conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias"}
    ref = torch.nn.functional.conv2d(x, sd["conv1.weight"], sd["conv1.bias"], padding=1).relu()
    ref = torch.nn.functional.conv2d(ref, sd["conv2.weight"], sd["conv2.bias"])
    torch.testing.assert_close(out["conv2"], ref)
    assert torch.all(sd["conv1.bias"] == 0.5)
    # Keyword call by input blob name, and the readable generated code.
    torch.testing.assert_close(net(data=x)["conv2"], out["conv2"])
    assert "self.conv1(data)" in net.code and "self.relu1(conv1)" in net.code


def test_inputs_bind_symbolic_dims(tmp_path):
    net = pacnet.build(write(tmp_path, TINY), inputs={"data": (1, 3, 7, 9)})
    assert net.shapes["conv2"] == (1, 2, 7, 9)


def test_in_place_versions_and_fan_out(tmp_path):
    net = pacnet.build(write(tmp_path, """
        inputs: {data: [1, 2, 4, 4]}
        layers:
          - {name: a, type: ReLU, bottom: data, top: x}
          - {name: b, type: Sigmoid, bottom: x, top: x}      # in place: x@1
          - {name: c, type: TanH, bottom: x, top: y}         # binds x@1
          - {name: d, type: AbsVal, bottom: x, top: z}       # fan-out of x@1
    """))
    nodes = {n.name: n for n in net.ir.nodes}
    assert str(nodes["b"].outputs[0]) == "x@1"
    assert str(nodes["c"].inputs[0]) == "x@1" and str(nodes["d"].inputs[0]) == "x@1"
    x = torch.randn(1, 2, 4, 4)
    out = net(x)
    torch.testing.assert_close(out["y"], torch.tanh(torch.sigmoid(x.relu())))
    torch.testing.assert_close(out["z"], torch.sigmoid(x.relu()).abs())


def test_weight_sharing_one_parameter_and_frozen_blobs(tmp_path):
    net = pacnet.build(write(tmp_path, """
        inputs: {data: [1, 3, 5, 5]}
        layers:
          - {name: a, type: Convolution, bottom: data, top: a, num_output: 3, kernel_size: 3, pad: 1,
             param: [{name: w, lr_mult: 1}, {lr_mult: 0}], weight_filler: {type: gaussian}}
          - {name: b, type: Convolution, bottom: a, top: b, num_output: 3, kernel_size: 3, pad: 1,
             param: [{name: w, decay_mult: 0}]}
    """))
    assert net.a.weight is net.b.weight
    assert not net.a.bias.requires_grad and net.b.bias.requires_grad
    # shared counted once: 81 weights + 3 + 3 biases
    assert pacnet.api.parameter_count(net) == 81 + 6
    assert net.param_specs["a.weight"] == (1.0, 0.0)  # decay inherited from the sharer
    assert "b.weight" not in net.param_specs
    net(torch.randn(1, 3, 5, 5))["b"].sum().backward()
    assert net.a.weight.grad is not None and net.a.bias.grad is None


def test_sharing_shape_mismatch_is_an_error(tmp_path):
    with pytest.raises(GraphError, match="shapes differ"):
        pacnet.build(write(tmp_path, """
            inputs: {data: [1, 3, 5, 5]}
            layers:
              - {name: a, type: Convolution, bottom: data, top: a, num_output: 3, kernel_size: 3, param: [{name: w}]}
              - {name: b, type: Convolution, bottom: a, top: b, num_output: 4, kernel_size: 3, param: [{name: w}]}
        """))


def test_phase_and_stage_rules(tmp_path):
    path = write(tmp_path, """
        inputs: {data: [1, 1, 2, 2]}
        layers:
          - {name: tr, type: ReLU, bottom: data, top: t, include: {phase: train}}
          - {name: te, type: Sigmoid, bottom: data, top: s, include: [{phase: test}]}
          - {name: st, type: TanH, bottom: data, top: u, include: {stage: deploy}}
          - {name: ex, type: AbsVal, bottom: data, top: v, exclude: {phase: test, not_stage: keep}}
    """)
    assert set(pacnet.build(path, phase="train").shapes) == {"data", "t", "v"}
    assert set(pacnet.build(path).shapes) == {"data", "s"}
    assert set(pacnet.build(path, stages=["deploy", "keep"]).shapes) == {"data", "s", "u", "v"}


def test_blocks_base_vars_and_overrides(tmp_path):
    write(tmp_path, """
        name: base
        inputs: {data: [1, 3, 8, 8]}
        vars: {WIDTH: 4}
        blocks:
          conv_relu:
            args: {num_output: null, dilation: 1}
            layers:
              - {name: conv, type: Convolution, bottom: "${bottom}", top: conv, num_output: "${num_output}",
                 kernel_size: 3, pad: "${dilation}", dilation: "${dilation}"}
              - {name: relu, type: ReLU, bottom: conv, top: "${top}"}
        layers:
          - {name: c1, type: conv_relu, bottom: data, top: c1, num_output: "${WIDTH}"}
          - {name: c2, type: conv_relu, bottom: c1, top: c2, num_output: 5, dilation: 2}
    """, "base.yaml")
    child = write(tmp_path, """
        _base_: base.yaml
        name: child
        layers:
          - {name: c2, dilation: 1}
          - {name: c3, type: Sigmoid, bottom: c2, top: c3}
    """)
    net = pacnet.build(child, vars={"WIDTH": 6}, overrides={"layers.c1/conv.kernel_size": 1,
                                                            "layers.c1/conv.pad": 0})
    assert net.ir.name == "child"
    assert [n.name for n in net.ir.nodes] == ["c1/conv", "c1/relu", "c2/conv", "c2/relu", "c3"]
    assert net.shapes["c1"] == (1, 6, 8, 8)
    assert net.get_submodule("c1/conv").weight.shape == (6, 3, 1, 1)
    assert net.get_submodule("c2/conv").dilation == (1, 1)
    assert "c1/conv" in net.shapes and net.shapes["c3"] == (1, 5, 8, 8)


def test_base_delete_replaces_even_where_nothing_was_and_frees_a_layer_name(tmp_path):
    write(tmp_path, """
        name: base
        inputs: {data: [1, 3, 8, 8]}
        layers:
          - {name: a, type: ReLU, bottom: data, top: a}
          - {name: b, type: Sigmoid, bottom: a, top: b}
    """, "base.yaml")
    # a second base adds a section the first lacks, marked _delete_ (it replaces whatever
    # a base has there), and replaces layer b by a new one after the layers it needs
    write(tmp_path, """
        solver: {_delete_: true, base_lr: 0.1, max_iter: 3}
        layers:
          - {name: b, _delete_: true}
          - {name: c, type: TanH, bottom: a, top: c}
          - {name: b, type: Eltwise, bottom: [a, c], top: b}
    """, "head.yaml")
    child = write(tmp_path, """
        _base_: [base.yaml, head.yaml]
        name: child
    """)
    net = pacnet.build(child)
    assert dict(net.config["solver"]) == {"base_lr": 0.1, "max_iter": 3}
    assert [(n.name, n.type) for n in net.ir.nodes] == [("a", "ReLU"), ("c", "TanH"), ("b", "Eltwise")]
    # the marker waits for a later base: a base-of-a-base's section replaces the first base's
    write(tmp_path, """
        _base_: head.yaml
        data: {_delete_: true, dataset: synthetic_depth}
    """, "recipe.yaml")
    write(tmp_path, """
        name: base2
        data: {dataset: voc, root: x}
        inputs: {data: [1, 3, 8, 8]}
        layers:
          - {name: a, type: ReLU, bottom: data, top: a}
          - {name: b, type: Sigmoid, bottom: a, top: b}
    """, "base2.yaml")
    two = pacnet.build(write(tmp_path, "_base_: [base2.yaml, recipe.yaml]\n", "two.yaml"))
    assert dict(two.config["data"]) == {"dataset": "synthetic_depth"}
    typo = write(tmp_path, """
        _base_: base.yaml
        layers:
          - {name: bb, _delete_: true}
    """, "typo.yaml")
    with pytest.raises(SchemaError, match="layer 'bb' is marked _delete_ but no base has a layer of that name"):
        pacnet.build(typo)


def test_unknown_block_argument(tmp_path):
    with pytest.raises(SchemaError, match="unknown argument 'num_outptu'") as err:
        pacnet.build(write(tmp_path, """
            inputs: {data: [1, 3, 8, 8]}
            blocks:
              b: {args: {num_output: null}, layers: [{name: r, type: ReLU, bottom: "${bottom}", top: "${top}"}]}
            layers:
              - {name: x, type: b, bottom: data, top: y, num_outptu: 3}
        """))
    assert "num_output" in str(err.value)


def test_unset_variables_are_listed_together(tmp_path):
    with pytest.raises(LoadError) as err:
        pacnet.build(write(tmp_path, """
            inputs: {data: [1, 3, 8, 8]}
            layers:
              - {name: "c_${EXP}", type: Convolution, bottom: data, top: c, num_output: "${NUM_LABELS}", kernel_size: 1}
        """))
    assert "EXP (line 3)" in str(err.value) and "NUM_LABELS (line 3)" in str(err.value)


# ----------------------------------------------------------------------------- errors

ERROR_CASES = {
    "bad_yaml": ("layers:\n  - {name: a, type: ReLU\n", LoadError, "invalid YAML", 3),
    "duplicate_key": ("layers:\n  - name: a\n    name: b\n", LoadError, "duplicate key 'name'", 3),
    "unknown_type": ("inputs: {d: [1]}\nlayers:\n  - {name: a, type: Convolutoin, bottom: d, top: a}\n",
                     SchemaError, "did you mean 'Convolution'", 3),
    "unknown_key": ("inputs: {d: [1, 1, 3, 3]}\nlayers:\n  - name: a\n    type: Convolution\n    bottom: d\n"
                    "    top: a\n    num_output: 1\n    kernel_sise: 3\n",
                    SchemaError, "did you mean 'kernel_size'", 8),
    "wrong_type": ("inputs: {d: [1, 1, 3, 3]}\nlayers:\n  - name: a\n    type: Convolution\n    bottom: d\n"
                   "    top: a\n    num_output: many\n", SchemaError, "num_output", 7),
    "missing_bottom": ("inputs: {data: [1, 1, 3, 3]}\nlayers:\n  - {name: a, type: ReLU, bottom: dta, top: a}\n",
                       GraphError, "did you mean 'data'", 3),
    "produced_later": ("inputs: {d: [1, 1, 3, 3]}\nlayers:\n  - {name: a, type: ReLU, bottom: b, top: a}\n"
                       "  - {name: b, type: ReLU, bottom: d, top: b}\n", GraphError, "move 'b' above 'a'", 3),
    "cycle": ("inputs: {d: [1, 1, 3, 3]}\nlayers:\n  - {name: a, type: ReLU, bottom: b, top: a}\n"
              "  - {name: b, type: ReLU, bottom: a, top: b}\n", GraphError, "cycle: a -> b -> a", 3),
    "duplicate_name": ("inputs: {d: [1, 1, 3, 3]}\nlayers:\n  - {name: a, type: ReLU, bottom: d, top: a}\n"
                       "  - {name: a, type: ReLU, bottom: d, top: b}\n", GraphError, "duplicate layer name", 4),
    "duplicate_producer": ("inputs: {d: [1, 1, 3, 3]}\nlayers:\n  - {name: a, type: ReLU, bottom: d, top: x}\n"
                           "  - {name: b, type: ReLU, bottom: d, top: x}\n", GraphError,
                           "already produced by layer 'a'", 4),
    "empty_output": ("inputs: {d: [1, 1, 3, 3]}\nlayers:\n  - {name: a, type: Convolution, bottom: d, top: a,"
                     " num_output: 1, kernel_size: 5}\n", ShapeError, "kernel", 3),
    "absurd_shape": ("inputs: {d: [1, 1, 3, 3]}\nlayers:\n  - {name: a, type: Convolution, bottom: d, top: a,"
                     " num_output: 100000000, kernel_size: 1, pad: 100000}\n", ShapeError, "elements", 3),
    "zero_num_output": ("inputs: {d: [1, 1, 3, 3]}\nlayers:\n  - {name: a, type: Convolution, bottom: d, top: a,"
                        " num_output: 0, kernel_size: 1}\n", SchemaError, "num_output", 3),
    "unbound_dim": ("inputs: {d: [1, 1, H, 3]}\nlayers:\n  - {name: a, type: ReLU, bottom: d, top: a}\n",
                    SchemaError, "symbolic dim 'H'", 1),
    "arity": ("inputs: {d: [1, 1, 3, 3]}\nlayers:\n  - {name: a, type: ReLU, bottom: [d, d], top: a}\n",
              GraphError, "takes 1 bottom", 3),
    "not_a_mapping": ("- a\n- b\n", SchemaError, "mapping", 1),
}

# Mistakes in one layer (a train-only one for some), caught whatever phase is built:
# (layer, error class, fragment), the layer on line 3 of a two-layer net.
LAYER_CASES = {
    "duplicate_top": ("{name: s, type: Slice, bottom: data, top: [x, x]}", SchemaError,
                      "top 'x' is listed twice"),
    "include_string": ("{name: s, type: ReLU, bottom: data, top: y, include: train}",
                       SchemaError, "write include: {phase: train}"),
    "exclude_list_of_strings": ("{name: s, type: ReLU, bottom: data, top: y, exclude: [train]}",
                                SchemaError, "exclude.0"),
    "top_mapping": ("{name: s, type: ReLU, bottom: data, top: {x: 1}}", SchemaError,
                    "write top: conv1"),
    "phase_number": ("{name: s, type: ReLU, bottom: data, top: y, include: {phase: 3}}",
                     SchemaError, "include.phase: 3"),
    "phase_word": ("{name: s, type: ReLU, bottom: data, top: y, include: {phase: TRAINING}}",
                   SchemaError, "did you mean 'TRAIN'"),
    "level_float": ("{name: s, type: ReLU, bottom: data, top: y, include: {min_level: 0.5}}",
                    SchemaError, "min_level"),
    "stage_number": ("{name: s, type: ReLU, bottom: data, top: y, include: {stage: [1]}}",
                     SchemaError, "stage"),
    "include_and_exclude": ("{name: s, type: ReLU, bottom: data, top: y, include: {phase: test},"
                            " exclude: {phase: train}}", SchemaError, "not both"),
    "train_only_typo": ("{name: s, type: Convolution, bottom: data, top: y, num_output: 1, "
                        "kernel_sise: 3, include: {phase: train}}", SchemaError,
                        "did you mean 'kernel_size'"),
    "train_only_type": ("{name: s, type: Convolutoin, bottom: data, top: y, "
                        "include: {phase: train}}", SchemaError, "did you mean 'Convolution'"),
    "train_only_arity": ("{name: s, type: Eltwise, bottom: data, top: y, "
                         "include: {phase: train}}", GraphError, "takes at least 2 bottom"),
    "train_only_check": ("{name: s, type: Convolution, bottom: data, top: y, num_output: 1, "
                         "kernel_size: 2, pad_h: 1, include: {phase: train}}", SchemaError,
                         "pad"),
    "loss_weight_count": ("{name: s, type: ReLU, bottom: data, top: y, loss_weight: [1, 2]}",
                          SchemaError, "loss_weight has 2 value(s)"),
    "loss_weight_nan": ("{name: s, type: ReLU, bottom: data, top: y, loss_weight: .nan}",
                        SchemaError, "finite"),
    "propagate_down_count": ("{name: s, type: ReLU, bottom: data, top: y, "
                             "propagate_down: [true, false]}", SchemaError,
                             "propagate_down has 2 value(s)"),
    "propagate_down_string": ("{name: s, type: ReLU, bottom: data, top: y, "
                              "propagate_down: 'no'}", SchemaError, "write propagate_down"),
    "param_count": ("{name: s, type: ReLU, bottom: data, top: y, param: [{lr_mult: 1}]}",
                    SchemaError, "'param' entries"),
    "lr_mult_inf": ("{name: s, type: Convolution, bottom: data, top: y, num_output: 1, "
                    "kernel_size: 1, param: [{lr_mult: .inf}]}", SchemaError, "finite"),
    "name_number": ("{name: 5, type: ReLU, bottom: data, top: y}", SchemaError,
                    "layer name 5 is int, not text"),
    "empty_bottom": ("{name: s, type: ReLU, bottom: '', top: y}", SchemaError, "bottom"),
}
for _case, (_layer, _cls, _fragment) in LAYER_CASES.items():
    ERROR_CASES[_case] = ("inputs: {data: [1, 2, 4, 4]}\nlayers:\n  - " + _layer + "\n"
                          "  - {name: other, type: ReLU, bottom: data, top: z}\n",
                          _cls, _fragment, 3)


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_user_mistakes_are_located_errors(tmp_path, case, capsys):
    text, cls, needle, line = ERROR_CASES[case]
    path = write(tmp_path, text)
    for phase in ("test", "train"):  # every layer is validated whatever phase is built
        with pytest.raises(cls) as err:
            pacnet.build(path, phase=phase)
        assert needle in str(err.value)
        assert err.value.location is not None and err.value.location.line == line, str(err.value)
        assert str(err.value).startswith(f"{path}:{line}")
    # The CLI prints it briefly and exits 2, without a traceback.
    assert main(["build", path]) == 2
    captured = capsys.readouterr()
    assert needle in captured.err and "Traceback" not in captured.err


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(LoadError, match="file not found"):
        pacnet.build(str(tmp_path / "nope.yaml"))
    with pytest.raises(LoadError, match="directory"):
        pacnet.build(str(tmp_path))


# ----------------------------------------------------------------------------- CLI

def test_cli_build_table_json_code_dot(tmp_path, capsys):
    path = write(tmp_path, TINY)
    assert main(["build", path]) == 0
    out = capsys.readouterr().out
    assert "conv1" in out and "2×4×12×10" in out and "total" in out
    assert main(["build", path, "--json", "--input", "data=1x3x5x6"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["blobs"]["conv2"] == [1, 2, 5, 6]
    assert report["params"] == 4 * 27 + 4 + 2 * 4 + 2
    assert [l["name"] for l in report["layers"]] == ["conv1", "relu1", "conv2"]
    assert main(["build", path, "--code"]) == 0
    assert "def forward(self, data)" in capsys.readouterr().out
    dot = tmp_path / "g.dot"
    assert main(["build", path, "--dot", str(dot), "--set", "layers.conv2.num_output=3"]) == 0
    assert "digraph" in dot.read_text() and "2×3×12×10" in dot.read_text()


def test_cli_bad_arguments_exit_2(tmp_path, capsys):
    path = write(tmp_path, TINY)
    assert main(["build", path, "--input", "data=1x3xHx4"]) == 2
    assert "--input" in capsys.readouterr().err
    assert main(["build", path, "--input", "label=1x3x4x4"]) == 2
    assert "no input blob 'label'" in capsys.readouterr().err
    assert main(["build", path, "--set", "nokey"]) == 2
    assert main(["bulid", path]) == 2
    assert main(["--version"]) == 0


def test_cli_layers_lists_and_describes(capsys):
    assert main(["layers"]) == 0
    assert "Convolution" in capsys.readouterr().out
    assert main(["layers", "Convolution"]) == 0
    out = capsys.readouterr().out
    assert "num_output" in out and "kernel_size" in out
    assert main(["layers", "Convolutoin"]) == 2
    assert "did you mean 'Convolution'" in capsys.readouterr().err


def test_dict_source_and_torch_compile(tmp_path):
    net = pacnet.build({
        "inputs": {"data": [2, 3, 8, 8]},
        "layers": [
            {"name": "c", "type": "Convolution", "bottom": "data", "top": "c", "num_output": 4,
             "kernel_size": 3, "pad": 1, "weight_filler": {"type": "msra"}},
            {"name": "r", "type": "ReLU", "bottom": "c", "top": "c"},
        ],
    })
    x = torch.randn(2, 3, 8, 8)
    compiled = torch.compile(net, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x)["c"], net(x)["c"])


def test_net_schema_is_valid_jsonschema():
    import jsonschema

    from pacnet.schema import net_schema

    jsonschema.Draft202012Validator.check_schema(net_schema())


def test_inferred_shapes_equal_the_real_blobs_for_every_layer_type_in_a_net(tmp_path):
    """Shape inference vs running the module, blob by blob, on a net mixing many types."""
    layers = [
        {"name": "conv", "type": "Convolution", "bottom": "data", "top": "conv", "num_output": 6,
         "kernel_size": 3, "stride": 2, "pad": 1, "weight_filler": {"type": "xavier"}},
        {"name": "bn", "type": "BatchNorm", "bottom": "conv", "top": "conv"},
        {"name": "sc", "type": "Scale", "bottom": "conv", "top": "conv", "bias_term": True},
        {"name": "relu", "type": "ReLU", "bottom": "conv", "top": "conv"},
        {"name": "pool", "type": "Pooling", "bottom": "conv", "top": "pool", "pool": "MAX", "kernel_size": 3,
         "stride": 2},
        {"name": "ave", "type": "Pooling", "bottom": "conv", "top": "ave", "pool": "AVE", "kernel_size": 2,
         "stride": 3, "pad": 1},
        {"name": "up", "type": "Deconvolution", "bottom": "pool", "top": "up", "num_output": 6, "kernel_size": 4,
         "stride": 2, "weight_filler": {"type": "gaussian", "std": 0.1}},
        {"name": "crop", "type": "Crop", "bottom": ["up", "conv"], "top": "crop", "offset": 1},
        {"name": "sum", "type": "Eltwise", "bottom": ["crop", "conv"], "top": "sum", "coeff": [1, -0.5]},
        {"name": "interp", "type": "Interp", "bottom": "sum", "top": "interp", "zoom_factor": 2},
        {"name": "cat", "type": "Concat", "bottom": ["interp", "interp"], "top": "cat"},
        {"name": "slice", "type": "Slice", "bottom": "cat", "top": ["s1", "s2"], "slice_point": [4]},
        {"name": "fc", "type": "InnerProduct", "bottom": "s2", "top": "fc", "num_output": 5,
         "weight_filler": {"type": "gaussian", "std": 0.01}},
        {"name": "prob", "type": "Softmax", "bottom": "fc", "top": "prob"},
        {"name": "flat", "type": "Flatten", "bottom": "ave", "top": "flat"},
        {"name": "tile", "type": "Tile", "bottom": "s1", "top": "tile", "tiles": 2, "axis": 2},
        {"name": "arg", "type": "ArgMax", "bottom": "s1", "top": "arg", "axis": 1},
        {"name": "red", "type": "Reduction", "bottom": "tile", "top": "red", "operation": "MEAN", "axis": 1},
    ]
    net = pacnet.build({"inputs": {"data": [2, 3, 23, 19]}, "layers": layers,
                        "outputs": [t for l in layers for t in ([l["top"]] if isinstance(l["top"], str) else l["top"])]})
    with torch.no_grad():
        for key, value in net.state_dict().items():
            if key.endswith(("scale_factor", ".var")):
                value.fill_(1.0)
    out = net(torch.randn(2, 3, 23, 19))
    assert set(out) == set(net.shapes) - {"data"}
    for blob, tensor in out.items():
        assert tuple(tensor.shape) == net.shapes[blob], blob
