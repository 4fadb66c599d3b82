"""Fused kernels, one folder per primitive: reference (torch), cpu (numba), cuda (numba.cuda), ops (torch.library)."""
