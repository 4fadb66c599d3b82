"""The ``pacnet`` ONNX functions (pacnet.onnx_ops) against the torch ops they translate.

Every registered pacnet op has a lowering, an out-of-place rewrite or is backward-only;
each lowering, run as a one-node model in onnxruntime, computes what its op computes over
a grid of shapes, strides, paddings, dilations, kernel sizes and flags (float32, as
onnxruntime's CPU convolution); the models pass ONNX's checker and shape inference.  The
default suite pairs every geometry and every flag combination at least once; ``-m slow``
runs their full product.
"""

import itertools

import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import torch  # noqa: E402

import pacnet.kernels.pac as P  # noqa: E402
import pacnet.kernels.segaware.ops as S  # noqa: E402
from pacnet import onnx_ops  # noqa: E402
from pacnet.onnx_ops import LOWERINGS, standalone_model  # noqa: E402


def _registered_pacnet_ops():
    """Every op in the ``pacnet`` namespace, after importing everything that registers ops."""
    import pacnet.crf  # noqa: F401
    import pacnet.pac  # noqa: F401
    from pacnet import registry

    registry.types()  # imports every layer module (and the kernels they use)
    return sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("pacnet::"))


def test_every_registered_op_is_translated_functionalized_or_backward_only():
    ops = _registered_pacnet_ops()
    assert "pacnet::pac_conv" in ops and "pacnet::im2dist" in ops
    tables = [set(LOWERINGS), set(onnx_ops.FUNCTIONALIZED), set(onnx_ops.BACKWARD_ONLY)]
    for name in ops:
        homes = [i for i, table in enumerate(tables) if name in table]
        assert len(homes) == 1, (f"{name}: give it a lowering in pacnet/onnx_ops.py (or list it "
                                 f"as FUNCTIONALIZED or BACKWARD_ONLY); found in {homes}")
    for table in tables:
        assert table <= set(ops), f"listed but not registered: {table - set(ops)}"


def test_translation_table_keys_are_the_ops_overloads():
    table = onnx_ops.translation_table()
    assert {op.name() for op in table} == set(LOWERINGS)


# ----------------------------------------------------------------------------- running lowerings

def _run(name, args):
    """The op's lowering as a one-node model in onnxruntime, on ``args`` (torch values)."""
    call = LOWERINGS[name](*args)
    model = standalone_model(call)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    params = [p.name for p in call.function.op_signature.params if hasattr(p, "type_constraint")]
    feed = {n: v.numpy() for n, v in zip(params, call.inputs) if v is not None}
    inferred = [d.dim_value or None for d in model.graph.output[0].type.tensor_type.shape.dim]
    return torch.from_numpy(session.run(None, feed)[0]), inferred


def _check(name, args, want):
    got, inferred = _run(name, args)
    assert got.shape == want.shape
    assert len(inferred) == want.dim()
    for i, n in zip(inferred, want.shape):  # ONNX shape inference: right where it knows
        assert i in (None, n)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * max(1.0, want.abs().max()))


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# (kernel, stride, padding, dilation) as (h, w) pairs, and an input size that fits them
GEOMETRIES = [
    ((3, 3), (1, 1), (1, 1), (1, 1), (7, 6)),
    ((5, 5), (2, 2), (2, 2), (1, 1), (9, 8)),
    ((3, 3), (1, 1), (2, 2), (2, 2), (6, 7)),
    ((3, 5), (2, 1), (0, 2), (1, 1), (7, 9)),
    ((5, 3), (1, 2), (4, 1), (2, 3), (8, 10)),
    ((1, 1), (1, 1), (0, 0), (1, 1), (4, 5)),
    ((3, 3), (3, 2), (1, 0), (1, 2), (10, 9)),
]

# The PAC ops take 1 to 3 spatial axes: these and the 2-D ones above.
PAC_GEOMETRIES = GEOMETRIES + [
    ((3,), (1,), (1,), (1,), (7,)),
    ((5,), (2,), (4,), (2,), (9,)),
    ((3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1), (4, 5, 6)),
    ((3, 5, 3), (1, 2, 2), (1, 2, 1), (1, 1, 2), (5, 7, 6)),
    ((1, 3, 3), (2, 1, 1), (0, 2, 1), (1, 2, 1), (3, 6, 5)),
]


def _grid(flags, geometries=None):
    """``(geometry, *flags)`` cases: every geometry and every flag combination at least once
    (cycled side by side), and under ``slow`` the rest of their product."""
    geometries = GEOMETRIES if geometries is None else geometries
    ids = [_geo_id(g) for g in geometries]
    n = max(len(geometries), len(flags))
    paired = {(i % len(geometries), j % len(flags)) for i, j in zip(range(n), range(n))}
    cases = []
    for gi, fi in itertools.product(range(len(geometries)), range(len(flags))):
        marks = () if (gi, fi) in paired else (pytest.mark.slow,)
        cases.append(pytest.param(geometries[gi], *flags[fi], marks=marks,
                                  id=f"{ids[gi]}-{'-'.join(map(str, flags[fi]))}"))
    return cases


def _geo_id(geometry):
    return "-".join(f"{c}{'x'.join(map(str, v))}" for c, v in zip("kspd", geometry))


