"""A run's work dir (detectron2/mmseg style): everything about one run in one folder.

::

    <work_dir>/
      config.yaml        the resolved net config (after _base_, ${VARS}, --set), as run
      config.<time>.yaml an earlier config.yaml, kept when a resumed run changed it
      environment.json   versions, device, command line, start time
      metrics.jsonl      one JSON object per line: {"step", "phase", "time", <metric>: value, ...}
      tensorboard/       the same scalars as TensorBoard events (when tensorboard is installed)
      checkpoints/       iter_<it>.safetensors + iter_<it>.state.pt (pacnet.engine.checkpoint)

The library writes data; printing stays in the CLI.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import sys
import time
from types import MappingProxyType
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from pacnet.atomic import atomic_write
from pacnet.engine.checkpoint import CheckpointManager
from pacnet.errors import DataError, PacnetError

__all__ = ["WorkDir", "plain", "environment"]


def plain(value: Any) -> Any:
    """A YAML/JSON-safe copy: mappings -> dict, tuples/lists -> list, tensors/numpy scalars
    -> numbers or lists, other objects -> str."""
    if isinstance(value, (Mapping, MappingProxyType)):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if hasattr(value, "tolist"):  # torch / numpy
        return plain(value.tolist())
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def _version(dist: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:  # noqa: BLE001 - any failure means "unknown"
        return None


_THREADING_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS", "NUMBA_THREADING_LAYER",
                  "GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "OMP_DYNAMIC", "MKL_DYNAMIC", "MKL_CBWR")


def _numba_threads() -> Optional[int]:
    try:
        import numba

        return int(numba.get_num_threads())
    except Exception:  # noqa: BLE001 - numba absent or its threading layer unavailable
        return None


def environment(argv: Optional[Sequence[str]] = None, device: Any = None,
                extra: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Versions and devices of this run (a plain dict)."""
    import numpy
    import torch

    from pacnet import __version__

    env: Dict[str, Any] = {
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "argv": list(sys.argv if argv is None else argv),
        "pacnet": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "numba": _version("numba"),
        "cuda_available": torch.cuda.is_available(),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": str(device) if device is not None else None,
        "threads": torch.get_num_threads(),
        # what decides the order of parallel reductions, for comparing runs bit for bit
        "numba_threads": _numba_threads(),
        "threading_env": {k: os.environ[k] for k in _THREADING_ENV if k in os.environ},
    }
    if torch.cuda.is_available():
        env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    env.update(plain(dict(extra or {})))
    return env


