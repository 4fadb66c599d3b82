"""Validation of net files with jsonschema (Draft 2020-12), assembled from the registry.

The net schema says what a file's top level and every layer's common keys look like;
each layer type contributes its own parameter schema (``Layer.params``).  Validation is
per layer so that every error can name the layer, its line and the fix; defaults from
the schema are filled into the returned parameters.
"""

from __future__ import annotations

import copy
import json
from functools import lru_cache
from typing import Any, Dict, List, Mapping, Optional, Tuple

import jsonschema

from pacnet import registry
from pacnet.errors import Location, SchemaError, did_you_mean
from pacnet.load import MarkedDict, where

_STR_OR_LIST = {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}

RULE = {
    "type": "object",
    "description": "A NetStateRule: the layer is kept when phase, level and stages all match.",
    "properties": {
        "phase": {"enum": ["train", "test", "TRAIN", "TEST"]},
        "min_level": {"type": "integer"},
        "max_level": {"type": "integer"},
        "stage": _STR_OR_LIST,
        "not_stage": _STR_OR_LIST,
    },
    "additionalProperties": False,
}

PARAM_SPEC = {
    "type": "object",
    "description": "Per learnable blob, in blob order: sharing name and learning-rate/decay multipliers.",
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "lr_mult": {"type": "number"},
        "decay_mult": {"type": "number"},
        "share_mode": {"enum": ["STRICT", "PERMISSIVE"]},
    },
    "additionalProperties": False,
}

#: Keys every layer may have, whatever its type.
COMMON_LAYER_KEYS: Dict[str, dict] = {
    "name": {"type": "string", "minLength": 1, "description": "unique layer name"},
    "type": {"type": "string", "minLength": 1, "description": "registered layer type or block name"},
    "bottom": {**_STR_OR_LIST, "description": "input blob name(s)"},
    "top": {**_STR_OR_LIST, "description": "output blob name(s); equal to a bottom = in place"},
    "include": {"oneOf": [RULE, {"type": "array", "items": RULE}],
                "description": "keep the layer only if some rule matches"},
    "exclude": {"oneOf": [RULE, {"type": "array", "items": RULE}],
                "description": "drop the layer if any rule matches"},
    "param": {"oneOf": [PARAM_SPEC, {"type": "array", "items": PARAM_SPEC}],
              "description": "per learnable blob: name (sharing), lr_mult, decay_mult"},
    "loss_weight": {"oneOf": [{"type": "number"}, {"type": "array", "items": {"type": "number"}}],
                    "description": "weight of each top in the total loss"},
    "propagate_down": {"oneOf": [{"type": "boolean"}, {"type": "array", "items": {"type": "boolean"}}],
                       "description": "per bottom: whether gradients flow into it"},
    "description": {"type": "string", "description": "free text, ignored"},
}

SHAPE = {
    "type": "array",
    "minItems": 1,
    "items": {"oneOf": [{"type": "integer", "minimum": 1},
                        {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*$"}]},
}

NET_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "pacnet_version": {"const": 1},
        "description": {"type": "string"},
        "inputs": {"type": "object", "additionalProperties": SHAPE,
                   "description": "graph inputs: blob -> shape (ints or symbolic dims such as N, H)"},
        "dims": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 1},
                 "description": "default values of symbolic dims"},
        "layers": {"type": "array", "items": {"type": "object"}, "minItems": 1},
        "solver": {"type": "object", "description": "training settings (see pacnet.engine.solver)"},
        "data": {"description": "data set settings for pacnet train/test (see pacnet.engine.data)"},
        "outputs": {"type": "array", "items": {"type": "string"},
                    "description": "optional: blobs to return (default: every unconsumed blob)"},
    },
    "required": ["layers"],
    "additionalProperties": False,
}


def _error_from(err: jsonschema.ValidationError, container: Any, layer: Optional[str] = None,
                layer_type: Optional[str] = None, known: Optional[List[str]] = None) -> SchemaError:
    """Turn a jsonschema error into a located, readable SchemaError."""
    node, loc = container, where(container)
    for part in err.absolute_path:
        loc = where(node, part) or loc
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            break
    path = ".".join(str(p) for p in err.absolute_path)
    hint = None
    if err.validator == "additionalProperties":
        extras = [k for k in err.instance if k not in (err.schema.get("properties") or {})]
        key = extras[0] if extras else "?"
        loc = where(node, key) or loc
        choices = known if known is not None and not err.absolute_path else list(err.schema.get("properties") or {})
        hint = did_you_mean(key, choices) or ("allowed keys: " + ", ".join(sorted(choices)))
        message = f"unknown key {key!r}" + (f" in {path}" if path else "")
    elif err.validator == "required":
        message = err.message.replace("is a required property", "is required")
        hint = "add it to the layer" if layer else None
    elif err.validator in ("oneOf", "anyOf"):
        message = f"{path or 'value'}: {err.instance!r} has the wrong type or form"
        descr = (err.schema.get("description") or "")
        hint = descr or None
    elif err.validator == "enum":
        message = f"{path or 'value'}: {err.instance!r} is not one of {err.validator_value}"
        hint = did_you_mean(str(err.instance), [str(v) for v in err.validator_value])
    else:
        message = f"{path + ': ' if path else ''}{err.message}"
    return SchemaError(message, location=loc, layer=layer, layer_type=layer_type, hint=hint)


