"""The PacCRF / PacCRFLoose layer types (layers/crf.py): schema, the model shorthand and its
precedence, bottoms (shared or per-kernel features), infer() against the module, the
original's state_dict names under the layer, and located errors for bad nets and inputs."""

from __future__ import annotations

import textwrap

import pytest
import torch

import pacnet
from layer_helpers import build, defaults, infer, layer_error, make_spec, run_layer, rand
from layer_helpers import single_thread  # noqa: F401
from test_crf import numba_one_thread  # noqa: F401
from pacnet import registry
from pacnet.crf import PacCRF, PacCRFLoose
from pacnet.errors import PacnetError, SchemaError, ShapeError

D64 = torch.float64
N, C, H, W = 2, 3, 9, 10



@pytest.mark.parametrize("type_name", ["PacCRF", "PacCRFLoose"])
def test_registered_with_documented_schema(type_name):
    layer = registry.get(type_name)
    props = layer.schema()["properties"]
    assert set(props) == {"num_steps", "final_output", "perturbed_init", "fixed_weighting",
                          "unary_weight", "pairwise_kernels", "model"}
    for key, sub in props.items():
        assert sub.get("description"), key
    kernel = props["pairwise_kernels"]["items"]["properties"]
    assert {k: v["default"] for k, v in kernel.items()} == dict(
        kernel_size=3, dilation=1, blur=1, compat_type="4d", spatial_filter=True,
        pairwise_weight=1.0)
    assert defaults(type_name) == dict(num_steps=5, final_output="log_Q", perturbed_init=True,
                                       fixed_weighting=False, unary_weight=1.0)
    assert layer.doc()


