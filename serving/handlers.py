"""What the classify routes do, as plain async functions: read, pick the model, decode, batch,
answer. They raise the domain errors of ``serving.errors``; ``serving.edge`` turns those into HTTP.
"""

from __future__ import annotations

import asyncio
import base64
import time
from pathlib import Path

import numpy as np
from PIL import Image

from model_store import ImageError, load_image, open_image, to_input
from model_store.card import CAM_ARCHS, ModelCard
from model_store.engine import answer
from serving import metrics, v2
from serving.capture import Capture
from serving.config import ServingConfig
from serving.decoders import DecodePool
from serving.edge import CLASSIFY_BATCH
from serving.errors import Conflict, Forbidden, ModelUnavailable, NotExplainable
from serving.failures import error_answer
from serving.heatmap import overlay_png
from serving.model_set import ModelSet, ServedModel
from serving.requests import Received, Upload, parse_top_k, read_batch_request, read_classify_request
from serving.review import Review, ReviewRoute
from serving.rollout import KEY_HEADER, RolloutRoute, Rollouts

# Where an image is decoded, by what decoding it costs: on the event loop when that is less than the
# hop to a decoder process and back (0.3 ms of CPU for a small image, 3 ms for a 12 MP JPEG), else in a
# decoder process (BENCHMARKS.md, "Where an image is decoded"). The cost is estimated from the header
# as the bytes to read plus the pixels to decode (after a scaled decode), each 3 to 20 ns here: 32 Ki
# of them cost at most ~0.5 ms, which also bounds how long one decode holds up the loop. A phone
# photo (26 ms for a 12 MP JPEG) would hold every other request up that long and leave the other
# cores idle. The scan bound of model_store.preprocess caps what a progressive JPEG can add.
INLINE_MAX_WORK = 32 * 1024


