"""BatchNorm (BVLC), Scale, Bias and BN (PSPNet): Caffe's statistics, broadcasting and blobs."""

from __future__ import annotations

import pytest
import torch

from layer_helpers import build, defaults, infer, layer_error, make_spec, run_layer, rand
from pacnet.errors import SchemaError, ShapeError
from pacnet.registry import get

D = torch.float64





# ----------------------------------------------------------------------------- BatchNorm

def per_channel(x):
    """x as C x (everything else) for a reference computation."""
    c = x.shape[1] if x.dim() > 1 else 1
    return x.reshape(x.shape[0], c, -1).transpose(0, 1).reshape(c, -1)


@pytest.mark.parametrize("shape", [(4,), (3, 2), (2, 3, 4), (2, 3, 4, 5), (2, 2, 2, 3, 2)])
@pytest.mark.parametrize("phase", ["train", "test"])
def test_batchnorm_shapes(shape, phase):
    spec = make_spec("BatchNorm", phase=phase)
    m = build(spec, shape, dtype=D)
    m.train(phase == "train")
    (y,) = run_layer(spec, rand(*shape), module=m)
    assert y.shape == shape


def test_batchnorm_global_stats_divide_by_scale_factor():
    spec = make_spec("BatchNorm")
    m = build(spec, (2, 3, 4, 5), dtype=D).eval()
    mean = torch.tensor([0.5, -1.0, 2.0], dtype=D)
    var = torch.tensor([1.0, 4.0, 0.25], dtype=D)
    with torch.no_grad():
        m.mean.copy_(mean * 2.5)
        m.var.copy_(var * 2.5)
        m.scale_factor.fill_(2.5)
    x = rand(2, 3, 4, 5)
    (y,) = run_layer(spec, x, module=m)
    ref = (x - mean.view(1, 3, 1, 1)) / torch.sqrt(var.view(1, 3, 1, 1) + 1e-5)
    torch.testing.assert_close(y, ref)
    # Nothing is accumulated when global statistics are used.
    torch.testing.assert_close(m.scale_factor, torch.tensor([2.5], dtype=D))


def test_batchnorm_zero_scale_factor_reads_as_zero_stats():
    spec = make_spec("BatchNorm", eps=1e-3)
    m = build(spec, (2, 3, 4), dtype=D).eval()
    with torch.no_grad():
        m.mean.fill_(7.0)
        m.var.fill_(9.0)                                    # ignored: scale_factor is 0
    x = rand(2, 3, 4)
    torch.testing.assert_close(m(x), x / (1e-3) ** 0.5)


def test_batchnorm_train_uses_batch_stats_and_accumulates_unbiased():
    maf, eps = 0.9, 1e-4
    spec = make_spec("BatchNorm", phase="train", moving_average_fraction=maf, eps=eps)
    m = build(spec, (2, 3, 4, 5), dtype=D).train()
    x1, x2 = rand(2, 3, 4, 5, seed=1) * 2 + 1, rand(2, 3, 4, 5, seed=2) - 3
    y1 = m(x1)
    p = per_channel(x1)
    bm, bv = p.mean(1), p.var(1, unbiased=False)
    torch.testing.assert_close(y1, (x1 - bm.view(1, 3, 1, 1)) / torch.sqrt(bv.view(1, 3, 1, 1) + eps))
    mcount = p.shape[1]
    torch.testing.assert_close(m.scale_factor, torch.tensor([1.0], dtype=D))
    torch.testing.assert_close(m.mean, bm)
    torch.testing.assert_close(m.var, bv * mcount / (mcount - 1))
    m(x2)
    p2 = per_channel(x2)
    torch.testing.assert_close(m.scale_factor, torch.tensor([maf + 1.0], dtype=D))
    torch.testing.assert_close(m.mean, p2.mean(1) + maf * bm)
    torch.testing.assert_close(m.var, p2.var(1, unbiased=True) + maf * bv * mcount / (mcount - 1))
    # In the test phase the accumulated sums are divided by the accumulated factor.
    m.eval()
    x3 = rand(2, 3, 4, 5, seed=3)
    mu = (p2.mean(1) + maf * bm) / (1 + maf)
    var = (p2.var(1, unbiased=True) + maf * p.var(1, unbiased=True)) / (1 + maf)
    torch.testing.assert_close(m(x3), (x3 - mu.view(1, 3, 1, 1)) / torch.sqrt(var.view(1, 3, 1, 1) + eps))


