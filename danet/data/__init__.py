"""Datasets. `build(cfg)` returns the train and val datasets with their class names."""

from __future__ import annotations

from dataclasses import dataclass

from danet.config import DataConfig
from danet.data.base import IGNORE_INDEX, DataError, SegmentationDataset
from danet.data.camvid import CamVid
from danet.data.cityscapes import Cityscapes
from danet.data.synthetic import SyntheticDataset
from danet.data.transforms import eval_transform, train_transform
from danet.data.voc import VOC

__all__ = ["IGNORE_INDEX", "DataBundle", "DataError", "SegmentationDataset", "build", "build_split"]

FILE_DATASETS = {"camvid": CamVid, "cityscapes": Cityscapes, "voc": VOC}


@dataclass
class DataBundle:
    train: SegmentationDataset
    val: SegmentationDataset
    num_classes: int
    class_names: tuple[str, ...]


def build_split(cfg: DataConfig, split: str, train: bool = False) -> SegmentationDataset:
    """One split of the configured dataset, with the training augmentation or the evaluation transform."""
    transform = train_transform(cfg) if train else eval_transform()
    if cfg.dataset == "synthetic":
        images = cfg.synthetic_train_images if train else cfg.synthetic_val_images
        return SyntheticDataset(split, images, cfg.synthetic_size, transform, cfg.synthetic_key)
    if not cfg.data_root:
        raise DataError(f"dataset {cfg.dataset} needs its folder: pass --data-root or set DANET_DATA")
    return FILE_DATASETS[cfg.dataset](cfg.data_root, split, transform, cfg.image_scale)


def build(cfg: DataConfig) -> DataBundle:
    train = build_split(cfg, cfg.train_split, train=True)
    val = build_split(cfg, cfg.val_split)
    return DataBundle(train, val, train.num_classes, train.class_names)
