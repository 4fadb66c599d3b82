"""The Numba CUDA PAC kernels, checked without a GPU (see tests/cudasim_pac.py).

Both checks run the helper in a subprocess: the simulator must be switched on before numba
is imported, and the PTX compile must not see it switched on.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

HELPER = Path(__file__).with_name("cudasim_pac.py")
ROOT = HELPER.parent.parent


def _run(*args, timeout):
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    env.pop("PACNET_BACKEND", None)
    return subprocess.run([sys.executable, str(HELPER), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


@pytest.mark.cudasim
def test_cuda_kernels_match_reference_in_simulator():
    out = _run(timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "0 failure(s)" in out.stdout
    # every op, forward and all gradients, was compared
    for what in ("dist", "conv shared=False", "conv shared=True", "pool kc=1", "pool kc=3"):
        assert f"{what}" in out.stdout
    for geometry in ("g0 5x6", "g3 3x4x5", "g6 7 "):  # 2-D, 3-D, 1-D
        assert geometry in out.stdout
    for what in ("fwd", "grad guide", "grad center", "grad x", "grad K", "grad weight"):
        assert f" {what}: max err" in out.stdout


@pytest.mark.cudasim
@pytest.mark.slow
def test_cuda_kernels_match_reference_in_simulator_every_geometry():
    """Also the volumes the default run leaves out (strided, padded beyond the half window,
    a depth-1 volume with depth padding)."""
    out = _run("--all", timeout=1200)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "0 failure(s)" in out.stdout and "g5 1x4x5" in out.stdout


@pytest.mark.cudasim
def test_cuda_kernels_compile_to_ptx():
    """Real NVVM compile for sm_90 (float32 and float64) where a CUDA toolkit is installed."""
    out = _run("--ptx", timeout=600)
    if out.returncode == 3:
        pytest.skip("no CUDA toolkit (NVVM/NVRTC) to compile PTX with: " + out.stdout.strip())
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "0 failure(s)" in out.stdout