def test_batchnorm_single_element_per_channel_has_no_correction():
    spec = make_spec("BatchNorm", phase="train")
    m = build(spec, (1, 2), dtype=D).train()
    m(torch.tensor([[3.0, -1.0]], dtype=D))
    torch.testing.assert_close(m.mean, torch.tensor([3.0, -1.0], dtype=D))
    torch.testing.assert_close(m.var, torch.zeros(2, dtype=D))


@pytest.mark.parametrize("forced", [True, False])
def test_batchnorm_use_global_stats_overrides_phase(forced):
    spec = make_spec("BatchNorm", use_global_stats=forced)
    m = build(spec, (3, 2, 4), dtype=D)
    with torch.no_grad():
        m.mean.fill_(1.0)
        m.var.fill_(2.0)
        m.scale_factor.fill_(1.0)
    x = rand(3, 2, 4)
    m.train(not forced)                                     # the opposite of what the flag says
    y = m(x)
    if forced:
        torch.testing.assert_close(y, (x - 1.0) / (2.0 + 1e-5) ** 0.5)
    else:
        p = per_channel(x)
        torch.testing.assert_close(y, (x - p.mean(1).view(1, 2, 1)) / torch.sqrt(p.var(1, unbiased=False).view(1, 2, 1) + 1e-5))
        torch.testing.assert_close(m.scale_factor, torch.tensor([1.999], dtype=D))


def test_batchnorm_blobs_are_buffers_and_gradcheck_in_train():
    layer = get("BatchNorm")
    assert layer.blobs == ("mean", "var", "scale_factor")
    m = build(make_spec("BatchNorm"), (3, 2, 2, 2), dtype=D)
    buffers = dict(m.named_buffers())
    assert set(buffers) == set(layer.blobs) and not list(m.parameters())
    assert [tuple(buffers[b].shape) for b in layer.blobs] == [(2,), (2,), (1,)]
    m.train()
    assert torch.autograd.gradcheck(m, (rand(3, 2, 2, 2).requires_grad_(True),))


# ----------------------------------------------------------------------------- Scale / Bias

def expand_at(t, axis, ndim):
    return t.reshape((1,) * axis + tuple(t.shape) + (1,) * (ndim - axis - t.dim())) if t.dim() else t


@pytest.mark.parametrize("axis,num_axes,blob_shape", [
    (1, 1, (3,)), (0, -1, (2, 3, 4, 5)), (-2, 2, (4, 5)), (1, 0, ()), (2, -1, (4, 5)), (0, 2, (2, 3)),
    (-1, 1, (5,)),
])
@pytest.mark.parametrize("bias_term", [False, True])
def test_scale_learned_blob_broadcast(axis, num_axes, blob_shape, bias_term):
    spec = make_spec("Scale", axis=axis, num_axes=num_axes, bias_term=bias_term)
    x = rand(2, 3, 4, 5)
    m = build(spec, x.shape, dtype=D)
    assert tuple(m.weight.shape) == blob_shape
    torch.testing.assert_close(m.weight, torch.ones(blob_shape, dtype=D))      # default filler 1
    if bias_term:
        assert tuple(m.bias.shape) == blob_shape
        torch.testing.assert_close(m.bias, torch.zeros(blob_shape, dtype=D))
    else:
        assert m.bias is None
    with torch.no_grad():
        m.weight.copy_(rand(*blob_shape, seed=5))
        if bias_term:
            m.bias.copy_(rand(*blob_shape, seed=6))
    (y,) = run_layer(spec, x, module=m)
    a = axis % 4 if blob_shape else 0
    ref = x * expand_at(m.weight.detach(), a, 4)
    if bias_term:
        ref = ref + expand_at(m.bias.detach(), a, 4)
    torch.testing.assert_close(y, ref)


