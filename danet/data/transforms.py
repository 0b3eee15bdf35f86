"""albumentations pipelines: random scale, pad, random crop, flip for training; none for evaluation."""

from __future__ import annotations

import albumentations as A
import cv2

from danet.config import DataConfig
from danet.data.base import IGNORE_INDEX

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def train_transform(cfg: DataConfig) -> A.Compose:
    ops = []
    if cfg.random_scale:
        ops.append(A.RandomScale(scale_limit=(cfg.scale_min - 1.0, cfg.scale_max - 1.0), p=1.0))
    ops += [
        # a crop larger than the image is fine: pad first (image 0, label ignored)
        A.PadIfNeeded(cfg.crop_size, cfg.crop_size, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=IGNORE_INDEX),
        A.RandomCrop(cfg.crop_size, cfg.crop_size),
    ]
    if cfg.hflip:
        ops.append(A.HorizontalFlip(p=0.5))
    ops += [A.Normalize(IMAGENET_MEAN, IMAGENET_STD), A.ToTensorV2()]
    return A.Compose(ops)


def eval_transform() -> A.Compose:
    return A.Compose([A.Normalize(IMAGENET_MEAN, IMAGENET_STD), A.ToTensorV2()])
