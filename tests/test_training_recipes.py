"""The training package beyond the basic loop: datasets, augmentation, schedules, resume,
fine-tuning, evaluation and two-process DDP, each on small real runs."""

import argparse
import csv
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from model_store.errors import UsageError
from tests.conftest import REPO, run_cli
from training import train as train_module
from training.__main__ import get_args_parser
from training.augment import Augment
from training.checkpoint import load_model
from training.folder import scan_folder
from training.optim import lr_factor


def train_args(*argv: str) -> argparse.Namespace:
    return get_args_parser().parse_args(["train", *argv])


def state(path):
    return torch.load(path, weights_only=True)


def test_an_interrupted_run_resumed_ends_exactly_like_an_uninterrupted_one(tmp_path, monkeypatch):
    recipe = [
        "--dataset",
        "synthetic",
        "--synthetic-size",
        "256",
        "--model",
        "lenet_bn",
        "--batch-size",
        "32",
        "--epochs",
        "3",
        "--hflip",
        "--random-crop-padding",
        "2",
        "--random-erasing",
        "0.5",
        "--seed",
        "3",
    ]
    train_module.main(train_args(*recipe, "--output-dir", str(tmp_path / "whole")))

    saved = train_module.save_checkpoint

    def save_and_keep_epoch_1(path, model, card, **extra):  # the state a run killed after epoch 1 leaves
        saved(path, model, card, **extra)
        if path.name == "last.pt" and extra["epoch"] == 1:
            shutil.copy(path, tmp_path / "epoch1.pt")

    monkeypatch.setattr(train_module, "save_checkpoint", save_and_keep_epoch_1)
    train_module.main(train_args(*recipe, "--output-dir", str(tmp_path / "first")))
    monkeypatch.setattr(train_module, "save_checkpoint", saved)
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copy(tmp_path / "epoch1.pt", resumed_dir / "last.pt")
    shutil.copy(tmp_path / "first" / "log.csv", resumed_dir / "log.csv")
    (resumed_dir / "log.csv").write_text("".join(open(tmp_path / "first" / "log.csv").readlines()[:2]))
    train_module.main(
        get_args_parser().parse_args(["train", "--resume", str(resumed_dir / "last.pt"), "--epochs", "3"])
    )

    whole, resumed = state(tmp_path / "whole" / "last.pt"), state(resumed_dir / "last.pt")
    assert resumed["epoch"] == 3
    for key, tensor in whole["model"].items():
        assert torch.equal(tensor, resumed["model"][key]), key
    assert whole["card"]["metrics"]["test_acc"] == resumed["card"]["metrics"]["test_acc"]
    assert len(list(csv.DictReader(open(resumed_dir / "log.csv")))) == 3


def test_resume_refuses_a_checkpoint_without_training_state(tmp_path):
    from model_store import ModelCard
    from training.checkpoint import save_checkpoint
    from training.models import build_model

    card = ModelCard(arch="lenet", class_names=["a", "b"], in_channels=1, height=28, width=28, mean=(0.5,), std=(0.5,))
    save_checkpoint(tmp_path / "bare.pt", build_model(card), card)
    result = run_cli("-m", "training", "train", "--resume", str(tmp_path / "bare.pt"))
    assert result.returncode == 2 and "holds no training state to resume from" in result.stderr


def test_resume_refuses_an_epoch_count_the_run_has_already_reached(tmp_path, capsys):
    from training.__main__ import cli

    run = tmp_path / "run"
    recipe = ["--dataset", "synthetic", "--synthetic-size", "64", "--batch-size", "32", "--model", "lenet"]
    train_module.main(train_args(*recipe, "--epochs", "2", "--output-dir", str(run)))
    before = (run / "last.pt").read_bytes(), (run / "log.csv").read_text()
    for argv, epochs in ((["--epochs", "2"], 2), (["--epochs", "1"], 1), ([], 2)):  # no --epochs: the run's own
        assert cli(["train", "--resume", str(run / "last.pt"), *argv]) == 2
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1
        assert error.startswith(f"error: {run / 'last.pt'} already finished epoch 2, so --epochs {epochs} leaves")
    assert ((run / "last.pt").read_bytes(), (run / "log.csv").read_text()) == before  # nothing trained or written


