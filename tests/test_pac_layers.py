"""YAML layer types PacConv, PacConvTranspose, PacPool, PacKernel: infer() equals the real
module output over a grid of configurations, values equal the Python API, state_dict keys
are the original's, user mistakes are located errors, and a YAML net with one PacKernel
feeding two PacConv layers builds and runs."""

from __future__ import annotations

import itertools

import pytest
import torch

from layer_helpers import infer, layer_error, make_spec, run_layer, single_thread  # noqa: F401
from pacnet.errors import SchemaError, ShapeError
from pacnet.pac import PacConv2d, PacConvTranspose2d, PacPool2d, packernel2d
from pacnet.registry import get

D64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_numba_thread():
    """Tiny tensors: Numba's worker threads only add contention on a loaded machine."""
    import numba
    before = numba.get_num_threads()
    numba.set_num_threads(1)
    yield
    numba.set_num_threads(before)


def rnd(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D64)


def close(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def mask_of(*shape, seed=1):
    return (torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) > 0.4).to(D64)


def bottoms_and_expected(ref_layer, x, guide, mode):
    """The layer's bottoms for ``mode`` ('kernel': x and a precomputed K; 'mask...': x, guide
    and a mask of x's size; else x and the guide) and the Python layer's outputs as a tuple."""
    if mode == "kernel":
        K, _ = ref_layer.compute_kernel(guide)
        return (x, K), (ref_layer(x, None, K),)
    if mode.startswith("mask"):
        mask = mask_of(x.shape[0], 1, *x.shape[-2:])
        out = ref_layer(x, guide, mask=mask)
        return (x, guide, mask), out if isinstance(out, tuple) else (out,)
    return (x, guide), (ref_layer(x, guide),)


# ----------------------------------------------------------------------------- PacConv


CONV_GRID = [c for c in itertools.product(
    [3, 5],                        # kernel_size
    [1, 2],                        # stride
    ["half", 0],                   # pad ("half" = dilation*(k-1)/2)
    [1, 2],                        # dilation
    ["guide", "kernel", "mask1", "mask2"],   # second bottom / mask usage
) if not (c[0] == 5 and c[2] == 0 and c[3] == 2)]  # 9x8 input: empty output


@pytest.mark.parametrize("k,s,pad,d,mode", CONV_GRID)
def test_pacconv_infer_equals_module_and_api(k, s, pad, d, mode):
    p = d * (k - 1) // 2 if pad == "half" else pad
    H, W = 9, 8
    n_bottoms = 3 if mode.startswith("mask") else 2
    n_tops = 2 if mode == "mask2" else 1
    spec = make_spec("PacConv", n_bottoms=n_bottoms, n_tops=n_tops, num_output=3, kernel_size=k,
                     stride=s, pad=p, dilation=d, kernel_type="inv_1_-1" if d == 2 else "gaussian",
                     normalize_kernel=(k == 5))
    x, guide = rnd(2, 2, H, W), rnd(2, 4, H, W, seed=1)
    torch.manual_seed(0)
    ref_layer = PacConv2d(2, 3, k, stride=s, padding=p, dilation=d,
                          kernel_type="inv_1_-1" if d == 2 else "gaussian",
                          normalize_kernel=(k == 5)).double()
    bottoms, expected = bottoms_and_expected(ref_layer, x, guide, mode)
    module = get("PacConv").build(spec, [tuple(t.shape) for t in bottoms]).double()
    assert list(module.state_dict()) == list(ref_layer.state_dict())
    module.load_state_dict(ref_layer.state_dict(), strict=True)
    tops = run_layer(spec, *bottoms, module=module)   # asserts infer() == real shapes
    close(tops[0], expected[0])
    if n_tops == 2:
        close(tops[1], expected[1].reshape(tops[1].shape))
        assert tops[1].shape == (2, 1) + tops[0].shape[-2:]
    macs = 2 * 3 * 2 * k * k * tops[0].shape[-2] * tops[0].shape[-1]   # N * O * C * k*k * H'W'
    flops = get("PacConv").flops(spec, [tuple(t.shape) for t in bottoms],
                                 infer(spec, *[t.shape for t in bottoms]))
    assert flops > 2 * macs
    if mode != "kernel":  # computing K from the guide costs extra
        oh, ow = tops[0].shape[-2:]
        k_only = make_spec("PacConv", n_bottoms=2, num_output=3, kernel_size=k, stride=s, pad=p,
                           dilation=d)
        assert flops > get("PacConv").flops(k_only, [x.shape, (2, 1, k, k, oh, ow)],
                                            [tops[0].shape])


