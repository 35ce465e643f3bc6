"""Checkpoint -> ONNX graph: eval mode, uint8 input normalized inside, dynamic batch, card embedded.

The graph is checked for what eval mode must have removed (BatchNormalization folded into its
neighbour, Dropout gone) and verified against PyTorch before it is written.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from model_store import ModelCard
from model_store.card import ONNX_METADATA_KEY

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 18
INPUT_NAME, OUTPUT_NAME = "pixels", "logits"
FORBIDDEN_OPS = ("BatchNormalization", "Dropout")  # eval mode must have folded / removed them


class ExportError(RuntimeError):
    """The exported graph is not what serving may rely on; the message says what is wrong."""


def export_graph(model: nn.Module, card: ModelCard, opset: int = DEFAULT_OPSET) -> tuple[onnx.ModelProto, dict[str, int]]:
    """Trace ``model`` (uint8 [N, C, H, W] -> logits) in eval mode into a checked ONNX graph.

    Returns the graph and what eval mode took out: BatchNorms folded into a neighbouring conv or
    linear layer by the exporter, BatchNorms with no such neighbour (DenseNet's BN-ReLU-conv)
    rewritten as a constant per-channel scale and shift, and Dropouts removed.
    """
    model = model.eval()
    example = torch.zeros(2, card.in_channels, card.height, card.width, dtype=torch.uint8)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter is chatty about internals we do not control
        program = torch.onnx.export(
            model, (example,), dynamo=True, opset_version=opset, external_data=False,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), verbose=False,
        )  # fmt: skip
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
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in onnx.shape_inference.infer_shapes(proto).graph.value_info}
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
            proto.graph.initializer.append(onnx.numpy_helper.from_array(value.astype(np.float32).reshape(shape), f"{node.name}_{suffix}"))
        scaled = f"{node.name}_scaled"
        nodes.append(onnx.helper.make_node("Mul", [x, f"{node.name}_scale"], [scaled], name=f"{node.name}_mul"))
        nodes.append(onnx.helper.make_node("Add", [scaled, f"{node.name}_shift"], [node.output[0]], name=f"{node.name}_add"))
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
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    kept = [p for p in out.metadata_props if p.key != ONNX_METADATA_KEY]
    del out.metadata_props[:]
    out.metadata_props.extend(kept)
    out.metadata_props.add(key=ONNX_METADATA_KEY, value=card.to_json())
    return out


def compare_with_torch(
    model: nn.Module, graph: bytes, pixels: np.ndarray, batch_sizes: tuple[int, ...] = (1, 256)
) -> dict[str, float]:
    """Run PyTorch eval and ONNX Runtime (all graph optimizations on) on the same uint8 inputs.

    Returns the worst |logit difference| and the top-1 agreement over every batch size.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    model = model.eval()
    with torch.no_grad():
        expected = torch.cat([model(torch.from_numpy(pixels[i : i + 256])) for i in range(0, len(pixels), 256)]).numpy()
    max_diff, agree = 0.0, 1.0
    for batch_size in batch_sizes:
        got = np.concatenate(
            [session.run([OUTPUT_NAME], {INPUT_NAME: pixels[i : i + batch_size]})[0] for i in range(0, len(pixels), batch_size)]
        )
        max_diff = max(max_diff, float(np.abs(got - expected).max()))
        agree = min(agree, float((got.argmax(1) == expected.argmax(1)).mean()))
    return {"images": len(pixels), "batch_sizes": list(batch_sizes), "max_abs_logit_diff": max_diff, "top1_agreement": agree}


def serialize(proto: onnx.ModelProto) -> bytes:
    buffer = io.BytesIO()
    onnx.save_model(proto, buffer)
    return buffer.getvalue()