def _out_hw(hw, k, s, p, d):
    return tuple((hw[i] + 2 * p[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(len(hw)))


@pytest.mark.parametrize("geometry,center,asym,channel_wise",
                         _grid(list(itertools.product((False, True), repeat=3)),
                               PAC_GEOMETRIES))
def test_pac_dist(geometry, center, asym, channel_wise):
    k, s, p, d, hw = geometry
    g = _gen(1)
    guide = torch.randn(2, 3, *hw, generator=g)
    ctr = torch.randn(2, 3, *_out_hw(hw, k, s, p, d), generator=g) if center else None
    want = P.pac_dist(guide, ctr, k, s, p, d, asym=asym, channel_wise=channel_wise)
    _check("pacnet::pac_dist", (guide, ctr, k, s, p, d, asym, channel_wise), want)


@pytest.mark.parametrize("geometry,shared,bias",
                         _grid(list(itertools.product((False, True), repeat=2)),
                               PAC_GEOMETRIES))
def test_pac_conv(geometry, shared, bias):
    k, s, p, d, hw = geometry
    g = _gen(2)
    x = torch.randn(2, 4, *hw, generator=g)
    K = torch.rand(2, 1, *k, *_out_hw(hw, k, s, p, d), generator=g)
    weight = torch.randn(1 if shared else 5, 1 if shared else 4, *k, generator=g)
    b = torch.randn(4 if shared else 5, generator=g) if bias else None
    want = P.pac_conv(x, K, weight, b, s, p, d, shared_filters=shared)
    _check("pacnet::pac_conv", (x, K, weight, b, s, p, d, shared), want)


@pytest.mark.parametrize("geometry,channel_wise", _grid([(False,), (True,)], PAC_GEOMETRIES))
def test_pac_pool(geometry, channel_wise):
    k, s, p, d, hw = geometry
    g = _gen(3)
    x = torch.randn(2, 3, *hw, generator=g)
    K = torch.rand(2, 3 if channel_wise else 1, *k, *_out_hw(hw, k, s, p, d), generator=g)
    _check("pacnet::pac_pool", (x, K, k, s, p, d), P.pac_pool(x, K, k, s, p, d))


# The segaware ops also take even kernels (their centre tap is (k//2, k//2)).
SEGAWARE_GEOMETRIES = GEOMETRIES + [((2, 2), (1, 1), (1, 1), (1, 1), (5, 6)),
                                    ((4, 3), (2, 1), (1, 1), (2, 1), (9, 5))]


@pytest.mark.parametrize("geometry", SEGAWARE_GEOMETRIES, ids=_geo_id)
def test_local_weighted_sum(geometry):
    k, s, p, d, hw = geometry
    g = _gen(4)
    x = torch.randn(2, 3, *hw, generator=g)
    w = torch.rand(2, k[0] * k[1], *_out_hw(hw, k, s, p, d), generator=g)
    _check("pacnet::local_weighted_sum", (x, w, k, p, s, d), S.local_weighted_sum(x, w, k, p, s, d))


@pytest.mark.parametrize("geometry,norm,remove_center,remove_bounds",
                         _grid(list(itertools.product((1, 2), (False, True), (False, True))),
                               SEGAWARE_GEOMETRIES))
def test_im2dist(geometry, norm, remove_center, remove_bounds):
    k, s, p, d, hw = geometry
    emb = torch.randn(2, 3, *hw, generator=_gen(5))
    want = S.im2dist(emb, k, p, s, d, norm=norm, remove_center=remove_center,
                     remove_bounds=remove_bounds)
    _check("pacnet::im2dist", (emb, k, p, s, d, norm, remove_center, remove_bounds), want)


@pytest.mark.parametrize("geometry,ignore_label", _grid([(None,), (255,), (0,)],
                                                        SEGAWARE_GEOMETRIES))
def test_im2parity(geometry, ignore_label):
    k, s, p, d, hw = geometry
    g = _gen(6)
    labels = torch.randint(0, 3, (2, 1, *hw), generator=g).float()
    labels[0, 0, 0, :2] = 255
    labels[1, 0, -1, 0] = -1.7   # truncated to -1, as C's (int) cast
    labels[1, 0, 1, 1] = 2.9     # truncated to 2
    want = S.im2parity(labels, k, p, s, d, ignore_label=ignore_label)
    args = (labels, k, p, s, d, ignore_label is not None, ignore_label or 0)
    _check("pacnet::im2parity", args, want)


@pytest.mark.parametrize("dtype", (torch.int64, torch.int32))
def test_im2parity_of_integer_labels_is_float(dtype):
    labels = torch.randint(0, 3, (1, 1, 6, 5), generator=_gen(7)).to(dtype)
    labels[0, 0, 0, 0] = 255
    want = S.im2parity(labels, 3, 1, 1, 1, ignore_label=255)
    assert want.dtype == torch.get_default_dtype()
    _check("pacnet::im2parity", (labels, (3, 3), (1, 1), (1, 1), (1, 1), True, 255), want)


def test_functions_use_only_standard_ops_and_the_declared_domain():
    for fn in onnx_ops.used_functions([f.name for f in onnx_ops.OPERATORS]):
        proto = fn.to_function_proto()
        assert proto.domain == onnx_ops.DOMAIN
        for node in proto.node:
            assert node.domain in ("", onnx_ops.DOMAIN), (fn.name, node.op_type, node.domain)
            if node.domain == "":
                onnx.defs.get_schema(node.op_type, onnx_ops.MIN_OPSET, "")  # a standard op
