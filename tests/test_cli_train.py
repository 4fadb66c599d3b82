"""`pacnet train`, `pacnet test`, `pacnet time` through pacnet.cli.main.main, and the trainer
features they rely on (step events, interrupt snapshots, --amp, the bilinear baseline).

One tiny joint-upsampling net (x8, 16 x 16 crops, 6 iterations) keeps every run to a few seconds."""

from __future__ import annotations

import math
import os
import shutil
import signal
import sys
import time

import pytest
import torch

from pacnet.cli.main import main
from pacnet.engine import trainer
from pacnet.engine.checkpoint import CheckpointManager, load_weights
from pacnet.engine.workdir import WorkDir

# gt is an Input layer of the train phase only (as in the zoo's joint-upsampling nets): the
# test net built during training must not ask the data for it.
TINY = """\
name: tiny_depth
pacnet_version: 1
inputs:
  guide: [N, 3, H, W]
  target: [N, 1, h, w]
dims: {N: 1, H: 32, W: 32, h: 4, w: 4}
data:
  dataset: synthetic_depth
  factor: 8
  size: 6
  height: 32
  width: 32
  batch_size: 2
  train: {crop_size: 16, mirror: true}
  test: {size: 4}
solver: {type: Adam, base_lr: 0.01, momentum: 0.9, max_iter: 6, snapshot: 3, random_seed: 1,
         display: 1, test_interval: 3, test_iter: 2, test_initialization: false}
layers:
  - {name: gt, type: Input, top: gt, shape: [[N, 1, H, W]], include: {phase: train}}
  - {name: up, type: Interp, bottom: [target, guide], top: up}
  - {name: g1, type: Convolution, bottom: guide, top: g1, num_output: 3, kernel_size: 3, pad: 1,
     weight_filler: {type: msra}}
  - {name: cat, type: Concat, bottom: [up, g1], top: cat}
  - {name: out, type: Convolution, bottom: cat, top: out, num_output: 1, kernel_size: 3, pad: 1,
     weight_filler: {type: msra}}
  - {name: loss, type: EuclideanLoss, bottom: [out, gt], top: loss, include: {phase: train}}
"""


@pytest.fixture(scope="module")
def net_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("net") / "tiny.yaml"
    path.write_text(TINY)
    return str(path)


def _train(net, work_dir, *extra):
    return main(["train", net, "--work-dir", str(work_dir), "--no-tensorboard", *extra])


def _losses(work_dir):
    return [(r["step"], r["loss"]) for r in WorkDir(str(work_dir), tensorboard=False).read_metrics("train")]


def _weights(work_dir):
    ck = CheckpointManager(os.path.join(str(work_dir), "checkpoints")).latest()
    return ck.iteration, load_weights(ck.weights)[0]


@pytest.fixture
def busy():
    """A process spinning beside the tests, with torch on more than one thread: the conditions
    under which a resumed run once differed from the uninterrupted one (issue 12)."""
    import subprocess

    if (os.cpu_count() or 1) > 1:
        assert torch.get_num_threads() > 1
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    yield spinner
    spinner.kill()
    spinner.wait()


@pytest.fixture(scope="module")
def reference(net_file, tmp_path_factory):
    """One uninterrupted run of 6 iterations: the work dir every other run is compared with."""
    work_dir = tmp_path_factory.mktemp("ref") / "run"
    assert _train(net_file, work_dir) == 0
    return work_dir


