"""python -m export --checkpoint runs/lenet_bn/best.pt --output lenet_bn.onnx [--fp16] [--float-input]

Exports, verifies against PyTorch on the real test images (Fashion-MNIST) or the validation split
(image folders), and only then writes the file, with the card in its metadata.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from export.onnx_export import DEFAULT_OPSET, ExportError, compare_with_torch, export_graph, serialize, with_card
from model_store import ModelCard
from model_store.files import atomic_output, file_sha256
from training.checkpoint import load_model
from training.data import evaluation_split

MAX_ABS_LOGIT_DIFF = 1e-4  # fp32 graph vs PyTorch eval, on any image
FP16_MIN_TOP1 = 0.999  # fp16 graph: top-1 agreement with fp32 PyTorch


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m export", description="Export a checkpoint to a verified ONNX graph.")
    parser.add_argument("--checkpoint", type=Path, required=True, help="a checkpoint written by `python -m training train`")
    parser.add_argument("--output", type=Path, required=True, help="the .onnx file to write")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default: {DEFAULT_OPSET})")
    parser.add_argument("--fp16", action="store_true", help="compute in float16, for GPU serving; logits stay float32 (default: off)")
    parser.add_argument("--float-input", action="store_true",
                        help="take normalized float32 input instead of uint8 pixels (default: off)")  # fmt: skip
    parser.add_argument("--verify-images", type=int, default=1000, help="Fashion-MNIST test images to verify on (default: 1000)")
    parser.add_argument("--verify-batch-size", type=int, default=256, help="the large verification batch (default: 256)")
    parser.add_argument("--data-dir", type=Path, default=None, help="where the training data is now (default: as trained)")
    return parser


def main(args: argparse.Namespace) -> ModelCard:
    if args.verify_images < 1 or args.verify_batch_size < 1:
        raise ValueError(f"--verify-images and --verify-batch-size must be at least 1, got {args.verify_images}, {args.verify_batch_size}")
    model, card, payload = load_model(args.checkpoint)
    limit = args.verify_images if card.dataset == "fashion-mnist" else None  # folders: the whole validation split
    dataset = evaluation_split(card, payload.get("args", {}), args.data_dir, limit)
    pixels = np.stack([dataset[i][0].numpy() for i in range(len(dataset))])

    proto, folded = export_graph(model, card, args.opset, args.float_input, args.fp16)
    print(f"eval mode: {folded['batchnorm_folded']} BatchNorm folded into conv/linear weights, "
          f"{folded['batchnorm_to_scale_shift']} turned into a constant scale and shift, "
          f"{folded['dropout_removed']} Dropout removed")  # fmt: skip
    parity = compare_with_torch(model, serialize(proto), pixels, (1, args.verify_batch_size))
    print(f"verified on {parity['images']} {card.dataset} evaluation images at batch sizes {parity['batch_sizes']}: "
          f"top-1 agreement {parity['top1_agreement']:.4f}, max |logit diff| {parity['max_abs_logit_diff']:.2e}")  # fmt: skip
    if args.fp16:
        if parity["top1_agreement"] < FP16_MIN_TOP1:
            raise ExportError(f"the fp16 graph agrees with PyTorch fp32 on only {parity['top1_agreement']:.4f} of top-1 (bound {FP16_MIN_TOP1})")
    elif parity["top1_agreement"] < 1.0 or parity["max_abs_logit_diff"] > MAX_ABS_LOGIT_DIFF:
        raise ExportError(f"ONNX Runtime disagrees with PyTorch beyond the bounds (top-1 1.0, |diff| <= {MAX_ABS_LOGIT_DIFF})")
    export_info = {
        "opset": args.opset, "precision": "float16" if args.fp16 else "float32",
        "input": "normalized float32 [N, C, H, W]" if args.float_input else "pixels uint8 [N, C, H, W]",
        "output": "logits float32 [N, classes]", "checkpoint": args.checkpoint.name,
        "checkpoint_sha256": file_sha256(args.checkpoint), "torch": torch.__version__, "eval_mode": folded, "parity": parity,
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
