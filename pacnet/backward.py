"""Caffe's backward-need analysis: which layers and learnable blobs a loss's gradient reaches.

Caffe's ``Net::Init`` logs, for every layer, whether it "needs backward computation", and
never updates a learnable blob through a path that cannot carry a gradient.  The same
analysis on the IR, as plain data (:class:`BackwardNeeds`, ``Net.backward_needs``):

* a bottom can receive a gradient only if the layer's ``propagate_down`` allows it and the
  layer type passes one to it at all (:meth:`~pacnet.registry.Layer.gradient_bottoms`:
  labels, indices and reference shapes get none);
* a layer is *reached* when one of its tops has a non-zero ``loss_weight``, or feeds a
  reached layer through a bottom that can receive a gradient;
* a blob version *wants* a gradient when its producer has a trainable blob
  (``lr_mult`` != 0) or a bottom that can receive a gradient and wants one (net inputs do
  not);
* a layer *needs backward* when it is reached and has a trainable blob or a bottom that
  receives a gradient; a trainable blob *learns* when some reached layer uses it.

The trainer warns about trainable blobs that never learn and takes them out of autograd,
so DistributedDataParallel waits for exactly the gradients that will come.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping, Set, Tuple

from torch import nn

from pacnet import registry
from pacnet.frozen import FrozenDict
from pacnet.graph import BlobRef, Graph


@dataclass(frozen=True)
class BackwardNeeds:
    """The result of the analysis for one compiled net.

    ``layers``: layer name -> whether it needs backward computation.
    ``bottoms``: layer name -> per bottom, whether a gradient flows into it.
    ``blobs``: state_dict key of every trainable blob (``lr_mult`` != 0) -> whether a
    loss's gradient can reach it.
    """

    layers: Mapping[str, bool]
    bottoms: Mapping[str, Tuple[bool, ...]]
    blobs: Mapping[str, bool]

    @property
    def never_learn(self) -> Tuple[str, ...]:
        """Trainable blobs no gradient can reach (state_dict keys, in net order)."""
        return tuple(key for key, learns in self.blobs.items() if not learns)


def analyse(graph: Graph, modules: Mapping[str, nn.Module],
            param_specs: Mapping[str, Tuple[float, float]],
            parameters: Mapping[str, nn.Parameter]) -> BackwardNeeds:
    """Run the analysis on ``graph`` whose layers (by name) are built as ``modules``, blobs
    shared and ``lr_mult: 0`` blobs frozen; ``param_specs`` maps state_dict keys to
    (lr_mult, decay_mult), ``parameters`` state_dict keys to the tensors."""
    passes: Dict[str, Tuple[bool, ...]] = {}
    for node in graph.nodes:
        gradient = registry.get(node.type).gradient_bottoms(node.spec)
        passes[node.name] = tuple(pd and g for pd, g in zip(node.propagate_down, gradient))

    def trainable(name: str) -> bool:
        return any(p.requires_grad for p in modules[name].parameters())

    wants: Set[BlobRef] = set()
    for node in graph.nodes:
        into = zip(passes[node.name], node.inputs)
        if trainable(node.name) or any(p and b in wants for p, b in into):
            wants.update(node.outputs)

    reached_blobs: Set[BlobRef] = set()
    reached: Set[str] = set()
    for node in reversed(graph.nodes):
        if any(w for w in node.loss_weights) or any(t in reached_blobs for t in node.outputs):
            reached.add(node.name)
            reached_blobs.update(b for p, b in zip(passes[node.name], node.inputs) if p)

    layers: Dict[str, bool] = {}
    bottoms: Dict[str, Tuple[bool, ...]] = {}
    learning: Set[int] = set()
    for node in graph.nodes:
        into = tuple(node.name in reached and p and b in wants
                     for p, b in zip(passes[node.name], node.inputs))
        layers[node.name] = node.name in reached and (trainable(node.name) or any(into))
        bottoms[node.name] = into
        if node.name in reached:
            learning.update(id(p) for p in modules[node.name].parameters() if p.requires_grad)
    blobs = {key: id(parameters[key]) in learning for key, (lr, _) in param_specs.items()
             if lr != 0 and parameters[key].requires_grad}
    return BackwardNeeds(FrozenDict(layers), FrozenDict(bottoms), FrozenDict(blobs))
