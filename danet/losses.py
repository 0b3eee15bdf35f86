"""The DANet loss: a weighted sum of cross-entropies over the model's named outputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from danet.config import IGNORE_INDEX


@dataclass
class LossResult:
    total: torch.Tensor  # weighted sum, for backward
    terms: dict[str, torch.Tensor]  # unweighted cross-entropy of each output, detached, for logging


class SegmentationLoss(nn.Module):
    """CE(out) + w_pam CE(pam) + w_cam CE(cam) + w_aux CE(aux), pixels labelled 255 ignored.

    Args:
        weights: weight per output name, e.g. ModelConfig.loss_weights(). Every output the model
            returns must have a weight (a missing one is an error, not a silent zero).
    """

    def __init__(self, weights: dict[str, float], ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        self.weights = dict(weights)
        self.ignore_index = ignore_index

    def forward(self, outputs: dict[str, torch.Tensor], target: torch.Tensor) -> LossResult:
        unknown = sorted(set(outputs) - set(self.weights))
        if unknown:
            raise KeyError(f"no loss weight for model outputs {unknown}; weights are given for {sorted(self.weights)}")
        total = torch.zeros((), device=target.device)
        terms = {}
        for name, logits in outputs.items():
            term = F.cross_entropy(logits.float(), target, ignore_index=self.ignore_index)
            total = total + self.weights[name] * term
            terms[name] = term.detach()
        return LossResult(total, terms)
