"""The out-of-distribution head: a graph's penultimate features, and their distance to the k-th
nearest held-out image, as two more outputs of the graph; and the drift reference fitted with it.

    python -m export.ood_head --onnx model_store/default/fashion-lenet.onnx --output fashion-lenet.onnx

Export adds it to every graph it calibrates (``python -m export``); run as above, it adds it to a
graph exported before the head existed, on the same held-out images (the run's ``--val-ratio`` and
``--seed``), leaving the network and its logits as they were.

Why this score: ``benchmarks/feature_ood.py`` measured four on both shipped models against digits,
photographs, noise and blank images. Only the Euclidean distance of the raw penultimate features
to their 10th nearest neighbour among held-out images had an AUROC of at least 0.95 on every set
for both (the LeNet on noise: 0.964, where the energy of the logits has 0.675); normalising the
features (Sun et al., 2022) lost noise, whose features are unusually long, and a Mahalanobis
distance to the class means lost photographs. The features are the input of the graph's last
Gemm, the layer that makes the logits, so any network of the registry has them.

A network wider than :data:`MAX_DRIFT_FEATURES` (a torchvision ResNet-18's 512 features) is scored
otherwise: by how far its features lie off the held-out features' principal subspace
(:func:`with_residual_head`): on the same weights and threshold rule, 0.993 of those images that
are not clothes answered unsure against the k-th neighbour's 0.771 (uniform noise: 0.988 against
0.318; BENCHMARKS.md, "A model trained elsewhere"). Its graph carries the bank's mean and principal
axes, not its rows.

The held-out images are split in two at random: the bank, whose features the graph carries (up to
:data:`MAX_BANK` of them: 1 MB for the LeNet's 84 features x 3,000 images), and the rest, never in
the bank, on which the threshold is set (``id_acceptance`` of them accepted) and the drift levels
fitted (``model_store.drift``). On the bank's own images the distance would be to themselves.
The bank embeds features of held-out training images in the artifact: anyone with the graph can
read them, and, roughly, what those images were. For a dataset that must not leave, export with
``--no-ood-head``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

from model_store import ModelCard
from model_store.calibration import scores
from model_store.cli import run
from model_store.drift import DEFAULT_WINDOW, Clamp, DriftReference, fit_all_levels, fit_reference
from model_store.drift import ONNX_METADATA_KEY as DRIFT_METADATA_KEY
from model_store.engine import FEATURES_OUTPUT, OOD_OUTPUT, OnnxClassifier
from model_store.errors import UsageError
from model_store.files import atomic_output
from training.extras import exit_if_missing_extra

try:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from export.onnx_export import serialize, with_card, with_metadata
except ModuleNotFoundError as err:  # a serving install, without torch or onnx: say how to get them
    exit_if_missing_extra(err, "python -m export.ood_head")
    raise

K = 10  # the neighbour measured to; benchmarks/feature_ood.py measured k = 10
# The distance is measured in the bank's first principal components, at most this many: the MatMul
# against the bank is the head's cost (the LeNet's 84 features made it a third of the network's),
# and 32 of them kept every AUROC of the 84 within 0.006 (BENCHMARKS.md, "Out-of-distribution scores").
DIMS = 32
MAX_BANK = 5000  # held-out feature vectors the graph carries at most: memory and one MatMul per image
# The drift window's Fréchet distance takes an eigendecomposition of a D x D covariance per window:
# fitting its levels takes thousands, minutes at D = 512 (a ResNet-18's features). A wider network's
# drift is measured on the bank's first DIMS principal axes: the graph's "features" output is then
# that projection. A shift only along the axes left out goes unseen by feature_frechet; those are
# the directions the held-out features vary least along. A wider network's OOD score is the
# residual off the bank's principal subspace (with_residual_head), not the k-th neighbour.
MAX_DRIFT_FEATURES = 256
# The residual is taken off this many principal axes at most. On a ResNet-18's 512 features (1,000
# images in the bank; BENCHMARKS.md, "A model trained elsewhere") 32 axes flagged 0.958 of the images
# that are not clothes, 64 0.991, 128 0.993 and 256 0.995, with 0.653 to 0.659 of clothes answered
# sure alike; 128 leaves 8 bank images an axis, so the last axes still describe clothes rather than
# the bank's own images.
RESIDUAL_AXES = 128
MIN_HELD_OUT = 4 * K  # fewer held-out images: no head (a bank of 2k, and 2k to set a threshold on)
BATCH = 512  # images per ONNX Runtime call while fitting
# Between the layer that makes the logits and the graph's output: casts, int8 quantize/dequantize
# pairs, and what export.foreign wraps a probability graph's end in (its Softmax, then Max and Log).
PASS_THROUGH = ("Cast", "Identity", "DequantizeLinear", "QuantizeLinear", "Softmax", "Log", "Max")
MAX_FEATURES = 4096  # wider (a named tensor that is a whole feature map): the bank would be gigabytes


def feature_tensor(proto: onnx.ModelProto) -> str | None:
    """The name of the tensor the layer that makes the logits takes (the penultimate features): a
    Gemm's input, or a MatMul's (with its bias Add after it, as some exporters write a Linear), past
    :data:`PASS_THROUGH` nodes; None when the logits are made otherwise."""
    graph = proto.graph
    constants = {init.name for init in graph.initializer} | {
        out for node in graph.node if node.op_type == "Constant" for out in node.output
    }
    made_by = {output: node for node in graph.node for output in node.output}
    node = made_by.get(graph.output[0].name)
    while node is not None and node.op_type in PASS_THROUGH:
        node = made_by.get(node.input[0])
    if node is not None and node.op_type == "Add":  # MatMul + bias
        computed = [name for name in node.input if name not in constants]
        node = made_by.get(computed[0]) if len(computed) == 1 else None
    if node is None or node.op_type not in ("Gemm", "MatMul"):
        return None
    return node.input[0] if node.input[0] not in constants else None


def named_feature_tensor(proto: onnx.ModelProto, name: str) -> str:
    """``name`` (``--features``) when the graph computes a tensor of that name; else a UsageError
    listing some that it does."""
    made = [output for node in proto.graph.node for output in node.output]
    if name not in made:
        near = [output for output in made if name.lower() in output.lower()][:6] or made[-6:]
        raise UsageError(f"--features {name!r} is no tensor the graph computes; e.g. {near}")
    return name


def without_head(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``proto`` without the outputs, nodes and constants :func:`with_head` adds: the
    graph as export made it before (a head is always fitted anew, never stacked on an old one)."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    graph = out.graph
    ours = {FEATURES_OUTPUT, OOD_OUTPUT}

    def added(name: str) -> bool:
        return name in ours or name.startswith("ood_")

    kept_nodes = [node for node in graph.node if not any(added(name) for name in node.output)]
    kept_outputs = [output for output in graph.output if output.name not in ours]
    kept_constants = [init for init in graph.initializer if not added(init.name)]
    for field, kept in ((graph.node, kept_nodes), (graph.output, kept_outputs), (graph.initializer, kept_constants)):
        del field[:]
        field.extend(kept)
    return out


def with_outputs(proto: onnx.ModelProto, features: str, output: str = FEATURES_OUTPUT) -> onnx.ModelProto:
    """A copy of ``proto`` whose tensor ``features``, flattened after the batch axis (a named one may
    be [N, C, 1, 1]), is also the float32 tensor ``output`` [N, D]; a graph output when it is "features"."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    out.graph.node.extend(
        [
            helper.make_node("Flatten", [features], ["ood_flat"], axis=1),
            helper.make_node("Cast", ["ood_flat"], [output], to=TensorProto.FLOAT),
        ]
    )
    if output == FEATURES_OUTPUT:
        out.graph.output.append(helper.make_tensor_value_info(FEATURES_OUTPUT, TensorProto.FLOAT, ["N", None]))
    return out


