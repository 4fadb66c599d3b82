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
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import networkx as nx

from pacnet import registry
from pacnet.errors import GraphError, Location, SchemaError, did_you_mean
from pacnet.frozen import FrozenDict
from pacnet.load import MarkedDict, where
from pacnet.registry import LayerSpec, NamedBySpec
from pacnet.schema import LayerDecl, ParamSpec, validate_net


@dataclass(frozen=True)
class BlobRef:
    """One version of a named blob: ``name`` as written, ``version`` 0 for the first producer."""

    name: str
    version: int = 0

    def __str__(self) -> str:
        return self.name if self.version == 0 else f"{self.name}@{self.version}"


@dataclass(frozen=True)
class Node(NamedBySpec):
    """A layer in the IR."""

    spec: LayerSpec
    inputs: Tuple[BlobRef, ...]
    outputs: Tuple[BlobRef, ...]
    params: Tuple[ParamSpec, ...] = ()
    loss_weights: Tuple[float, ...] = ()
    propagate_down: Tuple[bool, ...] = ()
    anonymous_tops: Tuple[int, ...] = ()
    fused: Optional[str] = None  # set by fusion passes: a note on what was fused

    def __post_init__(self) -> None:
        if len(self.propagate_down) != len(self.inputs) or \
                len(self.loss_weights) != len(self.outputs):  # a graph pass got it wrong
            raise RuntimeError(f"node {self.name}: {len(self.inputs)} inputs, "
                               f"{len(self.propagate_down)} propagate_down flags, "
                               f"{len(self.outputs)} outputs, {len(self.loss_weights)} weights")


@dataclass(frozen=True)
class Graph:
    """The whole net: graph inputs (blob -> shape, possibly symbolic), nodes in run order."""

    name: str
    inputs: Mapping[str, Tuple[Any, ...]]
    input_locations: Mapping[str, Optional[Location]]
    nodes: Tuple[Node, ...]
    outputs: Tuple[BlobRef, ...]
    phase: str = "test"
    dims: Mapping[str, int] = field(default_factory=lambda: FrozenDict({}))
    config: Mapping[str, Any] = field(default_factory=lambda: FrozenDict({}))
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


# ----------------------------------------------------------------------------- building

