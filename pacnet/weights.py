"""Bring your own trained weights: PyTorch and safetensors files mapped onto a compiled net.

Files (:func:`read_state_dict`): ``.pth``/``.pt``/``.pth.tar`` written by ``torch.save``
(zip or the legacy pre-1.6 format) and safetensors, told apart by their first bytes.  A
torch file is read with ``torch.load(weights_only=True)`` only: a file whose unpickling
would run code (a pickled ``nn.Module``, an ``argparse.Namespace`` in a checkpoint, a
crafted pickle) is refused with a :class:`~pacnet.errors.LoadError` naming the Python
object it asks for.  A checkpoint dict holding its weights under ``state_dict``, ``model``
or ``model_state_dict`` is opened, and a ``module.`` prefix on every key (DataParallel,
DDP) is dropped.

Names (:func:`sources`): a net file declares the models whose files it takes in its
``weights_from:`` section, one entry per source model::

    weights_from:
      nvlabs:                                    # a name for the source
        model: NVlabs/pacnet ModelWithCrf(fcn8s, crfi5p4d5641p4d5161)
        rename:                                  # the first rule whose 'from' matches wins
          - {from: "backbone.*", to: "*"}        # '*' is any run of characters
          - {from: "feat_scales.*", to: "feat_scales/*.weight", transform: reciprocal}
          - {from: "crf.*", to: ["crf.steps.0.*", "crf.steps.1.*"]}   # one entry, two blobs
        ignore: ["upscore8.weight"]              # entries of the files the net has no use for
        hint: "what to do when blobs are missing"

A key no rule matches keeps its name; ``transform`` is ``reciprocal``, ``{transpose:
[perm]}``, ``{reshape: [dims]}`` or a list of them, applied in order.  Every file is also
tried with its names as they are (pacnet's own files), and each file is mapped with the
source under which the most of its entries find their place.

Checks (:func:`match`): every entry of every file must land on a blob of the net with the
blob's shape, and every blob of the net must be given (strict, the default); the report
names the first entries of each kind, and when another zoo net takes the file, names it.
Nothing is copied into the net (:func:`load_weights`) or written (:func:`convert`) unless
every check passed.
"""

from __future__ import annotations

import fnmatch
import functools
import os
import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from pacnet.errors import DataError, LoadError, Location, SchemaError

__all__ = ["Rule", "Source", "PACNET_NAMES", "sources", "read_state_dict",
           "FileMapping", "Matched", "match", "load_weights", "convert", "suggest_nets"]

PathLike = Union[str, "os.PathLike[str]"]

# ----------------------------------------------------------------------------- rules

@dataclass(frozen=True)
class Rule:
    """``from`` pattern -> ``to`` patterns, with transforms; ``*`` is any run of characters."""

    pattern: str
    targets: Tuple[str, ...]
    transforms: Tuple[Any, ...] = ()

    def apply(self, key: str) -> Optional[Tuple[str, ...]]:
        """The net keys of file key ``key``, or None when the rule does not match it."""
        found = _regex(self.pattern).fullmatch(key)
        if found is None:
            return None
        out = []
        for target in self.targets:
            parts = target.split("*")
            text = parts[0]
            for group, part in zip(found.groups(), parts[1:]):
                text += group + part
            out.append(text)
        return tuple(out)


@dataclass(frozen=True)
class Source:
    """A model whose files a net takes: its ``rename`` rules and ``ignore`` patterns."""

    name: str
    model: str
    rules: Tuple[Rule, ...] = ()
    ignore: Tuple[str, ...] = ()
    hint: Optional[str] = None

    def map_key(self, key: str) -> Tuple[Optional[Tuple[str, ...]], Optional[Rule]]:
        """``(net keys, rule)`` of file key ``key``; ``(None, None)`` when it is ignored."""
        if any(fnmatch.fnmatchcase(key, pattern) for pattern in self.ignore):
            return None, None
        for rule in self.rules:
            targets = rule.apply(key)
            if targets is not None:
                return targets, rule
        return (key,), None


