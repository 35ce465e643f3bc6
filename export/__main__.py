"""python -m export --checkpoint runs/lenet_bn/best.pt --output lenet_bn.onnx

Exports, verifies against PyTorch on real Fashion-MNIST test images, and only then writes the file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from export.onnx_export import DEFAULT_OPSET, ExportError, compare_with_torch, export_graph, serialize, with_card
from model_store import ModelCard
from model_store.atomic import atomic_output
from training.checkpoint import file_sha256, load_model
from training.data import FashionMNIST

MAX_ABS_LOGIT_DIFF = 1e-4  # fp32 graph vs PyTorch eval, on any image


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m export", description="Export a checkpoint to a verified ONNX graph.")
    parser.add_argument("--checkpoint", type=Path, required=True, help="a checkpoint written by `python -m training train`")
    parser.add_argument("--output", type=Path, required=True, help="the .onnx file to write")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default: {DEFAULT_OPSET})")
    parser.add_argument("--verify-images", type=int, default=1000, help="test images to verify on (default: 1000)")
    parser.add_argument("--data-dir", type=Path, default=None, help="folder with the Fashion-MNIST files (default: auto)")
    return parser


def verification_inputs(card: ModelCard, count: int, data_dir: Path | None) -> np.ndarray:
    """The first ``count`` test images, made into model inputs the way serving makes them."""
    if card.dataset != "fashion-mnist":
        raise ValueError(f"cannot verify a model trained on {card.dataset!r}: only fashion-mnist is supported yet")
    dataset = FashionMNIST("test", card, data_dir, limit=count)
    return np.stack([dataset[i][0].numpy() for i in range(len(dataset))])


def main(args: argparse.Namespace) -> ModelCard:
    model, card, _ = load_model(args.checkpoint)
    if args.verify_images < 1:
        raise ValueError(f"--verify-images must be at least 1, got {args.verify_images}")
    proto, folded = export_graph(model, card, args.opset)
    print(f"eval mode: {folded['batchnorm_folded']} BatchNorm folded into conv/linear weights, "
          f"{folded['batchnorm_to_scale_shift']} turned into a constant scale and shift, "
          f"{folded['dropout_removed']} Dropout removed")  # fmt: skip
    graph = serialize(proto)
    parity = compare_with_torch(model, graph, verification_inputs(card, args.verify_images, args.data_dir))
    print(
        f"verified on {parity['images']} test images at batch sizes {parity['batch_sizes']}: "
        f"top-1 agreement {parity['top1_agreement']:.4f}, max |logit diff| {parity['max_abs_logit_diff']:.2e}"
    )
    if parity["top1_agreement"] < 1.0 or parity["max_abs_logit_diff"] > MAX_ABS_LOGIT_DIFF:
        raise ExportError(f"ONNX Runtime disagrees with PyTorch beyond the bounds (top-1 1.0, |diff| <= {MAX_ABS_LOGIT_DIFF})")
    export_info = {
        "opset": args.opset, "input": f"{proto.graph.input[0].name} uint8 [N, C, H, W]", "output": "logits float32 [N, classes]",
        "checkpoint": args.checkpoint.name, "checkpoint_sha256": file_sha256(args.checkpoint), "torch": torch.__version__,
        "eval_mode": folded, "parity": parity,
    }  # fmt: skip
    card = ModelCard.from_dict({**card.to_dict(), "export": export_info})
    with atomic_output(args.output) as f:
        f.write(serialize(with_card(proto, card)))
    print(f"ok: wrote {args.output} ({args.output.stat().st_size / 1024:.0f} KiB)")
    return card


def cli(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        main(args)
    except (ValueError, OSError, ExportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
