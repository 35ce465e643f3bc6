"""The BentoML model store: register an exported ONNX graph with its card, list, open.

A stored model is the ONNX file (``model.onnx``) plus the card as the model's metadata, a copy
of the card inside the file. The version is the file's content hash, so registering the same
file twice is a no-op and a tag names exactly one graph.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import bentoml
from bentoml.exceptions import NotFound

from model_store.card import ONNX_METADATA_KEY, ModelCard
from model_store.files import file_sha256

MODEL_FILE = "model.onnx"
DEFAULT_MODEL_NAME = "fashion-lenet"
DEFAULT_MODEL_FILE = Path(__file__).parent / "default" / f"{DEFAULT_MODEL_NAME}.onnx"


def read_onnx_card(path: Path) -> ModelCard:
    """The card in an ONNX file's metadata_props, read with ONNX Runtime (no onnx or torch needed)."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as err:  # ORT raises its own Fail / InvalidProtobuf types
        raise ValueError(f"{path} is not a loadable ONNX model: {str(err).splitlines()[0]}") from None
    props = session.get_modelmeta().custom_metadata_map
    if ONNX_METADATA_KEY not in props:
        raise ValueError(f"{path} carries no {ONNX_METADATA_KEY!r} metadata; export it with `python -m export`")
    return ModelCard.from_json(props[ONNX_METADATA_KEY])


def register(onnx_path: Path, name: str) -> bentoml.Model:
    """Add an exported model to the store as ``name:<content hash>``; returns the stored model."""
    card = read_onnx_card(onnx_path)
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


def register_default() -> bentoml.Model:
    """The model this repository ships, so serving works right after install."""
    return register(DEFAULT_MODEL_FILE, DEFAULT_MODEL_NAME)


def open_model(tag: str) -> bentoml.Model:
    """A stored model by tag, or a LookupError that says how to put it there."""
    try:
        return bentoml.models.get(tag)
    except NotFound:
        raise LookupError(
            f"model {tag!r} is not in the BentoML model store under {bentoml_home()}; "
            "register one with `python -m model_store register-default` or `python -m model_store register FILE --name NAME`"
        ) from None


def bentoml_home() -> str:
    """Where the store lives ($BENTOML_HOME, default ~/bentoml), for error messages."""
    from bentoml._internal.configuration.containers import BentoMLContainer

    return str(BentoMLContainer.bentoml_home.get())


def card_of(model: bentoml.Model) -> ModelCard:
    return ModelCard.from_dict(model.info.metadata)
