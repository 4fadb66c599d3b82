"""Input and DummyData: declared shapes, Caffe's fillers and refill rule, the xy filler."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from layer_helpers import build, infer, layer_error, make_spec, run_layer
from layer_helpers import single_thread  # noqa: F401  (autouse: one torch thread)
from pacnet.errors import GraphError, SchemaError
from pacnet.registry import get


# ----------------------------------------------------------------------------- Input

@pytest.mark.parametrize("shape,n_tops,expected", [
    ([[1, 3, 500, 500]], 1, [(1, 3, 500, 500)]),
    ([1, 3, 500, 500], 1, [(1, 3, 500, 500)]),
    ({"dim": [1, 3, 5, 5]}, 1, [(1, 3, 5, 5)]),
    ([[2, 3, 4, 4]], 2, [(2, 3, 4, 4), (2, 3, 4, 4)]),
    ([[2, 3, 4, 4], [2, 1, 4, 4]], 2, [(2, 3, 4, 4), (2, 1, 4, 4)]),
    ([{"dim": [7]}, {"dim": 5}], 2, [(7,), (5,)]),
])
def test_input_declared_shapes(shape, n_tops, expected):
    spec = make_spec("Input", n_bottoms=0, n_tops=n_tops, shape=shape)
    assert infer(spec) == expected
    assert get("Input").flops(spec, [], expected) == 0


def test_input_module_is_not_callable():
    spec = make_spec("Input", name="input", n_bottoms=0, shape=[[1, 3, 4, 4]])
    module = build(spec)
    with layer_error("graph inputs", layer="input", cls=GraphError):
        module()


@pytest.mark.parametrize("kwargs,match", [
    (dict(n_tops=2, shape=[[1, 2], [1, 2], [3, 4]]), "once per top"),
    (dict(), "shape"),
    (dict(shape=[[1, 0, 2]]), "shape"),
    (dict(shape=[]), "shape"),
    (dict(n_bottoms=1, shape=[[1, 2]]), "bottoms"),
])
def test_input_errors(kwargs, match):
    kwargs.setdefault("n_bottoms", 0)
    with layer_error(match, layer="data"):
        make_spec("Input", name="data", **kwargs)


# ----------------------------------------------------------------------------- DummyData shapes

def dummy(n_tops=1, **params):
    return make_spec("DummyData", n_bottoms=0, n_tops=n_tops, **params)


@pytest.mark.parametrize("params,n_tops,expected", [
    (dict(shape=[[1, 2, 3, 4]]), 1, [(1, 2, 3, 4)]),
    (dict(shape=[[1, 2, 3, 4]]), 2, [(1, 2, 3, 4)] * 2),
    (dict(shape=[[5], [2, 3]]), 2, [(5,), (2, 3)]),
    (dict(num=2, channels=3, height=4, width=5), 1, [(2, 3, 4, 5)]),
    (dict(num=[2, 1], channels=3, height=[4, 6], width=5), 2, [(2, 3, 4, 5), (1, 3, 6, 5)]),
])
def test_dummy_data_shapes(params, n_tops, expected):
    spec = dummy(n_tops, **params)
    assert infer(spec) == expected
    tops = run_layer(spec)
    assert [tuple(t.shape) for t in tops] == expected
    # no filler: Caffe's constant 0
    assert all(torch.count_nonzero(t) == 0 for t in tops)


def test_dummy_data_constant_filled_once_random_refilled_every_forward():
    spec = dummy(3, shape=[[2, 3, 4, 4]], data_filler=[
        {"type": "constant", "value": 1.5},
        {"type": "gaussian", "std": 2.0},
        {"type": "uniform", "min": -1, "max": 1},
    ])
    module = build(spec)
    a1, g1, u1 = run_layer(spec, module=module)
    a2, g2, u2 = run_layer(spec, module=module)
    assert torch.equal(a1, torch.full((2, 3, 4, 4), 1.5)) and torch.equal(a1, a2)
    assert not torch.equal(g1, g2) and not torch.equal(u1, u2)
    module.train()
    a3, g3, _ = run_layer(spec, module=module)
    assert torch.equal(a1, a3) and not torch.equal(g2, g3)
    # the refilled tops come from torch's global RNG: reproducible under manual_seed
    torch.manual_seed(3)
    _, g4, _ = module()
    torch.manual_seed(3)
    _, g5, _ = module()
    assert torch.equal(g4, g5)
    # mutating an output does not change the next one
    a1.add_(1)
    assert torch.equal(module()[0], a2)


def test_dummy_data_shared_filler_applies_to_all_tops():
    spec = dummy(2, shape=[[3, 4], [5]], data_filler={"type": "constant", "value": -2})
    a, b = run_layer(spec)
    assert torch.equal(a, torch.full((3, 4), -2.0)) and torch.equal(b, torch.full((5,), -2.0))
    spec = dummy(2, shape=[[3, 4], [5]], data_filler=[{"type": "constant", "value": 7}])
    a, b = run_layer(spec)
    assert (a == 7).all() and (b == 7).all()


def test_dummy_data_follows_module_dtype():
    spec = dummy(2, shape=[[2, 2, 3, 3]], data_filler=[{"type": "gaussian"}, {"type": "xy"}])
    module = build(spec).double()
    g, xy = module()
    assert g.dtype == torch.float64 and xy.dtype == torch.float64


# ----------------------------------------------------------------------------- fillers' values

def _filled(shape, filler, seed=0):
    torch.manual_seed(seed)
    spec = dummy(shape=[list(shape)], data_filler=filler)
    (t,) = run_layer(spec, module=build(spec).double())
    return t


def test_fillers_gaussian_uniform_statistics():
    t = _filled((200, 300), {"type": "gaussian", "mean": 3.0, "std": 0.5})
    assert abs(t.mean().item() - 3.0) < 0.01 and abs(t.std().item() - 0.5) < 0.01
    t = _filled((200, 300), {"type": "uniform", "min": -2.0, "max": 6.0})
    assert t.min() >= -2 and t.max() <= 6
    assert abs(t.mean().item() - 2.0) < 0.05 and abs(t.var().item() - 64 / 12) < 0.1
    t = _filled((200, 300), {"type": "gaussian", "sparse": 50})
    # Caffe keeps a value with probability sparse / shape[0] = 0.25
    assert abs((t != 0).double().mean().item() - 0.25) < 0.01


def test_fillers_positive_unitball_rows_sum_to_one():
    t = _filled((6, 3, 4, 5), {"type": "positive_unitball"})
    assert (t >= 0).all()
    torch.testing.assert_close(t.reshape(6, -1).sum(1), torch.ones(6, dtype=torch.float64))


@pytest.mark.parametrize("norm", ["FAN_IN", "FAN_OUT", "AVERAGE"])
def test_fillers_xavier_msra_use_caffe_fans(norm):
    shape = (64, 32, 3, 3)       # fan_in = count/num = 288, fan_out = count/channels = 576
    n = {"FAN_IN": 288, "FAN_OUT": 576, "AVERAGE": 432}[norm]
    t = _filled(shape, {"type": "xavier", "variance_norm": norm})
    scale = math.sqrt(3 / n)
    assert t.abs().max() <= scale * (1 + 1e-9) and t.abs().max() > 0.99 * scale
    t = _filled(shape, {"type": "msra", "variance_norm": norm})
    assert abs(t.std().item() / math.sqrt(2 / n) - 1) < 0.03


def test_fillers_bilinear_taps():
    t = _filled((2, 3, 4, 4), {"type": "bilinear"})
    taps = torch.tensor([0.25, 0.75, 0.75, 0.25], dtype=torch.float64)
    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(t[i, j], taps[:, None] * taps[None, :], rtol=0, atol=1e-7)


# ----------------------------------------------------------------------------- the xy filler

def caffe_xy_filler(num, channels, height, width):
    """Port of segaware's XYFiller::Fill (filler.hpp), bug included."""
    data = np.zeros(num * channels * height * width)
    for n in range(num):
        for c in range(channels):
            for j in range(height):
                for i in range(width):
                    idx = i + j * width + c * height * width + n * c * height * width
                    data[idx] = i if c == 0 else j
    return data.reshape(num, channels, height, width)