def principal_axes(bank: np.ndarray, dims: int = DIMS) -> tuple[np.ndarray, np.ndarray]:
    """(mean [D], axes [D, d]): the bank's mean and its first ``d = min(dims, D)`` principal axes."""
    bank = np.asarray(bank, np.float64)
    mean = bank.mean(axis=0)
    axes = np.linalg.svd(bank - mean, full_matrices=False)[2][:dims].T
    return mean, axes


def with_head(proto: onnx.ModelProto, features: str, bank: np.ndarray, k: int = K, dims: int = DIMS) -> onnx.ModelProto:
    """A copy of ``proto`` with the outputs "features" and "ood_distance" [N]: the Euclidean distance
    of each image's features, projected on the bank's first ``dims`` principal axes, to the k-th
    nearest row of ``bank`` [M, D] projected alike.

    ``|z - b|^2 = |b|^2 - 2 z.b + |z|^2``: one MatMul against the bank with its norms added (ORT fuses
    the two into one Gemm), TopK of the k smallest, the largest of those, and only then ``|z|^2``, the
    same for every row of the bank: one add per image, not one per image and bank row. float32
    throughout; near neighbours lose a little to cancellation, far below what separates clothes
    from noise."""
    if not 1 <= k <= len(bank):
        raise ValueError(f"k must be between 1 and the bank's {len(bank)} rows, got {k}")
    mean, axes = principal_axes(bank, dims)
    on_axes = (np.asarray(bank, np.float64) - mean) @ axes  # [M, d]
    out = with_outputs(proto, features)
    graph = out.graph
    graph.initializer.extend(
        [
            numpy_helper.from_array(axes.astype(np.float32), "ood_axes"),
            numpy_helper.from_array((-mean @ axes).astype(np.float32), "ood_shift"),
            numpy_helper.from_array(np.ascontiguousarray(-2 * on_axes.T).astype(np.float32), "ood_bank_times_minus_2"),
            numpy_helper.from_array((on_axes**2).sum(axis=1).astype(np.float32), "ood_bank_norms"),
            numpy_helper.from_array(np.array([1], np.int64), "ood_axis"),
            numpy_helper.from_array(np.array([k], np.int64), "ood_k"),
        ]
    )
    graph.node.extend(
        [
            helper.make_node("MatMul", [FEATURES_OUTPUT, "ood_axes"], ["ood_turned"]),
            helper.make_node("Add", ["ood_turned", "ood_shift"], ["ood_projected"]),  # (f - mean) @ axes
            helper.make_node("MatMul", ["ood_projected", "ood_bank_times_minus_2"], ["ood_cross"]),
            helper.make_node("Add", ["ood_cross", "ood_bank_norms"], ["ood_partial"]),
            helper.make_node("TopK", ["ood_partial", "ood_k"], ["ood_nearest", "ood_nearest_index"], largest=0),
            helper.make_node("ReduceMax", ["ood_nearest", "ood_axis"], ["ood_kth_partial"], keepdims=0),
            helper.make_node("ReduceSumSquare", ["ood_projected", "ood_axis"], ["ood_norms"], keepdims=0),
            helper.make_node("Add", ["ood_kth_partial", "ood_norms"], ["ood_kth"]),
            helper.make_node("Relu", ["ood_kth"], ["ood_kth_clipped"]),  # cancellation can dip below 0
            helper.make_node("Sqrt", ["ood_kth_clipped"], [OOD_OUTPUT]),
        ]
    )
    graph.output.append(helper.make_tensor_value_info(OOD_OUTPUT, TensorProto.FLOAT, ["N"]))
    onnx.checker.check_model(out)
    return out


