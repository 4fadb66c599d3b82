"""Validate a config section (``solver:``, ``data:``) against its JSON schema.

Draft 2020-12 through :mod:`jsonschema`; the first error becomes a
:class:`~pacnet.errors.SchemaError` naming the dotted field path (``solver.base_lr``),
what was expected and what was found, with the field's description (or a
did-you-mean for unknown keys) as the hint.  Defaults written in the schema are filled
into a copy of the input, recursively through nested object properties.
"""

from __future__ import annotations

import copy
import re
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Sequence, Tuple

import jsonschema
from jsonschema import Draft202012Validator

from pacnet.errors import Location, SchemaError, did_you_mean

# Given a key path (("solver", "base_lr")), return where the user wrote it, if known.
Locate = Callable[[Sequence[Any]], Optional[Location]]

_TYPE_WORDS = {
    "number": "a number", "integer": "an integer", "string": "a string",
    "boolean": "true or false", "array": "a list", "object": "a mapping", "null": "null",
}


def kind_of(value: Any) -> str:
    """What a YAML value is, in the user's words: 'a list', 'a string', ..."""
    if isinstance(value, bool):
        return "true or false"
    for kind, word in ((Mapping, "a mapping"), ((list, tuple), "a list"), (str, "a string"),
                       ((int, float), "a number")):
        if isinstance(value, kind):
            return word
    return "null" if value is None else type(value).__name__


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return repr(value) if len(value) < 60 else repr(value[:57] + "...")
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)}"
    if isinstance(value, dict):
        return "a mapping"
    if value is None:
        return "null"
    return type(value).__name__


def dotted(path: Iterable[Any]) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _subschema(schema: Mapping[str, Any], path: Sequence[Any]) -> Mapping[str, Any]:
    node: Mapping[str, Any] = schema
    for part in path:
        if isinstance(part, int):
            node = node.get("items", {}) if isinstance(node.get("items"), dict) else {}
        else:
            node = node.get("properties", {}).get(part, {})
    return node


def _message(err: jsonschema.ValidationError, schema: Mapping[str, Any]) -> tuple:
    """(message, hint, path) for one jsonschema error, in the user's words."""
    path = list(err.absolute_path)
    sub = _subschema(schema, path)
    hint = sub.get("description")
    kind = err.validator
    if kind == "type":
        want = err.validator_value
        want = " or ".join(_TYPE_WORDS.get(w, w) for w in (want if isinstance(want, list) else [want]))
        return f"expected {want}, got {_describe(err.instance)}", hint, path
    if kind == "enum":
        choices = ", ".join(repr(c) for c in err.validator_value)
        close = did_you_mean(err.instance, [str(c) for c in err.validator_value])
        return f"must be one of {choices}, got {_describe(err.instance)}", close or hint, path
    if kind == "additionalProperties":
        allowed = list(err.schema.get("properties", {}))
        extra = sorted(set(err.instance) - set(allowed))
        key = extra[0] if extra else "?"
        close = did_you_mean(key, allowed)
        return (f"unknown field {key!r}", close or ("known fields: " + ", ".join(sorted(allowed))),
                path + [key])
    if kind == "required":
        missing = [k for k in err.validator_value if k not in err.instance]
        key = missing[0] if missing else "?"
        return "is required but missing", _subschema(err.schema, [key]).get("description"), path + [key]
    if kind in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"):
        words = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<"}
        return f"must be {words[kind]} {err.validator_value}, got {_describe(err.instance)}", hint, path
    if kind == "minItems":
        return f"needs at least {err.validator_value} entries, got {len(err.instance)}", hint, path
    if kind == "maxItems":
        return f"takes at most {err.validator_value} entries, got {len(err.instance)}", hint, path
    return err.message, hint, path


def fill_defaults(instance: Any, schema: Mapping[str, Any]) -> Any:
    """Return a deep copy of ``instance`` with the schema's property defaults filled in."""
    out = copy.deepcopy(instance)
    _fill(out, schema)
    return out


