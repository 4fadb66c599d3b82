"""pacnet.engine.checkpoint and workdir: atomic checkpoints, resume, refusal of bad files."""

import json
import os
import random

import numpy as np
import pytest
import torch
from torch import nn

from pacnet.errors import DamagedFileError, DataError, OutputError
from pacnet.engine.checkpoint import (
    CheckpointManager, capture_rng_state, check_compatible, load_state, load_weights, restore_rng_state,
    save_weights, seed_everything,
)
from pacnet.engine.solver import Solver
from pacnet.engine.workdir import WorkDir, plain
from pacnet.tensorfile import tensor_digest


class Net(nn.Module):
    def __init__(self, width=4):
        super().__init__()
        self.conv = nn.Conv2d(2, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, 3)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).mean((2, 3)))


class SharedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3, bias=False)
        self.b = nn.Linear(3, 3, bias=False)
        self.b.weight = self.a.weight


def train(model, solver, x, n):
    for _ in range(n):
        solver.step(lambda: (model(x) ** 2).mean() + torch.rand(()) * 0)


def test_rng_state_round_trip_through_weights_only_load(tmp_path):
    seed_everything(3)
    state = capture_rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expect = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)], np.random.randn())
    torch.rand(5), np.random.rand(7), random.random()
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)], np.random.randn())
    assert torch.equal(expect[0], got[0]) and np.array_equal(expect[1], got[1])
    assert expect[2] == got[2] and expect[3] == got[3]


def test_weights_are_safetensors_with_every_key_and_a_checksum(tmp_path):
    from safetensors.torch import load_file

    m = SharedNet()
    path = str(tmp_path / "w.safetensors")
    save_weights(path, m.state_dict(), {"iteration": "5"})
    plain = load_file(path)  # any safetensors reader gets every key, a shared blob under each name
    assert sorted(plain) == ["a.weight", "b.weight"] and torch.equal(plain["b.weight"], m.a.weight)
    weights, meta = load_weights(path)
    assert meta["iteration"] == "5" and meta["pacnet.sha256"] == tensor_digest(plain)
    fresh = SharedNet()
    fresh.load_state_dict(weights)
    assert fresh.b.weight is fresh.a.weight and torch.equal(fresh.a.weight, m.a.weight)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]
    again = str(tmp_path / "again.safetensors")  # the bytes are a function of the tensors
    save_weights(again, dict(reversed(list(m.state_dict().items()))), {"iteration": "5"})
    assert open(again, "rb").read() == open(path, "rb").read()


def test_files_of_earlier_versions_with_aliases_still_load(tmp_path):
    from safetensors.torch import save_file

    path = str(tmp_path / "old.safetensors")
    save_file({"a.weight": torch.ones(3, 3)}, path, metadata={"format": "pt",
                                                           "pacnet.aliases": '{"b.weight": "a.weight"}'})
    weights, _ = load_weights(path)  # no checksum: read as it is
    assert weights["b.weight"] is weights["a.weight"]


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    conf = {"base_lr": 0.05, "max_iter": 6, "momentum": 0.9, "lr_policy": "step", "gamma": 0.5,
            "stepsize": 2, "weight_decay": 1e-3, "average_loss": 2}
    seed_everything(0)
    x = torch.randn(4, 2, 5, 5)
    init = Net().state_dict()

    def fresh():
        m = Net()
        m.load_state_dict(init)
        return m, Solver(conf, m)

    ref, s_ref = fresh()
    seed_everything(1)
    train(ref, s_ref, x, 3)
    noise_ref = torch.rand(4)  # the RNG stream continues after iteration 3
    train(ref, s_ref, x, 3)

    a, s_a = fresh()
    seed_everything(1)
    train(a, s_a, x, 3)
    mgr = CheckpointManager(str(tmp_path / "ck"))
    ck = mgr.save(s_a.iter, a, solver=s_a, extra={"data_position": 12})
    assert os.path.basename(ck.weights) == "iter_00000003.safetensors"
    torch.rand(100)  # disturb the RNG; loading must restore it

    b, s_b = fresh()
    state = mgr.load(mgr.latest(), b, solver=s_b)
    assert state["iteration"] == 3 and state["extra"] == {"data_position": 12}
    assert torch.equal(torch.rand(4), noise_ref)
    train(b, s_b, x, 3)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(b.state_dict()[k], v, msg=k)
    assert s_b.smoothed_loss == pytest.approx(s_ref.smoothed_loss)


