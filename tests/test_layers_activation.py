"""Activation layers and Dropout: shapes, Caffe's formulas, special cases, errors."""

from __future__ import annotations

import math

import pytest
import torch

from layer_helpers import build, defaults, infer, layer_error, make_spec, run_layer, rand
from pacnet.errors import SchemaError, ShapeError
from pacnet.registry import get

TYPES = ["ReLU", "PReLU", "Sigmoid", "TanH", "AbsVal", "Power", "Exp", "Log", "Dropout"]
SHAPES = [(2, 3), (2, 3, 4), (1, 2, 3, 4), (2, 1, 2, 2, 3)]
D = torch.float64





@pytest.mark.parametrize("type_name", TYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_shape_is_preserved(type_name, shape):
    params = {"base": 2.0, "shift": 10.0} if type_name == "Log" else {}
    spec = make_spec(type_name, **params)
    x = rand(*shape)
    (y,) = run_layer(spec, x)
    assert y.shape == x.shape and y.dtype == D


@pytest.mark.parametrize("slope", [0.0, 0.1, -0.5])
def test_relu_formula_and_gradient(slope):
    x = rand(3, 4, 5)
    x[0, 0, :3] = 0.0
    x.requires_grad_(True)
    (y,) = run_layer(make_spec("ReLU", negative_slope=slope), x)
    expected = x.clamp(min=0) + slope * x.clamp(max=0)
    torch.testing.assert_close(y, expected)
    y.sum().backward()
    # Caffe's ReLU backward: 1 for x > 0, negative_slope for x <= 0.
    torch.testing.assert_close(x.grad, torch.where(x > 0, 1.0, slope).to(D))


@pytest.mark.parametrize("shared", [False, True])
def test_prelu_values_blob_shape_and_filler(shared):
    spec = make_spec("PReLU", channel_shared=shared)
    m = build(spec, (2, 3, 4, 4), dtype=D)
    assert tuple(m.weight.shape) == (() if shared else (3,))
    torch.testing.assert_close(m.weight, torch.full_like(m.weight, 0.25))   # Caffe default filler
    with torch.no_grad():
        m.weight.copy_(torch.tensor(0.7, dtype=D) if shared else torch.tensor([0.1, -2.0, 3.0], dtype=D))
    x = rand(2, 3, 4, 4)
    (y,) = run_layer(spec, x, module=m)
    a = m.weight.detach().reshape(1, -1, 1, 1) if not shared else m.weight.detach()
    torch.testing.assert_close(y, torch.where(x > 0, x, a * x))


def test_prelu_gradcheck_and_zero_input_gradient():
    spec = make_spec("PReLU", filler={"type": "uniform", "min": -1.0, "max": 1.0})
    m = build(spec, (2, 3, 5), dtype=D)
    x = rand(2, 3, 5).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda inp, w: torch.where(inp > 0, inp, w.reshape(1, -1, 1) * inp),
                                    (x, m.weight.detach().clone().requires_grad_(True)))
    assert torch.autograd.gradcheck(m, (x,))
    z = torch.zeros(1, 3, 1, dtype=D, requires_grad=True)
    m(z).sum().backward()
    torch.testing.assert_close(z.grad.flatten(), m.weight.detach())   # Caffe: slope at x == 0


def test_prelu_needs_two_axes():
    with layer_error("at least 2 axes", cls=ShapeError):
        infer(make_spec("PReLU"), (5,))


def test_sigmoid_tanh_absval():
    x = rand(2, 3, 4)
    torch.testing.assert_close(run_layer(make_spec("Sigmoid"), x)[0], 1 / (1 + torch.exp(-x)))
    torch.testing.assert_close(run_layer(make_spec("TanH"), x)[0],
                               (torch.exp(x) - torch.exp(-x)) / (torch.exp(x) + torch.exp(-x)))
    torch.testing.assert_close(run_layer(make_spec("AbsVal"), x)[0], x.abs())