def test_xy_filler_values_batch_one_equal_caffe():
    (t,) = run_layer(dummy(shape=[[1, 2, 5, 7]], data_filler={"type": "xy"}))
    np.testing.assert_array_equal(t.numpy(), caffe_xy_filler(1, 2, 5, 7))
    assert t[0, 0, 3, 6] == 6 and t[0, 1, 3, 6] == 3   # channel 0 = x (column), 1 = y (row)


def test_xy_filler_is_correct_for_batches():
    spec = dummy(shape=[[3, 2, 4, 6]], data_filler={"type": "xy"})
    module = build(spec)
    (t,) = run_layer(spec, module=module)
    cols = torch.arange(6.0).expand(4, 6)
    rows = torch.arange(4.0)[:, None].expand(4, 6)
    for n in range(3):
        assert torch.equal(t[n, 0], cols) and torch.equal(t[n, 1], rows)
    # Caffe's filler writes image 0 right and images n > 0 wrong; pacnet deviates on purpose
    caffe = caffe_xy_filler(3, 2, 4, 6)
    np.testing.assert_array_equal(t[0].numpy(), caffe[0])
    assert not np.array_equal(t[1].numpy(), caffe[1])
    # deterministic: the same values on every forward
    assert torch.equal(module(), t)


def test_segaware_xy_dummy_data():
    # res/test: DummyData shape [BATCH_SIZE, 2, HALF_SIZE, HALF_SIZE] = 1 x 2 x 257 x 257
    (t,) = run_layer(dummy(shape=[[1, 2, 257, 257]], data_filler=[{"type": "xy"}]))
    assert t[0, 0, 0, 256] == 256 and t[0, 1, 256, 0] == 256 and t.sum() == 2 * 257 * 256 * 257 / 2


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("params,n_tops,match", [
    (dict(shape=[[1, 2]], num=1, channels=1, height=1, width=1), 1, "not both"),
    (dict(num=1, channels=1, height=1), 1, "missing width"),
    (dict(num=[1, 2], channels=1, height=1, width=1), 3, "num once, or once per top"),
    (dict(shape=[[1], [2]]), 3, "shape once, or once per top"),
    (dict(shape=[[1]], data_filler=[{"type": "gaussian"}] * 2), 3, "data_filler once"),
    (dict(shape=[[1, 3, 4, 4]], data_filler={"type": "xy"}), 1, "N x 2 x H x W"),
    (dict(shape=[[2, 4, 4]], data_filler={"type": "xy"}), 1, "N x 2 x H x W"),
    (dict(shape=[[1, 1, 4, 3]], data_filler={"type": "bilinear"}), 1, "square 4-D"),
    (dict(shape=[[1, 1]], data_filler={"type": "constant", "sparse": 3}), 1, "sparse"),
    (dict(shape=[[1, 1]], data_filler={"type": "uniform", "min": 2, "max": 1}), 1, "min <= max"),
    (dict(), 1, "needs shape"),
    (dict(shape=[[1, 1]], data_filler={"type": "sobel"}), 1, "data_filler"),
    (dict(shape=[[1, 1]], data_filler={"type": "gaussian", "sigma": 1}), 1, "data_filler"),
    (dict(shape=[[1, -1]]), 1, "shape"),
])
def test_dummy_data_errors(params, n_tops, match):
    with layer_error(match, layer="xy"):
        make_spec("DummyData", name="xy", n_bottoms=0, n_tops=n_tops, **params)


def test_dummy_data_takes_no_bottoms():
    with layer_error("bottoms", layer="xy", cls=SchemaError):
        make_spec("DummyData", name="xy", n_bottoms=1, shape=[[1]])
