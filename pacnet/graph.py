"""From a validated net tree to the IR: layers and blob versions, as Caffe's Net::Init builds them.

Rules reproduced (spec caffe.md §6.5):

* phase/level/stage filtering with ``include``/``exclude`` rules;
* SSA binding: every top creates a new *version* of its name, and a bottom binds to the
  latest producer of that name earlier in the list; redefining a name is only legal in
  place (top i == bottom i);
* implicit fan-out (one version may feed many layers: autograd sums the gradients);
* automatic tops for loss layers (anonymous: counted in the loss, never bound as bottoms);
* loss weights (default 1 on top 0 of loss layers), ``propagate_down``;
* weight sharing by ``param.name`` and per-blob ``lr_mult``/``decay_mult``;
* outputs = blob versions that no later layer consumes.

The IR is plain frozen dataclasses plus a ``networkx.DiGraph`` whose nodes are layer names
and blob-version ids, used for the structural checks and for ``--dot``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import networkx as nx

from pacnet import registry
from pacnet.errors import GraphError, Location, SchemaError
from pacnet.load import MarkedDict, where
from pacnet.registry import LayerSpec
from pacnet.schema import validate_layer, validate_net


@dataclass(frozen=True)
class BlobRef:
    """One version of a named blob: ``name`` as written, ``version`` 0 for the first producer."""

    name: str
    version: int = 0

    def __str__(self) -> str:
        return self.name if self.version == 0 else f"{self.name}@{self.version}"


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
class Node:
    """A layer in the IR."""

    spec: LayerSpec
    inputs: Tuple[BlobRef, ...]
    outputs: Tuple[BlobRef, ...]
    params: Tuple[ParamSpec, ...] = ()
    loss_weights: Tuple[float, ...] = ()
    propagate_down: Tuple[bool, ...] = ()
    anonymous_tops: Tuple[int, ...] = ()
    fused: Optional[str] = None  # set by fusion passes: a note on what was fused

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def type(self) -> str:
        return self.spec.type


@dataclass(frozen=True)
class Graph:
    """The whole net: graph inputs (blob -> shape, possibly symbolic), nodes in run order."""

    name: str
    inputs: Mapping[str, Tuple[Any, ...]]
    input_locations: Mapping[str, Optional[Location]]
    nodes: Tuple[Node, ...]
    outputs: Tuple[BlobRef, ...]
    phase: str = "test"
    dims: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    config: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    source: Optional[str] = None
    dropped: Tuple[str, ...] = ()  # layers removed by phase/stage rules

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def to_networkx(self) -> nx.DiGraph:
        """Layers and blob versions as a bipartite DiGraph (blob -> layer -> blob).

        Nodes are ``("layer", name)`` and ``("blob", "name[@version]")`` (a layer and a
        blob often share a name)."""
        g = nx.DiGraph()
        for name in self.inputs:
            g.add_node(("blob", str(BlobRef(name))))
        for n in self.nodes:
            g.add_node(("layer", n.name), type=n.type)
            for b in n.inputs:
                g.add_edge(("blob", str(b)), ("layer", n.name))
            for t in n.outputs:
                g.add_edge(("layer", n.name), ("blob", str(t)))
        return g

    def with_nodes(self, nodes: Sequence[Node]) -> "Graph":
        return replace(self, nodes=tuple(nodes))


# ----------------------------------------------------------------------------- rules

def _as_list(value: Any) -> List[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def _rule_matches(rule: Mapping[str, Any], phase: str, level: int, stages: Sequence[str]) -> bool:
    if "phase" in rule and str(rule["phase"]).lower() != phase:
        return False
    if "min_level" in rule and level < rule["min_level"]:
        return False
    if "max_level" in rule and level > rule["max_level"]:
        return False
    if any(s not in stages for s in _as_list(rule.get("stage"))):
        return False
    if any(s in stages for s in _as_list(rule.get("not_stage"))):
        return False
    return True


def layer_included(layer: Mapping[str, Any], phase: str, level: int = 0,
                   stages: Sequence[str] = ()) -> bool:
    """Caffe's Net::FilterNet rule for one layer."""
    include, exclude = _as_list(layer.get("include")), _as_list(layer.get("exclude"))
    if include and exclude:
        raise SchemaError("a layer may have 'include' or 'exclude' rules, not both",
                          location=where(layer, "include"), layer=layer.get("name"))
    if include:
        return any(_rule_matches(r, phase, level, stages) for r in include)
    return not any(_rule_matches(r, phase, level, stages) for r in exclude)