def test_scale_filler_and_fcn_style_constant():
    spec = make_spec("Scale", filler={"type": "constant", "value": 0.01})
    m = build(spec, (1, 4, 3, 3), dtype=D)
    torch.testing.assert_close(m.weight, torch.full((4,), 0.01, dtype=D))
    x = rand(1, 4, 3, 3)
    torch.testing.assert_close(run_layer(spec, x, module=m)[0], 0.01 * x)


@pytest.mark.parametrize("axis,s_shape", [(1, (3,)), (1, (3, 4)), (0, (2, 3)), (0, ()), (-2, (4, 5)),
                                          (1, (3, 4, 5)), (3, (5,))])
def test_scale_two_bottoms_values_and_gradcheck(axis, s_shape):
    spec = make_spec("Scale", n_bottoms=2, axis=axis, bias_term=True,
                     bias_filler={"type": "uniform", "min": -1, "max": 1})
    x = rand(2, 3, 4, 5)
    s = rand(*s_shape, seed=1)
    m = build(spec, x.shape, s_shape, dtype=D)
    assert m.weight is None and tuple(m.bias.shape) == s_shape      # bias is Caffe blob 0 here
    (y,) = run_layer(spec, x, s, module=m)
    a = axis % 4 if s_shape else 0
    torch.testing.assert_close(y, x * expand_at(s, a, 4) + expand_at(m.bias.detach(), a, 4))
    assert torch.autograd.gradcheck(m, (x.clone().requires_grad_(True), s.clone().requires_grad_(True)))


def test_scale_errors_name_the_layer():
    with layer_error("does not match", cls=ShapeError):
        infer(make_spec("Scale", n_bottoms=2), (2, 3, 4), (4,))
    with layer_error("does not match", cls=ShapeError):
        infer(make_spec("Scale", n_bottoms=2, axis=2), (2, 3, 4), (4, 1))
    with layer_error("out of range", cls=ShapeError):
        infer(make_spec("Scale", axis=4), (2, 3, 4))
    with layer_error("num_axes", cls=ShapeError):
        infer(make_spec("Scale", axis=1, num_axes=3), (2, 3, 4))
    with layer_error(cls=SchemaError):
        make_spec("Scale", num_axes=-2)
    with layer_error(cls=SchemaError):
        make_spec("Scale", n_bottoms=3)


@pytest.mark.parametrize("axis,num_axes,blob_shape", [(1, 1, (3,)), (1, 0, ()), (1, -1, (3, 4)), (-1, 1, (4,))])
def test_bias_learned(axis, num_axes, blob_shape):
    spec = make_spec("Bias", axis=axis, num_axes=num_axes, filler={"type": "gaussian", "std": 1.0})
    x = rand(2, 3, 4)
    m = build(spec, x.shape, dtype=D)
    assert tuple(m.bias.shape) == blob_shape
    (y,) = run_layer(spec, x, module=m)
    torch.testing.assert_close(y, x + expand_at(m.bias.detach(), axis % 3 if blob_shape else 0, 3))


def test_bias_two_bottoms_and_default_filler():
    assert torch.equal(build(make_spec("Bias"), (2, 3), dtype=D).bias, torch.zeros(3, dtype=D))
    spec = make_spec("Bias", n_bottoms=2, axis=0)
    x, b = rand(2, 3, 4), rand(2, 3, seed=1)
    m = build(spec, x.shape, b.shape, dtype=D)
    assert m.bias is None
    torch.testing.assert_close(run_layer(spec, x, b, module=m)[0], x + b[:, :, None])
    with layer_error("does not match", cls=ShapeError):
        infer(spec, (2, 3, 4), (3, 3))


# ----------------------------------------------------------------------------- BN (PSPNet)