@pytest.mark.parametrize("cfg", [
    dict(kernel_size=3, pad=1, shared_filters=True, num_output=2, bias_term=False),
    dict(kernel_h=3, kernel_w=5, pad_h=1, pad_w=2, stride=[1, 2], num_output=3),
    dict(kernel_size=3, pad=1, kernel_type="inv_0.2_0.2_asym_fixed", smooth_kernel_type="full_3",
         num_output=3),
    dict(kernel_size=3, pad=1, smooth_kernel_type="gaussian", num_output=2, shared_filters=True,
         filler="crf"),
])
def test_pacconv_params_mirror_constructor(cfg):
    spec = make_spec("PacConv", n_bottoms=2, **cfg)
    x, guide = rnd(1, 2, 7, 8), rnd(1, 3, 7, 8, seed=2)
    module = get("PacConv").build(spec, [x.shape, guide.shape]).double()
    assert isinstance(module, PacConv2d)
    ks = (cfg["kernel_h"], cfg["kernel_w"]) if "kernel_h" in cfg else (cfg["kernel_size"],) * 2
    assert module.kernel_size == ks
    assert module.shared_filters == cfg.get("shared_filters", False)
    assert (module.bias is not None) == cfg.get("bias_term", True)
    assert module.kernel_type == cfg.get("kernel_type", "gaussian")
    assert module.smooth_kernel_type == cfg.get("smooth_kernel_type", "none")
    (out,) = run_layer(spec, x, guide, module=module)
    close(out, PacConv2d.forward(module, x, guide))


def test_blobs_and_caffe_fillers():
    spec = make_spec("PacConv", n_bottoms=2, num_output=3, kernel_size=3, pad=1,
                     kernel_type="inv_1_-1", smooth_kernel_type="full_3",
                     weight_filler={"type": "constant", "value": 0.5},
                     bias_filler={"type": "constant", "value": -1.0})
    module = get("PacConv").build(spec, [(1, 2, 5, 5), (1, 1, 5, 5)])
    assert torch.all(module.weight == 0.5) and torch.all(module.bias == -1.0)
    assert get("PacConv").blobs[:2] == ("weight", "bias")
    names = [a for a in get("PacConv").blobs if getattr(module, a, None) is not None]
    assert names == ["weight", "bias", "inv_alpha", "inv_lambda", "smooth_kernel"]
    assert set(module.state_dict()) == set(names)
    # the default: the original's uniform filler
    plain = get("PacConv").build(make_spec("PacConv", n_bottoms=2, num_output=3, kernel_size=3,
                                           pad=1), [(1, 2, 5, 5), (1, 1, 5, 5)])
    assert 0 < plain.weight.abs().max() <= 1 / 18 ** 0.5
    assert set(plain.state_dict()) == {"weight", "bias"}


# ----------------------------------------------------------------------------- PacConvTranspose


TCONV_GRID = [c for c in itertools.product([3, 5], [1, 2, 3], [0, 1, 2], [0, 1], [1, 2],
                                            ["guide", "kernel", "mask2"])
              if c[3] < max(c[1], c[4])]  # output_pad < max(stride, dilation)