def test_resume_without_epochs_finishes_the_run_as_planned(tmp_path):
    run = tmp_path / "run"
    recipe = ["--dataset", "synthetic", "--synthetic-size", "64", "--batch-size", "32", "--model", "lenet"]
    train_module.main(train_args(*recipe, "--epochs", "1", "--output-dir", str(run)))
    payload = state(run / "last.pt")
    payload["args"]["epochs"] = 3  # as if a 3-epoch run had been stopped after its first
    torch.save(payload, run / "last.pt")
    train_module.main(train_args("--resume", str(run / "last.pt")))
    assert state(run / "last.pt")["epoch"] == 3


def test_a_new_run_decodes_scaled_and_a_run_from_before_the_choice_resumes_decoding_every_pixel(tmp_path):
    run = tmp_path / "run"
    recipe = ["--dataset", "synthetic", "--synthetic-size", "64", "--batch-size", "32", "--model", "lenet"]
    train_module.main(train_args(*recipe, "--epochs", "1", "--output-dir", str(run)))
    payload = state(run / "last.pt")
    assert payload["card"]["decode"] == "scaled" and payload["args"]["decode"] == "scaled"
    del payload["card"]["decode"], payload["args"]["decode"]  # as written before the choice existed
    payload["args"]["epochs"] = 2
    torch.save(payload, run / "last.pt")
    train_module.main(train_args("--resume", str(run / "last.pt")))
    assert "decode" not in state(run / "last.pt")["card"]  # "full", which a card leaves out


def test_compile_trains_through_torch_compile_and_a_resume_compiles_only_when_asked(tmp_path, monkeypatch, capsys):
    # torch.compile itself is measured on the GPU (benchmarks/gpu/suite.py); on a CPU it takes minutes.
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda module: compiled.append(module) or module)
    run = tmp_path / "run"
    recipe = ["--dataset", "synthetic", "--synthetic-size", "64", "--batch-size", "32", "--model", "lenet"]
    train_module.main(train_args(*recipe, "--epochs", "1", "--compile", "--output-dir", str(run)))
    assert len(compiled) == 1 and ", compiled, data path" in capsys.readouterr().out
    assert state(run / "last.pt")["args"]["compile"] is True
    train_module.main(train_args("--resume", str(run / "last.pt"), "--epochs", "2"))  # how to run, not what
    assert len(compiled) == 1 and state(run / "last.pt")["epoch"] == 2


