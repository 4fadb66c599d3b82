"""Export a compiled net, or any ``nn.Module`` built on pacnet's ops, to ONNX for stock onnxruntime.

    module --torch.export--> ExportedProgram --functionalize--> --torch.onnx (dynamo)-->
    ONNX model with opaque ``pacnet::*`` nodes --attach functions--> check in onnxruntime
    --> written atomically

pacnet's custom ops become nodes of the ``pacnet`` domain defined by ONNX functions of
standard ops (:mod:`pacnet.onnx_ops`), so the file runs in onnxruntime with no custom
library and Netron shows one expandable node per PAC op.  Everything else goes through
``torch.onnx``'s own translations.  Inputs and outputs keep their blob names.

A module is exported in eval mode (Dropout off, BatchNorm with its statistics) and put
back in its mode afterwards.  Nothing is written unless the model loads in onnxruntime.
Needs the ``onnx`` extra: ``pip install 'pacnet[onnx]'``.
"""

from __future__ import annotations

import contextlib
import logging
import operator
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from pacnet.errors import ExportError, PacnetError

#: Models whose weights exceed this are saved with their weights in ``<file>.data`` beside
#: the ``.onnx`` file (protobuf cannot hold 2 GiB).
EXTERNAL_DATA_BYTES = 1 << 30

Shape = Tuple[Union[int, str], ...]