@pytest.mark.parametrize("power,scale,shift", [
    (1.0, 1.0, 0.0), (2.0, 0.5, 1.0), (-1.0, 1.0, 1e-4), (0.5, 2.0, 3.0), (3.0, -1.5, 0.25),
    (1.0, 0.0039215, 0.0),
])
def test_power_formula(power, scale, shift):
    x = rand(2, 3, 4).abs() + 0.1
    (y,) = run_layer(make_spec("Power", power=power, scale=scale, shift=shift), x)
    torch.testing.assert_close(y, (shift + scale * x) ** power)


@pytest.mark.parametrize("power,scale,shift,value", [(0.0, 2.0, 5.0, 1.0), (2.0, 0.0, 3.0, 9.0),
                                                     (0.0, 0.0, 0.0, 1.0)])
def test_power_constant_special_cases(power, scale, shift, value):
    x = rand(2, 3).requires_grad_(True)
    with torch.no_grad():
        x[0, 0] = float("inf")
    (y,) = run_layer(make_spec("Power", power=power, scale=scale, shift=shift), x)
    torch.testing.assert_close(y, torch.full((2, 3), value, dtype=D))
    y.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_power_gradcheck():
    m = build(make_spec("Power", power=2.5, scale=0.7, shift=2.0), (2, 3), dtype=D)
    assert torch.autograd.gradcheck(m, (rand(2, 3).abs().requires_grad_(True),))


@pytest.mark.parametrize("base,scale,shift", [(-1.0, 1.0, 0.0), (-1.0, -1.0, 0.0), (2.0, 1.0, 0.0),
                                              (10.0, 0.5, -1.0), (0.5, -2.0, 1.5), (-1.0, -50.0, 0.3)])
def test_exp_formula(base, scale, shift):
    x = rand(2, 3, 4) * 0.2
    (y,) = run_layer(make_spec("Exp", base=base, scale=scale, shift=shift), x)
    b = math.e if base == -1 else base
    torch.testing.assert_close(y, torch.pow(torch.tensor(b, dtype=D), shift + scale * x))


@pytest.mark.parametrize("base,scale,shift", [(-1.0, 1.0, 0.0), (2.0, 1.0, 0.0), (10.0, 3.0, 1.0),
                                              (0.5, 0.5, 2.0)])
def test_log_formula(base, scale, shift):
    x = rand(2, 3, 4).abs() + 0.05
    (y,) = run_layer(make_spec("Log", base=base, scale=scale, shift=shift), x)
    expected = torch.log(shift + scale * x)
    if base != -1:
        expected = expected / math.log(base)
    torch.testing.assert_close(y, expected)


@pytest.mark.parametrize("type_name,base", [("Exp", 0.0), ("Exp", -2.0), ("Log", -3.0), ("Log", 1.0)])
def test_bad_base_names_layer(type_name, base):
    with layer_error("base", cls=SchemaError):
        make_spec(type_name, base=base)


def test_dropout_train_is_inverted_and_test_is_identity():
    x = rand(50, 40).abs() + 1.0
    spec = make_spec("Dropout", dropout_ratio=0.3)
    m = build(spec, x.shape, dtype=D)
    m.eval()
    (y,) = run_layer(spec, x, module=m)
    assert torch.equal(y, x)
    m.train()
    torch.manual_seed(0)
    (y,) = run_layer(spec, x, module=m)
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / 0.7)
    frac = 1 - kept.double().mean().item()
    assert 0.25 < frac < 0.35, frac


def test_dropout_default_ratio_and_range():
    assert make_spec("Dropout")["dropout_ratio"] == 0.5
    with layer_error("dropout_ratio", cls=SchemaError):
        make_spec("Dropout", dropout_ratio=1.0)
    with layer_error(cls=SchemaError):
        make_spec("Dropout", dropout_ratio=-0.1)


def test_unknown_param_rejected():
    with layer_error(cls=SchemaError):
        make_spec("ReLU", slope=0.1)
