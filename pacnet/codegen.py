"""Code generation: IR -> one ``torch.nn.Module`` per layer -> ``torch.fx`` Graph -> :class:`Net`.

Node and module names are the YAML names, so ``print(net.code)`` reads like a hand-written
forward and ``state_dict`` keys are ``<layer>.<blob>``.  Blobs shared by ``param.name``
become one tensor object owned by the first layer that names it (Caffe's AppendParam).
"""

from __future__ import annotations

import copy
import keyword
import operator
import re
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import torch.fx as fx
from torch import nn

from pacnet import registry
from pacnet.backward import analyse
from pacnet.errors import GraphError, PacnetError
from pacnet.frozen import FrozenDict
from pacnet.graph import BlobRef, Graph, Node
from pacnet.schema import ParamSpec
from pacnet.shape_guard import check_input_shapes, guard_hook
from pacnet.shapes import Shape, latest_shapes


def _identifier(name: str) -> str:
    """A valid Python identifier for a blob name (fx node names must be identifiers)."""
    ident = re.sub(r"\W", "_", name)
    if not ident or ident[0].isdigit() or keyword.iskeyword(ident):
        ident = "_" + ident
    return ident


#: The facts a compiled Net carries as attributes (besides nn.Module's and GraphModule's).
NET_FACTS = ("ir", "inputs", "shapes", "blob_shapes", "param_specs", "loss_weights",
             "backward_needs", "config")


def module_name(layer_name: str) -> str:
    """Submodule name for a layer: the layer name, unless torch forbids it ('.' becomes '_')
    or it would shadow an attribute of the compiled module (``forward``, ``code``, ``train``,
    ...: a trailing '_' is added).  State-dict keys follow this name."""
    name = layer_name.replace(".", "_")
    while name in _reserved():
        name += "_"
    return name


def _reserved() -> set:
    global _RESERVED
    if _RESERVED is None:
        _RESERVED = set(dir(Net)) | set(NET_FACTS) | {"training", "graph", "code"}
    return _RESERVED


_RESERVED = None


def learnable_blobs(layer_type: registry.Layer, module: nn.Module) -> List[Tuple[str, torch.Tensor]]:
    """The module's learnable blobs that exist, in Caffe's blob order.

    Caffe numbers only the blobs a layer has: a Convolution without bias has one blob, and a
    Scale whose scale comes from a second bottom has its bias as blob 0.  ``param:`` entries
    and ``.caffemodel`` blobs are matched against this list.
    """
    out = []
    for attr in layer_type.blobs:
        tensor = _blob(module, attr)
        if tensor is not None:
            out.append((attr, tensor))
    return out


def build_modules(graph: Graph, shapes: Mapping[BlobRef, Shape]) -> Dict[str, nn.Module]:
    """Build every layer's module (Caffe fillers applied by each type)."""
    modules: Dict[str, nn.Module] = {}
    for node in graph.nodes:
        ltype = registry.get(node.type)
        try:
            module = ltype.build(node.spec, [shapes[b] for b in node.inputs])
        except PacnetError as err:
            raise err.at(node.spec.location, node.name, node.type) from None
        if not isinstance(module, nn.Module):
            raise TypeError(f"{node.type}.build returned {type(module).__name__}, not an nn.Module")
        modules[node.name] = module
    return modules


