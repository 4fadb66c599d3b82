"""The nets/ zoo: every net builds, with the reference architectures' shapes and sizes."""

import os
import warnings

import pytest
import torch

import pacnet
from nvlabs_reference import JOINT_MODELS
from pacnet.api import parameter_count
from pacnet.load import zoo_names


def _conv(cin, cout, k, bias=True):
    return cin * cout * k * k + (cout if bias else 0)


VGG16_CONVS = sum(_conv(a, b, 3) for a, b in [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256),
                                                (256, 256), (256, 512), (512, 512), (512, 512), (512, 512),
                                                (512, 512), (512, 512)])
FCN8S = (VGG16_CONVS + _conv(512, 4096, 7) + _conv(4096, 4096, 1) + _conv(4096, 21, 1) + _conv(512, 21, 1)
         + _conv(256, 21, 1) + 21 * 21 * (4 * 4 + 4 * 4 + 16 * 16))  # upsampling: dense 21 x 21 x k x k



def _bn(c):  # affine part of a norm layer (Scale weight + bias, or BN slope + bias)
    return 2 * c


def _resnet_backbone(blocks, bottleneck):
    """Parameters of a ResNet v1 without fc: 7x7 stem (no bias) + BN, stages of 64..512
    (bottleneck: x4 outputs), a 1x1 projection (+ BN) in each stage's first block where the
    shape changes."""
    n, cin = _conv(3, 64, 7, bias=False) + _bn(64), 64
    for stage, (count, mid) in enumerate(zip(blocks, (64, 128, 256, 512))):
        out = mid * 4 if bottleneck else mid
        for b in range(count):
            if bottleneck:
                n += _conv(cin, mid, 1, False) + _conv(mid, mid, 3, False) + _conv(mid, out, 1, False)
                n += _bn(mid) * 2 + _bn(out)
            else:
                n += _conv(cin, out, 3, False) + _conv(out, out, 3, False) + _bn(out) * 2
            if b == 0 and cin != out:
                n += _conv(cin, out, 1, False) + _bn(out)
            cin = out
    return n


RESNET18 = _resnet_backbone((2, 2, 2, 2), bottleneck=False)
RESNET50 = _resnet_backbone((3, 4, 6, 3), bottleneck=True)
assert RESNET18 == 11_689_512 - 513_000 and RESNET50 == 25_557_032 - 2_049_000  # torchvision minus fc

# DeepLab's VGG-16 (same convolutions as FCN's) + fc6 3x3 1024 -> fc7 1x1 1024 -> fc8 1x1 21 branches.
DEEPLAB_FC = _conv(512, 1024, 3) + _conv(1024, 1024, 1) + _conv(1024, 21, 1)
DEEPLAB_VGG16_ASPP = VGG16_CONVS + 4 * DEEPLAB_FC   # four branches, rates 6, 12, 18, 24
DEEPLAB_LARGEFOV = VGG16_CONVS + DEEPLAB_FC         # one branch, rate 12

# mmseg ASPPHead (2048 -> 512, 21 classes): image pool 1x1, 1x1 branch, three 3x3 dilated
# branches (each conv without bias + BN), 3x3 bottleneck over the 5 x 512 concat, 1x1 classifier.
ASPP_V3_HEAD = (2 * (_conv(2048, 512, 1, False) + _bn(512)) + 3 * (_conv(2048, 512, 3, False) + _bn(512))
                + _conv(5 * 512, 512, 3, False) + _bn(512) + _conv(512, 21, 1))


def _nl_head(mode):
    """mmseg NLHead (512 -> 512, 21 classes) with mmcv NonLocal2d(512, reduction 2, BN)."""
    inter = 256
    block = _conv(512, inter, 1) + _conv(inter, 512, 1, False) + _bn(512)    # g, conv_out + BN
    if mode != "gaussian":
        block += 2 * _conv(512, inter, 1)                                     # theta, phi
    if mode == "concatenation":
        block += 2 * inter                                                    # concat_project 1 x 2C' x 1 x 1
    convs = 2 * (_conv(512, 512, 3, False) + _bn(512))
    return convs + block + _conv(1024, 512, 3, False) + _bn(512) + _conv(512, 21, 1)


