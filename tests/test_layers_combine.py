"""Blob plumbing layers, Softmax, Permute/MatMul and NonLocal2d against direct formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from layer_helpers import build, defaults, infer, layer_error, make_spec, run_layer, rand
from pacnet.errors import SchemaError, ShapeError
from pacnet.registry import get

D = torch.float64





# ----------------------------------------------------------------------------- Eltwise

@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("shape", [(5,), (2, 3), (2, 3, 4, 5)])
def test_eltwise_operations(n, shape):
    xs = [rand(*shape, seed=i) for i in range(n)]
    (y,) = run_layer(make_spec("Eltwise", n_bottoms=n), *xs)
    torch.testing.assert_close(y, sum(xs))
    coeff = [0.5, -1.0, 2.0, 3.0][:n]
    (y,) = run_layer(make_spec("Eltwise", n_bottoms=n, coeff=coeff), *xs)
    torch.testing.assert_close(y, sum(c * x for c, x in zip(coeff, xs)))
    (y,) = run_layer(make_spec("Eltwise", n_bottoms=n, operation="PROD"), *xs)
    torch.testing.assert_close(y, math.prod(xs))
    (y,) = run_layer(make_spec("Eltwise", n_bottoms=n, operation="MAX"), *xs)
    torch.testing.assert_close(y, torch.stack(xs).amax(0))


def test_eltwise_max_gradient_goes_to_caffes_winner():
    a = torch.tensor([1.0, 2.0, 0.0], dtype=D, requires_grad=True)
    b = torch.tensor([1.0, 1.0, 0.0], dtype=D, requires_grad=True)
    c = torch.tensor([0.0, 2.0, 0.0], dtype=D, requires_grad=True)
    (y,) = run_layer(make_spec("Eltwise", n_bottoms=3, operation="MAX"), a, b, c)
    y.sum().backward()
    # tie a == b: bottom 1 wins; tie of c with the running max: the earlier bottom keeps it.
    assert a.grad.tolist() == [0.0, 1.0, 0.0]
    assert b.grad.tolist() == [1.0, 0.0, 1.0]
    assert c.grad.tolist() == [0.0, 0.0, 0.0]


def test_eltwise_prod_gradcheck():
    m = build(make_spec("Eltwise", n_bottoms=3, operation="PROD"), (2, 3), (2, 3), (2, 3), dtype=D)
    assert torch.autograd.gradcheck(m, tuple(rand(2, 3, seed=i).requires_grad_(True) for i in range(3)))


def test_eltwise_errors():
    with layer_error("identical shapes", cls=ShapeError):
        infer(make_spec("Eltwise", n_bottoms=2), (2, 3, 4), (2, 3, 5))
    with layer_error("identical shapes", cls=ShapeError):
        infer(make_spec("Eltwise", n_bottoms=2), (2, 3, 4), (1, 3, 4))        # no broadcasting
    with layer_error("only allowed with operation SUM", cls=SchemaError):
        make_spec("Eltwise", n_bottoms=2, operation="PROD", coeff=[1, 2])
    with layer_error("coeff has 3 values for 2 bottoms", cls=SchemaError):
        make_spec("Eltwise", n_bottoms=2, coeff=[1, 2, 3])
    with layer_error(cls=SchemaError):
        make_spec("Eltwise", n_bottoms=1)
    with layer_error(cls=SchemaError):
        make_spec("Eltwise", n_bottoms=2, operation="MIN")


# ----------------------------------------------------------------------------- Concat / Slice / Split

@pytest.mark.parametrize("params,axis", [({}, 1), ({"axis": 0}, 0), ({"axis": -1}, 3), ({"concat_dim": 2}, 2),
                                         ({"axis": -3}, 1)])
def test_concat_values(params, axis):
    base = [2, 3, 4, 5]
    xs = []
    for i, d in enumerate([1, 3, 2]):
        shape = list(base)
        shape[axis] = d
        xs.append(rand(*shape, seed=i))
    (y,) = run_layer(make_spec("Concat", n_bottoms=3, **params), *xs)
    torch.testing.assert_close(y, torch.cat(xs, dim=axis))


def test_concat_single_bottom_and_errors():
    x = rand(2, 3)
    assert torch.equal(run_layer(make_spec("Concat"), x)[0], x)
    with layer_error("does not match bottom 0", cls=ShapeError):
        infer(make_spec("Concat", n_bottoms=2), (2, 3, 4), (2, 3, 5))
    with layer_error("does not match bottom 0", cls=ShapeError):
        infer(make_spec("Concat", n_bottoms=2), (2, 3, 4), (2, 3))
    with layer_error("either axis or concat_dim", cls=SchemaError):
        make_spec("Concat", n_bottoms=2, axis=1, concat_dim=1)
    with layer_error("out of range", cls=ShapeError):
        infer(make_spec("Concat", n_bottoms=2, axis=3), (2, 3, 4), (2, 3, 4))
    with layer_error("concat_dim 3 is out of range", cls=ShapeError):
        infer(make_spec("Concat", n_bottoms=2, concat_dim=3), (2, 3, 4), (2, 3, 4))


@pytest.mark.parametrize("params,n_tops,axis,sizes", [
    ({"slice_point": [1, 3]}, 3, 1, [1, 2, 3]),
    ({}, 2, 1, [3, 3]),
    ({}, 3, 1, [2, 2, 2]),
    ({"axis": -1, "slice_point": 2}, 2, 3, [2, 3]),
    ({"slice_dim": 2, "slice_point": [1]}, 2, 2, [1, 3]),
    ({"axis": 0}, 2, 0, [1, 1]),
    ({}, 1, 1, [6]),
])
def test_slice_values(params, n_tops, axis, sizes):
    x = rand(2, 6, 4, 5)
    tops = run_layer(make_spec("Slice", n_tops=n_tops, **params), x)
    assert [t.shape[axis] for t in tops] == sizes
    torch.testing.assert_close(torch.cat(tops, dim=axis), x)
    edges = [0] + list(torch.tensor(sizes).cumsum(0).tolist())
    for t, a, b in zip(tops, edges, edges[1:]):
        torch.testing.assert_close(t, x.narrow(axis, a, b - a))


def test_slice_errors():
    with layer_error("2 slice_point", cls=SchemaError):
        make_spec("Slice", n_tops=2, slice_point=[1, 2])
    with layer_error("increase strictly", cls=SchemaError):
        make_spec("Slice", n_tops=3, slice_point=[3, 2])
    with layer_error("within", cls=ShapeError):
        infer(make_spec("Slice", n_tops=2, slice_point=[6]), (2, 6))
    with layer_error("evenly", cls=ShapeError):
        infer(make_spec("Slice", n_tops=4), (2, 6))
    with layer_error("either axis or slice_dim", cls=SchemaError):
        make_spec("Slice", n_tops=2, axis=1, slice_dim=1)


@pytest.mark.parametrize("n_tops", [1, 2, 3])
def test_split_copies_and_sums_gradients(n_tops):
    x = rand(2, 3, 4).requires_grad_(True)
    tops = run_layer(make_spec("Split", n_tops=n_tops), x)
    assert len(tops) == n_tops and all(torch.equal(t, x) for t in tops)
    sum((i + 1) * t.sum() for i, t in enumerate(tops)).backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, n_tops * (n_tops + 1) / 2))


# ----------------------------------------------------------------------------- Tile

def test_tile_repeats_whole_block():
    x = torch.tensor([[1.0, 2.0, 3.0]], dtype=D)
    (y,) = run_layer(make_spec("Tile", tiles=2), x)
    assert y.tolist() == [[1.0, 2.0, 3.0, 1.0, 2.0, 3.0]]          # [a b c a b c], not [a a b b c c]


@pytest.mark.parametrize("axis,tiles", [(1, 3), (0, 2), (2, 1), (-1, 4), (3, 2)])
def test_tile_values(axis, tiles):
    x = rand(2, 3, 4, 5)
    (y,) = run_layer(make_spec("Tile", axis=axis, tiles=tiles), x)
    torch.testing.assert_close(y, torch.cat([x] * tiles, dim=axis))


def test_tile_errors():
    with layer_error(cls=SchemaError):
        make_spec("Tile")                                 # tiles is required
    with layer_error(cls=SchemaError):
        make_spec("Tile", tiles=0)
    with layer_error("out of range", cls=ShapeError):
        infer(make_spec("Tile", tiles=2, axis=4), (2, 3, 4, 5))


# ----------------------------------------------------------------------------- Reshape / Flatten

@pytest.mark.parametrize("params,in_shape,out_shape", [
    ({"shape": [0, -1]}, (2, 3, 4, 5), (2, 60)),
    ({"shape": {"dim": [0, 0, -1]}}, (2, 3, 4, 5), (2, 3, 20)),
    ({"shape": {"dim": -1}}, (2, 3, 4, 5), (120,)),
    ({"shape": [0, 2, -1, 0]}, (2, 6, 4, 5), (2, 2, 12, 5)),
    ({"shape": [2, 3], "axis": 1, "num_axes": 1}, (2, 6, 4), (2, 2, 3, 4)),
    ({"shape": [1], "axis": -1, "num_axes": 0}, (2, 3, 4), (2, 3, 4, 1)),
    ({"shape": [1], "axis": 0, "num_axes": 0}, (2, 3, 4), (1, 2, 3, 4)),
    ({"shape": [-1], "axis": 1}, (2, 3, 4), (2, 12)),
    ({"shape": [0, -1], "axis": -3, "num_axes": 2}, (2, 3, 4, 5), (2, 3, 4, 5)),
    ({"shape": [6, 0, 0]}, (2, 3, 4, 5), None),
    ({"shape": [4, -1, 0]}, (2, 6, 4), (4, 3, 4)),
])
def test_reshape_rule(params, in_shape, out_shape):
    spec = make_spec("Reshape", **params)
    x = rand(*in_shape)
    if out_shape is None:
        with layer_error("cannot become", cls=ShapeError):
            infer(spec, in_shape)
        return
    assert infer(spec, in_shape) == [out_shape]
    (y,) = run_layer(spec, x)
    torch.testing.assert_close(y.flatten(), x.flatten())


def test_reshape_follows_the_input_at_run_time():
    spec = make_spec("Reshape", shape=[0, -1])
    m = build(spec, (2, 3, 4), dtype=D)
    assert m(rand(5, 3, 2)).shape == (5, 6)
    spec = make_spec("Reshape", shape=[0, 3, 4])
    m = build(spec, (2, 3, 4), dtype=D)
    with layer_error("cannot become", cls=ShapeError):
        m(rand(2, 3, 5))


def test_reshape_errors():
    with layer_error("at most one -1", cls=SchemaError):
        make_spec("Reshape", shape=[-1, -1])
    with layer_error(cls=SchemaError):
        make_spec("Reshape", shape=[2, -2])
    with layer_error(cls=SchemaError):
        make_spec("Reshape")
    with layer_error("not divisible", cls=ShapeError):
        infer(make_spec("Reshape", shape=[7, -1]), (2, 3, 4))
    with layer_error("no axis", cls=ShapeError):
        infer(make_spec("Reshape", shape=[0, 0, 0, 0]), (2, 3, 4))
    with layer_error("exceeds", cls=ShapeError):
        infer(make_spec("Reshape", shape=[-1], axis=1, num_axes=3), (2, 3, 4))
    with layer_error("out of range", cls=ShapeError):
        infer(make_spec("Reshape", shape=[-1], axis=5), (2, 3, 4))


@pytest.mark.parametrize("params,out_shape", [({}, (2, 60)), ({"axis": 2}, (2, 3, 20)),
                                              ({"axis": 1, "end_axis": 2}, (2, 12, 5)),
                                              ({"axis": -2}, (2, 3, 20)), ({"axis": 0}, (120,)),
                                              ({"axis": 0, "end_axis": 0}, (2, 3, 4, 5))])
def test_flatten(params, out_shape):
    x = rand(2, 3, 4, 5)
    (y,) = run_layer(make_spec("Flatten", **params), x)
    assert tuple(y.shape) == out_shape
    torch.testing.assert_close(y.flatten(), x.flatten())


def test_flatten_errors():
    with layer_error("out of range", cls=ShapeError):
        infer(make_spec("Flatten", axis=4), (2, 3, 4, 5))
    with layer_error("comes before", cls=ShapeError):
        infer(make_spec("Flatten", axis=3, end_axis=1), (2, 3, 4, 5))


# ----------------------------------------------------------------------------- Silence / Reduction

def test_silence_has_no_tops():
    spec = make_spec("Silence", n_bottoms=2, n_tops=0)
    assert run_layer(spec, rand(2, 3), rand(4)) == []
    with layer_error(cls=SchemaError):
        make_spec("Silence", n_tops=1)


@pytest.mark.parametrize("operation", ["SUM", "ASUM", "SUMSQ", "MEAN"])
@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_reduction(operation, axis):
    x = rand(2, 3, 4)
    spec = make_spec("Reduction", operation=operation, axis=axis, coeff=-0.5)
    (y,) = run_layer(spec, x)
    a = axis % 3
    assert tuple(y.shape) == x.shape[:a]
    f = {"SUM": lambda t: t, "ASUM": torch.abs, "SUMSQ": torch.square, "MEAN": lambda t: t}[operation]
    dims = tuple(range(a, 3))
    ref = f(x).sum(dim=dims) if operation != "MEAN" else x.mean(dim=dims)
    torch.testing.assert_close(y, -0.5 * ref)


def test_reduction_default_is_a_scalar_sum():
    x = rand(2, 3)
    (y,) = run_layer(make_spec("Reduction"), x)
    assert y.dim() == 0
    torch.testing.assert_close(y, x.sum())


# ----------------------------------------------------------------------------- ArgMax

def ref_topk(x, dim, k):
    """Indices/values of the k largest along dim; ties: larger index first (std::greater on pairs)."""
    xm = x.movedim(dim, -1)
    flat = xm.reshape(-1, xm.shape[-1])
    idx, val = [], []
    for row in flat.tolist():
        pairs = sorted(((v, i) for i, v in enumerate(row)), reverse=True)[:k]
        idx.append([i for _, i in pairs])
        val.append([v for v, _ in pairs])
    shape = xm.shape[:-1] + (k,)
    to = lambda a: torch.tensor(a, dtype=D).reshape(shape).movedim(-1, dim)  # noqa: E731
    return to(idx), to(val)


@pytest.mark.parametrize("axis", [0, 1, 2, -1])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("out_max_val", [False, True])
def test_argmax_with_axis(axis, top_k, out_max_val):
    x = torch.randint(0, 3, (2, 3, 4), generator=torch.Generator().manual_seed(1)).to(D)   # many ties
    (y,) = run_layer(make_spec("ArgMax", axis=axis, top_k=top_k, out_max_val=out_max_val), x)
    idx, val = ref_topk(x, axis % 3, top_k)
    torch.testing.assert_close(y, val if out_max_val else idx)


@pytest.mark.parametrize("shape", [(2, 5), (2, 3, 4), (2, 3, 2, 2)])
@pytest.mark.parametrize("top_k", [1, 3])
@pytest.mark.parametrize("out_max_val", [False, True])
def test_argmax_without_axis_caffe_layout(shape, top_k, out_max_val):
    x = torch.randint(0, 4, shape, generator=torch.Generator().manual_seed(2)).to(D)
    (y,) = run_layer(make_spec("ArgMax", top_k=top_k, out_max_val=out_max_val), x)
    expected_shape = [shape[0], 2 if out_max_val else 1, top_k] + [1] * (max(len(shape), 3) - 3)
    assert list(y.shape) == expected_shape
    idx, val = ref_topk(x.reshape(shape[0], -1), 1, top_k)
    torch.testing.assert_close(y[:, 0].reshape(shape[0], top_k), idx)
    if out_max_val:
        torch.testing.assert_close(y[:, 1].reshape(shape[0], top_k), val)


def test_argmax_tie_takes_larger_index():
    x = torch.tensor([[1.0, 5.0, 5.0, 2.0]], dtype=D)
    assert run_layer(make_spec("ArgMax", axis=1), x)[0].tolist() == [[2.0]]


def test_argmax_errors():
    with layer_error("top_k 5 exceeds", cls=ShapeError):
        infer(make_spec("ArgMax", axis=1, top_k=5), (2, 4))
    with layer_error("top_k 9 exceeds", cls=ShapeError):
        infer(make_spec("ArgMax", top_k=9), (2, 2, 4))
    with layer_error(cls=SchemaError):
        make_spec("ArgMax", top_k=0)


# ----------------------------------------------------------------------------- Softmax

@pytest.mark.parametrize("axis", [0, 1, -1, 2])
def test_softmax(axis):
    x = rand(2, 3, 4) * 10
    (y,) = run_layer(make_spec("Softmax", axis=axis), x)
    e = torch.exp(x - x.amax(dim=axis, keepdim=True))
    torch.testing.assert_close(y, e / e.sum(dim=axis, keepdim=True))


def test_softmax_axis_error():
    with layer_error("out of range", cls=ShapeError):
        infer(make_spec("Softmax", axis=3), (2, 3, 4))


# ----------------------------------------------------------------------------- Permute / MatMul

@pytest.mark.parametrize("order,full", [([0, 2, 3, 1], [0, 2, 3, 1]), ([2], [2, 0, 1, 3]), ([3, 0], [3, 0, 1, 2]),
                                        (None, [0, 1, 2, 3]), (1, [1, 0, 2, 3])])
def test_permute(order, full):
    x = rand(2, 3, 4, 5)
    params = {} if order is None else {"order": order}
    (y,) = run_layer(make_spec("Permute", **params), x)
    torch.testing.assert_close(y, x.permute(*full))


def test_permute_errors():
    with layer_error("duplicate", cls=SchemaError):
        make_spec("Permute", order=[0, 0, 1])
    with layer_error("names axis 4", cls=ShapeError):
        infer(make_spec("Permute", order=[0, 4]), (2, 3, 4, 5))


@pytest.mark.parametrize("a_shape,b_shape,ta,tb", [
    ((3, 4), (4, 5), False, False), ((2, 3, 4), (2, 4, 5), False, False), ((2, 4, 3), (2, 4, 5), True, False),
    ((2, 3, 4), (2, 5, 4), False, True), ((2, 4, 3), (2, 5, 4), True, True), ((2, 1, 3, 4), (5, 4, 6), False, False),
    ((2, 3, 4), (4, 6), False, False),
])
def test_matmul(a_shape, b_shape, ta, tb):
    a, b = rand(*a_shape, seed=1), rand(*b_shape, seed=2)
    spec = make_spec("MatMul", n_bottoms=2, transpose_a=ta, transpose_b=tb)
    (y,) = run_layer(spec, a, b)
    aa = a.transpose(-1, -2) if ta else a
    bb = b.transpose(-1, -2) if tb else b
    torch.testing.assert_close(y, (aa.unsqueeze(-1) * bb.unsqueeze(-3)).sum(-2))
    out_shape = infer(spec, a_shape, b_shape)[0]
    m, k, n = out_shape[-2], aa.shape[-1], out_shape[-1]
    assert get("MatMul").flops(spec, [a_shape, b_shape], [out_shape]) == 2 * math.prod(out_shape[:-2]) * m * k * n


def test_matmul_errors():
    spec = make_spec("MatMul", n_bottoms=2)
    with layer_error("inner dims differ", cls=ShapeError):
        infer(spec, (2, 3, 4), (2, 5, 6))
    with layer_error("at least 2 axes", cls=ShapeError):
        infer(spec, (4,), (4, 5))
    with layer_error("do not broadcast", cls=ShapeError):
        infer(spec, (2, 3, 4), (3, 4, 5))
    with layer_error(cls=SchemaError):
        make_spec("MatMul", n_bottoms=1)


# ----------------------------------------------------------------------------- NonLocal2d

def nl_reference(x, m, mode, use_scale, sub_sample, norm):
    """mmcv ``_NonLocalNd.forward`` transcribed (repeat + cat + conv for concatenation)."""
    n, c, h, w = x.shape
    inter = m.g_weight.shape[0]
    pool = (lambda t: F.max_pool2d(t, kernel_size=(2, 2))) if sub_sample else (lambda t: t)
    g_x = pool(F.conv2d(x, m.g_weight, m.g_bias)).view(n, inter, -1).permute(0, 2, 1)
    if mode == "gaussian":
        theta_x = x.view(n, c, -1).permute(0, 2, 1)
        phi_x = pool(x).reshape(n, c, -1)
    elif mode == "concatenation":
        theta_x = F.conv2d(x, m.theta_weight, m.theta_bias).view(n, inter, -1, 1)
        phi_x = pool(F.conv2d(x, m.phi_weight, m.phi_bias)).reshape(n, inter, 1, -1)
    else:
        theta_x = F.conv2d(x, m.theta_weight, m.theta_bias).view(n, inter, -1).permute(0, 2, 1)
        phi_x = pool(F.conv2d(x, m.phi_weight, m.phi_bias)).reshape(n, inter, -1)
    if mode == "gaussian":
        pw = torch.matmul(theta_x, phi_x).softmax(dim=-1)
    elif mode == "embedded_gaussian":
        pw = torch.matmul(theta_x, phi_x)
        if use_scale:
            pw = pw / theta_x.shape[-1] ** 0.5
        pw = pw.softmax(dim=-1)
    elif mode == "dot_product":
        pw = torch.matmul(theta_x, phi_x)
        pw = pw / pw.shape[-1]
    else:
        hh, ww = theta_x.size(2), phi_x.size(3)
        feat = torch.cat([theta_x.repeat(1, 1, 1, ww), phi_x.repeat(1, 1, hh, 1)], dim=1)
        pw = F.relu(F.conv2d(feat, m.concat_weight))
        pw = pw.view(n, hh, ww) / ww
    y = torch.matmul(pw, g_x).permute(0, 2, 1).contiguous().reshape(n, inter, h, w)
    out = F.conv2d(y, m.out_weight, m.out_bias)
    if norm:
        out = F.batch_norm(out, m.out_bn_mean, m.out_bn_var, m.out_bn_weight, m.out_bn_bias, False, 0.0, 1e-5)
    return x + out


def randomise(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
        for name, b in m.named_buffers():
            b.copy_(torch.rand(b.shape, generator=g, dtype=b.dtype) + (0.5 if name.endswith("var") else -0.5))


NL_CASES = [(mode, sub, scale, norm) for mode in ["embedded_gaussian", "gaussian", "dot_product", "concatenation"]
            for sub in [False, True] for scale in [True, False] for norm in [False, True]
            if scale or mode == "embedded_gaussian"]


@pytest.mark.parametrize("mode,sub_sample,use_scale,norm", NL_CASES)
def test_nonlocal_matches_mmcv_formula(mode, sub_sample, use_scale, norm):
    spec = make_spec("NonLocal2d", mode=mode, sub_sample=sub_sample, use_scale=use_scale, norm=norm)
    x = rand(2, 6, 4, 5)
    m = build(spec, x.shape, dtype=D).eval()
    randomise(m)
    (y,) = run_layer(spec, x, module=m)
    torch.testing.assert_close(y, nl_reference(x, m, mode, use_scale, sub_sample, norm))


def test_nonlocal_embedded_gaussian_per_position():
    spec = make_spec("NonLocal2d", reduction=3)
    x = rand(1, 6, 2, 3)
    m = build(spec, x.shape, dtype=D)
    randomise(m, seed=3)
    y = m(x)
    xs = x[0].reshape(6, -1)                                                 # C x L
    lin = lambda w, b: w[:, :, 0, 0] @ xs + b[:, None]                      # noqa: E731
    th, ph, g = lin(m.theta_weight, m.theta_bias), lin(m.phi_weight, m.phi_bias), lin(m.g_weight, m.g_bias)
    ref = torch.empty(6, 6, dtype=D)
    for i in range(6):
        logits = torch.tensor([float(th[:, i].detach() @ ph[:, j].detach()) / math.sqrt(2) for j in range(6)], dtype=D)
        wts = torch.exp(logits - logits.max())
        wts = wts / wts.sum()
        yi = sum(wts[j] * g[:, j] for j in range(6))
        ref[:, i] = xs[:, i] + m.out_weight[:, :, 0, 0] @ yi + m.out_bias
    torch.testing.assert_close(y[0].reshape(6, -1), ref)


@pytest.mark.parametrize("norm", [False, True])
def test_nonlocal_zeros_init_is_identity_and_blob_order(norm):
    for mode in ["embedded_gaussian", "gaussian", "dot_product", "concatenation"]:
        spec = make_spec("NonLocal2d", mode=mode, norm=norm)
        m = build(spec, (1, 4, 3, 3), dtype=D)
        x = rand(1, 4, 3, 3)
        torch.testing.assert_close(m(x), x)
        present = [b for b in get("NonLocal2d").blobs if getattr(m, b) is not None]
        params = [n for n, _ in m.named_parameters()]
        assert present[:len(params)] == params                             # blobs = mmcv state_dict order
        assert set(present[len(params):]) == {n for n, _ in m.named_buffers()}
        assert m.g_weight.shape == (2, 4, 1, 1) and m.g_weight.abs().sum() > 0   # gaussian std 0.01
        if norm:
            assert m.out_bias is None and torch.equal(m.out_bn_weight, torch.zeros(4, dtype=D))
        else:
            assert torch.equal(m.out_weight, torch.zeros(4, 2, 1, 1, dtype=D))
    spec = make_spec("NonLocal2d", zeros_init=False)
    assert build(spec, (1, 4, 3, 3)).out_weight.abs().sum() > 0


@pytest.mark.parametrize("mode", ["embedded_gaussian", "gaussian", "dot_product", "concatenation"])
def test_nonlocal_gradcheck(mode):
    spec = make_spec("NonLocal2d", mode=mode, sub_sample=(mode == "dot_product"))
    m = build(spec, (1, 4, 2, 4), dtype=D)
    randomise(m, seed=7)
    names = [n for n, _ in m.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in m.parameters())
    x = rand(1, 4, 2, 4).requires_grad_(True)

    def f(inp, *ps):
        return torch.func.functional_call(m, dict(zip(names, ps)), (inp,))

    assert torch.autograd.gradcheck(f, (x,) + params, fast_mode=True)


def test_nonlocal_norm_trains_like_batchnorm2d():
    spec = make_spec("NonLocal2d", norm=True, zeros_init=False)
    m = build(spec, (2, 4, 3, 3), dtype=D).train()
    randomise(m)
    mean0 = m.out_bn_mean.clone()
    m(rand(2, 4, 3, 3))
    assert not torch.allclose(m.out_bn_mean, mean0)


def test_nonlocal_errors():
    with layer_error("N x C x H x W", cls=ShapeError):
        infer(make_spec("NonLocal2d"), (2, 4, 5))
    with layer_error("no inner channels", cls=ShapeError):
        infer(make_spec("NonLocal2d", reduction=8), (2, 4, 5, 5))
    with layer_error("sub_sample", cls=ShapeError):
        infer(make_spec("NonLocal2d", sub_sample=True), (2, 4, 1, 5))
    with layer_error(cls=SchemaError):
        make_spec("NonLocal2d", mode="softmax")


def test_nonlocal_flops_positive_and_mode_dependent():
    shapes = [(1, 8, 6, 6)]
    f = {mode: get("NonLocal2d").flops(make_spec("NonLocal2d", mode=mode), shapes, shapes)
         for mode in ["embedded_gaussian", "gaussian", "dot_product", "concatenation"]}
    assert all(v > 0 for v in f.values()) and f["gaussian"] != f["embedded_gaussian"]
