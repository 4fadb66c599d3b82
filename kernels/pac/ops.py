"""PAC primitives as ``torch.library`` custom ops, with argument checks and backend dispatch.

Every primitive takes any number ``r`` of spatial axes -- 1-D ``[b, C, W]``, 2-D
``[b, C, H, W]`` and 3-D ``[b, C, D, H, W]`` (volumes, video clips) -- with geometry
arguments of ``r`` values (a single int means all axes).  The public functions are thin
wrappers that check their arguments (raising :class:`pacnet.errors.PacnetValueError` before
any kernel runs) and call a custom op:

* :func:`pac_dist` ``guide [b, Cg, *sizes] -> D [b, 1|Cg, *k, *out]``
* :func:`pac_conv` ``x [b, C, *sizes], K [b, 1, *k, *out], weight [O, C, *k] -> [b, O, *out]``
* :func:`pac_pool` ``x [b, C, *sizes], K [b, 1|C, *k, *out] -> [b, C, *out]``

and :func:`pac_conv_add_` (``out += alpha * pac_conv(...)`` in place, for inference).
:func:`pac_conv2d`, :func:`pac_pool2d` and :func:`pac_conv2d_add_` are the same functions
for 2-D inputs only (4-D tensors): what the 2-D layers and the CRF call.

Geometry (shared by all): along each spatial axis an output index ``o`` reads tap ``t`` at
input index ``pos(o, t) = o*s - p + t*d``; indices outside the input read 0 (zero padding, as
``F.unfold``).  Output sizes follow the ``nn.ConvNd`` rule ``(n + 2p - d(k-1) - 1) // s + 1``.
Kernel sizes must be odd; any padding >= 0 is accepted.

Backends (chosen by :mod:`pacnet.kernels.runtime`, as for every fused op): CPU tensors run
the fused Numba kernels (:mod:`.cpu`), CUDA tensors the block-GEMM CUDA kernels (:mod:`.cuda`,
imported on first use); both are written once for three spatial axes
(:mod:`.geometry`: 2-D is depth 1, 1-D depth and height 1).  ``PACNET_BACKEND=reference``
makes the public functions use the plain-torch oracle (:mod:`.reference`, autograd backward)
instead; ``auto`` (or unset) and ``numba`` use the fused kernels.  Devices without fused
kernels use the reference unless ``numba`` is forced, which is an error there.

Custom ops (``torch.ops.pacnet.*``, geometry as ``int[]`` of length ``r``)::

    pac_dist(Tensor guide, Tensor? center, int[] kernel_size, int[] stride, int[] padding,
             int[] dilation, bool asym, bool channel_wise) -> Tensor
    pac_dist_backward(Tensor grad, Tensor guide, Tensor? center, int[] kernel_size,
             int[] stride, int[] padding, int[] dilation, bool asym, bool channel_wise)
             -> (Tensor grad_guide, Tensor grad_center)
    pac_conv(Tensor x, Tensor K, Tensor weight, Tensor? bias, int[] stride, int[] padding,
             int[] dilation, bool shared_filters) -> Tensor
    pac_conv_backward(Tensor grad, Tensor x, Tensor K, Tensor weight, int[] stride,
             int[] padding, int[] dilation, bool shared_filters, bool need_x, bool need_k,
             bool need_weight) -> (Tensor, Tensor, Tensor)
    pac_conv_add_(Tensor(a!) out, Tensor x, Tensor K, Tensor weight, int[] stride,
             int[] padding, int[] dilation, bool shared_filters, float alpha) -> ()
    pac_pool(Tensor x, Tensor K, int[] kernel_size, int[] stride, int[] padding,
             int[] dilation) -> Tensor
    pac_pool_backward(Tensor grad, Tensor x, Tensor K, int[] kernel_size, int[] stride,
             int[] padding, int[] dilation, bool need_x, bool need_k) -> (Tensor, Tensor)

The rank is ``len(stride)`` (``x.dim() - 2``).  Each op has a fake (shape) implementation,
so they work with ``torch.compile``/``torch.export``, and the forward ops have autograd
formulas that call the backward ops (no double backward); a backward op returns a 0-element
tensor for a gradient that was not asked for.  Between forward and backward only the inputs
are saved (guide[, centre]; x, K, weight).  ``pac_conv_add_`` mutates its ``out`` argument
and has no autograd formula.  Every op returns contiguous tensors, and so do the fakes.

dtypes: float32 and float64, and float16/bfloat16: ``x``, ``weight`` and ``bias`` share one
dtype; an adaptive kernel ``K`` has that dtype or, with half data, float32.  On CUDA,
``pac_conv`` and ``pac_pool`` keep half data in half precision (columns and GEMMs on
tensor cores, float32 accumulation); the CPU kernels compute half data in float32 (Numba has
no bfloat16) and cast the results back.  Results and gradients have their inputs' dtypes.
Under autocast, ``pac_conv``/``pac_pool`` run in the autocast dtype on CUDA with ``K`` in
float32, and in float32 on the CPU; ``pac_dist`` always runs in float32.
"""

