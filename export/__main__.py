"""python -m export --checkpoint runs/lenet_bn/best.pt --output lenet_bn.onnx [--fp16 | --int8] [--float-input]

Exports, verifies against PyTorch on the real test images (Fashion-MNIST) or the validation split
(image folders), and only then writes the file, with the card in its metadata. ``--int8``
calibrates on images of the training split, never on the images it is verified on.

When the run held images out of training (``python -m training train --hold-out``, the default),
the graph's logits on them set the card's calibration (``export.calibrate``): the temperature that
serving divides logits by, and the thresholds of its ``unsure`` answers. NLL and ECE before and
after, on those images and on the test split, go into the card's ``metrics["calibration"]``. They
also make the graph's out-of-distribution head and the drift reference beside the card
(``export.ood_head``; ``--no-ood-head`` leaves both out).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from model_store.cli import prog, run
from model_store.errors import UsageError
from training.extras import exit_if_missing_extra

try:
    import numpy as np
    import torch
    from torch.utils.data import ConcatDataset

    from export import calibrate, foreign, ood_head
    from export.onnx_export import (
        DEFAULT_OPSET,
        ExportError,
        compare_cam_with_torch,
        compare_with_torch,
        export_graph,
        graph_logits,
        serialize,
        with_card,
    )
    from export.quantize import DEFAULT_CALIBRATION_IMAGES, SETTINGS, quantize_int8
    from model_store import ModelCard
    from model_store.card import CAM_ARCHS
    from model_store.files import atomic_output, file_sha256
    from training.checkpoint import load_model
    from training.data import run_splits, stack_items
    from training.dataspec import DataSpec
except ModuleNotFoundError as err:  # a serving install, without torch or onnx: say how to get them
    exit_if_missing_extra(err, "export")
    raise

MAX_ABS_LOGIT_DIFF = 1e-4  # fp32 graph vs PyTorch eval, on any image
MAX_REL_CAM_DIFF = 1e-4  # --cam: the graph's map vs PyTorch's, relative to the map's range
FP16_MIN_TOP1 = 0.999  # fp16 graph: top-1 agreement with fp32 PyTorch
INT8_MIN_TOP1 = 0.99  # int8 graph: top-1 agreement with fp32 PyTorch ...
INT8_MAX_ACCURACY_DROP = 0.005  # ... and accuracy on the true labels at most half a point below it


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog("export", "cnn-export"), description="Export a checkpoint to a verified ONNX graph."
    )
    parser.add_argument(
        "--checkpoint", type=Path, default=None, help="a checkpoint written by `python -m training train`"
    )
    parser.add_argument("--output", type=Path, required=True, help="the .onnx file to write")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default: {DEFAULT_OPSET})")
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument(
        "--fp16", action="store_true", help="compute in float16, for GPU serving; logits stay float32 (default: off)"
    )
    precision.add_argument(
        "--int8",
        action="store_true",
        help="quantize weights and activations to 8 bits, for CPU serving; logits stay float32 (default: off)",
    )
    parser.add_argument(
        "--calibration-images",
        type=int,
        default=DEFAULT_CALIBRATION_IMAGES,
        help=f"--int8: training images that set the activation ranges (default: {DEFAULT_CALIBRATION_IMAGES})",
    )
    parser.add_argument(
        "--float-input",
        action="store_true",
        help="take normalized float32 input instead of uint8 pixels (default: off)",
    )
    parser.add_argument(
        "--cam",
        action="store_true",
        help="add a second output, the class-activation map of the top class, for POST /explain; "
        "models with a global-average-pool head only, float32 only (default: off)",
    )
    parser.add_argument(
        "--verify-images", type=int, default=1000, help="Fashion-MNIST test images to verify on (default: 1000)"
    )
    parser.add_argument(
        "--verify-batch-size", type=int, default=256, help="the large verification batch (default: 256)"
    )
    parser.add_argument(
        "--target-accuracy",
        type=float,
        default=0.99,
        help="calibration: answers below the confidence at which validation answers were right this often "
        "are unsure (default: 0.99)",
    )
    parser.add_argument(
        "--id-acceptance",
        type=float,
        default=0.95,
        help="calibration: share of validation images the out-of-distribution threshold accepts (default: 0.95)",
    )
    parser.add_argument(
        "--no-ood-head",
        action="store_true",
        help="leave out the out-of-distribution head, which carries features of held-out images in the graph, "
        "and the drift reference; out_of_distribution is then judged by the energy (default: off)",
    )
    parser.add_argument(
        "--data-dir", type=Path, default=None, help="where the training data is now (default: as trained)"
    )
    foreign.add_arguments(parser)
    return parser


def check_args(args: argparse.Namespace) -> None:
    """A UsageError naming the first bad flag, before anything is loaded."""
    foreign.check_sources(args)
    if args.verify_images < 1 or args.verify_batch_size < 1:
        raise UsageError(
            f"--verify-images and --verify-batch-size must be at least 1, got {args.verify_images}, {args.verify_batch_size}"
        )
    if args.cam and (args.fp16 or args.int8):
        raise UsageError("--cam exports a float32 graph; leave out --fp16 and --int8")
    if args.int8 and args.calibration_images < 1:
        raise UsageError(f"--calibration-images must be at least 1, got {args.calibration_images}")
    for name in ("target_accuracy", "id_acceptance"):
        if not 0 < getattr(args, name) <= 1:
            raise UsageError(f"--{name.replace('_', '-')} must be in (0, 1], got {getattr(args, name)}")


def main(args: argparse.Namespace) -> ModelCard:
    check_args(args)
    if foreign.is_foreign(args):
        return main_foreign(args)
    model, card, payload = load_model(args.checkpoint)
    if args.cam and card.arch not in CAM_ARCHS:  # before the data is read and the graph traced
        raise UsageError(
            f"--cam: model {card.arch!r} has no global-average-pool head, so no class-activation map; "
            f"the models that have one: {', '.join(CAM_ARCHS)}"
        )
    parts = run_splits(card, DataSpec.from_checkpoint(payload, card, args.data_dir))
    train, evaluation = parts.train, parts.test
    count = (
        min(args.verify_images, len(evaluation)) if card.dataset == "fashion-mnist" else len(evaluation)
    )  # folders: all of it
    pixels, labels = stack_items(evaluation, range(count))

    proto, folded = export_graph(model, card, args.opset, args.float_input, args.fp16, args.cam)
    print(
        f"eval mode: {folded['batchnorm_folded']} BatchNorm folded into conv/linear weights, "
        f"{folded['batchnorm_to_scale_shift']} turned into a constant scale and shift, "
        f"{folded['dropout_removed']} Dropout removed"
    )
    precision = "float16" if args.fp16 else "int8" if args.int8 else "float32"
    quantization = None
    if args.int8:
        calibration = calibration_sample(train, args.calibration_images)
        if args.float_input:
            with torch.no_grad():
                calibration = model.normalize(torch.from_numpy(calibration)).numpy()
        proto = quantize_int8(proto, calibration)
        quantization = {"calibration_images": len(calibration), **SETTINGS}
        print(f"int8: calibrated on {len(calibration)} {card.dataset} training images")
    parity = compare_with_torch(model, serialize(proto), pixels, (1, args.verify_batch_size), labels)
    print(
        f"verified on {parity['images']} {card.dataset} evaluation images at batch sizes {parity['batch_sizes']}: "
        f"top-1 agreement {parity['top1_agreement']:.4f}, max |logit diff| {parity['max_abs_logit_diff']:.2e}, "
        f"accuracy {parity['accuracy_onnx']:.4f} (PyTorch fp32: {parity['accuracy_torch']:.4f})"
    )
    check_parity(parity, precision)
    if args.cam:
        cam_parity = compare_cam_with_torch(model, card.arch, serialize(proto), pixels)
        print(f"class-activation map: max |diff| {cam_parity['max_rel_cam_diff']:.2e} of its range")
        if cam_parity["max_rel_cam_diff"] > MAX_REL_CAM_DIFF:
            raise ExportError(f"the graph's class-activation map strays from PyTorch's beyond {MAX_REL_CAM_DIFF}")
        parity = {**parity, **cam_parity}
    card = ModelCard.from_dict(
        {**card.to_dict(), "export": export_record(args, precision, folded, parity, quantization)}
    )
    # The held-out and test images, stacked once for the calibration and the OOD head.
    held = None
    if parts.validation is not None:
        # A fine-tune's (--reviewed) held-out captures join the validation split: what the model
        # will meet now is both kinds, and its calibration, OOD head and drift reference fit both.
        validation = parts.validation if parts.field is None else ConcatDataset([parts.validation, parts.field])
        splits = {"validation": validation, "test": parts.test, "field": parts.field}
        held = {name: stack_items(split, range(len(split))) for name, split in splits.items() if split is not None}
    outside = stack_items(parts.outside, range(len(parts.outside)))[0] if parts.outside is not None else None
    return fit_and_write(proto, card, model, held, args, outside)


def fit_and_write(
    proto, card: ModelCard, model, held: dict | None, args: argparse.Namespace, outside=None
) -> ModelCard:
    """Calibrate on ``held`` (each split's uint8 pixels and labels by name: "validation" fits,
    the others are measured), add the OOD head and drift reference, and write the graph with its
    card: the tail every export shares. ``outside``: images that are no class, for the OOD head's figures."""
    card = calibrated(card, model, serialize(proto), held, args)
    reference = None
    if card.calibration is not None and not args.no_ood_head:
        features = getattr(args, "features", None)  # --from-onnx's --features, checked by export.foreign
        fitted = ood_head.fit(
            with_card(proto, card), card, held["validation"][0], held["test"][0], outside=outside, features=features
        )
        if fitted is not None:
            proto, card, reference = fitted
    with atomic_output(args.output) as f:
        f.write(serialize(ood_head.with_reference(proto, card, reference)))
    print(f"ok: wrote {args.output} ({args.output.stat().st_size / 1024:.0f} KiB)")
    return card


