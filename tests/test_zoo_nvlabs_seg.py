"""The original's segmentation models (NVlabs/pacnet create_model names) as zoo nets: the
original's state_dicts (models written from pac.md §2 in tests/nvlabs_reference.py) load
strictly and the nets compute the original's outputs in float64; the full-size layouts
match key by key; the two-stage CRF recipe trains what it should."""

import pytest
import torch

import pacnet
from nvlabs_reference import VGG, ModelWithConvCrf, ModelWithCrf, fcn_backbone
from pacnet.errors import DataError
from pacnet.weights import PACNET_NAMES, sources

WIDTHS = (8,) * 13 + (16, 16)  # the 13 VGG convolutions, fc6, fc7: narrow, for float64 forwards
NARROW = {**{f"layers.conv{a}_{b}.num_output": 8 for a, n in ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3))
             for b in range(1, n + 1)}, "layers.fc6.num_output": 16, "layers.fc7.num_output": 16}

# zoo net -> (the original's model, input size)
MODELS = {
    "fcn/fcn8s": (lambda w: fcn_backbone("fcn8s", w), 40),
    "fcn/fcn8s_altpad": (lambda w: fcn_backbone("fcn8saltpad", w), 64),
    "fcn/fcn8spac": (lambda w: fcn_backbone("fcn8spac", w), 64),
    "fcn/fcn8s_crfi5p4d5641p4d5161": (lambda w: ModelWithCrf(fcn_backbone("fcn8s", w)), 40),
    "fcn/fcn8s_crfi5lp4d5641p4d5161": (lambda w: ModelWithCrf(fcn_backbone("fcn8s", w), loose=True), 40),
    "fcn/fcn8s_crfi5p4d5321": (lambda w: ModelWithCrf(fcn_backbone("fcn8s", w), edges="p4d5321"), 40),
    "fcn/fcn8spac_crfi5p4d5641p4d5161": (lambda w: ModelWithCrf(fcn_backbone("fcn8spac", w)), 64),
    "fcn/fcn8spac_crfi5lp4d5641p4d5161": (lambda w: ModelWithCrf(fcn_backbone("fcn8spac", w), loose=True), 64),
    "fcn/fcn8s_convcrf": (lambda w: ModelWithConvCrf(fcn_backbone("fcn8s", w)), 40),
}


def _zoo(name, size, **kw):
    return pacnet.build(name, inputs={"data": (1, 3, size, size)}, overrides=NARROW, **kw).double()


def _randomized(model, seed):
    """The model with every blob drawn at random (the original zero-fills its FCN
    convolutions; random values test every blob's place), feature scales around 30."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, value in model.state_dict().items():
            noise = torch.rand(value.shape, generator=g, dtype=value.dtype)
            value.copy_(30 * (0.5 + noise) if "feat_scales" in key else 0.4 * noise - 0.2)
    return model.double().eval()


def _image(size, seed=1):
    return 60 * torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# the plain backbone, the PAC one under a CRF, and the ConvCRF in the default suite (the tied
# and loose CRFs on FCN-8s run in the tests below), every model with -m slow
DEFAULT = ("fcn/fcn8s", "fcn/fcn8spac_crfi5p4d5641p4d5161", "fcn/fcn8s_convcrf")


@pytest.mark.parametrize("name", [n if n in DEFAULT else pytest.param(n, marks=pytest.mark.slow)
                                  for n in sorted(MODELS)])
def test_the_originals_files_load_and_give_its_outputs(name, tmp_path):
    make, size = MODELS[name]
    ref = _randomized(make(WIDTHS), seed=len(name))
    path = tmp_path / "weights.pth"
    torch.save(ref.state_dict(), path)
    net = _zoo(name, size)
    result = pacnet.load_weights(net, path)
    assert not result.missing
    x = _image(size)
    with torch.no_grad():
        want = ref(x)
        got = net(x)
    (out,) = got.values()
    assert out.shape == want.shape == (1, 21, size, size)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_full_size_layouts_match_the_originals_key_by_key(name):
    """Every entry of the original's state_dict (full VGG widths, on the meta device) has a
    blob of its shape in the zoo net under the net's rules, and nothing is left over."""
    make, _ = MODELS[name]
    with torch.device("meta"):
        ref = make(VGG)
    net = pacnet.build(name, device="meta")
    blobs = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    rules = ([s for s in sources(net.config) if s.name == "nvlabs"] or [PACNET_NAMES])[0]
    given = {}
    for key, value in ref.state_dict().items():
        targets, _ = rules.map_key(key)
        if targets is None:  # ignored: fcn8spac's unused upscore8
            assert key.endswith("upscore8.weight") and "pac" in name
            continue
        for target in targets:
            assert blobs.get(target) == tuple(value.shape), (key, target)
            given[target] = key
    assert sorted(given) == sorted(blobs)


