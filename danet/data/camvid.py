"""CamVid, SegNet's 11-class version: train/ trainannot/ val/ valannot/ test/ testannot/.

Also the generic layout images/<split>/ + labels/<split>/ (labels: PNG with the same stem).
Label values 0-10 are classes, 11 (void) and 255 are ignored.
"""

from __future__ import annotations

from pathlib import Path

import albumentations as A

from danet.data.base import FileDataset, label_lut
from danet.data.catalog import camvid_pairs

CLASS_NAMES = ("sky", "building", "pole", "road", "sidewalk", "tree", "sign", "fence", "car",
               "pedestrian", "bicyclist")
VOID = 11


class CamVid(FileDataset):
    def __init__(self, root: str, split: str, transform: A.Compose, image_scale: float = 1.0) -> None:
        lut = label_lut({value: value for value in range(len(CLASS_NAMES))} | {VOID: 255})
        super().__init__(camvid_pairs(Path(root), split), lut, len(CLASS_NAMES), CLASS_NAMES, transform,
                         image_scale)
