"""Pixel-adaptive convolution (PAC): the Python API, a drop-in for NVlabs/pacnet's ``pac.py``,
and its 3-D counterpart for volumes and video clips.

Same names, signatures, semantics and ``state_dict`` keys as the original (Su et al.,
"Pixel-Adaptive Convolutional Neural Networks", CVPR 2019), reimplemented from a
behavioural spec; the heavy lifting runs in the fused kernels of
:mod:`pacnet.kernels.pac` (``pac_dist``, ``pac_conv``, ``pac_pool``), so the input's
``[b, C*k^r, out]`` column tensor is never built whole (on the CPU ``pac_conv`` builds it a
block of about 16 MiB at a time for its GEMMs).

Every 2-D name has a 3-D twin with the same arguments and conventions:
:class:`PacConv3d`, :class:`PacConvTranspose3d`, :class:`PacPool3d`, :func:`pacconv3d`,
:func:`pacconv_transpose3d`, :func:`pacpool3d`, :func:`packernel3d` take
``N x C x D x H x W`` inputs (a video clip is ``N x C x T x H x W``), ints or ``(d, h, w)``
triples for kernel_size/stride/padding/dilation/output_padding, and give the
``nn.Conv3d``/``nn.ConvTranspose3d``/``nn.AvgPool3d`` output sizes.  Both run the same code
(the ``rank`` of a module class, ``_packernel``/``_pacconv``/... with a rank): a depth-1
volume padded in depth gives the 2-D layer's result with the centre depth slice of the
weight, since the taps above and below read zeros.

Notation: input ``x`` is ``N x C x *sizes`` (``H x W`` or ``D x H x W``), guide ``f`` is
``N x Cg x *sizes``, filter ``k`` (odd), stride ``s``, padding ``p``, dilation ``d``, one
per spatial axis; along each axis an output index ``o`` reads taps ``t`` at
``pos(o, t) = o*s - p + t*d`` with zero padding (as ``F.unfold``).

The adaptive kernel ``K`` (:func:`packernel2d`, :func:`packernel3d`) is
``N x 1 x *k x *out`` (``N x 1 x kh x kw x oh x ow`` in 2-D; ``N x Cg x ...`` channel-wise)::

    D[t, o] = sum_c (f[c, pos(o, t)] - f_ctr[c, o])**2      (relu on the difference if _asym)
    gaussian:           K = exp(-0.5 * D)
    inv_{a}_{l}:        K = a + (D + 1e-4) ** (0.5 * l)

``f_ctr`` is the centre tap, or the guide smoothed with ``smooth_kernel``.

Compatibility conventions kept from the original (they surprise people, so here they are):

* :class:`PacConvTranspose2d` does **not** flip its weight: with ``K == 1`` it equals
  ``nn.ConvTranspose2d`` whose weight is ``weight.flip(2, 3)`` (3-D: ``flip(2, 3, 4)`` and
  ``nn.ConvTranspose3d``).  The weight is stored ``in x out x *k`` like
  ``nn.ConvTranspose2d``.
* :class:`PacPool2d` without ``normalize_kernel`` is a **weighted sum** (``K == 1`` gives
  ``AvgPool2d * k*k``); normalised it is a weighted average over in-image taps
  (``count_include_pad=False``).  Its ``stride`` defaults to **1**, not ``kernel_size``.
* Without normalisation, ``K`` at padded taps is ``exp(-0.5 |f_ctr|^2)`` (not 0), which
  is harmless inside the layers because the input is zero there.
* ``native_impl`` is accepted everywhere and ignored: there is one implementation, the
  fused kernels, which are exact in float64 and keep only (input, guide, K) for backward.

Deliberate differences from the original (its bugs, see the spec's section 6):

* Masks work (the original crashes on ``1 - bool`` on torch >= 1.2); see :func:`packernel2d`.
  The returned output mask has the input's floating dtype (the original's was uint8).
* Smoothing works with dilation: the smoothing window sits on the same dilated lattice as
  the filter taps, centred on the centre tap, so ``average_k`` is the mean of the guide
  over the window's own taps for every dilation (identical to the original at ``d = 1``;
  the original crashes for ``d > 1``).
* Every ``kernel_type`` and smoothing works without ``native_impl=True``.
* ``shared_filters`` is correct for the transposed layer (the original's default path
  collapsed the channels); channel-wise pooling has correct input gradients.
* Arguments are validated up front and raise :class:`~pacnet.errors.PacnetValueError`
  (a ``ValueError``): even kernel sizes, the padding limit ``p <= d(k-1)/2`` of
  :class:`PacConv2d`/:class:`PacPool2d` (documented but not enforced by the original),
  ``output_padding >= max(stride, dilation)`` (as ``nn.ConvTranspose2d``), inputs, guides,
  masks and precomputed kernels of the wrong rank or shape, unknown type strings, integer
  tensors, tensors on different devices or of different dtypes, a mask together with a
  precomputed kernel (the original silently ignored the mask).
"""

from __future__ import annotations

import math
import operator
from typing import Any, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

import pacnet.kernels.pac as _kernels
from pacnet.errors import PacnetValueError
from pacnet.kernels.pac.reference import taps as _taps

__all__ = ["PacConv2d", "PacConvTranspose2d", "PacPool2d", "pacconv2d", "pacconv_transpose2d",
           "pacpool2d", "packernel2d", "nd2col", "PacConv3d", "PacConvTranspose3d",
           "PacPool3d", "pacconv3d", "pacconv_transpose3d", "pacpool3d", "packernel3d"]

Pair = Tuple[int, int]
Ints = Tuple[int, ...]
IntOrPair = Union[int, Sequence[int]]
IntOrTriple = Union[int, Sequence[int]]

_INV_EPS = 1e-4
_FILLERS = ("uniform", "linear", "crf", "crf_perturbed", "pool", "crf_pool")
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_SEQ_WORDS = {1: "a sequence of one int", 2: "a pair of ints", 3: "a triple of ints (d, h, w)"}
_LAYOUT = {2: "N x C x H x W", 3: "N x C x D x H x W"}


# ----------------------------------------------------------------------------- argument checks

def _ntuple(value: Any, name: str, minimum: int, rank: int = 2) -> Ints:
    """``value`` (an int, or a sequence of ``rank`` ints) as ``rank`` ints, each
    ``>= minimum``."""
    words = _SEQ_WORDS[rank]
    if isinstance(value, torch.Tensor) or isinstance(value, bool):
        raise PacnetValueError(f"{name} must be an int or {words}, got {value!r}")
    try:
        if isinstance(value, Sequence) and not isinstance(value, str):
            if len(value) != rank:
                raise PacnetValueError(f"{name} must be an int or {words}, got {value!r}")
            values = tuple(operator.index(v) for v in value)
        else:
            values = (operator.index(value),) * rank
    except TypeError:
        raise PacnetValueError(f"{name} must be an int or {words}, got {value!r}") from None
    if min(values) < minimum:
        raise PacnetValueError(f"{name} must be >= {minimum}, got {value!r}")
    return values


def _odd_kernel(value: Any, name: str = "kernel_size", rank: int = 2) -> Ints:
    k = _ntuple(value, name, 1, rank)
    if any(v % 2 == 0 for v in k):
        raise PacnetValueError(f"{name} must be odd in every dimension, got {value!r}",
                               hint="PAC filters have a centre tap; use 3, 5, 7, ...")
    return k


def _check_padding_limit(padding: Ints, kernel_size: Ints, dilation: Ints) -> None:
    for p, k, d in zip(padding, kernel_size, dilation):
        if 2 * p > d * (k - 1):
            raise PacnetValueError(
                f"padding {padding} exceeds dilation*(kernel_size-1)/2 = "
                f"{tuple(dd * (kk - 1) // 2 for kk, dd in zip(kernel_size, dilation))}",
                hint="with more padding some output windows are centred outside the input, "
                     "where the adaptive kernel has no guide to compare with")


def _check_output_padding(output_padding: Ints, stride: Ints, dilation: Ints) -> None:
    for op, s, d in zip(output_padding, stride, dilation):
        if op >= max(s, d):
            raise PacnetValueError(
                f"output_padding {output_padding} must be smaller than stride or dilation "
                f"(stride {stride}, dilation {dilation})",
                hint="as for nn.ConvTranspose2d / nn.ConvTranspose3d")


