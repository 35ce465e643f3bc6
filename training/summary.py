"""The layer-by-layer walk the course does by hand, and the model list.

    python -m training models
    python -m training summary --model resnet18 [--size 96] [--in-channels 1]

For each block (a layer, or a composite block such as Inception or a residual unit) it prints the
output shape, the parameter count and the multiply-adds for one input image.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from model_store.errors import UsageError
from training.models import default_size, get_model, list_models


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, choices=list_models(), help="architecture")
    parser.add_argument("--size", type=int, default=None, help="input side in pixels (default: the model's own)")
    parser.add_argument("--in-channels", type=int, default=1, choices=(1, 3), help="input channels (default: 1)")
    parser.add_argument("--num-classes", type=int, default=10, help="classes (default: 10)")


def blocks(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """The rows of the walk: Sequential containers are opened, anything else is one row."""
    rows = []
    for name, child in module.named_children():
        path = f"{prefix}{name}"
        rows += blocks(child, path + ".") if isinstance(child, nn.Sequential) else [(path, child)]
    return rows


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def layer_table(model: nn.Module, size: int, in_channels: int) -> list[dict]:
    """One row per block: name, type, output shape, parameters, multiply-adds (batch of one)."""
    rows = [
        {"name": name, "type": type(block).__name__, "params": count_params(block), "macs": 0, "shape": None}
        for name, block in blocks(model)
    ]
    hooks, current = [], {"row": None}

    def count_macs(row: dict):
        def hook(layer: nn.Module, inputs, output: torch.Tensor) -> None:
            if isinstance(layer, nn.Conv2d):
                row["macs"] += (
                    output.numel() * layer.in_channels // layer.groups * layer.kernel_size[0] * layer.kernel_size[1]
                )
            elif isinstance(layer, nn.Linear):
                row["macs"] += output.numel() * layer.in_features

        return hook

    for row, (_, block) in zip(rows, blocks(model)):
        hooks.append(block.register_forward_pre_hook(lambda *_, row=row: current.update(row=row)))
        hooks.append(block.register_forward_hook(lambda _m, _i, out, row=row: row.update(shape=tuple(out.shape))))
        for layer in block.modules():
            hooks.append(layer.register_forward_hook(count_macs(row)))
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, in_channels, size, size))
    except RuntimeError as err:
        failed = current["row"]
        where = f"at {failed['name']} ({failed['type']})" if failed else "at the first layer"
        raise UsageError(
            f"a {size}x{size} input is too small for this network: it fails {where}: {str(err).splitlines()[0]}"
        ) from None
    finally:
        for hook in hooks:
            hook.remove()
    return rows


@torch.no_grad()
def smallest_input(model: nn.Module, in_channels: int, largest: int, step: int = 4) -> int:
    """The smallest input side, in steps of ``step`` pixels up to ``largest``, that the network runs on."""
    model.eval()
    for size in range(step, largest + 1, step):
        try:
            model(torch.zeros(1, in_channels, size, size))
            return size
        except RuntimeError:
            continue
    return largest


def print_summary(args: argparse.Namespace) -> None:
    size = args.size or default_size(args.model)
    if size < 1:
        raise UsageError(f"--size must be at least 1, got {size}")
    model = get_model(args.model, args.in_channels, args.num_classes)
    rows = layer_table(model, size, args.in_channels)
    print(f"{args.model}: input (1, {args.in_channels}, {size}, {size})")
    print(f"{'layer':<24} {'type':<18} {'output shape':<22} {'params':>12} {'mult-adds':>15}")
    for row in rows:
        print(f"{row['name']:<24} {row['type']:<18} {str(row['shape']):<22} {row['params']:>12,} {row['macs']:>15,}")
    print(f"{'total':<24} {'':<18} {'':<22} {count_params(model):>12,} {sum(r['macs'] for r in rows):>15,}")


def print_models(_: argparse.Namespace) -> None:
    print(f"{'model':<12} {'input':>7} {'smallest':>9} {'params (1 ch, 10 classes)':>27}")
    for name in list_models():
        model, size = get_model(name, 1, 10), default_size(name)
        least = smallest_input(model, 1, size)
        print(f"{name:<12} {f'{size}x{size}':>7} {f'{least}x{least}':>9} {count_params(model):>27,}")
