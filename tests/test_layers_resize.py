"""Interp and Crop against direct formulas; the FCN-8s shape walk at 500 x 500."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from layer_helpers import build, infer, layer_error, make_spec, run_layer
from layer_helpers import single_thread  # noqa: F401  (autouse: one torch thread)
from pacnet.errors import SchemaError, ShapeError
from pacnet.registry import get

D = torch.float64


def rand(*shape, seed=0, dtype=D):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


# ----------------------------------------------------------------------------- oracles

def interp_oracle(x, ho, wo, pad_beg=0, pad_end=0):
    """Align-corners bilinear after cropping, written out per output pixel (float64)."""
    n, c, h, w = x.shape
    he, we = h + pad_beg + pad_end, w + pad_beg + pad_end
    src = x[:, :, -pad_beg:-pad_beg + he, -pad_beg:-pad_beg + we].numpy()
    out = np.zeros((n, c, ho, wo))
    rh = (he - 1) / (ho - 1) if ho > 1 else 0.0
    rw = (we - 1) / (wo - 1) if wo > 1 else 0.0
    for i in range(ho):
        r = rh * i
        h0 = int(r)
        h1 = h0 + (1 if h0 < he - 1 else 0)
        lh = r - h0
        for j in range(wo):
            q = rw * j
            w0 = int(q)
            w1 = w0 + (1 if w0 < we - 1 else 0)
            lw = q - w0
            out[:, :, i, j] = ((1 - lh) * ((1 - lw) * src[:, :, h0, w0] + lw * src[:, :, h0, w1])
                               + lh * ((1 - lw) * src[:, :, h1, w0] + lw * src[:, :, h1, w1]))
    return out


def caffe_interp2_float(x, ho, wo):
    """Port of caffe_cpu_interp2 with Dtype = float (rheight/h1r are float32 as in Caffe)."""
    x = x.numpy().astype(np.float32)
    n, c, h1_, w1_ = x.shape
    out = np.zeros((n, c, ho, wo), dtype=np.float32)
    if (h1_, w1_) == (ho, wo):
        return x.copy()
    one = np.float32(1)
    rheight = np.float32(h1_ - 1) / np.float32(ho - 1) if ho > 1 else np.float32(0)
    rwidth = np.float32(w1_ - 1) / np.float32(wo - 1) if wo > 1 else np.float32(0)
    # the w2 loop is vectorised: the same float32 operations, elementwise
    w2 = np.arange(wo, dtype=np.float32)
    w1r = (rwidth * w2).astype(np.float32)
    w1 = w1r.astype(np.int64)
    w1p = (w1 < w1_ - 1).astype(np.int64)
    w1lambda = (w1r - w1.astype(np.float32)).astype(np.float32)
    w0lambda = one - w1lambda
    for h2 in range(ho):
        h1r = np.float32(rheight * np.float32(h2))
        h1 = int(h1r)
        h1p = 1 if h1 < h1_ - 1 else 0
        h1lambda = np.float32(h1r - np.float32(h1))
        h0lambda = one - h1lambda
        out[:, :, h2, :] = (h0lambda * (w0lambda * x[:, :, h1, w1] + w1lambda * x[:, :, h1, w1 + w1p])
                            + h1lambda * (w0lambda * x[:, :, h1 + h1p, w1]
                                          + w1lambda * x[:, :, h1 + h1p, w1 + w1p]))
    return out


# ----------------------------------------------------------------------------- Interp sizes

@pytest.mark.parametrize("params,hw,out", [
    (dict(shrink_factor=2), (321, 321), (161, 161)),
    (dict(shrink_factor=8), (321, 321), (41, 41)),
    (dict(shrink_factor=16), (321, 321), (21, 21)),
    (dict(shrink_factor=8), (513, 513), (65, 65)),
    (dict(shrink_factor=3), (10, 11), (4, 4)),
    (dict(zoom_factor=2), (21, 21), (41, 41)),
    (dict(zoom_factor=8), (65, 65), (513, 513)),
    (dict(zoom_factor=8), (60, 60), (473, 473)),
    (dict(zoom_factor=1), (7, 9), (7, 9)),
    (dict(shrink_factor=4, zoom_factor=3), (321, 321), (241, 241)),   # shrink, then zoom
    (dict(zoom_factor=4, shrink_factor=3), (31, 31), (41, 41)),
    (dict(height=60, width=50), (5, 6), (60, 50)),
    # precedence: a lone shrink or zoom wins over height/width; height/width win over the pair
    (dict(shrink_factor=2, height=7, width=7), (9, 9), (5, 5)),
    (dict(zoom_factor=2, height=7, width=7), (9, 9), (17, 17)),
    (dict(shrink_factor=2, zoom_factor=3, height=7, width=8), (9, 9), (7, 8)),
    # cropping pads
    (dict(zoom_factor=2, pad_beg=-1, pad_end=-2), (10, 12), (13, 17)),
    (dict(shrink_factor=2, pad_end=-1), (10, 12), (5, 6)),
])
def test_interp_output_size(params, hw, out):
    spec = make_spec("Interp", **params)
    assert infer(spec, (1, 2) + hw) == [(1, 2) + out]


@pytest.mark.parametrize("params,hw", [
    (dict(zoom_factor=2), (5, 7)),
    (dict(zoom_factor=3, pad_beg=-1, pad_end=-1), (6, 5)),
    (dict(shrink_factor=3), (11, 8)),
    (dict(shrink_factor=4, zoom_factor=3), (13, 17)),
    (dict(height=9, width=4), (5, 7)),
    (dict(height=1, width=1), (5, 7)),
    (dict(height=4, width=9, pad_beg=-2), (6, 5)),
    (dict(height=1, width=6), (1, 3)),
    (dict(height=5, width=5), (5, 5)),
])
def test_interp_values_align_corners_after_crop(params, hw):
    x = rand(2, 3, *hw)
    spec = make_spec("Interp", **params)
    (y,) = run_layer(spec, x)
    ref = interp_oracle(x, y.shape[2], y.shape[3], spec["pad_beg"], spec["pad_end"])
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("hw,out", [((5, 7), (9, 13)), ((41, 41), (321, 321)), ((13, 9), (4, 3)),
                                    ((7, 7), (7, 7)), ((3, 5), (1, 1))])
def test_interp_float32_matches_caffe_port(hw, out):
    x = rand(1, 2, *hw, dtype=torch.float32)
    spec = make_spec("Interp", height=out[0], width=out[1])
    (y,) = run_layer(spec, x)
    np.testing.assert_allclose(y.numpy(), caffe_interp2_float(x, *out), rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("size,shrink", [(321, 8), (321, 16), (321, 2), (513, 8), (513, 16)])
def test_interp_label_shrink_is_exact_subsample(size, shrink):
    g = torch.Generator().manual_seed(size + shrink)
    label = torch.randint(0, 21, (1, 1, size, size), generator=g).to(torch.float32)
    label[0, 0, ::7, ::5] = 255.0
    (y,) = run_layer(make_spec("Interp", shrink_factor=shrink), label)
    assert torch.equal(y, label[:, :, ::shrink, ::shrink])


def test_interp_label_shrink_3_4_blends():
    # caffe.md: 321 -> 241 is not a subsample (ratio 4/3): label ids get blended
    label = torch.arange(321, dtype=torch.float32).repeat(321, 1)[None, None]
    (y,) = run_layer(make_spec("Interp", shrink_factor=4, zoom_factor=3), label)
    assert y.shape[-1] == 241
    assert not torch.equal(y, y.round())


def test_interp_second_bottom_gives_size():
    x, like = rand(2, 3, 5, 7), rand(2, 1, 9, 4)
    spec = make_spec("Interp", n_bottoms=2)
    (y,) = run_layer(spec, x, like)
    np.testing.assert_allclose(y.numpy(), interp_oracle(x, 9, 4), rtol=1e-12, atol=1e-12)


def test_interp_gradient_is_transpose_of_the_map():
    x = rand(1, 1, 4, 5).requires_grad_()
    spec = make_spec("Interp", zoom_factor=3, pad_beg=-1)
    m = build(spec, x.shape)
    assert torch.autograd.gradcheck(lambda x: m(x), (x,))
    assert get("Interp").flops(spec, [(1, 1, 4, 5)], infer(spec, (1, 1, 4, 5))) == 8 * 7 * 10


@pytest.mark.parametrize("params,match", [
    (dict(), "needs shrink_factor, zoom_factor, or height and width"),
    (dict(height=5), "needs shrink_factor"),
    (dict(width=5), "needs shrink_factor"),
    (dict(zoom_factor=0), "zoom_factor"),
    (dict(shrink_factor=0), "shrink_factor"),
    (dict(zoom_factor=2, pad_beg=1), "pad_beg"),
    (dict(zoom_factor=2, pad_end=2), "pad_end"),
    (dict(height=0, width=3), "height"),
    (dict(zoom_factor=2, size=3), "size"),
])
def test_interp_bad_params(params, match):
    with layer_error(match, layer="interp1"):
        make_spec("Interp", name="interp1", **params)


def test_interp_bad_shapes_and_second_bottom_conflict():
    with layer_error("second bottom", layer="interp2"):
        make_spec("Interp", name="interp2", n_bottoms=2, zoom_factor=2)
    spec = make_spec("Interp", name="interp2", zoom_factor=2, pad_beg=-2, pad_end=-3)
    with layer_error("crops the whole", layer="interp2", cls=ShapeError):
        infer(spec, (1, 1, 5, 9))
    with layer_error("4-D", layer="interp2", cls=ShapeError):
        infer(spec, (1, 9, 9))
    spec = make_spec("Interp", name="interp2", n_bottoms=2)
    with layer_error("second bottom", layer="interp2", cls=ShapeError):
        infer(spec, (2, 1, 5, 5), (1, 1, 5, 5))


# ----------------------------------------------------------------------------- Crop

@pytest.mark.parametrize("a,b,params,out,start", [
    ((1, 21, 44, 44), (1, 21, 34, 34), dict(axis=2, offset=5), (1, 21, 34, 34), (0, 0, 5, 5)),
    ((1, 21, 88, 88), (1, 21, 70, 70), dict(offset=9), (1, 21, 70, 70), (0, 0, 9, 9)),
    ((1, 21, 568, 568), (1, 3, 500, 500), dict(axis=2, offset=31), (1, 21, 500, 500), (0, 0, 31, 31)),
    ((2, 5, 9, 8), (2, 5, 4, 3), dict(), (2, 5, 4, 3), (0, 0, 0, 0)),
    ((2, 5, 9, 8), (2, 5, 4, 3), dict(offset=[3, 5]), (2, 5, 4, 3), (0, 0, 3, 5)),
    ((2, 5, 9, 8), (1, 2, 4, 3), dict(axis=1, offset=[1, 2, 3]), (2, 2, 4, 3), (0, 1, 2, 3)),
    ((2, 5, 9, 8), (1, 2, 4, 3), dict(axis=0, offset=[1, 2, 3, 4]), (1, 2, 4, 3), (1, 2, 3, 4)),
    ((2, 5, 9, 8), (7, 7, 7, 3), dict(axis=-1, offset=[5]), (2, 5, 9, 3), (0, 0, 0, 5)),
    ((2, 5, 9, 8), (7, 7, 9, 8), dict(axis=2), (2, 5, 9, 8), (0, 0, 0, 0)),
])
def test_crop_values(a, b, params, out, start):
    x = rand(*a)
    spec = make_spec("Crop", n_bottoms=2, **params)
    assert infer(spec, a, b) == [out]
    small = torch.zeros(b, dtype=D)
    (y,) = run_layer(spec, x, small)
    ref = x[tuple(slice(s, s + n) for s, n in zip(start, out))]
    assert torch.equal(y, ref)


@pytest.mark.parametrize("a,b,params,match", [
    ((1, 21, 44, 44), (1, 21, 34, 34), dict(offset=11), "offset 11 \\+ size 34 > 44"),
    ((1, 21, 44, 44), (1, 21, 34, 34), dict(offset=[0, 11]), "axis 3"),
    ((1, 21, 44, 44), (1, 21, 50, 34), dict(), "axis 2"),
    ((1, 21, 44, 44), (1, 21, 34, 34), dict(offset=[1, 2, 3]), "3 values but 2 axes"),
    ((1, 21, 44, 44), (1, 21, 34), dict(), "same number of axes"),
    ((1, 21, 44, 44), (1, 21, 34, 34), dict(axis=4), "out of range"),
])
def test_crop_errors(a, b, params, match):
    spec = make_spec("Crop", name="score_pool4c", n_bottoms=2, **params)
    with layer_error(match, layer="score_pool4c"):
        infer(spec, a, b)


def test_crop_schema_errors():
    with layer_error("offset", layer="c"):
        make_spec("Crop", name="c", n_bottoms=2, offset=-1)
    with layer_error("bottoms", layer="c", cls=SchemaError):
        make_spec("Crop", name="c", n_bottoms=1)


# ----------------------------------------------------------------------------- FCN-8s walk

def _shape(type_name, shapes, **params):
    return infer(make_spec(type_name, n_bottoms=len(shapes), **params), *shapes)[0]


def _fcn8s_walk(size, ch=None):
    """voc-fcn8s/deploy.prototxt through the layers' infer(); ``ch`` shrinks the channel
    counts (to also run the real modules cheaply)."""
    c = (lambda n: n) if ch is None else (lambda n: ch)
    shapes = {}
    x = (1, 3, size, size)
    conv = dict(kernel_size=3, pad=1)
    pool = dict(pool="MAX", kernel_size=2, stride=2)
    stages = [(2, 64), (2, 128), (3, 256), (3, 512), (3, 512)]
    layers = []
    s = x
    for i, (reps, n) in enumerate(stages, 1):
        for r in range(1, reps + 1):
            p = dict(num_output=c(n), **conv)
            if (i, r) == (1, 1):
                p["pad"] = 100
            layers.append((f"conv{i}_{r}", "Convolution", p, ["prev"]))
        layers.append((f"pool{i}", "Pooling", pool, ["prev"]))
    layers += [
        ("fc6", "Convolution", dict(num_output=c(4096), kernel_size=7), ["prev"]),
        ("fc7", "Convolution", dict(num_output=c(4096), kernel_size=1), ["prev"]),
        ("score_fr", "Convolution", dict(num_output=21, kernel_size=1), ["prev"]),
        ("upscore2", "Deconvolution", dict(num_output=21, kernel_size=4, stride=2,
                                           bias_term=False), ["prev"]),
        ("score_pool4", "Convolution", dict(num_output=21, kernel_size=1), ["pool4"]),
        ("score_pool4c", "Crop", dict(axis=2, offset=5), ["score_pool4", "upscore2"]),
        ("fuse_pool4", None, None, ["upscore2", "score_pool4c"]),
        ("upscore_pool4", "Deconvolution", dict(num_output=21, kernel_size=4, stride=2,
                                                bias_term=False), ["fuse_pool4"]),
        ("score_pool3", "Convolution", dict(num_output=21, kernel_size=1), ["pool3"]),
        ("score_pool3c", "Crop", dict(axis=2, offset=9), ["score_pool3", "upscore_pool4"]),
        ("fuse_pool3", None, None, ["upscore_pool4", "score_pool3c"]),
        ("upscore8", "Deconvolution", dict(num_output=21, kernel_size=16, stride=8,
                                           bias_term=False), ["fuse_pool3"]),
        ("score", "Crop", dict(axis=2, offset=31), ["upscore8", "data"]),
    ]
    shapes["data"] = x
    prev = "data"
    for name, type_name, params, bottoms in layers:
        bottoms = [prev if b == "prev" else b for b in bottoms]
        if type_name is None:  # Eltwise SUM: same shapes
            assert shapes[bottoms[0]] == shapes[bottoms[1]]
            shapes[name] = shapes[bottoms[0]]
        else:
            shapes[name] = _shape(type_name, [shapes[b] for b in bottoms], **params)
        prev = name
    return layers, shapes


def test_fcn8s_shape_walk_500():
    _, s = _fcn8s_walk(500)
    hw = {k: v[2] for k, v in s.items()}
    assert hw["conv1_1"] == 698
    assert [hw[f"pool{i}"] for i in range(1, 6)] == [349, 175, 88, 44, 22]
    assert hw["fc6"] == 16 and s["fc7"] == (1, 4096, 16, 16)
    assert hw["upscore2"] == 34 and hw["score_pool4"] == 44 and hw["score_pool4c"] == 34
    assert hw["upscore_pool4"] == 70 and hw["score_pool3"] == 88 and hw["score_pool3c"] == 70
    assert hw["upscore8"] == 568
    assert s["score"] == (1, 21, 500, 500)


def test_fcn8s_modules_run_at_500_with_few_channels():
    layers, shapes = _fcn8s_walk(500, ch=2)
    values = {"data": torch.randn(shapes["data"])}
    prev = "data"
    for name, type_name, params, bottoms in layers:
        bottoms = [prev if b == "prev" else b for b in bottoms]
        if type_name is None:
            values[name] = values[bottoms[0]] + values[bottoms[1]]
        else:
            spec = make_spec(type_name, name=name, n_bottoms=len(bottoms), **params)
            (values[name],) = run_layer(spec, *[values[b] for b in bottoms])
        assert tuple(values[name].shape) == shapes[name], name
        prev = name
    assert values["score"].shape == (1, 21, 500, 500)


# ----------------------------------------------------------------------------- Resize

def _taps(i, size_in, size_out, inv, mode, align_corners):
    """The (source index, weight) pairs of output index ``i`` along one axis; ``inv`` is
    1 / scale."""
    if mode == "nearest":
        return [(min(int(np.floor(i * inv)), size_in - 1), 1.0)]
    if align_corners:
        r = i * (size_in - 1) / (size_out - 1) if size_out > 1 else 0.0
    else:
        r = max((i + 0.5) * inv - 0.5, 0.0)
    i0 = min(int(np.floor(r)), size_in - 1)
    i1 = min(i0 + 1, size_in - 1)
    lam = r - i0
    return [(i0, 1 - lam), (i1, lam)]


def resize_oracle(x, ho, wo, scale=None, mode="bilinear", align_corners=False):
    """F.interpolate's maps written out per output pixel (float64).  ``scale`` (s_h, s_w)
    is the factor that sets the source positions; None means in/out sizes."""
    n, c, h, w = x.shape
    src = x.numpy()
    out = np.zeros((n, c, ho, wo))
    inv_h = 1.0 / scale[0] if scale else h / ho
    inv_w = 1.0 / scale[1] if scale else w / wo
    for i in range(ho):
        for j in range(wo):
            for a, wa in _taps(i, h, ho, inv_h, mode, align_corners):
                for b, wb in _taps(j, w, wo, inv_w, mode, align_corners):
                    out[:, :, i, j] += wa * wb * src[:, :, a, b]
    return out


@pytest.mark.parametrize("params,hw,out", [
    (dict(scale_factor=0.5), (64, 48), (32, 24)),
    (dict(scale_factor=0.125), (64, 64), (8, 8)),
    (dict(scale_factor=[0.25, 0.5]), (16, 16), (4, 8)),
    (dict(scale_factor=[2]), (5, 7), (10, 14)),
    (dict(scale_factor=0.5), (7, 9), (3, 4)),          # floor, as PyTorch
    (dict(scale_factor=0.3), (10, 20), (3, 6)),
    (dict(height=9, width=4, mode="nearest"), (5, 5), (9, 4)),
])
def test_resize_output_size(params, hw, out):
    spec = make_spec("Resize", **params)
    assert infer(spec, (2, 3) + hw) == [(2, 3) + out]


@pytest.mark.parametrize("params,hw", [
    (dict(scale_factor=0.25), (16, 12)),               # the PAC guide pyramid: exact quarter
    (dict(scale_factor=0.5), (7, 9)),                  # 3x4 but sampled with the factor 0.5, not 3/7
    (dict(scale_factor=[2, 3]), (3, 4)),
    (dict(scale_factor=0.5, align_corners=True), (9, 9)),
    (dict(height=5, width=3), (4, 7)),
    (dict(height=5, width=3, align_corners=True), (4, 7)),
    (dict(scale_factor=0.5, mode="nearest"), (7, 9)),
    (dict(scale_factor=3, mode="nearest"), (2, 3)),
])
def test_resize_values_match_per_pixel_oracle(params, hw):
    x = rand(2, 3, *hw)
    spec = make_spec("Resize", **params)
    (y,) = run_layer(spec, x)
    s = params.get("scale_factor")
    scale = None if s is None else ((s, s) if not isinstance(s, list) else (s[0], s[-1]))
    want = resize_oracle(x, y.shape[2], y.shape[3], scale, params.get("mode", "bilinear"),
                         params.get("align_corners", False))
    np.testing.assert_allclose(y.numpy(), want, rtol=1e-12, atol=1e-12)


def test_resize_scale_factor_samples_with_the_factor_not_the_size_ratio():
    # 7 -> floor(3.5) = 3: the factor 0.5 puts output row 2 at source 4.5, size 3 at 5.33
    x = rand(1, 1, 7, 7)
    (by_scale,) = run_layer(make_spec("Resize", scale_factor=0.5), x)
    (by_size,) = run_layer(make_spec("Resize", height=3, width=3), x)
    assert by_scale.shape == by_size.shape == (1, 1, 3, 3)
    assert not torch.allclose(by_scale, by_size)


def test_resize_align_corners_equals_interp():
    x = rand(2, 2, 6, 5)
    (a,) = run_layer(make_spec("Resize", height=11, width=9, align_corners=True), x)
    (b,) = run_layer(make_spec("Interp", height=11, width=9), x)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_resize_second_bottom_gives_size_and_broadcasts_a_pooled_map():
    x, like = rand(2, 3, 5, 7), rand(2, 1, 9, 4)
    (y,) = run_layer(make_spec("Resize", n_bottoms=2), x, like)
    np.testing.assert_allclose(y.numpy(), resize_oracle(x, 9, 4), rtol=1e-12, atol=1e-12)
    pooled = rand(2, 3, 1, 1)  # mmseg's image pooling branch: 1x1 -> H x W is a broadcast
    (y,) = run_layer(make_spec("Resize", n_bottoms=2), pooled, like)
    torch.testing.assert_close(y, pooled.expand(2, 3, 9, 4), rtol=0, atol=1e-15)


def test_resize_gradient_and_flops():
    x = rand(1, 2, 4, 6).requires_grad_()
    spec = make_spec("Resize", scale_factor=1.5)
    m = build(spec, x.shape)
    assert torch.autograd.gradcheck(lambda x: m(x), (x,))
    assert get("Resize").flops(spec, [(1, 2, 4, 6)], infer(spec, (1, 2, 4, 6))) == 8 * 2 * 6 * 9
    near = make_spec("Resize", scale_factor=2, mode="nearest")
    assert get("Resize").flops(near, [(1, 2, 4, 6)], infer(near, (1, 2, 4, 6))) == 0


@pytest.mark.parametrize("params,n_bottoms,match", [
    (dict(), 1, "needs scale_factor, height and width, or a second bottom"),
    (dict(height=4), 1, "height and width go together"),
    (dict(width=4), 1, "height and width go together"),
    (dict(scale_factor=2, height=4, width=4), 1, "not scale_factor and height"),
    (dict(scale_factor=2), 2, "not scale_factor and a second bottom"),
    (dict(scale_factor=0), 1, "scale_factor"),
    (dict(scale_factor=[1, 2, 3]), 1, "scale_factor"),
    (dict(scale_factor=2, mode="nearest", align_corners=True), 1, "bilinear only"),
    (dict(scale_factor=2, mode="bicubic"), 1, "mode"),
])
def test_resize_bad_params(params, n_bottoms, match):
    with layer_error(match, layer="r1"):
        make_spec("Resize", name="r1", n_bottoms=n_bottoms, **params)


def test_resize_bad_shapes():
    with layer_error("empty", layer="r2", cls=ShapeError):
        infer(make_spec("Resize", name="r2", scale_factor=0.1), (1, 1, 5, 40))
    with layer_error("4-D", layer="r2", cls=ShapeError):
        infer(make_spec("Resize", name="r2", scale_factor=2), (1, 5, 5))
    with layer_error("second bottom", layer="r2", cls=ShapeError):
        infer(make_spec("Resize", name="r2", n_bottoms=2), (2, 1, 5, 5), (1, 1, 5, 5))


# ----------------------------------------------------------------------------- Resize, 5-D

def resize_oracle_nd(x, out, scale=None, mode="trilinear", align_corners=False):
    """F.interpolate's N-D maps written out per output element (float64): the product of
    the 1-D taps of every spatial axis, each by the rule of resize_oracle."""
    src = x.numpy()
    sizes = x.shape[2:]
    inv = [1.0 / s for s in scale] if scale else [n / o for n, o in zip(sizes, out)]
    y = np.zeros(x.shape[:2] + tuple(out))
    for pos in itertools.product(*(range(o) for o in out)):
        per_axis = [_taps(i, n, o, v, mode, align_corners)
                    for i, n, o, v in zip(pos, sizes, out, inv)]
        for combo in itertools.product(*per_axis):
            weight = math.prod(w for _, w in combo)
            y[(slice(None), slice(None)) + pos] += weight * src[(slice(None), slice(None))
                                                                + tuple(a for a, _ in combo)]
    return y


@pytest.mark.parametrize("params,dhw,out", [
    (dict(mode="trilinear", scale_factor=[1, 2, 2]), (3, 4, 5), (3, 8, 10)),    # every frame x2
    (dict(mode="trilinear", scale_factor=0.5), (4, 7, 6), (2, 3, 3)),
    (dict(mode="trilinear", scale_factor=[2, 0.5, 1.5]), (2, 6, 4), (4, 3, 6)),
    (dict(mode="trilinear", scale_factor=2, align_corners=True), (2, 3, 2), (4, 6, 4)),
    (dict(mode="trilinear", height=5, width=3), (3, 4, 7), (3, 5, 3)),          # depth kept
    (dict(mode="trilinear", depth=2, height=5, width=3), (3, 4, 7), (2, 5, 3)),
    (dict(mode="trilinear", depth=5, height=2, width=6, align_corners=True), (3, 4, 7), (5, 2, 6)),
    (dict(mode="nearest", scale_factor=[1, 0.5, 3]), (2, 7, 2), (2, 3, 6)),
])
def test_resize_5d_sizes_and_values_match_nd_oracle(params, dhw, out):
    x = rand(2, 2, *dhw)
    spec = make_spec("Resize", **params)
    assert infer(spec, x.shape) == [(2, 2) + out]
    (y,) = run_layer(spec, x)
    s = params.get("scale_factor")
    scale = None if s is None else tuple(float(v) for v in (s if isinstance(s, list) else [s] * 3))
    want = resize_oracle_nd(x, out, scale, params["mode"], params.get("align_corners", False))
    np.testing.assert_allclose(y.numpy(), want, rtol=1e-12, atol=1e-12)


def test_trilinear_keeping_the_depth_is_bilinear_per_frame():
    # what the video nets rely on: a clip's frames resized one by one
    x = rand(2, 3, 4, 6, 5)
    for align in (False, True):
        (clip,) = run_layer(make_spec("Resize", mode="trilinear", scale_factor=[1, 2.5, 0.5],
                                      align_corners=align), x)
        frames = x.permute(0, 2, 1, 3, 4).reshape(8, 3, 6, 5)
        (per_frame,) = run_layer(make_spec("Resize", scale_factor=[2.5, 0.5], align_corners=align),
                                 frames)
        torch.testing.assert_close(clip, per_frame.reshape(2, 4, 3, 15, 2).permute(0, 2, 1, 3, 4),
                                   rtol=0, atol=1e-15)


def test_resize_5d_second_bottom_gradient_and_flops():
    x, like = rand(2, 3, 2, 5, 4), rand(2, 1, 3, 9, 4)
    (y,) = run_layer(make_spec("Resize", mode="trilinear", n_bottoms=2), x, like)
    np.testing.assert_allclose(y.numpy(), resize_oracle_nd(x, (3, 9, 4)), rtol=1e-12, atol=1e-12)
    spec = make_spec("Resize", mode="trilinear", scale_factor=[1.5, 1, 2])
    m = build(spec, (1, 1, 2, 3, 2))
    assert torch.autograd.gradcheck(lambda t: m(t), (rand(1, 1, 2, 3, 2).requires_grad_(),))
    shapes = [(1, 2, 4, 6, 6)]
    assert get("Resize").flops(spec, shapes, infer(spec, *shapes)) == 16 * 2 * 6 * 6 * 12


@pytest.mark.parametrize("params,n_bottoms,match", [
    (dict(depth=4), 1, "depth goes with height and width"),
    (dict(depth=2, height=4, width=4), 1, r"bilinear resizes 4-D .* depth is written for 5-D"),
    (dict(mode="trilinear", scale_factor=[1, 2]), 1, "trilinear resizes 5-D"),
    (dict(mode="nearest", depth=2, height=4, width=4, align_corners=True), 1, "bilinear only"),
])
def test_resize_5d_bad_params(params, n_bottoms, match):
    with layer_error(match, layer="r3"):
        make_spec("Resize", name="r3", n_bottoms=n_bottoms, **params)


@pytest.mark.parametrize("params,shapes,match", [
    (dict(scale_factor=2), [(1, 1, 2, 5, 5)], r"mode bilinear resizes 4-D .* this bottom is 5-D"),
    (dict(mode="trilinear", scale_factor=2), [(1, 1, 5, 5)], r"trilinear resizes 5-D .* is 4-D"),
    (dict(mode="nearest", depth=3, height=2, width=2), [(1, 1, 5, 5)], "depth is for 5-D"),
    (dict(mode="nearest", scale_factor=[1, 2, 2]), [(1, 1, 5, 5)], r"3 values .* 4-D"),
    (dict(mode="trilinear"), [(1, 1, 2, 5, 5), (1, 1, 5, 5)],
     r"bottom 1 of shape \[1, 1, 5, 5\] \(4-D\) does not match bottom 0 .* \(5-D\)"),
    (dict(mode="trilinear", scale_factor=[1, 0.1, 1]), [(1, 1, 2, 5, 5)], "empty"),
])
def test_resize_5d_bad_shapes_say_which_rank(params, shapes, match):
    spec = make_spec("Resize", name="r4", n_bottoms=len(shapes), **params)
    with layer_error(match, layer="r4", cls=ShapeError):
        infer(spec, *shapes)
