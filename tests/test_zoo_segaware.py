"""nets/segaware: the embs, vgg and res nets against the original Caffe configs.

Each net builds in both phases with the configs' blob shapes; its learnable blobs (names,
shapes, lr/decay multipliers) and parameter count are those of the configs' nets, except
where the YAML differs by design (listed per case); vgg and embs compute the configs'
numbers (float64, same weights, small inputs); the fused build turns every segmentation-
aware conv into a SegawareConvolution and equals the unfused one; the solver sections are
the configs' solver files.
"""

import functools
import os
import re
import warnings

import pytest
import torch

import pacnet
from pacnet.api import parameter_count
from pacnet.engine.solver import parse_solver
from pacnet.prototxt import parse_file

CONFIG = "/work/shared/graphs/segaware/config"
if not os.path.isdir(CONFIG):
    CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "graphs", "segaware", "config")
needs_configs = pytest.mark.skipif(not os.path.isdir(CONFIG), reason="shared segaware configs not available")

NETS = {name: f"nets/segaware/{name}.yaml" for name in ("embs", "vgg", "res")}
EMBS_PARAMS = 596_544       # 6 convs + the 1x1 weighted_avg
VGG_PARAMS = 22_269_859     # embedding 1,764,416 + VGG-16/LargeFOV convs + 14 lambdas
RES_PARAMS = 45_814_274     # DeepLab v2 ResNet-101 44,048,532 + embedding + 3 CRF scales + 3 x 21 x 21
TRAIN_CROP = 321


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The inputs here are tiny: on a shared machine, intra-op threads only add waiting."""
    import numba

    torch_threads, numba_threads = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(1)
    numba.set_num_threads(1)
    yield
    torch.set_num_threads(torch_threads)
    numba.set_num_threads(numba_threads)


def _template_vars(crop, mask=(3, 1, 1)):
    """Values for the configs' ${VAR}s: scripts/test_res.sh's, the released training nets'
    learning rates (MAINSCALE_LR 1/2 of vgg, CRF_LR 1 of supergiven_9) and the embs masks
    (train_coco_trainval: 3x3 pad 1 at dilations 1, 2, 5; test: `mask`)."""
    values = dict(NET_ID="net", DATA_ROOT="/data", EXP="segaware", TRAIN_SET="train", TEST_SET="test",
                  FEATURE_DIR="features", DATASET="voc12", NUM_LABELS=21, BATCH_SIZE=1, CROP_SIZE=crop,
                  HALF_SIZE=(crop - 1) // 2 + 1, EMBS_LR1=1, EMBS_LR2=2, EMBS_LR3=2, MAIN_LR1=1,
                  MAIN_LR2=2, FINAL_LR1=1, FINAL_LR2=2, CRF_LR1=1, CRF_LR2=1, MAINSCALE_LR1=1,
                  MAINSCALE_LR2=2, MASK_SIZE=mask[0], MASK_PAD=mask[1], MASK_DILATION=mask[2],
                  MASK2_SIZE=3, MASK2_PAD=1, MASK2_DILATION=2, MASK3_SIZE=3, MASK3_PAD=1, MASK3_DILATION=5)
    return {k: str(v) for k, v in values.items()}


@functools.lru_cache(maxsize=None)
def _config_net(path, phase, crop=513, mask=(3, 1, 1)):
    with warnings.catch_warnings():  # renamed duplicate layer names, dropped MatWrite sinks
        warnings.simplefilter("ignore")
        return pacnet.build(os.path.join(CONFIG, path), phase=phase, device="meta",
                            vars=_template_vars(crop, mask=mask))


@functools.lru_cache(maxsize=None)
def _ours(name, phase, size=None, fuse=True):
    kwargs = {}
    if size:
        kwargs["inputs"] = {"data": (1, 3, size, size)}
        if name == "res":
            kwargs["vars"] = {"HALF_SIZE": (size - 1) // 2 + 1}
    return pacnet.build(NETS[name], phase=phase, device="meta", fuse=fuse, **kwargs)


def _types(net):
    counts = {}
    for node in net.ir.nodes:
        counts[node.type] = counts.get(node.type, 0) + 1
    return counts


def _blobs(net):
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


# ----------------------------------------------------------------------------- structure

SHAPES = [  # the configs' blob shapes (segaware.md §5): test at 513, train crops 321
    ("embs", "test", None, {"weighted_avg": (1, 64, 513, 513), "fused": (1, 643, 513, 513),
                            "weighted_avg_dist_test": (1, 25, 513, 513), "loss_avg_test": ()}),
    ("embs", "train", TRAIN_CROP, {"weighted_avg_dist": (1, 9, 321, 321), "parity2": (1, 9, 319, 319),
                            "weighted_avg_dist3": (1, 9, 313, 313), "loss_avg3": ()}),
    ("vgg", "test", None, {"emb": (1, 64, 513, 513), "emb_dist4": (1, 9, 65, 65), "fc6": (1, 1024, 65, 65),
                           "fc8_voc12": (1, 21, 65, 65), "fc8_interp": (1, 21, 513, 513)}),
    ("vgg", "train", TRAIN_CROP, {"emb_shrink2": (1, 64, 161, 161), "pool3": (1, 256, 41, 41),
                           "label_shrink": (1, 1, 41, 41), "loss": ()}),
    ("res", "test", None, {"fc1_voc12": (1, 21, 65, 65), "emb2": (1, 64, 257, 257), "embxy": (1, 66, 257, 257),
                           "crf": (1, 21, 257, 257), "halfsize_fc_col": (1, 21 * 81, 257, 257),
                           "crf_interp": (1, 21, 513, 513)}),
    ("res", "train", TRAIN_CROP, {"fc1_voc12": (1, 21, 41, 41), "crf": (1, 21, 161, 161),
                           "label_shrink2": (1, 1, 161, 161), "loss": (), "loss_res1": ()}),
    # small inputs (8k+1): what the numeric tests below run, and res on the meta device
    ("res", "test", 33, {"fc1_voc12": (1, 21, 5, 5), "crf": (1, 21, 17, 17), "crf_interp": (1, 21, 33, 33)}),
    ("res", "train", 33, {"fc1_voc12": (1, 21, 5, 5), "crf": (1, 21, 17, 17), "loss": ()}),
]


@pytest.mark.parametrize("name,phase,size,shapes", SHAPES, ids=[f"{n}-{p}-{s or 513}" for n, p, s, _ in SHAPES])
def test_builds_in_both_phases_with_the_configs_shapes(name, phase, size, shapes):
    net = _ours(name, phase, size)
    for blob, shape in shapes.items():
        assert net.shapes[blob] == shape, blob
    assert ("label" in net.inputs) == (phase == "train" or name == "embs")
    assert bool(net.loss_weights) == (phase == "train" or name == "embs")


def test_res_needs_half_size_to_match_the_input():
    with pytest.raises(pacnet.errors.PacnetError, match="embxy"):
        pacnet.build(NETS["res"], inputs={"data": (1, 3, 33, 33)}, device="meta")  # HALF_SIZE stays 257


@pytest.mark.parametrize("name,fused_convs,other_im2col", [("vgg", 14, 0), ("embs", 0, 0), ("res", 0, 2)])
@pytest.mark.parametrize("phase", ["train", "test"])
def test_fusion_turns_every_segaware_conv_into_one_layer(name, fused_convs, other_im2col, phase):
    fused, plain = _ours(name, phase, 33), _ours(name, phase, 33, fuse=False)
    f, p = _types(fused), _types(plain)
    assert f.get("SegawareConvolution", 0) == fused_convs
    assert p.get("SegawareConvolution", 0) == 0
    # the unfused chain: Im2col, Tile, Eltwise PROD and a bottom_is_im2col Convolution per conv
    assert sum(n.type == "Convolution" and n.spec.get("bottom_is_im2col") for n in plain.ir.nodes) == fused_convs
    assert p.get("Tile", 0) - f.get("Tile", 0) == fused_convs
    # res's test-time smoothing multiplies Im2col by a Tile too, but feeds no Convolution
    assert f.get("Im2col", 0) == (other_im2col if phase == "test" else 0)
    assert p.get("Im2col", 0) == fused_convs + f.get("Im2col", 0)
    assert _blobs(fused) == _blobs(plain)
    assert all(fused.ir.node(n.name).fused for n in fused.ir.nodes if n.type == "SegawareConvolution")


# ----------------------------------------------------------------------------- against the configs

def _alias(key):
    """The multi-scale res configs' scale-0.75/0.5 towers: state_dict aliases of the scale-1
    tower's blobs (shared by param name), absent from the single-scale YAML by design."""
    return re.search(r"_res0(5|75)(_|$)", key.split(".")[0]) is not None


