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

__all__ = ["IGNORE_INDEX", "DataBundle", "DataError", "SegmentationDataset", "build"]

FILE_DATASETS = {"camvid": CamVid, "cityscapes": Cityscapes, "voc": VOC}


@dataclass
class DataBundle:
    train: SegmentationDataset
    val: SegmentationDataset
    num_classes: int
    class_names: tuple[str, ...]


def build(cfg: DataConfig) -> DataBundle:
    if cfg.dataset == "synthetic":
        train = SyntheticDataset(cfg.train_split, cfg.synthetic_train_images, cfg.synthetic_size, train_transform(cfg))
        val = SyntheticDataset(cfg.val_split, cfg.synthetic_val_images, cfg.synthetic_size, eval_transform())
    else:
        if not cfg.data_root:
            raise DataError(f"dataset {cfg.dataset} needs its folder: pass --data-root or set DANET_DATA")
        dataset = FILE_DATASETS[cfg.dataset]
        train = dataset(cfg.data_root, cfg.train_split, train_transform(cfg), cfg.image_scale)
        val = dataset(cfg.data_root, cfg.val_split, eval_transform(), cfg.image_scale)
    return DataBundle(train, val, train.num_classes, train.class_names)
