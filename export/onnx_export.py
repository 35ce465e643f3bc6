"""Checkpoint -> ONNX graph: eval mode, uint8 input normalized inside, dynamic batch, card embedded.

The graph is checked for what eval mode must have removed (BatchNormalization folded into its
neighbour, Dropout gone) and verified against PyTorch before it is written.
"""

from __future__ import annotations

import copy
import io
import logging
import warnings
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from export.cam import CAM_OUTPUT_NAME, CamModel
from model_store import ModelCard
from model_store.card import ONNX_METADATA_KEY
from model_store.errors import UsageError

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 18
INPUT_NAME, FLOAT_INPUT_NAME, OUTPUT_NAME = "pixels", "normalized", "logits"
FORBIDDEN_OPS = ("BatchNormalization", "Dropout")  # eval mode must have folded / removed them


class ExportError(UsageError):
    """The exported graph is not what serving may rely on; the message says what is wrong. A
    UsageError: the checkpoint and flags the user gave cannot make a graph we would ship."""


class ExportedModel(nn.Module):
    """What the graph computes: uint8 pixels (or, with ``float_input``, already-normalized floats)
    -> the network in fp32 or fp16 -> float32 logits."""

    def __init__(self, model: nn.Sequential, float_input: bool = False, fp16: bool = False):
        super().__init__()
        body = model.net if float_input else model
        self.body = copy.deepcopy(body).half() if fp16 else body
        self.float_input, self.fp16 = float_input, fp16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.float_input and self.fp16:
            x = x.half()
        return self.body(x).float()


def export_graph(
    model: nn.Sequential,
    card: ModelCard,
    opset: int = DEFAULT_OPSET,
    float_input: bool = False,
    fp16: bool = False,
    cam: bool = False,
) -> tuple[onnx.ModelProto, dict[str, int]]:
    """Trace a trained model (``normalize`` + ``net``) in eval mode into a checked ONNX graph.

    The graph takes uint8 pixels [N, C, H, W] named "pixels" and normalizes inside, or with
    ``float_input`` normalized float32 named "normalized"; ``fp16`` computes in half precision.
    Logits are float32 either way. Returns the graph and what eval mode took out: BatchNorms
    folded into a neighbouring conv or linear layer by the exporter, BatchNorms with no such
    neighbour (DenseNet's BN-ReLU-conv) rewritten as a constant per-channel scale and shift, and
    Dropouts removed. With ``cam`` the graph has a second output, "cam": the class-activation map
    of each image's top class (``export.cam``), float32 [N, H, W].
    """
    if cam and fp16:
        raise ValueError("a graph with a class-activation map is exported in float32; leave out fp16")
    model = model.eval()
    dtype = torch.float32 if float_input else torch.uint8
    example = torch.zeros(2, card.in_channels, card.height, card.width, dtype=dtype)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter is chatty about internals we do not control
        program = torch.onnx.export(
            (CamModel(model, card.arch, float_input) if cam else ExportedModel(model, float_input, fp16)).eval(),
            (example,),
            dynamo=True,
            opset_version=opset,
            external_data=False,
            input_names=[FLOAT_INPUT_NAME if float_input else INPUT_NAME],
            output_names=[OUTPUT_NAME, CAM_OUTPUT_NAME] if cam else [OUTPUT_NAME],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
            verbose=False,
        )
    proto = program.model_proto
    batchnorms = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    rewritten = batchnorm_to_affine(proto)
    ops = Counter(node.op_type for node in proto.graph.node)
    left = {op: ops[op] for op in FORBIDDEN_OPS if ops[op]}
    if left:
        raise ExportError(f"the exported graph still has {left}; eval-mode export must fold or remove them")
    onnx.checker.check_model(proto, full_check=True)
    logger.info("exported graph ops: %s", dict(sorted(ops.items())))
    report = {
        "batchnorm_folded": batchnorms - rewritten,
        "batchnorm_to_scale_shift": rewritten,
        "dropout_removed": sum(isinstance(m, nn.modules.dropout._DropoutNd) for m in model.modules()),
    }
    return proto, report


def batchnorm_to_affine(proto: onnx.ModelProto) -> int:
    """Rewrite each inference BatchNormalization as Mul and Add by constants; returns how many.

    y = (x - mean) / sqrt(var + eps) * gamma + beta = x * scale + shift, per channel (axis 1).
    """
    initializers = {t.name: t for t in proto.graph.initializer}
    ranks = {
        v.name: len(v.type.tensor_type.shape.dim) for v in onnx.shape_inference.infer_shapes(proto).graph.value_info
    }
    nodes, count = [], 0
    for node in proto.graph.node:
        if node.op_type != "BatchNormalization":
            nodes.append(node)
            continue
        x, *params = node.input
        if len(params) != 4 or any(p not in initializers for p in params) or x not in ranks:
            raise ExportError(f"BatchNormalization {node.name!r} has non-constant statistics; cannot fold it")
        gamma, beta, mean, var = (onnx.numpy_helper.to_array(initializers[p]).astype(np.float64) for p in params)
        epsilon = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        scale = gamma / np.sqrt(var + epsilon)
        shape = (-1,) + (1,) * (ranks[x] - 2)  # broadcast over the dimensions after the channels
        for suffix, value in (("scale", scale), ("shift", beta - mean * scale)):
            proto.graph.initializer.append(
                onnx.numpy_helper.from_array(value.astype(np.float32).reshape(shape), f"{node.name}_{suffix}")
            )
        scaled = f"{node.name}_scaled"
        nodes.append(onnx.helper.make_node("Mul", [x, f"{node.name}_scale"], [scaled], name=f"{node.name}_mul"))
        nodes.append(
            onnx.helper.make_node("Add", [scaled, f"{node.name}_shift"], [node.output[0]], name=f"{node.name}_add")
        )
        count += 1
    if count:
        del proto.graph.node[:]
        proto.graph.node.extend(nodes)
        used = {name for node in proto.graph.node for name in node.input}
        kept = [t for t in proto.graph.initializer if t.name in used]
        del proto.graph.initializer[:]
        proto.graph.initializer.extend(kept)
    return count


