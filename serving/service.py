"""The BentoML service. Run: ``bentoml serve`` (settings: ``SERVING_*`` variables, ``serving/config.py``).

    POST /classify         one image -> its class, probability and top-k
    POST /classify_batch   several images -> one answer each, in order
    POST /explain          one image -> /classify's answer and its class-activation map as a PNG
    GET  /models           the models served, their cards, the default
    GET  /monitor          each model's drift: its recent answers against its held-out ones
    GET  /ui               a page for people: pick an image and a model, see the top-k and the card

Every request passes ``serving.edge`` first (auth, admission), which also answers the classify
routes itself; the ``@bentoml.api`` methods below declare them for the OpenAPI document and
BentoML's clients, and serve them when tracing is on. Images are decoded on their own, so a bad
one is answered 4xx before it can touch a batch; the decoded inputs of concurrent requests then
run through ONNX Runtime together (``serving.batching``), per model. The card inside each ONNX
file, not this code, says how to preprocess and what the classes are.
"""

from __future__ import annotations

import sys
import threading

import bentoml
from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from threadpoolctl import threadpool_limits

with bentoml.importing():
    from model_store.preprocess import keep_freed_memory
    from serving import metrics, ui
    from serving.config import ServingConfig
    from serving.edge import CLASSIFY, CLASSIFY_BATCH, EXPLAIN, MODELS, MONITOR, UI, respond
    from serving.handlers import Handlers, state_path
    from serving.logs import log_event
    from serving.model_set import ModelSet
    from serving.requests import Received
    from serving.rollout import read_pins
    from serving.schemas import (
        ClassifyBatchForm,
        ClassifyBatchOutput,
        ClassifyForm,
        ClassifyOutput,
        ExplainOutput,
        ModelsAnswer,
        MonitorAnswer,
    )
    from serving.server import lean_service

try:
    CONFIG = ServingConfig.from_env()
    # The versions rollouts left live (serving.rollout): a restart serves them, not BentoML's latest.
    PINS = read_pins(state_path(CONFIG))
except ValueError as err:  # an operator's mistake: one line naming the variable, not a traceback
    sys.exit(f"error: {err}")
# GET routes (BentoML's own APIs are POST-only); FastAPI's own docs pages off: BentoML serves the docs
models_app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)


# Out of the OpenAPI document, which describes the JSON API; the page is for people.
@models_app.get(UI, response_class=HTMLResponse, include_in_schema=False)
def ui_page() -> HTMLResponse:
    """The browser page (serving/ui.html), served with a strict Content-Security-Policy."""
    return ui.page()


async def received(ctx: bentoml.Context) -> Received:
    """The request as the handlers take it; the edge read its body under the limits and handed it on."""
    request = ctx.request
    return Received.of(request.scope, await request.body())


