"""Check the Numba CUDA PAC kernels without a GPU.

Run as a script (``tests/test_pac_kernels_cuda.py`` does, in a subprocess):

* ``python tests/cudasim_pac.py``: forward and backward of every kernel against the torch
  reference under the CUDA simulator.  ``NUMBA_ENABLE_CUDASIM`` must be set before numba is
  first imported, which is why this is not an ordinary test module.  Shapes are tiny because
  the simulator runs one Python thread per CUDA thread.  Exits 1 if anything differs.
  ``--all`` adds two more volumes (a slow test runs it).
* ``python tests/cudasim_pac.py --gpu``: the same checks (every geometry) on a real GPU (CUDA
  tensors).
* ``python tests/cudasim_pac.py --ptx``: compile every kernel to PTX for sm_90 (float32,
  float64, and the float16/bfloat16 variants of the GEMM path) and sm_80 with the real NVVM
  compiler, which catches device-typing errors the simulator cannot see.  Exits 3 when no
  NVVM/CUDA toolkit is installed (``pip install 'numba-cuda[cu12]'`` brings one).
"""

import os
import sys

PTX = "--ptx" in sys.argv
GPU = "--gpu" in sys.argv  # the same checks on a real GPU (benchmarks/gpu.py runs them)
ALL = "--all" in sys.argv or GPU  # every geometry (the simulator's default leaves two out)
if not PTX and not GPU:
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
DEVICE = "cuda" if GPU else "cpu"

import torch  # noqa: E402

from pacnet.kernels.pac import cuda as K_cuda  # noqa: E402
from pacnet.kernels.pac import reference as R  # noqa: E402

TOL = dict(rtol=1e-9, atol=1e-10)
failures = []


def check(name, got, want):
    ok = got.shape == want.shape and torch.allclose(got, want, **TOL)
    err = (got - want).abs().max().item() if got.shape == want.shape else float("nan")
    print(f"{'ok  ' if ok else 'FAIL'} {name}: max err {err:.2e}")
    if not ok:
        failures.append(name)


def ref_grads(fn, inputs, grad):
    leaves = [t.clone().requires_grad_() if t is not None else None for t in inputs]
    out = fn(*leaves)
    out.backward(grad)
    return out.detach(), [t.grad if t is not None else None for t in leaves]


def _ptx_signatures():
    """Every kernel of the module with the argument types it is launched with: float32 and
    float64 data; float16 and bfloat16 (int16 bits) data for the GEMM path, with K in the
    data's dtype or float32."""
    from numba import types

    i8, b1 = types.int64, types.boolean
    u3 = types.UniTuple(i8, 3)

    def arr(dt, n):
        return types.Array(dt, n, "C")

    for dt in (types.float32, types.float64):
        a1, a4, a5 = arr(dt, 1), arr(dt, 4), arr(dt, 5)
        geo = (u3, u3, u3, u3, i8)
        yield from {
            "_dist_fwd": (a5, a4, b1) + geo + (b1, b1, dt, a5),
            "_dist_bwd_ctr": (a5, a5, a4, b1) + geo + (b1, b1, dt, a4),
            "_dist_bwd_guide": (a5, a5, a4, b1) + geo + (b1, b1, dt, a4, a5),
            "_pool_fwd": (a5, a5, a1, a1) + geo + (dt, a4),
            "_pool_bwd_x": (a4, a5, a1) + geo + (dt, a5),
            "_pool_bwd_q": (a4, a5) + geo + (dt, a5),
        }.items()
    f16, f32, f64, i16 = types.float16, types.float32, types.float64, types.int16
    for dt, kdt, acc in ((f32, f32, f32), (f64, f64, f64), (f16, f16, f32), (f16, f32, f32),
                         (i16, i16, f32), (i16, f32, f32)):
        geo = (i8, i8, u3, u3, u3, u3, i8, b1, b1, acc)
        yield from {
            "_cols": (arr(dt, 5), arr(kdt, 5)) + geo + (arr(dt, 4),),
            "_grad_x": (arr(dt, 4), arr(kdt, 5)) + geo + (arr(acc, 5),),
            "_grad_k": (arr(dt, 4), arr(dt, 5)) + geo + (arr(kdt, 5),),
        }.items()


