"""Train a registered model on Fashion-MNIST and write checkpoints.

    python -m training train --model lenet_bn --model-arg activation=relu --model-arg pool=max

Per epoch it prints loss, train accuracy and test accuracy, appends them to ``log.csv`` and
writes ``last.pt`` (and ``best.pt`` when test accuracy improves) into ``--output-dir``.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from model_store import ModelCard
from training.checkpoint import save_checkpoint
from training.data import FASHION_MNIST_CLASSES, FashionMNIST, channel_stats, load_fashion_mnist
from training.models import build_model, default_size, list_models

logger = logging.getLogger(__name__)
OPTIMIZERS = ("sgd", "adamw")
SCHEDULERS = ("constant", "cosine")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="lenet_bn", choices=list_models(), help="architecture (default: lenet_bn)")
    parser.add_argument(
        "--model-arg", action="append", default=[], metavar="KEY=VALUE",
        help="builder keyword argument, VALUE parsed as JSON if it can be, e.g. activation=relu (default: none)",
    )  # fmt: skip
    parser.add_argument("--size", type=int, default=None, help="input side in pixels (default: the model's own)")
    parser.add_argument("--data-dir", type=Path, default=None, help="folder with the four Fashion-MNIST files (default: auto)")
    parser.add_argument("--epochs", type=int, default=10, help="number of epochs (default: 10)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per step (default: 256)")
    parser.add_argument("--opt", default="adamw", choices=OPTIMIZERS, help="optimizer (default: adamw)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default: 3e-3)")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: 0.9)")
    parser.add_argument("--weight-decay", type=float, default=0.05, help="weight decay (default: 0.05)")
    parser.add_argument("--lr-scheduler", default="cosine", choices=SCHEDULERS, help="schedule (default: cosine)")
    parser.add_argument("--label-smoothing", type=float, default=0.0, help="label smoothing (default: 0.0)")
    parser.add_argument("--workers", type=int, default=0, help="data loader processes (default: 0)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--train-limit", type=int, default=None, help="use only the first N training images (default: all)")
    parser.add_argument("--test-limit", type=int, default=None, help="use only the first N test images (default: all)")
    parser.add_argument("--output-dir", type=Path, default=None, help="where checkpoints go (default: runs/<model>)")


def parse_model_args(pairs: list[str]) -> dict:
    parsed = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--model-arg {pair!r} is not KEY=VALUE")
        try:
            parsed[key] = json.loads(value)
        except json.JSONDecodeError:
            parsed[key] = value
    return parsed


def train_one_epoch(model, loader, criterion, optimizer, scheduler, device, epoch: int) -> dict[str, float]:
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    for pixels, labels in tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=None):
        pixels, labels = pixels.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        logits = model(pixels)
        loss = criterion(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total_loss += loss.item() * len(labels)
        correct += (logits.argmax(1) == labels).sum().item()
        seen += len(labels)
    return {"train_loss": total_loss / seen, "train_acc": correct / seen}


@torch.no_grad()
def evaluate(model, loader, criterion, device) -> dict[str, float]:
    model.eval()
    total_loss, correct, seen = 0.0, 0, 0
    for pixels, labels in loader:
        pixels, labels = pixels.to(device), labels.to(device)
        logits = model(pixels)
        total_loss += criterion(logits, labels).item() * len(labels)
        correct += (logits.argmax(1) == labels).sum().item()
        seen += len(labels)
    return {"test_loss": total_loss / seen, "test_acc": correct / seen}


def make_card(args: argparse.Namespace) -> ModelCard:
    size = args.size or default_size(args.model)
    train_images, _ = load_fashion_mnist("train", args.data_dir)
    mean, std = channel_stats(train_images[: args.train_limit])
    return ModelCard(
        arch=args.model, arch_args=parse_model_args(args.model_arg), class_names=FASHION_MNIST_CLASSES,
        in_channels=1, height=size, width=size, mean=mean, std=std, resize="fit", interpolation="bilinear",
        dataset="fashion-mnist",
    )  # fmt: skip


def make_optimizer(args, model: nn.Module, steps: int):
    if args.opt == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    if args.lr_scheduler == "cosine":
        schedule = lambda step: 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))  # noqa: E731
    else:
        schedule = lambda step: 1.0  # noqa: E731
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def check_args(args: argparse.Namespace) -> None:
    for name in ("epochs", "batch_size", "train_limit", "test_limit", "size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.lr <= 0:
        raise ValueError(f"--lr must be positive, got {args.lr}")
    if args.workers < 0:
        raise ValueError(f"--workers must be 0 or more, got {args.workers}")


def main(args: argparse.Namespace) -> dict[str, float]:
    check_args(args)
    torch.manual_seed(args.seed)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    output_dir = args.output_dir or Path("runs") / args.model
    card = make_card(args)
    model = build_model(card).to(device)

    train_set = FashionMNIST("train", card, args.data_dir, args.train_limit)
    test_set = FashionMNIST("test", card, args.data_dir, args.test_limit)
    generator = torch.Generator().manual_seed(args.seed)
    pin = device.type == "cuda"
    train_loader = DataLoader(train_set, args.batch_size, shuffle=True, num_workers=args.workers,
                              generator=generator, pin_memory=pin, drop_last=len(train_set) > args.batch_size)  # fmt: skip
    test_loader = DataLoader(test_set, 1024, num_workers=args.workers, pin_memory=pin)
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    optimizer, scheduler = make_optimizer(args, model, steps=args.epochs * len(train_loader))

    print(f"training {card.arch} {dict(card.arch_args)} on {len(train_set)} images, "
          f"testing on {len(test_set)}, device {device}, output {output_dir}")  # fmt: skip
    best_acc, metrics = -1.0, {}
    for epoch in range(1, args.epochs + 1):
        start = time.perf_counter()
        metrics = {"epoch": epoch, **train_one_epoch(model, train_loader, criterion, optimizer, scheduler, device, epoch)}
        metrics.update(evaluate(model, test_loader, criterion, device))
        metrics["seconds"] = round(time.perf_counter() - start, 2)
        print(f"epoch {epoch:3d}  loss {metrics['train_loss']:.4f}  train acc {metrics['train_acc']:.4f}  "
              f"test acc {metrics['test_acc']:.4f}  ({metrics['seconds']:.1f} s)", flush=True)  # fmt: skip
        log_epoch(output_dir / "log.csv", metrics)
        epoch_card = ModelCard.from_dict({**card.to_dict(), "metrics": metrics})
        state = {"epoch": epoch, "args": jsonable(vars(args)), "optimizer": optimizer.state_dict()}
        save_checkpoint(output_dir / "last.pt", model, epoch_card, **state)
        if metrics["test_acc"] > best_acc:
            best_acc = metrics["test_acc"]
            save_checkpoint(output_dir / "best.pt", model, epoch_card, **state)
    print(f"best test acc {best_acc:.4f}; checkpoints in {output_dir}")
    return metrics


def log_epoch(path: Path, metrics: dict) -> None:
    """Append one epoch's row; epoch 1 starts the file afresh, so a rerun never mixes two runs."""
    first = metrics["epoch"] == 1
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w" if first else "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(metrics))
        if first:
            writer.writeheader()
        writer.writerow(metrics)


def jsonable(values: dict) -> dict:
    """The CLI arguments as plain types, so the checkpoint stays loadable with weights_only=True."""
    return json.loads(json.dumps(values, default=str))
