"""Image bytes -> model input, the one way every stage does it.

Training's evaluation transform, the export's verification, the HTTP service and the batch scorer
all call :func:`to_input`, so a served model sees exactly the pixels it was trained on. Only
decode, colour mode and resize happen here; scaling to float and mean/std normalization live
inside the exported graph (and in training's ``Normalize`` module, which is what gets exported).
Torch-free: serving imports it.
"""

from __future__ import annotations

import ctypes
import io
import logging
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import pillow_heif
from PIL import ExifTags, Image, ImageOps

from model_store.card import ModelCard
from model_store.errors import UsageError

logger = logging.getLogger(__name__)

# Formats we decode. Restricting Pillow's plugins keeps out formats that are rarely images a client
# means to send and that reach for external programs or odd code paths (EPS runs Ghostscript).
# HEIF is HEIC, as iPhones store photos (pillow-heif's plugin); AVIF is Pillow's own.
SUPPORTED_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "HEIF", "AVIF")
# A HEIC is decoded to its primary image alone: not its thumbnails, depth maps or other auxiliary
# images, which pillow-heif would otherwise read along with it. libheif applies the container's
# rotation and mirroring (irot, imir) as it decodes, and pillow-heif then sets the EXIF orientation
# to 1, as the HEIF standard has readers ignore it: to_input's EXIF turn leaves a HEIC as it is.
pillow_heif.options.THUMBNAILS = pillow_heif.options.DEPTH_IMAGES = pillow_heif.options.AUX_IMAGES = False
pillow_heif.register_heif_opener()
# Modes we bring to L / RGB. 16-bit greyscale is rescaled to 8 bits (Pillow's own conversion would
# clip it); alpha is composited onto black, the colour of the padding. Float images are refused:
# their value range is not knowable from the file.
SUPPORTED_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "I;16", "I;16B", "I;16L", "I")
DEFAULT_MAX_PIXELS = 40_000_000  # a 40-megapixel photo decodes to ~160 MB of RGB; beyond is a bomb
# A progressive JPEG is decoded once per scan: libjpeg writes 10 (colour) or 6 (grey), optimisers a
# few more. A file of 10,000 tiny scans took 29 s to decode at 731 KB; its header is cheap to count.
MAX_JPEG_SCANS = 100
# Peak memory of one decode, estimated from the header: the decoded image, its converted copy and
# the decoder's own buffers (a progressive JPEG keeps every coefficient), each stored by Pillow as
# rows of up to 4 bytes a pixel plus a row pointer and allocator slack. Measured on Pillow 13: a
# 40-megapixel RGB image peaks at 340 MB (estimate 480), a 1 x 40,000,000 PNG at 950 MB (2,040).
DECODE_COPIES, ROW_OVERHEAD_BYTES = 3, 16
DEFAULT_MAX_DECODE_BYTES = 512 * 2**20  # admits a 40-megapixel RGB photo, refuses 1-pixel-wide bombs
# A card's decode "scaled": a JPEG is decoded by libjpeg at 1/2, 1/4 or 1/8 scale in the DCT domain
# (straight to greyscale for a 1-channel card), the smallest scale that still leaves REDUCING_GAP
# times the size the resize to the card produces, as Pillow's own thumbnail() does (its
# reducing_gap, 2.0): the resize still averages at least 2x2 decoded pixels into each of its own. A
# 12-megapixel photo for a 28x28 model decodes 64x fewer pixels. Other formats decode whole.
REDUCING_GAP = 2
# A progressive JPEG keeps every DCT coefficient until its last scan, at full size whatever the
# scale it outputs: 2 bytes per sample of each component (an upper bound under chroma subsampling).
COEFFICIENT_BYTES = 2
# glibc hands a freed heap top back to the kernel once it passes 128 KB, and serves allocations over
# a threshold (a decoded image, a 2 MB upload) from fresh mappings. A process that handles image after
# image then page-faults every page of every buffer again: in a decoder process a 1024x768 WebP took
# 17 ms of CPU instead of 9, a 12 MP PNG 188 instead of 152; a service worker spent 4.5 of its 9.3 ms
# on a 12 MP JPEG's request copying its body into fresh pages. Keeping HEAP_PAD_BYTES free at the top
# of the heap, and taking buffers under 32 MB from it, lets each image reuse the last one's pages.
HEAP_PAD_BYTES = 64 * 2**20
HEAP_MMAP_THRESHOLD_BYTES = 32 * 2**20  # glibc's largest allowed on 64-bit
_M_TOP_PAD, _M_MMAP_THRESHOLD = -2, -3  # from glibc's malloc.h
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


