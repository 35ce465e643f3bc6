"""Train a registered model and write checkpoints.

    python -m training train --model lenet_bn
    python -m training train --resume runs/lenet_bn/last.pt         # finish an interrupted run
    torchrun --nproc-per-node 2 -m training train --model resnet18  # DistributedDataParallel

Per epoch it prints loss, train accuracy, validation accuracy (on the images ``--hold-out`` kept
out of training) and test accuracy, appends them to ``log.csv``, redraws ``curves.png`` and writes
``last.pt`` into ``--output-dir``, and ``best.pt`` when validation accuracy improves: the test set
is reported, never used to choose. On a GPU it uses mixed precision and channels-last; the code runs unchanged on CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from model_store import ModelCard
from model_store.errors import UsageError
from training import augment, data, dataspec, optim
from training.checkpoint import read_checkpoint, save_checkpoint
from training.dataspec import DataSpec
from training.finetune import load_pretrained, parameter_groups
from training.models import build_model, default_size, list_models
from training.plots import plot_curves
from training.tensors import MAX_BYTES, TensorBatches, as_tensors, input_bytes

logger = logging.getLogger(__name__)
# On --resume these come from the command line; every other argument comes from the checkpoint.
DATA_PATHS = ("auto", "tensors", "loader")
RESUME_OVERRIDES = ("epochs", "workers", "device", "output_dir", "resume", "compile", "channels_last")
DEFAULT_EPOCHS = 10


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="lenet_bn", choices=list_models(), help="architecture (default: lenet_bn)")
    parser.add_argument(
        "--model-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="builder keyword argument, VALUE parsed as JSON if it can be, e.g. activation=relu (default: none)",
    )
    parser.add_argument("--size", type=int, default=None, help="input side in pixels (default: the model's own)")
    dataspec.add_arguments(parser)
    data.add_arguments(parser)
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help=f"number of epochs (default: {DEFAULT_EPOCHS}; with --resume, the run's own)",
    )
    parser.add_argument("--batch-size", type=int, default=256, help="images per step, per process (default: 256)")
    optim.add_arguments(parser)
    parser.add_argument("--label-smoothing", type=float, default=0.0, help="label smoothing (default: 0.0)")
    augment.add_arguments(parser)
    parser.add_argument(
        "--amp",
        default="auto",
        choices=("auto", "off", "bf16", "fp16"),
        help="mixed precision (default: auto = bf16 on a GPU that has it, else fp16 on a GPU, off on CPU)",
    )
    parser.add_argument(
        "--init-weights",
        type=Path,
        default=None,
        help="fine-tune from this state_dict or checkpoint, or from a stored model's (NAME or NAME:VERSION of "
        "the model store, registered with --checkpoint) (default: none)",
    )
    parser.add_argument(
        "--freeze-backbone", action="store_true", help="fine-tuning: train only the new parameters (default: off)"
    )
    parser.add_argument(
        "--backbone-lr-scale",
        type=float,
        default=1.0,
        help="fine-tuning: learning rate of loaded parameters relative to --lr (default: 1.0)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="train through torch.compile (default: off; compiling takes a minute or more, and long on a CPU)",
    )
    parser.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="channels-last memory format (default: on a GPU; off on a CPU, where it speeds deeper networks "
        "such as resnet20 up by a quarter and slows LeNet down)",
    )
    parser.add_argument("--workers", type=int, default=0, help="data loader processes (default: 0)")
    parser.add_argument(
        "--data-path",
        default="auto",
        choices=DATA_PATHS,
        help="tensors: inputs made once and cached, batches drawn and augmented on the device; loader: a "
        "DataLoader over the items; auto: tensors unless distributed or too large (default: auto)",
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--output-dir", type=Path, default=None, help="where checkpoints go (default: runs/<model>)")
    parser.add_argument("--resume", type=Path, default=None, help="continue from this last.pt (default: start afresh)")


def parse_model_args(pairs: list[str]) -> dict:
    parsed = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--model-arg {pair!r} is not KEY=VALUE")
        try:
            parsed[key] = json.loads(value)
        except json.JSONDecodeError:
            parsed[key] = value
    return parsed


def check_args(args: argparse.Namespace) -> None:
    for name in ("epochs", "batch_size", "size"):  # the data flags are checked by DataSpec
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.lr <= 0:
        raise UsageError(f"--lr must be positive, got {args.lr}")
    if args.workers < 0:
        raise UsageError(f"--workers must be 0 or more, got {args.workers}")


def autocast_dtype(args: argparse.Namespace, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda" or args.amp == "off":
        return None
    if args.amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if args.amp == "bf16" else torch.float16


def train_one_epoch(
    model, loader, criterion, optimizer, scheduler, scaler, amp, args, device, show
) -> dict[str, float]:
    model.train()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, seen
    for pixels, labels in tqdm(loader, leave=False, disable=None if show else True):
        pixels, labels = pixels.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if args.channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext():
            logits = model(pixels)
            loss = criterion(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if args.clip_grad_norm:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        # Counted on the device: torch.tensor(n, device=cuda) would copy from the host and wait for the GPU.
        seen = torch.full((), len(labels), device=device)
        totals += torch.stack([loss.detach() * len(labels), (logits.argmax(1) == labels).sum(), seen])
    if dist.is_initialized():
        dist.all_reduce(totals)
    loss_sum, correct, seen = totals.tolist()
    return {"train_loss": loss_sum / seen, "train_acc": correct / seen, "seen": seen}


@torch.no_grad()
def evaluate(model, loader, criterion, device, amp=None, split: str = "test") -> dict[str, float]:
    """``{split}_loss`` and ``{split}_acc`` of ``model`` on ``loader``."""
    model.eval()
    loss_sum, correct, seen = 0.0, 0, 0
    for pixels, labels in loader:
        pixels, labels = pixels.to(device), labels.to(device)
        with torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext():
            logits = model(pixels)
        loss_sum += criterion(logits.float(), labels).item() * len(labels)
        correct += (logits.argmax(1) == labels).sum().item()
        seen += len(labels)
    return {f"{split}_loss": loss_sum / seen, f"{split}_acc": correct / seen}


def evaluate_all(model, loaders: dict, criterion, device, amp=None) -> dict[str, float]:
    """:func:`evaluate` on each split's loader, the figures of all of them in one dict."""
    return {
        key: value
        for split, loader in loaders.items()
        for key, value in evaluate(model, loader, criterion, device, amp, split).items()
    }


