"""The models one service answers with: each an ONNX Runtime engine with its own batcher.

Requests name a model (``name``, ``name:version`` or ``name:latest``) or get the default, the
first configured. Warm-up runs every batch size the batcher can form (powers of two up to the
maximum) so the first real requests do not pay for kernel selection and arena growth; the service
reports ready only after. A model that fails its checks or its warm-up is set aside with the reason
and the others still serve: one bad model never takes the service down.
"""

from __future__ import annotations

import gc
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import bentoml

from model_store.engine import OnnxClassifier
from model_store.errors import UsageError
from model_store.store import MODEL_FILE, card_of, open_model
from serving import metrics
from serving.batching import MicroBatcher
from serving.config import ServingConfig
from serving.errors import ModelUnavailable, RequestError, UnknownModel
from serving.logs import log_event
from serving.monitor import Monitor

# A requested name is echoed in the 404 and its log line only this far: it comes from the client.
ECHO_MAX_CHARS = 64
MAX_TAG_CHARS = 63 + 1 + 63  # BentoML's longest name, a colon, its longest version


@dataclass
class ServedModel:
    name: str
    version: str
    engine: OnnxClassifier
    batcher: MicroBatcher
    monitor: Monitor  # its drift window, fed by the batcher's batches

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


@dataclass(frozen=True)
class FailedModel:
    name: str
    version: str
    error: str  # why it is not served: the check or the warm-up that failed

    @property
    def tag(self) -> str:
        return f"{self.name}:{self.version}"

    def describe(self) -> dict:
        return {"name": self.name, "version": self.version, "tag": self.tag, "error": self.error}


# A batch that runs in less than this runs on the event loop: a hop to a thread and back costs
# more CPU (~0.3 ms measured on 2 vCPUs, LeNet at concurrency 1) and two wake-ups of latency. It
# was 0.1 ms until the LeNet's graph grew its OOD head and its batch of one took 0.085 to 0.13 ms
# on a slower machine: the hop then cost 0.32 ms of CPU per request at concurrency 1, and p99 went
# from 1.4 to 3.4 ms (BENCHMARKS.md, "issue 26 before/after"). Below the hop's own cost, running
# on the loop is cheaper; 0.2 ms keeps the loop's longest stall for it well under a millisecond.
INLINE_BUDGET_S = 0.0002

# A batch may wait to fill (serving.batching) up to the smallest size at which an image costs at
# most this many times what it costs in the model's cheapest batch: past it, a wait buys little. The
# LeNet here: 0.14 ms for one image, 0.043 an image at 8, 0.03 at 64: it fills to 8.
FILL_COST = 1.5