def compile_all_ptx():
    from numba.cuda import compile_ptx

    sigs = list(_ptx_signatures())
    kernels = {k for k, v in vars(K_cuda).items()
               if hasattr(v, "py_func") and not v.targetoptions.get("device")}
    assert kernels == {name for name, _ in sigs}, f"PTX signatures miss kernels: {kernels}"
    # every signature for sm_90 (H100/H200); every kernel, in its first signature, for sm_80
    seen = set()
    first = [(n, sig) for n, sig in sigs if n not in seen and not seen.add(n)]
    for cc, todo in (((9, 0), sigs), ((8, 0), first)):
        for name, sig in todo:
            try:
                ptx, _ = compile_ptx(getattr(K_cuda, name).py_func, sig, cc=cc)
            except Exception as exc:  # noqa: BLE001 - report any compiler failure
                if type(exc).__name__ in ("DynamicLibNotFoundError", "NvvmSupportError",
                                          "CudaSupportError", "NvrtcSupportError"):
                    print(f"no CUDA toolkit: {exc}")
                    return 3
                print(f"FAIL {name} sm_{cc[0]}{cc[1]} {sig[0]}: {type(exc).__name__}: {exc}")
                failures.append(name)
                continue
            print(f"ok   {name} sm_{cc[0]}{cc[1]} {sig[0]} {sig[1]}: {len(ptx)} bytes of PTX")
    print(f"{len(failures)} failure(s)")
    return 1 if failures else 0


