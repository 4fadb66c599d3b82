"""The kernel runtime shared by the PAC and segaware ops (pacnet/kernels/runtime.py).

Every op of both families through the same checks: fakes whose strides are the real op's
for contiguous, channels_last and permuted inputs (opcheck, all its tests), a
``torch.compile(fullgraph=True)`` forward+backward through every op, the backend choice, the
dtype policy, fork safety, and the threading and workspace settings.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import pacnet.kernels.pac as P
from pacnet.errors import PacnetValueError
from pacnet.kernels import runtime
from pacnet.kernels.pac import reference as R
from pacnet.kernels.segaware import ops as S

LAYOUTS = ("contiguous", "channels_last", "permuted")


def _layout(t, layout):
    """``t`` (values unchanged) in a memory layout: channels_last for 4-D and 5-D tensors,
    the two last dimensions swapped in memory for ``permuted``."""
    if t is None or layout == "contiguous" or t.dim() < 2:
        return t
    if layout == "channels_last" and t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "channels_last" and t.dim() == 5:
        return t.contiguous(memory_format=torch.channels_last_3d)
    if layout == "permuted":
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    return t


def _cases(layout):
    """(name, op, args) for every op of both families, its tensors in ``layout``."""
    gen = torch.Generator().manual_seed(3)

    def rnd(*shape, pos=False):
        t = torch.rand(shape, generator=gen) if pos else torch.randn(shape, generator=gen)
        return _layout(t.double(), layout)

    k, s, p, d = (3, 3), (2, 1), (1, 1), (1, 2)
    f, x = rnd(2, 2, 7, 6), rnd(2, 3, 7, 6)
    oh, ow = R.out_size((7, 6), k, s, p, d)
    K, Kc, w = rnd(2, 1, 3, 3, oh, ow, pos=True), rnd(2, 3, 3, 3, oh, ow, pos=True), rnd(4, 3, 3, 3)
    gc, gp, gD = rnd(2, 4, oh, ow), rnd(2, 3, oh, ow), rnd(2, 1, 3, 3, oh, ow)
    ctr = rnd(2, 2, oh, ow)
    out = torch.randn(2, 4, oh, ow, generator=gen).double()  # add_ wants a contiguous out
    rg = lambda t: t.detach().requires_grad_() if t is not None else None  # noqa: E731
    geo = ([3, 3], [1, 1], [2, 1], [1, 2])  # segaware order: kernel, pad, stride, dilation
    hw = (S._hw(x, *geo))
    emb, lab = rnd(1, 2, 7, 6), _layout(torch.randint(0, 3, (1, 1, 7, 6), generator=gen)
                                        .double(), layout)
    gs, wts, g3 = rnd(1, 9, *hw), rnd(1, 9, *hw), rnd(1, 3, *hw)
    xs = rnd(1, 3, 7, 6)
    # volumes: the ops whose fakes once disagreed with the real strides
    k3, s3, p3, d3 = (3, 1, 3), (1, 2, 1), (1, 0, 1), (1, 1, 2)
    x3, out3 = rnd(2, 3, 3, 5, 6), R.out_size((3, 5, 6), k3, s3, p3, d3)
    K3, w3 = rnd(2, 1, *k3, *out3, pos=True), rnd(4, 3, *k3)
    o = torch.ops.pacnet
    return [
        ("pac_dist", o.pac_dist.default, (rg(f), rg(ctr), k, s, p, d, True, False)),
        ("pac_dist_backward", o.pac_dist_backward.default, (gD, f, None, k, s, p, d, False,
                                                            False)),
        ("pac_conv", o.pac_conv.default, (rg(x), rg(K), rg(w), None, s, p, d, False)),
        ("pac_conv_backward", o.pac_conv_backward.default,
         (gc, x, K, w, s, p, d, False, True, True, True)),
        ("pac_conv_add_", o.pac_conv_add_.default, (out, x, K, w, s, p, d, False, 0.5)),
        ("pac_pool", o.pac_pool.default, (rg(x), rg(Kc), k, s, p, d)),
        ("pac_pool_backward", o.pac_pool_backward.default, (gp, x, Kc, k, s, p, d, True,
                                                                True)),
        ("im2dist", o.im2dist.default, (rg(emb), *geo, 2, True, False)),
        ("im2dist_backward", o.im2dist_backward.default, (gs, emb, *geo, 1, False, True)),
        ("im2parity", o.im2parity.default, (lab, *geo, True, 2)),
        ("local_weighted_sum", o.local_weighted_sum.default, (rg(xs), rg(wts), *geo)),
        ("local_weighted_sum_backward", o.local_weighted_sum_backward.default,
         (g3, xs, wts, *geo)),
        ("pac_conv_3d", o.pac_conv.default, (rg(x3), rg(K3), rg(w3), None, s3, p3, d3, False)),
        ("pac_conv_backward_3d", o.pac_conv_backward.default,
         (rnd(2, 4, *out3), x3, K3, w3, s3, p3, d3, False, True, True, True)),
        ("pac_dist_backward_3d", o.pac_dist_backward.default,
         (rnd(2, 1, *k3, *out3), rnd(2, 2, 3, 5, 6), None, k3, s3, p3, d3, False, False)),
    ]


def _ids():
    return [c[0] for c in _cases("contiguous")]


@pytest.mark.parametrize("layout", LAYOUTS[1:])
@pytest.mark.parametrize("index", range(len(_ids())), ids=_ids())
def test_opcheck_with_every_layout(layout, index):
    """opcheck (schema, autograd registration, fake tensors incl. strides, AOT dispatch) with
    channels_last and permuted inputs (the contiguous cases are in the family's tests)."""
    name, op, args = _cases(layout)[index]
    torch.library.opcheck(op, args)


class _EveryOp(torch.nn.Module):
    """Each forward op once, so a backward runs each backward op."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(4, 3, 3, 3) * 0.2)
        self.bias = torch.nn.Parameter(torch.zeros(4))

    def forward(self, x, guide, labels):
        K = torch.exp(-0.5 * P.pac_dist(guide, None, 3, 1, 1, 1))
        y = P.pac_pool2d(P.pac_conv2d(x, K, self.weight, self.bias, 1, 1, 1), K, 3, 1, 1, 1)
        m = torch.softmax(-S.im2dist(y, 3, 2, 1, 2, "L2"), dim=1)
        m = m * S.im2parity(labels, 3, 2, 1, 2)
        return S.local_weighted_sum(y, m, 3, 2, 1, 2)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_compiled_forward_backward_through_every_op(layout):
    """torch.compile(fullgraph=True, inductor: it checks every op's output strides) forward
    and backward through every op equals eager.  In float64: inductor's fused softmax and exp
    round differently from eager's, which float32 gradients with cancellation amplify past
    any fixed tolerance."""
    torch._dynamo.reset()
    torch.manual_seed(5)
    gen = torch.Generator().manual_seed(5)
    x = _layout(torch.randn(2, 3, 9, 8, generator=gen, dtype=torch.float64), layout)
    guide = _layout(torch.randn(2, 2, 9, 8, generator=gen, dtype=torch.float64), layout)
    x, guide = x.requires_grad_(), guide.requires_grad_()
    labels = _layout(torch.randint(0, 3, (2, 1, 9, 8), generator=gen).double(), layout)
    model = _EveryOp().double()
    eager = model(x, guide, labels)
    want = torch.autograd.grad(eager.square().sum(), [x, guide, *model.parameters()])
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x, guide, labels)
    got = torch.autograd.grad(out.square().sum(), [x, guide, *model.parameters()])
    torch.testing.assert_close(out, eager)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_compiled_pac_conv_transpose_trains():
    """The joint-upsampling layer under torch.compile (its backward's fake strides used to
    differ from the real op's and inductor refused the graph)."""
    from pacnet.pac import PacConvTranspose2d

    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = PacConvTranspose2d(8, 4, 5, stride=2, padding=2, output_padding=1)
    x, guide = torch.randn(2, 8, 6, 7), torch.randn(2, 3, 12, 14)
    compiled = torch.compile(layer, fullgraph=True)
    out = compiled(x, guide)
    out.square().mean().backward()
    grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    eager = layer(x, guide)
    eager.square().mean().backward()
    torch.testing.assert_close(out, eager)
    for got, p in zip(grads, layer.parameters()):
        torch.testing.assert_close(got, p.grad)


# ----------------------------------------------------------------------------- backend choice

@pytest.mark.parametrize("value, want", [(None, "numba"), ("", "numba"), ("auto", "numba"),
                                         (" Numba ", "numba"), ("reference", "reference")])
def test_backend_values_are_the_same_for_every_family(monkeypatch, value, want):
    if value is None:
        monkeypatch.delenv("PACNET_BACKEND", raising=False)
    else:
        monkeypatch.setenv("PACNET_BACKEND", value)
    t = torch.zeros(1, 1, 3, 3)
    assert runtime.backend(t.device) == want
    assert P.backend_for(t.device) == want
    assert S.backend_for(t) == ("cpu" if want == "numba" else "reference")
    if "numba" not in (value or "").lower():  # forced numba refuses devices without kernels
        assert runtime.backend(torch.device("meta")) == "reference"


def test_bad_backend_and_workspace_settings(monkeypatch):
    monkeypatch.setenv("PACNET_BACKEND", "triton")
    for call in (lambda: P.pac_pool2d(torch.rand(1, 1, 5, 5), torch.rand(1, 1, 3, 3, 5, 5), 3,
                                      1, 1, 1),
                 lambda: S.im2dist(torch.rand(1, 1, 5, 5), 3, 1)):
        with pytest.raises(PacnetValueError, match="'triton' is not a kernel backend"):
            call()
    monkeypatch.setenv("PACNET_BACKEND", "numba")
    with pytest.raises(PacnetValueError, match="no fused kernels for device 'meta'"):
        S.im2dist(torch.empty(1, 1, 5, 5, device="meta"), 3, 1)
    monkeypatch.setenv("PACNET_WORKSPACE_MB", "lots")
    with pytest.raises(PacnetValueError, match="PACNET_WORKSPACE_MB='lots'"):
        runtime.workspace_limit()
    monkeypatch.setenv("PACNET_WORKSPACE_MB", "0.5")
    assert runtime.workspace_limit() == 1 << 19


def test_row_blocks_cover_everything_once():
    B, C, rows, cols = 3, 4, 5, 6
    for limit in (1, C * 4 * cols * 2, C * 4 * rows * cols * 2, 1 << 30):
        tiles, numel = runtime.row_blocks(B, C, rows, cols, 4, limit)
        seen = [(b, r) for b0, nb, r0, nr in tiles for b in range(b0, b0 + nb)
                for r in range(r0, r0 + nr)]
        assert seen == [(b, r) for b in range(B) for r in range(rows)]
        assert all(nb * C * nr * cols <= numel for _, nb, _, nr in tiles)
        assert numel * 4 <= max(limit, C * cols * 4)


# ----------------------------------------------------------------------------- dtypes

@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_cpu_half_inputs_compute_in_float32(half):
    """CPU kernels compute float16/bfloat16 data in float32 (also with a float32 K beside
    it); results and gradients come back in the inputs' dtypes."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 8, 7, generator=gen)
    K = torch.rand(2, 1, 3, 3, 8, 7, generator=gen)
    w = torch.randn(4, 3, 3, 3, generator=gen)
    want = R.pac_conv(x.to(half).double(), K.double(), w.to(half).double(), None, (1, 1),
                        (1, 1), (1, 1))
    xs, ws, Ks = (t.to(half).requires_grad_() for t in (x, w, K))
    Kf = K.clone().requires_grad_()
    for kernel in (Ks, Kf):
        out = P.pac_conv2d(xs, kernel, ws, None, 1, 1, 1)
        assert out.dtype == half
        torch.testing.assert_close(out.double(), want.to(half).double(), rtol=0.02, atol=0.05)
        out.sum().backward()
        assert (xs.grad.dtype, kernel.grad.dtype, ws.grad.dtype) == (half, kernel.dtype, half)
    emb = torch.randn(1, 2, 6, 6, generator=gen).to(half)
    assert S.im2dist(emb, 3, 1).dtype == half


def test_autocast_policy():
    """CPU autocast: float32 everywhere (the CPU kernels compute in float32); the policy
    table keeps K in float32 and casts the data to the autocast dtype on CUDA."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 3, 6, 6, generator=gen).bfloat16()
    K = torch.rand(1, 1, 3, 3, 6, 6, generator=gen)
    w = torch.randn(2, 3, 3, 3, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = P.pac_conv2d(x, K, w, None, 1, 1, 1)
        direct = torch.ops.pacnet.pac_conv(x, K, w, None, [1, 1], [1, 1], [1, 1], False)
    assert out.dtype == direct.dtype == torch.float32
    torch.testing.assert_close(out, direct)
    args = runtime.autocast_args("cpu", ("compute", "float32", None), (x, K, w))
    assert [a.dtype for a in args] == [torch.float32, torch.float32, torch.float32]


def test_mixed_dtypes_are_checked():
    x, w = torch.randn(1, 3, 6, 6), torch.randn(2, 3, 3, 3)
    K = torch.rand(1, 1, 3, 3, 6, 6)
    with pytest.raises(PacnetValueError, match="K has dtype torch.float16 but x has"):
        P.pac_conv2d(x, K.half(), w, None, 1, 1, 1)
    with pytest.raises(PacnetValueError, match="K has dtype torch.float64 but x has"):
        P.pac_pool2d(x.bfloat16(), K.double(), 3, 1, 1, 1)
    with pytest.raises(PacnetValueError, match="weight has dtype torch.float32 but x has"):
        P.pac_conv2d(x.half(), K, w, None, 1, 1, 1)


# ----------------------------------------------------------------------------- processes

_FORK = """
import os, sys, torch
from pacnet.kernels import runtime
import pacnet.kernels.pac as P
from pacnet.kernels.segaware import ops as S
runtime.PARALLEL_MIN_WORK = 0
torch.set_num_threads(2)
x, K, w = torch.randn(2, 4, 24, 24), torch.rand(2, 1, 3, 3, 24, 24), torch.randn(4, 4, 3, 3)
emb = torch.randn(2, 3, 24, 24, requires_grad=True)

def run():
    out = P.pac_conv2d(x, K, w, None, 1, 1, 1) + P.pac_pool2d(x, K, 3, 1, 1, 1)
    d = S.im2dist(emb, 3, 1)
    g, = torch.autograd.grad(S.local_weighted_sum(x, torch.softmax(-d, 1), 3, 1).sum(), emb)
    return out, d, g, S.im2parity(x[:, :1].round(), 3, 1)

want = run()  # the parallel drivers, in the parent
print("parent parallel", runtime.parallel(1 << 30), runtime.use_torch_threads())
pid = os.fork()
if pid == 0:  # a fork-based DataLoader worker
    if runtime.parallel(1 << 30):  # before the thread count drops: the fork alone decides
        os._exit(2)
    torch.set_num_threads(1)  # as DataLoader workers do (torch's own ops would hang else)
    got = run()
    os._exit(0 if all(torch.equal(a, b) for a, b in zip(got, want)) else 1)
_, status = os.waitpid(pid, 0)
print("child", status)
"""


def test_forked_child_runs_every_family_serially():
    """GNU OpenMP aborts (Numba) or hangs (torch) a forked child that enters a parallel region
    after its parent did; every kernel family runs its serial twin there (same results)."""
    out = subprocess.run([sys.executable, "-c", _FORK], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.split("\n")
    assert lines[0] in ("parent parallel True True", "parent parallel False True"), out.stdout
    assert "child 0" in out.stdout, out.stdout + out.stderr[-3000:]


_SHARED = """
import torch
import numba
from pacnet.kernels import runtime
import pacnet.kernels.pac as P
runtime.PARALLEL_MIN_WORK = 0
torch.set_num_threads(2)
x, K, w = torch.randn(2, 4, 24, 24), torch.rand(2, 1, 3, 3, 24, 24), torch.randn(4, 4, 3, 3)
P.pac_conv2d(x, K, w, None, 1, 1, 1)
print(runtime.use_torch_threads(), numba.threading_layer(), numba.get_num_threads())
"""


def test_numba_parallel_regions_use_torchs_openmp_pool():
    """In a fresh process the runtime makes torch's libgomp global before Numba starts its
    OpenMP layer, and Numba follows torch's thread count."""
    out = subprocess.run([sys.executable, "-c", _SHARED], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["True", "omp", "2"]


@pytest.mark.parametrize("backend", ["aot_eager",
                                     pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_joint_upsampling_net_trains(backend):
    """The main job's net (x8 joint upsampling: PacConvTranspose2d layers) compiled with
    torch.compile trains: its first step's gradients equal eager's and Adam lowers the loss.
    (inductor compiles the whole net for about 3 minutes on 2 busy cores: ``-m slow``.)"""
    import pacnet

    torch._dynamo.reset()
    torch.manual_seed(0)
    shapes = {"target": (2, 1, 4, 4), "guide": (2, 3, 32, 32), "gt": (2, 1, 32, 32)}
    net = pacnet.build("jointupsample/pac_joint_upsample_x8", inputs=shapes, phase="train")
    data = {k: torch.rand(v) for k, v in shapes.items()}
    eager_grads = torch.autograd.grad(net.total_loss(net(**data)), list(net.parameters()))
    compiled = torch.compile(net, backend=backend)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    losses = []
    for step in range(4):
        opt.zero_grad()
        loss = net.total_loss(compiled(**data))
        loss.backward()
        if step == 0:
            for got, (name, p) in zip(eager_grads, net.named_parameters()):
                torch.testing.assert_close(p.grad, got, rtol=1e-4, atol=1e-5, msg=name)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
