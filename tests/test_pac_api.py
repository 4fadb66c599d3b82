"""The PAC Python API (pacnet.pac): values against a direct formula, gradients, sizes,
compatibility with the original's state_dicts and conventions, argument validation.

The oracle below is written from the spec's formulas with index arithmetic (which input
sample every tap of every output pixel reads), independent of pacnet.pac's unfolding and
zero-insertion code and of the kernels.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pacnet.kernels.pac as kernels
from pacnet.errors import PacnetValueError
from pacnet.pac import (PacConv2d, PacConvTranspose2d, PacPool2d, nd2col, packernel2d,
                        pacconv2d, pacconv_transpose2d, pacpool2d)

D64 = torch.float64


# ----------------------------------------------------------------------------- oracle

def _p2(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _idx_conv(n_in, k, s, p, d, n_out, shift=0):
    """Source index and validity of tap t for output o: o*s - p + t*d (+ shift)."""
    o = torch.arange(n_out)
    t = torch.arange(k)
    idx = o[None, :] * s - p + t[:, None] * d + shift
    valid = (idx >= 0) & (idx < n_in)
    return idx.clamp(0, n_in - 1), valid


def _idx_tconv(n_in, k, s, p, d, n_out):
    """Transposed conv: output o, tap t reads zero-inserted position j = o + t*d - ((k-1)d - p),
    a real sample x[j/s] only when j is a multiple of s inside the input."""
    o = torch.arange(n_out)
    t = torch.arange(k)
    j = o[None, :] + t[:, None] * d - ((k - 1) * d - p)
    valid = (j >= 0) & (j % s == 0) & (j // s < n_in)
    return (j // s).clamp(0, n_in - 1), valid


def _gather(x, ih, vh, iw, vw):
    """x [b,C,H,W] at taps -> values and validity [b,C,kh,kw,oh,ow] (zero where invalid)."""
    vals = x[:, :, ih[:, None, :, None], iw[None, :, None, :]]
    valid = (vh[:, None, :, None] & vw[None, :, None, :]).to(x.dtype)[None, None]
    return vals * valid, valid


def conv_size(n, k, s, p, d):
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def tconv_size(n, k, s, p, op, d):
    return (n - 1) * s - 2 * p + d * (k - 1) + 1 + op


def ref_taps(x, k, s=1, p=0, d=1, transposed=False, op=0):
    k, s, p, d, op = map(_p2, (k, s, p, d, op))
    H, W = x.shape[-2:]
    if transposed:
        oh, ow = (tconv_size(n, k[i], s[i], p[i], op[i], d[i]) for i, n in enumerate((H, W)))
        ih, vh = _idx_tconv(H, k[0], s[0], p[0], d[0], oh)
        iw, vw = _idx_tconv(W, k[1], s[1], p[1], d[1], ow)
    else:
        oh, ow = (conv_size(n, k[i], s[i], p[i], d[i]) for i, n in enumerate((H, W)))
        ih, vh = _idx_conv(H, k[0], s[0], p[0], d[0], oh)
        iw, vw = _idx_conv(W, k[1], s[1], p[1], d[1], ow)
    return _gather(x, ih, vh, iw, vw)


def ref_kernel(guide, k, s=1, p=0, d=1, *, kind="gaussian", alpha=None, lam=None, asym=False,
               smooth=None, channel_wise=False, normalize=False, mask=None, transposed=False,
               op=0):
    """The spec's K (and output mask) written out directly."""
    k, s, p, d, op = map(_p2, (k, s, p, d, op))
    b, cg, gh, gw = guide.shape
    if transposed:
        low = [(n - op[i] - 1 - (k[i] - 1) * d[i] + 2 * p[i]) // s[i] + 1
               for i, n in enumerate((gh, gw))]
        ks, kp = (1, 1), tuple((k[i] - 1) * d[i] // 2 for i in range(2))
        oh, ow = gh, gw
    else:
        ks, kp = s, p
        oh, ow = (conv_size(n, k[i], s[i], p[i], d[i]) for i, n in enumerate((gh, gw)))
    ih, vh = _idx_conv(gh, k[0], ks[0], kp[0], d[0], oh)
    iw, vw = _idx_conv(gw, k[1], ks[1], kp[1], d[1], ow)
    f_t, _ = _gather(guide, ih, vh, iw, vw)
    if smooth is None:
        ctr = f_t[:, :, k[0] // 2, k[1] // 2]
    else:
        sz = smooth.shape[-1]
        shift = [(k[i] // 2) * d[i] - (sz // 2) * d[i] for i in range(2)]
        sh, svh = _idx_conv(gh, sz, ks[0], kp[0], d[0], oh, shift[0])
        sw, svw = _idx_conv(gw, sz, ks[1], kp[1], d[1], ow, shift[1])
        vals, _ = _gather(guide, sh, svh, sw, svw)
        ctr = (vals * smooth.reshape(1, 1, sz, sz, 1, 1)).sum((2, 3))
    diff = f_t - ctr[:, :, None, None]
    if asym:
        diff = diff.clamp(min=0)
    dist = diff ** 2
    if not channel_wise:
        dist = dist.sum(1, keepdim=True)
    if kind == "gaussian":
        K = torch.exp(-0.5 * dist)
    else:
        a = torch.as_tensor(alpha, dtype=guide.dtype)
        lm = torch.as_tensor(lam, dtype=guide.dtype)
        if a.dim() == 1:
            a = a.view(1, -1, 1, 1, 1, 1)
        if lm.dim() == 1:
            lm = lm.view(1, -1, 1, 1, 1, 1)
        K = a + (dist + 1e-4) ** (0.5 * lm)
    # which taps hold real input samples
    if transposed:
        ones = torch.ones(1, 1, *low, dtype=guide.dtype)
        _, valid = ref_taps(ones, k, s, p, d, transposed=True, op=op)
        m_t = ref_taps(mask.to(guide.dtype), k, s, p, d, True, op)[0] if mask is not None else None
    else:
        _, valid = ref_taps(torch.ones(1, 1, gh, gw, dtype=guide.dtype), k, s, p, d)
        m_t = ref_taps(mask.to(guide.dtype), k, s, p, d)[0] if mask is not None else None
    out_mask = None
    if m_t is not None:
        K = K * m_t
        if normalize:
            div = K.sum((2, 3), keepdim=True)
        else:
            n_valid = m_t.sum((2, 3), keepdim=True)
            n_in = valid.sum((2, 3), keepdim=True)
            div = torch.where(n_in > 0, n_valid / n_in.clamp(min=1), torch.zeros_like(n_valid))
        K = torch.where(div != 0, K / torch.where(div != 0, div, 1.0), torch.zeros_like(K))
        out_mask = (div != 0).any(1, keepdim=True).to(guide.dtype)
    elif normalize:
        K = K * valid
        div = K.sum((2, 3), keepdim=True)
        K = K / torch.where(div != 0, div, 1.0)
    return K, out_mask


def ref_conv(x, K, weight, bias=None, s=1, p=0, d=1, shared=False, transposed=False, op=0):
    """out[b,o,y] = bias[o] + sum_{c,t} W[o,c,t] K[b,t,y] x[b,c,tap(y,t)] (W^T unflipped if transposed)."""
    k = tuple(weight.shape[-2:])
    cols, _ = ref_taps(x, k, s, p, d, transposed=transposed, op=op)
    cols = cols * K
    if shared:
        out = torch.einsum("ij,bcijyx->bcyx", weight[0, 0], cols)
    else:
        w = weight.transpose(0, 1) if transposed else weight
        out = torch.einsum("ocij,bcijyx->boyx", w, cols)
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    return out


def ref_pool(x, K, k, s=1, p=0, d=1):
    cols, _ = ref_taps(x, k, s, p, d)
    return (cols * K).sum((2, 3))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: torch's and Numba's worker threads only add contention (on a
    loaded 2-core machine a tiny parallel Numba call takes ~40 ms instead of ~1 ms)."""
    import numba
    n, nb = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(1)
    numba.set_num_threads(1)
    yield
    torch.set_num_threads(n)
    numba.set_num_threads(nb)


@pytest.fixture
def no_compute(monkeypatch):
    """Make any call into the kernels fail the test: errors must come before computing."""
    def boom(*args, **kwargs):
        raise AssertionError("a kernel ran before the argument error was raised")
    for name in ("pac_dist", "pac_conv", "pac_pool"):
        monkeypatch.setattr(kernels, name, boom)


def rnd(*shape, seed=None, requires_grad=False):
    g = torch.Generator().manual_seed(seed if seed is not None else sum(shape) * 7 + len(shape))
    return torch.randn(*shape, generator=g, dtype=D64).requires_grad_(requires_grad)


def close(a, b, tol=1e-10):
    assert a.shape == b.shape, (a.shape, b.shape)
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# ----------------------------------------------------------------------------- the oracle itself

def test_oracle_matches_torch_convs():
    """The oracle's tap reader agrees with F.conv2d / F.conv_transpose2d (K == 1)."""
    x = rnd(2, 3, 7, 6)
    w = rnd(4, 3, 3, 5)
    for s, p, d in [(1, 0, 1), (2, (1, 2), 1), ((1, 2), 2, 2), (3, 0, (2, 1))]:
        ref = F.conv2d(x, w, stride=s, padding=p, dilation=d)
        close(ref_conv(x, torch.ones(()), w, s=s, p=p, d=d), ref)
    wt = rnd(3, 4, 3, 5)
    for s, p, op, d in [(1, 0, 0, 1), (2, 1, 1, 1), ((2, 3), (1, 2), (0, 2), 1), (2, 5, 1, 2)]:
        ref = F.conv_transpose2d(x, wt.flip(2, 3), stride=s, padding=p, output_padding=op,
                                 dilation=d)
        close(ref_conv(x, torch.ones(()), wt, s=s, p=p, d=d, transposed=True, op=op), ref)


# ----------------------------------------------------------------------------- packernel2d values

KERNEL_CASES = [
    # kernel_type, smoothing, k, s, p, d, channel_wise, normalize
    ("gaussian", "none", 3, 1, 1, 1, False, False),
    ("gaussian", "none", 5, 2, 2, 1, False, True),
    ("gaussian", "none", (3, 5), (2, 1), (1, 2), (1, 2), False, False),
    ("gaussian", "none", 3, 1, 2, 2, True, True),
    ("inv_1_-1", "none", 3, 1, 1, 1, False, False),
    ("inv_0.2_0.2_asym", "average_5", 5, 1, 2, 1, False, True),
    ("inv_-0.5_-2_fixed", "none", 3, 2, 1, 1, True, False),
    ("inv_1_-1_asym_fixed", "gaussian", 3, 1, 1, 1, False, False),
    ("gaussian", "gaussian", 3, 2, 1, 1, False, False),
    ("gaussian", "average_3", 5, 1, 0, 1, False, False),      # smoothing pad < 0: crop
    ("gaussian", "full_5", 3, 1, 0, 1, False, False),         # smoothing wider than the filter
    ("gaussian", "full_3", 3, 2, 2, 2, False, False),         # smoothing with stride + dilation
    ("gaussian", "average_3", 5, 2, 3, (2, 1), True, True),
    ("inv_1_-1_asym", "full_3", 3, (1, 2), 1, 3, False, True),
    ("gaussian", "none", 3, 1, 3, 1, False, False),           # padding beyond the module limit
]


@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: "-".join(map(str, c)))
def test_packernel2d_values(case):
    kernel_type, smoothing, k, s, p, d, cw, norm = case
    guide = rnd(2, 3, 9, 8)
    kind = "gaussian" if kernel_type == "gaussian" else "inv"
    alpha = lam = None
    if kind == "inv":
        alpha, lam = (float(v) for v in kernel_type.split("_")[1:3])
    smooth = None
    sk = None
    if smoothing != "none":
        w = 3 if smoothing == "gaussian" else int(smoothing.split("_")[1])
        if smoothing == "gaussian":
            t = torch.tensor([0.25, 0.5, 0.25], dtype=D64)
            smooth = t[:, None] * t[None, :]
        elif smoothing.startswith("average"):
            smooth = torch.full((w, w), 1.0 / w ** 2, dtype=D64)
        else:  # full: pass a non-trivial learnable kernel explicitly
            smooth = rnd(w, w, seed=5)
            sk = smooth.view(1, 1, w, w)
    K, m = packernel2d(guide, kernel_size=k, stride=s, padding=p, dilation=d,
                       kernel_type=kernel_type, smooth_kernel_type=smoothing, smooth_kernel=sk,
                       channel_wise=cw, normalize_kernel=norm)
    ref, _ = ref_kernel(guide, k, s, p, d, kind=kind, alpha=alpha, lam=lam,
                        asym="_asym" in kernel_type, smooth=smooth, channel_wise=cw,
                        normalize=norm)
    assert m is None
    kk, ss, pp, dd = map(_p2, (k, s, p, d))
    oh, ow = conv_size(9, kk[0], ss[0], pp[0], dd[0]), conv_size(8, kk[1], ss[1], pp[1], dd[1])
    assert K.shape == (2, 3 if cw else 1, kk[0], kk[1], oh, ow)
    close(K, ref)


def test_packernel2d_unnormalised_padding_value():
    """Without normalisation a padded tap is exp(-0.5 |f_ctr|^2), not 0 (as the original)."""
    guide = rnd(1, 2, 4, 4)
    K, _ = packernel2d(guide, kernel_size=3, padding=1)
    ctr = guide[0, :, 0, 0]
    close(K[0, 0, 0, 0, 0, 0], torch.exp(-0.5 * (ctr ** 2).sum()))


def test_packernel2d_inv_parameters_override_and_vectors():
    guide = rnd(2, 3, 6, 6)
    alpha = torch.tensor([0.5, -1.0, 2.0], dtype=D64)
    lam = torch.tensor([-1.0, -2.0, 0.5], dtype=D64)
    K, _ = packernel2d(guide, kernel_size=3, padding=1, kernel_type="inv_1_-1",
                       inv_alpha=alpha, inv_lambda=lam, channel_wise=True)
    ref, _ = ref_kernel(guide, 3, 1, 1, 1, kind="inv", alpha=alpha, lam=lam, channel_wise=True)
    close(K, ref)
    K, _ = packernel2d(guide, kernel_size=3, padding=1, kernel_type="inv_1_-1",
                       inv_alpha=torch.tensor(0.3, dtype=D64), inv_lambda=-0.7)
    ref, _ = ref_kernel(guide, 3, 1, 1, 1, kind="inv", alpha=0.3, lam=-0.7)
    close(K, ref)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("cfg", [(3, 1, 1, 1), (5, 2, 2, 1), (3, 1, 2, 2), (3, 2, 0, 1)])
def test_packernel2d_mask(cfg, normalize):
    k, s, p, d = cfg
    guide = rnd(2, 2, 7, 8)
    mask = torch.rand(2, 1, 7, 8, generator=torch.Generator().manual_seed(3)) > 0.6
    mask[1, :, :4] = False  # whole windows without a valid tap
    K, m = packernel2d(guide, mask, kernel_size=k, stride=s, padding=p, dilation=d,
                       normalize_kernel=normalize)
    ref, ref_m = ref_kernel(guide, k, s, p, d, normalize=normalize, mask=mask)
    close(K, ref)
    assert m.shape == (2, 1, 1, 1) + K.shape[-2:] and m.dtype == D64
    close(m, ref_m)
    assert (m == 0).any() and (m == 1).any()
    if normalize:  # every window with a valid tap sums to 1
        sums = K.sum((2, 3), keepdim=True)
        close(sums[m.bool()], torch.ones_like(sums[m.bool()]))
    # a float mask gives the same as a bool one, and an all-ones mask changes nothing
    K2, _ = packernel2d(guide, mask.to(D64), kernel_size=k, stride=s, padding=p, dilation=d,
                        normalize_kernel=normalize)
    close(K2, K)
    ones = torch.ones_like(mask, dtype=D64)
    K3, m3 = packernel2d(guide, ones, kernel_size=k, stride=s, padding=p, dilation=d,
                         normalize_kernel=normalize)
    K4, _ = packernel2d(guide, kernel_size=k, stride=s, padding=p, dilation=d,
                        normalize_kernel=normalize)
    if normalize:
        close(K3, K4)
    else:  # partial-conv rescaling with a full mask: padded taps zeroed, interior untouched
        _, valid = ref_taps(torch.ones(1, 1, 7, 8, dtype=D64), k, s, p, d)
        close(K3, K4 * valid)
    assert bool((m3 == 1).all())


@pytest.mark.parametrize("cfg", [
    # k, s, p, op, d, normalize, masked
    (3, 2, 1, 1, 1, True, False),
    (5, 2, 2, 1, 1, True, False),
    (3, 3, 0, 2, 1, True, True),
    (3, 2, 1, 0, 2, False, True),
    (5, 2, 1, 0, 1, True, True),
    (3, 2, 4, 1, 1, False, False),   # padding > (k-1)d: the zero-inserted input is cropped
])
def test_packernel2d_transposed(cfg):
    k, s, p, op, d, normalize, masked = cfg
    H, W = 4, 5
    oh, ow = tconv_size(H, k, s, p, op, d), tconv_size(W, k, s, p, op, d)
    guide = rnd(2, 3, oh, ow)
    mask = None
    if masked:
        mask = torch.rand(2, 1, H, W, generator=torch.Generator().manual_seed(1)) > 0.5
    K, m = packernel2d(guide, mask, kernel_size=k, stride=s, padding=p, output_padding=op,
                       dilation=d, normalize_kernel=normalize, transposed=True)
    ref, ref_m = ref_kernel(guide, k, s, p, d, normalize=normalize, mask=mask, transposed=True,
                            op=op)
    assert K.shape == (2, 1, k, k, oh, ow)
    close(K, ref)
    if masked:
        close(m, ref_m)
    else:
        assert m is None


# ----------------------------------------------------------------------------- modules: values

CONV_CASES = [
    # k, s, p, d, kernel_type, smoothing, normalize, shared, bias
    (3, 1, 1, 1, "gaussian", "none", False, False, True),
    (5, 2, 2, 1, "gaussian", "none", True, False, True),
    (3, 2, 2, 2, "inv_0.2_0.2_asym", "average_3", True, False, False),
    ((3, 5), (1, 2), (1, 2), 1, "gaussian", "gaussian", False, False, True),
    (3, 1, 1, 1, "gaussian", "none", False, True, True),
    (5, 1, 4, 2, "inv_1_-1_fixed", "full_3", False, True, False),
    (3, 3, 0, 1, "gaussian", "none", True, False, True),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "-".join(map(str, c)))
def test_pacconv2d_module_values(case):
    k, s, p, d, kt, sm, norm, shared, bias = case
    c_in, c_out = (3, 3) if shared else (3, 4)
    torch.manual_seed(0)
    layer = PacConv2d(c_in, c_out, k, stride=s, padding=p, dilation=d, bias=bias, kernel_type=kt,
                      smooth_kernel_type=sm, normalize_kernel=norm, shared_filters=shared).double()
    x, guide = rnd(2, c_in, 9, 8), rnd(2, 2, 9, 8)
    out = layer(x, guide)
    K, _ = layer.compute_kernel(guide)
    kind = "gaussian" if kt == "gaussian" else "inv"
    smooth = None if layer.smooth_kernel is None else layer.smooth_kernel[0, 0]
    refK, _ = ref_kernel(guide, k, s, p, d, kind=kind,
                         alpha=None if layer.inv_alpha is None else layer.inv_alpha.detach(),
                         lam=None if layer.inv_lambda is None else layer.inv_lambda.detach(),
                         asym="_asym" in kt, smooth=smooth, normalize=norm)
    close(K, refK)
    ref = ref_conv(x, refK, layer.weight.detach(), layer.bias, s, p, d, shared)
    close(out, ref)
    # functional form, and a precomputed kernel (the guide is then ignored / may be None)
    close(pacconv2d(x, K, layer.weight, layer.bias, s, p, d, shared), ref)
    close(layer(x, None, kernel=K), ref)
    Kr = rnd(*K.shape, seed=11)
    close(layer(x, guide, Kr), ref_conv(x, Kr, layer.weight.detach(), layer.bias, s, p, d, shared))


TCONV_CASES = [
    # k, s, p, op, d, normalize, shared, bias, kernel_type
    (3, 2, 1, 1, 1, False, False, True, "gaussian"),
    (5, 2, 2, 1, 1, True, False, False, "gaussian"),
    (3, 1, 1, 0, 2, False, False, True, "inv_1_-1_asym"),
    ((3, 5), (2, 3), (1, 2), (1, 0), 1, False, False, True, "gaussian"),
    (3, 2, 1, 1, 1, False, True, True, "gaussian"),    # shared filters (the original collapsed C)
    (3, 2, 0, 1, 1, True, True, False, "gaussian"),
    (3, 2, 2, 0, 1, False, False, True, "gaussian"),   # q = 0 (the original's backward crashed)
    (3, 2, 3, 1, 1, False, False, True, "gaussian"),   # q < 0: crop
]


@pytest.mark.parametrize("case", TCONV_CASES, ids=lambda c: "-".join(map(str, c)))
def test_pacconv_transpose2d_module_values(case):
    k, s, p, op, d, norm, shared, bias, kt = case
    c_in, c_out = (3, 3) if shared else (3, 2)
    torch.manual_seed(0)
    layer = PacConvTranspose2d(c_in, c_out, k, stride=s, padding=p, output_padding=op,
                               dilation=d, bias=bias, normalize_kernel=norm,
                               shared_filters=shared, kernel_type=kt).double()
    H, W = 4, 5
    kk, ss, pp, oo, dd = map(_p2, (k, s, p, op, d))
    oh, ow = (tconv_size(n, kk[i], ss[i], pp[i], oo[i], dd[i]) for i, n in enumerate((H, W)))
    x, guide = rnd(2, c_in, H, W), rnd(2, 3, oh, ow)
    out = layer(x, guide)
    assert out.shape == (2, c_out, oh, ow)
    kind = "gaussian" if kt == "gaussian" else "inv"
    refK, _ = ref_kernel(guide, k, s, p, d, kind=kind, alpha=1.0, lam=-1.0, asym="asym" in kt,
                         normalize=norm, transposed=True, op=op)
    ref = ref_conv(x, refK, layer.weight.detach(), layer.bias, s, p, d, shared, transposed=True,
                   op=op)
    close(out, ref)
    K, _ = layer.compute_kernel(guide)
    close(pacconv_transpose2d(x, K, layer.weight, layer.bias, s, p, op, d, shared), ref)
    Kr = rnd(*K.shape, seed=12)
    close(layer(x, None, Kr), ref_conv(x, Kr, layer.weight.detach(), layer.bias, s, p, d, shared,
                                       transposed=True, op=op))


POOL_CASES = [
    # k, s, p, d, kernel_type, smoothing, channel_wise, normalize
    (3, 1, 1, 1, "gaussian", "none", False, False),
    (5, 2, 2, 1, "gaussian", "none", False, True),
    (3, 2, 2, 2, "gaussian", "none", True, False),
    (3, 1, 1, 1, "inv_1_-1", "average_3", True, True),
    ((3, 5), (2, 1), (0, 2), 1, "inv_0.5_-2_asym_fixed", "full_3", True, False),
]


@pytest.mark.parametrize("case", POOL_CASES, ids=lambda c: "-".join(map(str, c)))
def test_pacpool2d_module_values(case):
    k, s, p, d, kt, sm, cw, norm = case
    C = 3
    layer = PacPool2d(k, stride=s, padding=p, dilation=d, kernel_type=kt, smooth_kernel_type=sm,
                      channel_wise=cw, normalize_kernel=norm, out_channels=C).double()
    if layer.inv_alpha is not None and layer.inv_alpha.dim() == 1:
        assert layer.inv_alpha.shape == (C,)
        with torch.no_grad():  # per-channel values really act per channel
            layer.inv_alpha.copy_(torch.tensor([1.0, 0.5, -0.5]))
            layer.inv_lambda.copy_(torch.tensor([-1.0, -2.0, 1.5]))
    x, guide = rnd(2, C, 8, 9), rnd(2, C, 8, 9)
    out = layer(x, guide)
    kind = "gaussian" if kt == "gaussian" else "inv"
    refK, _ = ref_kernel(guide, k, s, p, d, kind=kind,
                         alpha=None if layer.inv_alpha is None else layer.inv_alpha.detach(),
                         lam=None if layer.inv_lambda is None else layer.inv_lambda.detach(),
                         asym="asym" in kt,
                         smooth=None if layer.smooth_kernel is None else layer.smooth_kernel[0, 0].detach(),
                         channel_wise=cw, normalize=norm)
    ref = ref_pool(x, refK, k, s, p, d)
    close(out, ref)
    K, _ = layer.compute_kernel(guide)
    close(pacpool2d(x, K, k, s, p, d), ref)
    close(layer(x, None, kernel=K), ref)


@pytest.mark.parametrize("normalize", [False, True])
def test_module_masks(normalize):
    torch.manual_seed(0)
    mask = torch.rand(2, 1, 6, 7, generator=torch.Generator().manual_seed(4)) > 0.4
    x, guide = rnd(2, 3, 6, 7), rnd(2, 2, 6, 7)
    conv = PacConv2d(3, 4, 3, padding=1, normalize_kernel=normalize).double()
    out, m = conv(x, guide, mask=mask)
    K, rm = ref_kernel(guide, 3, 1, 1, 1, normalize=normalize, mask=mask)
    close(out, ref_conv(x, K, conv.weight.detach(), conv.bias, 1, 1, 1))
    close(m, rm)
    # masked inputs really do not matter
    x2 = torch.where(mask, x, rnd(2, 3, 6, 7, seed=99))
    close(conv(x2, guide, mask=mask)[0], out)

    pool = PacPool2d(3, stride=2, padding=1, normalize_kernel=normalize).double()
    out, m = pool(x, guide, mask=mask)
    K, rm = ref_kernel(guide, 3, 2, 1, 1, normalize=normalize, mask=mask)
    close(out, ref_pool(x, K, 3, 2, 1, 1))
    close(m, rm)

    tconv = PacConvTranspose2d(3, 2, 3, stride=2, padding=1, output_padding=1,
                               normalize_kernel=normalize).double()
    gt = rnd(2, 2, 12, 14)
    out, m = tconv(x, gt, mask=mask)
    K, rm = ref_kernel(gt, 3, 2, 1, 1, normalize=normalize, mask=mask, transposed=True, op=1)
    close(out, ref_conv(x, K, tconv.weight.detach(), tconv.bias, 2, 1, 1, transposed=True, op=1))
    close(m, rm)
    assert m.shape == (2, 1, 1, 1, 12, 14)


# ----------------------------------------------------------------------------- K == 1 equivalences, sizes

@pytest.mark.parametrize("cfg", [(3, 1, 0, 1), (5, 2, 2, 1), (3, 2, 2, 2), ((3, 5), (2, 1), (1, 2), (1, 2))])
def test_const_kernel_equals_conv2d(cfg):
    k, s, p, d = cfg
    layer = PacConv2d(4, 3, k, stride=s, padding=p, dilation=d).double()
    ref = nn.Conv2d(4, 3, k, stride=s, padding=p, dilation=d).double()
    ref.load_state_dict(layer.state_dict())
    x = rnd(2, 4, 11, 10)
    guide = torch.zeros(2, 5, 11, 10, dtype=D64)  # K == 1 everywhere, padding included
    close(layer(x, guide), ref(x))
    Kc = torch.full_like(layer.compute_kernel(guide)[0], 0.5)
    close(layer(x, None, Kc), 0.5 * (ref(x) - ref.bias.view(1, -1, 1, 1)) + ref.bias.view(1, -1, 1, 1))


@pytest.mark.parametrize("cfg", [(3, 2, 1, 1, 1), (5, 2, 2, 1, 1), (3, 3, 0, 2, 1), (3, 1, 1, 0, 2),
                                 (3, 2, 3, 0, 1)])
def test_const_kernel_transposed_equals_flipped_conv_transpose2d(cfg):
    k, s, p, op, d = cfg
    layer = PacConvTranspose2d(4, 3, k, stride=s, padding=p, output_padding=op, dilation=d).double()
    ref = nn.ConvTranspose2d(4, 3, k, stride=s, padding=p, output_padding=op, dilation=d).double()
    x = rnd(2, 4, 5, 6)
    out_shape = ref(x).shape
    guide = rnd(2, 3, *out_shape[-2:])
    K = torch.ones_like(layer.compute_kernel(guide)[0])
    with torch.no_grad():
        ref.weight.copy_(layer.weight.flip(2, 3))
        ref.bias.copy_(layer.bias)
    out = layer(x, guide, K)
    close(out, ref(x))
    # same weight unflipped differs (the documented convention), for an asymmetric weight
    with torch.no_grad():
        ref.weight.copy_(layer.weight)
    assert (out - ref(x)).abs().max() > 1e-3
    # a zero guide gives K == 1 wherever a real sample is read: same result
    close(layer(x, torch.zeros_like(guide)), out)


@pytest.mark.parametrize("cfg", [(3, 1, 1, 1), (5, 2, 2, 1), (3, 2, 0, 1), (3, 3, 1, 2)])
def test_const_kernel_pool_equals_avgpool(cfg):
    k, s, p, d = cfg
    x = rnd(2, 3, 9, 10)
    zeros = torch.zeros(2, 2, 9, 10, dtype=D64)
    pool = PacPool2d(k, stride=s, padding=p, dilation=d)
    out = pool(x, zeros)
    if d == 1:
        avg = nn.AvgPool2d(k, stride=s, padding=p)(x)
        close(out, avg * k * k)
        normed = PacPool2d(k, stride=s, padding=p, normalize_kernel=True)(x, zeros)
        close(normed, nn.AvgPool2d(k, stride=s, padding=p, count_include_pad=False)(x))
    else:  # AvgPool2d has no dilation: compare with a ones-conv
        ones = torch.ones(3, 1, k, k, dtype=D64)
        close(out, F.conv2d(x, ones, stride=s, padding=p, dilation=d, groups=3))


def test_output_sizes_match_torch():
    for k, s, p, d, H, W in itertools.product([1, 3, 5], [1, 2, 3], [0, 1, 2], [1, 2], [5, 8], [6]):
        if 2 * p > d * (k - 1):
            continue
        x = torch.zeros(1, 2, H, W, dtype=D64)
        if conv_size(H, k, s, p, d) < 1 or conv_size(W, k, s, p, d) < 1:
            continue
        g = torch.zeros(1, 1, H, W, dtype=D64)
        assert PacConv2d(2, 3, k, s, p, d).double()(x, g).shape == \
            nn.Conv2d(2, 3, k, s, p, d)(x.float()).shape
        assert PacPool2d(k, s, p, d)(x, g).shape == \
            nn.Conv2d(2, 2, k, s, p, d)(x.float()).shape
        if d == 1:  # with AvgPool2d's default stride (= kernel_size) passed explicitly
            assert PacPool2d(k, k, p)(x, g).shape == nn.AvgPool2d(k, padding=p)(x).shape
    for k, s, p, op, d, H in itertools.product([1, 3, 5], [1, 2, 3], [0, 1, 3], [0, 1, 2], [1, 2],
                                               [3, 4]):
        if op >= max(s, d):
            continue
        x = torch.zeros(1, 2, H, H, dtype=D64)
        ref = nn.ConvTranspose2d(2, 3, k, s, p, op, dilation=d)
        try:
            shape = ref(x.float()).shape
        except RuntimeError:
            with pytest.raises(PacnetValueError, match="empty"):
                PacConvTranspose2d(2, 3, k, s, p, op, dilation=d).double()(x, None)
            continue
        g = torch.zeros(1, 1, *shape[-2:], dtype=D64)
        assert PacConvTranspose2d(2, 3, k, s, p, op, dilation=d).double()(x, g).shape == shape


# ----------------------------------------------------------------------------- fillers

def test_uniform_filler_bounds():
    torch.manual_seed(0)
    layer = PacConv2d(4, 8, 3)
    sigma = 1 / math.sqrt(4 * 9)
    assert layer.weight.abs().max() <= sigma and layer.weight.abs().max() > 0.8 * sigma
    assert layer.bias.abs().max() <= sigma and layer.bias.std() > 0.2 * sigma
    shared = PacConv2d(4, 4, 3, shared_filters=True)
    assert shared.weight.shape == (1, 1, 3, 3)
    assert shared.weight.abs().max() <= 4 * sigma and shared.weight.abs().max() > sigma
    tr = PacConvTranspose2d(2, 16, 3)
    sigma = 1 / math.sqrt(2 * 9)  # in_channels, also for the transposed layer
    assert tr.weight.abs().max() <= sigma and tr.weight.abs().max() > 0.8 * sigma


def test_linear_filler():
    layer = PacConvTranspose2d(2, 2, 5, stride=2, padding=2, output_padding=1, filler="linear")
    prof = torch.tensor([0, 0.5, 1, 0.5, 0])
    close(layer.weight[0, 0].double(), (prof[:, None] * prof[None, :]).double(), 1e-7)
    assert layer.weight[0, 1].abs().sum() == 0 and layer.weight[1, 0].abs().sum() == 0
    assert layer.bias.abs().sum() == 0
    normed = PacConvTranspose2d(2, 2, 5, stride=2, padding=2, output_padding=1, filler="linear",
                                normalize_kernel=True)
    prof = torch.tensor([0.0, 1, 3, 1, 0])
    close(normed.weight[1, 1].double(), (prof[:, None] * prof[None, :]).double(), 1e-7)
    s3 = PacConvTranspose2d(1, 1, 7, stride=3, filler="linear", shared_filters=True)
    prof = torch.tensor([0, 1, 2, 3, 2, 1, 0]) / 3
    close(s3.weight[0, 0].double(), (prof[:, None] * prof[None, :]).double(), 1e-7)


def _linear_upsample_matrix(n, s):
    """1-D linear interpolation at positions o/s (o = 0 .. s*n - 1), edge-replicated."""
    A = torch.zeros(s * n, n, dtype=D64)
    for o in range(s * n):
        u = min(o / s, n - 1)
        i = int(math.floor(u))
        f = u - i
        A[o, i] += 1 - f
        A[o, min(i + 1, n - 1)] += f
    return A


@pytest.mark.parametrize("s", [2, 3])
def test_linear_filler_normalised_is_bilinear(s):
    """With normalize_kernel and a constant guide the linear filler upsamples bilinearly
    (output s*i is input i, linear in between) wherever the window lies inside the
    zero-inserted input; at the border the normalisation over fewer samples deviates."""
    k = 2 * s + 1
    p = (k - 1) // 2
    layer = PacConvTranspose2d(2, 2, k, stride=s, padding=p, output_padding=s - 1,
                               filler="linear", normalize_kernel=True).double()
    H, W = 5, 6
    x = rnd(1, 2, H, W)
    guide = torch.full((1, 3, H * s, W * s), 0.7, dtype=D64)
    Ah, Aw = _linear_upsample_matrix(H, s), _linear_upsample_matrix(W, s)
    ref = torch.einsum("yh,bchw,xw->bcyx", Ah, x, Aw)
    q = k - 1 - p
    inner_h = slice(q, (H - 1) * s - k + 1 + q + 1)
    inner_w = slice(q, (W - 1) * s - k + 1 + q + 1)
    out = layer(x, guide)
    close(out[..., inner_h, inner_w], ref[..., inner_h, inner_w], 1e-7)  # float32-filled weight
    assert out[..., inner_h, inner_w].numel() >= 2 * 4 * 6


def test_crf_and_pool_fillers():
    layer = PacConv2d(3, 3, 5, padding=2, bias=False, filler="crf")
    r = torch.arange(5, dtype=D64) - 2
    g = torch.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * 1.25 ** 2))
    g = g / g.sum() * 25
    g[2, 2] = 0
    for i, j in itertools.product(range(3), range(3)):
        close(layer.weight[i, j].double(), g if i != j else torch.zeros(5, 5, dtype=D64), 1e-6)
    torch.manual_seed(1)
    pert = PacConv2d(3, 3, 5, padding=2, bias=False, filler="crf_perturbed")
    diff = (pert.weight - layer.weight).abs()
    assert diff.max() <= 5e-4 and diff.max() > 0
    shared = PacConv2d(3, 3, 5, padding=2, bias=False, shared_filters=True, filler="crf")
    close(shared.weight[0, 0].double(), g, 1e-6)
    pool = PacConv2d(3, 3, 3, padding=1, bias=False, shared_filters=True, filler="crf_pool")
    assert "weight" in dict(pool.named_buffers()) and "weight" not in dict(pool.named_parameters())
    expected = torch.ones(3, 3)
    expected[1, 1] = 0
    assert torch.equal(pool.weight[0, 0], expected)
    box = PacConv2d(3, 3, 3, padding=1, bias=False, shared_filters=True, filler="pool")
    assert torch.equal(box.weight, torch.ones(1, 1, 3, 3))


# ----------------------------------------------------------------------------- state_dicts of the original

def _sd(**shapes):
    return {k: torch.randn(v) if v != () else torch.tensor(0.25) for k, v in shapes.items()}


STATE_DICT_CASES = [
    (lambda: PacConv2d(4, 3, 5, padding=2), dict(weight=(3, 4, 5, 5), bias=(3,))),
    (lambda: PacConv2d(4, 3, 3, padding=1, bias=False, kernel_type="inv_1_-1"),
     dict(weight=(3, 4, 3, 3), inv_alpha=(), inv_lambda=())),
    (lambda: PacConv2d(4, 3, 3, padding=1, kernel_type="inv_1_-1_fixed", smooth_kernel_type="full_3"),
     dict(weight=(3, 4, 3, 3), bias=(3,), inv_alpha=(), inv_lambda=(), smooth_kernel=(1, 1, 3, 3))),
    (lambda: PacConv2d(4, 4, 3, padding=1, shared_filters=True, smooth_kernel_type="average_5"),
     dict(weight=(1, 1, 3, 3), bias=(4,), smooth_kernel=(1, 1, 5, 5))),
    (lambda: PacConv2d(4, 4, 3, padding=1, bias=False, shared_filters=True, filler="crf_pool",
                       smooth_kernel_type="gaussian"),
     dict(weight=(1, 1, 3, 3), smooth_kernel=(1, 1, 3, 3))),
    (lambda: PacConvTranspose2d(4, 3, 5, stride=2, padding=2, output_padding=1),
     dict(weight=(4, 3, 5, 5), bias=(3,))),
    (lambda: PacConvTranspose2d(3, 3, 3, stride=2, padding=1, shared_filters=True,
                                kernel_type="inv_0.5_-1_asym"),
     dict(weight=(1, 1, 3, 3), bias=(3,), inv_alpha=(), inv_lambda=())),
    (lambda: PacPool2d(3, padding=1), dict()),
    (lambda: PacPool2d(3, padding=1, kernel_type="inv_1_-1", channel_wise=True, out_channels=5,
                       smooth_kernel_type="full_5"),
     dict(inv_alpha=(5,), inv_lambda=(5,), smooth_kernel=(1, 1, 5, 5))),
    (lambda: PacPool2d(3, padding=1, kernel_type="inv_1_-1_fixed", channel_wise=True),
     dict(inv_alpha=(), inv_lambda=())),
]


@pytest.mark.parametrize("i", range(len(STATE_DICT_CASES)))
def test_original_state_dict_loads_strictly(i):
    make, shapes = STATE_DICT_CASES[i]
    layer = make()
    sd = _sd(**shapes)
    assert set(layer.state_dict()) == set(sd)
    order = ["weight", "bias", "inv_alpha", "inv_lambda", "smooth_kernel"]
    # parameters first, then buffers, each in the original's registration order
    params = [k for k in order if k in dict(layer.named_parameters())]
    buffers = [k for k in order if k in dict(layer.named_buffers())]
    assert list(layer.state_dict()) == params + buffers
    layer.load_state_dict(sd, strict=True)
    for key, value in sd.items():
        assert torch.equal(layer.state_dict()[key], value)
    with pytest.raises(RuntimeError):
        layer.load_state_dict({**sd, "extra": torch.zeros(1)}, strict=True)


def test_parameters_vs_buffers():
    learn = PacConv2d(2, 2, 3, padding=1, kernel_type="inv_1_-1", smooth_kernel_type="full_3")
    assert {n for n, _ in learn.named_parameters()} == {"weight", "bias", "inv_alpha", "inv_lambda",
                                                        "smooth_kernel"}
    assert learn.inv_alpha.item() == 1.0 and learn.inv_lambda.item() == -1.0
    assert torch.allclose(learn.smooth_kernel, torch.full((1, 1, 3, 3), 1 / 9))
    fixed = PacConv2d(2, 2, 3, padding=1, kernel_type="inv_0.2_0.2_asym_fixed",
                      smooth_kernel_type="average_3")
    assert {n for n, _ in fixed.named_parameters()} == {"weight", "bias"}
    assert {n for n, _ in fixed.named_buffers()} == {"inv_alpha", "inv_lambda", "smooth_kernel"}
    assert fixed.inv_alpha.shape == () and math.isclose(float(fixed.inv_alpha), 0.2, rel_tol=1e-6)
    g = PacConv2d(2, 2, 3, padding=1, smooth_kernel_type="gaussian")
    t = torch.tensor([0.25, 0.5, 0.25])
    assert torch.allclose(g.smooth_kernel[0, 0], t[:, None] * t[None, :])
    plain = PacConv2d(2, 2, 3)
    assert plain.inv_alpha is None and plain.inv_lambda is None and plain.smooth_kernel is None
    assert plain.native_impl is False and PacConv2d(2, 2, 3, native_impl=True).native_impl


# ----------------------------------------------------------------------------- gradients

def gradcheck(fn, inputs):
    # the original repo's tolerances (rtol 1e-3, atol 1e-8)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8, rtol=1e-3)


@pytest.mark.parametrize("cfg", [
    # kernel_type, smoothing, normalize, shared, k, s, p, d
    ("gaussian", "none", False, False, 3, 2, 1, 1),
    ("inv_0.2_0.2_asym", "average_3", True, False, 3, 1, 2, 2),
    ("inv_1_-1", "full_3", False, True, 3, 1, 1, 1),
    ("gaussian", "full_3", True, False, 5, 2, 2, 1),
])
def test_gradcheck_pacconv2d(cfg):
    kt, sm, norm, shared, k, s, p, d = cfg
    c_out = 2
    layer = PacConv2d(2, c_out, k, stride=s, padding=p, dilation=d, kernel_type=kt,
                      smooth_kernel_type=sm, normalize_kernel=norm, shared_filters=shared).double()
    x, guide = rnd(1, 2, 5, 5, requires_grad=True), rnd(1, 2, 5, 5, requires_grad=True)
    w = layer.weight.detach().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()
    extra = {}
    names = []
    if layer.inv_alpha is not None:
        names += ["inv_alpha", "inv_lambda"]
    if isinstance(layer.smooth_kernel, nn.Parameter):
        names.append("smooth_kernel")
    for n in names:
        extra[n] = getattr(layer, n).detach().clone().requires_grad_()
    if "smooth_kernel" in extra:
        extra["smooth_kernel"] = extra["smooth_kernel"] + 0.1 * rnd(1, 1, 3, 3, seed=2)
        extra["smooth_kernel"] = extra["smooth_kernel"].detach().requires_grad_()

    def fn(x, guide, w, b, *vals):
        kw = dict(zip(names, vals))
        K, _ = packernel2d(guide, kernel_size=k, stride=s, padding=p, dilation=d, kernel_type=kt,
                           smooth_kernel_type=sm, normalize_kernel=norm,
                           smooth_kernel=kw.get("smooth_kernel"), inv_alpha=kw.get("inv_alpha"),
                           inv_lambda=kw.get("inv_lambda"))
        return pacconv2d(x, K, w, b, s, p, d, shared)

    gradcheck(fn, (x, guide, w, b, *[extra[n] for n in names]))


def test_gradcheck_module_parameters_receive_gradients():
    layer = PacConv2d(2, 2, 3, padding=1, kernel_type="inv_1_-1", smooth_kernel_type="full_3").double()
    x, guide = rnd(1, 2, 5, 5), rnd(1, 2, 5, 5)
    layer(x, guide).square().sum().backward()
    for n, prm in layer.named_parameters():
        assert prm.grad is not None and prm.grad.abs().sum() > 0, n


def test_gradcheck_precomputed_kernel_and_mask():
    x = rnd(1, 2, 5, 5, requires_grad=True)
    K = rnd(1, 1, 3, 3, 3, 3, requires_grad=True)
    w, b = rnd(3, 2, 3, 3, requires_grad=True), rnd(3, requires_grad=True)
    gradcheck(lambda x, K, w, b: pacconv2d(x, K, w, b, stride=2, padding=1), (x, K, w, b))
    Kp = rnd(1, 2, 3, 3, 5, 5, requires_grad=True)
    gradcheck(lambda x, K: pacpool2d(x, K, 3, padding=2, dilation=2), (x, Kp))
    guide = rnd(1, 2, 5, 5, requires_grad=True)
    soft = torch.rand(1, 1, 5, 5, dtype=D64, generator=torch.Generator().manual_seed(0)) + 0.1
    soft.requires_grad_()
    for norm in (False, True):
        gradcheck(lambda g, m: packernel2d(g, m, kernel_size=3, padding=1,
                                           normalize_kernel=norm)[0], (guide, soft))


@pytest.mark.parametrize("cfg", [(3, 2, 1, 1, 1, False, False), (3, 2, 0, 1, 1, True, False),
                                 (3, 1, 2, 0, 2, False, True), (3, 2, 2, 0, 1, False, False)])
def test_gradcheck_pacconv_transpose2d(cfg):
    k, s, p, op, d, norm, shared = cfg
    c_out = 2 if shared else 3
    x = rnd(1, 2, 3, 4, requires_grad=True)
    oh, ow = tconv_size(3, k, s, p, op, d), tconv_size(4, k, s, p, op, d)
    guide = rnd(1, 2, oh, ow, requires_grad=True)
    w = rnd(1, 1, k, k, requires_grad=True) if shared else rnd(2, c_out, k, k, requires_grad=True)
    b = rnd(c_out, requires_grad=True)

    def fn(x, guide, w, b):
        K, _ = packernel2d(guide, kernel_size=k, stride=s, padding=p, output_padding=op,
                           dilation=d, normalize_kernel=norm, transposed=True)
        return pacconv_transpose2d(x, K, w, b, s, p, op, d, shared)

    gradcheck(fn, (x, guide, w, b))
    K = rnd(1, 1, k, k, oh, ow, requires_grad=True)
    gradcheck(lambda x, K: pacconv_transpose2d(x, K, w.detach(), None, s, p, op, d, shared), (x, K))


@pytest.mark.parametrize("cfg", [("gaussian", False, False), ("inv_1_-1", True, True),
                                 ("inv_0.5_-2_asym", True, False)])
def test_gradcheck_pacpool2d(cfg):
    kt, cw, norm = cfg
    x = rnd(1, 2, 5, 5, requires_grad=True)
    # spread-out guide values: (D + 1e-4)**(-1) is too curved near D = 0 for finite differences
    guide = (3 * rnd(1, 2, 5, 5)).requires_grad_()
    a = torch.tensor([1.0, 0.5] if cw else 1.0, dtype=D64, requires_grad=True)
    lam = torch.tensor([-1.0, -2.0] if cw else -1.0, dtype=D64, requires_grad=True)

    def fn(x, guide, *al):
        kw = {} if kt == "gaussian" else dict(inv_alpha=al[0], inv_lambda=al[1])
        K, _ = packernel2d(guide, kernel_size=3, stride=2, padding=2, dilation=2, kernel_type=kt,
                           channel_wise=cw, normalize_kernel=norm, **kw)
        return pacpool2d(x, K, 3, 2, 2, 2)

    gradcheck(fn, (x, guide) if kt == "gaussian" else (x, guide, a, lam))


def test_autocast_mixed_dtypes_are_allowed():
    """Under autocast bfloat16 activations meet float32 parameters: no dtype error."""
    layer = PacConv2d(2, 3, 3, padding=1, kernel_type="inv_1_-1", smooth_kernel_type="full_3")
    x, guide = torch.randn(1, 2, 6, 6), torch.randn(1, 2, 6, 6)
    mask = torch.rand(1, 1, 6, 6, generator=torch.Generator().manual_seed(0)) > 0.3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, m = layer(x.bfloat16(), guide.bfloat16(), mask=mask.float())
    ref, ref_m = layer(x, guide, mask=mask)
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)
    assert torch.equal(m.float(), ref_m)
    out.float().sum().backward()
    assert all(p.grad is not None for p in layer.parameters())
    with pytest.raises(PacnetValueError, match="dtype"):  # outside autocast it is a mistake
        layer(x.bfloat16(), guide.bfloat16())