def test_bn_frozen_uses_stored_stats_in_train_and_freezes_affine():
    spec = make_spec("BN", phase="train", frozen=True, momentum=0.95,
                     slope_filler={"type": "constant", "value": 1.0})
    m = build(spec, (2, 3, 4, 4), dtype=D).train()
    assert [b for b in get("BN").blobs] == ["slope", "bias", "mean", "var"]
    assert all(tuple(getattr(m, b).shape) == (1, 3, 1, 1) for b in get("BN").blobs)
    assert not m.slope.requires_grad and not m.bias.requires_grad
    torch.testing.assert_close(m.var, torch.ones(1, 3, 1, 1, dtype=D))        # frozen: var starts at 1
    g, b = rand(3, seed=1), rand(3, seed=2)
    mu, var = rand(3, seed=3), rand(3, seed=4).abs() + 0.1
    with torch.no_grad():
        m.slope.copy_(g.view(1, 3, 1, 1)); m.bias.copy_(b.view(1, 3, 1, 1))
        m.mean.copy_(mu.view(1, 3, 1, 1)); m.var.copy_(var.view(1, 3, 1, 1))
    x = rand(2, 3, 4, 4).requires_grad_(True)
    (y,) = run_layer(spec, x, module=m)
    v = lambda t: t.view(1, 3, 1, 1)  # noqa: E731
    torch.testing.assert_close(y, v(g) * (x - v(mu)) / torch.sqrt(v(var) + 1e-5) + v(b))
    y.sum().backward()
    torch.testing.assert_close(x.grad, (v(g) / torch.sqrt(v(var) + 1e-5)).expand_as(x))
    torch.testing.assert_close(m.mean, v(mu))                                  # no update


def test_bn_train_momentum_is_inverted_and_variance_biased():
    momentum = 0.95
    spec = make_spec("BN", phase="train", momentum=momentum, eps=1e-3,
                     slope_filler={"type": "constant", "value": 1.0})
    m = build(spec, (4, 3, 5, 5), dtype=D).train()
    assert m.slope.requires_grad and torch.equal(m.var, torch.zeros(1, 3, 1, 1, dtype=D))
    ref = torch.nn.BatchNorm2d(3, eps=1e-3, momentum=1 - momentum).to(D).train()
    with torch.no_grad():
        ref.running_var.zero_()
    for seed in range(3):
        x = rand(4, 3, 5, 5, seed=seed) * (seed + 1) + seed
        y = m(x)
        torch.testing.assert_close(y, ref(x))                                 # same normalisation
    torch.testing.assert_close(m.mean.flatten(), ref.running_mean)           # momentum 1 - m
    # Caffe accumulates the biased variance; PyTorch the unbiased one.
    var = torch.zeros(3, dtype=D)
    for seed in range(3):
        x = rand(4, 3, 5, 5, seed=seed) * (seed + 1) + seed
        var = momentum * var + (1 - momentum) * per_channel(x).var(1, unbiased=False)
    torch.testing.assert_close(m.var.flatten(), var)
    assert not torch.allclose(m.var.flatten(), ref.running_var)
    # Test phase: stored statistics.
    m.eval()
    x = rand(2, 3, 5, 5, seed=9)
    torch.testing.assert_close(m(x), (x - m.mean) / torch.sqrt(m.var + 1e-3))


def test_bn_gradcheck_train():
    spec = make_spec("BN", phase="train", slope_filler={"type": "uniform", "min": 0.5, "max": 1.5},
                     bias_filler={"type": "uniform", "min": -1, "max": 1})
    m = build(spec, (3, 2, 2, 3), dtype=D).train()
    assert torch.autograd.gradcheck(m, (rand(3, 2, 2, 3).requires_grad_(True),))


@pytest.mark.parametrize("shape", [(2, 3), (2, 3, 4), (2, 3, 4, 5)])
def test_bn_shapes(shape):
    spec = make_spec("BN", frozen=True)
    (y,) = run_layer(spec, rand(*shape))
    assert y.shape == shape


def test_bn_errors():
    with layer_error("at least 2 axes", cls=ShapeError):
        infer(make_spec("BN"), (5,))
    with layer_error(cls=SchemaError):
        make_spec("BN", momentum=1.5)
