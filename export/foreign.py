"""Serve a model you already have: a torchvision or timm classifier with your own weights, or an
ONNX graph exported elsewhere, made into a graph like ours: uint8 pixels [N, C, H, W] in, normalized
inside, any batch size, logits out, the card in its metadata.

    python -m export --from-torchvision resnet18 --weights my_resnet18.pt --classes classes.txt --output r18.onnx
    python -m export --from-timm convnext_tiny --weights my_convnext.pt --classes classes.txt --output cnx.onnx
    python -m export --from-onnx theirs.onnx --classes classes.txt --mean 0.485 0.456 0.406 \\
        --std 0.229 0.224 0.225 --size 224 --output theirs-wrapped.onnx

The card comes from the arguments; where the builder publishes its evaluation transforms (the
weights enum of a torchvision builder, the pretrained config of a timm model), its input size,
mean, std, interpolation and crop are the defaults: torchvision's "resize to 256, crop 224" is the
card's ``crop_fraction`` 0.875, the same share of the short side at any ``--size``. Without
calibration images (``--calibrate-on``) the model serves with ``unsure`` null, and its card and
``/models`` say so (``calibration`` absent).

A foreign graph must take one float32 image tensor, [N, C, H, W] or [N, H, W, C] (C 1 or 3; N
symbolic or 1), normalized as ``--mean`` and ``--std`` say, and give one [N, classes] output of
logits or probabilities (``--scores``; "auto" takes a final Softmax for probabilities). Around it
go a Cast and the normalization (and a Transpose for NHWC) before, and for probabilities a Log
after: softmax(log p) is p, so the service's calibrated softmax gives the graph's own probabilities
back. A fixed batch of 1 is made symbolic when the graph then runs at other batch sizes, and
refused, naming the shape, when it does not. The OOD head measures the input of the Gemm or
MatMul that makes the logits, or the tensor ``--features`` names.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from export.onnx_export import INPUT_NAME, OUTPUT_NAME, ExportError
from export.ood_head import named_feature_tensor
from model_store import ModelCard
from model_store.card import INTERPOLATIONS, RESIZE_MODES
from model_store.errors import UsageError

SCORES = ("auto", "logits", "probabilities")
PARITY_IMAGES = 16  # seeded random images at the card's size, in both graphs or both engines
MAX_ABS_LOGIT_DIFF = 1e-4  # wrapped graph (or export) against the original, fp32
ORIGINAL_INPUT = "normalized"  # the foreign graph's input, renamed: what the normalization feeds


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("a model you already have (instead of --checkpoint)")
    group.add_argument("--from-torchvision", metavar="NAME", help="a torchvision classification builder, e.g. resnet18")
    group.add_argument("--from-timm", metavar="NAME", help="a timm model name, e.g. resnet18 (timm must be installed)")
    group.add_argument(
        "--weights",
        type=Path,
        help="--from-torchvision, --from-timm: the state_dict file (torch.save of model.state_dict())",
    )
    group.add_argument(
        "--from-onnx", type=Path, metavar="FILE", help="an ONNX classifier taking normalized float32 images"
    )
    group.add_argument(
        "--classes", type=Path, help="the class names, one per line (default: the weights enum's, if its count fits)"
    )
    group.add_argument(
        "--size", type=int, help="input side in pixels (default: the builder's crop size; ONNX: the graph's)"
    )
    group.add_argument("--channels", type=int, choices=(1, 3), help="input channels (default: 3; ONNX: the graph's)")
    group.add_argument(
        "--mean", type=float, nargs="+", help="per channel, on the 0..1 scale (default: the builder's; ONNX: required)"
    )
    group.add_argument(
        "--std", type=float, nargs="+", help="per channel, on the 0..1 scale (default: the builder's; ONNX: required)"
    )
    group.add_argument(
        "--resize", choices=RESIZE_MODES, default=None, help="how images reach the input size (default: crop)"
    )
    group.add_argument(
        "--interpolation", choices=INTERPOLATIONS, default=None, help="(default: the builder's, else bilinear)"
    )
    group.add_argument(
        "--crop-fraction",
        type=float,
        help="--resize crop keeps this share of the scaled shorter side (default: the builder's, e.g. 0.875 for "
        "torchvision's resize 256, crop 224; else 1)",
    )
    group.add_argument(
        "--features",
        metavar="TENSOR",
        help="--from-onnx: the tensor of penultimate features the OOD head measures (default: the input of the "
        "Gemm or MatMul that makes the logits)",
    )
    group.add_argument(
        "--calibrate-on",
        type=Path,
        metavar="FOLDER",
        help="your held-out images, one sub-folder per class (named as in --classes): half fit the temperature, "
        "the unsure thresholds, the OOD head and the drift reference, half measure them (default: none, "
        'answers say "unsure": null)',
    )
    group.add_argument(
        "--scores",
        choices=SCORES,
        default="auto",
        help="what the ONNX graph outputs (default: auto, a final Softmax is probabilities)",
    )


def is_foreign(args: argparse.Namespace) -> bool:
    return bool(args.from_torchvision or args.from_timm or args.from_onnx)


def builder(args: argparse.Namespace) -> str | None:
    """ "torchvision:NAME" or "timm:NAME" for a PyTorch source, None for ONNX (or a checkpoint)."""
    if args.from_torchvision:
        return f"torchvision:{args.from_torchvision}"
    return f"timm:{args.from_timm}" if args.from_timm else None


def check_sources(args: argparse.Namespace) -> None:
    """Exactly one of --checkpoint, --from-torchvision, --from-onnx; --weights with torchvision only."""
    given = [
        flag
        for flag, value in (
            ("--checkpoint", args.checkpoint),
            ("--from-torchvision", args.from_torchvision),
            ("--from-timm", args.from_timm),
            ("--from-onnx", args.from_onnx),
        )
        if value
    ]
    if len(given) != 1:
        raise UsageError(
            "give one of --checkpoint, --from-torchvision NAME, --from-timm NAME or --from-onnx FILE; "
            f"got {', '.join(given) or 'none'}"
        )
    if builder(args) and args.weights is None:
        raise UsageError(f"{given[0]} needs --weights, your state_dict file: weights are never downloaded here")
    if args.from_onnx and args.weights is not None:
        raise UsageError("--weights goes with --from-torchvision and --from-timm; an ONNX file carries its own")
    if args.features and not (args.from_onnx and args.calibrate_on):
        raise UsageError(
            "--features names the tensor of an ONNX graph (--from-onnx) that the OOD head, fitted on "
            "--calibrate-on images, measures"
        )
    if is_foreign(args) and (args.int8 or args.cam):
        raise UsageError("--int8 and --cam need a checkpoint of this project's training (its data, its architecture)")
    if args.from_onnx and (args.fp16 or args.float_input):
        raise UsageError("--fp16 and --float-input apply to --checkpoint and --from-torchvision exports")


def read_classes(path: Path | None, count: int, default: list[str] | None) -> tuple[str, ...]:
    """The class names of ``--classes`` (one per line, blank lines skipped), which must number
    ``count``, the model's outputs; without the flag, ``default`` when its count fits."""
    if path is None:
        if default is not None and len(default) == count:
            return tuple(default)
        raise UsageError(f"the model has {count} outputs: give their names with --classes FILE, one per line")
    if not path.is_file():
        raise UsageError(f"--classes {path} does not exist or is not a file")
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise UsageError(f"--classes {path} is not a UTF-8 text file of class names, one per line") from None
    if len(names) != count:
        raise UsageError(f"--classes {path} has {len(names)} names but the model has {count} outputs")
    return tuple(names)


