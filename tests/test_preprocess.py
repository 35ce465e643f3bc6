"""The one image -> input function: decoding errors, colour and resize policy, and parity with training."""

import dataclasses
import io

import numpy as np
import pytest
import torch
from PIL import Image

from model_store import ImageError, ModelCard, decode_image, image_bytes_to_input, to_input
from tests.conftest import png_bytes
from tests.tolerance import clear_top1

GRAY = ModelCard(arch="lenet", class_names=("a", "b"), in_channels=1, height=28, width=28, mean=(0.5,), std=(0.5,))


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty image"),
        (b"hello, not an image", "not a supported image"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n", "not a supported image"),  # EPS would run Ghostscript
        (encode(Image.new("L", (64, 64), 128))[:60], "corrupt or truncated PNG"),
        (encode(Image.new("L", (64, 64), 128))[:20], "corrupt or truncated PNG image: its header cannot be read"),
        (encode(Image.fromarray(np.ones((8, 8), np.float32)), "TIFF"), "unsupported image mode 'F'"),
    ],
)
def test_unusable_bytes_raise_image_error_naming_the_problem(data, message):
    with pytest.raises(ImageError, match=message):
        decode_image(data)


def test_pixel_limit_refuses_before_decoding():
    with pytest.raises(ImageError, match="64x64 pixels exceeds the limit of 1,000"):
        decode_image(encode(Image.new("L", (64, 64))), max_pixels=1000)


def test_colour_images_become_the_cards_grayscale_and_palette_transparency_resolves():
    rgb = Image.new("RGB", (28, 28), (255, 0, 0))
    pixels = image_bytes_to_input(encode(rgb, "JPEG"), GRAY)
    assert pixels.shape == (1, 28, 28) and pixels.dtype == np.uint8
    assert abs(int(pixels.mean()) - 76) <= 2  # ITU-R 601 luma of pure red
    palette = Image.new("P", (28, 28), 0)
    palette.info["transparency"] = 0
    assert to_input(palette, GRAY).shape == (1, 28, 28)
    three = ModelCard(arch="x", class_names=("a",), in_channels=3, height=4, width=4, mean=(0.5,) * 3, std=(0.5,) * 3)
    out = to_input(Image.new("L", (4, 4), 9), three)
    assert out.shape == (3, 4, 4) and (out == 9).all()


def test_16_bit_images_are_rescaled_not_clipped():
    wide = np.arange(0, 65536, 65536 // 784, dtype=np.uint32)[:784].reshape(28, 28).astype(np.uint16)
    pixels = image_bytes_to_input(encode(Image.fromarray(wide)), GRAY)
    assert (pixels[0] == (wide // 257).astype(np.uint8)).all() and pixels.max() > 250


def test_transparency_is_composited_onto_black_the_colour_of_the_padding():
    half = Image.new("LA", (28, 28), (200, 128))  # grey at half opacity
    assert abs(int(image_bytes_to_input(encode(half), GRAY).mean()) - 100) <= 1
    invisible = Image.new("RGBA", (28, 28), (255, 255, 255, 0))  # white, fully transparent: nothing there
    assert image_bytes_to_input(encode(invisible), GRAY).max() == 0


def test_an_animated_image_is_refused_rather_than_guessing_a_frame():
    buffer = io.BytesIO()
    Image.new("L", (8, 8)).save(
        buffer, format="GIF", save_all=True, append_images=[Image.new("L", (8, 8), v) for v in (100, 200)]
    )
    with pytest.raises(ImageError, match="animated GIF with 3 frames; send a single still image"):
        decode_image(buffer.getvalue())


def test_resize_policies():
    wide = Image.new("L", (56, 28), 255)  # twice as wide as tall, all white
    fit = to_input(wide, GRAY)[0]
    assert (fit[:7] == 0).all() and (fit[-7:] == 0).all() and (fit[7:21] == 255).all()  # letterboxed
    stretch = to_input(wide, dataclasses.replace(GRAY, resize="stretch"))[0]
    assert (stretch == 255).all()
    half = np.zeros((28, 56), np.uint8)
    half[:, 28:] = 255  # right half white
    crop = to_input(Image.fromarray(half), dataclasses.replace(GRAY, resize="crop"))[0]
    assert (crop[:, :14] == 0).all() and (crop[:, 14:] == 255).all()  # the centre 28 columns


def test_a_crop_fraction_frames_as_torchvisions_resize_then_centre_crop():
    """crop_fraction 0.875 at 224: torchvision's evaluation recipe, Resize(256) then CenterCrop(224).
    A 256-pixel square needs no resampling under either, so the two must agree on every pixel; a
    224-pixel one is scaled up and cropped, not passed through."""
    from torchvision.transforms import CenterCrop, Compose, PILToTensor, Resize

    card = dataclasses.replace(GRAY, height=224, width=224, resize="crop", crop_fraction=0.875)
    recipe = Compose([Resize(256), CenterCrop(224), PILToTensor()])
    square = Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256), dtype=np.uint8))
    assert np.array_equal(to_input(square, card), recipe(square).numpy())
    assert np.array_equal(to_input(square, card)[0], np.asarray(square)[16:240, 16:240])
    small = Image.fromarray(np.asarray(square)[16:240, 16:240])
    assert not np.array_equal(to_input(small, card), to_input(small, dataclasses.replace(card, crop_fraction=1.0)))


def test_training_inputs_equal_serving_inputs_bit_for_bit(fashion_test):
    """Training's dataset transform vs the service's decode of the same image sent as PNG (gray and RGB)."""
    from training.fashion_mnist import FashionMNIST

    images, _ = fashion_test
    dataset = FashionMNIST("test", GRAY)
    for i in range(300):
        trained_on = dataset[i][0].numpy()
        assert np.array_equal(trained_on, image_bytes_to_input(png_bytes(images[i]), GRAY))
        assert np.array_equal(trained_on, image_bytes_to_input(png_bytes(images[i], "RGB"), GRAY))


def test_pytorch_and_onnx_give_the_same_logits_on_served_inputs(fashion_test, checkpoint, exported):
    """The checkpoint in PyTorch on training's inputs vs the exported graph on the service's inputs."""
    import onnxruntime as ort

    from training.checkpoint import load_model
    from training.fashion_mnist import FashionMNIST

    model, card, _ = load_model(checkpoint)
    dataset = FashionMNIST("test", card)
    with torch.no_grad():
        expected = model(torch.stack([dataset[i][0] for i in range(256)])).numpy()
    images, _ = fashion_test
    served = np.stack([image_bytes_to_input(png_bytes(images[i]), card) for i in range(256)])
    got = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"]).run(None, {"pixels": served})[0]
    # PyTorch's kernels against ONNX Runtime's: logits within the export's own bound, and the same
    # class for every image whose top two logits are further apart than that (tests/tolerance.py)
    assert np.abs(got - expected).max() <= 1e-4
    clear = clear_top1(expected, tolerance=1e-4)
    assert clear.mean() > 0.95 and (got.argmax(1) == expected.argmax(1))[clear].all()