def residual_axes(width: int, images: int) -> int:
    """How many principal axes a wide network's residual is taken off: :data:`RESIDUAL_AXES`, fewer
    for a narrower network or a smaller bank (a quarter of either), whose last axes would otherwise
    be fitted to the bank's own images rather than to clothes."""
    return max(1, min(RESIDUAL_AXES, width // 4, images // 4))


def with_residual_head(
    proto: onnx.ModelProto, features: str, bank: np.ndarray, dims: int = DIMS, span_axes: int | None = None
) -> onnx.ModelProto:
    """A wide network's head: a copy of ``proto`` with the outputs "features", the features projected
    on the bank's first ``dims`` principal axes [N, dims] (what the drift window holds), and
    "ood_distance" [N], the length of what is left of the centred features off the bank's first
    :func:`residual_axes` principal axes: how far an image's features lie from the subspace the
    held-out images' features span (``span_axes`` of them when given). The bank itself is not in
    the graph, only its mean and axes.

    Why not the shipped models' k-th neighbour: measured on a torchvision ResNet-18's 512 features
    (BENCHMARKS.md, "A model trained elsewhere"), the distance to the 10th nearest of the bank on 32
    axes let uniform noise through (its features lie as far from clothes along those axes as
    clothes do from each other), taken in the full space too; off the clothes' principal subspace,
    noise, photographs and blank images all lie far. The residual is computed as ``c - (c A) A^T``,
    not ``|c|^2 - |c A|^2``, which float32 cancellation would blur for images near the subspace."""
    spanned = span_axes or residual_axes(np.shape(bank)[1], len(bank))
    mean, principal = principal_axes(bank, max(dims, spanned))  # one SVD for both
    span, axes = principal[:, :spanned], principal[:, :dims]
    out = with_outputs(proto, features, "ood_features")
    out.graph.initializer.extend(
        [
            numpy_helper.from_array(mean.astype(np.float32), "ood_mean"),
            numpy_helper.from_array(axes.astype(np.float32), "ood_axes"),
            numpy_helper.from_array(span.astype(np.float32), "ood_span"),
            numpy_helper.from_array(np.ascontiguousarray(span.T).astype(np.float32), "ood_span_back"),
            numpy_helper.from_array(np.array([1], np.int64), "ood_axis"),
        ]
    )
    out.graph.node.extend(
        [
            helper.make_node("Sub", ["ood_features", "ood_mean"], ["ood_centred"]),
            helper.make_node("MatMul", ["ood_centred", "ood_axes"], [FEATURES_OUTPUT]),
            helper.make_node("MatMul", ["ood_centred", "ood_span"], ["ood_on_span"]),
            helper.make_node("MatMul", ["ood_on_span", "ood_span_back"], ["ood_in_span"]),
            helper.make_node("Sub", ["ood_centred", "ood_in_span"], ["ood_residual"]),
            helper.make_node("ReduceSumSquare", ["ood_residual", "ood_axis"], ["ood_norms"], keepdims=0),
            helper.make_node("Sqrt", ["ood_norms"], [OOD_OUTPUT]),
        ]
    )
    out.graph.output.extend(
        [
            helper.make_tensor_value_info(FEATURES_OUTPUT, TensorProto.FLOAT, ["N", axes.shape[1]]),
            helper.make_tensor_value_info(OOD_OUTPUT, TensorProto.FLOAT, ["N"]),
        ]
    )
    onnx.checker.check_model(out)
    return out


def fit(
    proto: onnx.ModelProto,
    card: ModelCard,
    held_out: np.ndarray,
    test: np.ndarray,
    seed: int = 0,
    outside: np.ndarray | None = None,
    features: str | None = None,
) -> tuple[onnx.ModelProto, ModelCard, DriftReference] | None:
    """``proto`` (with ``card`` in it, calibrated) with the head, its card with the kNN threshold and
    the head's figures, and the drift reference: all fitted on the uint8 ``held_out`` images, the
    run's validation split, and the head's share of ``test`` images accepted measured; and of
    ``outside`` images (reviewed captures labelled not_in_domain) flagged. Those never join the bank
    nor move the threshold, which is set by the share of in-distribution images the card promises to
    accept (``id_acceptance``): they measure it. ``features``: the tensor of penultimate features
    (default: :func:`feature_tensor`'s). None, said why on stdout, when the graph or the split
    cannot have one."""
    proto = without_head(proto)
    named = features is not None
    features = features or feature_tensor(proto)
    if card.calibration is None or features is None or len(held_out) < MIN_HELD_OUT:
        why = (
            "the card has no calibration"
            if card.calibration is None
            else "its logits are not made by a Gemm or MatMul (name the features' tensor with --features)"
            if features is None
            else f"the run held out {len(held_out)} images, fewer than {MIN_HELD_OUT}"
        )
        print(f"no OOD head: {why}; out_of_distribution stays judged by the energy of the logits")
        return None
    order = np.random.default_rng(seed).permutation(len(held_out))
    banked = order[: min(len(order) // 2, MAX_BANK)]
    rest = order[len(order) // 2 :]
    plain = OnnxClassifier(serialize(with_outputs(proto, features)), device="cpu")
    bank_logits, bank = plain.run(held_out[banked], [plain.output_name, FEATURES_OUTPUT], BATCH)
    if bank.shape[1] > MAX_FEATURES:
        print(f"no OOD head: the features {features!r} number {bank.shape[1]:,}, more than {MAX_FEATURES:,}")
        return None
    width = bank.shape[1]
    wide = width > MAX_DRIFT_FEATURES
    spanned = residual_axes(width, len(banked)) if wide else None  # what with_residual_head takes
    headed = with_residual_head(proto, features, bank, span_axes=spanned) if wide else with_head(proto, features, bank)
    engine = OnnxClassifier(serialize(with_card(headed, card)), device="cpu")
    names = [engine.output_name, OOD_OUTPUT, FEATURES_OUTPUT]
    logits, distances, rest_features = engine.run(held_out[rest], names, BATCH)
    if wide:  # the drift reference's features are what the graph's output now gives
        bank = engine.run(held_out[banked], [FEATURES_OUTPUT], BATCH)[0]
    calibration = dataclasses.replace(
        card.calibration, knn_threshold=float(np.quantile(distances, card.calibration.id_acceptance, method="higher"))
    )
    probabilities, energies = scores(logits, calibration.temperature)
    codes = calibration.reason_codes(probabilities.max(axis=1), energies, distances)
    shares, gaussian = fit_reference(bank_logits.argmax(axis=1), bank, card.num_classes)
    answers = (probabilities.argmax(axis=1), codes, distances, rest_features)
    levels, early_levels, clamps = fit_all_levels(shares, gaussian, answers, DEFAULT_WINDOW, seed)
    reference = DriftReference(
        window=DEFAULT_WINDOW,
        class_shares=tuple(shares.tolist()),
        feature_mean=_rounded(gaussian.mean),
        feature_cov=tuple(map(_rounded, gaussian.cov)),
        levels=levels,
        images=len(banked),
        level_images=len(rest),
        early_levels=early_levels,
    )
    test_distances = engine.run(test, [OOD_OUTPUT], BATCH)[0] if len(test) else np.zeros(0)
    record = {
        "score": (
            f"euclidean distance of the penultimate features off the first {spanned} principal axes of the bank's"
            if wide
            else f"euclidean distance of the penultimate features to the {K}th nearest of the bank, "
            f"on the bank's first {dims_of(headed)} principal axes"
        ),
        "k": None if wide else K,
        "residual_axes": spanned,
        "tensor": features if named else None,  # found: the Gemm's or MatMul's input, as always
        "features": width,
        "dims": dims_of(headed),
        "drift_features": f"the first {dims_of(headed)} principal axes" if wide else None,
        "bank_images": len(banked),
        "threshold_images": len(rest),
        "test_flagged": float(np.mean(test_distances > calibration.knn_threshold)) if len(test) else None,
    }
    if outside is not None and len(outside):
        outside_distances = engine.run(outside, [OOD_OUTPUT], BATCH)[0]
        record["not_in_domain_flagged"] = float(np.mean(outside_distances > calibration.knn_threshold))
        record["not_in_domain_images"] = len(outside)
    network = card.export.get("output", "logits float32 [N, classes]").split(f", {FEATURES_OUTPUT} ")[0]  # a refit's
    outputs = f"{network}, {FEATURES_OUTPUT} float32 [N, {dims_of(headed) if wide else 'D'}], {OOD_OUTPUT} float32 [N]"
    export = {**card.export, "output": outputs, "ood": _no_nulls(record)}
    card = ModelCard.from_dict({**card.to_dict(), "calibration": calibration, "export": export})
    print(
        (
            f"OOD head: residual off {record['residual_axes']} principal axes of {len(banked)} held-out feature "
            f"vectors of {width}; distance threshold "
            if wide
            else f"OOD head: {len(banked)} held-out feature vectors of {width} in the graph; distance threshold "
        )
        + f"{calibration.knn_threshold:.3f} accepts {card.calibration.id_acceptance:.0%} of {len(rest)} others"
        + (f", flags {record['test_flagged']:.1%} of {len(test)} test images" if len(test) else "")
        + (
            f", flags {record['not_in_domain_flagged']:.1%} of {len(outside)} reviewed images not in domain"
            if "not_in_domain_flagged" in record
            else ""
        )
        + f"; drift on {record.get('drift_features', 'the features')}, levels for a window of {reference.window:,} answers: "
        + ", ".join(f"{name} {level:.4g}" for name, level in reference.levels.items())
    )
    warn_about_levels(reference, clamps)
    return headed, card, reference


def dims_of(headed: onnx.ModelProto) -> int:
    """How many principal axes the head of ``headed`` projects on."""
    axes = next(init for init in headed.graph.initializer if init.name == "ood_axes")
    return int(axes.dims[1])


def warn_about_levels(reference: DriftReference, clamps: list[Clamp]) -> None:
    """Say when the drift levels rest on too few held-out images to mean much, and which share's
    level was clamped under 1 (a level no window could exceed)."""
    if reference.level_images < reference.window:
        # Each window is drawn from the level images: from fewer than it holds, it is mostly repeats,
        # and the levels measure that resample more than any real traffic.
        print(
            f"warning: the drift levels were fitted on {reference.level_images:,} held-out images, fewer than the "
            f"{reference.window:,} answers of a window: they say little about real traffic. Hold out at least "
            f"{2 * reference.window:,} images (half of them go to the OOD bank), e.g. with a larger --val-ratio"
        )
    for clamp in clamps:
        print(
            f"warning: {clamp.statistic}'s drift level for a window of {clamp.answers:,} answers came out at "
            f"{clamp.fitted:.4g}, which no share can exceed; clamped to {clamp.level:.4g}: it alerts only when every "
            "answer of the window is unsure"
        )


def with_reference(proto: onnx.ModelProto, card: ModelCard, reference: DriftReference | None) -> onnx.ModelProto:
    """``proto`` carrying ``card`` and, beside it, the drift reference (none: no such key)."""
    return with_metadata(with_card(proto, card), DRIFT_METADATA_KEY, reference and reference.to_json())


def _rounded(values: np.ndarray) -> tuple[float, ...]:
    """7 significant digits, float32's: the full repr of float64 made the LeNet's reference 150 KB of JSON."""
    return tuple(float(f"{value:.7g}") for value in values.tolist())


def _no_nulls(record: dict) -> dict:
    return {key: value for key, value in record.items() if value is not None}  # the store's metadata holds none


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m export.ood_head",
        description="Add the out-of-distribution head and the drift reference to an exported, calibrated graph.",
    )
    parser.add_argument("--onnx", type=Path, required=True, help="a calibrated graph written by `python -m export`")
    parser.add_argument("--output", type=Path, required=True, help="the .onnx file to write (may be --onnx)")
    parser.add_argument("--data-dir", type=Path, default=None, help="the run's data (default: found as training does)")
    parser.add_argument("--val-ratio", type=float, default=0.1, help="the run's --val-ratio (default: 0.1)")
    parser.add_argument("--seed", type=int, default=0, help="the run's --seed (default: 0)")
    return parser


def main(args: argparse.Namespace) -> ModelCard:
    from training.data import splits, stack_items  # the retrofit only: export passes the images in
    from training.dataspec import DataSpec

    card = OnnxClassifier(args.onnx, device="cpu").card  # a UsageError for a file that is no graph
    proto = onnx.load(args.onnx)
    calibration = card.calibration
    if calibration is None:
        raise UsageError(f"{args.onnx} is not calibrated: export it from a run trained with --hold-out")
    if calibration.knn_threshold is not None:
        raise UsageError(f"{args.onnx} has an OOD head already (its card's knn_threshold is set)")
    spec = DataSpec(dataset=card.dataset, data_dir=args.data_dir, val_ratio=args.val_ratio, seed=args.seed)
    parts = splits(spec, card)
    if parts.validation is None or len(parts.validation) != calibration.validation_images:
        raise UsageError(
            f"--val-ratio {args.val_ratio} --seed {args.seed} hold out "
            f"{0 if parts.validation is None else len(parts.validation)} images, but {args.onnx} was calibrated on "
            f"{calibration.validation_images}: give the run's own"
        )
    held_out = stack_items(parts.validation, range(len(parts.validation)))[0]
    test = stack_items(parts.test, range(len(parts.test)))[0]
    fitted = fit(proto, card, held_out, test, args.seed)
    if fitted is None:
        raise UsageError(f"{args.onnx} cannot have an OOD head (said above)")
    headed, card, reference = fitted
    with atomic_output(args.output) as f:
        f.write(serialize(with_reference(headed, card, reference)))
    print(f"ok: wrote {args.output} ({args.output.stat().st_size / 1024:.0f} KiB)")
    return card


if __name__ == "__main__":
    sys.exit(run(main, get_args_parser()))
