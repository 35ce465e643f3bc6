"""``/review``: each served model's captures (``serving.capture``), for people to label.

    GET    /review/{model}                 counts, and the captures waiting for a label, most useful first
                                           (out of distribution, then the smallest margin; ?limit=, default 50)
    GET    /review/{model}/images/{id}     a capture's bytes, as received (id: the image's SHA-256)
    POST   /review/{model}/labels          {"labels": [{"id": ..., "label": ...}, ...]}: a class name, or
                                           "not_in_domain" for an image that is no class at all
    DELETE /review/{model}/captures/{id}   the capture, its image and its row

Every route needs a token, always: the service's (``SERVING_AUTH_TOKEN``) or a reviewer's
(``SERVING_REVIEW_TOKENS``, good for these routes only); without a token configured they answer
403, since captured images are what clients sent. A label records the token's name and the time;
labels are appended, never changed, and the last one given wins.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

from model_store.captures import (
    CaptureStore,
    check_sha,
    counts,
    label_rows,
    review_order,
)
from model_store.errors import UsageError
from serving import v2
from serving.errors import Forbidden, MethodNotAllowed, NotFound, RequestError

REVIEW_PREFIX = "/review"
DEFAULT_LIMIT, MAX_LIMIT = 50, 500  # captures listed per GET
MAX_LABELS = 1000  # labels per POST


@dataclass(frozen=True)
class ReviewRoute:
    kind: str  # "queue", "image", "label", "delete"
    model: str
    capture: str = ""  # the capture's id, for "image" and "delete"


# The path after /review/{model} -> (kind, method); an id follows "images/" and "captures/".
ROUTES = {
    (): ("queue", "GET"),
    ("labels",): ("label", "POST"),
    ("images",): ("image", "GET"),
    ("captures",): ("delete", "DELETE"),
}


def is_review(path: str) -> bool:
    return path.startswith(REVIEW_PREFIX + "/")


def route(method: str, path: str) -> ReviewRoute:
    """The review route of a request, or NotFound / MethodNotAllowed naming the routes."""
    model, *rest = path[len(REVIEW_PREFIX) + 1 :].split("/")
    with_id = len(rest) == 2 and rest[0] in ("images", "captures") and rest[1]
    found = ROUTES.get(tuple(rest[:1]) if with_id else tuple(rest)) if model else None
    if found is None or (found[0] in ("image", "delete")) != bool(with_id):
        raise NotFound(
            "no such review path; the routes are GET /review/{model}, GET /review/{model}/images/{id}, "
            "POST /review/{model}/labels and DELETE /review/{model}/captures/{id}"
        )
    kind, allowed = found
    if method != allowed:
        raise MethodNotAllowed(f"{method} is not allowed here; this review route takes {allowed}")
    return ReviewRoute(kind, model, rest[1] if with_id else "")


class Review:
    """The review routes' answers, over the capture store; the store's calls run on threads."""

    def __init__(self, store: CaptureStore | None, capture, models, token_set: bool):
        self.store, self.capture, self.models, self.token_set = store, capture, models, token_set

    async def answer(self, route: ReviewRoute, body: bytes, query: dict[str, str], who: str) -> dict | v2.Encoded:
        if self.store is None:
            raise NotFound("capture is off: start the service with SERVING_CAPTURE=<folder or s3://bucket/prefix>")
        if not self.token_set:
            raise Forbidden(
                "captured images are served only with a token: start the service with SERVING_AUTH_TOKEN "
                "(and SERVING_REVIEW_TOKENS for reviewers)"
            )
        model = self.models.get(route.model)  # UnknownModel (404) names the served ones
        try:
            if route.kind == "queue":
                return await asyncio.to_thread(self.queue, model, _limit(query.get("limit")))
            if route.kind == "image":
                return await asyncio.to_thread(self.image, model.name, check_sha(route.capture))
            if route.kind == "delete":
                return await asyncio.to_thread(self.delete, model.name, check_sha(route.capture))
            return await asyncio.to_thread(self.label, model, _labels(body), who)
        except UsageError as err:  # a bad id or label: the client's
            raise RequestError(str(err)) from None

    def queue(self, model, limit: int) -> dict:
        rows, labels = self.store.rows(model.name), self.store.labels(model.name)
        waiting = review_order(rows, labels)
        return {
            "model": model.name,
            "labels": [*model.engine.card.class_names, "not_in_domain"],
            "counts": counts(rows, labels),
            "captures": [_shown(row) for row in waiting[:limit]],
        }

    def image(self, model: str, sha: str) -> v2.Encoded:
        found = self.store.image(model, sha)
        if found is None:
            raise NotFound(f"no capture {sha} of model {model}")
        data, media_type = found
        return v2.Encoded(data, [(b"content-type", media_type.encode())], model, 1)

    def delete(self, model: str, sha: str) -> dict:
        if self.store.remove(model, sha) is None:
            raise NotFound(f"no capture {sha} of model {model}")
        if self.capture is not None:
            self.capture.removed(model, sha)
        return {"removed": sha}

    def label(self, model, pairs: list[tuple[str, str]], who: str) -> dict:
        shas = [check_sha(sha) for sha, _ in pairs]
        missing = [sha for sha in shas if self.store.row(model.name, sha) is None]
        if missing:
            raise NotFound(
                f"no capture {missing[0]} of model {model.name}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            )
        labels = label_rows(shas, [label for _, label in pairs], who, model.engine.card.class_names)
        self.store.add_labels(model.name, labels)
        if self.capture is not None:
            self.capture.labelled(model.name, shas)
        return {"labelled": len(labels), "by": who}


def _shown(row: dict) -> dict:
    keys = ("sha256", "time", "reason", "label", "probability", "top_k", "ood_distance", "bytes")
    return {"id": row["sha256"], **{key: row.get(key) for key in keys if key != "sha256"}}


def _limit(raw: str | None) -> int:
    if raw is None:
        return DEFAULT_LIMIT
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise RequestError(f"limit must be a whole number from 1 to {MAX_LIMIT}, got {raw[:40]!r}")
    return int(raw)


def _labels(body: bytes) -> list[tuple[str, str]]:
    how = 'send {"labels": [{"id": "<the capture\'s SHA-256>", "label": "<a class, or not_in_domain>"}, ...]}'
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RequestError(f"the body is not JSON; {how}") from None
    labels = data.get("labels") if isinstance(data, dict) else None
    if not isinstance(labels, list) or not labels or not all(isinstance(item, dict) for item in labels):
        raise RequestError(f"no labels; {how}")
    if len(labels) > MAX_LABELS:
        raise RequestError(f"{len(labels):,} labels in one request; at most {MAX_LABELS:,}")
    pairs = [(item.get("id"), item.get("label")) for item in labels]
    if not all(isinstance(sha, str) and isinstance(label, str) for sha, label in pairs):
        raise RequestError(f"each label needs a string id and label; {how}")
    return pairs
