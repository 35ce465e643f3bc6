"""Reading classify requests: the images, top_k and model asked for, or a RequestError that says what to fix.

BentoML's own file parameters are not used for the image: they fetch any URL given as a string
and answer 500 for bytes that are not an image. Parsing here keeps every client mistake a 4xx.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import AsyncIterator

from starlette.requests import ClientDisconnect, Request

from serving.errors import BodyTooLarge, ClientGone, RequestError, UnsupportedMediaType
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


async def read_classify_request(request: Request, max_bytes: int) -> ClassifyRequest:
    """One image, from the multipart field ``image`` or the raw body; ``top_k`` and ``model`` from the form or query."""
    media_type = _check_body(request, max_bytes)
    if media_type == "multipart/form-data":
        return await _read_form(request, IMAGE_FIELD, 1, max_bytes, HOW_TO)
    if media_type.startswith("image/") or media_type == "application/octet-stream":
        data = await _read_body(request, max_bytes)
        if not data:
            raise RequestError(f"empty request body; {HOW_TO}")
        query = request.query_params
        return ClassifyRequest([Upload("body", data)], query.get("top_k"), query.get("model"))
    raise UnsupportedMediaType(f"unsupported content type {media_type or '(none)'!r}; {HOW_TO}")


async def read_batch_request(request: Request, max_bytes: int, max_images: int) -> ClassifyRequest:
    """Up to ``max_images`` images, each in its own multipart ``images`` field, in order."""
    media_type = _check_body(request, max_bytes)
    if media_type != "multipart/form-data":
        raise UnsupportedMediaType(f"unsupported content type {media_type or '(none)'!r}; {HOW_TO_BATCH}")
    return await _read_form(request, IMAGES_FIELD, max_images, max_bytes, HOW_TO_BATCH)


def _check_body(request: Request, max_bytes: int) -> str:
    """Refuse what the headers already show is wrong; returns the media type."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise body_too_large(max_bytes)
    if declared == "0":
        raise RequestError("empty request body; " + HOW_TO)
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def _read_form(request: Request, field: str, max_files: int, max_bytes: int, how_to: str) -> ClassifyRequest:
    body = await _read_body(request, max_bytes)
    try:
        parts = parse_form(body, boundary_of(request.headers["content-type"]), max_files + MAX_OTHER_FIELDS)
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
        options[name] = form_value(part.data) if part is not None else request.query_params.get(name)
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


async def _read_body(request: Request, max_bytes: int) -> bytes:
    return b"".join([chunk async for chunk in _limited(request, max_bytes)])


async def _limited(request: Request, max_bytes: int) -> AsyncIterator[bytes]:
    """The body stream, refused with 413 as soon as it passes ``max_bytes`` (chunked bodies included)."""
    seen = 0
    try:
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > max_bytes:
                raise body_too_large(max_bytes)
            yield chunk
    except ClientDisconnect:
        raise ClientGone("the client disconnected before its request body was read") from None


def body_too_large(max_bytes: int) -> BodyTooLarge:
    return BodyTooLarge(f"request body exceeds the limit of {max_bytes:,} bytes")