LAMBDAS = {f"weighted_emb_dist{s}_{i}.weight" for s, n in ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3))
           for i in range(1, n + 1)}

TRUNK = r"conv1|res\d\w*"  # res: resnet_blocks.yaml's trunk convs start from msra (the configs: 0)

# (net, phase, config, crop, blobs only in the YAML, blobs only in the config, the config's
# parameter count, layers whose fillers differ from the config's)
CASES = [
    ("embs", "train", "embs/train.prototxt", TRAIN_CROP, set(), set(), EMBS_PARAMS, None),
    ("embs", "test", "embs/test.prototxt", 513, set(), set(), EMBS_PARAMS, None),
    # deploy ("31_L1_coco") adds a learned positional prior: one Scale
    ("embs", "test", "embs/deploy.prototxt", 321, set(), {"weighted_pos_dist.weight"}, EMBS_PARAMS + 1, None),
    ("vgg", "train", "vgg/train.prototxt", TRAIN_CROP, set(), set(), VGG_PARAMS, None),
    ("vgg", "test", "vgg/deploy.prototxt", 321, set(), set(), VGG_PARAMS, None),
    # test.prototxt: one lambda per stage 1-5 (weighted_emb_distN) instead of one per conv,
    # all six starting at 0.1 instead of 0.05
    ("vgg", "test", "vgg/test.prototxt", 513, LAMBDAS, {f"weighted_emb_dist{s}.weight" for s in range(1, 6)},
     VGG_PARAMS - 8, "weighted_emb_dist6"),
    ("res", "train", "res/train.prototxt", TRAIN_CROP, set(), set(), RES_PARAMS, TRUNK),
    # the test nets' smoothing rounds have one more Scale (exp(-50 D)), test phase only; the
    # test template starts scaled_emb at 300 (train: 200)
    ("res", "test", "res/test.prototxt", 513, set(), set(), RES_PARAMS + 1, TRUNK + "|scaled_emb"),
    # deploy ("res_given"): the CRF's bilateral features are 0.13 rgb (scaled_rgb) instead of
    # the embedding (scaled_emb), and there is no smoothing
    ("res", "test", "res/deploy.prototxt", 513, {"scaled_emb.weight", "halfsize_dist_sc.weight"},
     {"scaled_rgb.weight"}, RES_PARAMS, TRUNK),
]


