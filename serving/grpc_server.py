"""The Open Inference Protocol over gRPC, in each service worker beside HTTP, so that Triton's and
KServe's gRPC clients (``tritonclient.grpc``, sync and aio) work unchanged.

It serves ``inference.GRPCInferenceService`` (``serving/protocol``: Triton's .proto, with its
model-configuration and model-repository extensions), the standard ``grpc.health.v1.Health`` (for
Kubernetes' gRPC probes) and server reflection (for ``grpcurl``), on ``SERVING_GRPC_PORT`` (8001,
Triton's; 0: off), on the host HTTP was given. Each worker runs one ``grpc.aio`` server on its own
event loop, started and stopped with the worker's ASGI lifespan (``serving.edge``); with several
workers they share the port (SO_REUSEPORT), and the kernel spreads connections among them.

A call goes through what an HTTP v2 request goes through: the same token (``authorization:
Bearer`` metadata; the health service and ServerLive/ServerReady are open, as the HTTP probes
are), the same admission (in-flight requests of both protocols count against
``SERVING_MAX_CONCURRENCY``), the same handlers, batcher and models (``Handlers.run_infer``), the
same deadline (``SERVING_TIMEOUT_S``, or the client's own when sooner), the same error table
(``serving.errors.GRPC_CODES``) and metrics (``classify_requests_total{route="grpc:ModelInfer"}``).
ModelStreamInfer serves each message of a stream as such a call (:meth:`GrpcServer.stream`), several
at once, so that one stream fills batches and pays no call's set-up a message.
Bounds: a message is at most ``SERVING_MAX_BODY_BYTES``, as an HTTP body (gRPC answers
RESOURCE_EXHAUSTED past it); and at most ``SERVING_MAX_BODY_MEMORY_MB`` of them are held at once, by
allowing that many divided by the message bound of calls at a time (51 by default; gRPC answers
RESOURCE_EXHAUSTED to the next), a stream being one call that holds its window more (an eighth of a
message's bound). Triton's statistics, trace, logging and shared-memory calls answer UNIMPLEMENTED.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from serving import metrics, v2, v2_grpc
from serving.config import ServingConfig
from serving.edge import RETRY_AFTER_S  # sent as trailing metadata "retry-after" with an overload's RESOURCE_EXHAUSTED
from serving.errors import GRPC_CODES, Overloaded, RequestError, Unauthorized, UnknownModel, http_status
from serving.failures import error_answer
from serving.logs import log_event, log_request
from serving.protocol import grpc_service_pb2 as pb

if TYPE_CHECKING:
    from serving.edge import Edge
    from serving.handlers import Handlers

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name  # inference.GRPCInferenceService
HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
OPEN_METHODS = frozenset(  # the probes, open as /livez, /readyz and /v2/health/* are
    {f"/{HEALTH}/Check", f"/{HEALTH}/Watch", f"/{SERVICE}/ServerLive", f"/{SERVICE}/ServerReady"}
)
STOP_GRACE_S = 5.0  # calls in flight at shutdown get this long to finish


class GrpcServer:
    """One worker's gRPC server. ``edge``: the worker's HTTP edge, whose handlers, token and
    in-flight count the calls share; ``host``: the address HTTP listens on."""

    def __init__(self, config: ServingConfig, edge: Edge, host: str):
        self.config, self.edge, self.host = config, edge, host
        self.server: grpc.aio.Server | None = None

    async def start(self) -> None:
        config = self.config
        options = [
            ("grpc.max_receive_message_length", config.max_body_bytes),
            ("grpc.max_send_message_length", config.max_body_bytes),
            ("grpc.so_reuseport", 1 if config.workers > 1 else 0),  # one port for the workers, never a stranger's
            # gRPC's flow-control window stays at its 64 KB a call: grown by its bandwidth probe, it let
            # calls not yet admitted (then refused) bring in megabytes each, past the memory bound
            # (tests/test_grpc.py: 32 calls of 8 MB at once peaked 213-292 MB over the start, 142-161
            # MB with the probe off; the bound is 256 MB)
            ("grpc.http2.bdp_probe", 0),
        ]
        server = grpc.aio.server(
            # Only with a token: an interceptor costs every call (BENCHMARKS.md, "The v2 protocol over gRPC")
            interceptors=[Authorization(config.auth_token)] if config.auth_token else None,
            options=options,
            maximum_concurrent_rpcs=config.grpc_calls,
        )
        server.add_generic_rpc_handlers((inference_handler(Inference(self)),))
        health_pb2_grpc.add_HealthServicer_to_server(Health(self), server)
        reflection.enable_server_reflection((SERVICE, HEALTH, reflection.SERVICE_NAME), server)
        address = f"[{self.host}]:{config.grpc_port}" if ":" in self.host else f"{self.host}:{config.grpc_port}"
        try:
            server.add_insecure_port(address)
        except RuntimeError as err:  # grpc says only "Failed to bind"
            raise RuntimeError(f"SERVING_GRPC_PORT: cannot listen on {address} ({err}); is the port taken?") from None
        await server.start()
        self.server = server
        log_event(
            "grpc",
            address=address,
            max_message_bytes=config.max_body_bytes,
            max_calls=config.grpc_calls,
            stream_window=config.grpc_stream_window,
            stream_window_bytes=config.grpc_stream_bytes,
        )

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(STOP_GRACE_S)

    def handlers(self) -> Handlers:
        return self.edge.handlers()

    async def call(self, context: grpc.aio.ServicerContext, rpc: str, work: Callable[[Handlers], Awaitable]):
        """``work(handlers)``'s answer, or the call ended with the status code of the error's row
        in the error table (:meth:`serve`)."""
        answer, code, message, overloaded = await self.serve(context, f"grpc:{rpc}", work)
        if code == "OK":
            return answer
        if overloaded:
            context.set_trailing_metadata((("retry-after", str(RETRY_AFTER_S)),))
        return _ended(context, code, message)

    async def serve(
        self, context: grpc.aio.ServicerContext, route: str, work: Callable[[Handlers], Awaitable], admit=True
    ):
        """``(answer, "OK", None, False)`` for ``work(handlers)``'s answer, or ``(None, code,
        message, overloaded)`` with the status code of the error's row in the error table (and
        whether it was overload, which a retry hint answers; not the error itself, whose traceback
        would hold the request's frames, its message among them, until a garbage collection); counted,
        timed and logged as an HTTP request is, under ``route``. Admitted against
        SERVING_MAX_CONCURRENCY with the HTTP requests in flight (unless ``admit`` is false: a
        stream's message, admitted with its stream), and given SERVING_TIMEOUT_S, or
        the client's deadline when sooner. A call gRPC cancels (its client went, or its deadline
        passed first in gRPC's own clock) is counted CANCELLED or DEADLINE_EXCEEDED, and the
        cancellation goes on."""
        start = time.perf_counter()
        edge, config = self.edge, self.config
        remaining = context.time_remaining()
        timeout = config.timeout_s if remaining is None else min(config.timeout_s, remaining)
        code, images, model, message = "OK", 0, None, None
        admitted = False
        try:
            if admit:
                edge.take_slot()
                admitted = True
            async with asyncio.timeout(timeout):
                answer = await work(self.handlers())
            if isinstance(answer, pb.ModelInferResponse):
                model, images = answer.model_name, answer.outputs[0].shape[0] if answer.outputs else 0
            return answer, code, None, False
        except asyncio.CancelledError:
            passed = remaining is not None and (context.time_remaining() or 0.0) <= 0
            code = "DEADLINE_EXCEEDED" if passed else "CANCELLED"
            message = "the client's deadline passed" if passed else "the client cancelled the call"
            raise
        except Exception as err:
            setting = "SERVING_TIMEOUT_S" if remaining is None or remaining >= config.timeout_s else None
            _, body = error_answer(err, route, timeout, setting)
            code, message = GRPC_CODES[http_status(err)[1]], body["error"]
            return None, code, message, isinstance(err, Overloaded)
        finally:
            if admitted:
                edge.free_slot()
            seconds = time.perf_counter() - start
            metrics.requests.labels(route=route, status=code).inc()
            metrics.request_seconds.labels(route=route).observe(seconds)
            if config.log_requests or code == "INTERNAL":
                level = logging.WARNING if code == "INTERNAL" else logging.INFO
                fields = {"error": message} if message else {}
                log_request(
                    level, route=route, status=code, ms=round(seconds * 1000, 2), model=model, images=images, **fields
                )

    async def stream(self, context: grpc.aio.ServicerContext, work_of: Callable[[bytes], Callable]) -> None:
        """ModelStreamInfer: each message the client writes is a call of its own, ``work_of(message)``,
        served as :meth:`serve` serves a call (under ``grpc:ModelStreamInfer``), and answered on the
        stream as soon as it is done, in the order answers finish (the client matches them by their
        ``id``); an error goes back in-band, as ``error_message``, and the stream goes on, as Triton
        does. The stream is admitted as one request for as long as it is open (SERVING_MAX_CONCURRENCY
        with the HTTP requests; past it, it ends RESOURCE_EXHAUSTED with the retry hint), and its
        messages are served concurrently, so that one stream fills batches: at most
        SERVING_GRPC_STREAM_WINDOW (64) at once and under ``config.grpc_stream_bytes`` of them (an
        eighth of the message limit) when the next is read (:class:`StreamWindow`); past that the
        stream reads no more until answers are written, and gRPC's flow control holds the client
        back. A stream is one of the calls ``maximum_concurrent_rpcs`` admits."""
        route = "grpc:ModelStreamInfer"
        try:
            self.edge.take_slot()
        except Overloaded as error:
            _, body = error_answer(error, route)
            metrics.requests.labels(route=route, status="RESOURCE_EXHAUSTED").inc()
            context.set_trailing_metadata((("retry-after", str(RETRY_AFTER_S)),))
            _ended(context, "RESOURCE_EXHAUSTED", body["error"])
            return
        window = StreamWindow(self.config.grpc_stream_window, self.config.grpc_stream_bytes)
        answers: asyncio.Queue[tuple[pb.ModelStreamInferResponse, int] | None] = asyncio.Queue()
        serving: set[asyncio.Task] = set()

        async def one(message: bytes) -> None:
            answer, code, error_message, _ = await self.serve(context, route, work_of(message), admit=False)
            if code == "OK":
                response = pb.ModelStreamInferResponse(infer_response=answer)
            else:  # the code first: the message's only way to carry it (UNAVAILABLE, a model warming up: retry)
                response = pb.ModelStreamInferResponse(error_message=f"{code}: {error_message}")
            answers.put_nowait((response, len(message)))

        async def read() -> None:
            try:
                while True:
                    await window.room()
                    message = await context.read()
                    if message is grpc.aio.EOF:
                        break
                    window.take(len(message))
                    task = asyncio.create_task(one(message))
                    serving.add(task)
                    task.add_done_callback(serving.discard)
                while serving:
                    await asyncio.wait(serving)
            finally:
                answers.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (answer := await answers.get()) is not None:
                await context.write(answer[0])
                window.give(answer[1])
            await reader  # what ended the reading (a cancelled read raises here)
        finally:
            self.edge.free_slot()
            reader.cancel()
            for task in serving:
                task.cancel()


class StreamWindow:
    """What one stream holds in flight: messages read and not yet answered on the stream. The next
    is read only while fewer than ``count`` are and their bytes are under ``size``, so that their
    bytes stay under ``size`` plus one message's."""

    def __init__(self, count: int, size: int):
        self.count, self.size = count, size
        self.held = self.bytes = 0
        self._room = asyncio.Event()
        self._room.set()

    async def room(self) -> None:
        await self._room.wait()

    def take(self, size: int) -> None:
        self.held, self.bytes = self.held + 1, self.bytes + size
        if self.held >= self.count or self.bytes >= self.size:
            self._room.clear()

    def give(self, size: int) -> None:
        self.held, self.bytes = self.held - 1, self.bytes - size
        if self.held < self.count and self.bytes < self.size:
            self._room.set()


class Inference:
    """``inference.GRPCInferenceService``'s methods (:func:`inference_handler` serves them): each
    is the HTTP v2 route's, through :meth:`GrpcServer.call`."""

    def __init__(self, server: GrpcServer):
        self.server = server

    async def ServerLive(self, request, context):
        return await self.server.call(context, "ServerLive", _answer(pb.ServerLiveResponse(live=True)))

    async def ServerReady(self, request, context):
        async def work(handlers: Handlers):
            return pb.ServerReadyResponse(ready=handlers.models.ready)

        return await self.server.call(context, "ServerReady", work)

    async def ServerMetadata(self, request, context):
        async def work(handlers: Handlers):
            return pb.ServerMetadataResponse(**handlers.v2_info(v2.Route("server")))

        return await self.server.call(context, "ServerMetadata", work)

    async def ModelReady(self, request, context):
        async def work(handlers: Handlers):
            handlers.models.get(_tag(request.name, request.version))  # NOT_FOUND for a model it does not serve
            return pb.ModelReadyResponse(ready=handlers.models.ready)

        return await self.server.call(context, "ModelReady", work)

    async def ModelMetadata(self, request, context):
        async def work(handlers: Handlers):
            model = handlers.models.get(_tag(request.name, request.version))
            return v2_grpc.model_metadata(model.name, model.version, model.engine.card)

        return await self.server.call(context, "ModelMetadata", work)

    async def ModelConfig(self, request, context):
        async def work(handlers: Handlers):
            model = handlers.models.get(_tag(request.name, request.version))
            config = handlers.config
            return v2_grpc.model_config(model.name, model.engine.card, config.max_batch_images, model.engine.provider)

        return await self.server.call(context, "ModelConfig", work)

    async def ModelInfer(self, request, context):
        async def work(handlers: Handlers):
            return await _infer(handlers, request, _rollout_key(context) if handlers.rollouts.active else None)

        return await self.server.call(context, "ModelInfer", work)

    async def ModelStreamInfer(self, requests, context):
        key = _rollout_key(context)  # the stream's metadata, the same for each of its messages

        def work_of(message: bytes):
            async def work(handlers: Handlers):
                request = _parse(pb.ModelInferRequest, message, "ModelStreamInfer")
                return await _infer(handlers, request, key if handlers.rollouts.active else None)

            return work

        await self.server.stream(context, work_of)

    async def RepositoryIndex(self, request, context):
        async def work(handlers: Handlers):
            body = b'{"ready": true}' if request.ready else b"{}"
            encoded = await handlers.repository(v2.Route("index"), body)
            return v2_grpc.repository_index(_json(encoded))

        return await self.server.call(context, "RepositoryIndex", work)

    async def RepositoryModelLoad(self, request, context):
        async def work(handlers: Handlers):
            await handlers.repository(v2.Route("load", request.model_name), b"{}")
            return pb.RepositoryModelLoadResponse()

        return await self.server.call(context, "RepositoryModelLoad", work)

    async def RepositoryModelUnload(self, request, context):
        async def work(handlers: Handlers):
            await handlers.repository(v2.Route("unload", request.model_name), b"{}")
            return pb.RepositoryModelUnloadResponse()

        return await self.server.call(context, "RepositoryModelUnload", work)


class Health(health_pb2_grpc.HealthServicer):
    """``grpc.health.v1.Health``: SERVING once the models are warm (as /readyz), for "" and the inference service."""

    def __init__(self, server: GrpcServer):
        self.server = server

    async def Check(self, request, context):
        if request.service not in ("", SERVICE):
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"unknown service {request.service[:128]!r}; ask for {SERVICE!r} or ''"
            )
        handlers = self.server.handlers()
        ready = handlers.models.ready and handlers.decoders.start_error is None
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse(status=status)


