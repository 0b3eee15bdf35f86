"""CamVid, SegNet's 11-class version: train/ trainannot/ val/ valannot/ test/ testannot/.

Also the generic layout images/<split>/ + labels/<split>/ (labels: PNG with the same stem).
Label values 0-10 are classes, 11 (void) and 255 are ignored.
"""

from __future__ import annotations

from pathlib import Path

import albumentations as A

from danet.data.base import DataError, FileDataset, label_lut, require_dir

CLASS_NAMES = ("sky", "building", "pole", "road", "sidewalk", "tree", "sign", "fence", "car",
               "pedestrian", "bicyclist")
VOID = 11
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def camvid_pairs(root: Path, split: str) -> list[tuple[Path, Path]]:
    require_dir(root, "CamVid root")
    layouts = [(root / split, root / f"{split}annot"), (root / "images" / split, root / "labels" / split)]
    for image_dir, label_dir in layouts:
        if image_dir.is_dir():
            images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            return [(image, label_dir / f"{image.stem}.png") for image in images]
    raise DataError(f"no CamVid split {split!r} in {root}: expected {split}/ + {split}annot/ (SegNet layout) "
                    f"or images/{split}/ + labels/{split}/")


class CamVid(FileDataset):
    def __init__(self, root: str, split: str, transform: A.Compose, image_scale: float = 1.0) -> None:
        lut = label_lut({value: value for value in range(len(CLASS_NAMES))} | {VOID: 255})
        super().__init__(camvid_pairs(Path(root), split), lut, len(CLASS_NAMES), CLASS_NAMES, transform,
                         image_scale)
