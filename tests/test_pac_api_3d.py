"""The 3-D PAC Python API (PacConv3d, PacConvTranspose3d, PacPool3d, pacconv3d,
pacconv_transpose3d, pacpool3d, packernel3d): values against a direct N-D formula, the
equivalences with the 2-D layers and with torch's 3-D layers, output sizes, fillers,
gradients and argument validation.

The oracle below reads every tap of every output position by index arithmetic, for any
number of spatial axes, independent of pacnet.pac's unfolding and of the kernels (the 2-D
file's helpers, fixtures and tolerances are shared).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pacnet
from pacnet.errors import PacnetValueError
from pacnet.pac import (PacConv2d, PacConv3d, PacConvTranspose3d, PacPool2d, PacPool3d, nd2col,
                        packernel3d, pacconv3d, pacconv_transpose3d, pacpool3d)

from test_pac_api import (D64, _bad, _linear_upsample_matrix, _one_thread,  # noqa: F401
                          close, conv_size, gradcheck, no_compute, rnd, tconv_size)


def _t(v, r=3):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * r


# ----------------------------------------------------------------------------- N-D oracle

def _axis(n_in, k, s, p, d, n_out, transposed=False, shift=0):
    """Per tap t (rows) and output o (columns): the input index read and whether it is a
    real sample (transposed: of the zero-inserted, padded input)."""
    o, t = torch.arange(n_out), torch.arange(k)
    if transposed:
        j = o[None, :] + t[:, None] * d - ((k - 1) * d - p)
        valid = (j >= 0) & (j % s == 0) & (j // s < n_in)
        return (j // s).clamp(0, n_in - 1), valid
    idx = o[None, :] * s - p + t[:, None] * d + shift
    return idx.clamp(0, n_in - 1), (idx >= 0) & (idx < n_in)


def _gather(x, axes):
    """x [b, C, *sizes] at the taps of ``axes`` -> values, validity [b, C, *k, *out]."""
    r = len(axes)

    def place(t, i):
        shape = [1] * (2 * r)
        shape[i], shape[r + i] = t.shape
        return t.view(shape)

    vals = x[(slice(None), slice(None)) + tuple(place(ix, i) for i, (ix, _) in enumerate(axes))]
    valid = place(axes[0][1], 0)
    for i, (_, v) in enumerate(axes[1:], 1):
        valid = valid & place(v, i)
    valid = valid.to(x.dtype)[None, None]
    return vals * valid, valid


def ref_taps(x, k, s=1, p=0, d=1, transposed=False, op=0):
    r = x.dim() - 2
    k, s, p, d, op = (_t(v, r) for v in (k, s, p, d, op))
    size = tconv_size if transposed else conv_size
    axes = []
    for i, n in enumerate(x.shape[2:]):
        out = size(n, k[i], s[i], p[i], op[i], d[i]) if transposed else \
            size(n, k[i], s[i], p[i], d[i])
        axes.append(_axis(n, k[i], s[i], p[i], d[i], out, transposed))
    return _gather(x, axes)


def ref_kernel(guide, k, s=1, p=0, d=1, *, inv=None, asym=False, smooth=None,
               channel_wise=False, normalize=False, mask=None, transposed=False, op=0):
    """The spec's K (and output mask) written out directly; ``inv`` = (alpha, lambda)."""
    r = guide.dim() - 2
    k, s, p, d, op = (_t(v, r) for v in (k, s, p, d, op))
    sizes = guide.shape[2:]
    if transposed:
        low = [(n - op[i] - 1 - (k[i] - 1) * d[i] + 2 * p[i]) // s[i] + 1
               for i, n in enumerate(sizes)]
        ks, kp, out = (1,) * r, tuple((k[i] - 1) * d[i] // 2 for i in range(r)), sizes
    else:
        low = sizes
        ks, kp = s, p
        out = [conv_size(n, k[i], s[i], p[i], d[i]) for i, n in enumerate(sizes)]
    f_t, _ = _gather(guide, [_axis(n, k[i], ks[i], kp[i], d[i], out[i])
                             for i, n in enumerate(sizes)])
    if smooth is None:
        ctr = f_t[(slice(None), slice(None)) + tuple(kk // 2 for kk in k)]
    else:
        w = smooth.shape[0]
        vals, _ = _gather(guide, [_axis(n, w, ks[i], kp[i], d[i], out[i],
                                        shift=(k[i] // 2 - w // 2) * d[i])
                                  for i, n in enumerate(sizes)])
        ctr = (vals * smooth.reshape(1, 1, *smooth.shape, *(1,) * r)).sum(tuple(range(2, 2 + r)))
    diff = f_t - ctr[(slice(None), slice(None)) + (None,) * r]
    if asym:
        diff = diff.clamp(min=0)
    dist = diff ** 2
    if not channel_wise:
        dist = dist.sum(1, keepdim=True)
    if inv is None:
        K = torch.exp(-0.5 * dist)
    else:
        a, lm = (torch.as_tensor(v, dtype=guide.dtype) for v in inv)
        a, lm = (v.view(1, -1, *(1,) * (2 * r)) if v.dim() == 1 else v for v in (a, lm))
        K = a + (dist + 1e-4) ** (0.5 * lm)
    taps = tuple(range(2, 2 + r))
    _, valid = ref_taps(torch.ones(1, 1, *low, dtype=guide.dtype), k, s, p, d, transposed, op)
    out_mask = None
    if mask is not None:
        m_t = ref_taps(mask.to(guide.dtype), k, s, p, d, transposed, op)[0]
        K = K * m_t
        if normalize:
            div = K.sum(taps, keepdim=True)
        else:
            n_in = valid.sum(taps, keepdim=True)
            div = torch.where(n_in > 0, m_t.sum(taps, keepdim=True) / n_in.clamp(min=1), 0.0)
        K = torch.where(div != 0, K / torch.where(div != 0, div, 1.0), torch.zeros_like(K))
        out_mask = (div != 0).any(1, keepdim=True).to(guide.dtype)
    elif normalize:
        K = K * valid
        div = K.sum(taps, keepdim=True)
        K = K / torch.where(div != 0, div, 1.0)
    return K, out_mask


def ref_conv(x, K, weight, bias=None, s=1, p=0, d=1, shared=False, transposed=False, op=0):
    r = x.dim() - 2
    cols, _ = ref_taps(x, tuple(weight.shape[2:]), s, p, d, transposed, op)
    cols = (cols * K).flatten(2, 1 + r)
    if shared:
        out = torch.einsum("t,bct...->bc...", weight.flatten(), cols)
    else:
        w = weight.transpose(0, 1) if transposed else weight
        out = torch.einsum("oct,bct...->bo...", w.flatten(2), cols)
    return out if bias is None else out + bias.view(1, -1, *(1,) * r)


def test_oracle_matches_torch_convs():
    """The oracle's tap reader agrees with F.conv3d / F.conv_transpose3d (K == 1)."""
    x, w, wt = rnd(2, 3, 5, 6, 7), rnd(4, 3, 3, 1, 5), rnd(3, 4, 3, 3, 1)
    for s, p, d in [(1, 0, 1), ((2, 1, 3), (1, 0, 2), 1), (1, (2, 1, 1), (2, 1, 1))]:
        close(ref_conv(x, torch.ones(()), w, s=s, p=p, d=d),
              F.conv3d(x, w, stride=s, padding=p, dilation=d))
    for s, p, op, d in [(1, 0, 0, 1), ((1, 2, 2), 1, (0, 1, 1), 1), (2, (3, 1, 0), 1, (1, 2, 1))]:
        close(ref_conv(x, torch.ones(()), wt, s=s, p=p, d=d, transposed=True, op=op),
              F.conv_transpose3d(x, wt.flip(2, 3, 4), stride=s, padding=p, output_padding=op,
                                 dilation=d))


# ----------------------------------------------------------------------------- packernel3d

KERNEL_CASES = [
    # kernel_type, smoothing, k, s, p, d, channel_wise, normalize
    ("gaussian", "none", 3, 1, 1, 1, False, False),
    ("gaussian", "none", (3, 5, 3), (1, 2, 2), (1, 2, 0), (1, 1, 2), False, True),
    ("inv_1_-1", "none", 3, 2, 1, 1, True, False),
    ("inv_0.2_0.2_asym", "average_3", 3, 1, 1, 1, False, True),
    ("gaussian", "gaussian", 3, (1, 2, 1), 2, 2, False, False),
    ("gaussian", "full_3", (3, 1, 3), 1, (1, 0, 1), 1, True, False),
]


def _smoothing(name):
    """The 3-D smoothing kernel of a type, and what to pass as smooth_kernel."""
    if name == "none":
        return None, None
    if name == "gaussian":
        t = torch.tensor([0.25, 0.5, 0.25], dtype=D64)
        return t[:, None, None] * t[None, :, None] * t[None, None, :], None
    if name.startswith("average"):
        return torch.full((3, 3, 3), 1 / 27, dtype=D64), None
    sk = rnd(3, 3, 3, seed=5)  # full: a non-trivial learnable kernel
    return sk, sk.view(1, 1, 3, 3, 3)


@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: "-".join(map(str, c)))
def test_packernel3d_values(case):
    kernel_type, smoothing, k, s, p, d, cw, norm = case
    guide = rnd(2, 3, 5, 7, 6)
    smooth, sk = _smoothing(smoothing)
    inv = tuple(float(v) for v in kernel_type.split("_")[1:3]) if "inv" in kernel_type else None
    K, m = packernel3d(guide, kernel_size=k, stride=s, padding=p, dilation=d,
                       kernel_type=kernel_type, smooth_kernel_type=smoothing, smooth_kernel=sk,
                       channel_wise=cw, normalize_kernel=norm)
    ref, _ = ref_kernel(guide, k, s, p, d, inv=inv, asym="_asym" in kernel_type, smooth=smooth,
                        channel_wise=cw, normalize=norm)
    assert m is None and K.dim() == 8 and K.shape[1] == (3 if cw else 1)
    close(K, ref)


@pytest.mark.parametrize("normalize", [False, True])
def test_packernel3d_mask_and_inv_vectors(normalize):
    guide = rnd(2, 2, 4, 6, 5)
    mask = torch.rand(2, 1, 4, 6, 5, generator=torch.Generator().manual_seed(3)) > 0.6
    mask[1, :, :2] = False  # whole windows without a valid tap
    alpha, lam = torch.tensor([0.5, 2.0], dtype=D64), torch.tensor([-1.0, 0.5], dtype=D64)
    K, m = packernel3d(guide, mask, kernel_size=3, stride=(1, 2, 1), padding=1,
                       kernel_type="inv_1_-1", inv_alpha=alpha, inv_lambda=lam,
                       channel_wise=True, normalize_kernel=normalize)
    ref, ref_m = ref_kernel(guide, 3, (1, 2, 1), 1, inv=(alpha, lam), channel_wise=True,
                            normalize=normalize, mask=mask)
    close(K, ref)
    assert m.shape == (2, 1, 1, 1, 1) + K.shape[-3:] and (m == 0).any() and (m == 1).any()
    close(m, ref_m)


@pytest.mark.parametrize("cfg", [((3, 5, 5), (1, 2, 2), (1, 2, 2), (0, 1, 1), 1, True, False),
                                 (3, 2, 1, 1, 1, False, True),
                                 (3, (2, 1, 2), (3, 1, 1), 0, (1, 2, 1), True, True)])
def test_packernel3d_transposed(cfg):
    k, s, p, op, d, normalize, masked = cfg
    low = (3, 4, 3)
    out = tuple(tconv_size(n, *(_t(v)[i] for v in (k, s, p, op, d))) for i, n in enumerate(low))
    guide = rnd(1, 3, *out)
    mask = (torch.rand(1, 1, *low, generator=torch.Generator().manual_seed(1)) > 0.5
            if masked else None)
    K, m = packernel3d(guide, mask, kernel_size=k, stride=s, padding=p, output_padding=op,
                       dilation=d, normalize_kernel=normalize, transposed=True)
    ref, ref_m = ref_kernel(guide, k, s, p, d, normalize=normalize, mask=mask, transposed=True,
                            op=op)
    assert K.shape == (1, 1, *_t(k), *out)
    close(K, ref)
    if masked:
        close(m, ref_m)


# ----------------------------------------------------------------------------- modules: values

@pytest.mark.parametrize("cfg", [
    # k, s, p, d, kernel_type, smoothing, normalize, shared
    (3, 1, 1, 1, "gaussian", "none", False, False),
    ((3, 5, 3), (1, 2, 1), (1, 2, 0), (1, 1, 2), "inv_1_-1_asym", "none", True, False),
    (3, 2, 1, 1, "gaussian", "gaussian", False, True),
    (3, 1, 2, 2, "inv_-0.5_-2_fixed", "average_3", True, False),
])
def test_pacconv3d_module_values(cfg):
    k, s, p, d, kt, sm, norm, shared = cfg
    layer = PacConv3d(3, 3 if shared else 4, k, stride=s, padding=p, dilation=d, kernel_type=kt,
                      smooth_kernel_type=sm, normalize_kernel=norm,
                      shared_filters=shared).double()
    x, guide = rnd(2, 3, 5, 7, 6), rnd(2, 2, 5, 7, 6)
    inv = tuple(float(v) for v in kt.split("_")[1:3]) if "inv" in kt else None
    smooth = layer.smooth_kernel[0, 0] if layer.smooth_kernel is not None else None
    K, _ = ref_kernel(guide, k, s, p, d, inv=inv, asym="asym" in kt, smooth=smooth,
                      normalize=norm)
    want = ref_conv(x, K, layer.weight, layer.bias, s, p, d, shared)
    close(layer(x, guide), want)
    close(layer(x, None, K), want)  # a precomputed kernel
    close(pacconv3d(x, K, layer.weight, layer.bias, s, p, d, shared), want)


@pytest.mark.parametrize("cfg", [((3, 5, 5), (1, 2, 2), (1, 2, 2), (0, 1, 1), 1, False, False),
                                 (3, 2, 1, 1, 1, True, True),
                                 ((1, 3, 3), (1, 2, 2), (0, 1, 2), (0, 1, 0), (1, 1, 2), True,
                                  False)])
def test_pacconv_transpose3d_module_values(cfg):
    k, s, p, op, d, norm, shared = cfg
    layer = PacConvTranspose3d(3, 3 if shared else 2, k, stride=s, padding=p, output_padding=op,
                               dilation=d, normalize_kernel=norm, shared_filters=shared).double()
    x = rnd(2, 3, 2, 4, 3)
    out = tuple(tconv_size(n, *(_t(v)[i] for v in (k, s, p, op, d)))
                for i, n in enumerate(x.shape[2:]))
    guide = rnd(2, 2, *out)
    mask = torch.rand(2, 1, 2, 4, 3, generator=torch.Generator().manual_seed(4)) > 0.3
    for m in (None, mask):
        K, ref_m = ref_kernel(guide, k, s, p, d, normalize=norm, mask=m, transposed=True, op=op)
        want = ref_conv(x, K, layer.weight, layer.bias, s, p, d, shared, transposed=True, op=op)
        got = layer(x, guide, mask=m)
        if m is None:
            close(got, want)
        else:
            close(got[0], want)
            close(got[1], ref_m)
        close(pacconv_transpose3d(x, K, layer.weight, layer.bias, s, p, op, d, shared), want)


@pytest.mark.parametrize("cw, norm", [(False, False), (True, True)])
def test_pacpool3d_module_values(cw, norm):
    x, guide = rnd(2, 3, 5, 6, 4), rnd(2, 3, 5, 6, 4)
    pool = PacPool3d((3, 3, 1), stride=(2, 1, 1), padding=(1, 1, 0), channel_wise=cw,
                     normalize_kernel=norm, kernel_type="inv_1_-1", out_channels=3)
    K, _ = ref_kernel(guide, (3, 3, 1), (2, 1, 1), (1, 1, 0), inv=(1.0, -1.0), channel_wise=cw,
                      normalize=norm)
    cols, _ = ref_taps(x, (3, 3, 1), (2, 1, 1), (1, 1, 0))
    want = (cols * K).sum((2, 3, 4))
    close(pool.double()(x, guide), want)
    close(pacpool3d(x, K, (3, 3, 1), (2, 1, 1), (1, 1, 0)), want)


# ----------------------------------------------------------------------------- equivalences

@pytest.mark.parametrize("kt, norm, masked", [("gaussian", False, False), ("inv_1_-1", True, True),
                                              ("gaussian", True, False)])
def test_depth_one_volume_equals_2d(kt, norm, masked):
    """A depth-1 volume with depth padding: PacConv3d / PacPool3d give PacConv2d / PacPool2d
    with the centre depth slice of the weight (the taps above and below read zeros)."""
    x, guide = rnd(2, 3, 1, 7, 6), rnd(2, 2, 1, 7, 6)
    mask = (torch.rand(2, 1, 1, 7, 6, generator=torch.Generator().manual_seed(2)) > 0.4
            if masked else None)
    c3 = PacConv3d(3, 4, (3, 3, 5), stride=(1, 2, 1), padding=(1, 1, 2), kernel_type=kt,
                   normalize_kernel=norm).double()
    c2 = PacConv2d(3, 4, (3, 5), stride=(2, 1), padding=(1, 2), kernel_type=kt,
                   normalize_kernel=norm).double()
    with torch.no_grad():
        c2.weight.copy_(c3.weight[:, :, 1])
        c2.bias.copy_(c3.bias)
    m2 = mask[:, :, 0] if masked else None
    out3, out2 = c3(x, guide, mask=mask), c2(x[:, :, 0], guide[:, :, 0], mask=m2)
    if masked:
        close(out3[1][:, :, 0, 0, 0, 0], out2[1][:, :, 0, 0])
        out3, out2 = out3[0], out2[0]
    close(out3[:, :, 0], out2)
    p3 = PacPool3d(3, padding=1, kernel_type=kt, normalize_kernel=norm)
    p2 = PacPool2d(3, padding=1, kernel_type=kt, normalize_kernel=norm)
    close(p3.double()(x, guide)[:, :, 0], p2.double()(x[:, :, 0], guide[:, :, 0]))


@pytest.mark.parametrize("cfg", [((3, 4, 4), (1, 2, 2), 1, 0, 1), (3, 2, 1, 1, 1),
                                 ((3, 5, 5), (1, 2, 2), (1, 2, 2), (0, 1, 1), (2, 1, 1)),
                                 (3, 2, 3, 0, 1)])
def test_const_guide_transposed_equals_flipped_conv_transpose3d(cfg):
    k, s, p, op, d = cfg
    if any(kk % 2 == 0 for kk in _t(k)):
        with pytest.raises(PacnetValueError, match="odd"):
            PacConvTranspose3d(4, 3, k, stride=s, padding=p, output_padding=op, dilation=d)
        return
    layer = PacConvTranspose3d(4, 3, k, stride=s, padding=p, output_padding=op,
                               dilation=d).double()
    ref = nn.ConvTranspose3d(4, 3, k, stride=s, padding=p, output_padding=op,
                             dilation=d).double()
    x = rnd(2, 4, 3, 4, 3)
    with torch.no_grad():
        ref.weight.copy_(layer.weight.flip(2, 3, 4))
        ref.bias.copy_(layer.bias)
    want = ref(x)
    guide = torch.full((2, 3, *want.shape[2:]), 0.3, dtype=D64)  # K == 1 on real samples
    close(layer(x, guide), want)
    with torch.no_grad():  # unflipped it differs (the documented convention)
        ref.weight.copy_(layer.weight)
    assert (layer(x, guide) - ref(x)).abs().max() > 1e-3


@pytest.mark.parametrize("cfg", [(3, 1, 1, 1), ((3, 1, 5), (2, 1, 2), (1, 0, 2), 1),
                                 (3, 2, (2, 1, 1), (2, 1, 1))])
def test_const_kernel_equals_conv3d_and_avgpool3d(cfg):
    k, s, p, d = cfg
    layer = PacConv3d(3, 2, k, stride=s, padding=p, dilation=d).double()
    x, zeros = rnd(2, 3, 6, 5, 7), torch.zeros(2, 2, 6, 5, 7, dtype=D64)
    close(layer(x, zeros), F.conv3d(x, layer.weight, layer.bias, s, p, d))
    out = PacPool3d(k, stride=s, padding=p, dilation=d)(x, zeros)
    if d == 1:
        close(out, nn.AvgPool3d(k, s, p)(x) * math.prod(_t(k)))
        normed = PacPool3d(k, stride=s, padding=p, normalize_kernel=True)(x, zeros)
        close(normed, nn.AvgPool3d(k, s, p, count_include_pad=False)(x))
    else:
        ones = torch.ones(3, 1, *_t(k), dtype=D64)
        close(out, F.conv3d(x, ones, stride=s, padding=p, dilation=d, groups=3))


def test_output_sizes_match_torch():
    x = torch.zeros(1, 2, 4, 5, 6, dtype=D64)
    for k, s, p, d in itertools.product([1, 3], [1, 2, (1, 2, 3)], [0, 1, (1, 0, 1)],
                                        [1, (2, 1, 1)]):
        kk, pp, dd = _t(k), _t(p), _t(d)
        if any(2 * a > c * (b - 1) for a, b, c in zip(pp, kk, dd)):
            continue
        if min(conv_size(n, *(_t(v)[i] for v in (k, s, p, d)))
               for i, n in enumerate(x.shape[2:])) < 1:
            continue
        want = nn.Conv3d(2, 3, k, s, p, d)(x.float()).shape
        g = torch.zeros(1, 1, *x.shape[2:], dtype=D64)
        assert PacConv3d(2, 3, k, s, p, d).double()(x, g).shape == want
        assert PacPool3d(k, s, p, d)(x, g).shape[2:] == want[2:]
        if d == 1:
            assert PacPool3d(k, k, p)(x, g).shape == nn.AvgPool3d(k, padding=p)(x).shape
    for k, s, p, op in itertools.product([1, 3], [1, 2, (1, 2, 2)], [0, 1, 3], [0, 1]):
        if op >= max(_t(s)):
            continue
        ref = nn.ConvTranspose3d(2, 3, k, s, p, op if max(_t(s)) > 1 else 0)
        try:
            want = ref(x.float()).shape
        except RuntimeError:
            continue
        layer = PacConvTranspose3d(2, 3, k, s, p, ref.output_padding).double()
        assert layer(x, torch.zeros(1, 1, *want[2:], dtype=D64)).shape == want


# ----------------------------------------------------------------------------- fillers

def test_linear_filler_normalised_is_trilinear_in_space():
    """A clip upsampled 2x in H and W (stride (1, 2, 2)): with normalize_kernel and a
    constant guide the linear filler is linear upsampling of every frame in the interior;
    depth taps 1 (stride 1, kernel 1) keep frames apart."""
    layer = PacConvTranspose3d(2, 2, (1, 5, 5), stride=(1, 2, 2), padding=(0, 2, 2),
                               output_padding=(0, 1, 1), filler="linear",
                               normalize_kernel=True).double()
    prof = torch.tensor([0.0, 1, 3, 1, 0], dtype=D64)
    close(layer.weight[1, 1, 0], prof[:, None] * prof[None, :], 1e-7)
    assert layer.weight[0, 1].abs().sum() == 0
    T, H, W = 3, 5, 6
    x = rnd(1, 2, T, H, W)
    out = layer(x, torch.full((1, 3, T, 2 * H, 2 * W), 0.7, dtype=D64))
    Ah, Aw = _linear_upsample_matrix(H, 2), _linear_upsample_matrix(W, 2)
    ref = torch.einsum("yh,bcthw,xw->bctyx", Ah, x, Aw)
    close(out[..., 2:2 * H - 3, 2:2 * W - 3], ref[..., 2:2 * H - 3, 2:2 * W - 3], 1e-7)
    cube = PacConvTranspose3d(1, 1, 3, stride=2, filler="linear")
    p = torch.tensor([0.5, 1, 0.5], dtype=D64)
    close(cube.weight[0, 0].double(), p[:, None, None] * p[None, :, None] * p[None, None, :],
          1e-7)


def test_crf_and_pool_fillers_3d():
    layer = PacConv3d(2, 2, 3, padding=1, bias=False, filler="crf")
    r = torch.arange(3, dtype=D64) - 1
    g = torch.exp(-(r[:, None, None] ** 2 + r[None, :, None] ** 2 + r[None, None, :] ** 2)
                  / (2 * 0.75 ** 2))
    g = g / g.sum() * 27
    g[1, 1, 1] = 0
    close(layer.weight[0, 1].double(), g, 1e-6)
    assert layer.weight[1, 1].abs().sum() == 0
    pool = PacConv3d(2, 2, 3, padding=1, bias=False, shared_filters=True, filler="crf_pool")
    assert pool.weight.shape == (1, 1, 3, 3, 3) and pool.weight.sum() == 26
    sigma = 1 / math.sqrt(2 * 27)
    torch.manual_seed(0)
    assert PacConv3d(2, 4, 3).weight.abs().max() <= sigma
    full = PacConv3d(2, 2, 3, smooth_kernel_type="full_3")
    close(full.smooth_kernel.double(), torch.full((1, 1, 3, 3, 3), 1 / 27, dtype=D64), 1e-7)


# ----------------------------------------------------------------------------- gradients

def test_gradcheck_3d_layers():
    """Every input and learnable tensor of the 3-D layers: x, guide, weight, bias, inv_alpha,
    inv_lambda, a full smoothing kernel, a soft mask."""
    x, guide = rnd(1, 2, 3, 4, 3, requires_grad=True), rnd(1, 2, 3, 4, 3, requires_grad=True)
    w, b = rnd(2, 2, 3, 3, 1, requires_grad=True), rnd(2, requires_grad=True)
    a, lam = (torch.tensor(v, dtype=D64, requires_grad=True) for v in (1.0, -1.0))
    sk = (torch.full((1, 1, 3, 3, 3), 1 / 27, dtype=D64) + 0.01 * rnd(1, 1, 3, 3, 3, seed=2)
          ).requires_grad_()
    soft = (torch.rand(1, 1, 3, 4, 3, dtype=D64, generator=torch.Generator().manual_seed(0))
            + 0.1).requires_grad_()

    def conv(x, guide, w, b, a, lam, sk, soft):
        K, _ = packernel3d(guide, soft, kernel_size=(3, 3, 1), padding=(1, 1, 0),
                           kernel_type="inv_1_-1", inv_alpha=a, inv_lambda=lam,
                           smooth_kernel_type="full_3", smooth_kernel=sk, normalize_kernel=True)
        return pacconv3d(x, K, w, b, padding=(1, 1, 0))

    gradcheck(conv, (x, guide, w, b, a, lam, sk, soft))
    wt = rnd(2, 3, 1, 3, 3, requires_grad=True)
    big = rnd(1, 2, 3, 8, 6, requires_grad=True)

    def tconv(x, guide, wt):
        K, _ = packernel3d(guide, kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1),
                           output_padding=(0, 1, 1), transposed=True)
        return pacconv_transpose3d(x, K, wt, None, (1, 2, 2), (0, 1, 1), (0, 1, 1))

    gradcheck(tconv, (x, big, wt))

    def pool(x, guide):
        K, _ = packernel3d(guide, kernel_size=3, padding=2, dilation=2, channel_wise=True)
        return pacpool3d(x, K, 3, 1, 2, 2)

    gradcheck(pool, (x, guide))


def test_module_parameters_receive_gradients():
    layer = PacConvTranspose3d(2, 2, 3, stride=(1, 2, 2), padding=1, output_padding=(0, 1, 1),
                               kernel_type="inv_1_-1", smooth_kernel_type="full_3").double()
    x, guide = rnd(1, 2, 2, 3, 3), rnd(1, 2, 2, 6, 6)
    layer(x, guide).square().sum().backward()
    for n, prm in layer.named_parameters():
        assert prm.grad is not None and prm.grad.abs().sum() > 0, n


# ----------------------------------------------------------------------------- validation

@pytest.mark.usefixtures("no_compute")
def test_3d_errors():
    _bad(lambda: PacConv3d(2, 2, 4), "odd")
    _bad(lambda: PacConv3d(2, 2, (3, 3, 2)), "odd")
    _bad(lambda: PacConv3d(2, 2, (3, 3)), "an int or a triple")
    _bad(lambda: PacConv3d(2, 2, 3, padding=(1, 2, 1)), "padding")
    _bad(lambda: PacConv3d(2, 2, (3, 5, 5), filler="crf"), "cubic")
    _bad(lambda: PacConvTranspose3d(2, 2, 3, stride=(1, 3, 3), filler="linear"),
         "2\\*stride-1")
    _bad(lambda: PacConvTranspose3d(2, 2, 3, stride=2, output_padding=(0, 2, 0)),
         "output_padding")
    _bad(lambda: PacPool3d(3, kernel_type="inv_1_-1", channel_wise=True), "PacPool3d")
    conv = PacConv3d(2, 3, 3, padding=1).double()
    x, g = rnd(2, 2, 4, 5, 5), rnd(2, 1, 4, 5, 5)
    _bad(lambda: conv(x[:, :, 0], g),
         r"(?s)input_3d must be 5-D .*hint: a 4-D tensor is for the 2-D")
    _bad(lambda: conv(x, g[:, :, 0]), "input_for_kernel must be 5-D")
    _bad(lambda: conv(x, g[:, :, :3]), r"input_for_kernel must be \[2, Cg, 4, 5, 5\]")
    _bad(lambda: conv(x, None, torch.ones(2, 1, 3, 3, 5, 5, dtype=D64)), "kernel must be 8-D")
    _bad(lambda: conv(x, None, torch.ones(2, 1, 3, 3, 3, 4, 5, 4, dtype=D64)),
         r"kernel must be \[2, 1, 3, 3, 3, 4, 5, 5\]")
    _bad(lambda: conv(x, g, mask=torch.ones(2, 1, 4, 5, dtype=D64)), "mask must be 5-D")
    _bad(lambda: PacConv2d(2, 3, 3).double()(x, g), r"(?s)input_2d must be 4-D .*3-D API")
    _bad(lambda: PacConv3d(2, 2, 5).double()(rnd(1, 2, 3, 5, 5), rnd(1, 1, 3, 5, 5)), "empty")
    tconv = PacConvTranspose3d(2, 2, 3, stride=(1, 2, 2), padding=1, output_padding=(0, 1, 1))
    _bad(lambda: tconv.double()(x, rnd(2, 1, 4, 5, 5)), r"input_for_kernel must be \[2, Cg, 4, "
                                                        r"10, 10\]")
    K = torch.ones(2, 1, 3, 3, 3, 4, 5, 5, dtype=D64)
    w = rnd(3, 2, 3, 3, 3)
    _bad(lambda: packernel3d(g, kernel_size=(3, 2, 3)), "odd")
    _bad(lambda: packernel3d(g[:, :, 0], kernel_size=3), "input must be 5-D")
    _bad(lambda: packernel3d(g, kernel_size=3, smooth_kernel_type="full_3",
                             smooth_kernel=torch.ones(1, 1, 3, 3, dtype=D64)), "smooth_kernel")
    _bad(lambda: packernel3d(g, kernel_size=3, stride=(1, 3, 1), transposed=True), "transposed")
    _bad(lambda: pacconv3d(x, K, rnd(3, 2, 3, 3)), "weight must be 5-D")
    _bad(lambda: pacconv3d(x, K, w, stride=(1, 2, 1)), "kernel")
    _bad(lambda: pacconv3d(x, K[:, :, :, :, :, :3], w), "kernel")
    _bad(lambda: pacconv_transpose3d(x, K, rnd(2, 3, 3, 3, 3), output_padding=1, stride=1),
         "output_padding")
    _bad(lambda: pacpool3d(x, K, (3, 3)), "an int or a triple")
    _bad(lambda: nd2col(rnd(1, 1, 2, 3, 4, 5), 3), "4-D .* or 5-D")


def test_nd2col_volumes():
    x = rnd(1, 2, 4, 5, 6)
    close(nd2col(x, (3, 1, 3), stride=(1, 2, 1), padding=1), ref_taps(x, (3, 1, 3), (1, 2, 1),
                                                                       1)[0])
    close(nd2col(x, 3, stride=2, padding=(1, 0, 2), output_padding=1, transposed=True),
          ref_taps(x, 3, 2, (1, 0, 2), transposed=True, op=1)[0])


def test_exported_from_pacnet():
    for name in ("PacConv3d", "PacConvTranspose3d", "PacPool3d", "pacconv3d",
                 "pacconv_transpose3d", "pacpool3d", "packernel3d"):
        assert getattr(pacnet, name) is getattr(pacnet.pac, name)
