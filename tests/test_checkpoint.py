"""Checkpoint integrity: the weights digest written on save and checked on every read, by export,
evaluate, resume and --init-weights, on real files damaged the way a bad disk or copy damages them."""

import logging
import random
import shutil
import struct
import zipfile
from pathlib import Path

import pytest
import torch

from export.__main__ import cli as export_cli
from model_store import ModelCard
from model_store.errors import UsageError
from training.__main__ import cli as training_cli
from training.__main__ import get_args_parser
from training.checkpoint import DIGEST_KEY, read_checkpoint, weights_digest
from training.finetune import load_pretrained
from training.models import build_model
from training.train import main as train


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """lenet_bn trained for one epoch on 64 synthetic images; its last.pt."""
    out = tmp_path_factory.mktemp("run")
    argv = ["train", "--dataset", "synthetic", "--synthetic-size", "64", "--batch-size", "32", "--epochs", "1"]
    train(get_args_parser().parse_args([*argv, "--output-dir", str(out)]))
    return out / "last.pt"


def flip_weight_bytes(path: Path, count: int = 64) -> str:
    """Flip ``count`` bytes in place inside the stored data of the checkpoint's largest weight, as a bad
    disk or copy would: the zip member's CRC no longer matches, which torch.load does not check."""
    weights = torch.load(path, weights_only=True)["model"]
    name = max(weights, key=lambda n: weights[n].numel())
    raw = weights[name].numpy().tobytes()
    with zipfile.ZipFile(path) as archive:
        member = next(info for info in archive.infolist() if archive.read(info) == raw)
    with open(path, "r+b") as f:
        f.seek(member.header_offset + 26)  # the local header's name and extra-field lengths
        name_length, extra_length = struct.unpack("<HH", f.read(4))
        start = member.header_offset + 30 + name_length + extra_length
        f.seek(start)
        flipped = bytes(b ^ 0xFF for b in f.read(count))
        f.seek(start)
        f.write(flipped)
    return name


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


@pytest.fixture
def corrupt(run, tmp_path) -> Path:
    path = tmp_path / "last.pt"
    shutil.copy(run, path)
    name = flip_weight_bytes(path)
    damaged, intact = torch.load(path, weights_only=True)["model"], torch.load(run, weights_only=True)["model"]
    assert not torch.equal(damaged[name], intact[name])  # torch.load itself notices nothing
    return path


def test_a_saved_checkpoint_carries_the_digest_of_its_weights(run):
    payload = read_checkpoint(run)
    assert payload[DIGEST_KEY] == weights_digest(payload["model"])
    assert len(payload[DIGEST_KEY]) == 64
    renamed = {f"x.{name}": tensor for name, tensor in payload["model"].items()}
    assert weights_digest(renamed) != payload[DIGEST_KEY]  # names count, not only the bytes


def test_flipped_weight_bytes_are_refused_on_read(corrupt):
    with pytest.raises(ValueError, match="the weights are corrupt") as raised:
        read_checkpoint(corrupt)
    assert str(corrupt) in one_line(str(raised.value)) and "digest mismatch" in str(raised.value)


def test_export_refuses_flipped_weight_bytes_in_one_line_and_writes_nothing(corrupt, tmp_path, capsys):
    output = tmp_path / "m.onnx"
    assert export_cli(["--checkpoint", str(corrupt), "--output", str(output)]) == 2
    error = one_line(capsys.readouterr().err)
    assert error.startswith(f"error: checkpoint {corrupt}:") and "the weights are corrupt" in error
    assert not output.exists()


def test_evaluate_refuses_flipped_weight_bytes_in_one_line(corrupt, capsys):
    assert training_cli(["evaluate", "--checkpoint", str(corrupt)]) == 2
    assert "the weights are corrupt" in one_line(capsys.readouterr().err)
    assert not (corrupt.parent / "per_class.csv").exists()


def test_resume_refuses_flipped_weight_bytes(corrupt, capsys):
    assert training_cli(["train", "--resume", str(corrupt), "--epochs", "2"]) == 2
    assert "the weights are corrupt" in one_line(capsys.readouterr().err)


def test_a_checkpoint_from_before_digests_loads_with_a_warning(run, tmp_path, caplog):
    payload = torch.load(run, weights_only=True)
    del payload[DIGEST_KEY]
    torch.save(payload, tmp_path / "old.pt")
    with caplog.at_level(logging.WARNING, logger="training.checkpoint"):
        assert set(read_checkpoint(tmp_path / "old.pt")["model"]) == set(payload["model"])
    assert f"checkpoint {tmp_path / 'old.pt'} has no weights digest" in caplog.text and "unverified" in caplog.text


