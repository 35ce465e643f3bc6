"""The data spec: validated where it is made, saved in every checkpoint, and derived the same way
from the arguments of checkpoints written before it was saved."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from model_store import ModelCard
from training.__main__ import get_args_parser
from training.dataspec import DataSpec
from training.train import jsonable

CARD = ModelCard(arch="lenet", class_names=["a", "b"], in_channels=1, height=28, width=28, mean=(0.5,), std=(0.5,))


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"dataset": "mnist"}, "unknown dataset 'mnist'; choose from fashion-mnist, folder, synthetic"),
        ({"dataset": "folder"}, "--dataset folder needs --data-dir"),
        ({"val_ratio": 0.0}, "--val-ratio must be between 0 and 1 (both excluded), got 0.0"),
        ({"val_ratio": 1.5}, "--val-ratio must be between 0 and 1 (both excluded), got 1.5"),
        ({"val_ratio": math.nan}, "--val-ratio must be between 0 and 1 (both excluded), got nan"),
        ({"val_ratio": "0.1"}, "--val-ratio must be between 0 and 1 (both excluded), got '0.1'"),
        ({"seed": 1.5}, "--seed must be an integer, got 1.5"),
        ({"synthetic_size": 0}, "--synthetic-size must be an integer of at least 1, got 0"),
        ({"synthetic_size": None}, "--synthetic-size must be an integer of at least 1, got None"),
        ({"train_limit": -3}, "--train-limit must be an integer of at least 1, got -3"),
        ({"test_limit": 0}, "--test-limit must be an integer of at least 1, got 0"),
    ],
)
def test_a_bad_field_is_refused_naming_its_value_and_what_is_allowed(fields, message):
    with pytest.raises(ValueError) as raised:
        DataSpec(**{"dataset": "synthetic", **fields})
    assert str(raised.value).startswith(message)


def test_the_spec_travels_as_a_plain_dict_and_comes_back_equal():
    spec = DataSpec("folder", Path("/data/photos"), val_ratio=0.25, seed=3, train_limit=100)
    saved = spec.to_dict()
    assert json.loads(json.dumps(saved)) == saved and saved["data_dir"] == "/data/photos"
    assert DataSpec.from_dict(saved) == spec and isinstance(DataSpec.from_dict(saved).data_dir, Path)
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['augment'\]; known: \['data_dir', 'dataset'"):
        DataSpec.from_dict({**saved, "augment": True})
    with pytest.raises(ValueError, match="missing field 'dataset'"):
        DataSpec.from_dict({"seed": 0})


def test_the_arguments_an_old_checkpoint_kept_give_the_spec_the_flags_give():
    args = get_args_parser().parse_args(
        ["train", "--dataset", "folder", "--data-dir", "/photos", "--val-ratio", "0.2", "--seed", "7"]
    )
    assert DataSpec.from_run_args(CARD, jsonable(vars(args))) == DataSpec.from_args(args)
    # The oldest checkpoints kept none of the data flags: Fashion-MNIST from the card, defaults for the rest.
    oldest = DataSpec.from_run_args(ModelCard.from_dict({**CARD.to_dict(), "dataset": "fashion-mnist"}), {"lr": 0.1})
    assert oldest == DataSpec("fashion-mnist", None, val_ratio=0.1, seed=0, synthetic_size=512, hold_out=False)


def test_a_spec_saved_before_hold_out_holds_nothing_out_and_a_new_one_holds_out_a_share_of_each_class():
    old = DataSpec("synthetic").to_dict()
    del old["hold_out"]  # what checkpoints saved before the field: their runs trained on every image
    assert DataSpec.from_dict(old).hold_out is False and DataSpec("synthetic").hold_out is True
    with pytest.raises(ValueError, match="hold_out must be true or false, got 'yes'"):
        DataSpec("synthetic", hold_out="yes")

    from training.data import hold_out, splits
    from training.fashion_mnist_files import FASHION_MNIST_CLASSES

    labels = np.repeat(np.arange(3), [10, 20, 1])
    kept, held = hold_out(labels, 0.1, seed=4)
    assert sorted(kept + held) == list(range(31)) and not set(kept) & set(held)
    assert np.bincount(labels[held], minlength=3).tolist() == [1, 2, 0]  # a class of one keeps its image
    assert hold_out(labels, 0.1, seed=4) == (kept, held) and hold_out(labels, 0.1, seed=5) != (kept, held)
    card = ModelCard.from_dict({**CARD.to_dict(), "class_names": FASHION_MNIST_CLASSES})
    parts = splits(DataSpec("synthetic", synthetic_size=200, val_ratio=0.2), card)
    assert len(parts.train) + len(parts.validation) == 200 and 30 <= len(parts.validation) <= 50
    assert parts.train.dataset is parts.validation.dataset and not set(parts.train.indices) & set(
        parts.validation.indices
    )
    assert splits(DataSpec("synthetic", hold_out=False), card).validation is None


def test_a_checkpoint_s_saved_spec_wins_and_a_data_dir_given_now_replaces_its_own():
    saved = DataSpec("folder", "/then", seed=5)
    payload = {"data": saved.to_dict(), "args": {"dataset": "synthetic"}}  # "args" is only the record
    assert DataSpec.from_checkpoint(payload, CARD) == saved
    moved = DataSpec.from_checkpoint(payload, CARD, Path("/now"))
    assert moved.data_dir == Path("/now") and moved.seed == 5


def test_training_saves_the_spec_beside_the_card_and_its_args_derive_the_same(checkpoint):
    payload = torch.load(checkpoint, weights_only=True)
    spec = DataSpec.from_dict(payload["data"])
    assert spec == DataSpec("fashion-mnist", train_limit=3000, test_limit=1000) and spec.hold_out
    assert DataSpec.from_run_args(ModelCard.from_dict(payload["card"]), payload["args"]) == spec


def test_a_checkpoint_from_before_the_spec_still_exports(checkpoint, tmp_path):
    from export.__main__ import get_args_parser as export_args
    from export.__main__ import main as export

    payload = torch.load(checkpoint, weights_only=True)
    del payload["data"]
    for name in ("dataset", "val_ratio", "synthetic_size", "seed", "train_limit", "test_limit", "hold_out"):
        del payload["args"][name]  # flags the first checkpoints were written without
    torch.save(payload, tmp_path / "old.pt")
    card = export(
        export_args().parse_args(["--checkpoint", str(tmp_path / "old.pt"), "--output", str(tmp_path / "m.onnx")])
    )
    assert card.dataset == "fashion-mnist" and card.export["parity"]["images"] == 1000
    assert card.export["parity"]["max_abs_logit_diff"] <= 1e-4
    assert card.calibration is None and "calibration" not in card.metrics  # it held nothing out to calibrate on


def test_the_card_and_the_spec_must_name_the_same_dataset():
    from training.data import run_splits

    card = ModelCard.from_dict({**CARD.to_dict(), "dataset": "fashion-mnist"})
    with pytest.raises(ValueError, match="card says dataset 'fashion-mnist' but its data spec says 'synthetic'"):
        run_splits(card, DataSpec("synthetic"))


def test_resuming_a_checkpoint_from_before_the_spec_saves_the_spec_it_derived(tmp_path):
    from training import train

    run = tmp_path / "run"
    recipe = [
        "--dataset",
        "synthetic",
        "--synthetic-size",
        "64",
        "--batch-size",
        "32",
        "--model",
        "lenet",
        "--seed",
        "2",
    ]
    train.main(get_args_parser().parse_args(["train", *recipe, "--epochs", "1", "--output-dir", str(run)]))
    payload = torch.load(run / "last.pt", weights_only=True)
    expected = payload.pop("data")
    torch.save(payload, run / "last.pt")
    train.main(get_args_parser().parse_args(["train", "--resume", str(run / "last.pt"), "--epochs", "2"]))
    resumed = torch.load(run / "last.pt", weights_only=True)
    assert resumed["epoch"] == 2 and resumed["data"] == expected
