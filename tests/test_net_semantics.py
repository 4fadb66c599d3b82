"""Caffe's net rules honoured, or a located error: propagate_down and the backward-need
analysis, module names, one validation of every layer of every phase, template variables,
input shapes as defaults, copying and saving a Net, dtype fidelity."""

import copy
import io
import json
import textwrap
import warnings

import pytest
import torch

import pacnet
from pacnet.cli.main import main
from pacnet.errors import GraphError, PacnetError, ShapeError, UnusedVariableWarning


def write(tmp_path, text, name="net.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip())
    return str(path)


def conv(name, bottom, top=None, **kw):
    return {"name": name, "type": "Convolution", "bottom": bottom, "top": top or name,
            "num_output": 2, "kernel_size": 1, "weight_filler": {"type": "gaussian"}, **kw}


def grads(net, *inputs):
    """Backward of the total loss; the gradient of every parameter and input (None = none)."""
    for p in net.parameters():
        p.grad = None
    xs = [x.clone().requires_grad_(True) for x in inputs]
    net.total_loss(net(*xs)).backward()
    return {k: p.grad for k, p in net.named_parameters()}, [x.grad for x in xs]


# ----------------------------------------------------------------------------- propagate_down

def test_propagate_down_false_stops_the_gradient_into_that_bottom_only():
    layers = [conv("a", "data"),
              conv("b", "a", propagate_down=[False]),
              {"name": "loss", "type": "EuclideanLoss", "bottom": ["b", "target"],
               "propagate_down": [True, False]}]
    net = pacnet.build({"inputs": {"data": [1, 2, 3, 3], "target": [1, 2, 3, 3]},
                        "layers": layers}, phase="train")
    x, t = torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 3)
    g, (gx, gt) = grads(net, x, t)
    # Caffe: b still learns, nothing reaches a, data or the loss's second bottom.
    assert g["b.weight"] is not None and g["b.weight"].abs().sum() > 0
    assert g["a.weight"] is None and gx is None and gt is None
    assert "a.detach()" in net.code and "target.detach()" in net.code
    needs = net.backward_needs
    assert needs.layers == {"a": False, "b": True, "loss": True}
    assert needs.bottoms == {"a": (False,), "b": (False,), "loss": (True, False)}
    assert needs.never_learn == ("a.weight", "a.bias")
    # Without propagate_down every blob gets its gradient again.
    for layer in layers:
        layer.pop("propagate_down", None)
    net = pacnet.build({"inputs": {"data": [1, 2, 3, 3], "target": [1, 2, 3, 3]},
                        "layers": layers}, phase="train")
    g, (gx, gt) = grads(net, x, t)
    assert g["a.weight"] is not None and gx is not None and gt is not None
    assert net.backward_needs.never_learn == ()


def test_backward_needs_follow_losses_lr_mult_and_label_bottoms():
    layers = [
        conv("frozen", "data", param=[{"lr_mult": 0}, {"lr_mult": 0}]),  # needs none itself
        conv("trunk", "frozen"),
        conv("side", "trunk"),                                           # reaches no loss
        conv("score", "trunk"),
        {"name": "argmax", "type": "ArgMax", "bottom": "score", "top": "lab", "axis": 1},
        conv("head", "data", top="h"),                                   # only a label
        {"name": "loss", "type": "SoftmaxWithLoss", "bottom": ["score", "label"]},
        {"name": "acc", "type": "Accuracy", "bottom": ["h", "label"], "top": "acc"},
        {"name": "zero", "type": "Convolution", "bottom": "trunk", "top": "z", "num_output": 1,
         "kernel_size": 1, "loss_weight": 0},
    ]
    net = pacnet.build({"inputs": {"data": [1, 2, 3, 3], "label": [1, 1, 3, 3]},
                        "layers": layers}, phase="train")
    needs = net.backward_needs
    assert {k for k, v in needs.layers.items() if v} == {"trunk", "score", "loss"}
    assert needs.never_learn == ("side.weight", "side.bias", "head.weight", "head.bias",
                                 "zero.weight", "zero.bias")
    assert "frozen.weight" not in needs.blobs  # lr_mult 0: not trainable, not reported
    # autograd agrees with the analysis, blob by blob
    x, lab = torch.randn(1, 2, 3, 3), torch.randint(0, 2, (1, 1, 3, 3)).float()
    g, _ = grads(net, x, lab)
    for key, learns in needs.blobs.items():
        assert (g[key] is not None) == learns, key


