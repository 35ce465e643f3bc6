"""A class-activation map drawn over the image it explains, as PNG: numpy and Pillow only."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

# A jet-like colour map, blue (cold) -> cyan -> yellow -> red (hot), as piecewise-linear ramps.
_STOPS = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
_COLOURS = np.array([[0, 0, 143], [0, 128, 255], [128, 255, 128], [255, 200, 0], [200, 0, 0]], np.float32)


def colour_map(cam: np.ndarray) -> np.ndarray:
    """A map [H, W] of any range -> uint8 RGB [H, W, 3], its minimum blue and its maximum red."""
    low, spread = float(cam.min()), float(np.ptp(cam))
    scaled = (cam - low) / spread if spread > 0 else np.zeros_like(cam)
    rgb = np.stack([np.interp(scaled, _STOPS, _COLOURS[:, c]) for c in range(3)], axis=-1)
    return rgb.round().astype(np.uint8)


def overlay_png(pixels: np.ndarray, cam: np.ndarray, alpha: float = 0.5) -> bytes:
    """The model's input ``pixels`` (uint8 [C, H, W], C 1 or 3) with ``cam`` [H, W] coloured and
    blended over it at ``alpha``, as PNG bytes."""
    image = pixels.transpose(1, 2, 0).astype(np.float32)
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    blended = (1 - alpha) * image + alpha * colour_map(cam).astype(np.float32)
    buffer = io.BytesIO()
    Image.fromarray(blended.round().clip(0, 255).astype(np.uint8), "RGB").save(buffer, format="PNG")
    return buffer.getvalue()