class Authorization(grpc.aio.ServerInterceptor):
    """Every method but :data:`OPEN_METHODS` needs ``authorization: Bearer <token>`` metadata,
    reflection included: UNAUTHENTICATED otherwise, counted as HTTP's 401."""

    def __init__(self, token: str):
        self.expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method in OPEN_METHODS:  # None: unknown, gRPC answers UNIMPLEMENTED
            return handler
        sent = dict(details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(sent.encode(), self.expected):
            return handler
        error = Unauthorized("missing or wrong bearer token; send metadata 'authorization: Bearer <token>'")
        return _refusing(handler, "grpc:" + details.method.rsplit("/", 1)[-1], error)


async def _infer(handlers: Handlers, request: pb.ModelInferRequest, key: bytes | None) -> pb.ModelInferResponse:
    """ModelInfer's answer, a ModelStreamInfer message's too; ``key``: the rollout key (``serving.rollout``)."""
    tag = _tag(request.model_name, request.model_version)
    model = handlers.models.get(tag)
    card = model.engine.card
    parsed = v2_grpc.parse_infer(request, card, handlers.config.max_batch_images)
    probabilities, version = await handlers.run_infer(model, tag, parsed, key)
    return v2_grpc.encode_infer(parsed, probabilities, model.name, version, card.class_names)


def inference_handler(servicer: Inference) -> grpc.GenericRpcHandler:
    """The servicer's methods as ``inference.GRPCInferenceService``'s, each parsing its own
    requests: bytes that are no such message are INVALID_ARGUMENT naming it (gRPC's own parse
    answers UNKNOWN). The service's other methods are left out, so gRPC answers UNIMPLEMENTED."""
    methods = {}
    for method in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods:
        run = getattr(type(servicer), method.name, None)
        if run is None:
            continue
        request, response = getattr(pb, method.input_type.name), getattr(pb, method.output_type.name)
        serializer = _or_nothing(response.SerializeToString)
        if method.client_streaming and method.server_streaming:  # ModelStreamInfer parses each message itself
            handler = grpc.stream_stream_rpc_method_handler(getattr(servicer, method.name), None, serializer)
        else:
            handler = grpc.unary_unary_rpc_method_handler(
                _parsing(getattr(servicer, method.name), request, method.name), response_serializer=serializer
            )
        methods[method.name] = handler
    return grpc.method_handlers_generic_handler(SERVICE, methods)


def _parse(message: type, data: bytes, method: str):
    """``data`` parsed as a ``message``; a RequestError naming the method when it is none."""
    try:
        return message.FromString(data)
    except DecodeError:
        raise RequestError(
            f"the request is no {method} request message: {len(data):,} bytes that do not parse"
        ) from None


def _parsing(run, message: type, method: str):
    """``run`` taking the request's bytes and parsing them as ``message`` first."""
    route = f"grpc:{method}"

    async def unary(data: bytes, context):
        try:
            request = _parse(message, data, method)
        except RequestError as error:
            _, body = error_answer(error, route)
            metrics.requests.labels(route=route, status="INVALID_ARGUMENT").inc()
            return _ended(context, "INVALID_ARGUMENT", body["error"])
        return await run(request, context)

    return unary


def _refusing(handler: grpc.RpcMethodHandler, route: str, error: Exception) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that refuses every call with ``error``'s code, counted."""
    _, body = error_answer(error, route)
    code = GRPC_CODES[http_status(error)[1]]
    metrics.requests.labels(route=route, status=code).inc()

    async def unary(request, context):
        return _ended(context, code, body["error"])

    async def streaming(requests, context):
        _ended(context, code, body["error"])
        return
        yield  # never reached: makes this an async generator, as a streaming handler is

    options = {"request_deserializer": None, "response_serializer": _or_nothing(handler.response_serializer)}
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary, **options)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming, **options)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary, **options)
    return grpc.stream_stream_rpc_method_handler(streaming, **options)


