"""Dense CRFs as layers: :class:`PacCRF` and :class:`PacCRFLoose`, a drop-in for NVlabs/pacnet's ``paccrf.py``.

Mean-field inference of a fully-connected-in-a-window CRF whose pairwise potentials are
pixel-adaptive (Su et al., CVPR 2019, section 4), reimplemented from a behavioural spec
(``shared/specs/pac.md`` section 2).  Same constructor arguments, same module,
parameter and buffer names, so the original's ``state_dict`` loads with ``strict=True``:

* ``unary_weight`` (0-dim Parameter; a plain float with ``fixed_weighting``),
* ``messengers.<i>.weight`` (the PAC filter of pairwise kernel *i*: a Parameter
  ``C x C x k x k`` for ``'4d'`` and ``'na'``, ``1 x 1 x k x k`` for shared spatial filters,
  or a fixed ones-with-zero-centre *buffer* ``1 x 1 x k x k`` when ``spatial_filter=False``),
* ``compat.<i>.weight`` (``C x C x 1 x 1``, only for ``compat_type='2d'``),
* ``pairwise_weights.<i>`` (0-dim Parameter, one per kernel),
* and for :class:`PacCRFLoose` the same under ``steps.<j>.``.

Inference (``N x C x H x W`` unary, ``N x F x H x W`` edge features)::

    K_i   = exp(-0.5 |f_i(pos) - f_i(centre)|^2)      per kernel, from the (blurred) features
    logQ  = unary                                      (or the given logQ)
    repeat num_steps:
        Q    = softmax(logQ over C)
        logQ = unary_weight * unary
        for each kernel i:
            m_i  = messenger_i(blur_i(Q), K_i)         PAC filtering, k x k window, dilation d
            m_i  = compat_i(m_i)                       only '2d'
            logQ = logQ - w_i * unblur_i(m_i)
    output = logQ | softmax(logQ) | log_softmax(logQ)

The message passing runs on the fused PAC kernels of :mod:`pacnet.kernels.pac`
(through :class:`~pacnet.pac.PacConv2d`): a ``'4d'`` messenger is a full-filter
``pac_conv2d``, the shared-filter messengers (``'2d'``, ``'potts'``, the fall-through)
a depthwise ``pac_conv2d(shared_filters=True)``.  No ``N x C x k*k x H x W`` tensor is
built; what autograd keeps per step and kernel is the (blurred) ``Q`` and ``K``.  Without
autograd (``torch.no_grad()``), a step refills the previous step's logQ buffer and the
messages of kernels without compat conv or blur are added to it in place by
``pac_conv2d_add_`` (no message-sized temporary; the messenger module itself, and so any
hook on it, is bypassed there); under ``torch.compile``/``torch.export`` the out-of-place
steps are traced instead.

``forward(..., reference=True)`` runs the same mean-field loop with the plain-torch
oracles of :mod:`pacnet.kernels.pac.reference` instead (the unfolded ``Q`` times ``K``,
then a contraction with the filter: ConvCRF-style message passing, which builds
``N x C*k*k x H*W`` columns).  It exists to check the fused path and to benchmark against
(``benchmarks/crf.py``); do not train with it.

Compatibility types (``add_pairwise_kernel(compat_type=...)``):

* ``'4d'``: full ``C x C x k x k`` filter (compatibility and spatial filtering in one),
  initialised ``(1 - I) (x) g`` with ``g`` a centre-zeroed Gaussian; ``spatial_filter``
  is ignored.
* ``'2d'``: shared ``k x k`` filter, then a ``1 x 1`` convolution ``compat.<i>`` initialised
  to ``1 - I``.
* ``'potts'``: shared filter, and the pairwise weight is **negated** (a Potts message is a
  constant minus the filtered Q, so subtracting ``-w * filtered Q`` rewards agreement).
* ``'na'``: a plain ``nn.Conv2d`` messenger (torch's default init) that ignores the features.
* ``'none'``: the original's fall-through for any other string: a shared filter with no
  compatibility transform and no negation (so at initialisation it *penalises*
  neighbours that agree).  ``'diag'`` and ``'full'`` are accepted as the original's
  names for it, with a warning, since neither does what its name says.

Shared filters are learnable (filler ``crf_perturbed``/``crf``) with
``spatial_filter=True``, else the fixed box filter ``crf_pool``.

Quirks kept from the original (trained models depend on them):

* **The first step starts from the unweighted unary**: ``Q_1 = softmax(unary)``, not
  ``softmax(unary_weight * unary)``.
* **``pairwise_weights`` are mostly not learned.**  Kernel *i*'s weight is trainable only
  for ``'potts'`` with ``spatial_filter=False`` and without ``fixed_weighting`` (the only
  case where nothing else can learn the message's scale); everywhere else it is a
  constant that gets no gradient: the constructor's float, as in the original (exact in
  float64; the parameter stays in the ``state_dict`` for strict loading, unused).
* With ``blur > 1`` features and ``Q`` are average-pooled with ``kernel = stride = blur``,
  padding ``((blur - H % blur) % blur + 1) // 2`` per axis and ``count_include_pad=False``;
  messages are upsampled bilinearly (``align_corners=False``) by ``blur`` and cropped
  back to ``H x W`` starting at that padding.
* Adding a kernel re-initialises its messenger and compat after construction, so with
  ``perturbed_init`` two perturbations are drawn (the seed-to-values mapping follows
  the original's order: construct, then re-initialise).

Deliberate differences (the original's bugs or traps):

* Arguments are validated up front and raise :class:`~pacnet.errors.PacnetValueError`
  naming the offending value: even kernel sizes, unknown ``compat_type`` (the original
  silently treated typos as the fall-through), unknown ``final_output`` (the original
  noticed only at the end of a forward pass), unaries/features/kernels of the wrong size,
  dtype or device, ``num_steps < 1``.
* ``native_impl`` is accepted and ignored (one implementation: the fused kernels).
"""