def main_foreign(args: argparse.Namespace) -> ModelCard:
    """A model you already have (``export.foreign``): a torchvision builder with your weights,
    exported and checked against PyTorch as ours are, or an ONNX graph wrapped and checked against
    itself; the card from the arguments; calibrated, with an OOD head and drift reference, on
    ``--calibrate-on`` images when given."""
    model = None
    if foreign.builder(args):
        model, card = foreign.pytorch_model(args)
        proto, folded = export_graph(model, card, args.opset, args.float_input, args.fp16)
        parity = compare_with_torch(model, serialize(proto), foreign.sample_pixels(card), (1, foreign.PARITY_IMAGES))
        check_parity(parity, "float16" if args.fp16 else "float32")
        record = foreign.export_record(args, args.weights, parity, eval_mode=folded)
    else:
        proto, card, parity, wrapping = foreign.onnx_model(args)
        record = foreign.export_record(args, args.from_onnx, parity, **wrapping)
    card = ModelCard.from_dict({**card.to_dict(), "export": record})
    print(
        f"{record['source']}: {card.num_classes} classes, input {card.in_channels}x{card.height}x{card.width} "
        f"(resize {card.resize}, {card.interpolation}, mean {list(card.mean)}, std {list(card.std)}); "
        f"verified on {parity['images']} random images at batch sizes {parity['batch_sizes']}: max |logit diff| "
        f"{parity['max_abs_logit_diff']:.2e}"
    )
    if args.calibrate_on is None:
        print('not calibrated: no held-out images were given (--calibrate-on), so its answers will say "unsure": null')
        with atomic_output(args.output) as f:
            f.write(serialize(with_card(proto, card)))
        print(f"ok: wrote {args.output} ({args.output.stat().st_size / 1024:.0f} KiB)")
        return card
    held = foreign.held_out(args.calibrate_on, card)
    return fit_and_write(proto, card, model if args.float_input else None, held, args)