def torchvision_defaults(name: str) -> dict:
    """The builder's published transforms (its weights enum's DEFAULT), where torchvision has them."""
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        raise UsageError(
            f"--from-torchvision {name!r} is not a torchvision classification builder; e.g. "
            + ", ".join(torchvision.models.list_models(module=torchvision.models)[:8])
            + " (torchvision.models.list_models())"
        )
    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, AttributeError):
        return {}
    transforms = weights.transforms()
    return {
        "size": transforms.crop_size[0],
        "crop_fraction": transforms.crop_size[0] / transforms.resize_size[0],
        "mean": tuple(transforms.mean),
        "std": tuple(transforms.std),
        "interpolation": transforms.interpolation.value,
        "categories": weights.meta.get("categories"),
    }


def timm_module():
    try:
        import timm
    except ModuleNotFoundError:
        raise UsageError("--from-timm needs timm: pip install timm (or the project's [test] extra)") from None
    return timm


def timm_defaults(net: nn.Module) -> dict:
    """The model's pretrained config (timm.data.resolve_model_data_config): input size, mean, std,
    interpolation and, for a centre crop, crop_pct; timm has these for every model, weights or not."""
    config = timm_module().data.resolve_model_data_config(net)
    channels, height, width = config["input_size"]
    defaults = {
        "size": height if height == width else None,
        "channels": channels,
        "mean": tuple(config["mean"]),
        "std": tuple(config["std"]),
        "interpolation": config.get("interpolation") if config.get("interpolation") in INTERPOLATIONS else None,
    }
    if config.get("crop_mode", "center") == "center" and config.get("crop_pct"):
        defaults["crop_fraction"] = float(config["crop_pct"])
    return {key: value for key, value in defaults.items() if value is not None}


