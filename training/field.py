"""Fine-tune the live model on what the field taught it.

    python -m training finetune --from fashion-lenet --reviewed reviewed/ --output-dir runs/field
    python -m export --checkpoint runs/field/last.pt --output field.onnx
    python -m model_store register field.onnx --name fashion-lenet --checkpoint runs/field/last.pt

``--from`` is a stored model (``NAME`` or ``NAME:VERSION``, registered with its checkpoint) or a
checkpoint file. The run keeps the parent's card (its mean and std are part of what its weights
learned) and its recipe, and changes only what the seeds' fine-tuning recipe changes:

- **Data.** The reviewed images (``python -m model_store captures export``) mixed with a replay of
  the parent's own training images, ``--replay-ratio`` of them per reviewed image, so that the
  model learns the new images without forgetting the old. A fifth of the reviewed images, chosen
  by SHA-256 (``model_store.captures.is_held_out``), is held out; images labelled not_in_domain are
  never a class: export measures the OOD head on them.
- **Learning rates.** The head (the last layer) at ``--lr``, the rest at ``--backbone-lr-scale`` of
  it, and during the first ``--freeze-epochs`` the rest frozen, so that a head that meets new
  images first does not send large gradients through features that were right.
- **Validation on both kinds** each epoch: the held-out reviewed images (``field_acc``), the
  parent's validation split (``val_acc``) and the test set (``test_acc``); the parent's own figures
  on the same images come first, so the log reads as before/after.

The card's ``lineage`` records the parent, the reviewed set's digest, counts per class and source,
the recipe and the parent's figures. Export then re-fits the temperature, the thresholds, the OOD
head and the drift reference on held-out images of both kinds (``python -m export``). A fine-tune
is minutes, not hours: it does not resume; run it again.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import ConcatDataset, Subset

from model_store import ModelCard
from model_store.errors import UsageError
from model_store.files import file_sha256
from training import augment, data, optim
from training.checkpoint import read_checkpoint
from training.dataspec import DataSpec
from training.finetune import load_pretrained, parameter_groups, stored_checkpoint
from training.models import build_model
from training.reviewed import MANIFEST, read_reviewed
from training.train import (
    Record,
    choose_data_path,
    choose_device,
    epoch_metrics,
    evaluate_all,
    make_loaders,
    train_one_epoch,
)

# The defaults were chosen on the LeNet and a new catalogue's photos (benchmarks/loop.py): 1,000
# reviewed images, 4 replayed per reviewed one, 8 epochs. Fewer replayed images lost more of the
# original test accuracy; a backbone at the head's rate, or the parent's full peak rate, too.
DEFAULT_REPLAY_RATIO = 4.0
DEFAULT_EPOCHS = 8
LR_FROM_PARENT = 0.5  # the head's peak rate, relative to the parent's: the weights start trained


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--from",
        dest="parent",
        required=True,
        help="the model to start from: a stored model (NAME or NAME:VERSION, registered with --checkpoint) "
        "or a checkpoint file",
    )
    parser.add_argument(
        "--reviewed", type=Path, required=True, help="the labelled captures (`python -m model_store captures export`)"
    )
    parser.add_argument(
        "--replay-ratio",
        type=float,
        default=DEFAULT_REPLAY_RATIO,
        help=f"the parent's training images per reviewed image, drawn with --seed (default: {DEFAULT_REPLAY_RATIO:g})",
    )
    parser.add_argument(
        "--epochs", type=int, default=DEFAULT_EPOCHS, help=f"epochs over the mixed set (default: {DEFAULT_EPOCHS})"
    )
    parser.add_argument(
        "--lr",
        type=float,
        default=None,
        help=f"the head's peak learning rate (default: {LR_FROM_PARENT:g} of the parent's peak rate)",
    )
    parser.add_argument(
        "--backbone-lr-scale",
        type=float,
        default=0.5,
        help="learning rate of every layer but the head, relative to --lr (default: 0.5)",
    )
    parser.add_argument(
        "--freeze-epochs",
        type=int,
        default=1,
        help="first epochs that train the head alone, the rest frozen; --epochs: the head alone throughout "
        "(default: 1)",
    )
    parser.add_argument("--batch-size", type=int, default=None, help="images per step (default: the parent's)")
    parser.add_argument(
        "--data-dir", type=Path, default=None, help="where the parent's dataset is now (default: as trained)"
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--seed", type=int, default=0, help="random seed: the replay drawn, the batches (default: 0)")
    parser.add_argument(
        "--output-dir", type=Path, default=None, help="where checkpoints go (default: runs/<parent name>-field)"
    )


def check_args(args: argparse.Namespace) -> None:
    if args.epochs < 1:
        raise UsageError(f"--epochs must be at least 1, got {args.epochs}")
    if not 0 <= args.freeze_epochs <= args.epochs:
        raise UsageError(f"--freeze-epochs must be from 0 to --epochs ({args.epochs}), got {args.freeze_epochs}")
    if not args.backbone_lr_scale > 0:
        raise UsageError(f"--backbone-lr-scale must be positive, got {args.backbone_lr_scale}")
    if args.lr is not None and not args.lr > 0:
        raise UsageError(f"--lr must be positive, got {args.lr}")
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")


def head_names(model: nn.Module) -> set[str]:
    """The parameters of the model's last layer with weights, the one that maps features to classes."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    if not layers:
        raise UsageError("this model has no linear or convolution layer to use as its head")
    name, _ = layers[-1]
    return {f"{name}.{p}" for p, _ in layers[-1][1].named_parameters()}


