"""pacnet: a Caffe-style declarative graph compiler for PyTorch.

Networks are YAML graphs of primitive layers; :func:`build` validates, builds the
graph, infers shapes and compiles them into a ``torch.nn.Module``.
"""

__version__ = "0.1.0"

from pacnet.errors import PacnetError  # noqa: E402

__all__ = ["PacnetError", "__version__"]
