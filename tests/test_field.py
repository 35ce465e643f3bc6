"""Fine-tune from the field (training.field): from the shipped LeNet's own checkpoint in the store,
on reviewed images of a shift the LeNet gets wrong, mixed with a replay of Fashion-MNIST; then
export re-fits on held-out images of both kinds and the card says where the model came from."""

from __future__ import annotations

import contextlib
import hashlib
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from model_store.captures import NOT_IN_DOMAIN, folder_name, is_held_out
from tests.conftest import png_bytes, run_cli
from training.fashion_mnist_files import FASHION_MNIST_CLASSES
from training.field import DEFAULT_REPLAY_RATIO

REVIEWED = 400  # inverted test images: what a shop photographing on white would send


@pytest.fixture(scope="module")
def reviewed(tmp_path_factory, fashion_test) -> tuple[Path, dict[str, str]]:
    """A reviewed set as `captures export` writes it: white-background (inverted) Fashion-MNIST test
    images under their class folders, named by SHA-256, and noise labelled not_in_domain."""
    root = tmp_path_factory.mktemp("reviewed")
    images, labels = fashion_test
    truth = {}
    for image, label in zip(images[:REVIEWED], labels[:REVIEWED]):
        data = png_bytes(255 - image)
        sha = hashlib.sha256(data).hexdigest()
        folder = root / folder_name(FASHION_MNIST_CLASSES[label])
        folder.mkdir(exist_ok=True)
        (folder / f"{sha}.png").write_bytes(data)
        truth[sha] = FASHION_MNIST_CLASSES[label]
    (root / NOT_IN_DOMAIN).mkdir()
    for noise in np.random.default_rng(0).integers(0, 256, (12, 28, 28), dtype=np.uint8):
        data = png_bytes(noise)
        (root / NOT_IN_DOMAIN / f"{hashlib.sha256(data).hexdigest()}.png").write_bytes(data)
    return root, truth


@pytest.fixture(scope="module")
def home(tmp_path_factory, bentoml_home, served_models) -> Path:
    """A copy of the session's store (the shipped models with their checkpoints, and test-lenet,
    registered without one): these tests register versions the other modules must not serve."""
    home = tmp_path_factory.mktemp("field-bentoml")
    shutil.copytree(bentoml_home / "models", home / "models")
    return home


def finetune(home: Path, *args: str):
    """`python -m training finetune ARGS`, as a user runs it."""
    return run_cli("-m", "training", "finetune", *args, "--device", "cpu", env={"BENTOML_HOME": str(home)})


def stored_tags(home: Path, name: str) -> list[str]:
    return sorted(f"{name}:{p.name}" for p in (home / "models" / name).iterdir() if p.is_dir())


