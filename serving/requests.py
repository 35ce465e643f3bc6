"""Reading a classify request: the image bytes and top_k, or a BadRequest that says what to fix.

BentoML's own file parameters are not used for the image: they fetch any URL given as a string
and answer 500 for bytes that are not an image. Parsing here keeps every client mistake a 4xx.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import AsyncIterator, ClassVar

from bentoml import IODescriptor
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

MAX_BODY_BYTES = 10 * 1024 * 1024
DEFAULT_TOP_K = 3
IMAGE_FIELD = "image"
HOW_TO = f"send multipart/form-data with the file in field {IMAGE_FIELD!r}, or the image itself as the body with an image/* content type"


class BadRequest(Exception):
    """A client mistake: answered with ``status`` and ``{"error": message}``."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ImageRequest:
    data: bytes  # the encoded image, not yet decoded
    top_k: int


async def read_image_request(request: Request, num_classes: int, max_bytes: int = MAX_BODY_BYTES) -> ImageRequest:
    """The image and top_k of a POST, from a multipart field or the raw body; top_k from a form field or the query."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    if declared == "0":
        raise BadRequest(f"empty request body; {HOW_TO}")
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    top_k = request.query_params.get("top_k")
    if media_type == "multipart/form-data":
        parser = MultiPartParser(request.headers, _limited(request, max_bytes), max_files=1, max_fields=4)
        try:
            form = await parser.parse()
        except MultiPartException as err:
            raise BadRequest(f"malformed multipart body: {err}; {HOW_TO}") from None
        try:
            field = form.get(IMAGE_FIELD)
            if field is None:
                raise BadRequest(f"missing field {IMAGE_FIELD!r}; {HOW_TO}")
            if not isinstance(field, UploadFile):
                # A text value is never fetched as a URL: the server makes no requests on a client's behalf.
                raise BadRequest(f"field {IMAGE_FIELD!r} must be a file upload, not a text value; {HOW_TO}")
            data = await field.read()
            top_k = form.get("top_k", top_k)
        finally:
            await form.close()  # uploads over 1 MB were spooled to a temp file
    elif media_type.startswith("image/") or media_type == "application/octet-stream":
        data = b"".join([chunk async for chunk in _limited(request, max_bytes)])
    else:
        raise BadRequest(f"unsupported content type {media_type or '(none)'!r}; {HOW_TO}", status=415)
    return ImageRequest(data=data, top_k=parse_top_k(top_k, num_classes))


def parse_top_k(value: str | None, num_classes: int) -> int:
    if value is None or value == "":
        return min(DEFAULT_TOP_K, num_classes)
    try:
        k = int(value)
    except (TypeError, ValueError):
        raise BadRequest(f"top_k must be an integer from 1 to {num_classes}, got {value!r}") from None
    if not 1 <= k <= num_classes:
        raise BadRequest(f"top_k must be from 1 to {num_classes}, got {k}")
    return k


async def _limited(request: Request, max_bytes: int) -> AsyncIterator[bytes]:
    """The body stream, refused with 413 as soon as it passes ``max_bytes`` (chunked bodies included)."""
    seen = 0
    async for chunk in request.stream():
        seen += len(chunk)
        if seen > max_bytes:
            raise _too_large(max_bytes)
        yield chunk


def _too_large(max_bytes: int) -> BadRequest:
    return BadRequest(f"request body exceeds the limit of {max_bytes:,} bytes", status=413)


class RawRequest(IODescriptor):
    """BentoML input spec for /classify: leaves the body unread for :func:`read_image_request`,
    and describes the multipart form in the OpenAPI document."""

    media_type: ClassVar[str] = "multipart/form-data"

    @classmethod
    async def from_http_request(cls, request: Request, serde) -> RawRequest:
        return cls()

    @classmethod
    def model_json_schema(cls, *args, **kwargs) -> dict:
        return {
            "title": "ClassifyRequest",
            "type": "object",
            "properties": {
                IMAGE_FIELD: {"type": "string", "format": "binary", "description": "the image (PNG, JPEG, BMP, GIF, TIFF, WEBP)"},
                "top_k": {"type": "integer", "minimum": 1, "default": DEFAULT_TOP_K, "description": "how many classes to return"},
            },
            "required": [IMAGE_FIELD],
        }
