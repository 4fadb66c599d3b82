"""The layers a 3-D net is built from, on 5-D blobs (N x C x D x H x W).

One property covers them all: a layer that acts within each depth slice (element-wise,
per channel, or with a window of depth 1) computes, on a 5-D blob, exactly what its 2-D
self computes on every slice as a 4-D blob N*D x C x H x W, with the same blobs.  The 2-D
layers are checked against Caffe in their own test files; this checks that the 3-D paths
(rank from the bottom, per-axis parameters, channel broadcasting) reduce to them.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import pytest
import torch

from layer_helpers import build, infer, make_spec, run_layer, rand
from layer_helpers import single_thread  # noqa: F401  (autouse: one torch thread)
from pacnet.registry import get

D = torch.float64
N, C, DEPTH, H, W = 2, 4, 3, 7, 6


def fold(t: torch.Tensor) -> torch.Tensor:
    """N x C x D x ... -> N*D x C x ... (each depth slice a sample)."""
    return t.transpose(1, 2).reshape((-1, t.shape[1]) + tuple(t.shape[3:]))


def randomize_(module: torch.nn.Module, seed: int = 3) -> torch.nn.Module:
    """Random parameters and buffers (variances positive), float64."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict(keep_vars=True).items():  # not derived buffers
            if t.is_floating_point():
                values = torch.randn(t.shape, generator=g, dtype=D)
                t.copy_(values.abs() + 0.5 if "var" in name or "scale_factor" in name else values)
    return module


def copy_blobs_(dst: torch.nn.Module, src: torch.nn.Module) -> None:
    """``src``'s blobs into ``dst``, each reshaped to ``dst``'s shape (a 1 x k x k kernel
    becomes k x k)."""
    mine = dst.state_dict()
    dst.load_state_dict({k: v.reshape(mine[k].shape) for k, v in src.state_dict().items()})


# (type, 5-D params, 2-D params or None = the same, number of bottoms, positive inputs)
SLICEWISE = [
    ("ReLU", {}, None, 1, False),
    ("ReLU", {"negative_slope": 0.2}, None, 1, False),
    ("PReLU", {}, None, 1, False),
    ("PReLU", {"channel_shared": True}, None, 1, False),
    ("Sigmoid", {}, None, 1, False),
    ("TanH", {}, None, 1, False),
    ("AbsVal", {}, None, 1, False),
    ("Power", {"power": 1.5, "scale": 0.5, "shift": 0.25}, None, 1, True),
    ("Exp", {"base": 2.0, "scale": 0.5}, None, 1, False),
    ("Log", {"shift": 0.5}, None, 1, True),
    ("Dropout", {"dropout_ratio": 0.3}, None, 1, False),
    ("BatchNorm", {"use_global_stats": True}, None, 1, False),
    ("BN", {}, None, 1, False),
    ("Scale", {"bias_term": True}, None, 1, False),
    ("Scale", {}, None, 2, False),
    ("Bias", {}, None, 1, False),
    ("Softmax", {}, None, 1, False),
    ("Eltwise", {"coeff": [0.5, -2.0, 1.0]}, None, 3, False),
    ("Eltwise", {"operation": "PROD"}, None, 2, False),
    ("Eltwise", {"operation": "MAX"}, None, 3, False),
    ("Concat", {}, None, 3, False),
    ("Slice", {"slice_point": [1, 3]}, None, 1, False),
    ("Split", {}, None, 1, False),
    ("Tile", {"tiles": 2}, None, 1, False),
    ("Convolution", {"num_output": 6, "kernel_size": [1, 3, 3], "pad": [0, 1, 1], "group": 2},
     {"num_output": 6, "kernel_size": 3, "pad": 1, "group": 2}, 1, False),
    ("Convolution", {"num_output": 3, "kernel_size": [1, 3, 2], "stride": [1, 2, 1],
                     "dilation": [1, 1, 2]},
     {"num_output": 3, "kernel_size": [3, 2], "stride": [2, 1], "dilation": [1, 2]}, 1, False),
    ("Deconvolution", {"num_output": 2, "kernel_size": [1, 4, 4], "stride": [1, 2, 2],
                       "pad": [0, 1, 1]},
     {"num_output": 2, "kernel_size": 4, "stride": 2, "pad": 1}, 1, False),
    ("Pooling", {"pool": "MAX", "kernel_size": [1, 3, 3], "stride": [1, 2, 2], "pad": [0, 1, 1]},
     {"pool": "MAX", "kernel_size": 3, "stride": 2, "pad": 1}, 1, False),
    ("Pooling", {"pool": "AVE", "kernel_size": [1, 3, 2], "stride": [1, 2, 2], "pad": [0, 2, 1]},
     {"pool": "AVE", "kernel_size": [3, 2], "stride": 2, "pad": [2, 1]}, 1, False),
    ("Resize", {"mode": "trilinear", "scale_factor": [1, 2, 0.5]},
     {"mode": "bilinear", "scale_factor": [2, 0.5]}, 1, False),
    ("Resize", {"mode": "nearest", "scale_factor": [1, 0.5, 3]},
     {"mode": "nearest", "scale_factor": [0.5, 3]}, 1, False),
    ("Resize", {"mode": "trilinear", "height": 5, "width": 9, "align_corners": True},
     {"height": 5, "width": 9, "align_corners": True}, 1, False),
]


