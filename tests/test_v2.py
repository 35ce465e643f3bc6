"""The Open Inference Protocol (KServe v2) in process, through the edge and the real shipped graph:
every route, both inputs, both encodings, the classification extension, and each client mistake.
Requests are built by tritonclient's own encoder, so the bytes on the wire are what its users send;
tests/test_v2_server.py drives a real `bentoml serve` with the client itself."""

from __future__ import annotations

import asyncio
import base64
import json
import logging

import numpy as np
import pytest
import tritonclient.http as triton

from serving import v2
from tests.conftest import png_bytes
from tests.test_edge import TOKEN, client, make_edge, sample
from tests.tolerance import PROB_ATOL, assert_ranked_as

INFER = "/v2/models/fashion-lenet/infer"


@pytest.fixture(scope="module")
def edge():
    edge, handlers, _ = make_edge(max_batch_images=8)
    handlers.models.warm_up()
    return edge, handlers


def run(edge, *calls):
    """Send each (method, path, kwargs) through the edge in one event loop; the responses in order."""

    async def main():
        async with client(edge) as http:
            return [await http.request(method, path, **kwargs) for method, path, kwargs in calls]

    return asyncio.run(main())


def encoded(inputs, outputs=None, **options) -> dict:
    """httpx kwargs for a request exactly as tritonclient.http encodes it."""
    body, header_length = triton.InferenceServerClient.generate_request_body(inputs, outputs=outputs, **options)
    headers = {"Inference-Header-Content-Length": str(header_length)} if header_length is not None else {}
    return {"content": body, "headers": headers}


def decoded(response):
    length = response.headers.get("inference-header-content-length")
    return triton.InferenceServerClient.parse_response_body(
        response.content, header_length=int(length) if length else None
    )


def pixels_input(pixels: np.ndarray, binary: bool = True):
    tensor = triton.InferInput(v2.PIXELS, list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels, binary_data=binary)
    return tensor


def images_input(images: list[bytes]):
    tensor = triton.InferInput(v2.IMAGE, [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_))
    return tensor


def test_a_bug_on_a_v2_get_route_is_a_500_with_an_id_counted_and_logged(edge, monkeypatch):
    """The GET routes answer through the same boundary as every other path: a bug of ours is a
    JSON 500 with the id of its logged traceback and a count under reason "internal", never an
    exception raised out of the app."""
    from serving import logs

    edge, handlers = edge

    def broken(route):
        raise KeyError("a card field")

    monkeypatch.setattr(handlers, "v2_info", broken)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logs.logger.addHandler(handler)
    before = sample("classify_rejected_total", reason="internal")
    try:
        (response,) = run(edge, ("GET", "/v2/models/fashion-lenet", {}))
    finally:
        logs.logger.removeHandler(handler)
    body = response.json()
    assert response.status_code == 500 and body["error"] == "internal error" and len(body["id"]) == 16
    logged = [r.msg for r in records if r.msg["event"] == "internal_error"]
    assert logged and logged[0]["id"] == body["id"] and "KeyError: 'a card field'" in logged[0]["traceback"]
    assert sample("classify_rejected_total", reason="internal") == before + 1


def test_server_and_model_metadata_describe_the_input_a_client_sends(edge):
    edge, handlers = edge
    card = handlers.models.default.engine.card
    server, live, ready, metadata, versioned, config, model_ready = run(
        edge,
        ("GET", "/v2", {}),
        ("GET", "/v2/health/live", {}),
        ("GET", "/v2/health/ready", {}),
        ("GET", "/v2/models/fashion-lenet", {}),
        ("GET", "/v2/models/fashion-lenet/versions/shipped", {}),
        ("GET", "/v2/models/fashion-lenet/config", {}),
        ("GET", "/v2/models/fashion-lenet/versions/shipped/ready", {}),
    )
    assert server.json()["name"] == "classic-cnns"
    assert {"classification", "binary_tensor_data"} <= set(server.json()["extensions"])
    assert "model_repository" not in server.json()["extensions"]  # model control is off by default
    assert live.status_code == ready.status_code == model_ready.status_code == 200
    assert (
        metadata.json()
        == versioned.json()
        == {
            "name": "fashion-lenet",
            "versions": ["shipped"],
            "platform": "onnxruntime_onnx",
            "inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [-1, 1, 28, 28]}],
            "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}],
        }
    )
    # What Triton's image client reads: one NCHW input, the batch bound, the output width.
    config = config.json()
    assert config["max_batch_size"] == 8 and config["input"][0]["format"] == "FORMAT_NCHW"
    assert config["input"][0]["dims"] == [1, 28, 28] and config["output"][0]["dims"] == [10]
    assert json.loads(config["parameters"]["class_names"]["string_value"]) == list(card.class_names)


