"""Cityscapes, official layout leftImg8bit/<split>/<city>/ + gtFine/<split>/<city>/ (torchvision's
Cityscapes dataset lists the files). labelIds are mapped to the 19 train ids, the rest to 255."""

from __future__ import annotations

from pathlib import Path

import albumentations as A
from torchvision.datasets import Cityscapes as TorchvisionCityscapes

from danet.data.base import FileDataset, label_lut
from danet.data.catalog import DataError, require_dir

CLASS_NAMES = tuple(c.name for c in TorchvisionCityscapes.classes if c.train_id not in (255, -1))
# labelId -> trainId; every other id (void, rare classes, license plate) is ignored
TRAIN_IDS = {c.id: c.train_id for c in TorchvisionCityscapes.classes if c.train_id not in (255, -1) and c.id >= 0}
LABEL_IDS = {c.id for c in TorchvisionCityscapes.classes if c.id >= 0}


class Cityscapes(FileDataset):
    def __init__(self, root: str, split: str, transform: A.Compose, image_scale: float = 1.0) -> None:
        require_dir(Path(root), "Cityscapes root")
        try:
            listing = TorchvisionCityscapes(root, split=split, mode="fine", target_type="semantic")
        except (RuntimeError, ValueError) as error:
            raise DataError(f"Cityscapes {split!r} in {root}: {error}") from None
        # sorted: torchvision lists the folders in os.listdir order, which differs between machines
        pairs = sorted((Path(image), Path(target[0])) for image, target in zip(listing.images, listing.targets))
        lut = label_lut({label_id: TRAIN_IDS.get(label_id, 255) for label_id in LABEL_IDS})
        super().__init__(pairs, lut, len(CLASS_NAMES), CLASS_NAMES, transform, image_scale)
