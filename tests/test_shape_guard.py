"""A compiled net called at input shapes other than its build's computes what the file says
there, or refuses with an error naming the layer (pacnet.shape_guard)."""

import textwrap

import pytest
import torch
import yaml

import pacnet
from pacnet.errors import ShapeError


CAFFE_NET = """
    inputs: {data: [1, 3, 16, 16]}
    layers:
      - {name: conv, type: Convolution, bottom: data, top: conv, num_output: 4, kernel_size: 3,
         pad: 5, weight_filler: {type: gaussian, std: 0.3}}
      - {name: pool, type: Pooling, bottom: conv, top: pool, pool: MAX, kernel_size: 3, stride: 2,
         pad: 1}
      - {name: up, type: Deconvolution, bottom: pool, top: up, num_output: 4, kernel_size: 4,
         stride: 2, weight_filler: {type: gaussian, std: 0.3}}
      - {name: crop, type: Crop, bottom: [up, data], top: crop, offset: 3}
      - {name: zoom, type: Interp, bottom: crop, top: zoom, zoom_factor: 2}
      - {name: ave, type: Pooling, bottom: zoom, top: ave, pool: AVE, kernel_size: 3, stride: 2,
         pad: 1}
"""


def test_a_caffe_net_at_another_size_equals_the_net_built_for_it():
    """Crop to a reference blob, ceil poolings with Caffe's clip rule and AVE divisors,
    deconvolution and Interp follow the input: called at another size (or batch) the net
    gives what a net built for that size gives."""
    torch.manual_seed(0)
    tree = yaml.safe_load(textwrap.dedent(CAFFE_NET))
    net = pacnet.build(tree)
    for shape in [(1, 3, 20, 18), (2, 3, 16, 16), (1, 3, 9, 11)]:
        x = torch.randn(shape)
        other = pacnet.build(tree, inputs={"data": shape})
        other.load_state_dict(net.state_dict())
        got, want = net(x)["ave"], other(x)["ave"]
        assert got.shape == other.shapes["ave"]
        torch.testing.assert_close(got, want, rtol=0, atol=0)


NET = """
    inputs: {data: [1, 2, 8, 8]}
    layers:
      - {name: conv, type: Convolution, bottom: data, top: conv, num_output: 2, kernel_size: 3,
         pad: 1}
      - {name: flat, type: Reshape, bottom: conv, top: flat, shape: [1, 128]}
"""


def test_a_size_a_layer_cannot_take_is_located(tmp_path):
    path = tmp_path / "net.yaml"
    path.write_text(textwrap.dedent(NET).lstrip())
    net = pacnet.build(path)
    assert net(torch.randn(1, 2, 8, 8))["flat"].shape == (1, 128)
    for shape in [(1, 2, 8, 9), (2, 2, 8, 8)]:
        with pytest.raises(ShapeError) as err:
            net(torch.randn(shape))
        text = str(err.value)
        assert text.startswith(f"{path}:5:")  # the Reshape's shape, which fixes the size
        assert "layer 'flat' (Reshape): the net built for data 1x2x8x8 was called with data " \
               + "x".join(map(str, shape)) in text


def test_a_module_built_for_the_build_size_is_refused_by_name(tmp_path, monkeypatch):
    """A layer whose module, rebuilt for the new shapes, differs from the one the net holds
    (here made to differ by the device its weight is on: held on the CPU, rebuilt on meta)."""
    from pacnet import shape_guard

    path = tmp_path / "net.yaml"
    path.write_text(textwrap.dedent(NET.replace("[1, 128]", "[0, -1]")).lstrip())
    net = pacnet.build(path)
    monkeypatch.setattr(shape_guard, "module_config", lambda m: (
        type(m).__name__, str(getattr(m, "weight", torch.empty(0)).device)))
    with pytest.raises(ShapeError) as err:
        net(torch.randn(1, 2, 8, 9))
    text = str(err.value)
    assert text.startswith(f"{path}:3:5:")
    assert "layer 'conv' (Convolution): the net was built for data 1x2x8x8 and called with " \
           "data 1x2x8x9" in text
    assert "pacnet.build(..., inputs={...})" in text


def test_a_size_the_net_cannot_take_is_located_and_verdicts_are_cached(tmp_path, monkeypatch):
    path = tmp_path / "net.yaml"
    path.write_text(textwrap.dedent("""
        inputs: {a: [1, 2, 8, 8], b: [1, 2, 8, 8]}
        layers:
          - {name: sum, type: Eltwise, bottom: [a, b], top: s}
    """).lstrip())
    net = pacnet.build(path)
    assert net(torch.ones(1, 2, 9, 9), b=torch.ones(1, 2, 9, 9))["s"].shape == (1, 2, 9, 9)
    with pytest.raises(ShapeError, match=r"layer 'sum' \(Eltwise\).*called with"):
        net(torch.ones(1, 2, 9, 9), torch.ones(1, 2, 8, 8))
    from pacnet import shape_guard

    calls = []
    monkeypatch.setattr(shape_guard, "_verdict", lambda *a: calls.append(a))
    net(torch.ones(1, 2, 9, 9), torch.ones(1, 2, 9, 9))  # decided above: not asked again
    net(torch.ones(1, 2, 8, 8), torch.ones(1, 2, 8, 8))  # the build's shapes: never asked
    assert calls == []


def test_compiled_and_copied_nets_keep_the_guard():
    import copy

    net = pacnet.build("jointupsample/pac_joint_upsample_lite_x8",
                       inputs={"target": (1, 1, 4, 4), "guide": (1, 3, 32, 32)})
    twin = copy.deepcopy(net)
    with pytest.raises(ShapeError, match="called with"):
        twin(torch.rand(1, 1, 4, 4), torch.rand(1, 3, 40, 32))  # the guide is not 8x the target
    compiled = torch.compile(net, backend="eager", fullgraph=True)
    out = compiled(torch.rand(1, 1, 4, 4), torch.rand(1, 3, 32, 32))
    assert out["pred"].shape == (1, 1, 32, 32)
