"""The models one service answers with: each an ONNX Runtime engine with its own batcher.

Requests name a model (``name`` or ``name:version``) or get the default, the first configured.
Warm-up runs every batch size the batcher can form (powers of two up to the maximum) so the first
real requests do not pay for kernel selection and arena growth; the service reports ready only after.
"""

from __future__ import annotations

from dataclasses import dataclass

from model_store.store import MODEL_FILE, card_of, open_model
from serving import metrics
from serving.batching import MicroBatcher
from serving.config import ServingConfig
from serving.engine import OnnxClassifier
from serving.logs import log_event
from serving.requests import BadRequest


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
            "name": self.name, "version": self.version, "tag": self.tag, "default": default,
            "provider": self.engine.provider, "provider_error": self.engine.provider_error,
            "card": self.engine.card.to_dict(),
        }  # fmt: skip


class ModelSet:
    def __init__(self, config: ServingConfig):
        self.config = config
        self.models: list[ServedModel] = []
        for requested in config.models:
            stored = open_model(requested)  # resolves name:latest to the version actually served
            name, version = stored.tag.name, stored.tag.version
            if any(m.name == name for m in self.models):
                raise ValueError(f"SERVING_MODELS names {name!r} twice; serve one version of each model")
            engine = OnnxClassifier(stored.path_of(MODEL_FILE), config.device, config.ort_threads or None)
            if engine.card != card_of(stored):
                raise ValueError(f"{stored.tag}: the card in the store differs from the one inside its ONNX file")
            batcher = MicroBatcher(engine.predict, config.max_batch_size, config.batch_wait_ms / 1000, _observer(name))
            self.models.append(ServedModel(name, version, engine, batcher))
        self.ready = False

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
        raise BadRequest(f"unknown model {requested!r}; this service has {choices}", 404, "unknown_model")

    def warm_up(self) -> None:
        sizes = sorted({min(2**i, self.config.max_batch_size) for i in range(self.config.max_batch_size.bit_length() + 1)})
        for model in self.models:
            seconds = model.engine.warm_up(sizes)
            log_event("warmed_up", model=model.tag, provider=model.engine.provider, batch_sizes=sizes,
                      seconds=round(sum(seconds.values()), 3))  # fmt: skip
        self.ready = True

    def describe(self) -> dict:
        return {"default": self.default.tag, "models": [m.describe(m is self.default) for m in self.models]}


def _observer(name: str):
    batch_size, queue, inference = (h.labels(model=name) for h in (metrics.batch_size, metrics.queue_seconds, metrics.inference_seconds))

    def on_batch(size: int, waits: list[float], seconds: float) -> None:
        batch_size.observe(size)
        inference.observe(seconds)
        for wait in waits:
            queue.observe(wait)

    return on_batch

