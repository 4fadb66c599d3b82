"""The ``pacnet`` ONNX domain: one ONNX function per pacnet custom op, in standard ONNX ops.

Every forward ``torch.ops.pacnet.*`` op has a lowering here (:data:`LOWERINGS`, keyed
by the op's qualified name).  Its translation emits one node of the ``pacnet`` domain
(``pacnet::PacConv``, ...) whose definition, an ONNX function built only from standard
ops (opset >= 18), :func:`attach_functions` adds to the model.  Stock onnxruntime runs such
a model with no custom library, and Netron shows each PAC op as one node that expands into
its body.

Shapes (``b`` batch; ``*sizes`` 1 to 3 spatial axes (``W``, ``H, W`` or ``D, H, W``) for the
PAC functions, ``H, W`` for the segaware ones; ``*ks`` the node's ``kernel_shape``, ``k`` its
product, the taps; ``*out`` the output size of a convolution with the node's
``kernel_shape``, ``strides``, ``pads`` and ``dilations``; zero padding):

========================  ===========================================  =======================
function                  inputs                                       output
========================  ===========================================  =======================
``Unfold``                x ``[b, C, *sizes]``                         ``[b, C, k, *out]``
``PacDist``               guide ``[b, Cg, *sizes]``                    ``[b, 1|Cg, *ks, *out]``
``PacDistToCenter``       guide, center ``[b, Cg, *out]``              ``[b, 1|Cg, *ks, *out]``
``PacConv``               x, K ``[b, 1, *ks, *out]``, weight, bias?    ``[b, O, *out]``
``PacPool``               x, K ``[b, 1|C, *ks, *out]``                 ``[b, C, *out]``
``LocalWeightedSum``      x, weights ``[b, k, oh, ow]``                ``[b, C, oh, ow]``
``Im2dist``               emb ``[b, C, H, W]``                         ``[b, k, oh, ow]``
``Im2parity``             labels ``[b, 1, H, W]`` (float)              ``[b, k, oh, ow]``
========================  ===========================================  =======================

The unfold is a convolution of every channel with ``k`` one-hot filters: in onnxruntime it
is as fast as a grouped convolution or Pad+Slice+Concat and 2.5-3x faster than Gather
(``benchmarks/export_onnx.py``), and its body is the same for every kernel size.  It is
exact for finite inputs (an infinite input value turns its neighbours' taps into NaN, as
``0 * inf``).
Flags of the torch ops become int attributes (``asym``, ``channel_wise``, ``norm``, ...);
the bodies apply them with shape arithmetic and selects, so one function serves every
variant.  onnxruntime's CPU convolution is float32 only: models with these nodes run in
float32 there.

Ops that mutate an argument (``pac_conv_add_``) have no node of their own: the exporter
rewrites them into the out-of-place ops first (:data:`FUNCTIONALIZED`).  Backward ops are
never exported (:data:`BACKWARD_ONLY`).  ``tests/test_export_ops.py`` checks that every
registered ``pacnet`` op is in exactly one of these tables.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import onnxscript
import torch
from onnx.defs import OpSchema
from onnxscript import BOOL, INT64
from onnxscript import opset18 as op
from onnxscript.function_libs.torch_lib.tensor_typing import TFloat, TReal

from pacnet.kernels.segaware.reference import BIG, NO_PAIR

DOMAIN = "pacnet"
VERSION = 1
#: The oldest default-domain opset the bodies are valid in (ReduceProd takes its axes as an
#: input from 18 on); they keep their meaning up to the newest opset onnx knows.
MIN_OPSET = 18

_pacnet = onnxscript.values.Opset(DOMAIN, VERSION)

_NEG_INF = float("-inf")


# ----------------------------------------------------------------------------- bodies
# onnxscript functions: the Python below is parsed into ONNX, it is not run.  Attributes
# are referenced by name (``kernel_shape=kernel_shape``), tensors are ONNX values.

@onnxscript.script(_pacnet, default_opset=op)
def Unfold(x: TFloat, kernel_shape: List[int], strides: List[int], pads: List[int],
           dilations: List[int]) -> TFloat:
    """The taps of every window: ``x [b, C, *sizes] -> cols [b, C, k, *out]`` (zero padding),
    for 1 to 3 spatial axes.

    Each channel is convolved with ``k`` one-hot filters of shape ``kernel_shape``, tap ``t``
    being the filter with a 1 at the ``t``-th position in row-major order (``t = i*kw + j``
    in 2-D)."""
    ks = op.Constant(value_ints=kernel_shape)
    taps = op.ReduceProd(ks, keepdims=1)
    one_hot = op.EyeLike(op.ConstantOfShape(op.Concat(taps, taps, axis=0)))
    filters = op.CastLike(op.Reshape(one_hot, op.Concat(taps, op.Constant(value_ints=[1]), ks,
                                                        axis=0)), x)
    planes = op.Reshape(x, op.Concat(op.Constant(value_ints=[-1, 1]), op.Shape(x, start=2),
                                     axis=0))
    cols = op.Conv(planes, filters, strides=strides, pads=pads, dilations=dilations)
    return op.Reshape(cols, op.Concat(op.Shape(x, start=0, end=2), taps, op.Shape(cols, start=2),
                                      axis=0))


@onnxscript.script(_pacnet, default_opset=op)
def CenterTap(kernel_shape: List[int]) -> INT64:
    """The tap index ``(kh // 2) * kw + kw // 2`` of a 2-D window's centre (the segaware ops'
    rule, for even sizes too), as a 1-element tensor."""
    ks = op.Constant(value_ints=kernel_shape)
    two = op.Constant(value_ints=[2])
    kh = op.Slice(ks, op.Constant(value_ints=[0]), op.Constant(value_ints=[1]))
    kw = op.Slice(ks, op.Constant(value_ints=[1]), op.Constant(value_ints=[2]))
    return op.Add(op.Mul(op.Div(kh, two), kw), op.Div(kw, two))


@onnxscript.script(_pacnet, default_opset=op)
def InImage(x: TFloat, kernel_shape: List[int], strides: List[int], pads: List[int],
            dilations: List[int]) -> BOOL:
    """Which taps lie inside the input: ``[1, k, *out]`` booleans for an ``x [b, C, *sizes]``."""
    ones = op.Expand(op.CastLike(op.Constant(value_float=1.0), x),
                     op.Concat(op.Constant(value_ints=[1, 1]), op.Shape(x, start=2), axis=0))
    taps = Unfold(ones, kernel_shape=kernel_shape, strides=strides, pads=pads,
                  dilations=dilations)
    half = op.CastLike(op.Constant(value_float=0.5), x)
    return op.Squeeze(op.Greater(taps, half), op.Constant(value_ints=[1]))


@onnxscript.script(_pacnet, default_opset=op)
def SquaredDistance(cols: TFloat, center: TFloat, kernel_shape: List[int], asym: int,
                    channel_wise: int) -> TFloat:
    """``sum_c d_c^2`` over the guide channels (each channel alone if ``channel_wise``) with
    ``d = cols - center`` (``relu(d)`` if ``asym``): ``[b, Cg, k, *out] -> [b, 1|Cg, *ks,
    *out]``."""
    diff = op.Sub(cols, center)
    # relu(d)^2 = d * max(d, 0); with a lower bound of -inf this is d^2
    lower = op.Where(op.Cast(op.Constant(value_int=asym), to=BOOL.dtype),
                     op.Constant(value_float=0.0), op.Constant(value_float=_NEG_INF))
    sq = op.Mul(diff, op.Max(diff, op.CastLike(lower, diff)))
    # channel groups: one group of all Cg channels, or Cg groups of one
    cg = op.Shape(sq, start=1, end=2)
    one = op.Constant(value_ints=[1])
    groups = op.Add(one, op.Mul(op.Constant(value_int=channel_wise), op.Sub(cg, one)))
    grouped = op.Reshape(sq, op.Concat(op.Shape(sq, start=0, end=1), groups,
                                       op.Constant(value_ints=[-1]), op.Shape(sq, start=2),
                                       axis=0))
    summed = op.ReduceSum(grouped, op.Constant(value_ints=[2]), keepdims=0)
    return op.Reshape(summed, op.Concat(op.Shape(summed, start=0, end=2),
                                        op.Constant(value_ints=kernel_shape),
                                        op.Shape(sq, start=3), axis=0))


@onnxscript.script(_pacnet, default_opset=op)
def PacDist(guide: TFloat, kernel_shape: List[int], strides: List[int], pads: List[int],
            dilations: List[int], asym: int = 0, channel_wise: int = 0) -> TFloat:
    """``pacnet::pac_dist`` without a centre: squared guide differences to each window's
    centre tap, ``[b, Cg, *sizes] -> [b, 1|Cg, *ks, *out]``.  The kernel sizes are odd (as
    ``pac_dist`` requires), so the centre is the middle tap, ``(k - 1) / 2``."""
    cols = Unfold(guide, kernel_shape=kernel_shape, strides=strides, pads=pads,
                  dilations=dilations)
    taps = op.ReduceProd(op.Constant(value_ints=kernel_shape), keepdims=1)
    middle = op.Div(op.Sub(taps, op.Constant(value_ints=[1])), op.Constant(value_ints=[2]))
    center = op.Gather(cols, middle, axis=2)
    return SquaredDistance(cols, center, kernel_shape=kernel_shape, asym=asym,
                           channel_wise=channel_wise)


@onnxscript.script(_pacnet, default_opset=op)
def PacDistToCenter(guide: TFloat, center: TFloat, kernel_shape: List[int], strides: List[int],
                    pads: List[int], dilations: List[int], asym: int = 0,
                    channel_wise: int = 0) -> TFloat:
    """``pacnet::pac_dist`` with given centre features ``[b, Cg, *out]`` (e.g. a smoothed
    guide): ``[b, Cg, *sizes] -> [b, 1|Cg, *ks, *out]``."""
    cols = Unfold(guide, kernel_shape=kernel_shape, strides=strides, pads=pads,
                  dilations=dilations)
    return SquaredDistance(cols, op.Unsqueeze(center, op.Constant(value_ints=[2])),
                           kernel_shape=kernel_shape, asym=asym, channel_wise=channel_wise)


@onnxscript.script(_pacnet, default_opset=op)
def TapsOf(K: TFloat, cols: TFloat) -> TFloat:
    """``K [b, 1|C, *ks, *out]`` with its kernel axes flattened into one, ``[b, 1|C, k, *out]``,
    to scale the ``cols [b, C, k, *out]`` of :func:`Unfold`."""
    return op.Reshape(K, op.Concat(op.Shape(K, start=0, end=2), op.Constant(value_ints=[-1]),
                                   op.Shape(cols, start=3), axis=0))


@onnxscript.script(_pacnet, default_opset=op)
def PacConv(x: TFloat, K: TFloat, weight: TFloat, bias: Optional[TFloat],
            kernel_shape: List[int], strides: List[int], pads: List[int], dilations: List[int],
            group: int = 1) -> TFloat:
    """``pacnet::pac_conv``: ``out[o] = bias[o] + sum_{c,t} weight[o, c, t] K[t] x[c, pos(t)]``,
    ``[b, C, *sizes] -> [b, O, *out]``.

    ``weight`` is ``[O, C, *ks]`` with ``group = 1``, or one shared ``[1, 1, *ks]`` filter
    applied to every channel with ``group = C`` (``shared_filters``); ``bias`` is optional.
    The taps scaled by ``K`` are contracted by a 1x1 (x1) convolution."""
    cols = Unfold(x, kernel_shape=kernel_shape, strides=strides, pads=pads, dilations=dilations)
    scaled = op.Mul(cols, TapsOf(K, cols))
    flat = op.Reshape(scaled, op.Concat(op.Shape(scaled, start=0, end=1),
                                        op.Constant(value_ints=[-1]), op.Shape(scaled, start=3),
                                        axis=0))
    ks = op.Constant(value_ints=kernel_shape)
    # a 1 per spatial axis, the 1x1 filters' sizes (Sub and Add: ONNX's shape inference
    # propagates their values, so the output shape is inferred)
    ones = op.Add(op.Sub(ks, ks), op.Constant(value_ints=[1]))
    rows = op.Shape(weight, start=0, end=1)
    filters = op.Reshape(weight, op.Concat(rows, op.Constant(value_ints=[-1]), ones, axis=0))
    # a shared filter becomes one copy per group (channel)
    copies = op.Max(rows, op.Constant(value_int=group))
    filters = op.Expand(filters, op.Concat(copies, op.Constant(value_ints=[1]), ones, axis=0))
    return op.Conv(flat, filters, bias, group=group)


@onnxscript.script(_pacnet, default_opset=op)
def PacPool(x: TFloat, K: TFloat, kernel_shape: List[int], strides: List[int],
            pads: List[int], dilations: List[int]) -> TFloat:
    """``pacnet::pac_pool``: the ``K``-weighted sum over each window,
    ``out[c] = sum_t K[0|c, t] x[c, pos(t)]``, ``[b, C, *sizes] -> [b, C, *out]``."""
    cols = Unfold(x, kernel_shape=kernel_shape, strides=strides, pads=pads, dilations=dilations)
    return op.ReduceSum(op.Mul(cols, TapsOf(K, cols)), op.Constant(value_ints=[2]), keepdims=0)


@onnxscript.script(_pacnet, default_opset=op)
def LocalWeightedSum(x: TFloat, weights: TFloat, kernel_shape: List[int], strides: List[int],
                     pads: List[int], dilations: List[int]) -> TFloat:
    """``pacnet::local_weighted_sum`` (segaware NormConv messages): ``out[c] = sum_t
    weights[t] x[c, pos(t)]``, a 2-D :func:`PacPool` whose ``[b, kh*kw, oh, ow]`` weights are
    shared by the channels."""
    k6 = op.Reshape(weights, op.Concat(op.Shape(weights, start=0, end=1),
                                       op.Constant(value_ints=[1]),
                                       op.Constant(value_ints=kernel_shape),
                                       op.Shape(weights, start=2), axis=0))
    return PacPool(x, k6, kernel_shape=kernel_shape, strides=strides, pads=pads,
                     dilations=dilations)


@onnxscript.script(_pacnet, default_opset=op)
def Im2dist(emb: TFloat, kernel_shape: List[int], strides: List[int], pads: List[int],
            dilations: List[int], norm: int = 2, remove_center: int = 0,
            remove_bounds: int = 0) -> TFloat:
    """``pacnet::im2dist`` (segaware): distances of each tap's embedding to the window centre's,
    ``[b, C, H, W] -> [b, kh*kw, oh, ow]``.

    ``sum_c |d_c|^norm / norm`` (L1: ``sum |d|``, L2: ``sum d^2 / 2``); 0 where the centre
    lies outside the image; :data:`BIG` at the centre tap if ``remove_center`` and at taps
    outside the image if ``remove_bounds`` (else 0 there)."""
    cols = Unfold(emb, kernel_shape=kernel_shape, strides=strides, pads=pads,
                  dilations=dilations)
    ctr = CenterTap(kernel_shape=kernel_shape)
    diff = op.Sub(cols, op.Gather(cols, ctr, axis=2))
    p = op.CastLike(op.Constant(value_int=norm), emb)
    dist = op.Div(op.ReduceSum(op.Pow(op.Abs(diff), p), op.Constant(value_ints=[1]), keepdims=0),
                  p)
    inside = InImage(emb, kernel_shape=kernel_shape, strides=strides, pads=pads,
                     dilations=dilations)
    center_inside = op.Gather(inside, ctr, axis=1)
    taps = op.Shape(inside, start=1, end=2)
    at_center = op.Reshape(op.Equal(op.Range(op.Constant(value_int=0), op.Squeeze(taps),
                                             op.Constant(value_int=1)), ctr),
                           op.Constant(value_ints=[1, -1, 1, 1]))
    center_removed = op.And(op.Cast(op.Constant(value_int=remove_center), to=BOOL.dtype),
                            at_center)
    bound_removed = op.And(op.Cast(op.Constant(value_int=remove_bounds), to=BOOL.dtype),
                           op.Not(inside))
    keep = op.And(op.And(inside, center_inside), op.Not(center_removed))
    big = op.And(center_inside, op.Or(center_removed, bound_removed))
    zero = op.CastLike(op.Constant(value_float=0.0), emb)
    const = op.Where(big, op.CastLike(op.Constant(value_float=BIG), emb), zero)
    return op.Where(keep, dist, const)


@onnxscript.script(_pacnet, default_opset=op)
def Im2parity(labels: TReal, kernel_shape: List[int], strides: List[int], pads: List[int],
              dilations: List[int], has_ignore: int = 0, ignore_label: int = 0,
              dtype: int = 1) -> TFloat:
    """``pacnet::im2parity`` (segaware): 1 where a tap's label equals the centre's, else 0,
    ``[b, 1, H, W] -> [b, kh*kw, oh, ow]`` of ONNX type ``dtype`` (the labels' float type, or
    float for integer labels); labels are truncated to integers, taps outside the image
    read label 0.  With ``has_ignore``, ``ignore_label`` where either label is it; where the
    centre lies outside the image, ``ignore_label`` (or :data:`NO_PAIR`)."""
    whole = op.Cast(op.Cast(labels, to=INT64.dtype), to=dtype)
    cols = op.Squeeze(Unfold(whole, kernel_shape=kernel_shape, strides=strides, pads=pads,
                             dilations=dilations), op.Constant(value_ints=[1]))
    ctr = CenterTap(kernel_shape=kernel_shape)
    center = op.Gather(cols, ctr, axis=1)
    same = op.CastLike(op.Equal(cols, center), whole)
    ignored = op.CastLike(op.Constant(value_int=ignore_label), whole)
    use_ignore = op.Cast(op.Constant(value_int=has_ignore), to=BOOL.dtype)
    hits = op.And(use_ignore, op.Or(op.Equal(cols, ignored), op.Equal(center, ignored)))
    parity = op.Where(hits, ignored, same)
    inside = InImage(whole, kernel_shape=kernel_shape, strides=strides, pads=pads,
                     dilations=dilations)
    outside = op.Where(use_ignore, ignored,
                       op.CastLike(op.Constant(value_float=NO_PAIR), whole))
    return op.Where(op.Gather(inside, ctr, axis=1), parity, outside)


#: The functions the translations emit (their bodies call the others).
OPERATORS = (PacDist, PacDistToCenter, PacConv, PacPool, LocalWeightedSum, Im2dist,
             Im2parity)


# ----------------------------------------------------------------------------- nodes

def _schema(fn: onnxscript.OnnxFunction) -> OpSchema:
    """The ONNX schema of a function's node: its tensor inputs (``Optional[...]`` ones
    optional) and output with their type constraints, and its attributes."""
    hints = typing.get_type_hints(fn.function)
    inputs, attributes, constraints = [], [], {}

    def constrained(param) -> str:
        tc = param.type_constraint
        constraints[tc.name] = sorted(f"tensor({t.dtype.name.lower()})"
                                      for t in tc.allowed_types)
        return tc.name

    for param in fn.op_signature.params:
        if hasattr(param, "type_constraint"):
            optional = type(None) in typing.get_args(hints.get(param.name))
            option = (OpSchema.FormalParameterOption.Optional if optional
                      else OpSchema.FormalParameterOption.Single)
            inputs.append(OpSchema.FormalParameter(param.name, constrained(param),
                                                   param_option=option))
        else:
            kind = OpSchema.AttrType.INTS if param.type.name == "INTS" else OpSchema.AttrType.INT
            attributes.append(OpSchema.Attribute(param.name, kind, required=param.required))
    (output,) = fn.op_signature.outputs
    return OpSchema(fn.name, DOMAIN, VERSION, fn.function.__doc__ or "", inputs=inputs,
                    outputs=[OpSchema.FormalParameter("output", constrained(output))],
                    type_constraints=[(name, types, "") for name, types in constraints.items()],
                    attributes=attributes)


_NODES: Dict[str, onnxscript.values.Op] = {}


def _node(fn: onnxscript.OnnxFunction) -> onnxscript.values.Op:
    """A ``pacnet::<fn>`` node maker for translations.  The node stays opaque while the
    exporter optimises the graph (it is not a model function yet, so nothing inlines it);
    :func:`attach_functions` adds its definition at the end."""
    if fn.name not in _NODES:
        _NODES[fn.name] = onnxscript.values.Op(_pacnet, fn.name, _schema(fn))
    return _NODES[fn.name]


# ----------------------------------------------------------------------------- translations

@dataclass(frozen=True)
class Call:
    """A ``pacnet`` node: its function, its inputs (``None`` for an omitted optional one) and
    its attributes."""

    function: onnxscript.OnnxFunction
    inputs: Tuple[Any, ...]
    attributes: Dict[str, Any]


def _geometry(kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
              dilation: Sequence[int]) -> Dict[str, List[int]]:
    """ONNX convolution attributes of a torch geometry (one value per spatial axis;
    symmetric padding)."""
    return dict(kernel_shape=[int(k) for k in kernel_size], strides=[int(s) for s in stride],
                pads=[int(p) for p in padding] * 2, dilations=[int(d) for d in dilation])


# Lowerings take a torch op's arguments (tensors, or anything with a static ``.shape``, and
# Python values) and say which node computes it.

def _pac_dist(guide, center, kernel_size, stride, padding, dilation, asym, channel_wise):
    attrs = dict(_geometry(kernel_size, stride, padding, dilation), asym=int(asym),
                 channel_wise=int(channel_wise))
    if center is None:
        return Call(PacDist, (guide,), attrs)
    return Call(PacDistToCenter, (guide, center), attrs)


def _pac_conv(x, K, weight, bias, stride, padding, dilation, shared_filters):
    group = int(x.shape[1]) if shared_filters else 1
    return Call(PacConv, (x, K, weight, bias),
                dict(_geometry(weight.shape[2:], stride, padding, dilation), group=group))


def _pac_pool(x, K, kernel_size, stride, padding, dilation):
    return Call(PacPool, (x, K), _geometry(kernel_size, stride, padding, dilation))


def _local_weighted_sum(x, weights, kernel, pad, stride, dilation):
    return Call(LocalWeightedSum, (x, weights), _geometry(kernel, stride, pad, dilation))


def _im2dist(emb, kernel, pad, stride, dilation, norm, remove_center, remove_bounds):
    return Call(Im2dist, (emb,), dict(_geometry(kernel, stride, pad, dilation), norm=int(norm),
                                      remove_center=int(remove_center),
                                      remove_bounds=int(remove_bounds)))


#: ONNX's codes of the float types (TensorProto.FLOAT, ...), by name.
_FLOAT_TYPES = {"float32": 1, "float16": 10, "float64": 11, "bfloat16": 16,
                "FLOAT": 1, "FLOAT16": 10, "DOUBLE": 11, "BFLOAT16": 16}


def _im2parity(labels, kernel, pad, stride, dilation, has_ignore, ignore_label):
    # the labels' float type, else the default float (a torch dtype, or an ONNX value's)
    kind = str(labels.dtype).rsplit(".", 1)[-1]
    dtype = _FLOAT_TYPES.get(kind, _FLOAT_TYPES[str(torch.get_default_dtype())[6:]])
    return Call(Im2parity, (labels,), dict(_geometry(kernel, stride, pad, dilation),
                                           has_ignore=int(has_ignore),
                                           ignore_label=int(ignore_label), dtype=dtype))


#: Forward op (qualified name) -> its lowering.
LOWERINGS: Dict[str, Callable[..., Call]] = {
    "pacnet::pac_dist": _pac_dist,
    "pacnet::pac_conv": _pac_conv,
    "pacnet::pac_pool": _pac_pool,
    "pacnet::local_weighted_sum": _local_weighted_sum,
    "pacnet::im2dist": _im2dist,
    "pacnet::im2parity": _im2parity,
}


def _translation(lower: Callable[..., Call]) -> Callable:
    """A ``torch.onnx`` translation: emits the node of ``lower``'s call."""
    def translate(*args):
        call = lower(*args)
        return _node(call.function)(*call.inputs, **call.attributes)

    translate.__name__ = translate.__qualname__ = lower.__name__.lstrip("_")
    return translate


