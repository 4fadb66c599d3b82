"""3-D nets end to end: the video joint-upsampling skeleton on 5-D blobs, and the zoo net.

The skeleton of the 3-D zoo net (the joint-upsampling blocks with per-axis windows over
T x H x W, guides resized trilinearly), with plain Deconvolution where the zoo net
(jointupsample/pac_joint_upsample_video_x8) uses PacConvTranspose on 5-D bottoms: it
compiles through the shared blocks, infers shapes, FLOPs and parameters, runs forward and
backward, and trains with ``pacnet train`` on the built-in ``synthetic_video`` clips.  The
zoo net itself takes its own data section's clips and learns through each PAC layer.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import pacnet
from pacnet.cli.main import main
from pacnet.cli.train import fmt
from pacnet.load import zoo_path

BLOCKS = zoo_path("common/pac_joint_upsample_blocks")


def video_net(c: int = 4, frames: int = 2, size: int = 32) -> str:
    """The skeleton as YAML: x8 in H and W, the clip length kept."""
    return f"""
_base_: {BLOCKS}
name: video_skeleton_x8
pacnet_version: 1
inputs:
  target: [N, 1, T, h, w]
  guide: [N, 3, T, H, W]
dims: {{N: 1, T: {frames}, h: {size // 8}, w: {size // 8}, H: {size}, W: {size}}}
data: {{dataset: synthetic_video, factor: 8, frames: {frames}, size: 6, height: {size},
        width: {size}, batch_size: 2, test: {{size: 2, batch_size: 2}}}}
solver: {{type: Adam, base_lr: 1.0e-3, max_iter: 3, display: 1, test_interval: 3, test_iter: 1,
          test_initialization: false, snapshot: 0, random_seed: 0}}
blocks:
  deconv_up:  # the stand-in of pac_up: a 2x transposed convolution in H and W
    args: {{i: null, num_output: null}}
    layers:
      - {{name: "up_convts/${{i}}", type: Deconvolution, bottom: "${{bottom}}", top: "${{top}}",
         num_output: "${{num_output}}", kernel_size: [3, 4, 4], stride: [1, 2, 2], pad: 1,
         weight_filler: {{type: msra}}}}
      - {{name: "up_relus/${{i}}", type: ReLU, bottom: "${{top}}", top: "${{top}}"}}
layers:
  - {{name: gt, type: Input, top: gt, shape: [[N, 1, T, H, W]], include: {{phase: train}}}}
  - {{name: branch_t, type: branch3, bottom: target, top: t, c1: {c}, c2: {c}, c3: {c},
     kernel_size: [3, 5, 5], pad: [1, 2, 2]}}
  - {{name: branch_g, type: branch3, bottom: guide, top: g, c1: {c}, c2: {c}, c3: {3 * c},
     kernel_size: [3, 5, 5], pad: [1, 2, 2]}}
  - {{name: guide_slices, type: Slice, bottom: g, top: [g0, g1, g2], axis: 1,
     slice_point: [{c}, {2 * c}]}}
  - {{name: guide0, type: guide_resize, bottom: g0, top: guide0, scale: [1, 0.25, 0.25],
     mode: trilinear}}
  - {{name: guide1, type: guide_resize, bottom: g1, top: guide1, scale: [1, 0.5, 0.5],
     mode: trilinear}}
  - {{name: up0, type: deconv_up, bottom: t, top: up0, i: 0, num_output: {c}}}
  - {{name: mix0, type: Concat, bottom: [up0, guide0], top: mix0}}
  - {{name: up1, type: deconv_up, bottom: mix0, top: up1, i: 1, num_output: {c}}}
  - {{name: mix1, type: Concat, bottom: [up1, guide1], top: mix1}}
  - {{name: up2, type: deconv_up, bottom: mix1, top: up2, i: 2, num_output: {c}}}
  - {{name: mix2, type: Eltwise, bottom: [up2, g2], top: mix2}}
  - {{name: branch_f, type: branch2, bottom: mix2, top: pred, c1: {c}, c2: 1,
     kernel_size: [3, 5, 5], pad: [1, 2, 2]}}
  - {{name: loss, type: EuclideanLoss, bottom: [pred, gt], top: loss, include: {{phase: train}}}}
"""


@pytest.fixture
def net_file(tmp_path):
    path = tmp_path / "video_skeleton_x8.yaml"
    path.write_text(video_net())
    return str(path)


def test_video_skeleton_compiles_with_shapes_params_and_flops(net_file):
    net = pacnet.build(net_file, phase="train")
    c, k = 4, 3 * 5 * 5
    assert net.shapes["target"] == (1, 1, 2, 4, 4) and net.shapes["guide"] == (1, 3, 2, 32, 32)
    assert net.shapes["guide0"] == (1, c, 2, 8, 8) and net.shapes["up0"] == (1, c, 2, 8, 8)
    assert net.shapes["up2"] == (1, c, 2, 32, 32) and net.shapes["pred"] == (1, 1, 2, 32, 32)
    conv = lambda i, o: i * o * k + o  # noqa: E731  (weight + bias)
    deconv = lambda i, o: i * o * 3 * 16  # noqa: E731  (no bias filler, but a bias blob)
    expected = (conv(1, c) + 2 * conv(c, c)                        # branch_t
                + conv(3, c) + conv(c, c) + conv(c, 3 * c)         # branch_g
                + deconv(c, c) + deconv(2 * c, c) + deconv(2 * c, c) + 3 * c   # up_convts
                + conv(c, c) + conv(c, 1))                         # branch_f
    assert sum(p.numel() for p in net.parameters()) == expected
    assert tuple(net.state_dict()["up_convts/0.weight"].shape) == (c, c, 3, 4, 4)
    assert tuple(net.state_dict()["branch_t/conv1.weight"].shape) == (c, 1, 3, 5, 5)
    # forward, loss and backward on random clips
    torch.manual_seed(0)
    out = net(torch.rand(1, 1, 2, 4, 4), torch.rand(1, 3, 2, 32, 32), torch.rand(1, 1, 2, 32, 32))
    net.total_loss(out).backward()
    assert all(p.grad is not None for p in net.parameters())


def test_video_skeleton_build_table(net_file, capsys):
    assert main(["build", net_file, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    first = next(layer for layer in report["layers"] if layer["name"] == "branch_t/conv1")
    # 2 * (C * 3*5*5) multiply-adds per output value + the bias
    assert first["flops"] == 2 * 75 * math.prod((1, 4, 2, 4, 4)) + math.prod((1, 4, 2, 4, 4))


def test_video_skeleton_trains_on_synthetic_video(net_file, tmp_path, capsys):
    work = tmp_path / "work"
    assert main(["train", net_file, "--work-dir", str(work), "--no-tensorboard"]) == 0
    records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    test = [r for r in records if r.get("phase") == "test"][-1]
    assert test["step"] == 3 and test["rmse"] > 0 and test["bilinear_rmse"] > 0
    assert [r["step"] for r in records if r.get("phase") == "train"] == [0, 1, 2]
    assert (work / "checkpoints" / "iter_00000003.safetensors").exists()
    out = " ".join(capsys.readouterr().out.split())
    assert "rmse/bilinear" in out  # the record's key
    # the closing table: clips beside trilinear upsampling, no image figures of the README
    assert "test set: trained net vs trilinear upsampling" in out and "README" not in out
    assert f"│ trilinear │ {fmt(test['bilinear_rmse'])} │ 1 │" in out


def test_zoo_video_net_takes_its_own_clips_and_learns_through_every_pac_layer():
    """jointupsample/pac_joint_upsample_video_x8: its data: section gives 4-frame 48 x 48
    training clips (8 full frames to test), and one train-phase step on (a corner of) a clip
    sends gradients into each 3-D PacConvTranspose."""
    from pacnet.engine.data import make_dataset, parse_data
    from pacnet.load import load

    name = "jointupsample/pac_joint_upsample_video_x8"
    tree = load(name)
    train, test = parse_data(tree["data"], "train"), parse_data(tree["data"], "test")
    assert (train["dataset"], train["factor"], train["frames"]) == ("synthetic_video", 8, 4)
    assert (test["frames"], test["height"]) == (8, 64)
    sample = make_dataset(tree["data"], "train")[0]
    assert sample["guide"].shape == (3, 4, 48, 48) and sample["target"].shape == (1, 4, 6, 6)
    crop = {"target": (slice(2), slice(2), slice(2)), "guide": (slice(2), slice(16), slice(16))}
    crop["gt"] = crop["guide"]  # a 2-frame 16 x 16 corner of the clip, to keep the step cheap
    batch = {k: torch.as_tensor(sample[k])[None][(Ellipsis, *crop[k])] for k in crop}
    torch.manual_seed(0)
    net = pacnet.build(name, phase="train", inputs={k: tuple(v.shape) for k, v in batch.items()})
    out = net(**batch)
    assert net.shapes["pred"] == (1, 1, 2, 16, 16) and out["loss"] > 0
    net.total_loss(out).backward()
    for i in range(3):
        assert net.get_submodule(f"up_convts/{i}").weight.grad.abs().sum() > 0


def test_zoo_video_net_with_centre_frame_weights_is_the_image_net_frame_by_frame():
    """The video net holds the image net: the image net's weights as the centre frame slice of
    each 3-D window (zero elsewhere) give the image net's prediction on every frame (float64,
    a 3-frame clip, 2 x 3 low-res), through 5-D convolutions, trilinear guide resizes and 3-D
    PacConvTranspose layers whose adaptive kernels see the neighbouring frames."""
    t, h, w = 3, 2, 3
    image = pacnet.build("jointupsample/pac_joint_upsample_x8",
                         inputs={"target": (1, 1, h, w), "guide": (1, 3, 8 * h, 8 * w)}).double()
    video = pacnet.build("jointupsample/pac_joint_upsample_video_x8",
                         inputs={"target": (1, 1, t, h, w), "guide": (1, 3, t, 8 * h, 8 * w)})
    video = video.double()
    torch.manual_seed(0)
    weights = {}
    for key, value in image.state_dict().items():
        value = torch.randn_like(value) * 0.2  # not the fillers: biases and all taps matter
        weights[key] = value
        if value.dim() == 4:  # a 2-D window -> the centre frame of the video net's window
            depth = video.state_dict()[key].shape[2]
            value = torch.zeros(value.shape[:2] + (depth,) + value.shape[2:], dtype=value.dtype)
            value[:, :, depth // 2] = weights[key]
        video.state_dict()[key].copy_(value)
    image.load_state_dict(weights)
    g = torch.Generator().manual_seed(1)
    target = torch.rand(1, 1, t, h, w, generator=g, dtype=torch.float64)
    guide = torch.rand(1, 3, t, 8 * h, 8 * w, generator=g, dtype=torch.float64)
    with torch.no_grad():
        clip = video(target, guide)["pred"]
        frames = [image(target[:, :, i], guide[:, :, i])["pred"] for i in range(t)]
    assert clip.shape == (1, 1, t, 8 * h, 8 * w)
    torch.testing.assert_close(clip, torch.stack(frames, 2), rtol=1e-10, atol=1e-10)