def test_train_writes_the_work_dir_and_prints_the_summary(net_file, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    wd = tmp_path / "work_dirs" / "tiny_depth"  # the default work dir: work_dirs/<net name>
    os.makedirs(wd)
    (wd / "metrics.jsonl").write_text('{"step": 0, "phase": "train", "loss": 12345.0}\n')  # a run that died early
    assert main(["train", net_file, "--no-tensorboard"]) == 0
    out = capsys.readouterr().out
    assert "training tiny_depth on cpu" in out and "training done" in out
    assert "iteration 5: loss" in out and "snapshot: " in out
    assert "test at iteration 6: rmse = " in out and "bilinear_rmse = " in out
    assert "README x8: NYU v2 RMSE (cm)" in out and "8.36" in out and "4.59 (PacJointUpsample)" in out
    assert {p.name for p in wd.iterdir()} >= {"config.yaml", "environment.json", "metrics.jsonl", "checkpoints"}
    assert [c.iteration for c in CheckpointManager(str(wd / "checkpoints")).list()] == [3, 6]
    records = WorkDir(str(wd), tensorboard=False).read_metrics()
    assert [r["step"] for r in records if r["phase"] == "train"] == [0, 1, 2, 3, 4, 5]
    assert 12345.0 not in [r.get("loss") for r in records]  # the stale record is gone
    tests = [r for r in records if r["phase"] == "test"]
    assert [r["step"] for r in tests] == [3, 6]
    assert all(r["bilinear_rmse"] > 0 and r["batches"] == 2 for r in tests)


def test_existing_checkpoints_need_resume_and_are_not_touched(net_file, reference, capsys):
    files = sorted(os.listdir(reference / "checkpoints"))
    stamps = {f: os.stat(reference / "checkpoints" / f).st_mtime_ns for f in files}
    metrics = (reference / "metrics.jsonl").read_text()
    assert _train(net_file, reference) == 2
    err = capsys.readouterr().err
    assert f"work dir {reference} already holds checkpoints (latest: iter_00000006.safetensors)" in err
    assert "--resume" in err and "--work-dir" in err
    assert sorted(os.listdir(reference / "checkpoints")) == files
    assert {f: os.stat(reference / "checkpoints" / f).st_mtime_ns for f in files} == stamps
    assert (reference / "metrics.jsonl").read_text() == metrics


def test_weights_and_resume_exclude_each_other(net_file, tmp_path, capsys):
    assert _train(net_file, tmp_path / "run", "--resume", "--weights", "w.safetensors") == 2
    assert "not allowed with argument" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    assert _train(net_file, tmp_path / "run", "--resume", str(tmp_path / "nope.safetensors")) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_resume_continues_exactly(net_file, reference, busy, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(net_file, run, "--max-iter", "3") == 0
    assert _weights(run)[0] == 3
    assert _train(net_file, run, "--resume") == 0
    assert "resuming from" in capsys.readouterr().out
    assert _losses(run) == _losses(reference) and len(_losses(run)) == 6
    (it_a, a), (it_b, b) = _weights(reference), _weights(run)
    assert it_a == it_b == 6
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=key)
    # --resume in an empty work dir starts a new run
    assert _train(net_file, tmp_path / "fresh", "--resume", "--max-iter", "1") == 0
    assert "no checkpoint in" in capsys.readouterr().out


def test_a_damaged_checkpoint_is_refused_and_auto_resumes_from_the_newest_intact(net_file, reference, tmp_path,
                                                                                  capsys):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    newest = run / "checkpoints" / "iter_00000006.safetensors"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2:len(data) // 2 + 64] = bytes(64)  # still a valid safetensors file
    newest.write_bytes(data)
    assert _train(net_file, run, "--resume", "--max-iter", "9") == 2
    err = capsys.readouterr().err
    assert f"error: checkpoint weights {newest} is corrupt: its tensors do not match the SHA-256 checksum" in err
    assert "hint: --resume auto continues from the newest intact checkpoint (iter_00000003.safetensors)" in err
    assert "Traceback" not in err
    assert _train(net_file, run, "--resume", "auto") == 0
    out, err = capsys.readouterr()
    assert f"warning: skipping a damaged checkpoint: checkpoint weights {newest} is corrupt" in err
    assert "iter_00000003.safetensors (iteration 3)" in out
    assert _losses(run) == _losses(reference)  # iterations 3-5 again, exactly; iter_6 rewritten intact
    for key, value in _weights(reference)[1].items():
        torch.testing.assert_close(_weights(run)[1][key], value, rtol=0, atol=0, msg=key)
    # resuming the finished run trains nothing and names the checkpoint it holds
    stamp = newest.stat().st_mtime_ns
    assert _train(net_file, run, "--resume") == 0
    out, err = capsys.readouterr()
    assert "warning: the run already finished: iteration 6 of solver.max_iter 6; nothing to train" in err
    assert str(newest) in " ".join(out.split()) and "none" not in out
    assert newest.stat().st_mtime_ns == stamp


def test_weights_that_are_not_this_nets_are_refused(net_file, tmp_path, capsys):
    pth = tmp_path / "x8_pac_weights_epoch_5000.pth"
    torch.save({"conv.weight": torch.zeros(1)}, pth)
    assert main(["test", net_file, "--weights", str(pth)]) == 2
    err = capsys.readouterr().err
    assert "error: x8_pac_weights_epoch_5000.pth gives net tiny_depth nothing: none of its 1 " \
           "entries is a blob of the net (the file has conv.weight; the net has g1.weight" in err
    assert "delete" not in err and "corrupt" not in err
    other = tmp_path / "other.safetensors"
    from pacnet.tensorfile import write_safetensors

    write_safetensors(str(other), {"conv1_1.weight": torch.zeros(2), "fc8.bias": torch.zeros(2)})
    assert _train(net_file, tmp_path / "run", "--weights", str(other)) == 2
    err = capsys.readouterr().err
    assert "error: other.safetensors gives net tiny_depth nothing: none of its 2 entries is a " \
           "blob of the net (the file has conv1_1.weight, fc8.bias; the net has g1.weight" in err


def test_sigterm_saves_a_snapshot_that_resumes_exactly(net_file, reference, busy, tmp_path, monkeypatch,
                                                       capsys):
    """SIGTERM during iteration 2's progress update: exit 130, snapshot of iteration 3."""
    from pacnet.cli import train as train_cli

    original = train_cli._Display.__call__

    def signalling(self, event):
        original(self, event)
        if event["event"] == "step" and event["step"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # the handler raises KeyboardInterrupt here

    monkeypatch.setattr(train_cli._Display, "__call__", signalling)
    run = tmp_path / "run"
    before = signal.getsignal(signal.SIGTERM)
    assert _train(net_file, run) == 130
    assert signal.getsignal(signal.SIGTERM) == before
    snap = str(run / "checkpoints" / "iter_00000003.safetensors")
    assert f"interrupted at iteration 3: snapshot {snap} (continue with --resume)" in capsys.readouterr().err
    import pacnet

    net = pacnet.build(net_file, phase="train")
    state = CheckpointManager(str(run / "checkpoints")).load(snap, net)
    assert state["iteration"] == 3 and state["extra"]["data_position"] == 3 * 2  # 3 batches of 2 read
    monkeypatch.setattr(train_cli._Display, "__call__", original)
    assert _train(net_file, run, "--resume") == 0
    assert _losses(run) == _losses(reference)
    for key, value in _weights(reference)[1].items():
        torch.testing.assert_close(_weights(run)[1][key], value, rtol=0, atol=0, msg=key)


def test_interrupt_in_the_trainer_snapshots_and_reraises(net_file, tmp_path):
    events = []

    def on_event(event):
        events.append(event)
        if event["event"] == "step" and event["step"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        trainer.train(net_file, str(tmp_path / "run"), on_event=on_event, tensorboard=False)
    steps = [e for e in events if e["event"] == "step"]
    assert [e["step"] for e in steps] == [0, 1] and all(math.isfinite(e["loss"]) and e["lr"] == 0.01 for e in steps)
    assert events[-1] == {"event": "interrupted", "step": 2,
                          "path": str(tmp_path / "run" / "checkpoints" / "iter_00000002.safetensors")}
    assert "done" not in [e["event"] for e in events]
    assert _weights(tmp_path / "run")[0] == 2


def test_interrupt_mid_iteration_undoes_it(net_file, tmp_path, monkeypatch):
    """Ctrl-C inside iteration 2's forward (after its dropout draws): the snapshot is that of
    iteration 2 with the RNG as it was before, so resuming equals the uninterrupted run."""
    import yaml

    net = yaml.safe_load(TINY)
    net["layers"].insert(4, {"name": "drop", "type": "Dropout", "bottom": "cat", "top": "cat", "dropout_ratio": 0.5})
    net["solver"].update(test_interval=0, display=1)
    whole = trainer.train(net, str(tmp_path / "whole"), tensorboard=False)
    calls = []
    original = trainer.total_loss

    def interrupted(model, outputs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the forward (and its dropout mask) of iteration 2 is done
        return original(model, outputs)

    monkeypatch.setattr(trainer, "total_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(net, str(tmp_path / "split"), tensorboard=False)
    monkeypatch.setattr(trainer, "total_loss", original)
    state = torch.load(str(tmp_path / "split" / "checkpoints" / "iter_00000002.state.pt"), weights_only=True)
    assert state["iteration"] == 2 and state["extra"]["data_position"] == 2 * 2
    trainer.train(net, str(tmp_path / "split"), tensorboard=False)
    assert _losses(tmp_path / "split") == _losses(tmp_path / "whole")
    for key, value in whole["net"].state_dict().items():
        torch.testing.assert_close(_weights(tmp_path / "split")[1][key], value, rtol=0, atol=0, msg=key)


def test_interrupts_are_held_during_the_update():
    reached = []
    with pytest.raises(KeyboardInterrupt):
        with trainer._interrupts_held():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            reached.append("after the signal")
    assert reached == ["after the signal"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_diverging_loss_is_a_clear_error_and_keeps_the_last_checkpoint(net_file, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(net_file, run, "--set", "solver.base_lr=1e30", "--set", "solver.snapshot=1") == 2
    err = capsys.readouterr().err
    assert "error: the loss became" in err and "at iteration 1" in err
    assert f"the last good checkpoint is kept: {run / 'checkpoints' / 'iter_00000001.safetensors'}" in err
    assert "Traceback" not in err
    assert [c.iteration for c in CheckpointManager(str(run / "checkpoints")).list()] == [1]
    assert all(torch.isfinite(v).all() for v in _weights(run)[1].values())


def test_amp_runs_the_forward_in_bfloat16(net_file, reference, tmp_path):
    assert _train(net_file, tmp_path / "amp", "--amp", "--max-iter", "2") == 0
    (step, amp_loss), (_, fp32_loss) = _losses(tmp_path / "amp")[0], _losses(reference)[0]
    assert step == 0 and amp_loss != fp32_loss  # same weights and batch: only bfloat16 rounding differs
    assert amp_loss == pytest.approx(fp32_loss, rel=0.05)


# TINY with a pixel-adaptive transposed convolution (the joint-upsampling nets' layer): the
# low-res target's features upsampled x2, guided by the guide's features at that size.
TINY_PAC = TINY.replace("name: tiny_depth", "name: tiny_pac").replace(
    "max_iter: 6, snapshot: 3", "max_iter: 24, snapshot: 100").replace(
    "test_interval: 3", "test_interval: 100").replace("""  - {name: cat, type: Concat, bottom: [up, g1], top: cat}
""", """  - {name: g4, type: Resize, bottom: g1, top: g4, scale_factor: 0.25, mode: bilinear,
     align_corners: false}
  - {name: t1, type: Convolution, bottom: target, top: t1, num_output: 4, kernel_size: 3, pad: 1,
     weight_filler: {type: msra}}
  - {name: pac, type: PacConvTranspose, bottom: [t1, g4], top: pac, num_output: 4,
     kernel_size: 5, stride: 2, pad: 2, output_pad: 1}
  - {name: pac_up, type: Interp, bottom: [pac, guide], top: pac_up}
  - {name: cat, type: Concat, bottom: [up, g1, pac_up], top: cat}
""")


def test_amp_training_of_a_pac_net_converges_like_float32(tmp_path):
    """bfloat16 autocast around a net with PAC layers (which the CPU kernels compute in
    float32) follows the float32 run's loss curve."""
    net = tmp_path / "tiny_pac.yaml"
    net.write_text(TINY_PAC)
    assert _train(str(net), tmp_path / "fp32") == 0
    assert _train(str(net), tmp_path / "amp", "--amp") == 0
    fp32, amp = ([loss for _, loss in _losses(tmp_path / run)] for run in ("fp32", "amp"))
    assert len(fp32) == len(amp) == 24
    start, end = sum(fp32[:4]) / 4, sum(fp32[-4:]) / 4
    assert end < 0.7 * start  # it learns
    assert sum(amp[-4:]) / 4 == pytest.approx(end, rel=0.15)


def test_bilinear_baseline_is_the_upsampled_target_in_metres():
    options = {"metric": "rmse", "eval_border": 0}
    ev = trainer.Evaluator(options, ["pred"])
    target = torch.tensor([[[[0.0, 1.0], [1.0, 0.5]]]])
    value_range = torch.tensor([[[2.0, 6.0]]])  # min 2 m, max 6 m
    gt = torch.full((1, 1, 4, 4), 3.0)
    batch = {"target": target, "target_range": value_range, "gt_raw": gt}
    ev.update({"pred": torch.full((1, 1, 4, 4), 0.25)}, batch)  # 0.25 -> 3 m: a perfect prediction
    up = torch.nn.functional.interpolate(target, size=(4, 4), mode="bilinear", align_corners=False) * 4 + 2
    result = ev.compute()
    assert result["rmse"] == pytest.approx(0.0)
    assert result["bilinear_rmse"] == pytest.approx(float((up - gt).pow(2).mean().sqrt()), rel=1e-6)
    assert "bilinear_epe" not in result


@pytest.mark.parametrize("data, baseline, readme", [
    ({"dataset": "synthetic_video", "factor": 8}, "trilinear", False),
    ({"dataset": "synthetic_video", "factor": 8, "per_frame": True}, "bilinear", True),
    ({"dataset": "synthetic_depth", "factor": 8}, "bilinear", True),
    ({"dataset": "synthetic_depth", "factor": 3}, "bilinear", False),  # no figures for x3
])
def test_closing_table_puts_clips_beside_trilinear_and_images_beside_the_readme(data, baseline,
                                                                                   readme):
    from rich.console import Console

    from pacnet.cli.train import baseline_table

    con = Console(width=200, record=True)
    con.print(baseline_table({"rmse": 0.5, "bilinear_rmse": 2.0}, "net", data, "test set: net"))
    out = " ".join(con.export_text().split())
    assert f"test set: net vs {baseline} upsampling" in out and f"ratio to {baseline}" in out
    assert f"│ {baseline} │ 2 │ 1 │" in out and "│ net │ 0.5 │ 0.250 │" in out
    assert ("README x8: NYU v2 RMSE (cm)" in out and "4.59 (PacJointUpsample)" in out) is readme
    assert ("README" in out) is readme


def test_test_verb_prints_rmse_beside_bilinear(net_file, reference, tmp_path, capsys):
    last = [r for r in WorkDir(str(reference), tensorboard=False).read_metrics("test")][-1]
    out_dir = tmp_path / "pred"
    assert main(["test", net_file, "--weights", str(reference), "--save-predictions", str(out_dir)]) == 0
    out = capsys.readouterr().out
    from pacnet.cli.train import fmt

    assert "iter_00000006.safetensors on the test split, 4 samples, 2 batches" in out
    assert f"│ rmse │ {fmt(last['rmse'])} │" in " ".join(out.split())
    assert "bilinear_rmse" in out and fmt(last["bilinear_rmse"]) in out and "rmse/bilinear" in out
    assert sorted(os.listdir(out_dir)) == [f"{i:06d}.npy" for i in range(4)]
    assert main(["test", net_file, "--weights", str(reference), "--max-batches", "1"]) == 0
    assert "4 samples, 1 batches" in capsys.readouterr().out
    assert main(["test", net_file]) == 2
    assert "--weights" in capsys.readouterr().err


def test_time_verb_prints_the_layer_table(net_file, capsys):
    assert main(["time", net_file, "--iterations", "2", "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    for row in ("g1", "Convolution", "out", "loss", "EuclideanLoss", "forward", "backward", "forward-backward"):
        assert row in out
    assert "torch.utils.benchmark, 2 passes" in out
    assert main(["time", net_file, "--iterations", "0"]) == 2
    assert "--iterations/-n: must be >= 1, got 0" in capsys.readouterr().err
    assert main(["time", net_file, "--warmup", "-1"]) == 2
    assert "--warmup: must be >= 0, got -1" in capsys.readouterr().err
    assert main(["train", net_file, "--max-iter", "x"]) == 2
    assert "--max-iter: expected an integer, got 'x'" in capsys.readouterr().err


def test_short_openmp_spin_only_before_torch_loads(monkeypatch):
    from pacnet.cli.train import short_openmp_spin

    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    short_openmp_spin()  # torch is loaded in this process: OpenMP has read its settings already
    assert "GOMP_SPINCOUNT" not in os.environ
    monkeypatch.delitem(sys.modules, "torch")  # as in a fresh `pacnet train` process
    short_openmp_spin()
    assert os.environ["GOMP_SPINCOUNT"] == "10000"
    monkeypatch.setenv("GOMP_SPINCOUNT", "5")  # the user's choice wins
    short_openmp_spin()
    assert os.environ["GOMP_SPINCOUNT"] == "5"
    monkeypatch.delenv("GOMP_SPINCOUNT")
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    short_openmp_spin()
    assert "GOMP_SPINCOUNT" not in os.environ


SEG = """\
name: tiny_seg
inputs: {data: [N, 3, 16, 16], label: [N, 1, 16, 16]}
dims: {N: 1}
data: {dataset: synthetic_seg, size: 2, height: 16, width: 16, num_classes: 5, batch_size: 1}
solver: {base_lr: 0.01, max_iter: 1, test_interval: 1, test_iter: 1}
layers:
  - {name: score, type: Convolution, bottom: data, top: score, num_output: 21, kernel_size: 1}
  - {name: loss, type: SoftmaxWithLoss, bottom: [score, label], top: loss, include: {phase: train}}
"""


def test_messages_say_what_happened_where_and_what_to_do(tmp_path, capsys):
    seg = tmp_path / "seg.yaml"
    seg.write_text(SEG)
    assert _train(str(seg), tmp_path / "run") == 2  # 21 scores for 5 classes
    err = capsys.readouterr().err
    assert f"error: {seg}: the test net's prediction 'score' scores 21 classes but the data set " \
           "(synthetic_seg) has data.num_classes = 5" in err
    assert "--set data.num_classes=21" in err and "num_output 5" in err
    nodata = tmp_path / "nodata.yaml"
    nodata.write_text(SEG.replace("data: {dataset: synthetic_seg, size: 2, height: 16, width: 16, "
                                  "num_classes: 5, batch_size: 1}\n", ""))
    assert _train(str(nodata), tmp_path / "run2") == 2
    err = capsys.readouterr().err
    assert "data: missing: this command needs a data section naming a data set" in err
    assert "dataset: voc" in err and "synthetic_seg" in err and "synthetic_depth" not in err
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert main(["build", str(empty)]) == 2
    assert f"error: {empty}: the file is empty" in capsys.readouterr().err
    named = tmp_path / "named.yaml"
    named.write_text("inputs: {x: [1, 1, 2, 2]}\nlayers:\n  - {name: 5, type: ReLU, bottom: x, top: y}\n")
    assert main(["build", str(named)]) == 2
    assert f"error: {named}:3:6: layer name 5 is int, not text" in capsys.readouterr().err
    proto = tmp_path / "train.prototxt"  # a Caffe train net: its data layer becomes a data: record
    proto.write_text('layer { name: "data" type: "ImageSegData" top: "data" top: "label"\n'
                     '  image_data_param { root_folder: "/voc" source: "train.txt" batch_size: 1 }\n'
                     '  transform_param { crop_size: 8 } }\n'
                     'layer { name: "score" type: "Convolution" bottom: "data" top: "score"\n'
                     '  convolution_param { num_output: 2 kernel_size: 1 } }\n'
                     'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "score" bottom: "label" }\n')
    converted = tmp_path / "train.yaml"
    assert main(["convert", str(proto), "-o", str(converted)]) == 0
    capsys.readouterr()
    assert _train(str(converted), tmp_path / "run3", "--set", "solver.base_lr=0.1",
                  "--set", "solver.max_iter=1") == 2
    err = capsys.readouterr().err
    assert "data: this section lists the Caffe data layers of a converted prototxt (ImageSegData 'data')" in err
    assert "replace it with a data set section, e.g. data: {dataset: voc" in err and "MarkedList" not in err
