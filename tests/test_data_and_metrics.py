import numpy as np
import pytest
import torch
from PIL import Image

from danet.config import DataConfig, EvalConfig
from danet.data import DataError, build
from danet.data.cityscapes import CLASS_NAMES as CITYSCAPES_CLASSES
from danet.data.synthetic import CLASS_NAMES as SYNTHETIC_CLASSES
from danet.data.synthetic import KEY_COLORS, draw_sample
from danet.engine import SeededBatchSampler, predict_probabilities, sliding_window_logits
from danet.metrics import ConfusionMatrix
from tests.conftest import write_png


def test_confusion_matrix_scores_match_an_independent_computation():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 4, (3, 20, 20))
    target[0, :5] = 255
    prediction = np.where(rng.random(target.shape) < 0.7, target % 4, rng.integers(0, 4, target.shape))
    prediction[target == 3] = 1  # class 3 never predicted: IoU 0, not absent
    confusion = ConfusionMatrix(5)
    confusion.update(torch.from_numpy(prediction), torch.from_numpy(target))
    scores = confusion.compute()

    valid = target != 255
    expected = []
    for cls in range(4):
        intersection = np.sum((prediction == cls) & (target == cls) & valid)
        union = np.sum(((prediction == cls) | (target == cls)) & valid)
        expected.append(intersection / union)
    assert scores.iou[:4] == pytest.approx(expected)
    assert scores.iou[3] == 0.0
    assert scores.iou[4] is None and scores.absent == [4]  # never in labels nor predictions
    assert scores.miou == pytest.approx(np.mean(expected))
    assert scores.pixel_accuracy == pytest.approx(np.mean(prediction[valid] == target[valid]))


def test_confusion_matrix_refuses_labels_outside_the_classes():
    with pytest.raises(ValueError, match="outside 0..2"):
        ConfusionMatrix(3).update(torch.zeros(4, dtype=torch.long), torch.tensor([0, 1, 3, 255]))


def test_synthetic_data_is_deterministic_and_needs_the_border_key():
    first, second = draw_sample(64, np.random.default_rng([1, 7])), draw_sample(64, np.random.default_rng([1, 7]))
    assert np.array_equal(first[0], second[0]) and np.array_equal(first[1], second[1])
    # the same object drawn under both keys: identical inside, different class
    labels_by_key = {}
    for index in range(40):
        image, label = draw_sample(64, np.random.default_rng([1, index]))
        key = int(image[0, 0, 2] > image[0, 0, 0])  # blue frame
        labels_by_key.setdefault(key, set()).update(np.unique(label[label > 0]).tolist())
    assert labels_by_key[0] <= {1, 2} and labels_by_key[1] <= {3, 4}
    bundle = build(DataConfig(synthetic_size=32, crop_size=32, synthetic_train_images=5, synthetic_val_images=3))
    assert bundle.num_classes == len(SYNTHETIC_CLASSES) and len(bundle.train) == 5 and len(bundle.val) == 3
    image, label = bundle.train[(2, 123)]
    assert image.shape == (3, 32, 32) and label.dtype == torch.int64


def test_the_marker_variant_shows_the_key_only_in_one_small_square_away_from_the_objects():
    gaps = []
    for index in range(40):
        frame_image, frame_label = draw_sample(64, np.random.default_rng([1, index]))
        image, label = draw_sample(64, np.random.default_rng([1, index]), "marker")
        assert np.array_equal(label, frame_label)  # the same objects and classes; only the key's place differs
        key = int(frame_image[0, 0, 2] > frame_image[0, 0, 0])
        marker = np.all(image == KEY_COLORS[key], axis=-1)
        rows, cols = np.nonzero(marker)
        assert marker.sum() == 6 * 6 and np.ptp(rows) == np.ptp(cols) == 5  # one 6x6 square, nothing else
        assert not np.all(image == KEY_COLORS[1 - key], axis=-1).any() and (label[marker] == 0).all()
        object_rows, object_cols = np.nonzero(label)
        gaps.append(min(np.maximum(np.abs(rows[:, None] - object_rows), np.abs(cols[:, None] - object_cols)).min(1)))
    assert min(gaps) >= 12 and np.median(gaps) >= 16
    bundle = build(DataConfig(synthetic_key="marker", synthetic_train_images=2, synthetic_val_images=2))
    assert np.array_equal(bundle.val.load(1)[0], draw_sample(64, np.random.default_rng([2, 1]), "marker")[0])