def fresh_model(checkpoint: Path) -> torch.nn.Module:
    return build_model(ModelCard.from_dict(read_checkpoint(checkpoint)["card"]))


def test_init_weights_from_one_of_our_checkpoints_loads_every_tensor(run):
    model = fresh_model(run)
    assert load_pretrained(model, run) == set(model.state_dict())


def write_bad_init_weights(kind: str, run: Path, path: Path) -> None:
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(run.read_bytes()[:3000])
    elif kind == "random bytes":
        path.write_bytes(random.Random(0).randbytes(4096))
    elif kind == "corrupt checkpoint":
        shutil.copy(run, path)
        flip_weight_bytes(path)
    elif kind == "not a dict":
        torch.save([torch.zeros(3)], path)


@pytest.mark.parametrize(
    "kind, message",
    [
        ("empty", "is not a readable PyTorch checkpoint"),
        ("truncated", "is not a readable PyTorch checkpoint"),
        ("random bytes", "is not a readable PyTorch checkpoint"),
        ("corrupt checkpoint", "the weights are corrupt"),
        ("not a dict", "holds no state_dict of tensors"),
        ("missing", "does not exist"),
    ],
)
def test_bad_init_weights_fail_in_one_line(kind, message, run, tmp_path):
    path = tmp_path / "init.pt"
    write_bad_init_weights(kind, run, path)
    with pytest.raises(UsageError, match=message) as raised:
        load_pretrained(fresh_model(run), path)
    assert str(path) in one_line(str(raised.value))


def test_an_empty_init_weights_file_is_a_one_line_cli_error(tmp_path, capsys):
    (tmp_path / "empty.pt").write_bytes(b"")
    argv = ["train", "--dataset", "synthetic", "--synthetic-size", "64", "--epochs", "1"]
    code = training_cli([*argv, "--init-weights", str(tmp_path / "empty.pt"), "--output-dir", str(tmp_path / "run")])
    assert code == 2
    error = one_line(capsys.readouterr().err)
    assert error.startswith(f"error: --init-weights {tmp_path / 'empty.pt'} is not a readable PyTorch checkpoint")
    assert not (tmp_path / "run").exists()


@pytest.mark.processes
def test_a_stored_model_keeps_its_checkpoint_and_training_starts_from_its_tag(exported, checkpoint, tmp_path):
    """The live model's own weights travel with it: registered beside the graph, digest-checked,
    and `--init-weights NAME:latest` fine-tunes from them."""
    import shutil

    from tests.conftest import run_cli

    env = {"BENTOML_HOME": str(tmp_path / "bentoml")}
    plain = run_cli("-m", "model_store", "register", str(exported), "--name", "field-lenet", env=env)
    assert plain.returncode == 0, plain.stderr
    train = ["-m", "training", "train", "--model", "lenet_bn", "--model-arg", "activation=relu"]
    train += ["--model-arg", "pool=max", "--epochs", "1", "--train-limit", "256", "--test-limit", "256"]
    start = ["--init-weights", "field-lenet:latest", "--output-dir", str(tmp_path / "run")]
    missing = run_cli(*train, *start, env=env)
    assert missing.returncode == 2 and "has no checkpoint in the store: register it with" in missing.stderr
    kept = run_cli(
        "-m",
        "model_store",
        "register",
        str(exported),
        "--name",
        "field-lenet",
        "--checkpoint",
        str(checkpoint),
        env=env,
    )  # the same graph again, now with its checkpoint
    assert kept.returncode == 0, kept.stderr
    stored = next((tmp_path / "bentoml" / "models" / "field-lenet").glob("*/checkpoint.pt"))
    assert stored.read_bytes() == checkpoint.read_bytes()
    tuned = run_cli(*train, *start, env=env)
    assert tuned.returncode == 0, tuned.stderr[-3000:]
    filled = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["pretrained"]
    assert set(filled) == set(torch.load(checkpoint, weights_only=True)["model"])  # every tensor, from the store
    shutil.copyfile(exported, stored)  # the stored checkpoint changed behind the store's back
    changed = run_cli(*train, *start, env=env)
    assert changed.returncode == 2 and "its stored checkpoint does not match its SHA-256" in changed.stderr
    assert "Traceback" not in changed.stderr + missing.stderr