# ----------------------------------------------------------------------------- building

def build_graph(tree: MarkedDict, *, phase: str = "test", level: int = 0,
                stages: Sequence[str] = (), source: Optional[str] = None) -> Graph:
    """Validate ``tree`` (from :func:`pacnet.load.load`) and build the IR for ``phase``."""
    if phase not in ("train", "test"):
        raise SchemaError(f"phase must be 'train' or 'test', got {phase!r}")
    validate_net(tree)
    layers = tree["layers"]

    inputs: Dict[str, Tuple[Any, ...]] = {}
    input_locs: Dict[str, Optional[Location]] = {}
    for name, shape in (tree.get("inputs") or {}).items():
        inputs[name] = tuple(shape)
        input_locs[name] = where(tree["inputs"], name)

    latest: Dict[str, BlobRef] = {}          # SSA: name -> latest bindable version
    producer: Dict[BlobRef, str] = {}         # version -> layer name (None for inputs)
    versions: Dict[str, int] = {}
    for name in inputs:
        latest[name] = BlobRef(name)
        versions[name] = 0

    seen_names: Dict[str, Optional[Location]] = {}
    nodes: List[Node] = []
    dropped: List[str] = []
    kept: List[Tuple[MarkedDict, Optional[Location]]] = []
    for i, layer in enumerate(layers):
        loc = where(layers, i)
        if not isinstance(layer, dict):
            raise SchemaError("each entry of 'layers' must be a mapping", location=loc)
        name = layer.get("name")
        if isinstance(name, str):
            if name in seen_names:
                first = seen_names[name]
                raise GraphError(f"duplicate layer name {name!r}", location=where(layer, "name") or loc,
                                 hint=f"first used at line {first.line}" if first and first.line else
                                 "layer names must be unique")
            seen_names[name] = where(layer, "name") or loc
        if layer_included(layer, phase, level, stages):
            kept.append((layer, loc))
        else:
            dropped.append(str(name))

    # Names each layer will produce, to explain bottoms that are produced only later.
    later_producer: Dict[str, Tuple[str, Optional[Location]]] = {}
    for layer, loc in kept:
        for t in _as_list(layer.get("top")):
            later_producer.setdefault(t, (layer.get("name"), loc))

    for index, (layer, loc) in enumerate(kept):
        params, locs = validate_layer(layer, loc)
        ltype = registry.get(layer["type"])
        name = layer["name"]
        bottoms = [str(b) for b in _as_list(layer.get("bottom"))]
        tops = [str(t) for t in _as_list(layer.get("top"))]

        if ltype.type == "Input":
            spec = LayerSpec(name=name, type=ltype.type, params=MappingProxyType(params),
                             bottoms=tuple(bottoms), tops=tuple(tops), phase=phase, location=loc,
                             locations=MappingProxyType(locs))
            _check_arity(ltype, spec, len(bottoms), len(tops))
            ltype.check(spec)
            shapes = ltype.infer(spec, [])
            for t, s in zip(tops, shapes):
                if t in latest:
                    raise GraphError(f"input blob {t!r} is declared twice", location=loc, layer=name)
                inputs[t] = tuple(s)
                input_locs[t] = loc
                latest[t] = BlobRef(t)
                versions[t] = 0
            continue

        # Automatic (anonymous) tops for loss layers written without 'top'.
        anonymous: List[int] = []
        min_tops = ltype.tops[0]
        if ltype.loss and len(tops) < max(1, min_tops):
            while len(tops) < max(1, min_tops):
                auto = name if name not in latest and name not in later_producer else f"{name}_top{len(tops)}"
                anonymous.append(len(tops))
                tops.append(auto)

        spec = LayerSpec(name=name, type=ltype.type, params=MappingProxyType(params),
                         bottoms=tuple(bottoms), tops=tuple(tops), phase=phase, location=loc,
                         locations=MappingProxyType(locs))
        _check_arity(ltype, spec, len(bottoms), len(tops))

        in_refs: List[BlobRef] = []
        for j, b in enumerate(bottoms):
            ref = latest.get(b)
            if ref is None:
                raise _dangling(b, name, layer, loc, later_producer, kept, index, inputs)
            in_refs.append(ref)

        out_refs: List[BlobRef] = []
        for j, t in enumerate(tops):
            if j in anonymous:
                out_refs.append(BlobRef(t, 0))
                continue
            if t in latest:
                in_place = j < len(bottoms) and bottoms[j] == t
                if not in_place:
                    prev = producer.get(latest[t])
                    where_prev = f"layer {prev!r}" if prev else "the net inputs"
                    raise GraphError(
                        f"top {t!r} is already produced by {where_prev}",
                        location=where(layer, "top") or loc, layer=name, layer_type=ltype.type,
                        hint="a blob may only be redefined in place (top i == bottom i); "
                             "give this top a new name")
                versions[t] += 1
            else:
                versions[t] = 0
            ref = BlobRef(t, versions[t])
            out_refs.append(ref)
        for j, ref in enumerate(out_refs):
            producer[ref] = name
            if j not in anonymous:
                latest[ref.name] = ref

        node = Node(
            spec=spec,
            inputs=tuple(in_refs),
            outputs=tuple(out_refs),
            params=_param_specs(layer, ltype, spec),
            loss_weights=_loss_weights(layer, ltype, spec, len(tops)),
            propagate_down=_propagate_down(layer, spec, len(bottoms)),
            anonymous_tops=tuple(anonymous),
        )
        ltype.check(spec)
        nodes.append(node)

    consumed = {b for n in nodes for b in n.inputs}
    wanted = tree.get("outputs")
    if wanted:
        outputs = []
        for w in wanted:
            if w not in latest:
                raise GraphError(f"requested output {w!r} is not a blob of this net",
                                 location=where(tree, "outputs"))
            outputs.append(latest[w])
        # Loss tops always come along: the trainer needs them.
        outputs += [t for n in nodes for t, w in zip(n.outputs, n.loss_weights) if w and t not in outputs]
    else:
        outputs = [t for n in nodes for t in n.outputs if t not in consumed]

    graph = Graph(
        name=str(tree.get("name") or (source or "net")),
        inputs=MappingProxyType(inputs),
        input_locations=MappingProxyType(input_locs),
        nodes=tuple(nodes),
        outputs=tuple(outputs),
        phase=phase,
        dims=MappingProxyType(dict(tree.get("dims") or {})),
        config=MappingProxyType({k: v for k, v in tree.items() if k != "layers"}),
        source=source,
        dropped=tuple(dropped),
    )
    _check_acyclic(graph)
    _warn_unused_inputs(graph)
    return graph


