"""A card's decode "scaled": a large JPEG decoded at the scale the model needs gives the pixels a
full decode gives (within a grey level or so), its limits count what is really decoded, and every
other format, and every "full" card, decodes as before."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
from PIL import Image

from model_store import ImageError, ModelCard, image_bytes_to_input, open_image
from model_store.preprocess import COEFFICIENT_BYTES, REDUCING_GAP, decode_cost_bytes

FULL = ModelCard(
    arch="lenet_bn", class_names=tuple("abcdefghij"), in_channels=1, height=28, width=28, mean=(0.3,), std=(0.35,)
)
SCALED = dataclasses.replace(FULL, decode="scaled")
RGB_224 = dataclasses.replace(
    SCALED, in_channels=3, height=224, width=224, mean=(0.5,) * 3, std=(0.25,) * 3, resize="crop"
)


def photo(image: np.ndarray, size: tuple[int, int], fmt: str = "JPEG", **save) -> bytes:
    """A Fashion-MNIST image as a phone would send a photo of it: upscaled onto a ``size`` canvas."""
    side = min(size)
    canvas = Image.new("RGB", size)
    canvas.paste(
        Image.fromarray(image).convert("RGB").resize((side, side), Image.Resampling.BICUBIC), ((size[0] - side) // 2, 0)
    )
    buffer = io.BytesIO()
    canvas.save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}), **save)
    return buffer.getvalue()


@pytest.mark.parametrize("card", [SCALED, RGB_224], ids=["28x28 grey fit", "224x224 RGB crop"])
def test_a_large_jpeg_decodes_at_a_smaller_scale_to_the_pixels_of_a_full_decode(fashion_test, card):
    data = photo(fashion_test[0][0], (4000, 3000))
    opened = open_image(data, card=card)
    # The smallest of 1/2, 1/4, 1/8 that leaves REDUCING_GAP x the resized size on each side.
    scale = 8 if card.height == 28 else 4
    assert opened.size == (4000 // scale, 3000 // scale)
    assert min(opened.size) >= REDUCING_GAP * min(card.height, card.width) * 3000 // 4000 or card.resize == "crop"
    scaled = image_bytes_to_input(data, card).astype(int)
    full = image_bytes_to_input(data, dataclasses.replace(card, decode="full")).astype(int)
    assert scaled.shape == full.shape and np.abs(scaled - full).max() <= 3 and np.abs(scaled - full).mean() < 0.5


def test_exif_orientation_is_honoured_at_the_smaller_scale_too(fashion_test):
    upright = photo(fashion_test[0][1], (3000, 4000))  # portrait
    turned = Image.open(io.BytesIO(upright)).transpose(Image.Transpose.ROTATE_90)  # stored landscape...
    exif = Image.Exif()
    exif[0x0112] = 6  # ...with "rotate 90 clockwise to view"
    buffer = io.BytesIO()
    turned.save(buffer, format="JPEG", quality=90, exif=exif)
    assert open_image(buffer.getvalue(), card=SCALED).size == (4000 // 8, 3000 // 8)
    got = image_bytes_to_input(buffer.getvalue(), SCALED).astype(int)
    assert np.abs(got - image_bytes_to_input(upright, FULL)).mean() < 1.0


def test_small_images_and_other_formats_decode_exactly_as_before(fashion_test):
    small = io.BytesIO()
    Image.fromarray(fashion_test[0][2]).save(small, format="JPEG", quality=90)  # 28x28: no smaller scale
    png = photo(fashion_test[0][2], (800, 600), "PNG")  # PNG cannot decode scaled
    for data in (small.getvalue(), png):
        assert np.array_equal(image_bytes_to_input(data, SCALED), image_bytes_to_input(data, FULL))
    assert open_image(png, card=SCALED).size == (800, 600)


def test_a_50_megapixel_jpeg_is_accepted_scaled_and_refused_whole(fashion_test):
    data = photo(fashion_test[0][3], (8160, 6120))  # 50 MP, a 50 MP phone sensor's frame
    with pytest.raises(ImageError, match="image too large: 8160x6120 pixels exceeds the limit of 40,000,000"):
        image_bytes_to_input(data, FULL)
    assert image_bytes_to_input(data, SCALED).shape == (1, 28, 28)


def test_a_progressive_jpeg_pays_for_its_coefficients_at_full_size(fashion_test):
    """libjpeg keeps every coefficient of a progressive JPEG until its last scan, whatever the
    scale it outputs: the memory limit counts them."""
    baseline = photo(fashion_test[0][4], (4000, 3000))
    progressive = photo(fashion_test[0][4], (4000, 3000), progressive=True)
    small_image = open_image(baseline, card=SCALED)
    assert (
        decode_cost_bytes(open_image(progressive, card=SCALED), (4000, 3000))
        == decode_cost_bytes(small_image, (4000, 3000)) + COEFFICIENT_BYTES * 3 * 4000 * 3000
    )
    limit = decode_cost_bytes(small_image, (4000, 3000)) + 2**20  # room for the small decode, not the coefficients
    assert image_bytes_to_input(baseline, SCALED, max_decode_bytes=limit).shape == (1, 28, 28)
    with pytest.raises(ImageError, match="image too costly to decode"):
        image_bytes_to_input(progressive, SCALED, max_decode_bytes=limit)
