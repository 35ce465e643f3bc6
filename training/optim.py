"""Optimizers and learning-rate schedules, chosen by name from the command line."""

from __future__ import annotations

import argparse
import math
from typing import Callable, Iterable

import torch

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("constant", "step", "cosine", "onecycle")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--opt", default="adamw", choices=OPTIMIZERS, help="optimizer (default: adamw)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default: 3e-3)")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: 0.9)")
    parser.add_argument("--nesterov", action="store_true", help="Nesterov momentum for SGD (default: off)")
    parser.add_argument("--weight-decay", type=float, default=0.05, help="weight decay (default: 0.05)")
    parser.add_argument("--lr-scheduler", default="cosine", choices=SCHEDULES, help="schedule (default: cosine)")
    parser.add_argument(
        "--lr-warmup-epochs",
        type=float,
        default=0.0,
        help="linear warmup from 1%% of --lr; for onecycle, the rise (default: 0, onecycle 30%% of the run)",
    )
    parser.add_argument(
        "--lr-step-size", type=int, default=30, help="step schedule: epochs between decays (default: 30)"
    )
    parser.add_argument("--lr-gamma", type=float, default=0.1, help="step schedule: decay factor (default: 0.1)")
    parser.add_argument(
        "--clip-grad-norm", type=float, default=None, help="clip the gradient norm to this (default: off)"
    )


def make_optimizer(args: argparse.Namespace, groups: Iterable[dict]) -> torch.optim.Optimizer:
    """``groups`` are parameter groups, each may carry an ``lr_scale`` (fine-tuning's backbone)."""
    groups = [{**g, "lr": args.lr * g.pop("lr_scale", 1.0)} for g in groups]
    if args.opt == "sgd":
        return torch.optim.SGD(
            groups, lr=args.lr, momentum=args.momentum, nesterov=args.nesterov, weight_decay=args.weight_decay
        )
    return torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)


def lr_factor(args: argparse.Namespace, steps_per_epoch: int) -> Callable[[int], float]:
    """Step -> multiplier of each group's base learning rate, for the whole run."""
    total = max(1, args.epochs * steps_per_epoch)
    if args.lr_scheduler == "onecycle":
        rise = args.lr_warmup_epochs * steps_per_epoch or 0.3 * total
        warmup = 0.0
    else:
        rise, warmup = 0.0, args.lr_warmup_epochs * steps_per_epoch

    def factor(step: int) -> float:
        if args.lr_scheduler == "onecycle":
            if step < rise:  # up from 4% of the peak, as torch's OneCycleLR does
                return 0.04 + 0.96 * step / rise
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - rise) / max(1.0, total - rise))))
        scale = min(1.0, 0.01 + 0.99 * step / warmup) if step < warmup else 1.0
        if args.lr_scheduler == "step":
            return scale * args.lr_gamma ** (step // (args.lr_step_size * steps_per_epoch))
        if args.lr_scheduler == "cosine":  # decays over the steps after the warmup
            progress = min(1.0, max(0.0, step - warmup) / max(1.0, total - warmup))
            return scale * 0.5 * (1 + math.cos(math.pi * progress))
        return scale

    return factor