class Classifier:
    def __init__(self) -> None:
        # A worker reads body after body: a 2 MB photo's was copied three times into fresh pages,
        # 4.5 of the worker's 9.3 ms of CPU for it (BENCHMARKS.md, "Where an image is decoded").
        keep_freed_memory()
        # numpy's OpenBLAS keeps a thread per core spinning for about 0.1 s after each call: the drift
        # window's covariance, once a second, kept one busy, 0.05 ms of CPU per request at concurrency
        # 32 (BENCHMARKS.md, "issue 26 before/after"). The service's parallelism is its requests.
        threadpool_limits(1, user_api="blas")
        self.models = ModelSet.from_store(CONFIG, PINS)
        self.handlers = Handlers(self.models, CONFIG)
        for model in self.models.models:
            log_event(
                "serving",
                model=model.tag,
                arch=model.engine.card.arch,
                provider=model.engine.provider,
                default=model is self.models.default,
                provider_error=model.engine.provider_error,
            )
        self.handlers.decoders.start()
        log_event(
            "limits",
            decode_workers=CONFIG.decode_workers,
            max_decode_mb=CONFIG.max_decode_mb,
            max_body_memory_mb=CONFIG.max_body_memory_mb,
            memory_bound_mb=CONFIG.memory_bound_mb,  # README, "Limits"
        )
        if dead := metrics.forget_dead_workers():
            log_event("forgot_dead_workers", pids=dead)
        # Warm up in the background: /livez answers meanwhile, /readyz only once it is done.
        # Then resume the rollouts the state file names (their candidates load and warm up likewise).
        threading.Thread(target=self.start, name="warm-up", daemon=True).start()

    def start(self) -> None:
        self.models.warm_up()
        self.handlers.rollouts.restore()

    def __is_ready__(self) -> bool:
        # Not ready while no decoder process can start: every image above the inline size would fail.
        return self.models.ready and self.handlers.decoders.start_error is None

    @bentoml.api(route=CLASSIFY, input_spec=ClassifyForm, output_spec=ClassifyOutput)
    async def classify(self, ctx: bentoml.Context) -> dict:
        """Classify one image: multipart field `image`, or the image as the raw body with an image/* type.
        Optional `top_k` (default 3) and `model` (default: the service's default), as form fields or query parameters.
        Answers the label and the ranked `top_k` with calibrated probabilities, and `unsure` with its `unsure_reason`
        (`null` for a model exported without calibration)."""
        ctx.response.status_code, body = await respond(
            self.handlers, CLASSIFY, self.handlers.classify(await received(ctx))
        )
        return body

    @bentoml.api(route=CLASSIFY_BATCH, input_spec=ClassifyBatchForm, output_spec=ClassifyBatchOutput)
    async def classify_batch(self, ctx: bentoml.Context) -> dict:
        """Classify several images (repeated multipart field `images`), answered in order; a bad image gets
        its own `error` and the others are still classified."""
        ctx.response.status_code, body = await respond(
            self.handlers, CLASSIFY_BATCH, self.handlers.classify_batch(await received(ctx))
        )
        return body

    @bentoml.api(route=EXPLAIN, input_spec=ClassifyForm, output_spec=ExplainOutput)
    async def explain(self, ctx: bentoml.Context) -> dict:
        """Classify one image as /classify does, and show where the model looked: `cam_png` is the
        class-activation map of the top class over the image, as base64 PNG (`Accept: image/png`: the PNG alone,
        answered by the edge). Models with a global-average-pool head exported with `--cam` only; others answer 422."""
        # BentoML's layer (tracing or CORS on) answers JSON only: its output spec cannot switch to a PNG.
        work = self.handlers.explain(await received(ctx), png_allowed=False)
        ctx.response.status_code, body = await respond(self.handlers, EXPLAIN, work)
        return body

    @models_app.get(MODELS, response_model=ModelsAnswer)
    def list_models(self) -> dict:
        """Every model this service answers with: its card, provider, precision, and which one is the default;
        and each configured model that failed its checks, with the reason."""
        return self.models.describe()

    @models_app.get(MONITOR, response_model=MonitorAnswer)
    def monitor(self) -> dict:
        """Each served model's drift over its last answers (its window, e.g. 1,000 images, in this worker): the
        share answered unsure by reason, the predicted classes' stability index, the Fréchet distance of the
        features and the mean OOD distance, each with the level in-distribution windows stay under, the
        statistics above their level, and a history of recent figures."""
        return self.handlers.rollouts.monitored(self.models.monitored())


# At class scope, so that `bentoml build` packages every model the service is configured with.
for _index, _tag in enumerate(CONFIG.models):
    setattr(Classifier, f"model_{_index}", bentoml.models.BentoModel(_tag))

Classifier = bentoml.asgi_app(models_app)(
    bentoml.service(
        service_class=lean_service(CONFIG),
        workers=CONFIG.workers,  # each process owns a copy of the models and batches its own requests
        traffic={"timeout": CONFIG.timeout_s + 30},  # ours answers 504 first; BentoML's is the backstop
        logging={"access": {"enabled": False}},  # replaced by the JSON request log (serving/edge.py)
        **({"tracing": {"sample_rate": 1.0}} if CONFIG.tracing else {}),  # BentoML's own config may override
    )(Classifier)
)
