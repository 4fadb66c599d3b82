"""The PAC original's module name for its CRF: code written for NVlabs/pacnet ports by
changing ``import paccrf`` to ``from pacnet import paccrf`` (as ``import pac`` becomes
``from pacnet import pac``).  The objects are those of :mod:`pacnet.crf`."""

from pacnet.crf import PacCRF, PacCRFLoose, create_position_feats, create_YXRGB

__all__ = ["PacCRF", "PacCRFLoose", "create_YXRGB", "create_position_feats"]
