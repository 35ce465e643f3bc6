"""The rest of the API against the real `bentoml serve`: several models, /classify_batch, /models,
image modes, metrics and structured logs."""

import io
import itertools
import json

import httpx
import numpy as np
import pytest
from PIL import Image

from benchmarks.images import fashion_photos
from tests.conftest import png_bytes, wait_until
from tests.tolerance import PROB_ATOL, clear_top1, unsure_clear


def post(url: str, path: str, **kwargs) -> httpx.Response:
    return httpx.post(f"{url}{path}", timeout=60, **kwargs)


def encoded(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def test_models_lists_every_served_model_with_its_card(server):
    listing = httpx.get(f"{server}/models", timeout=60).json()
    names = [m["name"] for m in listing["models"]]
    assert names == ["fashion-lenet", "test-lenet"]
    default = listing["models"][0]
    assert default["default"] and not listing["models"][1]["default"] and listing["default"] == default["tag"]
    card = default["card"]
    assert card["class_names"][9] == "Ankle boot" and (card["in_channels"], card["height"], card["width"]) == (
        1,
        28,
        28,
    )
    assert card["metrics"]["test_acc"] > 0.9 and card["export"]["opset"] == 18
    assert default["provider"] == "CPUExecutionProvider" and default["provider_error"] is None
    assert default["precision"] == "float32"
    assert listing["review"] is False  # no capture: /review is off, and says how to turn it on
    off = httpx.get(f"{server}/review/fashion-lenet", timeout=60)
    assert off.status_code == 404 and "capture is off: start the service with SERVING_CAPTURE" in off.json()["error"]


def test_a_request_picks_its_model_and_gets_that_models_answer(server, fashion_test, exported):
    from model_store.engine import OnnxClassifier

    images = fashion_test[0][:8]
    expected = OnnxClassifier(exported, device="cpu").predict(images[:, None])
    for image, probabilities, clear in zip(images, expected, clear_top1(expected)):
        answer = post(
            server, "/classify", files={"image": ("x.png", png_bytes(image), "image/png")}, data={"model": "test-lenet"}
        ).json()
        assert answer["model"] == "test-lenet"
        assert answer["index"] == int(probabilities.argmax()) or not clear
        assert answer["probability"] == pytest.approx(float(probabilities.max()), abs=PROB_ATOL)
    by_query = post(
        server,
        "/classify",
        content=png_bytes(images[0]),
        headers={"Content-Type": "image/png"},
        params={"model": "test-lenet"},
    )
    assert by_query.json()["model"] == "test-lenet"
    default = post(server, "/classify", files={"image": ("x.png", png_bytes(images[0]), "image/png")}).json()
    assert default["model"] == "fashion-lenet" and len(default["version"]) == 16


def test_an_unknown_model_is_a_404_naming_the_choices(server, fashion_test):
    response = post(
        server,
        "/classify",
        files={"image": ("x.png", png_bytes(fashion_test[0][0]), "image/png")},
        data={"model": "resnet"},
    )
    assert response.status_code == 404
    assert "unknown model 'resnet'" in response.json()["error"] and "test-lenet:" in response.json()["error"]


def test_classify_batch_answers_in_order_and_fails_images_one_by_one(server, fashion_test):
    images = fashion_test[0][:6]
    files = [("images", (f"{i}.png", png_bytes(image), "image/png")) for i, image in enumerate(images)]
    files.insert(3, ("images", ("junk.png", b"not an image", "image/png")))
    answer = post(server, "/classify_batch", files=files, data={"top_k": "2"}).json()
    results = answer["results"]
    assert [r["filename"] for r in results] == ["0.png", "1.png", "2.png", "junk.png", "3.png", "4.png", "5.png"]
    assert "not a supported image" in results[3]["error"]
    singles = [
        post(server, "/classify", files={"image": ("x.png", png_bytes(image), "image/png")}).json() for image in images
    ]
    good = results[:3] + results[4:]
    # one at a time against six in a batch: the same label wherever the top two are not a tie
    clear = clear_top1([[r["probability"] for r in s["top_k"]] for s in singles])
    assert [r["label"] for r in itertools.compress(good, clear)] == [
        s["label"] for s in itertools.compress(singles, clear)
    ]
    assert all(len(r["top_k"]) == 2 for r in good) and answer["model"] == "fashion-lenet"


def test_answers_say_whether_the_model_is_unsure(server, fashion_test, exported):
    from model_store.engine import OnnxClassifier, unsure
    from model_store.store import DEFAULT_MODEL_FILE

    classifier = OnnxClassifier(exported, device="cpu")
    noise = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    images = [*fashion_test[0][:4], noise]
    outcomes = classifier.outcomes(np.stack(images)[:, None])
    expected = [unsure(row, classifier.card.calibration) for row in outcomes.rows()]
    # the server runs these one by one and in another batch: compare where the decision is no tie
    clear = unsure_clear(outcomes, classifier.card.calibration)
    files = [("images", (f"{i}.png", png_bytes(image), "image/png")) for i, image in enumerate(images)]
    batch = post(server, "/classify_batch", files=files, data={"model": "test-lenet"}).json()["results"]
    for want, item, image in itertools.compress(zip(expected, batch, images), clear):
        single = post(
            server, "/classify", files={"image": ("x.png", png_bytes(image), "image/png")}, data={"model": "test-lenet"}
        ).json()
        assert isinstance(want["unsure"], bool) and "label" in single and "top_k" in item
        assert {k: single[k] for k in want} == want == {k: item[k] for k in want}
    # The shipped model is calibrated too (an uncalibrated one's null: tests/test_calibration.py).
    shipped = OnnxClassifier(DEFAULT_MODEL_FILE, device="cpu")
    outcomes = shipped.outcomes(np.stack(images)[:, None])
    want = [unsure(row, shipped.card.calibration) for row in outcomes.rows()]
    assert all(isinstance(w["unsure"], bool) for w in want)
    for want_one, image in itertools.compress(zip(want, images), unsure_clear(outcomes, shipped.card.calibration)):
        default = post(server, "/classify", files={"image": ("x.png", png_bytes(image), "image/png")}).json()
        assert default["model"] == "fashion-lenet" and {k: default[k] for k in want_one} == want_one


@pytest.mark.parametrize(
    "kwargs, status, message",
    [
        ({"content": b"\x89PNG", "headers": {"Content-Type": "image/png"}}, 415, "one file per 'images' field"),
        ({"files": {"image": ("x.png", b"x", "image/png")}}, 400, "missing field 'images'"),
        (
            {"files": [("images", ("x.png", b"x", "image/png"))], "data": {"top_k": "99"}},
            400,
            "top_k must be from 1 to 10",
        ),
    ],
)
def test_classify_batch_refuses_malformed_requests(server, kwargs, status, message):
    response = post(server, "/classify_batch", **kwargs)
    assert response.status_code == status and message in response.json()["error"]


def modes() -> dict[str, bytes]:
    """One Fashion-MNIST-like picture (a bright square on black) in each mode a client might send."""
    grey = np.zeros((28, 28), np.uint8)
    grey[6:22, 6:22] = 200
    base = Image.fromarray(grey)
    rgba = base.convert("RGBA")
    rgba.putalpha(255)
    return {
        "L": encoded(base),
        "16-bit": encoded(Image.fromarray(grey.astype(np.uint16) * 257)),
        "RGBA": encoded(rgba),
        "palette": encoded(base.convert("P")),
        "CMYK": encoded(base.convert("CMYK"), "JPEG", quality=100),
        "1-bit": encoded(base.convert("1")),
    }


def test_every_image_mode_is_converted_the_way_training_saw_it(server):
    answers = {
        name: post(server, "/classify", content=data, headers={"Content-Type": "image/png"}).json()
        for name, data in modes().items()
    }
    assert all("label" in a for a in answers.values()), answers
    reference = answers["L"]["top_k"]
    for name in ("16-bit", "RGBA", "palette"):  # lossless encodings of the same pixels: the same answer
        assert answers[name]["top_k"] == reference, name


@pytest.mark.parametrize(
    "data, message",
    [
        (
            encoded(Image.new("L", (28, 28)), "GIF", save_all=True, append_images=[Image.new("L", (28, 28), 255)]),
            "animated GIF with 2 frames",
        ),
        (encoded(Image.fromarray(np.ones((28, 28), np.float32)), "TIFF"), "unsupported image mode 'F'"),
    ],
)
def test_images_that_cannot_be_converted_get_a_400_saying_why(server, data, message):
    response = post(server, "/classify", content=data, headers={"Content-Type": "application/octet-stream"})
    assert response.status_code == 400 and message in response.json()["error"]


def metric(url: str, name: str, **labels) -> float:
    """Sum of a Prometheus sample over the lines matching ``name`` and ``labels``."""
    total = 0.0
    for line in httpx.get(f"{url}/metrics", timeout=60).text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_report_queue_decode_inference_and_rejections(server, fashion_test):
    """What this test's two requests add, alone on the server: tests run one at a time."""
    counts = {
        "rejected": ("classify_rejected_total", {"reason": "bad_image"}),
        "decoded": ("classify_decode_seconds_count", {}),
        **{
            name: (f"classify_{name}_count", {"model": "fashion-lenet"})
            for name in ("queue_seconds", "inference_seconds", "batch_size")
        },
    }
    before = {key: metric(server, name, **labels) for key, (name, labels) in counts.items()}
    post(server, "/classify", content=b"junk", headers={"Content-Type": "image/png"})
    post(server, "/classify", files={"image": ("x.png", png_bytes(fashion_test[0][0]), "image/png")})
    added = {key: metric(server, name, **labels) - before[key] for key, (name, labels) in counts.items()}
    # The junk is refused before decoding; the image is decoded once, queued, and run as one batch.
    assert added == {"rejected": 1, "decoded": 1, "queue_seconds": 1, "inference_seconds": 1, "batch_size": 1}
    assert "classify_in_flight" in httpx.get(f"{server}/metrics", timeout=60).text


@pytest.mark.processes
def test_logs_are_json_lines_with_model_version_and_provider(server, server_log, fashion_test):
    def events() -> list[dict]:
        return [json.loads(line) for line in server_log.read_text().splitlines() if line.startswith("{")]

    seen = len(events())
    image = png_bytes(fashion_test[0][0])
    post(server, "/classify", files={"image": ("x.png", image, "image/png")}, data={"model": "test-lenet"})
    # Request lines are written in batches, at most 0.1 s late (serving.logs.FLUSH_S): wait for it.
    new = wait_until(lambda: [e for e in events()[seen:] if e["event"] == "request"], "the request's log line")
    assert [(e["status"], e["model"].split(":")[0], e["provider"]) for e in new] == [
        (200, "test-lenet", "CPUExecutionProvider")
    ]
    assert new[0]["ts"].endswith("Z") and new[0]["level"] == "info" and new[0]["route"] == "/classify"
    warmed = [e for e in events() if e["event"] == "warmed_up"]
    assert {e["model"].split(":")[0] for e in warmed} == {"fashion-lenet", "test-lenet"}
    assert warmed[0]["batch_sizes"] == [1, 2, 4, 8, 16, 32, 64]


@pytest.fixture(scope="module")
def traced(bentoml_home, served_models, tmp_path_factory) -> str:
    from tests.conftest import bentoml_serve

    log = tmp_path_factory.mktemp("traced") / "serve.log"
    with bentoml_serve(bentoml_home, log, {"SERVING_MODELS": served_models, "SERVING_TRACING": "true"}) as url:
        yield url


def test_with_tracing_on_requests_go_through_bentomls_layer_with_the_same_answers(server, traced, fashion_test):
    image = png_bytes(fashion_test[0][0])
    for path, kwargs in [
        ("/classify", {"files": {"image": ("x.png", image, "image/png")}, "data": {"top_k": "4"}}),
        (
            "/classify_batch",
            {"files": [("images", ("x.png", image, "image/png")), ("images", ("j.png", b"junk", "image/png"))]},
        ),
        ("/classify", {"content": b"junk", "headers": {"Content-Type": "image/png"}}),
        ("/classify", {"content": image, "headers": {"Content-Type": "image/png"}, "params": {"model": "nope"}}),
        ("/explain", {"files": {"image": ("x.png", image, "image/png")}}),  # 422: the served LeNet has no map
    ]:
        lean, through_bentoml = post(server, path, **kwargs), post(traced, path, **kwargs)
        assert (through_bentoml.status_code, through_bentoml.json()) == (lean.status_code, lean.json()), path
        assert "x-bentoml-request-id" in through_bentoml.headers and "x-bentoml-request-id" not in lean.headers


def test_phone_photos_are_answered_as_their_pngs_are(server):
    """The shipped model's card decodes scaled: a 50-megapixel JPEG (over the 40-megapixel limit of a
    full decode) is answered, in a decoder process, as the same garment's PNG is; so are a HEIC and an
    AVIF of it."""
    [png] = fashion_photos(1, (816, 612), "PNG", grain=0)  # framed as the photo is: the same input
    photos = {
        "image/jpeg": fashion_photos(1, (8160, 6120), "JPEG", grain=0)[0],
        "image/heic": encoded(Image.open(io.BytesIO(png)), "HEIF"),
        "image/avif": encoded(Image.open(io.BytesIO(png)), "AVIF"),
    }
    expected = post(server, "/classify", content=png, headers={"content-type": "image/png"}).json()["label"]
    for media_type, data in photos.items():
        answer = post(server, "/classify", content=data, headers={"content-type": media_type})
        assert answer.status_code == 200 and answer.json()["label"] == expected, (media_type, answer.text)
