"""What a run's identity needs from its dataset, read without torch and without opening an image.

A cell's hash holds the dataset's class count and, where `--epochs` sets the training length, the
number of training images. The launchers (the Optuna driver, the W&B-YAML executor, Slurm's
give-up path) must know both to find a cell's record, in processes that never train: this module
answers from constants and file listings only. The datasets themselves (`danet.data.build`) list
the same files; tests hold the two to the same counts.
"""

from __future__ import annotations

from pathlib import Path

from danet.config import DataConfig

# Class counts of the datasets (their class names live beside their loaders).
CLASS_COUNTS = {"synthetic": 5, "camvid": 11, "cityscapes": 19, "voc": 21}
CAMVID_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class DataError(Exception):
    """Bad or missing data. The message is one line that names the file and what to do."""


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DataError(f"{what} {path} does not exist; pass --data-root or set DANET_DATA")
    return path


def camvid_pairs(root: Path, split: str) -> list[tuple[Path, Path]]:
    """(image, label) paths of a CamVid split: SegNet's layout, or images/<split>/ + labels/<split>/."""
    require_dir(root, "CamVid root")
    layouts = [(root / split, root / f"{split}annot"), (root / "images" / split, root / "labels" / split)]
    for image_dir, label_dir in layouts:
        if image_dir.is_dir():
            images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in CAMVID_IMAGE_SUFFIXES)
            return [(image, label_dir / f"{image.stem}.png") for image in images]
    raise DataError(f"no CamVid split {split!r} in {root}: expected {split}/ + {split}annot/ (SegNet layout) "
                    f"or images/{split}/ + labels/{split}/")


def _cityscapes_images(root: Path, split: str) -> int:
    """torchvision's Cityscapes lists every file of leftImg8bit/<split>/<city>/."""
    image_dir = require_dir(root, "Cityscapes root") / "leftImg8bit" / split
    if not image_dir.is_dir():
        raise DataError(f"Cityscapes {split!r} in {root}: no folder {image_dir}")
    return sum(1 for city in image_dir.iterdir() if city.is_dir() for _ in city.iterdir())


def _voc_images(root: Path, split: str) -> int:
    """torchvision's VOCSegmentation reads the ids of VOCdevkit/VOC2012/ImageSets/Segmentation/<split>.txt."""
    listing = require_dir(root, "VOC root") / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not listing.is_file():
        raise DataError(f"VOC 2012 {split!r} in {root}: no file {listing}")
    return len(listing.read_text().splitlines())


def dataset_root(cfg: DataConfig) -> Path:
    """The folder of a file dataset, or a DataError saying how to give it."""
    if not cfg.data_root:
        raise DataError(f"dataset {cfg.dataset} needs its folder: pass --data-root or set DANET_DATA")
    return Path(cfg.data_root)


def train_images(cfg: DataConfig) -> int:
    """The number of images in the configured training split."""
    if cfg.dataset == "synthetic":
        return cfg.synthetic_train_images
    root = dataset_root(cfg)
    if cfg.dataset == "camvid":
        return len(camvid_pairs(root, cfg.train_split))
    if cfg.dataset == "cityscapes":
        return _cityscapes_images(root, cfg.train_split)
    return _voc_images(root, cfg.train_split)
