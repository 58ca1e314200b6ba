"""The training data of ``dynconv.train``: scikit-learn's handwritten digits, upsampled.

The digits set (1,797 grey 8x8 images, 10 classes) ships inside the scikit-learn wheel, so the
training demo needs no download. Images are upsampled to ``image_size`` x ``image_size`` with
bilinear interpolation, split once into train/test with a fixed, class-stratified split, and
normalised with the training set's mean and standard deviation.

``task="digits-affine"`` is a harder variant: every image (train and test) gets its own random
rotation, scale, shear and shift and additive Gaussian noise, drawn once from a fixed generator,
so the set is the same in every run and needs no download either. Its test set holds
``AFFINE_TEST_COPIES`` independently distorted copies of each of the 360 test digits (copy 0 is
the distortion the digit got when the whole set was distorted at once), so one test image moves
the accuracy by 0.056 points instead of 0.28; the transform parameters of every test image are
kept (``DigitsSplit.test_factors``) to ask what the routing follows.
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
TASKS = ("digits", "digits-affine")
# The distortions of "digits-affine" never depend on the training seed either.
DISTORTION_SEED = 1
MAX_ROTATION_DEGREES = 50.0
SCALE_RANGE = (0.7, 1.1)
MAX_SHEAR = 0.3
MAX_SHIFT = 0.2  # fraction of the image's half-width
NOISE_STD = 0.25  # in units of the clean pixels' range [0, 1]
# Distorted copies of every test digit in "digits-affine" (copy c > 0 is drawn from a generator
# seeded DISTORTION_SEED + c).
AFFINE_TEST_COPIES = 5
# The per-image transform parameters that distort() draws, in DigitsSplit.test_factors.
FACTORS = ("rotation_deg", "scale_x", "scale_y", "shear", "shift_x", "shift_y")


@dataclass(frozen=True)
class DigitsSplit:
    """Normalised image tensors (N, 1, S, S) float32 and integer labels (N,) int64."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    # "digits-affine" only: per test image, each of FACTORS (N,) float32.
    test_factors: dict[str, torch.Tensor] | None = None

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


def draw_distortion(pixels: torch.Tensor,
                    generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Each image of ``pixels`` (N, 1, S, S), values in [0, 1], under its own random affine map
    (rotation, anisotropic scale, shear, shift; zeros outside) plus Gaussian pixel noise; returns
    the images and the drawn parameters (each of ``FACTORS``, shape (N,))."""
    count = pixels.shape[0]

    def uniform(low, high):
        return low + (high - low) * torch.rand(count, generator=generator)

    degrees = uniform(-MAX_ROTATION_DEGREES, MAX_ROTATION_DEGREES)
    angle = torch.deg2rad(degrees)
    scale_x, scale_y = uniform(*SCALE_RANGE), uniform(*SCALE_RANGE)
    shear = uniform(-MAX_SHEAR, MAX_SHEAR)
    shift = uniform(-MAX_SHIFT, MAX_SHIFT), uniform(-MAX_SHIFT, MAX_SHIFT)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # affine_grid maps output coordinates to input ones: the inverse of the image's motion.
    theta = torch.stack([
        torch.stack([cos / scale_x, (sin + shear) / scale_x, shift[0]], dim=1),
        torch.stack([-sin / scale_y, cos / scale_y, shift[1]], dim=1),
    ], dim=1)
    grid = F.affine_grid(theta, list(pixels.shape), align_corners=False)
    moved = F.grid_sample(pixels, grid, mode="bilinear", padding_mode="zeros",
                          align_corners=False)
    noise = torch.randn(pixels.shape, generator=generator) * NOISE_STD
    factors = dict(zip(FACTORS, (degrees, scale_x, scale_y, shear, shift[0], shift[1]),
                       strict=True))
    return moved + noise, factors


def distort(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The images of :func:`draw_distortion`, without the parameters."""
    return draw_distortion(pixels, generator)[0]


def dataset_definition(task: str, image_size: int = 32, train_subset: int | None = None) -> dict:
    """What defines the images of ``load_digits_split(image_size, train_subset, task)``: recorded
    with every training run, so results made on another version of the set can be told apart."""
    definition = {"task": task, "image_size": image_size, "train_subset": train_subset,
                  "test_size": TEST_SIZE, "split_seed": SPLIT_SEED}
    if task == "digits-affine":
        definition.update(
            distortion_seed=DISTORTION_SEED, test_copies=AFFINE_TEST_COPIES,
            max_rotation_degrees=MAX_ROTATION_DEGREES, scale_range=list(SCALE_RANGE),
            max_shear=MAX_SHEAR, max_shift=MAX_SHIFT, noise_std=NOISE_STD)
    return definition


def load_digits_split(image_size: int = 32, train_subset: int | None = None,
                      task: str = "digits") -> DigitsSplit:
    """The fixed digits train/test split, upsampled to ``image_size`` and normalised.

    Args:
        image_size: output height and width, >= 8 (the native size).
        train_subset: keep only the first ``train_subset`` training images (the split is already
            shuffled, so this is a random, roughly class-balanced subset); None keeps all 1,437.
            The test set is never reduced.
        task: ``"digits"`` (the clean images; 360 test images) or ``"digits-affine"`` (each
            image randomly rotated, scaled, sheared, shifted and noised, the same way in every
            run; ``AFFINE_TEST_COPIES`` distorted copies of each test digit, copy-major).
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an int >= 8, got {image_size!r}")
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
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
    test_y = targets[test_idx]
    factors = None
    if task == "digits-affine":
        clean_test = pixels[test_idx]
        pixels, drawn = draw_distortion(pixels, torch.Generator().manual_seed(DISTORTION_SEED))
        test_copies = [pixels[test_idx]]
        factors = [{name: values[test_idx] for name, values in drawn.items()}]
        for copy in range(1, AFFINE_TEST_COPIES):
            generator = torch.Generator().manual_seed(DISTORTION_SEED + copy)
            images, drawn = draw_distortion(clean_test, generator)
            test_copies.append(images)
            factors.append(drawn)
        test_x = torch.cat(test_copies)
        test_y = test_y.repeat(AFFINE_TEST_COPIES)
        factors = {name: torch.cat([f[name] for f in factors]).contiguous() for name in FACTORS}
    else:
        test_x = pixels[test_idx]
    train_x = pixels[train_idx]
    mean, std = train_x.mean(), train_x.std()
    return DigitsSplit(
        train_x=((train_x - mean) / std).contiguous(),
        train_y=targets[train_idx].contiguous(),
        test_x=((test_x - mean) / std).contiguous(),
        test_y=test_y.contiguous(),
        test_factors=factors,
    )
