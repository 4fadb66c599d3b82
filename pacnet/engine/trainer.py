"""The train, test and time loops: Caffe's ``Solver::Solve``, test pass and ``caffe time``.

Thin on purpose: each step is one of the engine's pieces.

:func:`train` -- read the net file's ``solver:`` and ``data:`` sections, build the train
net (and the test net when ``test_interval`` is set) with the data's batch shapes, then
run Caffe's loop: test every ``test_interval`` (and at 0 with ``test_initialization``),
``iter_size`` forward/backward passes per update, display every ``display`` iterations,
snapshot every ``snapshot``, snapshot/test once more at the end.  Everything goes to the
work dir (:class:`~pacnet.engine.workdir.WorkDir`); an existing checkpoint there is
resumed exactly (weights, optimizer, RNG, data stream position).  Under ``torchrun``
(``WORLD_SIZE`` > 1) the net is wrapped in DistributedDataParallel, every rank reads its
own part of the data stream, metrics are summed over ranks and rank 0 writes files.

:func:`test` -- evaluate weights (a ``.safetensors`` file, a checkpoint or a work dir) on
the test (or val) set; optionally write predictions (VOC palette PNGs, ``.flo``, ``.npy``).

:func:`benchmark` -- forward/backward timings, total and per layer.

Nothing here prints: progress goes to an ``on_event(record)`` callback (a dict with
``event`` = ``start``/``resume``/``weights``/``step``/``train``/``test``/``snapshot``/
``interrupted``/``done``).  ``step`` comes after every update (``step``, ``loss``,
``smoothed_loss``, ``lr``: enough for a progress bar); ``train`` every ``display`` iterations.

A ``KeyboardInterrupt`` during training (Ctrl-C; the CLI turns SIGTERM into one) saves a
snapshot of the last completed iteration, emits ``interrupted`` with its path and is
re-raised; resuming from that snapshot continues exactly.  An interrupt that arrives while
the weights are being updated is held until the update is done.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from pacnet.engine.checkpoint import (Checkpoint, CheckpointManager, capture_rng_state,
                                     seed_everything)
from pacnet.engine.data import make_dataset, make_loader, missing_section, parse_data
from pacnet.engine.datasets import BlobDataset
from pacnet.engine.metrics import EPE, RMSE, Average, ConfusionMatrix, all_reduce_
from pacnet.engine.solver import Solver, parse_solver
from pacnet.engine.transforms import denormalize
from pacnet.engine.workdir import WorkDir
from pacnet.errors import (DamagedFileError, DataError, Location, OutputError, PacnetError,
                           ShapeError)
from pacnet.weights import load_weights

# F.interpolate mode by tensor rank: images (N x C x H x W) and clips (N x C x T x H x W).
_LINEAR = {4: "bilinear", 5: "trilinear"}

__all__ = ["DistInfo", "init_distributed", "pick_device", "batch_shapes", "copy_trained_layers", "total_loss",
           "Evaluator", "ShapedNets", "evaluate", "train", "test", "benchmark"]

OnEvent = Optional[Callable[[Dict[str, Any]], None]]


# --------------------------------------------------------------------------- processes and devices


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a torchrun job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed() -> DistInfo:
    """Join the torchrun process group when ``WORLD_SIZE`` > 1 (NCCL on GPUs, else gloo)."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend)
    return info