def test_a_tied_crf_file_goes_into_every_step_of_the_loose_one(tmp_path):
    """Stage 2 of the original's recipe starts its loose CRF from stage 1's tied one (the
    original's ModelWithCrf.load_state_dict(strict=False) copies it into every step)."""
    tied = _randomized(ModelWithCrf(fcn_backbone("fcn8s", WIDTHS)), seed=3)
    path = tmp_path / "weights_epoch_40.pth"
    torch.save(tied.state_dict(), path)
    loose = ModelWithCrf(fcn_backbone("fcn8s", WIDTHS), loose=True).double().eval()
    loose.load_tied(tied.state_dict())
    net = _zoo("fcn/fcn8s_crfi5lp4d5641p4d5161", 40)
    pacnet.load_weights(net, path)
    state = net.state_dict()
    for j in range(5):
        torch.testing.assert_close(state[f"crf.steps.{j}.messengers.1.weight"], tied.crf.messengers[1].weight)
    x = _image(40)
    with torch.no_grad():
        torch.testing.assert_close(net(x)["crf"], loose(x), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(net(x)["crf"], tied(x), rtol=1e-10, atol=1e-10)  # same CRF every step
    # ... and the other way round is refused: a loose file has no place in a tied net
    loose_file = tmp_path / "loose.pth"  # the CRF's blobs, as a frozen-backbone stage saves them
    torch.save({k: v for k, v in loose.state_dict().items() if not k.startswith("backbone.")}, loose_file)
    with pytest.raises(DataError, match=r"entries have no place in the net \(crf.steps.0.unary_weight") as info:
        pacnet.load_weights(_zoo("fcn/fcn8s_crfi5p4d5641p4d5161", 40), loose_file)
    assert info.value.hint.startswith("the file fits zoo nets ") and "fcn/fcn8s_crfi5lp4d5641p4d5161" in info.value.hint


def test_frozen_backbone_stage_takes_backbone_and_crf_files_and_trains_the_crf_alone(tmp_path):
    """The original's frozen-backbone checkpoints hold the CRF's blobs only; with the
    backbone's file beside them the frozen net loads strictly.  Its solver (stage 1:
    Adam 1e-3) trains the CRF and the feature scales, nothing else."""
    from pacnet.engine.solver import Solver

    model = _randomized(ModelWithCrf(fcn_backbone("fcn8s", WIDTHS)), seed=4)
    state = model.state_dict()
    backbone, crf_only = tmp_path / "fcn8s_from_caffe.pth", tmp_path / "weights_epoch_40.pth"
    torch.save({k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}, backbone)
    torch.save({k: v for k, v in state.items() if not k.startswith("backbone.")}, crf_only)
    net = _zoo("fcn/fcn8sfrozen_crfi5p4d5641p4d5161", 40)
    with pytest.raises(DataError, match="that weights_epoch_40.pth does not hold") as info:
        pacnet.load_weights(net, crf_only)
    assert "--weights fcn8s_from_caffe.pth,weights_epoch_40.pth" in info.value.hint
    pacnet.load_weights(net, [backbone, crf_only])
    x = _image(40)
    with torch.no_grad():
        torch.testing.assert_close(net(x)["crf"], model(x), rtol=1e-10, atol=1e-10)
    train = pacnet.build("fcn/fcn8sfrozen_crfi5p4d5641p4d5161", phase="train", device="meta")
    solver = Solver(train.config["solver"], train, train.param_specs)
    trained = sorted(n for g in solver.groups for n in g.names)
    assert trained == sorted(k for k, v in train.named_parameters() if k.startswith(("crf.", "feat_scales/")))
    assert solver.config.base_lr == 1e-3 and solver.config.max_iter == 40 * 1112
    joint = pacnet.build("fcn/fcn8s_crfi5lp4d5641p4d5161", phase="train", device="meta")
    solver = Solver(joint.config["solver"], joint, joint.param_specs)
    assert not solver.frozen and {g.lr_mult for g in solver.groups} == {1.0}  # upscore too, as the original
    assert solver.config.base_lr == 1e-7 and solver.config.max_iter == 30 * 1112
