"""pacnet: a Caffe-style declarative graph compiler for PyTorch.

Networks are YAML graphs of primitive layers (``name``, ``type``, ``bottom``, ``top``,
params); :func:`build` validates them, builds the graph, infers every blob's shape and
compiles them into a ``torch.nn.Module`` (:class:`Net`).  The PAC and dense-CRF layers are
also importable directly (``from pacnet import PacConv2d``, ``PacConv3d``).
"""

__version__ = "0.1.0"

from pacnet.errors import PacnetError, PacnetValueError  # noqa: E402

_LAZY = {
    "build": ("pacnet.api", "build"),
    "Net": ("pacnet.codegen", "Net"),
    "load_weights": ("pacnet.weights", "load_weights"),
    "PacConv2d": ("pacnet.pac", "PacConv2d"),
    "PacConvTranspose2d": ("pacnet.pac", "PacConvTranspose2d"),
    "PacPool2d": ("pacnet.pac", "PacPool2d"),
    "pacconv2d": ("pacnet.pac", "pacconv2d"),
    "pacconv_transpose2d": ("pacnet.pac", "pacconv_transpose2d"),
    "pacpool2d": ("pacnet.pac", "pacpool2d"),
    "packernel2d": ("pacnet.pac", "packernel2d"),
    "PacConv3d": ("pacnet.pac", "PacConv3d"),
    "PacConvTranspose3d": ("pacnet.pac", "PacConvTranspose3d"),
    "PacPool3d": ("pacnet.pac", "PacPool3d"),
    "pacconv3d": ("pacnet.pac", "pacconv3d"),
    "pacconv_transpose3d": ("pacnet.pac", "pacconv_transpose3d"),
    "pacpool3d": ("pacnet.pac", "pacpool3d"),
    "packernel3d": ("pacnet.pac", "packernel3d"),
    "PacCRF": ("pacnet.crf", "PacCRF"),
    "PacCRFLoose": ("pacnet.crf", "PacCRFLoose"),
    "create_YXRGB": ("pacnet.crf", "create_YXRGB"),
    "create_position_feats": ("pacnet.crf", "create_position_feats"),
    "export_onnx": ("pacnet.export", "export_onnx"),
}

__all__ = ["PacnetError", "PacnetValueError", "__version__", *_LAZY]


def __getattr__(name):
    """Import the heavy parts (torch, numba) only when first used."""
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pacnet' has no attribute {name!r}")
