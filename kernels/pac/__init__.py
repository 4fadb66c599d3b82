"""Fused pixel-adaptive convolution (PAC) primitives, for 1-D, 2-D and 3-D inputs.

``pac_dist`` (guide distances), ``pac_conv`` (pixel-adaptive cross-correlation),
``pac_conv_add_`` (its in-place accumulating form, for inference) and ``pac_pool``
(pixel-adaptive weighted sum) as ``torch.library`` custom ops (``torch.ops.pacnet.*``),
backed by Numba kernels on CPU and CUDA; ``pac_conv2d``, ``pac_conv2d_add_`` and
``pac_pool2d`` are the same for 2-D inputs only.  See :mod:`.ops` for shapes and semantics,
:mod:`.reference` for the plain-torch oracle.  Importing this package imports torch only;
Numba is loaded on the first kernel call (numba.cuda only for CUDA tensors).
"""

from .ops import (RANKS, backend_for, out_size, pac_conv, pac_conv2d, pac_conv2d_add_,
                  pac_conv_add_, pac_dist, pac_pool, pac_pool2d)

__all__ = ["pac_dist", "pac_conv", "pac_conv_add_", "pac_pool", "pac_conv2d",
           "pac_conv2d_add_", "pac_pool2d", "out_size", "backend_for", "RANKS"]
