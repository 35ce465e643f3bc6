"""multipart/form-data (RFC 7578) read from a body already in memory, whose size the caller bounded.

The classify routes read a form of one or a few parts: the image(s), and maybe ``top_k`` and
``model``. Starlette's streaming parser (python-multipart under it) walks each part's headers a
byte at a time in Python and spools every file into a temporary file object: for a 1 KB image that
was a sixth of the request's CPU. Here the parts are found with ``bytes.find`` (linear in the body,
in C), and the one piece worth reusing, the header-parameter parser that handles quoting, is
python-multipart's.
"""

from __future__ import annotations

from dataclasses import dataclass

from python_multipart.multipart import parse_options_header

from serving.errors import RequestError

MAX_BOUNDARY = 70  # RFC 2046
MAX_HEADER_BYTES = 8 * 1024  # one part's header block
MAX_TEXT_BYTES = 1024  # a text field's value: top_k and model are short, and an error may echo them


@dataclass(frozen=True)
class Part:
    name: str
    filename: str | None  # None for a text field; a file part may have an empty one
    data: bytes


class MalformedForm(RequestError):
    """The body is not the multipart form its Content-Type says it is."""


class TooManyParts(RequestError):
    """More parts than the caller allows."""


def boundary_of(content_type: str) -> bytes:
    """The boundary parameter of a multipart Content-Type header."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary", b"")
    if not 1 <= len(boundary) <= MAX_BOUNDARY:
        raise MalformedForm(f"the Content-Type needs a boundary of 1 to {MAX_BOUNDARY} characters, got {len(boundary)}")
    return boundary


def parse_form(body: bytes, boundary: bytes, max_parts: int) -> list[Part]:
    """Every part of ``body``, in order; at most ``max_parts`` of them."""
    delimiter = b"--" + boundary
    if body.startswith(delimiter):
        position = 0
    elif (preamble_end := body.find(b"\r\n" + delimiter)) >= 0:
        position = preamble_end + 2
    else:
        raise MalformedForm("no boundary line in the body")
    parts: list[Part] = []
    while True:
        position += len(delimiter)
        if body.startswith(b"--", position):  # the close delimiter: anything after it is epilogue
            return parts
        position = _skip_padding(body, position)
        if not body.startswith(b"\r\n", position):
            raise MalformedForm("a boundary line is not followed by a line break")
        headers_end = body.find(b"\r\n\r\n", position, position + 2 + MAX_HEADER_BYTES + 4)
        if headers_end < 0:
            raise MalformedForm(f"a part's headers do not end within {MAX_HEADER_BYTES:,} bytes")
        name, filename = _disposition(body[position + 2 : headers_end])
        data_start = headers_end + 4
        data_end = body.find(b"\r\n" + delimiter, data_start)
        if data_end < 0:
            raise MalformedForm("the body ends inside a part (no closing boundary)")
        if len(parts) == max_parts:
            raise TooManyParts(f"more than {max_parts} parts")
        if filename is None and data_end - data_start > MAX_TEXT_BYTES:
            raise RequestError(f"field {name!r} is longer than {MAX_TEXT_BYTES} bytes")
        parts.append(Part(name, filename, body[data_start:data_end]))
        position = data_end + 2


def _skip_padding(body: bytes, position: int) -> int:
    while body[position : position + 1] in (b" ", b"\t"):  # "transport padding" (RFC 2046)
        position += 1
    return position


def _disposition(block: bytes) -> tuple[str, str | None]:
    """(name, filename or None) from a part's header block."""
    for line in block.split(b"\r\n"):
        header, colon, value = line.partition(b":")
        if not colon:
            raise MalformedForm(f"a part header line has no colon: {line[:80]!r}")
        if header.strip().lower() == b"content-disposition":
            kind, params = parse_options_header(value.strip())
            if kind != b"form-data" or b"name" not in params:
                raise MalformedForm(f"a part's Content-Disposition is not form-data with a name: {value[:80]!r}")
            filename = params.get(b"filename")
            return _text(params[b"name"]), None if filename is None else _text(filename)
    raise MalformedForm("a part has no Content-Disposition header")


def _text(value: bytes) -> str:
    return value.decode("utf-8", errors="replace")