def build_graph(tree: MarkedDict, *, phase: str = "test", level: int = 0,
                stages: Sequence[str] = (), source: Optional[str] = None) -> Graph:
    """Validate ``tree`` (from :func:`pacnet.load.load`), every layer of every phase, and
    build the IR of the layers ``phase``, ``level`` and ``stages`` keep."""
    if phase not in ("train", "test"):
        raise SchemaError(f"phase must be 'train' or 'test', got {phase!r}")
    decls = validate_net(tree)

    inputs: Dict[str, Tuple[Any, ...]] = {}
    input_locs: Dict[str, Optional[Location]] = {}
    for name, shape in (tree.get("inputs") or {}).items():
        inputs[name] = tuple(shape)
        input_locs[name] = where(tree["inputs"], name)

    latest: Dict[str, BlobRef] = {name: BlobRef(name) for name in inputs}  # SSA: latest version
    producer: Dict[BlobRef, str] = {}         # version -> layer name (inputs have none)
    versions: Dict[str, int] = {name: 0 for name in inputs}
    kept = [d for d in decls if d.included(phase, level, stages)]
    dropped = tuple(d.name for d in decls if not d.included(phase, level, stages))

    # Names each layer will produce, to explain bottoms that are produced only later.
    later_producer: Dict[str, LayerDecl] = {}
    for decl in kept:
        for t in decl.spec.tops:
            later_producer.setdefault(t, decl)

    nodes: List[Node] = []
    for index, decl in enumerate(kept):
        ltype = registry.get(decl.type)
        name, bottoms, tops = decl.name, decl.spec.bottoms, list(decl.spec.tops)
        if ltype.type == "Input":
            spec = replace(decl.spec, phase=phase)
            for t, s, loc in zip(tops, ltype.infer(spec, []), decl.top_locations):
                if t in latest:
                    raise GraphError(f"input blob {t!r} is declared twice", location=loc,
                                     layer=name, layer_type=decl.type)
                inputs[t] = tuple(s)
                input_locs[t] = loc
                latest[t] = BlobRef(t)
                versions[t] = 0
            continue

        # Automatic (anonymous) tops of loss layers written without enough tops.
        anonymous = tuple(range(len(tops), len(tops) + decl.anonymous_tops))
        for j in anonymous:
            taken = name in latest or name in later_producer
            tops.append(f"{name}_top{j}" if taken or j else name)

        in_refs: List[BlobRef] = []
        for b, loc in zip(bottoms, decl.bottom_locations):
            ref = latest.get(b)
            if ref is None:
                raise _dangling(b, decl, loc, later_producer, kept, index, inputs)
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
                        location=decl.top_locations[j], layer=name, layer_type=decl.type,
                        hint="a blob may only be redefined in place (top i == bottom i); "
                             "give this top a new name")
                versions[t] += 1
            else:
                versions[t] = 0
            out_refs.append(BlobRef(t, versions[t]))
        for j, ref in enumerate(out_refs):
            producer[ref] = name
            if j not in anonymous:
                latest[ref.name] = ref

        nodes.append(Node(
            spec=replace(decl.spec, tops=tuple(tops), phase=phase),
            inputs=tuple(in_refs),
            outputs=tuple(out_refs),
            params=decl.params,
            loss_weights=decl.loss_weights,
            propagate_down=decl.propagate_down,
            anonymous_tops=anonymous,
        ))

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
        inputs=FrozenDict(inputs),
        input_locations=FrozenDict(input_locs),
        nodes=tuple(nodes),
        outputs=tuple(outputs),
        phase=phase,
        dims=FrozenDict(dict(tree.get("dims") or {})),
        config=FrozenDict({k: v for k, v in tree.items() if k != "layers"}),
        source=source,
        dropped=dropped,
    )
    _check_acyclic(graph)
    _warn_unused_inputs(graph)
    return graph


def _dangling(bottom: str, decl: LayerDecl, loc: Optional[Location],
              later: Mapping[str, LayerDecl], kept: Sequence[LayerDecl], index: int,
              inputs: Mapping[str, Any]) -> GraphError:
    if bottom in later:
        other = later[bottom]
        # Would reordering help, or does the later producer depend on this layer (a cycle)?
        cycle = _find_cycle(bottom, decl.name, kept)
        if cycle:
            return GraphError(f"cycle: {' -> '.join(cycle)}", location=loc, layer=decl.name,
                              hint="a net must be acyclic; break the loop by renaming one blob")
        at = other.spec.location
        line = f" (line {at.line})" if at and at.line else ""
        return GraphError(f"bottom {bottom!r} is produced only later, by layer "
                          f"{other.name!r}{line}",
                          location=loc, layer=decl.name,
                          hint=f"layers run in list order: move {other.name!r} above {decl.name!r}")
    known = list(inputs) + [t for d in kept[:index] for t in d.spec.tops]
    hint = did_you_mean(bottom, known) or "declare it under 'inputs:' or produce it with an earlier layer"
    return GraphError(f"bottom {bottom!r} is not produced by any earlier layer or input",
                      location=loc, layer=decl.name, hint=hint)


def _find_cycle(blob: str, consumer: str, kept: Sequence[LayerDecl]) -> Optional[List[str]]:
    """If binding ``blob`` (produced later) into ``consumer`` closes a loop, return it."""
    g = nx.DiGraph()
    producers: Dict[str, str] = {}
    for decl in kept:
        for t in decl.spec.tops:
            producers.setdefault(t, decl.name)
    for decl in kept:
        for b in decl.spec.bottoms:
            if b in producers and producers[b] != decl.name:
                g.add_edge(producers[b], decl.name)
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
