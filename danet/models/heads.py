"""Segmentation heads: the dual attention head (DAHead) and the FCN head (FCNHead)."""

from __future__ import annotations

import torch
from torch import nn

from danet.models.attention import ChannelAttention, PositionAttention


def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def classifier(in_channels: int, num_classes: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(in_channels, num_classes, kernel_size=1))


class AttentionBranch(nn.Module):
    """conv3x3-BN-ReLU, attention (or identity when `attention` is None), conv3x3-BN-ReLU."""

    def __init__(self, in_channels: int, channels: int, attention: nn.Module | None) -> None:
        super().__init__()
        self.reduce = conv_bn_relu(in_channels, channels)
        self.attention = attention
        self.project = conv_bn_relu(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.reduce(x)
        if self.attention is not None:
            x = self.attention(x)
        return self.project(x)


class DAHead(nn.Module):
    """The dual attention head of DANet (Fu et al., CVPR 2019, Sections 3.2-3.4; the released code's DAHead).

    Two branches of in/4 channels, one with position attention and one with channel attention;
    the fused logits come from the sum of the branches. With `pam` or `cam` off, that branch keeps
    its convolutions with identity in place of the attention (both off: the "DANet head, no
    attention" baseline, two conv branches). `pam_classifier` / `cam_classifier` put a classifier
    of its own on a branch (the PAM and CAM auxiliary outputs of the released code, which exist
    only where the module is on; deep supervision of a branch without its module is the same
    classifier).

    Returns a dict of logits at feature resolution: "out", plus "pam" / "cam" for the branch
    classifiers that exist, in training mode only (evaluation uses "out" alone).
    """

    def __init__(self, in_channels: int, num_classes: int, pam: bool = True, cam: bool = True,
                 pam_classifier: bool = True, cam_classifier: bool = True, pam_reduction: int = 8,
                 pam_impl: str = "fused", cam_energy: str = "code", dropout: float = 0.1) -> None:
        super().__init__()
        if in_channels % 4:
            raise ValueError(f"in_channels must be divisible by 4, got {in_channels}")
        channels = in_channels // 4
        position = PositionAttention(channels, pam_reduction, pam_impl) if pam else None
        channel = ChannelAttention(cam_energy) if cam else None
        self.pam_branch = AttentionBranch(in_channels, channels, position)
        self.cam_branch = AttentionBranch(in_channels, channels, channel)
        self.classifier = classifier(channels, num_classes, dropout)
        self.pam_classifier = classifier(channels, num_classes, dropout) if pam_classifier else None
        self.cam_classifier = classifier(channels, num_classes, dropout) if cam_classifier else None

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        pam_features, cam_features = self.pam_branch(x), self.cam_branch(x)
        logits = {"out": self.classifier(pam_features + cam_features)}
        if self.training and self.pam_classifier is not None:
            logits["pam"] = self.pam_classifier(pam_features)
        if self.training and self.cam_classifier is not None:
            logits["cam"] = self.cam_classifier(cam_features)
        return logits


class FCNHead(nn.Module):
    """The FCN head of the released code: conv3x3 to in/4 + BN + ReLU, dropout, 1x1 classifier.

    On stage 4 it is the paper's dilated-FCN baseline (`--head fcn`); on stage 3, mmseg's
    auxiliary head (`--fcn-aux`). Returns the logits at feature resolution.
    """

    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.conv = conv_bn_relu(in_channels, in_channels // 4)
        self.classifier = classifier(in_channels // 4, num_classes, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.conv(x))
