"""One window geometry for every spatial rank: what the fused PAC kernels index with.

The kernels are written once, for three spatial axes ``(depth, height, width)``; a 2-D call is
a 3-D one of depth 1 and a 1-D call one of depth and height 1 (kernel size, stride and
dilation 1, padding 0 on the missing axes, which then read their only plane).  Output
"rows" are the flattened ``(z, y)`` pairs ``row = z*oh + y``, so the kernels see

* ``x`` ``[B, C, *sizes]`` as ``[B, C, D*H, W]`` (input row ``q = iz*H + iy``),
* an adaptive kernel ``K`` ``[B, kc, *k, *out]`` as ``[B, kc, kd*kh*kw, od*oh, ow]``,
* an output ``[B, O, *out]`` as ``[B, O, od*oh, ow]``,

all views of contiguous tensors (no copies).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple

from .reference import out_size

Triple = Tuple[int, int, int]


def _front(values: Sequence[int], fill: int) -> Triple:
    values = tuple(int(v) for v in values)
    return (fill,) * (3 - len(values)) + values


@dataclass(frozen=True)
class Geometry:
    """A window over ``rank`` spatial axes as the kernels' 3-D tuples (see the module doc)."""

    rank: int
    ks: Triple   # kernel sizes (kd, kh, kw)
    ss: Triple   # strides
    ps: Triple   # paddings
    ds: Triple   # dilations
    ins: Triple  # input sizes (D, H, W)
    outs: Triple  # output sizes (od, oh, ow)

    @classmethod
    def of(cls, sizes: Sequence[int], kernel_size: Sequence[int], stride: Sequence[int],
           padding: Sequence[int], dilation: Sequence[int]) -> "Geometry":
        """The geometry of a window over an input of spatial ``sizes`` (``r`` values, as the
        other arguments)."""
        outs = out_size(sizes, kernel_size, stride, padding, dilation)
        return cls(len(sizes), _front(kernel_size, 1), _front(stride, 1), _front(padding, 0),
                   _front(dilation, 1), _front(sizes, 1), _front(outs, 1))

    @property
    def taps(self) -> int:
        """Taps per window, ``kd*kh*kw``."""
        return self.ks[0] * self.ks[1] * self.ks[2]

    @property
    def rows(self) -> int:
        """Output rows ``od*oh`` (each ``ow`` wide)."""
        return self.outs[0] * self.outs[1]

    @property
    def in_rows(self) -> int:
        """Input rows ``D*H`` (each ``W`` wide)."""
        return self.ins[0] * self.ins[1]

    @property
    def center(self) -> int:
        """The centre tap's flat index."""
        k = self.ks
        return ((k[0] // 2) * k[1] + k[1] // 2) * k[2] + k[2] // 2

    def band_unit(self) -> Tuple[int, int, int]:
        """How backward scatters split the output rows into bands that are race-free two
        apart: ``(rows per unit, units, minimum units per band)``.  Bands are whole
        output planes when there are several (a band then reads input planes only), else
        rows of the one plane; a band of at least the minimum never reaches the input rows
        of the band after its neighbour."""
        (kd, kh, _), (sd, sh, _), (dd, dh, _) = self.ks, self.ss, self.ds
        if self.outs[0] > 1:
            return self.outs[1], self.outs[0], (kd - 1) * dd // sd + 1
        return 1, self.outs[1], (kh - 1) * dh // sh + 1