def make_card(args: argparse.Namespace, arch: str, classes: tuple[str, ...], defaults: dict) -> ModelCard:
    size = args.size or defaults.get("size")
    channels = args.channels or defaults.get("channels") or 3
    mean, std = args.mean or defaults.get("mean"), args.std or defaults.get("std")
    if size is None or mean is None or std is None:
        missing = [flag for flag, value in (("--size", size), ("--mean", mean), ("--std", std)) if value is None]
        raise UsageError(f"{arch} publishes no transforms: give {', '.join(missing)}")
    if len(mean) != channels or len(std) != channels:
        raise UsageError(f"--mean and --std need one value per channel ({channels}); got {len(mean)} and {len(std)}")
    resize = args.resize or "crop"
    fraction = args.crop_fraction or (defaults.get("crop_fraction", 1.0) if resize == "crop" else 1.0)
    if fraction != 1 and resize != "crop":
        raise UsageError(f"--crop-fraction {fraction} goes with --resize crop, not --resize {resize}")
    if not 0.25 <= fraction <= 1:
        raise UsageError(f"--crop-fraction must be from 0.25 to 1, got {fraction}")
    return ModelCard(
        arch=arch,
        class_names=classes,
        in_channels=channels,
        height=size,
        width=size,
        mean=tuple(mean),
        std=tuple(std),
        resize=resize,
        crop_fraction=round(fraction, 6),  # 224 / 256 is 0.875 exactly; 0.95 stays 0.95
        interpolation=args.interpolation or defaults.get("interpolation", "bilinear"),
        decode="scaled",
        dataset="",
    )


class Normalized(nn.Module):
    """uint8 pixels -> the card's normalization -> the user's network: what our graphs compute."""

    def __init__(self, net: nn.Module, card: ModelCard):
        super().__init__()
        mean, std = torch.tensor(card.mean).view(1, -1, 1, 1), torch.tensor(card.std).view(1, -1, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * std), persistent=False)
        self.register_buffer("shift", -mean / std, persistent=False)
        self.net = net

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.to(self.scale.dtype) * self.scale + self.shift

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(pixels))