def export_record(args: argparse.Namespace, precision: str, folded: dict, parity: dict, quantization) -> dict:
    """The card's ``export`` entry: how the graph was made and what its verification found."""
    export_info = {
        "opset": args.opset,
        "precision": precision,
        "input": "normalized float32 [N, C, H, W]" if args.float_input else "pixels uint8 [N, C, H, W]",
        "output": "logits float32 [N, classes]" + (", cam float32 [N, H, W]" if args.cam else ""),
        "cam": args.cam,
        "checkpoint": args.checkpoint.name,
        "checkpoint_sha256": file_sha256(args.checkpoint),
        "torch": torch.__version__,
        "eval_mode": folded,
        "parity": parity,
    }
    if quantization:
        export_info["quantization"] = quantization
    return export_info


def calibrated(card: ModelCard, model, graph: bytes, held: dict | None, args: argparse.Namespace) -> ModelCard:
    """``card`` with the calibration fitted on the graph's logits of the run's validation split, and
    its figures on that split and the test split in ``metrics["calibration"]``; unchanged, and
    said, when the run held no images out. ``held``: each split's (pixels, labels), by name."""
    if held is None:
        print(
            "not calibrated: this checkpoint's run held no validation images out of training (it predates "
            '--hold-out, or ran with --no-hold-out); the graph\'s answers will say "unsure": null'
        )
        return card
    logits = {name: (graph_logits(model, graph, pixels), labels) for name, (pixels, labels) in held.items()}
    calibration = calibrate.fit(*logits["validation"], args.target_accuracy, args.id_acceptance)
    figures = {name: calibrate.measure(*pair, calibration) for name, pair in logits.items()}
    threshold = calibration.confidence_threshold
    print(
        f"calibrated on {calibration.validation_images} held-out images: temperature {calibration.temperature:.3f}; "
        + "; ".join(
            f"{name} ECE {f['ece_before']:.4f} -> {f['ece_after']:.4f}, NLL {f['nll_before']:.4f} -> "
            f"{f['nll_after']:.4f}, {f['accepted']:.1%} accepted"
            for name, f in figures.items()
        )
    )
    if threshold is None:
        print(
            f"warning: no confidence threshold makes the validation answers {args.target_accuracy:.1%} right; "
            "every answer will be unsure (low_confidence)"
        )
    metrics = {**card.metrics, "calibration": {"ece_bins": calibrate.ECE_BINS, **figures}}
    return ModelCard.from_dict({**card.to_dict(), "metrics": metrics, "calibration": calibration})


