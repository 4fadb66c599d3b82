"""The original PAC models (NVlabs/pacnet), written from ../shared/specs/pac.md §2-3 as
plain torch modules with the original's module names, so their state_dicts have the
original's keys and shapes: the oracles of the zoo nets and of pacnet.weights.

Every class takes the original's constructor arguments that matter for its layout; the
FCN backbones also take ``widths`` (the 13 VGG convolutions and fc6/fc7) so forward tests
can run at a small size, with the real layout's keys.
"""

import collections
import math

import torch
import torch.nn.functional as F
from torch import nn

from pacnet.crf import PacCRF, PacCRFLoose, create_position_feats, create_YXRGB
from pacnet.pac import PacConv2d, PacConvTranspose2d

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

# ----------------------------------------------------------------------------- FCN-8s

VGG = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512, 4096, 4096)
VGG_NAMES = ("conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3", "conv4_1",
             "conv4_2", "conv4_3", "conv5_1", "conv5_2", "conv5_3", "fc6", "fc7")


def upsampling_weight(c, k):
    """The bilinear kernel on the diagonal of a c x c x k x k blob (pytorch-fcn)."""
    factor = (k + 1) // 2
    center = factor - 1 if k % 2 == 1 else factor - 0.5
    og = torch.arange(k, dtype=torch.float64)
    filt = (1 - (og - center).abs() / factor)
    w = torch.zeros(c, c, k, k, dtype=torch.float64)
    for i in range(c):
        w[i, i] = filt[:, None] * filt[None, :]
    return w


class FCN8s(nn.Module):
    """pac.md §2.1-2.2: pytorch-fcn's names; ``altpad`` for FCN8sAltPad, ``pac`` for FCN8sPac."""

    def __init__(self, n_class=21, widths=VGG, altpad=False, pac=False):
        super().__init__()
        self.altpad, self.pac = altpad or pac, pac
        cin = 3
        for i, (name, cout) in enumerate(zip(VGG_NAMES, widths)):
            if name == "fc6":
                layer = nn.Conv2d(cin, cout, 7, padding=3 if self.altpad else 0)
            elif name == "fc7":
                layer = nn.Conv2d(cin, cout, 1)
            elif pac and name in ("conv3_3", "conv4_3", "conv5_3"):
                layer = PacConv2d(cin, cout, 3, padding=1)
            else:
                layer = nn.Conv2d(cin, cout, 3, padding=100 if (name == "conv1_1" and not self.altpad) else 1)
            setattr(self, name, layer)
            cin = cout
        self.score_fr = nn.Conv2d(widths[14], n_class, 1)
        self.score_pool3 = nn.Conv2d(widths[6], n_class, 1)
        self.score_pool4 = nn.Conv2d(widths[9], n_class, 1)
        p = 1 if self.altpad else 0
        self.upscore2 = nn.ConvTranspose2d(n_class, n_class, 4, stride=2, padding=p, bias=False)
        self.upscore8 = nn.ConvTranspose2d(n_class, n_class, 16, stride=8, padding=4 * p, bias=False)
        self.upscore_pool4 = nn.ConvTranspose2d(n_class, n_class, 4, stride=2, padding=p, bias=False)

    def forward(self, x):
        h, guide = x, None
        pools = {}
        for name in VGG_NAMES[:13]:
            layer = getattr(self, name)
            if isinstance(layer, PacConv2d):
                scale = {"conv3_3": 0.5, "conv4_3": 0.25, "conv5_3": 0.125}[name]
                g = F.interpolate(guide, scale_factor=scale, mode="bilinear", align_corners=False)
                h = F.relu(layer(h, g * 0.0001))
            else:
                h = F.relu(layer(h))
            if name == "conv2_2":
                guide = h
            if name in ("conv1_2", "conv2_2", "conv3_3", "conv4_3", "conv5_3"):
                h = F.max_pool2d(h, 2, 2, ceil_mode=True)
                pools[name[4]] = h
        h = F.relu(self.fc7(F.relu(self.fc6(h))))
        up2 = self.upscore2(self.score_fr(h))
        s4 = self.score_pool4(pools["4"])
        if not self.altpad:
            s4 = s4[:, :, 5:5 + up2.shape[2], 5:5 + up2.shape[3]]
        up4 = self.upscore_pool4(up2 + s4)
        s3 = self.score_pool3(pools["3"])
        if not self.altpad:
            s3 = s3[:, :, 9:9 + up4.shape[2], 9:9 + up4.shape[3]]
        h = up4 + s3
        if self.pac:
            return F.interpolate(h, scale_factor=8, mode="bilinear", align_corners=False)
        h = self.upscore8(h)
        return h if self.altpad else h[:, :, 31:31 + x.shape[2], 31:31 + x.shape[3]]


