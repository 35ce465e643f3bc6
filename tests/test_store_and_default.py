"""The model store CLI, and the default model this repository ships."""

import json
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort

from model_store.store import DEFAULT_MODEL_FILE, read_onnx_card
from tests.conftest import run_cli
from tests.test_model_checks import RGB, with_card, with_external_data


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


def test_default_model_is_small_and_reaches_its_stated_accuracy(fashion_test):
    """The shipped graph on all 10,000 real test images, through ONNX Runtime as served."""
    assert DEFAULT_MODEL_FILE.stat().st_size < 1024 * 1024
    card = read_onnx_card(DEFAULT_MODEL_FILE)
    ops = Counter(node.op_type for node in onnx.load(str(DEFAULT_MODEL_FILE)).graph.node)
    assert ops["BatchNormalization"] == ops["Dropout"] == 0
    images, labels = fashion_test
    session = ort.InferenceSession(str(DEFAULT_MODEL_FILE), providers=["CPUExecutionProvider"])
    logits = np.concatenate(
        [session.run(None, {"pixels": images[i : i + 1000, None]})[0] for i in range(0, 10000, 1000)]
    )
    accuracy = float((logits.argmax(1) == labels).mean())
    assert accuracy >= 0.90
    assert abs(accuracy - card.metrics["test_acc"]) < 1e-3  # the card states what the graph does