def pytorch_model(args: argparse.Namespace) -> tuple[Normalized, ModelCard]:
    """The builder's network (torchvision's or timm's) with the user's weights, and its card."""
    from training.checkpoint import read_torch_file

    state = read_torch_file(args.weights, "--weights")
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # a checkpoint that wraps its state_dict
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"--weights {args.weights} holds no state_dict of tensors")
    head = [v for k, v in state.items() if k.endswith("weight") and v.ndim == 2]
    if not head:
        raise UsageError(f"--weights {args.weights}: no linear layer's weight, so no class count")
    count = head[-1].shape[0]  # the classifier is the last linear layer in every builder's order
    source = builder(args)
    if args.from_torchvision:
        import torchvision

        defaults = torchvision_defaults(args.from_torchvision)
        net = torchvision.models.get_model(args.from_torchvision, weights=None, num_classes=count)
    else:
        timm = timm_module()
        if not timm.is_model(args.from_timm):
            raise UsageError(
                f"--from-timm {args.from_timm!r} is not a timm model; e.g. {', '.join(timm.list_models('resnet*')[:6])} "
                "(timm.list_models())"
            )
        net = timm.create_model(args.from_timm, pretrained=False, num_classes=count)
        defaults = timm_defaults(net)
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UsageError(
            f"--weights {args.weights} does not fit {source} with {count} classes: "
            f"missing {sorted(missing)[:4]}{'…' if len(missing) > 4 else ''}, "
            f"unexpected {sorted(unexpected)[:4]}{'…' if len(unexpected) > 4 else ''}"
        )
    classes = read_classes(args.classes, count, defaults.get("categories"))
    card = make_card(args, source, classes, defaults)
    return Normalized(net, card).eval(), card


def sample_pixels(card: ModelCard, count: int = PARITY_IMAGES) -> np.ndarray:
    """Seeded random uint8 images [count, C, H, W] at the card's size: what parity is checked on
    when the user gives no images (random pixels exercise every weight; they need no labels)."""
    return np.random.default_rng(0).integers(0, 256, (count, card.in_channels, card.height, card.width), dtype=np.uint8)


# --- ONNX -----------------------------------------------------------------------------------------


def foreign_input(proto: onnx.ModelProto) -> tuple[onnx.ValueInfoProto, str, list]:
    """The graph's one image input, its layout ("NCHW" or "NHWC") and its dims (int or a name)."""
    initializers = {t.name for t in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise UsageError(
            f"the graph takes {len(inputs)} inputs ({[i.name for i in inputs]}); a classifier takes one image tensor"
        )
    graph_input = inputs[0]
    tensor = graph_input.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor.shape.dim]
    if tensor.elem_type != TensorProto.FLOAT or len(dims) != 4:
        raise UsageError(
            f"the graph's input {graph_input.name!r} is {TensorProto.DataType.Name(tensor.elem_type)} of shape {dims}; "
            "a classifier taking float32 [N, C, H, W] or [N, H, W, C] images is what can be wrapped"
        )
    if dims[1] in (1, 3) and dims[3] not in (1, 3):
        return graph_input, "NCHW", dims
    if dims[3] in (1, 3) and dims[1] not in (1, 3):
        return graph_input, "NHWC", dims
    raise UsageError(
        f"the graph's input {graph_input.name!r} has shape {dims}: neither [N, C, H, W] nor [N, H, W, C] with C 1 or 3"
    )


def ends_in_softmax(proto: onnx.ModelProto) -> bool:
    output = proto.graph.output[0].name
    return any(node.op_type == "Softmax" and output in node.output for node in proto.graph.node)