def test_pixels_binary_or_json_answer_the_engines_probabilities(edge, fashion_test):
    edge, handlers = edge
    pixels = np.ascontiguousarray(fashion_test[0][:5, None])
    expected = handlers.models.default.engine.predict(pixels)
    binary, as_json, json_out = run(
        edge,
        ("POST", INFER, encoded([pixels_input(pixels)])),
        (
            "POST",
            INFER,
            encoded(
                [pixels_input(pixels, binary=False)], [triton.InferRequestedOutput(v2.PROBABILITIES, binary_data=False)]
            ),
        ),
        (
            "POST",
            INFER,
            {
                "json": {
                    "inputs": [
                        {"name": "pixels", "datatype": "UINT8", "shape": [5, 1, 28, 28], "data": pixels.tolist()}
                    ]
                }
            },
        ),
    )
    assert binary.headers["content-type"] == "application/octet-stream"
    # the batcher may have run these five in other batches than predict did: float32 outputs, not bits
    np.testing.assert_allclose(decoded(binary).as_numpy(v2.PROBABILITIES).reshape(5, 10), expected, atol=PROB_ATOL)
    for response in (as_json, json_out):  # flat data from tritonclient, nested lists by hand
        assert response.headers["content-type"] == "application/json"
        answer = response.json()
        assert answer["model_name"] == "fashion-lenet" and answer["model_version"] == "shipped"
        assert answer["outputs"][0]["shape"] == [5, 10]
        np.testing.assert_allclose(np.array(answer["outputs"][0]["data"]).reshape(5, 10), expected, atol=PROB_ATOL)


def test_encoded_images_and_the_classification_extension_answer_as_classify_does(edge, fashion_test):
    edge, _ = edge
    images = [png_bytes(image) for image in fashion_test[0][:4]]
    top3 = triton.InferRequestedOutput(v2.PROBABILITIES, binary_data=True, class_count=3)
    as_json = {"name": "probabilities", "parameters": {"classification": 3}}
    base64_body = {
        "id": "request-7",
        "inputs": [
            {
                "name": "image",
                "datatype": "BYTES",
                "shape": [4],
                "parameters": {"content_type": "base64"},
                "data": [base64.b64encode(image).decode() for image in images],
            }
        ],
        "outputs": [as_json],
    }
    calls = [("POST", INFER, encoded([images_input(images)], [top3]))]
    calls += [("POST", INFER, {"json": base64_body})]
    calls += [
        ("POST", "/classify", {"files": {"image": ("x.png", image)}, "data": {"top_k": "10"}}) for image in images
    ]
    binary, from_base64, *classified = run(edge, *calls)
    strings = decoded(binary).as_numpy(v2.PROBABILITIES)
    assert strings.shape == (4, 3) and from_base64.json()["id"] == "request-7"
    assert from_base64.json()["outputs"][0]["data"] == [s.decode() for s in strings.ravel()]
    for row, answer in zip(strings, classified):  # Triton's "score:index:label", ranked as /classify ranks
        assert_ranked_as(list(row), answer.json()["top_k"])


