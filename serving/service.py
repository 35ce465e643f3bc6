"""The BentoML service: ``POST /classify`` an image, get its class. Run: ``bentoml serve``.

Two services in one process tree. ``Classifier`` reads and decodes each request on its own, so a
bad image is answered 400 before it can touch a batch; ``Engine`` runs ONNX Runtime on adaptive
batches gathered from all concurrent requests. The model is ``$SERVING_MODEL`` from the BentoML
model store (default ``fashion-lenet:latest``); its card, not this code, says how to preprocess.
"""

from __future__ import annotations

import asyncio
import logging
import os

import bentoml
import numpy as np

with bentoml.importing():
    from model_store import ImageError, image_bytes_to_input
    from model_store.store import MODEL_FILE, card_of, open_model
    from serving.engine import OnnxClassifier, top_k
    from serving.requests import BadRequest, RawRequest, read_image_request

MODEL_TAG = os.environ.get("SERVING_MODEL", "fashion-lenet:latest")
logger = logging.getLogger("bentoml.service")


@bentoml.service(workers=1)
class Engine:
    model = bentoml.models.BentoModel(MODEL_TAG)  # at class scope, so `bentoml build` packages it

    def __init__(self) -> None:
        self.classifier = OnnxClassifier(open_model(MODEL_TAG).path_of(MODEL_FILE))
        logger.info("engine: %s on %s", MODEL_TAG, self.classifier.provider)

    @bentoml.api(batchable=True, batch_dim=0, max_batch_size=64, max_latency_ms=1000)
    def predict(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 inputs [N, C, H, W] -> class probabilities [N, classes]."""
        return self.classifier.predict(pixels)


@bentoml.service(traffic={"timeout": 30})
class Classifier:
    engine = bentoml.depends(Engine)

    def __init__(self) -> None:
        self.card = card_of(open_model(MODEL_TAG))

    @bentoml.api(route="/classify", input_spec=RawRequest)
    async def classify(self, ctx: bentoml.Context) -> dict:
        """Classify one image: multipart field `image` or a raw image/* body; optional `top_k` (default 3)."""
        try:
            request = await read_image_request(ctx.request, self.card.num_classes)
            # Decoding is CPU work that releases the GIL: a thread keeps the event loop serving.
            pixels = await asyncio.to_thread(image_bytes_to_input, request.data, self.card)
        except (BadRequest, ImageError) as err:
            ctx.response.status_code = getattr(err, "status", 400)
            return {"error": str(err)}
        probabilities = await self.engine.to_async.predict(pixels[None])
        return top_k(probabilities[0], self.card.class_names, request.top_k)
