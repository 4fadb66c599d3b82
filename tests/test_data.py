"""pacnet.engine data: file formats, Caffe transforms, synthetic and real data sets, the
data: section, samplers and loaders.  Fixtures are written in the real formats under tmp_path."""

import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pacnet.errors import DataError, SchemaError
from pacnet.engine import formats
from pacnet.engine.data import StreamSampler, collate, input_shapes, make_dataset, make_loader, parse_data
from pacnet.engine.transforms import JointTransform, SegTransform, denormalize, lowres, normalize_range

def _sio():
    """scipy.io (the test extra); only the .mat tests need it."""
    return pytest.importorskip("scipy.io")


def rng(seed=0):
    return np.random.default_rng(seed)


# ============================================================================ formats


def test_flo_round_trip_and_layout(tmp_path):
    flow = rng().normal(size=(5, 7, 2)).astype(np.float32)
    path = str(tmp_path / "a.flo")
    formats.write_flo(path, flow)
    raw = open(path, "rb").read()
    assert np.frombuffer(raw[:4], "<f4")[0] == np.float32(202021.25)
    assert list(np.frombuffer(raw[4:12], "<i4")) == [7, 5]  # width, height
    assert len(raw) == 12 + 5 * 7 * 2 * 4
    np.testing.assert_array_equal(formats.read_flo(path), flow)


@pytest.mark.parametrize("mutate, words", [
    (lambda b: b"XIEH" + b[4:], "not a .flo file"),
    (lambda b: b[:-4], "truncated"),
    (lambda b: b[:10], "truncated"),
    (lambda b: b + b"\0\0\0\0", "after the flow data"),
    (lambda b: b[:4] + np.array([-3, 5], "<i4").tobytes() + b[12:], "invalid size"),
])
def test_corrupt_flo_names_the_file(tmp_path, mutate, words):
    path = str(tmp_path / "bad.flo")
    formats.write_flo(path, np.zeros((5, 7, 2), np.float32))
    data = open(path, "rb").read()
    open(path, "wb").write(mutate(data))
    with pytest.raises(DataError, match=words) as info:
        formats.read_flo(path)
    assert path in str(info.value)