@dataclass(frozen=True)
class OutputCheck:
    """onnxruntime against PyTorch for one output: the largest absolute difference, that
    difference relative to the largest PyTorch magnitude, and whether it is within
    ``atol + rtol * max|torch|``."""

    name: str
    shape: Tuple[int, ...]
    max_abs: float
    max_rel: float
    ok: bool


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_onnx` wrote: the file, its opset, its inputs and outputs (name ->
    shape; a dynamic dimension is its name), the ``pacnet`` functions it defines, notes for
    the user, and the verification (``None`` unless asked for)."""

    path: str
    opset: int
    inputs: Dict[str, Shape]
    outputs: Dict[str, Shape]
    functions: Tuple[str, ...]
    notes: Tuple[str, ...] = ()
    checks: Optional[Tuple[OutputCheck, ...]] = None

    @property
    def verified(self) -> bool:
        return self.checks is not None and all(c.ok for c in self.checks)


def _requirements() -> None:
    missing = []
    for module in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ExportError(f"exporting to ONNX needs {', '.join(missing)}, which cannot be "
                          f"imported", hint="pip install 'pacnet[onnx]'")


def default_opset() -> int:
    """The opset ``torch.onnx`` targets by default (at least the ``pacnet`` functions')."""
    from torch.onnx._constants import ONNX_DEFAULT_OPSET

    from pacnet.onnx_ops import MIN_OPSET

    return max(ONNX_DEFAULT_OPSET, MIN_OPSET)


# ----------------------------------------------------------------------------- inputs

def _example_inputs(model: nn.Module, inputs: Any, input_names: Optional[Sequence[str]],
                    seed: int) -> Tuple[List[str], Tuple[torch.Tensor, ...]]:
    """``(names, tensors)`` of the model's positional inputs."""
    from pacnet.codegen import Net

    if inputs is None:
        if not isinstance(model, Net):
            raise ExportError("give example inputs for a module (a tensor, a tuple of tensors, or "
                              "a dict name -> tensor)", hint="e.g. inputs=(torch.rand(1, 3, 64, "
                                                               "64),)")
        gen = torch.Generator().manual_seed(seed)
        device, dtype = _device_dtype(model)
        inputs = {name: torch.rand(shape, generator=gen, dtype=dtype).to(device)
                  for name, shape in model.inputs.items()}
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    if isinstance(inputs, Mapping):
        names, tensors = list(inputs), tuple(inputs.values())
    else:
        tensors = tuple(inputs)
        names = ([f"input_{i}" for i in range(len(tensors))] if len(tensors) > 1 else ["input"])
    if input_names is not None:
        if len(input_names) != len(tensors):
            raise ExportError(f"{len(input_names)} input names for {len(tensors)} inputs")
        names = list(input_names)
    for name, t in zip(names, tensors):
        if not isinstance(t, torch.Tensor):
            raise ExportError(f"input {name!r} must be a tensor, got {type(t).__name__}")
    return names, tensors


def _device_dtype(model: nn.Module) -> Tuple[torch.device, torch.dtype]:
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    return torch.device("cpu"), torch.get_default_dtype()


def _output_names(model: nn.Module, outputs: Any, given: Optional[Sequence[str]]) -> List[str]:
    flat = _flatten(outputs)
    if given is not None:
        if len(given) != len(flat):
            raise ExportError(f"{len(given)} output names for {len(flat)} outputs")
        return list(given)
    if isinstance(outputs, Mapping):
        return [str(k) for k in outputs]
    return ["output"] if len(flat) == 1 else [f"output_{i}" for i in range(len(flat))]


def _flatten(outputs: Any) -> List[torch.Tensor]:
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if isinstance(outputs, Mapping):
        outputs = list(outputs.values())
    flat = []
    for item in outputs:
        flat.extend(_flatten(item))
    return flat


# ----------------------------------------------------------------------------- where

def _layer_of(node: torch.fx.Node, model: nn.Module) -> Tuple[Optional[str], Optional[str]]:
    """``(layer, type)`` an exported node comes from: the net's layer name and type, or a
    submodule's path and class for other modules; ``(None, None)`` if unknown."""
    from pacnet.codegen import Net, module_name

    stack = list((node.meta.get("nn_module_stack") or {}).values())
    paths = [(path, cls) for path, cls in stack if path]
    if not paths:
        return None, None
    path, cls = paths[0] if isinstance(model, Net) else paths[-1]
    if isinstance(model, Net):
        for layer in model.ir.nodes:
            if module_name(layer.name) == path:
                return layer.name, layer.type
    return path, str(cls).rsplit(".", 1)[-1]


def _located(model: nn.Module, node: Optional[torch.fx.Node], message: str,
             hint: Optional[str] = None) -> ExportError:
    layer, kind = _layer_of(node, model) if node is not None else (None, None)
    location = None
    if layer is not None:
        location = _layer_location(model, layer)
    return ExportError(message, location=location, layer=layer, layer_type=kind, hint=hint)


def _layer_location(model: nn.Module, layer: str):
    from pacnet.codegen import Net

    if isinstance(model, Net):
        for node in model.ir.nodes:
            if node.name == layer:
                return node.spec.location
    return None


# ----------------------------------------------------------------------------- program

def _capture(model: nn.Module, tensors: Tuple[torch.Tensor, ...],
             dynamic_shapes: Optional[tuple] = None) -> torch.export.ExportedProgram:
    try:
        with torch.no_grad(), _quiet():
            ep = torch.export.export(model, tensors, dynamic_shapes=dynamic_shapes, strict=False)
            return ep.run_decompositions({})  # functional, keeping the ops torch.onnx knows
    except PacnetError as err:
        layer, kind = _layer_in_traceback(err, model)
        raise err.at(_layer_location(model, layer), layer, kind) from None
    except Exception as err:
        layer, kind = _layer_in_traceback(err, model)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ExportError(f"torch.export cannot trace the forward: {first}",
                          location=_layer_location(model, layer), layer=layer, layer_type=kind,
                          hint="a forward torch.export can trace decides with sizes and "
                               "parameters, not with tensor values") from err


def _layer_in_traceback(err: BaseException, model: nn.Module
                        ) -> Tuple[Optional[str], Optional[str]]:
    """The layer (a net's) or submodule (a module's) whose forward raised ``err``: the
    innermost frame of the traceback whose ``self`` is one of the model's submodules."""
    from pacnet.codegen import Net, module_name

    paths = {id(m): path for path, m in model.named_modules() if path}
    found = None
    tb = err.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if id(owner) in paths:
            found = (paths[id(owner)], owner)
        tb = tb.tb_next
    if found is None:
        return None, None
    path, owner = found
    if isinstance(model, Net):
        layer = path.split(".")[0]
        for node in model.ir.nodes:
            if module_name(node.name) == layer:
                return node.name, node.type
    return path, type(owner).__name__


def functionalize(ep: torch.export.ExportedProgram, model: nn.Module) -> None:
    """Rewrite the in-place pacnet ops (``auto_functionalized`` after ``run_decompositions``)
    into out-of-place ops, in place: ``pac_conv_add_(out, x, K, w, ..., alpha)`` becomes
    ``out + alpha * pac_conv(x, K, w, None, ...)``."""
    graph = ep.graph_module.graph
    wrappers = {getattr(torch.ops.higher_order, name, None)
                for name in ("auto_functionalized", "auto_functionalized_v2")} - {None}
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in wrappers:
            continue
        name = getattr(getattr(node.args[0], "_schema", None), "name", "")
        if not name.startswith("pacnet::"):
            continue
        if name != "pacnet::pac_conv_add_":
            raise _located(model, node, f"op {name} cannot be exported to ONNX: it works in "
                                        f"place and has no out-of-place form",
                           hint="add one to pacnet.onnx_ops.FUNCTIONALIZED and "
                                "pacnet.export.functionalize")
        kw = dict(node.kwargs)
        if "_all_bases" in kw:                       # auto_functionalized_v2
            if any(k.startswith("_out_") and k != "_out_base_index" for k in kw):
                raise _located(model, node, "pac_conv_add_ into a view of a tensor cannot be "
                                            "exported", hint="accumulate into a whole tensor")
            base = kw["_all_bases"][kw["_out_base_index"]]
            result_index = 1 + kw["_out_base_index"]
        else:                                        # auto_functionalized (v1)
            base, result_index = kw["out"], 1
        args = (kw["x"], kw["K"], kw["weight"], None, kw["stride"], kw["padding"],
                kw["dilation"], kw["shared_filters"])
        with graph.inserting_before(node):
            conv = graph.call_function(torch.ops.pacnet.pac_conv.default, args)
            scaled = graph.call_function(torch.ops.aten.mul.Tensor, (conv, kw["alpha"]))
            total = graph.call_function(torch.ops.aten.add.Tensor, (base, scaled))
        values = [a.meta["val"] if isinstance(a, torch.fx.Node) else a for a in args]
        fake = values[0].fake_mode
        with fake:
            conv.meta["val"] = torch.ops.pacnet.pac_conv.default(*values)
            scaled.meta["val"] = conv.meta["val"] * kw["alpha"]
            total.meta["val"] = base.meta["val"] + scaled.meta["val"]
        for new in (conv, scaled, total):
            new.meta["nn_module_stack"] = node.meta.get("nn_module_stack")
        for user in list(node.users):
            if user.target is not operator.getitem:
                raise _located(model, node, "unexpected use of an in-place pac op's result")
            if user.args[1] == result_index:
                user.replace_all_uses_with(total)
            graph.erase_node(user)
        graph.erase_node(node)
    graph.lint()
    ep.graph_module.recompile()


def _check_translations(ep: torch.export.ExportedProgram, model: nn.Module) -> None:
    """Every pacnet op of the program has a translation (else an error naming its layer)."""
    from pacnet.onnx_ops import BACKWARD_ONLY, LOWERINGS

    for node in ep.graph.nodes:
        schema = getattr(node.target, "_schema", None)
        if node.op != "call_function" or schema is None or not schema.name.startswith("pacnet::"):
            continue
        if schema.name not in LOWERINGS:
            why = ("it is a backward op" if schema.name in BACKWARD_ONLY
                   else "pacnet.onnx_ops has no translation for it")
            raise _located(model, node, f"op {schema.name} cannot be exported to ONNX: {why}",
                           hint="add an ONNX function and a translation to pacnet/onnx_ops.py")


@contextlib.contextmanager
def _quiet():
    """torch.export and torch.onnx log progress, specialisations and optional-package
    warnings; what matters reaches the user as an error or a note instead."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "torch.export",
                                              "torch._export", "torch.fx", "torch._dynamo")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _to_onnx(ep: torch.export.ExportedProgram, model: nn.Module, input_names: Sequence[str],
             output_names: Sequence[str], opset: int):
    from pacnet.onnx_ops import translation_table

    try:
        with _quiet():
            program = torch.onnx.export(ep, (), opset_version=opset,
                                        custom_translation_table=translation_table(),
                                        dynamo=True, verbose=False)
    except Exception as err:
        text = str(err)
        found = re.search(r"No ONNX function found for <OpOverload\(op='([\w.]+)'", text)
        if found is None:
            raise  # not a missing translation: a bug, keep its traceback
        node = _find_node(ep, re.search(r"translating node %(\w+)", text))
        raise _located(model, node, f"torch.onnx cannot translate {found.group(1)}",
                       hint="this op has no ONNX translation in torch.onnx at opset "
                            f"{opset}; try another --opset, or replace the op") from err
    _name_io(program.model.graph, input_names, output_names)
    return program


def _name_io(graph, input_names: Sequence[str], output_names: Sequence[str]) -> None:
    """Give the graph's inputs and outputs these names.  Inner values holding one of them are
    renamed; an output that passes an input through keeps the input (and its name); an
    output that is an initializer or repeats another output gets an Identity node of its
    own (ONNX names every value once)."""
    import onnx_ir as ir

    if len(set(output_names)) != len(output_names) or len(set(input_names)) != len(input_names):
        raise ExportError(f"input and output names must be unique, got {list(input_names)} and "
                          f"{list(output_names)}")
    wanted = set(input_names) | set(output_names)
    for node in graph:
        for value in node.outputs:
            if value.name in wanted:
                value.name = f"{value.name}__inner"
    for name in [n for n in graph.initializers if n in wanted]:
        value = graph.initializers.pop(name)
        value.name = f"{name}__weight"
        graph.register_initializer(value)
    for value, name in zip(graph.inputs, input_names):
        value.name = name
    seen = set()
    for i, name in enumerate(output_names):
        value = graph.outputs[i]
        while value.producer() is not None and value.producer().op_type == "Identity":
            value = value.producer().inputs[0]
        if value.is_graph_input() and value.name == name:
            graph.outputs[i] = value
            continue
        value = graph.outputs[i]
        if value.is_graph_input() or value.is_initializer() or id(value) in seen:
            copy = ir.Node("", "Identity", [value], num_outputs=1)
            graph.append(copy)
            copy.outputs[0].type, copy.outputs[0].shape = value.type, value.shape
            graph.outputs[i] = value = copy.outputs[0]
        if name in input_names:
            raise ExportError(f"output {name!r} has the name of an input but other values",
                              hint="rename the output")
        seen.add(id(value))
        value.name = name


def _find_node(ep: torch.export.ExportedProgram, match) -> Optional[torch.fx.Node]:
    if match is None:
        return None
    for node in ep.graph.nodes:
        if node.name == match.group(1):
            return node
    return None


# ----------------------------------------------------------------------------- files

def _save_checked(program, path: str, check: Optional[Callable[[str], None]] = None) -> None:
    """Write the model beside ``path``, load it in onnxruntime (and run ``check`` on the
    written file), then move it into place (with its ``.data`` file when the weights are
    large); nothing is left on failure."""
    import onnxruntime as ort

    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    size = sum(v.const_value.nbytes for v in program.model.graph.initializers.values()
               if v.const_value is not None)
    external = size > EXTERNAL_DATA_BYTES
    staging = tempfile.mkdtemp(prefix=".tmp-export-", dir=folder)
    try:
        staged = os.path.join(staging, os.path.basename(path))
        with _quiet():
            program.save(staged, external_data=external)
        try:
            ort.InferenceSession(staged, providers=["CPUExecutionProvider"])
        except Exception as err:
            raise ExportError(f"onnxruntime cannot load the exported model: "
                              f"{str(err).strip().splitlines()[0]}",
                              hint="nothing was written; please report this") from err
        if check is not None:
            check(staged)
        for name in sorted(os.listdir(staging), key=lambda n: n == os.path.basename(path)):
            os.replace(os.path.join(staging, name), os.path.join(folder, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _check_destination(path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ExportError(f"cannot write {path}: it is a folder", hint="give a file name, "
                                                                        "e.g. net.onnx")
    if not os.path.isdir(folder):
        raise ExportError(f"cannot write {path}: the folder {folder} does not exist",
                          hint="create it first, or give another -o path")
    if not os.access(folder, os.W_OK):
        raise ExportError(f"cannot write {path}: the folder {folder} is not writable")


def _io_shapes(values) -> Dict[str, Shape]:
    return {v.name: tuple(d if isinstance(d, int) else str(d) for d in v.shape) for v in values}


# ----------------------------------------------------------------------------- verify

def verify_onnx(path: str, reference: Callable[..., Any], inputs: Mapping[str, torch.Tensor],
                output_names: Sequence[str], *, rtol: float = 1e-4,
                atol: float = 1e-5) -> Tuple[OutputCheck, ...]:
    """Run the ONNX file in onnxruntime (CPU) and ``reference`` (the module, in the mode it
    was exported in) in PyTorch on ``inputs`` (name -> tensor, in the model's input order)
    and compare every output."""
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    feed = {name: t.detach().cpu().numpy() for name, t in inputs.items()}
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))
    with torch.no_grad():
        want = _flatten(reference(*inputs.values()))
    checks = []
    for name, ref in zip(output_names, want):
        ref = ref.detach().cpu().double().numpy()
        out = np.asarray(got[name], dtype=np.float64)
        if out.shape != ref.shape:
            checks.append(OutputCheck(name, tuple(out.shape), float("inf"), float("inf"), False))
            continue
        # equal values (infinities too) and NaN on both sides agree; NaN on one side does not
        same = (out == ref) | (np.isnan(out) & np.isnan(ref))
        with np.errstate(invalid="ignore"):  # inf - inf where both are inf: masked by same
            diff = np.nan_to_num(np.where(same, 0.0, np.abs(out - ref)), nan=np.inf)
        max_abs = float(diff.max()) if diff.size else 0.0
        finite = np.abs(ref[np.isfinite(ref)])
        scale = float(finite.max()) if finite.size else 0.0
        checks.append(OutputCheck(name, tuple(ref.shape), max_abs,
                                  max_abs / scale if scale > 0 else max_abs,
                                  bool(max_abs <= atol + rtol * scale)))
    return tuple(checks)


# ----------------------------------------------------------------------------- dynamic shapes

@dataclass(frozen=True)
class _Dynamic:
    """A dynamic export: the module and inputs torch.export traces (a batch of at least 2,
    so that the batch is not taken for a constant), the ``dynamic_shapes`` for it, the name
    of every dynamic (input, axis), and the dims that stay fixed, with the reason."""

    module: nn.Module
    tensors: Tuple[torch.Tensor, ...]
    dynamic_shapes: Tuple[Dict[int, Any], ...]
    names: Dict[Tuple[int, int], str]
    fixed: Dict[str, str]


def _random_like_shapes(shapes: Mapping[str, Sequence[int]], like: Sequence[torch.Tensor],
                        seed: int) -> Tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.rand(tuple(s), generator=gen, dtype=t.dtype).to(t.device)
                 for s, t in zip(shapes.values(), like))


def _net_dynamic(net, requested: Any, tensors: Tuple[torch.Tensor, ...], seed: int) -> _Dynamic:
    """The dynamic export of a net's symbolic input dims (``N``, ``H``, ...): all of them
    (``requested is True``) where the net lets them vary, or exactly the named ones."""
    from pacnet.api import reshape

    graph = net.ir
    axes: Dict[str, List[Tuple[int, int]]] = {}   # symbol -> (input index, axis)
    values: Dict[str, int] = {}
    for i, (name, declared) in enumerate(graph.inputs.items()):
        for axis, dim in enumerate(declared):
            if isinstance(dim, str):
                axes.setdefault(dim, []).append((i, axis))
                values[dim] = net.inputs[name][axis]
    wanted = list(axes) if requested is True else [str(d) for d in requested]
    unknown = [d for d in wanted if d not in axes]
    if unknown:
        raise ExportError(f"the net has no symbolic input dim {unknown[0]!r}",
                          hint="its inputs' dims are " + (", ".join(axes) or "all fixed")
                               + " (see the net's inputs: section)")
    plan, fixed = _varying_dims(graph, values, wanted)
    if requested is not True and fixed:
        dim, why = next(iter(fixed.items()))
        raise ExportError(f"input dim {dim} cannot be dynamic: {why}",
                          hint="leave it out of --dynamic (or give --dynamic alone for the dims "
                               "the net allows)")
    if not plan:
        return _Dynamic(net, tensors, (), {}, fixed)
    second = {name: tuple(plan.get(d, v) if isinstance(d, str) else v
                          for d, v in zip(declared, net.inputs[name]))
              for name, declared in graph.inputs.items()}
    names = {where: d for d in plan for where in axes[d]}
    dynamic_shapes = tuple({axis: torch.export.Dim.AUTO for (j, axis) in names if j == i}
                           for i in range(len(graph.inputs)))
    return _Dynamic(reshape(net, second), _random_like_shapes(second, tensors, seed + 1),
                    dynamic_shapes, names, fixed)


def _varying_dims(graph, values: Mapping[str, int], wanted: Sequence[str]
                  ) -> Tuple[Dict[str, int], Dict[str, str]]:
    """``(plan, fixed)``: another value for every wanted dim the net's shape inference lets
    vary (the batch, the first input's axis 0, alone at N + 1 and N + 2; the other dims
    together, in proportion), and for the others the located message of the layer that
    refuses another value."""
    from math import gcd

    from pacnet.shapes import bind_inputs, infer_shapes

    def fails(changes: Mapping[str, int]) -> Optional[PacnetError]:
        env = {**values, **changes}
        shapes = {name: tuple(env[d] if isinstance(d, str) else d for d in declared)
                  for name, declared in graph.inputs.items()}
        try:
            infer_shapes(graph, bind_inputs(graph, shapes))
        except PacnetError as err:
            return err
        return None

    def reason(changes: Mapping[str, int], err: PacnetError) -> str:
        at = ", ".join(f"{d}={v}" for d, v in changes.items())
        return f"at {at}, {str(err).splitlines()[0]}"

    first = next(iter(graph.inputs.values()), ())
    batch = [d for d in wanted if first and first[0] == d]
    others = [d for d in wanted if d not in batch]
    plan: Dict[str, int] = {}
    fixed: Dict[str, str] = {}
    for dim in batch:
        err = fails({dim: values[dim] + 1}) or fails({dim: values[dim] + 2})
        if err is None:
            plan[dim] = values[dim] + 1
        else:
            fixed[dim] = reason({dim: values[dim] + 1}, err)
    if not others:
        return plan, fixed
    # Grow the dims together, in proportion (a net may tie them: a guide 8x its target), by
    # k and 2k units for k = 1, 2, 4, ... 64 (a net may need multiples of 32): a dim that
    # fits one other size only is fixed.
    unit = 0
    for d in others:
        unit = gcd(unit, values[d])
    first_error = None
    for k in (1, 2, 4, 8, 16, 32, 64):
        tries = [{d: values[d] + values[d] // unit * k * m for d in others} for m in (1, 2)]
        failures = [(t, err) for t in tries for err in [fails({**plan, **t})] if err is not None]
        if not failures:
            plan.update(tries[0])
            return plan, fixed
        first_error = first_error or failures[0]
    for d in others:
        fixed[d] = reason(*first_error)
    return plan, fixed


def _module_dynamic(model: nn.Module, requested: Any, tensors: Tuple[torch.Tensor, ...]
                    ) -> _Dynamic:
    """A module's dynamic batch: axis 0 of every input, traced at one more sample."""
    if requested is not True:
        raise ExportError("named dynamic dims are a net's (its inputs: section); for a module "
                          "give dynamic=True (a dynamic batch)")
    bigger = tuple(torch.cat([t, t[:1]]) for t in tensors)
    names = {(i, 0): "batch" for i in range(len(tensors))}
    return _Dynamic(model, bigger, tuple({0: torch.export.Dim.AUTO} for _ in tensors), names, {})


def _name_dims(model, dynamic: _Dynamic) -> List[str]:
    """Rename torch's symbols (``s20``) to the net's dim names in every shape of the ONNX
    model; returns the names of requested dims that torch.export made static anyway."""
    import onnx_ir as ir

    rename: Dict[str, str] = {}
    static = []
    inputs = list(model.graph.inputs)
    for (i, axis), name in dynamic.names.items():
        dim = inputs[i].shape[axis] if inputs[i].shape is not None else None
        if isinstance(dim, ir.SymbolicDim) and dim.value:
            rename[dim.value] = name
        elif name not in static:
            static.append(name)
    if not rename:
        return static
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, rename)) + r")\b")

    def renamed(shape):
        return ir.Shape([ir.SymbolicDim(pattern.sub(lambda m: rename[m.group(1)], d.value))
                         if isinstance(d, ir.SymbolicDim) and d.value else d for d in shape])

    values = list(model.graph.inputs) + [v for node in model.graph.all_nodes()
                                         for v in node.outputs]
    for value in values:
        if value.shape is not None:
            value.shape = renamed(value.shape)
    return static


# ----------------------------------------------------------------------------- export

def export_onnx(model: nn.Module, path: str, *, inputs: Any = None,
                input_names: Optional[Sequence[str]] = None,
                output_names: Optional[Sequence[str]] = None, opset: Optional[int] = None,
                dynamic: Any = None, verify: bool = False, rtol: float = 1e-4,
                atol: float = 1e-5, seed: int = 0) -> ExportResult:
    """Export ``model`` to the ONNX file ``path``; see the module docstring.

    Args:
      model: a compiled net (:func:`pacnet.build`; its inputs and outputs keep their blob
        names) or any ``nn.Module`` using pacnet's ops (``PacConv2d``, ``PacCRF``, ...).
      inputs: example inputs: a tensor, a tuple, or a dict name -> tensor (names become the
        ONNX input names).  Default for a net: uniform random tensors of its input shapes.
      input_names, output_names: override the names.
      opset: the default-domain ONNX opset (default :func:`default_opset`, at least 18).
      dynamic: ``True``: the batch and every other symbolic input dim of a net (``N``,
        ``H``, ``W``, ... of its ``inputs:``) that the net allows to vary -- the others stay
        fixed, with a note naming the layer that fixes them; the batch (axis 0) of a
        module's inputs.  A list of a net's dim names: exactly those (an error naming the
        layer if one cannot vary).  A dynamic file is checked in onnxruntime at a second
        size (one more sample, larger spatial dims) against PyTorch before it is written.
      verify: run the file in onnxruntime on the example inputs and compare every output
        with PyTorch (``result.checks``, ``result.verified``); ``rtol``/``atol`` bound the
        difference as ``atol + rtol * max|torch output|``.
      seed: seed of the random example inputs.

    Raises:
      ExportError: an op or layer that cannot be exported (naming the layer, its type and
        the op), a dim that cannot be dynamic, or a file that cannot be written.  Nothing
        is written then.
    """
    _requirements()
    from pacnet.codegen import Net
    from pacnet.onnx_ops import MIN_OPSET, attach_functions

    _check_destination(path)
    opset = default_opset() if opset is None else int(opset)
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is too old: the pacnet functions need opset "
                          f">= {MIN_OPSET}", hint=f"use --opset {MIN_OPSET} or newer")
    names, tensors = _example_inputs(model, inputs, input_names, seed)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            outputs = model(*tensors)
        out_names = _output_names(model, outputs, output_names)
        plan = None
        if dynamic is not None and dynamic is not False:
            plan = (_net_dynamic(model, dynamic, tensors, seed) if isinstance(model, Net)
                    else _module_dynamic(model, dynamic, tensors))
        traced = plan if plan is not None and plan.names else None
        if traced is not None:
            traced.module.eval()
            ep = _capture(traced.module, traced.tensors, traced.dynamic_shapes)
        else:
            ep = _capture(model, tensors)
        functionalize(ep, model)
        _check_translations(ep, model)
        program = _to_onnx(ep, model, names, out_names, opset)
        notes = _dynamic_notes(program.model, plan) if plan is not None else []
        functions = attach_functions(program.model)
        check = None
        if traced is not None:
            check = _second_size_check(traced, names, out_names, rtol, atol)
        _save_checked(program, path, check)
        checks = None
        if verify:
            checks = verify_onnx(path, model, dict(zip(names, tensors)), out_names, rtol=rtol,
                                 atol=atol)
    finally:
        model.train(was_training)
    return ExportResult(os.path.abspath(path), opset, _io_shapes(program.model.graph.inputs),
                        _io_shapes(program.model.graph.outputs), tuple(functions), tuple(notes),
                        checks)


def _second_size_check(traced: _Dynamic, names: Sequence[str], out_names: Sequence[str],
                       rtol: float, atol: float) -> Callable[[str], None]:
    """A check of a dynamic file at the size it was traced at (not the example's)."""
    def check(staged: str) -> None:
        inputs = dict(zip(names, traced.tensors))
        bad = [c for c in verify_onnx(staged, traced.module, inputs, out_names, rtol=rtol,
                                      atol=atol) if not c.ok]
        if bad:
            at = ", ".join(f"{n} {tuple(t.shape)}" for n, t in inputs.items())
            raise ExportError(f"the dynamic model disagrees with PyTorch at {at}: "
                              f"{bad[0].name} is off by {bad[0].max_abs:.3g}",
                              hint="export without --dynamic; please report this")
    return check


def _dynamic_notes(onnx_model, plan: _Dynamic) -> List[str]:
    """Name the dynamic dims in the file; say which requested ones stay fixed and why."""
    static = _name_dims(onnx_model, plan) if plan.names else []
    dynamic = [d for d in dict.fromkeys(plan.names.values()) if d not in static]
    notes = [f"dynamic: {', '.join(dynamic)}"] if dynamic else ["no dim can be dynamic"]
    for dim, why in plan.fixed.items():
        notes.append(f"{dim} stays fixed: {why}")
    for dim in static:
        notes.append(f"{dim} stays fixed: torch.export found a layer that computes with it "
                     f"as a constant")
    return notes