def calibration_sample(dataset, count: int, seed: int = 0) -> np.ndarray:
    """uint8 inputs [N, C, H, W] of ``count`` items of ``dataset`` drawn at random with a fixed
    seed: the first images of a folder's training split are all one class."""
    if len(dataset) == 0:
        raise UsageError("int8 calibration needs training images, and the run's training split is empty")
    return stack_items(dataset, np.random.default_rng(seed).permutation(len(dataset))[:count])[0]


def check_parity(parity: dict, precision: str) -> None:
    """Fail loudly where the graph strays from PyTorch beyond its precision's documented bound."""
    agreement = parity["top1_agreement"]
    drop = parity.get("accuracy_torch", 0.0) - parity.get("accuracy_onnx", 0.0)  # no labels: no accuracy
    if precision == "float16" and agreement < FP16_MIN_TOP1:
        raise ExportError(
            f"the fp16 graph agrees with PyTorch fp32 on only {agreement:.4f} of top-1 (bound {FP16_MIN_TOP1})"
        )
    if precision == "int8" and (agreement < INT8_MIN_TOP1 or drop > INT8_MAX_ACCURACY_DROP):
        raise ExportError(
            f"the int8 graph agrees with PyTorch fp32 on {agreement:.4f} of top-1 and loses {drop:.4f} of accuracy "
            f"(bounds: at least {INT8_MIN_TOP1}, at most {INT8_MAX_ACCURACY_DROP}); "
            f"try more --calibration-images, or export without --int8"
        )
    # float32: the logits alone. Within the bound, two engines can pick different classes only for an
    # image whose top two logits are closer than twice it, a tie that another CPU's kernels may break
    # either way; requiring every top-1 to agree failed exports on such rounding, not on a wrong graph.
    if precision == "float32" and parity["max_abs_logit_diff"] > MAX_ABS_LOGIT_DIFF:
        raise ExportError(
            f"ONNX Runtime disagrees with PyTorch beyond the bound: max |logit diff| "
            f"{parity['max_abs_logit_diff']:.2e} > {MAX_ABS_LOGIT_DIFF}"
        )


def cli(argv: list[str] | None = None) -> int:
    try:
        return run(main, get_args_parser(), argv)
    except ModuleNotFoundError as err:  # one imported only when needed, e.g. onnxscript by the exporter
        exit_if_missing_extra(err, "export")
        raise


if __name__ == "__main__":
    sys.exit(cli())
