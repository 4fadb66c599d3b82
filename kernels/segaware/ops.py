"""The segaware primitives as ``torch.library`` custom ops, plus checked Python entry points.

Public functions (validate their arguments, raise :class:`~pacnet.errors.PacnetValueError`
before any kernel runs, then call the ops):

* :func:`im2dist` -- local distances of an embedding, ``N x C x H x W -> N x k*k x Ho x Wo``;
* :func:`im2parity` -- same-label indicators of a label map, ``N x 1 x H x W -> N x k*k x Ho x Wo``;
* :func:`local_weighted_sum` -- ``sum_o w[o] * x(neighbour o)``, the normalised-filter
  message passing of NormConvMeanfield, without a ``k*k``-sized column tensor.

Ops (``torch.ops.pacnet.*``): ``im2dist``, ``im2dist_backward``, ``im2parity``,
``local_weighted_sum``, ``local_weighted_sum_backward``; each has a fake (meta)
implementation, and the forward ops have autograd formulas that call the backward ops.

Backend choice, dtype policy, device guard, threads and fork safety are those of every fused
op (:mod:`pacnet.kernels.runtime`): CPU tensors run the Numba CPU kernels, CUDA tensors the
Numba-CUDA kernels, other devices the plain-torch reference; ``PACNET_BACKEND=reference``
forces the reference, ``numba`` the fused kernels (an error where there are none), ``auto``
(or unset) chooses by device.  The kernels compute in float32/float64; float16/bfloat16
inputs are computed in float32 and the results cast back (under autocast: float32).  Every
op returns contiguous tensors, and its fake does too.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch

from pacnet.errors import PacnetValueError
from pacnet.kernels import runtime
from pacnet.kernels.segaware import reference as ref

IntOrPair = Union[int, Sequence[int]]
Pair = Tuple[int, int]

BIG = ref.BIG
_NORMS = {"L1": ref.L1, "L2": ref.L2, 1: ref.L1, 2: ref.L2}


# ----------------------------------------------------------------------------- dispatch
# Backend, dtype policy (float16/bfloat16 computed in float32 and cast back), device guard,
# threads and fork safety come from pacnet.kernels.runtime, as for the PAC ops.

def backend_for(t: torch.Tensor) -> str:
    """``"reference"``, ``"cpu"`` or ``"cuda"``: which implementation runs a call on ``t``
    (:func:`pacnet.kernels.runtime.backend`: ``PACNET_BACKEND=auto|numba|reference``)."""
    if runtime.backend(t.device) == "reference":
        return "reference"
    return t.device.type


def _cuda():
    return runtime.cuda_module("segaware")


def _cpu_run(name: str, work: int, *args) -> None:
    """Run CPU kernel ``name`` (its parallel driver, or its serial twin for small work and in
    forked children) on NumPy views of ``args``' tensors."""
    from pacnet.kernels.segaware import cpu
    fn = runtime.pick(work, getattr(cpu, name), getattr(cpu, name + "_serial"))
    fn(*(runtime.as_array(a) if isinstance(a, torch.Tensor) else a for a in args))


def _scalar(dtype: torch.dtype, value: float):
    import numpy as np
    return (np.float32 if dtype == torch.float32 else np.float64)(value)


def _hw(x: torch.Tensor, kernel, pad, stride, dilation) -> Pair:
    return (ref.out_size(x.shape[-2], kernel[0], pad[0], stride[0], dilation[0]),
            ref.out_size(x.shape[-1], kernel[1], pad[1], stride[1], dilation[1]))


# ----------------------------------------------------------------------------- im2dist op

