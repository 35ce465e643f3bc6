"""What an operator can set: every serving limit and choice, read once from the environment.

Each field has one ``SERVING_*`` variable (see ``ENV``); a bad value stops the service at start
with a message naming the variable, the value and what is allowed, rather than surfacing later as
a failed request. The README's table of limits is this file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Mapping

DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class ServingConfig:
    models: tuple[str, ...] = ("fashion-lenet:latest",)  # BentoML store tags; the first is the default
    device: str = "auto"  # auto: CUDA when this onnxruntime build has it; cuda: the same, but a fallback is an error in the logs and /models
    max_batch_size: int = 64  # images per ONNX Runtime call
    batch_wait_ms: float = 0.0  # extra time a batch waits to fill; 0: run with whatever queued meanwhile
    max_body_bytes: int = 10 * 1024 * 1024  # request body limit -> 413
    max_pixels: int = 40_000_000  # width x height limit, checked from the header before decoding -> 400
    max_batch_images: int = 64  # images in one /classify_batch request -> 400
    max_concurrency: int = 256  # classify requests in flight; beyond -> 503 with Retry-After
    timeout_s: float = 10.0  # per classify request, decode and queue included -> 504
    auth_token: str = ""  # when set, classify and /models need "Authorization: Bearer <token>"
    decode_threads: int = os.cpu_count() or 1  # parallel decode + resize (Pillow releases the GIL)
    ort_threads: int = 0  # ONNX Runtime intra-op threads on CPU, per worker; 0: the cores shared among the workers
    log_requests: bool = True  # one JSON log line per classify request
    tracing: bool = False  # OpenTelemetry spans for classify requests, through BentoML's request layer (exporter: BentoML's tracing config)
    workers: int = 1  # service processes, each with its own copy of the models and its own batches

    def __post_init__(self) -> None:
        if not self.models or any(not tag.strip() for tag in self.models):
            raise ValueError(f"SERVING_MODELS must list at least one model tag, got {','.join(self.models)!r}")
        if self.device not in DEVICES:
            raise ValueError(f"SERVING_DEVICE must be one of {', '.join(DEVICES)}, got {self.device!r}")
        for name in (
            "max_batch_size",
            "max_body_bytes",
            "max_pixels",
            "max_batch_images",
            "max_concurrency",
            "decode_threads",
            "workers",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{ENV[name]} must be at least 1, got {getattr(self, name)}")
        for name in ("batch_wait_ms", "ort_threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"{ENV[name]} must be 0 or more, got {getattr(self, name)}")
        if self.timeout_s <= 0:
            raise ValueError(f"SERVING_TIMEOUT_S must be positive, got {self.timeout_s}")

    @property
    def engine_threads(self) -> int:
        """Intra-op threads for each ONNX Runtime session: as set, or the cores divided among the
        workers, so that workers do not run more compute threads than there are cores."""
        return self.ort_threads or max(1, (os.cpu_count() or 1) // self.workers)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> ServingConfig:
        values = {}
        for field in fields(cls):
            raw = environ.get(ENV[field.name], "").strip()
            if raw:
                values[field.name] = _parse(field.name, field.type, raw)
        return cls(**values)


ENV = {field.name: f"SERVING_{field.name.upper()}" for field in fields(ServingConfig)}


def _parse(name: str, kind: str, raw: str):
    try:
        if kind == "tuple[str, ...]":
            return tuple(tag.strip() for tag in raw.split(","))
        if kind == "bool":
            if raw.lower() not in ("1", "true", "yes", "0", "false", "no"):
                raise ValueError
            return raw.lower() in ("1", "true", "yes")
        return {"int": int, "float": float, "str": str}[kind](raw)
    except ValueError:
        expected = {"int": "an integer", "float": "a number", "bool": "true or false"}.get(kind, kind)
        raise ValueError(f"{ENV[name]} must be {expected}, got {raw!r}") from None