class WorkDir:
    """The folder of one run.  ``tensorboard``: True = required, False = off, None = use
    it when installed.  Use as a context manager (or call :meth:`close`)."""

    def __init__(self, path: str, *, tensorboard: Optional[bool] = None, create: bool = True) -> None:
        self.path = os.path.abspath(os.path.expanduser(str(path)))
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise DataError(f"work dir {self.path} exists and is not a folder")
        if create:
            try:
                os.makedirs(self.checkpoint_dir, exist_ok=True)
            except OSError as err:
                raise DataError(f"cannot create work dir {self.path}: {err.strerror or err}") from None
        elif not os.path.isdir(self.path):
            raise DataError(f"work dir not found: {self.path}")
        self._tb_wanted = tensorboard
        self._tb = None

    # -- layout -------------------------------------------------------------------------

    @property
    def checkpoint_dir(self) -> str:
        return os.path.join(self.path, "checkpoints")

    @property
    def config_path(self) -> str:
        return os.path.join(self.path, "config.yaml")

    @property
    def environment_path(self) -> str:
        return os.path.join(self.path, "environment.json")

    @property
    def metrics_path(self) -> str:
        return os.path.join(self.path, "metrics.jsonl")

    def checkpoints(self, keep_last: int = 0) -> CheckpointManager:
        return CheckpointManager(self.checkpoint_dir, keep_last=keep_last)

    # -- files --------------------------------------------------------------------------

    def write_config(self, config: Mapping[str, Any], *, keep_previous: bool = False
                     ) -> Optional[Tuple[str, Dict[str, Any]]]:
        """Write the resolved config as YAML (atomically).  With ``keep_previous`` (a resumed
        run), a config.yaml that differs is first renamed to ``config.<its time>.yaml``;
        returns (that path, the previous config) when it was, else None."""
        import yaml

        text = yaml.safe_dump(plain(config), sort_keys=False, default_flow_style=None)
        kept = None
        if keep_previous and os.path.isfile(self.config_path):
            old = self.read_config()
            if old != yaml.safe_load(text):
                written = _dt.datetime.fromtimestamp(os.stat(self.config_path).st_mtime)
                stamp = written.strftime("%Y%m%d-%H%M%S")
                target = os.path.join(self.path, f"config.{stamp}.yaml")
                n = 1
                while os.path.exists(target):
                    n += 1
                    target = os.path.join(self.path, f"config.{stamp}-{n}.yaml")
                os.replace(self.config_path, target)
                kept = (target, old)
        with atomic_write(self.config_path) as f:
            f.write(text)
        return kept

    def read_config(self) -> Dict[str, Any]:
        import yaml

        if not os.path.isfile(self.config_path):
            raise DataError(f"no config in work dir: {self.config_path} is missing")
        try:
            with open(self.config_path, encoding="utf-8") as f:
                return yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as err:
            raise DataError(f"cannot read {self.config_path}: {err}") from None

    def write_environment(self, argv: Optional[Sequence[str]] = None, device: Any = None,
                          extra: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
        env = environment(argv, device, extra)
        with atomic_write(self.environment_path) as f:
            json.dump(env, f, indent=2)
            f.write("\n")
        return env

    # -- metrics ------------------------------------------------------------------------

    def log(self, step: int, values: Mapping[str, Any], phase: str = "train") -> Dict[str, Any]:
        """Append one record to metrics.jsonl (and TensorBoard scalars ``<phase>/<name>``).
        Non-finite numbers are written as null (JSON has no NaN)."""
        record: Dict[str, Any] = {"step": int(step), "phase": phase, "time": round(time.time(), 3)}
        for key, value in plain(dict(values)).items():
            if isinstance(value, float) and not math.isfinite(value):
                value = None
            record[key] = value
        line = json.dumps(record, allow_nan=False)
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
        writer = self._writer()
        if writer is not None:
            for key, value in record.items():
                if key not in ("step", "phase", "time") and isinstance(value, (int, float)) \
                        and not isinstance(value, bool):
                    writer.add_scalar(f"{phase}/{key}", value, int(step))
            writer.flush()
        return record

    def read_metrics(self, phase: Optional[str] = None) -> List[Dict[str, Any]]:
        """The records of metrics.jsonl (of one ``phase``); a torn last line is skipped."""
        if not os.path.isfile(self.metrics_path):
            return []
        out = []
        with open(self.metrics_path, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a crash mid-write leaves a partial line
                if isinstance(rec, dict) and (phase is None or rec.get("phase") == phase):
                    out.append(rec)
        return out

    def truncate_metrics(self, after_step: int) -> int:
        """Drop records with ``step > after_step`` (left by a run that crashed after its
        last checkpoint), so a resumed run does not log them twice.  Returns how many."""
        records = self.read_metrics()
        keep = [r for r in records if int(r.get("step", 0)) <= after_step]
        if len(keep) == len(records) and os.path.isfile(self.metrics_path):
            with open(self.metrics_path, encoding="utf-8") as f:
                if sum(1 for _ in f) == len(records):
                    return 0
        with atomic_write(self.metrics_path) as f:
            for rec in keep:
                f.write(json.dumps(rec, allow_nan=False) + "\n")
        return len(records) - len(keep)

    def _writer(self):
        if self._tb is not None or self._tb_wanted is False:
            return self._tb
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            if self._tb_wanted:
                raise PacnetError("TensorBoard logging needs the tensorboard package",
                                  hint="pip install tensorboard, or turn TensorBoard logging off") from None
            self._tb_wanted = False
            return None
        self._tb = SummaryWriter(os.path.join(self.path, "tensorboard"))
        return self._tb

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> "WorkDir":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
