"""The kernel runtime shared by every fused primitive (PAC, segaware, the CRF through PAC).

One place decides, for every op:

* **backend** (:func:`backend`): ``PACNET_BACKEND=auto`` (or unset) runs the fused Numba
  kernels on CPU and CUDA tensors and the plain-torch reference elsewhere; ``reference``
  forces the oracle; ``numba`` forces the fused kernels (an error where none exist).
* **dtype policy** (:func:`compute_dtype`, :func:`prep`, :func:`autocast_args`): the CPU
  kernels compute in float32 or float64 (float16/bfloat16 inputs are computed in float32
  and the results cast back: Numba has no bfloat16, and a float32 GEMM with the casts was
  faster here than torch's bfloat16 GEMM, see ``docs`` in ``README``); the CUDA GEMM kernels
  keep float16/bfloat16 in their columns and GEMMs (tensor cores, float32 accumulation),
  with adaptive kernels ``K`` in float32.  Under autocast the ops follow the same policy.
* **device guard and stream** (:func:`on_device`, :func:`launch`, :func:`as_array`): CUDA
  kernels run with the tensors' device current (also on autograd's device threads) and are
  launched on torch's current stream; arrays are handed to Numba without a sync.
* **CPU threading** (:func:`parallel`, :func:`use_torch_threads`): Numba's OpenMP regions run
  on *torch's* OpenMP thread pool (see below), as many threads as ``torch.get_num_threads()``;
  small calls and calls in forked children run the serial twin of a kernel.
* **workspaces** (:func:`workspace`, :func:`row_blocks`): scratch for CUDA column tiles from
  torch's caching allocator on the current stream, bounded by :func:`workspace_limit`
  (``PACNET_WORKSPACE_MB``, default 256 MiB).  (The CPU kernels allocate cache-sized tiles
  per thread inside their parallel regions.)
* **op registration** (:func:`custom_op`): a ``torch.library`` custom op whose fake
  (meta) implementation allocates exactly what the real one returns (contiguous tensors of
  the given shapes and dtypes), with its autograd formula and autocast rule.

Threading.  torch and Numba both use GNU OpenMP, but each loads its own copy (torch ships
``torch/lib/libgomp.so.1``; Numba's ``omppool`` links the system ``libgomp.so.1.0.0``), so
a process runs two thread pools whose idle threads spin (``GOMP_SPINCOUNT``) while the other
pool works: with another process on the cores this made the PAC kernels 3-8x slower in
users' scripts.  Before Numba starts its threading layer, :func:`use_torch_threads` makes
torch's libgomp global, so Numba's ``GOMP_parallel`` calls bind to it and both share one
pool.  ``PACNET_SHARED_OPENMP=0`` turns this off; it is skipped when Numba's threads were
already started or another threading layer is chosen.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import os
import threading
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch

from pacnet.errors import PacnetValueError

__all__ = ["backend", "compute_dtype", "prep", "autocast_args", "on_device", "launch",
           "as_array", "parallel", "use_torch_threads", "workspace", "workspace_limit",
           "row_blocks", "custom_op", "FUSED_DEVICES"]

BACKEND_ENV = "PACNET_BACKEND"
BACKENDS = ("auto", "reference", "numba")
FUSED_DEVICES = ("cpu", "cuda")
HALF_DTYPES = (torch.float16, torch.bfloat16)
CPU_DTYPES = (torch.float32, torch.float64)  # what the CPU kernels compute in

# CUDA-graph capture of the Numba launches is unverified, so keep the ops out of
# torch.compile's cudagraph trees ("reduce-overhead") until it has been checked on a GPU.
TAGS = (torch.Tag.cudagraph_unsafe,)


# ----------------------------------------------------------------------------- backend

def backend(device: torch.device) -> str:
    """``'numba'`` or ``'reference'``: what runs an op on ``device`` (reads ``PACNET_BACKEND``
    at every call: ``auto`` (or unset), ``reference`` or ``numba``)."""
    raw = os.environ.get(BACKEND_ENV, "")
    choice = raw.strip().lower() or "auto"
    if choice not in BACKENDS:
        raise PacnetValueError(f"{BACKEND_ENV}={raw!r} is not a kernel backend",
                               hint="use 'auto', 'numba' or 'reference', or unset it")
    if choice == "reference":
        return "reference"
    if device.type in FUSED_DEVICES:
        return "numba"
    if choice == "numba":
        raise PacnetValueError(f"{BACKEND_ENV}=numba, but there are no fused kernels for "
                               f"device '{device.type}'",
                               hint=f"move the tensors to CPU or CUDA, or set "
                                    f"{BACKEND_ENV}=reference (or auto)")
    return "reference"


def cuda_module(family: str):
    """Import ``pacnet.kernels.<family>.cuda`` (numba.cuda is loaded only for CUDA tensors)."""
    import importlib
    try:
        return importlib.import_module(f"pacnet.kernels.{family}.cuda")
    except ImportError as exc:
        raise PacnetValueError(
            f"the CUDA kernels need numba-cuda, which cannot be imported ({exc})",
            hint=f"pip install 'numba-cuda[cu12]' (or [cu13], matching your driver), or set "
                 f"{BACKEND_ENV}=reference") from exc


# ----------------------------------------------------------------------------- dtypes

def compute_dtype(device: torch.device, dtype: torch.dtype, half_ok: bool = False
                  ) -> torch.dtype:
    """The dtype a fused kernel computes ``dtype`` inputs in: float32/float64 as given;
    float16/bfloat16 stay half where ``half_ok`` (the CUDA GEMM kernels), else float32."""
    if dtype in HALF_DTYPES and not (half_ok and device.type == "cuda"):
        return torch.float32
    return dtype


def prep(*ts: Optional[torch.Tensor], dtype: Optional[torch.dtype] = None):
    """Detached, contiguous tensors for a kernel, each in ``dtype`` if given, else in its
    :func:`compute_dtype` (half -> float32); ``None`` stays ``None``."""
    out = []
    for t in ts:
        if t is None:
            out.append(None)
            continue
        t = t.detach()
        want = dtype if dtype is not None else compute_dtype(t.device, t.dtype)
        if t.is_floating_point() and t.dtype != want:
            t = t.to(want)
        out.append(t.contiguous())
    return out


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know
        return False


def autocast_args(device_type: str, policy: Sequence[Optional[str]], args: Sequence[Any],
                  half_ok: bool = False) -> list:
    """Cast ``args`` for an op running under autocast on ``device_type``.

    ``policy[i]`` says what argument ``i`` becomes: ``'compute'`` (the autocast dtype where
    the op keeps half precision on that device (``half_ok`` and CUDA), else float32),
    ``'float32'``, or ``None`` (untouched).  Only floating tensors on that device type and not
    float64 are cast (as torch's own autocast does)."""
    half = torch.get_autocast_dtype(device_type) if half_ok and device_type == "cuda" else None
    out = []
    for rule, a in zip(policy, args):
        if (rule is not None and isinstance(a, torch.Tensor) and a.is_floating_point()
                and a.device.type == device_type and a.dtype != torch.float64):
            want = half if rule == "compute" and half is not None else torch.float32
            a = a.to(want)
        out.append(a)
    return out + list(args[len(policy):])


def autocast_public(policy: Sequence[Optional[str]], args: Sequence[Any], half_ok: bool = False
                    ) -> list:
    """:func:`autocast_args` for a public wrapper: casts only when autocast is on for the
    first tensor's device type (so the argument checks see what the op will compute in)."""
    dev = next((a.device.type for a in args if isinstance(a, torch.Tensor)), None)
    if dev in FUSED_DEVICES and _autocast_on(dev):
        return autocast_args(dev, policy, args, half_ok)
    return list(args)


# ----------------------------------------------------------------------------- CUDA plumbing

def simulator() -> bool:
    """Whether Numba's CUDA simulator is on (``NUMBA_ENABLE_CUDASIM=1``, read by numba at
    import): then the "CUDA" kernels take CPU tensors, as the tests run them."""
    import numba
    return bool(numba.config.ENABLE_CUDASIM)


def on_device(fn: Callable) -> Callable:
    """Run ``fn`` with its first tensor argument's GPU current, so that Numba wraps the
    tensors and launches in that device's (primary) context, also from autograd's threads
    (Numba falls back to GPU 0 otherwise).  A no-op for CPU tensors (and the simulator)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        dev = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
        if dev is None or dev.type != "cuda":
            return fn(*args, **kwargs)
        with torch.cuda.device(dev):
            return fn(*args, **kwargs)
    return wrapper


def as_array(t: torch.Tensor):
    """A Numba view of a contiguous tensor: a NumPy array for CPU tensors (and under the
    simulator), a device array without a stream sync for CUDA tensors.  bfloat16 tensors
    are viewed as int16 (their bits; Numba has no bfloat16 arrays)."""
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    if t.device.type == "cpu":
        return t.detach().numpy()
    from numba import cuda
    return cuda.as_cuda_array(t.detach(), sync=False)


_streams: Dict[int, Any] = {}


def launch(kernel, grid, block, device: torch.device, *args) -> None:
    """Launch a ``numba.cuda`` kernel on torch's current stream of ``device`` (the caller
    holds the device current, see :func:`on_device`).  An empty grid launches nothing; a
    CUDA error names the kernel and the grid."""
    grid = tuple(grid) if isinstance(grid, (tuple, list)) else (grid,)
    if min(grid) <= 0:
        return
    if device.type != "cuda":  # the simulator
        kernel[grid, block](*args)
        return
    from numba import cuda
    ptr = torch.cuda.current_stream(device).cuda_stream
    stream = _streams.get(ptr)
    if stream is None:
        stream = _streams[ptr] = cuda.external_stream(ptr)
    try:
        kernel[grid, block, stream](*args)
    except Exception as exc:  # noqa: BLE001 - re-raised with the kernel named
        name = getattr(kernel, "__name__", None) or getattr(getattr(kernel, "py_func", None),
                                                            "__name__", "kernel")
        raise RuntimeError(f"pacnet CUDA kernel {name} (grid {grid}, block {block}) failed: "
                           f"{exc}") from exc


# ----------------------------------------------------------------------------- CPU threads

# Below this many multiply-adds a CPU call runs on one thread: waking the thread pool costs
# more than it saves (and much more on a busy machine).  Tests set it to 0 to exercise the
# parallel drivers on small inputs.
PARALLEL_MIN_WORK = 1 << 17

# With GNU OpenMP, a process forked after the parent ran a parallel kernel aborts ("fork()
# called from a process already using GNU OpenMP") as soon as it enters a parallel region;
# fork-based DataLoader workers do exactly that.  In a forked child the serial twins run.
_PID = os.getpid()
_threads_lock = threading.Lock()
_shared_openmp: Optional[bool] = None


def use_torch_threads() -> bool:
    """Make Numba's OpenMP regions run on torch's OpenMP pool (see the module docstring), if
    Numba's threading layer has not started yet.  Returns whether the pool is shared."""
    global _shared_openmp
    if _shared_openmp is not None:
        return _shared_openmp
    with _threads_lock:
        if _shared_openmp is None:
            _shared_openmp = _share_torch_openmp()
    return _shared_openmp