def fcn_backbone(name, widths=VGG):
    return {"fcn8s": lambda: FCN8s(widths=widths), "fcn8saltpad": lambda: FCN8s(widths=widths, altpad=True),
            "fcn8spac": lambda: FCN8s(widths=widths, pac=True)}[name]()


# ----------------------------------------------------------------------------- CRF models


def parse_edges(edges):
    """'p4d5641p4d5161' -> kernel dicts (pac.md §2.1)."""
    out = []
    for s in edges.split("p")[1:]:
        n = 3 if s[2] == "s" else 2
        t, k, d, b = s[:n], s[n], s[n + 1:-1], s[-1]
        out.append(dict(kernel_size=int(k), dilation=int(d), blur=int(b),
                        compat_type="potts" if t.startswith("0d") else t[:2],
                        spatial_filter=t.endswith("s"), pairwise_weight=1.0))
    return out


class ModelWithCrf(nn.Module):
    """pac.md §2.1: backbone + PacCRF(Loose) on image / feat_scales.<i> (use_yx False)."""

    def __init__(self, backbone, num_steps=5, edges="p4d5641p4d5161", loose=False):
        super().__init__()
        self.backbone = backbone
        kernels = parse_edges(edges)
        crf = PacCRFLoose if loose else PacCRF
        self.crf = crf(21, num_steps, perturbed_init=True, fixed_weighting=False, unary_weight=1.0,
                       pairwise_kernels=kernels)
        self.feat_scales = nn.ParameterList(nn.Parameter(torch.full((3,), 30.0)) for _ in kernels)

    def forward(self, x):
        unary = self.backbone(x)
        return self.crf(unary, [x * (1.0 / s.view(-1, 1, 1)) for s in self.feat_scales])

    def load_tied(self, state):
        """The original's load_state_dict(strict=False) of a tied CRF's file into a loose model."""
        state = dict(state)
        if isinstance(self.crf, PacCRFLoose) and not any(k.startswith("crf.steps.") for k in state):
            for key in [k for k in state if k.startswith("crf.")]:
                for step in range(len(self.crf.steps)):
                    state[f"crf.steps.{step}.{key[4:]}"] = state[key]
        return self.load_state_dict(state, strict=False)


class ModelWithConvCrf(nn.Module):
    """pac.md §2.1 and the original's create_model('..._convcrf')."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        kernel = dict(kernel_size=11, dilation=1, blur=4, compat_type="2d", spatial_filter=False)
        self.crf = PacCRF(21, 5, perturbed_init=True, fixed_weighting=False, unary_weight=0.8,
                          pairwise_kernels=[dict(kernel, pairwise_weight=2.0), dict(kernel, pairwise_weight=0.6)])

    def forward(self, x):
        unary = self.backbone(x)
        feats = [create_YXRGB(x, 80.0, 13.0), create_position_feats(x.shape[2:], 3.0, bs=x.shape[0],
                                                                    dtype=x.dtype)]
        return self.crf(unary, feats)