def _im2dist_impl(emb: torch.Tensor, kernel: Sequence[int], pad: Sequence[int],
                  stride: Sequence[int], dilation: Sequence[int], norm: int,
                  remove_center: bool, remove_bounds: bool) -> torch.Tensor:
    norm_code(norm)
    backend = backend_for(emb)
    if backend == "reference":
        with torch.no_grad():
            return ref.im2dist(emb, kernel, pad, stride, dilation, norm, remove_center,
                               remove_bounds)
    (e,) = runtime.prep(emb)
    out = e.new_empty((e.shape[0], kernel[0] * kernel[1], *_hw(e, kernel, pad, stride,
                                                                  dilation)))
    if backend == "cuda":
        _cuda().im2dist_forward(e, out, kernel, pad, stride, dilation, norm, remove_center,
                                remove_bounds, BIG)
    else:
        d = e.dtype
        _cpu_run("im2dist_forward", out.numel() * e.shape[1], e, out, *kernel, *pad, *stride,
                 *dilation, int(norm), bool(remove_center), bool(remove_bounds),
                 _scalar(d, 0.0), _scalar(d, 0.5), _scalar(d, BIG))
    return out.to(emb.dtype)


def _im2dist_fake(emb, kernel, pad, stride, dilation, norm, remove_center, remove_bounds):
    return ((emb.shape[0], kernel[0] * kernel[1], *_hw(emb, kernel, pad, stride, dilation)),
            emb.dtype, emb)


def _im2dist_backward_impl(grad: torch.Tensor, emb: torch.Tensor, kernel: Sequence[int],
                           pad: Sequence[int], stride: Sequence[int], dilation: Sequence[int],
                           norm: int, remove_center: bool,
                           remove_bounds: bool) -> torch.Tensor:
    norm_code(norm)
    backend = backend_for(emb)
    if backend == "reference":
        with torch.no_grad():
            return ref.im2dist_backward(grad, emb, kernel, pad, stride, dilation, norm,
                                        remove_center, remove_bounds)
    (e,) = runtime.prep(emb)
    (g,) = runtime.prep(grad, dtype=e.dtype)
    gE = torch.empty_like(e)
    if backend == "cuda":
        _cuda().im2dist_backward(g, e, gE, kernel, pad, stride, dilation, norm)
    else:
        _cpu_run("im2dist_backward", 2 * g.numel() * e.shape[1], g, e, gE, *kernel, *pad,
                 *stride, *dilation, int(norm), _scalar(e.dtype, 0.0))
    return gE.to(emb.dtype)


def _im2dist_backward_fake(grad, emb, kernel, pad, stride, dilation, norm, remove_center,
                           remove_bounds):
    return emb.shape, emb.dtype, emb


def _im2dist_setup(ctx, inputs, output):
    emb, kernel, pad, stride, dilation, norm, remove_center, remove_bounds = inputs
    ctx.save_for_backward(emb)
    ctx.args = (kernel, pad, stride, dilation, norm, remove_center, remove_bounds)


def _im2dist_grad(ctx, grad):
    (emb,) = ctx.saved_tensors
    g = None
    if ctx.needs_input_grad[0]:
        g = torch.ops.pacnet.im2dist_backward(grad, emb, *ctx.args)
    return g, None, None, None, None, None, None, None


runtime.custom_op("im2dist_backward", _im2dist_backward_impl, fake=_im2dist_backward_fake)
runtime.custom_op("im2dist", _im2dist_impl, fake=_im2dist_fake,
                  autograd=(_im2dist_grad, _im2dist_setup), autocast=("float32",))


# ----------------------------------------------------------------------------- im2parity op

def _im2parity_impl(labels: torch.Tensor, kernel: Sequence[int], pad: Sequence[int],
                    stride: Sequence[int], dilation: Sequence[int], has_ignore: bool,
                    ignore_label: int) -> torch.Tensor:
    ignore = int(ignore_label) if has_ignore else None
    out_dtype = ref.parity_dtype(labels)
    if backend_for(labels) == "reference":
        return ref.im2parity(labels, kernel, pad, stride, dilation, ignore)
    lab = labels.detach().to(torch.int32).contiguous()           # C's (int) cast: truncation
    outside = float(ignore) if ignore is not None else ref.NO_PAIR
    hw = _hw(labels, kernel, pad, stride, dilation)
    dt = runtime.compute_dtype(labels.device, out_dtype)
    out = torch.empty((labels.shape[0], kernel[0] * kernel[1], *hw), dtype=dt,
                      device=labels.device)
    if labels.device.type == "cuda":
        _cuda().im2parity_forward(lab, out, kernel, pad, stride, dilation, has_ignore,
                                  int(ignore_label), outside)
    else:
        _cpu_run("im2parity_forward", out.numel(), lab, out, *kernel, *pad, *stride,
                 *dilation, bool(has_ignore), int(ignore_label), _scalar(dt, outside),
                 _scalar(dt, 1.0), _scalar(dt, 0.0))
    return out.to(out_dtype)


