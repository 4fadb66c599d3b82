"""`pacnet export` and pacnet.export_onnx: zoo nets and users' modules to ONNX, for onnxruntime.

Exported files run in onnxruntime with no custom library and agree with PyTorch (random
He-scaled weights, so every path matters); pacnet ops are ``pacnet::*`` nodes defined by
model functions; inputs and outputs keep the blob names; ONNX's own shape inference agrees
with the shapes in the file; bad input ends in one located error, exit 2 and no file.
The big backbones run under ``-m slow``.
"""

import os

import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import pacnet  # noqa: E402
from pacnet import onnx_ops  # noqa: E402
from pacnet.api import reshape  # noqa: E402
from pacnet.cli.main import main  # noqa: E402
from pacnet.engine.checkpoint import save_weights  # noqa: E402
from pacnet.errors import ExportError  # noqa: E402
from pacnet.export import export_onnx  # noqa: E402
from pacnet.kernels.pac import ops as pac_ops  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, threads))
    yield
    torch.set_num_threads(threads)


def randomize(net, seed=0):
    """Weights that make every path matter: He-scaled kernels, biases and scales near their
    defaults, positive variances, small scalars."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, t in sorted(net.state_dict().items()):
            if not t.is_floating_point():
                continue
            leaf = key.rsplit(".", 1)[-1]
            if "var" in leaf:
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif leaf == "scale_factor":
                t.fill_(1.0)
            elif t.dim() >= 2 and t[0].numel() > 1:
                t.copy_(torch.randn(t.shape, generator=g) / t[0].numel() ** 0.5)
            elif t.numel() == 1:
                t.copy_(torch.rand(t.shape, generator=g) * 0.5 + 0.5)
            else:
                base = 1.0 if leaf in ("weight", "slope") else 0.0
                t.copy_(base + 0.1 * torch.randn(t.shape, generator=g))
    return net


def _pacnet_nodes(path):
    model = onnx.load(path, load_external_data=False)
    return model, sorted(n.op_type for n in model.graph.node if n.domain == onnx_ops.DOMAIN)


def _assert_consistent_shapes(path):
    """ONNX's strict shape inference (through the pacnet functions) agrees with the file."""
    onnx.shape_inference.infer_shapes_path(path, path + ".inferred", strict_mode=True)
    os.remove(path + ".inferred")


# ----------------------------------------------------------------------------- the zoo

def _zoo_inputs(name, small):
    """Small inputs within each family's alignment rules (see the net files)."""
    net = pacnet.build(name, device="meta")
    if name.startswith("jointupsample/"):
        factor = net.inputs["guide"][-1] // net.inputs["target"][-1]
        big = small * factor
        return {"target": net.inputs["target"][:2] + (small, small),
                "guide": net.inputs["guide"][:2] + (big, big)}
    return {k: v[:2] + (small, small) for k, v in net.inputs.items()}