def epoch_metrics(epoch: int, trained: dict, evaluations: dict, lr: float, seconds: float, start: float) -> dict:
    """One epoch's row of log.csv and the card: training's figures, then each split's, the rate
    over the training ``seconds``, and the seconds since ``start`` with evaluation."""
    return {
        "epoch": epoch,
        "train_loss": trained["train_loss"],
        "train_acc": trained["train_acc"],
        **evaluations,
        "lr": lr,
        "examples_per_s": round(trained["seen"] / seconds, 1),
        "seconds": round(time.perf_counter() - start, 2),
    }


def setup_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size); under torchrun, joins the process group (NCCL on GPUs, gloo on CPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def apply_resume(args: argparse.Namespace) -> dict:
    payload = read_checkpoint(args.resume)
    if "optimizer" not in payload or "rng" not in payload:
        raise UsageError(f"{args.resume} holds no training state to resume from; start a new run with --init-weights")
    for key, value in payload["args"].items():
        if key not in RESUME_OVERRIDES and hasattr(args, key):
            setattr(args, key, Path(value) if key in ("data_dir", "init_weights") and value is not None else value)
    args.output_dir = args.output_dir or args.resume.parent
    if "data_path" not in payload["args"]:  # written before the tensor path: resume the way it was trained
        args.data_path = "loader"
    if "decode" not in payload["args"]:  # written before decoding was a choice: every pixel, as then
        args.decode = "full"
    if args.epochs is None:  # finish the run as it was planned
        args.epochs = payload["args"]["epochs"]
    if args.epochs <= payload["epoch"]:
        raise UsageError(
            f"{args.resume} already finished epoch {payload['epoch']}, so --epochs {args.epochs} leaves nothing "
            f"to train; pass --epochs {payload['epoch'] + 1} or more to continue"
        )
    return payload


def choose_data_path(asked: str, world: int, train_set, card: ModelCard) -> tuple[str, str]:
    """("tensors" or "loader", why), for the log line every run prints."""
    if asked == "loader":
        return "loader", "--data-path loader"
    if world > 1:
        return "loader", "distributed: each rank draws its share through a DistributedSampler"
    size = input_bytes(train_set, card)
    if size > MAX_BYTES:
        return "loader", f"{size / 2**30:.1f} GB of training inputs is more than the {MAX_BYTES / 2**30:.0f} GB held"
    return "tensors", f"{size / 2**20:,.1f} MB of inputs, cached; batches and augmentation on the device"


def main(args: argparse.Namespace) -> dict[str, float]:
    resumed = apply_resume(args) if args.resume else None
    if args.epochs is None:
        args.epochs = DEFAULT_EPOCHS
    check_args(args)
    # A resumed run reads the images it was trained on from its checkpoint's spec, not from flags.
    if resumed:
        spec = DataSpec.from_checkpoint(resumed, ModelCard.from_dict(resumed["card"]))
    else:
        spec = DataSpec.from_args(args)
    device = choose_device(args.device)
    rank, world = setup_distributed(device)
    torch.manual_seed(args.seed)
    output_dir = args.output_dir or Path("runs") / args.model

    parts, card = data.load_data(
        spec,
        args.model,
        parse_model_args(args.model_arg),
        args.size or default_size(args.model),
        args.in_channels,
        args.resize,
        augment.Augment.from_args(args),
        args.decode,
    )
    train_set, test_set = parts.train, parts.test
    # Which split chooses best.pt: the held-out one. Without it, the test split, and the log says so:
    # for a folder that is its own validation split, for Fashion-MNIST the real test set.
    evaluated = {"val": parts.validation, "test": test_set} if parts.validation is not None else {"test": test_set}
    if parts.field is not None:  # --reviewed: its held-out images, reported beside the others
        evaluated["field"] = parts.field
    choose_on = "val" if "val" in evaluated else "test"
    model, pretrained, groups = prepare_model(args, card, resumed, device)

    generator = torch.Generator().manual_seed(args.seed)
    data_path, why = choose_data_path(args.data_path, world, train_set, card)
    train_loader, eval_loaders = make_loaders(
        args, data_path, train_set, evaluated, card, device, generator, rank, world
    )
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    optimizer = optim.make_optimizer(args, groups)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, optim.lr_factor(args, len(train_loader)))
    amp = autocast_dtype(args, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    device_ids = [device.index] if device.type == "cuda" else None
    net = nn.parallel.DistributedDataParallel(model, device_ids=device_ids) if world > 1 else model
    if args.compile:  # training steps only; evaluation and checkpoints use the plain module, which shares its weights
        net = torch.compile(net)
    resumable = Resumable(model, optimizer, scheduler, scaler, generator, device)

    record = Record(output_dir, args, card, spec, choose_on, sorted(pretrained), resumable)
    start_epoch = 1
    if resumed:
        resumable.load(resumed)
        start_epoch = resumed["epoch"] + 1
        # A run from before best_on was saved chose on the test split.
        record.best_acc = resumed["best_acc"] if resumed.get("best_on", "test") == choose_on else -1.0

    show = rank == 0
    if show:
        print(
            f"training {card.arch} {dict(card.arch_args)} on {len(train_set)} {card.dataset} images "
            f"({card.in_channels}x{card.height}x{card.width}), validating on {len(evaluated.get('val', ()))}, "
            f"testing on {len(test_set)}; best.pt chosen on {choose_on} accuracy; device {device}"
            f"{f' x{world}' if world > 1 else ''}, amp {amp}{', compiled' if args.compile else ''}{', channels-last' if args.channels_last else ''}, data path {data_path} "
            f"({why}), output {output_dir}",
            flush=True,
        )
    metrics: dict = {}
    for epoch in range(start_epoch, args.epochs + 1):
        if isinstance(getattr(train_loader, "sampler", None), DistributedSampler):
            train_loader.sampler.set_epoch(epoch)
        start = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        trained = train_one_epoch(net, train_loader, criterion, optimizer, scheduler, scaler, amp, args, device, show)
        seconds = time.perf_counter() - start
        if rank == 0:
            evaluations = evaluate_all(model, eval_loaders, criterion, device, amp)
            metrics = epoch_metrics(epoch, trained, evaluations, lr, seconds, start)
            record.epoch(model, metrics)
        if world > 1:
            dist.barrier()
    if show:
        print(f"best {choose_on} acc {record.best_acc:.4f} (best.pt); checkpoints in {output_dir}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return metrics


def prepare_model(args, card: ModelCard, resumed: dict | None, device: torch.device):
    """The card's model on ``device`` with its pretrained weights (``--init-weights``), the names of
    the tensors they filled, and the optimizer's parameter groups (backbone frozen or slowed)."""
    model = build_model(card)
    if resumed:  # the same parameter groups as the interrupted run, so its optimizer state fits
        pretrained = set(resumed.get("pretrained", []))
    else:
        pretrained = load_pretrained(model, args.init_weights) if args.init_weights else set()
    groups = parameter_groups(model, pretrained, args.freeze_backbone, args.backbone_lr_scale)
    model.to(device)
    if args.channels_last is None:
        args.channels_last = device.type == "cuda"
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    return model, pretrained, groups


def choose_device(asked: str | None) -> torch.device:
    """``--device``, else CUDA when there is one; under torchrun, this process's own GPU."""
    device = torch.device(asked or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return device


def make_loaders(args, data_path: str, train_set, evaluated: dict, card: ModelCard, device, generator, rank, world):
    """The training batches and one evaluation loader per split, on the chosen data path: whole
    tensors on the device ("tensors"), or a DataLoader, sharded across processes under torchrun."""
    if data_path == "tensors":
        augmenter = train_set.augment if isinstance(train_set, data.Augmented) else None
        items = train_set.dataset if augmenter else train_set
        train_loader = TensorBatches(
            *as_tensors(items, card), args.batch_size, device, generator, augmenter, len(train_set) > args.batch_size
        )
        eval_loaders = {
            split: TensorBatches(*as_tensors(items, card), 512, device) for split, items in evaluated.items()
        }
        return train_loader, eval_loaders
    sampler = DistributedSampler(train_set, world, rank, shuffle=True, seed=args.seed) if world > 1 else None
    pin = device.type == "cuda"
    train_loader = DataLoader(
        train_set,
        args.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        num_workers=args.workers,
        generator=generator,
        pin_memory=pin,
        drop_last=len(train_set) > args.batch_size * world,
        persistent_workers=args.workers > 0,
    )
    eval_loaders = {
        split: DataLoader(items, 512, num_workers=args.workers, pin_memory=pin) for split, items in evaluated.items()
    }
    return train_loader, eval_loaders


@dataclass
class Record:
    """Where each epoch's results go, on rank 0: the console, log.csv, curves.png, last.pt, and
    best.pt when the accuracy on ``choose_on`` improved."""

    output_dir: Path
    args: argparse.Namespace
    card: ModelCard
    spec: DataSpec
    choose_on: str  # "val", or "test" when nothing is held out
    pretrained: list[str]  # the parameters --init-weights filled
    resumable: Resumable
    best_acc: float = -1.0

    def epoch(self, model: nn.Module, metrics: dict) -> None:
        print_epoch(metrics)
        log_epoch(self.output_dir / "log.csv", metrics)
        plot_curves(self.output_dir / "log.csv", self.output_dir / "curves.png")
        accuracy = metrics[f"{self.choose_on}_acc"]
        improved, self.best_acc = accuracy > self.best_acc, max(self.best_acc, accuracy)
        card = ModelCard.from_dict({**self.card.to_dict(), "metrics": metrics})
        state = {
            "epoch": metrics["epoch"],
            "args": jsonable(vars(self.args)),
            "data": self.spec.to_dict(),
            "best_acc": self.best_acc,
            "best_on": self.choose_on,
            "pretrained": self.pretrained,
            **self.resumable.state(),
        }
        save_checkpoint(self.output_dir / "last.pt", model, card, **state)
        if improved:
            save_checkpoint(self.output_dir / "best.pt", model, card, **state)


class Resumable:
    """What a checkpoint carries beyond the weights so that a run resumes exactly where it stopped:
    the optimizer, scheduler and scaler states and every random state."""

    def __init__(self, model, optimizer, scheduler, scaler, generator, device):
        self.model, self.optimizer, self.scheduler, self.scaler = model, optimizer, scheduler, scaler
        self.generator, self.device = generator, device

    def state(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "loader": self.generator.get_state(),
                "cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
            },
        }

    def load(self, checkpoint: dict) -> None:
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.scaler.load_state_dict(checkpoint["scaler"])
        torch.set_rng_state(checkpoint["rng"]["torch"])
        self.generator.set_state(checkpoint["rng"]["loader"])
        if self.device.type == "cuda" and checkpoint["rng"].get("cuda"):
            torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])


def print_epoch(metrics: dict) -> None:
    print(
        f"epoch {metrics['epoch']:3d}  loss {metrics['train_loss']:.4f}  train acc {metrics['train_acc']:.4f}  "
        + (f"val acc {metrics['val_acc']:.4f}  " if "val_acc" in metrics else "")
        + (f"field acc {metrics['field_acc']:.4f}  " if "field_acc" in metrics else "")
        + f"test acc {metrics['test_acc']:.4f}  lr {metrics['lr']:.2e}  {metrics['examples_per_s']:.0f} img/s",
        flush=True,
    )


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