def _im2parity_fake(labels, kernel, pad, stride, dilation, has_ignore, ignore_label):
    return ((labels.shape[0], kernel[0] * kernel[1], *_hw(labels, kernel, pad, stride,
                                                          dilation)),
            ref.parity_dtype(labels), labels)


def _im2parity_setup(ctx, inputs, output):
    pass


def _im2parity_grad(ctx, grad):
    # A piecewise-constant function of the labels: its derivative is zero almost
    # everywhere (the fork raises NOT_IMPLEMENTED; labels never need gradients).
    return None, None, None, None, None, None, None


runtime.custom_op("im2parity", _im2parity_impl, fake=_im2parity_fake,
                  autograd=(_im2parity_grad, _im2parity_setup))


# ----------------------------------------------------------------------------- local weighted sum op

def _lws_impl(x: torch.Tensor, weights: torch.Tensor, kernel: Sequence[int],
              pad: Sequence[int], stride: Sequence[int],
              dilation: Sequence[int]) -> torch.Tensor:
    backend = backend_for(x)
    if backend == "reference":
        with torch.no_grad():
            return ref.local_weighted_sum(x, weights, kernel, pad, stride, dilation)
    xc, wc = runtime.prep(x, weights)
    out = xc.new_empty((xc.shape[0], xc.shape[1], *wc.shape[2:]))
    if backend == "cuda":
        _cuda().local_weighted_sum_forward(xc, wc, out, kernel, pad, stride, dilation)
    else:
        _cpu_run("local_weighted_sum_forward", out.numel() * wc.shape[1], xc, wc, out,
                 *kernel, *pad, *stride, *dilation, _scalar(xc.dtype, 0.0))
    return out.to(x.dtype)


def _lws_fake(x, weights, kernel, pad, stride, dilation):
    return (x.shape[0], x.shape[1], *weights.shape[2:]), x.dtype, x