#: In-place op -> the out-of-place ops it is rewritten to before translation (see
#: ``pacnet.export.functionalize``).
FUNCTIONALIZED: Dict[str, str] = {
    "pacnet::pac_conv_add_": "out + alpha * pacnet::pac_conv(x, K, weight, None, ...)",
}

#: Ops only autograd calls; an exported (inference) graph never holds them.
BACKWARD_ONLY = frozenset({
    "pacnet::pac_dist_backward", "pacnet::pac_conv_backward", "pacnet::pac_pool_backward",
    "pacnet::im2dist_backward", "pacnet::local_weighted_sum_backward",
})


def translation_table() -> dict:
    """``{torch op overload: translation}`` for ``torch.onnx.export(custom_translation_table=)``."""
    import torch

    table = {}
    for name, lower in LOWERINGS.items():
        namespace, op_name = name.split("::")
        packet = getattr(getattr(torch.ops, namespace), op_name, None)
        if packet is not None:  # an op whose module is not imported cannot be in a graph
            table[packet.default] = _translation(lower)
    return table


# ----------------------------------------------------------------------------- model functions

def _called(fn: onnxscript.OnnxFunction) -> Iterable[onnxscript.OnnxFunction]:
    yield fn
    for inner in fn.function_ir.get_called_functions().values():
        yield from _called(inner)


