"""GPU check and benchmark in one command: the CUDA kernels against the reference on the real
GPU, then one table of the figures issue 13 asks for.

    bash benchmarks/gpu.sh                 # = python benchmarks/gpu.py (about 5 min on an H100)
    python benchmarks/gpu.py --skip-checks --repeats 20
    python benchmarks/gpu.py --device cpu --quick    # the whole script on tiny shapes, no GPU

1. Checks (``tests/cudasim_pac.py --gpu``, ``tests/cudasim_segaware.py --gpu``): every PAC and
   segaware CUDA kernel, forward and every gradient, float64 against the reference at 1e-9,
   the tiled GEMM path (workspaces of one and two output rows), float16/bfloat16 against the
   float64 reference.  A failure stops the script (exit 1).
2. The table (each row: median of ``--repeats`` timed runs after warm-up, CUDA-synchronised;
   extra memory = ``torch.cuda.max_memory_allocated`` during the runs minus the memory
   allocated before them, inputs and parameters excluded):

   * PacConv2d(64, 64, 5, padding=2), 8-channel guide, b = 8, 256^2, forward+backward: the
     fused kernels, the unfold reference (``PACNET_BACKEND=reference``) and ``nn.Conv2d``
     (cuDNN) of the same shape, in float32 (TF32 as torch allows) and under bfloat16
     autocast.  Targets: fused >= 5x faster than the reference with <= 1/10 of its extra
     memory, within 3x of cuDNN; bfloat16 >= 1.5x faster than fused float32.
   * PacConv3d(16, 16, 3, padding=1), 4-channel guide, b = 2, 64^3, forward+backward in
     float32: fused, the 3-D unfold reference and ``nn.Conv3d`` (cuDNN) of the same shape
     (issue 16; the CPU figures are benchmarks/pac3d.py's).
   * The x8 joint-upsampling net's last PacConvTranspose2d(32, 32, 5, stride 2) (128^2 ->
     256^2, 16-channel guide, b = 8), forward+backward, fused vs reference.
   * PacCRF ``crfi5p4d5641p4d5161`` (21 classes): inference at 512^2 (target < 10 ms) and
     training (forward+backward) at 256^2, fused vs reference.
   * The segaware conv3 layer (C = O = 256, k3 d2, 81^2, b = 1) forward+backward: fused vs
     the unfused chain (benchmarks/segaware.py's variants).
   * One training iteration of the main job (pac_joint_upsample_x8, batch 2, 48^2 crops,
     Adam): forward, backward and the update.

Every row also runs on the CPU (``--device cpu``; ``--quick`` shrinks every shape), which is
how the test suite checks the script without a GPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)


# ----------------------------------------------------------------------------- measuring

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, device: torch.device, repeats: int, warmup: int = 2):
    """Median seconds of ``fn()`` and its extra peak memory in MiB (CUDA; NaN on the CPU)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    extra = float("nan")
    if device.type == "cuda":
        extra = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return statistics.median(times), extra


class _Backend:
    """``PACNET_BACKEND`` set for a block (the runtime reads it at every call)."""

    def __init__(self, value):
        self.value = value

    def __enter__(self):
        self.old = os.environ.get("PACNET_BACKEND")
        os.environ["PACNET_BACKEND"] = self.value

    def __exit__(self, *exc):
        if self.old is None:
            os.environ.pop("PACNET_BACKEND", None)
        else:
            os.environ["PACNET_BACKEND"] = self.old


# ----------------------------------------------------------------------------- the rows

def _grad_step(module, inputs, grad):
    def step():
        module.zero_grad(set_to_none=True)
        for t in inputs:
            t.grad = None
        module(*inputs).backward(grad)
    return step