def _check_tensor(t: Any, name: str, dim: Optional[int] = None, allow_bool: bool = False) -> None:
    if not isinstance(t, torch.Tensor):
        raise PacnetValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not (t.is_floating_point() or (allow_bool and t.dtype == torch.bool)):
        kinds = "a floating-point or bool" if allow_bool else "a floating-point"
        raise PacnetValueError(f"{name} must be {kinds} tensor, got dtype {t.dtype}",
                               hint=f"convert it, e.g. {name}.float()")
    if dim is not None and t.dim() != dim:
        layout = f" ({_LAYOUT[dim - 2]})" if dim - 2 in _LAYOUT else ""
        raise PacnetValueError(f"{name} must be {dim}-D{layout}, got shape {list(t.shape)}",
                               hint=_rank_hint(t.dim(), dim))


def _rank_hint(got: int, want: int) -> Optional[str]:
    """Which API a tensor of the other rank is for (4-D vs 5-D inputs, 6-D vs 8-D kernels)."""
    names = {4: "the 2-D API (PacConv2d, pacconv2d, ...)", 5: "the 3-D API (PacConv3d, "
             "pacconv3d, ...)", 6: "the 2-D API", 8: "the 3-D API"}
    if got in names and want in names and got != want:
        return f"a {got}-D tensor is for {names[got]}"
    return None


def _autocast(t: torch.Tensor) -> bool:
    try:
        return torch.is_autocast_enabled(t.device.type)
    except RuntimeError:  # a device type autocast does not know (meta, ...)
        return False


def _check_same(tensors: Sequence[Tuple[str, Optional[torch.Tensor]]], dtype: bool = True) -> None:
    """All given tensors on one device and (floating ones) of one dtype."""
    given = [(n, t) for n, t in tensors if isinstance(t, torch.Tensor)]
    if not given:
        return
    n0, t0 = given[0]
    if dtype and _autocast(t0):
        dtype = False  # under autocast float16/bfloat16 activations meet float32 parameters
    for n, t in given[1:]:
        if t.device != t0.device:
            raise PacnetValueError(f"{n} is on {t.device} but {n0} is on {t0.device}",
                                   hint="move all tensors to one device")
        if dtype and t.is_floating_point() and t.dtype != t0.dtype:
            raise PacnetValueError(f"{n} has dtype {t.dtype} but {n0} has dtype {t0.dtype}",
                                   hint="convert them to one floating-point dtype")


def _conv_out_size(sizes: Sequence[int], k: Ints, s: Ints, p: Ints, d: Ints) -> Ints:
    return _kernels.out_size(sizes, k, s, p, d)


def _transposed_out_size(sizes: Sequence[int], k: Ints, s: Ints, p: Ints, op: Ints,
                         d: Ints) -> Ints:
    return tuple((sizes[i] - 1) * s[i] - 2 * p[i] + d[i] * (k[i] - 1) + 1 + op[i]
                 for i in range(len(sizes)))


def _positive_size(out: Sequence[int], what: str, sizes: Sequence[int]) -> None:
    if min(out) < 1:
        raise PacnetValueError(f"{what} of an input of size {tuple(sizes)} would be "
                               f"{tuple(out)}, which is empty",
                               hint="use a larger input or less dilation/kernel")


# ----------------------------------------------------------------------------- type strings

def _parse_kernel_type(kernel_type: Any) -> Tuple[str, float, float, bool, bool]:
    """``(kind, alpha, lambda, asym, fixed)`` of ``'gaussian'`` or
    ``'inv_{a}_{l}[_asym][_fixed]'``."""
    hint = ("use 'gaussian' or 'inv_{alpha}_{lambda}' with optional '_asym' and '_fixed', "
            "e.g. 'inv_1_-1'")
    if not isinstance(kernel_type, str):
        raise PacnetValueError(f"kernel_type must be a string, got {kernel_type!r}", hint=hint)
    if kernel_type == "gaussian":
        return "gaussian", 0.0, 0.0, False, False
    parts = kernel_type.split("_")
    if parts[0] == "inv" and len(parts) >= 3:
        flags = parts[3:]
        if len(set(flags)) == len(flags) and set(flags) <= {"asym", "fixed"}:
            try:
                alpha, lam = float(parts[1]), float(parts[2])
            except ValueError:
                alpha = lam = math.nan
            if math.isfinite(alpha) and math.isfinite(lam):
                return "inv", alpha, lam, "asym" in flags, "fixed" in flags
    raise PacnetValueError(f"unknown kernel_type {kernel_type!r}", hint=hint)


def _parse_smooth_kernel_type(smooth_kernel_type: Any) -> Tuple[str, int]:
    """``(kind, width)`` of ``'none'``, ``'gaussian'``, ``'average_{w}'`` or ``'full_{w}'``."""
    hint = "use 'none', 'gaussian', 'average_{w}' or 'full_{w}' with an odd width w"
    if smooth_kernel_type == "none":
        return "none", 0
    if smooth_kernel_type == "gaussian":
        return "gaussian", 3
    if isinstance(smooth_kernel_type, str) and "_" in smooth_kernel_type:
        kind, _, width = smooth_kernel_type.partition("_")
        if kind in ("average", "full") and width.isdigit():
            w = int(width)
            if w % 2 == 0 or w < 1:
                raise PacnetValueError(f"smoothing width in {smooth_kernel_type!r} must be odd",
                                       hint="the smoothed guide is centred on the centre tap")
            return kind, w
    raise PacnetValueError(f"unknown smooth_kernel_type {smooth_kernel_type!r}", hint=hint)


def _outer(profiles: Sequence[torch.Tensor]) -> torch.Tensor:
    """The outer product of 1-D profiles: ``out[i, j, ...] = p0[i] * p1[j] * ...``."""
    out = profiles[0]
    for prof in profiles[1:]:
        out = out[..., None] * prof
    return out


def _default_smooth_kernel(kind: str, width: int, dtype=None, device=None,
                           rank: int = 2) -> torch.Tensor:
    """The fixed smoothing kernel of a type, ``1 x 1 x w x ... x w`` (``rank`` axes): the
    binomial 1/4, 1/2, 1/4 on every axis (``gaussian``) or a box of ``w^rank`` taps."""
    if kind == "gaussian":
        sk = _outer([torch.tensor([0.25, 0.5, 0.25], dtype=torch.float64)] * rank)
    else:
        sk = torch.full((width,) * rank, 1.0 / width ** rank, dtype=torch.float64)
    return sk.view(1, 1, *sk.shape).to(dtype=dtype or torch.get_default_dtype(), device=device)


# ----------------------------------------------------------------------------- unfolding

def _pads(lo: Sequence[int], hi: Sequence[int]) -> list:
    """``F.pad``'s argument (last axis first) for per-axis ``lo``/``hi`` paddings."""
    return [v for i in reversed(range(len(lo))) for v in (lo[i], hi[i])]


def _zero_insert_pad(x: torch.Tensor, stride: Ints, pad_lo: Ints, pad_hi: Ints) -> torch.Tensor:
    """Put ``x`` at stride ``stride`` (zeros between samples), then pad (negative crops)."""
    sizes = x.shape[2:]
    if any(s > 1 for s in stride):
        # [n, C, a, 1, b, 1, ...] padded to [n, C, a, s0, b, s1, ...]: each sample followed by
        # s - 1 zeros; the zeros after the last one are cut off.
        z = x.reshape(*x.shape[:2], *(v for n in sizes for v in (n, 1)))
        z = F.pad(z, [v for s in reversed(stride) for v in (0, s - 1, 0, 0)][:-2])
        z = z.reshape(*x.shape[:2], *(n * s for n, s in zip(sizes, stride)))
        x = z[(slice(None), slice(None))
              + tuple(slice(0, (n - 1) * s + 1) for n, s in zip(sizes, stride))]
    return F.pad(x, _pads(pad_lo, pad_hi))


def _transposed_pads(k: Ints, p: Ints, op: Ints, d: Ints) -> Tuple[Ints, Ints]:
    lo = tuple((k[i] - 1) * d[i] - p[i] for i in range(len(k)))
    hi = tuple(lo[i] + op[i] for i in range(len(k)))
    return lo, hi


