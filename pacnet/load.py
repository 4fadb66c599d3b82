"""Load a net description into plain data that remembers where each value was written.

``load(source)`` accepts a YAML path, a ``.prototxt`` path (via :mod:`pacnet.caffe_import`)
or a dict, and returns a :class:`MarkedDict` tree: ordinary ``dict``/``list`` subclasses
whose ``loc`` / ``locs`` attributes hold the :class:`~pacnet.errors.Location` of the
container and of each key or item.  Later passes use :func:`where` to point errors at the
exact line.

This pass also resolves ``_base_`` inheritance (deep merge; layers merged by name) and
the ``blocks:`` templates (instantiated with ``${arg}`` substitution and name prefixing),
substitutes ``${VAR}`` template variables, and applies ``--set key=value`` overrides.
"""

from __future__ import annotations

import copy
import os
import re
import warnings
from typing import Any, Dict, Iterable, List, Mapping, Optional, Set, Tuple, Union

import yaml

from pacnet.errors import LoadError, Location, SchemaError, UnusedVariableWarning, did_you_mean


class MarkedDict(dict):
    """A dict that knows where it and each of its keys were written."""

    loc: Optional[Location] = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.locs: Dict[Any, Location] = {}

    def __deepcopy__(self, memo):
        new = MarkedDict((k, copy.deepcopy(v, memo)) for k, v in self.items())
        new.loc, new.locs = self.loc, dict(self.locs)
        return new


class MarkedList(list):
    """A list that knows where it and each of its items were written."""

    loc: Optional[Location] = None

    def __init__(self, *args):
        super().__init__(*args)
        self.locs: Dict[int, Location] = {}

    def __deepcopy__(self, memo):
        new = MarkedList(copy.deepcopy(v, memo) for v in self)
        new.loc, new.locs = self.loc, dict(self.locs)
        return new


def where(container: Any, key: Any = None) -> Optional[Location]:
    """The location of ``container[key]`` (or of the container), if known."""
    if key is not None:
        locs = getattr(container, "locs", None) or {}
        if key in locs:
            return locs[key]
    return getattr(container, "loc", None)


def mark(value: Any, loc: Optional[Location]) -> Any:
    """Wrap plain dicts/lists (recursively) so they carry ``loc``; used for dict sources."""
    if isinstance(value, Mapping) and not isinstance(value, MarkedDict):
        out = MarkedDict((k, mark(v, loc)) for k, v in value.items())
        out.loc = loc
        out.locs = {k: loc for k in out}
        return out
    if isinstance(value, list) and not isinstance(value, MarkedList):
        out = MarkedList(mark(v, loc) for v in value)
        out.loc = loc
        out.locs = {i: loc for i in range(len(out))}
        return out
    return value


# ----------------------------------------------------------------------------- YAML

#: libyaml's parser when PyYAML was built with it (several times faster), else pure Python.
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _yaml_to_marked(text: str, filename: str) -> Any:
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
    except yaml.MarkedYAMLError as err:
        m = err.problem_mark or err.context_mark
        loc = Location(filename, m.line + 1, m.column + 1) if m else Location(filename)
        raise LoadError(f"invalid YAML: {err.problem or err.context}", location=loc,
                        hint="check indentation, colons and brackets around this line") from None
    except yaml.YAMLError as err:
        raise LoadError(f"invalid YAML: {err}", location=Location(filename)) from None
    if node is None:
        raise LoadError("the file is empty", location=Location(filename),
                        hint="a net file needs at least 'layers:' (see the README, 'The net "
                             "format')")

    def at(n) -> Location:
        return Location(filename, n.start_mark.line + 1, n.start_mark.column + 1)

    def convert(n) -> Any:
        if isinstance(n, yaml.MappingNode):
            loader.flatten_mapping(n)  # YAML merge keys '<<'
            out = MarkedDict()
            out.loc = at(n)
            for key_node, value_node in n.value:
                key = loader.construct_object(key_node, deep=True)
                if not isinstance(key, (str, int, float, bool)):
                    raise LoadError("mapping keys must be plain scalars", location=at(key_node))
                if key in out:
                    raise LoadError(f"duplicate key {key!r}", location=at(key_node),
                                    hint=f"it was first given at line {out.locs[key].line}")
                out[key] = convert(value_node)
                out.locs[key] = at(key_node)
            return out
        if isinstance(n, yaml.SequenceNode):
            out = MarkedList()
            out.loc = at(n)
            for i, item in enumerate(n.value):
                out.append(convert(item))
                out.locs[i] = at(item)
            return out
        try:
            return loader.construct_object(n, deep=True)
        except yaml.YAMLError as err:
            raise LoadError(f"invalid YAML value: {err}", location=at(n)) from None

    try:
        return convert(node)
    finally:
        loader.dispose()


