"""Fused pixel-adaptive convolution (PAC) primitives.

``pac_dist`` (guide distances), ``pac_conv2d`` (pixel-adaptive cross-correlation),
``pac_conv2d_add_`` (its in-place accumulating form, for inference) and ``pac_pool2d``
(pixel-adaptive weighted sum) as ``torch.library`` custom ops (``torch.ops.pacnet.*``),
backed by Numba kernels on CPU and CUDA; see :mod:`.ops` for shapes and semantics,
:mod:`.reference` for the plain-torch oracle.  Importing this package imports torch only;
Numba is loaded on the first kernel call (numba.cuda only for CUDA tensors).
"""

from .ops import backend_for, out_size, pac_conv2d, pac_conv2d_add_, pac_dist, pac_pool2d

__all__ = ["pac_dist", "pac_conv2d", "pac_conv2d_add_", "pac_pool2d", "out_size", "backend_for"]