def test_a_version_in_the_path_must_be_the_one_served(edge, fashion_test):
    edge, _ = edge
    pixels = np.ascontiguousarray(fashion_test[0][:1, None])
    right, wrong, unknown = run(
        edge,
        ("POST", "/v2/models/fashion-lenet/versions/shipped/infer", encoded([pixels_input(pixels)])),
        ("POST", "/v2/models/fashion-lenet/versions/0123/infer", encoded([pixels_input(pixels)])),
        ("GET", "/v2/models/no-such-model/ready", {}),
    )
    assert right.status_code == 200
    assert wrong.status_code == 404 and "unknown model 'fashion-lenet:0123'" in wrong.json()["error"]
    assert unknown.status_code == 404 and "fashion-lenet:shipped" in unknown.json()["error"]


def _pixels(shape, datatype="UINT8", **extra) -> dict:
    return {"json": {"inputs": [{"name": "pixels", "datatype": datatype, "shape": shape, **extra}]}}


_HEADER = b'{"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 1, 28, 28], "parameters": {"binary_data_size": 784}}]}'
BINARY = {"content": _HEADER + bytes(700), "headers": {"Inference-Header-Content-Length": str(len(_HEADER))}}


@pytest.mark.parametrize(
    "method, path, kwargs, status, message",
    [
        ("POST", INFER, _pixels([1, 1, 28, 28], "FP32", data=[0] * 784), 400, "must be UINT8 [N, 1, 28, 28] for this model, got FP32"),
        ("POST", INFER, _pixels([1, 3, 28, 28], data=[0] * 2352), 400, "got UINT8 [1, 3, 28, 28]"),
        ("POST", INFER, _pixels([9, 1, 28, 28], data=[0] * 9 * 784), 400, "a request carries 1 to 8 images (SERVING_MAX_BATCH_IMAGES), got 9"),
        ("POST", INFER, _pixels([1, 1, 28, 28], data=[0] * 783), 400, "must hold 784 integers for shape [1, 1, 28, 28], got 783"),
        ("POST", INFER, _pixels([1, 1, 28, 28], data=[256] * 784), 400, "UINT8 values are 0 to 255, got 256 to 256"),
        ("POST", INFER, _pixels([1, 1, 28, 28], data=[0.5] * 784), 400, "of type float64"),
        ("POST", INFER, _pixels([1, 1, 28, 28]), 400, "has neither 'data' nor 'binary_data_size'"),
        ("POST", INFER, _pixels([1, -1, 28, 28], data=[]), 400, "'shape' must be a list of non-negative integers"),
        ("POST", INFER, {"json": {"inputs": [{"name": "input__0", "datatype": "UINT8", "shape": [1], "data": [0]}]}}, 400, "unknown input 'input__0'; send 'pixels'"),
        ("POST", INFER, {"json": {"inputs": []}}, 400, "'inputs' must be a list of one tensor"),
        ("POST", INFER, {"content": b"{not json"}, 400, "the request is not valid JSON"),
        ("POST", INFER, {"json": [1, 2]}, 400, "must be a JSON object with 'inputs', got list"),
        ("POST", INFER, BINARY, 400, "binary_data_size is 784 but 700 bytes follow the JSON header"),
        ("POST", INFER, {**BINARY, "headers": {"Inference-Header-Content-Length": "99999"}}, 400, "Inference-Header-Content-Length must be the JSON header's size"),
        ("POST", INFER, {"content": b"{}", "headers": {"Content-Encoding": "gzip"}}, 415, "compressed request bodies are not accepted"),
        ("POST", INFER, {"json": {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["iVBORw0K"]}]}}, 400, "must be base64 strings with parameters"),
        ("POST", INFER, {"json": {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["@@"], "parameters": {"content_type": "base64"}}]}}, 400, "not valid base64"),
        ("POST", INFER, {"json": {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "data": ["aGk="], "parameters": {"content_type": "base64"}}]}}, 400, "has shape [2] but carries 1 images"),
        ("POST", INFER, {"json": {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["aGk="], "parameters": {"content_type": "base64"}}]}}, 400, "image 0: "),
        ("POST", INFER, {"json": {**_pixels([1, 1, 28, 28], data=[0] * 784)["json"], "outputs": [{"name": "logits"}]}}, 400, "unknown output 'logits'"),
        ("POST", INFER, {"json": {**_pixels([1, 1, 28, 28], data=[0] * 784)["json"], "outputs": [{"name": "probabilities", "parameters": {"classification": 11}}]}}, 400, "classification must be an integer from 1 to 10, got 11"),
        ("POST", "/v2/models/nope/infer", _pixels([1, 1, 28, 28], data=[0] * 784), 404, "unknown model 'nope'"),
        ("GET", INFER, {}, 405, "takes POST, not GET"),
        ("POST", "/v2/models/fashion-lenet", {}, 405, "takes GET, not POST"),
        ("GET", "/v2/models/fashion-lenet/labels", {}, 404, "no such path; the v2 routes are"),
        ("POST", "/v2/repository/index", {}, 403, "model control is off; start the service with SERVING_MODEL_CONTROL=true"),
    ],
)  # fmt: skip
def test_each_client_mistake_is_a_4xx_naming_it(edge, method, path, kwargs, status, message):
    edge, _ = edge
    (response,) = run(edge, (method, path, kwargs))
    assert response.status_code == status and message in response.json()["error"], response.text