# ----------------------------------------------------------------------------- validation

def _bad(fn, match=None):
    with pytest.raises(PacnetValueError, match=match):
        fn()


@pytest.mark.usefixtures("no_compute")
def test_constructor_errors():
    assert issubclass(PacnetValueError, ValueError)
    _bad(lambda: PacConv2d(2, 2, 4), "odd")
    _bad(lambda: PacConv2d(2, 2, (3, 2)), "odd")
    _bad(lambda: PacConv2d(2, 2, 0), ">= 1")
    _bad(lambda: PacConv2d(2, 2, 3, padding=2), "padding")
    _bad(lambda: PacConv2d(2, 2, 3, padding=(1, 2), dilation=(1, 1)), "padding")
    _bad(lambda: PacPool2d(5, padding=3), "padding")
    _bad(lambda: PacConv2d(2, 2, 3, stride=0), "stride")
    _bad(lambda: PacConv2d(2, 2, 3, dilation=0), "dilation")
    _bad(lambda: PacConv2d(2, 2, 3, padding=-1), "padding")
    _bad(lambda: PacConv2d(2, 2, 3, stride=1.5), "stride")
    _bad(lambda: PacConv2d(2, 2, 3, kernel_type="gauss"), "kernel_type")
    _bad(lambda: PacConv2d(2, 2, 3, kernel_type="inv_1"), "kernel_type")
    _bad(lambda: PacConv2d(2, 2, 3, kernel_type="inv_a_1"), "kernel_type")
    _bad(lambda: PacConv2d(2, 2, 3, kernel_type="inv_1_1_sym"), "kernel_type")
    _bad(lambda: PacConv2d(2, 2, 3, smooth_kernel_type="average_4"), "odd")
    _bad(lambda: PacConv2d(2, 2, 3, smooth_kernel_type="full_x"), "smooth_kernel_type")
    _bad(lambda: PacConv2d(2, 2, 3, smooth_kernel_type="box_3"), "smooth_kernel_type")
    _bad(lambda: PacConv2d(2, 3, 3, shared_filters=True), "shared_filters")
    _bad(lambda: PacConv2d(2, 2, 3, filler="xavier"), "filler")
    _bad(lambda: PacConv2d(2, 2, 3, filler="linear"), "transposed")
    _bad(lambda: PacConvTranspose2d(2, 3, 5, stride=2, filler="linear"), "in_channels")
    _bad(lambda: PacConvTranspose2d(2, 2, 3, stride=3, filler="linear"), "2\\*stride-1")
    _bad(lambda: PacConv2d(2, 2, (3, 5), filler="crf"), "square")
    _bad(lambda: PacConv2d(2, 3, 3, filler="crf"), "in_channels")
    _bad(lambda: PacConv2d(2, 2, 3, filler="pool"), "shared_filters")
    _bad(lambda: PacConvTranspose2d(2, 2, 3, stride=2, output_padding=2), "output_padding")
    _bad(lambda: PacPool2d(3, kernel_type="inv_1_-1", channel_wise=True), "out_channels")
    _bad(lambda: PacConv2d(0, 2, 3), "in_channels")
    # the transposed layer accepts padding beyond d(k-1)/2 (it only crops the output)
    PacConvTranspose2d(2, 2, 3, stride=2, padding=3)