from __future__ import annotations

import numbers
from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from pacnet.errors import PacnetValueError
from pacnet.kernels import runtime

from . import reference as _reference

__all__ = ["pac_dist", "pac_conv", "pac_conv_add_", "pac_pool", "pac_conv2d",
           "pac_conv2d_add_", "pac_pool2d", "out_size", "backend_for", "RANKS"]

RANKS = (1, 2, 3)  # spatial ranks the kernels take
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

out_size = _reference.out_size


# ----------------------------------------------------------------------------- dispatch

def backend_for(device: torch.device) -> str:
    """The backend the public functions use on ``device``: ``'numba'`` or ``'reference'``
    (:func:`pacnet.kernels.runtime.backend`: ``PACNET_BACKEND=auto|numba|reference``)."""
    return runtime.backend(device)


def _kernels(device: torch.device):
    """The fused-kernel module for ``device`` (imported lazily: numba.cuda only on CUDA)."""
    if device.type == "cpu":
        from . import cpu
        return cpu
    if device.type == "cuda":
        return runtime.cuda_module("pac")
    raise PacnetValueError(f"no fused PAC kernels for device '{device.type}'",
                           hint=f"set {runtime.BACKEND_ENV}=reference")


def _empty(like: Tensor) -> Tensor:
    return like.new_empty((0,))


def _none_or_empty(spec_or_none, like: Tensor):
    """A fake output: ``spec`` when wanted, else the 0-element placeholder of ``like``."""
    return spec_or_none if spec_or_none is not None else ((0,), like.dtype, like)


def _spatial(t: Tensor) -> Tuple[int, ...]:
    """All axes after the batch and channel axes."""
    return tuple(range(2, t.dim()))


# Autocast (and half inputs): the CUDA GEMM kernels keep x, weight and bias in the autocast
# dtype (float16/bfloat16 columns and tensor-core GEMMs, float32 accumulation) with the
# adaptive kernel K in float32; distances are always float32.  The CPU kernels compute in
# float32 (see pacnet.kernels.runtime).
_CONV_POLICY = ("compute", "float32", "compute", "compute")
_POOL_POLICY = ("compute", "float32")
_DIST_POLICY = ("float32", "float32")


# ----------------------------------------------------------------------------- pac_dist ops

def _pac_dist_impl(guide: Tensor, center: Optional[Tensor], kernel_size: Sequence[int],
                   stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                   asym: bool, channel_wise: bool) -> Tensor:
    return _kernels(guide.device).pac_dist_fwd(guide, center, tuple(kernel_size), tuple(stride),
                                               tuple(padding), tuple(dilation), asym,
                                               channel_wise)


def _pac_dist_fake(guide, center, kernel_size, stride, padding, dilation, asym, channel_wise):
    b, cg = guide.shape[:2]
    out = out_size(guide.shape[2:], kernel_size, stride, padding, dilation)
    return ((b, cg if channel_wise else 1, *kernel_size, *out), guide.dtype, guide)


def _pac_dist_backward_impl(grad: Tensor, guide: Tensor, center: Optional[Tensor],
                            kernel_size: Sequence[int], stride: Sequence[int],
                            padding: Sequence[int], dilation: Sequence[int], asym: bool,
                            channel_wise: bool) -> Tuple[Tensor, Tensor]:
    gf, gc = _kernels(guide.device).pac_dist_bwd(grad, guide, center, tuple(kernel_size),
                                                 tuple(stride), tuple(padding),
                                                 tuple(dilation), asym, channel_wise)
    return gf, gc


def _pac_dist_backward_fake(grad, guide, center, kernel_size, stride, padding, dilation, asym,
                            channel_wise):
    b, cg = guide.shape[:2]
    r = guide.dim() - 2
    return [(guide.shape, guide.dtype, guide),
            ((b, cg, *grad.shape[grad.dim() - r:]), guide.dtype, guide)]