#: Files whose keys are the net's own state_dict keys (pacnet checkpoints and conversions).
PACNET_NAMES = Source("pacnet", "pacnet (the net's own blob names)")


def _regex(pattern: str) -> "re.Pattern[str]":
    return re.compile("(.*?)".join(re.escape(part) for part in pattern.split("*")), re.DOTALL)


def sources(config: Mapping[str, Any], *, file: Optional[str] = None) -> List[Source]:
    """The ``weights_from:`` section of a net's top level (``net.config``) as Sources.

    Raises a located :class:`SchemaError` for a rule whose ``to`` does not use the ``*``s of
    its ``from`` (the JSON schema checks the rest)."""
    from pacnet.load import where

    section = config.get("weights_from") or {}
    out = []
    for name, entry in section.items():
        rules = []
        for i, raw in enumerate(entry.get("rename") or []):
            targets = raw["to"] if isinstance(raw["to"], list) else [raw["to"]]
            stars = raw["from"].count("*")
            for target in targets:
                if target.count("*") != stars:
                    loc = where((entry.get("rename") or [])[i], "to") or where(section, name)
                    raise SchemaError(f"weights_from.{name}.rename[{i}]: 'to' {target!r} has "
                                      f"{target.count('*')} '*' but 'from' {raw['from']!r} has "
                                      f"{stars}", location=loc or Location(file),
                                      hint="each '*' of 'to' takes the text the same '*' of "
                                           "'from' matched")
            transform = raw.get("transform") or []
            rules.append(Rule(raw["from"], tuple(targets),
                              tuple(transform if isinstance(transform, list) else [transform])))
        out.append(Source(str(name), entry["model"], tuple(rules), tuple(entry.get("ignore") or ()),
                          entry.get("hint")))
    return out


def _transform(value: torch.Tensor, transforms: Sequence[Any], key: str, path: str) -> torch.Tensor:
    for op in transforms:
        if op == "reciprocal":
            if bool((value == 0).any()):
                raise DataError(f"{path}: {key} holds a zero, which has no reciprocal",
                                hint="the file's value is not a divisor; check the "
                                     "weights_from rule")
            value = 1.0 / value
        elif "transpose" in op:
            perm = list(op["transpose"])
            if sorted(perm) != list(range(value.dim())):
                raise DataError(f"{path}: transpose {perm} does not fit {key} of shape "
                                f"{list(value.shape)}", hint="give a permutation of its axes")
            value = value.permute(*perm)
        else:
            try:
                value = value.reshape(op["reshape"])
            except RuntimeError:
                raise DataError(f"{path}: cannot reshape {key} of shape {list(value.shape)} to "
                                f"{op['reshape']}") from None
    return value.contiguous()


# ----------------------------------------------------------------------------- reading

_CONTAINERS = ("state_dict", "model", "model_state_dict")
_GLOBAL = re.compile(r"GLOBAL ([A-Za-z_][\w]*(?:\.[A-Za-z_][\w]*)+)\b")


