"""What every dataset shares: reading and checking files, label mapping, per-sample seeded transforms."""

from __future__ import annotations

from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from danet.config import IGNORE_INDEX
from danet.data.catalog import DataError


def label_lut(mapping: dict[int, int]) -> np.ndarray:
    """A 256-entry lookup table from raw label values to class ids; -1 marks values not allowed."""
    lut = np.full(256, -1, dtype=np.int16)
    lut[IGNORE_INDEX] = IGNORE_INDEX
    for raw, mapped in mapping.items():
        lut[raw] = mapped
    return lut


def read_image(path: Path) -> np.ndarray:
    """H x W x 3 uint8 RGB, or a DataError naming the file (missing, corrupt or truncated)."""
    try:
        with Image.open(path) as image:
            image.load()
            return np.asarray(image.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as error:
        raise DataError(f"cannot read image {path}: {error}") from None


def read_label(path: Path, lut: np.ndarray, num_classes: int) -> np.ndarray:
    """H x W uint8 class ids (255 ignored) through `lut`; values it does not allow are errors."""
    try:
        with Image.open(path) as image:
            image.load()
            raw = np.asarray(image)
    except (OSError, SyntaxError, ValueError) as error:
        raise DataError(f"cannot read label {path}: {error}") from None
    if raw.ndim != 2:
        raise DataError(f"label {path} must be a single-channel PNG of class values, got shape {raw.shape}")
    if raw.max(initial=0) > 255:
        raise DataError(f"label {path} has values above 255 (max {raw.max()}); expected class ids or 255")
    mapped = lut[raw]
    if (mapped < 0).any():
        bad = np.unique(raw[mapped < 0])[:8].tolist()
        raise DataError(f"label {path} has values {bad} outside the {num_classes} classes (and not 255)")
    return mapped.astype(np.uint8)


def rescale(image: np.ndarray, label: np.ndarray | None, scale: float) -> tuple[np.ndarray, np.ndarray | None]:
    """An image (bilinear) and its label (nearest) resized by `scale`: the one resize of every path
    (training, evaluation, figures)."""
    if scale == 1.0:
        return image, label
    height, width = image.shape[:2]
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return (cv2.resize(image, size, interpolation=cv2.INTER_LINEAR),
            None if label is None else cv2.resize(label, size, interpolation=cv2.INTER_NEAREST))


class SegmentationDataset(Dataset):
    """A list of samples plus a transform; subclasses say how to load sample `index`.

    An item key is an index (evaluation) or (index, seed): the random transform is seeded per
    sample, so the augmentation of a sample depends on the run seed, epoch and index only, never
    on worker processes or on where a resumed run restarted.
    """

    num_classes: int
    class_names: tuple[str, ...]

    def __init__(self, transform: A.Compose, image_scale: float = 1.0) -> None:
        self.transform = transform
        self.image_scale = image_scale

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """H x W x 3 uint8 image and H x W uint8 label (class ids, 255 ignored)."""
        raise NotImplementedError

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, seed = key if isinstance(key, tuple) else (key, 0)
        image, label = rescale(*self.load(index), self.image_scale)
        self.transform.set_random_seed(seed)
        result = self.transform(image=image, mask=label)
        return result["image"], result["mask"].long()


class FileDataset(SegmentationDataset):
    """Image and label files in pairs, labels mapped through a lookup table."""

    def __init__(self, pairs: list[tuple[Path, Path]], lut: np.ndarray, num_classes: int,
                 class_names: tuple[str, ...], transform: A.Compose, image_scale: float = 1.0) -> None:
        super().__init__(transform, image_scale)
        if not pairs:
            raise DataError("no images found")
        for image_path, label_path in pairs:
            if not label_path.is_file():
                raise DataError(f"image {image_path} has no label file (expected {label_path})")
        self.pairs, self.lut = pairs, lut
        self.num_classes, self.class_names = num_classes, class_names

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image_path, label_path = self.pairs[index]
        image = read_image(image_path)
        label = read_label(label_path, self.lut, self.num_classes)
        if image.shape[:2] != label.shape:
            raise DataError(f"label {label_path} is {label.shape[1]}x{label.shape[0]} but image {image_path} "
                            f"is {image.shape[1]}x{image.shape[0]}")
        return image, label