class ModelSet:
    """``(name, version, ONNX file)`` for each model to serve, the default first.

    Each model is loaded and checked (:meth:`model_store.engine.OnnxClassifier.check`, one session) on its own; one that
    fails here or in :meth:`warm_up` moves to ``failed`` with the reason. Only a mistake of the
    configuration itself, a name listed twice, stops the service.
    """

    def __init__(self, config: ServingConfig, files: list[tuple[str, str, Path]]):
        names = [name for name, _, _ in files]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(
                f"SERVING_MODELS names {', '.join(map(repr, twice))} twice; serve one version of each model"
            )
        self.config = config
        self.default_name, self._default_tag = files[0][0], f"{files[0][0]}:{files[0][1]}"
        self.models: list[ServedModel] = []
        self.failed: list[FailedModel] = []
        for name, version, path in files:
            try:
                self.models.append(self._open(name, version, path))
            except Exception as err:
                self.fail(name, version, _reason(err))
        self.ready = False
        # One change of the set at a time: start-up's warm-up, a load.
        self._changing = threading.Lock()

    def _open(self, name: str, version: str, path: Path, label: str | None = None) -> ServedModel:
        """``label``: the name its metrics go by, when not ``name`` (a rollout's candidate)."""
        engine = OnnxClassifier(path, self.config.device, self.config.engine_threads)
        engine.check()  # the graph agrees with its card: classes, input shape and type, a test run
        config = self.config
        monitor = Monitor(label or name, engine)
        batcher = MicroBatcher(
            monitor.score,
            config.max_batch_size,
            config.batch_wait_ms / 1000,
            _observer(monitor),
            fill_s=config.batch_fill_ms / 1000,
        )
        return ServedModel(name, version, engine, batcher, monitor)

    @classmethod
    def from_store(cls, config: ServingConfig, pins: dict[str, str] | None = None) -> ModelSet:
        """The models ``config.models`` names, from the BentoML model store; a name given without a
        version (or as ``name:latest``) that ``pins`` names is served at the pinned tag, the
        version a rollout left live (serving.rollout), not merely the one registered last."""
        pins = pins or {}
        requested = [
            pins.get(tag.split(":")[0], tag) if tag.partition(":")[2] in ("", "latest") else tag
            for tag in config.models
        ]
        stored = [open_model(tag) for tag in requested]  # name:latest -> the version served
        models = cls(config, [(s.tag.name, s.tag.version, Path(s.path_of(MODEL_FILE))) for s in stored])
        for entry in stored:
            model = models.find(entry.tag.name)
            if model is None:
                continue  # failed already, with its reason
            try:
                _check_store_card(entry, model)
            except ValueError as err:
                models.fail(model.name, model.version, str(err))
        return models

    @property
    def default(self) -> ServedModel | None:
        """The first configured model, or None when it failed (then ``failed`` says why)."""
        return self.find(self.default_name)

    def get(self, requested: str | None) -> ServedModel:
        """The model a request names (``name``, ``name:version`` or ``name:latest``), or the default.

        A model that failed is a :class:`ModelUnavailable` saying why; any other name an
        :class:`UnknownModel` naming the choices.
        """
        name, _, version = (requested or self.default_name).partition(":")
        for model in self.models:
            if model.name == name and version in ("", "latest", model.version):
                return model
        choices = ", ".join(m.tag for m in self.models) or "no model that passed its checks"
        for failed in self.failed:
            if failed.name == name and version in ("", "latest", failed.version):
                which = f"model {failed.tag}" if requested else f"the default model {failed.tag}"
                raise ModelUnavailable(f"{which} is not served: {failed.error}; this service has {choices}")
        raise UnknownModel(f"unknown model {_shown(requested)!r}; this service has {choices}")

    def explainer(self, requested: str | None) -> ServedModel:
        """The model ``/explain`` answers with: the one a request names, else the default model when
        it has a class-activation map, else the first served model that has one (the shipped
        LeNet has none, the shipped ResNet-20 has), else the default, which then says why not."""
        if requested:
            return self.get(requested)
        default = self.default
        if default is not None and default.engine.has_cam:
            return default
        return next((m for m in self.models if m.engine.has_cam), None) or self.get(None)

    @property
    def default_tag(self) -> str:
        """The default model's tag: the version now served under the default name (a load may
        have replaced the one configured)."""
        model = self.default
        return model.tag if model else self._default_tag

    def find(self, name: str | None) -> ServedModel | None:
        return next((m for m in self.models if m.name == name), None)

    def fail(self, name: str, version: str, error: str) -> None:
        """Stop serving a model (if it was) and keep why, for ``GET /models``, requests and the log."""
        self.models = [m for m in self.models if m.name != name]  # a new list: requests may be iterating the old
        self.failed.append(FailedModel(name, version, error))
        log_event("model_failed", logging.ERROR, model=f"{name}:{version}", error=error)

    def warm_up(self) -> None:
        """Run every batch size, then let each batcher run on the event loop the batch sizes that
        take less than a thread hop costs (:data:`INLINE_BUDGET_S`, best of ten runs). A model whose
        warm-up fails is set aside; the set is ready when at least one model warmed up."""
        with self._changing:
            for model in list(self.models):
                try:
                    self._warm_up(model)
                except Exception as err:
                    self.fail(model.name, model.version, f"warm-up failed: {_reason(err)}")
        # What is alive now (modules, graphs, BentoML's app) lives as long as the process: the
        # collector need never scan it again, which keeps its full collections short under load.
        gc.freeze()
        self.ready = bool(self.models)

    def _warm_up(self, model: ServedModel) -> None:
        sizes = sorted(
            {min(2**i, self.config.max_batch_size) for i in range(self.config.max_batch_size.bit_length() + 1)}
        )
        seconds = model.engine.warm_up(sizes)  # the first run of each shape selects kernels, allocates
        # One table of best times serves both choices: of 10 runs while the sizes fit the inline
        # budget (the line between two of them is fine), of 3 past it (fill_size needs less)
        best, inline = {}, True
        for size in sizes:
            best[size] = min(model.engine.warm_up([size])[size] for _ in range(10 if inline else 3))
            inline = inline and best[size] <= INLINE_BUDGET_S
            if inline:
                model.batcher.inline_max = size
        model.batcher.fill_to = fill_size(best)
        log_event(
            "warmed_up",
            model=model.tag,
            provider=model.engine.provider,
            batch_sizes=sizes,
            seconds=round(sum(seconds.values()), 3),
            inline_max=model.batcher.inline_max,
            fill_to=model.batcher.fill_to,
        )

    def prepare(self, requested: str, label: str | None = None) -> ServedModel:
        """A model of the store (``name``, ``name:version``, ``name:latest``), checked, loaded and
        warmed up at every batch size, not yet serving: :meth:`install` switches traffic to it.
        Blocking (seconds for a large model): run it on a thread."""
        if len(requested) > MAX_TAG_CHARS:  # BentoML's errors below would echo all of it
            raise RequestError(
                f"not a model tag: {_shown(requested)!r} is longer than {MAX_TAG_CHARS} characters (name:version, "
                "each at most 63)"
            )
        try:
            entry = open_model(requested)
        except LookupError as err:
            raise UnknownModel(str(err)) from None
        except UsageError as err:  # a tag BentoML refuses: its message names the rule
            raise RequestError(_reason(err)) from None
        with self._changing:
            try:
                model = self._open(entry.tag.name, entry.tag.version, Path(entry.path_of(MODEL_FILE)), label)
                _check_store_card(entry, model)
                self._warm_up(model)
            except Exception as err:
                raise RequestError(f"model {entry.tag} cannot be served: {_reason(err)}") from None
        return model

    def install(self, model: ServedModel) -> ServedModel | None:
        """Serve ``model`` in place of the version of its name now served, if any, which is
        returned. Every request from then on gets the new one, in one step (the list is replaced,
        never changed in place); requests already holding the old one finish on it. Call on the
        event loop: it closes the old batcher."""
        old = self.find(model.name)
        self.models = [model if m is old else m for m in self.models] if old else [*self.models, model]
        self.failed = [f for f in self.failed if f.name != model.name]
        if old is not None:
            old.batcher.close()
            old.monitor.retire()
        self.ready = self.ready or bool(self.models)
        log_event("model_loaded", model=model.tag, replaced=old.tag if old else None, provider=model.engine.provider)
        return old

    def unload(self, name: str) -> str:
        """Stop serving ``name`` (its requests in flight finish); returns the tag unloaded. The
        default model stays: requests without a model name need it."""
        if name == self.default_name:
            raise RequestError(
                f"{name} is the default model and cannot be unloaded; load another version of it to replace it"
            )
        model = self.find(name)
        failed = [f for f in self.failed if f.name == name]
        if model is None and not failed:
            raise UnknownModel(f"model {_shown(name)!r} is not loaded")
        self.models = [m for m in self.models if m is not model]
        self.failed = [f for f in self.failed if f.name != name]
        if model is not None:
            model.batcher.close()
            model.monitor.retire()
        tag = model.tag if model else failed[0].tag
        log_event("model_unloaded", model=tag)
        return tag

    def index(self, ready_only: bool = False) -> list[dict]:
        """The repository index of Triton's model-repository extension: every model of the store
        with its state, READY or UNAVAILABLE with the reason."""
        served = {m.name: m for m in self.models}
        failed = {f.name: f for f in self.failed}
        entries = []
        for stored in sorted(bentoml.models.list(), key=lambda m: (m.tag.name, m.creation_time)):
            name, version = stored.tag.name, stored.tag.version
            if (model := served.get(name)) and model.version == version:
                entries.append({"name": name, "version": version, "state": "READY", "reason": ""})
            elif not ready_only:
                reason = failed[name].error if name in failed and failed[name].version == version else "not loaded"
                entries.append({"name": name, "version": version, "state": "UNAVAILABLE", "reason": reason})
        return entries

    def describe(self) -> dict:
        return {
            "default": self.default_tag,
            "models": [m.describe(m.name == self.default_name) for m in self.models],
            "failed": [f.describe() for f in self.failed],
            "review": bool(self.config.capture and self.config.auth_token),
        }

    def monitored(self) -> dict:
        """``GET /monitor``: every served model's drift figures, fresh, with their levels."""
        return {"models": [m.monitor.describe(m.tag) for m in self.models]}


