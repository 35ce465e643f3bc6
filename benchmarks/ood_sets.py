"""The images the out-of-distribution benchmarks use: Fashion-MNIST's test set, and sets of images
that are not clothes, all from inside installed packages (nothing is downloaded): scikit-learn's
1,797 handwritten digits (8x8, 0..16, white on black like Fashion-MNIST); scikit-image's sample
photographs, each whole and as random square crops; uniform noise; and blank images of every grey
level. And the AUROC they are scored by."""

from __future__ import annotations

import numpy as np
from PIL import Image

# scikit-image's bundled photographs (its synthetic drawings, e.g. checkerboard or logo, left out)
PHOTOS = (
    "astronaut",
    "brick",
    "camera",
    "cell",
    "chelsea",
    "clock",
    "coffee",
    "coins",
    "grass",
    "gravel",
    "hubble_deep_field",
    "immunohistochemistry",
    "microaneurysms",
    "moon",
    "page",
    "retina",
    "rocket",
    "text",
)
CROPS_PER_PHOTO = 49  # besides the whole photo
NOISE_IMAGES = 1000
FASHION_SIZE = (28, 28)  # noise and blank images are made at Fashion-MNIST's size; to_input resizes them


def not_clothes(rng: np.random.Generator) -> dict[str, list[Image.Image]]:
    """Each set of images that are not clothes, by the name the tables show."""
    handwritten = digits()
    return {
        f"scikit-learn digits ({len(handwritten):,})": handwritten,
        f"scikit-image photographs ({len(PHOTOS)} x {1 + CROPS_PER_PHOTO} crops)": photos(rng),
        f"uniform noise ({NOISE_IMAGES:,})": noise(rng, FASHION_SIZE),
        "blank, every grey level (256)": blank(FASHION_SIZE),
    }


def auroc(in_distribution: np.ndarray, out_of_distribution: np.ndarray) -> float:
    """The chance that an out-of-distribution image scores higher than an in-distribution one (ties
    count half): the area under the ROC curve of the score as a detector of the former."""
    ranked = np.sort(in_distribution)
    below = np.searchsorted(ranked, out_of_distribution, "left")
    ties = np.searchsorted(ranked, out_of_distribution, "right") - below
    return float(np.mean((below + 0.5 * ties) / len(ranked)))


def fashion_test() -> tuple[list[Image.Image], np.ndarray]:
    from training.fashion_mnist_files import load_fashion_mnist

    images, labels = load_fashion_mnist("test")
    return [Image.fromarray(image) for image in images], np.asarray(labels)


def digits() -> list[Image.Image]:
    from sklearn.datasets import load_digits

    return [Image.fromarray(np.round(image * 255 / 16).astype(np.uint8)) for image in load_digits().images]


def photos(rng: np.random.Generator) -> list[Image.Image]:
    import skimage.data
    from skimage.util import img_as_ubyte

    images = []
    for name in PHOTOS:
        photo = Image.fromarray(img_as_ubyte(getattr(skimage.data, name)()))
        images.append(photo)
        short = min(photo.size)
        for _ in range(CROPS_PER_PHOTO):
            side = int(short * rng.uniform(0.15, 0.6))
            left, top = rng.integers(0, photo.width - side + 1), rng.integers(0, photo.height - side + 1)
            images.append(photo.crop((left, top, left + side, top + side)))
    return images


def noise(rng: np.random.Generator, size: tuple[int, int]) -> list[Image.Image]:
    return [Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)) for _ in range(NOISE_IMAGES)]


def blank(size: tuple[int, int]) -> list[Image.Image]:
    return [Image.fromarray(np.full(size, level, np.uint8)) for level in range(256)]