@pytest.mark.usefixtures("no_compute")
def test_forward_errors():
    conv = PacConv2d(2, 3, 3, padding=1).double()
    x, g = rnd(2, 2, 5, 5), rnd(2, 4, 5, 5)
    _bad(lambda: conv(x[:, :1], g), "channels")
    _bad(lambda: conv(x, g[:1]), "input_for_kernel")
    _bad(lambda: conv(x, g[:, :, :4]), "input_for_kernel")
    _bad(lambda: conv(x, g[0]), "4-D")
    _bad(lambda: conv(x, None), "guide")
    _bad(lambda: conv(x.long(), g), "floating")
    _bad(lambda: conv(x, g.int()), "floating")
    _bad(lambda: conv(x, g.float()), "dtype")
    _bad(lambda: conv(x.float(), g.float()), "dtype")  # float64 weights
    _bad(lambda: conv(x, g, torch.ones(2, 1, 3, 3, 4, 5, dtype=D64)), "kernel")
    _bad(lambda: conv(x, g, torch.ones(2, 2, 3, 3, 5, 5, dtype=D64)), "kernel")
    _bad(lambda: conv(x, g, torch.ones(2, 1, 3, 3, 25, dtype=D64)), "6-D")
    _bad(lambda: conv(x, g, torch.ones(2, 1, 3, 3, 5, 5, dtype=D64), mask=torch.ones(2, 1, 5, 5)),
         "mask")
    _bad(lambda: conv(x, g, mask=torch.ones(2, 1, 4, 5, dtype=D64)), "mask")
    _bad(lambda: conv(x, g, mask=torch.ones(2, 2, 5, 5, dtype=D64)), "mask")
    _bad(lambda: conv(x, g, mask=torch.ones(2, 1, 5, 5, dtype=torch.int64)), "mask")
    _bad(lambda: conv(x, g, mask=torch.ones(2, 1, 5, 5, dtype=torch.float32)), "dtype")
    _bad(lambda: conv(x, g.to("meta")), "device")
    small = PacConv2d(2, 2, 5).double()
    _bad(lambda: small(rnd(1, 2, 3, 3), rnd(1, 1, 3, 3)), "empty")

    tconv = PacConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1).double()
    x = rnd(2, 2, 4, 4)
    _bad(lambda: tconv(x, rnd(2, 1, 4, 4)), "input_for_kernel")    # guide at input size
    _bad(lambda: tconv(x, rnd(2, 1, 8, 8), mask=torch.ones(2, 1, 8, 8, dtype=D64)), "mask")
    _bad(lambda: tconv(x, None, torch.ones(2, 1, 3, 3, 4, 4, dtype=D64)), "kernel")

    pool = PacPool2d(3, padding=1, channel_wise=True)
    _bad(lambda: pool(rnd(2, 3, 5, 5), rnd(2, 2, 5, 5)), "channel")
    _bad(lambda: pool(rnd(2, 3, 5, 5), None, torch.ones(2, 2, 3, 3, 5, 5, dtype=D64)), "kernel")
    _bad(lambda: PacPool2d(3, padding=1)(rnd(2, 3, 5, 5), None,
                                         torch.ones(2, 3, 3, 3, 5, 5, dtype=D64)), "kernel")
    _bad(lambda: PacPool2d(3, padding=1, out_channels=4)(rnd(2, 3, 5, 5), rnd(2, 3, 5, 5)),
         "out_channels")