@pytest.mark.parametrize("k,s,p,op,d,mode", TCONV_GRID)
def test_pacconv_transpose_infer_equals_module_and_api(k, s, p, op, d, mode):
    H, W = 3, 4
    oh, ow = ((n - 1) * s - 2 * p + d * (k - 1) + 1 + op for n in (H, W))
    n_bottoms = 3 if mode == "mask2" else 2
    spec = make_spec("PacConvTranspose", n_bottoms=n_bottoms, n_tops=2 if mode == "mask2" else 1,
                     num_output=2, kernel_size=k, stride=s, pad=p, output_pad=op, dilation=d,
                     normalize_kernel=(s == 2))
    torch.manual_seed(0)
    ref_layer = PacConvTranspose2d(3, 2, k, stride=s, padding=p, output_padding=op, dilation=d,
                                   normalize_kernel=(s == 2)).double()
    x, guide = rnd(2, 3, H, W), rnd(2, 2, oh, ow, seed=3)
    bottoms, expected = bottoms_and_expected(ref_layer, x, guide, mode)
    module = get("PacConvTranspose").build(spec, [tuple(t.shape) for t in bottoms]).double()
    module.load_state_dict(ref_layer.state_dict(), strict=True)
    tops = run_layer(spec, *bottoms, module=module)
    close(tops[0], expected[0])
    assert tops[0].shape == (2, 2, oh, ow)
    if mode == "mask2":
        close(tops[1], expected[1].reshape(2, 1, oh, ow))


# ----------------------------------------------------------------------------- PacPool


POOL_GRID = list(itertools.product([3, 5], [1, 2], [0, "half"], [1, 2], [False, True],
                                   ["guide", "kernel", "mask2"]))


@pytest.mark.parametrize("k,s,pad,d,cw,mode", POOL_GRID)
def test_pacpool_infer_equals_module_and_api(k, s, pad, d, cw, mode):
    p = d * (k - 1) // 2 if pad == "half" else pad
    H, W = 10, 9
    C = 3
    kt = "inv_1_-1" if cw else "gaussian"
    n_bottoms = 3 if mode == "mask2" else 2
    spec = make_spec("PacPool", n_bottoms=n_bottoms, n_tops=2 if mode == "mask2" else 1,
                     kernel_size=k, stride=s, pad=p, dilation=d, channel_wise=cw, kernel_type=kt,
                     normalize_kernel=(d == 1))
    ref_layer = PacPool2d(k, stride=s, padding=p, dilation=d, channel_wise=cw, kernel_type=kt,
                          normalize_kernel=(d == 1), out_channels=C if cw else -1).double()
    x, guide = rnd(2, C, H, W), rnd(2, C if cw else 2, H, W, seed=4)
    bottoms, expected = bottoms_and_expected(ref_layer, x, guide, mode)
    if mode == "kernel":
        assert bottoms[1].shape[1] == (C if cw else 1)
    module = get("PacPool").build(spec, [tuple(t.shape) for t in bottoms]).double()
    assert list(module.state_dict()) == list(ref_layer.state_dict())
    if cw:
        assert module.inv_alpha.shape == (C,)
    tops = run_layer(spec, *bottoms, module=module)
    close(tops[0], expected[0])
    if mode == "mask2":
        close(tops[1], expected[1].reshape(tops[1].shape))


def test_pacpool_stride_defaults_to_one():
    spec = make_spec("PacPool", n_bottoms=2, kernel_size=3, pad=1)
    assert infer(spec, (1, 2, 6, 7), (1, 1, 6, 7)) == [(1, 2, 6, 7)]


# ----------------------------------------------------------------------------- PacKernel