def _fillers(net):
    return {n.name: {k: v for k, v in n.spec.params.items() if k.endswith("filler")}
            for n in net.ir.nodes if n.params or n.type in ("Convolution", "SegawareConvolution", "Scale")}


@needs_configs
@pytest.mark.parametrize("name,phase,config,crop,ours_only,config_only,count,other_fillers", CASES,
                         ids=[f"{c[0]}-{c[1]}-{os.path.basename(c[2])}" for c in CASES])
def test_learnable_blobs_and_parameter_count_are_the_configs(name, phase, config, crop, ours_only, config_only,
                                                             count, other_fillers):
    ours, ref = _ours(name, phase, TRAIN_CROP if phase == "train" else None), _config_net(config, phase, crop)
    mine = _blobs(ours)
    theirs = {k: s for k, s in _blobs(ref).items() if not _alias(k)}
    assert set(mine) - set(theirs) == ours_only
    assert set(theirs) - set(mine) == config_only
    assert {k: mine[k] for k in set(mine) & set(theirs)} == {k: theirs[k] for k in set(mine) & set(theirs)}
    assert parameter_count(ref) == count
    own = {"embs": EMBS_PARAMS, "vgg": VGG_PARAMS, "res": RES_PARAMS + (phase == "test")}[name]
    assert parameter_count(ours) == own
    # the same initialisation, layer by layer
    a, b = _fillers(ours), _fillers(ref)
    common = set(a) & set(b)
    assert len(common) >= len({k.split(".")[0] for k in set(mine) & set(theirs)})
    differ = {n for n in common if a[n] != b[n]}
    assert differ == {n for n in common if other_fillers and re.fullmatch(other_fillers, n)}


def _layers(net):
    """name -> (type, parameters, bottom blobs), with Caffe's defaults and one-item lists
    normalised away; fillers are compared above, DistLoss's geometry is parsed and unused."""
    out = {}
    for n in net.ir.nodes:
        params = {}
        for k, v in n.spec.params.items():
            if k.endswith("filler") or (n.type == "DistLoss" and k in ("kernel_size", "pad", "stride", "dilation")):
                continue
            if isinstance(v, (list, tuple)):
                v = v[0] if len(v) == 1 else tuple(v)
            if v != {"stride": 1, "dilation": 1, "pad": 0}.get(k):
                params[k] = v
        out[n.name] = (n.type, params, tuple(b.name for b in n.inputs))
    return out