from __future__ import annotations

import math
import numbers
import re
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

import pacnet.kernels.pac as _kernels
from pacnet.errors import PacnetValueError, did_you_mean
from pacnet.kernels.pac import reference as _ref
from pacnet.pac import PacConv2d, _check_same

__all__ = ["PacCRF", "PacCRFLoose", "create_YXRGB", "create_position_feats", "parse_crf_name",
           "COMPAT_TYPES", "FINAL_OUTPUTS"]

COMPAT_TYPES = ("4d", "2d", "potts", "na", "none")
_FALLTHROUGH_ALIASES = ("diag", "full")
FINAL_OUTPUTS = ("log_Q", "softmax", "log_softmax")
_PERTURB = 5e-4  # half-width of the uniform perturbation of the compat init

Tensors = Union[torch.Tensor, Sequence[Optional[torch.Tensor]]]


# ----------------------------------------------------------------------------- argument checks

def _int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, torch.SymInt):  # a size while torch.export/torch.compile traces
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise PacnetValueError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise PacnetValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(value)


def _number(value: Any, name: str) -> float:
    """A finite float from a Python number or a 0-dim tensor (as the original accepts)."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_complex() \
            and value.dtype != torch.bool:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise PacnetValueError(f"{name} must be a finite number or 0-dim tensor, got {value!r}")
    return float(value)


def _check_final_output(value: Any) -> str:
    if value not in FINAL_OUTPUTS:
        raise PacnetValueError(f"unknown final_output {value!r}",
                               hint=did_you_mean(str(value), FINAL_OUTPUTS)
                               or "use one of " + ", ".join(map(repr, FINAL_OUTPUTS)))
    return value


def _check_compat_type(value: Any) -> str:
    if value in _FALLTHROUGH_ALIASES:
        warnings.warn(f"compat_type {value!r} behaves as in the original: a shared spatial "
                      f"filter with no compatibility transform (the same as 'none'); use '2d' "
                      f"for a learned C x C compatibility", UserWarning, stacklevel=3)
        return value
    if value not in COMPAT_TYPES:
        raise PacnetValueError(
            f"unknown compat_type {value!r}",
            hint=(did_you_mean(str(value), COMPAT_TYPES) or "use one of "
                  + ", ".join(map(repr, COMPAT_TYPES))))
    return value


def _check_tensor(t: Any, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise PacnetValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise PacnetValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if t.dim() != 4:
        raise PacnetValueError(f"{name} must be 4-D (N x C x H x W), got shape {list(t.shape)}")
    return t


def _kernel_specs(pairwise_kernels: Any) -> List[Dict[str, Any]]:
    if pairwise_kernels is None:
        return []
    if isinstance(pairwise_kernels, dict):
        return [pairwise_kernels]
    if isinstance(pairwise_kernels, (list, tuple)) and all(isinstance(k, dict)
                                                           for k in pairwise_kernels):
        return list(pairwise_kernels)
    raise PacnetValueError("pairwise_kernels must be a dict or a list of dicts of "
                           f"add_pairwise_kernel arguments, got {pairwise_kernels!r}")


# ----------------------------------------------------------------------------- blur

def _ceil_pad(size: int, blur: int) -> int:
    """The original's pooling padding: centres the ``blur``-cells on an ``size``-long axis."""
    return ((blur - size % blur) % blur + 1) // 2


def _blur_pool(x: torch.Tensor, blur: int) -> torch.Tensor:
    """``N x C x H x W -> N x C x ceil(H/blur)' x ...``: average over ``blur x blur`` cells."""
    pad = (_ceil_pad(x.shape[-2], blur), _ceil_pad(x.shape[-1], blur))
    return F.avg_pool2d(x, blur, blur, padding=pad, count_include_pad=False)