ZOO = {  # name: (input size, vars) at the small size; None keeps the file's size
    "jointupsample/pac_joint_upsample_lite_x8": (4, {}),
    "jointupsample/djif_x8": (4, {}),
    "segaware/embs": (17, {}),
    "segaware/vgg": (33, {}),  # VGG-16, but the one net with fused segaware convolutions
    # the main job's net: test_cli_exports_the_main_job_net_with_pacnet_nodes
}
SLOW_ZOO = {
    "jointupsample/pac_joint_upsample_x8": (4, {}),
    "jointupsample/pac_joint_upsample_x4": (4, {}),
    "jointupsample/pac_joint_upsample_x16": (2, {}),
    "jointupsample/pac_joint_upsample_lite_x4": (4, {}),
    "jointupsample/pac_joint_upsample_lite_x16": (2, {}),
    "segaware/res": (33, {"HALF_SIZE": 17}),
    "fcn/fcn8s": (32, {}),
    "fcn/fcn8s_altpad": (64, {}),
    "fcn/fcn8spac": (64, {}),
    "fcn/fcn8s_crfi5p4d5641p4d5161": (32, {}),
    "deeplab/deeplab_v1_largefov": (33, {}),
    "deeplab/deeplab_v2_vgg16_aspp": (33, {}),
    "deeplab/deeplab_v2_resnet101": (33, {}),
    "deeplab/aspp_v3_head": (33, {}),
    "nonlocal/nonlocal_head": (33, {}),
    "pspnet/pspnet50_ade20k": (None, {}),       # fixed bins: the file's 473 x 473
    "pspnet/pspnet101_voc2012": (None, {}),
    "pspnet/pspnet101_cityscapes": (None, {}),
    "jointupsample/djif_x4": (4, {}),
    "jointupsample/djif_x16": (2, {}),
    "jointupsample/pac_joint_upsample_video_x8": (None, {}),  # 5-D: the file's 8 x 64 x 64 clips
    "fcn/fcn8s_convcrf": (32, {}),
    "fcn/fcn8s_crfi5lp4d5641p4d5161": (32, {}),
    "fcn/fcn8s_crfi5p4d5321": (32, {}),
    "fcn/fcn8sfrozen_crfi5p4d5641p4d5161": (32, {}),
    "fcn/fcn8spac_crfi5lp4d5641p4d5161": (64, {}),
    "fcn/fcn8spac_crfi5p4d5641p4d5161": (64, {}),
    "fcn/voc/fcn8s": (32, {}),
    "fcn/voc/fcn8spac": (64, {}),
    # the original's experiments: the zoo nets above with its data layouts and recipes
    **{f"jointupsample/{data}/{model}_x{f}": (2 if f == 16 else 4, {})
       for data in ("nyu", "sintel") for model in ("pac_joint_upsample", "djif") for f in (4, 8, 16)},
    **{f"jointupsample/nyu/pac_joint_upsample_lite_x{f}": (2 if f == 16 else 4, {})
       for f in (4, 8, 16)},
}


def test_the_zoo_lists_are_the_zoo():
    from pacnet.load import zoo_names

    assert set(ZOO) | set(SLOW_ZOO) == set(zoo_names())


def _export_zoo(name, size, variables, tmp_path):
    inputs = _zoo_inputs(name, size) if size else None
    net = randomize(pacnet.build(name, inputs=inputs, vars=variables))
    path = str(tmp_path / (name.replace("/", "_") + ".onnx"))
    result = export_onnx(net, path, verify=True)
    for check in result.checks:
        assert check.ok, check
    assert list(result.inputs) == list(net.inputs)
    assert list(result.outputs) == [b.name for b in net.ir.outputs]
    assert all(result.inputs[k] == tuple(v) for k, v in net.inputs.items())
    _assert_consistent_shapes(path)
    return result


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_net_exports_and_verifies(name, tmp_path):
    _export_zoo(name, *ZOO[name], tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SLOW_ZOO))
def test_big_zoo_net_exports_and_verifies(name, tmp_path):
    _export_zoo(name, *SLOW_ZOO[name], tmp_path)


# ----------------------------------------------------------------------------- the CLI

X8 = ["jointupsample/pac_joint_upsample_x8", "--input", "target=1x1x4x4",
      "--input", "guide=1x3x32x32"]

# A small net with a PAC layer, a transposed PAC layer (guide 2x the target) and a Caffe
# ceil-mode pooling whose clip rule applies (5 -> 3, where ONNX's ceil mode would give 4),
# so that the CLI tests run in seconds.
TINY_PAC = """\
name: tiny_pac
pacnet_version: 1
inputs: {target: [N, 1, h, w], guide: [N, 3, H, W]}
dims: {N: 1, h: 5, w: 5, H: 10, W: 10}
layers:
  - {name: t, type: Convolution, bottom: target, top: t, num_output: 4, kernel_size: 3, pad: 1,
     weight_filler: {type: msra}}
  - {name: g, type: Convolution, bottom: guide, top: g, num_output: 3, kernel_size: 3, pad: 1,
     weight_filler: {type: msra}}
  - {name: up, type: PacConvTranspose, bottom: [t, g], top: up, num_output: 4, kernel_size: 5,
     stride: 2, pad: 2, output_pad: 1}
  - {name: pred, type: PacConv, bottom: [up, g], top: pred, num_output: 2, kernel_size: 3, pad: 1}
  - {name: pool, type: Pooling, bottom: t, top: pool, pool: AVE, kernel_size: 2, stride: 2,
     pad: 1}
"""


