"""The training data of ``dynconv.train``: scikit-learn's handwritten digits, upsampled.

The digits set (1,797 grey 8x8 images, 10 classes) ships inside the scikit-learn wheel, so the
training demo needs no download. Images are upsampled to ``image_size`` x ``image_size`` with
bilinear interpolation, split once into train/test with a fixed, class-stratified split, and
normalised with the training set's mean and standard deviation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

NUM_CLASSES = 10
NUM_IMAGES = 1797
TEST_SIZE = 360
# The split never depends on the training seed: every run, model and process count sees the same
# train/test images.
SPLIT_SEED = 0
# Pixel values of the digits set are integers in [0, 16].
PIXEL_MAX = 16.0


@dataclass(frozen=True)
class DigitsSplit:
    """Normalised image tensors (N, 1, S, S) float32 and integer labels (N,) int64."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    @property
    def image_size(self) -> int:
        return int(self.train_x.shape[-1])

    @property
    def num_classes(self) -> int:
        return NUM_CLASSES


def _load_sklearn_digits():
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as err:  # the optional `train` extra is not installed
        raise ImportError(
            "dynconv.train needs scikit-learn for its dataset: pip install 'dynconv[train]'"
        ) from err
    digits = load_digits()
    return digits.images, digits.target, train_test_split


def load_digits_split(image_size: int = 32, train_subset: int | None = None) -> DigitsSplit:
    """The fixed digits train/test split, upsampled to ``image_size`` and normalised.

    Args:
        image_size: output height and width, >= 8 (the native size).
        train_subset: keep only the first ``train_subset`` training images (the split is already
            shuffled, so this is a random, roughly class-balanced subset); None keeps all 1,437.
            The test set (360 images) is never reduced.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an int >= 8, got {image_size!r}")
    images, labels, train_test_split = _load_sklearn_digits()
    train_idx, test_idx = train_test_split(
        list(range(len(labels))), test_size=TEST_SIZE, random_state=SPLIT_SEED, stratify=labels
    )
    max_train = len(train_idx)
    if train_subset is not None:
        if (isinstance(train_subset, bool) or not isinstance(train_subset, int)
                or not 1 <= train_subset <= max_train):
            raise ValueError(
                f"train_subset must be an int in [1, {max_train}] or None, got {train_subset!r}"
            )
        train_idx = train_idx[:train_subset]

    pixels = torch.as_tensor(images, dtype=torch.float32).unsqueeze(1) / PIXEL_MAX
    if image_size != pixels.shape[-1]:
        pixels = F.interpolate(pixels, size=(image_size, image_size), mode="bilinear",
                               align_corners=False)
    targets = torch.as_tensor(labels, dtype=torch.int64)
    train_x, test_x = pixels[train_idx], pixels[test_idx]
    mean, std = train_x.mean(), train_x.std()
    return DigitsSplit(
        train_x=((train_x - mean) / std).contiguous(),
        train_y=targets[train_idx].contiguous(),
        test_x=((test_x - mean) / std).contiguous(),
        test_y=targets[test_idx].contiguous(),
    )