def _blurred_size(hw: Sequence[int], blur: int) -> Tuple[int, int]:
    return tuple((n + 2 * _ceil_pad(n, blur) - blur) // blur + 1 for n in hw)


def _unblur(msg: torch.Tensor, blur: int, hw: Sequence[int]) -> torch.Tensor:
    """Bilinear ``x blur`` upsampling, cropped back to ``hw`` at the pooling padding."""
    up = F.interpolate(msg, scale_factor=float(blur), mode="bilinear", align_corners=False)
    ph, pw = _ceil_pad(hw[0], blur), _ceil_pad(hw[1], blur)
    return up[:, :, ph:ph + hw[0], pw:pw + hw[1]]


def _final(logQ: torch.Tensor, final_output: str) -> torch.Tensor:
    _check_final_output(final_output)
    if final_output == "softmax":
        return F.softmax(logQ, dim=1)
    if final_output == "log_softmax":
        return F.log_softmax(logQ, dim=1)
    return logQ


# ----------------------------------------------------------------------------- PacCRF

class PacCRF(nn.Module):
    """Mean-field PAC-CRF: unary ``N x C x H x W`` (+ edge features ``N x F x H x W``) -> ``N x C x H x W``.

    ``PacCRF(channels, num_steps, final_output='log_Q', perturbed_init=True,
    native_impl=False, fixed_weighting=False, unary_weight=1.0, pairwise_kernels=None)``

    * ``channels``: number of classes C; ``num_steps`` >= 1 mean-field iterations.
    * ``final_output``: ``'log_Q'`` (the last step's logits, default), ``'softmax'`` or
      ``'log_softmax'``.
    * ``perturbed_init``: add U(-5e-4, 5e-4) to the learnable filter and compat inits
      (breaks the symmetry between classes).
    * ``fixed_weighting``: ``unary_weight`` is a plain float and no pairwise weight is learned.
    * ``pairwise_kernels``: a dict or list of dicts of :meth:`add_pairwise_kernel` arguments.

    ``forward(unary, edge_feat, edge_kernel=None, logQ=None, *, reference=False)``:

    * ``edge_feat``: one tensor ``N x F x H x W`` shared by all kernels, or a list with
      one per kernel (``None`` allowed for ``'na'`` kernels); ignored when ``edge_kernel``
      is given.
    * ``edge_kernel``: precomputed kernels (:meth:`compute_edge_kernels`), one tensor
      reused by every kernel or a list; kernel *i* is ``N x 1 x k x k x H_i x W_i`` with
      ``H_i x W_i`` the blurred size.
    * ``logQ``: the logits the first step starts from (default: ``unary`` itself).
    * ``reference``: run the plain-torch unfold oracle instead of the fused kernels.

    See the module docstring for the iteration, the compat types and the quirks.
    """

    def __init__(self, channels: int, num_steps: int, final_output: str = "log_Q",
                 perturbed_init: bool = True, native_impl: bool = False,
                 fixed_weighting: bool = False, unary_weight: float = 1.0,
                 pairwise_kernels: Any = None):
        super().__init__()
        self.channels = _int(channels, "channels", 1)
        self.num_steps = _int(num_steps, "num_steps", 1)
        self.final_output = _check_final_output(final_output)
        self.perturbed_init = bool(perturbed_init)
        self.native_impl = bool(native_impl)  # accepted for compatibility; one implementation
        self.fixed_weighting = bool(fixed_weighting)
        self.init_unary_weight = _number(unary_weight, "unary_weight")
        specs = _kernel_specs(pairwise_kernels)
        self.messengers = nn.ModuleList()
        self.compat = nn.ModuleList()
        self.pairwise_weights = nn.ParameterList()
        if self.fixed_weighting:
            self.unary_weight = self.init_unary_weight
        else:
            self.unary_weight = nn.Parameter(torch.tensor(self.init_unary_weight))
        self.init_pairwise_weights: List[float] = []
        self.kernel_args: List[Dict[str, Any]] = []  # add_pairwise_kernel's arguments, per kernel
        self.blur: List[int] = []
        self.pairwise_repr: List[str] = []
        self._learn_pairwise_weight: List[bool] = []
        for kw in specs:
            self.add_pairwise_kernel(**kw)

    # -- construction

    def add_pairwise_kernel(self, kernel_size: int = 3, dilation: int = 1, blur: int = 1,
                            compat_type: str = "4d", spatial_filter: bool = True,
                            pairwise_weight: float = 1.0) -> None:
        """Append a pairwise kernel: a ``kernel_size`` window (odd) with ``dilation``,
        computed on features and ``Q`` average-pooled by ``blur``, with ``compat_type``
        (``'4d'``, ``'2d'``, ``'potts'``, ``'na'``, ``'none'``; see the module docstring),
        a learnable (``spatial_filter``) or fixed box shared filter, and ``pairwise_weight``."""
        k = _int(kernel_size, "kernel_size", 1)
        if k % 2 == 0:
            raise PacnetValueError(f"kernel_size must be odd, got {kernel_size!r}",
                                   hint="a pairwise window has a centre pixel; use 3, 5, 7, ...")
        d = _int(dilation, "dilation", 1)
        b = _int(blur, "blur", 1)
        ct = _check_compat_type(compat_type)
        if not isinstance(spatial_filter, bool):
            raise PacnetValueError(f"spatial_filter must be a bool, got {spatial_filter!r}")
        pw = _number(pairwise_weight, "pairwise_weight")
        if ct == "potts":
            pw = -pw
        c = self.channels
        padding = (k // 2) * d
        compat = None
        if ct == "na":
            messenger = nn.Conv2d(c, c, k, padding=padding, dilation=d, bias=False)
        else:
            shared = ct != "4d"
            if shared and not spatial_filter:
                filler = "crf_pool"
            else:
                filler = "crf_perturbed" if self.perturbed_init else "crf"
            messenger = PacConv2d(c, c, k, padding=padding, dilation=d, bias=False,
                                  shared_filters=shared, filler=filler,
                                  native_impl=self.native_impl)
            if ct == "2d":
                compat = nn.Conv2d(c, c, 1, bias=False)
        self.messengers.append(messenger)
        self.compat.append(compat)  # None entries keep the indices aligned (no state)
        self.pairwise_weights.append(nn.Parameter(torch.tensor(pw)))
        self.init_pairwise_weights.append(pw)
        self._learn_pairwise_weight.append(ct == "potts" and not spatial_filter
                                           and not self.fixed_weighting)
        self.kernel_args.append(dict(kernel_size=k, dilation=d, blur=b, compat_type=ct,
                                     spatial_filter=spatial_filter,
                                     pairwise_weight=float(pairwise_weight)))
        self.blur.append(b)
        code = "0d" if ct == "potts" else ct
        self.pairwise_repr.append(f"{code}{'s' if spatial_filter else ''}_{k}_{d}_{b}")
        self.reset_parameters(len(self.messengers) - 1)

    @torch.no_grad()
    def reset_parameters(self, pairwise_idx: Optional[int] = None) -> None:
        """Re-initialise kernel ``pairwise_idx`` (or everything, including ``unary_weight``)."""
        if pairwise_idx is None:
            idxs = range(len(self.messengers))
            if isinstance(self.unary_weight, nn.Parameter):
                self.unary_weight.fill_(self.init_unary_weight)
        else:
            idxs = [range(len(self.messengers))[pairwise_idx]]
        for i in idxs:
            self.messengers[i].reset_parameters()
            compat = self.compat[i]
            if compat is not None:
                w = compat.weight
                eye = torch.eye(self.channels, dtype=w.dtype, device=w.device)
                w.copy_((1 - eye)[:, :, None, None])
                if self.perturbed_init:
                    w.add_(torch.empty_like(w).uniform_(-_PERTURB, _PERTURB))
            self.pairwise_weights[i].fill_(self.init_pairwise_weights[i])

    @property
    def num_kernels(self) -> int:
        return len(self.messengers)

    def pairwise_weight(self, i: int) -> Union[torch.Tensor, float]:
        """The weight kernel ``i``'s message is multiplied by (negated for potts): the
        parameter when it is the learnable kind, else the constructor's float, exact in
        the computation's dtype (see the module docstring)."""
        if self._learn_pairwise_weight[i]:
            return self.pairwise_weights[i]
        return self.init_pairwise_weights[i]

    def extra_repr(self) -> str:
        s = (f"channels={self.channels}, num_steps={self.num_steps}, "
             f"final_output={self.final_output!r}")
        if self.fixed_weighting:
            s += f", fixed_weighting=True, unary_weight={self.unary_weight}"
        return s + f", pairwise=[{', '.join(self.pairwise_repr)}]"

    # -- edge kernels

    def _needs_features(self, i: int) -> bool:
        return not isinstance(self.messengers[i], nn.Conv2d)

    def _feature_list(self, edge_feat: Tensors, like: Optional[torch.Tensor]
                      ) -> List[Optional[torch.Tensor]]:
        n = self.num_kernels
        if isinstance(edge_feat, (list, tuple)):
            if len(edge_feat) != n:
                raise PacnetValueError(f"edge_feat is a list of {len(edge_feat)} tensors but the "
                                       f"CRF has {n} pairwise kernels",
                                       hint="give one feature tensor per kernel, or one shared")
            feats = list(edge_feat)
        else:
            feats = [edge_feat] * n
        for i, f in enumerate(feats):
            name = f"edge_feat[{i}]" if isinstance(edge_feat, (list, tuple)) else "edge_feat"
            if f is None:
                if self._needs_features(i):
                    raise PacnetValueError(f"{name} is None but pairwise kernel {i} "
                                           f"({self.pairwise_repr[i]}) needs edge features")
                continue
            _check_tensor(f, name)
            if like is not None:
                _check_same([("unary", like), (name, f)])
                if f.shape[0] != like.shape[0] or tuple(f.shape[-2:]) != tuple(like.shape[-2:]):
                    raise PacnetValueError(
                        f"{name} must be [{like.shape[0]}, F, {like.shape[2]}, {like.shape[3]}] "
                        f"(the unary's batch and size), got {list(f.shape)}",
                        hint="resize the features to the unary (e.g. bilinear interpolation)")
        return feats

    def compute_edge_kernels(self, edge_feat: Tensors, *, reference: bool = False,
                             _like: Optional[torch.Tensor] = None) -> List[Optional[torch.Tensor]]:
        """The gaussian kernel of every pairwise kernel: a list with, for kernel ``i``,
        ``N x 1 x k x k x H_i x W_i`` (``H_i`` the size after blur) or None for ``'na'``.

        ``edge_feat`` as in :meth:`forward`.  With several kernels of the same blur on
        one shared feature tensor, the pooling is done once.
        """
        feats = self._feature_list(edge_feat, _like)
        pooled: Dict[Tuple[int, int], torch.Tensor] = {}
        kernels: List[Optional[torch.Tensor]] = []
        for i, m in enumerate(self.messengers):
            f, b = feats[i], self.blur[i]
            if not self._needs_features(i):
                kernels.append(None)
                continue
            if b > 1:
                key = (id(f), b)
                if key not in pooled:
                    pooled[key] = _blur_pool(f, b)
                f = pooled[key]
            # K = exp(-D/2) as PacConv2d.compute_kernel for this (gaussian, unsmoothed,
            # unnormalised) messenger, computed in place on D: neither op keeps its output
            # for backward, so this saves two K-sized temporaries per kernel.
            dist_op = _ref.pac_dist if reference else _kernels.pac_dist
            dist = dist_op(f, None, m.kernel_size, m.stride, m.padding, m.dilation)
            kernels.append(dist.mul_(-0.5).exp_())
        return kernels

    def _kernel_list(self, edge_kernel: Tensors, unary: torch.Tensor
                     ) -> List[Optional[torch.Tensor]]:
        n = self.num_kernels
        listed = isinstance(edge_kernel, (list, tuple))
        if listed and len(edge_kernel) != n:
            raise PacnetValueError(f"edge_kernel is a list of {len(edge_kernel)} tensors but the "
                                   f"CRF has {n} pairwise kernels")
        kernels = list(edge_kernel) if listed else [edge_kernel] * n
        b = unary.shape[0]
        for i, K in enumerate(kernels):
            if not self._needs_features(i):
                kernels[i] = None  # 'na' ignores its kernel
                continue
            name = f"edge_kernel[{i}]" if listed else "edge_kernel"
            if not isinstance(K, torch.Tensor):
                raise PacnetValueError(f"{name} must be a torch.Tensor, got {type(K).__name__}")
            k = self.messengers[i].kernel_size
            hw = _blurred_size(unary.shape[-2:], self.blur[i])
            want = (b, 1, k[0], k[1], hw[0], hw[1])
            if tuple(K.shape) != want:
                raise PacnetValueError(
                    f"{name} must be {list(want)} for pairwise kernel {i} "
                    f"({self.pairwise_repr[i]}), got {list(K.shape)}",
                    hint="compute it with compute_edge_kernels from features of the unary's size")
            _check_same([("unary", unary), (name, K)])
        return kernels

    # -- inference

    def _check_inputs(self, unary: Any, logQ: Any) -> torch.Tensor:
        _check_tensor(unary, "unary")
        if unary.shape[1] != self.channels:
            raise PacnetValueError(f"unary has {unary.shape[1]} channels, the CRF was built "
                                   f"with channels={self.channels}")
        for name, t in list(self.named_parameters()) + list(self.named_buffers()):
            if t.dtype != unary.dtype or t.device != unary.device:
                raise PacnetValueError(
                    f"the CRF's {name} is {t.dtype} on {t.device} but unary is {unary.dtype} "
                    f"on {unary.device}", hint="convert the module with .to(unary)")
        if logQ is not None:
            _check_tensor(logQ, "logQ")
            if logQ.shape != unary.shape:
                raise PacnetValueError(f"logQ must have the unary's shape {list(unary.shape)}, "
                                       f"got {list(logQ.shape)}")
            _check_same([("unary", unary), ("logQ", logQ)])
        return unary

    def _message(self, i: int, Qb: torch.Tensor, K: Optional[torch.Tensor],
                 reference: bool) -> torch.Tensor:
        m = self.messengers[i]
        if K is None:  # 'na': a plain convolution
            msg = m(Qb)
        elif reference:
            msg = _ref.pac_conv(Qb, K, m.weight, None, m.stride, m.padding, m.dilation,
                                shared_filters=m.shared_filters)
        else:
            msg = m(Qb, None, K)
        if self.compat[i] is not None:
            msg = self.compat[i](msg)
        return msg

    def _accumulates(self, i: int, K: Optional[torch.Tensor], reference: bool) -> bool:
        """Whether kernel ``i``'s message can be added to logQ in place by the fused kernel
        (inference: no compat conv and no blur after the PAC message)."""
        return (not reference and K is not None and self.compat[i] is None
                and self.blur[i] == 1)

    def _mean_field(self, unary: torch.Tensor, kernels: List[Optional[torch.Tensor]],
                    logQ: Optional[torch.Tensor], reference: bool) -> torch.Tensor:
        hw = tuple(unary.shape[-2:])
        if logQ is None:
            logQ = unary  # the original's unweighted start
        # Without autograd, the Q and logQ buffers of the first step are refilled by the next
        # steps (never the caller's unary or logQ), and plain PAC messages are accumulated
        # into logQ by pac_conv2d_add_ without a message-sized temporary: the loop then
        # allocates nothing large after its first step.  Not while torch.compile/torch.export
        # traces: the in-place path reads the pairwise weights as Python floats, which a
        # traced graph cannot do (the out-of-place path computes the same).
        inference = not torch.is_grad_enabled() and not torch.compiler.is_compiling()
        owned = False
        Q = None
        for _ in range(self.num_steps):
            if inference and Q is not None:
                Q = torch.softmax(logQ, 1, out=Q)
            else:
                Q = F.softmax(logQ, dim=1)
            if inference and owned:
                logQ = torch.mul(unary, self.unary_weight, out=logQ)
            else:
                logQ = unary * self.unary_weight
                owned = True
            pooled: Dict[int, torch.Tensor] = {1: Q}
            for i in range(self.num_kernels):
                b = self.blur[i]
                if b not in pooled:
                    pooled[b] = _blur_pool(Q, b)
                if inference and self._accumulates(i, kernels[i], reference):
                    m = self.messengers[i]
                    _kernels.pac_conv2d_add_(logQ, pooled[b], kernels[i], m.weight, m.stride,
                                             m.padding, m.dilation, m.shared_filters,
                                             alpha=-float(self.pairwise_weight(i)))
                    continue
                msg = self._message(i, pooled[b], kernels[i], reference)
                if b > 1:
                    msg = _unblur(msg, b, hw)
                # logQ -= w_i * msg, in place: logQ is this step's own tensor and no op
                # keeps it for backward
                w = self.pairwise_weight(i)
                if isinstance(w, torch.Tensor):
                    logQ = logQ.addcmul_(msg, w, value=-1)
                else:
                    logQ = logQ.sub_(msg, alpha=w)
                del msg  # before the next kernel's message is allocated
            del pooled  # the blurred Q's, before the next step makes its own
        return logQ

    def forward(self, unary: torch.Tensor, edge_feat: Tensors = None,
                edge_kernel: Tensors = None, logQ: Optional[torch.Tensor] = None, *,
                reference: bool = False) -> torch.Tensor:
        _check_final_output(self.final_output)
        self._check_inputs(unary, logQ)
        if edge_kernel is None:
            kernels = self.compute_edge_kernels(edge_feat, reference=reference, _like=unary)
        else:
            kernels = self._kernel_list(edge_kernel, unary)
        return _final(self._mean_field(unary, kernels, logQ, reference), self.final_output)


# ----------------------------------------------------------------------------- PacCRFLoose

class PacCRFLoose(nn.Module):
    """A PAC-CRF whose mean-field steps have their own parameters ("loose" weights).

    Same arguments as :class:`PacCRF`.  ``steps`` holds ``num_steps`` one-step
    ``PacCRF(channels, 1, 'log_Q', ...)`` modules with the same pairwise kernels
    (``add_pairwise_kernel`` adds to every step; each step draws its own init).  The edge
    kernels are computed once with ``steps[0]``; ``logQ`` is chained through the steps
    (the first starts from ``logQ`` or the unary) and ``final_output`` applied at the end.
    With equal parameters in every step it computes exactly what :class:`PacCRF` does.
    State keys: ``steps.<j>.`` + PacCRF's.
    """

    def __init__(self, channels: int, num_steps: int, final_output: str = "log_Q",
                 perturbed_init: bool = True, native_impl: bool = False,
                 fixed_weighting: bool = False, unary_weight: float = 1.0,
                 pairwise_kernels: Any = None):
        super().__init__()
        self.channels = _int(channels, "channels", 1)
        self.num_steps = _int(num_steps, "num_steps", 1)
        self.final_output = _check_final_output(final_output)
        specs = _kernel_specs(pairwise_kernels)
        self.steps = nn.ModuleList(
            PacCRF(channels, 1, "log_Q", perturbed_init, native_impl, fixed_weighting,
                   unary_weight, specs) for _ in range(self.num_steps))

    def add_pairwise_kernel(self, **kwargs: Any) -> None:
        """:meth:`PacCRF.add_pairwise_kernel` on every step."""
        for step in self.steps:
            step.add_pairwise_kernel(**kwargs)

    def reset_parameters(self, pairwise_idx: Optional[int] = None) -> None:
        for step in self.steps:
            step.reset_parameters(pairwise_idx)

    @property
    def num_kernels(self) -> int:
        return self.steps[0].num_kernels

    @property
    def pairwise_repr(self) -> List[str]:
        return self.steps[0].pairwise_repr

    def compute_edge_kernels(self, edge_feat: Tensors, *, reference: bool = False,
                             _like: Optional[torch.Tensor] = None) -> List[Optional[torch.Tensor]]:
        """The edge kernels of ``steps[0]`` (:meth:`PacCRF.compute_edge_kernels`)."""
        return self.steps[0].compute_edge_kernels(edge_feat, reference=reference, _like=_like)

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, num_steps={self.num_steps}, "
                f"final_output={self.final_output!r}")

    def forward(self, unary: torch.Tensor, edge_feat: Tensors = None,
                edge_kernel: Tensors = None, logQ: Optional[torch.Tensor] = None, *,
                reference: bool = False) -> torch.Tensor:
        _check_final_output(self.final_output)
        first = self.steps[0]
        first._check_inputs(unary, logQ)
        if edge_kernel is None:
            edge_kernel = first.compute_edge_kernels(edge_feat, reference=reference, _like=unary)
        for step in self.steps:
            logQ = step(unary, None, edge_kernel, logQ, reference=reference)
        return _final(logQ, self.final_output)


# ----------------------------------------------------------------------------- features

def _scale_tensor(scale: Any, n: int, name: str, like: torch.Tensor) -> torch.Tensor:
    """``scale`` (a number, a sequence or a tensor of 1 or ``n`` values) as ``1 x n x 1 x 1``."""
    if isinstance(scale, torch.Tensor):
        t = scale.to(device=like.device)
        if not t.is_floating_point():
            t = t.to(like.dtype)
    else:
        values = [scale] if isinstance(scale, numbers.Real) else scale
        try:
            values = [_number(v, name) for v in values]
        except TypeError:
            raise PacnetValueError(f"{name} must be a number, a sequence or a tensor, "
                                   f"got {scale!r}") from None
        t = torch.tensor(values, dtype=like.dtype, device=like.device)
    if t.numel() not in (1, n):
        raise PacnetValueError(f"{name} must have 1 or {n} values, got {t.numel()}")
    return t.reshape(1, -1, 1, 1)


def create_position_feats(shape: Sequence[int], scales: Any = None, bs: int = 1,
                          device: Any = None, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Position features ``bs x 2 x H x W``: channel 0 the row ``y``, channel 1 the column
    ``x`` (0-based), divided by ``scales`` (a number, or ``(y_scale, x_scale)``, or a tensor
    of 1 or 2 values, through which gradients flow).  ``shape`` is ``(H, W)`` (longer
    shapes: the last two entries).  float32 unless ``dtype`` is given."""
    if len(shape) < 2:
        raise PacnetValueError(f"shape must end in (H, W), got {tuple(shape)!r}")
    h, w = _int(shape[-2], "H", 1), _int(shape[-1], "W", 1)
    dtype = dtype or torch.float32
    ys = torch.arange(h, dtype=dtype, device=device).view(h, 1).expand(h, w)
    xs = torch.arange(w, dtype=dtype, device=device).view(1, w).expand(h, w)
    pos = torch.stack([ys, xs])[None]
    if scales is not None:
        pos = pos / _scale_tensor(scales, 2, "scales", pos)
    return pos.expand(_int(bs, "bs", 1), -1, -1, -1).contiguous()


def create_YXRGB(img: torch.Tensor, yx_scale: Any = None, rgb_scale: Any = None,
                 scales: Any = None) -> torch.Tensor:
    """Bilateral features ``N x (2 + C) x H x W``: ``[y / yx_scale, x / yx_scale, img / rgb_scale]``.

    ``img`` is ``... x C x H x W`` (reshaped to ``N x C x H x W``).  ``yx_scale``: a number
    or 2 values (y, x); ``rgb_scale``: a number or C values.  ``scales`` (2 + C values, or
    a number for all) replaces both.  Scales may be tensors; gradients flow to them and to
    the image.  Missing scales mean 1.
    """
    if not isinstance(img, torch.Tensor) or not img.is_floating_point() or img.dim() < 3:
        raise PacnetValueError("img must be a floating-point tensor ... x C x H x W, got "
                               + (f"shape {list(img.shape)} dtype {img.dtype}"
                                  if isinstance(img, torch.Tensor) else type(img).__name__))
    img = img.reshape(-1, *img.shape[-3:])
    n, c, h, w = img.shape
    if scales is not None:
        if yx_scale is not None or rgb_scale is not None:
            raise PacnetValueError("give scales or yx_scale/rgb_scale, not both")
        s = _scale_tensor(scales, 2 + c, "scales", img)
        if s.shape[1] == 1:
            yx_scale = rgb_scale = s
        else:
            yx_scale, rgb_scale = s[:, :2], s[:, 2:]
    yx = create_position_feats((h, w), bs=n, device=img.device, dtype=img.dtype)
    if yx_scale is not None:
        yx = yx / _scale_tensor(yx_scale, 2, "yx_scale", img)
    if rgb_scale is not None:
        img = img / _scale_tensor(rgb_scale, c, "rgb_scale", img)
    return torch.cat([yx, img], dim=1)


# ----------------------------------------------------------------------------- model names

_HEAD = re.compile(r"crf(v7)?(?:i(\d+))?(l?)")


def parse_crf_name(name: str) -> Tuple[bool, int, List[Dict[str, Any]]]:
    """Parse the original's CRF shorthand: ``(loose, num_steps, [add_pairwise_kernel kwargs])``.

    Grammar (``task_semanticSegmentation/models.py``), e.g. ``crfi5p4d5641p4d5161``:

    * no ``p`` at all: ``p4d5161`` is appended (``crf`` = 5 steps, one ``4d`` 5x5 kernel,
      dilation 16);
    * the head, before the first ``p``: ``crf`` or ``crfv7``, then optionally ``i<steps>``
      (default 5), then optionally ``l`` (:class:`PacCRFLoose`);
    * each ``p``-separated token is ``<type><k><dilation><blur>``: ``type`` has 3
      characters if the third is ``s`` (``2ds``, ``0ds``) else 2 (``4d``, ``2d``, ``0d``,
      ``na``); ``k`` is one digit; ``blur`` the last digit; the dilation the digits
      between.  ``compat_type`` is ``'potts'`` for ``0d...``, else the type's first two
      characters; ``spatial_filter`` is whether the type ends in ``s``; the pairwise
      weight is 1.0.

    ``crfv7`` is accepted as in the original and gives the same CRF.  Malformed names
    raise :class:`~pacnet.errors.PacnetValueError` naming the offending part.
    """
    if not isinstance(name, str) or not name:
        raise PacnetValueError(f"a CRF name must be a non-empty string, got {name!r}",
                               hint="e.g. 'crfi5p4d5641p4d5161'")
    if "_" in name:
        raise PacnetValueError(f"CRF name {name!r} contains '_'",
                               hint=f"give only the CRF part, e.g. {name.rsplit('_', 1)[1]!r} "
                                    "(the backbone prefix is not part of it)")
    if name in ("convcrf", "convcrfv1"):
        raise PacnetValueError(f"{name!r} names the original's ConvCRF model, not a PacCRF "
                               "shorthand", hint="write its kernels out with pairwise_kernels "
                                                 "(compat_type '2d', spatial_filter false, blur 4)")
    if "p" not in name:
        name += "p4d5161"
    head, _, rest = name.partition("p")
    m = _HEAD.fullmatch(head)
    if m is None:
        raise PacnetValueError(f"bad CRF type {head!r} in {name!r}",
                               hint="the part before the first 'p' is 'crf' or 'crfv7', "
                                    "optionally followed by 'i<steps>' and then 'l' (loose)")
    steps = int(m.group(2)) if m.group(2) is not None else 5
    if steps < 1:
        raise PacnetValueError(f"CRF {name!r} has {steps} steps (from {head!r}); it needs >= 1")
    loose = m.group(3) == "l"
    kernels = []
    for j, token in enumerate(rest.split("p")):
        where = f"edge token {j} ({token!r}) of {name!r}"
        if not token:
            raise PacnetValueError(f"empty edge token {j} in {name!r}",
                                   hint="tokens are separated by single 'p's, e.g. 'p4d5641p4d5161'")
        tlen = 3 if len(token) > 2 and token[2] == "s" else 2
        ktype, digits = token[:tlen], token[tlen:]
        if len(digits) < 3 or not digits.isdigit():
            raise PacnetValueError(
                f"bad {where}: after the type {ktype!r} expected <k><dilation><blur> digits, "
                f"got {digits!r}", hint="e.g. '4d5641' = type 4d, k 5, dilation 64, blur 1")
        k, dilation, blur = int(digits[0]), int(digits[1:-1]), int(digits[-1])
        compat = "potts" if ktype.startswith("0d") else ktype[:2]
        if compat not in COMPAT_TYPES:
            raise PacnetValueError(f"bad {where}: unknown pairwise type {ktype!r}",
                                   hint="use 4d, 2d, 2ds, 0d, 0ds, na or their 's' forms")
        if k % 2 == 0:
            raise PacnetValueError(f"bad {where}: kernel size {k} must be odd")
        if dilation < 1 or blur < 1:
            raise PacnetValueError(f"bad {where}: dilation ({dilation}) and blur ({blur}) "
                                   "must be >= 1")
        kernels.append(dict(kernel_size=k, dilation=dilation, blur=blur, compat_type=compat,
                            spatial_filter=ktype.endswith("s"), pairwise_weight=1.0))
    return loose, steps, kernels