def zoo_path(name: str) -> Optional[str]:
    """The installed zoo file for ``name`` (e.g. ``deeplab/deeplab_v2_resnet101``), if any."""
    import pacnet.nets

    root = os.path.dirname(pacnet.nets.__file__)
    for candidate in (name, name + ".yaml"):
        path = os.path.join(root, candidate)
        if os.path.isfile(path):
            return path
    return None


def zoo_names() -> List[str]:
    """Every net in the installed zoo, as ``family/name`` (without ``.yaml``)."""
    import pacnet.nets

    root = os.path.dirname(pacnet.nets.__file__)
    names = []
    for folder, _, files in os.walk(root):
        for f in files:
            if f.endswith(".yaml") and not os.path.relpath(folder, root).startswith("common"):
                names.append(os.path.relpath(os.path.join(folder, f), root)[:-5])
    return sorted(names)


def read_yaml(path: str) -> Any:
    """Parse a YAML file into a marked tree; missing/unreadable files are LoadErrors.

    A path that does not exist but names a zoo net (``deeplab/deeplab_v2_resnet101``) loads
    that net from the installed zoo."""
    if not os.path.exists(path) and not os.path.isabs(path):
        path = zoo_path(path) or path
    try:
        with open(path, "r", encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        hint = did_you_mean(path.removesuffix(".yaml"), zoo_names())
        raise LoadError(f"file not found: {path}", hint=hint or "check the path, or give a zoo "
                        "name such as deeplab/deeplab_v2_resnet101") from None
    except IsADirectoryError:
        raise LoadError(f"{path} is a directory, expected a net file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise LoadError(f"cannot read {path}: {err}") from None
    return _yaml_to_marked(text, path)


# ----------------------------------------------------------------------------- _base_

def _merge(base: Any, override: Any) -> Any:
    """Deep-merge ``override`` into ``base``: dicts recursively (``_delete_: true`` replaces;
    where there is nothing yet, the marker stays for the next base: :func:`_settle_deletes`),
    ``layers`` lists by layer name (same name = merge, ``_delete_: true`` = drop, new =
    append; a name dropped earlier in the same list is new again), everything else
    replaced."""
    if isinstance(override, dict) and override.get("_delete_"):  # replace (also where nothing is)
        out = copy.deepcopy(override)
        del out["_delete_"]
        return out
    if isinstance(base, dict) and isinstance(override, dict):
        out = copy.deepcopy(base)
        for key, value in override.items():
            if key == "layers" and isinstance(out.get(key), list) and isinstance(value, list):
                out[key] = _merge_layers(out[key], value)
            elif key in out:
                out[key] = _merge(out[key], value)
            else:
                out[key] = copy.deepcopy(value)  # a _delete_ in it waits for a later base
            if isinstance(out, MarkedDict) and isinstance(override, MarkedDict) and key in override.locs:
                out.locs[key] = override.locs[key]
        return out
    return copy.deepcopy(override)


def _merge_layers(base: List[Any], override: List[Any]) -> List[Any]:
    out = copy.deepcopy(base)
    index = {l["name"]: i for i, l in enumerate(out) if isinstance(l, dict)
             and isinstance(l.get("name"), str)}
    for j, layer in enumerate(override):
        name = layer.get("name") if isinstance(layer, dict) else None
        if isinstance(name, str) and name in index:
            i = index[name]
            if layer.get("_delete_"):
                out[i] = None
                del index[name]  # the name is free again: a later entry adds a new layer
            else:
                out[i] = _merge(out[i], layer)
        else:
            out.append(copy.deepcopy(layer))
            if isinstance(out, MarkedList) and isinstance(override, MarkedList):
                out.locs[len(out) - 1] = override.locs.get(j)
    kept = MarkedList()
    kept.loc = getattr(out, "loc", None)
    for i, layer in enumerate(out):
        if layer is not None:
            kept.locs[len(kept)] = getattr(out, "locs", {}).get(i)
            kept.append(layer)
    return kept


def _settle_deletes(tree: Any) -> None:
    """After every base is merged: a ``_delete_`` that found nothing to replace is dropped
    (the value stands as written); a layer ``{name, _delete_: true}`` that found no layer of
    that name is an error (a misspelt name would otherwise delete nothing, silently)."""
    if isinstance(tree, dict):
        tree.pop("_delete_", None)
        for key, value in tree.items():
            if key == "layers" and isinstance(value, list):
                for i, layer in enumerate(value):
                    if isinstance(layer, dict) and layer.get("_delete_"):
                        raise SchemaError(f"layer {layer.get('name')!r} is marked _delete_ but no "
                                          f"base has a layer of that name",
                                          location=where(value, i),
                                          hint="check the name against the base's layers")
                    _settle_deletes(layer)
            else:
                _settle_deletes(value)
    elif isinstance(tree, list):
        for item in tree:
            _settle_deletes(item)


def _load_with_bases(path: str, seen: Tuple[str, ...] = ()) -> Any:
    if not os.path.exists(path) and not os.path.isabs(path):
        path = zoo_path(path) or path
    real = os.path.realpath(path)
    if real in seen:
        chain = " -> ".join(list(seen) + [real])
        raise LoadError(f"_base_ inheritance loops: {chain}", location=Location(path))
    tree = read_yaml(path)
    if not isinstance(tree, dict):
        raise SchemaError("a net file must be a mapping with 'layers:' at the top level",
                          location=where(tree) or Location(path))
    bases = tree.pop("_base_", None)
    if bases is None:
        return tree
    base_loc = where(tree, "_base_")
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise SchemaError("_base_ must be a path or a list of paths", location=base_loc)
    merged: Any = MarkedDict()
    for base in bases:
        base_path = base if os.path.isabs(base) else os.path.join(os.path.dirname(path), base)
        if not os.path.isfile(base_path):
            raise LoadError(f"_base_ file not found: {base!r}", location=base_loc,
                            hint="paths in _base_ are relative to the file that names them")
        merged = _merge(merged, _load_with_bases(base_path, seen + (real,)))
    return _merge(merged, tree)


# ----------------------------------------------------------------------------- ${VAR}

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def substitute(value: Any, env: Mapping[str, Any], missing: Dict[str, Optional[Location]],
               loc: Optional[Location] = None, used: Optional[Set[str]] = None) -> Any:
    """Replace ``${NAME}`` in every string of ``value``.

    A string that is exactly ``${NAME}`` takes the value itself (keeping its type);
    ``${NAME}`` inside a longer string is formatted into it.  Unknown names are
    collected in ``missing`` (name -> first location) and left as they are; the names
    substituted are added to ``used`` when given.
    """
    if isinstance(value, str):
        whole = _VAR.fullmatch(value)
        if whole:
            name = whole.group(1)
            if name in env:
                if used is not None:
                    used.add(name)
                return copy.deepcopy(env[name])
            missing.setdefault(name, loc)
            return value

        def repl(m: "re.Match[str]") -> str:
            if m.group(1) in env:
                if used is not None:
                    used.add(m.group(1))
                return str(env[m.group(1)])
            missing.setdefault(m.group(1), loc)
            return m.group(0)

        return _VAR.sub(repl, value)
    if isinstance(value, dict):
        out = value.__class__()
        if isinstance(value, MarkedDict):
            out.loc, out.locs = value.loc, dict(value.locs)
        for k, v in value.items():
            out[k] = substitute(v, env, missing, where(value, k) or loc, used)
        return out
    if isinstance(value, list):
        out = value.__class__()
        if isinstance(value, MarkedList):
            out.loc, out.locs = value.loc, dict(value.locs)
        for i, v in enumerate(value):
            out.append(substitute(v, env, missing, where(value, i) or loc, used))
        return out
    return value


def warn_unused_vars(given: Iterable[str], used: Iterable[str],
                     location: Optional[Location]) -> None:
    """Warn (:class:`~pacnet.errors.UnusedVariableWarning`, an error in the CLI) about
    template variables given that no ``${NAME}`` of the file uses: a misspelt name would
    otherwise be ignored without a word."""
    used = set(used)
    unused = [name for name in given if name not in used]
    if not unused:
        return
    close = [h for h in (did_you_mean(n, sorted(used)) for n in unused) if h]
    listed = ", ".join(unused)
    warnings.warn(UnusedVariableWarning(
        f"template variable{'s' if len(unused) > 1 else ''} {listed} given, but no ${{...}} in "
        f"the net uses {'them' if len(unused) > 1 else 'it'}", location=location,
        hint="; ".join(close) if close else (f"the net uses: {', '.join(sorted(used))}" if used
                                             else "this net has no ${...} template variables")),
        stacklevel=4)


def _typed(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        return value
    return parsed if isinstance(parsed, (int, float, bool, str)) else value


def _missing_error(missing: Mapping[str, Optional[Location]], what: str) -> LoadError:
    listed = ", ".join(f"{n} (line {l.line})" if l and l.line else n for n, l in missing.items())
    first = next(iter(missing.values()))
    return LoadError(f"unset {what}: {listed}", location=first,
                     hint="pass --var NAME=VALUE (or vars={...}), or add them under 'vars:'")


# ----------------------------------------------------------------------------- blocks

_BLOCK_DEPTH_LIMIT = 16


def _as_list(value: Any) -> List[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def expand_blocks(layers: List[Any], blocks: Mapping[str, Any], depth: int = 0) -> MarkedList:
    """Instantiate every layer whose ``type`` names a block, recursively.

    A block is ``{args: {name: default-or-null}, layers: [...]}``.  An instance is a layer
    ``{name, type: <block>, bottom, top, <arg>: value...}``.  Inside the block ``${arg}``,
    ``${name}``, ``${bottom}``/``${bottom0}``.., ``${top}``/``${top0}``.. are substituted.
    Plain layer and top names are local: they become ``<instance>/<name>``.  Names
    written with substitutions (``"${name}_branch1"``, ``"${top}"``) are used as they
    come out, which is how a block reproduces Caffe's naming schemes.
    """
    out = MarkedList()
    out.loc = getattr(layers, "loc", None)
    for i, layer in enumerate(layers):
        loc = where(layers, i)
        ltype = layer.get("type") if isinstance(layer, dict) else None
        if not isinstance(ltype, str) or ltype not in blocks:
            out.locs[len(out)] = loc
            out.append(layer)
            continue
        if depth >= _BLOCK_DEPTH_LIMIT:
            raise SchemaError(f"blocks nest deeper than {_BLOCK_DEPTH_LIMIT} levels (a block "
                              f"that instantiates itself?)", location=loc, layer=layer.get("name"))
        for inner in _instantiate(layer, blocks[ltype], ltype, loc):
            expanded = expand_blocks(MarkedList([inner]), blocks, depth + 1) if (
                isinstance(inner.get("type"), str) and inner.get("type") in blocks) else [inner]
            for item in expanded:
                out.locs[len(out)] = where(item) or loc
                out.append(item)
    return out


def _instantiate(instance: Mapping[str, Any], block: Mapping[str, Any], block_name: str,
                 loc: Optional[Location]) -> List[Any]:
    name = instance.get("name")
    if not isinstance(name, str) or not name:
        raise SchemaError(f"an instance of block {block_name!r} needs a 'name'", location=loc)
    declared = dict(block.get("args") or {})
    reserved = {"name", "type", "bottom", "top"}
    given = {k: v for k, v in instance.items() if k not in reserved}
    for key in given:
        if key not in declared:
            hint = did_you_mean(key, declared) or f"block {block_name!r} takes: {', '.join(declared) or 'no arguments'}"
            raise SchemaError(f"unknown argument {key!r} for block {block_name!r}",
                              location=where(instance, key) or loc, layer=name, hint=hint)
    env: Dict[str, Any] = {}
    for key, default in declared.items():
        if key in given:
            env[key] = given[key]
        elif default is None:
            raise SchemaError(f"block {block_name!r} needs argument {key!r}", location=loc,
                              layer=name, hint=f"add '{key}: <value>' to layer {name!r}")
        else:
            env[key] = default
    bottoms, tops = _as_list(instance.get("bottom")), _as_list(instance.get("top"))
    env["name"] = name
    env["bottom"] = bottoms[0] if len(bottoms) == 1 else bottoms
    env["top"] = tops[0] if len(tops) == 1 else tops
    for j, b in enumerate(bottoms):
        env[f"bottom{j}"] = b
    for j, t in enumerate(tops):
        env[f"top{j}"] = t

    raw = block.get("layers") or []
    # Names written with ${...} (e.g. "${name}_branch2a") are used as substituted; plain
    # names are local to the instance and get its prefix.
    templated_names = [isinstance(l.get("name"), str) and "${" in l["name"] for l in raw]
    templated_tops = {t for l in raw for t in _as_list(l.get("top")) if isinstance(t, str) and "${" in t}
    missing: Dict[str, Optional[Location]] = {}
    body = substitute(copy.deepcopy(raw), env, missing)
    # Names the block leaves unset are global template variables, resolved later.
    local = set()
    for layer in raw:
        for t in _as_list(layer.get("top")):
            if isinstance(t, str) and t not in templated_tops:
                local.add(t)

    def rename(blob: Any) -> Any:
        return f"{name}/{blob}" if isinstance(blob, str) and blob in local else blob

    for layer, templated in zip(body, templated_names):
        lname = layer.get("name")
        if isinstance(lname, str) and not templated:
            layer["name"] = f"{name}/{lname}"
        for key in ("bottom", "top"):
            if key in layer:
                value = layer[key]
                layer[key] = [rename(b) for b in value] if isinstance(value, list) else rename(value)
    return list(body)


# ----------------------------------------------------------------------------- overrides

def parse_assignment(text: str) -> Tuple[str, Any]:
    """``"a.b=3"`` -> ``("a.b", 3)``; the value is parsed as YAML (so 3 is an int)."""
    if "=" not in text:
        raise SchemaError(f"expected KEY=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise SchemaError(f"empty key in {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_overrides(tree: MarkedDict, overrides: Mapping[str, Any]) -> None:
    """Set dotted keys in ``tree``; ``layers.<layer name>.<key>`` addresses a layer by name.

    Layer names may contain dots or slashes, so the layer part is matched against the
    known names greedily.
    """
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        if parts[0] == "layers" and len(parts) >= 3:
            rest = ".".join(parts[1:])
            layers = tree.get("layers") or []
            names = [l.get("name") for l in layers if isinstance(l, dict)]
            match = max((n for n in names if isinstance(n, str) and rest.startswith(n + ".")),
                        key=len, default=None)
            if match is None:
                hint = did_you_mean(parts[1], names) or "the part after 'layers.' must be a layer name"
                raise SchemaError(f"--set {dotted}: no layer named {parts[1]!r}", hint=hint)
            target = next(l for l in layers if isinstance(l, dict) and l.get("name") == match)
            _set_path(target, rest[len(match) + 1:].split("."), value, dotted)
        else:
            _set_path(tree, parts, value, dotted)


def _set_path(node: Any, parts: List[str], value: Any, dotted: str) -> None:
    for part in parts[:-1]:
        if not isinstance(node, dict):
            raise SchemaError(f"--set {dotted}: {part!r} is not inside a mapping")
        child = node.get(part)
        if child is None:
            child = MarkedDict()
            node[part] = child
        node = child
    if not isinstance(node, dict):
        raise SchemaError(f"--set {dotted}: cannot set a key inside a non-mapping value")
    node[parts[-1]] = mark(value, Location("--set"))
    if isinstance(node, MarkedDict):
        node.locs[parts[-1]] = Location("--set")


# ----------------------------------------------------------------------------- entry

Source = Union[str, "os.PathLike[str]", Mapping[str, Any]]


def load(source: Source, *, vars: Optional[Mapping[str, Any]] = None,
         overrides: Optional[Mapping[str, Any]] = None) -> MarkedDict:
    """Load ``source`` (YAML path, prototxt path or dict) into a fully expanded marked tree.

    Steps: read (+ ``_base_``) -> expand ``blocks`` -> substitute ``${VAR}`` (file
    ``vars:`` overridden by ``vars``) -> apply ``overrides`` (dotted keys).
    """
    given = dict(vars or {})
    if isinstance(source, Mapping):
        tree = mark(copy.deepcopy(dict(source)), Location("<dict>"))
    else:
        path = os.fspath(source)
        if path.endswith(".prototxt") or path.endswith(".pt.txt"):
            from pacnet.caffe_import import load_prototxt

            net, marks = load_prototxt(path, vars=given)  # substituted (and checked) as parsed
            tree = _apply_path_marks(net, marks, path)
            given = {}
        else:
            tree = _load_with_bases(path)
            _settle_deletes(tree)
    if not isinstance(tree, dict):
        raise SchemaError("a net must be a mapping with 'layers:' at the top level",
                          location=where(tree) or _origin(source))
    if tree.loc is None:  # an empty file, or a net merged from its _base_ files
        tree.loc = _origin(source)

    blocks = tree.get("blocks") or {}
    if not isinstance(blocks, dict):
        raise SchemaError("'blocks' must map block names to {args, layers}", location=where(tree, "blocks"))
    for bname, block in blocks.items():
        if not isinstance(block, dict) or not isinstance(block.get("layers"), list) \
                or not all(isinstance(l, dict) for l in block["layers"]) \
                or not isinstance(block.get("args") or {}, dict):
            raise SchemaError(f"block {bname!r} must be a mapping with a 'layers' list of "
                              f"layers and optional 'args' (name: default)",
                              location=where(blocks, bname),
                              hint="blocks: {conv_relu: {args: {num_output: null}, layers: "
                                   "[{name: conv, type: Convolution, ...}]}}")
    if isinstance(tree.get("layers"), list) and blocks:
        tree["layers"] = expand_blocks(tree["layers"], blocks)

    declared = tree.get("vars") or {}
    if not isinstance(declared, dict):
        raise SchemaError("'vars' must map variable names to values",
                          location=where(tree, "vars"), hint="vars: {NUM_LABELS: 21}")
    # A variable listed as null has no default: it must be set (as a block's null args).
    env = {k: v for k, v in declared.items() if v is not None}
    # Text values (from --var) take YAML's types here, so ${NUM_LABELS} = "21" is the int 21.
    env.update({k: _typed(v) for k, v in given.items()})
    missing: Dict[str, Optional[Location]] = {}
    used: Set[str] = set()
    body = MarkedDict()
    body.loc, body.locs = tree.loc, dict(tree.locs)
    for key, value in tree.items():
        if key in ("blocks", "vars"):
            continue
        # The engine's sections may keep unset variables (data paths are not needed to
        # build a net); parse_data/parse_solver refuse them when they are used.
        body[key] = substitute(value, env, {} if key in ("data", "solver") else missing,
                               where(tree, key), used)
    body.locs = {k: v for k, v in body.locs.items() if k in body}
    if missing:
        raise _missing_error(missing, "template variables")
    warn_unused_vars([k for k in given if k not in declared], used, where(tree))
    if overrides:
        apply_overrides(body, overrides)
    return body


def _origin(source: Source) -> Location:
    return Location("<dict>" if isinstance(source, Mapping) else os.fspath(source))


def _apply_path_marks(net: Any, marks: Mapping[Tuple[Any, ...], Location], path: str) -> MarkedDict:
    """Turn a plain tree + ``{path tuple: Location}`` (from the prototxt importer) into marks."""
    root = Location(path)

    def walk(value: Any, prefix: Tuple[Any, ...]) -> Any:
        if isinstance(value, Mapping):
            out = MarkedDict()
            out.loc = marks.get(prefix, root)
            for k, v in value.items():
                out[k] = walk(v, prefix + (k,))
                out.locs[k] = marks.get(prefix + (k,), out.loc)
            return out
        if isinstance(value, list):
            out = MarkedList()
            out.loc = marks.get(prefix, root)
            for i, v in enumerate(value):
                out.append(walk(v, prefix + (i,)))
                out.locs[i] = marks.get(prefix + (i,), out.loc)
            return out
        return value

    return walk(net, ())


def iter_layers(tree: Mapping[str, Any]) -> Iterable[Tuple[int, Any, Optional[Location]]]:
    layers = tree.get("layers") or []
    for i, layer in enumerate(layers):
        yield i, layer, where(layers, i)
