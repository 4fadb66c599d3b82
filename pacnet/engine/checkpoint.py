"""Checkpoints: weights as safetensors, training state via ``torch.save``, written atomically
and checksummed.

A checkpoint of iteration ``it`` is two files in the work dir's ``checkpoints/`` folder:

* ``iter_<it>.safetensors``: the net's state_dict (parameters and buffers), written by
  :func:`pacnet.tensorfile.write_safetensors` with the SHA-256 of its tensors in the metadata.
* ``iter_<it>.state.pt``: the training state -- solver (iteration, optimizer, loss window),
  RNG states of torch/CUDA/numpy/python stored as tensors (one per DDP rank), the data
  stream position and any ``extra`` -- loadable with ``torch.load(weights_only=True)``:
  plain containers, numbers, strings and tensors only, never pickled objects.  It holds the
  SHA-256 of its own content (``sha256``) and the weights file's (``weights_sha256``).

Both are written to a temp file in the same folder, fsynced and renamed into place; the
state file goes last, so a checkpoint counts only once its state file exists and a crash
mid-save leaves the previous one intact.  Loading verifies both checksums and that the two
files belong together: a damaged checkpoint is refused with a
:class:`~pacnet.errors.DataError` naming the file, never trained on.
:class:`CheckpointManager` keeps the newest ``keep_last``, finds the latest (or the newest
intact one, :meth:`CheckpointManager.latest_intact`) for resuming, and refuses files that do
not fit the net.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import zipfile
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch

from pacnet.atomic import atomic_save
from pacnet.errors import DamagedFileError, DataError, PacnetError
from pacnet.tensorfile import CHECKSUM_KEY, content_digest, read_safetensors, write_safetensors

__all__ = [
    "FORMAT", "capture_rng_state", "restore_rng_state", "seed_everything", "save_weights", "load_weights",
    "check_compatible", "save_state", "load_state", "Checkpoint", "CheckpointManager",
    "rank_rng_state",
]

FORMAT = 1  # version of the training-state layout


# --------------------------------------------------------------------------- RNG


def capture_rng_state() -> Dict[str, Any]:
    """RNG states of torch (CPU and every initialised CUDA device), numpy's global
    generator and Python's ``random``, as tensors (``weights_only``-loadable)."""
    out: Dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = [s.clone() for s in torch.cuda.get_rng_state_all()]
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    out["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    out["numpy_meta"] = torch.tensor([int(pos), int(has_gauss)], dtype=torch.int64)
    out["numpy_gauss"] = torch.tensor(float(cached), dtype=torch.float64)
    version, internal, gauss = random.getstate()
    out["python_state"] = torch.tensor(internal, dtype=torch.int64)
    out["python_meta"] = torch.tensor([int(version), int(gauss is not None)], dtype=torch.int64)
    out["python_gauss"] = torch.tensor(0.0 if gauss is None else float(gauss), dtype=torch.float64)
    return out


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Undo :func:`capture_rng_state` (CUDA states only when the device count matches)."""
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all(cuda)
    keys = state["numpy_keys"].numpy().astype(np.uint32)
    pos, has_gauss = (int(v) for v in state["numpy_meta"])
    np.random.set_state(("MT19937", keys, pos, has_gauss, float(state["numpy_gauss"])))
    version, has = (int(v) for v in state["python_meta"])
    gauss = float(state["python_gauss"]) if has else None
    random.setstate((version, tuple(int(v) for v in state["python_state"]), gauss))


def seed_everything(seed: int) -> None:
    """Seed torch (and CUDA), numpy and Python ``random`` (Caffe's ``random_seed``)."""
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- weights

# The weights of a checkpoint are a safetensors file of pacnet.tensorfile (checksummed).
save_weights = write_safetensors
load_weights = read_safetensors


def check_compatible(weights: Mapping[str, torch.Tensor], expected: Mapping[str, Any], path: str) -> None:
    """Raise a DataError naming ``path`` unless ``weights`` has exactly the names of
    ``expected`` (a state_dict, or names -> shapes) with the same shapes."""
    want = {k: tuple(v.shape) if hasattr(v, "shape") else tuple(v) for k, v in expected.items()}
    have = {k: tuple(v.shape) for k, v in weights.items()}
    missing = [k for k in want if k not in have]
    unknown = [k for k in have if k not in want]
    shapes = [k for k in want if k in have and want[k] != have[k]]
    if not (missing or unknown or shapes):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} blob(s) of the net missing ({', '.join(missing[:3])}"
                     f"{', ...' if len(missing) > 3 else ''})")
    if unknown:
        parts.append(f"{len(unknown)} not in the net ({', '.join(unknown[:3])}{', ...' if len(unknown) > 3 else ''})")
    if shapes:
        k = shapes[0]
        parts.append(f"{len(shapes)} with another shape ({k}: file {list(have[k])}, net {list(want[k])}"
                     f"{', ...' if len(shapes) > 1 else ''})")
    raise DataError(f"checkpoint {path} does not fit the net: " + "; ".join(parts),
                    hint="it was saved from a different net; use a fresh work dir, or load matching weights")


# --------------------------------------------------------------------------- training state

_CHECKSUM = "sha256"  # key of the state's own content digest (pacnet.tensorfile.content_digest)
_DAMAGED = "the file was damaged after it was written (disk, copy or transfer)"


def save_state(path: str, state: Mapping[str, Any]) -> None:
    """``torch.save`` the training state atomically (plain containers and tensors only), with
    the SHA-256 of its content under ``"sha256"``."""
    body = {k: v for k, v in state.items() if k != _CHECKSUM}
    body[_CHECKSUM] = content_digest(body)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_save(path, lambda tmp: torch.save(body, tmp))


def load_state(path: str) -> Dict[str, Any]:
    """``torch.load(weights_only=True)`` a training state and verify its checksum; DataError
    naming ``path`` if it is missing, damaged or not a pacnet state."""
    if not os.path.isfile(path):
        raise DataError(f"training state file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError,
            AttributeError, KeyError, TypeError, IndexError, UnicodeDecodeError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DamagedFileError(f"cannot read training state {path}: {first}",
                        hint="the file is damaged or was not written by pacnet") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise DataError(f"{path} is not a pacnet training state (format {FORMAT})")
    expected = state.pop(_CHECKSUM, None)
    if expected is not None and content_digest(state) != expected:
        raise DamagedFileError(f"training state {path} is corrupt: its content does not match the "
                               "SHA-256 checksum written with it", hint=_DAMAGED)
    return state


@dataclass(frozen=True)
class Checkpoint:
    """One complete checkpoint: its iteration and its two files."""

    iteration: int
    weights: str
    state: str


class CheckpointManager:
    """Save, list, prune, verify and load the checkpoints in ``folder``.

    ``keep_last`` > 0 deletes all but the newest that many after each save.
    """

    _NAME = re.compile(r"^(?P<prefix>.*?)(?P<it>\d+)\.state\.pt$")

    def __init__(self, folder: str, *, keep_last: int = 0, prefix: str = "iter_") -> None:
        self.folder, self.keep_last, self.prefix = folder, int(keep_last), prefix

    def paths(self, iteration: int) -> Checkpoint:
        base = os.path.join(self.folder, f"{self.prefix}{int(iteration):08d}")
        return Checkpoint(int(iteration), base + ".safetensors", base + ".state.pt")

    def save(self, iteration: int, model: torch.nn.Module, *, solver: Any = None,
             extra: Optional[Mapping[str, Any]] = None, rng: bool = True,
             rng_ranks: Optional[List[Mapping[str, Any]]] = None) -> Checkpoint:
        """Write the checkpoint of ``iteration`` (weights first, then the state that records
        their checksum), then prune.  ``extra`` must hold plain values/tensors (e.g.
        ``{"data_position": 1234}``).  ``rng_ranks``: the RNG state of every DDP rank, in
        rank order (this process's own is captured when ``rng``)."""
        from pacnet import __version__

        ck = self.paths(iteration)
        os.makedirs(self.folder, exist_ok=True)
        model_state = model.state_dict()
        checksum = save_weights(ck.weights, model_state, {"iteration": str(int(iteration)),
                                                          "pacnet": __version__})
        state: Dict[str, Any] = {
            "format": FORMAT, "iteration": int(iteration), "pacnet": __version__,
            "weights_sha256": checksum,
            "params": {k: list(v.shape) for k, v in model_state.items()},
            "solver": solver.state_dict() if solver is not None else None,
            "rng": capture_rng_state() if rng else None,
            "extra": dict(extra or {}),
        }
        if rng_ranks is not None:
            state["rng_ranks"] = [dict(r) for r in rng_ranks]
        save_state(ck.state, state)
        self.prune()
        return ck

    def list(self) -> List[Checkpoint]:
        """Complete checkpoints (both files present), oldest first."""
        if not os.path.isdir(self.folder):
            return []
        out = []
        for name in os.listdir(self.folder):
            m = self._NAME.match(name)
            if not m or m.group("prefix") != self.prefix:
                continue
            ck = self.paths(int(m.group("it")))
            if os.path.isfile(ck.weights) and os.path.basename(ck.state) == name:
                out.append(ck)
        return sorted(out, key=lambda c: c.iteration)

    def latest(self) -> Optional[Checkpoint]:
        found = self.list()
        return found[-1] if found else None

    def prune(self) -> List[Checkpoint]:
        """Delete all but the newest ``keep_last`` checkpoints; return the deleted ones."""
        if self.keep_last <= 0:
            return []
        old = self.list()[:-self.keep_last]
        for ck in old:
            for path in (ck.state, ck.weights):  # state first: the pair stops counting at once
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
        return old

    def read(self, checkpoint: Checkpoint | str) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
        """(weights, training state) of a checkpoint (or of a ``.safetensors``/``.state.pt``
        path of one), both verified against their checksums and against each other."""
        ck = self.resolve(checkpoint)
        state = load_state(ck.state)
        weights, meta = load_weights(ck.weights, what="checkpoint weights")
        expected = state.get("weights_sha256")
        if expected is not None and meta.get(CHECKSUM_KEY) != expected:
            raise DamagedFileError(f"{ck.weights} is not the weights file saved with {ck.state} "
                                   "(their checksums differ)",
                                   hint="one of the two was replaced; restore the pair, or resume "
                                        "from another checkpoint")
        return weights, state

    def latest_intact(self) -> Tuple[Optional[Checkpoint],
                                     List[Tuple[Checkpoint, DamagedFileError]]]:
        """The newest checkpoint whose files verify, and the newer, damaged ones (each with
        its error), newest first."""
        damaged: List[Tuple[Checkpoint, DamagedFileError]] = []
        for ck in reversed(self.list()):
            try:
                self.read(ck)
            except DamagedFileError as err:
                damaged.append((ck, err))
                continue
            return ck, damaged
        return None, damaged

    def load(self, checkpoint: Checkpoint | str, model: torch.nn.Module, *, solver: Any = None,
             restore_rng: bool = True, strict: bool = True, rank: int = 0,
             world_size: int = 1) -> Dict[str, Any]:
        """Load weights into ``model`` (and the solver state, RNG states) from a checkpoint
        (or a ``.safetensors``/``.state.pt`` path of one); return the training state.
        Refuses a damaged checkpoint, and one whose names or shapes differ from the
        model's (DataError).  Under DDP each ``rank`` restores its own RNG state when the
        checkpoint was saved by ``world_size`` ranks."""
        ck = self.resolve(checkpoint)
        weights, state = self.read(ck)
        if strict:
            check_compatible(weights, model.state_dict(), ck.weights)
        try:
            model.load_state_dict(weights, strict=strict)
        except RuntimeError as err:
            raise DataError(f"cannot load {ck.weights} into the net: {str(err).splitlines()[0]}") from None
        if solver is not None:
            if state.get("solver") is None:
                raise DataError(f"{ck.state} holds no solver state", hint="it was saved without one; "
                                "start training from its weights instead")
            try:
                solver.load_state_dict(state["solver"])
            except PacnetError as err:
                raise DataError(f"cannot resume from {ck.state}: {err.message}", hint=err.hint) from None
            except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as err:
                raise DataError(f"cannot resume from {ck.state}: the optimizer state does not fit "
                                f"({str(err).splitlines()[0] if str(err) else type(err).__name__})",
                                hint="the solver or the net changed since it was saved; use a fresh work dir") from None
        rng = rank_rng_state(state, rank, world_size)
        if restore_rng and rng:
            try:
                restore_rng_state(rng)
            except (KeyError, ValueError, TypeError, RuntimeError) as err:
                raise DataError(f"{ck.state} has a corrupt RNG state ({err})") from None
        return state

    def resolve(self, checkpoint: Checkpoint | str) -> Checkpoint:
        """The :class:`Checkpoint` of a ``.safetensors`` or ``.state.pt`` path of one."""
        if isinstance(checkpoint, Checkpoint):
            return checkpoint
        path = str(checkpoint)
        for suffix in (".safetensors", ".state.pt"):
            if path.endswith(suffix):
                base = path[: -len(suffix)]
                m = re.search(r"(\d+)$", base)
                return Checkpoint(int(m.group(1)) if m else -1, base + ".safetensors", base + ".state.pt")
        raise DataError(f"not a checkpoint file: {path}",
                        hint="give the .safetensors or .state.pt file of a checkpoint")


def rank_rng_state(state: Mapping[str, Any], rank: int = 0,
                   world_size: int = 1) -> Optional[Mapping[str, Any]]:
    """The RNG state a process of ``rank`` in ``world_size`` resumes with: its own when the
    checkpoint holds one per rank of the same world size, else the saving process's."""
    ranks = state.get("rng_ranks")
    if ranks and len(ranks) == world_size and 0 <= rank < len(ranks):
        return ranks[rank]
    return state.get("rng")