def test_keep_last_and_latest(tmp_path):
    m = Net()
    mgr = CheckpointManager(str(tmp_path), keep_last=2)
    for it in (10, 20, 30):
        mgr.save(it, m)
    assert [c.iteration for c in mgr.list()] == [20, 30]
    assert sorted(os.listdir(tmp_path)) == ["iter_00000020.safetensors", "iter_00000020.state.pt",
                                            "iter_00000030.safetensors", "iter_00000030.state.pt"]
    # a save interrupted between the two files (weights only) does not count
    save_weights(str(tmp_path / "iter_00000040.safetensors"), m.state_dict())
    (tmp_path / ".tmp-iter_00000050.state.pt-xyz").write_bytes(b"partial")
    assert mgr.latest().iteration == 30
    assert CheckpointManager(str(tmp_path / "none")).latest() is None


def test_incompatible_checkpoints_are_refused_naming_the_file(tmp_path):
    mgr = CheckpointManager(str(tmp_path))
    ck = mgr.save(1, Net(width=4))
    with pytest.raises(DataError) as info:
        mgr.load(ck, Net(width=8))
    text = str(info.value)
    assert ck.weights in text and "another shape (conv.weight: file [4, 2, 3, 3], net [8, 2, 3, 3]" in text

    class Renamed(Net):
        def __init__(self):
            super().__init__()
            self.extra = nn.Linear(1, 1)

    with pytest.raises(DataError, match=r"2 blob\(s\) of the net missing \(extra.weight, extra.bias\)"):
        mgr.load(ck, Renamed())
    with pytest.raises(DataError, match="not in the net"):
        check_compatible({"a": torch.zeros(1), "b": torch.zeros(2)}, {"a": (1,)}, "x.safetensors")