@pytest.mark.parametrize("type_name,params,params_2d,n_bottoms,positive", SLICEWISE,
                         ids=[f"{t}-{i}" for i, (t, *_) in enumerate(SLICEWISE)])
def test_5d_layer_equals_its_2d_self_on_every_slice(type_name: str, params: Dict[str, Any],
                                                    params_2d: Optional[Dict[str, Any]],
                                                    n_bottoms: int, positive: bool):
    n_tops = 3 if type_name == "Slice" else (2 if type_name == "Split" else 1)
    spec5 = make_spec(type_name, n_bottoms=n_bottoms, n_tops=n_tops, **params)
    spec4 = make_spec(type_name, n_bottoms=n_bottoms, n_tops=n_tops, **(params_2d or params))
    xs = [rand(N, C, DEPTH, H, W, seed=i) for i in range(n_bottoms)]
    if type_name == "Scale" and n_bottoms == 2:
        xs[1] = rand(C, seed=9)              # the scale as a second bottom: one per channel
    if positive:
        xs = [x.abs() + 0.1 for x in xs]
    shapes5 = [tuple(x.shape) for x in xs]
    module5 = randomize_(build(spec5, *shapes5, dtype=D)).eval()
    ys5 = run_layer(spec5, *xs, module=module5)
    xs4 = [fold(x) if x.dim() == 5 else x for x in xs]
    module4 = build(spec4, *[tuple(x.shape) for x in xs4], dtype=D).eval()
    copy_blobs_(module4, module5)
    ys4 = run_layer(spec4, *xs4, module=module4)
    assert len(ys5) == len(ys4) == n_tops
    for y5, y4 in zip(ys5, ys4):
        torch.testing.assert_close(fold(y5), y4, rtol=1e-12, atol=1e-12)
    # FLOPs count the same work (trilinear reads 8 taps where bilinear reads 4)
    if spec5.get("mode") != "trilinear":
        flops, shapes4 = get(type_name).flops, [tuple(x.shape) for x in xs4]
        assert flops(spec5, shapes5, infer(spec5, *shapes5)) == flops(spec4, shapes4,
                                                                      infer(spec4, *shapes4))


def test_5d_pooling_mask_indexes_the_volume():
    # the argmax top of a 5-D MAX pooling is (d*H + h)*W + w: the 2-D mask of slice d
    # plus d*H*W, on the PyTorch path and on the explicit-padding path
    x = rand(N, C, DEPTH, H, W)
    for pad in (1, 2):
        spec5 = make_spec("Pooling", kernel_size=[1, 3, 3], stride=[1, 2, 2], pad=[0, pad, pad],
                          n_tops=2)
        spec4 = make_spec("Pooling", kernel_size=3, stride=2, pad=pad, n_tops=2)
        _, mask5 = run_layer(spec5, x)
        _, mask4 = run_layer(spec4, fold(x))
        offset = (torch.arange(DEPTH, dtype=D) * H * W).reshape(1, 1, DEPTH, 1, 1)
        torch.testing.assert_close(fold(mask5 - offset), mask4, rtol=0, atol=0)


def test_5d_concat_and_slice_along_depth():
    # axis 2 of a 5-D blob is the depth (time) axis: clips join and split there
    a, b = rand(N, C, 2, H, W), rand(N, C, 3, H, W, seed=1)
    (joined,) = run_layer(make_spec("Concat", n_bottoms=2, axis=2), a, b)
    torch.testing.assert_close(joined, torch.cat([a, b], dim=2))
    first, rest = run_layer(make_spec("Slice", n_tops=2, axis=2, slice_point=[2]), joined)
    assert torch.equal(first, a) and torch.equal(rest, b)


def test_layer_docs_show_the_per_axis_forms(capsys):
    from pacnet.cli.main import main

    assert main(["layers", "Convolution"]) == 0
    out = capsys.readouterr().out
    assert "[d, h, w]" in out and "[h, w]" in out
    assert main(["layers", "Pooling"]) == 0
    assert "[d, h, w]" in capsys.readouterr().out