def test_the_context_free_ceiling_of_the_marker_val_set_is_what_the_readme_says():
    # a model that segments every object exactly and reads its brightness, but not the key
    labels = np.stack([draw_sample(64, np.random.default_rng([2, index]), "marker")[1] for index in range(64)])
    kind = (labels.astype(int) - 1) % 2  # 0 bright, 1 dark

    def miou(key_per_image):
        guess = np.where(labels > 0, 1 + kind + 2 * key_per_image[:, None, None], 0)
        matrix = np.bincount(labels.ravel() * 5 + guess.ravel(), minlength=25).reshape(5, 5)
        return float(np.mean(np.diag(matrix) / (matrix.sum(0) + matrix.sum(1) - np.diag(matrix))))

    assert round(miou(np.zeros(64, dtype=int)), 3) == 0.407  # always the red key
    rng = np.random.default_rng(0)
    coin = [miou(rng.integers(2, size=64)) for _ in range(200)]  # a coin flip per image
    assert round(float(np.mean(coin)), 3) == 0.465
    assert [round(float(q), 3) for q in np.percentile(coin, [5, 95])] == [0.385, 0.541]


def test_camvid_segnet_layout_maps_void_to_ignore(camvid_tree):
    bundle = build(DataConfig(dataset="camvid", data_root=str(camvid_tree), crop_size=32))
    assert bundle.num_classes == 11 and len(bundle.train) == 4 and len(bundle.val) == 2
    image, label = bundle.val[0]
    assert image.shape == (3, 48, 64)
    raw = np.asarray(Image.open(camvid_tree / "valannot" / "val_000.png"))
    expected = np.where(raw == 11, 255, raw)
    assert np.array_equal(label.numpy(), expected)


def test_generic_image_and_label_dirs_layout(tmp_path):
    rng = np.random.default_rng(3)
    for split in ("train", "val"):
        write_png(tmp_path / "images" / split / "a.jpg", rng.integers(0, 255, (20, 30, 3), dtype=np.uint8))
        write_png(tmp_path / "labels" / split / "a.png", rng.integers(0, 11, (20, 30), dtype=np.uint8))
    bundle = build(DataConfig(dataset="camvid", data_root=str(tmp_path), crop_size=16, image_scale=0.5))
    image, label = bundle.val[0]
    assert image.shape == (3, 10, 15) and label.shape == (10, 15)


def test_cityscapes_label_ids_map_to_the_19_train_ids(cityscapes_tree):
    bundle = build(DataConfig(dataset="cityscapes", data_root=str(cityscapes_tree), crop_size=32))
    assert bundle.num_classes == 19 and bundle.class_names == CITYSCAPES_CLASSES
    assert len(bundle.train) == 4 and len(bundle.val) == 2
    _, label = bundle.val[0]
    raw_path = sorted((cityscapes_tree / "gtFine" / "val" / "frankfurt").glob("*labelIds.png"))[0]
    raw = np.asarray(Image.open(raw_path))
    label = label.numpy()
    assert np.all(label[raw == 7] == 0) and np.all(label[raw == 26] == 13) and np.all(label[raw == 33] == 18)
    assert np.all(label[np.isin(raw, [0, 1, 2, 3, 4, 5, 6, 9, 10, 14, 15, 16, 18, 29, 30])] == 255)


def test_training_crop_larger_than_the_image_pads_with_ignore(camvid_tree):
    bundle = build(DataConfig(dataset="camvid", data_root=str(camvid_tree), crop_size=80, hflip=False))
    image, label = bundle.train[(0, 5)]
    assert image.shape == (3, 80, 80)
    assert (label == 255).sum() >= 80 * 80 - 48 * 64  # padding is ignored