class Handlers:
    def __init__(self, models: ModelSet, config: ServingConfig):
        self.models, self.config = models, config
        self.changing = asyncio.Lock()
        # Larger images are decoded and resized in these processes, in parallel, off the event loop
        # and the inference thread, each under a time and memory limit.
        self.max_decode_bytes = config.max_decode_mb * 2**20
        self.decoders = DecodePool(
            config.decode_workers, config.decode_timeout_s, config.max_pixels, self.max_decode_bytes
        )
        # What the models were unsure of, kept for review (serving.capture): off without SERVING_CAPTURE.
        self.capture = Capture.from_config(config) if config.capture else None
        store = self.capture.store if self.capture else None
        self.reviews = Review(store, self.capture, models, token_set=bool(config.auth_token))
        # Candidates beside served models, shadowed or on canary (serving.rollout).
        self.rollouts = Rollouts(models, config, state_path(config), store)

    async def classify(self, received: Received) -> dict:
        parsed = read_classify_request(received)
        model = self.models.get(parsed.model)
        k = parse_top_k(parsed.top_k, model.engine.card.num_classes)
        upload = parsed.images[0]
        pixels = await self.decode(upload, model)
        if self.rollouts.active and (rollout := self.rollouts.of(model, parsed.model)):
            side = rollout.candidate_answers(received.headers.get(KEY_HEADER))
            model, row = await self.rollouts.score(rollout, model, pixels, side)
        else:
            row = await model.batcher.submit(pixels)
        result = answer(row, model.engine.card, k)
        if self.capture is not None:
            self.capture.offer(model, upload.data, row, result["unsure_reason"])
        return {**result, "model": model.name, "version": model.version}

    async def explain(self, received: Received, png_allowed: bool = True) -> dict | v2.Encoded:
        """``/classify``'s answer plus the class-activation map of the top class, drawn over the
        model's input as a PNG: base64 in ``cam_png``, or the PNG alone when the request accepts
        ``image/png`` (and ``png_allowed``). It runs on the engine in a thread of its own, not through
        the batcher, whose batches fetch the logits only. Without a model named, the first served
        model that has a map answers (``ModelSet.explainer``); the answer names it."""
        parsed = read_classify_request(received)
        model = self.models.explainer(parsed.model)
        card = model.engine.card
        # The request is checked whole first (top_k, the image), so a bad one is a 400 whatever the model.
        k = parse_top_k(parsed.top_k, card.num_classes)
        pixels = await self.decode(parsed.images[0], model)
        if not model.engine.has_cam:
            able = [m.tag for m in self.models.models if m.engine.has_cam]
            why = (
                "was exported without one; re-export it with `python -m export --cam`"
                if card.arch in CAM_ARCHS
                else "has no global-average-pool head"
            )
            raise NotExplainable(
                f"model {model.tag} ({card.arch}) has no class-activation map: it {why}. Architectures that can "
                f"have one: {', '.join(CAM_ARCHS)}; served models that have one: {', '.join(able) or 'none'}"
            )
        rows, cams = await asyncio.to_thread(model.engine.explain, pixels[None])
        png = await asyncio.to_thread(overlay_png, pixels, cams[0])
        if png_allowed and "image/png" in received.header(b"accept"):
            headers = [(b"content-type", b"image/png")]
            return v2.Encoded(png, headers, model.name, 1)
        return {
            **answer(rows[0], card, k),
            "model": model.name,
            "version": model.version,
            "cam_png": base64.b64encode(png).decode("ascii"),
        }

    async def classify_batch(self, received: Received) -> dict:
        parsed = read_batch_request(received, self.config.max_batch_images)
        model = self.models.get(parsed.model)
        k = parse_top_k(parsed.top_k, model.engine.card.num_classes)
        # One side for the whole request, so that its answer names one version (a candidate that
        # fails is answered for by the live model, image by image: each result names its version).
        rollout = self.rollouts.of(model, parsed.model) if self.rollouts.active else None
        side = rollout.candidate_answers(received.headers.get(KEY_HEADER)) if rollout else False

        async def one(upload: Upload) -> dict:
            try:
                pixels = await self.decode(upload, model)
            except ImageError as err:  # this image fails; its neighbours still get answers
                return {"filename": upload.filename, **error_answer(err, CLASSIFY_BATCH)[1]}
            if rollout is None:
                answering, row = model, await model.batcher.submit(pixels)
            else:
                answering, row = await self.rollouts.score(rollout, model, pixels, side)
            result = answer(row, answering.engine.card, k)
            if self.capture is not None:
                self.capture.offer(answering, upload.data, row, result["unsure_reason"])
            return {"filename": upload.filename, **result, **({"version": answering.version} if rollout else {})}

        results = await asyncio.gather(*(one(upload) for upload in parsed.images))
        version = rollout.candidate.version if rollout and side else model.version
        return {"model": model.name, "version": version, "results": results}

    async def infer(self, route: v2.Route, body: bytes, headers: dict[bytes, bytes]) -> v2.Encoded:
        """``POST /v2/models/{m}/infer``: pixels go straight to the batcher; encoded images are
        decoded as ``/classify`` decodes them. Every image of a request joins the same batches."""
        model = self.models.get(route.tag)
        card = model.engine.card
        request = v2.parse_infer(body, headers, card, self.config.max_batch_images)
        probabilities, version = await self.run_infer(model, route.tag, request, headers.get(KEY_HEADER))
        return v2.encode_infer(request, probabilities, model.name, version, card.class_names)

    async def run_infer(
        self, model: ServedModel, tag: str, request: v2.InferRequest, rollout_key: bytes | None
    ) -> tuple[np.ndarray, str]:
        """A parsed v2 request's calibrated probabilities [N, classes] and the version that answered,
        whichever protocol carried it (HTTP here, gRPC in ``serving.grpc_server``)."""
        if request.images is not None:
            inputs = await _all(self.decode_nth(i, data, model) for i, data in enumerate(request.images))
        else:
            inputs = request.pixels
        rollout = self.rollouts.of(model, tag) if self.rollouts.active else None
        if rollout is None:
            rows = await _all(model.batcher.submit(pixels) for pixels in inputs)
            version = model.version
        else:  # one side for the request: its answer names one version
            side = rollout.candidate_answers(rollout_key)
            scored = await _all(self.rollouts.score(rollout, model, pixels, side) for pixels in inputs)
            rows = [row for _, row in scored]
            version = scored[0][0].version if len({m.version for m, _ in scored}) == 1 else model.version
        # calibrated, as /classify's are
        probabilities = rows[0].probabilities[None] if len(rows) == 1 else np.stack([row.probabilities for row in rows])
        return probabilities, version

    async def repository(self, route: v2.Route, body: bytes) -> dict | v2.Encoded:
        """Triton's model-repository extension: the index, load (checked and warmed up before it
        takes traffic), unload (requests in flight finish). Off unless ``SERVING_MODEL_CONTROL``."""
        if not self.config.model_control:
            raise Forbidden("model control is off; start the service with SERVING_MODEL_CONTROL=true to use it")
        options = v2.repository_options(body)
        if route.kind == "index":
            # Reading the store means reading every model's files: off the event loop.
            index = await asyncio.to_thread(self.models.index, options.get("ready") is True)
            return v2.json_answer(index)
        async with self.changing:  # one load or unload at a time; requests go on meanwhile
            name = route.model.partition(":")[0]
            if name in self.rollouts.active:
                raise Conflict(
                    f"model {name} has a rollout under way; promote its candidate or roll it back "
                    f"(POST /rollout/{name}/promote or /rollback) before loading or unloading it"
                )
            if route.kind == "load":
                model = await asyncio.to_thread(self.models.prepare, route.model)
                old = self.models.install(model)
                return {"name": model.name, "version": model.version, "replaced": old.tag if old else None}
            return {"unloaded": self.models.unload(route.model)}

    async def review(self, route: ReviewRoute, received: Received, who: str) -> dict | v2.Encoded:
        """The ``/review`` routes (``serving.review``); ``who``: the name of the token the request sent."""
        return await self.reviews.answer(route, received.body, received.query, who)

    async def rollout(self, route: RolloutRoute, received: Received) -> dict:
        """The ``/rollout`` routes (``serving.rollout``)."""
        return await self.rollouts.answer(route, received.body)

    async def decode_nth(self, index: int, data: bytes, model: ServedModel) -> np.ndarray:
        try:
            return await self.decode(Upload(f"image[{index}]", data), model)
        except ImageError as err:  # v2 answers a request whole: say which of its images failed
            raise ImageError(f"image {index}: {err}") from None

    def v2_info(self, route: v2.Route) -> dict:
        """The v2 GET routes: server and model metadata, Triton's model config, and readiness
        (which answers 503 through :class:`ModelUnavailable` when not ready)."""
        if route.kind == "server":
            extensions = ["classification", "binary_tensor_data", "model_configuration"]
            if self.config.model_control:
                extensions.append("model_repository")
            return {"name": v2.SERVER_NAME, "version": v2.SERVER_VERSION, "extensions": extensions}
        if route.kind == "live":
            return {"live": True}
        if route.kind == "ready":
            if not self.models.ready:
                raise ModelUnavailable("not ready: the models are still warming up")
            return {"ready": True}
        model = self.models.get(route.tag)
        card = model.engine.card
        if route.kind == "model_ready":
            if not self.models.ready:
                raise ModelUnavailable(f"model {model.tag} is still warming up")
            return {"name": model.name, "ready": True}
        if route.kind == "config":
            return v2.model_config(model.name, card, self.config.max_batch_images, model.engine.provider)
        return v2.model_metadata(model.name, model.version, card)

    async def decode(self, upload: Upload, model: ServedModel) -> np.ndarray:
        start = time.perf_counter()
        card = model.engine.card
        if (image := self.open_if_cheap(upload.data, card)) is not None:
            pixels = to_input(load_image(image), card)
        else:
            pixels = await self.decoders.decode(upload.data, card)
        metrics.decode_seconds.observe(time.perf_counter() - start)
        return pixels

    def open_if_cheap(self, data: bytes, card: ModelCard) -> Image.Image | None:
        """The image, opened, when decoding it costs less than the hop to a decoder (INLINE_MAX_WORK)."""
        if len(data) > INLINE_MAX_WORK:  # the header is not even read here: the decoder reads it
            return None
        image = open_image(data, self.config.max_pixels, self.max_decode_bytes, card)
        return image if len(data) + image.width * image.height <= INLINE_MAX_WORK else None


async def _all(awaitables) -> list:
    """Await all; the first error, in order, is raised once every one has ended, so none is left
    running unwatched. One is awaited as it is: gather would wrap it in a task of its own, a
    loop turn and a task's cost for every one-image request."""
    awaitables = list(awaitables)
    if len(awaitables) == 1:
        return [await awaitables[0]]
    results = await asyncio.gather(*awaitables, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


def state_path(config: ServingConfig) -> Path:
    """Where rollouts keep their state: SERVING_ROLLOUT_STATE, else rollout.json in BentoML's home."""
    if config.rollout_state:
        return Path(config.rollout_state)
    from model_store.store import bentoml_home

    return Path(bentoml_home()) / "rollout.json"
