"""The Open Inference Protocol against a real `bentoml serve`, driven by the unmodified
`tritonclient.http` client; and model control (load, switch, unload) under steady load."""

from __future__ import annotations

import shutil
import threading
import time
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from model_store.store import DEFAULT_MODEL_FILE
from tests.conftest import bentoml_serve, png_bytes, run_cli, wait_until
from tests.tolerance import PROB_ATOL, assert_ranked_as


def triton_client(url: str) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(urlparse(url).netloc, connection_timeout=30, network_timeout=60)


def classify(url: str, image: bytes, **data) -> dict:
    response = httpx.post(f"{url}/classify", files={"image": ("x.png", image, "image/png")}, data=data, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def test_tritonclient_health_and_metadata(server):
    client = triton_client(server)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("fashion-lenet") and client.is_model_ready("test-lenet")
    assert not client.is_model_ready("no-such-model")
    assert "classification" in client.get_server_metadata()["extensions"]
    metadata = client.get_model_metadata("test-lenet")
    assert metadata["inputs"] == [{"name": "pixels", "datatype": "UINT8", "shape": [-1, 1, 28, 28]}]
    assert metadata["platform"] == "onnxruntime_onnx"
    config = client.get_model_config("fashion-lenet")
    assert config["max_batch_size"] == 64 and config["input"][0]["format"] == "FORMAT_NCHW"


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_pixels_answer_as_classify_does(server, fashion_test, binary):
    client = triton_client(server)
    pixels = np.ascontiguousarray(fashion_test[0][:6, None])
    tensor = triton.InferInput("pixels", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels, binary_data=binary)
    outputs = [
        triton.InferRequestedOutput("probabilities", binary_data=binary),
    ]
    probabilities = client.infer("fashion-lenet", [tensor], outputs=outputs).as_numpy("probabilities")
    top = client.infer(
        "fashion-lenet", [tensor], outputs=[triton.InferRequestedOutput("probabilities", class_count=2)]
    ).as_numpy("probabilities")
    assert probabilities.shape == (6, 10) and top.shape == (6, 2)
    for image, row, strings in zip(fashion_test[0][:6], probabilities, top):
        # one image at a time against six in a batch: float32 outputs of two runs, not the same bits
        answer = classify(server, png_bytes(image), top_k="10")
        assert np.allclose(
            row[[r["index"] for r in answer["top_k"]]], [r["probability"] for r in answer["top_k"]], atol=PROB_ATOL
        )
        assert_ranked_as(list(strings), answer["top_k"])


def test_tritonclient_encoded_images_with_a_version_and_class_count(server, fashion_test):
    client = triton_client(server)
    version = client.get_model_metadata("test-lenet")["versions"][0]
    images = [png_bytes(image) for image in fashion_test[0][10:14]]
    tensor = triton.InferInput("image", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_))
    result = client.infer(
        "test-lenet",
        [tensor],
        model_version=version,
        outputs=[triton.InferRequestedOutput("probabilities", class_count=3)],
        request_id="r1",
    )
    assert result.get_response()["model_version"] == version and result.get_response()["id"] == "r1"
    for image, strings in zip(images, result.as_numpy("probabilities")):
        assert_ranked_as(list(strings), classify(server, image, model="test-lenet", top_k="10")["top_k"])


@pytest.mark.parametrize(
    "model, datatype, shape, message",
    [
        ("no-such-model", "UINT8", [1, 1, 28, 28], "unknown model 'no-such-model'"),
        ("fashion-lenet", "FP32", [1, 1, 28, 28], "must be UINT8 [N, 1, 28, 28] for this model, got FP32"),
        ("fashion-lenet", "UINT8", [1, 28, 28, 1], "got UINT8 [1, 28, 28, 1]"),
    ],
)
def test_tritonclient_sees_the_servers_error(server, model, datatype, shape, message):
    client = triton_client(server)
    tensor = triton.InferInput("pixels", shape, datatype)
    tensor.set_data_from_numpy(np.zeros(shape, np.float32 if datatype == "FP32" else np.uint8))
    with pytest.raises(InferenceServerException, match=message.replace("[", r"\[")):
        client.infer(model, [tensor])
    assert client.is_server_ready()  # and it keeps serving