RESIZED = {"emb22_resized", "emb33_resized", "emb"}  # second-bottom Interps; emb reads emb_fused
LAYOUTS = [  # (net, phase, config, layers that differ by design)
    ("embs", "train", "embs/train.prototxt", {"conv21_resized", "conv22_resized", "conv31_resized"}),
    ("embs", "test", "embs/test.prototxt", {"conv21_resized", "conv22_resized", "conv31_resized"}),
    ("vgg", "train", "vgg/train.prototxt", RESIZED),
    ("vgg", "test", "vgg/deploy.prototxt", RESIZED),
    ("res", "train", "res/train.prototxt", RESIZED | {"fc_fusion_big"}),  # single scale: upsamples fc1_voc12
    ("res", "test", "res/test.prototxt", RESIZED | {"fc_fusion_big"}),
]


@needs_configs
@pytest.mark.parametrize("name,phase,config,by_design", LAYOUTS,
                         ids=[f"{c[0]}-{c[1]}-{os.path.basename(c[2])}" for c in LAYOUTS])
def test_layers_are_the_configs(name, phase, config, by_design):
    """Every layer with a Caffe name has the config's type, parameters and bottoms (fused
    builds on both sides): covers res's CRF and test-time smoothing, which no test runs."""
    ours = _layers(_ours(name, phase, TRAIN_CROP if phase == "train" else None))
    theirs = _layers(_config_net(config, phase, TRAIN_CROP if phase == "train" else 513))
    renamed = {n for n in set(ours) - set(theirs) if n.endswith(("_relu", "_test")) or n == "emb_fused"}
    assert set(ours) - set(theirs) == renamed  # ReLUs (duplicate names in the configs), embs' test loss
    common = set(ours) & set(theirs)
    assert by_design <= common
    assert {n for n in common if ours[n] != theirs[n]} == by_design
    for n in by_design - {"emb", "fc_fusion_big"}:  # the Interps: the same resize, written differently
        assert ours[n][0] == theirs[n][0] == "Interp" and ours[n][2][0] == theirs[n][2][0]


@needs_configs
@pytest.mark.parametrize("name", ["embs", "vgg", "res"])
def test_train_phase_has_the_configs_learning_rate_multipliers(name):
    ours, ref = _ours(name, "train", TRAIN_CROP), _config_net(f"{name}/train.prototxt", "train", TRAIN_CROP)
    theirs = {k: v for k, v in ref.param_specs.items() if not _alias(k)}
    assert dict(ours.param_specs) == theirs


SOLVERS = {"embs": "embs/solver_coco_trainval.prototxt", "vgg": "vgg/solver_voc_train_aug.prototxt",
           "res": "res/solver_voc_trainval_aug.prototxt"}


@needs_configs
@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_solver_section_is_the_configs_solver(name):
    original = parse_file(os.path.join(CONFIG, SOLVERS[name])).to_dict()
    for key in ("train_net", "snapshot_prefix", "solver_mode"):  # paths and the device: not the recipe
        original.pop(key)
    ours = parse_solver(_ours(name, "test").config["solver"])
    assert ours.to_dict() == parse_solver(original).to_dict()
    if name == "embs":  # momentum unset in the file: Caffe's 0, so Adam's beta1 is 0
        assert ours.type == "Adam" and ours.momentum == 0.0 and ours.momentum2 == 0.999


# ----------------------------------------------------------------------------- numbers

def _randomize(net, seed=0):
    """Weights that make every path matter: He-scaled kernels, small biases, lambdas of
    either sign and of the size that puts exp(-|lambda| D) in (0, 1) for these embeddings."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(net.state_dict().items()):
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * (2.0 / p[0].numel()) ** 0.5)
            elif p.numel() == 1:
                sign = 1 - 2 * torch.randint(0, 2, p.shape, generator=g)
                p.copy_((torch.rand(p.shape, generator=g, dtype=p.dtype) * 1.5e-3 + 5e-4) * sign)
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.01)


def _real(source, phase, outputs, **kwargs):
    """A float64 net in eval mode (Dropout off in the train phase too) requesting `outputs`
    (loss tops come along anyway). Built on the meta device and materialised uninitialised:
    every test overwrites the whole state_dict, so the fillers' work would be thrown away."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = pacnet.build(source, phase=phase, device="meta", overrides={"outputs": outputs}, **kwargs)
    assert {name for name, _ in net.named_buffers()} <= set(net.state_dict())  # nothing left unset
    return net.to_empty(device="cpu").double().eval()