def used_functions(op_types: Iterable[str]) -> List[onnxscript.OnnxFunction]:
    """The functions that define nodes of these ``pacnet`` op types, with the ones their
    bodies call, each once (callees first)."""
    by_name = {fn.name: fn for fn in OPERATORS}
    order: Dict[str, onnxscript.OnnxFunction] = {}
    for name in op_types:
        for fn in reversed(list(_called(by_name[name]))):
            order.setdefault(fn.name, fn)
    return list(order.values())


def attach_functions(model) -> List[str]:
    """Add the definitions of the ``pacnet`` nodes of ``model`` (an ``onnx_ir.Model``),
    written for its default-domain opset; returns the names of the functions added."""
    import onnx_ir as ir

    opset = model.graph.opset_imports.get("", MIN_OPSET)
    used = sorted({node.op_type for node in model.graph.all_nodes() if node.domain == DOMAIN})
    added = []
    for fn in used_functions(used):
        function = ir.serde.deserialize_function(fn.to_function_proto())
        function.opset_imports[""] = opset
        model.functions[function.identifier()] = function
        added.append(fn.name)
    if added:
        model.graph.opset_imports[DOMAIN] = VERSION
    return added


def standalone_model(call: Call, opset: int = MIN_OPSET):
    """An ``onnx.ModelProto`` of the one node ``call`` describes (its tensor inputs become the
    graph inputs, named as the function's parameters), with its function definitions and
    the output shape ONNX infers through them: what the tests and benchmarks run a lowering
    with, outside a whole model."""
    import onnx
    from onnx import helper

    params = [p.name for p in call.function.op_signature.params if hasattr(p, "type_constraint")]
    inputs, names = [], []
    for name, value in zip(params, call.inputs):
        if value is None:
            names.append("")
            continue
        dtype = helper.np_dtype_to_tensor_dtype(value.detach().cpu().numpy().dtype)
        inputs.append(helper.make_tensor_value_info(name, dtype, list(value.shape)))
        names.append(name)
    node = helper.make_node(call.function.name, names, ["output"], domain=DOMAIN,
                            **call.attributes)
    output = helper.make_tensor_value_info("output", onnx.TensorProto.UNDEFINED, [])
    output.type.tensor_type.ClearField("shape")  # type and shape: what ONNX infers
    graph = helper.make_graph([node], call.function.name, inputs, [output])
    functions = []
    for fn in used_functions([call.function.name]):
        proto = fn.to_function_proto()
        for entry in proto.opset_import:
            if entry.domain == "":
                entry.version = opset
        functions.append(proto)
    imports = [helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, VERSION)]
    model = helper.make_model(graph, opset_imports=imports, functions=functions)
    model.ir_version = min(model.ir_version, 10)
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    onnx.checker.check_model(model, full_check=True)
    return model