def _kind(path: str) -> str:
    """``torch`` (zip or legacy pickle) or ``safetensors``, from the first bytes."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except FileNotFoundError:
        raise LoadError(f"weights file not found: {path}", hint="check the path") from None
    except IsADirectoryError:
        raise LoadError(f"{path} is a directory, not a weights file") from None
    except OSError as err:
        raise LoadError(f"cannot read {path}: {err.strerror or err}") from None
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return "torch"
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 1 << 30:
        return "safetensors"
    if not head:
        raise LoadError(f"{path} is empty",
                        hint="the file was not written completely; fetch it again")
    if path.endswith(".caffemodel"):
        hint = ("a .caffemodel goes through its Caffe net: pacnet convert NET.prototxt --weights "
                f"{os.path.basename(path)}")
    elif head.lstrip()[:1] in (b"#", b"{") or head.lstrip()[:5] in (b"name:", b"layer"):
        hint = "it looks like a text file (a net?); the weights file goes after --weights"
    else:
        hint = "give a file written by torch.save (.pth, .pt, .pth.tar) or a .safetensors file"
    raise LoadError(f"{path} is neither a PyTorch (torch.save) nor a safetensors weights file",
                    hint=hint)


def _refused(path: str, err: BaseException) -> LoadError:
    """The LoadError for a torch file that ``weights_only`` loading rejected."""
    text = f"{err} {err.__context__ or ''}"
    found = _GLOBAL.search(text)
    if found is None:
        return LoadError(f"{path} is corrupt or truncated: it does not unpickle as a PyTorch file",
                         hint="fetch the file again; a file written with pickle.dump instead of "
                              "torch.save is not read either")
    what = found.group(1)
    return LoadError(
        f"{path} needs code to load: unpickling it would call {what}, and pacnet reads weight "
        f"files with torch.load(weights_only=True), which never runs code from a file",
        hint="it holds pickled Python objects, not just tensors; where you trust the file, "
             "re-save its tensors: torch.save(torch.load(F, weights_only=False)['state_dict'], "
             "'w.pth') (or model.state_dict() of a pickled model)")


def _torch_load(path: str) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pickle-protocol notes of the weights-only unpickler
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise _refused(path, err) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, KeyError, IndexError,
            TypeError, AttributeError, MemoryError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise LoadError(f"{path} is corrupt or truncated ({first[:160]})",
                        hint="fetch the file again") from None


def _unwrap(obj: Any, path: str) -> Dict[str, torch.Tensor]:
    """The tensor dict inside a loaded torch object (a state_dict or a checkpoint dict)."""
    trail = []
    while isinstance(obj, Mapping):
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if obj and len(tensors) == len(obj) and all(isinstance(k, str) for k in obj):
            return dict(obj)
        inner = next((k for k in _CONTAINERS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            others = [f"{k!r} ({type(v).__name__})" for k, v in obj.items()
                      if not isinstance(v, torch.Tensor)][:4]
            where = f" under {'.'.join(trail)}" if trail else ""
            raise LoadError(f"{path} holds a dict{where} that is not a state_dict: it has "
                            f"non-tensor entries {', '.join(others) or '(none)'}"
                            if obj else f"{path} holds an empty dict{where}",
                            hint="expected a state_dict (names -> tensors), or a checkpoint with "
                                 "one under " + " / ".join(repr(k) for k in _CONTAINERS))
        trail.append(inner)
        obj = obj[inner]
    raise LoadError(f"{path} holds a {type(obj).__name__}, not a state_dict",
                    hint="save model.state_dict() (a dict of names to tensors)")


def read_state_dict(path: PathLike) -> Dict[str, torch.Tensor]:
    """The tensors of a weights file, by name (see the module docstring for the formats)."""
    from pacnet.tensorfile import read_safetensors

    p = os.fspath(path)
    if _kind(p) == "safetensors":
        return read_safetensors(p)[0]
    state = _unwrap(_torch_load(p), p)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


# ----------------------------------------------------------------------------- mapping

@dataclass
class FileMapping:
    """One file mapped onto a net under one source.

    ``tensors``: net key -> value (transformed, the net's dtype); ``origin``: net key ->
    file key; ``unexpected``: file keys (as mapped: ``file key -> net key``) with no blob
    of that name; ``mismatched``: ``(file key, net key, file shape, net shape)``;
    ``ignored``: file keys the source ignores."""

    path: str
    source: Source
    tensors: Dict[str, torch.Tensor] = field(default_factory=dict)
    origin: Dict[str, str] = field(default_factory=dict)
    unexpected: List[str] = field(default_factory=list)
    mismatched: List[Tuple[str, str, Tuple[int, ...], Tuple[int, ...]]] = \
        field(default_factory=list)
    ignored: List[str] = field(default_factory=list)

    @property
    def problems(self) -> int:
        return len(self.unexpected) + len(self.mismatched)


@dataclass
class Matched:
    """What a set of files gives a net (:func:`match`): ``tensors`` by net key (later files
    win), per-file ``files``, and ``missing`` net keys no file gives."""

    net: str
    files: List[FileMapping]
    tensors: Dict[str, torch.Tensor]
    missing: List[str]

    def summary(self) -> str:
        """One line per file: which source mapped it and how many entries went where."""
        lines = []
        for f in self.files:
            how = "names as they are" if f.source is PACNET_NAMES else f"as {f.source.model}"
            extra = f", {len(f.ignored)} ignored" if f.ignored else ""
            extra += f", {len(f.unexpected)} not in the net" if f.unexpected else ""
            lines.append(f"{os.path.basename(f.path)}: {len(f.tensors)} blobs ({how}{extra})")
        return "; ".join(lines)


def _net_blobs(net: torch.nn.Module) -> Tuple[Dict[str, torch.Tensor], Dict[str, List[str]]]:
    """The net's state_dict (keep_vars) and, per key, the keys naming the same tensor."""
    state = net.state_dict(keep_vars=True)
    groups: Dict[int, List[str]] = {}
    for key, value in state.items():
        groups.setdefault(id(value), []).append(key)
    return state, {key: groups[id(value)] for key, value in state.items()}


def map_file(state: Mapping[str, torch.Tensor], path: str, source: Source,
             blobs: Mapping[str, torch.Tensor]) -> FileMapping:
    """Map the tensors ``state`` of file ``path`` onto ``blobs`` (a net's state_dict)."""
    out = FileMapping(path, source)
    for key, value in state.items():
        targets, rule = source.map_key(key)
        if targets is None:
            out.ignored.append(key)
            continue
        if rule is not None and rule.transforms:
            value = _transform(value, rule.transforms, key, path)
        for target in targets:
            blob = blobs.get(target)
            if blob is None:
                out.unexpected.append(key if target == key else f"{key} -> {target}")
            elif tuple(blob.shape) != tuple(value.shape):
                out.mismatched.append((key, target, tuple(value.shape), tuple(blob.shape)))
            else:
                out.tensors[target] = value.detach().to(dtype=blob.dtype)
                out.origin[target] = key
    return out


def _best(state: Mapping[str, torch.Tensor], path: str, candidates: Sequence[Source],
          blobs: Mapping[str, torch.Tensor]) -> FileMapping:
    """The mapping with the fewest entries out of place, then the most blobs filled; the
    earlier candidate on a tie (the net's own names first)."""
    best = None
    for source in candidates:
        mapped = map_file(state, path, source, blobs)
        rank = (mapped.problems, -len(mapped.tensors))
        if best is None or rank < (best.problems, -len(best.tensors)):
            best = mapped
    return best


def _paths(paths: Union[PathLike, Iterable[PathLike]]) -> List[str]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out = [os.fspath(p) for p in paths]
    if not out:
        raise LoadError("no weights file given")
    return out


def _listed(items: Sequence[str], limit: int = 3) -> str:
    return ", ".join(items[:limit]) + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def match(net: torch.nn.Module, paths: Union[PathLike, Iterable[PathLike]], *, strict: bool = True,
          allow_unused: bool = False, source: Optional[str] = None,
          suggest: bool = True) -> Matched:
    """Read ``paths`` (one file or several, later ones overriding earlier ones) and map them
    onto ``net`` (a net built by :func:`pacnet.build`), checking every key and shape.

    Raises :class:`DataError` when an entry lands on a blob of another shape, when a file
    gives the net nothing, when a blob of the net is not given (``strict``) and when an
    entry lands on no blob (unless ``allow_unused``: then it is only reported, as Caffe's
    ``-weights`` skips layers the net lacks).  ``source`` forces one ``weights_from`` entry
    (or ``"pacnet"``) instead of the best one; with ``suggest``, the hint of an error about
    entries out of place names the zoo nets that take the files."""
    name = _net_name(net)
    declared = sources(getattr(net, "config", None) or {}, file=getattr(getattr(net, "ir", None),
                                                                       "source", None))
    candidates = [PACNET_NAMES] + declared
    if source is not None:
        chosen = [s for s in candidates if s.name == source]
        if not chosen:
            raise LoadError(f"net {name} declares no weights source {source!r}",
                            hint="its sources: " + ", ".join(s.name for s in candidates))
        candidates = chosen
    blobs, aliases = _net_blobs(net)
    files = []
    tensors: Dict[str, torch.Tensor] = {}
    for path in _paths(paths):
        mapped = _best(read_state_dict(path), path, candidates, blobs)
        files.append(mapped)
        for key, value in mapped.tensors.items():
            for alias in aliases[key]:
                tensors[alias] = value
    given = set(tensors)
    missing = [k for k in blobs if k not in given]
    result = Matched(name, files, tensors, missing)
    problem = _problem(result, strict, allow_unused)
    if problem is not None:
        message, hint = problem
        misfit = any(f.problems or not f.tensors for f in files)  # not merely incomplete
        if suggest and misfit:
            fits = suggest_nets([f.path for f in files], exclude=name)
            if fits:
                nets = f"net {fits[0]}" if len(fits) == 1 else f"nets {', '.join(fits)}"
                hint = f"the file fits zoo {nets}" + (f"; {hint}" if hint else "")
        raise DataError(message, hint=hint)
    return result


def _problem(result: Matched, strict: bool,
             allow_unused: bool) -> Optional[Tuple[str, Optional[str]]]:
    """(message, hint) of the first thing wrong with a match, or None."""
    for f in result.files:
        src = os.path.basename(f.path)
        how = "" if f.source is PACNET_NAMES else f" (mapped as {f.source.model})"
        if f.mismatched:
            key, target, have, want = f.mismatched[0]
            shown = key if key == target else f"{key} -> {target}"
            more = f" and {len(f.mismatched) - 1} more" if len(f.mismatched) > 1 else ""
            return (f"{src} does not fit net {result.net}{how}: {shown} has shape {list(have)} in "
                    f"the file but {list(want)} in the net{more}",
                    "the file belongs to another model or configuration")
        if f.unexpected and not allow_unused:
            return (f"{src} does not fit net {result.net}{how}: {len(f.unexpected)} of its "
                    f"entries have no place in the net ({_listed(f.unexpected)})",
                    "the file belongs to another model, or the net's weights_from rules miss "
                    "these names")
        if not f.tensors:
            entries = f.unexpected + f.ignored
            return (f"{src} gives net {result.net} nothing{how}: none of its {len(entries)} "
                    f"entries is a blob of the net (the file has {_listed(entries) or 'none'}; "
                    f"the net has {_listed(result.missing) or 'none'})",
                    "is it the weights of this net? entries match the net's '<layer>.<blob>' "
                    "names, or its weights_from rules")
    if strict and result.missing:
        hints = [f.source.hint for f in result.files if f.source.hint]
        holder = (os.path.basename(result.files[0].path) + " does not hold"
                  if len(result.files) == 1 else "no given file holds")
        return (f"net {result.net} has {len(result.missing)} blob(s) that {holder} "
                f"({_listed(result.missing)})",
                "; ".join(hints) or "give the file(s) holding them too (--weights a,b), or load "
                                    "with strict=False to keep their initial values")
    return None


def _net_name(net: torch.nn.Module) -> str:
    ir = getattr(net, "ir", None)
    if ir is None:
        raise TypeError("expected a net built by pacnet.build (it has no .ir)")
    return str(ir.name)


def load_weights(net: torch.nn.Module, paths: Union[PathLike, Iterable[PathLike]], *,
                 strict: bool = True, allow_unused: bool = False,
                 source: Optional[str] = None) -> Matched:
    """Copy the weights of ``paths`` into ``net`` after :func:`match` accepted them.

    ``strict=False`` keeps the initial values of the blobs no file gives and
    ``allow_unused=True`` skips entries the net has no blob for (both: Caffe's
    ``-weights``); an entry of another shape is an error either way."""
    result = match(net, paths, strict=strict, allow_unused=allow_unused, source=source)
    state = net.state_dict()
    with torch.no_grad():
        for key, value in result.tensors.items():
            state[key].copy_(value)
    return result


def convert(net: torch.nn.Module, paths: Union[PathLike, Iterable[PathLike]], out: PathLike, *,
            strict: bool = True, source: Optional[str] = None) -> Matched:
    """Map ``paths`` onto ``net`` (a ``device="meta"`` build is enough) and write the blobs,
    under the net's own names, to the safetensors file ``out`` (atomically).  ``strict``:
    every blob of the net given and every entry used; otherwise what matches is written.
    Nothing is written when a check fails."""
    from pacnet.atomic import check_writable
    from pacnet.tensorfile import write_safetensors

    result = match(net, paths, strict=strict, allow_unused=not strict, source=source)
    target = os.fspath(out)
    inputs = {os.path.abspath(f.path) for f in result.files}
    if os.path.abspath(target) in inputs:
        raise LoadError(f"-o {target} would overwrite an input file", hint="give another output")
    check_writable(target)
    sources_used = sorted({f.source.name for f in result.files})
    write_safetensors(target, result.tensors, {
        "source": ",".join(os.path.basename(f.path) for f in result.files), "net": result.net,
        "weights_from": ",".join(sources_used), "converter": "pacnet convert"})
    return result


# ----------------------------------------------------------------------------- zoo search

@functools.lru_cache(maxsize=1)
def _zoo_index() -> Tuple[Tuple[str, Any, frozenset, Tuple[Source, ...]], ...]:
    """Per zoo net: (zoo name, loaded tree, its layers' module names, its weight sources).
    Loading the whole zoo takes about a second; a process keeps it for later searches."""
    from pacnet.codegen import module_name
    from pacnet.errors import PacnetError
    from pacnet.load import load, zoo_names

    out = []
    for name in zoo_names():
        try:
            tree = load(name)
            layers = frozenset(module_name(l["name"]) for l in tree.get("layers") or []
                               if isinstance(l, dict) and isinstance(l.get("name"), str))
            out.append((name, tree, layers, tuple([PACNET_NAMES] + sources(tree, file=name))))
        except PacnetError:
            continue
    return tuple(out)


def suggest_nets(paths: Sequence[PathLike], *, exclude: Optional[str] = None,
                 limit: int = 3) -> List[str]:
    """Zoo nets (``family/name``) that take every entry of the files at ``paths`` with the
    right shapes, those that need nothing more first, models before their experiments.
    Nets are screened by the layer names of their YAML, and only the candidates are built
    (on the meta device)."""
    import copy

    from pacnet.api import build
    from pacnet.errors import PacnetError

    try:
        states = [read_state_dict(p) for p in paths]
    except PacnetError:
        return []
    keys = [k for state in states for k in state]
    found = []
    for name, tree, layers, candidates in _zoo_index():
        if exclude is not None and str(tree.get("name")) == exclude:
            continue
        def places(source: Source) -> bool:  # every entry names a layer of the net
            return all(targets is None or all(t.split(".")[0] in layers for t in targets)
                       for targets in (source.map_key(k)[0] for k in keys))

        if not any(places(source) for source in candidates):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                net = build(copy.deepcopy(tree), device="meta")
        except PacnetError:
            continue
        blobs, _ = _net_blobs(net)
        mapped = [_best(state, os.fspath(p), candidates, blobs) for state, p in zip(states, paths)]
        if any(m.problems or not m.tensors for m in mapped):
            continue
        given = {k for m in mapped for k in m.tensors}
        # those needing nothing more first, then models before the experiments built on them
        found.append((len([k for k in blobs if k not in given]), name.count("/"), name))
    return [name for *_, name in sorted(found)][:limit]