@pytest.mark.parametrize("cfg", [
    dict(kernel_size=3, pad=1),
    dict(kernel_size=5, stride=2, pad=2, normalize_kernel=True, kernel_type="inv_1_-1_asym"),
    dict(kernel_size=3, pad=2, dilation=2, smooth_kernel_type="full_3"),
    dict(kernel_size=3, pad=1, channel_wise=True, kernel_type="inv_0.5_-1"),
    dict(kernel_size=3, stride=2, pad=1, output_pad=1, transposed=True, normalize_kernel=True),
    dict(kernel_size=5, stride=3, pad=1, output_pad=2, transposed=True),
])
@pytest.mark.parametrize("masked", [False, True])
def test_packernel_infer_equals_module_and_api(cfg, masked):
    transposed = cfg.get("transposed", False)
    H, W = (8, 10) if transposed else (9, 8)
    s, p, op = cfg.get("stride", 1), cfg.get("pad", 0), cfg.get("output_pad", 0)
    k, d = cfg["kernel_size"], cfg.get("dilation", 1)
    if transposed:  # guide at the output size of a transposed layer with 3x4 input... or similar
        H, W = ((n - 1) * s - 2 * p + d * (k - 1) + 1 + op for n in (3, 4))
        in_hw = (3, 4)
    else:
        in_hw = (H, W)
    guide = rnd(2, 3, H, W, seed=5)
    bottoms = [guide]
    if masked:
        bottoms.append(mask_of(2, 1, *in_hw))
    spec = make_spec("PacKernel", n_bottoms=len(bottoms), n_tops=2 if masked else 1, **cfg)
    module = get("PacKernel").build(spec, [tuple(t.shape) for t in bottoms]).double()
    tops = run_layer(spec, *bottoms, module=module)
    K, m = packernel2d(guide, bottoms[1] if masked else None, kernel_size=k, stride=s, padding=p,
                       output_padding=op, dilation=d,
                       kernel_type=cfg.get("kernel_type", "gaussian"),
                       smooth_kernel_type=cfg.get("smooth_kernel_type", "none"),
                       smooth_kernel=module.smooth_kernel,
                       inv_alpha=module.inv_alpha, inv_lambda=module.inv_lambda,
                       channel_wise=cfg.get("channel_wise", False),
                       normalize_kernel=cfg.get("normalize_kernel", False), transposed=transposed)
    close(tops[0], K)
    if masked:
        close(tops[1], m.reshape(tops[1].shape))
    if cfg.get("channel_wise"):
        assert module.inv_alpha.shape == (3,) and tops[0].shape[1] == 3
    if transposed:
        assert tops[0].shape[-2:] == (H, W)


# ----------------------------------------------------------------------------- errors


def test_check_errors_are_located():
    with layer_error("odd"):
        make_spec("PacConv", n_bottoms=2, num_output=2, kernel_size=4)
    with layer_error("padding"):
        make_spec("PacConv", n_bottoms=2, num_output=2, kernel_size=3, pad=2)
    with layer_error("padding"):
        make_spec("PacPool", n_bottoms=2, kernel_size=3, pad=2, dilation=1)
    with layer_error("kernel_type"):
        make_spec("PacConv", n_bottoms=2, num_output=2, kernel_size=3, kernel_type="gauss")
    with layer_error("smooth"):
        make_spec("PacKernel", kernel_size=3, smooth_kernel_type="average_2")
    with layer_error("output_pad"):
        make_spec("PacConvTranspose", n_bottoms=2, num_output=2, kernel_size=3, stride=2,
                  output_pad=2)
    with layer_error("mask bottom"):
        make_spec("PacConv", n_bottoms=2, n_tops=2, num_output=2, kernel_size=3)
    with layer_error("output_pad"):
        make_spec("PacKernel", kernel_size=3, output_pad=1)
    with layer_error("weight_filler"):
        make_spec("PacConv", n_bottoms=2, num_output=2, kernel_size=3, shared_filters=True,
                  filler="pool", weight_filler={"type": "constant"})
    with layer_error(cls=SchemaError):
        make_spec("PacConv", n_bottoms=2, num_output=2, kernel_size=3, filler="xavier")
    with layer_error(cls=SchemaError):
        make_spec("PacConv", n_bottoms=1, num_output=2, kernel_size=3)
    with layer_error("kernel_size"):
        make_spec("PacPool", n_bottoms=2)
    # transposed layers accept a pad beyond d(k-1)/2 (it only crops the output)
    make_spec("PacConvTranspose", n_bottoms=2, num_output=2, kernel_size=3, stride=2, pad=2)


