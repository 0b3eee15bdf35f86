"""Segmentation metrics from an int64 confusion matrix (summed, not averaged, across ranks)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from danet.config import IGNORE_INDEX


@dataclass
class SegmentationScores:
    miou: float  # mean IoU over the classes present (in the labels or the predictions)
    pixel_accuracy: float
    iou: list[float | None]  # per class; None where the class is absent from labels and predictions
    absent: list[int]  # classes left out of the mean, said out loud rather than hidden in a NaN

    def as_metrics(self, class_names: tuple[str, ...], prefix: str) -> dict[str, float | list | None]:
        metrics: dict[str, float | list | None] = {f"{prefix}/mIoU": self.miou,
                                                   f"{prefix}/pixel_accuracy": self.pixel_accuracy}
        for name, value in zip(class_names, self.iou):
            metrics[f"{prefix}/IoU/{name}"] = value
        return metrics


class ConfusionMatrix:
    """Rows: true class, columns: predicted class. Pixels labelled 255 are not counted."""

    def __init__(self, num_classes: int, device: torch.device | str = "cpu") -> None:
        self.num_classes = num_classes
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        valid = target != IGNORE_INDEX
        if (target[valid] >= self.num_classes).any() or (target[valid] < 0).any():
            raise ValueError(f"target has class ids outside 0..{self.num_classes - 1} (and not {IGNORE_INDEX})")
        index = target[valid].to(torch.int64) * self.num_classes + prediction[valid].to(torch.int64)
        self.matrix += torch.bincount(index, minlength=self.num_classes ** 2).view(self.num_classes, -1)

    def all_reduce(self) -> None:
        """Sum the counts of every rank (a no-op without torch.distributed)."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.matrix, op=dist.ReduceOp.SUM)

    def compute(self) -> SegmentationScores:
        matrix = self.matrix.double().cpu()
        true_positive = matrix.diag()
        union = matrix.sum(0) + matrix.sum(1) - true_positive
        present = union > 0
        iou = torch.where(present, true_positive / union.clamp(min=1), torch.nan)
        total = matrix.sum()
        return SegmentationScores(
            miou=float(iou[present].mean()) if present.any() else float("nan"),
            pixel_accuracy=float(true_positive.sum() / total) if total > 0 else float("nan"),
            iou=[float(value) if ok else None for value, ok in zip(iou, present)],
            absent=[index for index, ok in enumerate(present) if not ok],
        )
