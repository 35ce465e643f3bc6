"""The BentoML model store: register an exported ONNX graph with its card, list, open.

A stored model is the ONNX file (``model.onnx``) plus the card as the model's metadata, a copy
of the card inside the file, and, when registered with one, the training checkpoint the graph was
exported from (``checkpoint.pt``, its SHA-256 beside it): the live model's own weights, which
``python -m training train --init-weights NAME[:VERSION]`` fine-tunes from. The version is the file's content hash, so registering the same
file twice is a no-op and a tag names exactly one graph. :func:`check_model` is the one test of a
graph against its card, run by register and again by the service for every model it loads.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import bentoml
from bentoml.exceptions import BentoMLException, NotFound

from model_store.card import ModelCard
from model_store.errors import UsageError
from model_store.files import atomic_output, file_sha256

MODEL_FILE = "model.onnx"
CHECKPOINT_FILE, CHECKPOINT_DIGEST = "checkpoint.pt", "checkpoint.sha256"
# The models this repository ships (model_store/default/NAME.onnx), served by default, the default
# model first: LeNet answers /classify fastest; ResNet-20, with a global-average-pool head, explains.
SHIPPED_MODELS = ("fashion-lenet", "fashion-resnet20")
DEFAULT_MODEL_NAME, EXPLAINER_MODEL_NAME = SHIPPED_MODELS


def shipped_file(name: str, suffix: str = ".onnx") -> Path:
    """The ONNX file of the shipped model ``name`` (one of SHIPPED_MODELS), or with ``suffix=".pt"``
    the checkpoint it was exported from (its weights and card, without the optimizer's state)."""
    return Path(__file__).parent / "default" / f"{name}{suffix}"


DEFAULT_MODEL_FILE, EXPLAINER_MODEL_FILE = shipped_file(DEFAULT_MODEL_NAME), shipped_file(EXPLAINER_MODEL_NAME)


def read_onnx_card(path: Path) -> ModelCard:
    """The card in an ONNX file's metadata_props, read with ONNX Runtime (no onnx or torch needed)."""
    from model_store.engine import card_in, open_session

    return card_in(open_session(path), str(path))


def check_model(path: Path) -> ModelCard:
    """The card of an exported ONNX file, once ONNX Runtime shows that the graph agrees with it
    (:meth:`model_store.engine.OnnxClassifier.check`, on one CPU thread). A UsageError names the
    file, the card's value and the graph's."""
    from model_store.engine import OnnxClassifier

    return OnnxClassifier(path, device="cpu", threads=1).check()


def register(onnx_path: Path, name: str, checkpoint: Path | None = None) -> bentoml.Model:
    """Add an exported model to the store as ``name:<content hash>``, once :func:`check_model` passes,
    with the ``checkpoint`` it was exported from if given (also to a model stored without one);
    returns the stored model."""
    card = check_model(onnx_path)
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise UsageError(f"--checkpoint {checkpoint} does not exist or is not a file")
    version = file_sha256(onnx_path)[:16]
    tag = _tag(name, version)
    try:
        model = bentoml.models.get(tag)
    except NotFound:
        labels = {"arch": card.arch, "dataset": card.dataset or "unknown"}
        with bentoml.models.create(tag, labels=labels, metadata=card.to_dict()) as model:
            shutil.copyfile(onnx_path, model.path_of(MODEL_FILE))
        model = bentoml.models.get(tag)  # the stored copy, not the temp dir it was built in
    if checkpoint is not None:
        with atomic_output(model.path_of(CHECKPOINT_FILE)) as f, open(checkpoint, "rb") as source:
            shutil.copyfileobj(source, f)
        with atomic_output(model.path_of(CHECKPOINT_DIGEST), "w") as f:
            f.write(file_sha256(Path(model.path_of(CHECKPOINT_FILE))) + "\n")
    return model


def checkpoint_of(tag: str) -> Path:
    """The checkpoint a stored model was registered with, once its SHA-256 matches the one written
    beside it; a UsageError says when there is none, or it has changed since."""
    model = open_model(tag)
    path, digest = Path(model.path_of(CHECKPOINT_FILE)), Path(model.path_of(CHECKPOINT_DIGEST))
    if not path.is_file() or not digest.is_file():
        raise UsageError(
            f"model {model.tag} has no checkpoint in the store: register it with "
            f"`python -m model_store register FILE --name {model.tag.name} --checkpoint CHECKPOINT.pt`"
        )
    if file_sha256(path) != digest.read_text().strip():
        raise UsageError(f"model {model.tag}: its stored checkpoint does not match its SHA-256; register it again")
    return path


def register_shipped() -> list[bentoml.Model]:
    """The models this repository ships, with their checkpoints, so serving works right after
    install and a fine-tune can start from the live model (``--from fashion-lenet``)."""
    return [
        register(shipped_file(name), name, shipped_file(name, ".pt") if shipped_file(name, ".pt").is_file() else None)
        for name in SHIPPED_MODELS
    ]


class NotStored(UsageError, LookupError):
    """No model in the store has this tag."""


def _tag(name: str, version: str | None = None) -> bentoml.Tag:
    """``name:version`` as a tag, or a UsageError quoting BentoML's rule for names."""
    try:
        return bentoml.Tag.from_taglike(name) if version is None else bentoml.Tag(name, version)
    except (ValueError, BentoMLException) as err:
        raise UsageError(f"not a model tag: {err}") from None


def open_model(tag: str) -> bentoml.Model:
    """A stored model by tag, or a :class:`NotStored` that says how to put it there."""
    try:
        return bentoml.models.get(_tag(tag))
    except NotFound:
        raise NotStored(
            f"model {tag!r} is not in the BentoML model store under {bentoml_home()}; "
            "register the shipped ones with `python -m model_store register-default` or `python -m model_store register FILE --name NAME`"
        ) from None


def bentoml_home() -> str:
    """Where the store lives ($BENTOML_HOME, default ~/bentoml), for error messages."""
    from bentoml._internal.configuration.containers import BentoMLContainer

    return str(BentoMLContainer.bentoml_home.get())


def card_of(model: bentoml.Model) -> ModelCard:
    return ModelCard.from_dict(model.info.metadata)
