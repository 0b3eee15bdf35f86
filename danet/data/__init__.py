"""Datasets. `build(cfg)` returns the train and val datasets with their class names.

Importing this package loads no torch: `danet.data.catalog` (class counts, training-set sizes) is
read by launchers that never train, so the loaders are imported when a dataset is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from danet.config import IGNORE_INDEX, DataConfig
from danet.data.catalog import DataError, dataset_root

if TYPE_CHECKING:
    from danet.data.base import SegmentationDataset

__all__ = ["IGNORE_INDEX", "DataBundle", "DataError", "build", "build_split"]


@dataclass
class DataBundle:
    train: SegmentationDataset
    val: SegmentationDataset
    num_classes: int
    class_names: tuple[str, ...]


def build_split(cfg: DataConfig, split: str, train: bool = False) -> SegmentationDataset:
    """One split of the configured dataset, with the training augmentation or the evaluation transform."""
    from danet.data.camvid import CamVid  # the loaders import torch, albumentations, torchvision
    from danet.data.cityscapes import Cityscapes
    from danet.data.synthetic import SyntheticDataset
    from danet.data.transforms import eval_transform, train_transform
    from danet.data.voc import VOC

    transform = train_transform(cfg) if train else eval_transform()
    if cfg.dataset == "synthetic":
        images = cfg.synthetic_train_images if train else cfg.synthetic_val_images
        return SyntheticDataset(split, images, cfg.synthetic_size, transform, cfg.synthetic_key)
    loaders = {"camvid": CamVid, "cityscapes": Cityscapes, "voc": VOC}
    return loaders[cfg.dataset](str(dataset_root(cfg)), split, transform, cfg.image_scale)


def build(cfg: DataConfig) -> DataBundle:
    train = build_split(cfg, cfg.train_split, train=True)
    val = build_split(cfg, cfg.val_split)
    return DataBundle(train, val, train.num_classes, train.class_names)
