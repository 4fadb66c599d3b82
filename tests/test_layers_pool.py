"""Pooling against a direct Python port of Caffe's pooling loops; AdaptivePooling."""

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
FLT_MAX = 3.4028234663852886e38


# ----------------------------------------------------------------------------- the oracle

def caffe_pooling(x, pool, kh, kw, sh, sw, ph, pw, ceil=True, global_pooling=False):
    """A line-by-line port of BVLC pooling_layer.cpp (Reshape + Forward_cpu, MAX and AVE).

    x: numpy N x C x H x W.  Returns (top, mask) with mask = argmax index (MAX) or None.
    """
    n_, c_, height, width = x.shape
    if global_pooling:
        kh, kw = height, width
    rnd = math.ceil if ceil else math.floor
    pooled_height = int(rnd(float(height + 2 * ph - kh) / sh)) + 1
    pooled_width = int(rnd(float(width + 2 * pw - kw) / sw)) + 1
    if ph or pw:
        if (pooled_height - 1) * sh >= height + ph:
            pooled_height -= 1
        if (pooled_width - 1) * sw >= width + pw:
            pooled_width -= 1
        assert (pooled_height - 1) * sh < height + ph
        assert (pooled_width - 1) * sw < width + pw
    top = np.zeros((n_, c_, pooled_height, pooled_width))
    mask = np.full((n_, c_, pooled_height, pooled_width), -1.0)
    # Caffe loops over n and c outside; the window loops below are vectorised over N x C,
    # and the innermost h/w loops are numpy reductions over the same index ranges
    # (np.argmax returns the first maximum in h-then-w order, like Caffe's strict '>').
    for phi in range(pooled_height):
        for pwi in range(pooled_width):
            if pool == "MAX":
                hstart = phi * sh - ph
                wstart = pwi * sw - pw
                hend = min(hstart + kh, height)
                wend = min(wstart + kw, width)
                hstart = max(hstart, 0)
                wstart = max(wstart, 0)
                if hend <= hstart or wend <= wstart:
                    top[:, :, phi, pwi], mask[:, :, phi, pwi] = -FLT_MAX, -1
                    continue
                win = x[:, :, hstart:hend, wstart:wend].reshape(n_, c_, -1)
                arg = win.argmax(axis=2)
                top[:, :, phi, pwi] = win.max(axis=2)
                mask[:, :, phi, pwi] = ((hstart + arg // (wend - wstart)) * width
                                        + wstart + arg % (wend - wstart))
            else:
                hstart = phi * sh - ph
                wstart = pwi * sw - pw
                hend = min(hstart + kh, height + ph)
                wend = min(wstart + kw, width + pw)
                pool_size = (hend - hstart) * (wend - wstart)
                hstart = max(hstart, 0)
                wstart = max(wstart, 0)
                hend = min(hend, height)
                wend = min(wend, width)
                s = x[:, :, hstart:hend, wstart:wend].sum(axis=(2, 3))
                top[:, :, phi, pwi] = s / pool_size if pool_size else np.nan
    return top, mask


def _has_empty_window(h, w, kh, kw, sh, sw, ph, pw, ceil):
    rnd = math.ceil if ceil else math.floor
    ho = int(rnd((h + 2 * ph - kh) / sh)) + 1
    wo = int(rnd((w + 2 * pw - kw) / sw)) + 1
    if ph or pw:
        ho -= (ho - 1) * sh >= h + ph
        wo -= (wo - 1) * sw >= w + pw
    return (ho - 1) * sh - ph >= h or (wo - 1) * sw - pw >= w


def _x(h, w, seed=0, ties=False):
    g = torch.Generator().manual_seed(seed)
    if ties:
        return torch.randint(0, 3, (1, 2, h, w), generator=g).to(D)
    return torch.randn(1, 2, h, w, generator=g, dtype=D)


# ----------------------------------------------------------------------------- the sweep

SWEEP = [(k, s, p) for k in range(1, 5) for s in range(1, 4) for p in range(k)]


@pytest.mark.parametrize("pool", ["MAX", "AVE"])
@pytest.mark.parametrize("round_mode", ["CEIL", "FLOOR"])
def test_pooling_sweep_equals_caffe_loops(pool, round_mode):
    """H 1..15 (W = 16 - H), k 1..4, s 1..3, p 0..k-1: sizes, values and the MAX mask equal
    Caffe's loops, on both the PyTorch path and the explicit-padding path; the only
    refused cases are exactly the ones where Caffe emits an empty window."""
    ceil = round_mode == "CEIL"
    counts = {"native": 0, "explicit": 0, "refused": 0, "nonpositive": 0}
    layer = get("Pooling")
    for h in range(1, 16):
        w = 16 - h
        x = _x(h, w, seed=h, ties=(pool == "MAX" and h % 2 == 0))
        xn = x.numpy()
        for k, s, p in SWEEP:
            spec = make_spec("Pooling", pool=pool, kernel_size=k, stride=s, pad=p,
                             round_mode=round_mode, n_tops=2 if pool == "MAX" else 1)
            rnd = math.ceil if ceil else math.floor
            if min(int(rnd((n + 2 * p - k) / s)) + 1 for n in (h, w)) < 1:
                with layer_error("empty", cls=ShapeError):
                    infer(spec, x.shape)
                counts["nonpositive"] += 1
                continue
            if _has_empty_window(h, w, k, k, s, s, p, p, ceil):
                assert p == 0 and s > k and ceil
                with layer_error("past the input", cls=ShapeError):
                    infer(spec, x.shape)
                counts["refused"] += 1
                continue
            ref, ref_mask = caffe_pooling(xn, pool, k, k, s, s, p, p, ceil)
            for explicit in (None, True):
                module = layer.build(spec, [tuple(x.shape)], explicit=explicit)
                tops = run_layer(spec, x, module=module)
                np.testing.assert_allclose(tops[0].numpy(), ref, rtol=1e-13, atol=1e-13,
                                           err_msg=f"H={h} W={w} k={k} s={s} p={p} {explicit}")
                if pool == "MAX":
                    np.testing.assert_array_equal(tops[1].numpy(), ref_mask)
                counts["native" if module.native_path(x.shape[2:]) else "explicit"] += 1
    assert counts["native"] > 300 and counts["explicit"] > 400
    if ceil:
        assert counts["refused"] > 10
    else:
        assert counts["refused"] == 0


def test_pooling_pad_greater_than_half_kernel_is_lowered():
    # PyTorch refuses p > k/2; Caffe allows p < k.  (k=3, p=2) and (k=4, p=3).
    for k, p, s in [(3, 2, 1), (3, 2, 2), (4, 3, 1), (4, 3, 3)]:
        for pool in ("MAX", "AVE"):
            spec = make_spec("Pooling", pool=pool, kernel_size=k, pad=p, stride=s)
            x = _x(5, 6)
            module = build(spec, x.shape)
            assert not module.native_path(x.shape[2:])
            (y,) = run_layer(spec, x, module=module)
            ref, _ = caffe_pooling(x.numpy(), pool, k, k, s, s, p, p)
            np.testing.assert_allclose(y.numpy(), ref, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("pool", ["MAX", "AVE"])
@pytest.mark.parametrize("kh,kw,sh,sw,ph,pw", [
    (3, 2, 2, 1, 0, 1),   # pad_w > 0 turns the clip rule on for H too
    (2, 3, 3, 2, 0, 2),
    (3, 3, 2, 3, 1, 0),
    (4, 1, 3, 1, 3, 0),
    (1, 4, 1, 2, 0, 3),
])
@pytest.mark.parametrize("h,w", [(7, 5), (4, 9), (1, 3)])
def test_pooling_rectangular_and_mixed_pads(pool, kh, kw, sh, sw, ph, pw, h, w):
    spec = make_spec("Pooling", pool=pool, kernel_h=kh, kernel_w=kw, stride_h=sh, stride_w=sw,
                     pad_h=ph, pad_w=pw)
    x = _x(h, w, seed=h * 10 + w)
    if _has_empty_window(h, w, kh, kw, sh, sw, ph, pw, True):
        with layer_error("past the input", cls=ShapeError):
            infer(spec, x.shape)
        return
    try:
        ref, _ = caffe_pooling(x.numpy(), pool, kh, kw, sh, sw, ph, pw)
    except (AssertionError, ValueError):
        pytest.skip("Caffe itself rejects this geometry")
    if 0 in ref.shape:
        with layer_error("empty", cls=ShapeError):
            infer(spec, x.shape)
        return
    (y,) = run_layer(spec, x)
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-13, atol=1e-13)


def test_pooling_clip_rule_applies_to_both_axes_when_one_pad_is_set():
    # H=5, kernel_h 1, stride_h 3, pad_h 0 but pad_w 1: ceil gives 3 rows; Caffe clips to 2
    # because pad_w != 0, which also removes the empty third window (start 6 >= 5).
    spec = make_spec("Pooling", pool="MAX", kernel_h=1, kernel_w=3, stride_h=3, stride_w=1,
                     pad_h=0, pad_w=1)
    assert infer(spec, (1, 1, 5, 4)) == [(1, 1, 2, 4)]
    x = _x(5, 4)
    (y,) = run_layer(spec, x)
    ref, _ = caffe_pooling(x.numpy(), "MAX", 1, 3, 3, 1, 0, 1)
    np.testing.assert_array_equal(y.numpy(), ref)
    spec0 = make_spec("Pooling", pool="MAX", kernel_h=1, kernel_w=3, stride_h=3, stride_w=1)
    with layer_error("past the input", cls=ShapeError):
        infer(spec0, (1, 1, 5, 4))


def test_pooling_ave_divisor_counts_padding_not_overhang():
    # H=W=4, k=3, s=2, p=1 (ceil): rows [-1,2) [1,4) -> divisors 3 and 3;
    # H=W=5, k=3, s=2, p=1: windows [-1,2) [1,4) [3,6) with end clipped to H+p=6 -> 3,3,3;
    # H=W=6, k=3, s=2, p=1: [-1,2) [1,4) [3,6) [5,8)->min(8,7)=7 -> 3,3,3,2
    spec = make_spec("Pooling", pool="AVE", kernel_size=3, stride=2, pad=1)
    x = torch.ones(1, 1, 6, 6, dtype=D)
    (y,) = run_layer(spec, x)
    # interior windows: 9 ones / 9; the corner (0,0): 4 ones / 9; last row: 2x? ones / (2*3)
    assert y[0, 0, 1, 1].item() == 1.0
    assert y[0, 0, 0, 0].item() == pytest.approx(4 / 9)
    assert y[0, 0, 3, 1].item() == pytest.approx(3 / 6)   # rows 5 only (1 row) x 3 cols / (2*3)
    assert y[0, 0, 3, 3].item() == pytest.approx(1 / 4)   # 1 x 1 pixel / (2*2)


def test_global_pooling():
    x = _x(5, 7)
    for pool in ("MAX", "AVE"):
        spec = make_spec("Pooling", pool=pool, global_pooling=True)
        (y,) = run_layer(spec, x)
        ref = x.amax(dim=(2, 3), keepdim=True) if pool == "MAX" else x.mean(dim=(2, 3), keepdim=True)
        torch.testing.assert_close(y, ref)


def test_pooling_psp_pyramid_kernels_at_60():
    # PSPNet: AVE kernel = stride = 60/b gives b x b bins, equal to adaptive pooling
    x = _x(60, 60)
    for b in (1, 2, 3, 6):
        spec = make_spec("Pooling", pool="AVE", kernel_size=60 // b, stride=60 // b)
        (y,) = run_layer(spec, x)
        assert y.shape[2:] == (b, b)
        (z,) = run_layer(make_spec("AdaptivePooling", output_size=b), x)
        torch.testing.assert_close(y, z)


def test_pooling_fcn_and_deeplab_sizes():
    walk = []
    size = 698
    spec = make_spec("Pooling", pool="MAX", kernel_size=2, stride=2)
    for _ in range(5):
        size = infer(spec, (1, 1, size, size))[0][2]
        walk.append(size)
    assert walk[0] == 349 and walk[1] == 175    # ceil; floor would give 174
    deeplab = make_spec("Pooling", pool="MAX", kernel_size=3, stride=2, pad=1)
    assert [infer(deeplab, (1, 1, n, n))[0][2] for n in (321, 161, 81)] == [161, 81, 41]
    stride1 = make_spec("Pooling", pool="MAX", kernel_size=3, stride=1, pad=1)
    assert infer(stride1, (1, 1, 41, 41)) == [(1, 1, 41, 41)]


def test_pooling_flops():
    spec = make_spec("Pooling", pool="AVE", kernel_size=3, stride=2)
    shapes = [(2, 3, 9, 9)]
    out = infer(spec, *shapes)
    assert out == [(2, 3, 4, 4)]
    assert get("Pooling").flops(spec, shapes, out) == 2 * 3 * 16 * 9


def test_pooling_gradients_flow_on_both_paths():
    x = _x(6, 5).requires_grad_()
    for k, p in [(3, 1), (3, 2)]:
        spec = make_spec("Pooling", pool="AVE", kernel_size=k, pad=p, stride=2)
        m = build(spec, x.shape)
        assert torch.autograd.gradcheck(lambda x: m(x), (x,))


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("params,match", [
    (dict(pool="STOCHASTIC", kernel_size=2), "STOCHASTIC"),
    (dict(pool="MAX"), "kernel_size is required"),
    (dict(kernel_size=2, kernel_h=2, kernel_w=2), "not both"),
    (dict(kernel_h=2), "together"),
    (dict(kernel_size=3, pad=3), "smaller than the kernel"),
    (dict(kernel_size=3, pad_h=1, pad_w=4), "smaller than the kernel"),
    (dict(global_pooling=True, kernel_size=3), "global_pooling"),
    (dict(global_pooling=True, pad=1), "pad 0"),
    (dict(global_pooling=True, stride=2), "stride 1"),
    (dict(kernel_size=0), "kernel_size"),
    (dict(kernel_size=2, pool="max"), "pool"),
    (dict(kernel_size=2, round_mode="UP"), "round_mode"),
    (dict(kernel_size=2, dilation=2), "dilation"),
])
def test_pooling_bad_params(params, match):
    with layer_error(match, layer="pool9"):
        make_spec("Pooling", name="pool9", **params)


def test_pooling_mask_top_needs_max():
    with layer_error("argmax mask", layer="p"):
        make_spec("Pooling", name="p", pool="AVE", kernel_size=2, n_tops=2)
    with layer_error("tops", layer="p", cls=SchemaError):
        make_spec("Pooling", name="p", kernel_size=2, n_tops=3)


@pytest.mark.parametrize("params,shape,match", [
    (dict(kernel_size=4), (1, 1, 3, 8), "empty"),
    (dict(kernel_size=2, round_mode="FLOOR"), (1, 1, 1, 8), "empty"),
    (dict(kernel_size=1, stride=3), (1, 1, 5, 7), "past the input"),
    (dict(kernel_size=2), (1, 3, 8), "4-D"),
])
def test_pooling_bad_shapes(params, shape, match):
    spec = make_spec("Pooling", name="pool3", **params)
    with layer_error(match, layer="pool3", cls=ShapeError):
        infer(spec, shape)


# ----------------------------------------------------------------------------- 3-D (5-D bottoms)

def caffe_pooling_nd(x, pool, kernel, stride, pad, ceil=True):
    """Caffe's pooling loops with every rule applied per spatial axis (the N-D pooling of
    the Caffe forks for volumes): sizes with the clip rule on every axis when some pad is
    set, MAX windows clipped to the input (first maximum in raster order wins, its flat
    index in the input volume is the mask), AVE divisors counting padding, not overhang.

    x: numpy N x C x *sizes.  Returns (top, mask)."""
    sizes = x.shape[2:]
    rnd = math.ceil if ceil else math.floor
    out = [int(rnd(float(n + 2 * p - k) / s)) + 1 for n, k, s, p in zip(sizes, kernel, stride, pad)]
    if any(pad):
        out = [o - 1 if (o - 1) * s >= n + p else o for o, s, n, p in zip(out, stride, sizes, pad)]
    top = np.zeros(x.shape[:2] + tuple(out))
    mask = np.full(top.shape, -1.0)
    for pos in itertools.product(*(range(o) for o in out)):
        starts = [i * s - p for i, s, p in zip(pos, stride, pad)]
        if pool == "MAX":
            lo = [max(a, 0) for a in starts]
            hi = [min(a + k, n) for a, k, n in zip(starts, kernel, sizes)]
            if any(b <= a for a, b in zip(lo, hi)):
                top[(slice(None), slice(None)) + pos] = -FLT_MAX
                continue
            win = x[(slice(None), slice(None)) + tuple(slice(a, b) for a, b in zip(lo, hi))]
            flat = win.reshape(x.shape[0], x.shape[1], -1)
            top[(slice(None), slice(None)) + pos] = flat.max(axis=2)
            local = np.unravel_index(flat.argmax(axis=2), win.shape[2:])
            mask[(slice(None), slice(None)) + pos] = np.ravel_multi_index(
                tuple(a + l for a, l in zip(lo, local)), sizes)
        else:
            ends = [min(a + k, n + p) for a, k, n, p in zip(starts, kernel, sizes, pad)]
            size = math.prod(b - a for a, b in zip(starts, ends))
            window = tuple(slice(max(a, 0), min(b, n)) for a, b, n in zip(starts, ends, sizes))
            total = x[(slice(None), slice(None)) + window].sum(axis=tuple(range(2, x.ndim)))
            top[(slice(None), slice(None)) + pos] = total / size if size > 0 else np.nan
    return top, mask


def _x3(sizes, seed=0, ties=False):
    g = torch.Generator().manual_seed(seed)
    if ties:
        return torch.randint(0, 3, (1, 2) + tuple(sizes), generator=g).to(D)
    return torch.randn((1, 2) + tuple(sizes), generator=g, dtype=D)


def _check_3d(pool, round_mode, kernel, stride, pad, sizes, seed):
    """One 3-D geometry on both paths: values, mask and sizes equal the N-D Caffe loops,
    or the layer refuses exactly the geometries Caffe would give empty windows for."""
    ceil = round_mode == "CEIL"
    as_yaml = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731
    spec = make_spec("Pooling", pool=pool, kernel_size=as_yaml(kernel), stride=as_yaml(stride),
                     pad=as_yaml(pad), round_mode=round_mode, n_tops=2 if pool == "MAX" else 1)
    k3, s3, p3 = ((v,) * 3 if isinstance(v, int) else v for v in (kernel, stride, pad))
    x = _x3(sizes, seed=seed, ties=pool == "MAX" and seed % 2 == 0)
    rnd = math.ceil if ceil else math.floor
    raw = [int(rnd((n + 2 * p - k) / s)) + 1 for n, k, s, p in zip(sizes, k3, s3, p3)]
    if min(raw) < 1:
        with layer_error("empty", cls=ShapeError):
            infer(spec, x.shape)
        return "nonpositive"
    ref, ref_mask = caffe_pooling_nd(x.numpy(), pool, k3, s3, p3, ceil)
    if any((o - 1) * s - p >= n for o, s, p, n in zip(ref.shape[2:], s3, p3, sizes)):
        assert not any(p3) and ceil
        with layer_error("past the input", cls=ShapeError):
            infer(spec, x.shape)
        return "refused"
    kinds = []
    for explicit in (None, True):
        module = get("Pooling").build(spec, [tuple(x.shape)], explicit=explicit)
        tops = run_layer(spec, x, module=module)
        np.testing.assert_allclose(tops[0].numpy(), ref, rtol=1e-13, atol=1e-13,
                                   err_msg=f"{sizes} k={kernel} s={stride} p={pad} {explicit}")
        if pool == "MAX":
            np.testing.assert_array_equal(tops[1].numpy(), ref_mask)
        kinds.append("native" if module.native_path(x.shape[2:]) else "explicit")
    return kinds[0]


SWEEP_3D = [(k, s, p) for k in range(1, 4) for s in range(1, 4) for p in range(k)]


@pytest.mark.parametrize("pool", ["MAX", "AVE"])
@pytest.mark.parametrize("round_mode", ["CEIL", "FLOOR"])
def test_pooling_3d_sweep_equals_caffe_nd_loops(pool, round_mode):
    counts = {"native": 0, "explicit": 0, "refused": 0, "nonpositive": 0}
    for sizes in [(4, 5, 3), (1, 3, 2)]:
        for k, s, p in SWEEP_3D:
            counts[_check_3d(pool, round_mode, k, s, p, sizes, seed=k + s + p)] += 1
    assert counts["native"] > 10 and counts["explicit"] > 5 and counts["nonpositive"] >= 3
    assert (counts["refused"] > 0) == (round_mode == "CEIL")


@pytest.mark.parametrize("pool", ["MAX", "AVE"])
@pytest.mark.parametrize("kernel,stride,pad", [
    ((1, 3, 3), (1, 2, 2), (0, 1, 1)),     # per-frame pooling of a clip
    ((2, 3, 1), (2, 1, 3), (1, 0, 0)),     # a pad on D only turns the clip rule on everywhere
    ((3, 2, 2), (1, 2, 3), (2, 1, 0)),     # pad > k/2 on D: the explicit path
    ((2, 2, 2), 2, 0),
])
def test_pooling_3d_anisotropic(pool, kernel, stride, pad):
    for i, sizes in enumerate([(5, 7, 6), (3, 4, 9)]):
        assert _check_3d(pool, "CEIL", kernel, stride, pad, sizes, seed=i) != "nonpositive"


@pytest.mark.slow
@pytest.mark.parametrize("pool", ["MAX", "AVE"])
@pytest.mark.parametrize("round_mode", ["CEIL", "FLOOR"])
def test_pooling_3d_exhaustive(pool, round_mode):
    """Every (k, s, p) with k <= 4 per axis pattern over several volumes (slow)."""
    geometries = [(k, s, p) for k in range(1, 5) for s in range(1, 4) for p in range(k)]
    for sizes in [(1, 1, 1), (2, 7, 5), (6, 3, 4), (5, 5, 5)]:
        for k, s, p in geometries:
            _check_3d(pool, round_mode, k, s, p, sizes, seed=sum(sizes) + k)
            _check_3d(pool, round_mode, (k, 1, 2), (s, s, 1), (p, 0, min(p, 1)), sizes,
                      seed=k)


def test_pooling_3d_global_flops_and_errors():
    x = _x3((3, 4, 5))
    for pool in ("MAX", "AVE"):
        (y,) = run_layer(make_spec("Pooling", pool=pool, global_pooling=True), x)
        ref = x.amax(dim=(2, 3, 4), keepdim=True) if pool == "MAX" else x.mean(dim=(2, 3, 4),
                                                                                keepdim=True)
        torch.testing.assert_close(y, ref)
    spec = make_spec("Pooling", pool="AVE", kernel_size=[1, 2, 2], stride=[1, 2, 2])
    shapes = [(2, 3, 4, 8, 8)]
    out = infer(spec, *shapes)
    assert out == [(2, 3, 4, 4, 4)]
    assert get("Pooling").flops(spec, shapes, out) == 2 * 3 * 64 * 4
    with layer_error(r"3 values .* 4-D", layer="p3", cls=ShapeError):
        infer(make_spec("Pooling", name="p3", kernel_size=[1, 2, 2]), (1, 3, 8, 8))
    with layer_error(r"kernel_h/kernel_w are for 2-D", layer="p3", cls=ShapeError):
        infer(make_spec("Pooling", name="p3", kernel_h=2, kernel_w=2), (1, 3, 4, 8, 8))
    with layer_error("window along D starts at 6 past the input", layer="p3", cls=ShapeError):
        infer(make_spec("Pooling", name="p3", kernel_size=[1, 2, 2], stride=[3, 2, 2]),
              (1, 3, 5, 8, 8))
    with layer_error("pad must be smaller than the kernel, got pad 1 >= kernel 1 along D",
                     layer="p3"):
        make_spec("Pooling", name="p3", kernel_size=[1, 3, 3], pad=1)
    with layer_error("stride has 2 values but kernel_size has 3", layer="p3"):
        make_spec("Pooling", name="p3", kernel_size=[1, 3, 3], stride=[2, 2])


# ----------------------------------------------------------------------------- AdaptivePooling

def adaptive_oracle(x, oh, ow, pool):
    n, c, h, w = x.shape
    out = torch.empty(n, c, oh, ow, dtype=x.dtype)
    for i in range(oh):
        h0, h1 = (i * h) // oh, -(-((i + 1) * h) // oh)
        for j in range(ow):
            w0, w1 = (j * w) // ow, -(-((j + 1) * w) // ow)
            win = x[:, :, h0:h1, w0:w1]
            out[:, :, i, j] = win.mean(dim=(2, 3)) if pool == "AVE" else win.amax(dim=(2, 3))
    return out


@pytest.mark.parametrize("pool", ["AVE", "MAX"])
@pytest.mark.parametrize("size", [1, 2, 3, 6, [2, 5], [7, 4]])
@pytest.mark.parametrize("hw", [(13, 9), (6, 6), (3, 4)])
def test_adaptive_pooling(pool, size, hw):
    spec = make_spec("AdaptivePooling", output_size=size, pool=pool)
    oh, ow = (size, size) if isinstance(size, int) else size
    x = _x(*hw)
    assert infer(spec, x.shape) == [(1, 2, oh, ow)]
    (y,) = run_layer(spec, x)
    torch.testing.assert_close(y, adaptive_oracle(x, oh, ow, pool), rtol=1e-13, atol=1e-13)


def test_adaptive_pooling_errors():
    with layer_error("output_size", layer="ppm"):
        make_spec("AdaptivePooling", name="ppm")
    with layer_error("output_size", layer="ppm"):
        make_spec("AdaptivePooling", name="ppm", output_size=0)
    with layer_error("pool", layer="ppm"):
        make_spec("AdaptivePooling", name="ppm", output_size=1, pool="STOCHASTIC")
    spec = make_spec("AdaptivePooling", name="ppm", output_size=2)
    with layer_error("4-D", layer="ppm", cls=ShapeError):
        infer(spec, (2, 3))
