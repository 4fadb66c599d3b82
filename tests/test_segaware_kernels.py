"""The segaware kernels (pacnet.kernels.segaware): Numba CPU vs the torch reference, custom
ops (opcheck, gradcheck), backend choice, argument checks, and the CUDA kernels under the
Numba simulator (in a subprocess)."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pacnet.errors import PacnetValueError
from pacnet.kernels.segaware import ops
from pacnet.kernels.segaware import reference as ref

BIG = ref.BIG

# (H, W, kernel, pad, stride, dilation): square and rectangular kernels, even kernels
# (asymmetric centre), strides, dilations, "same" padding, no padding, and padding larger
# than (k//2)*d so that some centres fall outside the image.
GEOMETRIES = [
    (6, 5, (3, 3), (1, 1), (1, 1), (1, 1)),
    (7, 6, (3, 3), (0, 0), (1, 1), (1, 1)),
    (7, 7, (3, 3), (2, 2), (1, 1), (2, 2)),
    (8, 7, (5, 3), (3, 2), (2, 1), (1, 2)),
    (6, 7, (2, 3), (1, 1), (1, 2), (1, 1)),
    (5, 6, (3, 2), (3, 1), (2, 2), (1, 3)),
    (4, 4, (1, 1), (0, 0), (1, 1), (1, 1)),
    (9, 8, (3, 3), (4, 3), (3, 2), (2, 1)),
]
FLAGS = list(itertools.product((1, 2), (False, True), (False, True)))   # norm, rc, rb


def _geo_id(g):
    h, w, k, p, s, d = g
    return f"{h}x{w}-k{k[0]}{k[1]}-p{p[0]}{p[1]}-s{s[0]}{s[1]}-d{d[0]}{d[1]}"


def _args(g):
    _, _, k, p, s, d = g
    return list(k), list(p), list(s), list(d)


def _hw(g):
    h, w, k, p, s, d = g
    return ref.out_size(h, k[0], p[0], s[0], d[0]), ref.out_size(w, k[1], p[1], s[1], d[1])


@pytest.fixture(autouse=True)
def _default_backend(monkeypatch):
    monkeypatch.delenv("PACNET_BACKEND", raising=False)


# ----------------------------------------------------------------------------- Im2dist

@pytest.mark.parametrize("geo", GEOMETRIES, ids=_geo_id)
def test_im2dist_numba_matches_reference(geo):
    gen = torch.Generator().manual_seed(0)
    h, w = geo[:2]
    emb = torch.randn(2, 3, h, w, generator=gen, dtype=torch.float64)
    k, p, s, d = _args(geo)
    for norm, rc, rb in FLAGS:
        assert ops.backend_for(emb) == "cpu"
        out = torch.ops.pacnet.im2dist(emb, k, p, s, d, norm, rc, rb)
        want = ref.im2dist(emb, k, p, s, d, norm, rc, rb)
        assert out.shape == (2, k[0] * k[1], *_hw(geo))
        torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
        # BIG entries are exactly the fork's constant, not merely large
        assert torch.equal(out == BIG, want == BIG)

        grad = torch.randn(out.shape, generator=gen, dtype=torch.float64)
        got = torch.ops.pacnet.im2dist_backward(grad, emb, k, p, s, d, norm, rc, rb)
        want_g = ref.im2dist_backward(grad, emb, k, p, s, d, norm, rc, rb)
        leaf = emb.clone().requires_grad_()
        (auto,) = torch.autograd.grad(ref.im2dist(leaf, k, p, s, d, norm, rc, rb), leaf, grad)
        torch.testing.assert_close(want_g, auto, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got, want_g, rtol=1e-12, atol=1e-12)


def test_im2dist_rules_by_hand():
    """The centre/out-of-image rules on a 1-channel 3x3 image, k=3, pad 1 (and pad 3)."""
    e = torch.arange(9, dtype=torch.float64).reshape(1, 1, 3, 3)
    out = ops.im2dist(e, 3, 1, 1, 1, "L1", False, False)
    # pixel (0, 0): taps (0,*) and (*,0) are outside -> 0; tap (2,2) is pixel (1,1) = 4
    assert out[0, :, 0, 0].tolist() == [0, 0, 0, 0, 0, 1, 0, 3, 4]
    out = ops.im2dist(e, 3, 1, 1, 1, "L2", True, True)
    assert out[0, :, 0, 0].tolist() == [BIG, BIG, BIG, BIG, BIG, 0.5, BIG, 4.5, 8.0]
    # pad 3 > (k//2)*d: centres outside the image give 0 whatever the flags
    out = ops.im2dist(e, 3, 3, 1, 1, "L2", True, True)
    assert out.shape == (1, 9, 7, 7)
    assert (out[0, :, 0] == 0).all() and (out[0, :, :, 6] == 0).all()
    assert out[0, 4, 3, 3] == BIG              # centre tap of an inside centre
    # even kernel: the centre is tap (1, 1), i.e. channel 3 for k=2
    out = ops.im2dist(e, [2, 2], 0, 1, 1, "L1", True, False)
    assert out[0, 3].eq(BIG).all() and not out[0, :3].eq(BIG).any()
    # the raw op checks the norm code too
    with pytest.raises(PacnetValueError, match="unknown norm 3"):
        torch.ops.pacnet.im2dist(e, [3, 3], [1, 1], [1, 1], [1, 1], 3, False, False)


def test_im2dist_sums_over_channels_not_mean():
    e = torch.zeros(1, 4, 3, 3, dtype=torch.float64)
    e[:, :, 1, 1] = 1.0
    out = ops.im2dist(e, 3, 1, 1, 1, "L1")
    assert out[0, 0, 2, 2] == 4.0               # |0 - 1| summed over 4 channels
    out = ops.im2dist(e, 3, 1, 1, 1, "L2")
    assert out[0, 0, 2, 2] == 2.0               # 1/2 * 4 * 1^2, no square root


@pytest.mark.parametrize("norm", ["L1", "L2"])
def test_im2dist_float32_matches_reference(norm):
    emb = torch.randn(1, 4, 9, 8, generator=torch.Generator().manual_seed(1))
    out = ops.im2dist(emb, 3, 2, 1, 2, norm, True, True)
    want = ref.im2dist(emb, (3, 3), (2, 2), (1, 1), (2, 2), ops.norm_code(norm), True, True)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    torch.testing.assert_close(
        torch.ops.pacnet.im2dist_backward(g, emb, [3, 3], [2, 2], [1, 1], [2, 2], 2, True, True),
        ref.im2dist_backward(g, emb, (3, 3), (2, 2), (1, 1), (2, 2), 2, True, True),
        rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("norm,rc,rb,geo", [
    ("L2", True, False, (3, 1, 1, 1)),
    ("L1", False, True, (3, 2, 1, 2)),
    ("L2", True, True, ([3, 2], [3, 1], [2, 1], [1, 2])),
    ("L1", True, True, ([2, 3], [1, 1], [1, 2], [1, 1])),
])
def test_im2dist_gradcheck(norm, rc, rb, geo):
    emb = torch.randn(1, 2, 4, 5, dtype=torch.float64, requires_grad=True,
                      generator=torch.Generator().manual_seed(2))
    assert torch.autograd.gradcheck(lambda e: ops.im2dist(e, *geo, norm, rc, rb), (emb,))


# ----------------------------------------------------------------------------- Im2parity

@pytest.mark.parametrize("geo", GEOMETRIES, ids=_geo_id)
def test_im2parity_numba_matches_reference(geo):
    h, w = geo[:2]
    gen = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 3, (2, 1, h, w), generator=gen).to(torch.float64)
    labels[0, 0, 0, : w // 2] = 255
    labels[1, 0, -1, -1] = 2.7                   # compared as int(2.7) == 2
    k, p, s, d = _args(geo)
    for ignore in (None, 255, 0):
        has, value = ignore is not None, ignore or 0
        out = torch.ops.pacnet.im2parity(labels, k, p, s, d, has, value)
        want = ref.im2parity(labels, k, p, s, d, ignore)
        assert out.dtype == torch.float64 and out.shape == want.shape == (2, k[0] * k[1], *_hw(geo))
        assert torch.equal(out, want)
        # integer labels give the same values in the default dtype
        out_i = torch.ops.pacnet.im2parity(labels.to(torch.int64), k, p, s, d, has, value)
        assert out_i.dtype == torch.get_default_dtype()
        assert torch.equal(out_i.to(torch.float64), want)


def test_im2parity_rules_by_hand():
    lab = torch.tensor([[0., 1.], [1., 255.]]).reshape(1, 1, 2, 2)
    out = ops.im2parity(lab, 3, 1, 1, 1)
    # pixel (0,0) has label 0: its out-of-image neighbours count as label 0 -> parity 1
    assert out[0, :, 0, 0].tolist() == [1, 1, 1, 1, 1, 0, 1, 0, 0]
    # pixel (1,1) = 255 without ignore_label: an ordinary class
    assert out[0, :, 1, 1].tolist() == [0, 0, 0, 0, 1, 0, 0, 0, 0]
    out = ops.im2parity(lab, 3, 1, 1, 1, ignore_label=255)
    assert out[0, :, 1, 1].tolist() == [255] * 9
    assert out[0, 8, 0, 0] == 255                # the neighbour is 255
    # centre outside the image: ignore_label if set, else -1
    assert (ops.im2parity(lab, 3, 3, 1, 1)[0, :, 0, 0] == -1).all()
    assert (ops.im2parity(lab, 3, 3, 1, 1, ignore_label=7)[0, :, 0, 0] == 7).all()


def test_im2parity_has_no_gradient():
    lab = torch.randint(0, 2, (1, 1, 4, 4)).double().requires_grad_()
    out = ops.im2parity(lab, 3, 1)
    out.sum().backward()
    assert lab.grad is None


def test_im2parity_float32_cpu_kernel():
    lab = torch.randint(0, 4, (1, 1, 6, 5), generator=torch.Generator().manual_seed(4)).float()
    out = ops.im2parity(lab, 3, 2, 1, 2, ignore_label=3)
    assert out.dtype == torch.float32
    assert torch.equal(out, ref.im2parity(lab, (3, 3), (2, 2), (1, 1), (2, 2), 3))


# ----------------------------------------------------------------------------- local weighted sum

@pytest.mark.parametrize("geo", GEOMETRIES, ids=_geo_id)
def test_local_weighted_sum_numba_matches_reference(geo):
    h, w = geo[:2]
    gen = torch.Generator().manual_seed(5)
    k, p, s, d = _args(geo)
    x = torch.randn(2, 3, h, w, generator=gen, dtype=torch.float64)
    wts = torch.randn(2, k[0] * k[1], *_hw(geo), generator=gen, dtype=torch.float64)
    out = torch.ops.pacnet.local_weighted_sum(x, wts, k, p, s, d)
    torch.testing.assert_close(out, ref.local_weighted_sum(x, wts, k, p, s, d), rtol=1e-12, atol=1e-12)
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    gx, gw = torch.ops.pacnet.local_weighted_sum_backward(g, x, wts, k, p, s, d)
    rx, rw = ref.local_weighted_sum_backward(g, x, wts, k, p, s, d)
    lx, lw = x.clone().requires_grad_(), wts.clone().requires_grad_()
    ax, aw = torch.autograd.grad(ref.local_weighted_sum(lx, lw, k, p, s, d), (lx, lw), g)
    torch.testing.assert_close(rx, ax, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rw, aw, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, rx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gw, rw, rtol=1e-12, atol=1e-12)


def test_local_weighted_sum_gradcheck_and_float32():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(1, 2, 4, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    wts = torch.randn(1, 6, 4, 2, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b: ops.local_weighted_sum(a, b, [3, 2], [1, 0], [1, 2], [1, 2]), (x, wts))
    x32, w32 = x.detach().float(), wts.detach().float()
    torch.testing.assert_close(ops.local_weighted_sum(x32, w32, [3, 2], [1, 0], [1, 2], [1, 2]),
                               ref.local_weighted_sum(x32, w32, (3, 2), (1, 0), (1, 2), (1, 2)),
                               rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- torch.library

def test_opcheck_all_ops():
    gen = torch.Generator().manual_seed(7)
    emb = torch.randn(1, 2, 5, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    geo = ([3, 3], [2, 1], [1, 1], [2, 1])
    hw = (ref.out_size(5, 3, 2, 1, 2), ref.out_size(4, 3, 1, 1, 1))
    grad = torch.randn(1, 9, *hw, dtype=torch.float64, generator=gen)
    lab = torch.randint(0, 3, (1, 1, 5, 4), generator=gen).double()
    x = torch.randn(1, 3, 5, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(1, 9, *hw, dtype=torch.float64, generator=gen, requires_grad=True)
    g3 = torch.randn(1, 3, *hw, dtype=torch.float64, generator=gen)
    torch.library.opcheck(torch.ops.pacnet.im2dist.default, (emb, *geo, 1, True, False))
    torch.library.opcheck(torch.ops.pacnet.im2dist_backward.default,
                          (grad, emb.detach(), *geo, 2, False, True))
    torch.library.opcheck(torch.ops.pacnet.im2parity.default, (lab, *geo, True, 2))
    torch.library.opcheck(torch.ops.pacnet.local_weighted_sum.default, (x, w, *geo))
    torch.library.opcheck(torch.ops.pacnet.local_weighted_sum_backward.default,
                          (g3, x.detach(), w.detach(), *geo))


def test_meta_tensors_give_shapes():
    emb = torch.empty(2, 3, 9, 8, device="meta")
    out = ops.im2dist(emb, 3, 4, 2, 2)
    assert out.shape == (2, 9, ref.out_size(9, 3, 4, 2, 2), ref.out_size(8, 3, 4, 2, 2))
    assert out.device.type == "meta"
    assert ops.im2parity(torch.empty(2, 1, 9, 8, device="meta"), 3, 1).shape == (2, 9, 9, 8)


def test_torch_compile_fullgraph():
    emb = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64)

    def f(e, v):
        m = torch.softmax(-ops.im2dist(e, 3, 1, 1, 1, "L2", True, True), dim=1)
        return ops.local_weighted_sum(v, m, 3, 1, 1, 1)

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(emb, x), f(emb, x))


# ----------------------------------------------------------------------------- backends and errors

def test_backend_choice(monkeypatch):
    t64 = torch.zeros(1, 1, 3, 3, dtype=torch.float64)
    assert ops.backend_for(t64) == "cpu"
    assert ops.backend_for(t64.half()) == "cpu"  # computed in float32
    monkeypatch.setenv("PACNET_BACKEND", "reference")
    assert ops.backend_for(t64) == "reference"
    for choice in ("numba", "auto"):
        monkeypatch.setenv("PACNET_BACKEND", choice)
        assert ops.backend_for(t64) == "cpu"
    monkeypatch.setenv("PACNET_BACKEND", "numba")
    with pytest.raises(PacnetValueError, match="no fused kernels for device 'meta'"):
        ops.backend_for(t64.to("meta"))
    monkeypatch.setenv("PACNET_BACKEND", "triton")
    with pytest.raises(PacnetValueError, match="not a kernel backend"):
        ops.im2dist(t64, 3, 1)


def test_reference_backend_gives_same_results(monkeypatch):
    gen = torch.Generator().manual_seed(8)
    emb = torch.randn(1, 3, 7, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    fused = ops.im2dist(emb, 3, 2, 1, 2, "L1", True, True)
    (g_fused,) = torch.autograd.grad(fused.sum(), emb)
    monkeypatch.setenv("PACNET_BACKEND", "reference")
    slow = ops.im2dist(emb, 3, 2, 1, 2, "L1", True, True)
    (g_slow,) = torch.autograd.grad(slow.sum(), emb)
    torch.testing.assert_close(fused, slow, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_fused, g_slow, rtol=1e-12, atol=1e-12)
    # half precision: computed in float32 by the fused kernels, cast back
    monkeypatch.delenv("PACNET_BACKEND")
    half = ops.im2dist(emb.detach().to(torch.bfloat16), 3, 1)
    assert half.dtype == torch.bfloat16 and half.shape == (1, 9, 7, 6)
    want = ref.im2dist(emb.detach().to(torch.bfloat16).float(), (3, 3), (1, 1), (1, 1),
                       (1, 1), 2, False, False)
    torch.testing.assert_close(half.float(), want.to(torch.bfloat16).float())


@pytest.mark.parametrize("call,match", [
    (lambda: ops.im2dist(torch.zeros(3, 4, 4), 3), "must be 4-D"),
    (lambda: ops.im2dist(torch.zeros(1, 1, 4, 4), 3, norm="L3"), "unknown norm 'L3'"),
    (lambda: ops.im2dist(torch.zeros(1, 1, 4, 4), 3, norm=True), "unknown norm"),
    (lambda: ops.im2dist(torch.zeros(1, 1, 4, 4, dtype=torch.int64), 3), "floating-point"),
    (lambda: ops.im2dist(torch.zeros(1, 1, 4, 4), 5), "empty output"),
    (lambda: ops.im2dist(torch.zeros(1, 1, 4, 4), 3, dilation=0), "dilation must be >= 1"),
    (lambda: ops.im2dist(torch.zeros(1, 1, 4, 4), [3, 3, 3]), "int or a pair"),
    (lambda: ops.im2dist(torch.zeros(1, 1, 4, 4), 3, pad=-1), "pad must be >= 0"),
    (lambda: ops.im2parity(torch.zeros(1, 2, 4, 4), 3, 1), "1 channel"),
    (lambda: ops.im2parity(torch.zeros(1, 1, 4, 4, dtype=torch.bool), 3, 1), "class numbers"),
    (lambda: ops.im2parity(torch.zeros(1, 1, 4, 4), 3, 1, ignore_label=2.5), "ignore_label"),
    (lambda: ops.local_weighted_sum(torch.zeros(1, 2, 4, 4), torch.zeros(1, 9, 3, 3), 3, 1),
     r"weights must have shape \[1, 9, 4, 4\]"),
    (lambda: ops.local_weighted_sum(torch.zeros(1, 2, 4, 4), torch.zeros(1, 9, 4, 4,
                                    dtype=torch.float64), 3, 1), "share dtype"),
])
def test_bad_arguments_raise_before_any_kernel(call, match):
    with pytest.raises(PacnetValueError, match=match):
        call()


# ----------------------------------------------------------------------------- CUDA simulator

@pytest.mark.cudasim
def test_cuda_kernels_under_simulator():
    script = Path(__file__).with_name("cudasim_segaware.py")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    env.pop("PACNET_BACKEND", None)
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "cudasim segaware: all" in proc.stdout, proc.stdout + proc.stderr
