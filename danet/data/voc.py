"""PASCAL VOC 2012 segmentation, VOCdevkit/VOC2012 layout (torchvision's VOCSegmentation lists the
files). 21 classes; the 255 object borders are ignored."""

from __future__ import annotations

from pathlib import Path

import albumentations as A
from torchvision.datasets import VOCSegmentation

from danet.data.base import FileDataset, label_lut
from danet.data.catalog import DataError, require_dir

CLASS_NAMES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor")


class VOC(FileDataset):
    def __init__(self, root: str, split: str, transform: A.Compose, image_scale: float = 1.0) -> None:
        require_dir(Path(root), "VOC root")
        try:
            listing = VOCSegmentation(root, year="2012", image_set=split, download=False)
        except (RuntimeError, ValueError) as error:
            raise DataError(f"VOC 2012 {split!r} in {root}: {error}") from None
        pairs = [(Path(image), Path(mask)) for image, mask in zip(listing.images, listing.masks)]
        lut = label_lut({value: value for value in range(len(CLASS_NAMES))})
        super().__init__(pairs, lut, len(CLASS_NAMES), CLASS_NAMES, transform, image_scale)
