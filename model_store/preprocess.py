"""Image bytes -> model input, the one way every stage does it.

Training's evaluation transform, the export's verification, the HTTP service and the batch scorer
all call :func:`to_input`, so a served model sees exactly the pixels it was trained on. Only
decode, colour mode and resize happen here; scaling to float and mean/std normalization live
inside the exported graph (and in training's ``Normalize`` module, which is what gets exported).
Torch-free: serving imports it.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

from model_store.card import ModelCard

# Formats we decode. Restricting Pillow's plugins keeps out formats that are rarely images a client
# means to send and that reach for external programs or odd code paths (EPS runs Ghostscript).
SUPPORTED_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP")
# Modes we bring to L / RGB. 16-bit greyscale is rescaled to 8 bits (Pillow's own conversion would
# clip it); alpha is composited onto black, the colour of the padding. Float images are refused:
# their value range is not knowable from the file.
SUPPORTED_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "I;16", "I;16B", "I;16L", "I")
DEFAULT_MAX_PIXELS = 40_000_000  # a 40-megapixel photo decodes to ~120 MB of RGB; beyond is a bomb
# Magic bytes, to tell a damaged image of a supported format from bytes that are no image at all.
_SIGNATURES = {
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"\xff\xd8\xff": "JPEG",
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
}

_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


class ImageError(ValueError):
    """The bytes are not an image this system can use; the message says why, for the caller."""


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Read an image's header, refusing empty, unknown, oversized, animated and unsupported-mode input.

    Nothing is decoded yet (:func:`load_image` does that), so a decompression bomb is refused here
    for the cost of its header.
    """
    if not data:
        raise ImageError("empty image: 0 bytes received")
    try:
        image = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
    except Image.DecompressionBombError as err:
        raise ImageError(f"image too large: {err}") from None
    except Exception:  # UnidentifiedImageError, or OSError / SyntaxError from a broken header
        claimed = _signature_format(data)
        if claimed:  # right magic bytes, unreadable header: say so rather than "not an image"
            raise ImageError(f"corrupt or truncated {claimed} image: its header cannot be read") from None
        raise ImageError(
            f"not a supported image: {len(data)} bytes that are none of {', '.join(SUPPORTED_FORMATS)}"
        ) from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(f"image too large: {width}x{height} pixels exceeds the limit of {max_pixels:,}")
    if image.mode not in SUPPORTED_MODES:
        raise ImageError(
            f"unsupported image mode {image.mode!r} ({image.format}); supported: {', '.join(SUPPORTED_MODES)}"
        )
    frames = getattr(image, "n_frames", 1)
    if frames > 1:  # which frame would be the answer's? The client must choose.
        raise ImageError(f"animated {image.format} with {frames} frames; send a single still image")
    return image


def load_image(image: Image.Image) -> Image.Image:
    """Decode an image opened by :func:`open_image`, refusing a truncated or corrupt body."""
    try:
        image.load()
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError... for broken files
        raise ImageError(f"corrupt or truncated {image.format} image: {err}") from None
    return image


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode and fully load an image: :func:`open_image`, then :func:`load_image`."""
    return load_image(open_image(data, max_pixels))


def _signature_format(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((fmt for magic, fmt in _SIGNATURES.items() if data.startswith(magic)), None)


def resize_to_card(image: Image.Image, card: ModelCard) -> Image.Image:
    """Bring an image to the card's height x width with the card's resize policy.

    stretch: resize both sides, ignoring aspect ratio.
    fit: scale the longer side to fit, then pad with black, centred (how Fashion-MNIST was made).
    crop: scale the shorter side to fit, then take the centre.
    """
    size = (card.width, card.height)
    if image.size == size:
        return image
    resample = _FILTERS[card.interpolation]
    if card.resize == "stretch":
        return image.resize(size, resample)
    w, h = image.size
    scale = (min if card.resize == "fit" else max)(card.width / w, card.height / h)
    scaled = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), resample)
    left, top = (card.width - scaled.width) // 2, (card.height - scaled.height) // 2
    if card.resize == "crop":
        return scaled.crop((-left, -top, -left + card.width, -top + card.height))
    canvas = Image.new(image.mode, size)  # black
    canvas.paste(scaled, (left, top))
    return canvas


def to_input(image: Image.Image, card: ModelCard) -> np.ndarray:
    """A decoded image -> the model's input: uint8 array of shape (in_channels, height, width)."""
    image = ImageOps.exif_transpose(image)  # phone photos store rotation in EXIF, not in pixels
    image = _to_8bit_opaque(image)
    image = image.convert("L" if card.in_channels == 1 else "RGB")
    array = np.array(resize_to_card(image, card), dtype=np.uint8)  # a writable copy, not a view
    return array[None] if array.ndim == 2 else np.ascontiguousarray(array.transpose(2, 0, 1))


def _to_8bit_opaque(image: Image.Image) -> Image.Image:
    """16-bit greyscale -> L by scaling (not clipping); any transparency -> composited onto black."""
    if image.mode.startswith("I"):
        wide = np.asarray(image, dtype=np.uint32)
        return Image.fromarray((np.minimum(wide, 65535) // 257).astype(np.uint8), "L")
    if image.mode in ("LA", "PA", "RGBA") or "transparency" in image.info:
        # Palette, colour-key and alpha transparency all become an alpha channel, then one composite.
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", image.size, (0, 0, 0, 255)), rgba).convert("RGB")
    return image


def image_bytes_to_input(data: bytes, card: ModelCard, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Encoded image bytes -> model input; raises ImageError for anything unusable."""
    return to_input(decode_image(data, max_pixels), card)
