"""The fused PAC kernels (pacnet.kernels.pac) against the plain-torch reference.

float64 values and every gradient over a grid of geometries, gradcheck, opcheck,
torch.compile, argument checking, dtypes, layouts and backend selection.  The CUDA kernels
are checked under the simulator in test_pac_kernels_cuda.py.
"""

import itertools

import pytest
import torch

import pacnet.kernels.pac as P
from pacnet.errors import PacnetValueError
from pacnet.kernels import runtime
from pacnet.kernels.pac import cpu, ops
from pacnet.kernels.pac import reference as R
from pacnet.kernels.pac.geometry import Geometry

DT = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)


@pytest.fixture(autouse=True)
def _fused_backend(monkeypatch):
    monkeypatch.delenv("PACNET_BACKEND", raising=False)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(gen, *shape, dtype=DT):
    return torch.randn(shape, generator=gen, dtype=dtype)


def _rand(gen, *shape, dtype=DT):
    return torch.rand(shape, generator=gen, dtype=dtype)


def _run(fn, inputs, grad):
    """Output of ``fn(*inputs)`` and the gradients of ``<out, grad>`` w.r.t. the tensor inputs."""
    leaves = [t.detach().clone().requires_grad_() if isinstance(t, torch.Tensor) else t
              for t in inputs]
    out = fn(*leaves)
    tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
    grads = torch.autograd.grad(out, tensors, grad)
    return out.detach(), grads


def _assert_same(fused, ref, what):
    out_f, grads_f = fused
    out_r, grads_r = ref
    assert out_f.shape == out_r.shape, what
    torch.testing.assert_close(out_f, out_r, **TOL, msg=lambda m: f"{what} forward: {m}")
    for i, (gf, gr) in enumerate(zip(grads_f, grads_r)):
        torch.testing.assert_close(gf, gr, **TOL, msg=lambda m: f"{what} grad {i}: {m}")


# ----------------------------------------------------------------------------- geometry grid
# One grid per spatial rank (2-D, 3-D, 1-D): kernel x stride x dilation, each with a size,
# padding mode and batch that cycle.  Every test below runs over all of them.

_GRIDS = {
    2: dict(sizes=[(5, 7), (8, 6), (7, 7), (6, 9), (4, 5), (9, 8)],
            kernels=[(1, 1), (3, 3), (5, 5), (3, 5), (5, 1)],
            strides=[(1, 1), (2, 2), (3, 3), (1, 2), (3, 1)],
            dilations=[(1, 1), (2, 2), (1, 2)]),
    3: dict(sizes=[(4, 5, 6), (5, 4, 7), (3, 6, 5), (6, 3, 4), (1, 5, 6)],
            kernels=[(1, 1, 1), (3, 3, 3), (3, 1, 3), (1, 3, 5), (5, 3, 1)],
            strides=[(1, 1, 1), (2, 2, 2), (1, 2, 1), (2, 1, 3)],
            dilations=[(1, 1, 1), (2, 1, 2)]),
    1: dict(sizes=[(7,), (9,), (8,)], kernels=[(1,), (3,), (5,)], strides=[(1,), (2,), (3,)],
            dilations=[(1,), (2,)]),
}


