"""Exact resume in fresh processes, under load (issue 12): the PAC joint-upsampling net (Numba
kernels and MKL GEMMs on 2 threads) trains 3 iterations and snapshots; then, many times, a new
`pacnet train --resume` process continues it to 6 with busy processes beside it, and every
weight must equal the uninterrupted run's bit for bit.  Slow: python -m pytest -m slow."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from pacnet.engine.checkpoint import CheckpointManager, load_weights

NET = "jointupsample/pac_joint_upsample_x8"
ARGS = ["--no-tensorboard", "--set", "solver.test_interval=0", "--set", "solver.snapshot=3",
        "--set", "solver.display=1"]
REPEATS = int(os.environ.get("PACNET_RESUME_REPEATS", "20"))


def _train(work_dir, *extra):
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)  # torch and Numba on every core
    done = subprocess.run([sys.executable, "-m", "pacnet", "train", NET, "--work-dir", str(work_dir),
                           *ARGS, *extra], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def _final(work_dir):
    ck = CheckpointManager(os.path.join(str(work_dir), "checkpoints")).latest()
    return ck.iteration, load_weights(ck.weights)[0]


@pytest.mark.slow
def test_resume_is_bit_exact_in_fresh_processes_under_load(tmp_path):
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        _train(tmp_path / "whole", "--max-iter", "6")
        _train(tmp_path / "half", "--max-iter", "3")
        it, expected = _final(tmp_path / "whole")
        assert it == 6
        for repeat in range(REPEATS):
            run = tmp_path / f"resumed{repeat}"
            shutil.copytree(tmp_path / "half", run)
            _train(run, "--max-iter", "6", "--resume")
            it, got = _final(run)
            assert it == 6
            for key, value in expected.items():
                torch.testing.assert_close(got[key], value, rtol=0, atol=0,
                                           msg=f"repeat {repeat}: {key}")
            shutil.rmtree(run)
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
