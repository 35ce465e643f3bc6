"""Checkpoints: a state_dict plus the card that explains it, loadable with ``weights_only=True``."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model_store import ModelCard
from model_store.files import atomic_output
from training.models import build_model

REQUIRED_KEYS = ("model", "card")


def save_checkpoint(path: Path, model: nn.Module, card: ModelCard, **extra: Any) -> None:
    """Atomically write {"model": state_dict, "card": card dict, **extra}; extra must be weights_only-safe."""
    with atomic_output(path) as f:
        torch.save({"model": model.state_dict(), "card": card.to_dict(), **extra}, f)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint dict, or a ValueError/FileNotFoundError that says what is wrong with the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, pickle.UnpicklingError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"checkpoint {path} is not a readable PyTorch checkpoint (truncated?): {first_line}") from None
    if not isinstance(payload, dict) or any(k not in payload for k in REQUIRED_KEYS):
        raise ValueError(f"checkpoint {path} lacks the keys {REQUIRED_KEYS}; was it written by `python -m training`?")
    return payload


def load_model(path: Path) -> tuple[nn.Sequential, ModelCard, dict[str, Any]]:
    """Rebuild the network a checkpoint describes, with its weights, in eval mode."""
    payload = read_checkpoint(path)
    card = ModelCard.from_dict(payload["card"])
    model = build_model(card)
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:400]
        raise ValueError(
            f"checkpoint {path}: weights do not fit a {card.arch} with {card.num_classes} classes: {detail}"
        ) from None
    return model.eval(), card, payload
