"""The ASGI app in front of BentoML's: every request to the service passes here first.

- **Auth fails closed.** With a token set, every path needs ``Authorization: Bearer <token>``
  except :data:`OPEN_PATHS` (probes, metrics, the API docs); a route added later is protected
  without anyone having to remember it.
- **Routes are a closed set.** A path that is not one of the service's is answered 404 here, so no
  client string reaches BentoML's request metrics, which label the raw path (a path scan once grew
  the worker by 400 MB of time series).
- **Bodies first.** An inference request's body is read here, under its own bounds: the size limit,
  a minimum rate after a short grace (a slow upload is cut, 408), and one memory budget for every
  body held at once (503). Only then does the request count against admission.
- **Admission.** At most ``max_concurrency`` inference requests are being answered; the next is
  answered 503 with ``Retry-After``. A queue without bound would only turn overload into timeouts
  for everyone, while a 503 lets a load balancer try another replica. Counting only requests whose
  body is in means slow uploads cannot take the slots that fast clients need.
- **The hot routes** (``POST /classify``, ``POST /classify_batch``, ``POST /explain``) are answered here by
  :func:`respond`, without BentoML's per-request layer. Profiled under load, that layer cost
  several times the request's own work for a small image (OpenTelemetry middleware even when not
  sampling, per-call signature binding, IO descriptors, a timeout timer that is never cancelled);
  see BENCHMARKS.md. Everything else goes to BentoML's app unchanged, and so do the hot routes when
  tracing (``SERVING_TRACING``) or BentoML's CORS is on, since those live in BentoML's layer; the
  routes' ``@bentoml.api`` methods then call the same :func:`respond`.
- **The v2 protocol** (``/v2/...``, ``serving.v2``) is answered here whatever the mode: its infer
  and model-control requests are read and admitted like classify's, its metadata answered from
  the model set.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from typing import TYPE_CHECKING, Awaitable, Callable

from serving import metrics, v2
from serving.errors import (
    BodyTooLarge,
    ClientGone,
    LengthRequired,
    MethodNotAllowed,
    NotFound,
    Overloaded,
    SlowBody,
    Unauthorized,
)
from serving.failures import error_answer
from serving.logs import log_request
from serving.requests import Received
from serving.review import REVIEW_PREFIX, is_review
from serving.review import route as review_route
from serving.rollout import ROLLOUT_PREFIX, is_rollout
from serving.rollout import route as rollout_route

if TYPE_CHECKING:
    from serving.config import ServingConfig
    from serving.grpc_server import GrpcServer
    from serving.handlers import Handlers

# Every route path of the service, defined once.
CLASSIFY, CLASSIFY_BATCH, EXPLAIN, MODELS = "/classify", "/classify_batch", "/explain", "/models"
MONITOR = "/monitor"  # each model's drift figures (serving.monitor)
HOT_ROUTES = (CLASSIFY, CLASSIFY_BATCH, EXPLAIN)
V2_PREFIX = "/v2"  # the Open Inference Protocol's routes (serving/v2.py), answered here
V2_INFER = "/v2/models/{model}/infer"  # their infer route's label in metrics and logs: no client string in it
V2_REPOSITORY = "/v2/repository"  # the label of model control's routes
LOAD_TIMEOUT_S = 300  # a load checks and warms up a model at every batch size: seconds, not milliseconds
UI = "/ui"  # the browser page, serving/ui.html
# Open to anyone: probes, metrics, the OpenAPI document and its page, and the browser page: a
# browser's navigation cannot send a bearer header, and the page holds no data (the API calls it
# makes still need the token). Nothing else is; v2's own probes are in serving.v2.OPEN_PATHS.
OPEN_PATHS = frozenset({"/livez", "/healthz", "/readyz", "/metrics", "/docs.json", "/", UI})
OPEN_PREFIXES = ("/static_content/",)  # the docs page's scripts and styles
# Every path the service answers: its own routes, BentoML's schema, and the open ones.
ROUTES = OPEN_PATHS | {CLASSIFY, CLASSIFY_BATCH, EXPLAIN, MODELS, MONITOR, "/schema.json"}
SERVICE_TOKEN = "service"  # the name a label records for SERVING_AUTH_TOKEN; reviewers' tokens have theirs
RETRY_AFTER_S = 1
BODY_GRACE_S = 2.0  # a body may start slowly (TCP slow start, a phone waking its radio); then it must keep the rate


def is_open(path: str) -> bool:
    return path in OPEN_PATHS or path in v2.OPEN_PATHS or (path.startswith(OPEN_PREFIXES) and ".." not in path)


def is_route(path: str) -> bool:
    return (
        path in ROUTES or is_review(path) or is_rollout(path) or (path.startswith(OPEN_PREFIXES) and ".." not in path)
    )


class Edge:
    """``Edge(app, config, handlers)``: ``app`` is BentoML's ASGI app; ``handlers()`` returns the
    service's :class:`~serving.handlers.Handlers` (they exist once BentoML has started the service)."""

    def __init__(
        self,
        app,
        config: ServingConfig,
        handlers: Callable[[], Handlers],
        hot: bool = True,
        grpc: Callable[[Edge], GrpcServer] | None = None,
    ):
        self.app, self.config, self.hot = app, config, hot
        # The worker's gRPC server (serving.grpc_server), made, started and stopped with the ASGI lifespan.
        self.make_grpc, self.grpc = grpc, None
        self._find_handlers, self._handlers = handlers, None
        self.token = config.auth_token.encode() if config.auth_token else None
        self.reviewers = {token.encode(): name for token, name in config.reviewers.items()}  # /review only
        self.in_flight = 0
        self.body_bytes, self.max_body_memory = 0, config.max_body_memory_mb * 2**20  # bodies held, all requests

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":  # lifespan, websockets
            if scope["type"] == "lifespan" and self.make_grpc is not None:
                send = self.with_grpc(send)
            return await self.app(scope, receive, send)
        path = scope["path"]
        if self.token is not None and not is_open(path):
            who = self.token_name(scope["headers"])
            # A reviewer's token opens /review, and the model list the review page starts from.
            if who is None or (who != SERVICE_TOKEN and not (is_review(path) or path == MODELS)):
                error = Unauthorized("missing or wrong bearer token; send 'Authorization: Bearer <token>'")
                return await self.refuse(send, error, [(b"www-authenticate", b"Bearer")])
        if path == V2_PREFIX or path.startswith(V2_PREFIX + "/"):
            return await self.v2(scope, receive, send)
        if is_review(path):
            return await self.review(scope, receive, send)
        if is_rollout(path):
            return await self.rollout(scope, receive, send)
        if path not in HOT_ROUTES:
            if not is_route(path):
                return await self.refuse(send, NotFound(f"no such path; the routes are {', '.join(sorted(ROUTES))}"))
            return await self.app(scope, receive, send)
        if scope["method"] != "POST":  # BentoML's answer: 405
            return await self.app(scope, receive, send)
        await self.admit(scope, receive, send, path, self.classify)

    def with_grpc(self, send) -> Callable:
        """``send`` for the lifespan: the gRPC server starts once BentoML's startup is complete (the
        service and its handlers exist) and stops before its shutdown is reported complete. A port
        that cannot be bound fails the startup, naming it."""

        async def sending(message: dict) -> None:
            if message["type"] == "lifespan.startup.complete":
                self.grpc = self.make_grpc(self)
                try:
                    await self.grpc.start()
                except RuntimeError as err:
                    message = {"type": "lifespan.startup.failed", "message": str(err)}
            elif message["type"] == "lifespan.shutdown.complete" and self.grpc is not None:
                await self.grpc.stop()
            await send(message)

        return sending

    async def admit(self, scope, receive, send, route: str, answer: Callable) -> None:
        """Read the body, then admit the request or refuse it; ``answer(scope, received, receive,
        send)`` answers an admitted one (``received``: the :class:`~serving.requests.Received`
        request). ``route`` labels the metrics and the log."""
        start = time.perf_counter()
        try:
            received = await self.read_body(scope, receive)
        except (SlowBody, LengthRequired, BodyTooLarge, ClientGone, Overloaded) as error:
            # The rest of the body is not wanted: close, rather than wait on the socket for it.
            return await self.refuse(send, error, [(b"connection", b"close")], route=route, start=start)
        try:
            try:
                self.take_slot()
            except Overloaded as error:
                retry = [(b"retry-after", str(RETRY_AFTER_S).encode())]
                return await self.refuse(send, error, retry, route=route, start=start)
            try:
                await answer(scope, received, receive, send)
            finally:
                self.free_slot()
        finally:
            self.body_bytes -= len(received.body)

    def take_slot(self) -> None:
        """Admit one request, of either protocol (gRPC's calls too: ``serving.grpc_server``), against
        SERVING_MAX_CONCURRENCY; :class:`Overloaded` when that many are in flight. Pair with :meth:`free_slot`."""
        if self.in_flight >= self.config.max_concurrency:
            limit = self.config.max_concurrency
            raise Overloaded(f"server busy: {limit} requests already in flight; retry after {RETRY_AFTER_S} s")
        self.in_flight += 1
        metrics.in_flight.inc()

    def free_slot(self) -> None:
        self.in_flight -= 1
        metrics.in_flight.dec()

    async def classify(self, scope, received: Received, receive, send) -> None:
        if self.hot:
            handlers = self.handlers()
            route = scope["path"]
            handler = {CLASSIFY: handlers.classify, CLASSIFY_BATCH: handlers.classify_batch, EXPLAIN: handlers.explain}
            status, answer = await respond(handlers, route, handler[route](received))
            await send_answer(send, status, answer)
        else:  # BentoML's layer (tracing or CORS) reads the body again: hand it over
            await self.app(scope, _replay(received.body, receive), send)

    async def v2(self, scope, receive, send) -> None:
        """The Open Inference Protocol's routes (``serving.v2``): infer is admitted and answered
        like classify; the others are small answers from the model set."""
        try:
            route = v2.route(scope["method"], scope["path"])
        except (NotFound, MethodNotAllowed) as error:
            return await self.refuse(send, error)
        handlers = self.handlers()
        if route.kind == "infer":

            async def infer(scope, received: Received, receive, send) -> None:
                work = handlers.infer(route, received.body, received.headers)
                status, answer = await respond(handlers, V2_INFER, work)
                await send_answer(send, status, answer)

            return await self.admit(scope, receive, send, V2_INFER, infer)
        if route.kind in ("index", "load", "unload"):

            async def change(scope, received: Received, receive, send) -> None:
                work = handlers.repository(route, received.body)
                status, answer = await respond(handlers, V2_REPOSITORY, work, timeout_s=LOAD_TIMEOUT_S)
                await send_answer(send, status, answer)

            return await self.admit(scope, receive, send, V2_REPOSITORY, change)
        try:
            answer, status = handlers.v2_info(route), 200
        except Exception as err:
            status, answer = error_answer(err, V2_PREFIX)
        await send_json(send, status, answer)

    async def review(self, scope, receive, send) -> None:
        """The ``/review`` routes (``serving.review``): read and admitted like the others, the
        label recording the name of the token the request sent."""
        try:
            route = review_route(scope["method"], scope["path"])
        except (NotFound, MethodNotAllowed) as error:
            return await self.refuse(send, error)
        handlers = self.handlers()
        who = self.token_name(scope["headers"]) or "anonymous"

        async def answer(scope, received: Received, receive, send) -> None:
            status, body = await respond(handlers, REVIEW_PREFIX, handlers.review(route, received, who))
            await send_answer(send, status, body)

        return await self.admit(scope, receive, send, REVIEW_PREFIX, answer)

    async def rollout(self, scope, receive, send) -> None:
        """The ``/rollout`` routes (``serving.rollout``): read and admitted like model control,
        with its time limit (starting a rollout loads and warms up the candidate)."""
        try:
            route = rollout_route(scope["method"], scope["path"])
        except (NotFound, MethodNotAllowed) as error:
            return await self.refuse(send, error)
        handlers = self.handlers()

        async def answer(scope, received: Received, receive, send) -> None:
            work = handlers.rollout(route, received)
            status, body = await respond(handlers, ROLLOUT_PREFIX, work, timeout_s=LOAD_TIMEOUT_S)
            await send_answer(send, status, body)

        return await self.admit(scope, receive, send, ROLLOUT_PREFIX, answer)

    def handlers(self) -> Handlers:
        self._handlers = self._handlers or self._find_handlers()
        return self._handlers

    def token_name(self, headers) -> str | None:
        """Whose bearer token the request sent: :data:`SERVICE_TOKEN` for the service's, a reviewer's
        name for theirs, None for none or a wrong one."""
        given = next((value for name, value in headers if name == b"authorization"), b"")
        scheme, _, token = given.partition(b" ")
        if scheme.lower() != b"bearer" or self.token is None:
            return None
        # The scheme is case-insensitive (RFC 7235); each token compared in constant time, so none
        # can be guessed from response times.
        if hmac.compare_digest(token, self.token):
            return SERVICE_TOKEN
        found = None
        for known, name in self.reviewers.items():
            if hmac.compare_digest(token, known):
                found = name
        return found

    async def read_body(self, scope, receive) -> Received:
        """The request with its whole body, or the error that stops it: no length on HTTP/1.0 (411),
        over the size limit (413), slower than ``min_body_rate`` after :data:`BODY_GRACE_S` or not in
        within ``timeout_s`` (408), over the memory budget for bodies (503), or the client gone (499)."""
        config = self.config
        headers = dict(scope["headers"])  # the last of a repeated header; both bounds below hold anyway
        declared = headers.get(b"content-length", b"")
        if not declared and b"transfer-encoding" not in headers and scope.get("http_version") == "1.0":
            raise LengthRequired("an HTTP/1.0 request needs a Content-Length header")
        if declared.isdigit() and int(declared) > config.max_body_bytes:
            raise body_too_large(config.max_body_bytes)
        loop = asyncio.get_running_loop()
        begin, chunks, seen = loop.time(), [], 0  # seen: bytes received and held in the budget
        try:
            while True:
                deadline = begin + min(config.timeout_s, BODY_GRACE_S + seen / config.min_body_rate)
                try:
                    async with asyncio.timeout_at(deadline):
                        message = await receive()
                except TimeoutError:
                    raise SlowBody(
                        f"request body too slow: {seen:,} bytes in {loop.time() - begin:.1f} s; it must arrive at "
                        f"{config.min_body_rate:,} bytes/s or more after the first {BODY_GRACE_S:g} s, and within "
                        f"{config.timeout_s:g} s"
                    ) from None
                if message["type"] == "http.disconnect":
                    raise ClientGone("the client disconnected before its request body was read")
                chunk = message.get("body", b"")
                if seen + len(chunk) > config.max_body_bytes:
                    raise body_too_large(config.max_body_bytes)
                seen += len(chunk)
                self.body_bytes += len(chunk)
                if self.body_bytes > self.max_body_memory:
                    raise Overloaded(
                        f"server busy: request bodies fill their memory budget of {config.max_body_memory_mb} MB "
                        f"(SERVING_MAX_BODY_MEMORY_MB); retry after {RETRY_AFTER_S} s"
                    )
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return Received.of(scope, chunks[0] if len(chunks) == 1 else b"".join(chunks), headers)
        except BaseException:
            self.body_bytes -= seen
            raise

    async def refuse(
        self, send, error: Exception, headers: list[tuple[bytes, bytes]] = (), route: str | None = None, start=0.0
    ) -> None:
        """Answer an error before any handler ran; a classify request's is counted and logged like the others."""
        status, body = error_answer(error, route or "edge")
        if route is not None:
            metrics.requests.labels(route=route, status=str(status)).inc()
            if self.config.log_requests:
                ms = round((time.perf_counter() - start) * 1000, 2)
                log_request(logging.INFO, route=route, status=status, ms=ms, error=body["error"])
        await send_json(send, status, body, headers)


