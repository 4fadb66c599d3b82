"""``pacnet train NET``: train a net with its ``solver:`` section on its ``data:`` section.

    pacnet train nets/jointupsample/pac_joint_upsample_x8.yaml
    pacnet train NET --work-dir runs/a --set solver.max_iter=200 --set data.batch_size=2
    pacnet train NET --resume                    # continue from the work dir's latest checkpoint
    pacnet train NET --resume auto               # ... or the newest intact one
    pacnet train NET --weights init.safetensors  # start from weights (Caffe's -weights; .pth too)
    pacnet train NET --solver solver.prototxt    # a Caffe solver (or a YAML solver: section)
    torchrun --nproc-per-node 2 -m pacnet train NET

Everything goes to the work dir (default ``work_dirs/<net name>``): ``config.yaml``,
``environment.json``, ``metrics.jsonl``, ``tensorboard/`` and ``checkpoints/``.  A work
dir that already holds checkpoints is only continued with ``--resume``, so nothing is
overwritten by accident.  Ctrl-C or SIGTERM saves a snapshot of the last completed
iteration and exits with code 130; ``--resume`` continues from it exactly.

Output: a progress bar (loss, lr, it/s, ETA), the ``display`` records and test results
as lines, and a summary table at the end (for depth and flow nets: the net's metric
beside the bilinear baseline's).  Under torchrun only rank 0 prints.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
import threading
import time
from typing import Any, Dict, List, Mapping, Optional

from pacnet.cli.common import console as common_console
from pacnet.cli.common import description, int_at_least, parse_assignments
from pacnet.errors import PacnetError

# NVlabs/pacnet's README (Su et al., CVPR 2019, Tables 1 and 2): (bilinear, PacJointUpsample) by
# metric and factor; NYU Depth v2 RMSE in cm, Sintel (clean, val) EPE in pixels.
README_FIGURES = {("rmse", 4): (5.43, 2.39), ("rmse", 8): (8.36, 4.59), ("rmse", 16): (12.90, 8.09),
                  ("epe", 4): (0.4650, 0.1042), ("epe", 8): (0.9011, 0.2558),
                  ("epe", 16): (1.6281, 0.5921)}

# Keys of a test record that are bookkeeping, not results.
_NOT_RESULTS = ("event", "step", "batches", "seconds", "split", "weights", "samples", "written")


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a net (its solver: and data: sections) into a work dir",
                       description=description(__doc__))
    p.add_argument("net", metavar="NET", help="net file with solver: and data: sections (YAML or .prototxt)")
    p.add_argument("--work-dir", metavar="DIR", help="where the run's files go (default work_dirs/<net name>)")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--resume", nargs="?", const=True, default=None, metavar="CKPT|auto",
                       help="continue from the work dir's latest checkpoint (a new run if it "
                            "has none; refused if it is damaged), with 'auto' from the newest "
                            "intact one (damaged ones are skipped with a warning), or from the "
                            "checkpoint CKPT (.safetensors or .state.pt)")
    start.add_argument("--weights", action="append", default=[], metavar="W",
                       help="initialise from these weights: .safetensors, or .pth/.pt/.pth.tar the "
                            "net's weights_from maps (blobs matched by name, as Caffe's -weights); "
                            "repeatable or comma-separated")
    p.add_argument("--solver", metavar="FILE",
                   help="train with this solver instead of the net's solver: section: a Caffe "
                        "solver.prototxt or a YAML file with a solver: section")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override a value, e.g. solver.base_lr=0.01 or data.batch_size=2; repeatable")
    p.add_argument("--var", action="append", default=[], metavar="NAME=VALUE", dest="vars",
                   help="value of a ${NAME} template variable; repeatable")
    p.add_argument("--seed", type=int, metavar="N", help="solver.random_seed: seeds weight init and torch's, "
                   "numpy's and Python's generators (the data stream follows data.seed)")
    p.add_argument("--deterministic", action="store_true",
                   help="use deterministic torch algorithms (warn where an op has none); slower on GPUs")
    p.add_argument("--amp", action="store_true",
                   help="bfloat16 autocast around the training forward pass (CPU and CUDA)")
    p.add_argument("--device", metavar="D", help="cpu, cuda or cuda:N (default: this rank's GPU, else cpu)")
    p.add_argument("--max-iter", type=int_at_least(0), metavar="N", help="solver.max_iter")
    p.add_argument("--no-fuse", action="store_true", help="keep the graph as written (no fusion passes)")
    p.add_argument("--no-tensorboard", action="store_true", help="do not write tensorboard/ events")
    p.set_defaults(run=run)


# --------------------------------------------------------------------------- formatting (shared by test)


def fmt(value: Any) -> str:
    """A number for a table or a log line: 4 significant digits, ints as they are."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3e}"
        return f"{value:.4g}"
    return str(value)