@pytest.mark.usefixtures("no_compute")
def test_functional_errors():
    x, g = rnd(2, 2, 5, 5), rnd(2, 3, 5, 5)
    K = torch.ones(2, 1, 3, 3, 5, 5, dtype=D64)
    w = rnd(4, 2, 3, 3)
    _bad(lambda: packernel2d(g), "kernel_size")             # kernel_size=0 default
    _bad(lambda: packernel2d(g, kernel_size=2), "odd")
    _bad(lambda: packernel2d(g, kernel_size=3, kernel_type="inv_1_-1_foo"), "kernel_type")
    _bad(lambda: packernel2d(g, kernel_size=3, smooth_kernel_type="average_2"), "odd")
    _bad(lambda: packernel2d(g, kernel_size=3, smooth_kernel_type="full_3",
                             smooth_kernel=torch.ones(1, 1, 5, 5, dtype=D64)), "smooth_kernel")
    _bad(lambda: packernel2d(g, kernel_size=3, smooth_kernel=torch.ones(1, 1, 3, 3, dtype=D64)),
         "smooth_kernel")
    _bad(lambda: packernel2d(g, kernel_size=3, inv_alpha=1.0), "inv_alpha")
    _bad(lambda: packernel2d(g, kernel_size=3, kernel_type="inv_1_-1",
                             inv_alpha=torch.ones(2, dtype=D64)), "inv_alpha")
    _bad(lambda: packernel2d(g, kernel_size=3, kernel_type="inv_1_-1", channel_wise=True,
                             inv_alpha=torch.ones(2, dtype=D64)), "inv_alpha")
    _bad(lambda: packernel2d(g.long(), kernel_size=3), "floating")
    _bad(lambda: packernel2d(g, kernel_size=3, transposed=True, stride=3), "transposed")
    _bad(lambda: packernel2d(rnd(1, 1, 8, 8), kernel_size=3, stride=2, padding=1,
                             output_padding=2, transposed=True), "output_padding")
    _bad(lambda: packernel2d(g, kernel_size=7), "empty")
    _bad(lambda: pacconv2d(x, K, w, rnd(3)), "bias")
    _bad(lambda: pacconv2d(x, K, rnd(4, 3, 3, 3)), "input channels")
    _bad(lambda: pacconv2d(x, K, rnd(4, 2, 4, 4)), "odd")
    _bad(lambda: pacconv2d(x, K[:, :, :, :, :4], w), "kernel")
    _bad(lambda: pacconv2d(x, K, w, stride=2), "kernel")
    _bad(lambda: pacconv2d(x, K, w, padding=2), "kernel")
    _bad(lambda: pacconv2d(x, K.float(), w), "dtype")
    _bad(lambda: pacconv2d(x, K, w.to("meta")), "device")
    _bad(lambda: pacconv2d(x, K, w, shared_filters=True), "shared_filters")
    _bad(lambda: pacconv2d(x.int(), K, w), "floating")
    _bad(lambda: pacconv_transpose2d(x, K, rnd(2, 4, 3, 3)), "kernel")
    _bad(lambda: pacconv_transpose2d(x, K, rnd(4, 2, 3, 3), padding=1), "input channels")
    _bad(lambda: pacconv_transpose2d(x, K, rnd(2, 4, 3, 3), stride=2, output_padding=2),
         "output_padding")
    _bad(lambda: pacpool2d(x, K, 3), "kernel")
    _bad(lambda: pacpool2d(x, K, 4, padding=1), "odd")
    _bad(lambda: pacpool2d(x, torch.ones(2, 3, 3, 3, 5, 5, dtype=D64), 3, padding=1), "kernel")
    _bad(lambda: nd2col(x, 2.5), "kernel_size")


def test_nd2col():
    x = rnd(2, 3, 6, 7)
    cols = nd2col(x, 3, stride=2, padding=1, dilation=1)
    ref, _ = ref_taps(x, 3, 2, 1, 1)
    close(cols, ref)
    cols = nd2col(x, (3, 5), stride=2, padding=(1, 3), output_padding=1, dilation=(1, 2),
                  transposed=True)
    ref, _ = ref_taps(x, (3, 5), 2, (1, 3), (1, 2), transposed=True, op=1)
    close(cols, ref)
