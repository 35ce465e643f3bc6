"""ASGI middleware in front of the API: bearer-token auth and a bound on requests in flight.

Both act before a byte of the body is read. Health, readiness, metrics and the OpenAPI document
stay open, so probes and scrapers need no token. Past ``max_concurrency`` a classify request is
answered 503 with ``Retry-After`` at once: a queue without bound would only turn overload into
timeouts for everyone, while a 503 lets a load balancer try another replica.
"""

from __future__ import annotations

import hmac
import json

from serving import metrics

CLASSIFY_PATHS = frozenset({"/classify", "/classify_batch"})
PROTECTED_PATHS = CLASSIFY_PATHS | {"/models"}
RETRY_AFTER_S = 1


class Gate:
    def __init__(self, app, max_concurrency: int, token: str = ""):
        self.app, self.max_concurrency = app, max_concurrency
        self.expected = f"Bearer {token}".encode() if token else None
        self.in_flight = 0

    async def __call__(self, scope, receive, send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path not in PROTECTED_PATHS:
            return await self.app(scope, receive, send)
        if self.expected is not None:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):  # constant time: no token guessing by timing
                metrics.rejected.labels(reason="unauthorized").inc()
                message = "missing or wrong bearer token; send 'Authorization: Bearer <token>'"
                return await _error(send, 401, message, [(b"www-authenticate", b"Bearer")])
        if path not in CLASSIFY_PATHS:
            return await self.app(scope, receive, send)
        if self.in_flight >= self.max_concurrency:
            metrics.rejected.labels(reason="overloaded").inc()
            message = f"server busy: {self.max_concurrency} requests already in flight; retry after {RETRY_AFTER_S} s"
            return await _error(send, 503, message, [(b"retry-after", str(RETRY_AFTER_S).encode())])
        self.in_flight += 1
        metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
            metrics.in_flight.dec()


async def _error(send, status: int, message: str, headers: list[tuple[bytes, bytes]]) -> None:
    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