def nd2col(input_nd: torch.Tensor, kernel_size: IntOrPair, stride: IntOrPair = 1,
           padding: IntOrPair = 0, output_padding: IntOrPair = 0, dilation: IntOrPair = 1,
           transposed: bool = False, use_pyinn_if_possible: bool = False) -> torch.Tensor:
    """Unfold ``N x C x *sizes`` into ``N x C x *k x *out`` (zero padding): ``N x C x H x W``
    into ``N x C x kh x kw x oh x ow``, or a volume ``N x C x D x H x W`` into
    ``N x C x kd x kh x kw x od x oh x ow`` (geometry as ints or one value per axis).

    With ``transposed=True`` the input is first zero-inserted at ``stride`` and padded by
    ``(k-1)d - p`` (top/left) and ``(k-1)d - p + output_padding`` (bottom/right), and then
    unfolded with stride 1 and no padding: the taps a transposed convolution reads.
    This materialises ``k^r`` copies of the input; the PAC layers never call it on their
    input (only on 1-channel masks).  ``use_pyinn_if_possible`` is accepted and ignored.
    """
    _check_tensor(input_nd, "input_nd", allow_bool=True)
    rank = input_nd.dim() - 2
    if rank not in (2, 3):
        raise PacnetValueError(f"input_nd must be 4-D ({_LAYOUT[2]}) or 5-D ({_LAYOUT[3]}), "
                               f"got shape {list(input_nd.shape)}")
    k = _ntuple(kernel_size, "kernel_size", 1, rank)
    s = _ntuple(stride, "stride", 1, rank)
    p = _ntuple(padding, "padding", 0, rank)
    op = _ntuple(output_padding, "output_padding", 0, rank)
    d = _ntuple(dilation, "dilation", 1, rank)
    x = input_nd if input_nd.is_floating_point() else input_nd.to(torch.get_default_dtype())
    sizes = x.shape[2:]
    if transposed:
        out = _transposed_out_size(sizes, k, s, p, op, d)
        _positive_size(out, "the transposed output", sizes)
        lo, hi = _transposed_pads(k, p, op, d)
        x = _zero_insert_pad(x, s, lo, hi)
        s, p = (1,) * rank, (0,) * rank
    else:
        _positive_size(_conv_out_size(sizes, k, s, p, d), "the unfolded output", sizes)
    return _taps(x, k, s, p, d)


# ----------------------------------------------------------------------------- kernel

def _as_param_tensor(value: Any, name: str, like: torch.Tensor, channels: int) -> torch.Tensor:
    """``inv_alpha``/``inv_lambda`` as a tensor broadcastable over K's channel axis."""
    if not isinstance(value, torch.Tensor):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise PacnetValueError(f"{name} must be a number or a tensor, got {value!r}")
        return torch.tensor(float(value), dtype=like.dtype, device=like.device)
    _check_tensor(value, name)
    _check_same([("input", like), (name, value)])
    if value.numel() == 1:
        return value.reshape(())
    if value.dim() != 1 or value.numel() != channels:
        raise PacnetValueError(
            f"{name} must be a scalar or a vector of length {channels} (the kernel's channels), "
            f"got shape {list(value.shape)}")
    return value.view(1, -1, *(1,) * (2 * (like.dim() - 2)))


