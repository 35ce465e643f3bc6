import csv

import pytest
import torch

from model_store.files import atomic_output
from tests.conftest import run_cli
from training.__main__ import cli
from training.checkpoint import load_model, read_checkpoint
from training.models import build_model, get_model, list_models


def test_short_run_reduces_loss_and_learns(checkpoint):
    with open(checkpoint.parent / "log.csv") as f:
        epochs = list(csv.DictReader(f))
    assert len(epochs) == 2
    assert float(epochs[1]["train_loss"]) < float(epochs[0]["train_loss"])
    assert float(epochs[1]["test_acc"]) > 0.6  # chance is 0.1


def test_best_pt_is_chosen_on_the_held_out_images_and_the_test_set_is_only_reported(checkpoint):
    with open(checkpoint.parent / "log.csv") as f:
        epochs = list(csv.DictReader(f))
    assert {"val_loss", "val_acc", "test_loss", "test_acc"} <= set(epochs[0])
    # Two splits, not one reported twice. Their losses, not their accuracies: two splits of a few
    # hundred images can score the same accuracy by chance (they did once, with torch on one core).
    assert all(row["val_loss"] != row["test_loss"] for row in epochs)
    best = torch.load(checkpoint.parent / "best.pt", weights_only=True)
    chosen = max(epochs, key=lambda row: float(row["val_acc"]))  # the first of equals, as training keeps it
    assert best["best_on"] == "val" and best["epoch"] == int(chosen["epoch"])
    assert best["best_acc"] == float(chosen["val_acc"]) == best["card"]["metrics"]["val_acc"]


def test_checkpoint_reloads_with_weights_only_and_rebuilds_the_same_network(checkpoint):
    payload = torch.load(checkpoint, weights_only=True)
    assert payload["epoch"] == 2 and payload["card"]["arch"] == "lenet_bn"
    assert payload["card"]["metrics"]["epoch"] == 2
    model, card, _ = load_model(checkpoint)
    assert card.class_names[9] == "Ankle boot" and card.arch_args == {"activation": "relu", "pool": "max"}
    assert 0.27 < card.mean[0] < 0.30 and 0.33 < card.std[0] < 0.37  # Fashion-MNIST's own statistics
    pixels = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    fresh = build_model(card).eval()
    fresh.load_state_dict(payload["model"])
    with torch.no_grad():
        assert torch.equal(model(pixels), fresh(pixels))


def test_truncated_and_foreign_checkpoints_fail_with_a_clear_message(checkpoint, tmp_path):
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(checkpoint.read_bytes()[:5000])
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        read_checkpoint(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(ValueError, match="lacks the keys"):
        read_checkpoint(foreign)
    mismatched = tmp_path / "mismatched.pt"
    payload = torch.load(checkpoint, weights_only=True)
    payload["card"]["class_names"] = payload["card"]["class_names"][:5]
    torch.save(payload, mismatched)
    with pytest.raises(ValueError, match="weights do not fit a lenet_bn with 5 classes"):
        load_model(mismatched)


def test_interrupted_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "last.pt"
    target.write_bytes(b"previous")
    with pytest.raises(KeyboardInterrupt):
        with atomic_output(target) as f:
            f.write(b"half")
            raise KeyboardInterrupt
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_registry_names_valid_models_on_a_bad_name():
    assert {"lenet", "lenet_bn"} <= set(list_models())
    with pytest.raises(ValueError, match="unknown model 'lenet6'; valid models: .*lenet_bn"):
        get_model("lenet6", in_channels=1, num_classes=10)
    with pytest.raises(ValueError, match="invalid activation 'tanh'"):
        get_model("lenet", in_channels=1, num_classes=10, activation="tanh")


@pytest.mark.parametrize("name", ["lenet", "lenet_bn"])
def test_every_lenet_gives_logits_for_its_classes(name):
    net = get_model(name, in_channels=1, num_classes=7)
    out = net(torch.randn(3, 1, 28, 28))
    assert out.shape == (3, 7) and torch.isfinite(out).all()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model-arg", "novalue"], "error: --model-arg 'novalue' is not KEY=VALUE"),
        (
            ["--model-arg", "depth=3"],
            "error: model 'lenet_bn' takes no argument(s) ['depth']; it takes: activation, pool",
        ),
        (["--epochs", "0"], "error: --epochs must be at least 1, got 0"),
        (["--lr", "-1"], "error: --lr must be positive, got -1.0"),
        (["--train-limit", "0"], "error: --train-limit must be an integer of at least 1, got 0"),
        (["--dataset", "folder"], "error: --dataset folder needs --data-dir"),
        (["--data-dir", "/nonexistent"], "error: --data-dir /nonexistent lacks Fashion-MNIST file(s)"),
    ],
)
def test_cli_reports_bad_arguments_in_one_line(args, message, tmp_path, capsys):
    # The command's entry point in this process (a new interpreter for each costs 4 s of importing
    # torch); the first case also runs as `python -m training`, as a user runs it.
    code = cli(["train", "--output-dir", str(tmp_path), *args])
    stderr = capsys.readouterr().err
    if args == ["--model-arg", "novalue"]:
        result = run_cli("-m", "training", "train", "--output-dir", str(tmp_path), *args)
        assert (result.returncode, result.stderr) == (code, stderr)
    assert code == 2
    assert stderr.strip().startswith(message) and len(stderr.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())  # nothing written