def _ended(context: grpc.aio.ServicerContext, code: str, message: str) -> None:
    """End the call with status ``code`` and ``message``, by setting them and answering nothing.
    Not ``context.abort``: the exception it raises keeps what the call held, the request's bytes
    among it, in grpc.aio 1.85 (as grpc/grpc#36908 reports for errors raised in a handler): 32
    calls of 8 MB answered INVALID_ARGUMENT by abort left about 400 MB held for good, against
    none this way (tests/test_grpc.py)."""
    context.set_code(grpc.StatusCode[code])
    context.set_details(message)


def _or_nothing(serialize: Callable | None) -> Callable:
    """``serialize``, that also takes None, the answer of a call :func:`_ended`, to no bytes."""
    if serialize is None:
        return lambda answer: b"" if answer is None else answer
    return lambda answer: b"" if answer is None else serialize(answer)


def _rollout_key(context: grpc.aio.ServicerContext) -> bytes | None:
    """The ``x-rollout-key`` metadata (``serving.rollout``: which side of a canary answers)."""
    key = dict(context.invocation_metadata() or ()).get("x-rollout-key")
    return key.encode() if key else None


def _tag(name: str, version: str) -> str:
    """What ``ModelSet.get`` takes from a request's model name and version; the protocol has no
    default model, so an empty name is no model (HTTP's path cannot be empty either)."""
    if not name:
        raise UnknownModel("the model name is empty; name a model (RepositoryIndex lists them)")
    return f"{name}:{version}" if version else name


def _answer(value):
    async def work(handlers):
        return value

    return work


def _json(encoded: v2.Encoded):
    return json.loads(encoded.data)
