"""benchmarks/pac3d.py (issue 16's CPU figures) end to end on a tiny volume (``-m slow``): both
backends in fresh processes, the ratio row and the verdict on the targets."""

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "pac3d.py"


@pytest.mark.slow
def test_pac3d_benchmark_runs_and_judges_the_targets():
    out = subprocess.run([sys.executable, str(SCRIPT), "--sizes", "8", "--procs", "1",
                          "--repeats", "1"], capture_output=True, text=True, timeout=600)
    assert out.returncode in (0, 1), out.stdout[-3000:] + out.stderr[-3000:]  # 1: a target missed
    lines = out.stdout.splitlines()
    assert lines[0].startswith("PacConv3d(16, 16, 3, padding=1), guide 4 ch, batch 1, float32")
    for backend in ("reference", "numba", "ratio"):
        assert any(line.split()[:2] == ["8^3", backend] for line in lines), out.stdout
    assert lines[-1].startswith("targets: >= 4x faster, <= 1/10 of the extra memory: ")
    assert lines[-1].endswith("met") == (out.returncode == 0)
