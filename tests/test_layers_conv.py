"""Convolution, Deconvolution, InnerProduct against direct formulas of Caffe's semantics."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from layer_helpers import build, infer, layer_error, make_spec, run_layer, rand
from layer_helpers import single_thread  # noqa: F401  (autouse: one torch thread)
from pacnet.errors import PacnetError, SchemaError, ShapeError
from pacnet.registry import get

D = torch.float64



def randomize_(module, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=D))
    return module


# ----------------------------------------------------------------------------- oracles

def caffe_conv(x, w, b, kernel, pad, stride, dilation, group):
    """Caffe's conv: im2col (F.unfold, channel-major) + one GEMM per group + bias."""
    n, c, h, wd = x.shape
    o = w.shape[0]
    ho = (h + 2 * pad[0] - (dilation[0] * (kernel[0] - 1) + 1)) // stride[0] + 1
    wo = (wd + 2 * pad[1] - (dilation[1] * (kernel[1] - 1) + 1)) // stride[1] + 1
    col = F.unfold(x, kernel, dilation=dilation, padding=pad, stride=stride)  # N x C*k*k x L
    col = col.reshape(n, group, c // group * kernel[0] * kernel[1], ho * wo)
    wg = w.reshape(group, o // group, -1)
    y = torch.einsum("gok,ngkl->ngol", wg, col).reshape(n, o, ho, wo)
    if b is not None:
        y = y + b.view(1, -1, 1, 1)
    return y


def caffe_deconv(x, w, b, kernel, pad, stride, dilation, group):
    """Caffe's deconv: every input pixel scatters W[c, o] into the output (col2im), then
    the padding is cropped off both sides."""
    n, c, h, wd = x.shape
    og = w.shape[1]
    full_h = stride[0] * (h - 1) + dilation[0] * (kernel[0] - 1) + 1
    full_w = stride[1] * (wd - 1) + dilation[1] * (kernel[1] - 1) + 1
    out = torch.zeros(n, og * group, full_h, full_w, dtype=x.dtype)
    cg = c // group
    for g in range(group):
        xg = x[:, g * cg:(g + 1) * cg]
        for ki in range(kernel[0]):
            for kj in range(kernel[1]):
                contrib = torch.einsum("nchw,co->nohw", xg, w[g * cg:(g + 1) * cg, :, ki, kj])
                r0, c0 = ki * dilation[0], kj * dilation[1]
                out[:, g * og:(g + 1) * og,
                    r0:r0 + stride[0] * (h - 1) + 1:stride[0],
                    c0:c0 + stride[1] * (wd - 1) + 1:stride[1]] += contrib
    out = out[:, :, pad[0]:full_h - pad[0], pad[1]:full_w - pad[1]]
    if b is not None:
        out = out + b.view(1, -1, 1, 1)
    return out


# ----------------------------------------------------------------------------- Convolution

CONV_GRID = list(itertools.product(
    [1, 2, 3, (3, 2)],     # kernel
    [0, 1, 2],             # pad
    [1, 2, 3],             # stride
    [1, 2],                # dilation
    [1, 2],                # group
))


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


@pytest.mark.parametrize("hw", [(7, 8), (5, 11)])
def test_convolution_grid_shapes_and_values(hw):
    x = rand(2, 4, *hw)
    checked = 0
    for kernel, pad, stride, dil, group in CONV_GRID:
        k = list(kernel) if isinstance(kernel, tuple) else kernel
        spec = make_spec("Convolution", num_output=6, kernel_size=k, pad=pad, stride=stride,
                         dilation=dil, group=group, bias_term=bool(group % 2))
        kk, pp, ss, dd = _pair(kernel), _pair(pad), _pair(stride), _pair(dil)
        ho = (hw[0] + 2 * pp[0] - (dd[0] * (kk[0] - 1) + 1)) // ss[0] + 1
        wo = (hw[1] + 2 * pp[1] - (dd[1] * (kk[1] - 1) + 1)) // ss[1] + 1
        if ho < 1 or wo < 1:
            with layer_error("empty", cls=ShapeError):
                infer(spec, x.shape)
            continue
        assert infer(spec, x.shape) == [(2, 6, ho, wo)]
        module = randomize_(build(spec, x.shape, dtype=D))
        (y,) = run_layer(spec, x, module=module)
        ref = caffe_conv(x, module.weight, module.bias, kk, pp, ss, dd, group)
        torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
        assert tuple(module.weight.shape) == (6, 4 // group) + kk
        checked += 1
    assert checked > 100


def test_convolution_hw_forms_equal_list_forms():
    x = rand(1, 2, 9, 10)
    a = make_spec("Convolution", num_output=3, kernel_h=3, kernel_w=2, pad_h=1, pad_w=0,
                  stride_h=2, stride_w=1)
    b = make_spec("Convolution", num_output=3, kernel_size=[3, 2], pad=[1, 0], stride=[2, 1])
    assert infer(a, x.shape) == infer(b, x.shape) == [(1, 3, 5, 9)]
    ma = randomize_(build(a, x.shape, dtype=D))
    mb = build(b, x.shape, dtype=D)
    mb.load_state_dict(ma.state_dict())
    torch.testing.assert_close(run_layer(a, x, module=ma)[0], run_layer(b, x, module=mb)[0])


def test_convolution_blobs_and_default_zero_filler():
    spec = make_spec("Convolution", num_output=3, kernel_size=3)
    module = build(spec, (1, 2, 5, 5))
    assert list(module.state_dict()) == ["weight", "bias"] == list(get("Convolution").blobs)
    assert tuple(module.weight.shape) == (3, 2, 3, 3) and tuple(module.bias.shape) == (3,)
    # Caffe's default filler is constant 0: an un-initialised conv outputs exactly zero.
    assert torch.count_nonzero(module.weight) == 0 and torch.count_nonzero(module.bias) == 0
    (y,) = run_layer(spec, rand(1, 2, 5, 5), module=module.double())
    assert torch.count_nonzero(y) == 0
    nobias = build(make_spec("Convolution", num_output=3, kernel_size=1, bias_term=False), (1, 2, 5, 5))
    assert nobias.bias is None and list(nobias.state_dict()) == ["weight"]


def test_convolution_constant_fillers_and_values():
    spec = make_spec("Convolution", num_output=2, kernel_size=2,
                     weight_filler={"type": "constant", "value": 0.5},
                     bias_filler={"type": "constant", "value": -1.0})
    x = torch.ones(1, 3, 3, 3, dtype=D)
    (y,) = run_layer(spec, x)
    # 3 channels x 2 x 2 taps x 0.5 - 1 = 5
    assert torch.equal(y, torch.full((1, 2, 2, 2), 5.0, dtype=D))


def _fill(type_name, shape_in, **params):
    torch.manual_seed(0)
    return build(make_spec(type_name, **params), shape_in).weight.detach().double()


@pytest.mark.parametrize("norm", ["FAN_IN", "FAN_OUT", "AVERAGE"])
def test_convolution_xavier_msra_scale_from_fans(norm):
    # weight [O=64, C/g=32, 3, 3]: fan_in = 32*9, fan_out = 64*9 (count / shape[1])
    fan_in, fan_out = 32 * 9, 64 * 9
    n = {"FAN_IN": fan_in, "FAN_OUT": fan_out, "AVERAGE": (fan_in + fan_out) / 2}[norm]
    w = _fill("Convolution", (1, 32, 8, 8), num_output=64, kernel_size=3,
              weight_filler={"type": "xavier", "variance_norm": norm})
    scale = math.sqrt(3.0 / n)
    assert w.abs().max() <= scale * (1 + 1e-6)
    assert w.abs().max() > 0.99 * scale
    assert abs(w.var().item() / (scale ** 2 / 3) - 1) < 0.05
    w = _fill("Convolution", (1, 32, 8, 8), num_output=64, kernel_size=3,
              weight_filler={"type": "msra", "variance_norm": norm})
    assert abs(w.std().item() / math.sqrt(2.0 / n) - 1) < 0.03
    assert abs(w.mean().item()) < 0.01


def test_convolution_gaussian_and_sparse_filler():
    w = _fill("Convolution", (1, 16, 8, 8), num_output=64, kernel_size=3,
              weight_filler={"type": "gaussian", "mean": 0.5, "std": 0.01})
    assert abs(w.mean().item() - 0.5) < 1e-3 and abs(w.std().item() - 0.01) < 1e-3
    # Caffe keeps each weight with probability sparse / num_output
    w = _fill("Convolution", (1, 16, 8, 8), num_output=64, kernel_size=3,
              weight_filler={"type": "gaussian", "sparse": 16})
    frac = (w != 0).double().mean().item()
    assert abs(frac - 0.25) < 0.02


def test_deconvolution_bilinear_filler_taps_k4_and_k3():
    w = _fill("Deconvolution", (1, 3, 4, 4), num_output=3, group=3, kernel_size=4, stride=2,
              pad=1, bias_term=False, weight_filler={"type": "bilinear"})
    taps = torch.tensor([0.25, 0.75, 0.75, 0.25], dtype=D)
    assert tuple(w.shape) == (3, 1, 4, 4)
    for c in range(3):
        torch.testing.assert_close(w[c, 0], taps[:, None] * taps[None, :], rtol=0, atol=1e-7)
    # K=3: Caffe's filler.hpp uses c = (2f - 1 - f%2) / (2f) = 0.75 with f = 2
    w = _fill("Deconvolution", (1, 1, 4, 4), num_output=1, kernel_size=3,
              weight_filler={"type": "bilinear"})
    taps = torch.tensor([0.25, 0.75, 0.75], dtype=D)
    torch.testing.assert_close(w[0, 0], taps[:, None] * taps[None, :], rtol=0, atol=1e-7)


def test_deconvolution_bilinear_diagonal_filler_is_dense_per_channel_upsampling():
    w = _fill("Deconvolution", (1, 3, 4, 4), num_output=3, kernel_size=4, stride=2, pad=1, bias_term=False,
              weight_filler={"type": "bilinear_diagonal"})
    taps = torch.tensor([0.25, 0.75, 0.75, 0.25], dtype=D)
    assert tuple(w.shape) == (3, 3, 4, 4)
    for i in range(3):
        for j in range(3):
            want = taps[:, None] * taps[None, :] if i == j else torch.zeros(4, 4, dtype=D)
            torch.testing.assert_close(w[i, j], want, rtol=0, atol=1e-7)
    with layer_error("bilinear_diagonal filler needs as many inputs as outputs", layer="bad_layer"):
        infer(make_spec("Deconvolution", name="bad_layer", num_output=4, kernel_size=4,
                        weight_filler={"type": "bilinear_diagonal"}), (1, 3, 4, 4))


def test_deconvolution_fans_use_caffe_layout():
    # Deconvolution weight [C=32, O/g=64, 3, 3]: FAN_IN = count/shape[0] = 64*9
    w = _fill("Deconvolution", (1, 32, 4, 4), num_output=64, kernel_size=3,
              weight_filler={"type": "msra"})
    assert tuple(w.shape) == (32, 64, 3, 3)
    assert abs(w.std().item() / math.sqrt(2.0 / (64 * 9)) - 1) < 0.03


def test_convolution_bias_filler_applies():
    torch.manual_seed(0)
    m = build(make_spec("Convolution", num_output=500, kernel_size=1,
                        bias_filler={"type": "uniform", "min": 2, "max": 3}), (1, 1, 2, 2))
    b = m.bias.detach()
    assert b.min() >= 2 and b.max() <= 3 and 2.4 < b.mean() < 2.6


def test_convolution_flops():
    spec = make_spec("Convolution", num_output=4, kernel_size=3, pad=1, group=1)
    shapes = [(2, 3, 7, 7)]
    out = infer(spec, *shapes)
    assert get("Convolution").flops(spec, shapes, out) == 2 * (3 * 9) * (2 * 4 * 49) + 2 * 4 * 49
    spec = make_spec("Convolution", num_output=4, kernel_size=3, group=2, bias_term=False)
    shapes = [(1, 6, 5, 5)]
    assert get("Convolution").flops(spec, shapes, infer(spec, *shapes)) == 2 * (3 * 9) * (4 * 9)


def _gradcheck(module, x):
    names = [n for n, _ in module.named_parameters()]
    params = [p.detach().clone().requires_grad_() for _, p in module.named_parameters()]

    def f(x, *ps):
        return torch.func.functional_call(module, dict(zip(names, ps)), (x,))

    return torch.autograd.gradcheck(f, (x.detach().clone().requires_grad_(), *params))


@pytest.mark.parametrize("params,shape", [
    (dict(num_output=2, kernel_size=3, pad=1, stride=2, group=2), (1, 2, 5, 4)),
    (dict(num_output=3, kernel_size=2, bottom_is_im2col=True), (1, 8, 3, 2)),
])
def test_convolution_gradcheck(params, shape):
    spec = make_spec("Convolution", **params)
    assert _gradcheck(randomize_(build(spec, shape, dtype=D)), rand(*shape))


# ----------------------------------------------------------------------------- bottom_is_im2col

@pytest.mark.parametrize("kernel,pad,stride,dil,group", [
    (3, 1, 1, 1, 1), (3, 2, 1, 2, 1), ((3, 2), (1, 0), (2, 1), 1, 1), (1, 0, 1, 1, 2),
    (3, 1, 1, 1, 2), (2, 0, 2, 1, 1),
])
def test_bottom_is_im2col_equals_unfold_plus_conv(kernel, pad, stride, dil, group):
    x = rand(2, 4, 7, 6)
    kk, pp, ss, dd = _pair(kernel), _pair(pad), _pair(stride), _pair(dil)
    plain = make_spec("Convolution", num_output=4, kernel_size=list(kk), pad=list(pp),
                      stride=list(ss), dilation=list(dd), group=group)
    ref_module = randomize_(build(plain, x.shape, dtype=D))
    (ref,) = run_layer(plain, x, module=ref_module)
    # Im2col blob: N x (C*kh*kw) x Ho x Wo, channel-major (c*kh*kw + i*kw + j)
    ho, wo = ref.shape[2:]
    col = F.unfold(x, kk, dilation=dd, padding=pp, stride=ss).reshape(2, -1, ho, wo)
    # pad/stride/dilation are ignored with bottom_is_im2col: pass odd ones on purpose
    spec = make_spec("Convolution", num_output=4, kernel_size=list(kk), pad=3, stride=2,
                     group=group, bottom_is_im2col=True)
    assert infer(spec, col.shape) == [(2, 4, ho, wo)]
    module = build(spec, col.shape, dtype=D)
    assert tuple(module.weight.shape) == tuple(ref_module.weight.shape)
    module.load_state_dict(ref_module.state_dict())  # pretrained weights load unchanged
    (y,) = run_layer(spec, col, module=module)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)


def test_bottom_is_im2col_matches_gemm_definition():
    # segaware §2.2: y[o] = W.reshape(O, C*k*k) @ x.reshape(C*k*k, H*W) + b
    spec = make_spec("Convolution", num_output=5, kernel_size=3, bottom_is_im2col=True,
                     weight_filler={"type": "gaussian"}, bias_filler={"type": "gaussian"})
    x = rand(1, 18, 4, 3)
    m = build(spec, x.shape, dtype=D)
    (y,) = run_layer(spec, x, module=m)
    ref = (m.weight.reshape(5, 18) @ x.reshape(18, 12) + m.bias[:, None]).reshape(1, 5, 4, 3)
    torch.testing.assert_close(y, ref)


def test_bottom_is_im2col_errors():
    spec = make_spec("Convolution", name="sconv", num_output=2, kernel_size=3, bottom_is_im2col=True)
    with layer_error("multiple of", layer="sconv", cls=ShapeError):
        infer(spec, (1, 10, 4, 4))


# ----------------------------------------------------------------------------- Deconvolution

DECONV_GRID = list(itertools.product([1, 2, 3, 4], [0, 1, 2], [1, 2, 3], [1, 2], [1, 2]))


def test_deconvolution_grid_equals_scatter_oracle():
    x = rand(2, 4, 5, 3)
    checked = 0
    for k, pad, stride, dil, group in DECONV_GRID:
        spec = make_spec("Deconvolution", num_output=6, kernel_size=k, pad=pad, stride=stride,
                         dilation=dil, group=group)
        ho = stride * (5 - 1) + dil * (k - 1) + 1 - 2 * pad
        wo = stride * (3 - 1) + dil * (k - 1) + 1 - 2 * pad
        if ho < 1 or wo < 1:
            with layer_error("empty", cls=ShapeError):
                infer(spec, x.shape)
            continue
        assert infer(spec, x.shape) == [(2, 6, ho, wo)]
        module = randomize_(build(spec, x.shape, dtype=D))
        assert tuple(module.weight.shape) == (4, 6 // group, k, k)
        (y,) = run_layer(spec, x, module=module)
        ref = caffe_deconv(x, module.weight, module.bias, (k, k), (pad, pad), (stride, stride),
                           (dil, dil), group)
        torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
        checked += 1
    assert checked > 100


def test_deconvolution_rectangular_params():
    x = rand(1, 2, 4, 5)
    spec = make_spec("Deconvolution", num_output=2, kernel_h=3, kernel_w=2, stride_h=2,
                     stride_w=3, pad_h=1, pad_w=0, bias_term=False)
    m = randomize_(build(spec, x.shape, dtype=D))
    (y,) = run_layer(spec, x, module=m)
    assert y.shape == (1, 2, 2 * 3 + 3 - 2, 3 * 4 + 2)
    torch.testing.assert_close(y, caffe_deconv(x, m.weight, None, (3, 2), (1, 0), (2, 3), (1, 1), 1))


def test_deconvolution_bilinear_upsampling_fcn_upscore2():
    # FCN upscore2: k4 s2 on 16 -> 34; with group=C a constant map stays constant inside
    spec = make_spec("Deconvolution", num_output=21, group=21, kernel_size=4, stride=2,
                     bias_term=False, weight_filler={"type": "bilinear"})
    assert infer(spec, (1, 21, 16, 16)) == [(1, 21, 34, 34)]
    x = torch.ones(1, 21, 16, 16, dtype=D)
    (y,) = run_layer(spec, x)
    torch.testing.assert_close(y[:, :, 2:-2, 2:-2], torch.ones(1, 21, 30, 30, dtype=D))


def test_deconvolution_flops_and_gradcheck():
    spec = make_spec("Deconvolution", num_output=4, kernel_size=2, stride=2, group=2)
    shapes = [(1, 2, 3, 3)]
    out = infer(spec, *shapes)
    assert out == [(1, 4, 6, 6)]
    assert get("Deconvolution").flops(spec, shapes, out) == 2 * (2 * 9) * 2 * 4 + 4 * 36
    assert _gradcheck(randomize_(build(spec, shapes[0], dtype=D)), rand(*shapes[0]))


# ----------------------------------------------------------------------------- InnerProduct

@pytest.mark.parametrize("shape,axis,out", [
    ((2, 3, 4, 5), 1, (2, 7)),
    ((2, 3, 4, 5), 2, (2, 3, 7)),
    ((2, 3, 4, 5), -1, (2, 3, 4, 7)),
    ((2, 3, 4, 5), 0, (7,)),
    ((6, 5), 1, (6, 7)),
])
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_inner_product_values(shape, axis, out, transpose, bias):
    spec = make_spec("InnerProduct", num_output=7, axis=axis, transpose=transpose, bias_term=bias)
    x = rand(*shape)
    assert infer(spec, shape) == [out]
    m = randomize_(build(spec, shape, dtype=D))
    a = axis % len(shape)
    k = math.prod(shape[a:])
    assert tuple(m.weight.shape) == ((k, 7) if transpose else (7, k))
    (y,) = run_layer(spec, x, module=m)
    w = m.weight.t() if transpose else m.weight
    ref = x.reshape(-1, k) @ w.t()
    if bias:
        ref = ref + m.bias
    torch.testing.assert_close(y, ref.reshape(out))


def test_inner_product_fillers_and_flops():
    torch.manual_seed(0)
    spec = make_spec("InnerProduct", num_output=200, weight_filler={"type": "xavier"})
    m = build(spec, (3, 50, 2, 2))
    # weight [200, 200]: fan_in = count / shape[0] = 200
    assert m.weight.abs().max() <= math.sqrt(3 / 200) * (1 + 1e-6)
    assert m.weight.abs().max() > 0.99 * math.sqrt(3 / 200)
    assert torch.count_nonzero(m.bias) == 0
    assert get("InnerProduct").flops(spec, [(3, 50, 2, 2)], [(3, 200)]) == 2 * 200 * 600 + 600


def test_inner_product_gradcheck():
    spec = make_spec("InnerProduct", num_output=3, axis=2, transpose=True)
    assert _gradcheck(randomize_(build(spec, (2, 2, 3), dtype=D)), rand(2, 2, 3))


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("type_name,params,match,cls", [
    ("Convolution", dict(num_output=3, kernel_size=3, group=2), "multiple of group", SchemaError),
    ("Convolution", dict(num_output=4), "kernel_size is required", SchemaError),
    ("Convolution", dict(num_output=4, kernel_size=3, kernel_h=3, kernel_w=3), "not both", SchemaError),
    ("Convolution", dict(num_output=4, kernel_h=3), "together", SchemaError),
    ("Convolution", dict(num_output=4, kernel_size=3, pad_h=1), "together", SchemaError),
    ("Convolution", dict(num_output=4, kernel_size=3, stride=1, stride_w=2), "not both", SchemaError),
    ("Convolution", dict(num_output=4, kernel_size=3, axis=2), "axis", SchemaError),
    ("Convolution", dict(num_output=4, kernel_size=[3, 5], weight_filler={"type": "bilinear"}),
     "square", SchemaError),
    ("Convolution", dict(num_output=0, kernel_size=3), "num_output", SchemaError),
    ("Convolution", dict(num_output=4, kernel_size=0), "kernel_size", SchemaError),
    ("Convolution", dict(num_output=4, kernel_size=3, pad=-1), "pad", SchemaError),
    ("Convolution", dict(num_output=4, kernel_size=3, stride=0), "stride", SchemaError),
    ("Convolution", dict(num_output=4, kernel_size=3, kernel=3), "kernel", SchemaError),
    ("Convolution", dict(kernel_size=3), "num_output", SchemaError),
    ("Deconvolution", dict(num_output=4, kernel_size=3, bottom_is_im2col=True),
     "only supported by Convolution", SchemaError),
    ("Deconvolution", dict(num_output=3, kernel_size=3, group=2), "multiple of group", SchemaError),
    ("InnerProduct", dict(num_output=3, weight_filler={"type": "bilinear"}), "bilinear", SchemaError),
    ("InnerProduct", dict(num_output=3, weight_filler={"type": "bilinear_diagonal"}), "4-D blob", SchemaError),
    ("Deconvolution", dict(num_output=4, kernel_size=[3, 5], weight_filler={"type": "bilinear_diagonal"}),
     "bilinear_diagonal filler needs a square kernel", SchemaError),
    ("InnerProduct", dict(num_output=3, weight_filler={"type": "xy"}), "xy", SchemaError),
    ("InnerProduct", dict(num_output=3, bias_filler={"type": "constant", "sparse": 2}), "sparse",
     SchemaError),
])
def test_bad_params_raise_located_errors(type_name, params, match, cls):
    with layer_error(match, layer="bad_layer", cls=cls):
        make_spec(type_name, name="bad_layer", **params)


@pytest.mark.parametrize("type_name,params,shape,match", [
    ("Convolution", dict(num_output=4, kernel_size=3), (1, 3, 8, 8), "multiple of group"),
    ("Convolution", dict(num_output=4, kernel_size=3), (3, 8, 8), "4-D"),
    ("Convolution", dict(num_output=4, kernel_size=5), (1, 2, 3, 8), "empty"),
    ("Convolution", dict(num_output=4, kernel_size=3, dilation=3), (1, 2, 6, 8), "empty"),
    ("Convolution", dict(num_output=4, kernel_size=3, weight_filler={"type": "xy"}), (1, 2, 6, 8),
     "xy"),
    ("Deconvolution", dict(num_output=4, kernel_size=1, pad=1), (1, 2, 2, 2), "empty"),
    ("Deconvolution", dict(num_output=4, kernel_size=2), (1, 3, 2, 2), "multiple of group"),
    ("InnerProduct", dict(num_output=4, axis=4), (1, 3, 2, 2), "out of range"),
    ("InnerProduct", dict(num_output=4, axis=-5), (1, 3, 2, 2), "out of range"),
])
def test_bad_shapes_raise_layer_errors(type_name, params, shape, match):
    group = 2 if "multiple of group" in match else 1
    spec = make_spec(type_name, name="bad_layer", group=group, **params) if type_name != "InnerProduct" \
        else make_spec(type_name, name="bad_layer", **params)
    with layer_error(match, layer="bad_layer", cls=PacnetError):
        infer(spec, shape)


# ----------------------------------------------------------------------------- 3-D (5-D bottoms)

def _tuple(v, rank):
    return (v,) * rank if isinstance(v, int) else tuple(v)


def conv_nd(x, w, b, kernel, pad, stride, dilation, group):
    """Caffe's N-D convolution (im2col_nd + GEMM) as a sum over the taps t:
    out[n, o, y] = b[o] + sum_{c, t} w[o, c, t] x_padded[n, c, y * s + t * d]."""
    n, c = x.shape[:2]
    o = w.shape[0]
    xp = F.pad(x, [q for p in reversed(pad) for q in (p, p)])
    out = [(m + 2 * p - (d * (k - 1) + 1)) // s + 1
           for m, k, p, s, d in zip(x.shape[2:], kernel, pad, stride, dilation)]
    y = torch.zeros(n, o, *out, dtype=x.dtype)
    cg, og = c // group, o // group
    for tap in itertools.product(*(range(k) for k in kernel)):
        window = tuple(slice(t * d, t * d + s * (m - 1) + 1, s)
                       for t, d, s, m in zip(tap, dilation, stride, out))
        patch = xp[(slice(None), slice(None)) + window]
        for g in range(group):
            y[:, g * og:(g + 1) * og] += torch.einsum(
                "oc,nc...->no...", w[(slice(g * og, (g + 1) * og), slice(None)) + tap],
                patch[:, g * cg:(g + 1) * cg])
    if b is not None:
        y = y + b.reshape((1, -1) + (1,) * len(kernel))
    return y


def deconv_nd(x, w, b, kernel, pad, stride, dilation, group):
    """Caffe's N-D deconvolution: every input element scatters w[c, o, t] to
    y * s + t * d (col2im_nd), then the padding is cropped off both sides of every axis."""
    n, c = x.shape[:2]
    og, cg = w.shape[1], c // group
    sizes = x.shape[2:]
    full = [s * (m - 1) + d * (k - 1) + 1 for m, k, s, d in zip(sizes, kernel, stride, dilation)]
    out = torch.zeros(n, og * group, *full, dtype=x.dtype)
    for tap in itertools.product(*(range(k) for k in kernel)):
        window = tuple(slice(t * d, t * d + s * (m - 1) + 1, s)
                       for t, d, s, m in zip(tap, dilation, stride, sizes))
        for g in range(group):
            contrib = torch.einsum("nc...,co->no...", x[:, g * cg:(g + 1) * cg],
                                   w[(slice(g * cg, (g + 1) * cg), slice(None)) + tap])
            out[(slice(None), slice(g * og, (g + 1) * og)) + window] += contrib
    out = out[(slice(None), slice(None)) + tuple(slice(p, f - p) for p, f in zip(pad, full))]
    if b is not None:
        out = out + b.reshape((1, -1) + (1,) * len(kernel))
    return out


GRID_3D = list(itertools.product(
    [1, 3, (3, 1, 2)],     # kernel
    [0, 1, (1, 0, 2)],     # pad
    [1, 2, (1, 2, 3)],     # stride
    [1, (2, 1, 1)],        # dilation
    [1, 2],                # group
))


def _conv_out(m, k, p, s, d):
    return (m + 2 * p - (d * (k - 1) + 1)) // s + 1


def _deconv_out(m, k, p, s, d):
    return s * (m - 1) + d * (k - 1) + 1 - 2 * p


@pytest.mark.parametrize("type_name,sizes,out_size,oracle,module_type,weight_io,min_checked", [
    ("Convolution", (5, 6, 7), _conv_out, conv_nd, torch.nn.Conv3d, lambda g: (6, 4 // g), 80),
    ("Deconvolution", (3, 4, 2), _deconv_out, deconv_nd, torch.nn.ConvTranspose3d,
     lambda g: (4, 6 // g), 60),
])
def test_3d_grid_equals_nd_oracle(type_name, sizes, out_size, oracle, module_type, weight_io,
                                  min_checked):
    """5-D bottoms: sizes, weight shapes and values of every geometry equal Caffe's N-D
    (de)convolution written tap by tap; geometries that leave no output are refused."""
    x = rand(2, 4, *sizes)
    checked = 0
    for kernel, pad, stride, dil, group in GRID_3D:
        as_yaml = {k: (list(v) if isinstance(v, tuple) else v) for k, v in
                   dict(kernel_size=kernel, pad=pad, stride=stride, dilation=dil).items()}
        spec = make_spec(type_name, num_output=6, group=group, bias_term=bool(group % 2),
                         **as_yaml)
        kk, pp, ss, dd = (_tuple(v, 3) for v in (kernel, pad, stride, dil))
        out = tuple(out_size(*geo) for geo in zip(sizes, kk, pp, ss, dd))
        if min(out) < 1:
            with layer_error("empty", cls=ShapeError):
                infer(spec, x.shape)
            continue
        assert infer(spec, x.shape) == [(2, 6) + out]
        module = randomize_(build(spec, x.shape, dtype=D))
        assert isinstance(module, module_type)
        assert tuple(module.weight.shape) == weight_io(group) + kk
        (y,) = run_layer(spec, x, module=module)
        ref = oracle(x, module.weight, module.bias, kk, pp, ss, dd, group)
        torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
        checked += 1
    assert checked > min_checked


def test_nd_oracles_agree_with_the_2d_ones():
    # the tap-by-tap oracles above reduce to the 2-D ones (im2col, scatter) on 4-D bottoms
    x = rand(2, 4, 7, 6)
    w, b = rand(6, 2, 3, 2, seed=1), rand(6, seed=2)
    geo = ((3, 2), (1, 2), (2, 1), (1, 2), 2)
    torch.testing.assert_close(conv_nd(x, w, b, *geo), caffe_conv(x, w, b, *geo))
    wt = rand(4, 3, 3, 2, seed=3)
    torch.testing.assert_close(deconv_nd(x, wt, None, *geo), caffe_deconv(x, wt, None, *geo))


def test_convolution_3d_forms_flops_and_blobs():
    x = (2, 3, 4, 9, 10)
    one = make_spec("Convolution", num_output=4, kernel_size=3, pad=1, stride=[1, 2, 2])
    each = make_spec("Convolution", num_output=4, kernel_size=[3, 3, 3], pad=[1], stride=[1, 2, 2])
    assert infer(one, x) == infer(each, x) == [(2, 4, 4, 5, 5)]
    module = build(one, x)
    assert list(module.state_dict()) == ["weight", "bias"]
    assert tuple(module.weight.shape) == (4, 3, 3, 3, 3)
    out = infer(one, x)
    assert get("Convolution").flops(one, [x], out) == 2 * (3 * 27) * (2 * 4 * 100) + 2 * 4 * 100
    deconv = make_spec("Deconvolution", num_output=6, kernel_size=[1, 4, 4], stride=[1, 2, 2],
                       pad=[0, 1, 1], group=3, bias_term=False)
    assert infer(deconv, x) == [(2, 6, 4, 18, 20)]
    assert tuple(build(deconv, x).weight.shape) == (3, 2, 1, 4, 4)
    flops = get("Deconvolution").flops(deconv, [x], [(2, 6, 4, 18, 20)])
    assert flops == 2 * (2 * 3 * 360) * 2 * 16     # every input element into O/g x 1x4x4


def test_convolution_3d_gradcheck():
    spec = make_spec("Convolution", num_output=2, kernel_size=[3, 1, 2], pad=1, stride=[2, 1, 1],
                     group=2)
    assert _gradcheck(randomize_(build(spec, (1, 2, 3, 3, 2), dtype=D)), rand(1, 2, 3, 3, 2))
    spec = make_spec("Deconvolution", num_output=2, kernel_size=2, stride=2)
    assert _gradcheck(randomize_(build(spec, (1, 2, 2, 1, 2), dtype=D)), rand(1, 2, 2, 1, 2))


@pytest.mark.parametrize("type_name,params,shape,match,key", [
    # the rank of the parameters and of the bottom disagree: say which bottom they fit
    ("Convolution", dict(kernel_size=[3, 3, 3]), (1, 2, 8, 8), r"3 values .* 4-D", "kernel_size"),
    ("Convolution", dict(kernel_size=3, pad=[1, 1, 1]), (1, 2, 8, 8), "pad has 3 values", "pad"),
    ("Deconvolution", dict(kernel_size=[2, 2]), (1, 2, 4, 8, 8), r"2 values .* 5-D", "kernel_size"),
    ("Convolution", dict(kernel_size=3, stride=[1, 2]), (1, 2, 4, 8, 8), "stride has 2", "stride"),
    ("Convolution", dict(kernel_h=3, kernel_w=3), (1, 2, 4, 8, 8), "kernel_h/kernel_w are for 2-D",
     "kernel_h"),
    ("Deconvolution", dict(kernel_size=3, pad_h=1, pad_w=0), (1, 2, 4, 8, 8), "pad_h/pad_w",
     "pad_h"),
    # blobs that are neither 4-D nor 5-D
    ("Convolution", dict(kernel_size=1), (1, 2, 4, 4, 4, 4), r"4-D .* or a 5-D", None),
    ("Deconvolution", dict(kernel_size=1), (1, 2, 4), r"4-D .* or a 5-D", None),
    ("Convolution", dict(kernel_size=3, bottom_is_im2col=True), (1, 27, 4, 4, 4), r"needs a 4-D",
     None),
    # 3-D sizes and fillers
    ("Convolution", dict(kernel_size=[3, 1, 1]), (1, 2, 2, 8, 8), "empty", None),
    ("Deconvolution", dict(kernel_size=4, stride=2, weight_filler={"type": "bilinear"}),
     (1, 2, 4, 8, 8), "square 4-D blob", "weight_filler"),
])
def test_3d_bad_shapes_say_which_rank(type_name, params, shape, match, key):
    spec = make_spec(type_name, name="conv3d", num_output=2, **params)
    with layer_error(match, layer="conv3d") as info:
        infer(spec, shape)
    if key is not None:
        assert info.value.location == spec.locations[key], "the error points at the key"
    if "values" in match:
        assert "give one value for every axis" in info.value.hint


@pytest.mark.parametrize("params,match", [
    (dict(kernel_size=[3, 3, 3], pad=[1, 1]), "pad has 2 values but kernel_size has 3"),
    (dict(kernel_h=3, kernel_w=3, stride=[1, 2, 2]), "stride has 3 values but kernel_h has 2"),
    (dict(kernel_size=[1, 4, 4], weight_filler={"type": "bilinear"}), "square 2-D kernel"),
])
def test_3d_inconsistent_params_are_refused_before_shapes(params, match):
    with layer_error(match, layer="c", cls=SchemaError):
        make_spec("Deconvolution", name="c", num_output=2, **params)
