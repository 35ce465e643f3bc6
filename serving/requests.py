"""Reading classify requests: the images, top_k and model asked for, or a RequestError that says what to fix.

BentoML's own file parameters are not used for the image: they fetch any URL given as a string
and answer 500 for bytes that are not an image. Parsing here keeps every client mistake a 4xx.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from urllib.parse import parse_qsl

from serving.errors import RequestError, UnsupportedMediaType
from serving.multipart import MalformedForm, TooManyParts, boundary_of, parse_form

DEFAULT_TOP_K = 3
IMAGE_FIELD, IMAGES_FIELD = "image", "images"
HOW_TO = f"send multipart/form-data with the file in field {IMAGE_FIELD!r}, or the image itself as the body with an image/* content type"
HOW_TO_BATCH = f"send multipart/form-data with one file per {IMAGES_FIELD!r} field"
MAX_OTHER_FIELDS = 8  # form parts besides the images: top_k, model, and a few a client adds unasked


@dataclass(frozen=True)
class Upload:
    filename: str
    data: bytes  # the encoded image, not yet decoded


@dataclass(frozen=True)
class ClassifyRequest:
    images: list[Upload]
    top_k: str | None  # checked once the model, and so the class count, is known
    model: str | None  # None: the default model


@dataclass(frozen=True)
class Received:
    """An inference request as the edge read it: the whole body (already within the size limit,
    which is checked once, where the body is read: ``serving.edge``), the headers and the query."""

    body: bytes
    headers: dict[bytes, bytes]  # lower-case names; the last of a repeated header
    query: dict[str, str]  # the last of a repeated parameter

    @classmethod
    def of(cls, scope, body: bytes, headers: dict[bytes, bytes] | None = None) -> Received:
        """``headers``: ``scope``'s as a dict, when the caller has made it already."""
        # The query decoded as Starlette decodes it: latin-1, then percent-decoding as UTF-8.
        query = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        return cls(body, dict(scope["headers"]) if headers is None else headers, dict(query))

    def header(self, name: bytes) -> str:
        return self.headers.get(name, b"").decode("latin-1")

    @property
    def media_type(self) -> str:
        return self.header(b"content-type").split(";")[0].strip().lower()


def read_classify_request(received: Received) -> ClassifyRequest:
    """One image, from the multipart field ``image`` or the raw body; ``top_k`` and ``model`` from the form or query."""
    media_type = received.media_type
    if not received.body:
        raise RequestError(f"empty request body; {HOW_TO}")
    if media_type == "multipart/form-data":
        return _read_form(received, IMAGE_FIELD, 1, HOW_TO)
    if media_type.startswith("image/") or media_type == "application/octet-stream":
        query = received.query
        return ClassifyRequest([Upload("body", received.body)], query.get("top_k"), query.get("model"))
    raise UnsupportedMediaType(f"unsupported content type {media_type or '(none)'!r}; {HOW_TO}")


def read_batch_request(received: Received, max_images: int) -> ClassifyRequest:
    """Up to ``max_images`` images, each in its own multipart ``images`` field, in order."""
    if not received.body:
        raise RequestError(f"empty request body; {HOW_TO_BATCH}")
    if (media_type := received.media_type) != "multipart/form-data":
        raise UnsupportedMediaType(f"unsupported content type {media_type or '(none)'!r}; {HOW_TO_BATCH}")
    return _read_form(received, IMAGES_FIELD, max_images, HOW_TO_BATCH)


def _read_form(received: Received, field: str, max_files: int, how_to: str) -> ClassifyRequest:
    try:
        boundary = boundary_of(received.header(b"content-type"))
        parts = parse_form(received.body, boundary, max_files + MAX_OTHER_FIELDS)
    except TooManyParts:
        raise RequestError(
            f"too many images: at most {max_files} per request (and {MAX_OTHER_FIELDS} other fields), got more; "
            "split the request"
        ) from None
    except MalformedForm as err:
        raise RequestError(f"malformed multipart body: {err}; {how_to}") from None
    files = [part for part in parts if part.name == field]
    if not files:
        raise RequestError(f"missing field {field!r}; {how_to}")
    if any(part.filename is None for part in files):
        # A text value is never fetched as a URL: the server makes no requests on a client's behalf.
        raise RequestError(f"field {field!r} must be a file upload, not a text value; {how_to}")
    if len(files) > max_files:
        raise RequestError(f"too many images: at most {max_files} per request, got {len(files)}; split the request")
    options = {}
    for name in ("top_k", "model"):
        part = next((part for part in parts if part.name == name), None)
        if part is not None and part.filename is not None:
            raise RequestError(f"field {name!r} must be a text value, not a file")
        options[name] = form_value(part.data) if part is not None else received.query.get(name)
    uploads = [Upload(part.filename or f"{field}[{i}]", part.data) for i, part in enumerate(files)]
    return ClassifyRequest(uploads, options["top_k"], options["model"] or None)


def form_value(data: bytes) -> str | None:
    """A text field's value. BentoML's HTTP clients send every argument that is not a file
    JSON-encoded: ``model="a"`` as ``"a"`` (quotes included), ``top_k=5`` as ``5``, ``None`` as
    ``null``. A JSON string is unwrapped and ``null`` is no value; anything else is taken as it is."""
    text = data.decode("utf-8", errors="replace")
    if text == "null":
        return None
    if len(text) >= 2 and text[0] == text[-1] == '"':
        try:
            value = json.loads(text)  # starts and ends with a quote: a string, or not JSON at all
            value.encode("utf-8")  # a lone surrogate ("\\ud800") is no text: keep the raw value
            return value
        except ValueError:  # UnicodeEncodeError included
            pass
    return text


def parse_top_k(value: str | None, num_classes: int) -> int:
    if value is None or value == "":
        return min(DEFAULT_TOP_K, num_classes)
    # ASCII digits only: int() would also take " 3", "+3", "1_0" and other scripts' digits ("٣").
    if not (value.isascii() and value.isdigit() and len(value) <= 6):
        raise RequestError(f"top_k must be an integer from 1 to {num_classes}, got {value[:16]!r}")
    k = int(value)
    if not 1 <= k <= num_classes:
        raise RequestError(f"top_k must be from 1 to {num_classes}, got {k}")
    return k
