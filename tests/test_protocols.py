"""The original's test protocols (NVlabs/pacnet task_jointUpsampling and
task_semanticSegmentation, main.py test()) on small fixtures in the real formats: ``pacnet
test`` of the experiment nets gives what an independent implementation of the original's
protocol gives with the same model and weights; and the original's recipes train."""

import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import pacnet
from nvlabs_reference import JOINT_MODELS, ModelWithCrf, fcn_backbone
from pacnet.engine import formats, trainer
from pacnet.engine.transforms import resize_antialiased
from pacnet.errors import ShapeError
from test_data import _nyu_arrays, _write_hdf5_mat
from test_zoo_nvlabs_seg import NARROW, WIDTHS, _randomized

# ----------------------------------------------------------------------------- NYU Depth v2


def _nyu(tmp_path, n=6, h=48, w=64):
    images, depths = _nyu_arrays(n, h, w)
    depths = depths + np.random.default_rng(3).uniform(0, 0.5, depths.shape).astype(np.float32)
    _write_hdf5_mat(str(tmp_path / "nyu_depth_v2_labeled.mat"),
                    {"images": images.transpose(3, 2, 1, 0), "depths": depths.transpose(2, 1, 0)})
    return images, depths


def _save_original(name, path, seed=0):
    torch.manual_seed(seed)
    model = JOINT_MODELS[name]().eval()
    torch.save(model.state_dict(), path)
    return model


def _denorm_range(low):
    """The original's raw_range of a low-res map, per channel (flat maps get +-0.5)."""
    lo, hi = low.min(axis=(1, 2)), low.max(axis=(1, 2))
    flat = lo == hi
    return lo - 0.5 * flat, hi + 0.5 * flat


def test_nyu_protocol_gives_the_originals_rmse(tmp_path):
    """First 1000 (here 4) images train, the rest test; 'center' low-res; per-image min/max
    normalisation; RMSE per image in metres without a 6-pixel border, averaged."""
    images, depths = _nyu(tmp_path)
    model = _save_original("jointupsample/pac_joint_upsample_x8", tmp_path / "x8.pth")
    sets = {"data.root": str(tmp_path), "data.train_count": 4}
    got = trainer.test("jointupsample/nyu/pac_joint_upsample_x8", str(tmp_path / "x8.pth"), overrides=sets)
    want, bilinear = [], []
    for i in (4, 5):
        depth = depths[:, :, i][None]
        guide = torch.from_numpy(images[:, :, :, i].transpose(2, 0, 1).astype(np.float32) / 255)[None]
        low = depth[:, 3::8, 3::8]
        lo, hi = _denorm_range(low)
        norm = torch.from_numpy(((low - lo[:, None, None]) / (hi - lo)[:, None, None]).astype(np.float32))[None]
        with torch.no_grad():
            out = model(norm, guide)[0].numpy() * (hi - lo)[:, None, None] + lo[:, None, None]
        up = F.interpolate(norm, scale_factor=8, mode="bilinear", align_corners=False)[0].numpy()
        up = up * (hi - lo)[:, None, None] + lo[:, None, None]
        for pred, acc in ((out, want), (up, bilinear)):
            acc.append(np.sqrt(((pred - depth)[:, 6:-6, 6:-6] ** 2).mean()))
    assert got["samples"] == 2
    assert got["rmse"] == pytest.approx(np.mean(want), rel=1e-5)
    assert got["bilinear_rmse"] == pytest.approx(np.mean(bilinear), rel=1e-5)


# ----------------------------------------------------------------------------- Sintel


def _sintel_fixture(tmp_path, size=(20, 24)):
    """Two scenes of three frames (four flows), 20 x 24: not a multiple of 8, like Sintel's
    436 rows; the original's split file format (1 = train, 2 = val)."""
    root = tmp_path / "sintel"
    h, w = size
    rng = np.random.default_rng(7)
    for scene in ("alley_1", "market_2"):
        (root / "training" / "clean" / scene).mkdir(parents=True)
        (root / "training" / "flow" / scene).mkdir(parents=True)
        for k in range(1, 4):
            img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
            Image.fromarray(img).save(root / "training" / "clean" / scene / f"frame_{k:04d}.png")
            if k < 3:
                flow = rng.normal(size=(h, w, 2)).astype(np.float32) * 3
                formats.write_flo(str(root / "training" / "flow" / scene / f"frame_{k:04d}.flo"), flow)
    (root / "Sintel_train_val.txt").write_text("1\n2\n1\n2\n")
    return root