def _pac_dist_setup(ctx, inputs, output):
    guide, center, kernel_size, stride, padding, dilation, asym, channel_wise = inputs
    ctx.save_for_backward(guide, center)
    ctx.args = (kernel_size, stride, padding, dilation, asym, channel_wise)


def _pac_dist_backward(ctx, grad):
    guide, center = ctx.saved_tensors
    gf, gc = torch.ops.pacnet.pac_dist_backward(grad, guide, center, *ctx.args)
    if center is not None:
        gc = gc.to(center.dtype)
    return gf, (gc if center is not None else None), None, None, None, None, None, None


runtime.custom_op("pac_dist_backward", _pac_dist_backward_impl, fake=_pac_dist_backward_fake)
runtime.custom_op("pac_dist", _pac_dist_impl, fake=_pac_dist_fake,
                  autograd=(_pac_dist_backward, _pac_dist_setup), autocast=_DIST_POLICY)


# ----------------------------------------------------------------------------- pac_conv ops

def _pac_conv_impl(x: Tensor, K: Tensor, weight: Tensor, bias: Optional[Tensor],
                   stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                   shared_filters: bool) -> Tensor:
    return _kernels(x.device).pac_conv_fwd(x, K, weight, bias, tuple(stride), tuple(padding),
                                           tuple(dilation), shared_filters)


def _pac_conv_fake(x, K, weight, bias, stride, padding, dilation, shared_filters):
    o = x.shape[1] if shared_filters else weight.shape[0]
    return (x.shape[0], o, *K.shape[K.dim() - (x.dim() - 2):]), x.dtype, x


def _pac_conv_backward_impl(grad: Tensor, x: Tensor, K: Tensor, weight: Tensor,
                            stride: Sequence[int], padding: Sequence[int],
                            dilation: Sequence[int], shared_filters: bool, need_x: bool,
                            need_k: bool, need_weight: bool) -> Tuple[Tensor, Tensor, Tensor]:
    gx, gK, gW = _kernels(x.device).pac_conv_bwd(grad, x, K, weight, tuple(stride),
                                                 tuple(padding), tuple(dilation),
                                                 shared_filters, (need_x, need_k, need_weight))
    return (gx if need_x else _empty(x), gK if need_k else _empty(K),
            gW if need_weight else _empty(weight))


def _pac_conv_backward_fake(grad, x, K, weight, stride, padding, dilation, shared_filters,
                            need_x, need_k, need_weight):
    return [_none_or_empty((x.shape, x.dtype, x) if need_x else None, x),
            _none_or_empty((K.shape, K.dtype, K) if need_k else None, K),
            _none_or_empty((weight.shape, weight.dtype, weight) if need_weight else None,
                           weight)]


def _pac_conv_setup(ctx, inputs, output):
    x, K, weight, bias, stride, padding, dilation, shared_filters = inputs
    ctx.save_for_backward(x, K, weight)
    ctx.args = (stride, padding, dilation, shared_filters)
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _pac_conv_backward(ctx, grad):
    x, K, weight = ctx.saved_tensors
    nx, nk, nw = ctx.needs_input_grad[:3]
    gx = gK = gW = gb = None
    if nx or nk or nw:
        gx, gK, gW = torch.ops.pacnet.pac_conv_backward(grad, x, K, weight, *ctx.args,
                                                        nx, nk, nw)
    if ctx.bias_dtype is not None and ctx.needs_input_grad[3]:
        acc = torch.float32 if grad.dtype in runtime.HALF_DTYPES else grad.dtype
        gb = grad.sum(dim=(0,) + _spatial(grad), dtype=acc).to(ctx.bias_dtype)
    return (gx if nx else None, gK if nk else None, gW if nw else None, gb,
            None, None, None, None)


runtime.custom_op("pac_conv_backward", _pac_conv_backward_impl, fake=_pac_conv_backward_fake)
runtime.custom_op("pac_conv", _pac_conv_impl, fake=_pac_conv_fake,
                  autograd=(_pac_conv_backward, _pac_conv_setup), autocast=_CONV_POLICY,
                  half_ok=True)


def _pac_conv_add_impl(out: Tensor, x: Tensor, K: Tensor, weight: Tensor,
                       stride: Sequence[int], padding: Sequence[int],
                       dilation: Sequence[int], shared_filters: bool, alpha: float) -> None:
    _kernels(x.device).pac_conv_add_(out, x, K, weight, tuple(stride), tuple(padding),
                                     tuple(dilation), shared_filters, alpha)