def test_solver_state_that_does_not_fit_is_refused(tmp_path):
    m = Net()
    s = Solver({"base_lr": 0.1, "max_iter": 2, "momentum": 0.9}, m)
    train(m, s, torch.randn(2, 2, 4, 4), 1)
    mgr = CheckpointManager(str(tmp_path))
    ck = mgr.save(1, m, solver=s)
    m2 = Net()
    s2 = Solver({"base_lr": 0.1, "max_iter": 2, "momentum": 0.9}, m2, {"fc.bias": (2, 0)})
    with pytest.raises(DataError, match=r"cannot resume from .*iter_00000001.state.pt"):
        mgr.load(ck, m2, solver=s2)
    s3 = Solver({"base_lr": 0.1, "max_iter": 2, "type": "Adam"}, Net())
    with pytest.raises(DataError, match="cannot resume a SGD solver state with a Adam solver"):
        mgr.load(ck, s3.model, solver=s3)
    nosolver = mgr.save(2, m)
    with pytest.raises(DataError, match="holds no solver state"):
        mgr.load(nosolver, m, solver=s)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_files_give_data_errors(tmp_path, damage):
    mgr = CheckpointManager(str(tmp_path))
    ck = mgr.save(7, Net())
    for path in (ck.weights, ck.state):
        data = open(path, "rb").read()
        with open(path, "wb") as f:
            f.write({"truncate": data[: len(data) // 2], "garbage": b"\x00garbage" * 10, "empty": b""}[damage])
    with pytest.raises(DataError, match=r"iter_00000007.safetensors"):
        load_weights(ck.weights)
    with pytest.raises(DataError, match=r"iter_00000007.state.pt"):
        load_state(ck.state)
    with pytest.raises(DataError, match=r"iter_00000007"):
        mgr.load(ck, Net())


def _zero_bytes(path, offset, n=64):
    data = bytearray(open(path, "rb").read())
    data[offset:offset + n] = bytes(n)
    open(path, "wb").write(data)


def test_damage_that_still_parses_is_caught_by_the_checksums(tmp_path):
    """64 zero bytes inside the tensor data of either file: both files still load, and only
    the checksums tell; the damaged file is named and nothing is loaded into the net."""
    mgr = CheckpointManager(str(tmp_path))
    m, x = Net(width=16), torch.randn(4, 2, 6, 6)
    s = Solver({"type": "Adam", "base_lr": 0.1, "max_iter": 5}, m)
    train(m, s, x, 2)
    ck = mgr.save(2, m, solver=s)
    weights_raw, state_raw = open(ck.weights, "rb").read(), open(ck.state, "rb").read()
    rng_bytes = torch.get_rng_state().numpy().tobytes()[:64]  # the state file's torch RNG tensor
    rng_at = state_raw.find(capture_rng_state()["torch"].numpy().tobytes()[:64])
    assert rng_at > 0 and rng_bytes
    for path, offset in ((ck.weights, len(weights_raw) // 2), (ck.state, rng_at)):
        _zero_bytes(path, offset)
        fresh = Net(width=16)
        before = {k: v.clone() for k, v in fresh.state_dict().items()}
        with pytest.raises(DamagedFileError, match="corrupt") as info:
            mgr.load(ck, fresh, solver=Solver({"type": "Adam", "base_lr": 0.1, "max_iter": 5}, fresh))
        assert path in str(info.value) and "SHA-256" in str(info.value)
        assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())
        open(ck.weights, "wb").write(weights_raw)
        open(ck.state, "wb").write(state_raw)
    torch.load(ck.state, weights_only=True)  # (the damaged state file did load: only its checksum caught it)
    assert mgr.load(ck, Net(width=16))["iteration"] == 2


def test_a_weights_file_from_another_checkpoint_is_refused(tmp_path):
    mgr = CheckpointManager(str(tmp_path))
    a, b = mgr.save(1, Net()), mgr.save(2, Net())
    os.replace(a.weights, b.weights)  # intact files, but not a pair
    with pytest.raises(DamagedFileError, match="iter_00000002.safetensors is not the weights file saved with"):
        mgr.load(b, Net())


def test_latest_intact_skips_damaged_checkpoints(tmp_path):
    mgr = CheckpointManager(str(tmp_path))
    for it in (1, 2, 3):
        mgr.save(it, Net())
    _zero_bytes(mgr.paths(3).weights, 200)
    open(mgr.paths(2).state, "wb").write(b"garbage")
    intact, damaged = mgr.latest_intact()
    assert intact.iteration == 1 and [c.iteration for c, _ in damaged] == [3, 2]
    assert all(isinstance(e, DamagedFileError) for _, e in damaged)


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_written_files_follow_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        wd = WorkDir(str(tmp_path / "run"), tensorboard=False)
        wd.checkpoints().save(1, Net())
        wd.write_config({"name": "n"})
        wd.write_environment()
        wd.log(0, {"loss": 1.0})
        wd.log(1, {"loss": 1.0})
        wd.truncate_metrics(0)  # rewrites metrics.jsonl atomically
        files = [os.path.join(d, f) for d, _, names in os.walk(wd.path) for f in names]
    finally:
        os.umask(previous)
    assert len(files) == 5
    for path in files:
        assert oct(os.stat(path).st_mode & 0o777) == oct(0o666 & ~umask), path


def test_state_files_never_unpickle_objects(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    path = tmp_path / "iter_00000001.state.pt"
    torch.save({"format": 1, "x": Evil()}, path)
    with pytest.raises(DataError, match="cannot read training state"):
        load_state(str(path))
    assert not (tmp_path / "pwned").exists()
    torch.save({"format": 99}, path)
    with pytest.raises(DataError, match="not a pacnet training state"):
        load_state(str(path))
    with pytest.raises(DataError, match="not a checkpoint file"):
        CheckpointManager(str(tmp_path)).load(str(tmp_path / "w.bin"), Net())
    with pytest.raises(DataError, match="weights file not found"):
        load_weights(str(tmp_path / "missing.safetensors"))


def test_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    mgr = CheckpointManager(str(tmp_path))
    mgr.save(1, Net())

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OutputError, match=r"cannot write .*iter_00000002.state.pt: No space left on device"):
        mgr.save(2, Net())
    assert mgr.latest().iteration == 1
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]


# ----------------------------------------------------------------------------- work dir


def test_work_dir_layout_config_environment_metrics(tmp_path):
    from types import MappingProxyType

    with WorkDir(str(tmp_path / "run"), tensorboard=False) as wd:
        cfg = MappingProxyType({"name": "net", "solver": {"base_lr": 0.1, "stepvalue": (1, 2)},
                                "layers": [{"name": "conv", "shape": torch.Size([1, 2])}]})
        wd.write_config(cfg)
        assert wd.read_config() == {"name": "net", "solver": {"base_lr": 0.1, "stepvalue": [1, 2]},
                                    "layers": [{"name": "conv", "shape": [1, 2]}]}
        env = wd.write_environment(argv=["pacnet", "train", "net.yaml"], device="cpu")
        saved = json.load(open(wd.environment_path))
        assert saved["argv"] == ["pacnet", "train", "net.yaml"] and saved["torch"] == torch.__version__
        assert env["device"] == "cpu" and "python" in env
        for step in (10, 20, 30):
            wd.log(step, {"loss": torch.tensor(1.5), "lr": 0.1, "bad": float("nan")})
        wd.log(20, {"mean_iou": 0.5}, phase="test")
        assert [r["step"] for r in wd.read_metrics("train")] == [10, 20, 30]
        assert wd.read_metrics("train")[0]["loss"] == 1.5 and wd.read_metrics("train")[0]["bad"] is None
        with open(wd.metrics_path, "a") as f:
            f.write('{"step": 40, "pha')  # torn by a crash
        assert len(wd.read_metrics()) == 4
        assert wd.truncate_metrics(20) == 1  # resuming at 20 drops step 30 (and the torn line)
        assert [r["step"] for r in wd.read_metrics()] == [10, 20, 20]
        assert os.path.isdir(wd.checkpoint_dir)
        ck = wd.checkpoints(keep_last=1).save(5, Net())
        assert os.path.dirname(ck.weights) == wd.checkpoint_dir
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="is not a folder"):
        WorkDir(str(tmp_path / "file"))
    with pytest.raises(DataError, match="work dir not found"):
        WorkDir(str(tmp_path / "nope"), create=False)


def test_work_dir_tensorboard_events(tmp_path):
    pytest.importorskip("tensorboard")
    with WorkDir(str(tmp_path / "run"), tensorboard=True) as wd:
        wd.log(1, {"loss": 2.0})
    events = os.listdir(os.path.join(wd.path, "tensorboard"))
    assert any(e.startswith("events.out.tfevents") for e in events)


def test_plain_makes_yaml_safe_values():
    assert plain({"a": (1, np.float32(2.5)), "b": torch.tensor([1, 2]), 3: None, "c": object}) == {
        "a": [1, 2.5], "b": [1, 2], "3": None, "c": "<class 'object'>"}


# ----------------------------------------------------------------------------- the train/test loop

import copy  # noqa: E402

from pacnet.errors import PacnetError  # noqa: E402
from pacnet.engine import trainer  # noqa: E402

DEPTH_NET = {
    "name": "tiny_depth",
    "inputs": {"guide": ["N", 3, "H", "W"], "target": ["N", 1, "h", "w"], "gt": ["N", 1, "H", "W"]},
    "dims": {"N": 1, "H": 32, "W": 32, "h": 4, "w": 4},
    "solver": {"type": "Adam", "base_lr": 0.01, "momentum": 0.9, "max_iter": 6, "snapshot": 3,
               "random_seed": 1, "lr_policy": "step", "gamma": 0.5, "stepsize": 2},
    "data": {"dataset": "synthetic_depth", "size": 6, "height": 32, "width": 32, "batch_size": 2,
             "train": {"crop_size": 16, "mirror": True}},
    "layers": [
        {"name": "up", "type": "Interp", "bottom": ["target", "guide"], "top": "up"},
        {"name": "g1", "type": "Convolution", "bottom": "guide", "top": "g1", "num_output": 3,
         "kernel_size": 3, "pad": 1, "weight_filler": {"type": "msra"}},
        {"name": "cat", "type": "Concat", "bottom": ["up", "g1"], "top": "cat"},
        {"name": "out", "type": "Convolution", "bottom": "cat", "top": "out", "num_output": 1,
         "kernel_size": 3, "pad": 1, "weight_filler": {"type": "msra"}},
        {"name": "loss", "type": "EuclideanLoss", "bottom": ["out", "gt"], "top": "loss",
         "include": {"phase": "train"}},
    ],
}

SEG_NET = {
    "name": "tiny_seg",
    "inputs": {"data": ["N", 3, 24, 24], "label": ["N", 1, 24, 24]},
    "dims": {"N": 1},
    "solver": {"base_lr": 1e-4, "momentum": 0.9, "max_iter": 4, "random_seed": 0},
    "data": {"dataset": "synthetic_seg", "size": 5, "height": 20, "width": 20, "num_classes": 3,
             "mean_value": [120, 120, 120], "crop_size": 24, "batch_size": 2},
    "layers": [
        {"name": "score", "type": "Convolution", "bottom": "data", "top": "score", "num_output": 3,
         "kernel_size": 3, "pad": 1, "weight_filler": {"type": "gaussian", "std": 0.01}},
        {"name": "loss", "type": "SoftmaxWithLoss", "bottom": ["score", "label"], "top": "loss",
         "ignore_label": 255, "include": {"phase": "train"}},
    ],
}


def _net(base, **solver):
    net = copy.deepcopy(base)
    net["solver"].update(solver)
    return net


def _final_weights(work_dir):
    ck = CheckpointManager(os.path.join(work_dir, "checkpoints")).latest()
    return ck.iteration, load_weights(ck.weights)[0]


def test_train_writes_the_work_dir_and_improves(tmp_path):
    events = []
    net = _net(DEPTH_NET, max_iter=12, snapshot=4, snapshot_keep=2, test_interval=6, test_iter=2, display=3)
    summary = trainer.train(net, str(tmp_path / "run"), on_event=events.append, tensorboard=False)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and kinds.count("snapshot") == 3
    tests = [e for e in events if e["event"] == "test"]
    assert [t["step"] for t in tests] == [0, 6, 12] and tests[-1]["rmse"] < tests[0]["rmse"]
    assert tests[0]["batches"] == 2  # test_iter
    wd = WorkDir(str(tmp_path / "run"), tensorboard=False)
    assert [r["step"] for r in wd.read_metrics("train")] == [0, 3, 6, 9]
    assert [r["step"] for r in wd.read_metrics("test")] == [0, 6, 12]
    assert wd.read_config()["solver"]["max_iter"] == 12
    assert json.load(open(wd.environment_path))["world_size"] == 1
    assert [c.iteration for c in wd.checkpoints().list()] == [8, 12]  # snapshot_keep 2
    assert summary["checkpoint"].endswith("iter_00000012.safetensors") and summary["step"] == 12


def test_resumed_training_matches_uninterrupted_training(tmp_path):
    trainer.train(DEPTH_NET, str(tmp_path / "whole"), tensorboard=False)
    first = _net(DEPTH_NET, max_iter=3, display=1)
    trainer.train(first, str(tmp_path / "split"), tensorboard=False)
    assert _final_weights(str(tmp_path / "split"))[0] == 3
    crashed = WorkDir(str(tmp_path / "split"), tensorboard=False)
    crashed.log(3, {"loss": 99.0})  # logged by a run that died before its next checkpoint
    events = []
    trainer.train(_net(DEPTH_NET, display=1), str(tmp_path / "split"), tensorboard=False,
                  on_event=events.append)
    records = crashed.read_metrics("train")
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4, 5] and 99.0 not in [r["loss"] for r in records]
    assert [e for e in events if e["event"] == "resume"] == [{
        "event": "resume", "step": 3, "path": str(tmp_path / "split" / "checkpoints" / "iter_00000003.safetensors")}]
    # max_iter changed (3 -> 6): the config the first part ran with is kept beside the new one
    warning = next(e["message"] for e in events if e["event"] == "warning")
    kept = [f for f in os.listdir(tmp_path / "split") if f.startswith("config.") and f != "config.yaml"]
    assert len(kept) == 1 and "changed: solver.max_iter" in warning and kept[0] in warning
    assert WorkDir(str(tmp_path / "split")).read_config()["solver"]["max_iter"] == 6
    import yaml

    assert yaml.safe_load(open(tmp_path / "split" / kept[0]))["solver"]["max_iter"] == 3
    (it_a, a), (it_b, b) = _final_weights(str(tmp_path / "whole")), _final_weights(str(tmp_path / "split"))
    assert it_a == it_b == 6
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
    # a fresh start ignores the checkpoints and reproduces the same run
    trainer.train(DEPTH_NET, str(tmp_path / "split"), resume=False, tensorboard=False)
    for k, v in _final_weights(str(tmp_path / "split"))[1].items():
        torch.testing.assert_close(v, a[k], rtol=0, atol=0)


def test_training_errors_are_clear(tmp_path):
    with pytest.raises(PacnetError, match="the loss became .* at iteration"):
        trainer.train(_net(DEPTH_NET, type="SGD", base_lr=1e6), str(tmp_path / "a"), tensorboard=False)
    renamed = _net(DEPTH_NET)
    renamed["data"]["blobs"] = {"gt": "depth"}
    with pytest.raises(DataError, match=r"net input 'gt' is not given by the SyntheticDepth data set") as info:
        trainer.train(renamed, str(tmp_path / "b"), tensorboard=False)
    assert "data.blobs" in str(info.value)
    with pytest.raises(DataError, match="checkpoint not found"):
        trainer.train(DEPTH_NET, str(tmp_path / "c"), resume=str(tmp_path / "nope.safetensors"), tensorboard=False)


def test_init_weights_follow_caffe_copy_trained_layers(tmp_path):
    import pacnet

    net = pacnet.build(DEPTH_NET, phase="train")
    path = str(tmp_path / "init.safetensors")
    state = {"g1.weight": torch.full_like(net.state_dict()["g1.weight"], 0.5), "other.weight": torch.zeros(2)}
    save_weights(path, state)
    assert trainer.copy_trained_layers(net, [path]) == {"copied": 1, "kept": 3, "ignored": 1}
    assert (net.state_dict()["g1.weight"] == 0.5).all()
    save_weights(path, {"g1.weight": torch.zeros(1)})
    with pytest.raises(DataError, match=r"init.safetensors does not fit net .*: g1.weight has shape \[1\]"):
        trainer.copy_trained_layers(net, [path])


def test_test_verb_measures_miou_and_writes_palette_pngs(tmp_path):
    from PIL import Image

    run = str(tmp_path / "run")
    trainer.train(SEG_NET, run, tensorboard=False)
    out = tmp_path / "pred"
    result = trainer.test(SEG_NET, run, out_dir=str(out))
    assert result["samples"] == 5 and result["written"] == 5 and 0 <= result["mean_iou"] <= 1
    img = Image.open(out / "000000.png")
    assert img.mode == "P" and img.size == (20, 20)  # cropped back to data_dim (the 24 x 24 crop is padding)
    assert set(np.unique(np.asarray(img))) <= {0, 1, 2}
    bad = str(tmp_path / "bad.safetensors")
    save_weights(bad, {"x": torch.zeros(1)})
    with pytest.raises(DataError, match=r"bad.safetensors gives net .* nothing"):
        trainer.test(SEG_NET, bad)
    two_outputs = copy.deepcopy(SEG_NET)
    two_outputs["layers"].append({"name": "prob", "type": "Softmax", "bottom": "score", "top": "prob",
                                  "include": {"phase": "test"}})
    two_outputs["outputs"] = ["score", "prob"]
    with pytest.raises(PacnetError, match="set data.predict"):
        trainer.test(two_outputs, None)
    two_outputs["data"]["predict"] = "prob"
    assert "mean_iou" in trainer.test(two_outputs, None)


def test_benchmark_times_forward_backward_and_layers():
    import pacnet

    net = pacnet.build(DEPTH_NET, phase="train")
    inputs = {"guide": torch.rand(1, 3, 32, 32), "target": torch.rand(1, 1, 4, 4), "gt": torch.rand(1, 1, 32, 32)}
    out = trainer.benchmark(net, inputs, iterations=2, warmup=1)
    assert out["forward_ms"] > 0 and out["backward_ms"] > 0
    assert set(out["layers"]) >= {"up", "g1", "out"}
    with pytest.raises(PacnetError, match="iterations"):
        trainer.benchmark(net, inputs, iterations=0)


def test_distributed_training_keeps_ranks_in_sync(tmp_path):
    """Two gloo ranks (forked): DDP averages gradients, rank 0 writes the checkpoint."""
    import torch.multiprocessing as mp

    if "fork" not in mp.get_all_start_methods():
        pytest.skip("needs the fork start method")
    mp.start_processes(_ddp_rank, args=(str(tmp_path),), nprocs=2, join=True, start_method="fork")
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    single = trainer.train(_net(DEPTH_NET, max_iter=4, snapshot=0), str(tmp_path / "one"), tensorboard=False)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
        assert not torch.equal(a[k], single["net"].state_dict()[k])  # two ranks saw more data
    it, saved = _final_weights(str(tmp_path / "run"))
    assert it == 4
    for k in saved:
        torch.testing.assert_close(saved[k], a[k])


def _ddp_rank(rank, folder):
    torch.set_num_threads(1)  # a forked child must not enter the parent's OpenMP pool
    os.environ.update({"WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29500 + os.getpid() % 1000)})
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{folder}/rdv", rank=rank, world_size=2)
    try:
        result = trainer.train(_net(DEPTH_NET, max_iter=4, snapshot=0), os.path.join(folder, "run"),
                               tensorboard=False, device="cpu")
        torch.save(result["net"].state_dict(), os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


DROPOUT_NET = copy.deepcopy(DEPTH_NET)
DROPOUT_NET["layers"].insert(3, {"name": "drop", "type": "Dropout", "bottom": "cat", "top": "cat",
                                 "dropout_ratio": 0.5})
DROPOUT_NET["solver"].update(max_iter=4, snapshot=2, lr_policy="fixed")


def _ddp_run(rank, folder, tag, max_iter, resume):
    """One rank of a 2-process gloo job: train DROPOUT_NET into folder/run, save this rank's
    final weights and torch RNG state as folder/<tag><rank>.pt."""
    torch.set_num_threads(1)  # a forked child must not enter the parent's OpenMP pool
    os.environ.update({"WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank)})
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{folder}/rdv-{tag}", rank=rank, world_size=2)
    try:
        net = copy.deepcopy(DROPOUT_NET)
        net["solver"]["max_iter"] = max_iter
        result = trainer.train(net, os.path.join(folder, "run"), tensorboard=False, device="cpu",
                               resume=resume)
        torch.save({"weights": result["net"].state_dict(), "rng": torch.get_rng_state()},
                   os.path.join(folder, f"{tag}{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _ddp(folder, tag, max_iter, resume):
    import torch.multiprocessing as mp

    os.makedirs(folder, exist_ok=True)
    mp.start_processes(_ddp_run, args=(folder, tag, max_iter, resume), nprocs=2, join=True,
                       start_method="fork")
    return [torch.load(os.path.join(folder, f"{tag}{r}.pt"), weights_only=True) for r in range(2)]


def test_distributed_resume_equals_the_uninterrupted_run_on_every_rank(tmp_path):
    """Dropout draws per-rank masks (seed + rank); every rank's RNG state goes into the
    checkpoint and comes back to that rank, so a resumed 2-rank run ends where the
    uninterrupted one does, on both ranks."""
    import torch.multiprocessing as mp

    if "fork" not in mp.get_all_start_methods():
        pytest.skip("needs the fork start method")
    whole = _ddp(str(tmp_path / "whole"), "w", 4, False)
    assert not torch.equal(whole[0]["rng"], whole[1]["rng"])  # each rank its own stream
    _ddp(str(tmp_path / "split"), "a", 2, False)
    state = load_state(str(tmp_path / "split" / "run" / "checkpoints" / "iter_00000002.state.pt"))
    assert len(state["rng_ranks"]) == 2 and state["extra"]["world_size"] == 2
    split = _ddp(str(tmp_path / "split"), "b", 4, True)
    for rank in range(2):
        assert torch.equal(split[rank]["rng"], whole[rank]["rng"]), rank
        for key, value in whole[rank]["weights"].items():
            torch.testing.assert_close(split[rank]["weights"][key], value, rtol=0, atol=0, msg=key)
    # one process resuming the 2-rank checkpoint: told that this run will not repeat it
    events = []
    net = copy.deepcopy(DROPOUT_NET)
    net["solver"]["max_iter"] = 3
    trainer.train(net, str(tmp_path / "split" / "run"), tensorboard=False, on_event=events.append,
                  resume=str(tmp_path / "split" / "run" / "checkpoints" / "iter_00000002.state.pt"))
    warnings = " ".join(e["message"] for e in events if e["event"] == "warning")
    assert "resuming with world size 1, batch_size 2, iter_size 1 (global batch 2)" in warnings
    assert "saved with 2, 2, 1 (global batch 4)" in warnings
