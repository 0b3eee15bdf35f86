"""DANet models. `build(cfg)` is the one way from a ModelConfig to a model."""

from __future__ import annotations

from typing import TYPE_CHECKING

from danet.models.attention import ChannelAttention, PositionAttention
from danet.models.backbone import DilatedResNet
from danet.models.danet import DANet
from danet.models.heads import DAHead, FCNHead

if TYPE_CHECKING:
    from danet.config import ModelConfig

__all__ = ["ChannelAttention", "DAHead", "DANet", "DilatedResNet", "FCNHead", "PositionAttention", "build"]


def build(cfg: ModelConfig) -> DANet:
    """Map a ModelConfig to the plain constructor arguments of the parts and assemble DANet."""
    if cfg.num_classes < 1:
        raise ValueError("num_classes must be set (>= 1) to build a model; 0 means 'from the dataset' "
                         "and is replaced when a run config is resolved")
    backbone = DilatedResNet(cfg.backbone, cfg.output_stride, cfg.multi_grid, cfg.weights)
    channels = backbone.channels["stage4"]
    if cfg.head == "fcn":
        head: DAHead | FCNHead = FCNHead(channels, cfg.num_classes, cfg.dropout)
    else:
        pam_classifier, cam_classifier = cfg.branch_classifiers()
        head = DAHead(channels, cfg.num_classes, pam=cfg.pam, cam=cfg.cam, pam_classifier=pam_classifier,
                      cam_classifier=cam_classifier, pam_reduction=cfg.pam_reduction, pam_impl=cfg.pam_impl,
                      cam_energy=cfg.cam_energy, dropout=cfg.dropout)
    aux_head = FCNHead(backbone.channels["stage3"], cfg.num_classes, cfg.dropout) if cfg.fcn_aux else None
    return DANet(backbone, head, aux_head)
