"""The data spec: which images a run trains and tests on, and the flags that choose them.

Training builds it once from the command line and saves it in every checkpoint as a plain dict
beside the card (``payload["data"]``), the way nanoGPT saves ``model_args``; export and evaluate
read it back to rebuild the run's splits, so they depend on this spec, not on training's flags.
How those images become inputs (channels, size, resize) is the card's business, not the spec's.
This module stays torch-free.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model_store import ModelCard
from model_store.errors import UsageError

DATASETS = ("fashion-mnist", "folder", "synthetic")


@dataclass(frozen=True)
class DataSpec:
    dataset: str  # one of DATASETS
    data_dir: Path | None = None  # Fashion-MNIST's files or the image folder; None: found or downloaded
    val_ratio: float = 0.1  # share of each class held out: of the training images, and of a folder not split
    seed: int = 0  # the run's seed: draws the folder split and the synthetic images
    synthetic_size: int = 512  # synthetic: training images (the test set is a quarter, at least 64)
    train_limit: int | None = None  # only the first N training images; None: all
    test_limit: int | None = None  # only the first N test and validation images during training; None: all
    hold_out: bool = True  # keep val_ratio of the training images out of training, for export to calibrate on
    reviewed: Path | None = None  # labelled captures (training.reviewed) trained on beside the dataset's images
    replay_ratio: float | None = None  # with reviewed: training images of the dataset per reviewed one; None: all

    def __post_init__(self) -> None:
        # Specs come back from checkpoints as well as from the command line: check what splits rely on.
        if self.dataset not in DATASETS:
            raise UsageError(f"unknown dataset {self.dataset!r}; choose from {', '.join(DATASETS)}")
        for name in ("data_dir", "reviewed"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))
        if self.dataset == "folder" and self.data_dir is None:
            raise UsageError("--dataset folder needs --data-dir, the folder of class sub-folders")
        # NaN fails both comparisons, so it is refused too.
        if not _is_number(self.val_ratio) or not 0.0 < self.val_ratio < 1.0:
            raise UsageError(f"--val-ratio must be between 0 and 1 (both excluded), got {self.val_ratio!r}")
        if self.replay_ratio is not None and (not _is_number(self.replay_ratio) or not self.replay_ratio >= 0):
            raise UsageError(f"--replay-ratio must be a number of 0 or more, got {self.replay_ratio!r}")
        if self.replay_ratio is not None and self.reviewed is None:
            raise UsageError("--replay-ratio mixes the dataset's images with --reviewed ones; give --reviewed too")
        if not isinstance(self.hold_out, bool):
            raise UsageError(f"hold_out must be true or false, got {self.hold_out!r}")
        if not _is_int(self.seed):
            raise UsageError(f"--seed must be an integer, got {self.seed!r}")
        for name in ("synthetic_size", "train_limit", "test_limit"):
            value = getattr(self, name)
            if value is None and name.endswith("_limit"):
                continue  # no limit: all images
            if not _is_int(value) or value < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be an integer of at least 1, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain types only, so a checkpoint holding it stays loadable with ``weights_only=True``."""
        values = dataclasses.asdict(self)
        for name in ("data_dir", "reviewed"):
            values[name] = None if getattr(self, name) is None else str(getattr(self, name))
        return values

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UsageError(f"data spec: unknown field(s) {unknown}; known: {sorted(known)}")
        if "dataset" not in data:
            raise UsageError(f"data spec: missing field 'dataset' (one of {', '.join(DATASETS)})")
        # A spec saved before hold_out existed is a run that trained on every training image: holding
        # some out now would make "validation" images it has seen.
        return cls(**{"hold_out": False, **data})

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> DataSpec:
        """The spec of the flags ``add_arguments`` adds, plus training's ``--seed``."""
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})

    @classmethod
    def from_run_args(cls, card: ModelCard, run_args: dict[str, Any]) -> DataSpec:
        """The spec of a checkpoint written before specs were saved, from the CLI arguments it kept
        (``payload["args"]``); the fields its run had no flag for yet take their defaults, except
        ``hold_out``: no such run held training images out."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {name: value for name, value in run_args.items() if name in known}
        values.setdefault("dataset", card.dataset)  # checkpoints from before --dataset were all Fashion-MNIST
        values.setdefault("hold_out", False)  # nor did they hold training images out
        return cls(**values)

    @classmethod
    def from_checkpoint(cls, payload: dict[str, Any], card: ModelCard, data_dir: Path | None = None) -> DataSpec:
        """The spec a checkpoint's run used; ``data_dir``, if given, is where its data is now."""
        spec = cls.from_dict(payload["data"]) if "data" in payload else cls.from_run_args(card, payload.get("args", {}))
        return dataclasses.replace(spec, data_dir=data_dir) if data_dir is not None else spec


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of every field but ``seed``, which the training script owns (it also seeds torch)."""
    parser.add_argument(
        "--dataset", default="fashion-mnist", choices=DATASETS, help="training data (default: fashion-mnist)"
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="Fashion-MNIST files or the image folder (default: auto for fashion-mnist)",
    )
    parser.add_argument(
        "--val-ratio",
        type=float,
        default=DataSpec.val_ratio,
        help="share of each class held out of the training images (--hold-out), and of a folder without "
        f"train/ and val/ for its evaluation split (default: {DataSpec.val_ratio})",
    )
    parser.add_argument(
        "--hold-out",
        action=argparse.BooleanOptionalAction,
        default=DataSpec.hold_out,
        help="keep --val-ratio of the training images out of training, the validation split export calibrates "
        "probabilities and sets the unsure thresholds on (default: on)",
    )
    parser.add_argument(
        "--reviewed",
        type=Path,
        default=None,
        help="a folder of labelled captures (`python -m model_store captures export`) to train on as well; "
        "a fifth of them, chosen by their SHA-256, is held out for validation (default: none)",
    )
    parser.add_argument(
        "--replay-ratio",
        type=float,
        default=None,
        help="with --reviewed: images of the dataset's own training split per reviewed image, drawn with "
        "--seed, so that the model keeps what it knew (default: all of them)",
    )
    parser.add_argument(
        "--synthetic-size",
        type=int,
        default=DataSpec.synthetic_size,
        help=f"synthetic: training images (default: {DataSpec.synthetic_size})",
    )
    parser.add_argument(
        "--train-limit", type=int, default=None, help="use only the first N training images (default: all)"
    )
    parser.add_argument(
        "--test-limit",
        type=int,
        default=None,
        help="evaluate each epoch on only the first N test and validation images (default: all)",
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return _is_int(value) or isinstance(value, float)
