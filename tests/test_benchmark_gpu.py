"""benchmarks/gpu.py (the issue-13 GPU check and table) without a GPU: it refuses a missing
device with a hint, and (``-m slow``) runs end to end on the CPU with tiny shapes."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu.py"


def _module():
    spec = importlib.util.spec_from_file_location("pacnet_bench_gpu", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_it_says_how_to_try_it(capsys):
    assert _module().main(["--device", "cuda"]) == 2
    assert "--device cpu" in capsys.readouterr().out


def test_measure_reports_a_median():
    mod = _module()
    calls = []
    t, mem = mod.measure(lambda: calls.append(1), torch.device("cpu"), repeats=3, warmup=1)
    assert len(calls) == 4 and t >= 0 and mem != mem  # NaN memory on the CPU


@pytest.mark.slow
def test_runs_end_to_end_on_the_cpu():
    out = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick",
                          "--repeats", "1"], capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for row in ("PacConv2d(8, 8, 5)", "PacConv3d(4, 4, 3)", "PacConvTranspose2d", "PacCRF",
                "segaware conv3", "main job"):
        assert row in out.stdout
    assert out.stdout.count("check ") == 2 and "0 failure(s)" in out.stdout