def main(args: argparse.Namespace) -> dict:
    check_args(args)
    parent_path = stored_checkpoint(Path(args.parent))
    payload = read_checkpoint(parent_path)
    card = ModelCard.from_dict(payload["card"])
    reviewed = read_reviewed(args.reviewed, card.class_names)  # its mistakes first, before any data is read
    spec = dataclasses.replace(
        DataSpec.from_checkpoint(payload, card, args.data_dir),
        reviewed=args.reviewed.resolve(),
        replay_ratio=args.replay_ratio,
        seed=args.seed,
        train_limit=None,
        test_limit=None,
    )
    # The parent's flags, with the fine-tune's own: Record keeps them in every checkpoint.
    run = argparse.Namespace(**payload["args"])
    run.epochs, run.seed, run.device, run.workers, run.compile = args.epochs, args.seed, args.device, 0, False
    run.lr, run.batch_size = args.lr or LR_FROM_PARENT * run.lr, args.batch_size or run.batch_size
    run.lr_warmup_epochs = 0  # the weights are trained: no warm-up from a tiny rate
    run.init_weights, run.backbone_lr_scale, run.freeze_backbone = str(parent_path), args.backbone_lr_scale, False
    run.freeze_epochs, run.reviewed, run.replay_ratio, run.resume = (
        args.freeze_epochs,
        str(spec.reviewed),
        args.replay_ratio,
        None,
    )
    run.output_dir = args.output_dir or Path("runs") / f"{_name(args.parent)}-field"
    torch.manual_seed(args.seed)
    device = choose_device(args.device)

    parts = data.splits(spec, card)  # the parent's card: its mean, std and classes stay
    evaluated = {"field": parts.field, "val": parts.validation, "test": parts.test}
    evaluated = {split: items for split, items in evaluated.items() if items is not None}
    augmenter = augment.Augment.from_args(run)
    train_set = data.Augmented(parts.train, augmenter) if augmenter else parts.train

    model = build_model(card)
    loaded = load_pretrained(model, parent_path)
    head = head_names(model)
    backbone = [p for n, p in model.named_parameters() if n not in head]
    groups = parameter_groups(model, loaded - head, False, args.backbone_lr_scale)
    model.to(device)
    run.channels_last = run.channels_last if run.channels_last is not None else device.type == "cuda"

    generator = torch.Generator().manual_seed(args.seed)
    data_path, _ = choose_data_path("auto", 1, train_set, card)
    train_loader, eval_loaders = make_loaders(run, data_path, train_set, evaluated, card, device, generator, 0, 1)
    criterion = nn.CrossEntropyLoss(label_smoothing=run.label_smoothing)
    optimizer = optim.make_optimizer(run, groups)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, optim.lr_factor(run, len(train_loader)))
    scaler = torch.amp.GradScaler(device.type, enabled=False)

    before = evaluate_all(model, eval_loaders, criterion, device)
    counts = reviewed.counts(card.class_names)
    replayed = _replay_counts(parts.train, card.class_names)
    manifest = args.reviewed / MANIFEST
    lineage = {
        "parent": _parent_tag(args.parent, parent_path),
        "parent_checkpoint_sha256": file_sha256(parent_path),
        # BentoML's model metadata takes no nulls: a reviewed set without a manifest has no entry for it.
        "reviewed": {
            "digest": reviewed.digest,
            **({"manifest_sha256": file_sha256(manifest)} if manifest.is_file() else {}),
        },
        "images": {"reviewed": counts["train"], "replay": replayed, "held_out": counts["held_out"]},
        "not_in_domain": counts["not_in_domain"],
        "recipe": {
            "epochs": args.epochs,
            "lr": run.lr,
            "backbone_lr_scale": args.backbone_lr_scale,
            "freeze_epochs": args.freeze_epochs,
            "replay_ratio": args.replay_ratio,
            "batch_size": run.batch_size,
            "opt": run.opt,
            "seed": args.seed,
        },
        "before": before,
    }
    card = dataclasses.replace(card, lineage=lineage, metrics={})
    print(
        f"fine-tuning {card.arch} from {lineage['parent']} on {sum(counts['train'].values())} reviewed images and "
        f"{sum(replayed.values())} replayed ones ({len(parts.train)} in all); validating on "
        f"{sum(counts['held_out'].values())} held-out reviewed images, {len(evaluated.get('val', ()))} of the "
        f"parent's validation split and {len(parts.test)} test images; {counts['not_in_domain']} not in domain "
        f"left to export; device {device}, output {run.output_dir}",
        flush=True,
    )
    print("before: " + _figures(before), flush=True)
    record = Record(
        run.output_dir, run, card, spec, "val" if "val" in evaluated else "test", sorted(loaded), _NoResume()
    )
    metrics: dict = {}
    for epoch in range(1, args.epochs + 1):
        for p in backbone:  # frozen while the head alone learns the new images
            p.requires_grad_(epoch > args.freeze_epochs)
        start = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        trained = train_one_epoch(model, train_loader, criterion, optimizer, scheduler, scaler, None, run, device, True)
        seconds = time.perf_counter() - start
        metrics = epoch_metrics(
            epoch, trained, evaluate_all(model, eval_loaders, criterion, device), lr, seconds, start
        )
        record.epoch(model, metrics)
    print("after:  " + _figures(metrics) + f"; checkpoints in {run.output_dir}", flush=True)
    return {"before": before, "after": metrics}