def _fused_reference_cudnn(pac, conv, x, guide, g, device, repeats, wrap=lambda step: step):
    """``{"fused", "reference", <conv's class>}`` times of fwd+bwd steps of the PAC layer
    (its fused kernels, then ``PACNET_BACKEND=reference``) and of the plain convolution of
    the same shape (cuDNN on a GPU); ``wrap`` puts each step in a context (autocast)."""
    fused = measure(wrap(_grad_step(pac, (x, guide), g)), device, repeats)
    with _Backend("reference"):
        ref = measure(wrap(_grad_step(pac, (x, guide), g)), device, max(2, repeats // 4), 1)
    cudnn = measure(wrap(_grad_step(conv, (x,), g)), device, repeats)
    return {"fused": fused, "reference": ref, f"nn.{type(conv).__name__}": cudnn}


def rows_pac_conv(device, q, repeats):
    from pacnet.pac import PacConv2d

    b, c, s = (2, 8, 32) if q else (8, 64, 256)
    torch.manual_seed(0)
    pac = PacConv2d(c, c, 5, padding=2).to(device)
    conv = torch.nn.Conv2d(c, c, 5, padding=2).to(device)
    x = torch.randn(b, c, s, s, device=device, requires_grad=True)
    guide = torch.randn(b, 8, s, s, device=device, requires_grad=True)
    g = torch.randn(b, c, s, s, device=device)
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        amp = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

        def run(step):
            def f():
                with amp:
                    step()
            return f
        tag = f"PacConv2d({c}, {c}, 5) b{b} {s}^2 fwd+bwd {str(dtype)[6:]}"
        out.append((tag, _fused_reference_cudnn(pac, conv, x, guide, g, device, repeats, run)))
    return out


def rows_pac_conv3d(device, q, repeats):
    from pacnet.pac import PacConv3d

    b, c, s = (1, 4, 8) if q else (2, 16, 64)
    torch.manual_seed(0)
    pac = PacConv3d(c, c, 3, padding=1).to(device)
    conv = torch.nn.Conv3d(c, c, 3, padding=1).to(device)
    x = torch.randn(b, c, s, s, s, device=device, requires_grad=True)
    guide = torch.randn(b, 4, s, s, s, device=device, requires_grad=True)
    g = torch.randn(b, c, s, s, s, device=device)
    return [(f"PacConv3d({c}, {c}, 3) b{b} {s}^3 guide 4 fwd+bwd float32",
             _fused_reference_cudnn(pac, conv, x, guide, g, device, repeats))]


def rows_conv_transpose(device, q, repeats):
    from pacnet.pac import PacConvTranspose2d

    b, s = (2, 16) if q else (8, 128)
    torch.manual_seed(0)
    layer = PacConvTranspose2d(32, 32, 5, stride=2, padding=2, output_padding=1).to(device)
    x = torch.randn(b, 32, s, s, device=device, requires_grad=True)
    guide = torch.randn(b, 16, 2 * s, 2 * s, device=device, requires_grad=True)
    g = torch.randn(b, 32, 2 * s, 2 * s, device=device)
    step = _grad_step(layer, (x, guide), g)
    fused = measure(step, device, repeats)
    with _Backend("reference"):
        ref = measure(step, device, max(2, repeats // 4), 1)
    return [(f"x8 net PacConvTranspose2d(32, 32, 5, s2) b{b} {s}^2->{2 * s}^2 fwd+bwd",
             {"fused": fused, "reference": ref})]


def rows_crf(device, q, repeats):
    from crf import CLASSES, MODEL, _inputs

    from pacnet.crf import PacCRF, parse_crf_name

    _, steps, kernels = parse_crf_name(MODEL)
    torch.manual_seed(0)
    crf = PacCRF(CLASSES, steps, pairwise_kernels=kernels).to(device)
    out = []
    for mode, size in (("inference", 64 if q else 512), ("training", 32 if q else 256)):
        unary, feat = (t.to(device) for t in _inputs(size, 0))
        grad = torch.randn(unary.shape, device=device)

        def run(reference, mode=mode, unary=unary, feat=feat, grad=grad):
            def f():
                if mode == "inference":
                    with torch.no_grad():
                        crf(unary, feat, reference=reference)
                    return
                u = unary.detach().requires_grad_()
                crf.zero_grad(set_to_none=True)
                crf(u, feat.detach().requires_grad_(), reference=reference).backward(grad)
            return f
        fused = measure(run(False), device, repeats)
        ref = measure(run(True), device, max(2, repeats // 4), 1)
        out.append((f"PacCRF {MODEL} {mode} {size}^2", {"fused": fused, "reference": ref}))
    return out


def rows_segaware(device, q, repeats):
    import segaware as S

    x, emb, w, b, lam = S._conv3_inputs(device)
    if q:
        x, emb = x[:, :, :24, :24].detach().requires_grad_(), emb[:, :, :24, :24].detach()
        emb.requires_grad_()
    inputs = (x, emb, w, b, lam)
    g = torch.randn(x.shape[0], w.shape[0], *x.shape[-2:], device=device)

    def run(fn):
        def f():
            for t in inputs:
                t.grad = None
            fn(*inputs).backward(g)
        return f
    fused = measure(run(S.conv3_fused), device, repeats)
    unfused = measure(run(S.conv3_unfused), device, repeats)
    return [(f"segaware conv3 256->256 k3 d2 {x.shape[-1]}^2 fwd+bwd",
             {"fused": fused, "unfused chain": unfused})]


def rows_main_job(device, q, repeats):
    import pacnet

    crop = 16 if q else 48
    shapes = {"target": (2, 1, crop // 8, crop // 8), "guide": (2, 3, crop, crop),
              "gt": (2, 1, crop, crop)}
    torch.manual_seed(0)
    net = pacnet.build("jointupsample/pac_joint_upsample_x8", inputs=shapes, phase="train",
                       device=device)
    data = {k: torch.rand(v, device=device) for k, v in shapes.items()}
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        net.total_loss(net(**data)).backward()
        opt.step()
    return [(f"main job: pac_joint_upsample_x8 train iteration, batch 2, {crop}^2",
             {"fused": measure(step, device, repeats)})]


ROWS = (rows_pac_conv, rows_pac_conv3d, rows_conv_transpose, rows_crf, rows_segaware, rows_main_job)


# ----------------------------------------------------------------------------- driver

def run_checks(device: torch.device) -> bool:
    ok = True
    for script in ("cudasim_pac.py", "cudasim_segaware.py"):
        path = os.path.join(ROOT, "tests", script)
        env = dict(os.environ)
        env.pop("PACNET_BACKEND", None)
        if device.type == "cuda":
            cmd = [sys.executable, path, "--gpu"]
            env.pop("NUMBA_ENABLE_CUDASIM", None)
        else:  # no GPU: the simulator runs the same checks
            cmd = [sys.executable, path]
            env["NUMBA_ENABLE_CUDASIM"] = "1"
        t0 = time.time()
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        last = (out.stdout.strip().splitlines() or ["(no output)"])[-1]
        print(f"check {script}{' --gpu' if device.type == 'cuda' else ' (simulator)'}: "
              f"{last} [{time.time() - t0:.0f} s]")
        if out.returncode != 0:
            print(out.stdout[-3000:] + out.stderr[-3000:])
            ok = False
    return ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="tiny shapes (to test the script)")
    ap.add_argument("--skip-checks", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu (--quick) to try the script")
        return 2
    if device.type == "cuda":
        torch.cuda.set_device(device)
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU ({torch.get_num_threads()} threads)"
    print(f"pacnet GPU benchmark on {name}; torch {torch.__version__}, TF32 matmul "
          f"{torch.backends.cuda.matmul.allow_tf32}, cuDNN TF32 {torch.backends.cudnn.allow_tf32}")
    if not args.skip_checks and not run_checks(device):
        print("kernel checks FAILED: no table")
        return 1
    print(f"{'case':<62} {'variant':<14} {'median ms':>10} {'extra MiB':>10} {'vs fused':>9}")
    for rows in ROWS:
        for tag, variants in rows(device, args.quick, max(1, args.repeats)):
            fused_t = variants["fused"][0]
            for variant, (t, mem) in variants.items():
                ratio = "" if variant == "fused" else f"{t / fused_t:8.2f}x"
                print(f"{tag:<62.62} {variant:<14} {t * 1e3:>10.2f} {mem:>10.1f} {ratio:>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
