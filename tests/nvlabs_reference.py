"""The original PAC models (NVlabs/pacnet), written from ../shared/specs/pac.md §2-3 as
plain torch modules with the original's module names, so their state_dicts have the
original's keys and shapes: the oracles of the zoo nets and of pacnet.weights.

Every class takes the original's constructor arguments that matter for its layout.
"""

import collections
import math

import torch
import torch.nn.functional as F
from torch import nn

from pacnet.pac import PacConvTranspose2d

# ----------------------------------------------------------------------------- joint upsampling


def fold(x):
    """N x C x H x W -> NC x 1 x H x W, and C (the original's convert_to_single_channel)."""
    n, c, h, w = x.shape
    return x.reshape(n * c, 1, h, w), c


def per_channel(x, c):
    """Repeat every sample C times along the batch (the original's repeat_for_channel)."""
    n, k, h, w = x.shape
    return x.repeat(1, c, 1, 1).reshape(n * c, k, h, w)


def unfold(x, c):
    return x.reshape(x.shape[0] // c, c, *x.shape[2:])


class PacJointUpsample(nn.Module):
    """pac.md §3: branch_t (low-res target), branch_g (guide), up_convts, branch_f."""

    def __init__(self, factor, t=(32, 32, 32), g=(32, 32), k_ch=16, f=None):
        super().__init__()
        self.factor, self.k_ch, n = factor, k_ch, int(math.log2(factor))
        f = f if f is not None else (32,) * (n + 1)

        def branch(chans):
            layers = []
            for i in range(len(chans) - 1):
                layers.append((f"conv{i + 1}", nn.Conv2d(chans[i], chans[i + 1], 5, padding=2)))
                if i < len(chans) - 2:
                    layers.append((f"relu{i + 1}", nn.ReLU()))
            return nn.Sequential(collections.OrderedDict(layers))

        self.branch_t = branch((1,) + tuple(t))
        self.branch_g = branch((3,) + tuple(g) + (k_ch * n,))
        chans = (t[-1],) + tuple(f) + (1,)
        self.up_convts = nn.ModuleList(PacConvTranspose2d(chans[i], chans[i + 1], 5, stride=2, padding=2,
                                                          output_padding=1) for i in range(n))
        self.branch_f = branch(chans[n:])

    def forward(self, target, guide):
        target, c = fold(target)
        x, g = self.branch_t(target), self.branch_g(guide)
        for i, up in enumerate(self.up_convts):
            scale = 2 ** (i + 1) / self.factor
            gi = g[:, i * self.k_ch:(i + 1) * self.k_ch]
            if scale != 1:
                gi = F.interpolate(gi, scale_factor=scale, mode="bilinear", align_corners=False)
            x = F.relu(up(x, per_channel(gi, c)))
        return unfold(self.branch_f(x), c)


def PacJointUpsampleLite(factor):
    """pac.md §3, the Lite table."""
    return {4: lambda: PacJointUpsample(4, (12, 16, 22), (12, 22), 12, (12, 16, 22)),
            8: lambda: PacJointUpsample(8, (12, 16, 16), (12, 16), 12, (12, 16, 16, 20)),
            16: lambda: PacJointUpsample(16, (8, 16, 16), (8, 16), 10, (8, 16, 16, 16, 16))}[factor]()


class DJIF(nn.Module):
    """pac.md §3 (unnamed nn.Sequentials, as the original: keys branch_t.0, .2, .4)."""

    def __init__(self, factor):
        super().__init__()
        self.factor = factor

        def branch(cin, n1, n2, pads):
            return nn.Sequential(nn.Conv2d(cin, n1, 9, padding=pads[0]), nn.ReLU(),
                                 nn.Conv2d(n1, n2, 1, padding=pads[1]), nn.ReLU(),
                                 nn.Conv2d(n2, 1, 5, padding=pads[2]))

        self.branch_t, self.branch_g = branch(1, 96, 48, (2, 2, 2)), branch(3, 96, 48, (2, 2, 2))
        self.branch_joint = branch(2, 64, 32, (4, 0, 2))

    def forward(self, target, guide):
        target, c = fold(target)
        if target.shape[-1] < guide.shape[-1]:
            target = F.interpolate(target, scale_factor=self.factor, mode="bilinear", align_corners=False)
        g = per_channel(self.branch_g(guide), c)
        return unfold(self.branch_joint(torch.cat((self.branch_t(target), g), dim=1)), c)


JOINT_MODELS = {  # zoo net -> the original's model
    **{f"jointupsample/pac_joint_upsample_x{f}": (lambda f=f: PacJointUpsample(
        f, k_ch=16, g=(32, 32))) for f in (4, 8, 16)},
    **{f"jointupsample/pac_joint_upsample_lite_x{f}": (lambda f=f: PacJointUpsampleLite(f))
       for f in (4, 8, 16)},
    **{f"jointupsample/djif_x{f}": (lambda f=f: DJIF(f)) for f in (4, 8, 16)},
}