def _fill(node: Any, schema: Mapping[str, Any]) -> None:
    if not isinstance(node, dict):
        return
    for key, sub in schema.get("properties", {}).items():
        if key not in node and "default" in sub:
            node[key] = copy.deepcopy(sub["default"])
        if key in node:
            _fill(node[key], sub)


def marked_locator(container: Any, root: Sequence[Any] = ()) -> Optional[Locate]:
    """A ``locate`` for a tree loaded by :mod:`pacnet.load` (containers with ``loc``/``locs``):
    the location of the deepest key of the path that was written, else None.  Returns None
    when ``container`` carries no marks."""
    if getattr(container, "locs", None) is None and getattr(container, "loc", None) is None:
        return None
    root = tuple(root)

    def locate(path: Sequence[Any]) -> Optional[Location]:
        rel = tuple(path)[len(root):] if tuple(path)[:len(root)] == root else tuple(path)
        node, found = container, getattr(container, "loc", None)
        for key in rel:
            locs = getattr(node, "locs", None) or {}
            if key in locs:
                found = locs[key]
            try:
                node = node[key]
            except (KeyError, IndexError, TypeError):
                break
            found = getattr(node, "loc", None) or found
        return found

    return locate


_TEMPLATE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _unset_template(value: Any, path: Tuple[Any, ...]) -> Optional[Tuple[Tuple[Any, ...], str]]:
    """(path, name) of the first string in ``value`` still holding a ``${NAME}``."""
    if isinstance(value, str):
        m = _TEMPLATE.search(value)
        return (path, m.group(1)) if m else None
    items = value.items() if isinstance(value, Mapping) else (
        enumerate(value) if isinstance(value, (list, tuple)) else ())
    for key, item in items:
        found = _unset_template(item, path + (key,))
        if found:
            return found
    return None


def validate(instance: Any, schema: Mapping[str, Any], *, root: Sequence[Any] = (),
             locate: Optional[Locate] = None, source: Optional[str] = None) -> Dict[str, Any]:
    """Check ``instance`` against ``schema``; return a copy with defaults filled.

    ``root`` prefixes field paths in messages (``("solver",)``); ``locate`` maps a full
    key path to a :class:`Location`; ``source`` names the file when ``locate`` is absent
    or does not know the path.
    """
    if locate is None:
        locate = marked_locator(instance, root)
    unset = _unset_template(instance, ())
    if unset is not None:
        path, name = unset
        full = list(root) + list(path)
        raise SchemaError(f"{dotted(full)}: the template variable ${{{name}}} has no value",
                          hint=f"pass --var {name}=VALUE (or set it under 'vars:')",
                          location=where(full, locate, source))
    validator = Draft202012Validator(schema)
    errors = list(validator.iter_errors(instance))
    if errors:
        # Report the error deepest in the document first: it names the actual field.
        err = max(errors, key=lambda e: (len(e.absolute_path), -len(list(e.context or ()))))
        err = jsonschema.exceptions.best_match([err]) or err
        message, hint, path = _message(err, schema)
        full = list(root) + path
        raise SchemaError(f"{dotted(full) or 'config'}: {message}", hint=hint,
                          location=where(full, locate, source))
    return fill_defaults(instance, schema)


def where(path: Sequence[Any], locate: Optional[Locate], source: Optional[str]) -> Optional[Location]:
    """The location of ``path`` via ``locate``, else the file ``source``, else None."""
    loc = locate(tuple(path)) if locate is not None else None
    if loc is None and source is not None:
        loc = Location(file=source)
    return loc


def error(path: Sequence[Any], message: str, *, hint: Optional[str] = None,
          locate: Optional[Locate] = None, source: Optional[str] = None) -> SchemaError:
    """A :class:`SchemaError` about the field at ``path`` (a semantic check)."""
    return SchemaError(f"{dotted(path)}: {message}", hint=hint, location=where(path, locate, source))
