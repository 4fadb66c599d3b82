"""The one validation pass over a loaded net, with jsonschema (Draft 2020-12) from the registry.

The net schema says what a file's top level and every layer's common keys look like (a new
top-level section is one entry of :data:`NET_SCHEMA`); each layer type contributes its own
parameter schema (``Layer.params``).  :func:`validate_net` checks every layer of every
phase before any graph is built and turns each into a :class:`LayerDecl` (plain data,
defaults filled in), so that every error can name the file, line, layer and the fix.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import jsonschema

from pacnet import registry
from pacnet.errors import GraphError, Location, PacnetError, SchemaError, did_you_mean
from pacnet.frozen import FrozenDict
from pacnet.load import MarkedDict, where
from pacnet.registry import LayerSpec, NamedBySpec

_STR_OR_LIST = {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}
_BLOB_NAMES = {"oneOf": [{"type": "string", "minLength": 1},
                         {"type": "array", "items": {"type": "string", "minLength": 1}}]}

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
    "bottom": {**_BLOB_NAMES, "description": "input blob name(s)"},
    "top": {**_BLOB_NAMES, "description": "output blob name(s); equal to a bottom = in place"},
    "include": {"oneOf": [RULE, {"type": "array", "items": RULE}],
                "description": "keep the layer only if some rule matches"},
    "exclude": {"oneOf": [RULE, {"type": "array", "items": RULE}],
                "description": "drop the layer if any rule matches"},
    "param": {"oneOf": [PARAM_SPEC, {"type": "array", "items": PARAM_SPEC}],
              "description": "per learnable blob: name (sharing), lr_mult, decay_mult"},
    "loss_weight": {"oneOf": [{"type": "number"}, {"type": "array", "items": {"type": "number"}}],
                    "description": "weight of each top in the total loss"},
    "propagate_down": {"oneOf": [{"type": "boolean"},
                                 {"type": "array", "items": {"type": "boolean"}}],
                       "description": "per bottom: whether gradients flow into it"},
    "description": {"type": "string", "description": "free text, ignored"},
}

#: What an error about a common key suggests writing.
EXAMPLES = {
    "name": "name: conv1",
    "type": "type: Convolution",
    "bottom": "bottom: data, or bottom: [a, b]",
    "top": "top: conv1, or top: [a, b]",
    "include": "include: {phase: train}, or include: [{phase: test, stage: [deploy]}]",
    "exclude": "exclude: {phase: test}, or exclude: [{stage: deploy}]",
    "param": "param: [{lr_mult: 1, decay_mult: 1}, {lr_mult: 2, decay_mult: 0}]",
    "loss_weight": "loss_weight: 1, or one number per top: [1, 0.5]",
    "propagate_down": "propagate_down: [true, false] (one per bottom)",
}

SHAPE = {
    "type": "array",
    "minItems": 1,
    "items": {"oneOf": [{"type": "integer", "minimum": 1},
                        {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*$"}]},
}

_KEY_PATTERN = {"type": "string", "minLength": 1}
_TRANSFORM = {"oneOf": [
    {"const": "reciprocal", "description": "1 / x (a scale stored as its divisor)"},
    {"type": "object", "additionalProperties": False, "required": ["transpose"],
     "properties": {"transpose": {"type": "array", "items": {"type": "integer", "minimum": 0},
                                  "minItems": 1, "description": "permutation of the axes"}}},
    {"type": "object", "additionalProperties": False, "required": ["reshape"],
     "properties": {"reshape": {"type": "array", "items": {"type": "integer", "minimum": -1},
                                "description": "new shape (one -1 is inferred)"}}},
]}

#: ``weights_from:``: the models whose weight files a net takes (read by pacnet.weights).
WEIGHTS_FROM = {
    "type": "object",
    "description": "source name -> {model, rename, ignore, hint}: the models whose weight files "
                   "this net takes and how their names map onto its blobs",
    "additionalProperties": {
        "type": "object",
        "additionalProperties": False,
        "required": ["model"],
        "properties": {
            "model": {"type": "string", "description": "the source model the files come from"},
            "rename": {
                "type": "array",
                "description": "rules, the first match wins; other keys keep their names",
                "items": {
                    "type": "object", "additionalProperties": False, "required": ["from", "to"],
                    "properties": {
                        "from": {**_KEY_PATTERN, "description": "key in the file; '*' is any "
                                                                "run of characters"},
                        "to": {"oneOf": [_KEY_PATTERN, {"type": "array", "items": _KEY_PATTERN,
                                                        "minItems": 1}],
                               "description": "blob(s) of the net, with the same '*'s"},
                        "transform": {"oneOf": [_TRANSFORM, {"type": "array", "items": _TRANSFORM}],
                                      "description": "applied to the value, in order"},
                    }}},
            "ignore": {"type": "array", "items": _KEY_PATTERN,
                       "description": "keys of the files the net has no use for ('*' wildcards)"},
            "hint": {"type": "string", "description": "shown when blobs of the net are missing"},
        },
    },
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
        "weights_from": WEIGHTS_FROM,
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
        hint = err.schema.get("description") or None
    elif err.validator == "enum":
        message = f"{path or 'value'}: {err.instance!r} is not one of {err.validator_value}"
        hint = did_you_mean(str(err.instance), [str(v) for v in err.validator_value])
    else:
        message = f"{path + ': ' if path else ''}{err.message}"
    head = err.absolute_path[0] if err.absolute_path else None
    if layer is not None and head in EXAMPLES and err.validator != "additionalProperties" \
            and not (hint or "").startswith("did you mean"):
        hint = "write " + EXAMPLES[head]
    return SchemaError(message, location=loc, layer=layer, layer_type=layer_type, hint=hint)


def _best(errors: List[jsonschema.ValidationError]) -> jsonschema.ValidationError:
    return jsonschema.exceptions.best_match(errors)


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


# ----------------------------------------------------------------------------- validation

@dataclass(frozen=True)
class Rule:
    """A NetStateRule (one ``include``/``exclude`` entry); None or () = not constrained."""

    phase: Optional[str] = None
    min_level: Optional[int] = None
    max_level: Optional[int] = None
    stage: Tuple[str, ...] = ()
    not_stage: Tuple[str, ...] = ()

    def matches(self, phase: str, level: int, stages: Sequence[str]) -> bool:
        """Caffe's StateMeetsRule: phase equal, level in range, every stage present and no
        not_stage present."""
        return ((self.phase is None or self.phase == phase)
                and (self.min_level is None or level >= self.min_level)
                and (self.max_level is None or level <= self.max_level)
                and all(s in stages for s in self.stage)
                and not any(s in stages for s in self.not_stage))


@dataclass(frozen=True)
class ParamSpec:
    """How one learnable blob trains: sharing ``name``, ``lr_mult``, ``decay_mult``.

    ``lr_mult``/``decay_mult`` are None when not written (they then default to 1, or
    inherit from the owner of a shared blob).
    """

    name: Optional[str] = None
    lr_mult: Optional[float] = None
    decay_mult: Optional[float] = None
    share_mode: str = "STRICT"


@dataclass(frozen=True)
class LayerDecl(NamedBySpec):
    """One layer of the file, validated whatever phase is built (Caffe's LayerParameter).

    ``spec`` is what the layer type sees, with the tops as written (the graph pass adds the
    ``anonymous_tops`` automatic loss tops and the phase).  ``loss_weights`` has one weight
    per top, automatic ones included; ``propagate_down`` one flag per bottom.
    """

    spec: LayerSpec
    include: Tuple[Rule, ...] = ()
    exclude: Tuple[Rule, ...] = ()
    params: Tuple[ParamSpec, ...] = ()
    loss_weights: Tuple[float, ...] = ()
    propagate_down: Tuple[bool, ...] = ()
    anonymous_tops: int = 0
    bottom_locations: Tuple[Optional[Location], ...] = ()
    top_locations: Tuple[Optional[Location], ...] = ()

    def included(self, phase: str, level: int = 0, stages: Sequence[str] = ()) -> bool:
        """Caffe's Net::FilterNet for this layer: some include rule matches, or (without
        include rules) no exclude rule does."""
        if self.include:
            return any(r.matches(phase, level, stages) for r in self.include)
        return not any(r.matches(phase, level, stages) for r in self.exclude)


def validate_net(tree: MarkedDict) -> Tuple[LayerDecl, ...]:
    """The one validation pass: the top level against the net schema, then every layer of
    every phase (its type, keys, rules, wiring, ``param``, ``loss_weight``,
    ``propagate_down``, and the type's own ``check``).  Nothing is filtered by phase here,
    so a mistake in a train-only layer is reported when the test net is built too."""
    errors = list(_net_validator().iter_errors(_plain(tree)))
    if errors:
        raise _error_from(_best(errors), tree, known=list(NET_SCHEMA["properties"]))
    from pacnet.codegen import module_name  # codegen -> graph -> schema: import on use

    layers = tree["layers"]
    decls: List[LayerDecl] = []
    by_name: Dict[str, LayerDecl] = {}
    by_module: Dict[str, LayerDecl] = {}
    for i, layer in enumerate(layers):
        decl = _validate_layer(layer, where(layers, i))
        at = where(layer, "name") or decl.spec.location
        first = by_name.setdefault(decl.name, decl)
        if first is not decl:
            raise GraphError(f"duplicate layer name {decl.name!r}", location=at,
                             hint=f"first used at {_line(first.spec.location)}; layer names "
                                  f"must be unique")
        module = module_name(decl.name)
        first = by_module.setdefault(module, decl)
        if first is not decl:
            raise GraphError(
                f"layers {first.name!r} ({_line(first.spec.location)}) and {decl.name!r} would "
                f"share the module {module!r} (state_dict keys '{module}.<blob>')", location=at,
                layer=decl.name, layer_type=decl.type,
                hint="rename one of them (module names write '.' as '_' and add '_' to names "
                     "a Net already uses, such as forward or code)")
        decls.append(decl)
    return tuple(decls)


def _line(loc: Optional[Location]) -> str:
    return f"line {loc.line}" if loc is not None and loc.line else "an earlier layer"


def _validate_layer(layer: Any, location: Optional[Location]) -> LayerDecl:
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
    if ltype is None or ltype == "":
        raise SchemaError("layer without a 'type'", location=location, layer=name,
                          hint="add 'type: <LayerType>' (see 'pacnet layers')")
    if not isinstance(ltype, str):
        raise SchemaError(f"layer type must be a string, got {ltype!r}",
                          location=where(layer, "type") or location, layer=name,
                          hint="write type: <LayerType> (see 'pacnet layers')")
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
    param_locs = {k: where(layer, k) or location for k in params}
    fill_defaults(params, _type_schema(ltype))
    spec = LayerSpec(name=name, type=ltype, params=FrozenDict(params),
                     bottoms=tuple(_as_list(plain.get("bottom"))),
                     tops=tuple(_as_list(plain.get("top"))), location=location,
                     locations=FrozenDict(param_locs))

    def error(message: str, key: str, hint: Optional[str] = None, at: Optional[Location] = None,
              cls: type = SchemaError) -> PacnetError:
        return cls(message, location=at or where(layer, key) or location, layer=name,
                   layer_type=ltype, hint=hint)

    top_locs = _item_locations(layer, "top", location)
    for j, top in enumerate(spec.tops):
        if top in spec.tops[:j]:
            raise error(f"top {top!r} is listed twice", "top", at=top_locs[j],
                        hint="each top of a layer is a new blob (Caffe: 'produced by multiple "
                             "sources'); give it another name")
    include, exclude = _rules(plain.get("include")), _rules(plain.get("exclude"))
    if include and exclude:
        raise error("a layer may have 'include' or 'exclude' rules, not both", "exclude",
                    hint="Caffe's NetStateRule: keep the include rules, or the exclude rules")
    anonymous = _anonymous_tops(type_obj, len(spec.tops))
    n_tops = len(spec.tops) + anonymous
    _check_arity(type_obj, len(spec.bottoms), n_tops, error)
    decl = LayerDecl(
        spec=spec, include=include, exclude=exclude,
        params=_param_specs(plain.get("param"), type_obj, error),
        loss_weights=_loss_weights(plain.get("loss_weight"), type_obj, n_tops, error),
        propagate_down=_propagate_down(plain.get("propagate_down"), len(spec.bottoms), error),
        anonymous_tops=anonymous,
        bottom_locations=_item_locations(layer, "bottom", location), top_locations=top_locs)
    auto = tuple(f"{name}_top{j}" for j in range(len(spec.tops), n_tops))
    type_obj.check(replace(spec, tops=spec.tops + auto))
    return decl


def _as_list(value: Any) -> List[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def _item_locations(layer: Any, key: str,
                    location: Optional[Location]) -> Tuple[Optional[Location], ...]:
    value = layer.get(key)
    if isinstance(value, list):
        return tuple(where(value, j) or where(layer, key) or location for j in range(len(value)))
    return (where(layer, key) or location,) if value is not None else ()


def _rules(raw_rules: Any) -> Tuple[Rule, ...]:
    rules = []
    for raw in _as_list(raw_rules):
        stage, not_stage = _as_list(raw.get("stage")), _as_list(raw.get("not_stage"))
        phase = raw.get("phase")
        rules.append(Rule(phase=phase.lower() if phase is not None else None,
                          min_level=raw.get("min_level"), max_level=raw.get("max_level"),
                          stage=tuple(stage), not_stage=tuple(not_stage)))
    return tuple(rules)


def _anonymous_tops(type_obj: registry.Layer, n_tops: int) -> int:
    """Caffe's AutoTopBlobs: a loss layer written with fewer tops than it needs gets
    anonymous ones (at least one: the loss)."""
    if not type_obj.loss:
        return 0
    return max(0, max(1, type_obj.tops[0]) - n_tops)


def _check_arity(type_obj: registry.Layer, n_bottoms: int, n_tops: int, error) -> None:
    for what, count, (lo, hi) in (("bottom", n_bottoms, type_obj.bottoms),
                                  ("top", n_tops, type_obj.tops)):
        if count < lo or (hi is not None and count > hi):
            expected = (f"{lo}" if lo == hi else f"at least {lo}" if hi is None
                        else f"{lo} to {hi}")
            raise error(f"takes {expected} {what}(s), got {count}", what, cls=GraphError)


def _finite(values: Sequence[Any], key: str, error) -> None:
    for v in values:
        if v is not None and not math.isfinite(v):
            raise error(f"{key} must be a finite number, got {v}", key)


def _param_specs(raw: Any, type_obj: registry.Layer, error) -> Tuple[ParamSpec, ...]:
    entries = _as_list(raw)
    if len(entries) > len(type_obj.blobs):
        raise error(f"has {len(entries)} 'param' entries but only {len(type_obj.blobs)} learnable "
                    f"blob(s) ({', '.join(type_obj.blobs) or 'none'})", "param",
                    hint="one param entry per learnable blob, in Caffe's blob order")
    specs = tuple(ParamSpec(name=p.get("name"), lr_mult=p.get("lr_mult"),
                            decay_mult=p.get("decay_mult"),
                            share_mode=p.get("share_mode", "STRICT")) for p in entries)
    _finite([s.lr_mult for s in specs] + [s.decay_mult for s in specs], "param", error)
    return specs


def _loss_weights(raw: Any, type_obj: registry.Layer, n_tops: int, error) -> Tuple[float, ...]:
    if raw is None:
        weights = [0.0] * n_tops
        if type_obj.loss and n_tops:
            weights[0] = 1.0
        return tuple(weights)
    values = [float(w) for w in _as_list(raw)]
    if len(values) != n_tops:
        raise error(f"loss_weight has {len(values)} value(s) but the layer has {n_tops} top(s)",
                    "loss_weight", hint="give one weight per top")
    _finite(values, "loss_weight", error)
    return tuple(values)


def _propagate_down(raw: Any, n_bottoms: int, error) -> Tuple[bool, ...]:
    if raw is None:
        return (True,) * n_bottoms
    values = tuple(bool(v) for v in _as_list(raw))
    if len(values) != n_bottoms:
        raise error(f"propagate_down has {len(values)} value(s) but the layer has {n_bottoms} "
                    f"bottom(s)", "propagate_down", hint="give one value per bottom")
    return values


#: Layers already found valid, by type and content (names, bottoms and tops reduced to their
#: form).  Real nets repeat the same layer hundreds of times (ResNet blocks, MSC towers).
_VALID: set = set()


def _validation_key(ltype: str, plain: Mapping[str, Any]) -> str:
    def form(value: Any) -> Any:  # a string's form: empty or not (tuples are never JSON)
        if isinstance(value, str):
            return ("str", bool(value))
        if isinstance(value, list):
            return [("str", bool(v)) if isinstance(v, str) else v for v in value]
        return value

    reduced = {k: (form(v) if k in ("name", "bottom", "top") else v) for k, v in plain.items()}
    return ltype + repr(reduced)


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