def share_blobs(graph: Graph, modules: Mapping[str, nn.Module]) -> Dict[str, Tuple[float, float]]:
    """Apply ``param`` specs: share named blobs, freeze ``lr_mult: 0``.

    Returns ``{state_dict key: (lr_mult, decay_mult)}`` for every learnable blob that has
    an owner (sharers map to the owner's key, so optimisers see each tensor once).
    """
    owners: Dict[str, Tuple[str, str, ParamSpec, Node]] = {}  # param name -> (layer, attr, spec, node)
    mults: Dict[str, Tuple[float, float]] = {}
    # Caffe lets any user of a shared blob set lr_mult/decay_mult for all of them.
    named: Dict[str, Dict[str, float]] = {}
    for node in graph.nodes:
        for p in node.params:
            if p.name:
                for field in ("lr_mult", "decay_mult"):
                    if getattr(p, field) is not None:
                        named.setdefault(p.name, {}).setdefault(field, getattr(p, field))
    for node in graph.nodes:
        ltype = registry.get(node.type)
        module = modules[node.name]
        present = learnable_blobs(ltype, module)
        if len(node.params) > len(present):
            raise node.spec.error(
                f"has {len(node.params)} 'param' entries but only {len(present)} learnable blob(s) "
                f"({', '.join(a for a, _ in present) or 'none'})", key="param", cls=GraphError)
        for index, (attr, tensor) in enumerate(present):
            spec = node.params[index] if index < len(node.params) else ParamSpec()
            key = f"{module_name(node.name)}.{attr}"
            if spec.name and spec.name in owners:
                o_layer, o_attr, o_spec, o_node = owners[spec.name]
                owner_tensor = _blob(modules[o_layer], o_attr)
                if spec.share_mode == "PERMISSIVE" and owner_tensor.numel() == tensor.numel() and \
                        owner_tensor.shape != tensor.shape:
                    raise node.spec.error(
                        f"param {spec.name!r}: PERMISSIVE sharing between shapes "
                        f"{tuple(owner_tensor.shape)} and {tuple(tensor.shape)} is not supported",
                        key="param", hint="share blobs of identical shape", cls=GraphError)
                if owner_tensor.shape != tensor.shape:
                    raise node.spec.error(
                        f"param {spec.name!r} is shared with layer {o_layer!r} but shapes differ: "
                        f"{tuple(tensor.shape)} here, {tuple(owner_tensor.shape)} there",
                        key="param", cls=GraphError)
                for field in ("lr_mult", "decay_mult"):
                    mine, theirs = getattr(spec, field), getattr(o_spec, field)
                    if mine is not None and theirs is not None and mine != theirs:
                        raise node.spec.error(
                            f"param {spec.name!r}: {field} {mine} differs from {theirs} set by "
                            f"layer {o_layer!r}", key="param", cls=GraphError,
                            hint="shared blobs must agree on lr_mult/decay_mult (or leave them unset)")
                _set_blob(module, attr, owner_tensor)
                continue
            shared = named.get(spec.name, {}) if spec.name else {}
            lr = spec.lr_mult if spec.lr_mult is not None else shared.get("lr_mult", 1.0)
            decay = spec.decay_mult if spec.decay_mult is not None else shared.get("decay_mult", 1.0)
            if spec.name:
                owners[spec.name] = (node.name, attr, spec, node)
            if isinstance(tensor, nn.Parameter):
                if lr == 0:
                    tensor.requires_grad_(False)
                mults[key] = (float(lr), float(decay))
    return mults


def _blob(module: nn.Module, attr: str) -> Optional[torch.Tensor]:
    owner, _, leaf = _resolve(module, attr)
    value = getattr(owner, leaf, None)
    return value if isinstance(value, torch.Tensor) else None


def _set_blob(module: nn.Module, attr: str, tensor: torch.Tensor) -> None:
    owner, _, leaf = _resolve(module, attr)
    if leaf in owner._parameters:
        owner._parameters[leaf] = tensor
    elif leaf in owner._buffers:
        owner._buffers[leaf] = tensor
    else:
        setattr(owner, leaf, tensor)


def _resolve(module: nn.Module, attr: str) -> Tuple[nn.Module, str, str]:
    parts = attr.split(".")
    owner = module
    for p in parts[:-1]:
        owner = getattr(owner, p)
    return owner, ".".join(parts[:-1]), parts[-1]


def build_fx_graph(graph: Graph) -> fx.Graph:
    """The forward as an fx Graph: one placeholder per input, one call per layer,
    returning a dict of output blobs.  A bottom with ``propagate_down: false`` is passed as
    ``blob.detach()``: no gradient flows into it from that layer (Caffe's semantics)."""
    g = fx.Graph()
    env: Dict[BlobRef, fx.Node] = {}
    detached: Dict[BlobRef, fx.Node] = {}
    for name in graph.inputs:
        env[BlobRef(name)] = g.placeholder(_identifier(name))
    for node in graph.nodes:
        args = []
        for ref, down in zip(node.inputs, node.propagate_down):
            if not down and ref not in detached:
                detached[ref] = g.create_node("call_method", "detach", (env[ref],), {},
                                              name=_identifier(ref.name) + "_detached")
            args.append(env[ref] if down else detached[ref])
        first = node.outputs[0] if node.outputs else None
        call = g.create_node("call_module", module_name(node.name), tuple(args), {},
                             name=_identifier(first.name if first and len(node.outputs) == 1 else node.name))
        if len(node.outputs) == 1:
            env[node.outputs[0]] = call
        else:
            for i, ref in enumerate(node.outputs):
                env[ref] = g.create_node("call_function", operator.getitem, (call, i), {},
                                         name=_identifier(ref.name))
    g.output({ref.name: env[ref] for ref in graph.outputs})
    return g