def body_too_large(max_bytes: int) -> BodyTooLarge:
    return BodyTooLarge(f"request body exceeds the limit of {max_bytes:,} bytes")


def _replay(body: bytes, receive):
    """A receive() that hands over the body already read, then the connection's own messages (disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed():
        return pending.pop() if pending else await receive()

    return replayed


async def respond(
    handlers: Handlers, route: str, work: Awaitable[dict | v2.Encoded], timeout_s: float | None = None
) -> tuple[int, dict | v2.Encoded]:
    """(status, answer) for one inference request, ``work`` being its handler's call: the answer,
    or the error as the table in ``serving.errors`` says; anything else is a 500 whose id leads to
    its logged traceback. ``route`` labels the metrics and the log line."""
    config = handlers.config
    start = time.perf_counter()
    try:
        async with asyncio.timeout(timeout_s or config.timeout_s):
            body = await work
        status = 200
    except Exception as err:
        setting = None if timeout_s else "SERVING_TIMEOUT_S"
        status, body = error_answer(err, route, timeout_s or config.timeout_s, setting)
    seconds = time.perf_counter() - start
    metrics.requests.labels(route=route, status=str(status)).inc()
    metrics.request_seconds.labels(route=route).observe(seconds)
    if config.log_requests or status >= 500:
        encoded = isinstance(body, v2.Encoded)
        model = handlers.models.find(body.model if encoded else body.get("model"))
        log_request(
            logging.INFO if status < 500 else logging.WARNING,
            route=route,
            status=status,
            ms=round(seconds * 1000, 2),
            model=model.tag if model else None,
            provider=model.engine.provider if model else None,
            images=body.images if encoded else len(body.get("results", ())) or 1,
            **({"error": body["error"]} if not encoded and "error" in body else {}),
        )
    return status, body


async def send_answer(send, status: int, answer: dict | v2.Encoded) -> None:
    if not isinstance(answer, v2.Encoded):
        return await send_json(send, status, answer)
    headers = [*answer.headers, (b"content-length", str(len(answer.data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": answer.data})


async def send_json(send, status: int, body: dict, headers: list[tuple[bytes, bytes]] = ()) -> None:
    data = json.dumps(body).encode()
    start = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), *headers]
    await send({"type": "http.response.start", "status": status, "headers": start})
    await send({"type": "http.response.body", "body": data})
