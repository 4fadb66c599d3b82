"""Check the Numba CUDA PAC kernels without a GPU.

Run as a script (``tests/test_pac_kernels_cuda.py`` does, in a subprocess):

* ``python tests/cudasim_pac.py``: forward and backward of every kernel against the torch
  reference under the CUDA simulator.  ``NUMBA_ENABLE_CUDASIM`` must be set before numba is
  first imported, which is why this is not an ordinary test module.  Shapes are tiny because
  the simulator runs one Python thread per CUDA thread.  Exits 1 if anything differs.
* ``python tests/cudasim_pac.py --ptx``: compile every kernel to PTX (sm_90, float32 and
  float64) with the real NVVM compiler, which catches device-typing errors the simulator
  cannot see.  Exits 3 when no NVVM/CUDA toolkit is installed.
"""

import os
import sys

PTX = "--ptx" in sys.argv
if not PTX:
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"

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


def compile_all_ptx():
    from numba import types
    from numba.cuda import compile_ptx

    i8, b1 = types.int64, types.boolean
    geo6 = (i8,) * 6
    geo8 = (i8,) * 8
    for dt in (types.float32, types.float64):
        a1, a4, a6 = (types.Array(dt, n, "C") for n in (1, 4, 6))
        sigs = {
            "_dist_fwd": (a4, a4, b1) + geo8 + (b1, b1, dt, a6),
            "_dist_bwd_ctr": (a6, a4, a4, b1) + geo8 + (b1, b1, dt, a4),
            "_dist_bwd_guide": (a6, a4, a4, b1) + geo8 + (b1, b1, dt, a4, a4),
            "_conv_fwd": (a4, a6, a4, a1) + geo6 + (dt, a4),
            "_conv_bwd_x": (a4, a6, a4) + geo6 + (dt, a4),
            "_conv_bwd_k": (a4, a4, a4) + geo6 + (dt, a6),
            "_conv_bwd_w": (a4, a4, a6) + geo6 + (dt, a4),
            "_pool_fwd": (a4, a6, a1, a1) + geo8 + (dt, a4),
            "_pool_bwd_x": (a4, a6, a1) + geo8 + (dt, a4),
            "_pool_bwd_q": (a4, a4) + geo8 + (dt, a6),
        }
        kernels = {k for k, v in vars(K_cuda).items()
                   if hasattr(v, "py_func") and not v.targetoptions.get("device")}
        assert kernels == set(sigs), f"PTX signatures do not match the kernels: {kernels}"
        for name, sig in sigs.items():
            try:
                ptx, _ = compile_ptx(getattr(K_cuda, name).py_func, sig, cc=(9, 0))
            except Exception as exc:  # noqa: BLE001 - report any compiler failure
                if type(exc).__name__ in ("DynamicLibNotFoundError", "NvvmSupportError",
                                          "CudaSupportError", "NvrtcSupportError"):
                    print(f"no CUDA toolkit: {exc}")
                    return 3
                print(f"FAIL {name} {dt}: {type(exc).__name__}: {exc}")
                failures.append(name)
                continue
            print(f"ok   {name} {dt}: {len(ptx)} bytes of PTX")
    print(f"{len(failures)} failure(s)")
    return 1 if failures else 0


def main():
    if PTX:
        return compile_all_ptx()
    assert K_cuda._SIM, "the simulator is not active"
    gen = torch.Generator().manual_seed(0)
    dt = torch.float64

    def rnd(*shape, pos=False):
        t = torch.rand(shape, generator=gen, dtype=dt) if pos else torch.randn(shape, generator=gen,
                                                                              dtype=dt)
        return t

    # (H, W, kernel, stride, padding, dilation)
    geoms = [
        (5, 6, (3, 3), (1, 1), (1, 1), (1, 1)),
        (5, 6, (3, 3), (2, 1), (2, 0), (1, 2)),
        (6, 5, (3, 1), (1, 2), (0, 1), (2, 1)),
    ]
    b, C, O, Cg = 2, 3, 2, 2
    for gi, (H, W, k, s, p, d) in enumerate(geoms):
        oh, ow = R.out_size((H, W), k, s, p, d)
        tag = f"g{gi} {H}x{W} k{k} s{s} p{p} d{d}"
        f = rnd(b, Cg, H, W)
        # pac_dist: centre given or not, asym, channel-wise
        for center_given, asym, cw in ((False, False, False), (True, True, False),
                                       (False, True, True)):
            ctr = rnd(b, Cg, oh, ow) if center_given else None
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
        # pac_conv2d, full and shared filters
        x = rnd(b, C, H, W)
        Kk = rnd(b, 1, k[0], k[1], oh, ow, pos=True)
        for shared in (False, True):
            w = rnd(1, 1, *k) if shared else rnd(O, C, *k)
            bias = rnd(C if shared else O)
            out = K_cuda.pac_conv2d_fwd(x, Kk, w, bias, s, p, d, shared)
            g = rnd(*out.shape)
            want, grads = ref_grads(
                lambda x_, K_, w_: R.pac_conv2d(x_, K_, w_, bias, s, p, d, shared), (x, Kk, w), g)
            sub = f"{tag} conv shared={shared}"
            check(sub + " fwd", out, want)
            gx, gK, gW = K_cuda.pac_conv2d_bwd(g, x, Kk, w, s, p, d, shared)
            check(sub + " grad x", gx, grads[0])
            check(sub + " grad K", gK, grads[1])
            check(sub + " grad weight", gW, grads[2])
            acc = g.clone()
            K_cuda.pac_conv2d_add_(acc, x, Kk, w, s, p, d, shared, -0.5)
            check(sub + " add_", acc, g - 0.5 * R.pac_conv2d(x, Kk, w, None, s, p, d, shared))
        # pac_pool2d, shared and channel-wise K
        for kc in (1, C):
            Kp = rnd(b, kc, k[0], k[1], oh, ow, pos=True)
            out = K_cuda.pac_pool2d_fwd(x, Kp, k, s, p, d)
            g = rnd(*out.shape)
            want, grads = ref_grads(lambda x_, K_: R.pac_pool2d(x_, K_, k, s, p, d), (x, Kp), g)
            sub = f"{tag} pool kc={kc}"
            check(sub + " fwd", out, want)
            gx, gK, _ = K_cuda.pac_pool2d_bwd(g, x, Kp, k, s, p, d)
            check(sub + " grad x", gx, grads[0])
            check(sub + " grad K", gK, grads[1])

    # float32 and float16 inputs (fp32 accumulation, result in the input dtype)
    H, W, k, s, p, d = geoms[0]
    x = torch.randn(1, 2, H, W)
    Kk = torch.rand(1, 1, *k, H, W)
    w = torch.randn(3, 2, *k)
    want = R.pac_conv2d(x.double(), Kk.double(), w.double(), None, s, p, d)
    out32 = K_cuda.pac_conv2d_fwd(x, Kk, w, None, s, p, d, False)
    out16 = K_cuda.pac_conv2d_fwd(x.half(), Kk.half(), w.half(), None, s, p, d, False)
    ok = (out32.dtype == torch.float32 and out16.dtype == torch.float16
          and torch.allclose(out32.double(), want, rtol=1e-5, atol=1e-5)
          and torch.allclose(out16.double(), want, rtol=2e-2, atol=2e-2))
    print(f"{'ok  ' if ok else 'FAIL'} conv float32/float16 dtypes")
    if not ok:
        failures.append("dtypes")

    print(f"{len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
