"""What the classify endpoints do, as plain async functions: read, pick the model, decode in
parallel, batch, answer. ``service.py`` only wires them to routes.

Every client mistake becomes ``(4xx, {"error": ...})`` here, counted by reason and logged as one
JSON line with the model version and provider; nothing a client sends can produce a 500.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Awaitable, Callable

import numpy as np
from starlette.requests import Request

from model_store import ImageError, image_bytes_to_input
from serving import metrics
from serving.config import ServingConfig
from serving.engine import top_k
from serving.logs import log_event
from serving.model_set import ModelSet, ServedModel
from serving.requests import BadRequest, Upload, parse_top_k, read_batch_request, read_classify_request


class Handlers:
    def __init__(self, models: ModelSet, config: ServingConfig):
        self.models, self.config = models, config
        # Decoding and resizing run here, in parallel, never on the event loop or the inference thread.
        self.decoders = ThreadPoolExecutor(config.decode_threads, thread_name_prefix="decode")

    async def classify(self, request: Request) -> dict:
        parsed = await read_classify_request(request, self.config.max_body_bytes)
        model = self.models.get(parsed.model)
        k = parse_top_k(parsed.top_k, model.engine.card.num_classes)
        pixels = await self.decode(parsed.images[0], model)
        probabilities = await model.batcher.submit(pixels)
        return {**top_k(probabilities, model.engine.card.class_names, k), "model": model.name, "version": model.version}

    async def classify_batch(self, request: Request) -> dict:
        parsed = await read_batch_request(request, self.config.max_body_bytes, self.config.max_batch_images)
        model = self.models.get(parsed.model)
        k = parse_top_k(parsed.top_k, model.engine.card.num_classes)

        async def one(upload: Upload) -> dict:
            try:
                probabilities = await model.batcher.submit(await self.decode(upload, model))
            except ImageError as err:  # this image fails; its neighbours still get answers
                metrics.rejected.labels(reason="bad_image").inc()
                return {"filename": upload.filename, "error": str(err)}
            return {"filename": upload.filename, **top_k(probabilities, model.engine.card.class_names, k)}

        results = await asyncio.gather(*(one(upload) for upload in parsed.images))
        return {"model": model.name, "version": model.version, "results": results}

    async def decode(self, upload: Upload, model: ServedModel) -> np.ndarray:
        start = time.perf_counter()
        pixels = await asyncio.get_running_loop().run_in_executor(
            self.decoders, image_bytes_to_input, upload.data, model.engine.card, self.config.max_pixels
        )
        metrics.decode_seconds.observe(time.perf_counter() - start)
        return pixels

    async def answer(self, route: str, request: Request, handle: Callable[[Request], Awaitable[dict]]) -> tuple[int, dict]:
        """(status, body) for one request: the handler's answer, or the error a client can act on."""
        start = time.perf_counter()
        try:
            async with asyncio.timeout(self.config.timeout_s):
                status, body, reason = 200, await handle(request), None
        except (BadRequest, ImageError) as err:
            status, reason = getattr(err, "status", 400), getattr(err, "reason", "bad_image")
            body = {"error": str(err)}
        except TimeoutError:
            status, reason = 504, "timeout"
            body = {"error": f"not answered within {self.config.timeout_s:g} s (SERVING_TIMEOUT_S); the server is overloaded, retry later"}
        if reason:
            metrics.rejected.labels(reason=reason).inc()
        if self.config.log_requests or status >= 500:
            model = self._model_named(body.get("model"))
            log_event(
                "request", logging.INFO if status < 500 else logging.WARNING, route=route, status=status,
                ms=round((time.perf_counter() - start) * 1000, 2), model=model.tag if model else None,
                provider=model.engine.provider if model else None, images=len(body.get("results", [])) or 1,
                **({"error": body["error"]} if "error" in body else {}),
            )  # fmt: skip
        return status, body

    def _model_named(self, name: str | None) -> ServedModel | None:
        return next((m for m in self.models.models if m.name == name), None)