def main():
    if PTX:
        return compile_all_ptx()
    assert K_cuda._SIM or GPU, "the simulator is not active"
    gen = torch.Generator().manual_seed(0)
    dt = torch.float64

    def rnd(*shape, pos=False):
        t = torch.rand(shape, generator=gen, dtype=dt) if pos else torch.randn(shape, generator=gen,
                                                                              dtype=dt)
        return t.to(DEVICE)

    # (sizes, kernel, stride, padding, dilation): 2-D, 3-D (also a depth-1 volume) and 1-D;
    # without --all the second and third volumes are left out (the simulator is slow)
    geoms = [
        ((5, 6), (3, 3), (1, 1), (1, 1), (1, 1)),
        ((5, 6), (3, 3), (2, 1), (2, 0), (1, 2)),
        ((6, 5), (3, 1), (1, 2), (0, 1), (2, 1)),
        ((3, 4, 5), (3, 3, 1), (1, 2, 1), (1, 1, 0), (1, 1, 2)),
        ((4, 3, 4), (3, 1, 3), (2, 1, 1), (2, 0, 1), (1, 1, 1)),
        ((1, 4, 5), (3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1)),
        ((7,), (3,), (2,), (1,), (2,)),
    ]
    b, C, O, Cg = 2, 3, 2, 2
    for gi, (sizes, k, s, p, d) in enumerate(geoms):
        if gi in (4, 5) and not ALL:
            continue
        out_sizes = R.out_size(sizes, k, s, p, d)
        tag = f"g{gi} {'x'.join(map(str, sizes))} k{k} s{s} p{p} d{d}"
        f = rnd(b, Cg, *sizes)
        # pac_dist: centre given or not, asym, channel-wise
        for center_given, asym, cw in ((False, False, False), (True, True, False),
                                       (False, True, True)):
            ctr = rnd(b, Cg, *out_sizes) if center_given else None
            args = (k, s, p, d, asym, cw)
            D = K_cuda.pac_dist_fwd(f, ctr, *args)
            gD = rnd(*D.shape)
            want, grads = ref_grads(lambda g, c: R.pac_dist(g, c, *args), (f, ctr), gD)
            sub = f"{tag} dist ctr={center_given} asym={asym} cw={cw}"
            check(sub + " fwd", D, want)
            gf, gc = K_cuda.pac_dist_bwd(gD, f, ctr, *args)
            check(sub + " grad guide", gf, grads[0])
            if center_given:
                check(sub + " grad center", gc, grads[1])
        # pac_conv, full and shared filters
        x = rnd(b, C, *sizes)
        Kk = rnd(b, 1, *k, *out_sizes, pos=True)
        for shared in (False, True):
            w = rnd(1, 1, *k) if shared else rnd(O, C, *k)
            bias = rnd(C if shared else O)
            out = K_cuda.pac_conv_fwd(x, Kk, w, bias, s, p, d, shared)
            g = rnd(*out.shape)
            want, grads = ref_grads(
                lambda x_, K_, w_: R.pac_conv(x_, K_, w_, bias, s, p, d, shared), (x, Kk, w), g)
            sub = f"{tag} conv shared={shared}"
            check(sub + " fwd", out, want)
            gx, gK, gW = K_cuda.pac_conv_bwd(g, x, Kk, w, s, p, d, shared)
            check(sub + " grad x", gx, grads[0])
            check(sub + " grad K", gK, grads[1])
            check(sub + " grad weight", gW, grads[2])
            acc = g.clone()
            K_cuda.pac_conv_add_(acc, x, Kk, w, s, p, d, shared, -0.5)
            check(sub + " add_", acc, g - 0.5 * R.pac_conv(x, Kk, w, None, s, p, d, shared))
        # pac_pool, shared and channel-wise K
        for kc in (1, C):
            Kp = rnd(b, kc, *k, *out_sizes, pos=True)
            out = K_cuda.pac_pool_fwd(x, Kp, k, s, p, d)
            g = rnd(*out.shape)
            want, grads = ref_grads(lambda x_, K_: R.pac_pool(x_, K_, k, s, p, d), (x, Kp), g)
            sub = f"{tag} pool kc={kc}"
            check(sub + " fwd", out, want)
            gx, gK, _ = K_cuda.pac_pool_bwd(g, x, Kp, k, s, p, d)
            check(sub + " grad x", gx, grads[0])
            check(sub + " grad K", gK, grads[1])

    def conv_case(gi, c=C):
        """Inputs of a full-filter pac_conv on geometry ``gi`` (``c`` input channels), the
        reference output and gradients."""
        sizes, k, s, p, d = geoms[gi]
        out_sizes = R.out_size(sizes, k, s, p, d)
        x, w = rnd(b, c, *sizes), rnd(O, c, *k)
        Kk = rnd(b, 1, *k, *out_sizes, pos=True)
        g = rnd(b, O, *out_sizes)
        want, grads = ref_grads(lambda x_, K_, w_: R.pac_conv(x_, K_, w_, None, s, p, d),
                                (x, Kk, w), g)
        return (s, p, d), x, w, Kk, g, want, grads

    # the GEMM path in tiles: tiny workspaces force bands of output rows; in 3-D a band of 3
    # rows (output planes of 2) starts and ends inside planes (2-D too with --all); one input
    # channel keeps the simulator's thread count down
    for gi, bands in ((3, (1, 3)),) + (((1, (1, 2)),) if ALL else ()):
        geo, x, w, Kk, g, want, grads = conv_case(gi, c=1)
        row_bytes = w[0].numel() * g.shape[-1] * 8
        for rows in bands:
            os.environ["PACNET_WORKSPACE_MB"] = str(rows * row_bytes / 2**20)
            sub = f"g{gi} tiles of {rows} row(s)"
            check(sub + " fwd", K_cuda.pac_conv_fwd(x, Kk, w, None, *geo, False), want)
            for name, got, ref in zip(("grad x", "grad K", "grad weight"),
                                      K_cuda.pac_conv_bwd(g, x, Kk, w, *geo, False), grads):
                check(f"{sub} {name}", got, ref)
    del os.environ["PACNET_WORKSPACE_MB"]

    # half precision: float16/bfloat16 columns and GEMMs (float16 data with a float32 K,
    # bfloat16 data with a bfloat16 K: both flags of the kernels); results and gradients in
    # the inputs' dtypes, close to the float64 reference
    (s, p, d), x, w, Kk, g, want, grads = conv_case(1)
    for half, kdt in ((torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16)):
        sub = f"conv {str(half)[6:]} K {str(kdt)[6:]}"
        tol = dict(rtol=2e-2, atol=3e-2) if half == torch.float16 else dict(rtol=5e-2,
                                                                          atol=8e-2)
        out = K_cuda.pac_conv_fwd(x.to(half), Kk.to(kdt), w.to(half), None, s, p, d, False)
        gh = K_cuda.pac_conv_bwd(g.to(half), x.to(half), Kk.to(kdt), w.to(half), s, p, d,
                                 False)
        ok = out.dtype == half and [t.dtype for t in gh] == [half, kdt, half]
        for got, ref in zip((out,) + tuple(gh), (want,) + tuple(grads)):
            ok = ok and torch.allclose(got.double(), ref, **tol)
        err = max((got.double() - ref).abs().max().item()
                  for got, ref in zip((out,) + tuple(gh), (want,) + tuple(grads)))
        print(f"{'ok  ' if ok else 'FAIL'} {sub} fwd and grads: max err {err:.2e}")
        if not ok:
            failures.append(sub)

    print(f"{len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
