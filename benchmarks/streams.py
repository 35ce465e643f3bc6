"""What the drift benchmark and its test share: images as a broken camera would send them, and
streams of answers replayed through a drift window (``model_store.drift.Window``)."""

from __future__ import annotations

from typing import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from model_store import to_input
from model_store.drift import Window
from model_store.engine import OnnxClassifier

# Clothes as a broken camera or upstream resize would send them: each a function of one test image.
CORRUPTIONS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "clothes, blurred (Gaussian, radius 1.5)": lambda image: image.filter(ImageFilter.GaussianBlur(1.5)),
    "clothes, contrast halved": lambda image: ImageEnhance.Contrast(image).enhance(0.5),
    "clothes, rotated 90 degrees": lambda image: image.transpose(Image.Transpose.ROTATE_90),
}
FOOTWEAR = (5, 7, 9)  # Sandal, Sneaker, Ankle boot: clothes still, but a shop that now sells shoes only


def answers(engine: OnnxClassifier, images: list[Image.Image]) -> tuple[np.ndarray, ...]:
    """What a window stores of each image's answer: (classes, reason codes, distances, features)."""
    pixels = np.stack([to_input(image, engine.card) for image in images])
    outcomes = engine.outcomes(pixels, batch_size=512)
    codes = engine.card.calibration.reason_codes(
        outcomes.probabilities.max(axis=1), outcomes.energies, outcomes.distances
    )
    return outcomes.probabilities.argmax(axis=1), codes, outcomes.distances, outcomes.features


def replay(window: Window, stream: list[tuple[tuple[np.ndarray, ...], np.ndarray]], every: int) -> list:
    """Feed ``stream`` (answer arrays, the rows of them in order) to the window ``every`` images at a
    time; after each step, (images fed so far, the statistics above their level, the
    :class:`~model_store.drift.Reading`, None while the window holds too few answers)."""
    looks = []
    for parts, rows in stream:
        for start in range(0, len(rows), every):
            chosen = rows[start : start + every]
            window.add(*(part[chosen] for part in parts))
            reading = window.read()
            looks.append((window.seen, reading.alerts if reading else [], reading))
    return looks