def wrap_onnx(proto: onnx.ModelProto, card: ModelCard, probabilities: bool) -> onnx.ModelProto:
    """``proto`` with our input and output around it (module docstring)."""
    graph_input, layout, dims = foreign_input(proto)
    if len(proto.graph.output) != 1:
        raise UsageError(f"the graph has {len(proto.graph.output)} outputs; a classifier has one, [N, classes]")
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    graph = out.graph
    for node in graph.node:  # the old input now comes from the normalization
        node.input[:] = [ORIGINAL_INPUT if name == graph_input.name else name for name in node.input]
    kept = [i for i in graph.input if i.name != graph_input.name]
    del graph.input[:]
    graph.input.extend(
        [
            helper.make_tensor_value_info(
                INPUT_NAME, TensorProto.UINT8, ["batch", card.in_channels, card.height, card.width]
            ),
            *kept,
        ]
    )
    mean, std = (
        np.array(card.mean, np.float32).reshape(1, -1, 1, 1),
        np.array(card.std, np.float32).reshape(1, -1, 1, 1),
    )
    graph.initializer.extend(
        [numpy_helper.from_array(1.0 / (255.0 * std), "wrap_scale"), numpy_helper.from_array(-mean / std, "wrap_shift")]
    )
    normalized = "wrap_normalized_nchw" if layout == "NHWC" else ORIGINAL_INPUT
    before = [
        helper.make_node("Cast", [INPUT_NAME], ["wrap_float"], to=TensorProto.FLOAT, name="wrap_cast"),
        helper.make_node("Mul", ["wrap_float", "wrap_scale"], ["wrap_scaled"], name="wrap_mul"),
        helper.make_node("Add", ["wrap_scaled", "wrap_shift"], [normalized], name="wrap_add"),
    ]
    if layout == "NHWC":
        before.append(
            helper.make_node("Transpose", [normalized], [ORIGINAL_INPUT], perm=[0, 2, 3, 1], name="wrap_nhwc")
        )
    old_output = graph.output[0]
    after = []
    if probabilities:  # log(p): softmax of it is p again; the floor keeps a 0 from becoming -inf
        graph.initializer.append(numpy_helper.from_array(np.array(1e-30, np.float32), "wrap_floor"))
        after = [
            helper.make_node("Max", [old_output.name, "wrap_floor"], ["wrap_floored"], name="wrap_max"),
            helper.make_node("Log", ["wrap_floored"], [OUTPUT_NAME], name="wrap_log"),
        ]
    else:
        after = [helper.make_node("Identity", [old_output.name], [OUTPUT_NAME], name="wrap_logits")]
    nodes = [*before, *graph.node, *after]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", card.num_classes]))
    # The old input's shape (a fixed batch of 1 included) no longer binds anything: drop stale
    # value_info so that shape inference starts from the new, symbolic input.
    del graph.value_info[:]
    if out.opset_import and all(o.version < 13 for o in out.opset_import if o.domain in ("", "ai.onnx")):
        raise UsageError(
            f"the graph's opset {[o.version for o in out.opset_import]} is older than 13; re-export it with opset 13 or later"
        )
    try:
        onnx.checker.check_model(out, full_check=True)
    except Exception as err:  # onnx raises ValidationError and InferenceError
        raise ExportError(f"the wrapped graph does not check: {' '.join(str(err).split())[:300]}") from None
    return out


def onnx_model(args: argparse.Namespace) -> tuple[onnx.ModelProto, ModelCard, dict, dict]:
    """The user's graph wrapped, its card, the parity of the wrapped graph with the original, and
    how it was wrapped (what its output scores, its input's layout)."""
    if not args.from_onnx.is_file():
        raise UsageError(f"--from-onnx {args.from_onnx} does not exist or is not a file")
    try:
        proto = onnx.load(args.from_onnx)
    except Exception as err:
        raise UsageError(
            f"--from-onnx {args.from_onnx} is not an ONNX model: {' '.join(str(err).split())[:200]}"
        ) from None
    _, layout, dims = foreign_input(proto)
    channels, height, width = (dims[1], dims[2], dims[3]) if layout == "NCHW" else (dims[3], dims[1], dims[2])
    if not all(isinstance(d, int) and d > 0 for d in (height, width)) or height != width:
        if args.size is None:
            raise UsageError(f"the graph's input {dims} has no fixed square size: give --size")
    # From its path: torch.onnx.export writes large weights to a .data file beside the graph, which
    # onnx.load above read in, and which a session made from the bytes alone could not find.
    try:
        original = ort.InferenceSession(str(args.from_onnx), providers=["CPUExecutionProvider"])
    except Exception as err:  # ORT raises its own Fail / InvalidGraph types
        raise UsageError(
            f"--from-onnx {args.from_onnx}: ONNX Runtime cannot load it: {' '.join(str(err).split())[:200]}"
        ) from None
    width_out = original.get_outputs()[0].shape[-1]
    if not isinstance(width_out, int):
        raise UsageError(f"the graph's output {original.get_outputs()[0].shape} has no fixed class count")
    classes = read_classes(args.classes, width_out, None)
    defaults = {"size": height if isinstance(height, int) else None, "channels": channels}
    if args.mean is None or args.std is None:
        raise UsageError("--from-onnx needs --mean and --std: the normalization the graph was trained with")
    card = make_card(args, "onnx", classes, defaults)
    probabilities = {"auto": ends_in_softmax(proto), "logits": False, "probabilities": True}[args.scores]
    wrapped = wrap_onnx(proto, card, probabilities)
    if args.features:
        named_feature_tensor(wrapped, args.features)  # before the parity and calibration runs
    parity = onnx_parity(original, wrapped, card, layout, dims, probabilities)
    return wrapped, card, parity, {"scores": "probabilities" if probabilities else "logits", "layout": layout}