class ImageError(UsageError):
    """The bytes are not an image this system can use; the message says why, for the caller."""


@contextmanager
def _as_image_error(what: str, image: Image.Image | None = None) -> Iterator[None]:
    """The one boundary between Pillow and the rest: whatever a hostile file makes Pillow raise
    (SyntaxError from bad EXIF, struct.error, TypeError, MemoryError...) becomes an ImageError. The
    types we did not expect are logged, so that a new one is seen, but never reach the caller."""
    try:
        yield
    except ImageError:
        raise
    except MemoryError:
        raise ImageError(f"not enough memory to {what} this image") from None
    except Exception as err:
        kind = f"{image.format} image" if image is not None and image.format else "image"
        logger.info("%s failed on a hostile or broken %s: %s: %s", what, kind, type(err).__name__, err)
        damage = "corrupt or truncated" if what == "decode" else "corrupt"  # a short body fails the decode
        raise ImageError(f"{damage} {kind}: cannot {what} it ({type(err).__name__}: {err})") from None


def keep_freed_memory() -> int:
    """For a process that handles image after image (a service worker, a decoder process, a scoring
    worker): keep freed memory for the next image rather than give it back (see HEAP_PAD_BYTES).
    Returns how many bytes the process may now hold beyond what it uses; 0 where the C library is
    not glibc (musl's mallopt does nothing, macOS has none), which then stays as it was."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return 0
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    if mallopt(_M_TOP_PAD, HEAP_PAD_BYTES) and mallopt(_M_MMAP_THRESHOLD, HEAP_MMAP_THRESHOLD_BYTES):
        return HEAP_PAD_BYTES
    return 0


def decode_cost_bytes(image: Image.Image, source_size: tuple[int, int] | None = None) -> int:
    """Estimated peak memory of decoding and converting ``image``, from its header (see DECODE_COPIES).
    ``source_size``: the size in the file, when the decode is scaled (:func:`draft`) to ``image.size``."""
    width, height = image.size
    pixel_bytes = 1 if image.mode in ("1", "L", "P") else 2 if image.mode.startswith("I;16") else 4
    cost = DECODE_COPIES * height * (width * pixel_bytes + ROW_OVERHEAD_BYTES)
    if source_size is not None and source_size != image.size and image.info.get("progressive"):
        components = getattr(image, "layers", len(image.getbands()))  # in the file, whatever the output
        cost += COEFFICIENT_BYTES * components * source_size[0] * source_size[1]
    return cost


def draft(image: Image.Image, card: ModelCard) -> tuple[int, int]:
    """Ask a JPEG's decoder for the smallest scale (and for a 1-channel card, greyscale) that still
    leaves REDUCING_GAP times the size the resize to ``card`` will produce; returns the size in the
    file. Before anything is decoded; other formats are left as they are."""
    source = image.size
    if image.format != "JPEG":
        return source
    # The resize sees the image as it stands after its EXIF orientation: a quarter turn swaps its sides.
    turned = image.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8)
    width, height = resized_size(*(source[::-1] if turned else source), card)
    wanted = (width * REDUCING_GAP, height * REDUCING_GAP)
    image.draft("L" if card.in_channels == 1 else "RGB", wanted[::-1] if turned else wanted)
    return source


def open_image(
    data: bytes,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES,
    card: ModelCard | None = None,
) -> Image.Image:
    """Read an image's header, refusing empty, unknown, oversized, costly, animated and unsupported-mode input.

    Nothing is decoded yet (:func:`load_image` does that), so a decompression bomb is refused here
    for the cost of its header. With a ``card`` whose decode is "scaled", the decode is set to the
    size that card needs (:func:`draft`), and the pixel and memory limits apply to what will really
    be decoded: a 48-megapixel JPEG for a 28x28 model decodes 0.75 megapixels.
    """
    with _as_image_error("read the header of"):
        return _open(data, max_pixels, max_decode_bytes, card)


def _open(data: bytes, max_pixels: int, max_decode_bytes: int, card: ModelCard | None) -> Image.Image:
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
    source = draft(image, card) if card is not None and card.decode == "scaled" else None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(f"image too large: {width}x{height} pixels exceeds the limit of {max_pixels:,}")
    if image.mode not in SUPPORTED_MODES:
        raise ImageError(
            f"unsupported image mode {image.mode!r} ({image.format}); supported: {', '.join(SUPPORTED_MODES)}"
        )
    cost = decode_cost_bytes(image, source)
    if cost > max_decode_bytes:
        raise ImageError(
            f"image too costly to decode: {width}x{height} {image.mode} needs about {cost / 2**20:,.0f} MB, "
            f"above the limit of {max_decode_bytes / 2**20:,.0f} MB per image"
        )
    if image.format == "JPEG" and (scans := data.count(b"\xff\xda")) > MAX_JPEG_SCANS:  # SOS markers
        raise ImageError(f"progressive JPEG with {scans} scans; at most {MAX_JPEG_SCANS} are decoded")
    frames = getattr(image, "n_frames", 1)
    # Which frame of an animation would be the answer's? The client must choose. A HEIC with several
    # images (a burst, a collection) names its primary one, which Image.open has selected.
    if frames > 1 and image.format != "HEIF":
        raise ImageError(f"animated {image.format} with {frames} frames; send a single still image")
    return image


def load_image(image: Image.Image) -> Image.Image:
    """Decode an image opened by :func:`open_image`, refusing a truncated or corrupt body."""
    with _as_image_error("decode", image):
        image.load()
    return image


def decode_image(
    data: bytes,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES,
    card: ModelCard | None = None,
) -> Image.Image:
    """Decode and fully load an image: :func:`open_image`, then :func:`load_image`."""
    return load_image(open_image(data, max_pixels, max_decode_bytes, card))


def _signature_format(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[4:8] == b"ftyp":  # an ISO media file: its major brand says which
        return {b"avif": "AVIF", b"avis": "AVIF", b"heic": "HEIF", b"heix": "HEIF", b"mif1": "HEIF"}.get(data[8:12])
    return next((fmt for magic, fmt in _SIGNATURES.items() if data.startswith(magic)), None)


def resize_to_card(image: Image.Image, card: ModelCard) -> Image.Image:
    """Bring an image to the card's height x width with the card's resize policy.

    stretch: resize both sides, ignoring aspect ratio.
    fit: scale the longer side to fit, then pad with black, centred (how Fashion-MNIST was made).
    crop: scale the shorter side to fit (to ``1 / card.crop_fraction`` of it), then take the centre.
    """
    size = (card.width, card.height)
    if image.size == size and card.crop_fraction == 1:
        return image
    resample = _FILTERS[card.interpolation]
    scaled = image.resize(resized_size(*image.size, card), resample)
    if card.resize == "stretch":
        return scaled
    left, top = (card.width - scaled.width) // 2, (card.height - scaled.height) // 2
    if card.resize == "crop":
        return scaled.crop((-left, -top, -left + card.width, -top + card.height))
    canvas = Image.new(image.mode, size)  # black
    canvas.paste(scaled, (left, top))
    return canvas


def resized_size(width: int, height: int, card: ModelCard) -> tuple[int, int]:
    """The size :func:`resize_to_card` resizes a ``width`` x ``height`` image to, before any pad or crop."""
    if card.resize == "stretch":
        return card.width, card.height
    if card.resize == "fit":
        scale = min(card.width / width, card.height / height)
    else:  # torchvision's Resize(256) then CenterCrop(224) is a crop_fraction of 0.875
        scale = max(card.width / width, card.height / height) / card.crop_fraction
    return max(1, round(width * scale)), max(1, round(height * scale))


def to_input(image: Image.Image, card: ModelCard) -> np.ndarray:
    """A decoded image -> the model's input: uint8 array of shape (in_channels, height, width)."""
    with _as_image_error("convert", image):
        return _to_input(image, card)


def _to_input(image: Image.Image, card: ModelCard) -> np.ndarray:
    # Phone photos store rotation in EXIF, not in pixels. Asked first because exif_transpose
    # copies the whole image even when there is nothing to turn.
    if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:
        image = ImageOps.exif_transpose(image)
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


def image_bytes_to_input(
    data: bytes, card: ModelCard, max_pixels: int = DEFAULT_MAX_PIXELS, max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES
) -> np.ndarray:
    """Encoded image bytes -> model input, decoded as ``card`` says; raises ImageError, and only
    ImageError, for anything unusable."""
    return to_input(decode_image(data, max_pixels, max_decode_bytes, card), card)
