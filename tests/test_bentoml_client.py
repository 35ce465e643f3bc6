"""BentoML's own HTTP clients against the real `bentoml serve`: they read /schema.json, upload the
images as multipart files, and get the same answer as a plain multipart POST."""

from __future__ import annotations

import asyncio
import io
import json
from http import HTTPStatus
from pathlib import Path

import bentoml
import httpx
import pytest
from bentoml.exceptions import BentoMLException, InvalidArgument
from PIL import Image

from tests.conftest import bentoml_serve, png_bytes

TOKEN = "client-token"


@pytest.fixture(scope="module")
def client(server):
    with bentoml.SyncHTTPClient(server) as client:
        yield client


@pytest.fixture(scope="module")
def shoes(tmp_path_factory, fashion_test) -> list[Path]:
    """Four real test images as PNG files."""
    folder = tmp_path_factory.mktemp("images")
    paths = [folder / f"test-{i}.png" for i in range(4)]
    for path, image in zip(paths, fashion_test[0]):
        path.write_bytes(png_bytes(image))
    return paths


def plain(url: str, path: Path, route: str = "/classify", **options) -> httpx.Response:
    """The same request as a plain multipart POST, as curl or requests would send it."""
    return httpx.post(
        f"{url}{route}",
        files={"image": (path.name, path.read_bytes(), "image/png")},
        data={name: str(value) for name, value in options.items()},
        timeout=60,
    )


@pytest.mark.parametrize(
    "given",
    [
        pytest.param(lambda path: path, id="path"),
        pytest.param(lambda path: str(path), id="str-path"),
        pytest.param(lambda path: Image.open(path), id="pil-from-file"),
        pytest.param(lambda path: Image.open(io.BytesIO(path.read_bytes())), id="pil-from-bytes"),
    ],
)
def test_classify_takes_an_image_as_a_path_or_a_pil_image(client, server, shoes, given):
    answer = client.classify(image=given(shoes[0]))
    assert answer == plain(server, shoes[0]).json()
    assert answer["model"] == "fashion-lenet" and len(answer["top_k"]) == 3


def test_classify_takes_top_k_and_model(client, server, shoes):
    answer = client.classify(image=shoes[1], top_k=5, model="test-lenet")
    assert answer == plain(server, shoes[1], top_k=5, model="test-lenet").json()
    assert answer["model"] == "test-lenet" and len(answer["top_k"]) == 5
    assert client.classify(image=shoes[1], top_k=None, model=None) == plain(server, shoes[1]).json()


def test_classify_batch_answers_each_image_in_order(client, server, shoes):
    answer = client.classify_batch(images=shoes, top_k=2, model="test-lenet")
    expected = httpx.post(
        f"{server}/classify_batch",
        files=[("images", (path.name, path.read_bytes(), "image/png")) for path in shoes],
        data={"top_k": "2", "model": "test-lenet"},
        timeout=60,
    ).json()
    assert answer == expected
    assert [result["filename"] for result in answer["results"]] == [path.name for path in shoes]


def test_the_async_client_gets_the_same_answer(server, shoes):
    async def main():
        async with bentoml.AsyncHTTPClient(server) as client:
            return await client.classify(image=shoes[2], top_k=4)

    assert asyncio.run(main()) == plain(server, shoes[2], top_k=4).json()


def test_a_bad_image_is_the_clients_invalid_argument_with_our_message(client, server, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    expected = plain(server, bad)
    assert expected.status_code == 400
    with pytest.raises(InvalidArgument) as raised:
        client.classify(image=bad)
    # The client raises with the answer's body as the message: our JSON, whose "error" says what to fix.
    assert raised.value.error_code == HTTPStatus.BAD_REQUEST
    assert json.loads(raised.value.message) == expected.json()


def test_a_url_is_sent_as_text_and_never_fetched(client):
    # BentoML's client sends a URL string as a form field, url-encoded; the service fetches nothing.
    with pytest.raises(BentoMLException) as raised:
        client.classify(image="http://127.0.0.1:9/shoe.png")
    assert raised.value.error_code == HTTPStatus.UNSUPPORTED_MEDIA_TYPE
    assert "application/x-www-form-urlencoded" in raised.value.message


def test_raw_bytes_are_refused_by_the_client_itself(client, shoes):
    """BentoML 1.4.39's client takes a Path, a path string or a PIL image opened from a file or
    buffer, and fails on its own side for bytes or a file object: an ``assert`` in
    ``ClientFileManager.get_file`` (``_bentoml_impl/client/base.py``) that no real file object
    passes. Bytes go as ``Image.open(io.BytesIO(data))``, sent as they are, not re-encoded (above).
    When this test fails, BentoML has learnt bytes: say so in the README."""
    for given in (shoes[0].read_bytes(), io.BytesIO(shoes[0].read_bytes())):
        with pytest.raises(AssertionError):
            client.classify(image=given)


@pytest.fixture(scope="module")
def with_token(bentoml_home, tmp_path_factory) -> str:
    with bentoml_serve(
        bentoml_home, tmp_path_factory.mktemp("token") / "serve.log", {"SERVING_AUTH_TOKEN": TOKEN}
    ) as url:
        yield url


@pytest.mark.processes
def test_with_a_token_set_the_client_passes_it_and_without_cannot_even_read_the_schema(with_token, shoes):
    with bentoml.SyncHTTPClient(with_token, token=TOKEN) as client:
        answer = client.classify(image=shoes[3])
        batch = client.classify_batch(images=shoes[:2])
    auth = {"Authorization": f"Bearer {TOKEN}"}
    files = {"image": (shoes[3].name, shoes[3].read_bytes(), "image/png")}
    assert answer == httpx.post(f"{with_token}/classify", files=files, headers=auth, timeout=60).json()
    assert [result["filename"] for result in batch["results"]] == [shoes[0].name, shoes[1].name]
    with pytest.raises(BentoMLException, match="Failed to fetch schema"):
        bentoml.SyncHTTPClient(with_token)