def test_build_shows_what_needs_backward(tmp_path, capsys):
    path = write(tmp_path, """
        inputs: {data: [1, 2, 3, 3]}
        layers:
          - {name: a, type: Convolution, bottom: data, top: a, num_output: 2, kernel_size: 1}
          - {name: b, type: Convolution, bottom: a, top: b, num_output: 2, kernel_size: 1,
             propagate_down: false}
          - {name: loss, type: EuclideanLoss, bottom: [b, data], include: {phase: train}}
    """)
    assert main(["build", path, "--phase", "train"]) == 0
    out = capsys.readouterr().out
    assert "backward" in out and "no backward computation (1 layers): a" in out
    assert "which never learn (2): a.weight, a.bias" in out
    assert main(["build", path, "--phase", "train", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [l["backward"] for l in report["layers"]] == [False, True, True]
    assert report["never_learn"] == ["a.weight", "a.bias"]
    assert main(["build", path]) == 0  # test phase: no loss, no column
    assert "backward" not in capsys.readouterr().out


def test_trainer_warns_once_and_leaves_unreached_blobs_to_decay_alone():
    from pacnet.engine.solver import Solver
    from pacnet.engine.trainer import _detach_unreached

    net = pacnet.build({"inputs": {"data": [1, 2, 3, 3]}, "layers": [
        conv("a", "data"), conv("side", "a"),
        {"name": "loss", "type": "EuclideanLoss", "bottom": ["a", "data"]}]}, phase="train")
    solver = Solver({"base_lr": 0.1, "max_iter": 1, "weight_decay": 0.5, "momentum": 0.0}, net,
                    net.param_specs)
    with pytest.warns(UserWarning, match=r"no loss reaches 2 learnable blob\(s\).*side.weight, "
                                         r"side.bias"):
        _detach_unreached(net)
    assert not net.side.weight.requires_grad and net.a.weight.requires_grad
    before = net.side.weight.detach().clone()
    solver.step(lambda: net.total_loss(net(torch.randn(1, 2, 3, 3))))
    # Caffe: no gradient, but weight decay still shrinks it (w -= lr * decay * w)
    torch.testing.assert_close(net.side.weight.detach(), before * (1 - 0.1 * 0.5))


# ----------------------------------------------------------------------------- module names

@pytest.mark.parametrize("first,second", [("forward", "forward_"), ("a.b", "a_b"),
                                          ("code", "code_")])
def test_layers_whose_module_names_collide_are_a_located_error(tmp_path, first, second):
    path = write(tmp_path, f"""
        inputs: {{data: [1, 2, 3, 3]}}
        layers:
          - {{name: "{first}", type: ReLU, bottom: data, top: x}}
          - {{name: "{second}", type: Sigmoid, bottom: x, top: y}}
    """)
    with pytest.raises(GraphError) as err:
        pacnet.build(path)
    assert err.value.location.line == 4 and err.value.layer == second
    assert f"'{first}' (line 3)" in str(err.value) and "rename one" in str(err.value)


def test_distinct_module_names_compute_each_layer(tmp_path):
    net = pacnet.build({"inputs": {"data": [1, 2, 3, 3]}, "layers": [
        {"name": "forward", "type": "ReLU", "bottom": "data", "top": "a"},
        {"name": "a.b", "type": "Sigmoid", "bottom": "a", "top": "b"}]})
    x = torch.randn(1, 2, 3, 3)
    torch.testing.assert_close(net(x)["b"], torch.sigmoid(torch.relu(x)))
    assert "self.forward_(data)" in net.code


# ----------------------------------------------------------------------------- validation

def test_rules_select_phases_levels_and_stages(tmp_path):
    path = write(tmp_path, """
        inputs: {data: [1, 1, 2, 2]}
        layers:
          - {name: up, type: ReLU, bottom: data, top: a, include: {phase: TRAIN, min_level: 1}}
          - {name: st, type: ReLU, bottom: data, top: b, include: {stage: [x, y]}}
          - {name: ns, type: ReLU, bottom: data, top: c, exclude: [{not_stage: x}]}
    """)
    assert set(pacnet.build(path, phase="train").shapes) == {"data"}
    assert set(pacnet.build(path, phase="train", level=1).shapes) == {"data", "a"}
    assert set(pacnet.build(path, stages=["x"]).shapes) == {"data", "c"}
    assert set(pacnet.build(path, stages=["x", "y"]).shapes) == {"data", "b", "c"}


# ----------------------------------------------------------------------------- --var

def test_a_misspelt_var_is_an_error_with_a_suggestion(tmp_path, capsys):
    path = write(tmp_path, """
        vars: {NUM_LABELS: 21, UNUSED_DEFAULT: 1}
        inputs: {data: [1, 2, 4, 4]}
        layers:
          - {name: c, type: Convolution, bottom: data, top: c, num_output: "${NUM_LABELS}",
             kernel_size: 1}
    """)
    assert main(["build", path, "--var", "NUM_LABEL=19"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}:1:1: template variable NUM_LABEL given, but no ${{...}}")
    assert "did you mean 'NUM_LABELS'" in err
    # The Python API warns: one vars dict may serve a family of nets, as in Caffe's scripts.
    with pytest.warns(UnusedVariableWarning,
                      match="(?s)NUM_LABEL given.*did you mean 'NUM_LABELS'"):
        pacnet.build(path, vars={"NUM_LABEL": 19})
    # a name the net declares under vars: may be given even where nothing uses it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pacnet.build(path, vars={"NUM_LABELS": 3, "UNUSED_DEFAULT": 2}).shapes["c"][1] == 3
    proto = tmp_path / "net.prototxt"
    proto.write_text('input: "data"\ninput_dim: 1\ninput_dim: 2\ninput_dim: 4\ninput_dim: 4\n'
                     'layer { name: "r_${EXP}" type: "ReLU" bottom: "data" top: "r" }\n'
                     '# ${EXPS} in a comment is not a use\n')
    with pytest.warns(UnusedVariableWarning, match="(?s)EXPS given.*did you mean 'EXP'"):
        pacnet.build(str(proto), vars={"EXP": "a", "EXPS": "b"})
    assert main(["build", str(proto), "--var", "EXP=a", "--var", "EXPS=b"]) == 2
    assert main(["convert", str(proto), "--var", "EXP=a", "--var", "EXPS=b"]) == 2
    assert "EXPS given" in capsys.readouterr().err


# ----------------------------------------------------------------------------- input shapes

def test_numeric_input_shapes_are_defaults_that_inputs_replace(tmp_path, capsys):
    path = write(tmp_path, """
        inputs: {data: [1, 3, 32, 32]}
        layers:
          - {name: c, type: Convolution, bottom: data, top: c, num_output: 2, kernel_size: 3,
             stride: 2}
    """)
    assert pacnet.build(path, inputs={"data": (2, 3, 17, 21)}).shapes["c"] == (2, 2, 8, 10)
    assert main(["build", path, "--input", "data=1x3x9x9", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["blobs"]["c"] == [1, 2, 4, 4]
    with pytest.raises(ShapeError) as err:
        pacnet.build(path, inputs={"data": (3, 32, 32)})
    assert "input 'data' is given 3 axes (3, 32, 32), the net declares 4" in str(err.value)
    assert "--input" not in str(err.value)
    with pytest.raises(ShapeError, match="has size 0 on axis 1"):
        pacnet.build(path, inputs={"data": (1, 0, 32, 32)})
    with pytest.raises(PacnetError, match="must be a sequence of ints"):
        pacnet.build(path, inputs={"data": "1x3x32x32"})


def test_inputs_binding_one_symbol_two_ways_are_an_error(tmp_path):
    path = write(tmp_path, """
        inputs: {a: [N, 1, H, W], b: [N, 1, H, W]}
        dims: {N: 1, H: 4, W: 4}
        layers:
          - {name: s, type: Eltwise, bottom: [a, b], top: s}
    """)
    assert pacnet.build(path, inputs={"a": (2, 1, 5, 6)}).shapes["b"] == (2, 1, 5, 6)
    with pytest.raises(ShapeError, match=r"dim H two values: 5 \(axis 2 of 'a'\) and 7"):
        pacnet.build(path, inputs={"a": (2, 1, 5, 6), "b": (2, 1, 7, 6)})


def test_imported_deploy_nets_run_at_other_sizes_or_say_which_layer_needs_one():
    from test_caffe_import import GRAPHS

    FCN_DEPLOY = f"{GRAPHS}/fcn/voc-fcn8s/deploy.prototxt"
    PSP = f"{GRAPHS}/pspnet/pspnet50_ADE20K_473.prototxt"
    net = pacnet.build(FCN_DEPLOY, inputs={"data": (2, 3, 256, 256)}, device="meta")
    assert net.shapes["score"] == (2, 21, 256, 256)
    with pytest.raises(ShapeError) as err:
        pacnet.build(PSP, inputs={"data": (1, 3, 385, 385)}, device="meta")
    text = str(err.value)
    assert "conv5_3_concat" in text and "needs its declared input size (data 1x3x473x473)" in text
    assert "'conv5_3_pool6_interp' (Interp, line" in text


# ----------------------------------------------------------------------------- copies

def small_train_net():
    return pacnet.build({"inputs": {"data": [2, 2, 4, 4]}, "layers": [
        conv("a", "data", param=[{"name": "w"}]),
        {"name": "bn", "type": "BatchNorm", "bottom": "a", "top": "a"},
        conv("b", "a", param=[{"name": "w"}]),
        {"name": "loss", "type": "EuclideanLoss", "bottom": ["b", "data"]}]}, phase="train")


def test_net_deep_copies_pickles_and_saves_whole():
    net = small_train_net()
    x = torch.randn(2, 2, 4, 4)
    for other in (copy.deepcopy(net), _saved_and_loaded(net)):
        assert isinstance(other, pacnet.Net) and other.training
        assert other.b.weight is other.a.weight  # sharing survives
        assert other.code == net.code and other.shapes == net.shapes
        assert other.backward_needs == net.backward_needs
        torch.testing.assert_close(other.total_loss(other(x)), net.total_loss(net(x)))
    # the copy is independent
    clone = copy.deepcopy(net)
    with torch.no_grad():
        clone.a.weight.add_(1)
    assert not torch.equal(clone.a.weight, net.a.weight)


def _saved_and_loaded(net):
    buf = io.BytesIO()
    torch.save(net, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def test_averaged_model_ema_of_a_net():
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    net = small_train_net()
    ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(0.5))
    start = net.a.weight.detach().clone()
    ema.update_parameters(net)  # the first update copies
    with torch.no_grad():
        net.a.weight.add_(2.0)
    ema.update_parameters(net)
    torch.testing.assert_close(ema.module.a.weight, start + 2.0 * 0.5)
    assert ema.module.b.weight is ema.module.a.weight
    x = torch.randn(2, 2, 4, 4)
    assert set(ema(x)) == {"loss"}


# ----------------------------------------------------------------------------- dtype

def test_double_is_float64_everywhere(tmp_path):
    """A net built in float32 and converted with .double() computes what the same net built
    in float64 computes (same state_dict): every constant follows the module's dtype."""
    text = {"inputs": {"data": [1, 2, 4, 4]}, "layers": [
        {"name": "d", "type": "DummyData", "top": "k", "shape": [[1, 2, 4, 4]],
         "data_filler": [{"type": "constant", "value": 0.1}]},
        {"name": "p", "type": "Power", "bottom": "data", "top": "p", "scale": 0.7, "shift": 0.3},
        {"name": "e", "type": "Eltwise", "bottom": ["p", "k"], "top": "e", "coeff": [0.3, 0.7]},
        {"name": "s", "type": "Scale", "bottom": "e", "top": "s", "bias_term": True,
         "filler": {"type": "constant", "value": 0.7}},
        {"name": "crf", "type": "PacCRF", "bottom": ["s", "data"], "top": "crf", "num_steps": 2,
         "unary_weight": 0.7, "pairwise_kernels": [{"kernel_size": 3, "pairwise_weight": 0.7},
                                                   {"compat_type": "2d", "pairwise_weight": 0.3}]}]}
    converted = pacnet.build(text).double()
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        native = pacnet.build(text)
    finally:
        torch.set_default_dtype(default)
    native.load_state_dict(converted.state_dict())
    x = torch.rand(1, 2, 4, 4, dtype=torch.float64)
    assert all(t.dtype == torch.float64 for t in converted.state_dict().values()
               if t.is_floating_point())
    assert torch.equal(converted(x)["crf"], native(x)["crf"])


def test_ddp_trains_a_net_with_a_branch_no_loss_reaches(tmp_path):
    """Two gloo ranks (forked): without taking the unreached blobs out of autograd, DDP
    stops at the second iteration ("Expected to have finished reduction ...")."""
    import torch.multiprocessing as mp

    if "fork" not in mp.get_all_start_methods():
        pytest.skip("needs the fork start method")
    mp.start_processes(_ddp_rank, args=(str(tmp_path),), nprocs=2, join=True, start_method="fork")
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def _ddp_rank(rank, folder):
    import os

    import torch.distributed as dist

    from pacnet.engine import trainer
    from test_checkpoint import DEPTH_NET, _net

    torch.set_num_threads(1)  # a forked child must not enter the parent's OpenMP pool
    os.environ.update({"WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank)})
    net = _net(DEPTH_NET, max_iter=2, snapshot=0)
    net["layers"].insert(2, {"name": "side", "type": "Convolution", "bottom": "g1", "top": "side",
                             "num_output": 2, "kernel_size": 1, "weight_filler": {"type": "msra"}})
    dist.init_process_group("gloo", init_method=f"file://{folder}/rdv", rank=rank, world_size=2)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = trainer.train(net, os.path.join(folder, "run"), tensorboard=False,
                                   device="cpu")
        said = [str(w.message) for w in caught if "no loss reaches" in str(w.message)]
        assert len(said) == (1 if rank == 0 else 0), said
        torch.save(result["net"].state_dict(), os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
