"""Limits and auth against a real `bentoml serve` started with strict settings: each set through its
environment variable, as a deployment sets it. How the edge applies them (503 past the concurrency
limit, 408 for a slow body, the error table) is tested in process, in tests/test_edge.py."""

import httpx
import numpy as np
import pytest

from tests.conftest import bentoml_serve, png_bytes, run_cli

pytestmark = pytest.mark.processes

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
STRICT = {
    "SERVING_AUTH_TOKEN": TOKEN,
    "SERVING_MAX_BODY_BYTES": "200000",
    "SERVING_MAX_PIXELS": "10000",
    "SERVING_MAX_BATCH_IMAGES": "3",
}


@pytest.fixture(scope="module")
def strict(bentoml_home, tmp_path_factory) -> str:
    with bentoml_serve(bentoml_home, tmp_path_factory.mktemp("strict") / "serve.log", STRICT) as url:
        yield url


def image(size: int = 28) -> bytes:
    return png_bytes(np.full((size, size), 120, np.uint8))


def classify(url: str, headers: dict | None = None, **kwargs) -> httpx.Response:
    return httpx.post(f"{url}/classify", headers={**AUTH, **(headers or {})}, timeout=30, **kwargs)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}])
def test_without_the_bearer_token_the_api_is_a_401(strict, headers):
    for response in (
        httpx.post(f"{strict}/classify", content=image(), headers={"Content-Type": "image/png", **headers}, timeout=60),
        httpx.get(f"{strict}/models", headers=headers, timeout=60),
        httpx.get(f"{strict}/schema.json", headers=headers, timeout=60),
        httpx.get(
            f"{strict}/no/such/route", headers=headers, timeout=60
        ),  # fails closed: not even a 404 without the token
    ):
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
        assert "bearer token" in response.json()["error"]


def test_with_the_token_it_answers_and_probes_need_none(strict):
    assert classify(strict, content=image(), headers={"Content-Type": "image/png"}).status_code == 200
    assert httpx.get(f"{strict}/models", headers=AUTH, timeout=60).status_code == 200
    for path in ("/readyz", "/livez", "/metrics", "/docs.json", "/"):
        assert httpx.get(f"{strict}{path}", timeout=60).status_code == 200, path


def test_the_limits_are_configurable(strict):
    too_big = classify(strict, content=b"\0" * 300_000, headers={"Content-Type": "image/png"})
    assert too_big.status_code == 413 and "200,000 bytes" in too_big.json()["error"]
    bomb = classify(strict, content=image(200), headers={"Content-Type": "image/png"})  # 40,000 px > 10,000
    assert bomb.status_code == 400 and "200x200 pixels exceeds the limit of 10,000" in bomb.json()["error"]
    for count in (4, 40):
        files = [("images", (f"{i}.png", image(), "image/png")) for i in range(count)]
        many = httpx.post(f"{strict}/classify_batch", files=files, headers=AUTH, timeout=60)
        assert many.status_code == 400 and "too many images: at most 3 per request" in many.json()["error"], count


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"SERVING_MAX_BATCH_SIZE": "lots"}, "error: SERVING_MAX_BATCH_SIZE must be an integer, got 'lots'"),
        (
            {"SERVING_MODEL_CONTROL": "true", "SERVING_WORKERS": "2"},
            "error: SERVING_MODEL_CONTROL needs SERVING_WORKERS=1: a load or unload reaches only one worker",
        ),
        (
            {"SERVING_ROLLOUT_MIN_AGREEMENT": "90"},
            "error: SERVING_ROLLOUT_MIN_AGREEMENT must be a share between 0 and 1, got 90.0",
        ),
    ],
)
def test_a_bad_setting_stops_bentoml_serve_with_one_line_naming_it(bentoml_home, setting, message):
    result = run_cli(
        "-m", "bentoml", "serve", "--port", "1", env={"BENTOML_HOME": str(bentoml_home), **setting}, timeout=120
    )
    assert result.returncode != 0 and (result.stdout + result.stderr).strip() == message
