"""Checkpoints: a state_dict plus the card that explains it, loadable with ``weights_only=True``.

Each checkpoint also carries a SHA-256 digest of its weights, checked on every read: torch.load
does not check the zip's CRCs, so bytes flipped inside a tensor would otherwise load silently.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model_store import ModelCard
from model_store.errors import UsageError
from model_store.files import atomic_output
from training.models import build_model

logger = logging.getLogger(__name__)
REQUIRED_KEYS = ("model", "card")
# Only the model weights are digested: they are what export, evaluate, fine-tuning and serving
# read. The optimizer state only steers a resumed run, is never shipped, and its nested
# structure would need a digest of its own for little gain.
DIGEST_KEY = "weights_sha256"


def weights_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """Hex SHA-256 over each tensor's name, dtype, shape and raw bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def save_checkpoint(path: Path, model: nn.Module, card: ModelCard, **extra: Any) -> None:
    """Atomically write {"model": state_dict, "card": card dict, digest, **extra}; extra must be weights_only-safe."""
    weights = model.state_dict()
    with atomic_output(path) as f:
        torch.save({"model": weights, "card": card.to_dict(), DIGEST_KEY: weights_digest(weights), **extra}, f)


def read_torch_file(path: Path, what: str = "checkpoint") -> Any:
    """torch.load on CPU with ``weights_only=True``, or a one-line UsageError naming ``what``."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{what} {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # damaged files raise RuntimeError, ValueError, KeyError, EOFError, UnpicklingError...
        lines = str(err).strip().splitlines()
        detail = lines[0][:200] if lines else type(err).__name__
        raise UsageError(f"{what} {path} is not a readable PyTorch checkpoint (truncated?): {detail}") from None


def verify_weights(payload: dict[str, Any], path: Path) -> None:
    """Check ``payload["model"]`` against the digest stored beside it; a UsageError names the file if it fails.

    Checkpoints written before digests existed have none: they load, with a warning that they cannot be verified.
    """
    weights = payload.get("model")
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise UsageError(f"checkpoint {path}: its weights are not a state_dict of tensors")
    if DIGEST_KEY not in payload:
        logger.warning("checkpoint %s has no weights digest (written before digests); its weights are unverified", path)
        return
    if weights_digest(weights) != payload[DIGEST_KEY]:
        raise UsageError(f"checkpoint {path}: the weights are corrupt (SHA-256 digest mismatch); restore or retrain it")


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint dict, its weights verified, or a UsageError that says what is wrong."""
    payload = read_torch_file(path)
    if not isinstance(payload, dict) or any(k not in payload for k in REQUIRED_KEYS):
        raise UsageError(f"checkpoint {path} lacks the keys {REQUIRED_KEYS}; was it written by `python -m training`?")
    verify_weights(payload, path)
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
        raise UsageError(
            f"checkpoint {path}: weights do not fit a {card.arch} with {card.num_classes} classes: {detail}"
        ) from None
    return model.eval(), card, payload


# What a shipped or registered checkpoint needs: the weights and what explains them. The optimizer,
# scheduler and random states only resume a run, and would triple the file.
TRAINING_STATE = ("optimizer", "scheduler", "scaler", "rng")


def without_training_state(source: Path, target: Path) -> None:
    """Write ``source``'s checkpoint to ``target`` without :data:`TRAINING_STATE` (read and written
    whole, weights verified): what the repository ships beside its graphs."""
    payload = read_checkpoint(source)
    with atomic_output(target) as f:
        torch.save({k: v for k, v in payload.items() if k not in TRAINING_STATE}, f)


if __name__ == "__main__":  # the Makefile's shipped models
    import argparse
    import sys

    from model_store.cli import run

    parser = argparse.ArgumentParser(
        prog="python -m training.checkpoint", description="Copy a checkpoint without its training state."
    )
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path)
    sys.exit(run(lambda args: without_training_state(args.source, args.target), parser))
