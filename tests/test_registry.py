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
