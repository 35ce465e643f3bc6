"""The ASGI app in front of BentoML's: every request to the service passes here first.

- **Auth fails closed.** With a token set, every path needs ``Authorization: Bearer <token>``
  except :data:`OPEN_PATHS` (probes, metrics, the API docs); a route added later is protected
  without anyone having to remember it.
- **Admission.** At most ``max_concurrency`` classify requests are in flight; the next is answered
  503 with ``Retry-After`` before a byte of its body is read. A queue without bound would only
  turn overload into timeouts for everyone, while a 503 lets a load balancer try another replica.
- **The hot routes** (``POST /classify``, ``POST /classify_batch``) are answered here by
  :func:`respond`, without BentoML's per-request layer. Profiled under load, that layer cost
  several times the request's own work for a small image (OpenTelemetry middleware even when not
  sampling, per-call signature binding, IO descriptors, a timeout timer that is never cancelled);
  see BENCHMARKS.md. Everything else goes to BentoML's app unchanged, and so do the hot routes when
  tracing (``SERVING_TRACING``) or BentoML's CORS is on, since those live in BentoML's layer; the
  routes' ``@bentoml.api`` methods then call the same :func:`respond`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import traceback
import uuid
from typing import TYPE_CHECKING, Callable

from starlette.requests import Request

from serving import metrics
from serving.errors import Overloaded, Unauthorized, http_status
from serving.logs import log_event, log_request

if TYPE_CHECKING:
    from serving.config import ServingConfig
    from serving.handlers import Handlers

# Every route path of the service, defined once.
CLASSIFY, CLASSIFY_BATCH, MODELS = "/classify", "/classify_batch", "/models"
HOT_ROUTES = (CLASSIFY, CLASSIFY_BATCH)
# Open to anyone: probes, metrics, the OpenAPI document and its page. Nothing else is.
OPEN_PATHS = frozenset({"/livez", "/healthz", "/readyz", "/metrics", "/docs.json", "/"})
OPEN_PREFIXES = ("/static_content/",)  # the docs page's scripts and styles
RETRY_AFTER_S = 1


def is_open(path: str) -> bool:
    return path in OPEN_PATHS or (path.startswith(OPEN_PREFIXES) and ".." not in path)


class Edge:
    """``Edge(app, config, handlers)``: ``app`` is BentoML's ASGI app; ``handlers()`` returns the
    service's :class:`~serving.handlers.Handlers` (they exist once BentoML has started the service)."""

    def __init__(self, app, config: ServingConfig, handlers: Callable[[], Handlers], hot: bool = True):
        self.app, self.config, self.hot = app, config, hot
        self._find_handlers, self._handlers = handlers, None
        self.expected = f"Bearer {config.auth_token}".encode() if config.auth_token else None
        self.in_flight = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":  # lifespan, websockets
            return await self.app(scope, receive, send)
        path = scope["path"]
        if self.expected is not None and not is_open(path):
            given = next((value for name, value in scope["headers"] if name == b"authorization"), b"")
            if not hmac.compare_digest(given, self.expected):  # constant time: no token guessing by timing
                error = Unauthorized("missing or wrong bearer token; send 'Authorization: Bearer <token>'")
                return await self.refuse(send, error, [(b"www-authenticate", b"Bearer")])
        if path not in HOT_ROUTES:
            return await self.app(scope, receive, send)
        if self.in_flight >= self.config.max_concurrency:
            message = (
                f"server busy: {self.config.max_concurrency} requests already in flight; retry after {RETRY_AFTER_S} s"
            )
            return await self.refuse(send, Overloaded(message), [(b"retry-after", str(RETRY_AFTER_S).encode())])
        self.in_flight += 1
        metrics.in_flight.inc()
        try:
            if self.hot and scope["method"] == "POST":
                self._handlers = self._handlers or self._find_handlers()
                status, body = await respond(self._handlers, path, Request(scope, receive))
                await send_json(send, status, body)
            else:  # BentoML's layer: tracing or CORS, or a method the route does not take (405 there)
                await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
            metrics.in_flight.dec()

    async def refuse(self, send, error: Exception, headers: list[tuple[bytes, bytes]]) -> None:
        status, reason = http_status(error)
        metrics.rejected.labels(reason=reason).inc()
        await send_json(send, status, {"error": str(error)}, headers)


async def respond(handlers: Handlers, route: str, request: Request) -> tuple[int, dict]:
    """(status, JSON body) for one classify request: the handler's answer, or the error as the
    table in ``serving.errors`` says; anything else is a 500 whose id leads to its logged traceback."""
    config = handlers.config
    start = time.perf_counter()
    try:
        async with asyncio.timeout(config.timeout_s):
            body = await (handlers.classify if route == CLASSIFY else handlers.classify_batch)(request)
        status = 200
    except Exception as err:
        status, reason = http_status(err)
        metrics.rejected.labels(reason=reason).inc()
        if isinstance(err, TimeoutError):
            body = {
                "error": f"not answered within {config.timeout_s:g} s (SERVING_TIMEOUT_S); the server is overloaded, retry later"
            }
        elif status == 500:
            error_id = uuid.uuid4().hex[:16]
            log_event(
                "internal_error",
                logging.ERROR,
                id=error_id,
                route=route,
                error=f"{type(err).__name__}: {err}",
                traceback=traceback.format_exc(),
            )
            body = {"error": "internal error", "id": error_id}
        else:
            body = {"error": str(err)}
    seconds = time.perf_counter() - start
    metrics.requests.labels(route=route, status=str(status)).inc()
    metrics.request_seconds.labels(route=route).observe(seconds)
    if config.log_requests or status >= 500:
        model = handlers.models.find(body.get("model"))
        log_request(
            logging.INFO if status < 500 else logging.WARNING,
            route=route,
            status=status,
            ms=round(seconds * 1000, 2),
            model=model.tag if model else None,
            provider=model.engine.provider if model else None,
            images=len(body.get("results", ())) or 1,
            **({"error": body["error"]} if "error" in body else {}),
        )
    return status, body


async def send_json(send, status: int, body: dict, headers: list[tuple[bytes, bytes]] = ()) -> None:
    data = json.dumps(body).encode()
    start = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), *headers]
    await send({"type": "http.response.start", "status": status, "headers": start})
    await send({"type": "http.response.body", "body": data})
