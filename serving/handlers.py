"""What the classify routes do, as plain async functions: read, pick the model, decode, batch,
answer. They raise the domain errors of ``serving.errors``; ``serving.edge`` turns those into HTTP.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
from starlette.requests import Request

from model_store import ImageError, load_image, open_image, to_input
from serving import metrics
from serving.config import ServingConfig
from serving.decoders import DecodePool
from serving.engine import top_k
from serving.model_set import ModelSet, ServedModel
from serving.requests import Upload, parse_top_k, read_batch_request, read_classify_request

# Images this small are decoded on the event loop: at 28x28 a decode costs ~0.07 ms, less than the
# hop to a decoder process and back. The byte bound caps what reading the header can cost there;
# the pixel bound what decoding can (a few KB of PNG can hold megapixels of one colour), and the
# scan bound of model_store.preprocess what a progressive JPEG can.
INLINE_MAX_BYTES = 16 * 1024
INLINE_MAX_PIXELS = 128 * 128


class Handlers:
    def __init__(self, models: ModelSet, config: ServingConfig):
        self.models, self.config = models, config
        # Larger images are decoded and resized in these processes, in parallel, off the event loop
        # and the inference thread, each under a time and memory limit.
        self.max_decode_bytes = config.max_decode_mb * 2**20
        self.decoders = DecodePool(
            config.decode_workers, config.decode_timeout_s, config.max_pixels, self.max_decode_bytes
        )

    async def classify(self, request: Request) -> dict:
        parsed = await read_classify_request(request, self.config.max_body_bytes)
        model = self.models.get(parsed.model)
        k = parse_top_k(parsed.top_k, model.engine.card.num_classes)
        probabilities = await model.batcher.submit(await self.decode(parsed.images[0], model))
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
        card, max_pixels = model.engine.card, self.config.max_pixels
        small = (
            len(upload.data) <= INLINE_MAX_BYTES
            and (image := open_image(upload.data, max_pixels, self.max_decode_bytes)).width * image.height
            <= INLINE_MAX_PIXELS
        )
        if small:
            pixels = to_input(load_image(image), card)
        else:
            pixels = await self.decoders.decode(upload.data, card)
        metrics.decode_seconds.observe(time.perf_counter() - start)
        return pixels