def _check_arity(ltype: registry.Layer, spec: LayerSpec, n_bottoms: int, n_tops: int) -> None:
    for what, count, (lo, hi), key in (("bottom", n_bottoms, ltype.bottoms, "bottom"),
                                         ("top", n_tops, ltype.tops, "top")):
        if count < lo or (hi is not None and count > hi):
            expected = f"{lo}" if lo == hi else (f"at least {lo}" if hi is None else f"{lo} to {hi}")
            raise spec.error(f"takes {expected} {what}(s), got {count}", key=key,
                             cls=GraphError)


def _dangling(bottom: str, name: str, layer: Mapping[str, Any], loc: Optional[Location],
              later: Mapping[str, Tuple[str, Optional[Location]]],
              kept: Sequence[Tuple[Mapping[str, Any], Optional[Location]]], index: int,
              inputs: Mapping[str, Any]) -> GraphError:
    where_bottom = where(layer, "bottom") or loc
    if bottom in later:
        other, other_loc = later[bottom]
        # Would reordering help, or does the later producer depend on this layer (a cycle)?
        cycle = _find_cycle(bottom, name, kept)
        if cycle:
            return GraphError(f"cycle: {' -> '.join(cycle)}", location=where_bottom, layer=name,
                              hint="a net must be acyclic; break the loop by renaming one blob")
        line = f" (line {other_loc.line})" if other_loc and other_loc.line else ""
        return GraphError(f"bottom {bottom!r} is produced only later, by layer {other!r}{line}",
                          location=where_bottom, layer=name,
                          hint=f"layers run in list order: move {other!r} above {name!r}")
    known = list(inputs) + [t for l, _ in kept[:index] for t in _as_list(l.get("top"))]
    from pacnet.errors import did_you_mean

    hint = did_you_mean(bottom, known) or "declare it under 'inputs:' or produce it with an earlier layer"
    return GraphError(f"bottom {bottom!r} is not produced by any earlier layer or input",
                      location=where_bottom, layer=name, hint=hint)


