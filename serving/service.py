"""The BentoML service: ``POST /classify`` an image, get its class. Run: ``bentoml serve``.

Each request is read and decoded on its own (in a thread, so decodes run in parallel), so a bad
image is answered 4xx before it can touch a batch; the decoded inputs of concurrent requests are
then run through ONNX Runtime together (``serving.batching``). The model is ``$SERVING_MODEL`` from
the BentoML model store (default ``fashion-lenet:latest``); the card inside its ONNX file, not this
code, says how to preprocess and what the classes are.
"""

from __future__ import annotations

import asyncio
import logging
import os

import bentoml

with bentoml.importing():
    from model_store import ImageError, image_bytes_to_input
    from model_store.store import MODEL_FILE, open_model
    from serving.batching import MicroBatcher
    from serving.engine import OnnxClassifier, top_k
    from serving.requests import BadRequest, RawRequest, read_image_request

MODEL_TAG = os.environ.get("SERVING_MODEL", "fashion-lenet:latest")
MAX_BATCH_SIZE = 64
logger = logging.getLogger("bentoml.service")
batch_size_metric = bentoml.metrics.Histogram(
    name="classify_batch_size",
    documentation="images per ONNX Runtime call",
    buckets=(1, 2, 4, 8, 16, 32, 64, float("inf")),
)


@bentoml.service(traffic={"timeout": 30}, workers=1)
class Classifier:
    model = bentoml.models.BentoModel(MODEL_TAG)  # at class scope, so `bentoml build` packages it

    def __init__(self) -> None:
        self.engine = OnnxClassifier(open_model(MODEL_TAG).path_of(MODEL_FILE))
        self.card = self.engine.card
        self.batcher = MicroBatcher(self.engine.predict, MAX_BATCH_SIZE, on_batch=batch_size_metric.observe)
        logger.info("serving %s (%s) on %s", MODEL_TAG, self.card.arch, self.engine.provider)

    @bentoml.api(route="/classify", input_spec=RawRequest)
    async def classify(self, ctx: bentoml.Context) -> dict:
        """Classify one image: multipart field `image` or a raw image/* body; optional `top_k` (default 3)."""
        try:
            request = await read_image_request(ctx.request, self.card.num_classes)
            pixels = await asyncio.to_thread(image_bytes_to_input, request.data, self.card)
        except (BadRequest, ImageError) as err:
            ctx.response.status_code = getattr(err, "status", 400)
            return {"error": str(err)}
        probabilities = await self.batcher.submit(pixels)
        return top_k(probabilities, self.card.class_names, request.top_k)
