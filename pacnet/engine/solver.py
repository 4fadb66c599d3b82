"""Caffe's solver, on torch.optim: the ``solver:`` section, learning-rate policies, updates.

A net file's ``solver:`` section uses the field names of Caffe's ``SolverParameter``
(``base_lr``, ``lr_policy``, ``momentum``, ``iter_size``, ...; caffe.md §6.4)::

    solver:
      type: SGD
      base_lr: 2.5e-4
      lr_policy: poly
      power: 0.9
      max_iter: 20000
      momentum: 0.9
      weight_decay: 5.0e-4
      iter_size: 10

:func:`parse_solver` validates it (JSON schema, Draft 2020-12; mistakes raise
:class:`~pacnet.errors.SchemaError` naming the field) and returns a frozen
:class:`SolverConfig`.  :class:`Solver` then drives one update per Caffe iteration::

    solver = Solver(config, net, net.param_specs)
    while not solver.done:
        if solver.should_test():  ...
        info = solver.step(lambda: net.loss(net(**next(batches))))
        if solver.should_snapshot(): ...

What it reproduces from Caffe (``sgd_solver.cpp``, ``solver.cpp``):

* learning-rate policies ``fixed step exp inv multistep poly sigmoid`` exactly as
  ``SGDSolver::GetLearningRate`` (:class:`LearningRate`, a function of the iteration);
* per-blob ``lr_mult``/``decay_mult`` as optimizer parameter groups, ``lr_mult: 0`` frozen
  (excluded and ``requires_grad`` turned off), shared blobs counted once;
* the order of ``ApplyUpdate``: gradients summed over ``iter_size`` passes, clipped by
  global L2 norm (``clip_gradients``) *before* being divided by ``iter_size``, then L2 or
  L1 regularisation, then the update rule;
* Caffe's momentum form (:class:`CaffeSGD`), where the learning rate sits inside the
  momentum buffer.  ``momentum_form: torch`` selects PyTorch's form instead.

Choice of default (``momentum_form: caffe``): pacnet replays Caffe training recipes, and
with ``poly``/``step`` schedules the two forms give different weights (caffe.md §8.9).
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from pacnet.engine import _schema
from pacnet.errors import PacnetValueError, SchemaError, did_you_mean

__all__ = [
    "SOLVER_SCHEMA", "LR_POLICIES", "SOLVER_TYPES", "SolverConfig", "parse_solver",
    "LearningRate", "ParamGroupSpec", "param_groups", "CaffeSGD", "make_optimizer",
    "clip_gradients", "StepInfo", "Solver", "IGNORED_FIELDS", "is_solver_prototxt",
    "read_solver_file",
]

LR_POLICIES = ("fixed", "step", "exp", "inv", "multistep", "poly", "sigmoid")
SOLVER_TYPES = ("SGD", "Nesterov", "AdaGrad", "RMSProp", "AdaDelta", "Adam", "AdamW")
# Caffe's legacy ``solver_type`` enum (SolverParameter.SolverType), by name and number.
_LEGACY_TYPES = {"SGD": "SGD", "NESTEROV": "Nesterov", "ADAGRAD": "AdaGrad",
                 "RMSPROP": "RMSProp", "ADADELTA": "AdaDelta", "ADAM": "Adam"}
_LEGACY_NUMBERS = dict(enumerate(["SGD", "Nesterov", "AdaGrad", "RMSProp", "AdaDelta", "Adam"]))

# Fields each lr policy reads (SGDSolver::GetLearningRate); missing ones are an error, not 0.
_POLICY_NEEDS = {
    "fixed": (), "step": ("gamma", "stepsize"), "exp": ("gamma",), "inv": ("gamma", "power"),
    "multistep": ("gamma", "stepvalue"), "poly": ("power",), "sigmoid": ("gamma", "stepsize"),
}


def _num(description: str, default: Any = None, **extra: Any) -> Dict[str, Any]:
    out = {"type": "number", "description": description, **extra}
    if default is not None:
        out["default"] = default
    return out


def _int(description: str, default: Any = None, **extra: Any) -> Dict[str, Any]:
    out = {"type": "integer", "description": description, **extra}
    if default is not None:
        out["default"] = default
    return out


_IGNORED = "accepted for Caffe compatibility and ignored by pacnet"

SOLVER_SCHEMA: Dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "solver",
    "description": "Caffe SolverParameter fields (caffe.md §6.4) plus a few pacnet extensions.",
    "type": "object",
    "additionalProperties": False,
    "required": ["base_lr", "max_iter"],
    "properties": {
        "type": {"enum": list(SOLVER_TYPES), "default": "SGD",
                 "description": "update rule: SGD, Nesterov, AdaGrad, RMSProp, AdaDelta, Adam "
                                "(Caffe) or AdamW (pacnet; decoupled weight decay)"},
        "solver_type": {"enum": list(_LEGACY_TYPES) + list(_LEGACY_NUMBERS),
                        "description": "legacy Caffe enum for 'type' (SGD, NESTEROV, ADAGRAD, "
                                       "RMSPROP, ADADELTA, ADAM or 0-5)"},
        "base_lr": _num("base learning rate; each blob uses base_lr x policy x lr_mult", minimum=0),
        "lr_policy": {"enum": list(LR_POLICIES), "default": "fixed",
                      "description": "learning-rate policy: fixed, step, exp, inv, multistep, poly, sigmoid"},
        "gamma": _num("decay factor of the step/exp/inv/multistep policies, slope of sigmoid"),
        "power": _num("exponent of the inv and poly policies"),
        "stepsize": _int("iterations per step (step policy); centre of the sigmoid policy", minimum=1),
        "stepvalue": {"anyOf": [{"type": "integer", "minimum": 0},
                                {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}],
                      "description": "iterations at which the multistep policy multiplies the rate by gamma"},
        "max_iter": _int("number of updates to train for", minimum=0),
        "momentum": _num("momentum (SGD/Nesterov), beta1 (Adam), decay (AdaDelta). Caffe's default "
                         "is 0, also for Adam", 0.0, minimum=0),
        "momentum2": _num("Adam beta2", 0.999, minimum=0, exclusiveMaximum=1),
        "delta": _num("numerical-stability epsilon of AdaGrad, RMSProp, AdaDelta, Adam", 1e-8,
                      exclusiveMinimum=0),
        "rms_decay": _num("RMSProp decay of the mean square", 0.99, minimum=0, exclusiveMaximum=1),
        "weight_decay": _num("regularisation strength; each blob uses weight_decay x decay_mult", 0.0,
                             minimum=0),
        "regularization_type": {"enum": ["L2", "L1"], "default": "L2",
                                "description": "L2 adds decay*w to the gradient, L1 adds decay*sign(w)"},
        "clip_gradients": _num("rescale all gradients when their global L2 norm exceeds this "
                               "(negative = off)", -1.0),
        "iter_size": _int("forward/backward passes accumulated per update (gradient averaged)", 1,
                          minimum=1),
        "param_lr_mult": {"type": "object",
                          "additionalProperties": {"type": "number", "minimum": 0},
                          "description": "pacnet: blob-name glob -> lr_mult, in place of the net's "
                                         "param: multipliers for the blobs it matches (the longest "
                                         "matching glob wins); e.g. {'*': 0, 'crf.*': 1} trains "
                                         "the CRF alone, {'*': 1} every blob at base_lr"},
        "momentum_form": {"enum": ["caffe", "torch"], "default": "caffe",
                          "description": "pacnet: 'caffe' keeps lr inside the momentum buffer "
                                         "(V = m V + lr g, exact Caffe), 'torch' applies lr after it "
                                         "(torch.optim.SGD); they differ when the lr changes"},
        "snapshot": _int("save a checkpoint every this many iterations (0 = only at the end)", 0,
                         minimum=0),
        "snapshot_prefix": {"type": "string", "default": "",
                            "description": "file-name prefix of snapshots (pacnet keeps them in the "
                                           "work dir's checkpoints/ folder)"},
        "snapshot_after_train": {"type": "boolean", "default": True,
                                 "description": "save a checkpoint when training ends"},
        "snapshot_keep": _int("pacnet: keep only the newest this many checkpoints (0 = all)", 0,
                              minimum=0),
        "snapshot_diff": {"type": "boolean", "description": _IGNORED},
        "snapshot_format": {"enum": ["BINARYPROTO", "HDF5"],
                            "description": _IGNORED + " (weights are always safetensors)"},
        "test_interval": _int("test every this many iterations (0 = never during training)", 0,
                              minimum=0),
        "test_iter": {"anyOf": [{"type": "integer", "minimum": 0},
                                {"type": "array", "items": {"type": "integer", "minimum": 0}}],
                      "default": [],
                      "description": "test batches per test pass (one per test net); empty or 0 = "
                                     "the whole test set"},
        "test_initialization": {"type": "boolean", "default": True,
                                "description": "also test before the first update"},
        "test_compute_loss": {"type": "boolean", "default": False,
                              "description": "report the test loss too"},
        "display": _int("log every this many iterations (0 = never)", 0, minimum=0),
        "average_loss": _int("the displayed loss is averaged over this many iterations", 1, minimum=1),
        "random_seed": _int("seed of every random generator (negative = not seeded)", -1),
        "weights": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}],
                    "description": "weights files to initialise from before training"},
        "net": {"type": "string", "description": _IGNORED + " (the net file is given on the "
                                                           "command line)"},
        "train_net": {"type": "string", "description": _IGNORED},
        "test_net": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}],
                     "description": _IGNORED},
        "net_param": {"type": "object", "description": _IGNORED},
        "train_net_param": {"type": "object", "description": _IGNORED},
        "test_net_param": {"description": _IGNORED},
        "train_state": {"type": "object", "description": _IGNORED},
        "test_state": {"description": _IGNORED},
        "solver_mode": {"enum": ["CPU", "GPU", 0, 1],
                        "description": _IGNORED + " (the device is chosen on the command line)"},
        "device_id": {"type": "integer", "description": _IGNORED},
    },
}

#: Caffe SolverParameter fields pacnet accepts and ignores (net files, devices, snapshot naming).
IGNORED_FIELDS = tuple(k for k, v in SOLVER_SCHEMA["properties"].items()
                       if str(v.get("description", "")).startswith(_IGNORED)
                       or k == "snapshot_prefix")

_NUMBER_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _coerce_numbers(raw: Mapping[str, Any]) -> Dict[str, Any]:
    """Accept ``1e-3`` written without a dot: PyYAML reads it as a string, users mean a number."""
    out = dict(raw)
    for key, value in raw.items():
        sub = SOLVER_SCHEMA["properties"].get(key, {})
        if sub.get("type") in ("number", "integer") and isinstance(value, str) and _NUMBER_RE.match(value.strip()):
            number = float(value)
            if sub["type"] == "integer" and number.is_integer():
                number = int(number)
            out[key] = number
    return out


@dataclass(frozen=True)
class SolverConfig:
    """A validated ``solver:`` section.  Field meanings: :data:`SOLVER_SCHEMA`."""

    base_lr: float
    max_iter: int
    type: str = "SGD"
    lr_policy: str = "fixed"
    gamma: Optional[float] = None
    power: Optional[float] = None
    stepsize: Optional[int] = None
    stepvalue: Tuple[int, ...] = ()
    momentum: float = 0.0
    momentum2: float = 0.999
    delta: float = 1e-8
    rms_decay: float = 0.99
    weight_decay: float = 0.0
    regularization_type: str = "L2"
    clip_gradients: float = -1.0
    iter_size: int = 1
    momentum_form: str = "caffe"
    snapshot: int = 0
    snapshot_prefix: str = ""
    snapshot_after_train: bool = True
    snapshot_keep: int = 0
    test_interval: int = 0
    test_iter: Tuple[int, ...] = ()
    test_initialization: bool = True
    test_compute_loss: bool = False
    display: int = 0
    average_loss: int = 1
    random_seed: int = -1
    weights: Tuple[str, ...] = ()
    param_lr_mult: Tuple[Tuple[str, float], ...] = ()

    def to_dict(self) -> Dict[str, Any]:
        """Plain, YAML-ready dict of every field (tuples as lists, unset fields left out)."""
        out: Dict[str, Any] = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if value is None:
                continue
            if name == "param_lr_mult":
                out[name] = dict(value)
            else:
                out[name] = list(value) if isinstance(value, tuple) else value
        return out


def _as_tuple(value: Any) -> Tuple[Any, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(value)
    return (value,)


def parse_solver(raw: Optional[Mapping[str, Any]], *, root: Sequence[Any] = ("solver",),
                 locate: Optional[_schema.Locate] = None, source: Optional[str] = None) -> SolverConfig:
    """Validate a ``solver:`` mapping and return a :class:`SolverConfig`.

    ``locate(path)`` may map a key path such as ``("solver", "gamma")`` to the
    :class:`~pacnet.errors.Location` where it was written; ``source`` names the file
    otherwise.  Raises :class:`~pacnet.errors.SchemaError` naming the field.
    """
    if locate is None:
        locate = _schema.marked_locator(raw, root)
    if raw is None:
        raise _schema.error(list(root), "missing: training needs a solver section",
                            hint="add e.g. 'solver: {base_lr: 0.01, max_iter: 1000}'",
                            locate=locate, source=source)
    if not isinstance(raw, Mapping):
        raise _schema.error(list(root), f"expected a mapping, got {_schema.kind_of(raw)}",
                            locate=locate, source=source)
    raw = _coerce_numbers(raw)
    if isinstance(raw.get("type"), str):  # Caffe spells them 'Adam', users write 'adam'
        canon = {t.lower(): t for t in SOLVER_TYPES}.get(raw["type"].lower())
        if canon:
            raw["type"] = canon
    cfg = _schema.validate(raw, SOLVER_SCHEMA, root=root, locate=locate, source=source)

    def fail(key: str, message: str, hint: Optional[str] = None) -> SchemaError:
        return _schema.error(list(root) + [key], message, hint=hint, locate=locate, source=source)

    if "solver_type" in raw:
        legacy = raw["solver_type"]
        legacy = _LEGACY_NUMBERS[legacy] if isinstance(legacy, int) else _LEGACY_TYPES[legacy]
        if "type" in raw and raw["type"] != legacy:
            raise fail("solver_type", f"says {legacy!r} but type says {raw['type']!r}",
                       hint="write only 'type' (solver_type is Caffe's legacy field)")
        cfg["type"] = legacy
    policy = cfg["lr_policy"]
    for key in _POLICY_NEEDS[policy]:
        if key not in raw:
            raise fail(key, f"lr_policy {policy!r} needs {key!r}",
                       hint=SOLVER_SCHEMA["properties"][key]["description"])
    if policy == "poly" and cfg["max_iter"] <= 0:
        raise fail("max_iter", "lr_policy 'poly' needs max_iter > 0")
    if cfg["type"] == "RMSProp" and cfg["momentum"] != 0:
        raise fail("momentum", "RMSProp does not use momentum (Caffe refuses it too)",
                   hint="remove momentum or use rms_decay")
    if cfg["type"] in ("Adam", "AdamW") and cfg["momentum"] >= 1:
        raise fail("momentum", f"is beta1 of {cfg['type']} and must be < 1, got {cfg['momentum']}")
    if cfg["type"] == "AdamW" and cfg["regularization_type"] == "L1":
        raise fail("regularization_type", "AdamW decouples L2 weight decay; L1 is not defined for it",
                   hint="use type: Adam with L1, or AdamW with L2")
    if cfg["type"] not in ("SGD", "Nesterov") and "momentum_form" in raw:
        raise fail("momentum_form", f"only applies to SGD and Nesterov, not {cfg['type']}")
    names = set(SolverConfig.__dataclass_fields__)
    kwargs = {k: v for k, v in cfg.items() if k in names}
    for key in ("stepvalue", "test_iter", "weights"):
        kwargs[key] = _as_tuple(cfg.get(key))
    for key in ("max_iter", "stepsize", "iter_size", "snapshot", "snapshot_keep", "test_interval",
                "display", "average_loss", "random_seed"):
        if kwargs.get(key) is not None:
            kwargs[key] = int(kwargs[key])
    kwargs["stepvalue"] = tuple(int(v) for v in kwargs["stepvalue"])
    kwargs["param_lr_mult"] = tuple((str(k), float(v))
                                    for k, v in (cfg.get("param_lr_mult") or {}).items())
    kwargs["test_iter"] = tuple(int(v) for v in kwargs["test_iter"])
    for key in ("base_lr", "gamma", "power", "momentum", "momentum2", "delta", "rms_decay",
                "weight_decay", "clip_gradients"):
        if kwargs.get(key) is not None:
            kwargs[key] = float(kwargs[key])
    return SolverConfig(**kwargs)


class LearningRate:
    """Caffe's ``SGDSolver::GetLearningRate`` as a function of the iteration.

    ``lr(it)`` is the rate used by the update that turns iteration ``it`` (updates done
    so far) into ``it + 1``.  ``multistep`` advances by at most one step per iteration
    like Caffe's ``current_step_`` counter, so repeated or unsorted ``stepvalue``
    entries behave exactly as in Caffe.
    """

    def __init__(self, config: SolverConfig) -> None:
        self.policy = config.lr_policy
        self.base_lr = config.base_lr
        self.gamma = config.gamma
        self.power = config.power
        self.stepsize = config.stepsize
        self.max_iter = config.max_iter
        # Iteration at which multistep's k-th step fires: the first it >= stepvalue[k]
        # that comes after the previous step fired (one advance per call in Caffe).
        fire: List[int] = []
        last = -1
        for value in config.stepvalue:
            last = max(last + 1, value)
            fire.append(last)
        self._fire = fire

    def __call__(self, it: int) -> float:
        base, policy = self.base_lr, self.policy
        if policy == "fixed":
            return base
        if policy == "step":
            return base * self.gamma ** (it // self.stepsize)
        if policy == "exp":
            return base * self.gamma ** it
        if policy == "inv":
            return base * (1.0 + self.gamma * it) ** (-self.power)
        if policy == "multistep":
            return base * self.gamma ** sum(1 for f in self._fire if f <= it)
        if policy == "poly":
            return base * (1.0 - it / self.max_iter) ** self.power
        if policy == "sigmoid":
            return base * (1.0 / (1.0 + math.exp(-self.gamma * (it - self.stepsize))))
        raise PacnetValueError(f"unknown lr_policy {policy!r}")  # parse_solver prevents this


# --------------------------------------------------------------------------- param groups


@dataclass
class ParamGroupSpec:
    """Learnable blobs sharing one (lr_mult, decay_mult); ``names`` are state_dict keys."""

    lr_mult: float
    decay_mult: float
    params: List[nn.Parameter] = field(default_factory=list)
    names: List[str] = field(default_factory=list)


def _mults(spec: Any, key: str) -> Tuple[float, float]:
    if isinstance(spec, Mapping):
        lr, decay = spec.get("lr_mult", 1.0), spec.get("decay_mult", 1.0)
    elif hasattr(spec, "lr_mult"):
        lr, decay = spec.lr_mult, getattr(spec, "decay_mult", 1.0)
    else:
        try:
            lr, decay = spec
        except (TypeError, ValueError):
            raise PacnetValueError(f"param_specs[{key!r}] must be (lr_mult, decay_mult), got {spec!r}") from None
    try:
        lr, decay = float(lr), float(decay)
    except (TypeError, ValueError):
        raise PacnetValueError(f"param_specs[{key!r}]: lr_mult/decay_mult must be numbers, got {spec!r}") from None
    if not (math.isfinite(lr) and math.isfinite(decay)) or lr < 0 or decay < 0:
        raise PacnetValueError(f"param_specs[{key!r}]: lr_mult and decay_mult must be finite and >= 0, "
                               f"got {lr}, {decay}")
    return lr, decay


def param_groups(model: nn.Module, param_specs: Optional[Mapping[str, Any]] = None, *,
                 freeze: bool = True, lr_mult_globs: Sequence[Tuple[str, float]] = ()
                 ) -> Tuple[List[ParamGroupSpec], List[str]]:
    """Group ``model``'s learnable blobs by (lr_mult, decay_mult); return (groups, frozen names).

    ``param_specs`` maps state_dict keys to ``(lr_mult, decay_mult)`` (a tuple, a mapping
    with those keys, or an object with those attributes); keys not listed get (1, 1).
    A blob shared by several layers appears under several keys but is counted once, with
    the spec of its first key in state_dict order (its owner, as in Caffe).  Blobs with
    ``lr_mult == 0`` are left out and, when ``freeze``, get ``requires_grad = False`` so
    no gradient is computed for them (Caffe's ``param_propagate_down``).  ``lr_mult_globs``
    (the solver's ``param_lr_mult``) replaces the lr_mult of every blob whose key matches a
    glob, the longest matching glob deciding; a glob that matches no learnable blob is an
    error.
    """
    specs = dict(param_specs or {})
    tensors = model.state_dict(keep_vars=True)
    unknown = [k for k in specs if k not in tensors or not isinstance(tensors[k], nn.Parameter)]
    if unknown:
        raise PacnetValueError(f"param_specs names {unknown[0]!r}, which is not a parameter of the model",
                               hint="keys must be state_dict keys of learnable blobs ('<layer>.<blob>')")
    learnable = [k for k, t in tensors.items() if isinstance(t, nn.Parameter)]
    for glob, _ in lr_mult_globs:
        if not any(fnmatch.fnmatchcase(k, glob) for k in learnable):
            raise PacnetValueError(
                f"solver.param_lr_mult: {glob!r} matches no learnable blob of the net",
                hint=did_you_mean(glob, learnable) or "globs match state_dict keys such as "
                + ", ".join(learnable[:3]))

    def lr_override(key: str) -> Optional[float]:
        found = [(len(g), i, m) for i, (g, m) in enumerate(lr_mult_globs)
                 if fnmatch.fnmatchcase(key, g)]
        return max(found)[2] if found else None

    seen: Dict[int, str] = {}
    groups: Dict[Tuple[float, float], ParamGroupSpec] = {}
    frozen: List[str] = []
    for key, tensor in tensors.items():
        if not isinstance(tensor, nn.Parameter) or id(tensor) in seen:
            continue
        seen[id(tensor)] = key
        lr, decay = _mults(specs[key], key) if key in specs else (1.0, 1.0)
        override = lr_override(key)
        if override is not None:
            if lr == 0 and override > 0:
                tensor.requires_grad_(True)  # frozen by its lr_mult 0 (codegen), thawed here
            lr = float(override)
        if lr == 0:
            frozen.append(key)
            if freeze:
                tensor.requires_grad_(False)
            continue
        if not tensor.requires_grad:
            frozen.append(key)  # frozen by the model itself
            continue
        group = groups.setdefault((lr, decay), ParamGroupSpec(lr, decay))
        group.params.append(tensor)
        group.names.append(key)
    return list(groups.values()), frozen


# --------------------------------------------------------------------------- CaffeSGD


class CaffeSGD(torch.optim.Optimizer):
    """SGD with momentum in Caffe's form (``SGDSolver``/``NesterovSolver::ComputeUpdateValue``).

    Per parameter, with g the gradient and ``weight_decay`` d (L2: g += d w; L1: g += d sign(w))::

        caffe form:  V <- m V + lr g            w <- w - V
        Nesterov:    V' <- m V + lr g           w <- w - ((1 + m) V' - m V)
        torch form:  B <- m B + g               w <- w - lr B          (torch.optim.SGD)
        Nesterov:    B <- m B + g               w <- w - lr (g + m B)

    The two forms are identical while lr is constant.  When lr changes (``step``,
    ``poly``), Caffe's buffer still carries the old rates, so its first update after a
    change is ``lr_new g + m V`` with V accumulated at ``lr_old``, whereas torch rescales
    the whole history by ``lr_new``.  Use ``form="caffe"`` to replay a Caffe recipe.
    """

    def __init__(self, params: Iterable[Any], lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
                 *, regularization: str = "L2", nesterov: bool = False, form: str = "caffe") -> None:
        for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise PacnetValueError(f"CaffeSGD: {name} must be a finite number >= 0, got {value!r}")
        if regularization not in ("L1", "L2"):
            raise PacnetValueError(f"CaffeSGD: regularization must be 'L1' or 'L2', got {regularization!r}")
        if form not in ("caffe", "torch"):
            raise PacnetValueError(f"CaffeSGD: form must be 'caffe' or 'torch', got {form!r}")
        defaults = dict(lr=float(lr), momentum=float(momentum), weight_decay=float(weight_decay),
                        regularization=regularization, nesterov=bool(nesterov), form=form)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None) -> Optional[torch.Tensor]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, m, decay = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if decay != 0:
                    g = g.add(p if group["regularization"] == "L2" else torch.sign(p), alpha=decay)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                if group["form"] == "caffe":
                    if group["nesterov"]:
                        previous = buf.clone()
                        buf.mul_(m).add_(g, alpha=lr)
                        p.sub_(buf * (1.0 + m) - previous * m)
                    else:
                        buf.mul_(m).add_(g, alpha=lr)
                        p.sub_(buf)
                else:
                    buf.mul_(m).add_(g)
                    if group["nesterov"]:
                        p.sub_(g.add(buf, alpha=m), alpha=lr)
                    else:
                        p.sub_(buf, alpha=lr)
        return loss


# --------------------------------------------------------------------------- optimizer


def make_optimizer(config: SolverConfig, groups: Sequence[ParamGroupSpec]) -> torch.optim.Optimizer:
    """The torch optimizer for ``config.type`` over ``groups`` (lr = base_lr x lr_mult).

    Regularisation is applied by :class:`Solver` into the gradients (Caffe's
    ``Regularize``), so every optimizer except AdamW gets ``weight_decay = 0``; AdamW gets
    its decoupled decay ``weight_decay x decay_mult`` per group.  Each torch group also
    carries ``lr_mult``, ``decay_mult`` and ``names``.

    Differences from Caffe that remain: Adam/AdamW add ``delta`` after the bias
    correction of the second moment (Caffe before it: ``eps`` scaled by sqrt(1-beta2^t)).
    AdaGrad, RMSProp and AdaDelta are torch's, which use Caffe's formulas.
    """
    if not groups:
        raise PacnetValueError("nothing to train: every parameter is frozen (lr_mult 0) or the net has none",
                               hint="check lr_mult in the net's param entries")
    kind = config.type
    torch_groups = []
    for g in groups:
        entry: Dict[str, Any] = {"params": list(g.params), "lr": config.base_lr * g.lr_mult,
                                 "lr_mult": g.lr_mult, "decay_mult": g.decay_mult, "names": list(g.names)}
        if kind == "AdamW":
            entry["weight_decay"] = config.weight_decay * g.decay_mult
        torch_groups.append(entry)
    lr = config.base_lr
    if kind in ("SGD", "Nesterov"):
        return CaffeSGD(torch_groups, lr=lr, momentum=config.momentum, nesterov=kind == "Nesterov",
                        form=config.momentum_form)
    if kind == "Adam":
        return torch.optim.Adam(torch_groups, lr=lr, betas=(config.momentum, config.momentum2),
                                eps=config.delta, weight_decay=0.0)
    if kind == "AdamW":
        return torch.optim.AdamW(torch_groups, lr=lr, betas=(config.momentum, config.momentum2),
                                 eps=config.delta, weight_decay=config.weight_decay)
    if kind == "AdaGrad":
        return torch.optim.Adagrad(torch_groups, lr=lr, eps=config.delta, weight_decay=0.0)
    if kind == "RMSProp":
        return torch.optim.RMSprop(torch_groups, lr=lr, alpha=config.rms_decay, eps=config.delta,
                                   weight_decay=0.0, momentum=0.0)
    if kind == "AdaDelta":
        return torch.optim.Adadelta(torch_groups, lr=lr, rho=config.momentum, eps=config.delta,
                                    weight_decay=0.0)
    raise PacnetValueError(f"unknown solver type {kind!r}")  # parse_solver prevents this


def clip_gradients(params: Iterable[torch.Tensor], max_norm: float) -> Tuple[float, bool]:
    """Caffe's ``ClipGradients``: if the global L2 norm of all gradients exceeds
    ``max_norm``, scale every gradient by ``max_norm / norm`` (no epsilon).  Returns
    (norm before clipping, whether it clipped).  ``max_norm < 0`` only measures."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0, False
    norm = float(torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(g.detach(), dtype=torch.float64) for g in grads])))
    if max_norm >= 0 and norm > max_norm:
        scale = max_norm / norm
        for g in grads:
            g.mul_(scale)
        return norm, True
    return norm, False