def test_missing_and_corrupt_images(tmp_path):
    with pytest.raises(DataError, match="image not found: .*nope.jpg"):
        formats.read_image(str(tmp_path / "nope.jpg"))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(DataError, match="cannot read image .*bad.jpg"):
        formats.read_image(str(bad))
    full = tmp_path / "full.png"
    Image.fromarray(rng().integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(full)
    cut = tmp_path / "cut.png"
    cut.write_bytes(full.read_bytes()[:300])
    with pytest.raises(DataError, match="cut.png"):
        formats.read_image(str(cut))


def test_label_png_palette_grayscale_and_colour(tmp_path):
    lab = np.array([[0, 1, 2], [15, 20, 255]], np.uint8)
    formats.write_label_png(str(tmp_path / "p.png"), torch.from_numpy(lab)[None])
    img = Image.open(tmp_path / "p.png")
    assert img.mode == "P"
    pal = img.getpalette()
    assert pal[3:6] == [128, 0, 0] and pal[6:9] == [0, 128, 0] and pal[15 * 3:16 * 3] == [192, 128, 128]
    assert pal[255 * 3:] == [224, 224, 192]
    np.testing.assert_array_equal(formats.read_label_png(str(tmp_path / "p.png")), lab)
    Image.fromarray(lab, "L").save(tmp_path / "g.png")
    np.testing.assert_array_equal(formats.read_label_png(str(tmp_path / "g.png")), lab)
    Image.fromarray(np.zeros((2, 3, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(DataError, match="rgb.png is RGB, not a palette"):
        formats.read_label_png(str(tmp_path / "rgb.png"))
    with pytest.raises(DataError, match="0..255"):
        formats.write_label_png(str(tmp_path / "x.png"), np.array([[300]]))


def test_voc_palette_matches_the_devkit():
    pal = formats.voc_palette()
    colours = [tuple(pal[3 * i:3 * i + 3]) for i in range(21)]
    assert colours[:5] == [(0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128)]
    assert colours[20] == (0, 64, 128) and len(pal) == 768


def _write_hdf5_mat(path, variables):
    """A MATLAB v7.3 file: HDF5 with a 512-byte MATLAB header (column-major, so MATLAB
    H x W x C x N arrays are stored reversed)."""
    h5py = pytest.importorskip("h5py")
    with h5py.File(path, "w", userblock_size=512) as f:
        for name, value in variables.items():
            f.create_dataset(name, data=value)
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 ."
    header = header.ljust(116, b" ") + b"\0" * 8 + b"\x00\x02" + b"IM"
    with open(path, "r+b") as f:
        f.write(header.ljust(512, b"\0"))


def test_mat_kinds_and_errors(tmp_path, monkeypatch):
    v5 = str(tmp_path / "v5.mat")
    _sio().savemat(v5, {"a": np.arange(6).reshape(2, 3)})
    assert formats.mat_kind(v5) == "v5"
    np.testing.assert_array_equal(formats.load_mat(v5, ["a"])["a"], np.arange(6).reshape(2, 3))
    with pytest.raises(DataError, match="no variable 'b'"):
        formats.load_mat(v5, ["b"])
    broken = tmp_path / "broken.mat"
    broken.write_bytes(open(v5, "rb").read()[:140])
    with pytest.raises(DataError, match="broken.mat"):
        formats.load_mat(str(broken), ["a"])
    # a v7.3 file without h5py: a clear message naming the package
    fake = tmp_path / "v73.mat"
    fake.write_bytes(b"MATLAB 7.3".ljust(512, b"\0") + b"\x89HDF\r\n\x1a\n" + b"\0" * 64)
    assert formats.mat_kind(str(fake)) == "hdf5"
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(DataError, match="v73.mat is a MATLAB v7.3 .* needs h5py") as info:
        formats.open_mat_hdf5(str(fake))
    assert "pip install h5py" in str(info.value)


# ============================================================================ transforms


def test_seg_transform_pads_with_mean_and_ignore_then_centre_crops():
    img = np.arange(3 * 4 * 5, dtype=np.float32).reshape(3, 4, 5)
    lab = np.arange(20, dtype=np.float32).reshape(4, 5)
    mean = [1.0, 2.0, 3.0]
    t = SegTransform(crop=(6, 5), mean=mean, scale=0.5, train=False)
    data, label, dim = t(img, lab, rng())
    assert data.shape == (3, 6, 5) and label.shape == (1, 6, 5)
    # centred crop of the 6 x 5 padded image: rows 0..5 (no choice), padding at rows 4, 5
    expect = (img - np.array(mean, np.float32)[:, None, None]) * 0.5
    np.testing.assert_array_equal(data[:, :4], expect)
    assert (data[:, 4:] == 0).all()  # padded with the mean -> 0 after subtraction
    np.testing.assert_array_equal(label[0, :4], lab)
    assert (label[0, 4:] == 255).all()
    assert dim.tolist() == [[[4.0, 5.0]]] and dim.shape == (1, 1, 2)


def test_seg_transform_centre_crop_in_test_and_random_crop_in_train():
    img = np.arange(3 * 10 * 10, dtype=np.float32).reshape(3, 10, 10)
    lab = (img[0] % 7).astype(np.float32)
    data, label, _ = SegTransform(crop=4, train=False)(img, lab, rng())
    np.testing.assert_array_equal(data, img[:, 3:7, 3:7])
    train = SegTransform(crop=4, train=True)
    a = train(img, lab, rng(5))
    b = train(img, lab, rng(5))
    np.testing.assert_array_equal(a[0], b[0])
    offsets = set()
    for s in range(30):
        d, l, _ = train(img, lab, rng(s))
        y, x = np.argwhere(img[0] == d[0, 0, 0])[0]
        np.testing.assert_array_equal(d, img[:, y:y + 4, x:x + 4])
        np.testing.assert_array_equal(l[0], lab[y:y + 4, x:x + 4])  # label cropped with the image
        offsets.add((y, x))
    assert len(offsets) > 5


def test_seg_transform_mirror_and_scale_factors():
    img = np.arange(3 * 4 * 6, dtype=np.float32).reshape(3, 4, 6)
    lab = np.tile(np.arange(6, dtype=np.float32), (4, 1))
    t = SegTransform(mirror=True)
    flips = [t(img, lab, rng(s)) for s in range(20)]
    flipped = [f for f in flips if f[0][0, 0, 0] == img[0, 0, -1]]
    assert 0 < len(flipped) < 20
    np.testing.assert_array_equal(flipped[0][0], img[:, :, ::-1])
    np.testing.assert_array_equal(flipped[0][1][0], lab[:, ::-1])
    s = SegTransform(scale_factors=[0.5, 1.5])
    sizes = {s(img, lab, rng(k))[0].shape[1:] for k in range(20)}
    assert sizes == {(2, 3), (6, 9)}
    for k in range(5):
        d, l, dim = s(img, lab, rng(k))
        assert set(np.unique(l)) <= set(np.unique(lab))  # nearest: no new label values
        assert dim.ravel().tolist() == list(d.shape[1:])
    with pytest.raises(DataError, match="label map is 3 x 6"):
        SegTransform()(img, lab[:3], rng())


def test_lowres_center_last_and_bilinear():
    x = np.arange(2 * 16 * 24, dtype=np.float32).reshape(2, 16, 24)
    np.testing.assert_array_equal(lowres(x, 8, "center"), x[:, 3::8, 3::8])
    np.testing.assert_array_equal(lowres(x, 4, "center"), x[:, 1::4, 1::4])
    np.testing.assert_array_equal(lowres(x, 4, "last"), x[:, 3::4, 3::4])
    assert lowres(x, 8, "bilinear").shape == (2, 2, 3)
    const = np.full((1, 16, 16), 3.5, np.float32)
    np.testing.assert_allclose(lowres(const, 4, "bilinear"), 3.5, rtol=1e-6)
    assert lowres(np.zeros((1, 18, 17), np.float32), 4, "center").shape == (1, 5, 5)  # ceil


def test_normalize_range_and_denormalize():
    low = np.stack([np.linspace(2, 6, 16).reshape(4, 4), np.full((4, 4), 3.0)]).astype(np.float32)
    norm, r = normalize_range(low)
    assert r.tolist() == [[2.0, 6.0], [2.5, 3.5]]  # a flat channel gets +-0.5
    assert norm[0].min() == 0 and norm[0].max() == 1 and np.allclose(norm[1], 0.5)
    back = denormalize(torch.from_numpy(norm)[None], torch.from_numpy(r)[None])
    torch.testing.assert_close(back[0], torch.from_numpy(low))


def test_joint_transform_keys_shapes_and_spaces():
    guide = rng().uniform(size=(3, 32, 48)).astype(np.float32)
    depth = rng(1).uniform(1, 5, size=(1, 32, 48)).astype(np.float32)
    out = JointTransform(8, crop=16, mirror=True, train=True)(guide, depth, rng(3))
    assert {k: v.shape for k, v in out.items()} == {"guide": (3, 16, 16), "target": (1, 2, 2),
                                                    "gt": (1, 16, 16), "gt_raw": (1, 16, 16),
                                                    "target_range": (1, 2)}
    lo, hi = out["target_range"][0]
    np.testing.assert_allclose(out["gt"], (out["gt_raw"] - lo) / (hi - lo), rtol=1e-5)
    np.testing.assert_allclose(out["target"] * (hi - lo) + lo, out["gt_raw"][:, 3::8, 3::8], rtol=1e-5)
    raw = JointTransform(4, normalize=False, train=False)(guide, depth, rng())
    np.testing.assert_array_equal(raw["gt"], depth)
    np.testing.assert_array_equal(raw["target"], depth[:, 1::4, 1::4])
    assert raw["target_range"].tolist() == [[0.0, 1.0]]
    with pytest.raises(DataError, match="not a multiple of factor 8"):
        JointTransform(8, crop=12)
    with pytest.raises(DataError, match="larger than the image"):
        JointTransform(8, crop=64)(guide, depth, rng())
    # a size that is not a multiple (Sintel's 436 rows): the guide goes to factor x the
    # low-res size, the ground truth keeps the image's (test); training needs crops
    odd = JointTransform(8, train=False)(guide[:, :30], depth[:, :30], rng())
    assert (odd["target"].shape, odd["guide"].shape, odd["gt_raw"].shape) == ((1, 4, 6), (3, 32, 48), (1, 30, 48))
    with pytest.raises(DataError, match=r"30 x 48, not a multiple of factor 8") as info:
        JointTransform(8, train=True)(guide[:, :30], depth[:, :30], rng())
    assert "crop_size" in info.value.hint


# ============================================================================ synthetic


def _jbu(low, guide, f, sigma_r=0.1):
    """Joint bilateral upsampling from centre samples (a tiny guided upsampler)."""
    _, H, W = guide.shape
    h, w = low.shape[1:]
    o = (f - 1) // 2
    ys, xs = torch.arange(H).float(), torch.arange(W).float()
    by, bx = torch.floor((ys - o) / f).long(), torch.floor((xs - o) / f).long()
    Y, X = torch.meshgrid(ys, xs, indexing="ij")
    num, den = torch.zeros(H, W), torch.zeros(H, W)
    for dy in (-1, 0, 1, 2):
        for dx in (-1, 0, 1, 2):
            QY, QX = torch.meshgrid((by + dy).clamp(0, h - 1), (bx + dx).clamp(0, w - 1), indexing="ij")
            hy, hx = QY * f + o, QX * f + o
            wgt = torch.exp(-((Y - hy) ** 2 + (X - hx) ** 2) / (2 * f ** 2)) \
                * torch.exp(-((guide - guide[:, hy, hx]) ** 2).sum(0) / (2 * sigma_r ** 2))
            num += wgt * low[0, QY, QX]
            den += wgt
    return (num / den)[None]


def test_synthetic_depth_guided_upsampling_beats_bilinear():
    ds = make_dataset({"dataset": "synthetic_depth", "size": 6, "normalize_target": False}, "test")
    err_bilinear = err_guided = 0.0
    for i in range(len(ds)):
        s = ds[i]
        assert s["guide"].min() >= 0 and s["guide"].max() <= 1
        assert 1.0 <= float(s["gt"].min()) and float(s["gt"].max()) <= 10.0
        bil = F.interpolate(s["target"][None], scale_factor=8, mode="bilinear", align_corners=False)[0]
        err_bilinear += float(((bil - s["gt"]) ** 2).mean().sqrt())
        err_guided += float(((_jbu(s["target"], s["guide"], 8) - s["gt"]) ** 2).mean().sqrt())
    assert err_guided < 0.6 * err_bilinear, (err_guided, err_bilinear)


def test_synthetic_depth_edges_are_colour_edges():
    from pacnet.engine.synthetic import depth_scene

    guide, depth, region = depth_scene(rng(4), 64, 64)
    jump = np.abs(np.diff(depth[0], axis=1)) > 0.3
    colour = np.abs(np.diff(guide, axis=2)).sum(0)
    same_region = np.diff(region, axis=1) == 0
    assert jump.any()
    # across a depth jump the colour changes far more than inside a region
    assert np.median(colour[jump]) > 3 * np.median(colour[same_region])


def test_synthetic_sets_are_deterministic_and_split_apart():
    cfg = {"dataset": "synthetic_depth", "size": 4, "train": {"crop_size": 32, "mirror": True}}
    a, b = make_dataset(cfg, "train"), make_dataset(cfg, "train")
    for k in a[1]:
        torch.testing.assert_close(a[1][k], b[1][k])
    assert not torch.equal(a[0]["gt_raw"], a[1]["gt_raw"])
    test = make_dataset(cfg, "test")
    assert test[0]["gt"].shape == (1, 64, 64)
    assert not torch.equal(make_dataset({**cfg, "seed": 1}, "test")[0]["guide"], test[0]["guide"])
    # the stream key (index, position): same scene, fresh augmentation per position
    crops = {tuple(a[(0, p)]["guide"][0, 0, :3].tolist()) for p in range(8)}
    assert len(crops) > 1
    torch.testing.assert_close(a[(0, 5)]["guide"], b[(0, 5)]["guide"])


def test_synthetic_segmentation_and_embedding_labels():
    ds = make_dataset({"dataset": "synthetic_seg", "num_classes": 4, "ignore_border": 2,
                       "mean_value": [100, 110, 120]}, "train")
    seen = set()
    for i in range(10):
        s = ds[i]
        assert s["data"].shape == (3, 64, 64) and s["label"].dtype == torch.float32
        seen |= set(torch.unique(s["label"]).tolist())
    assert seen <= {0.0, 1.0, 2.0, 3.0, 255.0} and 255.0 in seen and len(seen) >= 4
    emb = make_dataset({"dataset": "synthetic_embedding", "num_classes": 6}, "train")
    ids = set()
    for i in range(10):
        ids |= set(torch.unique(emb[i]["label"]).tolist())
    assert ids <= set(map(float, range(6))) and len(ids) >= 4


def test_synthetic_seg_class_is_visible_in_colour():
    """Per-class mean colours differ: the class can be read from the image."""
    ds = make_dataset({"dataset": "synthetic_seg", "num_classes": 4, "bgr": False, "size": 30}, "train")
    means = {c: [] for c in (1, 2, 3)}
    for i in range(len(ds)):
        s = ds[i]
        for c in means:
            m = s["label"][0] == c
            if m.sum() > 20:
                means[c].append(s["data"][:, m].mean(1))
    centroids = {c: torch.stack(v).mean(0) for c, v in means.items() if v}
    assert len(centroids) == 3
    for c1 in centroids:
        for c2 in centroids:
            if c1 < c2:
                assert float((centroids[c1] - centroids[c2]).norm()) > 40


# ============================================================================ VOC + SBD


def _voc(tmp_path, ids=("a", "b", "c"), size=(12, 16), classes=(0, 1, 15)):
    root = tmp_path / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "SegmentationClassAug", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    h, w = size
    for k, i in enumerate(ids):
        img = rng(k).integers(0, 255, (h, w, 3), dtype=np.uint8)
        Image.fromarray(img).save(root / "JPEGImages" / f"{i}.jpg", quality=95)
        Image.fromarray(img).save(root / "JPEGImages" / f"{i}.png")
        lab = np.full((h, w), classes[k % len(classes)], np.uint8)
        lab[0, :] = 255
        formats.write_label_png(str(root / "SegmentationClass" / f"{i}.png"), lab)
        Image.fromarray(lab, "L").save(root / "SegmentationClassAug" / f"{i}.png")
    (root / "ImageSets/Segmentation/train.txt").write_text("\n".join(ids[:2]) + "\n")
    (root / "ImageSets/Segmentation/val.txt").write_text(ids[-1] + "\n")
    return root


def test_voc_image_set_reads_palette_labels(tmp_path):
    root = _voc(tmp_path)
    ds = make_dataset({"dataset": "voc", "root": str(root.parent), "mean_value": [104.008, 116.669, 122.675]},
                      "train")
    assert len(ds) == 2 and ds.sample_id(1) == "b"
    s = ds[1]
    assert s["data"].shape == (3, 12, 16) and s["label"].shape == (1, 12, 16)
    assert set(torch.unique(s["label"]).tolist()) == {1.0, 255.0}
    rgb = formats.read_image(str(root / "JPEGImages" / "b.jpg")).astype(np.float32)
    bgr = rgb[:, :, ::-1].transpose(2, 0, 1) - np.array([104.008, 116.669, 122.675], np.float32)[:, None, None]
    np.testing.assert_allclose(s["data"].numpy(), bgr, rtol=1e-6, atol=1e-4)
    assert make_dataset({"dataset": "voc", "root": str(root)}, "test").sample_id(0) == "c"


def test_voc_list_file_like_deeplab(tmp_path):
    root = _voc(tmp_path)
    lst = tmp_path / "train.txt"
    lst.write_text("/JPEGImages/a.png /SegmentationClassAug/a.png\n/JPEGImages/c.png /SegmentationClassAug/c.png\n")
    cfg = {"dataset": "voc", "root": str(root), "list": str(lst), "bgr": False,
           "train": {"crop_size": 20, "mirror": False}}
    s = make_dataset(cfg, "train")[1]
    assert s["data"].shape == (3, 20, 20)
    img = np.asarray(Image.open(root / "JPEGImages" / "c.png"), np.float32).transpose(2, 0, 1)
    np.testing.assert_array_equal(s["data"][:, :12, :16].numpy(), img)  # crop 20 > image: pad, offset 0
    assert (s["label"][0, 12:] == 255).all() and (s["label"][0, 1:12, :16] == 15).all()
    assert s["data_dim"].tolist() == [[[12.0, 16.0]]]
    test_list = tmp_path / "test.txt"
    test_list.write_text("/JPEGImages/a.jpg 0\n/JPEGImages/b.jpg 0\n")
    t = make_dataset({"dataset": "voc", "root": str(root), "list": str(test_list)}, "test")
    assert (t[0]["label"] == 0).all()
    n = make_dataset({"dataset": "voc", "root": str(root), "list": str(test_list), "label_type": "NONE"}, "test")
    assert (n[0]["label"] == 255).all()


def test_voc_train_aug_with_sbd_mat_labels(tmp_path):
    root = _voc(tmp_path)
    sbd = tmp_path / "benchmark_RELEASE" / "dataset"
    (sbd / "img").mkdir(parents=True)
    (sbd / "cls").mkdir()
    seg = np.zeros((10, 14), np.uint8)
    seg[2:6, 3:9] = 7
    Image.fromarray(rng(9).integers(0, 255, (10, 14, 3), dtype=np.uint8)).save(sbd / "img" / "s1.jpg")
    _sio().savemat(str(sbd / "cls" / "s1.mat"),
                     {"GTcls": {"Segmentation": seg, "Boundaries": np.zeros((1, 1)), "CategoriesPresent": 7}})
    (sbd / "train.txt").write_text("s1\n")
    (sbd / "val.txt").write_text("c\n")  # VOC val ids are removed from train_aug
    ds = make_dataset({"dataset": "voc", "root": str(root), "sbd_root": str(sbd.parent),
                       "image_set": "train_aug"}, "train")
    assert [ds.sample_id(i) for i in range(len(ds))] == ["a", "b", "s1"]
    np.testing.assert_array_equal(ds[2]["label"][0].numpy(), seg.astype(np.float32))
    assert len(make_dataset({"dataset": "voc", "root": str(root), "sbd_root": str(sbd.parent),
                             "image_set": "trainval_aug"}, "train")) == 4
    with pytest.raises(DataError, match="needs SBD"):
        make_dataset({"dataset": "voc", "root": str(root), "image_set": "train_aug"}, "train")


def test_voc_errors_name_the_file(tmp_path):
    root = _voc(tmp_path, classes=(0, 1, 30))
    with pytest.raises(DataError, match="VOC folder not found"):
        make_dataset({"dataset": "voc", "root": str(tmp_path / "missing")}, "train")
    with pytest.raises(DataError, match=r"image set 'trian' not found: .*trian.txt"):
        make_dataset({"dataset": "voc", "root": str(root), "image_set": "trian"}, "train")
    ds = make_dataset({"dataset": "voc", "root": str(root)}, "test")  # id 'c' has label 30
    with pytest.raises(DataError, match=r"label map .*c.png has values \[30\] outside 0..20"):
        ds[0]
    os.remove(root / "SegmentationClass" / "b.png")
    with pytest.raises(DataError, match=r"missing data file: .*b.png"):
        make_dataset({"dataset": "voc", "root": str(root)}, "train")
    (root / "JPEGImages" / "a.jpg").write_bytes(b"\xff\xd8 broken")
    ds = make_dataset({"dataset": "voc", "root": str(root), "image_set": "val"}, "train")
    lst = tmp_path / "l.txt"
    lst.write_text("/JPEGImages/a.jpg /SegmentationClassAug/a.png\n")
    with pytest.raises(DataError, match=r"cannot read image .*a.jpg"):
        make_dataset({"dataset": "voc", "root": str(root), "list": str(lst)}, "train")[0]
    lst.write_text("/JPEGImages/a.jpg x.png extra\n")
    with pytest.raises(DataError, match=r"l.txt:1: expected 'image \[label\]'"):
        make_dataset({"dataset": "voc", "root": str(root), "list": str(lst)}, "train")


# ============================================================================ NYU Depth v2


def _nyu_arrays(n=5, h=16, w=24):
    images = rng(2).integers(0, 255, (h, w, 3, n), dtype=np.uint8)  # MATLAB order H x W x 3 x N
    yy, xx = np.mgrid[0:h, 0:w]
    depths = np.stack([(1 + yy * 0.1 + xx * 0.01 + k) for k in range(n)], axis=-1).astype(np.float32)
    return images, depths


def _check_nyu(ds, images, depths, offset):
    s = ds[0]
    np.testing.assert_allclose(s["gt_raw"][0].numpy(), depths[:, :, offset])
    np.testing.assert_allclose(s["guide"].numpy(), images[:, :, :, offset].transpose(2, 0, 1) / 255.0, rtol=1e-6)
    np.testing.assert_allclose(s["target"][0].numpy(), depths[3::8, 3::8, offset])


def test_nyu_v73_hdf5(tmp_path):
    images, depths = _nyu_arrays()
    path = str(tmp_path / "nyu_depth_v2_labeled.mat")
    # h5py sees MATLAB arrays with the dimensions reversed: N x 3 x W x H and N x W x H
    _write_hdf5_mat(path, {"images": images.transpose(3, 2, 1, 0), "depths": depths.transpose(2, 1, 0)})
    cfg = {"dataset": "nyu", "root": str(tmp_path), "train_count": 3, "normalize_target": False}
    train, test = make_dataset(cfg, "train"), make_dataset(cfg, "test")
    assert (len(train), len(test)) == (3, 2) and test.sample_id(0) == "0003"
    _check_nyu(test, images, depths, 3)
    _check_nyu(train, images, depths, 0)
    import pickle

    clone = pickle.loads(pickle.dumps(test))  # as a DataLoader worker gets it
    torch.testing.assert_close(clone[1]["gt"], test[1]["gt"])


def test_nyu_scipy_readable_v5(tmp_path):
    images, depths = _nyu_arrays()
    path = tmp_path / "nyu_small.mat"
    _sio().savemat(str(path), {"images": images, "depths": depths})
    ds = make_dataset({"dataset": "nyu", "root": str(path), "train_count": 4, "normalize_target": False}, "test")
    assert len(ds) == 1
    _check_nyu(ds, images, depths, 4)
    val = make_dataset({"dataset": "nyu", "root": str(path), "train_count": 4, "val_ratio": 0.5}, "val")
    assert len(val) == 2 and val.sample_id(0) == "0002"
    with pytest.raises(DataError, match="subset 'test' .* is empty"):
        make_dataset({"dataset": "nyu", "root": str(path)}, "test")  # train_count 1000 > 5 images


def test_nyu_errors(tmp_path):
    with pytest.raises(DataError, match="NYU Depth v2 file not found: .*nyu_depth_v2_labeled.mat"):
        make_dataset({"dataset": "nyu", "root": str(tmp_path)}, "train")
    _sio().savemat(str(tmp_path / "x.mat"), {"images": np.zeros((4, 4, 3, 2), np.uint8)})
    with pytest.raises(DataError, match="no variable 'depths'"):
        make_dataset({"dataset": "nyu", "root": str(tmp_path / "x.mat")}, "train")
    _sio().savemat(str(tmp_path / "y.mat"), {"images": np.zeros((4, 4, 3, 2), np.uint8),
                                               "depths": np.zeros((4, 5, 2), np.float32)})
    with pytest.raises(DataError, match="unexpected shapes"):
        make_dataset({"dataset": "nyu", "root": str(tmp_path / "y.mat")}, "train")


# ============================================================================ Sintel


def _sintel(tmp_path, scenes=("alley_1", "market_2"), frames=3, size=(16, 24)):
    root = tmp_path / "MPI-Sintel-complete"
    h, w = size
    for s, scene in enumerate(scenes):
        (root / "training" / "clean" / scene).mkdir(parents=True)
        (root / "training" / "flow" / scene).mkdir(parents=True)
        for k in range(1, frames + 1):
            img = rng(10 * s + k).integers(0, 255, (h, w, 3), dtype=np.uint8)
            Image.fromarray(img).save(root / "training" / "clean" / scene / f"frame_{k:04d}.png")
            if k < frames:
                flow = rng(100 + 10 * s + k).normal(size=(h, w, 2)).astype(np.float32)
                formats.write_flo(str(root / "training" / "flow" / scene / f"frame_{k:04d}.flo"), flow)
    return root


def test_sintel_pairs_splits_and_values(tmp_path):
    root = _sintel(tmp_path)
    ds = make_dataset({"dataset": "sintel", "root": str(root), "subset": "trainval", "factor": 4,
                       "normalize_target": False}, "test")
    assert len(ds) == 4 and ds.sample_id(3) == "market_2/frame_0002"
    s = ds[2]
    flow = formats.read_flo(str(root / "training/flow/market_2/frame_0001.flo")).transpose(2, 0, 1)
    np.testing.assert_array_equal(s["gt"].numpy(), flow)
    assert s["target"].shape == (2, 4, 6) and s["guide"].shape == (3, 16, 24)
    img = np.asarray(Image.open(root / "training/clean/market_2/frame_0001.png"), np.float32) / 255
    np.testing.assert_allclose(s["guide"].numpy(), img.transpose(2, 0, 1))
    split = tmp_path / "split.txt"
    split.write_text("1\n2\n1\n1\n")
    cfg = {"dataset": "sintel", "root": str(root), "split_file": str(split)}
    assert len(make_dataset(cfg, "train")) == 3 and len(make_dataset(cfg, "test")) == 1
    by_scene = {"dataset": "sintel", "root": str(root), "val_sequences": ["alley_1"]}
    val = make_dataset(by_scene, "test")
    assert [val.sample_id(i) for i in range(len(val))] == ["alley_1/frame_0001", "alley_1/frame_0002"]


def test_sintel_errors(tmp_path):
    root = _sintel(tmp_path)
    base = {"dataset": "sintel", "root": str(root)}
    with pytest.raises(DataError, match="needs split_file or val_sequences"):
        make_dataset(base, "train")
    (tmp_path / "short.txt").write_text("1\n2\n")
    with pytest.raises(DataError, match="2 entries for 4 flow files"):
        make_dataset({**base, "split_file": str(tmp_path / "short.txt")}, "train")
    with pytest.raises(DataError, match="unknown Sintel scene 'cave_9'"):
        make_dataset({**base, "val_sequences": ["cave_9"]}, "train")
    with pytest.raises(DataError, match="Sintel folder not found: .*final"):
        make_dataset({**base, "pass": "final", "subset": "trainval"}, "train")
    bad = root / "training/flow/alley_1/frame_0002.flo"
    bad.write_bytes(b"junk" + bad.read_bytes()[4:])
    ds = make_dataset({**base, "subset": "trainval"}, "train")
    with pytest.raises(DataError, match=r"frame_0002.flo is not a .flo file"):
        ds[1]
    os.remove(root / "training/clean/market_2/frame_0003.png")
    with pytest.raises(DataError, match="'market_2': 2 frames .* but 2 flows"):
        make_dataset({**base, "subset": "trainval"}, "train")


# ============================================================================ synthetic video


def _clip(t, frame):
    """Frame ``frame`` of every clip-valued entry of a sample (others as they are)."""
    return {k: (v[:, frame] if v.ndim == 4 else v) for k, v in t.items()}


def test_video_scene_moves_and_keeps_colour_edges_on_depth_edges():
    from pacnet.engine.synthetic import video_scene

    guide, depth, region = video_scene(rng(4), 6, 48, 64)
    assert guide.shape == (3, 6, 48, 64) and depth.shape == (1, 6, 48, 64)
    assert region.shape == (6, 48, 64) and guide.dtype == depth.dtype == np.float32
    assert 0 <= guide.min() and guide.max() <= 1 and 1 <= depth.min() and depth.max() <= 10
    for f in range(6):
        jump = np.abs(np.diff(depth[0, f], axis=1)) > 0.3
        colour = np.abs(np.diff(guide[:, f], axis=2)).sum(0)
        same_region = np.diff(region[f], axis=1) == 0
        assert jump.any()
        assert np.median(colour[jump]) > 3 * np.median(colour[same_region])
    # every frame differs from the one before: objects, texture and background move
    for f in range(5):
        assert (region[f] != region[f + 1]).mean() > 0.005
        assert np.abs(depth[0, f] - depth[0, f + 1]).max() > 0.3
    # without motion and noise a clip is one frame repeated; drift alone changes depth only
    # by up to drift x the depth span (9 m) a frame
    still = video_scene(rng(4), 3, 48, 64, speed=(0, 0), pan=0, drift=0, noise=0)
    for a in still:
        assert (a == a[..., :1, :, :]).all()
    _, drifting, ids = video_scene(rng(4), 3, 48, 64, speed=(0, 0), pan=0, noise=0)
    change = np.abs(drifting[0, 1] - drifting[0, 0])[ids[1] == ids[0]]
    assert 0 < change.max() <= 0.01 * 9 + 1e-5


def test_synthetic_video_samples_and_guided_upsampling_beats_bilinear():
    ds = make_dataset({"dataset": "synthetic_video", "size": 1, "frames": 2, "height": 48,
                       "width": 64, "normalize_target": False}, "test")
    assert {k: tuple(v.shape) for k, v in ds[0].items()} == {
        "guide": (3, 2, 48, 64), "target": (1, 2, 6, 8), "gt": (1, 2, 48, 64),
        "gt_raw": (1, 2, 48, 64), "target_range": (1, 2)}
    err_bilinear = err_guided = 0.0
    for i in range(len(ds)):
        s = ds[i]
        assert not torch.equal(s["target"][:, 0], s["target"][:, 1])  # each frame samples anew
        for f in range(2):
            frame = _clip(s, f)
            bil = F.interpolate(frame["target"][None], scale_factor=8, mode="bilinear")[0]
            err_bilinear += float(((bil - frame["gt"]) ** 2).mean().sqrt())
            guided = _jbu(frame["target"], frame["guide"], 8)
            err_guided += float(((guided - frame["gt"]) ** 2).mean().sqrt())
    assert err_guided < 0.7 * err_bilinear, (err_guided, err_bilinear)


@pytest.mark.parametrize("normalize", [False, True])
def test_joint_transform_of_a_clip_is_the_frame_transform_of_every_frame(normalize):
    guide = rng().uniform(size=(3, 4, 32, 48)).astype(np.float32)
    depth = rng(1).uniform(1, 5, size=(1, 4, 32, 48)).astype(np.float32)
    transform = JointTransform(8, crop=16, mirror=True, normalize=normalize, train=True)
    for seed in range(3):  # the same draws: one crop window and one flip for the whole clip
        clip = transform(guide, depth, rng(seed))
        frames = [transform(guide[:, f], depth[:, f], rng(seed)) for f in range(4)]
        assert clip["guide"].shape == (3, 4, 16, 16) and clip["target"].shape == (1, 4, 2, 2)
        for f, frame in enumerate(frames):
            np.testing.assert_array_equal(clip["guide"][:, f], frame["guide"])
            np.testing.assert_array_equal(clip["gt_raw"][:, f], frame["gt_raw"])
        # normalised over the clip: one range for all frames, the frames' extremes
        lows = np.stack([denormalize(frame["target"][None], frame["target_range"][None])[0]
                         for frame in frames], axis=1)
        lo, hi = clip["target_range"][0]
        np.testing.assert_allclose(clip["target"] * (hi - lo) + lo, lows, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(clip["gt"], (clip["gt_raw"] - lo) / (hi - lo), rtol=1e-5,
                                   atol=1e-6)
        if normalize:
            assert (lo, hi) == (lows.min(), lows.max())
    back = denormalize(torch.from_numpy(clip["gt"])[None],
                       torch.from_numpy(clip["target_range"])[None])
    torch.testing.assert_close(back[0], torch.from_numpy(clip["gt_raw"]), rtol=1e-5, atol=1e-5)
    with pytest.raises(DataError, match="guide is 3 x 32 x 48 but the target is 4 x 32 x 48"):
        transform(guide[:, :3], depth, rng())


def test_synthetic_video_is_deterministic_and_its_stream_augments():
    cfg = {"dataset": "synthetic_video", "size": 3, "frames": 2, "height": 32, "width": 32,
           "train": {"crop_size": 16, "mirror": True}}
    a, b = make_dataset(cfg, "train"), make_dataset(cfg, "train")
    for k in a[1]:
        torch.testing.assert_close(a[1][k], b[1][k])
    assert not torch.equal(a[0]["gt_raw"], a[1]["gt_raw"])
    test, val = make_dataset(cfg, "test"), make_dataset(cfg, "val")
    assert not torch.equal(test[0]["guide"], val[0]["guide"])
    crops = {tuple(a[(0, p)]["guide"][0, 0, 0, :3].tolist()) for p in range(8)}
    assert len(crops) > 1
    options = parse_data(cfg, "test")
    assert options["metric"] == "rmse" and options["lowres_mode"] == "center"
    assert options["speed"] == [0.25, 1.5] and options["frames"] == 2


def test_synthetic_video_per_frame_gives_the_same_scenes_as_images():
    cfg = {"dataset": "synthetic_video", "size": 2, "frames": 3, "height": 32, "width": 32}
    clips = make_dataset({**cfg, "normalize_target": False}, "test")
    frames = make_dataset({**cfg, "normalize_target": False, "per_frame": True}, "test")
    assert len(frames) == 6 and frames[4]["guide"].shape == (3, 32, 32)
    for i in range(6):
        for key in ("guide", "target", "gt_raw"):
            torch.testing.assert_close(frames[i][key], clips[i // 3][key][:, i % 3], rtol=0, atol=0)
    normalised = make_dataset({**cfg, "per_frame": True}, "test")[5]  # by the frame's own range
    assert float(normalised["target"].min()) == 0 and float(normalised["target"].max()) == 1


@pytest.mark.parametrize("cfg, words", [
    ({"dataset": "synthetic_video", "frames": 0}, "data.frames"),
    ({"dataset": "synthetic_video", "speed": [2, 1]}, "data.speed: min 2 is larger than max 1"),
    ({"dataset": "synthetic_video", "speed": [1]}, "data.speed"),
    ({"dataset": "synthetic_video", "width": 60}, "data.factor: must divide"),
    ({"dataset": "synthetic_video", "metric": "miou"}, "data.metric: miou needs class labels"),
    ({"dataset": "synthetic_depth", "frames": 4}, "data.frames: unknown field"),
])
def test_video_data_section_errors_name_the_field(cfg, words):
    with pytest.raises(SchemaError, match=words.replace("[", r"\[")):
        make_dataset(cfg, "train")


# ============================================================================ data: section


@pytest.mark.parametrize("cfg, words", [
    ({"dataset": "synthetic_dpeth"}, "data.dataset: must be one of"),
    ({"dataset": "voc"}, "data.root: is required for dataset 'voc'"),
    ({"dataset": "synthetic_depth", "factor": "8"}, "data.factor: expected an integer, got '8'"),
    ({"dataset": "synthetic_depth", "train": {"crop_siz": 32}}, "data.train.crop_siz: unknown field"),
    ({"dataset": "synthetic_depth", "train": {"crop_size": 20}}, "data.train.crop_size: must be a multiple of factor 8"),
    ({"dataset": "synthetic_seg", "crop_size": 10, "crop_height": 5, "crop_width": 5}, "not both"),
    ({"dataset": "synthetic_seg", "crop_height": 5}, "go together"),
    ({"dataset": "synthetic_seg", "mean_value": [1, 2, 3, 4]}, "data.mean_value: takes at most 3"),
    ({"dataset": "synthetic_depth", "height": 60}, "data.factor: must divide"),
    ({"dataset": "synthetic_seg", "factor": 8}, "data.factor: unknown field"),
    ("voc", "data: expected a mapping"),
])
def test_data_section_errors_name_the_field(cfg, words):
    with pytest.raises(SchemaError, match=words.replace("[", r"\[").replace("(", r"\(")):
        make_dataset(cfg, "train")


def test_unknown_dataset_suggests_the_close_name():
    with pytest.raises(SchemaError, match="did you mean 'synthetic_depth'"):
        make_dataset({"dataset": "synthetic_dpeth"}, "train")


def test_phase_sections_override_and_blobs_rename():
    cfg = {"dataset": "synthetic_depth", "factor": 4, "blobs": {"guide": "image"},
           "train": {"crop_size": 32, "mirror": True}, "test": {"factor": 8}}
    train, test = parse_data(cfg, "train"), parse_data(cfg, "test")
    assert train["crop_size"] == [32, 32] and train["mirror"] and train["factor"] == 4
    assert test["crop_size"] == [0, 0] and not test["mirror"] and test["factor"] == 8
    assert train["lowres_mode"] == "center" and parse_data({"dataset": "sintel", "root": "x"}, "test")["lowres_mode"] == "bilinear"
    s = make_dataset(cfg, "train")[0]
    assert set(s) == {"image", "target", "gt", "gt_raw", "target_range"} and s["image"].shape == (3, 32, 32)


def test_marked_config_errors_point_at_the_line():
    from pacnet.errors import Location

    class Marked(dict):
        pass

    section = Marked({"dataset": "synthetic_depth", "factor": "x"})
    section.loc = Location("net.yaml", 20, 1)
    section.locs = {"dataset": Location("net.yaml", 21, 3), "factor": Location("net.yaml", 22, 3)}
    with pytest.raises(SchemaError) as info:
        make_dataset(section, "train")
    assert str(info.value).startswith("net.yaml:22:3: data.factor:")


# ============================================================================ loading


def test_stream_sampler_epochs_ranks_and_resume():
    s = StreamSampler(5, seed=3)
    it = iter(s)
    keys = [next(it) for _ in range(15)]
    for e in range(3):
        assert sorted(k[0] for k in keys[5 * e:5 * e + 5]) == list(range(5))  # each epoch: a permutation
    assert [k[1] for k in keys] == list(range(15))
    assert [k[0] for k in keys[:5]] != [k[0] for k in keys[5:10]] or [k[0] for k in keys[5:10]] != [k[0] for k in keys[10:]]
    resumed = iter(StreamSampler(5, seed=3, start=7))
    assert [next(resumed) for _ in range(8)] == keys[7:]
    r0 = iter(StreamSampler(6, seed=1, rank=0, world_size=2))
    r1 = iter(StreamSampler(6, seed=1, rank=1, world_size=2))
    first = [next(r0) for _ in range(3)] + [next(r1) for _ in range(3)]
    assert sorted(k[0] for k in first) == list(range(6))  # the ranks split an epoch
    assert list(iter(StreamSampler(4, shuffle=False)).__next__() for _ in range(1)) == [(0, 0)]


def test_train_loader_is_a_pure_function_of_the_stream_position():
    ds = make_dataset({"dataset": "synthetic_seg", "size": 5, "train": {"crop_size": 32, "mirror": True}}, "train")
    it = iter(make_loader(ds, batch_size=2, seed=4))
    batches = [next(it) for _ in range(4)]
    assert batches[0]["data"].shape == (2, 3, 32, 32)
    resumed = next(iter(make_loader(ds, batch_size=2, seed=4, start=4)))
    for k in resumed:
        torch.testing.assert_close(resumed[k], batches[2][k])


def test_test_loader_shards_and_collate_errors():
    ds = make_dataset({"dataset": "synthetic_seg", "size": 5}, "test")
    seen = []
    for rank in range(2):
        for b in make_loader(ds, batch_size=2, train=False, rank=rank, world_size=2):
            seen.append(b["data"].shape[0])
    assert sum(seen) == 5
    with pytest.raises(DataError, match="(?s)cannot batch .data.*set crop_size"):
        collate([{"data": torch.zeros(3, 4, 4)}, {"data": torch.zeros(3, 5, 4)}])
    assert input_shapes(ds, 4, ["data"]) == {"data": (4, 3, 64, 64)}
