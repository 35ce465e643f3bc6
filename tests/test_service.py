"""Against a real `bentoml serve` on loopback: real Fashion-MNIST images in, the dataset's labels out."""

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import bentoml_serve, png_bytes

N_IMAGES = 300


def classify(url: str, **kwargs) -> httpx.Response:
    return httpx.post(f"{url}/classify", timeout=60, **kwargs)


def test_classifies_real_test_images_by_the_datasets_labels(server, fashion_test):
    from training.fashion_mnist_files import FASHION_MNIST_CLASSES

    images, labels = fashion_test

    def post(i: int) -> str:
        if i % 2:  # both ways a client can send an image
            response = classify(server, files={"image": (f"{i}.png", png_bytes(images[i]), "image/png")})
        else:
            response = classify(server, content=png_bytes(images[i]), headers={"Content-Type": "image/png"})
        assert response.status_code == 200, response.text
        return response.json()["label"]

    with ThreadPoolExecutor(16) as pool:
        predicted = list(pool.map(post, range(N_IMAGES)))
    accuracy = sum(p == FASHION_MNIST_CLASSES[y] for p, y in zip(predicted, labels[:N_IMAGES])) / N_IMAGES
    assert accuracy >= 0.85, accuracy


def test_top_k_is_ranked_and_can_be_asked_for(server, fashion_test):
    image = png_bytes(fashion_test[0][0])
    default = classify(server, files={"image": ("a.png", image, "image/png")}).json()
    assert len(default["top_k"]) == 3 and default["top_k"][0]["label"] == default["label"]
    five = classify(server, files={"image": ("a.png", image, "image/png")}, data={"top_k": "5"}).json()
    probabilities = [entry["probability"] for entry in five["top_k"]]
    assert len(probabilities) == 5 and probabilities == sorted(probabilities, reverse=True)
    assert 0 < sum(probabilities) <= 1.0001
    assert (
        len(
            classify(server, content=image, headers={"Content-Type": "image/png"}, params={"top_k": 10}).json()["top_k"]
        )
        == 10
    )


# A batch waits (up to SERVING_BATCH_WAIT_MS: a minute, never reached) until SERVING_MAX_BATCH_SIZE
# inputs are queued, so concurrent requests make full batches on any machine, however fast or slow.
BATCHING = {"SERVING_MAX_BATCH_SIZE": "8", "SERVING_BATCH_WAIT_MS": "60000", "SERVING_LOG_REQUESTS": "false"}


@pytest.fixture(scope="module")
def batching(bentoml_home, tmp_path_factory) -> str:
    with bentoml_serve(bentoml_home, tmp_path_factory.mktemp("batching") / "serve.log", BATCHING) as url:
        yield url


def batch_sizes(url: str) -> tuple[float, float]:
    """(batches run, inputs in them) so far, over every model."""
    count = total = 0.0
    for line in httpx.get(f"{url}/metrics", timeout=60).text.splitlines():
        if line.startswith("classify_batch_size_count"):
            count += float(line.rsplit(" ", 1)[1])
        elif line.startswith("classify_batch_size_sum"):
            total += float(line.rsplit(" ", 1)[1])
    return count, total


@pytest.mark.processes
def test_concurrent_requests_are_batched(batching, fashion_test):
    image = png_bytes(fashion_test[0][0])
    before = batch_sizes(batching)
    with ThreadPoolExecutor(32) as pool:
        codes = list(
            pool.map(
                lambda _: classify(batching, content=image, headers={"Content-Type": "image/png"}).status_code,
                range(32),
            )
        )
    after = batch_sizes(batching)
    assert codes == [200] * 32
    assert (after[0] - before[0], after[1] - before[1]) == (4, 32)  # this test's requests: 4 batches of 8


TRUNCATED = png_bytes(__import__("numpy").full((28, 28), 7, "uint8"))[:50]


@pytest.mark.parametrize(
    "kwargs, status, message",
    [
        ({"content": b"", "headers": {"Content-Type": "image/png"}}, 400, "empty"),
        ({"content": b"definitely not a png", "headers": {"Content-Type": "image/png"}}, 400, "not a supported image"),
        ({"files": {"image": ("x.png", TRUNCATED, "image/png")}}, 400, "corrupt or truncated PNG"),
        ({"files": {"picture": ("x.png", TRUNCATED, "image/png")}}, 400, "missing field 'image'"),
        (
            {"data": {"image": "http://127.0.0.1:9/x.png"}, "files": {"other": ("o", b"o")}},
            400,
            "must be a file upload",
        ),
        (
            {"content": b"%PDF-1.4\n", "headers": {"Content-Type": "application/pdf"}},
            415,
            "unsupported content type 'application/pdf'",
        ),
        (
            {"content": b'{"image": "x"}', "headers": {"Content-Type": "application/json"}},
            415,
            "unsupported content type",
        ),
        (
            {"content": b"GIF89a" + b"\0" * 30, "headers": {"Content-Type": "image/gif"}},
            400,
            "corrupt or truncated GIF",
        ),
        ({"content": b"\0" * (11 * 1024 * 1024), "headers": {"Content-Type": "image/png"}}, 413, "exceeds the limit"),
    ],
)
def test_bad_input_gets_a_json_4xx_naming_the_problem(server, kwargs, status, message):
    response = classify(server, **kwargs)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]


@pytest.mark.parametrize("top_k", ["0", "11", "three"])
def test_bad_top_k_is_a_400(server, fashion_test, top_k):
    response = classify(
        server, files={"image": ("a.png", png_bytes(fashion_test[0][0]), "image/png")}, data={"top_k": top_k}
    )
    assert response.status_code == 400 and "top_k must be" in response.json()["error"]


def test_server_keeps_serving_after_bad_input(server, fashion_test):
    classify(server, content=b"junk", headers={"Content-Type": "image/jpeg"})
    response = classify(server, files={"image": ("a.png", png_bytes(fashion_test[0][0]), "image/png")})
    assert response.status_code == 200 and response.json()["label"]