@pytest.mark.processes
def test_models_load_switch_and_unload_under_load_without_a_failed_request(
    bentoml_home, served_models, exported, fashion_test, tmp_path
):
    """Under steady load on the default model: load a new model, load a new version of the
    default (traffic switches), unload another: every request answered 200, and every one sent
    after the switch returned answered by the new version."""
    log = tmp_path / "serve.log"
    settings = {
        "SERVING_MODEL_CONTROL": "true",
        "SERVING_MODELS": served_models,
        "SERVING_LOG_REQUESTS": "false",
    }
    with bentoml_serve(bentoml_home, log, settings) as url:
        home = {"BENTOML_HOME": str(log.parent / "bentoml")}  # the server's own store
        old_version = httpx.get(f"{url}/models", timeout=60).json()["default"].split(":")[1]
        for name in ("extra-lenet", "fashion-lenet"):  # a new model, and a new version of the default
            registered = run_cli("-m", "model_store", "register", str(exported), "--name", name, env=home)
            assert registered.returncode == 0, registered.stderr
        client = triton_client(url)
        index = {(m["name"], m["state"]) for m in client.get_model_repository_index()}
        assert {("extra-lenet", "UNAVAILABLE"), ("test-lenet", "READY")} <= index

        answers, stop = [], threading.Event()
        image = png_bytes(fashion_test[0][0])

        def steady_load():
            with httpx.Client(timeout=60) as http:
                while not stop.is_set():
                    sent = time.monotonic()
                    response = http.post(f"{url}/classify", files={"image": ("x.png", image, "image/png")})
                    answers.append((sent, response.status_code, response.json().get("version")))

        def answered_since(moment: float, count: int = 20):
            """Wait until ``count`` requests sent after ``moment`` are answered: load runs through each step."""
            wait_until(lambda: sum(sent > moment for sent, _, _ in answers) >= count, f"{count} answers")

        workers = [threading.Thread(target=steady_load) for _ in range(3)]
        for worker in workers:
            worker.start()
        try:
            answered_since(0)
            client.load_model("extra-lenet")
            assert client.is_model_ready("extra-lenet")
            loaded = httpx.post(f"{url}/v2/repository/models/fashion-lenet:latest/load", timeout=300)
            assert loaded.status_code == 200, loaded.text
            switched = time.monotonic()
            assert loaded.json()["replaced"] == f"fashion-lenet:{old_version}"
            new_version = loaded.json()["version"]
            answered_since(switched)
            client.unload_model("test-lenet")
            answered_since(time.monotonic())
        finally:
            stop.set()
            for worker in workers:
                worker.join()
        statuses = [status for _, status, _ in answers]
        assert set(statuses) == {200}, sorted(set(statuses))
        assert new_version != old_version and {v for _, _, v in answers} == {old_version, new_version}
        assert all(version == new_version for sent, _, version in answers if sent > switched)

        listing = httpx.get(f"{url}/models", timeout=60).json()
        assert listing["default"] == f"fashion-lenet:{new_version}"
        assert [m["name"] for m in listing["models"]] == ["fashion-lenet", "extra-lenet"]
        assert not client.is_model_ready("test-lenet")
        with pytest.raises(InferenceServerException, match="is not in the BentoML model store"):
            client.load_model("never-registered")
        # A stored file that no longer agrees with its card (changed after registering) is refused, naming why.
        registered = run_cli("-m", "model_store", "register", str(exported), "--name", "tampered", env=home)
        assert registered.returncode == 0, registered.stderr
        (stored,) = (log.parent / "bentoml" / "models" / "tampered").glob("*/model.onnx")
        shutil.copyfile(DEFAULT_MODEL_FILE, stored)
        with pytest.raises(InferenceServerException, match="cannot be served: the card in the model store differs"):
            client.load_model("tampered")
        assert not client.is_model_ready("tampered") and client.is_server_ready()
        with pytest.raises(InferenceServerException, match="is the default model and cannot be unloaded"):
            client.unload_model("fashion-lenet")
