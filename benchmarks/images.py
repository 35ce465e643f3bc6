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


def fashion_pngs(count: int) -> list[bytes]:
    return [encode(Image.fromarray(a), "PNG") for a in fashion_images(count)]
