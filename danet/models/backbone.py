"""Dilated ResNet backbones (ResNet-18/34/50/101) with a chosen output stride and multi-grid.

torchvision builds the networks; dilation is applied afterwards by rewriting the strides and
dilations of the 3x3 convolutions, because torchvision refuses dilation in BasicBlock
(ResNet-18/34). The same rewrite serves every depth, so all four support output stride 8, 16, 32.
"""

from __future__ import annotations

import logging
import os
import urllib.error
from pathlib import Path

import torch
from torch import nn
from torchvision import models as tv_models

from danet.config import BACKBONES, OUTPUT_STRIDES

log = logging.getLogger(__name__)

BUILDERS: dict[str, tuple] = {
    "resnet18": (tv_models.resnet18, tv_models.ResNet18_Weights.IMAGENET1K_V1),
    "resnet34": (tv_models.resnet34, tv_models.ResNet34_Weights.IMAGENET1K_V1),
    "resnet50": (tv_models.resnet50, tv_models.ResNet50_Weights.IMAGENET1K_V1),
    "resnet101": (tv_models.resnet101, tv_models.ResNet101_Weights.IMAGENET1K_V1),
}
MULTI_GRID = (1, 2, 4)
# Dilation of (stage 3, stage 4) for each output stride.
STAGE_DILATIONS = {8: (2, 4), 16: (1, 2), 32: (1, 1)}


class BackboneWeightsError(RuntimeError):
    """Pretrained weights were asked for but cannot be loaded."""


def block_dilations(num_blocks: int, previous: int, dilation: int, multi_grid: bool = False) -> list[int]:
    """Dilation of each block of a stage whose rate goes from `previous` to `dilation`.

    The first block keeps the previous stage's rate (it used to carry the stride), as in
    torchvision and the released DANet code. Multi-grid gives the blocks the rates
    dilation x (1, 2, 4): the paper's 4, 8, 16 for stage 4 at output stride 8. A stage with fewer
    blocks (ResNet-18's stage 4 has two) takes the first rates of the grid.
    """
    if multi_grid:
        return [dilation * MULTI_GRID[i % len(MULTI_GRID)] for i in range(num_blocks)]
    return [previous] + [dilation] * (num_blocks - 1)


def _apply_dilations(stage: nn.Sequential, dilations: list[int], remove_stride: bool) -> None:
    """Set every 3x3 convolution of block i to dilation (and padding) dilations[i].

    With `remove_stride` the stage's stride-2 convolutions (3x3 and the 1x1 downsample) become
    stride 1, so the stage keeps its input resolution.
    """
    for block, dilation in zip(stage, dilations):
        for conv in block.modules():
            if isinstance(conv, nn.Conv2d):
                if remove_stride:
                    conv.stride = (1, 1)
                if conv.kernel_size == (3, 3):
                    conv.dilation, conv.padding = (dilation, dilation), (dilation, dilation)


def _cached_weights_path(url: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _imagenet_state_dict(weights_enum) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet weights, from the torch cache or the network, or one clear error."""
    path = _cached_weights_path(weights_enum.url)
    try:
        return weights_enum.get_state_dict(progress=False, weights_only=True)
    except (urllib.error.URLError, OSError, RuntimeError) as error:
        raise BackboneWeightsError(
            f"cannot load ImageNet weights ({error.__class__.__name__}: {error}); download "
            f"{weights_enum.url} on a machine with network and put it at {path}, "
            "or pass --weights PATH to a local state dict"
        ) from error


def _load_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    if not Path(path).is_file():
        raise BackboneWeightsError(f"backbone weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for unreadable or unsafe files
        raise BackboneWeightsError(f"cannot read backbone weights {path}: {error}") from error
    if not isinstance(state, dict):
        raise BackboneWeightsError(f"{path} does not hold a state dict (found {type(state).__name__})")
    return state


class DilatedResNet(nn.Module):
    """A torchvision ResNet without its classifier, returning stage-3 and stage-4 features.

    Args:
        depth_name: one of "resnet18", "resnet34", "resnet50", "resnet101".
        output_stride: 8, 16 or 32: input size / feature size of stage 4.
        multi_grid: per-block dilation rates (1, 2, 4) x the stage-4 rate in stage 4.
        weights: "none", "imagenet" (torchvision's IMAGENET1K_V1) or a path to a state dict.
    """

    def __init__(self, depth_name: str = "resnet50", output_stride: int = 8, multi_grid: bool = False,
                 weights: str = "none") -> None:
        super().__init__()
        if depth_name not in BACKBONES:
            raise ValueError(f"backbone must be one of {sorted(BACKBONES)}, got {depth_name!r}")
        if output_stride not in OUTPUT_STRIDES:
            raise ValueError(f"output_stride must be one of {list(OUTPUT_STRIDES)}, got {output_stride!r}")
        builder, imagenet = BUILDERS[depth_name]
        resnet = builder(weights=None)
        # torchvision's attribute names, so that its state dicts load as they are
        self.conv1, self.bn1, self.relu, self.maxpool = resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4)

        d3, d4 = STAGE_DILATIONS[output_stride]
        _apply_dilations(self.layer3, block_dilations(len(self.layer3), 1, d3), remove_stride=d3 > 1)
        _apply_dilations(self.layer4, block_dilations(len(self.layer4), d3, d4, multi_grid),
                         remove_stride=d4 > d3)
        self.output_stride = output_stride

        expansion = 4 if depth_name in ("resnet50", "resnet101") else 1
        self.channels = {"stage3": 256 * expansion, "stage4": 512 * expansion}
        self.load_report: dict[str, list[str]] = {"missing": [], "unexpected": []}
        if weights == "imagenet":
            self.load_weights(_imagenet_state_dict(imagenet))
        elif weights != "none":
            self.load_weights(_load_state_dict_file(weights))

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Load a torchvision-style ResNet state dict; report missing and unexpected keys."""
        # "module." comes from DataParallel checkpoints; fc is the ImageNet classifier we dropped.
        state = {key.removeprefix("module."): value for key, value in state.items()}
        state = {key: value for key, value in state.items() if not key.startswith("fc.")}
        if not set(state) & set(self.state_dict()):
            raise BackboneWeightsError("no backbone weight matched: is this a torchvision ResNet state dict?")
        result = self.load_state_dict(state, strict=False)
        self.load_report = {"missing": list(result.missing_keys), "unexpected": list(result.unexpected_keys)}
        for kind, keys in self.load_report.items():
            if keys:
                log.warning("backbone weights: %d %s keys, e.g. %s", len(keys), kind, ", ".join(keys[:5]))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        stage3 = self.layer3(x)
        return {"stage3": stage3, "stage4": self.layer4(stage3)}
