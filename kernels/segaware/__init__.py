"""Segmentation-aware primitives (aharley/segaware): Im2dist, Im2parity and the
normalised-filter message passing of NormConvMeanfield.

``reference`` is the plain-torch oracle, ``cpu`` the Numba CPU kernels, ``cuda`` the
Numba-CUDA kernels (imported only for CUDA tensors) and ``ops`` the ``torch.library``
custom ops with their checked entry points (:func:`~pacnet.kernels.segaware.ops.im2dist`,
:func:`~pacnet.kernels.segaware.ops.im2parity`,
:func:`~pacnet.kernels.segaware.ops.local_weighted_sum`).
"""
