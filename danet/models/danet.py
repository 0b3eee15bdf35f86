"""DANet: dilated ResNet + dual attention head (+ FCN auxiliary head), logits at input size."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from danet.models.backbone import DilatedResNet
from danet.models.heads import DAHead, FCNHead


class DANet(nn.Module):
    """Backbone, a head on stage 4 (DAHead, or FCNHead for the dilated-FCN baseline) and an optional
    auxiliary FCNHead on stage 3.

    forward returns a dict of logits upsampled (bilinear, align_corners=True as in the released
    code) to the input size: "out" always, and in training mode "pam" / "cam" / "aux" for the
    auxiliary outputs that exist (evaluation neither computes nor upsamples them).
    """

    def __init__(self, backbone: DilatedResNet, head: DAHead | FCNHead, aux_head: FCNHead | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.aux_head = aux_head

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.backbone(images)
        head_logits = self.head(features["stage4"])
        logits = head_logits if isinstance(head_logits, dict) else {"out": head_logits}
        if self.training and self.aux_head is not None:
            logits["aux"] = self.aux_head(features["stage3"])
        size = images.shape[-2:]
        return {name: F.interpolate(value, size=size, mode="bilinear", align_corners=True)
                for name, value in logits.items()}

    def param_groups(self, lr: float, head_lr_multiplier: float = 10.0) -> list[dict]:
        """SGD parameter groups: the backbone at `lr`, heads at `lr * head_lr_multiplier`."""
        head_params = [p for module in (self.head, self.aux_head) if module is not None
                       for p in module.parameters()]
        return [
            {"name": "backbone", "params": list(self.backbone.parameters()), "lr": lr},
            {"name": "head", "params": head_params, "lr": lr * head_lr_multiplier},
        ]

    @torch.no_grad()
    def attention_maps(self, images: torch.Tensor, points: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        """Attention for figures (the paper's Figure 4), without the full N x N map.

        Args:
            images: B x 3 x H x W.
            points: query pixels as (row, col) in input coordinates.

        Returns "pam": B x P x h x w attention of each query pixel over the feature map (when PAM
        is on), "cam": B x C x C channel attention (when CAM is on), and "cam_features": the
        B x C x h x w input of CAM, whose channels the CAM rows weigh.
        """
        if not isinstance(self.head, DAHead):
            raise ValueError("attention maps need the DANet head (this model has the FCN head)")
        features = self.backbone(images)["stage4"]
        height, width = features.shape[-2:]
        image_height, image_width = images.shape[-2:]
        maps: dict[str, torch.Tensor] = {}
        position = self.head.pam_branch.attention
        if position is not None:
            flat = []
            for row, col in points:
                if not (0 <= row < image_height and 0 <= col < image_width):
                    raise ValueError(f"point {(row, col)} is outside the {image_height}x{image_width} image")
                flat.append(min(row * height // image_height, height - 1) * width
                            + min(col * width // image_width, width - 1))
            rows = position.attention_rows(self.head.pam_branch.reduce(features),
                                           torch.tensor(flat, device=images.device))
            maps["pam"] = rows.view(images.shape[0], len(points), height, width)
        channel = self.head.cam_branch.attention
        if channel is not None:
            cam_input = self.head.cam_branch.reduce(features)
            maps["cam"] = channel.attention_matrix(cam_input.float().flatten(2))
            maps["cam_features"] = cam_input
        return maps