def _padding(k, d, mode):
    half = tuple(d[i] * (k[i] - 1) // 2 for i in range(len(k)))
    return {"zero": (0,) * len(k), "half": half,
            "beyond": tuple(h + 1 + i % 2 for i, h in enumerate(half)),
            "mixed": half[:1] + (0,) * (len(k) - 1)}[mode]


def _geometries(rank):
    grid = _GRIDS[rank]
    cases = []
    modes = ["zero", "half", "beyond", "mixed"]
    for i, (k, s, d) in enumerate(itertools.product(grid["kernels"], grid["strides"],
                                                    grid["dilations"])):
        p = _padding(k, d, modes[i % len(modes)])
        sizes = grid["sizes"][i % len(grid["sizes"])]
        if min(R.out_size(sizes, k, s, p, d)) < 1:
            p = _padding(k, d, "beyond")
        b = 1 + i % 2

        def j(v):
            return "".join(map(str, v))

        name = f"{'x'.join(map(str, sizes))}-k{j(k)}-s{j(s)}-p{j(p)}-d{j(d)}-b{b}"
        cases.append(pytest.param(sizes, k, s, p, d, b, id=name))
    return cases


GEOMETRIES = _geometries(2) + _geometries(3) + _geometries(1)


@pytest.mark.parametrize("rank, count", [(2, 75), (3, 40), (1, 18)])
def test_grid_covers_every_geometry_parameter(rank, count):
    values = [c.values for c in GEOMETRIES if len(c.values[0]) == rank]
    grid = _GRIDS[rank]
    assert len(values) == count
    assert {v[1] for v in values} == set(grid["kernels"])
    assert {v[2] for v in values} == set(grid["strides"])
    assert {v[4] for v in values} == set(grid["dilations"])
    for axis in range(rank):  # odd and even sizes on every axis
        assert {v[0][axis] % 2 for v in values} == {0, 1}
    # padding 0, up to d(k-1)/2 and beyond it
    assert any(v[3] == (0,) * rank for v in values)
    assert any(v[3][0] > v[4][0] * (v[1][0] - 1) // 2 for v in values)
    assert all(min(R.out_size(*v[:5])) >= 1 for v in values)


@pytest.mark.parametrize("sizes, k, s, p, d, b", GEOMETRIES)
def test_pac_dist_matches_reference(sizes, k, s, p, d, b):
    gen = _gen(1)
    cg = 3
    out = R.out_size(sizes, k, s, p, d)
    f = _randn(gen, b, cg, *sizes)
    for center_given, asym, cw in ((False, False, False), (True, False, False),
                                   (False, True, False), (True, True, True), (False, False, True)):
        center = _randn(gen, b, cg, *out) if center_given else None
        grad = _randn(gen, b, cg if cw else 1, *k, *out)
        inputs = (f, center) if center_given else (f,)

        def fused(f_, c_=None):
            return P.pac_dist(f_, c_, k, s, p, d, asym=asym, channel_wise=cw)

        def ref(f_, c_=None):
            return R.pac_dist(f_, c_, k, s, p, d, asym, cw)

        _assert_same(_run(fused, inputs, grad), _run(ref, inputs, grad),
                     f"pac_dist center={center_given} asym={asym} channel_wise={cw}")


@pytest.mark.parametrize("sizes, k, s, p, d, b", GEOMETRIES)
def test_pac_conv_matches_reference(sizes, k, s, p, d, b):
    gen = _gen(2)
    c = 3
    out = R.out_size(sizes, k, s, p, d)
    x = _randn(gen, b, c, *sizes)
    K = _rand(gen, b, 1, *k, *out)
    for o, with_bias, shared in ((5, True, False), (4, False, False), (1, True, False),
                                 (c, True, True), (c, False, True)):
        w = _randn(gen, 1, 1, *k) if shared else _randn(gen, o, c, *k)
        bias = _randn(gen, o) if with_bias else None
        grad = _randn(gen, b, o, *out)
        inputs = (x, K, w) + ((bias,) if with_bias else ())

        def fused(x_, K_, w_, b_=None):
            return P.pac_conv(x_, K_, w_, b_, s, p, d, shared_filters=shared)

        def ref(x_, K_, w_, b_=None):
            return R.pac_conv(x_, K_, w_, b_, s, p, d, shared)

        _assert_same(_run(fused, inputs, grad), _run(ref, inputs, grad),
                     f"pac_conv O={o} bias={with_bias} shared={shared}")


@pytest.mark.parametrize("sizes, k, s, p, d, b", GEOMETRIES)
def test_pac_pool_matches_reference(sizes, k, s, p, d, b):
    gen = _gen(3)
    c = 3
    out = R.out_size(sizes, k, s, p, d)
    x = _randn(gen, b, c, *sizes)
    for kc in (1, c):
        K = _rand(gen, b, kc, *k, *out)
        grad = _randn(gen, b, c, *out)
        _assert_same(_run(lambda x_, K_: P.pac_pool(x_, K_, k, s, p, d), (x, K), grad),
                     _run(lambda x_, K_: R.pac_pool(x_, K_, k, s, p, d), (x, K), grad),
                     f"pac_pool K channels={kc}")


def test_two_d_views_are_the_generic_ops():
    """pac_conv2d/pac_pool2d/pac_conv2d_add_ run the rank-generic ops on 4-D tensors."""
    gen = _gen(4)
    x, K, w = _randn(gen, 1, 2, 6, 5), _rand(gen, 1, 1, 3, 3, 6, 5), _randn(gen, 3, 2, 3, 3)
    torch.testing.assert_close(P.pac_conv2d(x, K, w, None, 1, 1, 1),
                               P.pac_conv(x, K, w, None, 1, 1, 1), **TOL)
    torch.testing.assert_close(P.pac_pool2d(x, K, 3, 1, 1, 1), P.pac_pool(x, K, 3, 1, 1, 1),
                               **TOL)
    out = torch.zeros(1, 3, 6, 5, dtype=DT)
    torch.testing.assert_close(P.pac_conv2d_add_(out, x, K, w, 1, 1, 1),
                               P.pac_conv(x, K, w, None, 1, 1, 1), **TOL)


# ----------------------------------------------------------------------------- band scheduling

@pytest.mark.parametrize("threads", [1, 3, 8])
@pytest.mark.parametrize("sizes, k, s, d, b", [
    ((41, 9), (3, 3), (1, 1), (1, 1), 1), ((41, 9), (5, 3), (2, 1), (1, 2), 2),
    ((41, 9), (3, 3), (1, 1), (3, 1), 1), ((41, 9), (5, 5), (3, 3), (1, 1), 3),
    ((21, 6, 5), (3, 3, 3), (1, 1, 1), (1, 1, 1), 1),  # bands of output planes
    ((21, 6, 5), (5, 3, 3), (2, 1, 1), (1, 2, 1), 2),
    ((21, 6, 5), (3, 3, 1), (1, 2, 1), (3, 1, 1), 1),
    ((1, 41, 9), (3, 3, 3), (1, 1, 1), (1, 1, 1), 2)])  # one plane: bands of rows
def test_backward_bands_are_race_free(monkeypatch, threads, sizes, k, s, d, b):
    """Tall images (deep volumes) split into many bands of rows (of planes) and chunks
    (thread counts faked) still match."""
    monkeypatch.setattr(runtime, "threads", lambda: threads)
    monkeypatch.setattr(runtime, "PARALLEL_MIN_WORK", 0)  # parallel drivers even for tiny inputs
    p = tuple(d[i] * (k[i] - 1) // 2 for i in range(len(k)))
    geo = Geometry.of(sizes, k, s, p, d)
    L, nbands, nchunks = cpu._plan_bands(b, geo)
    unit = geo.band_unit()[0]
    assert nchunks >= 1 and L % unit == 0 and (threads == 1 or nbands >= 2 or b >= 4 * threads)
    gen = _gen(4)
    out = R.out_size(sizes, k, s, p, d)
    x, f = _randn(gen, b, 2, *sizes), _randn(gen, b, 2, *sizes)
    K = _rand(gen, b, 1, *k, *out)
    w = _randn(gen, 3, 2, *k)
    g3 = _randn(gen, b, 3, *out)
    _assert_same(_run(lambda *a: P.pac_conv(*a, None, s, p, d), (x, K, w), g3),
                 _run(lambda *a: R.pac_conv(*a, None, s, p, d), (x, K, w), g3), "conv")
    gD = _randn(gen, b, 1, *k, *out)
    _assert_same(_run(lambda f_: P.pac_dist(f_, None, k, s, p, d), (f,), gD),
                 _run(lambda f_: R.pac_dist(f_, None, k, s, p, d), (f,), gD), "dist")
    g2 = _randn(gen, b, 2, *out)
    _assert_same(_run(lambda *a: P.pac_pool(*a, k, s, p, d), (x, K), g2),
                 _run(lambda *a: R.pac_pool(*a, k, s, p, d), (x, K), g2), "pool")


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("tile_bytes, want", [
    (1, "one row"), (20000, "a few rows"), (1 << 30, "whole images")])
@pytest.mark.parametrize("k, s, p, d", [((3, 3), (1, 1), (2, 2), (2, 2)),
                                        ((5, 3), (2, 1), (1, 3), (1, 2))])
def test_conv_tiles_cover_the_output(monkeypatch, parallel, tile_bytes, want, k, s, p, d):
    """pac_conv2d's GEMM tiles (bands of rows, a partial last one, or whole images; the
    backward in phases) cover the output exactly once, forward and backward."""
    monkeypatch.setattr(cpu, "_TILE_BYTES", tile_bytes)
    monkeypatch.setattr(runtime, "PARALLEL_MIN_WORK", 0 if parallel else 1 << 62)
    gen = _gen(7)
    b, c, o, hw = 3, 4, 5, (23, 12)
    oh, ow = R.out_size(hw, k, s, p, d)
    geo = Geometry.of(hw, k, s, p, d)
    nr, nphase, nchunks = cpu._plan_tiles(b, c * k[0] * k[1], geo, 8, parallel)
    reach = (k[0] - 1) * d[0] // s[0]  # rows apart that two output rows can share input
    shapes = {"one row": nr == 1 and nphase == reach + 1,
              "a few rows": 1 < nr < oh and oh % nr and nphase == 1 + -(-reach // nr),
              # whole images, or 4 tiles per thread
              "whole images": nr == (oh if not parallel else b * oh // 8)}
    assert shapes[want], (nr, nphase, nchunks)
    assert nchunks == (2 if parallel else 1)
    x = _randn(gen, b, c, *hw)
    K = _rand(gen, b, 1, k[0], k[1], oh, ow)
    w, bias = _randn(gen, o, c, *k), _randn(gen, o)
    grad = _randn(gen, b, o, oh, ow)
    _assert_same(_run(lambda *a: P.pac_conv2d(*a, s, p, d), (x, K, w, bias), grad),
                 _run(lambda *a: R.pac_conv(*a, s, p, d), (x, K, w, bias), grad), want)


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("s", [(1, 1, 2), (1, 1, 1)])
def test_conv_tiles_cross_output_planes(monkeypatch, parallel, s):
    """3-D: tiles of 4 output rows (z, y) start and end inside planes of 6 rows, and the
    backward runs in as many phases as the depth window needs.  With stride 1 the rows of a
    tile that read consecutive input rows are done as runs (one stretch of the input each,
    cut at the planes' and the input's edges)."""
    gen = _gen(8)
    b, c, o, sizes, k, p, d = 2, 2, 3, (4, 6, 7), (3, 3, 3), (1, 1, 1), (1, 1, 1)
    out = R.out_size(sizes, k, s, p, d)
    monkeypatch.setattr(cpu, "_TILE_BYTES", 4 * c * 27 * out[2] * 8)
    monkeypatch.setattr(runtime, "PARALLEL_MIN_WORK", 0 if parallel else 1 << 62)
    nr, nphase, _ = cpu._plan_tiles(b, c * 27, Geometry.of(sizes, k, s, p, d), 8, parallel)
    assert nr == 4 and nphase == 1 + -(-(2 * out[1] + 2) // nr)  # depth reach 2 planes
    x, K = _randn(gen, b, c, *sizes), _rand(gen, b, 1, *k, *out)
    w, bias, grad = _randn(gen, o, c, *k), _randn(gen, o), _randn(gen, b, o, *out)
    _assert_same(_run(lambda *a: P.pac_conv(*a, s, p, d), (x, K, w, bias), grad),
                 _run(lambda *a: R.pac_conv(*a, s, p, d), (x, K, w, bias), grad), "3-D tiles")


def _footprint(geo, rows):
    """The input rows (iz, iy) that output rows ``rows`` (flat z*oh + y) read."""
    (kd, kh, _), (sd, sh, _), (pd, ph, _), (dd, dh, _) = geo.ks, geo.ss, geo.ps, geo.ds
    got = set()
    for row in rows:
        z, y = divmod(row, geo.outs[1])
        for tz in range(kd):
            for ty in range(kh):
                iz, iy = z * sd - pd + tz * dd, y * sh - ph + ty * dh
                if 0 <= iz < geo.ins[0] and 0 <= iy < geo.ins[1]:
                    got.add((iz, iy))
    return got


@pytest.mark.parametrize("sizes, k, s, p, d", [
    ((17, 9), (5, 3), (1, 1), (2, 1), (1, 1)), ((17, 9), (3, 3), (2, 1), (2, 1), (3, 1)),
    ((17, 9), (7, 1), (3, 1), (3, 0), (1, 1)), ((5, 6, 7), (3, 3, 3), (1, 1, 1), (1, 1, 1),
                                                (1, 1, 1)),
    ((7, 5, 4), (3, 5, 1), (2, 1, 1), (2, 2, 0), (2, 1, 1))])
@pytest.mark.parametrize("tile_bytes", [1, 300, 2000, 1 << 30])
def test_tile_phases_never_scatter_into_one_input_row(monkeypatch, sizes, k, s, p, d,
                                                      tile_bytes):
    """The backward's phase policy: tiles of one phase read disjoint input rows (so their
    scatters into gx never race), with 2 phases for a 2-D layer whose tiles are at least as
    tall as the window's reach."""
    monkeypatch.setattr(cpu, "_TILE_BYTES", tile_bytes)
    geo = Geometry.of(sizes, k, s, p, d)
    nr, nphase, nchunks = cpu._plan_tiles(1, 4, geo, 4, False)
    T = -(-geo.rows // nr)
    assert nchunks == 1 and 1 <= nphase <= T
    tiles = [range(j * nr, min(geo.rows, (j + 1) * nr)) for j in range(T)]
    for ph in range(nphase):
        seen = set()
        for tile in tiles[ph::nphase]:
            rows = _footprint(geo, tile)
            assert not rows & seen, (ph, tile)
            seen |= rows
    reach = (geo.ks[1] - 1) * geo.ds[1] // geo.ss[1]
    if geo.rank == 2 and nr >= reach and T > 1:
        assert nphase == 2


@pytest.mark.parametrize("backend", ["numba", "reference"])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("tile_bytes", [1, 1 << 30])
def test_conv2d_add_accumulates_in_place(monkeypatch, backend, shared, tile_bytes):
    """pac_conv2d_add_(out, ...) == out + alpha * pac_conv2d(...), written into out."""
    monkeypatch.setenv("PACNET_BACKEND", backend)
    monkeypatch.setattr(cpu, "_TILE_BYTES", tile_bytes)
    gen = _gen(9)
    k, s, p, d = (3, 5), (2, 1), (1, 2), (1, 1)
    x = _randn(gen, 2, 3, 9, 8)
    oh, ow = R.out_size(x.shape[-2:], k, s, p, d)
    K = _rand(gen, 2, 1, *k, oh, ow)
    w = _randn(gen, 1, 1, *k) if shared else _randn(gen, 4, 3, *k)
    out = _randn(gen, 2, 3 if shared else 4, oh, ow)
    want = out + -0.75 * R.pac_conv(x, K, w, None, s, p, d, shared)
    ptr = out.data_ptr()
    with torch.no_grad():
        got = P.pac_conv2d_add_(out, x, K, w, s, p, d, shared_filters=shared, alpha=-0.75)
    assert got is out and out.data_ptr() == ptr
    torch.testing.assert_close(out, want, **TOL)
    # half precision: the product is computed in float32 and added
    out16 = torch.zeros(want.shape, dtype=torch.bfloat16)
    P.pac_conv2d_add_(out16, x.bfloat16(), K.bfloat16(), w.bfloat16(), s, p, d,
                      shared_filters=shared)
    torch.testing.assert_close(out16.double(), R.pac_conv(x, K, w, None, s, p, d, shared),
                               rtol=0.05, atol=0.1)


def test_backward_is_deterministic(monkeypatch):
    """Same inputs, same bits (the parallel drivers: no atomics, fixed partial sums)."""
    monkeypatch.setattr(runtime, "PARALLEL_MIN_WORK", 0)
    gen = _gen(5)
    x, f = _randn(gen, 2, 4, 30, 17), _randn(gen, 2, 3, 30, 17)
    w = _randn(gen, 6, 4, 3, 3)

    def grads():
        xs, fs, ws = (t.clone().requires_grad_() for t in (x, f, w))
        K = torch.exp(-0.5 * P.pac_dist(fs, None, 3, 1, 1, 1))
        P.pac_conv2d(xs, K, ws, None, 1, 1, 1).square().sum().backward()
        return xs.grad, fs.grad, ws.grad

    for a, b in zip(grads(), grads()):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- gradcheck/opcheck

def _small(seed=6):
    gen = _gen(seed)
    f = _randn(gen, 2, 2, 6, 5)
    x = _randn(gen, 2, 3, 6, 5)
    return gen, f, x


@pytest.mark.parametrize("asym, cw, center_given", [(False, False, False), (True, True, True),
                                                    (False, True, False), (True, False, True)])
def test_gradcheck_pac_dist(asym, cw, center_given):
    gen, f, _ = _small()
    k, s, p, d = (3, 3), (2, 1), (1, 2), (1, 2)
    oh, ow = R.out_size(f.shape[-2:], k, s, p, d)
    inputs = [f.requires_grad_()]
    if center_given:
        inputs.append(_randn(gen, 2, 2, oh, ow).requires_grad_())
    fn = lambda g, c=None: P.pac_dist(g, c, k, s, p, d, asym=asym, channel_wise=cw)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("shared", [False, True])
def test_gradcheck_pac_conv2d(shared):
    gen, _, x = _small()
    k, s, p, d = (3, 3), (1, 2), (2, 1), (2, 1)
    oh, ow = R.out_size(x.shape[-2:], k, s, p, d)
    K = _rand(gen, 2, 1, 3, 3, oh, ow)
    w = _randn(gen, 1, 1, 3, 3) if shared else _randn(gen, 4, 3, 3, 3)
    bias = _randn(gen, 3 if shared else 4)
    inputs = [t.requires_grad_() for t in (x, K, w, bias)]
    assert torch.autograd.gradcheck(
        lambda *a: P.pac_conv2d(*a, s, p, d, shared_filters=shared), inputs)


def test_gradcheck_pac_conv2d_through_the_kernel():
    """The PacConv2d composition: gradients reach x, the guide, weight and bias."""
    gen, f, x = _small()
    w, bias = _randn(gen, 2, 3, 3, 3), _randn(gen, 2)

    def layer(x_, f_, w_, b_):
        K = torch.exp(-0.5 * P.pac_dist(f_, None, 3, 1, 2, 2))
        return P.pac_conv2d(x_, K, w_, b_, 1, 2, 2)

    assert torch.autograd.gradcheck(layer, [t.requires_grad_() for t in (x, f, w, bias)])


@pytest.mark.parametrize("kc", [1, 3])
def test_gradcheck_pac_pool2d(kc):
    gen, _, x = _small()
    k, s, p, d = (5, 3), (2, 1), (4, 1), (2, 1)
    oh, ow = R.out_size(x.shape[-2:], k, s, p, d)
    K = _rand(gen, 2, kc, 5, 3, oh, ow)
    assert torch.autograd.gradcheck(lambda *a: P.pac_pool2d(*a, k, s, p, d),
                                    [x.requires_grad_(), K.requires_grad_()])


@pytest.mark.parametrize("sizes, k, s, p, d", [((3, 4, 3), (3, 3, 1), (1, 2, 1), (1, 1, 0),
                                                 (1, 1, 1)),
                                                ((4, 3, 3), (3, 1, 3), (2, 1, 1), (2, 0, 1),
                                                 (1, 1, 1)),
                                                ((9,), (3,), (2,), (2,), (2,))])
def test_gradcheck_3d_and_1d(sizes, k, s, p, d):
    """Every op's gradients (also centre given, asym, channel-wise, shared filters) in 3-D and
    1-D, numerically."""
    gen = _gen(12)
    out = R.out_size(sizes, k, s, p, d)
    f, x = _randn(gen, 1, 2, *sizes), _randn(gen, 1, 2, *sizes)
    ctr, K = _randn(gen, 1, 2, *out), _rand(gen, 1, 1, *k, *out)
    Kc, w, bias = _rand(gen, 1, 2, *k, *out), _randn(gen, 2, 2, *k), _randn(gen, 2)
    rg = [t.requires_grad_() for t in (f, x, ctr, K, Kc, w, bias)]
    f, x, ctr, K, Kc, w, bias = rg
    checks = [
        (lambda f_: P.pac_dist(f_, None, k, s, p, d), [f]),
        (lambda f_, c_: P.pac_dist(f_, c_, k, s, p, d, asym=True, channel_wise=True), [f, ctr]),
        (lambda *a: P.pac_conv(*a, s, p, d), [x, K, w, bias]),
        (lambda x_, K_, w_: P.pac_conv(x_, K_, w_, None, s, p, d, shared_filters=True),
         [x, K, w[:1, :1].detach().clone().requires_grad_()]),
        (lambda *a: P.pac_pool(*a, k, s, p, d), [x, Kc]),
    ]
    for fn, inputs in checks:
        assert torch.autograd.gradcheck(fn, inputs)


def _opcheck_cases():
    gen, f, x = _small(7)
    k, s, p, d = [3, 3], [2, 1], [1, 1], [1, 2]
    oh, ow = R.out_size(x.shape[-2:], k, s, p, d)
    K = _rand(gen, 2, 1, 3, 3, oh, ow)
    Kc = _rand(gen, 2, 3, 3, 3, oh, ow)
    w = _randn(gen, 4, 3, 3, 3)
    ctr = _randn(gen, 2, 2, oh, ow)
    g_conv, g_pool = _randn(gen, 2, 4, oh, ow), _randn(gen, 2, 3, oh, ow)
    rg = lambda t: t.clone().requires_grad_()  # noqa: E731
    ops_ = torch.ops.pacnet
    return [
        ("dist", ops_.pac_dist.default, (rg(f), None, k, s, p, d, False, False)),
        ("dist_center", ops_.pac_dist.default, (rg(f), rg(ctr), k, s, p, d, True, True)),
        ("conv", ops_.pac_conv.default, (rg(x), rg(K), rg(w), rg(w[:, 0, 0, 0]), s, p, d, False)),
        ("conv_shared", ops_.pac_conv.default,
         (rg(x), rg(K), rg(w[:1, :1]), None, s, p, d, True)),
        ("pool", ops_.pac_pool.default, (rg(x), rg(Kc), k, s, p, d)),
        ("conv_add", ops_.pac_conv_add_.default, (g_conv.clone(), x, K, w, s, p, d, False, -0.5)),
        ("dist_backward", ops_.pac_dist_backward.default,
         (_randn(gen, 2, 1, 3, 3, oh, ow), f, None, k, s, p, d, True, False)),
        ("conv_backward", ops_.pac_conv_backward.default,
         (g_conv, x, K, w, s, p, d, False, True, False, True)),
        ("pool_backward", ops_.pac_pool_backward.default, (g_pool, x, K, k, s, p, d, True, True)),
    ] + _opcheck_cases_nd(gen, rg, [3, 3, 1], [2, 1, 1], [1, 1, 0], [1, 2, 1], (3, 5, 4)) \
      + _opcheck_cases_nd(gen, rg, [3], [2], [1], [2], (7,))


def _opcheck_cases_nd(gen, rg, k, s, p, d, sizes):
    """The forward, backward and in-place ops on inputs of ``len(sizes)`` spatial axes."""
    out = list(R.out_size(sizes, k, s, p, d))
    f, x = _randn(gen, 2, 2, *sizes), _randn(gen, 2, 3, *sizes)
    K, Kc, w = _rand(gen, 2, 1, *k, *out), _rand(gen, 2, 3, *k, *out), _randn(gen, 4, 3, *k)
    g_conv, g_pool = _randn(gen, 2, 4, *out), _randn(gen, 2, 3, *out)
    ops_, tag = torch.ops.pacnet, f"{len(sizes)}d_"
    return [
        (tag + "dist", ops_.pac_dist.default, (rg(f), rg(_randn(gen, 2, 2, *out)), k, s, p, d,
                                               True, False)),
        (tag + "conv", ops_.pac_conv.default, (rg(x), rg(K), rg(w), rg(w.reshape(4, -1)[:, 0]),
                                               s, p, d, False)),
        (tag + "conv_shared", ops_.pac_conv.default,
         (rg(x), rg(K), rg(w[:1, :1]), None, s, p, d, True)),
        (tag + "pool", ops_.pac_pool.default, (rg(x), rg(Kc), k, s, p, d)),
        (tag + "conv_add", ops_.pac_conv_add_.default,
         (g_conv.clone(), x, K, w, s, p, d, False, 0.5)),
        (tag + "dist_backward", ops_.pac_dist_backward.default,
         (_randn(gen, 2, 2, *k, *out), f, None, k, s, p, d, False, True)),
        (tag + "conv_backward", ops_.pac_conv_backward.default,
         (g_conv, x, K, w, s, p, d, False, True, True, True)),
        (tag + "pool_backward", ops_.pac_pool_backward.default,
         (g_pool, x, Kc, k, s, p, d, True, True)),
    ]


@pytest.mark.parametrize("name, op, args", _opcheck_cases(), ids=lambda v: v if isinstance(v, str)
                         else "")
def test_opcheck(name, op, args):
    torch.library.opcheck(op, args)


def test_saves_only_the_inputs_for_backward():
    """Nothing column-sized is kept between forward and backward."""
    gen = _gen(8)
    x, f = _randn(gen, 2, 4, 12, 10), _randn(gen, 2, 3, 12, 10)
    w = _randn(gen, 5, 4, 3, 3).requires_grad_()
    x.requires_grad_()
    f.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        D = P.pac_dist(f, None, 3, 1, 1, 1)
        K = torch.exp(-0.5 * D)
        out = P.pac_conv2d(x, K, w, None, 1, 1, 1)
    ptrs = {t.data_ptr() for t in saved}
    # the guide (pac_dist), exp's output K (exp), and x, K, weight (pac_conv2d)
    assert ptrs == {f.data_ptr(), K.data_ptr(), x.data_ptr(), w.data_ptr()}
    out.sum().backward()
    assert x.grad is not None and f.grad is not None and w.grad is not None


# ----------------------------------------------------------------------------- torch.compile

class _TinyPac(torch.nn.Module):
    """pac_dist -> exp -> pac_conv -> relu -> pac_pool over ``rank`` spatial axes."""

    def __init__(self, rank=2):
        super().__init__()
        gen = _gen(9)
        self.weight = torch.nn.Parameter(_randn(gen, 4, 3, *(3,) * rank, dtype=torch.float32))
        self.bias = torch.nn.Parameter(_randn(gen, 4, dtype=torch.float32))

    def forward(self, x, guide):
        K = torch.exp(-0.5 * P.pac_dist(guide, None, 3, 1, 1, 1))
        y = torch.relu(P.pac_conv(x, K, self.weight, self.bias, 1, 1, 1))
        return P.pac_pool(y, K, 3, 1, 1, 1)


def _compiled_matches_eager(backend, sizes=(9, 8)):
    torch._dynamo.reset()
    gen = _gen(10)
    x = _randn(gen, 2, 3, *sizes, dtype=torch.float32).requires_grad_()
    g = _randn(gen, 2, 2, *sizes, dtype=torch.float32).requires_grad_()
    model = _TinyPac(len(sizes))
    eager = model(x, g)
    grads_e = torch.autograd.grad(eager.sum(), [x, g, model.weight, model.bias])
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    out = compiled(x, g)
    grads_c = torch.autograd.grad(out.sum(), [x, g, model.weight, model.bias])
    torch.testing.assert_close(out, eager)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b)


def test_torch_compile_aot_eager():
    _compiled_matches_eager("aot_eager")


@pytest.mark.parametrize("sizes", [(9, 8), (4, 6, 5)], ids=["2d", "3d"])
def test_torch_compile_inductor(sizes):
    _compiled_matches_eager("inductor", sizes)


def test_torch_compile_in_place_add():
    """pac_conv2d_add_ traces into one graph (no data-pointer checks while compiling)."""
    torch._dynamo.reset()
    gen = _gen(11)
    x, K = _randn(gen, 1, 3, 8, 8), _rand(gen, 1, 1, 3, 3, 8, 8)
    w, start = _randn(gen, 4, 3, 3, 3), _randn(gen, 1, 4, 8, 8)

    def step(out):
        P.pac_conv2d_add_(out, x, K, w, 1, 1, 1, alpha=-0.5)
        return out * 2

    with torch.no_grad():
        got = torch.compile(step, backend="aot_eager", fullgraph=True)(start.clone())
    want = 2 * (start - 0.5 * R.pac_conv(x, K, w, None, (1, 1), (1, 1), (1, 1)))
    torch.testing.assert_close(got, want, **TOL)


# ----------------------------------------------------------------------------- dtypes and layouts

def test_float32_close_to_float64_reference():
    gen = _gen(11)
    x, f = _randn(gen, 2, 5, 16, 13), _randn(gen, 2, 3, 16, 13)
    w = _randn(gen, 7, 5, 5, 5) * 0.1
    K64 = torch.exp(-0.5 * R.pac_dist(f, None, (5, 5), (1, 1), (2, 2), (1, 1)))
    want = R.pac_conv(x, K64, w, None, (1, 1), (2, 2), (1, 1))
    K32 = torch.exp(-0.5 * P.pac_dist(f.float(), None, 5, 1, 2, 1))
    got = P.pac_conv2d(x.float(), K32, w.float(), None, 1, 2, 1)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_compute_in_float32(dtype):
    gen = _gen(12)
    x = _randn(gen, 1, 2, 7, 6).to(dtype).requires_grad_()
    K = _rand(gen, 1, 1, 3, 3, 7, 6).to(dtype).requires_grad_()
    w = _randn(gen, 3, 2, 3, 3).to(dtype).requires_grad_()
    out = P.pac_conv2d(x, K, w, None, 1, 1, 1)
    assert out.dtype == dtype
    want = R.pac_conv(x.double(), K.double(), w.double(), None, (1, 1), (1, 1), (1, 1))
    torch.testing.assert_close(out.double(), want, rtol=3e-2, atol=3e-2)
    out.float().sum().backward()
    assert x.grad.dtype == K.grad.dtype == w.grad.dtype == dtype


def test_autocast_runs_in_float32():
    gen = _gen(13)
    x = _randn(gen, 1, 2, 7, 6, dtype=torch.bfloat16)
    f = _randn(gen, 1, 2, 7, 6, dtype=torch.float32)
    w = _randn(gen, 3, 2, 3, 3, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        K = torch.exp(-0.5 * P.pac_dist(f, None, 3, 1, 1, 1))
        out = P.pac_conv2d(x, K, w, None, 1, 1, 1)  # mixed bfloat16/float32 inputs
    assert out.dtype == torch.float32


def test_non_contiguous_inputs():
    gen = _gen(14)
    x = _randn(gen, 2, 6, 3, 7).transpose(1, 2)  # [2, 3, 6, 7], not contiguous
    f = _randn(gen, 2, 7, 6, 2).permute(0, 3, 2, 1)  # [2, 2, 6, 7]
    w = _randn(gen, 3, 4, 3, 3).transpose(0, 1)  # [4, 3, 3, 3]
    K = _rand(gen, 2, 1, 3, 3, 1, 7).expand(2, 1, 3, 3, 6, 7)  # stride 0 along rows
    assert not any(t.is_contiguous() for t in (x, f, w, K))
    torch.testing.assert_close(P.pac_dist(f, None, 3, 1, 1, 1),
                               R.pac_dist(f, None, (3, 3), (1, 1), (1, 1), (1, 1)), **TOL)
    torch.testing.assert_close(P.pac_conv2d(x, K, w, None, 1, 1, 1),
                               R.pac_conv(x, K, w, None, (1, 1), (1, 1), (1, 1)), **TOL)
    torch.testing.assert_close(P.pac_pool2d(x, K, 3, 1, 1, 1),
                               R.pac_pool(x, K, (3, 3), (1, 1), (1, 1), (1, 1)), **TOL)
    g = _randn(gen, 2, 4, 6, 7)
    _assert_same(_run(lambda *a: P.pac_conv2d(*a, None, 1, 1, 1), (x, K, w), g),
                 _run(lambda *a: R.pac_conv(*a, None, (1, 1), (1, 1), (1, 1)), (x, K, w), g),
                 "non-contiguous conv")


def test_empty_batch():
    x = torch.zeros(0, 3, 5, 5, requires_grad=True)
    f = torch.zeros(0, 2, 5, 5, requires_grad=True)
    w = torch.zeros(4, 3, 3, 3, requires_grad=True)
    K = torch.exp(-0.5 * P.pac_dist(f, None, 3, 1, 1, 1))
    out = P.pac_conv2d(x, K, w, None, 1, 1, 1)
    assert out.shape == (0, 4, 5, 5)
    (out.sum() + P.pac_pool2d(x, K, 3, 1, 1, 1).sum()).backward()
    assert f.grad.shape == f.shape and torch.equal(w.grad, torch.zeros_like(w))


# ----------------------------------------------------------------------------- bad arguments

def _bad_cases():
    x = torch.randn(2, 3, 6, 6)
    f = torch.randn(2, 2, 6, 6)
    K = torch.rand(2, 1, 3, 3, 6, 6)
    w = torch.randn(4, 3, 3, 3)
    geo = dict(stride=1, padding=1, dilation=1)

    def conv(**kw):
        return lambda: P.pac_conv2d(**{**dict(x=x, K=K, weight=w, bias=None, **geo), **kw})

    def dist(**kw):
        return lambda: P.pac_dist(**{**dict(guide=f, center=None, kernel_size=3, **geo), **kw})

    def pool(**kw):
        return lambda: P.pac_pool2d(**{**dict(x=x, K=K, kernel_size=3, **geo), **kw})

    xo = torch.zeros(2 * 7 * 36)  # out [2, 4, 6, 6] and x [2, 3, 6, 6] in one storage

    def add(**kw):
        return lambda: P.pac_conv2d_add_(**{**dict(out=torch.zeros(2, 4, 6, 6), x=x, K=K,
                                                   weight=w, **geo), **kw})

    return [
        ("guide 6-D", dist(guide=f[None, None]),
         r"guide must be one of 3-D \[b, Cg, W\], 4-D \[b, Cg, H, W\], 5-D \[b, Cg, D, H, W\]"),
        ("guide integer", dist(guide=f.long()), r"guide must be a floating-point tensor"),
        ("guide not a tensor", dist(guide=f.numpy()), r"guide must be a torch.Tensor"),
        ("even kernel", dist(kernel_size=4), r"kernel_size must be odd"),
        ("even kernel width", dist(kernel_size=(3, 2)), r"kernel_size must be odd"),
        ("zero kernel", dist(kernel_size=0), r"kernel_size must be >= 1"),
        ("bool kernel", dist(kernel_size=True), r"kernel_size must be an int or a pair"),
        ("three kernel sizes", dist(kernel_size=(3, 3, 3)), r"must be an int or a pair"),
        ("float stride", dist(stride=1.5), r"stride must be an int or a pair"),
        ("zero stride", dist(stride=0), r"stride must be >= 1"),
        ("negative padding", dist(padding=(-1, 0)), r"padding must be >= 0"),
        ("zero dilation", dist(dilation=0), r"dilation must be >= 1"),
        ("window too large", dist(kernel_size=5, padding=0, dilation=2), r"does not fit"),
        ("center shape", dist(center=torch.randn(2, 2, 5, 6)), r"center must be \[2, 2, 6, 6\]"),
        ("center dtype", dist(center=torch.randn(2, 2, 6, 6, dtype=DT)), r"dtype"),
        ("center device", dist(center=torch.randn(2, 2, 6, 6, device="meta")),
         r"center is on meta but guide is on cpu"),
        ("empty channels", dist(guide=torch.randn(2, 0, 6, 6)), r"empty dimension"),
        ("x 5-D", conv(x=x[None]), r"x must be 4-D"),
        ("x integer", conv(x=x.int()), r"x must be a floating-point tensor"),
        ("x complex", conv(x=x.to(torch.complex64)), r"floating-point"),
        ("K 5-D", conv(K=K[0]), r"K must be 6-D"),
        ("K kernel size", conv(K=torch.rand(2, 1, 5, 5, 6, 6)), r"K must be \[2, 1, 3, 3, 6, 6\]"),
        ("K output size", conv(K=torch.rand(2, 1, 3, 3, 6, 5)), r"K must be \[2, 1, 3, 3, 6, 6\]"),
        ("K batch", conv(K=torch.rand(1, 1, 3, 3, 6, 6)), r"K must be \[2, 1, 3, 3, 6, 6\]"),
        ("K channels", conv(K=torch.rand(2, 3, 3, 3, 6, 6)), r"K must be \[2, 1, 3, 3, 6, 6\]"),
        ("K stride", conv(stride=2), r"K must be \[2, 1, 3, 3, 3, 3\]"),
        ("K dtype", conv(K=K.double()), r"K has dtype torch.float64 but x has torch.float32"),
        ("K device", conv(K=K.to("meta")), r"K is on meta but x is on cpu"),
        ("weight channels", conv(weight=torch.randn(4, 2, 3, 3)), r"expects 2 input channels"),
        ("weight 3-D", conv(weight=w[0]), r"weight must be 4-D"),
        ("weight even", conv(weight=torch.randn(4, 3, 2, 2)), r"weight's kernel size must be odd"),
        ("weight integer", conv(weight=w.long()), r"weight must be a floating-point"),
        ("no output channels", conv(weight=torch.randn(0, 3, 3, 3)), r"empty dimension"),
        ("bias length", conv(bias=torch.randn(3)), r"bias must have 4 entries"),
        ("bias 2-D", conv(bias=torch.randn(4, 1)), r"bias must be 1-D"),
        ("shared weight shape", conv(shared_filters=True), r"shared_filters the weight must be"),
        ("shared bias", conv(weight=torch.randn(1, 1, 3, 3), bias=torch.randn(4),
                             shared_filters=True), r"bias must have 3 entries"),
        ("pool K channels", pool(K=torch.rand(2, 2, 3, 3, 6, 6)), r"K must be \[2, 1\|3, 3, 3"),
        ("pool kernel size", pool(kernel_size=5), r"K must be \[2, 1\|3, 5, 5"),
        ("pool even kernel", pool(kernel_size=(3, 4)), r"kernel_size must be odd"),
        ("pool K dtype", pool(K=K.half()), r"dtype"),
        ("add out shape", add(out=torch.zeros(2, 3, 6, 6)), r"out must be \[2, 4, 6, 6\]"),
        ("add out dtype", add(out=torch.zeros(2, 4, 6, 6, dtype=DT)), r"out has dtype"),
        ("add out layout", add(out=torch.zeros(2, 6, 6, 4).permute(0, 3, 1, 2)),
         r"out must be contiguous"),
        ("add needs grad", add(x=x.clone().requires_grad_()), r"not differentiable"),
        ("add alpha", add(alpha="0.5"), r"alpha must be a number"),
        ("add out overlaps x", add(out=xo[:288].view(2, 4, 6, 6), x=xo[288:].view(2, 3, 6, 6)), r"out shares its storage with x"),
        ("add K shape", add(K=K[:1]), r"K must be \[2, 1, 3, 3, 6, 6\]"),
    ] + _bad_cases_3d()


def _bad_cases_3d():
    """The same mistakes with volumes (and a 2-D view given a volume)."""
    x = torch.randn(2, 3, 4, 6, 6)
    f = torch.randn(2, 2, 4, 6, 6)
    K = torch.rand(2, 1, 3, 3, 3, 4, 6, 6)
    w = torch.randn(4, 3, 3, 3, 3)
    geo = dict(stride=1, padding=1, dilation=1)

    def conv(**kw):
        return lambda: P.pac_conv(**{**dict(x=x, K=K, weight=w, bias=None, **geo), **kw})

    def dist(**kw):
        return lambda: P.pac_dist(**{**dict(guide=f, center=None, kernel_size=3, **geo), **kw})

    def pool(**kw):
        return lambda: P.pac_pool(**{**dict(x=x, K=K, kernel_size=3, **geo), **kw})

    return [
        ("3d kernel pair", dist(kernel_size=(3, 3)), r"must be an int or a triple of ints"),
        ("3d even kernel depth", dist(kernel_size=(2, 3, 3)), r"kernel_size must be odd"),
        ("3d negative padding", dist(padding=(0, -1, 0)), r"padding must be >= 0"),
        ("3d window too large", dist(kernel_size=(5, 3, 3), padding=0, dilation=2),
         r"the 9x5x5 window .* does not fit the \(4, 6, 6\) input"),
        ("3d center shape", dist(center=torch.randn(2, 2, 4, 6, 5)),
         r"center must be \[2, 2, 4, 6, 6\]"),
        ("3d K 6-D", conv(K=torch.rand(2, 1, 3, 3, 6, 6)), r"K must be 8-D"),
        ("3d K shape", conv(K=torch.rand(2, 1, 3, 3, 3, 4, 6, 5)),
         r"K must be \[2, 1, 3, 3, 3, 4, 6, 6\] \[b, channels, kd, kh, kw, od, oh, ow\]"),
        ("3d K stride", conv(stride=(1, 2, 1)), r"K must be \[2, 1, 3, 3, 3, 4, 3, 6\]"),
        ("3d weight 4-D", conv(weight=torch.randn(4, 3, 3, 3)), r"weight must be 5-D"),
        ("3d weight even", conv(weight=torch.randn(4, 3, 3, 2, 3)),
         r"weight's kernel size must be odd"),
        ("3d x 6-D", conv(x=x[None]), r"x must be one of 3-D"),
        ("2d view of a volume", lambda: P.pac_conv2d(x, K, w, None, 1, 1, 1),
         r"x must be 4-D \[b, C, H, W\]"),
        ("3d pool K channels", pool(K=torch.rand(2, 2, 3, 3, 3, 4, 6, 6)),
         r"K must be \[2, 1\|3, 3, 3, 3, 4, 6, 6\]"),
        ("3d add out shape", lambda: P.pac_conv_add_(torch.zeros(2, 4, 4, 6, 5), x, K, w, 1, 1,
                                                       1), r"out must be \[2, 4, 4, 6, 6\]"),
    ]


@pytest.mark.parametrize("name, call, match", _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_bad_arguments_raise_before_any_kernel(monkeypatch, name, call, match):
    def no_kernels(device):
        raise AssertionError("a kernel was reached")

    monkeypatch.setattr(ops, "_kernels", no_kernels)
    with pytest.raises(PacnetValueError, match=match):
        call()


def test_errors_are_value_errors_with_hints():
    with pytest.raises(ValueError) as info:
        P.pac_dist(torch.randn(1, 1, 5, 5), None, 2, 1, 0, 1)
    assert "hint:" in str(info.value)


# ----------------------------------------------------------------------------- backend choice

def _calls(monkeypatch):
    seen = []
    for name in ("pac_dist_fwd", "pac_conv_fwd", "pac_pool_fwd"):
        real = getattr(cpu, name)
        monkeypatch.setattr(cpu, name, lambda *a, _real=real, _n=name, **k: seen.append(_n)
                            or _real(*a, **k))
    return seen


def test_backend_default_and_numba_use_the_fused_kernels(monkeypatch):
    seen = _calls(monkeypatch)
    f, x = torch.randn(1, 2, 5, 5), torch.randn(1, 3, 5, 5)
    for choice in (None, "numba", " NUMBA ", "auto"):
        if choice is None:
            monkeypatch.delenv("PACNET_BACKEND", raising=False)
        else:
            monkeypatch.setenv("PACNET_BACKEND", choice)
        assert P.backend_for(x.device) == "numba"
        seen.clear()
        K = P.pac_dist(f, None, 3, 1, 1, 1)
        P.pac_conv2d(x, K, torch.randn(2, 3, 3, 3), None, 1, 1, 1)
        P.pac_pool2d(x, K, 3, 1, 1, 1)
        assert seen == ["pac_dist_fwd", "pac_conv_fwd", "pac_pool_fwd"]


def test_backend_reference_override(monkeypatch):
    seen = _calls(monkeypatch)
    monkeypatch.setenv("PACNET_BACKEND", "reference")
    assert P.backend_for(torch.device("cpu")) == "reference"
    gen = _gen(15)
    f, x = _randn(gen, 1, 2, 5, 5).requires_grad_(), _randn(gen, 1, 3, 5, 5)
    w = _randn(gen, 2, 3, 3, 3)
    K = torch.exp(-0.5 * P.pac_dist(f, None, 3, 1, 1, 1))
    out = P.pac_pool2d(P.pac_conv2d(x, K, w, None, 1, 1, 1), K, 3, 1, 1, 1)
    out.sum().backward()
    assert seen == [] and f.grad is not None
    monkeypatch.delenv("PACNET_BACKEND")
    f2 = f.detach().clone().requires_grad_()
    K2 = torch.exp(-0.5 * P.pac_dist(f2, None, 3, 1, 1, 1))
    out2 = P.pac_pool2d(P.pac_conv2d(x, K2, w, None, 1, 1, 1), K2, 3, 1, 1, 1)
    out2.sum().backward()
    assert len(seen) == 3
    torch.testing.assert_close(out2, out.detach(), **TOL)
    torch.testing.assert_close(f2.grad, f.grad, **TOL)


def test_backend_bad_value(monkeypatch):
    monkeypatch.setenv("PACNET_BACKEND", "triton")
    with pytest.raises(PacnetValueError, match="PACNET_BACKEND='triton' is not a kernel backend"):
        P.pac_dist(torch.randn(1, 1, 5, 5), None, 3, 1, 1, 1)


def test_devices_without_fused_kernels_use_the_reference(monkeypatch):
    f = torch.randn(1, 2, 5, 5, device="meta")
    assert P.backend_for(f.device) == "reference"
    assert P.pac_dist(f, None, 3, 1, 1, 1).shape == (1, 1, 3, 3, 5, 5)
    monkeypatch.setenv("PACNET_BACKEND", "numba")
    with pytest.raises(PacnetValueError, match="no fused kernels for device 'meta'"):
        P.pac_dist(f, None, 3, 1, 1, 1)


def test_cpu_import_does_not_load_numba_cuda():
    import subprocess
    import sys
    code = ("import sys, torch, pacnet.kernels.pac as P; "
            "P.pac_dist(torch.randn(1, 1, 5, 5), None, 3, 1, 1, 1); "
            "print('numba.cuda' in sys.modules, 'pacnet.kernels.pac.cuda' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


def test_forked_child_after_parallel_kernels():
    """A fork-based DataLoader worker may call the kernels after the parent ran parallel ones
    (GNU OpenMP aborts such a child if it enters a parallel region; it must run serially)."""
    import subprocess
    import sys
    code = """
import os, numba, torch
import pacnet.kernels.pac as P
from pacnet.kernels import runtime
x, K, w = torch.randn(2, 8, 48, 48), torch.rand(2, 1, 3, 3, 48, 48), torch.randn(8, 8, 3, 3)
assert runtime.parallel(2 * 8 * 8 * 9 * 48 * 48) or numba.get_num_threads() == 1
want = P.pac_conv2d(x, K, w, None, 1, 1, 1)
pid = os.fork()
if pid == 0:
    torch.set_num_threads(1)  # as DataLoader workers do
    ok = not runtime.parallel(10**9) and torch.equal(P.pac_conv2d(x, K, w, None, 1, 1, 1), want)
    os._exit(0 if ok else 1)
_, status = os.waitpid(pid, 0)
print("child", status)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["child", "0"], out.stdout + out.stderr
