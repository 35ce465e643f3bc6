"""The images the benchmarks send: real Fashion-MNIST test images, encoded as a client would."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def fashion_images(count: int) -> np.ndarray:
    """``count`` test images, uint8 [count, 28, 28], read as training reads them; past the 10,000
    of the test set, the same images again."""
    from training.fashion_mnist_files import load_fashion_mnist

    images = load_fashion_mnist("test")[0]
    return images[np.arange(count) % len(images)]


def encode(image: Image.Image, fmt: str) -> bytes:
    """``image`` as a file of format ``fmt`` (JPEGs at quality 90)."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def upscaled(image: np.ndarray, side: int, fmt: str = "JPEG") -> bytes:
    """A test image as a camera would store a photo of it: upscaled (bicubic) to ``side`` square,
    in ``fmt``; square, so that the garment fills the frame as in training."""
    return encode(Image.fromarray(image).convert("RGB").resize((side, side), Image.Resampling.BICUBIC), fmt)


def fashion_pngs(count: int) -> list[bytes]:
    return [encode(Image.fromarray(a), "PNG") for a in fashion_images(count)]


def fashion_photos(
    count: int, size: tuple[int, int] = (4000, 3000), fmt: str = "JPEG", grain: float = 8.0
) -> list[bytes]:
    """``count`` test images as a phone sends a photo: upscaled (bicubic) to fill the height of a
    ``size`` frame, with the sensor's grain (Gaussian, ``grain`` grey levels) that gives a real photo
    its texture and its file size (a 12-megapixel JPEG at quality 90: 2 to 3 MB), in ``fmt``."""
    rng = np.random.default_rng(0)
    width, height = size
    photos = []
    for image in fashion_images(count):
        frame = np.zeros((height, width, 3), np.uint8)
        garment = Image.fromarray(image).convert("RGB").resize((height, height), Image.Resampling.BICUBIC)
        frame[:, (width - height) // 2 : (width + height) // 2] = np.asarray(garment)
        noisy = np.clip(frame + rng.normal(0, grain, frame.shape), 0, 255).astype(np.uint8)
        photos.append(encode(Image.fromarray(noisy), fmt))
    return photos
