"""Readers and writers of the file formats the data sets use.

Every reader raises :class:`~pacnet.errors.DataError` naming the file when it is missing,
unreadable, corrupt or truncated; nothing here lets a bad file end in a traceback.

* images (JPEG/PNG, via Pillow): :func:`read_image` -> ``H x W x 3`` uint8, RGB;
* label maps (palette or grayscale PNG): :func:`read_label_png` -> ``H x W`` uint8 indices;
  :func:`write_label_png` writes one with the PASCAL VOC palette (:func:`voc_palette`);
* Middlebury ``.flo`` optical flow (Sintel): :func:`read_flo` / :func:`write_flo`,
  ``H x W x 2`` float32 (u, v);
* MATLAB ``.mat`` files: :func:`mat_kind` tells v4/v5 from v7.3 (HDF5);
  :func:`load_mat` reads v4/v5 with scipy; :func:`open_mat_hdf5` opens v7.3 with h5py.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Iterable, List, Optional, Sequence

import numpy as np

from pacnet.errors import DataError

__all__ = [
    "read_image", "read_label_png", "write_label_png", "voc_palette", "read_flo", "write_flo",
    "FLO_MAGIC", "mat_kind", "load_mat", "open_mat_hdf5", "require_file",
]

FLO_MAGIC = 202021.25  # the float32 tag at the start of every Middlebury .flo file
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def require_file(path: str, what: str = "file", hint: Optional[str] = None) -> str:
    """Return ``path`` if it is a readable file, else raise a DataError naming it."""
    if not os.path.exists(path):
        raise DataError(f"{what} not found: {path}", hint=hint)
    if not os.path.isfile(path):
        raise DataError(f"{what} is not a file: {path}", hint=hint)
    return path


# --------------------------------------------------------------------------- images


def _open_pil(path: str, what: str):
    from PIL import Image, UnidentifiedImageError

    require_file(path, what)
    try:
        img = Image.open(path)
        img.load()  # decode now: a truncated file fails here, not later in a worker
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"cannot read {what} {path}: {err}",
                        hint="the file is corrupt or not an image; re-extract the data set") from None
    return img


def read_image(path: str) -> np.ndarray:
    """An image file as ``H x W x 3`` uint8 RGB (grayscale and palette images are expanded)."""
    img = _open_pil(path, "image")
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8).copy()


def read_label_png(path: str) -> np.ndarray:
    """A label map as ``H x W`` uint8 class indices.

    Palette PNGs (VOC ``SegmentationClass``) give their palette indices; grayscale PNGs
    (``SegmentationClassAug``) give their values.  A colour (RGB) label image is refused:
    its colours are not indices.
    """
    img = _open_pil(path, "label image")
    if img.mode in ("P", "L"):
        return np.asarray(img, dtype=np.uint8).copy()
    if img.mode in ("I", "I;16", "I;16B", "I;16L"):
        arr = np.asarray(img)
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise DataError(f"label image {path} holds values outside 0..255 "
                            f"({int(arr.min())}..{int(arr.max())})")
        return arr.astype(np.uint8)
    raise DataError(f"label image {path} is {img.mode}, not a palette or grayscale PNG",
                    hint="label maps must store class indices (VOC SegmentationClass palette PNGs "
                         "or SegmentationClassAug grayscale PNGs), not colours")


def voc_palette(n: int = 256) -> List[int]:
    """The PASCAL VOC colour map (``VOCdevkit`` ``labelcolormap``), flat [r, g, b, ...] of
    ``n`` entries: class 0 black, 1 (128, 0, 0), 2 (0, 128, 0), ..., 255 (224, 224, 192)."""
    palette = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def write_label_png(path: str, labels: Any, palette: Optional[Sequence[int]] = None) -> None:
    """Write an ``H x W`` map of class indices (0..255) as a palette PNG (VOC colours by
    default), atomically.  Accepts a numpy array or a tensor (``1 x H x W`` allowed)."""
    from PIL import Image

    from pacnet.atomic import atomic_save

    arr = labels.detach().cpu().numpy() if hasattr(labels, "detach") else np.asarray(labels)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise DataError(f"a label map must be H x W, got shape {tuple(arr.shape)} for {path}")
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise DataError(f"label values must be in 0..255 to write {path}, got {arr.min()}..{arr.max()}")
    img = Image.fromarray(arr.astype(np.uint8), mode="P")
    pal = list(palette) if palette is not None else voc_palette()
    img.putpalette(pal + [0] * (768 - len(pal)))
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    atomic_save(path, lambda tmp: img.save(tmp, format="PNG"))


# --------------------------------------------------------------------------- .flo


def read_flo(path: str) -> np.ndarray:
    """A Middlebury ``.flo`` file as ``H x W x 2`` float32 (u, v).

    Layout: float32 magic 202021.25, int32 width, int32 height, then ``H*W*2`` float32
    little-endian, u and v interleaved row by row.
    """
    require_file(path, "flow file")
    try:
        with open(path, "rb") as f:
            header = f.read(12)
            data = f.read()
    except OSError as err:
        raise DataError(f"cannot read flow file {path}: {err}") from None
    if len(header) < 12:
        raise DataError(f"flow file {path} is truncated: {len(header)} bytes, the header alone is 12")
    magic = np.frombuffer(header[:4], "<f4")[0]
    if magic != np.float32(FLO_MAGIC):
        raise DataError(f"{path} is not a .flo file: magic number {magic!r}, expected {FLO_MAGIC}",
                        hint="the file is corrupt or in another flow format")
    width, height = (int(v) for v in np.frombuffer(header[4:12], "<i4"))
    if not (0 < width < 100000 and 0 < height < 100000):
        raise DataError(f"flow file {path} has an invalid size {width} x {height}")
    need = width * height * 2 * 4
    if len(data) < need:
        raise DataError(f"flow file {path} is truncated: {len(data)} bytes of flow, "
                        f"{need} needed for {width} x {height}")
    if len(data) > need:
        raise DataError(f"flow file {path} has {len(data) - need} bytes after the flow data",
                        hint="the header's size does not match the file; it is corrupt")
    return np.frombuffer(data, "<f4").reshape(height, width, 2).astype(np.float32)


def write_flo(path: str, flow: Any) -> None:
    """Write ``H x W x 2`` (u, v) flow as a Middlebury ``.flo`` file (atomically)."""
    from pacnet.atomic import atomic_write

    arr = np.asarray(flow, dtype="<f4")
    if arr.ndim != 3 or arr.shape[2] != 2:
        raise DataError(f"flow must be H x W x 2 to write {path}, got shape {arr.shape}")
    with atomic_write(path, "wb") as f:
        f.write(np.array([FLO_MAGIC], "<f4").tobytes())
        f.write(np.array([arr.shape[1], arr.shape[0]], "<i4").tobytes())
        f.write(np.ascontiguousarray(arr).tobytes())


# --------------------------------------------------------------------------- .mat


def mat_kind(path: str) -> str:
    """``"hdf5"`` for MATLAB v7.3 files (HDF5 inside, readable with h5py), ``"v5"`` for
    v5/v7 (and ``"v4"`` for v4) files readable with ``scipy.io.loadmat``."""
    require_file(path, "MAT file")
    try:
        with open(path, "rb") as f:
            head = f.read(520)
    except OSError as err:
        raise DataError(f"cannot read MAT file {path}: {err}") from None
    if head[512:520] == _HDF5_SIGNATURE or head[:8] == _HDF5_SIGNATURE:
        return "hdf5"
    if head[:6] == b"MATLAB" or len(head) < 128:
        return "v5"
    return "v4"


def load_mat(path: str, variables: Optional[Iterable[str]] = None) -> Dict[str, Any]:
    """Read a v4/v5/v7 MAT file with scipy (``variables`` limits what is read)."""
    try:
        import scipy.io
    except ImportError:
        raise DataError(f"reading {path} needs scipy, which is not installed",
                        hint="pip install scipy") from None
    if mat_kind(path) == "hdf5":
        raise DataError(f"{path} is a MATLAB v7.3 (HDF5) file; open it with open_mat_hdf5")
    names = list(variables) if variables is not None else None
    try:
        out = scipy.io.loadmat(path, variable_names=names)
    except (ValueError, TypeError, OSError, EOFError, NotImplementedError, MemoryError,
            IndexError, KeyError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read MAT file {path}: {err or type(err).__name__}",
                        hint="the file is corrupt or truncated; re-download it") from None
    if names:
        missing = [n for n in names if n not in out]
        if missing:
            have = sorted(k for k in out if not k.startswith("__"))
            raise DataError(f"MAT file {path} has no variable {missing[0]!r}",
                            hint="it holds: " + (", ".join(have) or "nothing"))
    return out


def open_mat_hdf5(path: str):
    """Open a MATLAB v7.3 file with h5py (read-only).  Arrays come out with MATLAB's
    dimensions reversed (column-major storage): ``H x W x 3 x N`` reads as ``N x 3 x W x H``."""
    try:
        import h5py
    except ImportError:
        raise DataError(f"{path} is a MATLAB v7.3 (HDF5) file and reading it needs h5py, "
                        "which is not installed",
                        hint="pip install h5py, or save the file as v7 "
                             "(MATLAB: save(name, '-v7')) so scipy can read it") from None
    require_file(path, "MAT file")
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise DataError(f"cannot open MAT v7.3 file {path}: {err}",
                        hint="the file is corrupt or truncated; re-download it") from None
