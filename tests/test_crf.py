"""The dense PAC-CRF (pacnet.crf): the fused path against an independent oracle written
from the spec (shared/specs/pac.md section 2) and against the ``reference=True`` unfold
path, in values and gradients; gradcheck; initialisation; PacCRFLoose; state_dict names of
the original; the shorthand parser; the feature helpers; argument errors.

The oracle below does its own index arithmetic (zero-padded shifts, explicit pooling cells,
the bilinear formula), independent of pacnet.crf's pooling/upsampling code and of the kernels.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call

from layer_helpers import single_thread  # noqa: F401  (module-scoped torch threads = 1)
from pacnet.crf import (COMPAT_TYPES, PacCRF, PacCRFLoose, create_position_feats, create_YXRGB,
                        parse_crf_name)
from pacnet.errors import PacnetValueError

D64 = torch.float64
N, C, H, W, FEAT = 2, 3, 9, 10, 4


@pytest.fixture(scope="module", autouse=True)
def numba_one_thread():
    """Tiny shapes: parallel kernel launches only cost thread wake-ups (restored after)."""
    import numba

    before = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(before)


def rand(*shape, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=D64) * scale


# ----------------------------------------------------------------------------- oracle

def o_shift(x, dy, dx):
    """out[..., y, x] = x[..., y + dy, x + dx], 0 outside the image."""
    h, w = x.shape[-2:]
    out = torch.zeros_like(x)
    ys, ye = max(0, -dy), min(h, h - dy)
    xs, xe = max(0, -dx), min(w, w - dx)
    if ys < ye and xs < xe:
        out[..., ys:ye, xs:xe] = x[..., ys + dy:ye + dy, xs + dx:xe + dx]
    return out


def o_pad(n, b):
    return ((b - n % b) % b + 1) // 2


def o_pool(x, b):
    """Average over the in-image pixels of each b x b cell, cells starting at -pad."""
    h, w = x.shape[-2:]
    ph, pw = o_pad(h, b), o_pad(w, b)
    hb, wb = (h + 2 * ph - b) // b + 1, (w + 2 * pw - b) // b + 1
    out = x.new_zeros(x.shape[:2] + (hb, wb))
    for i in range(hb):
        rows = [y for y in range(i * b - ph, i * b - ph + b) if 0 <= y < h]
        for j in range(wb):
            cols = [c for c in range(j * b - pw, j * b - pw + b) if 0 <= c < w]
            out[:, :, i, j] = x[:, :, rows][:, :, :, cols].mean(dim=(2, 3))
    return out


def o_bilinear_rows(n_out, n_in, b, offset):
    """(i0, i1, lambda) of output rows offset..offset+n_out of an x b bilinear upsampling
    (align_corners=False, source clamped at 0 and at the last row)."""
    taps = []
    for y in range(offset, offset + n_out):
        src = max((y + 0.5) / b - 0.5, 0.0)
        i0 = min(int(math.floor(src)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        taps.append((i0, i1, src - i0))
    return taps


def o_unblur(m, b, h, w):
    hb, wb = m.shape[-2:]
    out = m.new_zeros(m.shape[:2] + (h, w))
    rows = o_bilinear_rows(h, hb, b, o_pad(h, b))
    cols = o_bilinear_rows(w, wb, b, o_pad(w, b))
    for y, (r0, r1, ly) in enumerate(rows):
        for x, (c0, c1, lx) in enumerate(cols):
            out[:, :, y, x] = ((1 - ly) * ((1 - lx) * m[:, :, r0, c0] + lx * m[:, :, r0, c1])
                               + ly * ((1 - lx) * m[:, :, r1, c0] + lx * m[:, :, r1, c1]))
    return out


def o_offsets(k, d):
    return [((ty - k // 2) * d, (tx - k // 2) * d) for ty in range(k) for tx in range(k)]


def o_kernel(f, k, d):
    """K[n, t, y, x] = exp(-1/2 sum_c (f(pos_t) - f(centre))^2), f = 0 outside."""
    return torch.stack([torch.exp(-0.5 * ((o_shift(f, dy, dx) - f) ** 2).sum(1))
                        for dy, dx in o_offsets(k, d)], dim=1)


def o_message(q, K, weight, k, d, shared):
    """msg[o] = sum_t sum_c weight[o, c, t] K[t] q[c, pos_t] (shared: depthwise)."""
    msg = torch.zeros_like(q) if shared else q.new_zeros(q.shape[0], weight.shape[0],
                                                         *q.shape[2:])
    for t, (dy, dx) in enumerate(o_offsets(k, d)):
        qs = o_shift(q, dy, dx)
        if K is not None:
            qs = qs * K[:, t:t + 1]
        wt = weight.reshape(weight.shape[0], weight.shape[1], k * k)[:, :, t]
        msg = msg + (wt[0, 0] * qs if shared else torch.einsum("oc,ncyx->noyx", wt, qs))
    return msg


def oracle(crf, unary, feats, logQ=None, final=None):
    """The spec's mean field, written out, reading only crf's kernel arguments and tensors."""
    h, w = unary.shape[-2:]
    n_k = len(crf.kernel_args)
    feats = feats if isinstance(feats, (list, tuple)) else [feats] * n_k
    kernels = []
    for i, a in enumerate(crf.kernel_args):
        if a["compat_type"] == "na":
            kernels.append(None)
            continue
        f = feats[i] if a["blur"] == 1 else o_pool(feats[i], a["blur"])
        kernels.append(o_kernel(f, a["kernel_size"], a["dilation"]))
    uw = crf.unary_weight
    logQ = unary if logQ is None else logQ
    for _ in range(crf.num_steps):
        q = torch.softmax(logQ, 1)
        new = unary * uw
        for i, a in enumerate(crf.kernel_args):
            b, k, d, ct = a["blur"], a["kernel_size"], a["dilation"], a["compat_type"]
            qb = q if b == 1 else o_pool(q, b)
            weight = crf.messengers[i].weight
            msg = o_message(qb, kernels[i], weight, k, d, shared=weight.shape[0] == 1)
            if ct == "2d":
                msg = torch.einsum("oc,ncyx->noyx", crf.compat[i].weight[:, :, 0, 0], msg)
            if b > 1:
                msg = o_unblur(msg, b, h, w)
            pw = -a["pairwise_weight"] if ct == "potts" else a["pairwise_weight"]
            new = new - pw * msg
        logQ = new
    final = final or crf.final_output
    return {"log_Q": logQ, "softmax": torch.softmax(logQ, 1),
            "log_softmax": torch.log_softmax(logQ, 1)}[final]


# ----------------------------------------------------------------------------- helpers

def make_crf(kernels, steps=2, final_output="log_Q", seed=0, noise=0.1, **kw):
    """A float64 CRF with every learnable tensor moved off its init (so all of it matters)."""
    torch.manual_seed(seed)
    crf = PacCRF(C, steps, final_output=final_output, pairwise_kernels=kernels, **kw).to(D64)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in crf.named_parameters():
            if not name.startswith("pairwise_weights"):
                p.add_(torch.randn(p.shape, generator=gen, dtype=D64) * noise)
    return crf


def inputs(seed=0, n=N, h=H, w=W):
    unary = rand(n, C, h, w, seed=seed, scale=2.0)
    feat = rand(n, FEAT, h, w, seed=seed + 7)
    return unary, feat


def K1(**kw):
    return dict(kernel_size=3, dilation=1, blur=1, compat_type="4d", spatial_filter=True,
                pairwise_weight=1.0) | kw


# One kernel of every compat type, with odd/even sizes, dilations 1/2, blur 1/2.
SINGLE = [
    K1(),
    K1(kernel_size=5, dilation=2),
    K1(blur=2, pairwise_weight=0.5),
    K1(compat_type="2d", dilation=2),
    K1(compat_type="2d", kernel_size=5, blur=2, spatial_filter=False),
    K1(compat_type="potts", pairwise_weight=1.5),
    K1(compat_type="potts", kernel_size=5, dilation=2, blur=2, spatial_filter=False),
    K1(compat_type="na", dilation=2),
    K1(compat_type="na", blur=2),
    K1(compat_type="none", kernel_size=5),
    K1(compat_type="none", blur=2, spatial_filter=False, pairwise_weight=0.75),
]
ALL = [K1(kernel_size=5, dilation=2), K1(compat_type="2d", blur=2),
       K1(compat_type="potts", spatial_filter=False, blur=2),
       K1(compat_type="na"), K1(compat_type="none", dilation=2)]


def _ids(kernels):
    return "-".join(f"{k['compat_type']}{'s' if k['spatial_filter'] else ''}_{k['kernel_size']}_"
                    f"{k['dilation']}_{k['blur']}" for k in kernels)


def grads(crf, unary, feat, reference, weight):
    unary = unary.clone().requires_grad_()
    feat = feat.clone().requires_grad_()
    crf.zero_grad(set_to_none=True)
    out = crf(unary, feat, reference=reference)
    (out * weight).sum().backward()
    g = {"unary": unary.grad, "feat": feat.grad}
    g.update({n: p.grad for n, p in crf.named_parameters()})
    return out.detach(), g


# ----------------------------------------------------------------------------- values

@pytest.mark.parametrize("kernel", SINGLE, ids=[_ids([k]) for k in SINGLE])
def test_fused_matches_oracle_every_compat_type(kernel):
    crf = make_crf([kernel], final_output="log_softmax")
    unary, feat = inputs()
    with torch.no_grad():
        got = crf(unary, feat)
        want = oracle(crf, unary, feat)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("final_output", ["log_Q", "softmax", "log_softmax"])
def test_all_kernels_together_match_oracle(final_output):
    crf = make_crf(ALL, steps=3, final_output=final_output)
    unary, feat = inputs(seed=3)
    with torch.no_grad():
        got = crf(unary, feat)
        ref = crf(unary, feat, reference=True)
        want = oracle(crf, unary, feat)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ref, want, rtol=1e-10, atol=1e-10)
    if final_output == "softmax":
        torch.testing.assert_close(got.sum(1), torch.ones(N, H, W, dtype=D64))


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "autograd"])
def test_float64_is_exact_with_weights_float32_cannot_hold(grad):
    """0.7 and 0.3 are not float32 numbers: a float64 CRF must use them exactly, as the
    original does with its Python floats (its float32 0.7 is 0.699999988)."""
    kernels = [K1(pairwise_weight=0.7), K1(compat_type="2d", pairwise_weight=0.3),
               K1(compat_type="none", kernel_size=5, pairwise_weight=0.7),
               K1(compat_type="potts", blur=2, pairwise_weight=0.3)]
    crf = make_crf(kernels, steps=2)
    unary, feat = inputs(seed=5)
    with torch.set_grad_enabled(grad):
        got = crf(unary, feat)
        want = oracle(crf, unary, feat)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_zero_dim_tensor_weights_are_accepted_as_the_original_does():
    t = lambda v: torch.tensor(v, dtype=D64)  # noqa: E731
    kernels = [K1(pairwise_weight=0.7), K1(compat_type="potts", spatial_filter=False,
                                           pairwise_weight=0.3)]
    floats = make_crf(kernels, unary_weight=0.5)
    tensors = make_crf([dict(k, pairwise_weight=t(k["pairwise_weight"])) for k in kernels],
                       unary_weight=t(0.5))
    assert tensors.kernel_args == floats.kernel_args
    for key, value in floats.state_dict().items():
        assert torch.equal(tensors.state_dict()[key], value), key
    unary, feat = inputs()
    with torch.no_grad():
        torch.testing.assert_close(tensors(unary, feat), floats(unary, feat), rtol=0, atol=0)
    fixed = PacCRF(C, 1, fixed_weighting=True, unary_weight=t(0.7), pairwise_kernels=[K1()])
    assert fixed.unary_weight == 0.7
    for bad in (torch.ones(2), torch.tensor(float("nan")), torch.tensor(True)):
        with pytest.raises(PacnetValueError, match="unary_weight must be a finite number"):
            PacCRF(C, 1, unary_weight=bad)


def test_per_kernel_features_and_given_logQ():
    crf = make_crf(ALL, steps=2)
    unary, _ = inputs()
    feats = [rand(N, 2 + i, H, W, seed=20 + i) for i in range(len(ALL))]
    feats[3] = None  # the 'na' kernel ignores its features
    logQ0 = rand(N, C, H, W, seed=5)
    with torch.no_grad():
        got = crf(unary, feats, logQ=logQ0)
        ref = crf(unary, feats, logQ=logQ0, reference=True)
        want = oracle(crf, unary, [f if f is not None else unary for f in feats], logQ=logQ0)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ref, want, rtol=1e-10, atol=1e-10)


def test_given_edge_kernels_equal_computed_ones():
    crf = make_crf(ALL, steps=2)
    unary, feat = inputs()
    with torch.no_grad():
        kernels = crf.compute_edge_kernels(feat)
        ref_kernels = crf.compute_edge_kernels(feat, reference=True)
        for i, (a, b) in enumerate(zip(kernels, ref_kernels)):
            assert (a is None) == (b is None) == (ALL[i]["compat_type"] == "na")
            if a is not None:
                hb = (H + 2 * o_pad(H, ALL[i]["blur"]) - ALL[i]["blur"]) // ALL[i]["blur"] + 1
                assert a.shape[-2] == hb and a.shape[1] == 1
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(crf(unary, None, edge_kernel=kernels), crf(unary, feat))
    # one tensor reused by every kernel (all of the same size and blur)
    crf2 = make_crf([K1(), K1(compat_type="2d")], steps=1)
    with torch.no_grad():
        (K,) = crf2.compute_edge_kernels(feat)[:1]
        torch.testing.assert_close(crf2(unary, None, edge_kernel=K), crf2(unary, feat))


def test_inference_reuses_only_its_own_buffers():
    """Without autograd the loop refills its logQ buffer; the caller's tensors stay intact
    and the result equals the autograd-mode one (to rounding: 4d messages are accumulated
    into logQ by the GEMM there)."""
    for steps in (1, 3):
        crf = make_crf(ALL, steps=steps)
        unary, feat = inputs()
        logQ0 = rand(N, C, H, W, seed=5)
        u0, l0 = unary.clone(), logQ0.clone()
        for kw in ({}, {"logQ": logQ0}):
            with torch.no_grad():
                a = crf(unary, feat, **kw)
            b = crf(unary, feat, **kw)
            assert torch.equal(unary, u0) and torch.equal(logQ0, l0)
            assert a.data_ptr() not in (unary.data_ptr(), logQ0.data_ptr())
            torch.testing.assert_close(a, b.detach(), rtol=1e-12, atol=1e-12)


def test_inference_adds_plain_pac_messages_in_place(monkeypatch):
    """Without autograd, 4d kernels at blur 1 never build a message tensor (pac_conv2d_add_
    accumulates into logQ); kernels with a compat conv or blur still do."""
    crf = make_crf([K1(kernel_size=5, dilation=2), K1(blur=2), K1(compat_type="2d")], steps=2)
    unary, feat = inputs()
    want = crf(unary, feat).detach()
    built = []
    message = PacCRF._message
    monkeypatch.setattr(PacCRF, "_message",
                        lambda self, i, *a: built.append(i) or message(self, i, *a))
    with torch.no_grad():
        got = crf(unary, feat)
    assert built == [1, 2, 1, 2]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_first_step_uses_the_unweighted_unary():
    # quirk: Q_1 = softmax(unary), so out - w * unary does not depend on w after one step
    unary, feat = inputs()
    outs = []
    for w in (1.0, 0.25, 3.0):
        crf = make_crf([K1(kernel_size=5)], steps=1, unary_weight=w, noise=0.0)
        with torch.no_grad():
            outs.append(crf(unary, feat) - w * unary)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-12)
    torch.testing.assert_close(outs[0], outs[2], rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("kernel", SINGLE + [None],
                         ids=[_ids([k]) for k in SINGLE] + ["all"])
def test_gradients_fused_match_reference(kernel):
    kernels = ALL if kernel is None else [kernel]
    crf = make_crf(kernels, steps=2, final_output="log_softmax")
    unary, feat = inputs(seed=1)
    weight = rand(N, C, H, W, seed=9)
    out_f, g_f = grads(crf, unary, feat, False, weight)
    out_r, g_r = grads(crf, unary, feat, True, weight)
    torch.testing.assert_close(out_f, out_r, rtol=1e-10, atol=1e-10)
    assert g_f.keys() == g_r.keys()
    for name in g_f:
        if g_r[name] is None:
            assert g_f[name] is None, name
            continue
        torch.testing.assert_close(g_f[name], g_r[name], rtol=1e-9, atol=1e-10, msg=name)
    # gradients reach the unary, the features (unless only 'na'), every filter and compat
    assert g_f["unary"].abs().sum() > 0
    if any(k["compat_type"] != "na" for k in kernels):
        assert g_f["feat"].abs().sum() > 0
    for name, p in crf.named_parameters():
        if name.startswith("messengers") or name.startswith("compat") or name == "unary_weight":
            assert g_f[name] is not None and g_f[name].abs().sum() > 0, name


def test_pairwise_weights_learn_only_for_potts_box_filters():
    kernels = [K1(), K1(compat_type="2d"), K1(compat_type="potts"),
               K1(compat_type="potts", spatial_filter=False), K1(compat_type="none",
                                                                 spatial_filter=False)]
    crf = make_crf(kernels, steps=2)
    unary, feat = inputs()
    _, g = grads(crf, unary, feat, False, rand(N, C, H, W, seed=2))
    learned = [i for i in range(len(kernels)) if g[f"pairwise_weights.{i}"] is not None]
    assert learned == [3]
    assert g["pairwise_weights.3"].abs() > 0
    # with fixed_weighting nothing is learned, and unary_weight is a float
    fixed = make_crf(kernels, steps=2, fixed_weighting=True, unary_weight=0.8)
    assert fixed.unary_weight == 0.8 and "unary_weight" not in fixed.state_dict()
    _, g = grads(fixed, unary, feat, False, rand(N, C, H, W, seed=2))
    assert all(g[f"pairwise_weights.{i}"] is None for i in range(len(kernels)))
    # the stored (negated) value is the one used
    assert crf.pairwise_weights[2].item() == -1.0


def test_gradcheck_tiny_all_paths():
    torch.manual_seed(0)
    kernels = [K1(), K1(compat_type="2d", blur=2), K1(compat_type="potts", spatial_filter=False),
               K1(compat_type="na", dilation=2)]
    crf = make_crf(kernels, steps=2, final_output="log_softmax")
    unary = rand(1, C, 5, 6, seed=11, scale=2.0).requires_grad_()
    feat = rand(1, 2, 5, 6, seed=12).requires_grad_()
    names = [n for n, p in crf.named_parameters()
             if n == "unary_weight" or n.startswith(("messengers", "compat")) or n ==
             "pairwise_weights.2"]
    params = [crf.get_parameter(n).detach().clone().requires_grad_() for n in names]

    def fn(u, f, *ps):
        return functional_call(crf, dict(zip(names, ps)), (u, f))

    # every input element against the unary and the features; random projections (fast
    # mode) for the ~200 parameters as well
    assert torch.autograd.gradcheck(lambda u, f: fn(u, f, *params), (unary, feat), eps=1e-6,
                                    atol=1e-7, rtol=1e-5)
    assert torch.autograd.gradcheck(fn, (unary, feat, *params), eps=1e-6, atol=1e-7, rtol=1e-5,
                                    fast_mode=True)


def test_fused_path_saves_no_unfolded_tensors():
    """Nothing of N*C*k*k*H*W elements is kept for backward (the reference keeps several)."""
    k = 5
    crf = make_crf([K1(kernel_size=k), K1(compat_type="2d", kernel_size=k)], steps=2)
    unary, feat = inputs()
    unary.requires_grad_()
    limit = N * C * k * k * H * W

    def biggest(reference):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t,
                                                      lambda t: t):
            crf(unary, feat, reference=reference)
        return max(sizes)

    assert biggest(True) >= limit
    assert biggest(False) < limit


# ----------------------------------------------------------------------------- init and state

def test_perturbed_init_is_reproducible_under_a_seed():
    kw = dict(pairwise_kernels=ALL)
    torch.manual_seed(123)
    a = PacCRF(C, 3, **kw).state_dict()
    torch.manual_seed(123)
    b = PacCRF(C, 3, **kw).state_dict()
    torch.manual_seed(124)
    c = PacCRF(C, 3, **kw).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["messengers.0.weight"], c["messengers.0.weight"])
    assert not torch.equal(a["compat.1.weight"], c["compat.1.weight"])


def _gauss(k):
    r = torch.arange(k, dtype=D64) - (k - 1) / 2
    g = torch.exp(-(r[:, None] ** 2 + r[None] ** 2) / (2 * (k / 4) ** 2))
    g = g / g.sum() * k * k
    g[k // 2, k // 2] = 0
    return g


def test_initial_values():
    crf = PacCRF(C, 1, perturbed_init=False, unary_weight=0.7, pairwise_kernels=[
        K1(kernel_size=5), K1(compat_type="2d"), K1(compat_type="potts", spatial_filter=False,
                                                     pairwise_weight=2.0),
        K1(compat_type="none")]).to(D64)
    sd = crf.state_dict()
    eye = torch.eye(C, dtype=D64)
    torch.testing.assert_close(sd["messengers.0.weight"],
                               (1 - eye)[:, :, None, None] * _gauss(5), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(sd["messengers.1.weight"][0, 0], _gauss(3), rtol=1e-6, atol=1e-7)
    box = torch.ones(3, 3, dtype=D64)
    box[1, 1] = 0
    assert torch.equal(sd["messengers.2.weight"], box[None, None])
    assert "messengers.2.weight" in dict(crf.named_buffers())  # fixed box filter
    assert torch.equal(sd["compat.1.weight"], (1 - eye)[:, :, None, None])
    assert [float(sd[f"pairwise_weights.{i}"]) for i in range(4)] == [1.0, 1.0, -2.0, 1.0]
    assert float(sd["unary_weight"]) == pytest.approx(0.7)
    # perturbed: within 5e-4 of those values, and not equal to them
    torch.manual_seed(0)
    pert = PacCRF(C, 1, pairwise_kernels=[K1(kernel_size=5), K1(compat_type="2d")]).to(D64)
    for key in ("messengers.0.weight", "compat.1.weight"):
        diff = pert.state_dict()[key] - sd[key]
        assert 0 < diff.abs().max() <= 5e-4 + 1e-7, key
    # reset_parameters() restores the inits (and unary_weight)
    with torch.no_grad():
        crf.unary_weight.fill_(3.0)
        crf.compat[1].weight.zero_()
    crf.reset_parameters()
    assert crf.unary_weight.item() == pytest.approx(0.7)
    assert torch.equal(crf.compat[1].weight, (1 - eye)[:, :, None, None])


# The keys of the original's state_dict for these kernels (derived from the spec: a
# ModuleList of messengers, a ModuleList of compat layers holding None except for '2d',
# a ParameterList of pairwise weights, unary_weight, and for the loose CRF steps.<j>.).
ORIGINAL_KEYS = [
    "unary_weight",
    "messengers.0.weight",   # 4d       [C, C, 5, 5]
    "messengers.1.weight",   # 2d       [1, 1, 3, 3]
    "messengers.2.weight",   # potts    [1, 1, 3, 3] box buffer (spatial_filter=False)
    "messengers.3.weight",   # na       [C, C, 3, 3]
    "messengers.4.weight",   # fall-through [1, 1, 5, 5]
    "compat.1.weight",       # [C, C, 1, 1]
    "pairwise_weights.0", "pairwise_weights.1", "pairwise_weights.2", "pairwise_weights.3",
    "pairwise_weights.4",
]
ORIGINAL_SHAPES = {"unary_weight": (), "messengers.0.weight": (C, C, 5, 5),
                   "messengers.1.weight": (1, 1, 3, 3), "messengers.2.weight": (1, 1, 3, 3),
                   "messengers.3.weight": (C, C, 3, 3), "messengers.4.weight": (1, 1, 5, 5),
                   "compat.1.weight": (C, C, 1, 1), **{f"pairwise_weights.{i}": () for i in range(5)}}
KEY_KERNELS = [K1(kernel_size=5, dilation=4), K1(compat_type="2d"),
               K1(compat_type="potts", spatial_filter=False), K1(compat_type="na"),
               K1(compat_type="none", kernel_size=5)]


def test_state_dict_has_the_original_names_and_loads_strictly():
    crf = PacCRF(C, 2, pairwise_kernels=KEY_KERNELS)
    sd = crf.state_dict()
    assert sorted(sd) == sorted(ORIGINAL_KEYS)
    assert {k: tuple(v.shape) for k, v in sd.items()} == ORIGINAL_SHAPES
    # a state dict written with those names (e.g. by the original) loads strictly
    foreign = {k: torch.randn(s) if k != "messengers.2.weight" else sd[k].clone()
               for k, s in ORIGINAL_SHAPES.items()}
    other = PacCRF(C, 2, pairwise_kernels=KEY_KERNELS)
    other.load_state_dict(foreign, strict=True)
    assert all(torch.equal(other.state_dict()[k], foreign[k]) for k in foreign)
    # round trip: same outputs
    crf.to(D64)
    clone = PacCRF(C, 2, pairwise_kernels=KEY_KERNELS).to(D64)
    clone.load_state_dict(crf.state_dict(), strict=True)
    unary, feat = inputs()
    with torch.no_grad():
        torch.testing.assert_close(clone(unary, feat), crf(unary, feat), rtol=0, atol=0)
    loose = PacCRFLoose(C, 2, pairwise_kernels=KEY_KERNELS)
    assert sorted(loose.state_dict()) == sorted(f"steps.{j}.{k}" for j in range(2)
                                                for k in ORIGINAL_KEYS)


# ----------------------------------------------------------------------------- PacCRFLoose

def test_loose_with_tied_weights_equals_paccrf_and_chains_its_steps():
    tied = make_crf(ALL, steps=3, final_output="softmax")
    loose = PacCRFLoose(C, 3, final_output="softmax", pairwise_kernels=ALL).to(D64)
    assert len(loose.steps) == 3 and all(s.num_steps == 1 and s.final_output == "log_Q"
                                         for s in loose.steps)
    for step in loose.steps:
        step.load_state_dict(tied.state_dict(), strict=True)
    unary, feat = inputs(seed=4)
    with torch.no_grad():
        torch.testing.assert_close(loose(unary, feat), tied(unary, feat), rtol=1e-12,
                                   atol=1e-12)
        torch.testing.assert_close(loose(unary, feat, reference=True), tied(unary, feat))
    # untied: each step uses its own parameters, logQ is passed on, kernels computed once
    torch.manual_seed(1)
    loose = PacCRFLoose(C, 2, final_output="log_softmax", pairwise_kernels=ALL).to(D64)
    assert not torch.equal(loose.steps[0].messengers[0].weight, loose.steps[1].messengers[0].weight)
    with torch.no_grad():
        K = loose.compute_edge_kernels(feat)
        l1 = loose.steps[0](unary, None, K)
        l2 = loose.steps[1](unary, None, K, l1)
        torch.testing.assert_close(loose(unary, feat), torch.log_softmax(l2, 1))
        torch.testing.assert_close(l1, oracle(loose.steps[0], unary, feat), rtol=1e-10,
                                   atol=1e-10)
        torch.testing.assert_close(l2, oracle(loose.steps[1], unary, feat, logQ=l1), rtol=1e-10,
                                   atol=1e-10)
    # add_pairwise_kernel adds to every step
    loose.add_pairwise_kernel(kernel_size=3, compat_type="potts")
    assert all(s.num_kernels == len(ALL) + 1 for s in loose.steps)
    # gradients reach every step's parameters
    loose.zero_grad()
    u = unary.clone().requires_grad_()
    loose.to(D64)(u, feat).sum().backward()
    for j in range(2):
        assert loose.steps[j].messengers[0].weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- shorthand

@pytest.mark.parametrize("name, loose, steps, kernels", [
    ("crfi5p4d5641p4d5161", False, 5,
     [(5, 64, 1, "4d", False), (5, 16, 1, "4d", False)]),
    ("crfi5p4d5321", False, 5, [(5, 32, 1, "4d", False)]),
    ("crf", False, 5, [(5, 16, 1, "4d", False)]),
    ("crfl", True, 5, [(5, 16, 1, "4d", False)]),
    ("crfi3lp0ds5161p2d31124", True, 3, [(5, 16, 1, "potts", True), (3, 112, 4, "2d", False)]),
    ("crfv7i10p2ds713p0d914pna312", False, 10,
     [(7, 1, 3, "2d", True), (9, 1, 4, "potts", False), (3, 1, 2, "na", False)]),
    ("crfi1", False, 1, [(5, 16, 1, "4d", False)]),
])
def test_parse_crf_name(name, loose, steps, kernels):
    got = parse_crf_name(name)
    assert got[0] is loose and got[1] == steps
    assert [(k["kernel_size"], k["dilation"], k["blur"], k["compat_type"], k["spatial_filter"])
            for k in got[2]] == kernels
    assert all(k["pairwise_weight"] == 1.0 for k in got[2])
    crf = (PacCRFLoose if loose else PacCRF)(C, steps, pairwise_kernels=got[2])
    assert crf.num_kernels == len(kernels)


@pytest.mark.parametrize("name, part", [
    ("", "non-empty"),
    ("fcn8s_crfi5p4d5161", "'crfi5p4d5161'"),
    ("convcrf", "ConvCRF"),
    ("crx5p4d5161", "'crx5'"),
    ("crfi5xp4d5161", "'crfi5x'"),
    ("crfip4d5161", "'crfi'"),
    ("crfi0p4d5161", "0 steps"),
    ("crfli5p4d5161", "'crfli5'"),
    ("crfi5p4d5161p", "empty edge token 1"),
    ("crfi5pp4d5161", "empty edge token 0"),
    ("crfi5p4d51", "'4d51'"),
    ("crfi5p4d5x61", "'5x61'"),
    ("crfi5p4d4161", "kernel size 4 must be odd"),
    ("crfi5p4d5160", r"blur \(0\)"),
    ("crfi5p4d5001", r"dilation \(0\)"),
    ("crfi5p3d5161", "unknown pairwise type '3d'"),
    ("crfi5p4d5161p1ds5161", "edge token 1"),
])
def test_malformed_shorthand_names_the_offending_part(name, part):
    with pytest.raises(PacnetValueError, match=part):
        parse_crf_name(name)


def test_pairwise_repr_reads_like_the_shorthand():
    _, _, kernels = parse_crf_name("crfi5p4d5641p0ds5161p2d3124")
    assert PacCRF(C, 1, pairwise_kernels=kernels).pairwise_repr == ["4d_5_64_1", "0ds_5_16_1",
                                                                    "2d_3_12_4"]


# ----------------------------------------------------------------------------- features

def test_create_position_feats():
    p = create_position_feats((3, 4), bs=2)
    assert p.shape == (2, 2, 3, 4) and p.dtype == torch.float32
    assert torch.equal(p[1, 0, :, 2], torch.arange(3.0)) and torch.equal(p[0, 1, 1],
                                                                         torch.arange(4.0))
    s = torch.tensor([2.0, 4.0], requires_grad=True)
    q = create_position_feats((3, 4), scales=s)
    torch.testing.assert_close(q[0, 0, 2, 3], torch.tensor(1.0))
    torch.testing.assert_close(q[0, 1, 2, 3], torch.tensor(0.75))
    q.sum().backward()
    assert s.grad.abs().sum() > 0
    assert torch.equal(create_position_feats((3, 4), 2.0), create_position_feats((3, 4)) / 2)


def test_create_YXRGB():
    img = rand(2, 3, 4, 5, seed=1).requires_grad_()
    f = create_YXRGB(img, yx_scale=2.0, rgb_scale=torch.tensor([1.0, 2.0, 4.0], dtype=D64))
    assert f.shape == (2, 5, 4, 5) and f.dtype == D64
    torch.testing.assert_close(f[:, 0], (torch.arange(4, dtype=D64) / 2)[None, :, None].expand(2, 4, 5))
    torch.testing.assert_close(f[:, 1], (torch.arange(5, dtype=D64) / 2)[None, None].expand(2, 4, 5))
    torch.testing.assert_close(f[:, 4], img[:, 2] / 4)
    scales = torch.tensor([80.0, 80.0, 13.0, 13.0, 13.0], dtype=D64, requires_grad=True)
    g = create_YXRGB(img, scales=scales)
    torch.testing.assert_close(g, create_YXRGB(img, 80.0, 13.0))
    g.sum().backward()
    assert scales.grad.abs().min() > 0 and img.grad.abs().sum() > 0
    assert create_YXRGB(img[0]).shape == (1, 5, 4, 5)  # C x H x W -> 1 x ...
    with pytest.raises(PacnetValueError, match="3 values"):
        create_YXRGB(img, rgb_scale=[1.0, 2.0])
    with pytest.raises(PacnetValueError, match="not both"):
        create_YXRGB(img, yx_scale=1.0, scales=[1.0] * 5)


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("make, match", [
    (lambda: PacCRF(C, 1, pairwise_kernels=K1(kernel_size=4)), "kernel_size must be odd, got 4"),
    (lambda: PacCRF(C, 1, pairwise_kernels=K1(compat_type="pots")),
     r"unknown compat_type 'pots'.*\n.*did you mean 'potts'"),
    (lambda: PacCRF(C, 1, pairwise_kernels=K1(compat_type="4D")), "unknown compat_type '4D'"),
    (lambda: PacCRF(C, 1, final_output="logQ"), r"unknown final_output 'logQ'"),
    (lambda: PacCRF(C, 0), "num_steps must be >= 1, got 0"),
    (lambda: PacCRFLoose(C, 0), "num_steps must be >= 1, got 0"),
    (lambda: PacCRF(0, 1), "channels must be >= 1"),
    (lambda: PacCRF(C, 1, pairwise_kernels=K1(dilation=0)), "dilation must be >= 1, got 0"),
    (lambda: PacCRF(C, 1, pairwise_kernels=K1(blur=0)), "blur must be >= 1, got 0"),
    (lambda: PacCRF(C, 1, pairwise_kernels=K1(spatial_filter="yes")), "spatial_filter"),
    (lambda: PacCRF(C, 1, unary_weight=float("nan")), "unary_weight must be a finite number"),
    (lambda: PacCRF(C, 1, pairwise_kernels="4d"), "pairwise_kernels must be a dict"),
])
def test_bad_arguments(make, match):
    with pytest.raises(PacnetValueError, match=match):
        make()


def test_fall_through_aliases_warn():
    for alias in ("diag", "full"):
        with pytest.warns(UserWarning, match="no compatibility transform"):
            crf = PacCRF(C, 1, pairwise_kernels=K1(compat_type=alias))
        assert crf.compat[0] is None and crf.messengers[0].shared_filters
    assert "none" in COMPAT_TYPES


def test_bad_inputs_name_the_offending_tensor():
    crf = make_crf([K1(), K1(compat_type="2d", blur=2)], steps=1)
    unary, feat = inputs()
    cases = [
        (lambda: crf(unary[:, :2], feat), "unary has 2 channels, the CRF was built with channels=3"),
        (lambda: crf(unary, feat[..., :8, :]), r"edge_feat must be \[2, F, 9, 10\].*got \[2, 4, 8, 10\]"),
        (lambda: crf(unary, feat[:1]), r"edge_feat must be \[2, F, 9, 10\]"),
        (lambda: crf(unary, [feat]), "list of 1 tensors but the CRF has 2"),
        (lambda: crf(unary, [feat, None]), r"edge_feat\[1\] is None"),
        (lambda: crf(unary, None), "edge_feat is None"),
        (lambda: crf(unary, feat.float()), "edge_feat has dtype torch.float32"),
        (lambda: crf(unary.float(), feat.float()), "the CRF's .* is torch.float64"),
        (lambda: crf(unary[0], feat), "unary must be 4-D"),
        (lambda: crf(unary, feat, logQ=unary[:, :, :5]), "logQ must have the unary's shape"),
        (lambda: crf(unary, None, edge_kernel=torch.zeros(2, 1, 3, 3, 9, 10, dtype=D64)),
         r"edge_kernel must be \[2, 1, 3, 3, 5, 5\] for pairwise kernel 1 \(2ds_3_1_2\)"),
        (lambda: crf(unary, None, edge_kernel=[None, None]), r"edge_kernel\[0\] must be a torch.Tensor"),
    ]
    for fn, match in cases:
        with pytest.raises(PacnetValueError, match=match):
            fn()
    crf.final_output = "probs"
    with pytest.raises(PacnetValueError, match="unknown final_output 'probs'"):
        crf(unary, feat)


def test_the_originals_module_names_import():
    """Ported code keeps its module names: from pacnet import pac, paccrf."""
    import pacnet.crf
    from pacnet import pac, paccrf

    assert paccrf.PacCRF is pacnet.crf.PacCRF and paccrf.create_YXRGB is pacnet.crf.create_YXRGB
    assert set(paccrf.__all__) <= set(dir(paccrf)) and pac.PacConvTranspose2d is pacnet.PacConvTranspose2d
