"""The one place an error becomes an answer, for every path of the service.

:func:`error_answer` looks the error up in ``serving.errors.HTTP_ERRORS``, counts it in
``classify_rejected_total`` under its reason, and gives the JSON body: the error's own message for
a client's mistake or a limit, and for anything not in the table, a bug of ours, ``{"error":
"internal error", "id": ...}`` with the traceback logged under that id. The edge's answers before a
handler runs, the classify and v2 routes, the v2 GET routes and each failed image of a batch all go
through it, so none of them can answer, count or log an error its own way.
"""

from __future__ import annotations

import logging
import traceback
import uuid

from serving import metrics
from serving.errors import http_status
from serving.logs import log_event


def error_answer(
    error: BaseException, route: str, timeout_s: float | None = None, setting: str | None = None
) -> tuple[int, dict]:
    """(status, body) for ``error`` on ``route``, counted; a deadline's message names ``timeout_s``
    and, when it is a setting's, the setting."""
    status, reason = http_status(error)
    metrics.rejected.labels(reason=reason).inc()
    if isinstance(error, TimeoutError) and timeout_s is not None:
        overloaded = f" ({setting}); the server is overloaded, retry later" if setting else ""
        return status, {"error": f"not answered within {timeout_s:g} s{overloaded}"}
    if status == 500:
        error_id = uuid.uuid4().hex[:16]
        log_event(
            "internal_error",
            logging.ERROR,
            id=error_id,
            route=route,
            error=f"{type(error).__name__}: {error}",
            traceback="".join(traceback.format_exception(error)),
        )
        return status, {"error": "internal error", "id": error_id}
    return status, {"error": str(error)}