def _inputs(size, seed=1):
    g = torch.Generator().manual_seed(seed)
    data = torch.randn(1, 3, size, size, generator=g, dtype=torch.float64) * 50
    label = torch.randint(0, 21, (1, 1, size, size), generator=g).double()
    label[..., : size // 3, : size // 3] = 255  # some void pixels
    return data, label


def _assert_same(a, b, blobs):
    for blob in blobs:
        assert a[blob].abs().max() > 0, blob
        torch.testing.assert_close(a[blob], b[blob], rtol=1e-10, atol=1e-12, msg=blob)


VGG_SIZE = 17  # 8k+1: stages at 17, 9, 5, 3
VGG_BLOBS = ["conv1_2", "conv2_2", "conv3_3", "conv4_3", "conv5_3", "fc8_voc12"]


@pytest.fixture(scope="module")
def vgg_train():
    """Outputs of the YAML's train phase, fused and unfused, and of vgg/train.prototxt (unfused,
    when the shared configs are there), all with the same weights."""
    size = {"data": (1, 3, VGG_SIZE, VGG_SIZE)}
    nets = {"fused": _real(NETS["vgg"], "train", VGG_BLOBS, inputs=size),
            "unfused": _real(NETS["vgg"], "train", VGG_BLOBS, inputs=size, fuse=False)}
    if os.path.isdir(CONFIG):
        nets["config"] = _real(os.path.join(CONFIG, "vgg/train.prototxt"), "train", VGG_BLOBS, fuse=False,
                               vars=_template_vars(VGG_SIZE))
    _randomize(nets["fused"])
    for key in set(nets) - {"fused"}:
        nets[key].load_state_dict(nets["fused"].state_dict(), strict=True)
    data, label = _inputs(VGG_SIZE)
    with torch.no_grad():
        return {k: net(data=data, label=label) for k, net in nets.items()}


@needs_configs
def test_vgg_train_phase_computes_the_config_net(vgg_train):
    _assert_same(vgg_train["unfused"], vgg_train["config"], VGG_BLOBS + ["loss"])


def test_vgg_fused_build_equals_the_unfused_chain(vgg_train):
    _assert_same(vgg_train["fused"], vgg_train["unfused"], VGG_BLOBS + ["loss"])


@needs_configs
def test_vgg_test_phase_with_per_stage_lambdas_computes_test_prototxt():
    """The header's recipe: test.prototxt's one lambda per stage = the per-conv lambdas set equal."""
    blobs = ["conv1_1", "conv3_3", "conv5_3", "fc8_interp"]
    ref = _real(os.path.join(CONFIG, "vgg/test.prototxt"), "test", blobs, vars=_template_vars(VGG_SIZE),
                fuse=False)
    _randomize(ref)
    ours = _real(NETS["vgg"], "test", blobs, inputs={"data": (1, 3, VGG_SIZE, VGG_SIZE)}, fuse=False)
    theirs = ref.state_dict()

    def value(key):  # a conv's lambda = its stage's; negated for the second convs: |lambda| is used
        if key not in LAMBDAS:
            return theirs[key]
        stage = theirs[re.sub(r"_\d\.weight$", ".weight", key)]
        return -stage if key.endswith("_2.weight") else stage

    ours.load_state_dict({key: value(key) for key in ours.state_dict()}, strict=True)
    data, label = _inputs(VGG_SIZE)
    with torch.no_grad():
        _assert_same(ours(data=data), ref(data=data, label=label), blobs)
    assert ours.shapes["fc8_interp"] == (1, 21, VGG_SIZE, VGG_SIZE)


@needs_configs
@pytest.mark.parametrize("phase,config,mask,blobs", [
    ("train", "embs/train.prototxt", (3, 1, 1), ["weighted_avg", "loss_avg", "loss_avg2", "loss_avg3"]),
    ("test", "embs/test.prototxt", (5, 6, 3), ["weighted_avg", "loss_avg_test"]),
])
def test_embs_computes_the_config_nets(phase, config, mask, blobs):
    size = 33
    theirs = [b.replace("loss_avg_test", "loss_avg") for b in blobs]
    ref = _real(os.path.join(CONFIG, config), phase, theirs[:1], vars=_template_vars(size, mask=mask))
    _randomize(ref)
    ours = _real(NETS["embs"], phase, blobs[:1], inputs={"data": (1, 3, size, size)})
    ours.load_state_dict(ref.state_dict(), strict=True)
    data, label = _inputs(size)
    with torch.no_grad():
        a, b = ours(data=data, label=label), ref(data=data, label=label)
    _assert_same(a, {mine: b[t] for mine, t in zip(blobs, theirs)}, blobs)