def test_infer_errors_are_located():
    conv = make_spec("PacConv", n_bottoms=2, num_output=2, kernel_size=3, pad=1)
    with layer_error("guide", cls=ShapeError):
        infer(conv, (2, 3, 8, 8), (2, 1, 7, 8))
    with layer_error("guide", cls=ShapeError):
        infer(conv, (2, 3, 8, 8), (1, 1, 8, 8))
    with layer_error("kernel bottom", cls=ShapeError):
        infer(conv, (2, 3, 8, 8), (2, 1, 3, 3, 7, 8))
    with layer_error("kernel bottom", cls=ShapeError):
        infer(conv, (2, 3, 8, 8), (2, 3, 3, 3, 8, 8))
    with layer_error("4-D guide or a 6-D kernel", cls=ShapeError):
        infer(conv, (2, 3, 8, 8), (2, 3, 8))
    with layer_error("4-D", cls=ShapeError):
        infer(conv, (2, 3, 8), (2, 3, 8, 8))
    with layer_error("empty", cls=ShapeError):
        infer(make_spec("PacConv", n_bottoms=2, num_output=2, kernel_size=5), (1, 1, 3, 3),
              (1, 1, 3, 3))
    masked = make_spec("PacConv", n_bottoms=3, num_output=2, kernel_size=3, pad=1)
    with layer_error("mask", cls=ShapeError):
        infer(masked, (2, 3, 8, 8), (2, 1, 8, 8), (2, 2, 8, 8))
    with layer_error("precomputed kernel"):
        infer(masked, (2, 3, 8, 8), (2, 1, 3, 3, 8, 8), (2, 1, 8, 8))
    shared = make_spec("PacConv", n_bottoms=2, num_output=2, kernel_size=3, shared_filters=True)
    with layer_error("shared_filters"):
        infer(shared, (2, 3, 8, 8), (2, 1, 8, 8))
    linear = make_spec("PacConv", n_bottoms=2, num_output=3, kernel_size=3, filler="linear")
    with layer_error("transposed"):
        infer(linear, (2, 3, 8, 8), (2, 1, 8, 8))
    crf = make_spec("PacConv", n_bottoms=2, num_output=2, kernel_size=3, filler="crf")
    with layer_error("in_channels"):
        infer(crf, (2, 3, 8, 8), (2, 1, 8, 8))
    bil = make_spec("PacConv", n_bottoms=2, num_output=2, kernel_h=3, kernel_w=5,
                    weight_filler={"type": "bilinear"})
    with layer_error("bilinear"):
        infer(bil, (2, 3, 8, 8), (2, 1, 8, 8))
    tconv = make_spec("PacConvTranspose", n_bottoms=2, num_output=2, kernel_size=3, stride=2,
                      pad=1, output_pad=1)
    with layer_error("output size", cls=ShapeError):
        infer(tconv, (2, 3, 4, 4), (2, 1, 4, 4))   # the guide must be at the output size
    assert infer(tconv, (2, 3, 4, 4), (2, 1, 8, 8)) == [(2, 2, 8, 8)]
    pool = make_spec("PacPool", n_bottoms=2, kernel_size=3, pad=1, channel_wise=True)
    with layer_error("channel", cls=ShapeError):
        infer(pool, (2, 3, 8, 8), (2, 2, 8, 8))
    plain_pool = make_spec("PacPool", n_bottoms=2, kernel_size=3, pad=1)
    with layer_error("kernel bottom", cls=ShapeError):
        infer(plain_pool, (2, 3, 8, 8), (2, 3, 3, 3, 8, 8))
    tk = make_spec("PacKernel", kernel_size=3, stride=3, pad=1, transposed=True)
    with layer_error("output size", cls=ShapeError):
        infer(tk, (1, 2, 8, 8))
    km = make_spec("PacKernel", n_bottoms=2, kernel_size=3, stride=2, pad=1, output_pad=1,
                   transposed=True)
    with layer_error("mask", cls=ShapeError):
        infer(km, (1, 2, 8, 8), (1, 1, 8, 8))      # the mask is at the low-res input size
    assert infer(km, (1, 2, 8, 8), (1, 1, 4, 4)) == [(1, 1, 3, 3, 8, 8)]


def test_forward_error_is_a_value_error():
    """Runtime mistakes (not visible to infer) still raise PacnetValueError."""
    spec = make_spec("PacConv", n_bottoms=2, num_output=2, kernel_size=3, pad=1)
    module = get("PacConv").build(spec, [(1, 2, 5, 5), (1, 1, 5, 5)])
    with pytest.raises(ValueError, match="dtype"):
        module(rnd(1, 2, 5, 5), rnd(1, 1, 5, 5))      # float64 bottoms, float32 module


# ----------------------------------------------------------------------------- a YAML net


