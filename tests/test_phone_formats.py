"""Photos as phones store them: HEIC (pillow-heif) and AVIF (Pillow) read as JPEG is, rotated as
they are meant to be seen, a HEIC with several images read for its primary one. The files are made
here, with the same libraries, not downloaded."""

from __future__ import annotations

import io

import numpy as np
import pillow_heif
import pytest
from PIL import Image

from benchmarks.images import fashion_photos
from model_store import ImageError, image_bytes_to_input, load_image, open_image
from model_store.engine import OnnxClassifier
from model_store.store import DEFAULT_MODEL_FILE
from tests.tolerance import clear_top1

SIZE = (1200, 900)  # large enough to be a photo, small enough for the HEVC encoder to be quick


LOGIT_BOUND = 1.0  # how far another lossy codec's pixels may move a logit of the LeNet


def saved(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, quality=90, **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    return [Image.open(io.BytesIO(data)).convert("RGB") for data in fashion_photos(12, SIZE, "PNG", grain=0)]


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_heic_and_avif_photos_get_the_answers_their_jpegs_get(photos, fmt):
    engine = OnnxClassifier(DEFAULT_MODEL_FILE, "cpu", threads=1)
    card = engine.card
    jpegs = np.stack([image_bytes_to_input(saved(p, "JPEG"), card) for p in photos])
    others = np.stack([image_bytes_to_input(saved(p, fmt), card) for p in photos])
    assert open_image(saved(photos[0], fmt)).format == fmt
    assert np.abs(others.astype(int) - jpegs).mean() < 2.0  # two lossy codecs, one image
    # The codecs' pixels differ by a grey level or two, which moves a logit by up to about 0.5
    # (measured: 0.54); an image whose top two logits are closer than twice the bound below is a tie
    # that either codec may break (one of these twelve is within 0.1), so only the others are compared.
    theirs, ours = engine.logits(others), engine.logits(jpegs)
    assert np.abs(theirs - ours).max() < LOGIT_BOUND
    clear = clear_top1(ours, LOGIT_BOUND)
    assert clear.sum() >= len(photos) // 2 and (theirs.argmax(1) == ours.argmax(1))[clear].all()


def upright_and_turned(photo: Image.Image) -> tuple[Image.Image, Image.Image, Image.Exif]:
    """A portrait photo, and the landscape pixels a phone stores for it with "turn 90 clockwise to view"."""
    upright = photo.transpose(Image.Transpose.ROTATE_90)  # portrait
    exif = Image.Exif()
    exif[0x0112] = 6
    return upright, upright.transpose(Image.Transpose.ROTATE_90), exif


def test_a_heic_is_turned_by_its_container_and_an_avif_by_its_exif(photos):
    upright, stored, exif = upright_and_turned(photos[0])
    expected = image_bytes_to_input(saved(upright, "PNG"), card := OnnxClassifier(DEFAULT_MODEL_FILE, "cpu", 1).card)
    heic = io.BytesIO()
    pillow_heif.from_pillow(stored).save(heic, quality=90, exif=exif.tobytes())  # written as irot, as iPhones do
    for data in (heic.getvalue(), saved(stored, "AVIF", exif=exif)):
        got = image_bytes_to_input(data, card).astype(int)
        assert np.abs(got - expected).mean() < 2.0
        assert np.abs(got - image_bytes_to_input(saved(stored, "PNG"), card)).mean() > 10  # not left on its side


def test_a_heic_with_several_images_is_read_for_its_primary_one():
    red, blue = Image.new("RGB", (64, 48), (200, 10, 10)), Image.new("RGB", (64, 48), (10, 10, 200))
    heif = pillow_heif.from_pillow(red)
    heif.add_from_pillow(blue)
    heif[0].info["primary"], heif[1].info["primary"] = False, True
    buffer = io.BytesIO()
    heif.save(buffer)
    image = load_image(open_image(buffer.getvalue()))  # not refused as an animation
    assert image.getpixel((0, 0))[2] > 150  # blue, the primary


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_a_truncated_heic_or_avif_is_named_as_such(fmt):
    data = saved(Image.new("RGB", (64, 48), (10, 200, 10)), fmt)
    with pytest.raises(ImageError, match=f"corrupt or truncated {fmt}"):
        image_bytes_to_input(data[: len(data) // 3], OnnxClassifier(DEFAULT_MODEL_FILE, "cpu", 1).card)