# --------------------------------------------------------------------------- Solver


@dataclass(frozen=True)
class StepInfo:
    """What one update did: the iteration it started from, the base rate it used (before
    lr_mult), the loss averaged over ``iter_size`` passes, the loss smoothed over
    ``average_loss`` iterations, and the gradient norm (None unless clipping is on)."""

    iter: int
    lr: float
    loss: float
    smoothed_loss: float
    grad_norm: Optional[float] = None
    clipped: bool = False


class Solver:
    """Caffe's solver loop pieces around a torch optimizer (see the module docstring).

    ``iter`` counts updates done.  The trainer either calls :meth:`step` with a closure
    returning one pass's loss (it runs ``iter_size`` forward/backward passes), or runs the
    backward passes itself and calls :meth:`apply`.  Gradients are *summed* over the
    passes (plain ``backward()``); :meth:`apply` divides them by ``iter_size`` after
    clipping, as Caffe does.
    """

    def __init__(self, config: SolverConfig | Mapping[str, Any], model: nn.Module,
                 param_specs: Optional[Mapping[str, Any]] = None) -> None:
        self.config = config if isinstance(config, SolverConfig) else parse_solver(config)
        self.model = model
        self.lr = LearningRate(self.config)
        self.groups, self.frozen = param_groups(model, param_specs,
                                                lr_mult_globs=self.config.param_lr_mult)
        self.optimizer = make_optimizer(self.config, self.groups)
        self.iter = 0
        self._losses: Deque[float] = deque(maxlen=self.config.average_loss)

    # -- the update ---------------------------------------------------------------------

    @property
    def params(self) -> List[nn.Parameter]:
        return [p for g in self.groups for p in g.params]

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self, closure: Callable[[], torch.Tensor]) -> StepInfo:
        """One Caffe iteration: ``iter_size`` x (``loss = closure()``; ``loss.backward()``),
        then :meth:`apply`.  The closure fetches its own batch."""
        self.zero_grad()
        total = 0.0
        for _ in range(self.config.iter_size):
            loss = closure()
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise PacnetValueError(f"the loss closure must return a scalar tensor, got {loss!r}")
            loss.backward()
            total += float(loss.detach())
        return self.apply(total / self.config.iter_size)

    def apply(self, loss: float = float("nan")) -> StepInfo:
        """Update from the gradients accumulated (summed) over ``iter_size`` passes:
        clip, divide by ``iter_size``, regularise, set each group's rate, step, ``iter += 1``."""
        cfg = self.config
        rate = self.lr(self.iter)
        params = self.params
        for p in params:
            if p.grad is None:
                # Caffe updates every learnable blob each iteration (decay, momentum) even
                # when no loss reached it; a zero gradient does the same here.
                p.grad = torch.zeros_like(p)
        norm, clipped = clip_gradients(params, cfg.clip_gradients) if cfg.clip_gradients >= 0 else (None, False)
        if cfg.iter_size != 1:
            for p in params:
                p.grad.div_(cfg.iter_size)
        if cfg.type != "AdamW" and cfg.weight_decay != 0:
            with torch.no_grad():
                for g in self.groups:
                    decay = cfg.weight_decay * g.decay_mult
                    if decay == 0:
                        continue
                    for p in g.params:
                        p.grad.add_(p if cfg.regularization_type == "L2" else torch.sign(p), alpha=decay)
        for group in self.optimizer.param_groups:
            group["lr"] = rate * group["lr_mult"]
        self.optimizer.step()
        started = self.iter
        self.iter += 1
        if not math.isnan(loss):
            self._losses.append(loss)
        return StepInfo(iter=started, lr=rate, loss=loss, smoothed_loss=self.smoothed_loss,
                        grad_norm=norm, clipped=clipped)

    @property
    def smoothed_loss(self) -> float:
        """Mean loss of the last ``average_loss`` iterations (Caffe's displayed loss)."""
        return sum(self._losses) / len(self._losses) if self._losses else float("nan")

    # -- Caffe's schedule of side activities (Solver::Step / Solver::Solve) -------------

    @property
    def done(self) -> bool:
        return self.iter >= self.config.max_iter

    def should_test(self) -> bool:
        """Test before the update of iteration ``iter`` (Caffe tests at iter 0 only with
        ``test_initialization``)."""
        c = self.config
        return bool(c.test_interval) and self.iter % c.test_interval == 0 and (self.iter > 0 or c.test_initialization)

    def should_display(self, it: Optional[int] = None) -> bool:
        """Log the iteration ``it`` (default: the one just done, ``iter - 1``)."""
        it = self.iter - 1 if it is None else it
        return bool(self.config.display) and it >= 0 and it % self.config.display == 0

    def should_snapshot(self) -> bool:
        """Snapshot now, after an update (``iter`` a multiple of ``snapshot``)."""
        return bool(self.config.snapshot) and self.iter > 0 and self.iter % self.config.snapshot == 0

    def snapshot_at_end(self) -> bool:
        """After the last update: snapshot unless the periodic one just did."""
        c = self.config
        return c.snapshot_after_train and not (c.snapshot and self.iter % c.snapshot == 0)

    def test_at_end(self) -> bool:
        """After the last update: Caffe tests once more when ``iter`` hits the interval."""
        c = self.config
        return bool(c.test_interval) and self.iter % c.test_interval == 0

    # -- state ----------------------------------------------------------------------------

    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to resume: iteration, optimizer state, loss window.
        Plain Python and tensors only (loads with ``torch.load(weights_only=True)``)."""
        return {"iter": self.iter, "optimizer": self.optimizer.state_dict(),
                "losses": [float(x) for x in self._losses], "type": self.config.type}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("type", self.config.type) != self.config.type:
            raise PacnetValueError(f"cannot resume a {state['type']} solver state with a "
                                   f"{self.config.type} solver", hint="keep the solver type when resuming")
        # Caffe restores history (momentum buffers, iteration) from the snapshot and the
        # hyperparameters from the solver file: keep this config's group settings.
        settings = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        for group, own in zip(self.optimizer.param_groups, settings):
            group.update(own)
        self.iter = int(state["iter"])
        self._losses = deque((float(x) for x in state.get("losses", [])), maxlen=self.config.average_loss)


# --------------------------------------------------------------------------- solver files


def is_solver_prototxt(root: Any) -> bool:
    """Whether a parsed prototxt (:class:`pacnet.prototxt.Message`) is a Caffe
    ``SolverParameter`` rather than a net: only solver fields, and at least one of the
    fields every solver has."""
    names = set(root.names())
    known = set(SOLVER_SCHEMA["properties"])
    every = {"base_lr", "lr_policy", "max_iter", "net", "train_net", "type", "solver_type"}
    return bool(names) and names <= known and bool(names & every)


def read_solver_file(path: str, vars: Optional[Mapping[str, Any]] = None, *,
                     keep_unset: bool = False) -> Dict[str, Any]:
    """The ``solver:`` section of ``path``: a Caffe ``solver.prototxt``, or a YAML file
    holding a ``solver:`` mapping (and maybe ``vars:``) or only the mapping.  Validated,
    with errors located in that file; ``${VAR}`` templates are filled from ``vars`` (and the
    file's ``vars:``).  ``keep_unset``: variables without a value stay ``${NAME}`` (their
    fields are left out of the validation) instead of being an error."""
    import os

    from pacnet.errors import LoadError, Location

    path = os.fspath(path)
    marks: Dict[Tuple[Any, ...], Location] = {}
    if path.lower().endswith((".prototxt", ".pt.txt", ".txt")):
        from pacnet.prototxt import parse, read_text

        root = parse(read_text(path), vars, file=path, keep_unset={})
        if not is_solver_prototxt(root):
            raise LoadError(f"{path} is not a Caffe solver (SolverParameter)",
                            location=Location(path),
                            hint="a solver file has fields such as base_lr, lr_policy and max_iter")
        section = root.to_dict()
        marks = {("solver", f.name): Location(path, f.line, f.col) for f in root}
    else:
        from pacnet.load import read_yaml, substitute

        tree = read_yaml(path)
        section = tree.get("solver", tree) if isinstance(tree, Mapping) else tree
        own = (tree.get("vars") or {}) if isinstance(tree, Mapping) else {}
        env = {k: v for k, v in own.items() if v is not None}
        env.update(vars or {})
        section = substitute(section, env, {})
    checked = section
    if keep_unset and isinstance(section, Mapping):  # check the rest; 1 stands in for a number
        checked = {}
        for key, value in section.items():
            if _schema._unset_template(value, ()) is None:
                checked[key] = value
            elif SOLVER_SCHEMA["properties"].get(key, {}).get("type") in ("number", "integer"):
                checked[key] = 1
    parse_solver(checked, source=path,
                 locate=(lambda key_path: marks.get(tuple(key_path[:2]))) if marks else None)
    return dict(section)
