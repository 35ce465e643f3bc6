"""A graph against its card, at register and at service start: real ONNX files in ONNX Runtime,
made by rewriting the card of a copy of the shipped model (as a hand-edited file or an older
export could hold), and one real `bentoml serve` over a store that holds a bad model."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest

from model_store.card import ONNX_METADATA_KEY
from model_store.store import DEFAULT_MODEL_FILE, DEFAULT_MODEL_NAME, check_model
from serving.config import ServingConfig
from serving.errors import ModelUnavailable, UnknownModel
from serving.model_set import ModelSet
from tests.conftest import bentoml_serve, png_bytes, run_cli

RGB = {"in_channels": 3, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


def with_card(target: Path, **change) -> Path:
    """A copy of the shipped model whose card has ``change`` applied, bypassing export's checks."""
    model = onnx.load(str(DEFAULT_MODEL_FILE))
    entry = next(p for p in model.metadata_props if p.key == ONNX_METADATA_KEY)
    entry.value = json.dumps({**json.loads(entry.value), **change})
    onnx.save(model, str(target))
    return target


def with_external_data(target: Path) -> Path:
    """The shipped model saved with its weights in ``<target>.data`` beside it. The default size
    threshold keeps the small shape constants inline: with size_threshold=0 ONNX Runtime 1.31
    cannot load the graph at all (Reshape's shape would be external), a different failure."""
    model = onnx.load(str(DEFAULT_MODEL_FILE))
    onnx.save_model(model, str(target), save_as_external_data=True, location=f"{target.name}.data")
    return target


def with_fixed_batch(target: Path) -> Path:
    """The shipped model with its batch dimension fixed to 1: it agrees with its card, but cannot batch."""
    model = onnx.load(str(DEFAULT_MODEL_FILE))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(model, str(target))
    return target


@pytest.mark.parametrize(
    "change, messages",
    [
        ({"class_names": list("abcde")}, ["the card has 5 class names", "shape ['batch', 10]"]),
        (RGB, ["the card's input is [N, 3, 28, 28]", "shape ['batch', 1, 28, 28]"]),
        ({"height": 56, "width": 56}, ["the card's input is [N, 1, 56, 56]", "shape ['batch', 1, 28, 28]"]),
        ({"std": [float("nan")]}, ["std must be finite numbers"]),
    ],
)
def test_a_card_that_contradicts_its_graph_is_refused_naming_file_card_and_graph(tmp_path, change, messages):
    path = with_card(tmp_path / "bad.onnx", **change)
    with pytest.raises(ValueError) as refused:
        check_model(path)
    assert str(path) in str(refused.value)
    for message in messages:
        assert message in str(refused.value)


def test_the_shipped_model_passes_and_its_card_comes_back():
    card = check_model(DEFAULT_MODEL_FILE)
    assert card.num_classes == 10 and (card.in_channels, card.height, card.width) == (1, 28, 28)


def test_external_weights_are_refused_even_where_the_data_file_is_in_the_working_directory(tmp_path, monkeypatch):
    """Loaded from bytes, ONNX Runtime looks for external data in the working directory: the check
    must not find the data file there (the store would copy model.onnx alone)."""
    path = with_external_data(tmp_path / "split.onnx")
    assert (tmp_path / "split.onnx.data").is_file()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="keeps its weights in external data files") as refused:
        check_model(path)
    assert f"onnx.save(onnx.load('{path}')" in str(refused.value)


def serve(*files: tuple[str, Path], **settings) -> ModelSet:
    return ModelSet(ServingConfig(device="cpu", **settings), [(name, "v1", path) for name, path in files])


def test_a_bad_model_is_set_aside_with_its_reason_and_the_others_serve(tmp_path):
    bad = with_card(tmp_path / "bad.onnx", class_names=list("abcde"))
    models = serve((DEFAULT_MODEL_NAME, DEFAULT_MODEL_FILE), ("bad", bad))
    models.warm_up()
    assert models.ready and [m.name for m in models.models] == [DEFAULT_MODEL_NAME]
    [failed] = models.describe()["failed"]
    assert failed["tag"] == "bad:v1" and "the card has 5 class names" in failed["error"]
    assert models.get(None).name == DEFAULT_MODEL_NAME
    probabilities = models.get(None).engine.predict(np.zeros((1, 1, 28, 28), np.uint8))
    assert probabilities.shape == (1, 10)
    for requested in ("bad", "bad:v1", "bad:latest"):
        with pytest.raises(ModelUnavailable, match=r"model bad:v1 is not served: .*the card has 5 class names"):
            models.get(requested)


class EventRecorder(logging.Handler):
    """The service's JSON log events (serving.logs.log_event), as the dicts they are made from."""

    def __init__(self):
        super().__init__()
        self.events = []

    def emit(self, record: logging.LogRecord) -> None:
        self.events.append(record.msg)