@pytest.fixture()
def tiny(tmp_path):
    path = tmp_path / "tiny_pac.yaml"
    path.write_text(TINY_PAC)
    return str(path)


def test_cli_exports_the_main_job_net_with_pacnet_nodes(tmp_path, capsys):
    path = tmp_path / "x8.onnx"
    assert main(["export", *X8, "-o", str(path), "--verify"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {path}" in out and "inputs:  target 1×1×4×4, guide 1×3×32×32" in out
    assert "outputs: pred 1×1×32×32" in out and "pred" in out and "ok" in out
    model, nodes = _pacnet_nodes(str(path))
    assert nodes == ["PacConv"] * 3 + ["PacDist"] * 3  # one node per PAC op (Netron)
    functions = {f.name for f in model.functions if f.domain == onnx_ops.DOMAIN}
    assert functions == {"PacConv", "PacDist", "Unfold", "SquaredDistance", "TapsOf"}
    assert {o.domain: o.version for o in model.opset_import}[onnx_ops.DOMAIN] == 1
    assert [i.name for i in model.graph.input] == ["target", "guide"]
    assert [o.name for o in model.graph.output] == ["pred"]
    onnx.checker.check_model(str(path), full_check=True)
    _assert_consistent_shapes(str(path))
    assert os.listdir(tmp_path) == ["x8.onnx"]  # no temporary left


def test_cli_exports_given_weights_at_an_opset(tiny, tmp_path, capsys):
    net = randomize(pacnet.build(tiny))
    weights = str(tmp_path / "w.safetensors")
    save_weights(weights, net.state_dict())
    path = tmp_path / "tiny.onnx"
    assert main(["export", tiny, "-o", str(path), "--opset", "17"]) == 2
    assert "opset 17 is too old" in capsys.readouterr().err
    assert not path.exists()
    assert main(["export", tiny, "-o", str(path), "--weights", weights, "--opset", "18"]) == 0
    assert f"weights: {weights}\n" in capsys.readouterr().out
    model = onnx.load(str(path))
    assert {o.domain: o.version for o in model.opset_import}[""] == 18
    assert all({o.domain: o.version for o in f.opset_import}[""] == 18 for f in model.functions)
    gen = torch.Generator().manual_seed(3)
    target, guide = torch.rand(1, 1, 5, 5, generator=gen), torch.rand(1, 3, 10, 10, generator=gen)
    got = ort.InferenceSession(str(path)).run(None, {"target": target.numpy(),
                                                     "guide": guide.numpy()})
    with torch.no_grad():
        want = net.eval()(target, guide)
    assert got[1].shape == (1, 4, 3, 3)  # Caffe's clip rule
    for g, w in zip(got, want.values()):
        np.testing.assert_allclose(g, w.numpy(), rtol=1e-4, atol=1e-5)
    _assert_consistent_shapes(str(path))


def test_cli_verify_failure_exits_1(tiny, tmp_path, capsys, monkeypatch):
    import pacnet.export as export

    real = export.verify_onnx

    def off_by_one(path, reference, inputs, names, rtol, atol):
        return real(path, lambda *xs: {k: v + 1 for k, v in reference(*xs).items()}, inputs,
                    names, rtol=rtol, atol=atol)
    monkeypatch.setattr(export, "verify_onnx", off_by_one)
    assert main(["export", tiny, "-o", str(tmp_path / "tiny.onnx"), "--verify"]) == 1
    captured = capsys.readouterr()
    assert "beyond tolerance" in captured.out
    assert "verification failed: pred, pool beyond tolerance" in captured.err


def test_cli_refuses_an_op_without_translation_naming_the_layer(tmp_path, capsys, monkeypatch):
    monkeypatch.delitem(onnx_ops.LOWERINGS, "pacnet::pac_dist")
    path = tmp_path / "x8.onnx"
    assert main(["export", *X8, "-o", str(path)]) == 2
    err = capsys.readouterr().err
    assert "layer 'up_convts/0' (PacConvTranspose)" in err and "pacnet::pac_dist" in err
    assert "pac_joint_upsample_blocks.yaml" in err  # where the layer is written
    assert os.listdir(tmp_path) == []


def test_cli_refuses_a_missing_folder_before_exporting(tiny, tmp_path, capsys):
    assert main(["export", tiny, "-o", str(tmp_path / "no" / "x.onnx")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_verify_compares_nan_and_infinity_as_values(tmp_path):
    from onnx import TensorProto, helper

    from pacnet.export import verify_onnx

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "id",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
    path = str(tmp_path / "id.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)],
                                ir_version=10), path)
    x = torch.tensor([1.0, float("nan"), float("inf"), -2.0])

    def check(reference, **tol):
        (c,) = verify_onnx(path, reference, {"x": x}, ["y"], **tol)
        return c

    assert check(lambda t: t).max_abs == 0 and check(lambda t: t).ok
    off = check(lambda t: t + torch.tensor([0.0, 0.0, 0.0, 1e-3]))
    assert off.max_abs == pytest.approx(1e-3, rel=1e-3)
    assert off.max_rel == pytest.approx(5e-4, rel=1e-3)
    assert not off.ok and check(lambda t: t + torch.tensor([0, 0, 0, 1e-3]), rtol=1e-3).ok
    assert not check(lambda t: torch.nan_to_num(t, nan=0.0, posinf=float("inf"))).ok
    assert not check(lambda t: torch.tensor([1.0, float("nan"), 5.0, -2.0])).ok


# ----------------------------------------------------------------------------- users' modules

class UsersNet(torch.nn.Module):
    """A user's model on the Python API: every PAC module, a CRF and the in-place op."""

    def __init__(self):
        super().__init__()
        self.conv = pacnet.PacConv2d(3, 4, 3, padding=1, kernel_type="inv_0.5_-1",
                                     smooth_kernel_type="gaussian")
        self.up = pacnet.PacConvTranspose2d(4, 4, 5, stride=2, padding=2, output_padding=1,
                                            normalize_kernel=True)
        self.pool = pacnet.PacPool2d(3, padding=1, kernel_type="inv_1_1_asym", channel_wise=True,
                                     out_channels=4)
        self.crf = pacnet.PacCRF(4, 2, pairwise_kernels=[
            dict(kernel_size=3, dilation=2), dict(kernel_size=5, compat_type="2d", blur=2),
            dict(kernel_size=3, compat_type="potts", spatial_filter=False)])
        self.w = torch.nn.Parameter(torch.randn(4, 4, 3, 3) * 0.1)

    def forward(self, x, guide):
        small = torch.nn.functional.avg_pool2d(guide, 2)
        y = torch.relu(self.conv(x, small))
        y = self.up(y, guide[:, :4])
        y = self.pool(y, guide[:, :4])
        feats = pacnet.create_YXRGB(guide[:, :3], yx_scale=8.0, rgb_scale=0.5)
        out = self.crf(y, feats)
        K = torch.exp(-pac_ops.pac_dist(guide, None, 3, 1, 1, 1))
        acc = out * 1.0
        pac_ops.pac_conv2d_add_(acc, out, K, self.w, 1, 1, 1, alpha=-0.25)
        return {"crf": out, "acc": acc}


def test_users_module_with_pac_layers_exports_and_verifies(tmp_path):
    torch.manual_seed(0)
    model = UsersNet()
    gen = torch.Generator().manual_seed(1)
    inputs = {"image": torch.rand(1, 3, 8, 8, generator=gen),
              "guide": torch.rand(1, 5, 16, 16, generator=gen)}
    path = str(tmp_path / "users.onnx")
    result = export_onnx(model, path, inputs=inputs, dynamic=True, verify=True)
    assert result.verified, result.checks
    assert list(result.inputs) == ["image", "guide"] and list(result.outputs) == ["crf", "acc"]
    assert result.inputs["image"] == ("batch", 3, 8, 8) and result.notes == ("dynamic: batch",)
    _, nodes = _pacnet_nodes(path)
    assert set(nodes) == {"PacDist", "PacDistToCenter", "PacConv", "PacPool"}
    assert model.training  # put back in its mode
    _assert_consistent_shapes(path)
    with pytest.raises(ExportError, match="named dynamic dims are a net's"):
        export_onnx(model, path, inputs=inputs, dynamic=["N"])


class UsersVideoNet(torch.nn.Module):
    """The 3-D PAC modules on clips ``[N, C, T, H, W]``, anisotropic geometry included."""

    def __init__(self):
        super().__init__()
        self.conv = pacnet.PacConv3d(2, 4, (1, 3, 3), padding=(0, 1, 1),
                                     kernel_type="inv_0.5_-1", smooth_kernel_type="gaussian")
        self.up = pacnet.PacConvTranspose3d(4, 3, (3, 5, 5), stride=(1, 2, 2), padding=(1, 2, 2),
                                            output_padding=(0, 1, 1), normalize_kernel=True)
        self.pool = pacnet.PacPool3d(3, padding=1, channel_wise=True)

    def forward(self, clip, guide):
        small = torch.nn.functional.avg_pool3d(guide, (1, 2, 2))
        y = torch.relu(self.conv(clip, small))
        return self.pool(self.up(y, guide), guide[:, :3])


def test_users_3d_pac_module_exports_and_verifies(tmp_path):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(2)
    inputs = {"clip": torch.rand(1, 2, 3, 5, 4, generator=gen),
              "guide": torch.rand(1, 4, 3, 10, 8, generator=gen)}
    path = str(tmp_path / "video.onnx")
    result = export_onnx(UsersVideoNet(), path, inputs=inputs, verify=True)
    assert result.verified, result.checks
    _, nodes = _pacnet_nodes(path)
    assert set(nodes) == {"PacDist", "PacDistToCenter", "PacConv", "PacPool"}
    _assert_consistent_shapes(path)


def test_module_outputs_that_alias_inputs_or_each_other(tmp_path):
    class Passes(torch.nn.Module):
        def forward(self, x, y):
            z = x * 2
            return x, z, z, y

    x, y = torch.rand(1, 2, 3, 3), torch.rand(1, 1, 3, 3)
    path = str(tmp_path / "p.onnx")
    result = export_onnx(Passes(), path, inputs={"x": x, "y": y},
                         output_names=["x", "twice", "again", "y_out"], verify=True)
    assert result.verified and list(result.outputs) == ["x", "twice", "again", "y_out"]


def test_a_module_needs_example_inputs(tmp_path):
    with pytest.raises(ExportError, match="example inputs"):
        export_onnx(torch.nn.ReLU(), str(tmp_path / "r.onnx"))


def test_a_forward_torch_export_cannot_trace_names_the_module(tmp_path):
    class ValueDependent(torch.nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x

    class Outer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.branch = ValueDependent()

        def forward(self, x):
            return self.branch(x) + 1

    with pytest.raises(ExportError, match=r"layer 'branch' \(ValueDependent\): torch.export "
                                          r"cannot trace the forward"):
        export_onnx(Outer(), str(tmp_path / "o.onnx"), inputs=torch.rand(2, 3))
    assert os.listdir(tmp_path) == []


def test_an_op_torch_onnx_cannot_translate_names_the_module(tmp_path):
    @torch.library.custom_op("pacnet_test::twice", mutates_args=())
    def twice(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @twice.register_fake
    def _(x):
        return torch.empty_like(x)

    class Inner(torch.nn.Module):
        def forward(self, x):
            return twice(x)

    class Outer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = Inner()

        def forward(self, x):
            return self.body(x) + 1

    path = tmp_path / "o.onnx"
    with pytest.raises(ExportError) as err:
        export_onnx(Outer(), str(path), inputs=torch.rand(2, 3))
    assert "pacnet_test.twice" in str(err.value) and "layer 'body' (Inner)" in str(err.value)
    assert not path.exists() and os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- dynamic shapes

def test_cli_dynamic_makes_every_dim_of_the_inputs_dynamic(tiny, tmp_path, capsys):
    net = randomize(pacnet.build(tiny))
    weights = str(tmp_path / "w.safetensors")
    save_weights(weights, net.state_dict())
    path = tmp_path / "tiny.onnx"
    assert main(["export", tiny, "-o", str(path), "--weights", weights, "--dynamic",
                 "--verify"]) == 0
    out = capsys.readouterr().out
    assert "inputs:  target N×1×h×w, guide N×3×H×W" in out
    assert "note: dynamic: N, h, w, H, W" in out
    session = ort.InferenceSession(str(path))
    for n, h in ((3, 6), (1, 2), (2, 9)):  # sizes it was not exported at
        gen = torch.Generator().manual_seed(n)
        target = torch.rand(n, 1, h, h, generator=gen)
        guide = torch.rand(n, 3, 2 * h, 2 * h, generator=gen)
        other = reshape(net, {"target": target.shape, "guide": guide.shape}).eval()
        with torch.no_grad():
            want = other(target, guide)
        got = session.run(None, {"target": target.numpy(), "guide": guide.numpy()})
        for g, w in zip(got, want.values()):
            np.testing.assert_allclose(g, w.numpy(), rtol=1e-4, atol=1e-5 * w.abs().max())
    _assert_consistent_shapes(str(path))


DUMMY_XY = """\
name: fixed_xy
pacnet_version: 1
inputs: {data: [N, 3, H, W]}
dims: {N: 1, H: 8, W: 8}
layers:
  - {name: xy, type: DummyData, top: xy, shape: [[1, 2, 8, 8]], data_filler: {type: xy}}
  - {name: cat, type: Concat, bottom: [data, xy], top: cat}
  - {name: conv, type: Convolution, bottom: cat, top: out, num_output: 2, kernel_size: 3, pad: 1,
     weight_filler: {type: msra}}
"""


def test_dims_a_layer_fixes_stay_fixed_with_a_note_naming_it(tmp_path, capsys):
    net_file = tmp_path / "fixed.yaml"
    net_file.write_text(DUMMY_XY)
    path = tmp_path / "fixed.onnx"
    assert main(["export", str(net_file), "-o", str(path), "--dynamic"]) == 0
    out = capsys.readouterr().out
    assert "inputs:  data 1×3×8×8" in out and "note: no dim can be dynamic" in out
    assert "note: N stays fixed: at N=2, " in out and "layer 'cat' (Concat)" in out
    assert "note: H stays fixed: at H=9, W=9, " in out
    assert main(["export", str(net_file), "-o", str(path), "--dynamic", "N,H"]) == 2
    err = capsys.readouterr().err
    assert "input dim N cannot be dynamic: at N=2" in err and "layer 'cat' (Concat)" in err


@pytest.mark.slow
def test_big_nets_dynamic_where_they_allow(tmp_path):
    res = randomize(pacnet.build("segaware/res", inputs={"data": (1, 3, 33, 33)},
                                 vars={"HALF_SIZE": 17}))
    result = export_onnx(res, str(tmp_path / "res.onnx"), dynamic=True, verify=True)
    assert result.verified and result.inputs["data"] == (1, 3, 33, 33)
    assert any(n.startswith("N stays fixed") and "layer 'embxy' (Concat)" in n
               for n in result.notes)
    psp = randomize(pacnet.build("pspnet/pspnet50_ade20k"))
    result = export_onnx(psp, str(tmp_path / "psp.onnx"), dynamic=True, verify=True)
    assert result.verified and result.inputs["data"] == ("N", 3, 473, 473)  # fixed in its file
    lfov = randomize(pacnet.build("deeplab/deeplab_v1_largefov", inputs={"data": (1, 3, 33, 33)}))
    result = export_onnx(lfov, str(tmp_path / "lfov.onnx"), dynamic=True, verify=True)
    assert result.verified and result.inputs["data"] == ("N", 3, "H", "W")