class _NoResume:
    """What Record saves beyond the weights: nothing, since a fine-tune is rerun, not resumed."""

    def state(self) -> dict:
        return {}


def _figures(metrics: dict) -> str:
    names = {"field": "held-out reviewed", "val": "parent's validation", "test": "test"}
    return ", ".join(
        f"{label} acc {metrics[f'{split}_acc']:.4f}" for split, label in names.items() if f"{split}_acc" in metrics
    )


def _replay_counts(train, class_names: tuple[str, ...]) -> dict[str, int]:
    """Images per class of the replayed part of the training set (the second part of the mix)."""
    if not isinstance(train, ConcatDataset) or len(train.datasets) < 2:
        return {}
    replay = train.datasets[1]
    base, rows = (replay.dataset, replay.indices) if isinstance(replay, Subset) else (replay, range(len(replay)))
    labels = np.asarray(base.labels)[np.asarray(rows, dtype=np.int64)]
    return {class_names[i]: int(n) for i, n in enumerate(np.bincount(labels, minlength=len(class_names))) if n}


def _name(parent: str) -> str:
    return Path(parent).stem if parent.endswith((".pt", ".pth")) or "/" in parent else parent.split(":")[0]


def _parent_tag(parent: str, path: Path) -> str:
    """The parent's store tag (name:version) when it came from the store, else its checkpoint's file name."""
    if path == Path(parent):
        return path.name
    from model_store.store import open_model

    return str(open_model(parent).tag)
