"""Tensor preparation shared by the CPU and CUDA kernel wrappers."""

from __future__ import annotations

from typing import List, Optional

import torch

COMPUTE_DTYPES = (torch.float32, torch.float64)  # what the kernels compute in


def prep(*ts: Optional[torch.Tensor]) -> List[Optional[torch.Tensor]]:
    """Detached, contiguous tensors in a dtype the kernels compute in (half types -> float32);
    ``None`` stays ``None``."""
    out = []
    for t in ts:
        if t is None:
            out.append(None)
            continue
        t = t.detach()
        if t.dtype not in COMPUTE_DTYPES:
            t = t.float()
        out.append(t.contiguous())
    return out