def _lws_backward_impl(grad: torch.Tensor, x: torch.Tensor, weights: torch.Tensor,
                       kernel: Sequence[int], pad: Sequence[int], stride: Sequence[int],
                       dilation: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    backend = backend_for(x)
    if backend == "reference":
        with torch.no_grad():
            return ref.local_weighted_sum_backward(grad, x, weights, kernel, pad, stride,
                                                   dilation)
    xc, wc = runtime.prep(x, weights)
    (g,) = runtime.prep(grad, dtype=xc.dtype)
    gx = torch.empty_like(xc)
    gw = torch.empty_like(wc)
    if backend == "cuda":
        _cuda().local_weighted_sum_backward(g, xc, wc, gx, gw, kernel, pad, stride, dilation)
    else:
        zero = _scalar(xc.dtype, 0.0)
        work = g.numel() * wc.shape[1]
        _cpu_run("local_weighted_sum_backward_input", work, g, wc, gx, *kernel, *pad,
                 *stride, *dilation, zero)
        _cpu_run("local_weighted_sum_backward_weights", work, g, xc, gw, *kernel, *pad,
                 *stride, *dilation, zero)
    return gx.to(x.dtype), gw.to(weights.dtype)


def _lws_backward_fake(grad, x, weights, kernel, pad, stride, dilation):
    return [(x.shape, x.dtype, x), (weights.shape, weights.dtype, weights)]


def _lws_setup(ctx, inputs, output):
    x, weights, kernel, pad, stride, dilation = inputs
    ctx.save_for_backward(x, weights)
    ctx.args = (kernel, pad, stride, dilation)


def _lws_grad(ctx, grad):
    x, weights = ctx.saved_tensors
    gx, gw = torch.ops.pacnet.local_weighted_sum_backward(grad, x, weights, *ctx.args)
    return gx, gw, None, None, None, None


runtime.custom_op("local_weighted_sum_backward", _lws_backward_impl, fake=_lws_backward_fake)
runtime.custom_op("local_weighted_sum", _lws_impl, fake=_lws_fake,
                  autograd=(_lws_grad, _lws_setup), autocast=("float32", "float32"))


# ----------------------------------------------------------------------------- checked entry points

def _pair(name: str, value: IntOrPair, minimum: int) -> Pair:
    if isinstance(value, bool):
        raise PacnetValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        pair = (value, value)
    else:
        try:
            items = [v for v in value]
        except TypeError:
            raise PacnetValueError(f"{name} must be an int or a pair of ints, got {value!r}") from None
        if len(items) == 1:
            items = items * 2
        if len(items) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
            raise PacnetValueError(f"{name} must be an int or a pair of ints, got {value!r}")
        pair = (int(items[0]), int(items[1]))
    if min(pair) < minimum:
        raise PacnetValueError(f"{name} must be >= {minimum}, got {value!r}")
    return pair


def geometry(shape: Sequence[int], kernel_size: IntOrPair, pad: IntOrPair = 0,
             stride: IntOrPair = 1, dilation: IntOrPair = 1, *,
             what: str = "input") -> Tuple[Pair, Pair, Pair, Pair, Pair]:
    """Checked ``(kernel, pad, stride, dilation, (Ho, Wo))`` for an ``N x C x H x W`` input."""
    kernel = _pair("kernel_size", kernel_size, 1)
    pad = _pair("pad", pad, 0)
    stride = _pair("stride", stride, 1)
    dilation = _pair("dilation", dilation, 1)
    if len(shape) != 4:
        raise PacnetValueError(f"{what} must be 4-D (N x C x H x W), got shape {list(shape)}")
    H, W = int(shape[2]), int(shape[3])
    hw = (ref.out_size(H, kernel[0], pad[0], stride[0], dilation[0]),
          ref.out_size(W, kernel[1], pad[1], stride[1], dilation[1]))
    if min(hw) < 1 or min(shape) < 1:
        raise PacnetValueError(
            f"{what} of size {H}x{W} gives an empty output ({hw[0]}x{hw[1]}) with kernel_size "
            f"{kernel}, pad {pad}, stride {stride}, dilation {dilation}",
            hint="the dilated kernel extent d*(k-1)+1 must fit in the padded input")
    return kernel, pad, stride, dilation, hw


def norm_code(norm: Union[str, int]) -> int:
    """``"L1"``/``"L2"`` (or the proto numbers 1/2) -> 1/2; anything else is an error."""
    key = norm.upper() if isinstance(norm, str) else norm
    if isinstance(key, bool) or key not in _NORMS:
        raise PacnetValueError(f"unknown norm {norm!r}",
                               hint="use 'L1' (sum of |differences|) or 'L2' (half the squared distance)")
    return _NORMS[key]


def _float_tensor(name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise PacnetValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise PacnetValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    return t


def im2dist(emb: torch.Tensor, kernel_size: IntOrPair, pad: IntOrPair = 0, stride: IntOrPair = 1,
            dilation: IntOrPair = 1, norm: Union[str, int] = "L2", remove_center: bool = False,
            remove_bounds: bool = False) -> torch.Tensor:
    """Local distances of an embedding (the fork's Im2dist).

    ``emb``: ``N x C x H x W`` float.  Returns ``N x (kh*kw) x Ho x Wo``; channel
    ``i*kw + j`` is the distance between the centre pixel and the neighbour at tap
    ``(i, j)``, summed over channels: L1 ``sum |Δ|`` or L2 ``1/2 sum Δ²`` (no square
    root).  Centre outside the image: 0; removed centre tap, and out-of-image neighbours
    with ``remove_bounds``: :data:`BIG`; other out-of-image neighbours: 0.
    Differentiable w.r.t. ``emb``.
    """
    _float_tensor("emb", emb)
    kernel, pad, stride, dilation, _ = geometry(emb.shape, kernel_size, pad, stride, dilation,
                                                what="emb")
    code = norm_code(norm)
    backend_for(emb)  # a bad PACNET_BACKEND fails here, before any kernel
    return torch.ops.pacnet.im2dist(emb, list(kernel), list(pad), list(stride), list(dilation),
                                    code, bool(remove_center), bool(remove_bounds))


def im2parity(labels: torch.Tensor, kernel_size: IntOrPair, pad: IntOrPair = 0,
              stride: IntOrPair = 1, dilation: IntOrPair = 1,
              ignore_label: Optional[int] = None) -> torch.Tensor:
    """Same-label indicators of a label map (the fork's Im2parity).

    ``labels``: ``N x 1 x H x W``, float or integer (compared as ints, truncated).
    Returns ``N x (kh*kw) x Ho x Wo`` in the labels' float dtype (the default dtype for
    integer labels): 1 where the neighbour's label equals the centre's, else 0; an
    out-of-image neighbour counts as label 0; ``ignore_label`` (if given) wherever either
    label equals it; where the centre is outside the image: ``ignore_label`` if given,
    else -1.  Not differentiable (zero gradient).
    """
    if not isinstance(labels, torch.Tensor):
        raise PacnetValueError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype == torch.bool or labels.is_complex():
        raise PacnetValueError(f"labels must hold class numbers (float or integer), got {labels.dtype}")
    kernel, pad, stride, dilation, _ = geometry(labels.shape, kernel_size, pad, stride, dilation,
                                                what="labels")
    if labels.shape[1] != 1:
        raise PacnetValueError(
            f"labels must have 1 channel (N x 1 x H x W), got shape {list(labels.shape)}",
            hint="Im2parity compares one label map; the fork silently used the last channel")
    if ignore_label is not None and (isinstance(ignore_label, bool) or not isinstance(ignore_label, int)):
        raise PacnetValueError(f"ignore_label must be an int or None, got {ignore_label!r}")
    backend_for(labels)
    return torch.ops.pacnet.im2parity(labels, list(kernel), list(pad), list(stride),
                                      list(dilation), ignore_label is not None,
                                      int(ignore_label or 0))


def local_weighted_sum(x: torch.Tensor, weights: torch.Tensor, kernel_size: IntOrPair,
                       pad: IntOrPair = 0, stride: IntOrPair = 1,
                       dilation: IntOrPair = 1) -> torch.Tensor:
    """``out[n,c,y,x] = sum_o weights[n,o,y,x] * x[n,c,nb_o(y,x)]`` (0 outside the image).

    ``x``: ``N x C x H x W``; ``weights``: ``N x (kh*kw) x Ho x Wo`` (e.g. a softmax over
    taps of ``-scale * im2dist``).  Returns ``N x C x Ho x Wo``.  Differentiable w.r.t.
    both; never materialises the ``N x C*k*k x Ho*Wo`` columns.
    """
    _float_tensor("x", x)
    _float_tensor("weights", weights)
    kernel, pad, stride, dilation, hw = geometry(x.shape, kernel_size, pad, stride, dilation,
                                                 what="x")
    expect = (x.shape[0], kernel[0] * kernel[1], *hw)
    if tuple(weights.shape) != expect:
        raise PacnetValueError(
            f"weights must have shape {list(expect)} (N x kh*kw x Ho x Wo), got {list(weights.shape)}")
    if weights.dtype != x.dtype or weights.device != x.device:
        raise PacnetValueError(
            f"x and weights must share dtype and device, got {x.dtype}/{x.device} and "
            f"{weights.dtype}/{weights.device}")
    backend_for(x)
    return torch.ops.pacnet.local_weighted_sum(x, weights, list(kernel), list(pad), list(stride),
                                               list(dilation))