def make_folder(root, classes=("blue", "green", "red"), per_class=16):
    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (20, 40, 230)}
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(np.array(colours[name]) + rng.integers(-25, 25, (30, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.{'png' if i % 2 else 'jpg'}")


def test_image_folder_trains_and_evaluates_with_its_own_classes(tmp_path):
    # 20 of each colour: 5 for the validation split, 4 of the other 15 held out of training (--hold-out)
    make_folder(tmp_path / "photos", per_class=20)
    out = tmp_path / "run"
    metrics = train_module.main(
        train_args(
            "--dataset",
            "folder",
            "--data-dir",
            str(tmp_path / "photos"),
            "--model",
            "lenet_bn",
            "--size",
            "28",
            "--epochs",
            "4",
            "--batch-size",
            "8",
            "--val-ratio",
            "0.25",
            "--output-dir",
            str(out),
        )
    )
    card = state(out / "last.pt")["card"]
    assert card["class_names"] == ["blue", "green", "red"] and card["in_channels"] == 3 and card["resize"] == "crop"
    assert metrics["test_acc"] >= 0.9  # colours are easy
    result = run_cli("-m", "training", "evaluate", "--checkpoint", str(out / "last.pt"))
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(open(out / "per_class.csv")))
    assert [r["class"] for r in rows] == ["blue", "green", "red"] and sum(int(r["images"]) for r in rows) == 15
    assert (out / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_folder_layouts_and_their_errors(tmp_path):
    make_folder(tmp_path / "split" / "train", per_class=4)
    make_folder(tmp_path / "split" / "val", classes=("red",), per_class=2)
    classes, train, val = scan_folder(tmp_path / "split", 0.5, seed=0)
    assert classes == ["blue", "green", "red"] and len(train) == 12 and [label for _, label in val] == [2, 2]
    make_folder(tmp_path / "one", classes=("red",))
    with pytest.raises(ValueError, match="needs at least two class sub-folders"):
        scan_folder(tmp_path / "one", 0.2, seed=0)
    (tmp_path / "split" / "train" / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        scan_folder(tmp_path / "split", 0.2, seed=0)
    with pytest.raises(UsageError, match="is not a folder"):
        scan_folder(tmp_path / "missing", 0.2, seed=0)


def test_augmentation_keeps_shape_and_type_and_is_seeded():
    pixels = torch.arange(28 * 28, dtype=torch.int64).remainder(256).to(torch.uint8).view(1, 28, 28)
    augment = Augment(crop_padding=4, hflip=True, erasing=1.0)
    torch.manual_seed(0)
    first = [augment(pixels) for _ in range(8)]
    torch.manual_seed(0)
    again = [augment(pixels) for _ in range(8)]
    assert all(a.shape == pixels.shape and a.dtype == torch.uint8 for a in first)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, pixels) for a in first)
    assert Augment.from_args(argparse.Namespace(random_crop_padding=0, hflip=False, random_erasing=0.0)) is None
    with pytest.raises(ValueError, match="random-erasing"):
        Augment(erasing=1.5)


@pytest.mark.parametrize("schedule", ["constant", "step", "cosine", "onecycle"])
def test_learning_rate_schedules(schedule):
    args = argparse.Namespace(lr_scheduler=schedule, epochs=10, lr_warmup_epochs=1.0, lr_step_size=4, lr_gamma=0.1)
    factor = lr_factor(args, steps_per_epoch=10)
    curve = [factor(step) for step in range(100)]
    assert curve[0] < 0.1 and max(curve) == pytest.approx(1.0, abs=0.02)  # every schedule warms up
    if schedule == "constant":
        assert curve[-1] == 1.0
    elif schedule == "step":
        assert curve[35] == pytest.approx(1.0) and curve[45] == pytest.approx(0.1) and curve[85] == pytest.approx(0.01)
    else:
        assert curve[-1] < 0.01 and curve.index(max(curve)) == 10
    assert all(math.isfinite(v) and v >= 0 for v in curve)


def test_fine_tuning_from_torchvision_weights_replaces_the_head_and_freezes_the_backbone(tmp_path):
    import torchvision

    source = torchvision.models.resnet18(weights=None).state_dict()  # ImageNet layout: RGB stem, 1000 classes
    torch.save(source, tmp_path / "resnet18_imagenet.pth")
    out = tmp_path / "run"
    train_module.main(
        train_args(
            "--dataset",
            "synthetic",
            "--synthetic-size",
            "64",
            "--model",
            "resnet18",
            "--size",
            "32",
            "--epochs",
            "1",
            "--batch-size",
            "16",
            "--init-weights",
            str(tmp_path / "resnet18_imagenet.pth"),
            "--freeze-backbone",
            "--output-dir",
            str(out),
        )
    )
    tuned = state(out / "last.pt")["model"]
    assert torch.equal(tuned["net.conv1.weight"], source["conv1.weight"].sum(dim=1, keepdim=True))  # RGB stem -> gray
    assert torch.equal(tuned["net.layer4.1.conv2.weight"], source["layer4.1.conv2.weight"])  # frozen
    assert tuned["net.fc.weight"].shape == (10, 512)  # the head follows the new classes
    train_module.main(get_args_parser().parse_args(["train", "--resume", str(out / "last.pt"), "--epochs", "2"]))
    resumed = state(out / "last.pt")
    assert resumed["epoch"] == 2 and torch.equal(
        resumed["model"]["net.layer4.1.conv2.weight"], source["layer4.1.conv2.weight"]
    )
    result = run_cli(
        "-m",
        "training",
        "train",
        "--dataset",
        "synthetic",
        "--model",
        "lenet",
        "--epochs",
        "1",
        "--init-weights",
        str(tmp_path / "resnet18_imagenet.pth"),
        "--output-dir",
        str(tmp_path / "x"),
    )
    assert result.returncode == 2 and "no tensor fits this model" in result.stderr


def test_two_process_ddp_run_on_gloo(tmp_path):
    out = tmp_path / "ddp"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "--module",
            "training",
            "train",
            "--dataset",
            "synthetic",
            "--synthetic-size",
            "512",
            "--model",
            "lenet_bn",
            "--model-arg",
            "activation=relu",
            "--batch-size",
            "32",
            "--epochs",
            "2",
            "--output-dir",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("training lenet_bn") == 1  # rank 0 alone reports and writes
    rows = list(csv.DictReader(open(out / "log.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2] and float(rows[-1]["test_acc"]) > 0.3  # chance is 0.1
    assert state(out / "last.pt")["epoch"] == 2


def test_both_data_paths_train_and_each_run_says_which_it_took(tmp_path, capsys):
    for path, why in (("loader", "--data-path loader"), ("tensors", "cached; batches and augmentation on the device")):
        recipe = ["--dataset", "synthetic", "--synthetic-size", "64", "--model", "lenet_bn", "--epochs", "1"]
        train_module.main(train_args(*recipe, "--hflip", "--data-path", path, "--output-dir", str(tmp_path / path)))
        out = capsys.readouterr().out
        assert f"data path {path} (" in out and why in out and (tmp_path / path / "last.pt").is_file()


def test_without_a_held_out_split_best_pt_is_chosen_on_the_test_split_and_the_run_says_so(tmp_path, capsys):
    recipe = ["--dataset", "synthetic", "--synthetic-size", "64", "--model", "lenet_bn", "--epochs", "1"]
    train_module.main(train_args(*recipe, "--no-hold-out", "--output-dir", str(tmp_path)))
    assert "validating on 0, testing on 64; best.pt chosen on test accuracy" in capsys.readouterr().out
    assert state(tmp_path / "best.pt")["best_on"] == "test"
    assert "val_acc" not in next(csv.DictReader(open(tmp_path / "log.csv")))


def test_channels_last_on_a_cpu_trains_and_its_checkpoint_rebuilds_the_same_network(tmp_path, capsys):
    recipe = ["--dataset", "synthetic", "--synthetic-size", "64", "--model", "resnet20", "--epochs", "1"]
    train_module.main(train_args(*recipe, "--channels-last", "--device", "cpu", "--output-dir", str(tmp_path)))
    assert "amp None, channels-last, data path" in capsys.readouterr().out
    model, card, _ = load_model(tmp_path / "last.pt")
    pixels = torch.randint(0, 256, (2, card.in_channels, card.height, card.width), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.allclose(model(pixels), model(pixels.contiguous(memory_format=torch.channels_last)), atol=1e-5)


def test_training_without_matplotlib_skips_the_pictures_and_goes_on(tmp_path):
    # A bare GPU machine may lack matplotlib; the pictures are a convenience, the checkpoint is the result.
    code = (
        "import sys; sys.modules['matplotlib'] = None; from training.__main__ import cli; sys.exit(cli(sys.argv[1:]))"
    )
    recipe = ["train", "--dataset", "synthetic", "--synthetic-size", "32", "--model", "lenet_bn", "--epochs", "1"]
    result = subprocess.run(
        [sys.executable, "-c", code, *recipe, "--output-dir", str(tmp_path)], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-1000:]
    assert (tmp_path / "last.pt").is_file() and not (tmp_path / "curves.png").exists()
    assert "matplotlib is not installed: no curves.png or confusion.png are drawn" in result.stderr
