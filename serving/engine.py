"""The inference engine: an ONNX Runtime session over an exported graph, shared by the HTTP
service and the batch scorer. Takes uint8 inputs, returns class probabilities."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from model_store.card import ONNX_METADATA_KEY, ModelCard

logger = logging.getLogger(__name__)

GPU_PROVIDER, CPU_PROVIDER = "CUDAExecutionProvider", "CPUExecutionProvider"


def default_providers() -> list[str]:
    """CUDA when this onnxruntime build has it (onnxruntime-gpu on a GPU machine), else the CPU."""
    return [GPU_PROVIDER, CPU_PROVIDER] if GPU_PROVIDER in ort.get_available_providers() else [CPU_PROVIDER]


class OnnxClassifier:
    """An exported classifier: ``predict(uint8 [N, C, H, W]) -> float32 probabilities [N, classes]``."""

    def __init__(self, path: str | os.PathLike, providers: list[str] | None = None, threads: int | None = None):
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=providers or default_providers())
        props = self.session.get_modelmeta().custom_metadata_map
        if ONNX_METADATA_KEY not in props:
            raise ValueError(f"{path} carries no model card; export it with `python -m export`")
        self.card = ModelCard.from_json(props[ONNX_METADATA_KEY])
        graph_input = self.session.get_inputs()[0]
        self.input_name = graph_input.name
        # A graph exported with --float-input leaves normalization to its caller: do it here, with
        # the card's mean and std (the same numbers the uint8 graphs carry inside).
        self.normalize = graph_input.type == "tensor(float)"
        mean, std = (np.array(v, np.float32).reshape(1, -1, 1, 1) for v in (self.card.mean, self.card.std))
        self._scale, self._shift = 1.0 / (255.0 * std), -mean / std
        self.provider = self.session.get_providers()[0]
        logger.info("loaded %s (%s, %d classes) on %s", Path(path).name, self.card.arch, self.card.num_classes, self.provider)

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        expected = (self.card.in_channels, self.card.height, self.card.width)
        if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[1:] != expected:
            raise ValueError(f"expected uint8 input of shape [N, {', '.join(map(str, expected))}], got {pixels.dtype} {pixels.shape}")
        feed = pixels.astype(np.float32) * self._scale + self._shift if self.normalize else pixels
        logits = self.session.run(None, {self.input_name: feed})[0]
        return softmax(logits)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def top_k(probabilities: np.ndarray, class_names: tuple[str, ...], k: int) -> dict:
    """One image's answer: the best class, its probability, and the k best, most likely first."""
    order = np.argsort(probabilities)[::-1][:k]
    ranked = [{"label": class_names[i], "index": int(i), "probability": float(probabilities[i])} for i in order]
    return {**ranked[0], "top_k": ranked}