class Net(fx.GraphModule):
    """A compiled pacnet net: a ``torch.fx.GraphModule`` with the build's facts attached.

    ``forward(*inputs)`` (or keyword arguments named after the input blobs) returns a dict
    ``{output blob: tensor}``; :meth:`total_loss` turns it into Caffe's training loss.
    Submodules are named after the layers (see :func:`module_name`).  Attributes:
    ``shapes`` (blob -> shape of its last version), ``inputs`` (input blob -> shape),
    ``loss_weights`` (output blob -> weight), ``param_specs`` (state_dict key -> (lr_mult,
    decay_mult)), ``backward_needs`` (:class:`~pacnet.backward.BackwardNeeds`: which layers
    and learnable blobs a loss's gradient reaches), ``ir`` (the :class:`~pacnet.graph.Graph`),
    ``blob_shapes`` (every version), ``config`` (the resolved net file, including
    ``solver:``/``data:``), and ``code`` (the generated Python source of ``forward``).

    Called at input shapes other than the build's, a Net first checks that every layer
    computes at those shapes what the file says (:meth:`check_input_shapes`): a net of
    convolutions runs at any valid size, one whose layers depend on the build's sizes is
    refused with an error naming the layer.

    A Net deep-copies, pickles and ``torch.save``s like any module: the copy is a Net with
    the same layers, weights, buffers and mode (forward hooks are not copied).
    """

    def total_loss(self, outputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Caffe's total loss: the sum over loss tops of ``loss_weight * blob.sum()``."""
        if not self.loss_weights:
            raise PacnetError("this net has no loss (no loss layer or loss_weight in this phase)",
                              hint="build it with phase='train', or add a loss layer")
        total = None
        for name, weight in self.loss_weights.items():
            term = outputs[name].sum() * weight
            total = term if total is None else total + term
        return total

    def check_input_shapes(self, shapes: Mapping[str, Shape]) -> None:
        """Raise a :class:`~pacnet.errors.PacnetError` unless the net, as built, computes
        what its file says at these input shapes (input blob -> shape; see
        :mod:`pacnet.shape_guard`).  Every call of the net runs this check for input shapes
        other than the build's (once per distinct shapes)."""
        check_input_shapes(self, shapes)

    def __reduce__(self):
        facts = {name: getattr(self, name) for name in NET_FACTS}
        return (_assemble, (dict(self.named_children()), facts, self.training))

    def __deepcopy__(self, memo: Dict[int, Any]) -> "Net":
        rebuild, args = self.__reduce__()
        return rebuild(*copy.deepcopy(args, memo))


def _assemble(modules: Mapping[str, nn.Module], facts: Mapping[str, Any], training: bool) -> Net:
    """A Net from its layer modules (by module name) and its facts (``NET_FACTS``)."""
    root = nn.Module()
    for name, module in modules.items():
        root.add_module(name, module)
    graph: Graph = facts["ir"]
    net = Net(root, build_fx_graph(graph), class_name=_identifier(graph.name))
    for name in NET_FACTS:
        setattr(net, name, facts[name])
    net.register_forward_pre_hook(guard_hook, with_kwargs=True)
    return net.train(training)


def compile_graph(graph: Graph, input_shapes: Mapping[str, Shape],
                  shapes: Mapping[BlobRef, Shape], device: Any = None) -> Net:
    """Build the layers' modules (on ``device``), share and freeze blobs, run the
    backward-need analysis and assemble the :class:`Net` with its facts."""
    if device is None:
        modules = build_modules(graph, shapes)
    else:
        with torch.device(device):
            modules = build_modules(graph, shapes)
    mults = share_blobs(graph, modules)
    by_module = {module_name(name): module for name, module in modules.items()}
    parameters = {f"{m}.{key}": p for m, module in by_module.items()
                  for key, p in module.named_parameters(remove_duplicate=False)}
    facts = {
        "ir": graph,
        "inputs": FrozenDict(input_shapes),
        "blob_shapes": FrozenDict(shapes),
        "shapes": FrozenDict(latest_shapes(graph, shapes)),
        "param_specs": FrozenDict(mults),
        "loss_weights": FrozenDict({ref.name: w for n in graph.nodes
                                    for ref, w in zip(n.outputs, n.loss_weights) if w}),
        "backward_needs": analyse(graph, modules, mults, parameters),
        "config": graph.config,
    }
    return _assemble(by_module, facts, training=graph.phase == "train")