def results(record: Mapping[str, Any]) -> Dict[str, Any]:
    """The results in a test record (metrics and scalar outputs, no per-class lists),
    with the ratio to the bilinear baseline added after each ``bilinear_<metric>``."""
    out: Dict[str, Any] = {}
    for key, value in record.items():
        if key in _NOT_RESULTS or isinstance(value, (list, tuple, dict)):
            continue
        out[key] = value
        if key.startswith("bilinear_") and isinstance(record.get(key[len("bilinear_"):]), float):
            own = record[key[len("bilinear_"):]]
            if value and math.isfinite(value):
                out[f"{key[len('bilinear_'):]}/bilinear"] = own / value
    return out


def results_line(record: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} = {fmt(v)}" for k, v in results(record).items()) or "no results"


def baseline_name(data: Mapping[str, Any]) -> str:
    """The baseline upsampling of the resolved ``data`` options: ``trilinear`` for clips
    (``synthetic_video`` without ``per_frame``; the clip length is kept, so it is bilinear
    upsampling of each frame), else ``bilinear``."""
    clips = data.get("dataset") == "synthetic_video" and not data.get("per_frame")
    return "trilinear" if clips else "bilinear"


def baseline_table(record: Mapping[str, Any], name: str, data: Mapping[str, Any], what: str):
    """A rich Table titled "``what`` vs <baseline> upsampling": the net's RMSE/EPE against
    the baseline's (:func:`baseline_name`) and, for images where the README of the PAC
    original has figures for the factor (``data``: the resolved data options), those (NYU
    v2 RMSE in cm, Sintel EPE; not for clips, which the paper has no figures of); on NYU the
    RMSE is shown in cm, as there.  None when the record has no baseline."""
    from rich.table import Table

    metric = next((m for m in ("rmse", "epe") if f"bilinear_{m}" in record and m in record), None)
    if metric is None:
        return None
    own, base = record[metric], record[f"bilinear_{metric}"]
    baseline = baseline_name(data)
    readme = README_FIGURES.get((metric, data.get("factor"))) if baseline == "bilinear" else None
    scale, unit = (100, " (cm)") if metric == "rmse" and data.get("dataset") == "nyu" else (1, "")
    table = Table(title=f"{what} vs {baseline} upsampling", header_style="bold")
    table.add_column("method")
    table.add_column(f"{metric.upper()}{unit}", justify="right")
    table.add_column(f"ratio to {baseline}", justify="right")
    if readme is not None:
        figures = "NYU v2 RMSE (cm)" if metric == "rmse" else "Sintel EPE"
        table.add_column(f"README x{data['factor']}: {figures}", justify="right")
        table.add_column("README ratio", justify="right")
    ratio = own / base if base else float("nan")
    table.add_row(baseline, fmt(scale * base), "1", *((fmt(readme[0]), "1") if readme else ()))
    table.add_row(name, fmt(scale * own), f"{ratio:.3f}",
                  *((f"{fmt(readme[1])} (PacJointUpsample)", f"{readme[1] / readme[0]:.3f}")
                    if readme else ()))
    return table


def short_openmp_spin() -> None:
    """Let idle OpenMP threads spin only briefly before sleeping (``GOMP_SPINCOUNT=10000``;
    GNU OpenMP's default is 300000) unless the user set ``GOMP_SPINCOUNT`` or
    ``OMP_WAIT_POLICY``.  torch and the Numba kernels (OpenMP threading layer) share the
    runtime; with long spins their threads fight for the cores as soon as anything else
    runs.  Training step of the x8 joint-upsampling net (batch 2, 48 x 48) on 2 shared
    cores: 70 ms default vs 70 ms short spin on an idle machine; 480 vs 240 ms beside three
    busy processes; 1.2-2.4 s default vs 0.14 s passive waiting under other engineers' test
    runs.  OpenMP reads the variables when torch loads: this only acts in a fresh process."""
    if "torch" not in sys.modules and "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", "10000")