def pick_device(device: Any = None, info: DistInfo = DistInfo()) -> torch.device:
    """``device`` as given (checked), else this rank's GPU, else the CPU."""
    if device is None or device == "auto":
        return torch.device(f"cuda:{info.local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise PacnetError(f"unknown device {device!r}", hint="use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise PacnetError(f"device {device!r} requested but CUDA is not available", hint="use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise PacnetError(f"device {device!r}: only {torch.cuda.device_count()} GPU(s)")
    return dev


# --------------------------------------------------------------------------- nets and data


def _input_names(tree: Mapping[str, Any], phase: str, source: Optional[str] = None) -> List[str]:
    """The blobs the data must feed in ``phase``: the ``inputs:`` section plus the Input
    layers included in that phase (e.g. a ground truth that only the train net reads)."""
    import copy

    from pacnet.graph import build_graph

    names = [str(k) for k in build_graph(copy.deepcopy(tree), phase=phase, source=source).inputs]
    if names:
        return names
    raise PacnetError("the net declares no inputs, so the engine cannot feed it data",
                      hint="add an 'inputs:' section naming the blobs the data set gives")


def batch_shapes(dataset: BlobDataset, names: Sequence[str], batch_size: int) -> Dict[str, Tuple[int, ...]]:
    """Input shapes for :func:`pacnet.build` from sample 0 of ``dataset`` (batch first)."""
    sample = dataset[0]
    missing = [n for n in names if n not in sample]
    if missing:
        raise DataError(f"net input {missing[0]!r} is not given by the {type(dataset).__name__} data set "
                        f"(it gives {', '.join(sample)})",
                        hint=f"rename a data blob with data.blobs, e.g. blobs: {{{next(iter(sample))}: {missing[0]}}}")
    return {n: (int(batch_size),) + tuple(sample[n].shape) for n in names}


def copy_trained_layers(net: torch.nn.Module, paths: Iterable[str]) -> Dict[str, int]:
    """Caffe's ``CopyTrainedLayersFrom``: copy every blob the files give (safetensors, or the
    ``.pth`` files of the models the net's ``weights_from`` names, mapped by
    :mod:`pacnet.weights`); blobs the files lack keep their initialisation, entries the net
    lacks are ignored, an entry of another shape or a file that gives nothing is an error
    (DataError naming the file).  Returns counts."""
    result = load_weights(net, [os.fspath(p) for p in paths], strict=False, allow_unused=True)
    copied = len(result.tensors)
    ignored = sum(len(f.unexpected) + len(f.ignored) for f in result.files)
    return {"copied": copied, "kept": len(net.state_dict()) - copied, "ignored": ignored}


def total_loss(net: torch.nn.Module, outputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Caffe's weighted total loss of a compiled net's outputs (``Net.total_loss``)."""
    fn = getattr(type(net), "total_loss", None) or getattr(type(net), "loss", None)
    if fn is None or not callable(fn):
        raise PacnetError("the net has no total_loss method", hint="build it with pacnet.build")
    return fn(net, outputs)


def _detach_unreached(net: torch.nn.Module, warn: bool = True) -> None:
    """Learnable blobs that no loss gradient reaches (``Net.backward_needs``) change only by
    weight decay, as in Caffe: the solver (built first) still decays them with a zero
    gradient.  Warn once, and take them out of autograd, so that DistributedDataParallel
    waits for exactly the gradients that come."""
    never = net.backward_needs.never_learn
    if not never:
        return
    if warn:
        shown = ", ".join(never[:8]) + (f", ... ({len(never) - 8} more)" if len(never) > 8 else "")
        warnings.warn(f"{net.ir.source or net.ir.name}: no loss reaches {len(never)} learnable "
                      f"blob(s), which never learn (only weight decay changes them): {shown}; "
                      f"connect them to a loss or set their lr_mult to 0", UserWarning,
                      stacklevel=3)
    for key in never:
        net.get_parameter(key).requires_grad_(False)


def _call(net: torch.nn.Module, names: Sequence[str], batch: Mapping[str, torch.Tensor], device: torch.device,
          model: Optional[torch.nn.Module] = None) -> Dict[str, torch.Tensor]:
    args = [batch[n].to(device, non_blocking=True) for n in names]
    return (model or net)(*args)


# --------------------------------------------------------------------------- evaluation


class Evaluator:
    """What a test pass measures, from the resolved ``data:`` options of its phase:
    the mean of every scalar output (losses, accuracies; Caffe's "Test net output"),
    plus the data set's metric (mIoU, RMSE, EPE) on the ``predict`` blob.  For RMSE and
    EPE also the same metric of the bilinear baseline (``bilinear_rmse``/``bilinear_epe``):
    the low-res ``target`` upsampled bilinearly to the ground truth's size and
    de-normalised like the prediction (pac.md §3 "Bilinear"); for clips, trilinearly to the
    ground truth's T x H x W, which is every frame bilinearly when T is kept."""

    def __init__(self, options: Mapping[str, Any], outputs: Sequence[str],
                 losses: Iterable[str] = (), source: Optional[str] = None) -> None:
        self.options = dict(options)
        self.source = source  # the net file, for messages
        self.kind = options.get("metric", "none")
        rename = dict(options.get("blobs") or {})
        self.key = lambda k: rename.get(k, k)
        self.scalars: Dict[str, Average] = {}
        self.metric: Any = None
        self.baseline: Any = None
        self.predict: Optional[str] = None
        if self.kind == "none":
            return
        candidates = [o for o in outputs if o not in set(losses)]
        if options.get("predict"):
            if options["predict"] not in outputs:
                raise PacnetError(f"data.predict: {options['predict']!r} is not an output of the test net",
                                  hint="outputs: " + ", ".join(outputs))
            self.predict = options["predict"]
        elif len(candidates) == 1:
            self.predict = candidates[0]
        else:
            raise PacnetError(f"cannot tell which test-net output the {self.kind} metric should read "
                              f"(outputs: {', '.join(outputs) or 'none'})",
                              hint="set data.predict to the prediction blob, or data.metric: none")
        if self.kind == "miou":
            self.metric = ConfusionMatrix(options["num_classes"], options["ignore_label"])
        elif self.kind == "rmse":
            self.metric = RMSE(border=options.get("eval_border", 0))
            self.baseline = RMSE(border=options.get("eval_border", 0))
        elif self.kind == "epe":
            self.metric = EPE(border=options.get("eval_border", 0))
            self.baseline = EPE(border=options.get("eval_border", 0))

    def reset(self) -> None:
        self.scalars = {}
        for metric in (self.metric, self.baseline):
            if metric is not None:
                metric.reset()

    def prediction(self, outputs: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The predict blob in the ground truth's space: de-normalised for depth/flow and,
        where the data resized the guide to ``factor`` times the low-res target (an image
        size that is not a multiple), resized back to the image (the original's
        ``apply_model``)."""
        pred = outputs[self.predict]
        if self.kind in ("rmse", "epe"):
            rng = batch[self.key("target_range")].to(pred.device)
            pred = self._to_image(denormalize(pred, rng), batch)
        return pred

    def _to_image(self, x: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``x`` at the guide's size, resized to the ground truth's when the two differ."""
        guide, truth = batch.get(self.key("guide")), self.truth(batch)
        if guide is None or x.shape[-2:] == truth.shape[-2:] or x.shape[-2:] != guide.shape[-2:]:
            return x
        size = tuple(x.shape[2:-2]) + tuple(truth.shape[-2:])  # a clip keeps its frames
        return F.interpolate(x, size=size, mode=_LINEAR[x.dim()], align_corners=False)

    def truth(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return batch[self.key("label" if self.kind == "miou" else "gt_raw")]

    def bilinear(self, batch: Mapping[str, torch.Tensor], size: Sequence[int]) -> Optional[torch.Tensor]:
        """The bilinear baseline in the ground truth's space: the low-res ``target`` resized
        (``F.interpolate``, align_corners=False; trilinear for clips, which keeps their
        frames) to the guide's size, or to ``size`` without a guide, de-normalised and brought
        to the image as :meth:`prediction`; None when the data gives no ``target``."""
        low = batch.get(self.key("target"))
        if low is None or low.dim() not in (4, 5):
            return None
        guide = batch.get(self.key("guide"))
        if guide is not None:
            size = tuple(size[:-2]) + tuple(guide.shape[-2:])
        up = F.interpolate(low.float(), size=tuple(size), mode=_LINEAR[low.dim()],
                           align_corners=False)
        return self._to_image(denormalize(up, batch[self.key("target_range")].to(up.device)), batch)

    def update(self, outputs: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]) -> Optional[torch.Tensor]:
        for name, value in outputs.items():
            if value.dim() == 0:
                self.scalars.setdefault(name, Average(name)).update(value)
        if self.metric is None:
            return None
        pred, truth = self.prediction(outputs, batch), self.truth(batch)
        if self.kind == "miou":
            k = self.options["num_classes"]
            if pred.dim() == 4 and pred.shape[1] > 1 and pred.shape[1] != k:
                n = pred.shape[1]
                raise ShapeError(f"the test net's prediction '{self.predict}' scores {n} classes "
                                 f"but the data set ({self.options['dataset']}) has "
                                 f"data.num_classes = {k}",
                                 location=Location(self.source) if self.source else None,
                                 hint=f"make them agree: set data.num_classes to {n} (--set "
                                      f"data.num_classes={n}), or give the net's last layer "
                                      f"num_output {k} (e.g. --var NUM_LABELS={k} where the net "
                                      "has it)")
            if pred.shape[-2:] != truth.shape[-2:]:
                raise ShapeError(f"prediction '{self.predict}' is {tuple(pred.shape[-2:])} but the labels are "
                                 f"{tuple(truth.shape[-2:])}", hint="resize the scores to the label size in "
                                 "the net (an Interp layer) before testing")
        elif pred.shape != truth.shape:
            raise ShapeError(f"prediction '{self.predict}' has shape {tuple(pred.shape)} but the ground truth "
                             f"{tuple(truth.shape)}", hint="the net's output must match the full-resolution target")
        self.metric.update(pred, truth)
        if self.baseline is not None:
            base = self.bilinear(batch, truth.shape[2:])
            if base is not None:
                self.baseline.update(base, truth)
        return pred

    def all_reduce(self) -> None:
        for avg in self.scalars.values():
            avg.all_reduce()
        for metric in (self.metric, self.baseline):
            if metric is not None:
                metric.all_reduce()

    def compute(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        for avg in self.scalars.values():
            out.update(avg.compute())
        if self.metric is not None:
            out.update(self.metric.compute())
        if self.baseline is not None and self.baseline.state[1] > 0:
            out.update({f"bilinear_{k}": v for k, v in self.baseline.compute().items()})
        return out


class ShapedNets:
    """The test net for each size of input.  A fully convolutional net meets images of many
    sizes (VOC at full size); layers such as Crop, DummyData or Reshape fix their sizes when
    the net is built, so a batch of another size gets a net built for it: on the meta
    device, its blobs then the base net's own tensors (memory shared, so weights copied
    into the base are seen), kept for the next batch of that size.  A net holding blobs
    that are not in the state_dict is built for real and synchronised before each use.

    ``build(shapes, device)`` compiles the net for ``{input: shape}``; ``base`` is the net
    built for the first sample."""

    def __init__(self, base: torch.nn.Module, build: Callable[..., torch.nn.Module]) -> None:
        self.base, self.build = base, build
        self.nets: Dict[Tuple[Tuple[str, Tuple[int, ...]], ...], Tuple[torch.nn.Module, bool]] = {}

    def __call__(self, shapes: Mapping[str, Tuple[int, ...]]) -> torch.nn.Module:
        if dict(shapes) == dict(self.base.inputs):
            return self.base
        key = tuple(sorted((k, tuple(v)) for k, v in shapes.items()))
        if key not in self.nets:
            self.nets[key] = self._built(dict(shapes))
        net, shared = self.nets[key]
        if not shared:
            net.load_state_dict(self.base.state_dict())
        return net.train(self.base.training)

    def _built(self, shapes: Dict[str, Tuple[int, ...]]) -> Tuple[torch.nn.Module, bool]:
        import itertools

        net = self.build(shapes, device="meta")
        net.load_state_dict(self.base.state_dict(), assign=True)
        if not any(t.is_meta for t in itertools.chain(net.parameters(), net.buffers())):
            return net, True
        anchor = next(itertools.chain(self.base.parameters(), self.base.buffers()), torch.empty(0))
        device = anchor.device
        return self.build(shapes, device=None).to(device), False


@torch.no_grad()
def evaluate(net: torch.nn.Module, loader: Iterable[Mapping[str, torch.Tensor]], evaluator: Evaluator,
             device: torch.device, *, max_batches: Optional[int] = None,
             on_prediction: Optional[Callable[[torch.Tensor, Mapping[str, torch.Tensor], int], None]] = None,
             distributed: bool = False, nets: Optional[ShapedNets] = None) -> Dict[str, Any]:
    """Run ``net`` in eval mode over ``loader`` (at most ``max_batches``); return the
    evaluator's results (summed over ranks when ``distributed``) with ``batches``.  A batch
    whose inputs differ in size from ``net``'s runs on ``nets(shapes)``; without ``nets``
    it is a ShapeError (a net built for one size may crop or reshape to that size)."""
    was_training = net.training
    net.eval()
    evaluator.reset()
    names = list(getattr(net, "inputs", {}))
    count = 0
    try:
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            shapes = {n: tuple(batch[n].shape) for n in names}
            model = net
            if shapes != dict(net.inputs):
                if nets is None:
                    raise ShapeError(f"batch {i} has inputs {shapes}, the net was built for "
                                     f"{dict(net.inputs)}",
                                     hint="evaluate with nets=ShapedNets(...)")
                model = nets(shapes)
            outputs = _call(model, names, batch, device)
            pred = evaluator.update(outputs, batch)
            if on_prediction is not None and pred is not None:
                on_prediction(pred, batch, i)
            count += 1
    finally:
        net.train(was_training)
    if distributed:
        evaluator.all_reduce()
    return {**evaluator.compute(), "batches": count}


# --------------------------------------------------------------------------- train


def _emit(on_event: OnEvent, record: Dict[str, Any]) -> None:
    if on_event is not None:
        on_event(record)


def _share_weights(test_net: torch.nn.Module, train_net: torch.nn.Module) -> None:
    """Caffe's ``ShareTrainedLayersWith``: the test net reads the train net's blobs."""
    src = train_net.state_dict()
    dst = test_net.state_dict()
    with torch.no_grad():
        for key, value in dst.items():
            if key in src:
                if src[key].shape != value.shape:
                    raise ShapeError(f"blob {key} is {list(src[key].shape)} in the train net but "
                                     f"{list(value.shape)} in the test net",
                                     hint="a blob must have the same shape in both phases")
                value.copy_(src[key])


def _autocast(device: torch.device, enabled: bool) -> Callable[[], Any]:
    """A factory of the forward's autocast context for ``amp``: bfloat16 on CPU and CUDA.

    bfloat16 has float32's exponent range, so losses and gradients cannot overflow and no
    GradScaler is needed (float16 would need one, and its skipped steps would break Caffe's
    one-update-per-iteration count).  GPUs without bfloat16 (before Ampere) are refused."""
    if not enabled:
        return contextlib.nullcontext
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise PacnetError(f"--amp uses bfloat16, which {torch.cuda.get_device_name(device)} does not support",
                          hint="train without --amp on this GPU")
    if device.type not in ("cpu", "cuda"):
        raise PacnetError(f"--amp is not supported on device {device.type!r}", hint="use cpu or cuda")
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def _torch_rng() -> Tuple[torch.Tensor, Optional[List[torch.Tensor]]]:
    """torch's CPU and CUDA generator states: what a forward/backward pass may draw from
    (dropout); the data stream and its augmentation have their own generators."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_torch_rng(state: Tuple[torch.Tensor, Optional[List[torch.Tensor]]]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


@contextlib.contextmanager
def _interrupts_held():
    """Hold SIGINT/SIGTERM (their Python handlers, e.g. the KeyboardInterrupt of Ctrl-C)
    until the block is done, so an interrupt never lands between updating the weights and
    counting the iteration.  Outside the main thread signals cannot arrive: no-op."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: List[Tuple[Any, Any]] = []
    saved = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(sig)
        if callable(handler):
            saved[sig] = handler
            signal.signal(sig, lambda signum, frame: held.append((signum, frame)))
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    if held:  # deliver the first one now, as if it had just arrived
        signum, frame = held[0]
        saved[signum](signum, frame)


def train(source: Any, work_dir: str, *, vars: Optional[Mapping[str, Any]] = None,
          overrides: Optional[Mapping[str, Any]] = None, device: Any = None, resume: Any = True,
          weights: Sequence[str] = (), on_event: OnEvent = None, tensorboard: Optional[bool] = None,
          argv: Optional[Sequence[str]] = None, fuse: bool = True, amp: bool = False,
          solver: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Train the net of ``source`` into ``work_dir`` (see the module docstring).

    ``resume``: True = continue from the work dir's latest checkpoint if any (refused when
    it is damaged); ``"auto"`` = from the newest intact one; False = start fresh (the work
    dir's checkpoints are kept until overwritten, its metrics are cleared); a path = resume
    from that checkpoint.  ``solver``: a ``solver:`` section replacing the net's (e.g.
    :func:`pacnet.engine.solver.read_solver_file`; ``overrides`` still apply).
    ``weights``: files to initialise from when not resuming (added to the solver's
    ``weights``; as :func:`_weights_files`, mapped by :mod:`pacnet.weights`).  ``amp``: run
    the training forward passes under bfloat16 autocast (:func:`_autocast`; the backward,
    the update and the test passes stay float32).  Returns a summary dict.
    """
    from pacnet.api import build
    from pacnet.load import apply_overrides, load

    src = None if isinstance(source, Mapping) else os.fspath(source)
    tree = load(source, vars=vars)
    if solver is not None:
        tree["solver"] = dict(solver)
    if overrides:
        apply_overrides(tree, overrides)
    config = parse_solver(tree.get("solver"), source=src)
    data = _data_section(tree, src)
    info = init_distributed()
    dev = pick_device(device, info)
    autocast = _autocast(dev, amp)
    train_opts = parse_data(data, "train", source=src)
    train_set = make_dataset(data, "train", source=src)
    names = _input_names(tree, "train", src)
    _seed_rank(config.random_seed, info)
    kw = dict(vars=vars, overrides=overrides, fuse=fuse)
    net = build(source, phase="train", inputs=batch_shapes(train_set, names, train_opts["batch_size"]), **kw).to(dev)
    names = list(net.inputs)
    solver = Solver(config, net, net.param_specs)
    _detach_unreached(net, warn=info.main)

    testing = config.test_interval > 0
    test_net = test_loader = evaluator = test_nets = None
    if testing:
        test_opts = parse_data(data, "test", source=src)
        test_set = make_dataset(data, "test", source=src)
        test_names = _input_names(tree, "test", src)
        test_net = build(source, phase="test", inputs=batch_shapes(test_set, test_names, test_opts["batch_size"]),
                         **kw).to(dev)
        test_nets = ShapedNets(test_net, lambda shapes, device: build(
            source, phase="test", inputs=shapes, device=device, **kw))
        evaluator = Evaluator(test_opts, _outputs(test_net), test_net.loss_weights, source=src)
        test_loader = make_loader(test_set, batch_size=test_opts["batch_size"], train=False, rank=info.rank,
                                  world_size=info.world_size, num_workers=test_opts["num_workers"])
    test_batches = config.test_iter[0] if config.test_iter and config.test_iter[0] > 0 else None

    wd = WorkDir(work_dir, tensorboard=tensorboard if info.main else False)
    manager = wd.checkpoints(keep_last=config.snapshot_keep)
    shape = {"world_size": info.world_size, "batch_size": train_opts["batch_size"],
             "iter_size": config.iter_size}
    position = 0
    checkpoint, state = _load_resume_point(manager, resume, net, solver, info, on_event)
    if info.main:
        previous = wd.write_config(tree, keep_previous=checkpoint is not None)
        if previous is not None:
            _warn(on_event, "the config differs from the one the run was trained with so far "
                            f"({_changes(previous[1], tree)}); the previous one is kept as "
                            f"{previous[0]}")
        wd.write_environment(argv, dev, {"world_size": info.world_size})
    if checkpoint is not None:
        position = _resumed_position(state, shape, config.random_seed, info, on_event)
        if info.main:
            wd.truncate_metrics(solver.iter - 1)  # records from iteration `iter` on came after it
        _emit(on_event, {"event": "resume", "step": solver.iter, "path": checkpoint.weights})
    else:
        if info.main:
            wd.truncate_metrics(-1)  # records of an earlier run that never reached a checkpoint
        init = list(config.weights) + [os.fspath(w) for w in weights]
        if init:
            init = _weights_files(init)  # a work dir gives its latest checkpoint
            counts = copy_trained_layers(net, init)
            _emit(on_event, {"event": "weights", "step": 0, "files": init, **counts})

    model: torch.nn.Module = net
    if info.distributed:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(net, device_ids=[dev.index] if dev.type == "cuda" else None)
    loader = make_loader(train_set, batch_size=train_opts["batch_size"], train=True, seed=train_opts["seed"],
                         shuffle=train_opts["shuffle"], start=position, rank=info.rank,
                         world_size=info.world_size, num_workers=train_opts["num_workers"],
                         pin_memory=dev.type == "cuda")
    held = _torch_rng()
    batches = iter(loader)  # draws a worker base seed from torch's generator: keep it out of the
    _set_torch_rng(held)    # training stream, or a resumed run would be one draw ahead
    _emit(on_event, {"event": "start", "step": solver.iter, "max_iter": config.max_iter, "device": str(dev),
                     "work_dir": wd.path, "params": sum(p.numel() for p in solver.params),
                     "frozen": len(solver.frozen), "world_size": info.world_size})
    last_test: Dict[str, Any] = {}
    last_checkpoint: Optional[Checkpoint] = checkpoint  # the newest one of this run so far
    finished = checkpoint is not None and solver.done
    if finished:
        _warn(on_event, f"the run already finished: iteration {solver.iter} of solver.max_iter "
                        f"{config.max_iter}; nothing to train",
              hint="raise solver.max_iter (--max-iter) to train on; 'pacnet test' evaluates it")

    def run_test() -> None:
        nonlocal last_test
        _share_weights(test_net, net)
        started = time.perf_counter()
        results = evaluate(test_net, test_loader, evaluator, dev, max_batches=test_batches,
                           distributed=info.distributed, nets=test_nets)
        results["seconds"] = round(time.perf_counter() - started, 3)
        last_test = results
        if info.main:
            wd.log(solver.iter, results, phase="test")
        _emit(on_event, {"event": "test", "step": solver.iter, **results})

    def snapshot(collective: bool = True) -> None:
        """Save a checkpoint (rank 0).  ``collective``: every rank is here, so their RNG
        states are gathered into it; off on an interrupt, where other ranks may be anywhere."""
        nonlocal last_checkpoint
        ranks = _gather_rng_states(info) if info.distributed and collective else None
        if info.main:
            last_checkpoint = manager.save(solver.iter, net, solver=solver, rng_ranks=ranks,
                                           extra={"data_position": position, **shape})
            _emit(on_event, {"event": "snapshot", "step": solver.iter, "path": last_checkpoint.weights})
        if info.distributed and collective:
            torch.distributed.barrier()

    tick, since = time.perf_counter(), solver.iter
    unfinished = None  # torch's RNG state at the start of an iteration whose update is not done yet
    try:
        while not solver.done:
            unfinished = _torch_rng()
            if testing and solver.should_test():
                run_test()
            solver.zero_grad()
            losses = []
            for k in range(config.iter_size):
                sync = model.no_sync() if info.distributed and k < config.iter_size - 1 else contextlib.nullcontext()
                with sync:
                    with autocast():
                        loss = total_loss(net, _call(net, names, next(batches), dev, model))
                    loss.backward()
                losses.append(float(loss.detach()))
            mean_loss = sum(losses) / len(losses)
            if info.distributed:  # log the global mean; every rank sees the same value below
                mean_loss = float(all_reduce_(torch.tensor([mean_loss], dtype=torch.float64))[0]) / info.world_size
            record = None
            with _interrupts_held():  # the update, the iteration count and its log record go together
                step = solver.apply(mean_loss)
                position += train_opts["batch_size"] * config.iter_size
                unfinished = None
                if math.isfinite(step.loss) and solver.should_display():
                    now = time.perf_counter()
                    record = {"loss": step.loss, "smoothed_loss": step.smoothed_loss, "lr": step.lr,
                              "seconds_per_iter": round((now - tick) / max(solver.iter - since, 1), 5)}
                    if step.grad_norm is not None:
                        record["grad_norm"] = step.grad_norm
                    tick, since = now, solver.iter
                    if info.main:
                        wd.log(step.iter, record, phase="train")
            if not math.isfinite(step.loss):
                raise PacnetError(f"the loss became {step.loss} at iteration {step.iter}",
                                  hint="lower solver.base_lr, or set solver.clip_gradients")
            _emit(on_event, {"event": "step", "step": step.iter, "loss": step.loss,
                             "smoothed_loss": step.smoothed_loss, "lr": step.lr})
            if record is not None:
                _emit(on_event, {"event": "train", "step": step.iter, **record})
            if solver.should_snapshot():
                snapshot()
        if solver.snapshot_at_end() and not finished:
            snapshot()
        if testing and solver.test_at_end() and not finished:
            run_test()
    except KeyboardInterrupt:
        # Save the last completed iteration: the unfinished one never happened (its RNG
        # draws are undone; its gradients are not in the weights; `position` excludes it).
        if unfinished is not None:
            _set_torch_rng(unfinished)
        snapshot(collective=False)  # other ranks may be stopped anywhere
        _emit(on_event, {"event": "interrupted", "step": solver.iter,
                         "path": last_checkpoint.weights if info.main and last_checkpoint else None})
        raise
    finally:
        wd.close()
    summary = {"event": "done", "step": solver.iter, "work_dir": wd.path,
               "finished_before": finished,
               "checkpoint": last_checkpoint.weights if last_checkpoint else None, "test": last_test,
               "smoothed_loss": solver.smoothed_loss}
    _emit(on_event, summary)
    return {**summary, "net": net, "solver": solver}


def _outputs(net: torch.nn.Module) -> List[str]:
    """Names of the net's output blobs, read from the generated graph's output node."""
    for node in net.graph.nodes:
        if node.op == "output":
            value = node.args[0]
            if isinstance(value, Mapping):
                return list(value)
    return []


def _seed_rank(seed: int, info: DistInfo) -> None:
    """Seed every generator of this process for ``solver.random_seed``: ``seed + rank``, so
    each DDP rank draws its own dropout masks (DDP gives every rank rank 0's initial
    weights).  Unseeded DDP ranks get fresh random seeds: torch's default seed is the same
    in every process."""
    if seed >= 0:
        seed_everything(seed + info.rank)
    elif info.distributed:
        seed_everything(int.from_bytes(os.urandom(8), "little") >> 1)


def _gather_rng_states(info: DistInfo) -> Optional[List[Dict[str, Any]]]:
    """Every rank's RNG state, in rank order, on rank 0 (None elsewhere).  A collective."""
    import torch.distributed as dist

    states: Optional[List[Any]] = [None] * info.world_size if info.main else None
    dist.gather_object(capture_rng_state(), states, dst=0)
    return states


def _load_resume_point(manager: CheckpointManager, resume: Any, net: torch.nn.Module,
                       solver: Solver, info: DistInfo,
                       on_event: OnEvent) -> Tuple[Optional[Checkpoint], Dict[str, Any]]:
    """Load the checkpoint ``resume`` names into ``net`` and ``solver``: (checkpoint, its
    training state), or (None, {}) for a new run.  ``True``: the latest checkpoint, refused
    when damaged; ``"auto"``: the newest intact one, skipping damaged ones with a warning;
    a path: that checkpoint; ``False``/``None``: none."""
    if resume in (False, None):
        return None, {}
    if resume is True or resume == "auto":
        candidates = list(reversed(manager.list()))
    else:
        path = os.fspath(resume)
        ck = manager.resolve(path)
        if not os.path.isfile(ck.state) or not os.path.isfile(ck.weights):
            raise DataError(f"checkpoint not found: {path}", hint="give a .safetensors or "
                            ".state.pt of a checkpoint with both files present")
        candidates = [ck]
    for ck in candidates:
        try:
            state = manager.load(ck, net, solver=solver, rank=info.rank, world_size=info.world_size)
        except DamagedFileError as err:
            if resume != "auto":
                raise _damaged(err, manager, named=resume is not True) from None
            _warn(on_event, f"skipping a damaged checkpoint: {err.message}")
            continue
        return ck, state
    if candidates:
        raise DataError(f"no intact checkpoint in {manager.folder}: all {len(candidates)} are "
                        "damaged", hint="start a new run in another --work-dir")
    return None, {}


def _damaged(err: DamagedFileError, manager: CheckpointManager, named: bool) -> DamagedFileError:
    """``err`` with a hint on how to go on: the newest intact checkpoint, if any."""
    if named:
        return DamagedFileError(err.message, hint="resume from another checkpoint, or with "
                                "--resume auto from the newest intact one")
    intact, _ = manager.latest_intact()
    if intact is None:
        return DamagedFileError(err.message, hint="no checkpoint is intact: start a new run in "
                                "another --work-dir")
    return DamagedFileError(err.message, hint="--resume auto continues from the newest intact "
                            f"checkpoint ({os.path.basename(intact.weights)}); or move the "
                            "damaged files away")


def _warn(on_event: OnEvent, message: str, hint: Optional[str] = None) -> None:
    _emit(on_event, {"event": "warning", "message": message, **({"hint": hint} if hint else {})})


def _data_section(tree: Mapping[str, Any], source: Optional[str]) -> Mapping[str, Any]:
    """The net's ``data:`` section; its absence is an error whose example fits the net."""
    if tree.get("data") is None:
        raise missing_section(list(tree.get("inputs") or {}), source=source)
    return tree["data"]


def _resumed_position(state: Mapping[str, Any], shape: Mapping[str, int], seed: int,
                      info: DistInfo, on_event: OnEvent) -> int:
    """This rank's position in the training stream after resuming, with warnings when the
    run goes on with another world size or global batch than it was saved with."""
    extra = state.get("extra") or {}
    position = int(extra.get("data_position", 0))
    saved_world = int(extra.get("world_size", info.world_size))
    if saved_world != info.world_size:  # the samples consumed so far, over the new ranks
        position = position * saved_world // info.world_size
    before = {k: int(extra.get(k, shape[k])) for k in shape}
    if before != dict(shape):
        def batch(d):
            return d["world_size"] * d["batch_size"] * d["iter_size"]

        _warn(on_event, f"resuming with world size {shape['world_size']}, batch_size "
                        f"{shape['batch_size']}, iter_size {shape['iter_size']} (global batch "
                        f"{batch(shape)}); the checkpoint was saved with {before['world_size']}, "
                        f"{before['batch_size']}, {before['iter_size']} (global batch "
                        f"{batch(before)}): the run goes on from the same sample but will not "
                        "match an uninterrupted one")
    if info.distributed and len(state.get("rng_ranks") or ()) != info.world_size:
        _warn(on_event, "the checkpoint holds no random state for every rank (it was saved on an "
                        "interrupt, or by another number of ranks): ranks other than 0 start new "
                        "random streams, so random layers will not repeat an uninterrupted run")
        if info.rank > 0:
            entropy = [max(seed, 0), info.rank, int(state.get("iteration", 0))]
            seed_everything(int(np.random.SeedSequence(entropy).generate_state(1)[0]))
    return position


def _changes(old: Mapping[str, Any], new: Mapping[str, Any], limit: int = 4) -> str:
    """The dotted keys whose values differ between two config trees, e.g. 'solver.base_lr'."""
    from pacnet.engine.workdir import plain

    found: List[str] = []

    def walk(a: Any, b: Any, path: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in list(a) + [k for k in b if k not in a]:
                walk(a.get(key), b.get(key), f"{path}.{key}" if path else str(key))
        elif a != b:
            found.append(path or "the whole config")

    walk(plain(old), plain(new), "")
    more = f" and {len(found) - limit} more" if len(found) > limit else ""
    return "changed: " + (", ".join(found[:limit]) + more or "formatting only")


# --------------------------------------------------------------------------- test


def _weights_files(weights: Any) -> List[str]:
    """Weights files from ``weights``: a path or a list of them, a comma-separated list, a
    checkpoint's ``.state.pt`` (its ``.safetensors``) or a work dir (its latest checkpoint)."""
    items = [weights] if isinstance(weights, (str, os.PathLike)) else list(weights)
    out = []
    for item in items:
        for path in os.fspath(item).split(","):
            path = os.path.expanduser(path.strip())
            if not path:
                continue
            if os.path.isdir(path):
                folder = path if os.path.basename(path.rstrip(os.sep)) == "checkpoints" else \
                    os.path.join(path, "checkpoints")
                ck = CheckpointManager(folder).latest()
                if ck is None:
                    raise DataError(f"no checkpoint in {folder}",
                                    hint="train first, or give a weights file")
                path = ck.weights
            elif path.endswith(".state.pt"):
                path = path[: -len(".state.pt")] + ".safetensors"
            out.append(path)
    if not out:
        raise DataError("no weights file given",
                        hint="--weights W.safetensors (or W.pth, or a work dir)")
    return out


def apply_weights(net: torch.nn.Module, weights: str) -> str:
    """Copy ``weights`` (files as for :func:`_weights_files`, mapped by :mod:`pacnet.weights`)
    into ``net``, which must find every one of its blobs there (entries it lacks, such as
    train-only blobs, are skipped); returns the files used."""
    files = _weights_files(weights)
    load_weights(net, files, strict=True, allow_unused=True)
    return ", ".join(files)


def test(source: Any, weights: Optional[str], *, vars: Optional[Mapping[str, Any]] = None,
         overrides: Optional[Mapping[str, Any]] = None, device: Any = None, split: str = "test",
         out_dir: Optional[str] = None, max_batches: Optional[int] = None, on_event: OnEvent = None,
         fuse: bool = True) -> Dict[str, Any]:
    """Evaluate ``weights`` (None = the net's own initialisation; files as for
    :func:`_weights_files`, mapped by :mod:`pacnet.weights`, every blob of the test net
    required) on the ``split`` set of the net's ``data:`` section.  ``out_dir`` also writes
    one prediction per sample: a VOC palette PNG of the argmax (cropped to ``data_dim``)
    for segmentation, ``.flo`` for flow, ``.npy`` (float32, de-normalised) for depth."""
    from pacnet.api import build
    from pacnet.load import load

    src = None if isinstance(source, Mapping) else os.fspath(source)
    tree = load(source, vars=vars, overrides=overrides)
    data = _data_section(tree, src)
    info = init_distributed()
    dev = pick_device(device, info)
    opts = parse_data(data, split, source=src)
    dataset = make_dataset(data, split, source=src)
    names = _input_names(tree, "test", src)
    kw = dict(phase="test", vars=vars, overrides=overrides, fuse=fuse)
    net = build(source, inputs=batch_shapes(dataset, names, opts["batch_size"]), **kw).to(dev)
    loaded = None if weights is None else apply_weights(net, weights)
    evaluator = Evaluator(opts, _outputs(net), net.loss_weights, source=src)
    order = list(range(info.rank, len(dataset), info.world_size))
    loader = make_loader(dataset, batch_size=opts["batch_size"], train=False, rank=info.rank,
                         world_size=info.world_size, num_workers=opts["num_workers"])
    writer = None
    if out_dir is not None:
        if evaluator.metric is None:
            raise PacnetError("writing predictions needs a metric's prediction blob",
                              hint="set data.predict (and data.metric)")
        writer = _PredictionWriter(out_dir, dataset, order, opts["batch_size"], evaluator)
    started = time.perf_counter()
    nets = ShapedNets(net, lambda shapes, device: build(source, inputs=shapes, device=device, **kw))
    results = evaluate(net, loader, evaluator, dev, max_batches=max_batches, on_prediction=writer,
                       distributed=info.distributed, nets=nets)
    results["seconds"] = round(time.perf_counter() - started, 3)
    summary = {"event": "test", "split": split, "weights": loaded, "samples": len(dataset), **results}
    if writer is not None:
        summary["written"] = writer.count
    _emit(on_event, summary)
    return summary


class _PredictionWriter:
    def __init__(self, folder: str, dataset: BlobDataset, order: List[int], batch_size: int, ev: Evaluator) -> None:
        self.folder, self.dataset, self.order, self.batch_size, self.ev = folder, dataset, order, batch_size, ev
        self.count = 0
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise OutputError(f"cannot write predictions into {folder}: it is a file, not a folder",
                              hint="give a folder (it is created if missing)")
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as err:
            raise OutputError(f"cannot create the predictions folder {folder}: "
                              f"{err.strerror or err}") from None

    def __call__(self, pred: torch.Tensor, batch: Mapping[str, torch.Tensor], i: int) -> None:
        from pacnet.engine import formats
        from pacnet.atomic import atomic_save

        for j in range(pred.shape[0]):
            index = self.order[i * self.batch_size + j]
            base = os.path.join(self.folder, self.dataset.sample_id(index))
            os.makedirs(os.path.dirname(base), exist_ok=True)
            p = pred[j].detach().float().cpu()
            if self.ev.kind == "miou":
                labels = p.argmax(0) if p.dim() == 3 and p.shape[0] > 1 else p.reshape(p.shape[-2:]).round()
                dim = batch.get(self.ev.key("data_dim"))
                if dim is not None:
                    h, w = (int(v) for v in dim[j].reshape(-1)[:2])
                    labels = labels[:h, :w]
                formats.write_label_png(base + ".png", labels.clamp(0, 255).to(torch.uint8))
            elif self.ev.kind == "epe":
                formats.write_flo(base + ".flo", p.permute(1, 2, 0).numpy())
            else:
                arr = p.numpy().astype(np.float32)
                atomic_save(base + ".npy", lambda tmp: np.save(open(tmp, "wb"), arr))
            self.count += 1


# --------------------------------------------------------------------------- time


def benchmark(net: torch.nn.Module, inputs: Mapping[str, torch.Tensor], *, iterations: int = 10,
              warmup: int = 2, backward: bool = True) -> Dict[str, Any]:
    """``caffe time``: mean milliseconds of the forward pass, the backward pass (of the
    loss, or of the sum of the outputs when the net has none), and of each layer's forward
    (by module hooks; layers run in the generated order).  ``inputs`` are on the net's device."""
    if iterations < 1 or warmup < 0:
        raise PacnetError(f"iterations must be >= 1 and warmup >= 0, got {iterations}, {warmup}")
    names = list(getattr(net, "inputs", inputs))
    args = [inputs[n] for n in names]
    device = args[0].device if args else torch.device("cpu")
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    layer_ms: Dict[str, float] = {}
    starts: Dict[str, float] = {}
    recording = [False]

    def pre(name):
        def hook(module, args_):
            if recording[0]:
                sync()
                starts[name] = time.perf_counter()
        return hook

    def post(name):
        def hook(module, args_, out):
            if recording[0]:
                sync()
                layer_ms[name] = layer_ms.get(name, 0.0) + 1000 * (time.perf_counter() - starts[name])
        return hook

    handles = []
    for name, module in net.named_children():
        handles.append(module.register_forward_pre_hook(pre(name)))
        handles.append(module.register_forward_hook(post(name)))
    has_params = any(p.requires_grad for p in net.parameters())
    backward = backward and (has_params or any(a.requires_grad for a in args))
    fwd = bwd = 0.0
    try:
        for it in range(warmup + iterations):
            recording[0] = it >= warmup
            net.zero_grad(set_to_none=True)
            sync()
            t0 = time.perf_counter()
            with torch.set_grad_enabled(backward):
                out = net(*args)
            sync()
            t1 = time.perf_counter()
            if backward:
                recording[0] = False
                loss_weights = getattr(net, "loss_weights", None)
                total = total_loss(net, out) if loss_weights else sum(v.float().sum() for v in out.values()
                                                              if v.is_floating_point())
                total.backward()
                sync()
            t2 = time.perf_counter()
            if it >= warmup:
                fwd += t1 - t0
                bwd += t2 - t1
    finally:
        for h in handles:
            h.remove()
    return {"iterations": iterations, "forward_ms": 1000 * fwd / iterations,
            "backward_ms": 1000 * bwd / iterations if backward else None,
            "layers": {k: v / iterations for k, v in layer_ms.items()}}
