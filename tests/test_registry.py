"""Every registered layer type keeps the layer contract: a valid schema, docs, descriptions."""

import jsonschema
import pytest

from layer_helpers import defaults
from pacnet import registry
from pacnet.registry import Layer, register

TYPES = sorted(registry.types())


@pytest.mark.parametrize("type_name", TYPES)
def test_schema_is_valid_documented_and_defaults_conform(type_name):
    layer = registry.get(type_name)
    jsonschema.Draft202012Validator.check_schema(layer.schema())
    jsonschema.Draft202012Validator({**layer.schema(), "required": []}).validate(defaults(type_name))
    for key, prop in layer.params.items():
        assert prop.get("description"), f"{type_name}.{key} has no description"
    assert layer.doc(), f"{type_name} has no docstring"
    lo, hi = layer.bottoms
    assert lo >= 0 and (hi is None or hi >= lo)


def test_loss_types_are_marked():
    for name in TYPES:
        if name.endswith("Loss"):
            assert registry.get(name).loss, name


def test_registering_a_type_twice_names_both_places():
    class First(Layer):
        """x"""

    register("_TwiceForTest")(First)
    try:
        class Second(Layer):
            """y"""

        with pytest.raises(RuntimeError, match="registered twice: first by .*First"):
            register("_TwiceForTest")(Second)
    finally:
        registry._REGISTRY.pop("_TwiceForTest", None)
        registry._ORIGIN.pop("_TwiceForTest", None)


# ----------------------------------------------------------------------------- gradients