def is_main_process() -> bool:
    """Rank 0 of a torchrun job, or a plain process."""
    return int(os.environ.get("RANK", "0") or 0) == 0


def console():
    return common_console(width=None if sys.stdout.isatty() else 120, highlight=False)


# --------------------------------------------------------------------------- progress


class _Display:
    """Turns the trainer's events into a progress bar and log lines (rank 0 only)."""

    def __init__(self, con, name: str, enabled: bool) -> None:
        self.con, self.name, self.enabled = con, name, enabled
        self.progress = None
        self.task = None
        self.start: Dict[str, Any] = {}
        self.first_step: Optional[int] = None
        self.interrupted: Optional[Dict[str, Any]] = None
        self.done: Optional[Dict[str, Any]] = None
        self.tests: List[Dict[str, Any]] = []
        self.started = time.perf_counter()

    def print(self, text: str) -> None:
        if self.enabled:
            (self.progress.console if self.progress is not None else self.con).print(text, markup=False, soft_wrap=True)

    def warn(self, text: str) -> None:
        """To stderr (a live progress bar redirects it above itself)."""
        if self.enabled:
            print(text, file=sys.stderr, flush=True)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def __call__(self, event: Dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "step":
            if self.first_step is None:
                self.first_step = event["step"]
            if self.progress is not None:
                self.progress.update(self.task, completed=event["step"] + 1, loss=fmt(event["smoothed_loss"]),
                                     lr=fmt(event["lr"]))
            return
        if kind == "warning":
            hint = f"\n  hint: {event['hint']}" if event.get("hint") else ""
            self.warn(f"warning: {event['message']}{hint}")
        elif kind == "resume":
            self.print(f"resuming from {event['path']} (iteration {event['step']})")
        elif kind == "weights":
            self.print(f"initialised from {', '.join(event['files'])}: {event['copied']} blobs copied, "
                       f"{event['kept']} kept their initialisation, {event['ignored']} ignored")
        elif kind == "start":
            self.start = dict(event)
            world = f", {event['world_size']} processes" if event.get("world_size", 1) > 1 else ""
            self.print(f"training {self.name} on {event['device']}{world}: {event['params']:,} parameters, "
                       f"iterations {event['step']} -> {event['max_iter']}, work dir {event['work_dir']}")
            self._start_progress(event["step"], event["max_iter"])
        elif kind == "train":
            extra = f", grad norm {fmt(event['grad_norm'])}" if "grad_norm" in event else ""
            self.print(f"iteration {event['step']}: loss {fmt(event['loss'])} (smoothed "
                       f"{fmt(event['smoothed_loss'])}), lr {fmt(event['lr'])}, "
                       f"{fmt(event['seconds_per_iter'])} s/iter{extra}")
        elif kind == "test":
            self.tests.append(dict(event))
            self.print(f"test at iteration {event['step']}: {results_line(event)} "
                       f"({event.get('batches', 0)} batches, {fmt(event.get('seconds', 0.0))} s)")
        elif kind == "snapshot":
            self.print(f"snapshot: {event['path']}")
        elif kind == "interrupted":
            self.interrupted = dict(event)
            self.stop()
        elif kind == "done":
            self.done = dict(event)
            self.stop()

    def _start_progress(self, step: int, total: int) -> None:
        if not self.enabled:
            return
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)
        from rich.text import Text

        class Speed(ProgressColumn):
            def render(self, task):
                return Text(f"{task.speed:.2f} it/s" if task.speed else "-- it/s")

        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("loss {task.fields[loss]}"), TextColumn("lr {task.fields[lr]}"),
                                 Speed(), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                 console=self.con, transient=False)
        self.task = self.progress.add_task("train", total=max(total, 1), completed=step, loss="--", lr="--")
        self.progress.start()


# --------------------------------------------------------------------------- run


@contextlib.contextmanager
def _sigterm_interrupts():
    """SIGTERM (a scheduler, torchrun, kill) raises KeyboardInterrupt like Ctrl-C, so the
    trainer snapshots before exiting."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _deterministic(enabled: bool):
    import torch

    if not enabled:
        yield
        return
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.benchmark)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be deterministic
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.benchmark = before[2]


def _net_name(tree: Mapping[str, Any], path: str) -> str:
    name = tree.get("name")
    if isinstance(name, str) and name.strip() and "/" not in name and name not in (".", ".."):
        return name.strip()
    return os.path.splitext(os.path.basename(path))[0]


def _data_options(tree: Mapping[str, Any], path: str) -> Dict[str, Any]:
    """The resolved test options of the net's data: section ({} when it has none)."""
    from pacnet.engine.data import parse_data

    try:
        return parse_data(tree.get("data"), "test", source=path)
    except PacnetError:
        return {}