def _share_torch_openmp() -> bool:
    if os.environ.get("PACNET_SHARED_OPENMP", "1").strip() == "0":
        return False
    from numba.core import config
    from numba.np.ufunc import parallel as numba_parallel
    if numba_parallel._is_initialized:
        return False  # the user's own Numba code started its pool already
    layer = str(config.THREADING_LAYER).lower()
    if layer not in ("default", "omp", "safe", "forksafe", "threadsafe"):
        return False
    libs = sorted(glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib",
                                         "libgomp*.so*")))
    if not libs:
        return False  # torch uses another OpenMP (or the system's libgomp, shared anyway)
    try:
        ctypes.CDLL(libs[0], mode=ctypes.RTLD_GLOBAL)
    except OSError:
        return False
    return True


def parallel(work: int) -> bool:
    """Whether a CPU call of ``work`` multiply-adds runs its parallel driver (with Numba's
    thread count set to torch's); ``False`` for small calls, one thread, forked children."""
    if work < PARALLEL_MIN_WORK or os.getpid() != _PID:
        return False
    n = torch.get_num_threads()
    if n <= 1:
        return False
    use_torch_threads()
    import numba
    n = min(n, numba.config.NUMBA_NUM_THREADS)
    if numba.get_num_threads() != n:
        numba.set_num_threads(n)
    return n > 1


