"""Fusion pass: the segaware Im2col chain becomes one fused PAC convolution.

The segmentation-aware conv is written in Caffe as

    X = Im2col(x; k, pad, stride, dilation)           N x C*k*k x H' x W'
    T = Tile(M; axis 1, tiles C)                       M: N x k*k x H' x W' (e.g. exp(-l*Im2dist(emb)))
    P = Eltwise PROD(X, T)
    y = Convolution(P; bottom_is_im2col: true)

which materialises three ``C*k*k``-channel tensors.  Since ``P[c*k*k + t] = X[c, t] * M[t]``
whatever M is, the chain equals ``SegawareConvolution(x, M)`` with the conv's weights: one
call of the fused PAC kernel, same numbers, no column tensors.  Layers left without
consumers (the Im2col, the Tile) are removed.  A chain that does not match exactly stays as
written; ``PACNET_DEBUG=1`` says why.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Dict, List, Mapping, Optional, Set, Tuple

from pacnet.graph import BlobRef, Graph, Node
from pacnet.frozen import FrozenDict
from pacnet.registry import LayerSpec
from pacnet.passes import register_pass
from pacnet.schema import fill_defaults
from pacnet.shapes import infer_shapes
from pacnet import registry

log = logging.getLogger("pacnet")

FUSED_NOTE = "Im2col + Tile + Eltwise PROD + Convolution(bottom_is_im2col) -> fused PAC conv"


def _pair(value, default):
    if value is None:
        return (default, default)
    if isinstance(value, int):
        return (value, value)
    return (int(value[0]), int(value[-1]))


def _geometry(spec: LayerSpec) -> Dict[str, Tuple[int, int]]:
    """Im2col's kernel/pad/stride/dilation as (h, w) pairs, from any of Caffe's forms."""
    def hw(name, h, w, default):
        if spec.get(h) is not None and spec.get(w) is not None:
            return (int(spec[h]), int(spec[w]))
        return _pair(spec.get(name), default)

    return {"kernel_size": hw("kernel_size", "kernel_h", "kernel_w", None),
            "pad": hw("pad", "pad_h", "pad_w", 0),
            "stride": hw("stride", "stride_h", "stride_w", 1),
            "dilation": _pair(spec.get("dilation"), 1)}


def fuse_segaware(graph: Graph, input_shapes: Mapping[str, Tuple[int, ...]]) -> Graph:
    """Rewrite every matching segaware chain; see the module docstring."""
    candidates = [n for n in graph.nodes if n.type == "Convolution" and n.spec.get("bottom_is_im2col")]
    if not candidates:
        return graph
    shapes = infer_shapes(graph, input_shapes)
    producer: Dict[BlobRef, Node] = {t: n for n in graph.nodes for t in n.outputs}
    consumers: Dict[BlobRef, List[Node]] = {}
    for n in graph.nodes:
        for b in n.inputs:
            consumers.setdefault(b, []).append(n)
    outputs: Set[BlobRef] = set(graph.outputs)

    replaced: Dict[str, Node] = {}
    removed: Set[str] = set()
    for conv in candidates:
        fused, reason = _match(conv, producer, consumers, outputs, shapes)
        if fused is None:
            log.info("pacnet: fusion: %s left unfused: %s", conv.name, reason)
            continue
        replaced[conv.name] = fused
        removed.add(producer[conv.inputs[0]].name)  # the Eltwise PROD

    if not replaced:
        return graph
    nodes = [replaced.get(n.name, n) for n in graph.nodes if n.name not in removed]
    nodes = _remove_dead(nodes, outputs)
    return graph.with_nodes(nodes)


def _match(conv: Node, producer, consumers, outputs, shapes) -> Tuple[Optional[Node], str]:
    p_ref = conv.inputs[0]
    prod = producer.get(p_ref)
    if prod is None or prod.type != "Eltwise" or prod.spec.get("operation", "SUM") != "PROD":
        return None, "its bottom is not an Eltwise PROD"
    if len(prod.inputs) != 2:
        return None, "the Eltwise PROD does not have exactly two bottoms"
    if len(consumers.get(p_ref, [])) != 1 or p_ref in outputs:
        return None, f"{p_ref.name} is used elsewhere too"
    by_type = {producer[b].type: (b, producer[b]) for b in prod.inputs if b in producer}
    if set(by_type) != {"Im2col", "Tile"}:
        return None, "the PROD does not multiply an Im2col by a Tile"
    x_col, im2col = by_type["Im2col"]
    t_ref, tile = by_type["Tile"]
    if len(consumers.get(x_col, [])) != 1 or x_col in outputs:
        return None, f"the Im2col output {x_col.name} is used elsewhere too"
    x_ref, m_ref = im2col.inputs[0], tile.inputs[0]
    x_shape, m_shape = shapes[x_ref], shapes[m_ref]
    geo = _geometry(im2col.spec)
    kh, kw = geo["kernel_size"]
    if kh % 2 == 0 or kw % 2 == 0:
        return None, "even kernel sizes are not fused"
    if tile.spec.get("axis", 1) not in (1, -3) or tile.spec.get("tiles") != x_shape[1]:
        return None, f"the Tile does not repeat the mask {x_shape[1]} times along the channels"
    if len(m_shape) != 4 or m_shape[1] != kh * kw or tuple(m_shape[2:]) != tuple(shapes[x_col][2:]):
        return None, f"the mask {m_shape} is not N x {kh * kw} x {tuple(shapes[x_col][2:])}"
    if conv.spec.get("group", 1) != 1:
        return None, "grouped convolutions are not fused"
    if any(not pd for pd in conv.propagate_down) or any(not pd for pd in prod.propagate_down):
        return None, "propagate_down is set in the chain"

    params = {k: conv.spec.params[k] for k in ("num_output", "bias_term", "weight_filler", "bias_filler")
              if k in conv.spec.params}
    params.update({k: list(v) for k, v in geo.items()})
    params.update(group=1)
    fill_defaults(params, registry.get("SegawareConvolution").schema())
    spec = replace(conv.spec, type="SegawareConvolution", params=FrozenDict(params),
                   bottoms=(x_ref.name, m_ref.name))
    return replace(conv, spec=spec, inputs=(x_ref, m_ref), propagate_down=(True, True),
                   fused=FUSED_NOTE), ""


def _remove_dead(nodes: List[Node], outputs: Set[BlobRef]) -> List[Node]:
    """Drop layers whose tops nobody reads (and that carry no loss), until none is left."""
    while True:
        used = {b for n in nodes for b in n.inputs} | outputs
        dead = [n for n in nodes if n.outputs and not any(t in used for t in n.outputs)
                and not any(n.loss_weights)]
        if not dead:
            return nodes
        names = {n.name for n in dead}
        nodes = [n for n in nodes if n.name not in names]


register_pass("fuse_segaware", fuse_segaware)