def test_a_failing_warm_up_sets_the_model_aside_instead_of_ending_the_warm_up(tmp_path):
    fixed = with_fixed_batch(tmp_path / "fixed.onnx")
    check_model(fixed)  # it agrees with its card: only batching shows the problem
    models = serve(("fixed", fixed), (DEFAULT_MODEL_NAME, DEFAULT_MODEL_FILE), max_batch_size=4)
    events, logger = EventRecorder(), logging.getLogger("classic_cnns.serving")
    level = logger.level
    logger.addHandler(events)
    logger.setLevel(logging.INFO)  # whether or not an earlier test configured the service's logging
    try:
        models.warm_up()
    finally:
        logger.removeHandler(events)
        logger.setLevel(level)
    assert models.ready and [m.name for m in models.models] == [DEFAULT_MODEL_NAME]
    warmed = [event["model"] for event in events.events if event["event"] == "warmed_up"]
    assert warmed == [models.models[0].tag]  # the model after the failed one was still warmed up
    [failed] = models.failed
    assert failed.tag == "fixed:v1" and failed.error.startswith("warm-up failed:") and "Expected: 1" in failed.error
    with pytest.raises(ModelUnavailable, match="the default model fixed:v1 is not served: warm-up failed"):
        models.get(None)  # the default failed: requests that name no model say so
    assert models.describe()["default"] == "fixed:v1"


def test_when_every_model_fails_the_set_is_not_ready_but_answers(tmp_path):
    models = serve(("rgb", with_card(tmp_path / "rgb.onnx", **RGB)))
    models.warm_up()
    assert not models.ready and models.models == []
    with pytest.raises(ModelUnavailable, match="no model that passed its checks"):
        models.get(None)


def test_a_name_listed_twice_still_stops_the_service():
    with pytest.raises(ValueError, match="SERVING_MODELS names 'a' twice"):
        serve(("a", DEFAULT_MODEL_FILE), ("a", DEFAULT_MODEL_FILE))


def test_name_latest_is_the_served_version_and_a_long_unknown_name_is_cut_short():
    models = serve((DEFAULT_MODEL_NAME, DEFAULT_MODEL_FILE))
    assert models.get(f"{DEFAULT_MODEL_NAME}:latest") is models.get(f"{DEFAULT_MODEL_NAME}:v1") is models.default
    with pytest.raises(UnknownModel) as unknown:
        models.get("x" * 900_000)
    assert f"unknown model '{'x' * 64}…'" in str(unknown.value) and len(str(unknown.value)) < 200
    with pytest.raises(UnknownModel, match=f"unknown model '{DEFAULT_MODEL_NAME}:v2'"):
        models.get(f"{DEFAULT_MODEL_NAME}:v2")


STORE_AS_AN_OLDER_VERSION_DID = """
import shutil, sys
import bentoml
from model_store.store import MODEL_FILE, read_onnx_card
path, name = sys.argv[1], sys.argv[2]
with bentoml.models.create(bentoml.Tag(name, "old"), metadata=read_onnx_card(path).to_dict()) as model:
    shutil.copyfile(path, model.path_of(MODEL_FILE))
"""


@pytest.mark.processes
def test_a_service_over_a_store_with_a_bad_model_serves_the_others_and_says_why(tmp_path, fashion_test):
    """`register` refuses the bad card now, so put it in the store the way register did before the checks."""
    home = tmp_path / "home"
    env = {"BENTOML_HOME": str(home)}
    assert run_cli("-m", "model_store", "register-default", env=env).returncode == 0
    bad = with_card(tmp_path / "rgb.onnx", **RGB)
    stored = run_cli("-c", STORE_AS_AN_OLDER_VERSION_DID, str(bad), "bad-rgb", env=env)
    assert stored.returncode == 0, stored.stderr
    image = {"image": ("x.png", png_bytes(fashion_test[0][0]), "image/png")}
    settings = {"SERVING_MODELS": f"{DEFAULT_MODEL_NAME}:latest,bad-rgb:latest"}
    with bentoml_serve(home, tmp_path / "serve.log", settings) as url:  # ready: the warm-up survived
        listing = httpx.get(f"{url}/models", timeout=60).json()
        assert [m["name"] for m in listing["models"]] == [DEFAULT_MODEL_NAME]
        [failed] = listing["failed"]
        assert failed["tag"] == "bad-rgb:old" and "the card's input is [N, 3, 28, 28]" in failed["error"]
        answer = httpx.post(f"{url}/classify", files=image, timeout=60)
        assert answer.status_code == 200 and answer.json()["model"] == DEFAULT_MODEL_NAME
        latest = httpx.post(f"{url}/classify", files=image, data={"model": f"{DEFAULT_MODEL_NAME}:latest"}, timeout=60)
        assert latest.status_code == 200 and latest.json()["model"] == DEFAULT_MODEL_NAME
        refused = httpx.post(f"{url}/classify", files=image, data={"model": "bad-rgb"}, timeout=60)
        assert refused.status_code == 503 and "model bad-rgb:old is not served" in refused.json()["error"]
    assert sum('"event": "model_failed"' in line for line in (tmp_path / "serve.log").read_text().splitlines()) == 1