# One small instance of every type with bottoms and tops: (params, bottom shapes, n_tops).
# A bottom written ("labels", shape, classes) holds integer labels in [0, classes).
_X = (2, 4, 5, 5)
_LABELS = ("labels", (2, 1, 5, 5), 4)
GRADIENT_SAMPLES = {
    "AbsVal": ({}, [_X], 1),
    "Accuracy": ({}, [_X, _LABELS], 1),
    "AdaptivePooling": ({"output_size": 2}, [_X], 1),
    "ArgMax": ({"axis": 1}, [_X], 1),
    "BN": ({}, [_X], 1),
    "BatchNorm": ({}, [_X], 1),
    "Bias": ({"axis": 1, "num_axes": 1}, [_X, (4,)], 1),
    "ChannelReduce": ({"num_channels": 2}, [_X], 1),
    "Concat": ({}, [_X, _X], 1),
    "Convolution": ({"num_output": 2, "kernel_size": 3}, [_X], 1),
    "Crop": ({"offset": 1}, [_X, (2, 4, 3, 3)], 1),
    "Deconvolution": ({"num_output": 2, "kernel_size": 2, "stride": 2}, [_X], 1),
    "DistLoss": ({"alpha": 0.5, "beta": 2.0}, [(2, 9, 5, 5), ("labels", (2, 9, 5, 5), 2)], 1),
    "Dropout": ({}, [_X], 1),
    "Eltwise": ({"operation": "PROD"}, [_X, _X], 1),
    "EuclideanLoss": ({}, [_X, _X], 1),
    "Exp": ({}, [_X], 1),
    "Flatten": ({}, [_X], 1),
    "Im2col": ({"kernel_size": 3, "pad": 1}, [_X], 1),
    "Im2dist": ({"kernel_size": 3, "pad": 1}, [_X], 1),
    "Im2parity": ({"kernel_size": 3, "pad": 1}, [("labels", (2, 1, 5, 5), 3)], 1),
    "InnerProduct": ({"num_output": 3}, [_X], 1),
    "Interp": ({}, [_X, (2, 1, 7, 7)], 1),
    "Log": ({"shift": 10.0}, [_X], 1),
    "MatMul": ({}, [(2, 3, 4), (2, 4, 5)], 1),
    "NonLocal2d": ({}, [_X], 1),
    "NormConv": ({"num_output": 2, "kernel_size": 3, "pad": 1}, [_X, (2, 3, 5, 5)], 1),
    "NormConvMeanfield": ({"num_iterations": 2, "kernel_size": [3, 3], "pad": [1, 1],
                           "dilation": [1, 1]},
                          [_X, _X, (2, 3, 5, 5), (2, 2, 5, 5)], 1),
    "PReLU": ({}, [_X], 1),
    "PacCRF": ({"num_steps": 1, "pairwise_kernels": [{"kernel_size": 3}]}, [_X, (2, 3, 5, 5)], 1),
    "PacCRFLoose": ({"num_steps": 1, "pairwise_kernels": [{"kernel_size": 3}]},
                    [_X, (2, 3, 5, 5)], 1),
    "PacConv": ({"num_output": 2, "kernel_size": 3, "pad": 1}, [_X, (2, 3, 5, 5)], 1),
    "PacConvTranspose": ({"num_output": 2, "kernel_size": 3, "stride": 2, "pad": 1,
                          "output_pad": 1}, [_X, (2, 3, 10, 10)], 1),
    "PacKernel": ({"kernel_size": 3, "pad": 1}, [(2, 3, 5, 5)], 1),
    "PacPool": ({"kernel_size": 3, "pad": 1}, [_X, (2, 3, 5, 5)], 1),
    "Permute": ({"order": [0, 2, 3, 1]}, [_X], 1),
    "Pooling": ({"kernel_size": 2, "stride": 2}, [_X], 1),
    "Power": ({"power": 2.0}, [_X], 1),
    "ReLU": ({}, [_X], 1),
    "Reduction": ({"axis": 1}, [_X], 1),
    "Reshape": ({"shape": [0, -1]}, [_X], 1),
    "Resize": ({"height": 7, "width": 7}, [_X], 1),
    "PositionFeatures": ({"scale": 2.0}, [_X], 1),
    "Scale": ({"axis": 1}, [_X, (4,)], 1),
    "SegAccuracy": ({}, [_X, _LABELS], 1),
    "SegawareConvolution": ({"num_output": 2, "kernel_size": 3, "pad": 1}, [_X, (2, 9, 5, 5)], 1),
    "Sigmoid": ({}, [_X], 1),
    "SigmoidCrossEntropyLoss": ({}, [_X, ("labels", _X, 2)], 1),
    "Slice": ({"axis": 1}, [_X], 2),
    "Softmax": ({}, [_X], 1),
    "SoftmaxWithLoss": ({}, [_X, _LABELS], 1),
    "Split": ({}, [_X], 2),
    "TanH": ({}, [_X], 1),
    "Tile": ({"tiles": 2}, [_X], 1),
}
WITHOUT_GRADIENT_PATHS = {"Input", "DummyData", "Silence"}  # no bottoms, or no tops


def test_every_type_has_a_gradient_sample():
    assert set(GRADIENT_SAMPLES) | WITHOUT_GRADIENT_PATHS == set(TYPES)


@pytest.mark.parametrize("type_name", sorted(GRADIENT_SAMPLES))
def test_gradient_bottoms_say_which_bottoms_autograd_reaches(type_name):
    """Layer.gradient_bottoms (what the backward-need analysis relies on) against autograd:
    a bottom declared True gets a gradient from the tops, one declared False none."""
    import torch

    from layer_helpers import make_spec, run_layer

    params, shapes, n_tops = GRADIENT_SAMPLES[type_name]
    spec = make_spec(type_name, n_bottoms=len(shapes), n_tops=n_tops, **params)
    gen = torch.Generator().manual_seed(0)
    bottoms = []
    for shape in shapes:
        if shape[0] == "labels":
            t = torch.randint(0, shape[2], shape[1], generator=gen).to(torch.float64)
        else:
            t = torch.rand(shape, generator=gen, dtype=torch.float64) + 0.5
        bottoms.append(t.requires_grad_(True))
    tops = [t for t in run_layer(spec, *bottoms) if t.is_floating_point() and t.requires_grad]
    if tops:
        sum(t.sum() for t in tops).backward()
    reached = tuple(b.grad is not None for b in bottoms)
    assert registry.get(type_name).gradient_bottoms(spec) == reached