def test_yaml_net_one_kernel_feeds_two_pac_layers():
    import pacnet

    layers = [
        {"name": "K", "type": "PacKernel", "bottom": "guide", "top": "K", "kernel_size": 3,
         "pad": 1, "kernel_type": "inv_1_-1"},
        {"name": "pac1", "type": "PacConv", "bottom": ["data", "K"], "top": "pac1",
         "num_output": 4, "kernel_size": 3, "pad": 1},
        {"name": "relu", "type": "ReLU", "bottom": "pac1", "top": "pac1"},
        {"name": "pac2", "type": "PacConv", "bottom": ["pac1", "K"], "top": "pac2",
         "num_output": 2, "kernel_size": 3, "pad": 1, "bias_term": False},
        {"name": "pool", "type": "PacPool", "bottom": ["pac2", "guide"], "top": "pool",
         "kernel_size": 3, "stride": 2, "pad": 1, "normalize_kernel": True},
    ]
    net = pacnet.build({"inputs": {"data": [2, 3, 9, 8], "guide": [2, 5, 9, 8]},
                        "layers": layers, "outputs": ["pac2", "pool"]})
    assert net.shapes["K"] == (2, 1, 3, 3, 9, 8)
    assert net.shapes["pool"] == (2, 2, 5, 4)
    sd = net.state_dict()
    assert set(sd) == {"K.inv_alpha", "K.inv_lambda", "pac1.weight", "pac1.bias", "pac2.weight"}
    net = net.double()
    x, g = rnd(2, 3, 9, 8), rnd(2, 5, 9, 8, seed=6)
    out = net(x, g)
    sd = net.state_dict()
    K, _ = packernel2d(g, kernel_size=3, padding=1, kernel_type="inv_1_-1",
                       inv_alpha=sd["K.inv_alpha"], inv_lambda=sd["K.inv_lambda"])
    ref1 = PacConv2d(3, 4, 3, padding=1).double()
    ref1.load_state_dict({"weight": sd["pac1.weight"], "bias": sd["pac1.bias"]})
    ref2 = PacConv2d(4, 2, 3, padding=1, bias=False).double()
    ref2.load_state_dict({"weight": sd["pac2.weight"]})
    ref = ref2(ref1(x, None, K).relu(), None, K)
    close(out["pac2"], ref)
    close(out["pool"], PacPool2d(3, 2, 1, normalize_kernel=True)(ref, g))
    # gradients reach the shared kernel's parameters through both PAC layers
    out["pac2"].sum().backward()
    assert net.K.inv_alpha.grad is not None and net.K.inv_lambda.grad.abs() > 0
    # a bodiless build (what `pacnet build` shows): shapes and parameters without data
    meta = pacnet.build({"inputs": {"data": [2, 3, 9, 8], "guide": [2, 5, 9, 8]},
                         "layers": layers, "outputs": ["pac2", "pool"]}, device="meta")
    assert {k: tuple(v.shape) for k, v in meta.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in sd.items()}


# ----------------------------------------------------------------------------- 5-D bottoms

def _ref_3d(type_name, cfg):
    """The Python API module a 5-D layer of ``cfg`` must equal."""
    from pacnet.pac import PacConv3d, PacConvTranspose3d, PacPool3d

    geo = dict(stride=cfg.get("stride", 1), padding=cfg.get("pad", 0),
               dilation=cfg.get("dilation", 1))
    kt = dict(kernel_type=cfg.get("kernel_type", "gaussian"),
              smooth_kernel_type=cfg.get("smooth_kernel_type", "none"),
              normalize_kernel=cfg.get("normalize_kernel", False))
    if type_name == "PacConv":
        return PacConv3d(2, 3, cfg["kernel_size"], **geo, **kt)
    if type_name == "PacConvTranspose":
        return PacConvTranspose3d(2, 3, cfg["kernel_size"], output_padding=cfg["output_pad"],
                                  **geo, **kt)
    return PacPool3d(cfg["kernel_size"], **geo, **kt)


CONV_3D = [
    ("PacConv", dict(num_output=3, kernel_size=[3, 5, 5], pad=[1, 2, 2], stride=[1, 2, 1])),
    ("PacConv", dict(num_output=3, kernel_size=3, pad=2, dilation=2, kernel_type="inv_1_-1",
                     smooth_kernel_type="full_3")),
    ("PacConvTranspose", dict(num_output=3, kernel_size=[3, 5, 5], stride=[1, 2, 2],
                              pad=[1, 2, 2], output_pad=[0, 1, 1], normalize_kernel=True)),
    ("PacPool", dict(kernel_size=[1, 3, 3], pad=[0, 1, 1], stride=1,
                     smooth_kernel_type="gaussian")),
]


