"""The segaware fusion pass: same numbers (float64, values and gradients), no column tensors."""

import copy

import pytest
import torch

import pacnet
from pacnet.cli.main import main

CHAIN = {
    "inputs": {"x": [2, 4, 7, 8], "emb": [2, 3, 7, 8]},
    "layers": [
        {"name": "dist", "type": "Im2dist", "bottom": "emb", "top": "dist", "kernel_size": 3, "pad": 2,
         "dilation": 2, "norm": "L1"},
        {"name": "lam", "type": "Scale", "bottom": "dist", "top": "wdist", "num_axes": 0,
         "filler": {"type": "constant", "value": 0.5}},
        {"name": "abs", "type": "AbsVal", "bottom": "wdist", "top": "wdist"},
        {"name": "exp", "type": "Exp", "bottom": "wdist", "top": "mask", "scale": -1},
        {"name": "tile", "type": "Tile", "bottom": "mask", "top": "tmask", "axis": 1, "tiles": 4},
        {"name": "col", "type": "Im2col", "bottom": "x", "top": "xcol", "kernel_size": 3, "pad": 2,
         "dilation": 2},
        {"name": "prod", "type": "Eltwise", "bottom": ["xcol", "tmask"], "top": "masked", "operation": "PROD"},
        {"name": "conv", "type": "Convolution", "bottom": "masked", "top": "y", "num_output": 5,
         "kernel_size": 3, "pad": 2, "dilation": 2, "bottom_is_im2col": True,
         "weight_filler": {"type": "gaussian", "std": 0.3}, "bias_filler": {"type": "constant", "value": 0.1}},
    ],
}


def _pair(net_dict, **build):
    fused = pacnet.build(net_dict, **build).double()
    plain = pacnet.build(net_dict, fuse=False, **build).double()
    plain.load_state_dict(fused.state_dict())
    return fused, plain


def test_fused_chain_matches_unfused_values_and_gradients():
    fused, plain = _pair(CHAIN)
    types = [n.type for n in fused.ir.nodes]
    assert "SegawareConvolution" in types
    assert not {"Im2col", "Tile", "Eltwise"} & set(types)
    assert fused.ir.node("conv").fused
    assert set(fused.state_dict()) == set(plain.state_dict())
    torch.manual_seed(0)
    x = torch.randn(2, 4, 7, 8, dtype=torch.float64)
    emb = torch.randn(2, 3, 7, 8, dtype=torch.float64)
    results = []
    for net in (fused, plain):
        xi, ei = x.clone().requires_grad_(), emb.clone().requires_grad_()
        y = net(x=xi, emb=ei)["y"]
        (y * torch.linspace(-1, 1, y.numel(), dtype=torch.float64).view_as(y)).sum().backward()
        results.append((y.detach(), xi.grad, ei.grad, net.conv.weight.grad.clone(), net.lam.weight.grad.clone()))
        net.zero_grad()
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_chain_with_a_shared_column_blob_stays_unfused():
    net_dict = copy.deepcopy(CHAIN)
    net_dict["layers"].append({"name": "keep", "type": "AbsVal", "bottom": "xcol", "top": "xcol_abs"})
    net = pacnet.build(net_dict)
    assert "SegawareConvolution" not in [n.type for n in net.ir.nodes]


def test_build_table_marks_fused_layers(tmp_path, capsys):
    import yaml

    path = tmp_path / "seg.yaml"
    path.write_text(yaml.safe_dump(CHAIN))
    assert main(["build", str(path)]) == 0
    out = capsys.readouterr().out
    assert "(fused)" in out and "fused: conv:" in out
    assert main(["build", str(path), "--no-fuse"]) == 0
    assert "(fused)" not in capsys.readouterr().out