def test_infer_requests_meet_the_same_limits_auth_and_metrics_as_classify(fashion_test):
    edge, handlers, fallback = make_edge(auth_token=TOKEN, max_body_bytes=1000, max_body_memory_mb=1)
    handlers.models.warm_up()
    pixels = np.ascontiguousarray(fashion_test[0][:1, None])
    auth = {"Authorization": f"Bearer {TOKEN}"}
    before = sample("classify_requests_total", route="/v2/models/{model}/infer", status="200")
    large = encoded([pixels_input(np.ascontiguousarray(fashion_test[0][:2, None]))])
    probe, refused, metadata, answered, too_large = run(
        edge,
        ("GET", "/v2/health/ready", {}),  # a probe: open
        ("POST", INFER, encoded([pixels_input(pixels)])),
        ("GET", "/v2/models/fashion-lenet", {}),
        (
            "POST",
            INFER,
            {**encoded([pixels_input(pixels)]), "headers": {**encoded([pixels_input(pixels)])["headers"], **auth}},
        ),
        ("POST", INFER, {**large, "headers": {**large["headers"], **auth}}),
    )
    assert probe.status_code == 200 and refused.status_code == 401 and metadata.status_code == 401
    assert answered.status_code == 200 and too_large.status_code == 413
    # Labelled by the route's template, never by the model name the client put in the path.
    assert sample("classify_requests_total", route="/v2/models/{model}/infer", status="200") == before + 1
    assert fallback.paths == []  # all answered by the edge


def test_unloading_the_default_model_is_refused(edge):
    _, handlers = edge
    with pytest.raises(ValueError, match="fashion-lenet is the default model and cannot be unloaded"):
        handlers.models.unload("fashion-lenet")


def test_bytes_tensors_round_trip_and_truncated_ones_are_refused():
    items = [b"", b"a", bytes(range(256)) * 3]
    assert v2.deserialize_bytes(v2.serialize_bytes(items)) == items
    with pytest.raises(ValueError, match="ends inside an element"):
        v2.deserialize_bytes(v2.serialize_bytes(items)[:-1])


def test_a_load_of_a_tag_longer_than_any_is_refused_without_echoing_it():
    edge, _, _ = make_edge(model_control=True)
    (response,) = run(edge, ("POST", f"/v2/repository/models/{'a' * 5000}/load", {}))
    error = response.json()["error"]
    assert response.status_code == 400 and "is longer than 127 characters" in error and len(error) < 300


def test_a_repository_request_larger_than_a_json_part_may_be_is_refused():
    edge, _, _ = make_edge(model_control=True)
    body = b'{"parameters": {"x": "' + b"a" * (v2.MAX_JSON_BYTES + 1) + b'"}}'
    (response,) = run(edge, ("POST", "/v2/repository/index", {"content": body}))
    assert response.status_code == 400 and "a repository request is a small JSON object" in response.json()["error"]