runtime.custom_op("pac_conv_add_", _pac_conv_add_impl, mutates_args=("out",),
                  fake=lambda *args: None)


# ----------------------------------------------------------------------------- pac_pool ops

def _pac_pool_impl(x: Tensor, K: Tensor, kernel_size: Sequence[int], stride: Sequence[int],
                   padding: Sequence[int], dilation: Sequence[int]) -> Tensor:
    return _kernels(x.device).pac_pool_fwd(x, K, tuple(kernel_size), tuple(stride),
                                           tuple(padding), tuple(dilation))


def _pac_pool_fake(x, K, kernel_size, stride, padding, dilation):
    return (x.shape[0], x.shape[1], *K.shape[K.dim() - (x.dim() - 2):]), x.dtype, x


def _pac_pool_backward_impl(grad: Tensor, x: Tensor, K: Tensor, kernel_size: Sequence[int],
                            stride: Sequence[int], padding: Sequence[int],
                            dilation: Sequence[int], need_x: bool,
                            need_k: bool) -> Tuple[Tensor, Tensor]:
    gx, gK, _ = _kernels(x.device).pac_pool_bwd(grad, x, K, tuple(kernel_size), tuple(stride),
                                                tuple(padding), tuple(dilation),
                                                (need_x, need_k, False))
    return gx if need_x else _empty(x), gK if need_k else _empty(K)


def _pac_pool_backward_fake(grad, x, K, kernel_size, stride, padding, dilation, need_x,
                            need_k):
    return [_none_or_empty((x.shape, x.dtype, x) if need_x else None, x),
            _none_or_empty((K.shape, K.dtype, K) if need_k else None, K)]


def _pac_pool_setup(ctx, inputs, output):
    x, K, kernel_size, stride, padding, dilation = inputs
    ctx.save_for_backward(x, K)
    ctx.args = (kernel_size, stride, padding, dilation)


def _pac_pool_backward(ctx, grad):
    x, K = ctx.saved_tensors
    nx, nk = ctx.needs_input_grad[:2]
    gx = gK = None
    if nx or nk:
        gx, gK = torch.ops.pacnet.pac_pool_backward(grad, x, K, *ctx.args, nx, nk)
    return gx if nx else None, gK if nk else None, None, None, None, None


runtime.custom_op("pac_pool_backward", _pac_pool_backward_impl, fake=_pac_pool_backward_fake)
runtime.custom_op("pac_pool", _pac_pool_impl, fake=_pac_pool_fake,
                  autograd=(_pac_pool_backward, _pac_pool_setup), autocast=_POOL_POLICY,
                  half_ok=True)


# ----------------------------------------------------------------------------- argument checks

_AXES = {1: ("W",), 2: ("H", "W"), 3: ("D", "H", "W")}
_TUPLE_WORDS = {1: "a 1-tuple (w,)", 2: "a pair of ints (h, w)", 3: "a triple of ints (d, h, w)"}


def _ints(value: Any, name: str, minimum: int, rank: int) -> Tuple[int, ...]:
    """``value`` (an int for every axis, or ``rank`` ints) as ``rank`` ints ``>= minimum``."""
    def ok(v):
        return isinstance(v, numbers.Integral) and not isinstance(v, bool)

    if ok(value):
        values = (int(value),) * rank
    elif (isinstance(value, (tuple, list, torch.Size)) and len(value) == rank
          and all(map(ok, value))):
        values = tuple(int(v) for v in value)
    else:
        raise PacnetValueError(f"{name} must be an int or {_TUPLE_WORDS[rank]}, got {value!r}")
    if min(values) < minimum:
        raise PacnetValueError(f"{name} must be >= {minimum}, got {values}")
    return values


def _kernel_size(value: Any, rank: int, name: str = "kernel_size") -> Tuple[int, ...]:
    k = _ints(value, name, 1, rank)
    if any(v % 2 == 0 for v in k):
        raise PacnetValueError(f"{name} must be odd (PAC filters have a centre tap), got {k}",
                               hint="use e.g. 3 or 5")
    return k


def _layout(rank: int, channels: str = "C", out: bool = False) -> str:
    """``[b, C, H, W]`` for rank 2 (``[b, C, oh, ow]`` with ``out``)."""
    axes = ["o" + a.lower() for a in _AXES[rank]] if out else _AXES[rank]
    return f"[b, {channels}, {', '.join(axes)}]"