def with_card(proto: onnx.ModelProto, card: ModelCard) -> onnx.ModelProto:
    """A copy of ``proto`` carrying the card as JSON in metadata_props."""
    return with_metadata(proto, ONNX_METADATA_KEY, card.to_json())


def with_metadata(proto: onnx.ModelProto, key: str, value: str | None) -> onnx.ModelProto:
    """A copy of ``proto`` whose metadata_props hold ``value`` under ``key``, once (None: not at all)."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    kept = [p for p in out.metadata_props if p.key != key]
    del out.metadata_props[:]
    out.metadata_props.extend(kept)
    if value is not None:
        out.metadata_props.add(key=key, value=value)
    return out


def compare_with_torch(
    model: nn.Sequential,
    graph: bytes,
    pixels: np.ndarray,
    batch_sizes: tuple[int, ...] = (1, 256),
    labels: np.ndarray | None = None,
) -> dict[str, float]:
    """Run PyTorch eval (fp32) and ONNX Runtime (all graph optimizations on) on the same images.

    ``pixels`` are uint8 inputs; a float-input graph gets them normalized by the model's own
    ``normalize``. Returns the worst |logit difference| and the top-1 agreement over every batch
    size and, given the true ``labels``, both engines' accuracy (the graph's worst).
    """
    session = _session(graph)
    name = session.get_inputs()[0].name
    model = model.eval()
    with torch.no_grad():
        batches = [torch.from_numpy(pixels[i : i + 256]) for i in range(0, len(pixels), 256)]
        expected = torch.cat([model(b) for b in batches]).numpy()
        feed = torch.cat([model.normalize(b) for b in batches]).numpy() if name == FLOAT_INPUT_NAME else pixels
    report = {"images": len(pixels), "batch_sizes": list(batch_sizes), "max_abs_logit_diff": 0.0, "top1_agreement": 1.0}
    if labels is not None:
        report["accuracy_torch"], report["accuracy_onnx"] = float((expected.argmax(1) == labels).mean()), 1.0
    for batch_size in batch_sizes:
        got = np.concatenate(
            [session.run([OUTPUT_NAME], {name: feed[i : i + batch_size]})[0] for i in range(0, len(feed), batch_size)]
        )
        report["max_abs_logit_diff"] = max(report["max_abs_logit_diff"], float(np.abs(got - expected).max()))
        report["top1_agreement"] = min(report["top1_agreement"], float((got.argmax(1) == expected.argmax(1)).mean()))
        if labels is not None:
            report["accuracy_onnx"] = min(report["accuracy_onnx"], float((got.argmax(1) == labels).mean()))
    return report


def compare_cam_with_torch(
    model: nn.Sequential, arch: str, graph: bytes, pixels: np.ndarray, batch_size: int = 64
) -> dict[str, float]:
    """The graph's "cam" output against PyTorch's (:class:`export.cam.CamModel` on the unexported
    model) on uint8 ``pixels``: the worst |difference| relative to each map's range. (Not the peak's
    position: a map upsampled from a few cells has flat tops, where rounding picks the pixel.)"""
    session = _session(graph)
    name = session.get_inputs()[0].name
    reference = CamModel(model.eval(), arch).eval()
    worst = 0.0
    for start in range(0, len(pixels), batch_size):
        batch = torch.from_numpy(pixels[start : start + batch_size])
        with torch.no_grad():
            expected = reference(batch)[1].numpy()
            feed = model.normalize(batch).numpy() if name == FLOAT_INPUT_NAME else batch.numpy()
        got = session.run([CAM_OUTPUT_NAME], {name: feed})[0]
        spread = np.ptp(expected.reshape(len(expected), -1), axis=1).reshape(-1, 1, 1) + 1e-12
        worst = max(worst, float((np.abs(got - expected) / spread).max()))
    return {"images": len(pixels), "max_rel_cam_diff": worst}


def graph_logits(model: nn.Sequential, graph: bytes, pixels: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """The graph's logits [N, classes] of uint8 ``pixels``, fed as :func:`compare_with_torch` feeds them."""
    session = _session(graph)
    name = session.get_inputs()[0].name
    logits = []
    for start in range(0, len(pixels), batch_size):
        batch = pixels[start : start + batch_size]
        if name == FLOAT_INPUT_NAME:
            with torch.no_grad():
                batch = model.eval().normalize(torch.from_numpy(batch)).numpy()
        logits.append(session.run([OUTPUT_NAME], {name: batch})[0])
    return np.concatenate(logits)


def _session(graph: bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])


def serialize(proto: onnx.ModelProto) -> bytes:
    buffer = io.BytesIO()
    onnx.save_model(proto, buffer)
    return buffer.getvalue()
