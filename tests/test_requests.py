"""Reading a classify request in-process: the options as BentoML's HTTP clients encode them
(JSON, in multipart text fields) read the same as plain ones."""

from __future__ import annotations

import json

import httpx
import pytest

from serving.requests import ClassifyRequest, Received, form_value, read_classify_request

IMAGE = b"\x89PNG not decoded here"


def read(data: dict, params: dict | None = None) -> ClassifyRequest:
    built = httpx.Request(
        "POST", "http://x/classify", files={"image": ("a.png", IMAGE, "image/png")}, data=data, params=params
    )
    scope = {
        "query_string": built.url.query,
        "headers": [(name.lower().encode(), value.encode()) for name, value in built.headers.items()],
    }
    return read_classify_request(Received.of(scope, built.read()))


def test_options_json_encoded_by_bentomls_client_read_as_plain_ones():
    # What bentoml.SyncHTTPClient(...).classify(image=..., top_k=5, model="test-lenet") sends.
    by_client = read({"top_k": json.dumps(5), "model": json.dumps("test-lenet")})
    assert (by_client.top_k, by_client.model) == ("5", "test-lenet")
    assert read({"top_k": "5", "model": "test-lenet"}) == by_client
    assert by_client.images[0].data == IMAGE and by_client.images[0].filename == "a.png"


def test_none_from_the_client_is_no_value_and_leaves_the_default():
    parsed = read({"top_k": "null", "model": "null"})
    assert (parsed.top_k, parsed.model) == (None, None)
    assert read({"model": json.dumps("")}).model is None


@pytest.mark.parametrize(
    "sent, read_as",
    [
        ('"caf\\u00e9"', "café"),  # json.dumps escapes non-ASCII
        ("lenet", "lenet"),
        ('"lenet', '"lenet'),  # not JSON: taken as it is, and the error will name it
        ('"a" "b"', '"a" "b"'),
        ('"\\ud800"', '"\\ud800"'),  # a lone surrogate is no text
        ('"', '"'),
        ("7", "7"),
    ],
)
def test_a_text_field_is_unwrapped_only_when_it_is_a_json_string(sent, read_as):
    assert form_value(sent.encode()) == read_as


def test_a_query_parameter_is_never_json_decoded():
    parsed = read({}, params={"model": '"test-lenet"', "top_k": "null"})
    assert (parsed.model, parsed.top_k) == ('"test-lenet"', "null")