def _skimage_resize(x, size):
    """skimage.transform.resize(order=1, mode='reflect', anti_aliasing=True) of C x H x W,
    the way skimage computes it (scipy.ndimage)."""
    from scipy import ndimage as ndi

    factors = np.array(x.shape, float) / np.array((x.shape[0],) + tuple(size), float)
    blurred = ndi.gaussian_filter(np.asarray(x, np.float64), np.maximum(0, (factors - 1) / 2), mode="mirror")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ndi.zoom(blurred, 1 / factors, order=1, mode="mirror", grid_mode=True)


def test_resize_antialiased_is_skimages_resize():
    x = np.random.default_rng(0).normal(size=(2, 436 // 4, 40))
    for size in ((14, 5), (120, 48), (109, 40)):
        np.testing.assert_allclose(resize_antialiased(x, size), _skimage_resize(x, size), atol=1e-6)


def test_sintel_protocol_gives_the_originals_epe(tmp_path):
    """The original's split file; anti-aliased bilinear low-res (after resizing 20 rows to
    24); the net runs per flow channel on a guide resized to 24 rows and its prediction is
    resized back (apply_model); EPE per image, averaged."""
    root = _sintel_fixture(tmp_path)
    model = _save_original("jointupsample/pac_joint_upsample_x8", tmp_path / "x8_flow.pth", seed=1)
    sets = {"data.root": str(root), "data.split_file": str(root / "Sintel_train_val.txt")}
    got = trainer.test("jointupsample/sintel/pac_joint_upsample_x8", str(tmp_path / "x8_flow.pth"), overrides=sets)
    want, bilinear = [], []
    for scene in ("alley_1", "market_2"):  # the second flow of each scene is val
        flow = formats.read_flo(str(root / "training" / "flow" / scene / "frame_0002.flo")).transpose(2, 0, 1)
        rgb = np.asarray(Image.open(root / "training" / "clean" / scene / "frame_0002.png"), np.float32)
        guide = torch.from_numpy(rgb.transpose(2, 0, 1) / 255)[None]
        low = _skimage_resize(_skimage_resize(flow, (24, 24)), (3, 3))
        lo, hi = _denorm_range(low)
        norm = torch.from_numpy(((low - lo[:, None, None]) / (hi - lo)[:, None, None]).astype(np.float32))[None]
        guide = F.interpolate(guide, size=(24, 24), mode="bilinear", align_corners=False)
        with torch.no_grad():
            out = model(norm, guide)
        up = F.interpolate(norm, scale_factor=8, mode="bilinear", align_corners=False)
        for pred, acc in ((out, want), (up, bilinear)):
            pred = F.interpolate(pred, size=(20, 24), mode="bilinear", align_corners=False)[0].numpy()
            pred = pred * (hi - lo)[:, None, None] + lo[:, None, None]
            acc.append(np.sqrt(((pred - flow) ** 2).sum(0)).mean())
    assert got["samples"] == 2
    assert got["epe"] == pytest.approx(np.mean(want), rel=1e-5)
    assert got["bilinear_epe"] == pytest.approx(np.mean(bilinear), rel=1e-5)


# ----------------------------------------------------------------------------- VOC

MEAN_RGB = np.array([122.675, 116.669, 104.008])


def _voc_fixture(tmp_path, sizes=((40, 48), (48, 40), (36, 44))):
    """VOCdevkit/VOC2012 with JPEG images of several sizes, palette PNG labels (255 borders)
    and the original's id lists (voc11seg/*.txt)."""
    root = tmp_path / "voc"
    voc = root / "VOCdevkit" / "VOC2012"
    (voc / "JPEGImages").mkdir(parents=True)
    (voc / "SegmentationClass").mkdir()
    (root / "voc11seg").mkdir()
    rng = np.random.default_rng(11)
    ids = []
    for k, (h, w) in enumerate(sizes):
        ident = f"2011_{k:06d}"
        img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        Image.fromarray(img).save(voc / "JPEGImages" / f"{ident}.jpg", quality=95)
        lab = rng.integers(0, 21, (h, w)).astype(np.uint8)
        lab[:2] = 255
        formats.write_label_png(str(voc / "SegmentationClass" / f"{ident}.png"), lab)
        ids.append(ident)
    for name in ("train.txt", "seg11valid.txt"):
        (root / "voc11seg" / name).write_text("\n".join(ids) + "\n")
    return root, ids


def _voc_sets(root):
    return {"data.root": str(root / "VOCdevkit"), "data.train.list": str(root / "voc11seg" / "train.txt"),
            "data.test.list": str(root / "voc11seg" / "seg11valid.txt"), **NARROW}


def _original_scores(model, root, ident, crop=0):
    """The original's DeepLabInputs: RGB minus its mean, flipped to BGR, zero-padded (top
    left) to the crop; the output cut back to the label's size."""
    voc = root / "VOCdevkit" / "VOC2012"
    img = np.asarray(Image.open(voc / "JPEGImages" / f"{ident}.jpg"), np.float64)
    x = (img - MEAN_RGB).transpose(2, 0, 1)[::-1].astype(np.float32)
    h, w = x.shape[1:]
    if crop:
        padded = np.zeros((3, crop, crop), np.float32)
        padded[:, :h, :w] = x
        x = padded
    with torch.no_grad():
        out = model(torch.from_numpy(np.ascontiguousarray(x))[None].double())
    label = formats.read_label_png(str(voc / "SegmentationClass" / f"{ident}.png")).astype(np.int64)
    return out[0, :, :h, :w].argmax(0).numpy(), label


def _miou(pairs, k=21):
    conf = np.zeros((k, k))
    for pred, gt in pairs:
        valid = (gt >= 0) & (gt < k)
        conf += np.bincount(k * gt[valid] + pred[valid], minlength=k * k).reshape(k, k)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.diag(conf) / (conf.sum(0) + conf.sum(1) - np.diag(conf))
    return np.nanmean(iou), np.diag(conf).sum() / conf.sum()


@pytest.mark.parametrize("crop", [0, 64])
def test_voc_protocol_gives_the_originals_miou(tmp_path, crop):
    """--test-crop -1 (crop 0: every image whole, a net per size) on the FCN-8s + PAC-CRF, and
    --test-crop 512 (here 64: zero-padded to the crop, scored on the image) on FCN-8s AltPad."""
    root, ids = _voc_fixture(tmp_path)
    if crop:
        name, model = "fcn/fcn8s_altpad", fcn_backbone("fcn8saltpad", WIDTHS)
        tree = pacnet.load.load("fcn/fcn8s_crfi5p4d5641p4d5161")  # its VOC data section
        sets = {"data": dict(tree["data"]), **_voc_sets(root), "data.test.crop_size": crop}
    else:
        name, model = "fcn/fcn8s_crfi5p4d5641p4d5161", ModelWithCrf(fcn_backbone("fcn8s", WIDTHS))
        sets = _voc_sets(root)
    model = _randomized(model, seed=crop)
    torch.save({k: v.float() for k, v in model.state_dict().items()}, tmp_path / "w.pth")
    got = trainer.test(name, str(tmp_path / "w.pth"), overrides=sets)
    miou, accuracy = _miou([_original_scores(model, root, i, crop) for i in ids])
    assert got["samples"] == 3 and got["batches"] == 3
    assert got["mean_iou"] == pytest.approx(miou, abs=2e-3) and got["pixel_accuracy"] == pytest.approx(accuracy, abs=2e-3)


def test_a_batch_of_another_size_is_never_run_on_a_net_built_for_one_size():
    net = pacnet.build("fcn/fcn8s", inputs={"data": (1, 3, 40, 40)}, overrides=NARROW)
    batch = {"data": torch.zeros(1, 3, 48, 40)}
    with pytest.raises(ShapeError, match=r"batch 0 has inputs \{'data': \(1, 3, 48, 40\)\}"):
        trainer.evaluate(net, [batch], trainer.Evaluator({"metric": "none"}, ["score"]), torch.device("cpu"))
    nets = trainer.ShapedNets(net, lambda shapes, device: pacnet.build("fcn/fcn8s", inputs=shapes, device=device,
                                                                     overrides=NARROW))
    other = nets({"data": (1, 3, 48, 40)})
    assert other is nets({"data": (1, 3, 48, 40)}) and dict(other.inputs) == {"data": (1, 3, 48, 40)}
    assert other.state_dict()["fc6.weight"].data_ptr() == net.state_dict()["fc6.weight"].data_ptr()
    with torch.no_grad():
        assert other(torch.zeros(1, 3, 48, 40))["score"].shape == (1, 21, 48, 40)


# ----------------------------------------------------------------------------- recipes


def test_the_originals_joint_upsampling_recipe_trains(tmp_path, capsys):
    from pacnet.cli.main import main

    _nyu(tmp_path)
    work = tmp_path / "run"
    args = ["train", "jointupsample/nyu/pac_joint_upsample_x8", "--work-dir", str(work), "--no-tensorboard",
            "--set", f"data.root={tmp_path}", "--set", "data.train_count=4", "--set", "data.train.crop_size=16",
            "--set", "solver.max_iter=2", "--set", "solver.test_interval=2", "--set", "solver.display=1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "┃ RMSE (cm) ┃" in out and "README x8: NYU v2 RMSE (cm)" in out and "4.59 (PacJointUpsample)" in out
    records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["phase"] == "test"] == [2] and records[-1]["rmse"] > 0
    config = pacnet.load.load(str(work / "config.yaml"))
    assert config["solver"]["type"] == "Adam" and config["solver"]["base_lr"] == 1e-4
    assert config["solver"]["stepvalue"] == [3500000, 4500000] and config["data"]["batch_size"] == 1


def test_the_originals_two_stage_crf_recipe_trains(tmp_path):
    """Stage 1 trains the CRF on the frozen backbone (from the original's backbone file);
    stage 2 starts the loose CRF from stage 1's checkpoint, every step from the tied CRF."""
    from pacnet.engine.checkpoint import load_weights as read_safetensors
    from pacnet.engine.checkpoint import seed_everything

    root, _ = _voc_fixture(tmp_path)
    backbone = _randomized(fcn_backbone("fcn8s", WIDTHS), seed=5).float()
    torch.save(backbone.state_dict(), tmp_path / "fcn8s_from_caffe.pth")
    sets = {**_voc_sets(root), "data.train.crop_size": 32, "solver.max_iter": 2, "solver.test_interval": 0,
            "solver.snapshot": 0}
    stage1 = trainer.train("fcn/fcn8sfrozen_crfi5p4d5641p4d5161", str(tmp_path / "stage1"), overrides=sets,
                           weights=[str(tmp_path / "fcn8s_from_caffe.pth")], tensorboard=False)
    first, _ = read_safetensors(stage1["checkpoint"])
    for key, value in backbone.state_dict().items():
        torch.testing.assert_close(first[key], value, rtol=0, atol=0)  # frozen
    seed_everything(0)  # the recipe's random_seed: the CRF's initial values, as the trainer drew them
    init = pacnet.build("fcn/fcn8sfrozen_crfi5p4d5641p4d5161", phase="train", overrides=sets,
                        inputs={"data": (1, 3, 32, 32), "label": (1, 1, 32, 32)}).state_dict()
    for key in ("crf.messengers.0.weight", "crf.unary_weight", "feat_scales/1.weight"):
        assert (first[key] - init[key]).abs().max() > 1e-5, key  # trained
    stage2 = trainer.train("fcn/fcn8s_crfi5lp4d5641p4d5161", str(tmp_path / "stage2"),
                           overrides={**sets, "solver.max_iter": 0}, weights=[str(tmp_path / "stage1")],
                           tensorboard=False)  # stage 1's work dir: its latest checkpoint
    second, _ = read_safetensors(stage2["checkpoint"])
    for j in range(5):
        torch.testing.assert_close(second[f"crf.steps.{j}.messengers.1.weight"], first["crf.messengers.1.weight"])
    torch.testing.assert_close(second["conv3_1.weight"], first["conv3_1.weight"])