def _find_cycle(blob: str, consumer: str, kept: Sequence[Tuple[Mapping[str, Any], Optional[Location]]]) -> Optional[List[str]]:
    """If binding ``blob`` (produced later) into ``consumer`` closes a loop, return it."""
    g = nx.DiGraph()
    producers: Dict[str, str] = {}
    for layer, _ in kept:
        for t in _as_list(layer.get("top")):
            producers.setdefault(t, layer.get("name"))
    for layer, _ in kept:
        for b in _as_list(layer.get("bottom")):
            if b in producers and producers[b] != layer.get("name"):
                g.add_edge(producers[b], layer.get("name"))
    try:
        cycle = nx.find_cycle(g, source=consumer)
    except (nx.NetworkXNoCycle, nx.NodeNotFound):
        return None
    names = [u for u, _ in cycle] + [cycle[0][0]]
    return names if producers.get(blob) in names else None


def _check_acyclic(graph: Graph) -> None:
    g = graph.to_networkx()
    if not nx.is_directed_acyclic_graph(g):  # cannot happen with SSA binding; guard the invariant
        cycle = nx.find_cycle(g)
        raise GraphError("cycle: " + " -> ".join(u[1] for u, _ in cycle if u[0] == "layer"))


def _warn_unused_inputs(graph: Graph) -> None:
    import warnings

    used = {b.name for n in graph.nodes for b in n.inputs}
    for name in graph.inputs:
        if name not in used:
            loc = graph.input_locations.get(name)
            warnings.warn(f"{loc or graph.source or 'net'}: input {name!r} is not used by any layer",
                          UserWarning, stacklevel=3)


def _param_specs(layer: Mapping[str, Any], ltype: registry.Layer, spec: LayerSpec) -> Tuple[ParamSpec, ...]:
    raw = _as_list(layer.get("param"))
    if len(raw) > len(ltype.blobs):
        raise spec.error(f"has {len(raw)} 'param' entries but only {len(ltype.blobs)} learnable "
                         f"blob(s) ({', '.join(ltype.blobs) or 'none'})", key="param")
    return tuple(ParamSpec(name=p.get("name"), lr_mult=p.get("lr_mult"), decay_mult=p.get("decay_mult"),
                           share_mode=p.get("share_mode", "STRICT")) for p in raw)


def _loss_weights(layer: Mapping[str, Any], ltype: registry.Layer, spec: LayerSpec, n_tops: int) -> Tuple[float, ...]:
    raw = layer.get("loss_weight")
    if raw is None:
        weights = [0.0] * n_tops
        if ltype.loss and n_tops:
            weights[0] = 1.0
        return tuple(weights)
    values = [float(w) for w in _as_list(raw)]
    if len(values) != n_tops:
        raise spec.error(f"loss_weight has {len(values)} value(s) but the layer has {n_tops} top(s)",
                         key="loss_weight", hint="give one weight per top")
    return tuple(values)


def _propagate_down(layer: Mapping[str, Any], spec: LayerSpec, n_bottoms: int) -> Tuple[bool, ...]:
    raw = layer.get("propagate_down")
    if raw is None:
        return tuple([True] * n_bottoms)
    values = [bool(v) for v in _as_list(raw)]
    if len(values) != n_bottoms:
        raise spec.error(f"propagate_down has {len(values)} value(s) but the layer has {n_bottoms} "
                         f"bottom(s)", key="propagate_down", hint="give one value per bottom")
    return tuple(values)