def onnx_parity(
    original: ort.InferenceSession,
    wrapped: onnx.ModelProto,
    card: ModelCard,
    layout: str,
    dims: list,
    probabilities: bool,
) -> dict:
    """The wrapped graph at batch sizes 1 and PARITY_IMAGES against the original at its own batch
    (1 when fixed), on the same images normalized in numpy: max |logit diff| (of log probabilities
    for a probability graph); a graph fixed to batch 1 that fails at larger batches is refused."""
    pixels = sample_pixels(card)
    mean, std = (
        np.array(card.mean, np.float32).reshape(1, -1, 1, 1),
        np.array(card.std, np.float32).reshape(1, -1, 1, 1),
    )
    normalized = (pixels.astype(np.float32) / 255.0 - mean) / std
    if layout == "NHWC":
        normalized = normalized.transpose(0, 2, 3, 1)
    name = original.get_inputs()[0].name
    batch = dims[0]
    step = 1 if batch == 1 else len(pixels)
    expected = np.concatenate(
        [original.run(None, {name: normalized[i : i + step]})[0] for i in range(0, len(pixels), step)]
    )
    if probabilities:
        expected = np.log(np.maximum(expected, 1e-30))
    options = ort.SessionOptions()
    options.log_severity_level = 4  # a batch the graph cannot run is our message below, not ORT's log line
    session = ort.InferenceSession(wrapped.SerializeToString(), options, providers=["CPUExecutionProvider"])
    worst = 0.0
    for size in (1, len(pixels)):
        try:
            got = np.concatenate(
                [session.run([OUTPUT_NAME], {INPUT_NAME: pixels[i : i + size]})[0] for i in range(0, len(pixels), size)]
            )
        except Exception as err:
            found = re.search(r"Input shape:\{[^}]*\}, requested shape:\{[^}]*\}", str(err))
            why = found.group(0) if found else " ".join(str(err).split())[:200]
            raise UsageError(
                f"the graph's input {dims} is fixed to a batch of {batch} and it does not run at a batch of {size} "
                f"once made symbolic ({why}); re-export it with a dynamic batch dimension"
            ) from None
        worst = max(worst, float(np.abs(got - expected).max()))
    if worst > MAX_ABS_LOGIT_DIFF:
        raise ExportError(
            f"the wrapped graph strays from the original: max |logit diff| {worst:.2e} > {MAX_ABS_LOGIT_DIFF}"
        )
    return {"images": len(pixels), "batch_sizes": [1, len(pixels)], "max_abs_logit_diff": worst}


def export_record(args: argparse.Namespace, source: Path, parity: dict, **more) -> dict:
    """The card's ``export`` entry of a foreign model: where it came from and what parity found."""
    from model_store.files import file_sha256

    return {
        "opset": args.opset,
        "precision": "float16" if args.fp16 else "float32",
        "input": "normalized float32 [N, C, H, W]" if args.float_input else "pixels uint8 [N, C, H, W]",
        "output": "logits float32 [N, classes]",
        "cam": False,
        "source": builder(args) or "onnx",
        "source_file": source.name,
        "source_sha256": file_sha256(source),
        "torch": torch.__version__,
        "parity": parity,
        **more,
    }


def held_out(folder: Path, card: ModelCard, seed: int = 0) -> dict:
    """``--calibrate-on``'s images, decoded as the service decodes them, split in half per class:
    {"validation": (pixels, labels), "test": (...)}, the first fitting the calibration and the OOD
    head, the second measuring them (``training.data.folder_halves``)."""
    from training.data import folder_halves

    if not folder.is_dir():
        raise UsageError(f"--calibrate-on {folder} is not a folder")
    try:
        return folder_halves(folder, card, seed)
    except UsageError as err:
        raise UsageError(f"--calibrate-on: {err}") from None