def threads() -> int:
    """Threads a parallel CPU driver runs on (torch's count, capped by Numba's pool)."""
    import numba
    return max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))


def pick(work: int, parallel_fn, serial_fn):
    """``parallel_fn`` when :func:`parallel` says so for ``work``, else ``serial_fn``."""
    return parallel_fn if parallel(work) else serial_fn


# ----------------------------------------------------------------------------- workspaces

_DEFAULT_CUDA_WORKSPACE = 256 << 20


def workspace_limit() -> int:
    """Bytes of column scratch one CUDA call may use: ``PACNET_WORKSPACE_MB`` (MiB) if set,
    else 256 MiB.  (The CPU kernels use cache-sized blocks of their own.)"""
    raw = os.environ.get("PACNET_WORKSPACE_MB", "").strip()
    if not raw:
        return _DEFAULT_CUDA_WORKSPACE
    try:
        mb = float(raw)
    except ValueError:
        mb = -1.0
    if not mb > 0:
        raise PacnetValueError(f"PACNET_WORKSPACE_MB={raw!r} is not a positive number",
                               hint="e.g. PACNET_WORKSPACE_MB=256, or unset it")
    return max(1, int(mb * (1 << 20)))


def row_blocks(B: int, R: int, rows: int, cols: int, itemsize: int, limit: int):
    """Tiles of a ``[B, R, rows, cols]`` column tensor that fit ``limit`` bytes: groups of
    whole images, or bands of rows of one image.  Returns the tiles ``(b0, nb, row0, nrows)``
    (in order, covering everything once) and the elements one tile needs at most."""
    image = R * rows * cols * itemsize
    if image <= limit:
        nb = max(1, min(B, limit // max(1, image)))
        return [(b0, min(nb, B - b0), 0, rows) for b0 in range(0, B, nb)], nb * R * rows * cols
    n = max(1, min(rows, limit // max(1, R * cols * itemsize)))
    return ([(b, 1, r0, min(n, rows - r0)) for b in range(B) for r0 in range(0, rows, n)],
            R * n * cols)


def workspace(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A ``numel``-element CUDA scratch tensor: a fresh block from torch's caching allocator on
    the current stream (freed to the cache when the caller drops it); raises torch's
    ``OutOfMemoryError``, which callers answer by shrinking their tiles."""
    return torch.empty(numel, dtype=dtype, device=device)


# ----------------------------------------------------------------------------- op registration

def custom_op(name: str, fn: Callable, *, fake: Callable, mutates_args: Sequence[str] = (),
              autograd: Optional[Tuple[Callable, Callable]] = None,
              autocast: Optional[Sequence[Optional[str]]] = None, half_ok: bool = False):
    """Register ``pacnet::<name>`` (``fn`` is its real implementation, annotated as
    ``torch.library.custom_op`` needs).

    ``fake(*args)`` returns, for each output, ``(shape, dtype, device_like)`` -- or a list
    of them, or ``None`` for an op that returns nothing.  The fake allocates contiguous
    tensors of exactly those, and the real op's outputs are made contiguous too, so their
    strides always agree (``torch.compile`` checks them).  ``autograd`` is ``(backward,
    setup_context)``; ``autocast`` the per-argument policy of :func:`autocast_args`, applied
    on CPU and CUDA."""
    def real(*args):
        out = fn(*args)
        if isinstance(out, torch.Tensor):
            return out.contiguous()
        if isinstance(out, tuple):
            return tuple(o.contiguous() for o in out)
        return out

    schema = torch.library.infer_schema(fn, mutates_args=tuple(mutates_args))
    op = torch.library.custom_op(f"pacnet::{name}", mutates_args=tuple(mutates_args),
                                 tags=TAGS, schema=schema)(real)

    @op.register_fake
    def _fake(*args):
        spec = fake(*args)
        if spec is None:
            return None
        if isinstance(spec, list):
            return tuple(_alloc(s) for s in spec)
        return _alloc(spec)

    if autograd is not None:
        op.register_autograd(autograd[0], setup_context=autograd[1])
    if autocast is not None:
        for dev in FUSED_DEVICES:
            _register_autocast(op, dev, tuple(autocast), half_ok)
    return op


def _alloc(spec) -> torch.Tensor:
    shape, dtype, like = spec
    return like.new_empty(tuple(shape), dtype=dtype)


def _register_autocast(op, device_type: str, policy, half_ok: bool) -> None:
    key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    dispatch_key = getattr(torch._C.DispatchKey, key)

    def kernel(_, *args):
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(dispatch_key)):
            return op._opoverload(*autocast_args(device_type, policy, args, half_ok))

    op._lib.impl(op._name, kernel, key, with_keyset=True)
