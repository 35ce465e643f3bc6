"""The engines a speed benchmark times, and how it times them: PyTorch eager and ONNX Runtime
sessions as one call each (uint8 pixels in, float32 logits out), and one timing round."""

from __future__ import annotations

import os
import platform
import time
from typing import Callable

import numpy as np
import onnxruntime as ort
import torch

Engine = Callable[[np.ndarray], np.ndarray]  # uint8 pixels [N, C, H, W] -> float32 logits [N, classes]


def seconds_per_call(run: Callable[[], object], min_seconds: float = 0.2) -> float:
    """One timing round: repeats the call for at least ``min_seconds``."""
    calls, start = 0, time.perf_counter()
    while True:
        run()
        calls += 1
        if time.perf_counter() - start >= min_seconds:
            return (time.perf_counter() - start) / calls


def eager_engine(model: torch.nn.Module, device: str) -> Engine:
    model = model.to(device).eval()

    def run(pixels: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(pixels).to(device)).float().cpu().numpy()  # .cpu() waits for the GPU

    return run


def onnx_engine(graph: bytes, providers: list, threads: int) -> Engine:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(graph, options, providers=providers)
    wanted = providers[0] if isinstance(providers[0], str) else providers[0][0]
    if session.get_providers()[0] != wanted:  # ONNX Runtime falls back silently; a fallback is not this engine
        raise RuntimeError(f"{wanted} did not load; the session runs on {session.get_providers()}")
    name = session.get_inputs()[0].name
    return lambda pixels: session.run(None, {name: pixels})[0]


def device_name(device: str, threads: int) -> str:
    if device == "cuda":
        return f"GPU {torch.cuda.get_device_name()}"
    return (
        f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), {threads} threads for each engine"
    )