def run(args: argparse.Namespace) -> int:
    short_openmp_spin()
    from pacnet.engine import trainer
    from pacnet.engine.checkpoint import CheckpointManager
    from pacnet.engine.solver import read_solver_file
    from pacnet.load import load

    overrides = parse_assignments(args.overrides, "--set")
    if args.seed is not None:
        overrides["solver.random_seed"] = args.seed
    if args.max_iter is not None:
        overrides["solver.max_iter"] = args.max_iter
    variables = parse_assignments(args.vars, "--var", typed=False)
    solver = read_solver_file(args.solver, variables) if args.solver else None
    tree = load(args.net, vars=variables, overrides=overrides)
    name = _net_name(tree, args.net)
    work_dir = args.work_dir or os.path.join("work_dirs", name)
    weights = [w for item in args.weights for w in item.split(",") if w]
    checkpoints = CheckpointManager(os.path.join(work_dir, "checkpoints"))
    latest = checkpoints.latest()
    if latest is not None and args.resume is None:
        raise PacnetError(f"work dir {work_dir} already holds checkpoints (latest: "
                          f"{os.path.basename(latest.weights)}); refusing to overwrite them",
                          hint="add --resume to continue that run, or give another --work-dir")
    main = is_main_process()
    con = console()
    display = _Display(con, name, enabled=main)
    if args.resume in (True, "auto") and latest is None:
        display.print(f"--resume: no checkpoint in {work_dir}, starting a new run")
    try:
        with _sigterm_interrupts(), _deterministic(args.deterministic):
            summary = trainer.train(args.net, work_dir, vars=variables, overrides=overrides, device=args.device,
                                    resume=args.resume if args.resume is not None else False, weights=weights,
                                    on_event=display, tensorboard=False if args.no_tensorboard else None,
                                    fuse=not args.no_fuse, amp=args.amp, solver=solver)
    except KeyboardInterrupt:
        display.stop()
        if main:
            path = (display.interrupted or {}).get("path")
            if path:
                print(f"interrupted at iteration {display.interrupted['step']}: snapshot {path} "
                      f"(continue with --resume)", file=sys.stderr)
            else:
                print("interrupted before training started; nothing saved", file=sys.stderr)
        return 130
    except PacnetError as err:
        display.stop()
        kept = checkpoints.latest()
        if kept is None or display.start == {}:
            raise
        # The run failed after it started: say which checkpoint is intact.
        hint = (err.hint + "; " if err.hint else "") + f"the last good checkpoint is kept: {kept.weights}"
        raise PacnetError(err.message, location=err.location, layer=err.layer, layer_type=err.layer_type,
                          hint=hint) from None
    finally:
        display.stop()
    if main:
        _summary(con, display, summary, name, _data_options(tree, args.net))
    return 0


def _summary(con, display: _Display, summary: Mapping[str, Any], name: str,
             data: Mapping[str, Any]) -> None:
    from rich.table import Table

    wall = time.perf_counter() - display.started
    first = display.first_step if display.first_step is not None else summary["step"]
    done_here = summary["step"] - first
    table = Table(title=f"{name}: training done", header_style="bold", show_header=False)
    table.add_column("what")
    table.add_column("value")
    table.add_row("iterations", f"{summary['step']} ({done_here} in this run, {wall:.1f} s wall time)")
    table.add_row("smoothed loss", fmt(summary.get("smoothed_loss")))
    table.add_row("checkpoint", str(summary.get("checkpoint") or "none (snapshot_after_train is off)"))
    table.add_row("work dir", str(summary.get("work_dir")))
    test = display.tests[-1] if display.tests else {}
    if test:
        table.add_row(f"test at iteration {test['step']}", results_line(test))
    else:
        table.add_row("test", "no test pass (set solver.test_interval, or run 'pacnet test')")
    con.print(table)
    if test:
        compare = baseline_table(test, name, data, "test set: trained net")
        if compare is not None:
            con.print(compare)
