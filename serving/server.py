"""How the service plugs into BentoML's server: :class:`LeanService` puts ``serving.edge`` in front
of the ASGI app BentoML builds, and mends BentoML's request timeout on the way.

``bentoml serve``, ``bentoml build``, the model store, /livez, /readyz and /metrics stay BentoML's;
only where a request goes first changes.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys

import bentoml
from bentoml._internal.configuration.containers import BentoMLContainer
from bentoml._internal.server.http.instruments import RunnerTrafficMetricsMiddleware
from bentoml._internal.server.http.traffic import TimeoutMiddleware
from starlette.middleware import Middleware
from starlette.responses import JSONResponse

from serving.config import ServingConfig
from serving.edge import EXPLAIN, OPEN_PREFIXES, Edge
from serving.schemas import explain_refusals


def lean_service(config: ServingConfig) -> type[bentoml.Service]:
    """A ``service_class`` for ``bentoml.service``: BentoML's Service, fronted by the edge."""

    class LeanService(bentoml.Service):
        def to_asgi(self, is_main: bool = True):
            app = super().to_asgi(is_main)
            app.user_middleware = [_mended(m) for m in app.user_middleware]  # the stack is built at first call
            # Tracing and CORS live in BentoML's request layer: with either on, classify requests go through it.
            hot = not (config.tracing or BentoMLContainer.http.cors.enabled.get())
            return Edge(
                app, config, _current_handlers, hot=hot, grpc=_grpc_server(config) if config.grpc_port else None
            )

        @property
        def openapi_spec(self):
            spec = super().openapi_spec
            if EXPLAIN in spec.paths:
                spec.paths[EXPLAIN].post["responses"].update(explain_refusals())
            return spec

    return LeanService


def _grpc_server(config: ServingConfig):
    """The factory of the worker's gRPC server, imported only where it is on."""

    def make(edge: Edge):
        from serving.grpc_server import GrpcServer

        return GrpcServer(config, edge, http_host())

    return make


def _current_handlers():
    return bentoml.get_current_service().handlers


def _mended(middleware: Middleware) -> Middleware:
    if middleware.cls is TimeoutMiddleware:
        return Middleware(CancelledTimeout, *middleware.args, **middleware.kwargs)
    if middleware.cls is RunnerTrafficMetricsMiddleware:
        # It labels the raw path: the edge lets through only the service's routes, but under
        # /static_content/ any file name, so those go unmetered rather than one series each.
        skip = [*middleware.kwargs.get("skip_paths", ()), *OPEN_PREFIXES]
        return Middleware(middleware.cls, *middleware.args, **{**middleware.kwargs, "skip_paths": skip})
    return middleware


class CancelledTimeout(TimeoutMiddleware):
    """BentoML's TimeoutMiddleware, with its timer cancelled once the request is answered.

    BentoML 1.4.39 (bentoml/_internal/server/http/traffic.py, line 29, ``loop.call_later(self.timeout,
    ...)``) never cancels the timer, so each request's context (its span, futures and scope) stays
    alive for the whole timeout, 40 s here: under load, tens of thousands of them, and collector
    pauses of 100-420 ms. Same behaviour otherwise: a 504 if nothing was sent in time.
    """

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        timer = loop.call_later(self.timeout, self._set_timer_out, waiter)

        async def started(message) -> None:
            if not waiter.done():
                waiter.set_result(None)
            await send(message)

        task = asyncio.ensure_future(self.app(scope, receive, started))
        try:
            await waiter
        except TimeoutError:
            if task.cancel():
                message = {"error": f"Not able to process the request in {self.timeout} seconds"}
                await JSONResponse(message, status_code=504)(scope, receive, send)
        else:
            await task
        finally:
            timer.cancel()


def http_host() -> str:
    """The address this worker's HTTP socket listens on, which gRPC listens on too: BentoML hands
    the worker its socket as ``--fd N``. Loopback when that cannot be read (never wider than asked)."""
    argv = sys.argv
    try:
        given = next(
            arg.split("=", 1)[1] if "=" in arg else argv[i + 1]
            for i, arg in enumerate(argv)
            if arg.split("=")[0] == "--fd"
        )
        with socket.socket(fileno=os.dup(int(given))) as sock:
            return sock.getsockname()[0]
    except (StopIteration, IndexError, ValueError, OSError):
        return "127.0.0.1"
