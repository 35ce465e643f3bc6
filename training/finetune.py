"""Fine-tuning as the course does it: start from saved weights, let the head follow the new class
count, and freeze the backbone or train it with a smaller learning rate than the new head."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from model_store.errors import UsageError
from training.checkpoint import DIGEST_KEY, read_torch_file, verify_weights

logger = logging.getLogger(__name__)


def load_pretrained(model: nn.Module, path: Path) -> set[str]:
    """Copy every tensor of ``path`` whose name and shape fit ``model``; returns the names loaded.

    ``path`` is a plain state_dict (e.g. torchvision's ImageNet weights, saved with torch.save) or a
    checkpoint of this project. Tensors that do not fit, such as a head sized for other classes, are
    left at their fresh initialization. An RGB stem loading into a grayscale model is summed over
    its input channels, the usual way to keep what the first filters learned. A file that is
    missing, unreadable, or a checkpoint whose weights fail their digest is a one-line error.
    """
    path = stored_checkpoint(path)
    source = read_torch_file(path, "--init-weights")
    if isinstance(source, dict) and ({"model", "card"} <= source.keys() or DIGEST_KEY in source):
        verify_weights(source, path)  # one of our checkpoints: its weights must match their digest
    if isinstance(source, dict) and isinstance(source.get("model"), dict):
        source = source["model"]
    if not isinstance(source, dict) or not all(isinstance(v, torch.Tensor) for v in source.values()):
        raise UsageError(f"--init-weights {path} holds no state_dict of tensors")
    target = model.state_dict()
    loaded: dict[str, torch.Tensor] = {}
    for key, tensor in source.items():
        # Our models wrap the network as "net."; torchvision's files name its modules directly.
        name = key if key in target else f"net.{key}"
        if name not in target:
            continue
        want = target[name]
        if (
            tensor.ndim == 4
            and want.ndim == 4
            and tensor.shape[1] == 3
            and want.shape[1] == 1
            and tensor.shape[0] == want.shape[0]
        ):
            tensor = tensor.sum(dim=1, keepdim=True)
        if tensor.shape == want.shape:
            loaded[name] = tensor
    if not loaded:
        raise UsageError(f"--init-weights {path}: no tensor fits this model (names or shapes differ)")
    model.load_state_dict(loaded, strict=False)
    fresh = sorted(n for n, _ in model.named_parameters() if n not in loaded)
    logger.info("loaded %d tensors from %s; trained from scratch: %s", len(loaded), path, fresh)
    return set(loaded)


def stored_checkpoint(path: Path) -> Path:
    """``path``, or where it names a model of the store (``NAME`` or ``NAME:VERSION``, no file of
    that name here), the checkpoint registered with it, digest-checked."""
    text = str(path)
    if path.exists() or "/" in text or text.endswith((".pt", ".pth")):
        return path
    from model_store.store import checkpoint_of  # bentoml: imported only for a tag

    return checkpoint_of(text)


def parameter_groups(model: nn.Module, pretrained: set[str], freeze: bool, backbone_lr_scale: float) -> list[dict]:
    """One group for the new parameters, one (smaller lr, or frozen) for those loaded."""
    head = [p for n, p in model.named_parameters() if n not in pretrained]
    backbone = [p for n, p in model.named_parameters() if n in pretrained]
    if freeze:
        for p in backbone:
            p.requires_grad_(False)
        return [{"params": head}]
    return [{"params": head}, {"params": backbone, "lr_scale": backbone_lr_scale}] if backbone else [{"params": head}]
