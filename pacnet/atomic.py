"""Write files so a crash never leaves a half-written one, with the permissions of the umask.

Every writer goes to a temp file in the destination's folder, fsyncs it, renames it onto the
destination and fsyncs the folder, so a reader sees the old file or the new one, never a
part.  The temp file is created with mode ``0o666 & ~umask`` -- what ``open()`` would give
-- rather than the 0600 of :func:`tempfile.mkstemp`, so colleagues can read a shared work dir
whenever the user's umask lets them.  A file that cannot be written (missing folder, a
folder in its place, no permission, a full disk) raises :class:`~pacnet.errors.OutputError`
naming it; the destination is left as it was.

:func:`atomic_files` stages several files and renames them together at the end, so a
command that writes two outputs (``pacnet convert``) writes both or neither.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from typing import IO, Callable, Iterator, List, Tuple

from pacnet.errors import OutputError

__all__ = ["atomic_write", "atomic_save", "atomic_files", "file_mode", "fsync_dir",
           "check_writable"]

_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    """The process umask, read without changing it where Linux shows it in /proc."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:  # elsewhere: set and restore (the only portable way to read it)
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a new regular file gets: ``0o666`` less the umask."""
    return 0o666 & ~_umask()


def fsync_dir(folder: str) -> None:
    """Make a rename in ``folder`` durable (POSIX); harmless where unsupported."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _failure(path: str, err: OSError) -> OutputError:
    reason = err.strerror or str(err)
    return OutputError(f"cannot write {path}: {reason}",
                       hint="check the folder exists, is writable and has free space")


def check_writable(path: str) -> str:
    """``path`` as an absolute path if a file can be created there; else an OutputError that
    says why (a folder in its place, a missing folder, a file where a folder should be)."""
    full = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(full):
        raise OutputError(f"cannot write {path}: it is a folder",
                          hint=f"give a file name, e.g. {os.path.join(path, 'out')}")
    folder = os.path.dirname(full)
    if not os.path.isdir(folder):
        if os.path.exists(folder):
            raise OutputError(f"cannot write {path}: {folder} is a file, not a folder")
        raise OutputError(f"cannot write {path}: folder {folder} does not exist",
                          hint=f"create it first (mkdir -p {folder}) or choose another path")
    return full


def _stage(path: str) -> Tuple[int, str, str]:
    """(fd, temp path, final path) of a new temp file beside ``path`` with the umask's mode."""
    full = check_writable(path)
    folder = os.path.dirname(full)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(full) + "-", dir=folder)
    except OSError as err:
        raise _failure(path, err) from None
    try:
        os.fchmod(fd, file_mode())
    except OSError:  # a file system without modes (e.g. some FUSE mounts): keep mkstemp's
        pass
    return fd, tmp, full


def _discard(tmp: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)


def _sync(tmp: str) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_files() -> Iterator[Callable[[str, Callable[[str], None]], None]]:
    """Stage files, then rename them all into place when the block ends without an error::

        with atomic_files() as stage:
            stage("net.yaml", lambda tmp: write_yaml(tmp))
            stage("w.safetensors", lambda tmp: write_weights(tmp))

    ``stage(path, writer)`` calls ``writer(tmp)`` to produce the file at once; on any
    exception every staged temp file is removed and no destination is touched.
    """
    staged: List[Tuple[str, str]] = []

    def stage(path: str, writer: Callable[[str], None]) -> None:
        fd, tmp, full = _stage(path)
        os.close(fd)
        staged.append((tmp, full))
        try:
            writer(tmp)
            _sync(tmp)
        except OSError as err:
            raise _failure(path, err) from None

    try:
        yield stage
        for tmp, full in staged:
            try:
                os.replace(tmp, full)
            except OSError as err:
                raise _failure(full, err) from None
        for folder in {os.path.dirname(full) for _, full in staged}:
            fsync_dir(folder)
    except BaseException:
        for tmp, _ in staged:
            _discard(tmp)
        raise


def atomic_save(path: str, writer: Callable[[str], None]) -> None:
    """Call ``writer(tmp_path)`` to produce a file, then rename it onto ``path`` atomically."""
    with atomic_files() as stage:
        stage(path, writer)


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w", encoding: str = "utf-8") -> Iterator[IO]:
    """Open a temp file next to ``path``; on success it replaces ``path`` atomically.

    On any exception the temp file is removed and ``path`` is left as it was.
    """
    fd, tmp, full = _stage(path)
    try:
        try:
            with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": encoding})) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, full)
        except OSError as err:
            raise _failure(path, err) from None
        fsync_dir(os.path.dirname(full))
    except BaseException:
        _discard(tmp)
        raise
