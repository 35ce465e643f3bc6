"""The model store CLI, and the models this repository ships and serves by default."""

import base64
import io
import json
import os
from collections import Counter

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image

from model_store.card import CAM_ARCHS
from model_store.store import SHIPPED_MODELS, read_onnx_card, shipped_file
from tests.conftest import bentoml_serve, png_bytes, run_cli
from tests.test_model_checks import RGB, with_card, with_external_data

# What the README promises of each shipped model: its test accuracy at least, and its file size at most.
# Each holds its OOD head's bank, 3,000 held-out feature vectors (1.0 MB for the LeNet's 84 features).
PROMISED = {"fashion-lenet": (0.90, 2 * 2**20), "fashion-resnet20": (0.93, 5 * 2**20)}


def test_register_is_idempotent_and_list_and_show_report_the_card(tmp_path, exported):
    env = {"BENTOML_HOME": str(tmp_path)}
    first = run_cli("-m", "model_store", "register", str(exported), "--name", "test-lenet", env=env)
    again = run_cli("-m", "model_store", "register", str(exported), "--name", "test-lenet", env=env)
    assert first.returncode == 0, first.stderr
    assert first.stdout.split()[1] == again.stdout.split()[1]  # same file, same tag
    listing = run_cli("-m", "model_store", "list", env=env).stdout
    assert "test-lenet:" in listing and "lenet_bn" in listing and "1x28x28" in listing
    shown = run_cli("-m", "model_store", "show", "test-lenet", env=env)
    assert json.loads(shown.stdout) == read_onnx_card(exported).to_dict()


def test_register_refuses_files_without_a_card(tmp_path, exported):
    bare = onnx.load(str(exported))
    del bare.metadata_props[:]
    onnx.save(bare, str(tmp_path / "bare.onnx"))
    (tmp_path / "junk.onnx").write_bytes(b"junk")
    env = {"BENTOML_HOME": str(tmp_path / "home")}
    for path, message in [
        ("bare.onnx", "carries no 'model_card' metadata"),
        ("junk.onnx", "not a loadable ONNX model"),
        ("missing.onnx", "does not exist"),
    ]:
        result = run_cli("-m", "model_store", "register", str(tmp_path / path), "--name", "x", env=env)
        assert result.returncode == 2 and message in result.stderr, result.stderr
    bad_name = run_cli("-m", "model_store", "register", str(exported), "--name", "Not A Tag!", env=env)
    assert bad_name.returncode == 2 and "is not a valid BentoML tag" in bad_name.stderr
    missing = run_cli("-m", "model_store", "show", "nothing", env=env)
    assert missing.returncode == 2 and "is not in the BentoML model store" in missing.stderr


def test_register_refuses_a_card_that_contradicts_its_graph_and_external_weights(tmp_path):
    """What the service could not serve never reaches the store; the message names file, card and graph."""
    env = {"BENTOML_HOME": str(tmp_path / "home")}
    cases = [
        (with_card(tmp_path / "five.onnx", class_names=list("abcde")), "the card has 5 class names"),
        (with_card(tmp_path / "rgb.onnx", **RGB), "the card's input is [N, 3, 28, 28]"),
        (
            with_card(tmp_path / "big.onnx", height=56, width=56),
            "graph's input 'pixels' has shape ['batch', 1, 28, 28]",
        ),
        (with_card(tmp_path / "nan.onnx", std=[float("nan")]), "std must be finite numbers"),
        (with_external_data(tmp_path / "split.onnx"), "keeps its weights in external data files"),
    ]
    for path, message in cases:
        result = run_cli("-m", "model_store", "register", str(path), "--name", path.stem, env=env)
        assert result.returncode == 2 and message in result.stderr and str(path) in result.stderr, result.stderr
    assert run_cli("-m", "model_store", "list", env=env).stdout.splitlines()[1:] == []


@pytest.mark.parametrize("name", SHIPPED_MODELS)
def test_each_shipped_model_is_small_calibrated_and_reaches_its_stated_accuracy(name, fashion_test):
    """The shipped graph on all 10,000 real test images, through ONNX Runtime as served."""
    path = shipped_file(name)
    least_accuracy, most_bytes = PROMISED[name]
    assert path.stat().st_size <= most_bytes
    card = read_onnx_card(path)
    ops = Counter(node.op_type for node in onnx.load(str(path)).graph.node)
    assert ops["BatchNormalization"] == ops["Dropout"] == 0
    assert card.calibration is not None and card.metrics["calibration"]["test"]["ece_after"] < 0.02
    images, labels = fashion_test
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    output = session.get_outputs()[0].name  # the logits; a graph exported with --cam has the map second
    logits = np.concatenate(
        [session.run([output], {"pixels": images[i : i + 1000, None]})[0] for i in range(0, 10000, 1000)]
    )
    accuracy = float((logits.argmax(1) == labels).mean())
    assert accuracy >= least_accuracy
    assert abs(accuracy - card.metrics["test_acc"]) < 1e-3  # the card states what the graph does
    # The one that explains carries its map; the default model answers /classify and has none.
    assert bool(card.export.get("cam")) == (card.arch in CAM_ARCHS) == (name != SHIPPED_MODELS[0])


@pytest.mark.processes
def test_with_no_settings_the_service_serves_both_shipped_models_and_explains_with_resnet20(
    bentoml_home, fashion_test, tmp_path
):
    """What `make serve` starts: `bentoml serve` with no SERVING_MODELS, on the store register-default fills."""
    assert "SERVING_MODELS" not in os.environ
    images, _ = fashion_test
    files = {"image": ("boot.png", png_bytes(images[0]), "image/png")}  # test image 0, an ankle boot
    with bentoml_serve(bentoml_home, tmp_path / "serve.log", {}) as url:
        listed = httpx.get(f"{url}/models", timeout=60).json()
        classified = httpx.post(f"{url}/classify", files=files, timeout=60).json()
        explained = httpx.post(f"{url}/explain", files=files, timeout=60)
        refused = httpx.post(f"{url}/explain", files=files, data={"model": SHIPPED_MODELS[0]}, timeout=60)
    assert [m["name"] for m in listed["models"]] == list(SHIPPED_MODELS)
    assert listed["default"].startswith("fashion-lenet:") and classified["model"] == "fashion-lenet"
    assert explained.status_code == 200, explained.text
    body = explained.json()
    assert body["model"] == "fashion-resnet20" and body["label"] == "Ankle boot" and body["unsure"] is False
    overlay = Image.open(io.BytesIO(base64.b64decode(body["cam_png"])))
    assert overlay.format == "PNG" and overlay.size == (28, 28)
    assert refused.status_code == 422 and "fashion-resnet20:" in refused.json()["error"]