def test_a_finetune_from_the_store_learns_the_field_keeps_the_rest_and_records_its_lineage(home, reviewed, tmp_path):
    root, truth = reviewed
    out = tmp_path / "run"
    [parent] = stored_tags(home, "fashion-lenet")  # the shipped one, with its checkpoint
    result = finetune(
        home, "--from", "fashion-lenet", "--reviewed", str(root), "--epochs", "4", "--backbone-lr-scale", "1.0",
        "--lr", "2e-3", "--batch-size", "64", "--output-dir", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    printed = result.stdout
    payload = torch.load(out / "last.pt", weights_only=True)
    lineage, metrics = payload["card"]["lineage"], payload["card"]["metrics"]
    before = lineage["before"]
    # The LeNet gets white-background clothes mostly wrong; four epochs on 320 of them fix much of it,
    # while the replay keeps Fashion-MNIST's test accuracy within two points (a short run's noise).
    assert before["field_acc"] < 0.5
    assert metrics["field_acc"] > before["field_acc"] + 0.2, printed
    assert metrics["test_acc"] > before["test_acc"] - 0.02, printed
    assert "before: held-out reviewed acc" in printed and "after:  held-out reviewed acc" in printed

    # Lineage: the parent's tag and checkpoint, which images (by the SHA-256 rule) and how labelled.
    assert lineage["parent"] == parent
    held = {sha for sha in truth if is_held_out(sha)}
    assert 0 < len(held) < len(truth)
    images = lineage["images"]
    assert sum(images["held_out"].values()) == len(held)
    assert sum(images["reviewed"].values()) == len(truth) - len(held)
    assert sum(images["replay"].values()) == round(DEFAULT_REPLAY_RATIO * (len(truth) - len(held)))
    assert lineage["not_in_domain"] == 12
    lines = sorted(f"{sha} {folder_name(label)}\n" for sha, label in truth.items())
    lines += sorted(f"{p.stem} {NOT_IN_DOMAIN}\n" for p in (root / NOT_IN_DOMAIN).iterdir())
    assert lineage["reviewed"]["digest"] == hashlib.sha256("".join(sorted(lines)).encode()).hexdigest()
    assert lineage["recipe"] == {
        **lineage["recipe"],
        "epochs": 4,
        "backbone_lr_scale": 1.0,
        "replay_ratio": DEFAULT_REPLAY_RATIO,
    }

    # Export re-fits on held-out images of both kinds, measures the OOD head on the not-in-domain
    # ones, and the graph's card keeps the lineage; the store then serves it as the next version.
    from export.__main__ import cli as export
    from model_store.store import read_onnx_card

    graph = tmp_path / "field.onnx"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert export(["--checkpoint", str(out / "last.pt"), "--output", str(graph)]) == 0, printed.getvalue()
    card = read_onnx_card(graph)
    assert card.lineage == lineage
    assert card.calibration.validation_images == 6000 + len(held)  # the parent's split and the field's
    assert set(card.metrics["calibration"]) >= {"validation", "test", "field"}
    assert card.export["ood"]["not_in_domain_images"] == 12
    assert 0 <= card.export["ood"]["not_in_domain_flagged"] <= 1
    assert "reviewed images not in domain" in printed.getvalue()
    result = run_cli(
        "-m", "model_store", "register", str(graph), "--name", "fashion-lenet", "--checkpoint", str(out / "last.pt"),
        env={"BENTOML_HOME": str(home)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    [child] = [tag for tag in stored_tags(home, "fashion-lenet") if tag != parent]
    stored = home / "models" / "fashion-lenet" / child.split(":")[1] / "checkpoint.pt"
    assert stored.read_bytes() == (out / "last.pt").read_bytes()  # the next fine-tune starts from it


def test_frozen_epochs_train_the_head_alone(home, reviewed, tmp_path):
    out = tmp_path / "run"
    [parent] = stored_tags(home, "fashion-lenet")[:1]
    result = finetune(
        home, "--from", parent, "--reviewed", str(reviewed[0]), "--epochs", "1", "--freeze-epochs", "1",
        "--output-dir", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    from model_store import ModelCard
    from training.field import head_names
    from training.models import build_model

    parent = torch.load(home / "models" / "fashion-lenet" / parent.split(":")[1] / "checkpoint.pt", weights_only=True)
    child = torch.load(out / "last.pt", weights_only=True)
    model = build_model(ModelCard.from_dict(parent["card"]))
    head = head_names(model)
    parameters = {name for name, _ in model.named_parameters()}
    assert head and head < parameters
    for name in parameters:  # BatchNorm's running statistics follow the new mix: buffers, not parameters
        same = torch.equal(parent["model"][name], child["model"][name])
        assert same != (name in head), name


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--epochs", "2", "--freeze-epochs", "3"], "--freeze-epochs must be from 0 to --epochs (2), got 3"),
        (["--replay-ratio", "-1"], "--replay-ratio must be a number of 0 or more, got -1.0"),
        (["--backbone-lr-scale", "0"], "--backbone-lr-scale must be positive, got 0.0"),
    ],
)
def test_bad_arguments_are_one_line_each(home, reviewed, arguments, message):
    result = finetune(home, "--from", "fashion-lenet", "--reviewed", str(reviewed[0]), *arguments)
    assert (result.returncode, result.stderr) == (2, f"error: {message}\n")


def test_a_reviewed_folder_that_is_not_the_models_and_a_parent_without_weights_are_refused(home, reviewed, tmp_path):
    wrong = tmp_path / "wrong"
    (wrong / "T-shirt").mkdir(parents=True)  # "T-shirt/top" written as a folder inside another
    result = finetune(home, "--from", "fashion-lenet", "--reviewed", str(wrong))
    err = result.stderr
    assert result.returncode == 2 and err.startswith(
        f"error: --reviewed {wrong} has folder(s) ['T-shirt'] that are not"
    )
    assert "T-shirt%2Ftop" in err and err.count("\n") == 1
    result = finetune(home, "--from", "test-lenet", "--reviewed", str(reviewed[0]))  # registered without one
    assert result.returncode == 2 and "model test-lenet:" in result.stderr and "has no checkpoint" in result.stderr
