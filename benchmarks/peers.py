"""What the servers the service is measured against share: decoding as a user writes it, and a
checkpoint of the shipped LeNet's architecture for the hand-written PyTorch server."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
from PIL import Image

from model_store import ImageError, ModelCard


def naive_input(data: bytes, card: ModelCard) -> np.ndarray:
    """What a hand-written server does with an image: ``Image.open(...).convert(...).resize(...)``,
    every pixel decoded, stretched to the card's size; no limits, no EXIF turn."""
    try:
        image = Image.open(io.BytesIO(data)).convert("L" if card.in_channels == 1 else "RGB")
        array = np.asarray(image.resize((card.width, card.height), Image.Resampling.BILINEAR))
    except Exception as err:  # the server answers 400, as a hand-written one would with a try around this
        raise ImageError(str(err)) from None
    return array[None] if array.ndim == 2 else np.ascontiguousarray(array.transpose(2, 0, 1))


def lenet_checkpoint(path: Path) -> Path:
    """The shipped LeNet's architecture and card with random weights (seed 0), as a checkpoint: the
    shipped ONNX holds no PyTorch weights (its BatchNorms are folded), and the time per image does
    not depend on their values."""
    import torch

    from model_store.store import DEFAULT_MODEL_FILE, read_onnx_card
    from training.checkpoint import save_checkpoint
    from training.models import build_model

    card = dataclasses.replace(read_onnx_card(DEFAULT_MODEL_FILE), metrics={}, export={})
    torch.manual_seed(0)
    save_checkpoint(path, build_model(card), card)
    return path
