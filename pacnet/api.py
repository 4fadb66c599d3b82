"""The public entry point: :func:`build` runs the whole pipeline.

    load -> validate + graph (IR) -> passes (fusion) -> shapes -> codegen -> Net

``PACNET_DEBUG=1`` logs the IR with shapes, ``=2`` also the generated code.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, List, Mapping, Optional, Sequence, Tuple

from pacnet import registry
from pacnet.codegen import Net, compile_graph, module_name
from pacnet.graph import Graph, build_graph
from pacnet.load import Source, load
from pacnet.passes import passes
from pacnet.shapes import bind_inputs, infer_shapes
from pacnet.weights import sources as weight_sources

log = logging.getLogger("pacnet")


def debug_level() -> int:
    try:
        return int(os.environ.get("PACNET_DEBUG", "0") or 0)
    except ValueError:
        return 0


def build(source: Source, *, inputs: Optional[Mapping[str, Sequence[int]]] = None,
          phase: str = "test", vars: Optional[Mapping[str, Any]] = None,
          overrides: Optional[Mapping[str, Any]] = None, fuse: bool = True,
          stages: Sequence[str] = (), level: int = 0, device: Any = None) -> Net:
    """Compile a net description into a :class:`~pacnet.codegen.Net`.

    Args:
      source: path to a YAML net (or a Caffe ``.prototxt``), or the net as a dict.
      inputs: concrete shapes for input blobs, e.g. ``{"data": (1, 3, 64, 64)}``; they also
        bind symbolic dims (``N``, ``H``...) used by other inputs.
      phase: ``"train"`` or ``"test"`` (Caffe's include/exclude rules; module mode).
      vars: values of ``${VAR}`` template variables.
      overrides: dotted keys to set after loading, e.g. ``{"layers.conv1.num_output": 32}``.
      fuse: run the fusion passes (``False`` keeps the graph as written).
      stages, level: Caffe's NetState stages and level for include/exclude rules.
      device: where parameters are created (default: torch's default device).  ``"meta"``
        builds without allocating or initialising anything: shapes, parameter counts and the
        code are all there, which is what ``pacnet build`` shows.

    Raises:
      PacnetError: for every mistake in the net, with file, line, layer and a hint.
    """
    source_name = None if isinstance(source, Mapping) else os.fspath(source)
    tree = load(source, vars=vars, overrides=overrides)
    graph = build_graph(tree, phase=phase, level=level, stages=stages, source=source_name)
    weight_sources(graph.config, file=source_name)  # the weights_from rules, checked up front
    input_shapes = bind_inputs(graph, inputs)
    if fuse:
        for name, fn in passes():
            graph = fn(graph, input_shapes)
    net = _compile(graph, input_shapes, device)
    if debug_level() >= 1:
        log.warning("pacnet: %s", describe(net))
    if debug_level() >= 2:
        log.warning("pacnet: generated code:\n%s", net.code)
    return net


def _compile(graph: Graph, input_shapes: Mapping[str, Sequence[int]], device: Any) -> Net:
    shapes = infer_shapes(graph, input_shapes)
    return compile_graph(graph, input_shapes, shapes, device=device)


def reshape(net: Net, inputs: Mapping[str, Sequence[int]]) -> Net:
    """The same net (graph, weights, mode) compiled for other input shapes, e.g.
    ``{"data": (2, 3, 65, 65)}`` (unnamed inputs keep theirs; symbolic dims bind as in
    :func:`build`).  A located ShapeError if a layer does not fit the new shapes."""
    given = {name: tuple(shape) for name, shape in net.inputs.items()}
    given.update({name: tuple(shape) for name, shape in inputs.items()})
    device = next((t.device for t in net.state_dict().values()), None)
    other = _compile(net.ir, bind_inputs(net.ir, given), device)
    other.load_state_dict(net.state_dict())
    return other.train(net.training)


@dataclass(frozen=True)
class LayerRow:
    """One row of the build table (plain data; the CLI draws it)."""

    name: str
    type: str
    bottoms: Tuple[str, ...]
    tops: Tuple[str, ...]
    shapes: Tuple[Tuple[int, ...], ...]
    params: int
    flops: int
    memory: int  # bytes of the layer's outputs at float32
    fused: Optional[str] = None
    backward: bool = False  # needs backward computation (a loss's gradient reaches it)


def summarize(net: Net) -> List[LayerRow]:
    """Per-layer facts for ``pacnet build``: shapes, parameter count, FLOPs, memory."""
    rows: List[LayerRow] = []
    seen: set = set()
    graph: Graph = net.ir
    for node in graph.nodes:
        module = net.get_submodule(module_name(node.name))
        count = 0
        for p in list(module.parameters()):
            if id(p) not in seen:
                seen.add(id(p))
                count += p.numel()
        in_shapes = [net.blob_shapes[b] for b in node.inputs]
        out_shapes = [net.blob_shapes[t] for t in node.outputs]
        flops = registry.get(node.type).flops(node.spec, in_shapes, out_shapes)
        memory = sum(4 * _numel(s) for s in out_shapes)
        rows.append(LayerRow(node.name, node.type, tuple(str(b) for b in node.inputs),
                             tuple(str(t) for t in node.outputs), tuple(out_shapes), count,
                             int(flops), memory, node.fused, net.backward_needs.layers[node.name]))
    return rows


def parameter_count(net: Net) -> int:
    """Learnable parameters, each shared tensor counted once."""
    return sum(p.numel() for p in net.parameters())  # Module.parameters() dedups by identity


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def describe(net: Net) -> str:
    lines = [f"net {net.ir.name} ({net.ir.phase}): inputs " +
             ", ".join(f"{k} {tuple(v)}" for k, v in net.inputs.items())]
    for row in summarize(net):
        lines.append(f"  {row.name} [{row.type}] {','.join(row.bottoms)} -> {','.join(row.tops)} "
                     f"{' '.join(str(s) for s in row.shapes)}")
    return "\n".join(lines)