def _shown(requested: str) -> str:
    return requested if len(requested) <= ECHO_MAX_CHARS else requested[:ECHO_MAX_CHARS] + "…"


def _check_store_card(entry, model: ServedModel) -> None:
    try:
        differs = card_of(entry) != model.engine.card
    except ValueError as err:
        raise UsageError(f"the card in the model store is invalid: {err}") from None
    if differs:
        raise UsageError("the card in the model store differs from the one in its ONNX file")


def _reason(error: Exception) -> str:
    """An error as one line for /models and the log; the UsageErrors of the checks already say it all."""
    text = " ".join(str(error).split())
    return text if isinstance(error, UsageError) and text else f"{type(error).__name__}: {text}"


def fill_size(seconds: dict[int, float]) -> int:
    """The smallest batch size whose images cost at most :data:`FILL_COST` times their cost in the
    cheapest batch, from ``seconds`` a batch by size."""
    cheapest = min(t / size for size, t in seconds.items())
    return min(size for size, t in seconds.items() if t / size <= FILL_COST * cheapest)


def _observer(monitor: Monitor):
    """The batch metrics of a model, under its monitor's name (which a promoted candidate changes)."""
    name = monitor.name
    batch_size, queue, inference = (
        h.labels(model=name) for h in (metrics.batch_size, metrics.queue_seconds, metrics.inference_seconds)
    )

    def on_batch(size: int, waits: list[float], seconds: float) -> None:
        nonlocal name, batch_size, queue, inference
        if monitor.name != name:
            name = monitor.name
            batch_size, queue, inference = (
                h.labels(model=name) for h in (metrics.batch_size, metrics.queue_seconds, metrics.inference_seconds)
            )
        batch_size.observe(size)
        inference.observe(seconds)
        for wait in waits:
            queue.observe(wait)

    return on_batch
