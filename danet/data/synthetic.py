"""A procedural dataset in which the right label needs context from far away in the image.

Each image has mid-gray noise, a colored "key" frame along its border, and two or three objects
(squares or discs, bright or dark) in the middle. An object's class is its brightness AND the
key's color: bright/dark with a red key are classes 1/2, with a blue key 3/4; background (frame
included) is 0. Brightness is an easy local cue, but the objects look the same whatever the key,
so local appearance alone is ambiguous (at best 50% right between the red and blue classes): a
pixel's label needs the key, which lies at the border, 10 to 30 pixels away. Measured, a dilated
FCN reads the frame as often as PAM does: its receptive field spans the whole 64x64 image.

`key="marker"` (built as a positive control) removes the frame: the key is one small square of the
key's color at a random spot, placed to be a quarter of the image away from every object where it
can be (14 to 25 pixels at 64x64). A convolution must carry a few pixels' worth of evidence across
that distance; attention can look it up by its content, wherever it is.
Everything is generated from (split, index): the same images for every run, no files.
"""

from __future__ import annotations

import albumentations as A
import numpy as np

from danet.data.base import SegmentationDataset

CLASS_NAMES = ("background", "bright, red key", "dark, red key", "bright, blue key", "dark, blue key")
OBJECT_LEVELS = (200, 45)  # bright, dark; the background is around 120
KEY_COLORS = ((200, 40, 40), (40, 60, 200))
SPLIT_STREAMS = {"train": 1, "val": 2, "test": 3}


def draw_sample(size: int, rng: np.random.Generator, key_style: str = "frame") -> tuple[np.ndarray, np.ndarray]:
    image = rng.normal(120, 20, (size, size, 3))
    label = np.zeros((size, size), dtype=np.uint8)
    key = int(rng.integers(2))
    if key_style == "frame":
        side = size // 16
        frame = np.ones((size, size), dtype=bool)
        frame[side:-side, side:-side] = False
        image[frame] = KEY_COLORS[key]

    rows, cols = np.mgrid[0:size, 0:size]
    margin, placed = size // 8, []
    for _ in range(int(rng.integers(2, 4))):
        for _attempt in range(20):  # rejection sampling of a free spot
            radius = int(rng.integers(size // 10, size // 6))
            cy, cx = rng.integers(margin + radius, size - margin - radius, size=2)
            if all(abs(cy - y) > radius + r + 1 or abs(cx - x) > radius + r + 1 for y, x, r in placed):
                break
        else:
            continue
        placed.append((cy, cx, radius))
        if rng.integers(2):
            inside = (abs(rows - cy) <= radius) & (abs(cols - cx) <= radius)
        else:
            inside = (rows - cy) ** 2 + (cols - cx) ** 2 <= (radius + 1) ** 2
        kind = int(rng.integers(2))
        image[inside] = rng.normal(OBJECT_LEVELS[kind], 20, (int(inside.sum()), 3))
        label[inside] = 1 + kind + 2 * key
    if key_style == "marker":
        draw_marker(image, placed, KEY_COLORS[key], rng)
    return np.clip(image, 0, 255).astype(np.uint8), label


def draw_marker(image: np.ndarray, objects: list[tuple[int, int, int]], color: tuple[int, int, int],
                rng: np.random.Generator) -> None:
    """A square of side size/10 at a random spot whose gap to every object is at least size/4, or the
    largest gap of 50 tries; its pixels are background in the label."""
    size = image.shape[0]
    side, wanted = max(size // 10, 2), size // 4
    best, best_gap = (0, 0), -1
    for _attempt in range(50):
        y, x = (int(v) for v in rng.integers(0, size - side, size=2))
        gap = min((max(abs(y + side / 2 - cy) - r, abs(x + side / 2 - cx) - r) - side / 2
                   for cy, cx, r in objects), default=size)
        if gap > best_gap:
            best, best_gap = (y, x), gap
        if gap >= wanted:
            break
    y, x = best
    image[y:y + side, x:x + side] = color


class SyntheticDataset(SegmentationDataset):
    num_classes = len(CLASS_NAMES)
    class_names = CLASS_NAMES

    def __init__(self, split: str, length: int, size: int, transform: A.Compose, key_style: str = "frame") -> None:
        super().__init__(transform)
        self.stream, self.length, self.size, self.key_style = SPLIT_STREAMS.get(split, 4), length, size, key_style

    def __len__(self) -> int:
        return self.length

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return draw_sample(self.size, np.random.default_rng([self.stream, index]), self.key_style)