def _smoothed_center(guide: torch.Tensor, smooth_kernel: torch.Tensor, k: Ints, s: Ints, p: Ints,
                     d: Ints) -> torch.Tensor:
    """The guide smoothed around each window's centre tap: ``N x Cg x *out``.

    Each channel is convolved separately; the smoothing window has the filter's dilation
    and is centred on ``pos(o, centre) = o*s - p + (k//2)*d`` (zero padding; a negative
    padding crops).
    """
    b, cg = guide.shape[:2]
    rank = guide.dim() - 2
    sz = smooth_kernel.shape[2:]
    pads = [p[i] - (k[i] // 2) * d[i] + (sz[i] // 2) * d[i] for i in range(rank)]
    g = F.pad(guide.reshape(b * cg, 1, *guide.shape[2:]), _pads(pads, pads))
    ctr = _CONV[rank](g, smooth_kernel, stride=s, dilation=d)
    return ctr.reshape(b, cg, *ctr.shape[2:])


def packernel2d(input: torch.Tensor, mask: Optional[torch.Tensor] = None,
                kernel_size: IntOrPair = 0, stride: IntOrPair = 1, padding: IntOrPair = 0,
                output_padding: IntOrPair = 0, dilation: IntOrPair = 1,
                kernel_type: str = "gaussian", smooth_kernel_type: str = "none",
                smooth_kernel: Optional[torch.Tensor] = None, inv_alpha: Any = None,
                inv_lambda: Any = None, channel_wise: bool = False, normalize_kernel: bool = False,
                transposed: bool = False, native_impl: bool = False
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The adaptive kernel ``K`` of a guide, and the output mask: ``(K, output_mask | None)``.

    Shapes: ``input`` (the guide) ``N x Cg x H x W``; ``K`` is ``N x 1 x kh x kw x oh x ow``
    (``N x Cg x ...`` with ``channel_wise``), ``oh, ow`` the ``nn.Conv2d`` output size.
    With ``transposed=True`` the guide is at the *output* resolution of a transposed
    convolution with these arguments, ``K`` is computed at stride 1 with "same" padding
    (so ``oh, ow = H, W``), and the low-resolution input size is recovered as
    ``(H - op - 1 - (k-1)d + 2p)/s + 1``, which must be a whole number.

    ``kernel_type``: ``'gaussian'`` gives ``exp(-0.5 D)``; ``'inv_{a}_{l}[_asym][_fixed]'``
    gives ``alpha + (D + 1e-4)**(0.5*lambda)`` with ``alpha, lambda`` from ``inv_alpha``,
    ``inv_lambda`` (numbers, 0-dim tensors, or with ``channel_wise`` vectors of length Cg;
    default: the values in the string); ``_asym`` applies relu to ``f(pos) - f_ctr``.

    ``smooth_kernel_type`` (``'none'``, ``'gaussian'``, ``'average_{w}'``, ``'full_{w}'``)
    replaces the centre feature by the guide convolved with ``smooth_kernel``
    (``1 x 1 x w x w``; default: the fixed kernel of the type).  The smoothing window lies
    on the filter's dilated lattice, centred on the centre tap.

    ``mask`` (``N x 1 x H x W``, the *input* resolution; low resolution when transposed;
    bool or floating, 1 = valid) is unfolded like the input and multiplied into ``K``.
    Then, without ``normalize_kernel``, ``K`` is divided by
    ``n_valid_mask_taps / n_in_image_taps`` (partial-convolution rescaling; windows with
    no valid tap get ``K = 0``); with ``normalize_kernel`` it is divided by its masked
    sum.  ``output_mask`` (``N x 1 x 1 x 1 x oh x ow``, the guide's dtype, 1 where that
    divisor is non-zero) is returned only when a mask is given.

    ``normalize_kernel`` without a mask zeroes taps outside the image (for transposed:
    taps on inserted zeros or padding) and divides by the sum over taps; a zero sum
    divides by 1.  ``native_impl`` is ignored.
    """
    return _packernel(2, input, mask, kernel_size, stride, padding, output_padding, dilation,
                      kernel_type, smooth_kernel_type, smooth_kernel, inv_alpha, inv_lambda,
                      channel_wise, normalize_kernel, transposed)


def packernel3d(input: torch.Tensor, mask: Optional[torch.Tensor] = None,
                kernel_size: IntOrTriple = 0, stride: IntOrTriple = 1,
                padding: IntOrTriple = 0, output_padding: IntOrTriple = 0,
                dilation: IntOrTriple = 1, kernel_type: str = "gaussian",
                smooth_kernel_type: str = "none", smooth_kernel: Optional[torch.Tensor] = None,
                inv_alpha: Any = None, inv_lambda: Any = None, channel_wise: bool = False,
                normalize_kernel: bool = False, transposed: bool = False,
                native_impl: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """:func:`packernel2d` for volumes: ``input`` (the guide) ``N x Cg x D x H x W``, ``K``
    ``N x 1|Cg x kd x kh x kw x od x oh x ow`` (``nn.Conv3d`` output sizes; the guide's own
    size when ``transposed``), ``mask`` ``N x 1 x D x H x W`` at the input resolution,
    ``smooth_kernel`` ``1 x 1 x w x w x w``, output mask ``N x 1 x 1 x 1 x 1 x od x oh x ow``.
    Geometry as ints or ``(d, h, w)`` triples; everything else as :func:`packernel2d`.
    """
    return _packernel(3, input, mask, kernel_size, stride, padding, output_padding, dilation,
                      kernel_type, smooth_kernel_type, smooth_kernel, inv_alpha, inv_lambda,
                      channel_wise, normalize_kernel, transposed)


def _packernel(rank, input, mask, kernel_size, stride, padding, output_padding, dilation,
               kernel_type, smooth_kernel_type, smooth_kernel, inv_alpha, inv_lambda,
               channel_wise, normalize_kernel, transposed):
    """:func:`packernel2d` (``rank`` 2) and :func:`packernel3d` (``rank`` 3)."""
    _check_tensor(input, "input", rank + 2)
    k = _odd_kernel(kernel_size, rank=rank)
    s = _ntuple(stride, "stride", 1, rank)
    p = _ntuple(padding, "padding", 0, rank)
    op = _ntuple(output_padding, "output_padding", 0, rank)
    d = _ntuple(dilation, "dilation", 1, rank)
    kind, alpha0, lambda0, asym, _fixed = _parse_kernel_type(kernel_type)
    smooth_kind, smooth_width = _parse_smooth_kernel_type(smooth_kernel_type)
    b, cg = input.shape[:2]
    sizes = tuple(input.shape[2:])
    _check_same([("input", input), ("mask", mask), ("smooth_kernel", smooth_kernel)], dtype=False)
    _check_same([("input", input), ("smooth_kernel", smooth_kernel)])

    if transposed:
        _check_output_padding(op, s, d)
        low = []
        for i, size in enumerate(sizes):
            span = size - op[i] - 1 - (k[i] - 1) * d[i] + 2 * p[i]
            if span < 0 or span % s[i]:
                raise PacnetValueError(
                    f"a guide of size {sizes} is not the output size of a transposed "
                    f"convolution with kernel_size {k}, stride {s}, padding {p}, "
                    f"output_padding {op}, dilation {d}")
            low.append(span // s[i] + 1)
        in_sizes = tuple(low)
        out_sizes = sizes
        k_stride, k_pad = (1,) * rank, tuple((k[i] - 1) * d[i] // 2 for i in range(rank))
    else:
        in_sizes = sizes
        out_sizes = _conv_out_size(in_sizes, k, s, p, d)
        _positive_size(out_sizes, "the convolution output", in_sizes)
        k_stride, k_pad = s, p

    if mask is not None:
        _check_tensor(mask, "mask", rank + 2, allow_bool=True)
        if tuple(mask.shape) != (b, 1) + tuple(in_sizes):
            where = "the low-resolution input" if transposed else "the input"
            raise PacnetValueError(f"mask must be {[b, 1, *in_sizes]} ({where} size, one "
                                   f"channel), got {list(mask.shape)}")
        if mask.is_floating_point() and mask.dtype != input.dtype and not _autocast(input):
            raise PacnetValueError(f"mask has dtype {mask.dtype} but input has {input.dtype}")

    # Centre features (smoothed or not) and the distance tensor D.
    center = None
    if smooth_kind != "none":
        if smooth_kernel is None:
            smooth_kernel = _default_smooth_kernel(smooth_kind, smooth_width, input.dtype,
                                                   input.device, rank)
        _check_tensor(smooth_kernel, "smooth_kernel", rank + 2)
        want = (1, 1) + (smooth_width,) * rank
        if tuple(smooth_kernel.shape) != want:
            raise PacnetValueError(f"smooth_kernel must be {list(want)} for "
                                   f"{smooth_kernel_type!r}, got {list(smooth_kernel.shape)}")
        center = _smoothed_center(input, smooth_kernel, k, k_stride, k_pad, d)
    elif smooth_kernel is not None:
        raise PacnetValueError("smooth_kernel given but smooth_kernel_type is 'none'",
                               hint="pass smooth_kernel_type, e.g. 'full_3'")
    if kind == "gaussian" and (inv_alpha is not None or inv_lambda is not None):
        raise PacnetValueError("inv_alpha/inv_lambda given but kernel_type is 'gaussian'",
                               hint="use kernel_type 'inv_{alpha}_{lambda}'")
    k_channels = cg if channel_wise else 1
    if kind == "inv":
        alpha = _as_param_tensor(alpha0 if inv_alpha is None else inv_alpha, "inv_alpha", input,
                                 k_channels)
        lam = _as_param_tensor(lambda0 if inv_lambda is None else inv_lambda, "inv_lambda", input,
                               k_channels)

    dist = _kernels.pac_dist(input, center, k, k_stride, k_pad, d, asym=asym,
                             channel_wise=bool(channel_wise))
    if kind == "gaussian":
        kernel = torch.exp(-0.5 * dist)
    else:
        kernel = alpha + torch.pow(dist + _INV_EPS, 0.5 * lam)

    # Which taps hold real input samples (for the mask ratio and normalisation).
    def taps(t: torch.Tensor) -> torch.Tensor:
        return nd2col(t, k, s, p, op, d, transposed=transposed)

    tap_dims = tuple(range(2, 2 + rank))
    output_mask = None
    if mask is not None:
        m = taps(mask.to(input.dtype))
        kernel = kernel * m
        if normalize_kernel:
            divisor = kernel.sum(dim=tap_dims, keepdim=True)
        else:
            n_valid = m.sum(dim=tap_dims, keepdim=True)
            n_in = taps(torch.ones((1, 1) + tuple(in_sizes), dtype=input.dtype,
                                   device=input.device)).sum(dim=tap_dims, keepdim=True)
            divisor = n_valid / torch.where(n_in == 0, torch.ones_like(n_in), n_in)
        nonzero = divisor != 0
        kernel = kernel / torch.where(nonzero, divisor, torch.ones_like(divisor))
        output_mask = nonzero.any(dim=1, keepdim=True).to(input.dtype)
    elif normalize_kernel:
        ones = torch.ones((1, 1) + tuple(in_sizes), dtype=input.dtype, device=input.device)
        kernel = kernel * taps(ones)
        divisor = kernel.sum(dim=tap_dims, keepdim=True)
        kernel = kernel / torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    return kernel, output_mask


# ----------------------------------------------------------------------------- functional ops

def _check_kernel_arg(kernel: Any, b: int, k: Ints, out: Sequence[int],
                      channels: Sequence[int] = (1,)) -> None:
    rank = len(k)
    _check_tensor(kernel, "kernel", 2 + 2 * rank)
    ok_c = kernel.shape[1] in channels
    if not ok_c or tuple(kernel.shape[:1]) + tuple(kernel.shape[2:]) != (b, *k, *out):
        c = "1" if tuple(channels) == (1,) else "|".join(str(c) for c in channels)
        axes = ("d", "h", "w")[3 - rank:]
        raise PacnetValueError(
            f"kernel must be [{b}, {c}, {', '.join(map(str, k))}, {', '.join(map(str, out))}] "
            f"(batch, channels, {', '.join('k' + a for a in axes)}, "
            f"{', '.join('out ' + a for a in axes)}), got {list(kernel.shape)}",
            hint=f"compute it with packernel{rank}d (or compute_kernel) using the same "
                 "arguments")


def _check_conv_args(input, kernel, weight, bias, shared_filters, transposed, rank):
    _check_tensor(input, "input", rank + 2)
    _check_tensor(weight, "weight", rank + 2)
    if bias is not None:
        _check_tensor(bias, "bias", 1)
    if isinstance(kernel, torch.Tensor):
        _check_tensor(kernel, "kernel", 2 + 2 * rank)
    _check_same([("input", input), ("kernel", kernel), ("weight", weight), ("bias", bias)])
    c = input.shape[1]
    axes = ", ".join(("kd", "kh", "kw")[3 - rank:])
    if shared_filters:
        if tuple(weight.shape[:2]) != (1, 1):
            raise PacnetValueError(f"with shared_filters the weight must be [1, 1, {axes}], "
                                   f"got {list(weight.shape)}")
        out_c = c
    else:
        w_in = weight.shape[0] if transposed else weight.shape[1]
        out_c = weight.shape[1] if transposed else weight.shape[0]
        if w_in != c:
            layout = f"[in, out, {axes}]" if transposed else f"[out, in, {axes}]"
            raise PacnetValueError(f"weight {list(weight.shape)} (laid out {layout}) expects "
                                   f"{w_in} input channels, the input has {c}")
    if bias is not None and bias.shape[0] != out_c:
        raise PacnetValueError(f"bias must have {out_c} entries, got {bias.shape[0]}")
    return _odd_kernel(tuple(weight.shape[2:]), "weight's kernel size", rank)


def pacconv2d(input: torch.Tensor, kernel: torch.Tensor, weight: torch.Tensor,
              bias: Optional[torch.Tensor] = None, stride: IntOrPair = 1, padding: IntOrPair = 0,
              dilation: IntOrPair = 1, shared_filters: bool = False,
              native_impl: bool = False) -> torch.Tensor:
    """Pixel-adaptive cross-correlation: ``N x C x H x W -> N x O x oh x ow``.

    ``out[n,o,y] = bias[o] + sum_{c,t} weight[o,c,t] * kernel[n,0,t,y] * input[n,c,pos(y,t)]``
    with ``kernel`` ``N x 1 x kh x kw x oh x ow`` (from :func:`packernel2d`), ``weight``
    ``O x C x kh x kw`` (the kernel size comes from it), sizes as ``nn.Conv2d``.  With
    ``shared_filters`` the weight is ``1 x 1 x kh x kw`` applied depthwise (``O = C``).
    Any padding >= 0 is accepted here; the modules enforce ``p <= d(k-1)/2``.
    ``native_impl`` is ignored.
    """
    return _pacconv(2, input, kernel, weight, bias, stride, padding, dilation, shared_filters)


def pacconv3d(input: torch.Tensor, kernel: torch.Tensor, weight: torch.Tensor,
              bias: Optional[torch.Tensor] = None, stride: IntOrTriple = 1,
              padding: IntOrTriple = 0, dilation: IntOrTriple = 1, shared_filters: bool = False,
              native_impl: bool = False) -> torch.Tensor:
    """:func:`pacconv2d` for volumes: ``N x C x D x H x W -> N x O x od x oh x ow`` with
    ``kernel`` ``N x 1 x kd x kh x kw x od x oh x ow`` (:func:`packernel3d`), ``weight``
    ``O x C x kd x kh x kw`` (``1 x 1 x ...`` shared), sizes as ``nn.Conv3d``."""
    return _pacconv(3, input, kernel, weight, bias, stride, padding, dilation, shared_filters)


def _pacconv(rank, input, kernel, weight, bias, stride, padding, dilation, shared_filters):
    k = _check_conv_args(input, kernel, weight, bias, shared_filters, False, rank)
    s = _ntuple(stride, "stride", 1, rank)
    p = _ntuple(padding, "padding", 0, rank)
    d = _ntuple(dilation, "dilation", 1, rank)
    out = _conv_out_size(input.shape[2:], k, s, p, d)
    _positive_size(out, "the convolution output", input.shape[2:])
    _check_kernel_arg(kernel, input.shape[0], k, out)
    return _kernels.pac_conv(input, kernel, weight, bias, s, p, d,
                             shared_filters=bool(shared_filters))


def pacconv_transpose2d(input: torch.Tensor, kernel: torch.Tensor, weight: torch.Tensor,
                        bias: Optional[torch.Tensor] = None, stride: IntOrPair = 1,
                        padding: IntOrPair = 0, output_padding: IntOrPair = 0,
                        dilation: IntOrPair = 1, shared_filters: bool = False,
                        native_impl: bool = False) -> torch.Tensor:
    """Pixel-adaptive transposed convolution: ``N x C x H x W -> N x O x oh x ow``.

    ``oh = (H-1)s - 2p + d(k-1) + 1 + output_padding`` (the ``nn.ConvTranspose2d`` rule).
    The input is zero-inserted at stride ``s``, padded by ``q = (k-1)d - p`` top/left and
    ``q + output_padding`` bottom/right (a negative ``q`` crops), and cross-correlated at
    stride 1 with ``kernel`` (``N x 1 x kh x kw x oh x ow``, from
    ``packernel2d(..., transposed=True)``) and ``weight.transpose(0, 1)``; ``weight`` is
    ``C x O x kh x kw`` (``1 x 1 x kh x kw`` with ``shared_filters``, depthwise).

    As in the original the weight is **not** flipped: with ``kernel == 1`` this equals
    ``F.conv_transpose2d(input, weight.flip(2, 3), ...)``.  ``native_impl`` is ignored.
    """
    return _pacconv_transpose(2, input, kernel, weight, bias, stride, padding, output_padding,
                              dilation, shared_filters)


def pacconv_transpose3d(input: torch.Tensor, kernel: torch.Tensor, weight: torch.Tensor,
                        bias: Optional[torch.Tensor] = None, stride: IntOrTriple = 1,
                        padding: IntOrTriple = 0, output_padding: IntOrTriple = 0,
                        dilation: IntOrTriple = 1, shared_filters: bool = False,
                        native_impl: bool = False) -> torch.Tensor:
    """:func:`pacconv_transpose2d` for volumes: ``N x C x D x H x W -> N x O x od x oh x ow``
    (the ``nn.ConvTranspose3d`` sizes) with ``kernel`` ``N x 1 x kd x kh x kw x od x oh x ow``
    (``packernel3d(..., transposed=True)``) and ``weight`` ``C x O x kd x kh x kw``, not
    flipped: with ``kernel == 1`` this is ``F.conv_transpose3d(input, weight.flip(2, 3, 4),
    ...)``."""
    return _pacconv_transpose(3, input, kernel, weight, bias, stride, padding, output_padding,
                              dilation, shared_filters)


def _pacconv_transpose(rank, input, kernel, weight, bias, stride, padding, output_padding,
                       dilation, shared_filters):
    k = _check_conv_args(input, kernel, weight, bias, shared_filters, True, rank)
    s = _ntuple(stride, "stride", 1, rank)
    p = _ntuple(padding, "padding", 0, rank)
    op = _ntuple(output_padding, "output_padding", 0, rank)
    d = _ntuple(dilation, "dilation", 1, rank)
    _check_output_padding(op, s, d)
    out = _transposed_out_size(input.shape[2:], k, s, p, op, d)
    _positive_size(out, "the transposed convolution output", input.shape[2:])
    _check_kernel_arg(kernel, input.shape[0], k, out)
    lo, hi = _transposed_pads(k, p, op, d)
    z = _zero_insert_pad(input, s, lo, hi)
    return _kernels.pac_conv(z, kernel, weight.transpose(0, 1), bias, (1,) * rank,
                             (0,) * rank, d, shared_filters=bool(shared_filters))


def pacpool2d(input: torch.Tensor, kernel: torch.Tensor, kernel_size: IntOrPair,
              stride: IntOrPair = 1, padding: IntOrPair = 0, dilation: IntOrPair = 1,
              native_impl: bool = False) -> torch.Tensor:
    """Pixel-adaptive pooling: ``out[n,c,y] = sum_t kernel[n,0|c,t,y] * input[n,c,pos(y,t)]``.

    ``input`` ``N x C x H x W``; ``kernel`` ``N x 1 x kh x kw x oh x ow`` or channel-wise
    ``N x C x ...``.  A weighted **sum** unless the kernel is normalised; ``stride``
    defaults to 1.  ``native_impl`` is ignored.
    """
    return _pacpool(2, input, kernel, kernel_size, stride, padding, dilation)


def pacpool3d(input: torch.Tensor, kernel: torch.Tensor, kernel_size: IntOrTriple,
              stride: IntOrTriple = 1, padding: IntOrTriple = 0, dilation: IntOrTriple = 1,
              native_impl: bool = False) -> torch.Tensor:
    """:func:`pacpool2d` for volumes: ``input`` ``N x C x D x H x W``, ``kernel``
    ``N x 1|C x kd x kh x kw x od x oh x ow``; output ``N x C x od x oh x ow``."""
    return _pacpool(3, input, kernel, kernel_size, stride, padding, dilation)


def _pacpool(rank, input, kernel, kernel_size, stride, padding, dilation):
    _check_tensor(input, "input", rank + 2)
    _check_same([("input", input), ("kernel", kernel)])
    k = _odd_kernel(kernel_size, rank=rank)
    s = _ntuple(stride, "stride", 1, rank)
    p = _ntuple(padding, "padding", 0, rank)
    d = _ntuple(dilation, "dilation", 1, rank)
    out = _conv_out_size(input.shape[2:], k, s, p, d)
    _positive_size(out, "the pooling output", input.shape[2:])
    _check_kernel_arg(kernel, input.shape[0], k, out, channels=(1, input.shape[1]))
    return _kernels.pac_pool(input, kernel, k, s, p, d)


# ----------------------------------------------------------------------------- modules

def _gaussian(width: int, rank: int = 2, sigma: float = -1) -> torch.Tensor:
    """A truncated Gaussian on a ``width^rank`` grid, normalised to sum 1 (sigma <= 0:
    width/4)."""
    sigma = width / 4.0 if sigma <= 0 else sigma
    r = torch.arange(width, dtype=torch.float64) - (width - 1) / 2.0
    sq = sum(r.view(*(width if j == i else 1 for j in range(rank))) ** 2 for i in range(rank))
    g = torch.exp(-sq / (2.0 * sigma ** 2))
    return g / g.sum()


def _linear_profile(k: int, s: int, normalize: bool) -> torch.Tensor:
    q = (k - (2 * s - 1)) // 2
    prof = ([0.0] * q + [float(i) for i in range(1, s)] + [float(i) for i in range(s, 0, -1)]
            + [0.0] * q)
    prof = torch.tensor(prof, dtype=torch.float64) / s
    if normalize:
        prof = prof * torch.tensor([(k - j - 1) // s + j // s + 1 for j in range(k)],
                                   dtype=torch.float64)
    return prof


class _PacConvNd(nn.Module):
    """Shared constructor, validation, parameters and kernel computation of the PAC modules,
    for ``rank`` spatial axes (a class attribute: 2 for the ``...2d`` modules, 3 for
    ``...3d``)."""

    rank = 2

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntOrPair,
                 stride: IntOrPair, padding: IntOrPair, dilation: IntOrPair, transposed: bool,
                 output_padding: IntOrPair, bias: bool, pool_only: bool, kernel_type: str,
                 smooth_kernel_type: str, channel_wise: bool, normalize_kernel: bool,
                 shared_filters: bool, filler: str, native_impl: bool):
        super().__init__()
        r = self.rank
        self.kernel_size = _odd_kernel(kernel_size, rank=r)
        self.stride = _ntuple(stride, "stride", 1, r)
        self.padding = _ntuple(padding, "padding", 0, r)
        self.dilation = _ntuple(dilation, "dilation", 1, r)
        self.output_padding = _ntuple(output_padding, "output_padding", 0, r)
        self.transposed = bool(transposed)
        self.pool_only = bool(pool_only)
        self.kernel_type = kernel_type
        self.smooth_kernel_type = smooth_kernel_type
        self.channel_wise = bool(channel_wise)
        self.normalize_kernel = bool(normalize_kernel)
        self.shared_filters = bool(shared_filters)
        self.filler = filler
        self.native_impl = bool(native_impl)  # accepted for compatibility; one implementation
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise PacnetValueError(f"{name} must be an int, got {value!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels

        kind, alpha, lam, self._asym, fixed = _parse_kernel_type(kernel_type)
        self._kind = kind
        smooth_kind, smooth_width = _parse_smooth_kernel_type(smooth_kernel_type)
        if transposed:
            _check_output_padding(self.output_padding, self.stride, self.dilation)
        else:
            _check_padding_limit(self.padding, self.kernel_size, self.dilation)
        if not pool_only:
            if in_channels < 1 or out_channels < 1:
                raise PacnetValueError(f"in_channels and out_channels must be >= 1, got "
                                       f"{in_channels} and {out_channels}")
            if shared_filters and in_channels != out_channels:
                raise PacnetValueError(
                    f"shared_filters needs in_channels == out_channels, got {in_channels} and "
                    f"{out_channels}", hint="a shared filter is applied depthwise")
            if filler not in _FILLERS:
                raise PacnetValueError(f"unknown filler {filler!r}",
                                       hint="use one of " + ", ".join(_FILLERS))
            self._check_filler()
        per_channel = pool_only and self.channel_wise and kind == "inv" and not fixed
        if per_channel and out_channels <= 0:
            raise PacnetValueError(
                f"a channel-wise PacPool{r}d with a learnable inv kernel needs out_channels > 0",
                hint="pass out_channels = the number of input channels")

        # Registration order = the original's state_dict order.
        k = self.kernel_size
        if pool_only:
            self.register_parameter("weight", None)
        elif filler in ("pool", "crf_pool"):
            self.register_buffer("weight", torch.ones(1, 1, *k))
        elif shared_filters:
            self.weight = nn.Parameter(torch.empty(1, 1, *k))
        elif transposed:
            self.weight = nn.Parameter(torch.empty(in_channels, out_channels, *k))
        else:
            self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *k))
        if bias and not pool_only:
            self.bias = nn.Parameter(torch.empty(out_channels))
        else:
            self.register_parameter("bias", None)
        if kind == "inv":
            shape = (out_channels,) if per_channel else ()
            for name in ("inv_alpha", "inv_lambda"):
                if fixed:
                    self.register_buffer(name, torch.empty(shape))
                else:
                    setattr(self, name, nn.Parameter(torch.empty(shape)))
        else:
            self.inv_alpha = self.inv_lambda = None
        if smooth_kind == "full":
            self.smooth_kernel = nn.Parameter(torch.empty(1, 1, *(smooth_width,) * r))
        elif smooth_kind != "none":
            self.register_buffer("smooth_kernel",
                                 _default_smooth_kernel(smooth_kind, smooth_width, rank=r))
        else:
            self.smooth_kernel = None
        self._inv_init = (alpha, lam)
        self.reset_parameters()

    def _check_filler(self) -> None:
        f, k, s, r = self.filler, self.kernel_size, self.stride, self.rank
        same = self.in_channels == self.out_channels
        if f == "linear":
            if not self.transposed:
                raise PacnetValueError(f"filler 'linear' ({'bi' if r == 2 else 'tri'}linear "
                                       "upsampling) needs a transposed layer",
                                       hint=f"use PacConvTranspose{r}d")
            if not same:
                raise PacnetValueError("filler 'linear' needs in_channels == out_channels, got "
                                       f"{self.in_channels} and {self.out_channels}")
            if any(kk < 2 * ss - 1 for kk, ss in zip(k, s)):
                raise PacnetValueError(f"filler 'linear' needs kernel_size >= 2*stride-1, got "
                                       f"kernel_size {self.kernel_size}, stride {self.stride}")
        elif f in ("crf", "crf_perturbed"):
            if len(set(k)) != 1:
                shape = "square" if r == 2 else "cubic"
                raise PacnetValueError(f"filler {f!r} needs a {shape} kernel, got "
                                       f"{self.kernel_size}")
            if not same:
                raise PacnetValueError(f"filler {f!r} needs in_channels == out_channels, got "
                                       f"{self.in_channels} and {self.out_channels}")
        elif f in ("pool", "crf_pool") and not self.shared_filters:
            raise PacnetValueError(f"filler {f!r} needs shared_filters=True")

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise as the original: ``filler`` for weight/bias, parsed inv values, 1/w^r
        smoothing."""
        if not self.pool_only:
            f, k, r = self.filler, self.kernel_size, self.rank
            if f == "uniform":
                sigma = 1.0 / math.sqrt(self.in_channels * math.prod(k))
                if self.shared_filters:
                    sigma *= self.in_channels
                self.weight.uniform_(-sigma, sigma)
                if self.bias is not None:
                    self.bias.uniform_(-sigma, sigma)
            else:
                centre = tuple(kk // 2 for kk in k)
                if f == "linear":
                    wk = _outer([_linear_profile(kk, ss, self.normalize_kernel)
                                 for kk, ss in zip(k, self.stride)])
                elif f in ("crf", "crf_perturbed"):
                    wk = _gaussian(k[0], r) * math.prod(k)
                    wk[centre] = 0
                else:  # pool, crf_pool
                    wk = torch.ones(k, dtype=torch.float64)
                    if f == "crf_pool":
                        wk[centre] = 0
                wk = wk.to(self.weight)
                if self.shared_filters:
                    self.weight.copy_(wk.expand_as(self.weight))
                elif f == "linear":
                    self.weight.zero_()
                    for c in range(self.in_channels):
                        self.weight[c, c] = wk
                else:  # crf: every channel pair except the diagonal
                    eye = torch.eye(self.in_channels, dtype=wk.dtype, device=wk.device)
                    self.weight.copy_((1 - eye).view(*eye.shape, *(1,) * r) * wk)
                if f == "crf_perturbed":
                    self.weight.add_(torch.empty_like(self.weight).uniform_(-5e-4, 5e-4))
                if self.bias is not None:
                    self.bias.zero_()
        if self.inv_alpha is not None:
            self.inv_alpha.fill_(self._inv_init[0])
            self.inv_lambda.fill_(self._inv_init[1])
        if isinstance(self.smooth_kernel, nn.Parameter):
            self.smooth_kernel.fill_(1.0 / self.smooth_kernel[0, 0].numel())

    # -- forward helpers

    @property
    def _input_name(self) -> str:
        return f"input_{self.rank}d"

    def _check_guide(self, guide: Any, sizes: Sequence[int], batch: int, like: torch.Tensor,
                     what: str) -> None:
        _check_tensor(guide, "input_for_kernel", self.rank + 2)
        _check_same([(self._input_name, like), ("input_for_kernel", guide)])
        if guide.shape[0] != batch or tuple(guide.shape[2:]) != tuple(sizes):
            raise PacnetValueError(
                f"input_for_kernel must be [{batch}, Cg, {', '.join(map(str, sizes))}] "
                f"({what}), got {list(guide.shape)}")

    def compute_kernel(self, input_for_kernel: torch.Tensor,
                       input_mask: Optional[torch.Tensor] = None
                       ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(K, output_mask | None)`` of a guide, with this module's kernel settings.

        For the transposed module the guide is at the output resolution and the mask at
        the input resolution.  See :func:`packernel2d` / :func:`packernel3d`.
        """
        return _packernel(self.rank, input_for_kernel, input_mask, self.kernel_size,
                          self.stride, self.padding, self.output_padding, self.dilation,
                          self.kernel_type, self.smooth_kernel_type, self.smooth_kernel,
                          self.inv_alpha, self.inv_lambda, self.channel_wise,
                          self.normalize_kernel, self.transposed)

    def _kernel_for(self, x: torch.Tensor, input_for_kernel, kernel, mask,
                    out: Sequence[int], guide_sizes: Sequence[int], what: str):
        b = x.shape[0]
        if kernel is not None:
            if mask is not None:
                raise PacnetValueError("mask cannot be used with a precomputed kernel",
                                       hint=f"pass the mask to compute_kernel/"
                                            f"packernel{self.rank}d instead")
            channels = (1, x.shape[1]) if self.channel_wise else (1,)
            _check_kernel_arg(kernel, b, self.kernel_size, out, channels)
            _check_same([(self._input_name, x), ("kernel", kernel)])
            return kernel, None
        if input_for_kernel is None:
            raise PacnetValueError("give input_for_kernel (the guide) or a precomputed kernel")
        self._check_guide(input_for_kernel, guide_sizes, b, x, what)
        if self.channel_wise and input_for_kernel.shape[1] != x.shape[1]:
            raise PacnetValueError(
                f"a channel-wise kernel needs a guide with as many channels as the input "
                f"({x.shape[1]}), got {input_for_kernel.shape[1]}")
        return self.compute_kernel(input_for_kernel, mask)

    def _check_input(self, x: Any) -> None:
        _check_tensor(x, self._input_name, self.rank + 2)
        if not self.pool_only and x.shape[1] != self.in_channels:
            raise PacnetValueError(f"{self._input_name} has {x.shape[1]} channels, the layer "
                                   f"expects in_channels={self.in_channels}")
        params = [(n, getattr(self, n)) for n in ("weight", "bias", "inv_alpha", "inv_lambda",
                                                  "smooth_kernel")]
        _check_same([(self._input_name, x)] + params)

    def extra_repr(self) -> str:
        s = ("{in_channels}, {out_channels}, kernel_size={kernel_size}, stride={stride}"
             if not self.pool_only else "kernel_size={kernel_size}, stride={stride}")
        zeros, ones = (0,) * self.rank, (1,) * self.rank
        if self.padding != zeros:
            s += ", padding={padding}"
        if self.dilation != ones:
            s += ", dilation={dilation}"
        if self.transposed and self.output_padding != zeros:
            s += ", output_padding={output_padding}"
        if not self.pool_only and self.bias is None:
            s += ", bias=False"
        if self.kernel_type != "gaussian":
            s += ", kernel_type={kernel_type}"
        if self.smooth_kernel_type != "none":
            s += ", smooth_kernel_type={smooth_kernel_type}"
        if self.channel_wise:
            s += ", channel_wise=True"
        if self.normalize_kernel:
            s += ", normalize_kernel=True"
        if self.shared_filters:
            s += ", shared_filters=True"
        if not self.pool_only and self.filler != "uniform":
            s += ", filler={filler}"
        return s.format(**self.__dict__)


class _PacConv(_PacConvNd):
    """:class:`PacConv2d` and :class:`PacConv3d`: the constructor and the forward pass."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntOrPair,
                 stride: IntOrPair = 1, padding: IntOrPair = 0, dilation: IntOrPair = 1,
                 bias: bool = True, kernel_type: str = "gaussian",
                 smooth_kernel_type: str = "none", normalize_kernel: bool = False,
                 shared_filters: bool = False, filler: str = "uniform", native_impl: bool = False):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, False,
                         0, bias, False, kernel_type, smooth_kernel_type, False, normalize_kernel,
                         shared_filters, filler, native_impl)

    def _forward(self, x, input_for_kernel, kernel, mask):
        self._check_input(x)
        sizes = tuple(x.shape[2:])
        out = _conv_out_size(sizes, self.kernel_size, self.stride, self.padding, self.dilation)
        _positive_size(out, "the convolution output", sizes)
        kernel, output_mask = self._kernel_for(x, input_for_kernel, kernel, mask, out, sizes,
                                               "the input's batch and size")
        y = _pacconv(self.rank, x, kernel, self.weight, self.bias, self.stride, self.padding,
                     self.dilation, self.shared_filters)
        return y if output_mask is None else (y, output_mask)


class PacConv2d(_PacConv):
    """Pixel-adaptive convolution: ``N x in x H x W`` (+ guide ``N x Cg x H x W``) ->
    ``N x out x oh x ow``.

    ``out = bias + sum_{c,t} weight[o,c,t] * K[t] * x[c, pos(t)]`` with ``K`` from the guide
    (:func:`packernel2d`); sizes as ``nn.Conv2d``.  ``padding`` must be at most
    ``dilation*(kernel_size-1)/2`` (the original's documented, unenforced limit).

    Parameters (state_dict keys, as the original): ``weight`` ``[out, in, kh, kw]`` (or
    ``[1, 1, kh, kw]`` with ``shared_filters``; a ones *buffer* with filler ``pool``/
    ``crf_pool``), ``bias`` ``[out]``, and for ``inv_*`` kernels ``inv_alpha``,
    ``inv_lambda`` (0-dim; buffers with ``_fixed``), for ``full_{w}`` smoothing a
    ``smooth_kernel`` ``[1, 1, w, w]`` Parameter (a buffer for ``gaussian``/``average_{w}``).

    ``filler``: ``'uniform'`` (U(+-1/sqrt(in*kh*kw)), times ``in`` when shared), ``'crf'``,
    ``'crf_perturbed'``, ``'pool'``, ``'crf_pool'`` (``'linear'`` is for the transposed
    layer).  ``native_impl`` is accepted and ignored.

    ``forward(input_2d, input_for_kernel, kernel=None, mask=None)`` returns ``out``, or
    ``(out, output_mask)`` when ``mask`` (``N x 1 x H x W``) is given.  A precomputed
    ``kernel`` (``N x 1 x kh x kw x oh x ow``) replaces the guide, which may then be None.
    """

    rank = 2

    def forward(self, input_2d: torch.Tensor, input_for_kernel: Optional[torch.Tensor],
                kernel: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None):
        return self._forward(input_2d, input_for_kernel, kernel, mask)


class PacConv3d(_PacConv):
    """Pixel-adaptive 3-D convolution: ``N x in x D x H x W`` (+ guide ``N x Cg x D x H x W``)
    -> ``N x out x od x oh x ow`` (a clip: ``T`` for ``D``).

    :class:`PacConv2d` over three spatial axes: the same arguments (ints or ``(d, h, w)``
    triples for kernel_size, stride, padding, dilation), fillers (``crf`` needs a cubic
    kernel), kernel types, smoothing (``smooth_kernel`` ``[1, 1, w, w, w]``) and limits;
    ``weight`` ``[out, in, kd, kh, kw]``; sizes as ``nn.Conv3d``.
    ``forward(input_3d, input_for_kernel, kernel=None, mask=None)``, a precomputed
    ``kernel`` ``N x 1 x kd x kh x kw x od x oh x ow``, a mask ``N x 1 x D x H x W``.
    """

    rank = 3

    def forward(self, input_3d: torch.Tensor, input_for_kernel: Optional[torch.Tensor],
                kernel: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None):
        return self._forward(input_3d, input_for_kernel, kernel, mask)


class _PacConvTranspose(_PacConvNd):
    """:class:`PacConvTranspose2d` and :class:`PacConvTranspose3d`."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntOrPair,
                 stride: IntOrPair = 1, padding: IntOrPair = 0, output_padding: IntOrPair = 0,
                 dilation: IntOrPair = 1, bias: bool = True, kernel_type: str = "gaussian",
                 smooth_kernel_type: str = "none", normalize_kernel: bool = False,
                 shared_filters: bool = False, filler: str = "uniform", native_impl: bool = False):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, True,
                         output_padding, bias, False, kernel_type, smooth_kernel_type, False,
                         normalize_kernel, shared_filters, filler, native_impl)

    def _forward(self, x, input_for_kernel, kernel, mask):
        self._check_input(x)
        sizes = tuple(x.shape[2:])
        out = _transposed_out_size(sizes, self.kernel_size, self.stride, self.padding,
                                   self.output_padding, self.dilation)
        _positive_size(out, "the transposed convolution output", sizes)
        kernel, output_mask = self._kernel_for(x, input_for_kernel, kernel, mask, out, out,
                                               "the input's batch, the output size")
        y = _pacconv_transpose(self.rank, x, kernel, self.weight, self.bias, self.stride,
                               self.padding, self.output_padding, self.dilation,
                               self.shared_filters)
        return y if output_mask is None else (y, output_mask)


class PacConvTranspose2d(_PacConvTranspose):
    """Pixel-adaptive transposed convolution: ``N x in x H x W`` -> ``N x out x oh x ow``.

    The guide is ``N x Cg x oh x ow`` (the output size).

    ``oh = (H-1)s - 2p + d(k-1) + 1 + output_padding`` as ``nn.ConvTranspose2d``.  ``K`` is
    computed from the guide at the **output** resolution (stride 1, "same" padding).
    ``weight`` is ``[in, out, kh, kw]`` and **not flipped** (as the original): with
    ``K == 1`` this equals ``nn.ConvTranspose2d`` with ``weight.flip(2, 3)``.

    Any padding >= 0 is accepted (as ``nn.ConvTranspose2d``), not only ``p <= d(k-1)/2``:
    the padding of a transposed convolution only crops its output (``p > (k-1)d`` crops
    the zero-inserted input), and ``K`` is computed at the output resolution with its own
    "same" padding, so no window is ever centred off the guide.  ``output_padding`` must
    be smaller than stride or dilation, and the output must be non-empty.

    ``filler='linear'`` (needs ``in == out`` and ``k >= 2s-1``) initialises bilinear
    upsampling on the channel diagonal; with ``normalize_kernel`` and a constant guide
    the layer is then exactly bilinear away from the border (where fewer samples enter
    the normalisation).  Other fillers, parameters and
    ``forward(input_2d, input_for_kernel, kernel=None, mask=None)`` as :class:`PacConv2d`;
    the mask is at the input (low) resolution.  ``shared_filters`` is depthwise.
    """

    rank = 2

    def forward(self, input_2d: torch.Tensor, input_for_kernel: Optional[torch.Tensor],
                kernel: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None):
        return self._forward(input_2d, input_for_kernel, kernel, mask)


class PacConvTranspose3d(_PacConvTranspose):
    """Pixel-adaptive 3-D transposed convolution: ``N x in x D x H x W`` ->
    ``N x out x od x oh x ow`` with the guide ``N x Cg x od x oh x ow`` (the output size),
    e.g. a clip upsampled in ``H x W`` with ``stride=(1, 2, 2)``.

    :class:`PacConvTranspose2d` over three spatial axes: sizes as ``nn.ConvTranspose3d``,
    ``weight`` ``[in, out, kd, kh, kw]`` not flipped (with ``K == 1`` it equals
    ``nn.ConvTranspose3d`` with ``weight.flip(2, 3, 4)``), ``filler='linear'`` is trilinear
    upsampling (the product of the per-axis linear profiles; ``k >= 2s-1`` on every axis).
    ``forward(input_3d, input_for_kernel, kernel=None, mask=None)``.
    """

    rank = 3

    def forward(self, input_3d: torch.Tensor, input_for_kernel: Optional[torch.Tensor],
                kernel: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None):
        return self._forward(input_3d, input_for_kernel, kernel, mask)


class _PacPool(_PacConvNd):
    """:class:`PacPool2d` and :class:`PacPool3d`."""

    def __init__(self, kernel_size: IntOrPair, stride: IntOrPair = 1, padding: IntOrPair = 0,
                 dilation: IntOrPair = 1, kernel_type: str = "gaussian",
                 smooth_kernel_type: str = "none", channel_wise: bool = False,
                 normalize_kernel: bool = False, out_channels: int = -1,
                 native_impl: bool = False):
        super().__init__(-1, out_channels, kernel_size, stride, padding, dilation, False, 0, False,
                         True, kernel_type, smooth_kernel_type, channel_wise, normalize_kernel,
                         False, "uniform", native_impl)

    def _forward(self, x, input_for_kernel, kernel, mask):
        self._check_input(x)
        c = x.shape[1]
        if self.out_channels > 0 and c != self.out_channels:
            raise PacnetValueError(f"{self._input_name} has {c} channels, the layer was built "
                                   f"with out_channels={self.out_channels}")
        sizes = tuple(x.shape[2:])
        out = _conv_out_size(sizes, self.kernel_size, self.stride, self.padding, self.dilation)
        _positive_size(out, "the pooling output", sizes)
        kernel, output_mask = self._kernel_for(x, input_for_kernel, kernel, mask, out, sizes,
                                               "the input's batch and size")
        y = _pacpool(self.rank, x, kernel, self.kernel_size, self.stride, self.padding,
                     self.dilation)
        return y if output_mask is None else (y, output_mask)


class PacPool2d(_PacPool):
    """Pixel-adaptive pooling: ``N x C x H x W`` (+ guide) -> ``N x C x oh x ow``, no weights.

    ``out[c] = sum_t K[0|c, t] * x[c, pos(t)]``: a weighted **sum** (``K == 1`` gives
    ``AvgPool2d * kh*kw``) unless ``normalize_kernel``, which makes it a weighted average
    over in-image taps.  ``stride`` defaults to **1** (not ``kernel_size``); padding must
    be at most ``dilation*(kernel_size-1)/2``.

    ``channel_wise`` gives one kernel per channel (the guide must have ``C`` channels);
    with a learnable ``inv_*`` kernel ``inv_alpha``/``inv_lambda`` are then vectors of
    length ``out_channels`` (which must be > 0 and equal ``C``); ``out_channels <= 0``
    means "any".  ``forward(input_2d, input_for_kernel, kernel=None, mask=None)`` as
    :class:`PacConv2d`; a precomputed kernel may be ``N x 1|C x kh x kw x oh x ow``
    (``N x C x ...`` only when ``channel_wise``).
    """

    rank = 2

    def forward(self, input_2d: torch.Tensor, input_for_kernel: Optional[torch.Tensor],
                kernel: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None):
        return self._forward(input_2d, input_for_kernel, kernel, mask)


class PacPool3d(_PacPool):
    """Pixel-adaptive 3-D pooling: ``N x C x D x H x W`` (+ guide) -> ``N x C x od x oh x ow``.

    :class:`PacPool2d` over three spatial axes: a weighted **sum** (``K == 1`` gives
    ``AvgPool3d * kd*kh*kw``) unless ``normalize_kernel``, stride 1 by default, sizes as
    ``nn.AvgPool3d``, a precomputed kernel ``N x 1|C x kd x kh x kw x od x oh x ow``.
    ``forward(input_3d, input_for_kernel, kernel=None, mask=None)``.
    """

    rank = 3

    def forward(self, input_3d: torch.Tensor, input_for_kernel: Optional[torch.Tensor],
                kernel: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None):
        return self._forward(input_3d, input_for_kernel, kernel, mask)
