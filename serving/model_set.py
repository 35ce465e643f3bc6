"""The models one service answers with: each an ONNX Runtime engine with its own batcher.

Requests name a model (``name`` or ``name:version``) or get the default, the first configured.
Warm-up runs every batch size the batcher can form (powers of two up to the maximum) so the first
real requests do not pay for kernel selection and arena growth; the service reports ready only after.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path

from model_store.store import MODEL_FILE, card_of, open_model
from serving import metrics
from serving.batching import MicroBatcher
from serving.config import ServingConfig
from serving.engine import OnnxClassifier
from serving.errors import UnknownModel
from serving.logs import log_event


@dataclass
class ServedModel:
    name: str
    version: str
    engine: OnnxClassifier
    batcher: MicroBatcher

    @property
    def tag(self) -> str:
        return f"{self.name}:{self.version}"

    def describe(self, default: bool) -> dict:
        return {
            "name": self.name,
            "version": self.version,
            "tag": self.tag,
            "default": default,
            "provider": self.engine.provider,
            "provider_error": self.engine.provider_error,
            "precision": self.engine.card.export.get("precision", "float32"),
            "card": self.engine.card.to_dict(),
        }


# A batch that runs in less than this runs on the event loop: a hop to a thread and back costs
# more CPU (~0.3 ms measured on 2 vCPUs, LeNet at concurrency 1) and two wake-ups of latency.
INLINE_BUDGET_S = 0.0001


class ModelSet:
    """``(name, version, ONNX file)`` for each model to serve, the default first."""

    def __init__(self, config: ServingConfig, files: list[tuple[str, str, Path]]):
        self.config = config
        self.models: list[ServedModel] = []
        for name, version, path in files:
            if any(m.name == name for m in self.models):
                raise ValueError(f"SERVING_MODELS names {name!r} twice; serve one version of each model")
            engine = OnnxClassifier(path, config.device, config.engine_threads)
            batcher = MicroBatcher(engine.predict, config.max_batch_size, config.batch_wait_ms / 1000, _observer(name))
            self.models.append(ServedModel(name, version, engine, batcher))
        self.ready = False

    @classmethod
    def from_store(cls, config: ServingConfig) -> ModelSet:
        """The models ``config.models`` names, from the BentoML model store."""
        stored = [open_model(requested) for requested in config.models]  # name:latest -> the version served
        models = cls(config, [(s.tag.name, s.tag.version, Path(s.path_of(MODEL_FILE))) for s in stored])
        for model, entry in zip(models.models, stored):
            if model.engine.card != card_of(entry):
                raise ValueError(f"{entry.tag}: the card in the store differs from the one inside its ONNX file")
        return models

    @property
    def default(self) -> ServedModel:
        return self.models[0]

    def get(self, requested: str | None) -> ServedModel:
        """The model a request names (``name`` or ``name:version``), or the default; 404 names the choices."""
        if not requested:
            return self.default
        for model in self.models:
            if requested in (model.name, model.tag):
                return model
        choices = ", ".join(m.tag for m in self.models)
        raise UnknownModel(f"unknown model {requested!r}; this service has {choices}")

    def find(self, name: str | None) -> ServedModel | None:
        return next((m for m in self.models if m.name == name), None)

    def warm_up(self) -> None:
        """Run every batch size, then let each batcher run on the event loop the batch sizes that
        take less than a thread hop costs (:data:`INLINE_BUDGET_S`, best of ten runs)."""
        sizes = sorted(
            {min(2**i, self.config.max_batch_size) for i in range(self.config.max_batch_size.bit_length() + 1)}
        )
        for model in self.models:
            seconds = model.engine.warm_up(sizes)  # the first run of each shape selects kernels, allocates
            for size in sizes:
                if min(model.engine.warm_up([size])[size] for _ in range(10)) > INLINE_BUDGET_S:
                    break
                model.batcher.inline_max = size
            log_event(
                "warmed_up",
                model=model.tag,
                provider=model.engine.provider,
                batch_sizes=sizes,
                seconds=round(sum(seconds.values()), 3),
                inline_max=model.batcher.inline_max,
            )
        # What is alive now (modules, graphs, BentoML's app) lives as long as the process: the
        # collector need never scan it again, which keeps its full collections short under load.
        gc.freeze()
        self.ready = True

    def describe(self) -> dict:
        return {"default": self.default.tag, "models": [m.describe(m is self.default) for m in self.models]}


def _observer(name: str):
    batch_size, queue, inference = (
        h.labels(model=name) for h in (metrics.batch_size, metrics.queue_seconds, metrics.inference_seconds)
    )

    def on_batch(size: int, waits: list[float], seconds: float) -> None:
        batch_size.observe(size)
        inference.observe(seconds)
        for wait in waits:
            queue.observe(wait)

    return on_batch