def test_model_shorthand_builds_the_same_crf_as_explicit_kernels():
    unary, feat = rand(N, C, H, W), rand(N, 3, H, W, seed=1)
    a = make_spec("PacCRF", n_bottoms=2, model="crfi3p4d5121p2ds3112", final_output="softmax")
    b = make_spec("PacCRF", n_bottoms=2, num_steps=3, final_output="softmax", pairwise_kernels=[
        {"kernel_size": 5, "dilation": 12, "compat_type": "4d", "spatial_filter": False},
        {"kernel_size": 3, "dilation": 11, "blur": 2, "compat_type": "2d"}])
    torch.manual_seed(0)
    ma = build(a, unary.shape, feat.shape, dtype=D64)
    torch.manual_seed(0)
    mb = build(b, unary.shape, feat.shape, dtype=D64)
    assert isinstance(ma, PacCRF) and ma.num_steps == 3
    assert ma.pairwise_repr == mb.pairwise_repr == ["4d_5_12_1", "2ds_3_11_2"]
    sa, sb = ma.state_dict(), mb.state_dict()
    assert list(sa) == list(sb) == ["unary_weight", "messengers.0.weight", "messengers.1.weight",
                                    "compat.1.weight", "pairwise_weights.0", "pairwise_weights.1"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    (ya,) = run_layer(a, unary, feat, module=ma)
    (yb,) = run_layer(b, unary, feat, module=mb)
    torch.testing.assert_close(ya, yb, rtol=0, atol=0)
    torch.testing.assert_close(ya.sum(1), torch.ones(N, H, W, dtype=D64))


def test_layer_equals_the_python_module():
    kernels = [{"kernel_size": 5, "dilation": 2}, {"compat_type": "potts", "spatial_filter": False,
                                                   "blur": 2, "pairwise_weight": 0.5}]
    spec = make_spec("PacCRF", n_bottoms=2, num_steps=2, unary_weight=0.5, pairwise_kernels=kernels,
                     final_output="log_softmax")
    unary, feat = rand(N, C, H, W), rand(N, 4, H, W, seed=1)
    module = build(spec, unary.shape, feat.shape, dtype=D64)
    crf = PacCRF(C, 2, final_output="log_softmax", unary_weight=0.5,
                 pairwise_kernels=kernels).to(D64)
    crf.load_state_dict(module.state_dict(), strict=True)
    (y,) = run_layer(spec, unary, feat, module=module)
    torch.testing.assert_close(y, crf(unary, feat), rtol=0, atol=0)


def test_per_kernel_feature_bottoms_and_loose_type():
    kernels = [{"kernel_size": 3}, {"compat_type": "2d", "dilation": 2}]
    spec = make_spec("PacCRFLoose", n_bottoms=3, num_steps=2, pairwise_kernels=kernels)
    unary, f0, f1 = rand(N, C, H, W), rand(N, 2, H, W, seed=1), rand(N, 5, H, W, seed=2)
    module = build(spec, unary.shape, f0.shape, f1.shape, dtype=D64)
    assert isinstance(module, PacCRFLoose) and len(module.steps) == 2
    assert "steps.1.compat.1.weight" in module.state_dict()
    (y,) = run_layer(spec, unary, f0, f1, module=module)
    torch.testing.assert_close(y, PacCRFLoose.forward(module, unary, [f0, f1]))
    # gradients reach the unary and both feature bottoms
    u, a, b = (t.clone().requires_grad_() for t in (unary, f0, f1))
    module(u, a, b).sum().backward()
    assert all(t.grad.abs().sum() > 0 for t in (u, a, b))


def test_loose_model_shorthand_and_num_steps_precedence():
    spec = make_spec("PacCRFLoose", n_bottoms=2, model="crfi4lp4d3121")
    m = build(spec, (1, C, 8, 8), (1, 3, 8, 8))
    assert len(m.steps) == 4
    spec = make_spec("PacCRFLoose", n_bottoms=2, model="crfi4lp4d3121", num_steps=2)
    assert len(build(spec, (1, C, 8, 8), (1, 3, 8, 8)).steps) == 2  # written num_steps wins
    spec = make_spec("PacCRF", n_bottoms=2, model="crf")  # default: 5 steps, 4d 5x5 d16
    m = build(spec, (1, C, 8, 8), (1, 3, 8, 8))
    assert m.num_steps == 5 and m.pairwise_repr == ["4d_5_16_1"]


def test_infer_and_flops():
    spec = make_spec("PacCRF", n_bottoms=2, model="crfi5p4d5641p4d5161")
    assert infer(spec, (1, 21, 64, 64), (1, 3, 64, 64)) == [(1, 21, 64, 64)]
    layer = registry.get("PacCRF")
    f5 = layer.flops(spec, [(1, 21, 64, 64), (1, 3, 64, 64)], [(1, 21, 64, 64)])
    spec10 = make_spec("PacCRF", n_bottoms=2, model="crfi10p4d5641p4d5161")
    f10 = layer.flops(spec10, [(1, 21, 64, 64), (1, 3, 64, 64)], [(1, 21, 64, 64)])
    macs = 2 * 21 * 21 * 25 * 64 * 64  # one 4d message
    assert 5 * 2 * macs < f5 < 5 * 2 * macs * 1.1 and f10 > 1.9 * f5


def test_net_from_yaml_has_the_original_names_under_the_layer(tmp_path):
    path = tmp_path / "net.yaml"
    path.write_text(textwrap.dedent("""
        pacnet_version: 1
        inputs:
          unary: [1, 3, 9, 10]
          img: [1, 3, 9, 10]
        layers:
          - {name: crf, type: PacCRF, bottom: [unary, img], top: prob, model: crfi2p4d3121p0d3111,
             final_output: softmax}
    """).lstrip())
    net = pacnet.build(path).to(D64)
    keys = list(net.state_dict())
    assert keys == ["crf.unary_weight", "crf.messengers.0.weight", "crf.messengers.1.weight",
                    "crf.pairwise_weights.0", "crf.pairwise_weights.1"]
    out = net(rand(1, 3, 9, 10), rand(1, 3, 9, 10, seed=1))["prob"]
    assert out.shape == (1, 3, 9, 10)
    torch.testing.assert_close(out.sum(1), torch.ones(1, 9, 10, dtype=D64))
    # features of the wrong size at run time: a PacnetError naming the layer
    with pytest.raises(PacnetError, match=r"layer 'crf' \(PacCRF\).*edge features"):
        net(rand(1, 3, 9, 10), rand(1, 3, 9, 11))


@pytest.mark.parametrize("params, n_bottoms, key, match", [
    (dict(model="crfi5p4d5161", pairwise_kernels=[{}]), 2, "pairwise_kernels", "not both"),
    (dict(), 2, None, "needs pairwise_kernels or model"),
    (dict(model="crfi5lp4d5161"), 2, "model", "loose CRF but the layer is PacCRF"),
    (dict(model="crfi5p4d5161x"), 2, "model", r"'4d5161x'"),
    (dict(model="crfi5p4d4161"), 2, "model", "kernel size 4 must be odd"),
    (dict(model="crfi5p7d5161"), 2, "model", "unknown pairwise type '7d'"),
    (dict(model="fcn8s_crf"), 2, "model", "contains '_'"),
    (dict(pairwise_kernels=[{}, {"kernel_size": 4}]), 2, "pairwise_kernels",
     "pairwise kernel 1: kernel_size must be odd, got 4"),
    (dict(pairwise_kernels=[{}, {}]), 4, None, "has 4 bottoms"),
    (dict(pairwise_kernels=[{}]), 1, None, "has 1 bottoms"),
])
def test_bad_layers_are_located_errors(params, n_bottoms, key, match):
    with layer_error(match) as info:
        make_spec("PacCRF", n_bottoms=n_bottoms, **params)
    if key is not None:
        assert str(info.value.location).startswith("<test>:") and info.value.location.line > 1


def test_loose_type_with_a_tied_model_is_an_error():
    with layer_error("tied CRF but the layer is PacCRFLoose"):
        make_spec("PacCRFLoose", n_bottoms=2, model="crfi5p4d5161")


def test_only_na_kernels_need_no_feature_bottom():
    spec = make_spec("PacCRF", n_bottoms=1, num_steps=2, pairwise_kernels=[{"compat_type": "na"}])
    (y,) = run_layer(spec, rand(N, C, H, W))
    assert y.shape == (N, C, H, W)


@pytest.mark.parametrize("params, match", [
    (dict(model="crf", final_output="probs"), "final_output"),
    (dict(pairwise_kernels=[{"compat_type": "pots"}]), "compat_type"),
    (dict(pairwise_kernels=[{"kernel_size": 3, "blurr": 2}]), "blurr"),
    (dict(model="crf", num_steps=0), "num_steps"),
    (dict(pairwise_kernels=[]), "pairwise_kernels"),
])
def test_schema_violations(params, match):
    with pytest.raises(SchemaError, match=match):
        make_spec("PacCRF", n_bottoms=2, **params)


def test_mismatched_bottoms_are_shape_errors():
    spec = make_spec("PacCRF", n_bottoms=2, model="crf")
    with layer_error(r"edge features \(bottom 1\) must be \[2, F, 9, 10\].*got \[2, 3, 9, 8\]",
                     cls=ShapeError):
        infer(spec, (N, C, H, W), (N, 3, H, 8))
    with layer_error("unary", cls=ShapeError):
        infer(spec, (N, C, H), (N, 3, H, W))


def test_position_features_are_the_originals_create_position_feats():
    from pacnet.crf import create_position_feats

    spec = make_spec("PositionFeatures", scale=3.0)
    assert defaults("PositionFeatures") == {"scale": 1.0}
    x = rand(2, 5, 4, 7)
    (pos,) = run_layer(spec, x)
    assert pos.dtype == D64 and pos.shape == (2, 2, 4, 7)
    torch.testing.assert_close(pos, create_position_feats((4, 7), 3.0, bs=2, dtype=D64), rtol=0, atol=0)
    assert pos[1, 0, 3, 5] == 1.0 and pos[1, 1, 3, 6] == 2.0  # channel 0 the row y / 3, 1 the column x / 3
    with layer_error("4-D", cls=ShapeError):
        infer(spec, (2, 5, 4))
    with layer_error("scale", cls=SchemaError):
        make_spec("PositionFeatures", scale=0)
