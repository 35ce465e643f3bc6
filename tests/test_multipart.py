"""The in-memory multipart reader: what real clients send parses as Starlette's streaming parser
reads it, and every malformed body is a named RequestError."""

from __future__ import annotations

import asyncio
import random

import httpx
import pytest
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartParser

from serving.errors import RequestError
from serving.multipart import MAX_TEXT_BYTES, MalformedForm, Part, TooManyParts, boundary_of, parse_form


def encoded(files=None, data=None) -> tuple[bytes, str]:
    """A body and Content-Type as httpx (and so tritonclient, requests, curl alike) sends them."""
    request = httpx.Request("POST", "http://x/", files=files, data=data)
    return request.read(), request.headers["content-type"]


def parse(body: bytes, content_type: str, max_parts: int = 16) -> list[Part]:
    return parse_form(body, boundary_of(content_type), max_parts)


def starlette_parts(body: bytes, content_type: str) -> list[Part]:
    async def stream():
        yield body

    async def main():
        form = await MultiPartParser(httpx.Headers({"content-type": content_type}), stream()).parse()
        parts = []
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                parts.append(Part(name, value.filename, await value.read()))
            else:
                parts.append(Part(name, None, value.encode()))
        return parts

    return asyncio.run(main())


def test_random_forms_parse_as_starlettes_parser_reads_them():
    rng = random.Random(0)
    for _ in range(200):
        files = [
            (rng.choice(["image", "images"]), (f"f{i}.png", rng.randbytes(rng.randrange(0, 3000)), "image/png"))
            for i in range(rng.randrange(1, 5))
        ]
        data = {name: str(rng.randrange(100)) for name in rng.sample(["top_k", "model", "note"], rng.randrange(0, 3))}
        body, content_type = encoded(files, data)
        assert parse(body, content_type) == starlette_parts(body, content_type)


def test_quoting_preamble_padding_and_epilogue():
    body = (
        b"a preamble\r\n--b q\r\n"
        b'Content-Disposition: form-data; name="image"; filename="a;b \\"q\\".png"\r\nContent-Type: image/png\r\n\r\n'
        b"\x89PNG\r\n--not the boundary\r\n--b q  \t\r\n"
        b"content-disposition: form-data; name=top_k\r\n\r\n5\r\n--b q--\r\nan epilogue"
    )
    assert parse(body, 'multipart/form-data; boundary="b q"') == [
        Part("image", 'a;b "q".png', b"\x89PNG\r\n--not the boundary"),
        Part("top_k", None, b"5"),
    ]


@pytest.mark.parametrize(
    "content_type, body, message",
    [
        ("multipart/form-data", b"", "needs a boundary of 1 to 70 characters, got 0"),
        ("multipart/form-data; boundary=" + "x" * 71, b"", "got 71"),
        ("multipart/form-data; boundary=b", b"no delimiter here", "no boundary line"),
        ("multipart/form-data; boundary=b", b"--bjunk", "not followed by a line break"),
        (
            "multipart/form-data; boundary=b",
            b"--b\r\n" + b"X-Long: " + b"a" * 9000 + b"\r\n\r\n",
            "do not end within 8,192 bytes",
        ),
        ("multipart/form-data; boundary=b", b"--b\r\nno colon\r\n\r\nx\r\n--b--", "has no colon"),
        ("multipart/form-data; boundary=b", b"--b\r\nX-A: 1\r\n\r\nx\r\n--b--", "no Content-Disposition"),
        (
            "multipart/form-data; boundary=b",
            b"--b\r\nContent-Disposition: attachment\r\n\r\nx\r\n--b--",
            "not form-data with a name",
        ),
        (
            "multipart/form-data; boundary=b",
            b'--b\r\nContent-Disposition: form-data; name="a"\r\n\r\nx',
            "ends inside a part",
        ),
    ],
)
def test_malformed_bodies_are_named(content_type, body, message):
    with pytest.raises(MalformedForm, match=message):
        parse(body, content_type)


def test_part_count_and_text_size_are_bounded():
    body, content_type = encoded([("images", (f"{i}.png", b"x", "image/png")) for i in range(5)])
    assert len(parse(body, content_type, max_parts=5)) == 5
    with pytest.raises(TooManyParts, match="more than 4 parts"):
        parse(body, content_type, max_parts=4)
    body, content_type = encoded(
        [("image", ("a.png", b"x" * 5000, "image/png"))], {"model": "m" * (MAX_TEXT_BYTES + 1)}
    )
    with pytest.raises(RequestError, match=f"field 'model' is longer than {MAX_TEXT_BYTES} bytes"):
        parse(body, content_type)