def _best(errors: List[jsonschema.ValidationError]) -> jsonschema.ValidationError:
    return jsonschema.exceptions.best_match(errors)


def validate_net(tree: MarkedDict) -> None:
    """Validate the top level of a loaded net (layers individually by :func:`validate_layer`)."""
    errors = list(_net_validator().iter_errors(_plain(tree)))
    if errors:
        err = _best(errors)
        # Layer bodies are validated individually; only report top-level problems here.
        raise _error_from(err, tree, known=list(NET_SCHEMA["properties"]))


@lru_cache(maxsize=None)
def _net_validator():
    return jsonschema.Draft202012Validator(NET_SCHEMA)


@lru_cache(maxsize=None)
def _layer_validator(type_name: str):
    return jsonschema.Draft202012Validator(layer_schema(type_name))


def layer_schema(type_name: str) -> dict:
    """Full schema of one layer of ``type_name``: common keys plus the type's own params."""
    layer = registry.get(type_name)
    own = layer.schema()
    props = dict(COMMON_LAYER_KEYS)
    for key, value in own["properties"].items():
        if key in props:
            raise RuntimeError(f"layer type {type_name} redefines the common key {key!r}")
        props[key] = value
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "properties": props,
        "required": ["name", "type"] + list(own["required"]),
        "additionalProperties": False,
    }


def net_schema() -> dict:
    """The whole net schema with every registered type's parameters (for editors/docs)."""
    schema = copy.deepcopy(NET_SCHEMA)
    branches = []
    for name in sorted(registry.types()):
        branches.append({"if": {"properties": {"type": {"const": name}}},
                         "then": layer_schema(name)})
    schema["properties"]["layers"]["items"] = {"allOf": branches}
    return schema


def validate_layer(layer: MarkedDict, location: Optional[Location]) -> Tuple[Dict[str, Any], Dict[str, Location]]:
    """Validate one layer mapping; return (its own params with defaults, their locations)."""
    if not isinstance(layer, dict):
        raise SchemaError("each entry of 'layers' must be a mapping (name, type, bottom, top, ...)",
                          location=location)
    name = layer.get("name")
    ltype = layer.get("type")
    if name is None or name == "":
        raise SchemaError("layer without a 'name'", location=location, hint="add 'name: <unique name>'")
    if not isinstance(name, str):
        raise SchemaError(f"layer name {name!r} is {type(name).__name__}, not text",
                          location=where(layer, "name") or location,
                          hint=f"quote it: name: \"{name}\"")
    if not isinstance(ltype, str) or not ltype:
        raise SchemaError("layer without a 'type'", location=location, layer=name,
                          hint="add 'type: <LayerType>' (see 'pacnet layers')")
    type_obj = registry.get(ltype, location=where(layer, "type") or location, layer=name)
    plain = _plain(layer)
    key = _validation_key(ltype, plain)
    if key not in _VALID:
        errors = list(_layer_validator(ltype).iter_errors(plain))
        if errors:
            known = list(COMMON_LAYER_KEYS) + list(type_obj.params)
            raise _error_from(_best(errors), layer, layer=name, layer_type=ltype, known=known)
        _VALID.add(key)
    params = {k: v for k, v in plain.items() if k not in COMMON_LAYER_KEYS}
    locs = {k: where(layer, k) or location for k in params}
    fill_defaults(params, _type_schema(ltype))
    return params, locs


#: Layers already found valid, by type and content (names, bottoms and tops reduced to their
#: form).  Real nets repeat the same layer hundreds of times (ResNet blocks, MSC towers).
_VALID: set = set()


def _validation_key(ltype: str, plain: Mapping[str, Any]) -> str:
    def form(value: Any) -> Any:
        return "" if isinstance(value, str) else (["" if isinstance(v, str) else v for v in value]
                                                    if isinstance(value, list) else value)

    reduced = {k: (form(v) if k in ("name", "bottom", "top") else v) for k, v in plain.items()}
    return ltype + json.dumps(reduced, sort_keys=True, default=repr)


@lru_cache(maxsize=None)
def _type_schema(ltype: str) -> dict:
    return registry.get(ltype).schema()


def fill_defaults(values: Dict[str, Any], schema: Mapping[str, Any]) -> Dict[str, Any]:
    """Fill ``default``s of ``schema``'s properties into ``values`` (recursively for objects)."""
    for key, sub in (schema.get("properties") or {}).items():
        if key not in values and "default" in sub:
            values[key] = copy.deepcopy(sub["default"])
        if isinstance(values.get(key), dict) and sub.get("properties"):
            fill_defaults(values[key], sub)
    return values


def _plain(value: Any) -> Any:
    """Marked containers -> plain dict/list (jsonschema and layers see plain data)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value
