"""The nets/ zoo: every net builds, with the reference architectures' shapes and sizes."""

import pytest
import torch

import pacnet
from pacnet.api import parameter_count
from pacnet.load import zoo_names


def _conv(cin, cout, k, bias=True):
    return cin * cout * k * k + (cout if bias else 0)


VGG16_CONVS = sum(_conv(a, b, 3) for a, b in [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256),
                                                (256, 256), (256, 512), (512, 512), (512, 512), (512, 512),
                                                (512, 512), (512, 512)])
FCN8S = (VGG16_CONVS + _conv(512, 4096, 7) + _conv(4096, 4096, 1) + _conv(4096, 21, 1) + _conv(512, 21, 1)
         + _conv(256, 21, 1) + 21 * (4 * 4 + 4 * 4 + 16 * 16))  # upsampling: group 21, one kernel per class

# name -> (build kwargs, {blob: shape}, parameter count of the reference architecture)
EXPECTED = {
    "fcn/fcn8s": ({}, {"pool2": (1, 128, 175, 175), "upscore8": (1, 21, 568, 568), "score": (1, 21, 500, 500)},
                  FCN8S),
    "deeplab/deeplab_v2_resnet101": ({"inputs": {"data": (1, 3, 513, 513)}},
                                     {"fc1": (1, 21, 65, 65), "fc1_interp": (1, 21, 513, 513)}, 44_048_532),
    "pspnet/pspnet101_voc2012": ({}, {"conv6": (1, 21, 60, 60), "conv6_interp": (1, 21, 473, 473)}, 65_708_501),
    "pspnet/pspnet101_cityscapes": ({}, {"conv6": (1, 19, 90, 90), "conv6_interp": (1, 19, 713, 713)}, 65_707_475),
    "pspnet/pspnet50_ade20k": ({}, {"conv6": (1, 150, 60, 60), "conv6_interp": (1, 150, 473, 473)}, 46_782_550),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_zoo_net_shapes_and_parameter_count(name):
    kwargs, shapes, params = EXPECTED[name]
    net = pacnet.build(name, device="meta", **kwargs)
    for blob, shape in shapes.items():
        assert net.shapes[blob] == shape, blob
    assert parameter_count(net) == params


def test_every_zoo_net_is_covered():
    assert set(EXPECTED) <= set(zoo_names())


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