@pytest.mark.parametrize("mode", ["guide", "kernel", "mask2"])
@pytest.mark.parametrize("type_name, cfg", CONV_3D, ids=lambda v: v if isinstance(v, str) else "")
def test_5d_bottoms_build_the_3d_modules(type_name, cfg, mode):
    """A 5-D input makes the layer a PacConv3d / PacConvTranspose3d / PacPool3d: infer()
    equals the module's outputs, values equal the Python API's, the state_dict is the
    module's, FLOPs count every tap of the 3-D window."""
    from pacnet.pac import PacConv3d, PacConvTranspose3d, PacPool3d

    n_bottoms, n_tops = (3, 2) if mode == "mask2" else (2, 1)
    spec = make_spec(type_name, n_bottoms=n_bottoms, n_tops=n_tops, **cfg)
    torch.manual_seed(0)
    ref_layer = _ref_3d(type_name, cfg).double()
    x = rnd(2, 2, 3, 5, 4)
    guide_sizes = x.shape[2:]
    if type_name == "PacConvTranspose":  # the output size (dilation 1)
        guide_sizes = [(n - 1) * s - 2 * p + k + o for n, s, p, k, o in zip(
            x.shape[2:], ref_layer.stride, ref_layer.padding, ref_layer.kernel_size,
            ref_layer.output_padding)]
    guide = rnd(2, 4, *guide_sizes, seed=1)
    if mode == "kernel":
        K, _ = ref_layer.compute_kernel(guide)
        bottoms, expected = (x, K), (ref_layer(x, None, K),)
    elif mode == "mask2":
        mask = mask_of(2, 1, 3, 5, 4)
        bottoms, expected = (x, guide, mask), ref_layer(x, guide, mask=mask)
    else:
        bottoms, expected = (x, guide), (ref_layer(x, guide),)
    shapes = [tuple(t.shape) for t in bottoms]
    module = get(type_name).build(spec, shapes).double()
    cls = {"PacConv": PacConv3d, "PacConvTranspose": PacConvTranspose3d,
           "PacPool": PacPool3d}[type_name]
    assert isinstance(module, cls)
    assert list(module.state_dict()) == list(ref_layer.state_dict())
    module.load_state_dict(ref_layer.state_dict(), strict=True)
    tops = run_layer(spec, *bottoms, module=module)   # asserts infer() == real shapes
    close(tops[0], expected[0])
    if n_tops == 2:
        assert tops[1].shape == (2, 1) + tops[0].shape[2:]
        close(tops[1], expected[1].reshape(tops[1].shape))
    flops = get(type_name).flops(spec, shapes, infer(spec, *shapes))
    taps = torch.Size(ref_layer.kernel_size).numel()
    assert flops >= 2 * tops[0].numel() * taps


def test_5d_pac_kernel_layer():
    spec = make_spec("PacKernel", n_bottoms=2, n_tops=2, kernel_size=[3, 3, 3], stride=[1, 2, 2],
                     pad=1, output_pad=[0, 1, 1], transposed=True, kernel_type="inv_1_-1")
    guide, mask = rnd(1, 3, 4, 8, 6), mask_of(1, 1, 4, 4, 3)
    assert infer(spec, guide.shape, mask.shape) == [(1, 1, 3, 3, 3, 4, 8, 6), (1, 1, 4, 8, 6)]
    K, m = run_layer(spec, guide, mask)
    from pacnet.pac import packernel3d
    want, want_m = packernel3d(guide, mask, kernel_size=3, stride=(1, 2, 2), padding=1,
                               output_padding=(0, 1, 1), kernel_type="inv_1_-1", transposed=True)
    close(K, want.float().double() if K.dtype != D64 else want)
    close(m, want_m.reshape(m.shape))