def _kernel_layout(rank: int, channels: str = "1") -> str:
    axes = _AXES[rank]
    return (f"[b, {channels}, {', '.join('k' + a.lower() for a in axes)}, "
            f"{', '.join('o' + a.lower() for a in axes)}]")


def _is_float_tensor(t: Any, name: str, layout: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise PacnetValueError(f"{name} must be a torch.Tensor {layout}, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise PacnetValueError(f"{name} must be a floating-point tensor (float32, float64, "
                               f"float16 or bfloat16), got {t.dtype}",
                               hint=f"convert it, e.g. {name}.float()")
    return t


def _not_empty(t: Tensor, name: str, layout: str, batched: bool) -> None:
    if any(s == 0 for s in t.shape[1 if batched else 0:]):
        raise PacnetValueError(f"{name} {layout} has an empty dimension: {list(t.shape)}")


def _tensor(t: Any, name: str, ndim: int, layout: str, batched: bool = True) -> Tensor:
    _is_float_tensor(t, name, layout)
    if t.dim() != ndim:
        raise PacnetValueError(f"{name} must be {ndim}-D {layout}, got shape {list(t.shape)}")
    _not_empty(t, name, layout, batched)
    return t


def _rank(t: Any, name: str, ranks: Sequence[int], channels: str = "C") -> int:
    """The spatial rank of ``t`` ``[b, C, *sizes]``, one of ``ranks`` (checked: a floating
    tensor without empty non-batch axes)."""
    if len(ranks) == 1:
        _tensor(t, name, ranks[0] + 2, _layout(ranks[0], channels))
        return ranks[0]
    _is_float_tensor(t, name, f"[b, {channels}, *sizes]")
    rank = t.dim() - 2
    if rank not in ranks:
        kinds = ", ".join(f"{r + 2}-D {_layout(r, channels)}" for r in ranks)
        raise PacnetValueError(f"{name} must be one of {kinds}, got shape {list(t.shape)}")
    _not_empty(t, name, _layout(rank, channels), True)
    return rank


def _same(named: Sequence[Tuple[str, Optional[Tensor]]],
          kernel: Optional[Tuple[str, Tensor]] = None) -> None:
    """The named tensors share one device and dtype; ``kernel`` (an adaptive kernel, when
    given) shares the device and has that dtype, or float32 with float16/bfloat16 data."""
    present = [(n, t) for n, t in named if t is not None]
    n0, t0 = present[0]
    for n, t in present[1:] + ([kernel] if kernel is not None else []):
        if t.device != t0.device:
            raise PacnetValueError(f"{n} is on {t.device} but {n0} is on {t0.device}",
                                   hint="move all tensors to the same device")
    for n, t in present[1:]:
        if t.dtype != t0.dtype:
            raise PacnetValueError(f"{n} has dtype {t.dtype} but {n0} has {t0.dtype}",
                                   hint="convert them to one dtype (or run under autocast)")
    if kernel is not None and kernel[1].dtype != t0.dtype and not (
            t0.dtype in runtime.HALF_DTYPES and kernel[1].dtype == torch.float32):
        raise PacnetValueError(f"{kernel[0]} has dtype {kernel[1].dtype} but {n0} has "
                               f"{t0.dtype}",
                               hint=f"give {kernel[0]} {n0}'s dtype (or float32 with "
                                    f"float16/bfloat16 data)")


def _autocast(policy, *ts: Optional[Tensor]) -> List[Optional[Tensor]]:
    """Under autocast, cast as the op's registered autocast rule will (so the checks see the
    dtypes the kernels compute in, and both backends get the same inputs)."""
    return runtime.autocast_public(policy, ts, half_ok=True)


def _geometry(sizes, kernel_size, stride, padding, dilation, what: str):
    """Checked ``(k, s, p, d, out)`` tuples of ``len(sizes)`` values; the output must not
    be empty."""
    rank = len(sizes)
    k = _kernel_size(kernel_size, rank)
    s = _ints(stride, "stride", 1, rank)
    p = _ints(padding, "padding", 0, rank)
    d = _ints(dilation, "dilation", 1, rank)
    out = out_size(sizes, k, s, p, d)
    if min(out) < 1:
        ext = "x".join(str(d[i] * (k[i] - 1) + 1) for i in range(rank))
        raise PacnetValueError(
            f"{what}: the {ext} window (kernel {k}, dilation {d}) does not fit the "
            f"{tuple(sizes)} input padded by {p}, so the output would be "
            f"{'x'.join(map(str, out))}",
            hint="use a larger input or padding, or a smaller kernel or dilation")
    return k, s, p, d, out


def _check_K(K: Tensor, b: int, k, out, channels: Sequence[int], for_what: str) -> None:
    rank = len(k)
    want_c = "|".join(str(c) for c in dict.fromkeys(channels))
    want = f"[{b}, {want_c}, {', '.join(map(str, k))}, {', '.join(map(str, out))}]"
    shape = tuple(K.shape)
    if shape[1] not in channels or shape[:1] + shape[2:] != (b, *k, *out):
        raise PacnetValueError(
            f"K must be {want} {_kernel_layout(rank, 'channels')} for {for_what}, "
            f"got {list(shape)}",
            hint="compute it with pac_dist (then e.g. exp(-0.5 * D)) using the same kernel "
                 "size, stride, padding and dilation")


# ----------------------------------------------------------------------------- public API

def pac_dist(guide: Tensor, center: Optional[Tensor], kernel_size, stride, padding, dilation,
             asym: bool = False, channel_wise: bool = False) -> Tensor:
    """Squared guide differences over each output position's window (the PAC "im2dist").

    ``D[b, ., t, o] = sum_c diff_c²`` with ``diff_c = f[b, c, pos(o, t)] - ctr[b, c, o]``
    (``relu(diff_c)`` if ``asym``) for every tap ``t`` and output position ``o``;
    out-of-input taps read ``f = 0``.

    Args:
        guide: ``f``, ``b x Cg x *sizes`` with 1 to 3 spatial axes (``W``, ``H x W`` or
            ``D x H x W``).
        center: ``b x Cg x *out`` centre features (e.g. a smoothed guide), or ``None`` for
            the centre tap ``f(pos(o, k//2))`` (also zero-padded).
        kernel_size, stride, padding, dilation: an int (every axis) or one per spatial
            axis; odd kernel sizes.
        asym: keep only neighbours larger than the centre.
        channel_wise: keep one distance per guide channel instead of summing them.

    Returns:
        ``D``: ``b x 1 x *k x *out``, or ``b x Cg x *k x *out`` if ``channel_wise``; same
        dtype and device as ``guide``.  Differentiable w.r.t. ``guide`` and ``center``.
    """
    rank = _rank(guide, "guide", RANKS, "Cg")
    k, s, p, d, out = _geometry(guide.shape[2:], kernel_size, stride, padding, dilation,
                                "pac_dist")
    if center is not None:
        _tensor(center, "center", rank + 2, _layout(rank, "Cg", out=True))
    guide, center = _autocast(_DIST_POLICY, guide, center)
    if center is not None:
        _same([("guide", guide), ("center", center)])
        want = (guide.shape[0], guide.shape[1], *out)
        if tuple(center.shape) != want:
            raise PacnetValueError(f"center must be {list(want)} (batch, guide channels, output "
                                   f"sizes), got {list(center.shape)}")
    asym, channel_wise = bool(asym), bool(channel_wise)
    if backend_for(guide.device) == "reference":
        return _reference.pac_dist(guide, center, k, s, p, d, asym, channel_wise)
    return torch.ops.pacnet.pac_dist(guide, center, k, s, p, d, asym, channel_wise)


def pac_conv(x: Tensor, K: Tensor, weight: Tensor, bias: Optional[Tensor], stride, padding,
             dilation, shared_filters: bool = False) -> Tensor:
    """Pixel-adaptive cross-correlation (like ``F.convNd``, each tap scaled by ``K``).

    ``out[b, o, y] = bias[o] + sum_{c, t} weight[o, c, t] * K[b, 0, t, y] * x[b, c, pos(y, t)]``
    (``y`` an output position, ``t`` a tap); with ``shared_filters`` the single filter is
    applied depthwise: ``out[b, c, y] = bias[c] + sum_t weight[0, 0, t] * K[b, 0, t, y] *
    x[b, c, pos]``.

    Args:
        x: ``b x C x *sizes`` with 1 to 3 spatial axes.
        K: ``b x 1 x *k x *out`` adaptive kernel (e.g. ``exp(-0.5 * pac_dist(...))``).
        weight: ``O x C x *k`` (odd sizes), or ``1 x 1 x *k`` with ``shared_filters``
            (then ``O = C``).
        bias: ``O`` or ``None``.
        stride, padding, dilation: an int (every axis) or one per spatial axis.

    Returns:
        ``b x O x *out`` with the ``nn.ConvNd`` output size.  Differentiable w.r.t. ``x``,
        ``K``, ``weight`` and ``bias``.
    """
    return _conv(x, K, weight, bias, stride, padding, dilation, shared_filters, RANKS,
                 "pac_conv")


def pac_conv2d(x: Tensor, K: Tensor, weight: Tensor, bias: Optional[Tensor], stride, padding,
               dilation, shared_filters: bool = False) -> Tensor:
    """:func:`pac_conv` for 2-D inputs: ``x [b, C, H, W]``, ``K [b, 1, kh, kw, oh, ow]``,
    ``weight [O, C, kh, kw]``; geometry as ints or ``(h, w)`` pairs."""
    return _conv(x, K, weight, bias, stride, padding, dilation, shared_filters, (2,),
                 "pac_conv2d")


def _conv(x, K, weight, bias, stride, padding, dilation, shared_filters, ranks, what):
    x, K, weight, bias, s, p, d, _ = _conv_args(x, K, weight, bias, stride, padding, dilation,
                                                shared_filters, ranks, what)
    if backend_for(x.device) == "reference":
        return _reference.pac_conv(x, K.to(x.dtype), weight, bias, s, p, d,
                                   bool(shared_filters))
    return torch.ops.pacnet.pac_conv(x, K, weight, bias, s, p, d, bool(shared_filters))


def pac_conv_add_(out: Tensor, x: Tensor, K: Tensor, weight: Tensor, stride, padding,
                  dilation, shared_filters: bool = False, alpha: float = 1.0) -> Tensor:
    """``out += alpha * pac_conv(x, K, weight, None, ...)``, in place, for inference.

    The product is accumulated into ``out`` block by block, so no output-sized temporary is
    allocated on the CPU (mean-field CRF steps add their messages to the logits this way).
    ``out`` must be a contiguous ``b x O x *out`` tensor of ``x``'s dtype and device, in a
    storage of its own (not ``x``'s or ``K``'s).  Not differentiable: with grad mode on, no
    argument may require grad (use ``out + alpha * pac_conv(...)`` for training).  The CUDA
    kernels compute the product into a temporary, then add it.

    Returns:
        ``out``.
    """
    return _conv_add_(out, x, K, weight, stride, padding, dilation, shared_filters, alpha,
                      RANKS, "pac_conv_add_")


def pac_conv2d_add_(out: Tensor, x: Tensor, K: Tensor, weight: Tensor, stride, padding,
                    dilation, shared_filters: bool = False, alpha: float = 1.0) -> Tensor:
    """:func:`pac_conv_add_` for 2-D inputs (``out [b, O, oh, ow]``, ``x [b, C, H, W]``)."""
    return _conv_add_(out, x, K, weight, stride, padding, dilation, shared_filters, alpha,
                      (2,), "pac_conv2d_add_")


def _conv_add_(out, x, K, weight, stride, padding, dilation, shared_filters, alpha, ranks,
               what):
    x, K, weight, _, s, p, d, want = _conv_args(x, K, weight, None, stride, padding, dilation,
                                                shared_filters, ranks, what)
    rank = x.dim() - 2
    _tensor(out, "out", rank + 2, _layout(rank, "O", out=True))
    if tuple(out.shape) != want:
        raise PacnetValueError(f"out must be {list(want)} (batch, out channels, output sizes), "
                               f"got {list(out.shape)}")
    _same([("x", x), ("out", out)])
    if not out.is_contiguous():
        raise PacnetValueError("out must be contiguous", hint="pass out.contiguous() and use "
                                                              "the result")
    for name, t in (("x", x), ("K", K)):
        if torch.compiler.is_compiling():
            break  # data pointers do not exist while tracing; eager calls are checked
        if t.untyped_storage().data_ptr() == out.untyped_storage().data_ptr():
            raise PacnetValueError(f"out shares its storage with {name}, which the kernel "
                                   f"reads while it writes out",
                                   hint=f"pass a copy of {name} (or of out)")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (out, x, K, weight)):
        raise PacnetValueError(f"{what} is not differentiable, but grad mode is on and "
                               "an argument requires grad",
                               hint="use out + alpha * pac_conv(...), or torch.no_grad()")
    if not isinstance(alpha, numbers.Real) or isinstance(alpha, bool):
        raise PacnetValueError(f"alpha must be a number, got {alpha!r}")
    if backend_for(x.device) == "reference":
        return out.add_(_reference.pac_conv(x, K.to(x.dtype), weight, None, s, p, d,
                                            bool(shared_filters)), alpha=float(alpha))
    torch.ops.pacnet.pac_conv_add_(out, x, K, weight, s, p, d, bool(shared_filters),
                                   float(alpha))
    return out


def _conv_args(x, K, weight, bias, stride, padding, dilation, shared_filters, ranks, what):
    """The checked (and autocast) arguments of ``pac_conv``/``pac_conv_add_``, the
    geometry tuples and the output shape."""
    rank = _rank(x, "x", ranks)
    axes = ", ".join("k" + a.lower() for a in _AXES[rank])
    _tensor(K, "K", 2 * rank + 2, _kernel_layout(rank))
    _tensor(weight, "weight", rank + 2, f"[1, 1, {axes}]" if shared_filters
            else f"[O, C, {axes}]", batched=False)
    if bias is not None:
        _tensor(bias, "bias", 1, "[O]", batched=False)
    x, K, weight, bias = _autocast(_CONV_POLICY, x, K, weight, bias)
    _same([("x", x), ("weight", weight), ("bias", bias)], ("K", K))
    c = x.shape[1]
    if shared_filters:
        if tuple(weight.shape[:2]) != (1, 1):
            raise PacnetValueError(f"with shared_filters the weight must be [1, 1, {axes}], "
                                   f"got {list(weight.shape)}")
        out_c = c
    else:
        if weight.shape[1] != c:
            raise PacnetValueError(f"weight {list(weight.shape)} ([O, C, {axes}]) expects "
                                   f"{weight.shape[1]} input channels, x has {c}")
        out_c = weight.shape[0]
    if bias is not None and bias.shape[0] != out_c:
        raise PacnetValueError(f"bias must have {out_c} entries (one per output channel), "
                               f"got {bias.shape[0]}")
    k = _kernel_size(tuple(weight.shape[2:]), rank, "weight's kernel size")
    k, s, p, d, out = _geometry(x.shape[2:], k, stride, padding, dilation, what)
    _check_K(K, x.shape[0], k, out, (1,), what)
    return x, K, weight, bias, s, p, d, (x.shape[0], out_c) + tuple(out)


def pac_pool(x: Tensor, K: Tensor, kernel_size, stride, padding, dilation) -> Tensor:
    """Pixel-adaptive pooling: a ``K``-weighted **sum** over each window (no normalisation).

    ``out[b, c, y] = sum_t K[b, 0 | c, t, y] * x[b, c, pos(y, t)]``.

    Args:
        x: ``b x C x *sizes`` with 1 to 3 spatial axes.
        K: ``b x 1 x *k x *out`` (shared by all channels) or ``b x C x *k x *out``
            (channel-wise).
        kernel_size, stride, padding, dilation: an int (every axis) or one per spatial
            axis; odd kernel sizes.

    Returns:
        ``b x C x *out``.  Differentiable w.r.t. ``x`` and ``K`` (also channel-wise).
    """
    return _pool(x, K, kernel_size, stride, padding, dilation, RANKS, "pac_pool")


def pac_pool2d(x: Tensor, K: Tensor, kernel_size, stride, padding, dilation) -> Tensor:
    """:func:`pac_pool` for 2-D inputs: ``x [b, C, H, W]``, ``K [b, 1|C, kh, kw, oh, ow]``."""
    return _pool(x, K, kernel_size, stride, padding, dilation, (2,), "pac_pool2d")


def _pool(x, K, kernel_size, stride, padding, dilation, ranks, what):
    rank = _rank(x, "x", ranks)
    _tensor(K, "K", 2 * rank + 2, _kernel_layout(rank, "1|C"))
    x, K = _autocast(_POOL_POLICY, x, K)
    _same([("x", x)], ("K", K))
    k, s, p, d, out = _geometry(x.shape[2:], kernel_size, stride, padding, dilation, what)
    _check_K(K, x.shape[0], k, out, (1, x.shape[1]), what)
    if backend_for(x.device) == "reference":
        return _reference.pac_pool(x, K.to(x.dtype), k, s, p, d)
    return torch.ops.pacnet.pac_pool(x, K, k, s, p, d)
