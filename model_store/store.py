"""The BentoML model store: register an exported ONNX graph with its card, list, open.

A stored model is the ONNX file (``model.onnx``) plus the card as the model's metadata, a copy
of the card inside the file. The version is the file's content hash, so registering the same
file twice is a no-op and a tag names exactly one graph. :func:`check_model` is the one test of a
graph against its card, run by register and again by the service for every model it loads.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import bentoml
import numpy as np
from bentoml.exceptions import NotFound

from model_store.card import ONNX_METADATA_KEY, ModelCard
from model_store.files import file_sha256

MODEL_FILE = "model.onnx"
# The models this repository ships (model_store/default/NAME.onnx), served by default, the default
# model first: LeNet answers /classify fastest; ResNet-20, with a global-average-pool head, explains.
SHIPPED_MODELS = ("fashion-lenet", "fashion-resnet20")
DEFAULT_MODEL_NAME, EXPLAINER_MODEL_NAME = SHIPPED_MODELS


def shipped_file(name: str) -> Path:
    """The ONNX file of the shipped model ``name`` (one of SHIPPED_MODELS)."""
    return Path(__file__).parent / "default" / f"{name}.onnx"


DEFAULT_MODEL_FILE, EXPLAINER_MODEL_FILE = shipped_file(DEFAULT_MODEL_NAME), shipped_file(EXPLAINER_MODEL_NAME)
INPUT_TYPES = ("tensor(uint8)", "tensor(float)")  # raw pixels, or pixels the caller normalized with the card


def read_onnx_card(path: Path) -> ModelCard:
    """The card in an ONNX file's metadata_props, read with ONNX Runtime (no onnx or torch needed)."""
    path = Path(path)
    return _card_in(_open_session(path), path)


def check_model(path: Path) -> ModelCard:
    """The card of an exported ONNX file, once ONNX Runtime shows that the graph agrees with it.

    The card's class count must be the graph's output width and its channels, height and width the
    graph's input shape (symbolic dimensions such as the batch pass); the input must be uint8 or
    float; and one image of zeros must give finite scores for every class. A ValueError names the
    file, the card's value and the graph's.
    """
    path = Path(path)
    session = _open_session(path)
    card = _card_in(session, path)
    graph_input, graph_output = session.get_inputs()[0], session.get_outputs()[0]
    expected = (card.in_channels, card.height, card.width)
    if len(graph_input.shape) != 4 or any(
        isinstance(dim, int) and dim != value for dim, value in zip(graph_input.shape[1:], expected)
    ):
        raise ValueError(
            f"{path}: the card's input is [N, {', '.join(map(str, expected))}] (in_channels, height, width) "
            f"but the graph's input {graph_input.name!r} has shape {graph_input.shape}"
        )
    if graph_input.type not in INPUT_TYPES:
        raise ValueError(
            f"{path}: the graph's input {graph_input.name!r} is {graph_input.type}; "
            f"the service feeds one of {', '.join(INPUT_TYPES)}"
        )
    width = graph_output.shape[-1] if graph_output.shape else None
    if len(graph_output.shape) != 2 or (isinstance(width, int) and width != card.num_classes):
        raise ValueError(
            f"{path}: the card has {card.num_classes} class names but the graph's output {graph_output.name!r} "
            f"has shape {graph_output.shape}, expected [N, {card.num_classes}]"
        )
    zeros = np.zeros((1, *expected), np.uint8 if graph_input.type == "tensor(uint8)" else np.float32)
    try:
        scores = session.run([graph_output.name], {graph_input.name: zeros})[0]
    except Exception as err:  # ORT raises its own Fail / InvalidArgument types
        raise ValueError(f"{path}: a test run on zeros of shape {list(zeros.shape)} failed: {_one_line(err)}") from None
    if scores.shape != (1, card.num_classes) or not np.isfinite(scores).all():
        raise ValueError(
            f"{path}: a test run on zeros gave {scores.dtype} scores of shape {list(scores.shape)} "
            f"(finite: {bool(np.isfinite(scores).all())}); the card's {card.num_classes} classes need "
            f"finite scores of shape [1, {card.num_classes}]"
        )
    return card


def _open_session(path: Path):
    """A CPU session over the file's bytes, which can reach no weights outside the file.

    The store copies ``model.onnx`` alone, so a graph that keeps its weights in external data files
    beside it must be refused here. Loaded from bytes, ONNX Runtime (1.31) looks for external data
    in the working directory, where such a file may well be: point it at an empty folder instead.
    """
    import onnxruntime as ort

    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    options = ort.SessionOptions()
    with tempfile.TemporaryDirectory() as empty:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", empty)
        try:
            return ort.InferenceSession(path.read_bytes(), options, providers=["CPUExecutionProvider"])
        except Exception:  # ORT raises its own Fail / InvalidProtobuf types
            pass
    try:
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as err:
        raise ValueError(f"{path} is not a loadable ONNX model: {_one_line(err)}") from None
    raise ValueError(
        f"{path} keeps its weights in external data files beside it, which the model store does not copy; "
        f"save it as a single file first, e.g. `python -c \"import onnx; onnx.save(onnx.load('{path}'), "
        f"'single.onnx')\"` (the onnx package comes with the train extra)"
    )


def _card_in(session, path: Path) -> ModelCard:
    props = session.get_modelmeta().custom_metadata_map
    if ONNX_METADATA_KEY not in props:
        raise ValueError(f"{path} carries no {ONNX_METADATA_KEY!r} metadata; export it with `python -m export`")
    try:
        return ModelCard.from_json(props[ONNX_METADATA_KEY])
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def register(onnx_path: Path, name: str) -> bentoml.Model:
    """Add an exported model to the store as ``name:<content hash>``, once :func:`check_model` passes;
    returns the stored model."""
    card = check_model(onnx_path)
    version = file_sha256(onnx_path)[:16]
    tag = bentoml.Tag(name, version)  # raises ValueError naming the rule for a bad name
    try:
        return bentoml.models.get(tag)
    except NotFound:
        pass
    labels = {"arch": card.arch, "dataset": card.dataset or "unknown"}
    with bentoml.models.create(tag, labels=labels, metadata=card.to_dict()) as model:
        shutil.copyfile(onnx_path, model.path_of(MODEL_FILE))
    return bentoml.models.get(tag)  # the stored copy, not the temp dir it was built in


def register_shipped() -> list[bentoml.Model]:
    """The models this repository ships, so serving works right after install."""
    return [register(shipped_file(name), name) for name in SHIPPED_MODELS]


def open_model(tag: str) -> bentoml.Model:
    """A stored model by tag, or a LookupError that says how to put it there."""
    try:
        return bentoml.models.get(tag)
    except NotFound:
        raise LookupError(
            f"model {tag!r} is not in the BentoML model store under {bentoml_home()}; "
            "register the shipped ones with `python -m model_store register-default` or `python -m model_store register FILE --name NAME`"
        ) from None


def bentoml_home() -> str:
    """Where the store lives ($BENTOML_HOME, default ~/bentoml), for error messages."""
    from bentoml._internal.configuration.containers import BentoMLContainer

    return str(BentoMLContainer.bentoml_home.get())


def card_of(model: bentoml.Model) -> ModelCard:
    return ModelCard.from_dict(model.info.metadata)