def test_5d_mistakes_are_located():
    conv = make_spec("PacConv", n_bottoms=2, num_output=2, kernel_size=[3, 5, 5], pad=[1, 2, 2])
    with layer_error("kernel_size has 3 values", cls=ShapeError):
        infer(conv, (2, 3, 8, 8), (2, 1, 8, 8))               # a 3-D window on 4-D bottoms
    with layer_error("5-D guide or an 8-D kernel for the 5-D", cls=ShapeError):
        infer(conv, (2, 3, 4, 8, 8), (2, 1, 8, 8))            # a 4-D guide for a 5-D input
    with layer_error(r"the kernel bottom must be \[2, 1, 3, 5, 5, 4, 8, 8\]", cls=ShapeError):
        infer(conv, (2, 3, 4, 8, 8), (2, 1, 3, 5, 5, 4, 8, 7))
    with layer_error(r"the guide must be \[2, Cg, 4, 8, 8\]", cls=ShapeError):
        infer(conv, (2, 3, 4, 8, 8), (2, 1, 3, 8, 8))
    plain = make_spec("PacConv", n_bottoms=2, num_output=2, kernel_size=3, pad=1)
    with layer_error("4-D guide or a 6-D kernel", cls=ShapeError):
        infer(plain, (2, 3, 8, 8), (2, 1, 4, 8, 8))           # a 5-D guide for a 4-D input
    with layer_error("needs a 4-D .* or a 5-D", cls=ShapeError):
        infer(plain, (2, 3, 2, 4, 8, 8), (2, 1, 2, 4, 8, 8))  # 6-D bottoms
    hw = make_spec("PacConv", n_bottoms=2, num_output=2, kernel_h=3, kernel_w=3)
    with layer_error("2-D bottoms", cls=ShapeError):
        infer(hw, (2, 3, 4, 8, 8), (2, 1, 4, 8, 8))
    # written in the layer: caught by check(), before any bottom is known
    with layer_error("odd"):
        make_spec("PacConv", n_bottoms=2, num_output=2, kernel_size=[3, 4, 3])
    with layer_error("exceeds"):
        make_spec("PacConv", n_bottoms=2, num_output=2, kernel_size=[3, 3, 3], pad=[1, 2, 1])
    with layer_error("pad has 2 values but kernel_size has 3"):
        make_spec("PacPool", n_bottoms=2, kernel_size=[3, 3, 3], pad=[1, 1])
    with layer_error("output_pad"):
        make_spec("PacConvTranspose", n_bottoms=2, num_output=2, kernel_size=3,
                  stride=[1, 2, 2], output_pad=[1, 1, 1])
    tk = make_spec("PacKernel", kernel_size=3, stride=[1, 3, 3], pad=1, transposed=True)
    with layer_error("output size", cls=ShapeError):
        infer(tk, (1, 2, 4, 8, 8))


def test_yaml_video_net_with_5d_pac_layers():
    """A 3-D net: PacKernel feeding a PacConv and a transposed PacConv up in H and W."""
    import pacnet

    layers = [
        {"name": "K", "type": "PacKernel", "bottom": "guide_lo", "top": "K",
         "kernel_size": [3, 3, 3], "pad": 1},
        {"name": "pac1", "type": "PacConv", "bottom": ["data", "K"], "top": "pac1",
         "num_output": 4, "kernel_size": [3, 3, 3], "pad": 1},
        {"name": "up", "type": "PacConvTranspose", "bottom": ["pac1", "guide"], "top": "up",
         "num_output": 2, "kernel_size": [3, 5, 5], "stride": [1, 2, 2], "pad": [1, 2, 2],
         "output_pad": [0, 1, 1]},
    ]
    shapes = {"data": [1, 3, 2, 4, 5], "guide_lo": [1, 2, 2, 4, 5], "guide": [1, 2, 2, 8, 10]}
    net = pacnet.build({"inputs": shapes, "layers": layers})
    assert net.shapes["K"] == (1, 1, 3, 3, 3, 2, 4, 5) and net.shapes["up"] == (1, 2, 2, 8, 10)
    assert tuple(net.state_dict()["up.weight"].shape) == (4, 2, 3, 5, 5)
    out = net(*(torch.randn(*v) for v in shapes.values()))
    out["up"].square().mean().backward()
    assert all(p.grad is not None for p in net.parameters())