def test_augmentation_depends_only_on_the_sample_seed(camvid_tree):
    bundle = build(DataConfig(dataset="camvid", data_root=str(camvid_tree), crop_size=32, random_scale=True))
    first, again, other = bundle.train[(1, 42)], bundle.train[(1, 42)], bundle.train[(1, 43)]
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])


@pytest.mark.parametrize("dataset", ["camvid", "cityscapes", "voc"])
def test_missing_dataset_root_names_the_folder(tmp_path, dataset):
    with pytest.raises(DataError, match=f"{tmp_path / 'nope'} does not exist; pass --data-root or set DANET_DATA"):
        build(DataConfig(dataset=dataset, data_root=str(tmp_path / "nope")))


def test_image_without_label_names_the_image(camvid_tree):
    (camvid_tree / "trainannot" / "train_002.png").unlink()
    with pytest.raises(DataError, match=r"image .*train_002.png has no label file \(expected .*trainannot"):
        build(DataConfig(dataset="camvid", data_root=str(camvid_tree)))


def test_label_values_outside_the_classes_name_the_file(camvid_tree):
    write_png(camvid_tree / "valannot" / "val_001.png", np.full((48, 64), 42, dtype=np.uint8))
    bundle = build(DataConfig(dataset="camvid", data_root=str(camvid_tree)))
    with pytest.raises(DataError, match=r"label .*val_001.png has values \[42\] outside the 11 classes"):
        bundle.val[1]


@pytest.mark.parametrize("damage", ["corrupt", "truncated"])
def test_corrupt_or_truncated_png_names_the_file(camvid_tree, damage):
    path = camvid_tree / "train" / "train_001.png"
    data = path.read_bytes()
    path.write_bytes(b"garbage" * 10 if damage == "corrupt" else data[: len(data) // 2])
    bundle = build(DataConfig(dataset="camvid", data_root=str(camvid_tree)))
    with pytest.raises(DataError, match=r"cannot read image .*train_001.png"):
        bundle.train[(1, 0)]


def test_seeded_batches_are_the_same_when_resumed_mid_epoch():
    full = list(SeededBatchSampler(10, 3, seed=5, start=0, stop=9))
    resumed = list(SeededBatchSampler(10, 3, seed=5, start=4, stop=9))
    assert resumed == full[4:]
    assert len(full) == 9 and all(len(batch) == 3 for batch in full)
    first_epoch = [index for batch in full[:3] for index, _ in batch]
    assert len(set(first_epoch)) == 9  # a permutation, last incomplete batch dropped
    assert full[:3] != full[3:6]  # a new order each epoch


class _PixelwiseModel(torch.nn.Module):
    """A model whose output at a pixel depends on that pixel only: every protocol must agree."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return {"out": self.conv(x)}


def test_sliding_window_and_whole_image_agree_for_a_pixelwise_model():
    torch.manual_seed(0)
    model, images = _PixelwiseModel(), torch.randn(2, 3, 37, 53)
    whole = model(images)["out"]
    torch.testing.assert_close(sliding_window_logits(model, images, window=16, stride=11, num_classes=4), whole)
    torch.testing.assert_close(sliding_window_logits(model, images, window=64, stride=32, num_classes=4), whole)
    flipped = predict_probabilities(model, images, EvalConfig(eval_flip=True), 4)
    torch.testing.assert_close(flipped, whole.softmax(1))
    slide = predict_probabilities(model, images, EvalConfig(eval_mode="slide", eval_window=20, eval_stride=10), 4)
    torch.testing.assert_close(slide, whole.softmax(1))


def test_multi_scale_averages_probabilities_resized_to_the_input():
    model, images = _PixelwiseModel(), torch.randn(1, 3, 16, 16)
    probabilities = predict_probabilities(model, images, EvalConfig(eval_scales=(0.5, 1.0, 2.0)), 4)
    assert probabilities.shape == (1, 4, 16, 16)
    torch.testing.assert_close(probabilities.sum(1), torch.ones(1, 16, 16))
    single = predict_probabilities(model, images, EvalConfig(eval_scales=(1.0,)), 4)
    assert not torch.allclose(probabilities, single)