FCN8S_ALTPAD = FCN8S                             # same layers, other paddings
FCN8SPAC = FCN8S - 21 * 21 * 16 * 16             # upscore8 replaced by bilinear interpolation
CRF_STEP = 2 * 21 * 21 * 5 * 5 + 1 + 2           # two 4d messengers, unary + 2 pairwise weights
CRF_P4D5641P4D5161 = CRF_STEP + 2 * 3            # + the feature scales of the two kernels
CRF_LOOSE = 5 * CRF_STEP + 2 * 3                 # a CRF per mean-field step
CRF_P4D5321 = 21 * 21 * 5 * 5 + 1 + 1 + 3        # one kernel
CONVCRF = 2 * 21 * 21 + 1 + 2                    # two 2d compat 1x1 convs (the box filters are buffers)

# name -> (build kwargs, {blob: shape}, parameter count of the reference architecture)
EXPECTED = {
    "fcn/fcn8s": ({}, {"pool2": (1, 128, 175, 175), "upscore8": (1, 21, 568, 568), "score": (1, 21, 500, 500)},
                  FCN8S),
    "deeplab/deeplab_v2_resnet101": ({"inputs": {"data": (1, 3, 513, 513)}},
                                     {"fc1": (1, 21, 65, 65), "fc1_interp": (1, 21, 513, 513)}, 44_048_532),
    "pspnet/pspnet101_voc2012": ({}, {"conv6": (1, 21, 60, 60), "conv6_interp": (1, 21, 473, 473)}, 65_708_501),
    "pspnet/pspnet101_cityscapes": ({}, {"conv6": (1, 19, 90, 90), "conv6_interp": (1, 19, 713, 713)}, 65_707_475),
    "pspnet/pspnet50_ade20k": ({}, {"conv6": (1, 150, 60, 60), "conv6_interp": (1, 150, 473, 473)}, 46_782_550),
    "deeplab/deeplab_v2_vgg16_aspp": ({}, {"pool3": (1, 256, 41, 41), "pool5": (1, 512, 41, 41),
                                           "fc8_voc12_4": (1, 21, 41, 41), "fc8_voc12": (1, 21, 41, 41),
                                           "fc8_interp": (1, 21, 321, 321)}, DEEPLAB_VGG16_ASPP),
    "deeplab/deeplab_v1_largefov": ({"inputs": {"data": (1, 3, 513, 513)}},
                                    {"pool5a": (1, 512, 65, 65), "fc8_voc12": (1, 21, 65, 65),
                                     "fc8_interp": (1, 21, 513, 513)}, DEEPLAB_LARGEFOV),
    "deeplab/aspp_v3_head": ({}, {"res5c": (1, 2048, 65, 65), "image_pool": (1, 512, 65, 65),
                                  "aspp_concat": (1, 2560, 65, 65), "conv_seg": (1, 21, 65, 65),
                                  "seg": (1, 21, 513, 513)}, RESNET50 + ASPP_V3_HEAD),
    "nonlocal/nonlocal_head": ({"inputs": {"data": (2, 3, 257, 321)}},
                               {"res5b": (2, 512, 33, 41), "nl_block": (2, 512, 33, 41),
                                "concat_input": (2, 1024, 33, 41), "seg": (2, 21, 257, 321)},
                               RESNET18 + _nl_head("embedded_gaussian")),
    # PAC joint upsampling: the parameter counts of the original models (pac.md section 3)
    "jointupsample/pac_joint_upsample_x4": ({}, {"t": (1, 32, 64, 64), "guide0": (1, 16, 128, 128),
                                                 "pred": (1, 1, 256, 256)}, 183_489),
    "jointupsample/pac_joint_upsample_x8": ({}, {"t": (1, 32, 32, 32), "guide0": (1, 16, 64, 64),
                                                 "guide1": (1, 16, 128, 128), "pred": (1, 1, 256, 256)}, 221_937),
    "jointupsample/pac_joint_upsample_x16": ({}, {"guide0": (1, 16, 32, 32), "up3": (1, 32, 256, 256),
                                                  "pred": (1, 1, 256, 256)}, 260_385),
    "jointupsample/pac_joint_upsample_lite_x4": ({}, {"g": (1, 24, 256, 256), "pred": (1, 1, 256, 256)}, 55_509),
    "jointupsample/pac_joint_upsample_lite_x8": ({}, {"g": (1, 36, 256, 256), "pred": (1, 1, 256, 256)}, 56_273),
    "jointupsample/pac_joint_upsample_lite_x16": ({}, {"g": (1, 40, 256, 256), "guide0": (1, 10, 32, 32),
                                                       "pred": (1, 1, 256, 256)}, 55_777),
    # the video net: the x8 net with 3x5x5 up-convolutions, counted from the architecture:
    # branch_t 832 + 2 x 25632, branch_g 2432 + 25632 + 38448, up_convts 3 x 76832,
    # branch_f 25632 + 801
    "jointupsample/pac_joint_upsample_video_x8": ({}, {"t": (1, 32, 8, 8, 8), "g": (1, 48, 8, 64, 64),
                                                       "guide0": (1, 16, 8, 16, 16),
                                                       "guide1": (1, 16, 8, 32, 32),
                                                       "up0": (1, 32, 8, 16, 16),
                                                       "pred": (1, 1, 8, 64, 64)}, 375_537),
    "jointupsample/djif_x8": ({}, {"target_up": (1, 1, 256, 256), "t": (1, 1, 256, 256),
                                   "pred": (1, 1, 256, 256)}, 56_323),
    "fcn/fcn8s_altpad": ({}, {"pool5": (1, 512, 16, 16), "fc7": (1, 4096, 16, 16),
                              "upscore_pool4": (1, 21, 64, 64), "score": (1, 21, 512, 512)}, FCN8S_ALTPAD),
    "fcn/fcn8spac": ({}, {"conv3_3_guide": (1, 128, 128, 128), "conv5_3_guide": (1, 128, 32, 32),
                          "conv5_3": (1, 512, 32, 32), "score": (1, 21, 512, 512)}, FCN8SPAC),
    "fcn/fcn8s_crfi5p4d5641p4d5161": ({}, {"score": (1, 21, 500, 500), "edge_feat1": (1, 3, 500, 500),
                                           "crf": (1, 21, 500, 500)}, FCN8S + CRF_P4D5641P4D5161),
    "fcn/fcn8sfrozen_crfi5p4d5641p4d5161": ({}, {"crf": (1, 21, 500, 500)}, FCN8S + CRF_P4D5641P4D5161),
    "fcn/fcn8s_crfi5lp4d5641p4d5161": ({}, {"crf": (1, 21, 500, 500)}, FCN8S + CRF_LOOSE),
    "fcn/fcn8s_crfi5p4d5321": ({}, {"edge_feat0": (1, 3, 500, 500), "crf": (1, 21, 500, 500)},
                               FCN8S + CRF_P4D5321),
    "fcn/fcn8s_convcrf": ({}, {"edge_feat0": (1, 5, 500, 500), "edge_feat1": (1, 2, 500, 500),
                               "crf": (1, 21, 500, 500)}, FCN8S + CONVCRF),
    "fcn/fcn8spac_crfi5p4d5641p4d5161": ({}, {"crf": (1, 21, 512, 512)}, FCN8SPAC + CRF_P4D5641P4D5161),
    "fcn/fcn8spac_crfi5lp4d5641p4d5161": ({}, {"crf": (1, 21, 512, 512)}, FCN8SPAC + CRF_LOOSE),
    "jointupsample/djif_x4": ({}, {"target_up": (1, 1, 256, 256), "pred": (1, 1, 256, 256)}, 56_323),
    "jointupsample/djif_x16": ({}, {"target_up": (1, 1, 256, 256), "pred": (1, 1, 256, 256)}, 56_323),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_zoo_net_shapes_and_parameter_count(name):
    kwargs, shapes, params = EXPECTED[name]
    net = pacnet.build(name, device="meta", **kwargs)
    for blob, shape in shapes.items():
        assert net.shapes[blob] == shape, blob
    assert parameter_count(net) == params


EXPERIMENTS = [n for n in zoo_names() if n.startswith(("jointupsample/nyu/", "jointupsample/sintel/"))]
VOC_EXPERIMENTS = [n for n in zoo_names() if n.startswith("fcn/voc/")]


def test_every_zoo_net_is_covered():
    assert set(EXPECTED) <= set(zoo_names())
    # the segaware family is covered by its own tests, the experiments below
    covered = set(EXPECTED) | set(EXPERIMENTS) | set(VOC_EXPERIMENTS)
    assert not {n for n in zoo_names() if not n.startswith("segaware/")} - covered
    assert (len(EXPERIMENTS), len(VOC_EXPERIMENTS)) == (15, 2)


@pytest.mark.parametrize("name", VOC_EXPERIMENTS)
def test_voc_experiment_nets_are_their_models_with_the_originals_voc_protocol(name):
    from pacnet.engine.data import parse_data

    model = name.rsplit("/", 1)[1]
    net, base = pacnet.build(name, device="meta"), pacnet.build(f"fcn/{model}", device="meta")
    assert {k: v.shape for k, v in net.state_dict().items()} == {k: v.shape for k, v in base.state_dict().items()}
    test, train = parse_data(net.config["data"], "test"), parse_data(net.config["data"], "train")
    assert test["list"].endswith("voc11seg/seg11valid.txt") and train["list"].endswith("voc11seg/train.txt")
    assert test["crop_size"] == ([512, 512] if "pac" in model else [0, 0]) and test["batch_size"] == 1


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_nets_are_their_models_with_the_originals_data_and_solver(name):
    from pacnet.engine.data import parse_data
    from pacnet.engine.solver import parse_solver

    _, kind, model = name.split("/")
    net = pacnet.build(name, device="meta")
    base = pacnet.build(f"jointupsample/{model}", device="meta", vars={"CHANNELS": 2 if kind == "sintel" else 1})
    assert {k: v.shape for k, v in net.state_dict().items()} == {k: v.shape for k, v in base.state_dict().items()}
    assert dict(net.inputs) == dict(base.inputs) and net.ir.name == f"{model}_{kind}"
    data = parse_data(net.config["data"], "test")
    epoch = {"nyu": 1000, "sintel": 908}[kind]
    assert (data["dataset"], data["factor"], data["batch_size"]) == (kind, int(model.rsplit("x", 1)[1]), 1)
    assert parse_data(net.config["data"], "train")["crop_size"] == [256, 256]
    solver = parse_solver(net.config["solver"])
    assert (solver.type, solver.base_lr, solver.max_iter) == ("Adam", 1e-4, 5000 * epoch)
    assert solver.stepvalue == (3500 * epoch, 4500 * epoch)


@pytest.mark.parametrize("name,size", [("fcn/fcn8s", 64), ("deeplab/deeplab_v2_resnet101", 65)])
def test_zoo_nets_run_forward_and_train_phase(name, size):
    net = pacnet.build(name, inputs={"data": (1, 3, size, size)})
    with torch.no_grad():  # Caffe starts BatchNorm statistics at 0; real ones come with the weights
        for key, value in net.state_dict().items():
            if key.endswith(("scale_factor", ".var")):
                value.fill_(1.0)
    out = net(torch.randn(1, 3, size, size))
    assert all(torch.isfinite(v).all() for v in out.values())
    train = pacnet.build(name, phase="train", inputs={"data": (1, 3, size, size)}, device="meta")
    assert train.loss_weights and "label" in train.inputs


# ----------------------------------------------------------------------------- PAC joint upsampling

# one model of each family and factor in the default suite, the others with -m slow
JOINT_DEFAULT = ("jointupsample/pac_joint_upsample_x8", "jointupsample/pac_joint_upsample_lite_x4",
                 "jointupsample/djif_x16")


@pytest.mark.parametrize("name", [n if n in JOINT_DEFAULT else pytest.param(n, marks=pytest.mark.slow)
                                  for n in sorted(JOINT_MODELS)])
def test_joint_upsampling_nets_take_the_originals_files_and_compute_its_outputs(name, tmp_path):
    """A state_dict of the original model (written from pac.md §3; saved in torch's legacy
    format, as the published files are, for half of the nets) loads strictly through the
    net's weights_from rules, and the two compute the same prediction (float64, a 3 x 2
    low-res target; a 2-channel one too, which both run channel by channel)."""
    factor = int(name.rsplit("x", 1)[1])
    h, w = 3, 2
    torch.manual_seed(0)
    ref = JOINT_MODELS[name]().double()
    path = tmp_path / "weights_epoch_5000.pth"
    torch.save(ref.state_dict(), path, _use_new_zipfile_serialization=bool(len(name) % 2))
    for channels in (1, 2):
        net = pacnet.build(name, inputs={"target": (2, channels, h, w), "guide": (2, 3, h * factor, w * factor)},
                           vars={"CHANNELS": channels}).double()
        result = pacnet.load_weights(net, path)
        assert result.files[0].source.name == "nvlabs" and len(result.tensors) == len(ref.state_dict())
        assert parameter_count(net) == sum(p.numel() for p in ref.parameters())
        g = torch.Generator().manual_seed(channels)
        target = torch.rand(2, channels, h, w, generator=g, dtype=torch.float64)
        guide = torch.rand(2, 3, h * factor, w * factor, generator=g, dtype=torch.float64)
        with torch.no_grad():
            out = net(target, guide)
            want = ref(target, guide)
        assert set(out) == {"pred"} and out["pred"].shape == (2, channels, h * factor, w * factor)
        torch.testing.assert_close(out["pred"], want, rtol=1e-10, atol=1e-10)


def test_joint_upsampling_train_phase_has_gt_and_a_loss_that_reaches_the_pac_weights():
    net = pacnet.build("jointupsample/pac_joint_upsample_lite_x8", phase="train",
                       inputs={"target": (2, 1, 2, 2), "guide": (2, 3, 16, 16)})
    assert list(net.inputs) == ["target", "guide", "gt"] and net.inputs["gt"] == (2, 1, 16, 16)
    assert dict(net.loss_weights) == {"loss": 1.0}
    g = torch.Generator().manual_seed(1)
    out = net(torch.rand(2, 1, 2, 2, generator=g), torch.rand(2, 3, 16, 16, generator=g),
              torch.rand(2, 1, 16, 16, generator=g))
    out["loss"].backward()
    grad = net.get_submodule("up_convts/0").weight.grad
    assert grad is not None and grad.abs().sum() > 0
    test = pacnet.build("jointupsample/pac_joint_upsample_lite_x8", device="meta")
    assert list(test.inputs) == ["target", "guide"] and [o.name for o in test.ir.outputs] == ["pred"]


def test_joint_upsampling_x8_carries_a_trainable_data_and_solver_section():
    from pacnet.engine.data import make_dataset, parse_data
    from pacnet.engine.solver import parse_solver
    from pacnet.load import load

    tree = load("jointupsample/pac_joint_upsample_x8")
    solver = parse_solver(tree["solver"])
    assert solver.type == "Adam" and solver.max_iter > 0
    options = parse_data(tree["data"], "train")
    assert options["dataset"] == "synthetic_depth" and options["factor"] == 8
    sample = make_dataset(tree["data"], "train")[0]
    assert set(tree["inputs"]) <= set(sample) and "gt" in sample
    f = options["factor"]
    assert sample["guide"].shape[-1] == f * sample["target"].shape[-1] == sample["gt"].shape[-1]


# Zoo nets that carry the data: and solver: sections of their training recipe, with the vars
# their training crops need.
RECIPES = {
    "deeplab/deeplab_v1_largefov": {}, "deeplab/deeplab_v2_vgg16_aspp": {}, "deeplab/deeplab_v2_resnet101": {},
    "deeplab/aspp_v3_head": {}, "fcn/fcn8s": {}, "pspnet/pspnet101_voc2012": {}, "segaware/vgg": {},
    "segaware/res": {"HALF_SIZE": 161}, "segaware/embs": {},
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_training_recipes_validate_and_build_at_their_crops(name):
    """Each recipe's data: and solver: sections validate for both phases, and the train net
    builds (on the meta device) at the batch and crop its data gives."""
    from pacnet.engine.data import parse_data
    from pacnet.engine.solver import parse_solver
    from pacnet.load import load

    tree = load(name, vars=RECIPES[name])
    solver = parse_solver(tree["solver"])
    assert solver.max_iter > 0 and solver.base_lr > 0
    train, test = parse_data(tree["data"], "train"), parse_data(tree["data"], "test")
    assert train["metric"] in ("miou", "none") and test["batch_size"] >= 1
    dims = tree.get("dims") or {}
    h, w = train["crop_size"] if train["crop_size"][0] else (dims.get("H", 64), dims.get("W", 64))
    if train["dataset"] == "synthetic_embedding" and not train["crop_size"][0]:
        h, w = train["height"], train["width"]
    b = train["batch_size"]
    net = pacnet.build(name, phase="train", device="meta", vars=RECIPES[name],
                       inputs={"data": (b, 3, h, w), "label": (b, 1, h, w)})
    assert net.loss_weights, name  # it has a loss to train


# ----------------------------------------------------------------------------- heads

@pytest.mark.parametrize("mode", ["embedded_gaussian", "dot_product", "concatenation"])
def test_nonlocal_head_modes_run_and_start_as_identity(mode):
    net = pacnet.build("nonlocal/nonlocal_head", vars={"MODE": mode}, inputs={"data": (1, 3, 33, 33)},
                       overrides={"outputs": ["seg", "convs/0", "nl_block"]})
    assert net.ir.node("nl_block").spec["mode"] == mode
    assert parameter_count(net) == RESNET18 + _nl_head(mode)
    assert ("nl_block.concat_weight" in net.state_dict()) == (mode == "concatenation")
    with torch.no_grad():
        for key, value in net.state_dict().items():  # real statistics come with the weights
            if key.endswith(("scale_factor", ".var")):
                value.fill_(1.0)
        out = net(torch.randn(1, 3, 33, 33, generator=torch.Generator().manual_seed(2)))
        assert out["seg"].shape == (1, 21, 33, 33) and torch.isfinite(out["seg"]).all()
        # mmcv zeros_init with a norm: the BN gamma is 0, so the block adds nothing yet
        torch.testing.assert_close(out["nl_block"], out["convs/0"], rtol=0, atol=0)
        # with gamma 1 (and positive theta/phi, so relu(concat) cannot be all 0) it does
        block = net.get_submodule("nl_block")
        block.out_bn_weight.fill_(1.0)
        for name in ("theta_weight", "phi_weight", "concat_weight"):
            if getattr(block, name, None) is not None:
                getattr(block, name).abs_()
        again = net(torch.randn(1, 3, 33, 33, generator=torch.Generator().manual_seed(2)))
        assert (again["nl_block"] - again["convs/0"]).abs().max() > 1e-3


def test_aspp_v3_head_wiring():
    net = pacnet.build("deeplab/aspp_v3_head", device="meta")
    ir = net.ir
    assert [b.name for b in ir.node("aspp_concat").inputs] == [
        "image_pool", "aspp_modules/0", "aspp_modules/1", "aspp_modules/2", "aspp_modules/3"]
    assert [ir.node(f"aspp_modules/{i}").spec["dilation"] for i in (1, 2, 3)] == [12, 24, 36]
    assert ir.node("image_pool/pool").spec["output_size"] == 1
    assert [b.name for b in ir.node("image_pool").inputs] == ["image_pool/conv", "res5c"]
    assert [b.name for b in ir.node("seg").inputs] == ["conv_seg", "data"]
    assert not ir.node("seg").spec["align_corners"]
    train = pacnet.build("deeplab/aspp_v3_head", phase="train", device="meta")
    assert [b.name for b in train.ir.node("loss").inputs] == ["seg", "label"]
    assert "conv_seg_dropout" in {n.name for n in train.ir.nodes} - {n.name for n in ir.nodes}


# ----------------------------------------------------------------------------- DeepLab VGG vs the Caffe files

GRAPHS = "/work/shared/graphs"
if not os.path.isdir(GRAPHS):
    GRAPHS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "graphs")
needs_graphs = pytest.mark.skipif(not os.path.isdir(GRAPHS), reason="shared graphs not available")
CAFFE_VARS = {"NUM_LABELS": 21, "EXP": "voc12", "NET_ID": "net", "DATA_ROOT": "x", "TRAIN_SET": "train",
              "TEST_SET": "val", "FEATURE_DIR": "x", "LIST_DIR": "x", "NET_ROOT": "x"}


def _caffe(rel, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pacnet.build(os.path.join(GRAPHS, rel), vars=CAFFE_VARS, **kwargs)


@needs_graphs
@pytest.mark.parametrize("rel,name", [("deeplab/v2_vgg16_aspp_l/train.prototxt", "deeplab/deeplab_v2_vgg16_aspp"),
                                      ("deeplab/v1_largefov_legacy/train.prototxt", "deeplab/deeplab_v1_largefov")])
def test_deeplab_vgg_nets_match_the_authors_caffe_files(rel, name):
    caffe = _caffe(rel, phase="train", device="meta")
    zoo = pacnet.build(name, phase="train", device="meta", inputs={"data": caffe.inputs["data"]})
    assert {k: tuple(v.shape) for k, v in zoo.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in caffe.state_dict().items()}
    assert dict(zoo.param_specs) == dict(caffe.param_specs)  # lr/decay multipliers, blob by blob
    assert zoo.shapes["fc8_voc12"] == caffe.shapes["fc8_voc12"]


@needs_graphs
def test_deeplab_v2_vgg16_aspp_computes_what_the_caffe_test_net_computes():
    # the file's data layer crops 513 x 513; 33 x 33 (32k - 31) keeps every level aligned
    caffe = _caffe("deeplab/v2_vgg16_aspp_l/test.prototxt",
                   overrides={"inputs.data": [1, 3, 33, 33], "inputs.label": [1, 1, 33, 33]})
    zoo = pacnet.build("deeplab/deeplab_v2_vgg16_aspp", inputs={"data": (1, 3, 33, 33)})
    zoo.load_state_dict(caffe.state_dict(), strict=True)
    x = torch.randn(1, 3, 33, 33, generator=torch.Generator().manual_seed(3)) * 50
    with torch.no_grad():
        want = caffe(x, torch.zeros(caffe.inputs["label"]), torch.zeros(caffe.inputs["data_dim"]))
        got = zoo(x)
    assert got["fc8_interp"].shape == (1, 21, 33, 33)
    torch.testing.assert_close(got["fc8_interp"], want["fc8_interp"], rtol=0, atol=0)


# ----------------------------------------------------------------------------- FCN-8s vs Caffe's voc-fcn8s

FCN_NARROW = {**{f"layers.{n}.num_output": 8 for n in ("conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1",
                                                       "conv3_2", "conv3_3", "conv4_1", "conv4_2", "conv4_3",
                                                       "conv5_1", "conv5_2", "conv5_3")},
              "layers.fc6.num_output": 16, "layers.fc7.num_output": 16}


@needs_graphs
def test_fcn8s_takes_the_weights_of_caffes_voc_fcn8s(tmp_path):
    """voc-fcn8s stores its upscore blobs dense (21 x 21 x k x k): a caffemodel of its deploy net
    (narrowed, with random, non-diagonal upsampling weights) converts, loads strictly into
    fcn/fcn8s, and the two compute the same scores."""
    from pacnet.caffemodel import convert_caffemodel, write_caffemodel

    caffe = _caffe("fcn/voc-fcn8s/deploy.prototxt", overrides={**FCN_NARROW, "layers.input.shape": [[1, 3, 64, 64]]})
    zoo = pacnet.build("fcn/fcn8s", inputs={"data": (1, 3, 64, 64)}, overrides=FCN_NARROW)
    assert caffe.state_dict()["upscore2.weight"].shape == zoo.state_dict()["upscore2.weight"].shape == (21, 21, 4, 4)
    g = torch.Generator().manual_seed(5)
    state = caffe.state_dict()
    layers = [(n.name, n.type, [0.1 * torch.randn(state[f"{n.name}.{b}"].shape, generator=g).numpy()
                                for b in ("weight", "bias") if f"{n.name}.{b}" in state])
              for n in caffe.ir.nodes if f"{n.name}.weight" in state]
    write_caffemodel(layers, tmp_path / "voc-fcn8s.caffemodel")
    convert_caffemodel(tmp_path / "voc-fcn8s.caffemodel", caffe, tmp_path / "fcn8s.safetensors")
    pacnet.load_weights(caffe, tmp_path / "fcn8s.safetensors")
    pacnet.load_weights(zoo, tmp_path / "fcn8s.safetensors")
    x = torch.randn(1, 3, 64, 64, generator=g) * 50
    with torch.no_grad():
        want, got = caffe(x)["score"], zoo(x)["score"]
    assert got.shape == (1, 21, 64, 64)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_fcn_upscore_starts_as_per_class_bilinear_upsampling():
    net = pacnet.build("fcn/fcn8s_altpad", inputs={"data": (1, 3, 32, 32)}, overrides=FCN_NARROW)
    w = net.state_dict()["upscore2.weight"]
    assert w.shape == (21, 21, 4, 4) and dict(net.param_specs)["upscore2.weight"][0] == 0
    taps = torch.tensor([0.25, 0.75, 0.75, 0.25])
    torch.testing.assert_close(w[3, 3], taps[:, None] * taps[None, :])
    assert w.sum() == 21 * taps.sum() ** 2  # zero off the diagonal
    x = torch.randn(1, 21, 5, 5, generator=torch.Generator().manual_seed(0))
    up = torch.nn.functional.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    torch.testing.assert_close(net.get_submodule("upscore2")(x)[..., 1:-1, 1:-1], up[..., 1:-1, 1:-1])


# ----------------------------------------------------------------------------- FCN-8s + PAC-CRF

def test_fcn8s_crf_wiring():
    net = pacnet.build("fcn/fcn8s_crfi5p4d5641p4d5161", device="meta")
    ir = net.ir
    assert [b.name for b in ir.node("crf").inputs] == ["score", "edge_feat0", "edge_feat1"]
    for i in (0, 1):  # edge features = image / 30 per channel, one learnable scale per kernel
        scale = ir.node(f"feat_scales/{i}")
        assert [b.name for b in scale.inputs] == ["data"]
        assert scale.spec["filler"]["value"] == pytest.approx(1 / 30)
        assert net.state_dict()[f"feat_scales/{i}.weight"].shape == (3,)
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items() if k.startswith("crf.")}
    assert shapes == {"crf.unary_weight": (), "crf.messengers.0.weight": (21, 21, 5, 5),
                      "crf.messengers.1.weight": (21, 21, 5, 5), "crf.pairwise_weights.0": (),
                      "crf.pairwise_weights.1": ()}
    assert [o.name for o in ir.outputs] == ["crf"]
    train = pacnet.build("fcn/fcn8s_crfi5p4d5641p4d5161", phase="train", device="meta")
    assert dict(train.loss_weights) == {"loss_crf": 1.0}
    assert [b.name for b in train.ir.node("loss_crf").inputs] == ["crf", "label"]
