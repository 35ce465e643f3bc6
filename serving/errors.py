"""What can go wrong with a request, as domain errors, and the one table that turns each into HTTP.

Domain code (request parsing, model lookup, decoding) raises these and knows nothing of status
codes; ``serving.edge`` maps them with :data:`HTTP_ERRORS`. Anything not in the table is a bug of
ours, never the client's: the edge answers it 500 with an id and logs its traceback under that id.
"""

from __future__ import annotations

from model_store import ImageError


class RequestError(ValueError):
    """The request is malformed or asks for something impossible; the message says how to fix it."""


class BodyTooLarge(RequestError):
    """The body is larger than the service accepts."""


class UnsupportedMediaType(RequestError):
    """The body's content type is not one the route reads."""


class ClientGone(RequestError):
    """The client hung up before its request was read; no one will read the answer."""


class UnknownModel(LookupError):
    """The request names a model this service does not serve."""


class ModelUnavailable(RuntimeError):
    """The request names a model this service is configured with, but that failed its checks or warm-up."""


class NotFound(LookupError):
    """No route at this path."""


class MethodNotAllowed(RequestError):
    """A route that exists, asked with a method it does not take."""


class LengthRequired(RequestError):
    """An HTTP/1.0 body without Content-Length: its end cannot be known before the client hangs up."""


class SlowBody(RequestError):
    """The body did not arrive in time, or arrived slower than the minimum rate."""


class Unauthorized(PermissionError):
    """No bearer token, or the wrong one, on a path that needs it."""


class Forbidden(PermissionError):
    """A route the configuration turned off (model control)."""


class NotExplainable(LookupError):
    """``/explain`` asked of a model whose graph has no class-activation map."""


class Conflict(RuntimeError):
    """The request cannot be carried out in the present state (a rollout's gate, a rollout under way): the message says what would allow it."""


class Overloaded(RuntimeError):
    """More requests are in flight than the service admits; retry shortly, or elsewhere."""


class DecodersUnavailable(RuntimeError):
    """No decoder process could start (a broken install, no memory or processes left): the message says why."""


# (error type, HTTP status, reason label of classify_rejected_total). First match wins, so a
# subclass comes before its base. TimeoutError is raised by the request's own deadline.
HTTP_ERRORS: tuple[tuple[type[BaseException], int, str], ...] = (
    (Unauthorized, 401, "unauthorized"),
    (Forbidden, 403, "forbidden"),
    (UnknownModel, 404, "unknown_model"),
    (NotFound, 404, "not_found"),
    (MethodNotAllowed, 405, "method_not_allowed"),
    (SlowBody, 408, "slow_body"),
    (LengthRequired, 411, "length_required"),
    (BodyTooLarge, 413, "too_large"),
    (UnsupportedMediaType, 415, "unsupported_type"),
    (ClientGone, 499, "disconnected"),  # nginx's code for it: the status only labels the metric and log
    (NotExplainable, 422, "not_explainable"),
    (Conflict, 409, "conflict"),
    (ImageError, 400, "bad_image"),
    (RequestError, 400, "bad_request"),
    (Overloaded, 503, "overloaded"),
    (DecodersUnavailable, 503, "decoders_unavailable"),
    (ModelUnavailable, 503, "model_unavailable"),
    (TimeoutError, 504, "timeout"),
)
INTERNAL = (500, "internal")
# The same table for gRPC (serving.grpc_server): each reason's status code, by grpc.StatusCode's
# name. Overload is RESOURCE_EXHAUSTED, which gRPC clients retry with backoff; a model still
# warming up or failed, UNAVAILABLE.
GRPC_CODES = {
    "unauthorized": "UNAUTHENTICATED",
    "forbidden": "PERMISSION_DENIED",
    "unknown_model": "NOT_FOUND",
    "not_found": "NOT_FOUND",
    "method_not_allowed": "UNIMPLEMENTED",
    "slow_body": "DEADLINE_EXCEEDED",
    "length_required": "INVALID_ARGUMENT",
    "too_large": "RESOURCE_EXHAUSTED",
    "unsupported_type": "INVALID_ARGUMENT",
    "disconnected": "CANCELLED",
    "not_explainable": "FAILED_PRECONDITION",
    "conflict": "FAILED_PRECONDITION",
    "bad_image": "INVALID_ARGUMENT",
    "bad_request": "INVALID_ARGUMENT",
    "overloaded": "RESOURCE_EXHAUSTED",
    "decoders_unavailable": "UNAVAILABLE",
    "model_unavailable": "UNAVAILABLE",
    "timeout": "DEADLINE_EXCEEDED",
    "internal": "INTERNAL",
}


def http_status(error: BaseException) -> tuple[int, str]:
    """(status, reason) for an error: its row of :data:`HTTP_ERRORS`, or 500 ``internal``."""
    for kind, status, reason in HTTP_ERRORS:
        if isinstance(error, kind):
            return status, reason
    return INTERNAL
