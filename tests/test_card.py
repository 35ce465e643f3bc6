import dataclasses

import pytest

from model_store import ModelCard

CARD = dict(arch="lenet_bn", class_names=("a", "b", "c"), in_channels=1, height=28, width=28, mean=(0.3,), std=(0.35,))


def test_json_round_trip_keeps_every_field():
    card = ModelCard(**CARD, arch_args={"activation": "relu"}, metrics={"test_acc": 0.9}, export={"opset": 18})
    again = ModelCard.from_json(card.to_json())
    assert again == card
    assert dataclasses.asdict(again) == dataclasses.asdict(card)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"in_channels": 2}, "in_channels must be 1 or 3"),
        ({"mean": (0.1, 0.2)}, "mean has 2 values for 1 channel"),
        ({"std": (0.0,)}, "std must be positive"),
        ({"std": (float("nan"),)}, r"std must be finite numbers, got \(nan,\)"),
        ({"std": (float("inf"),)}, "std must be finite numbers"),
        ({"mean": (float("-inf"),)}, "mean must be finite numbers"),
        ({"mean": ("0.3",)}, "mean must be finite numbers"),
        ({"resize": "squash"}, "resize 'squash' is not one of"),
        ({"interpolation": "cubic"}, "interpolation 'cubic' is not one of"),
        ({"class_names": ("a", "a")}, "duplicates"),
        ({"class_names": ()}, "class_names must be non-empty"),
        ({"height": 0}, "height must be a positive integer"),
        ({"decode": "draft"}, "decode 'draft' is not one of"),
        ({"crop_fraction": 0.875}, "crop_fraction 0.875 needs resize 'crop', not 'fit'"),
        ({"resize": "crop", "crop_fraction": 0.0}, "crop_fraction must be a number from 0.25 to 1, got 0.0"),
        ({"resize": "crop", "crop_fraction": True}, "crop_fraction must be a number from 0.25 to 1, got True"),
    ],
)
def test_invalid_cards_are_refused_with_the_reason(change, message):
    with pytest.raises(ValueError, match=message):
        ModelCard(**{**CARD, **change})


def test_from_dict_names_unknown_and_missing_fields_and_checks_the_version():
    data = ModelCard(**CARD).to_dict()
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['colour'\]"):
        ModelCard.from_dict({**data, "colour": "red"})
    with pytest.raises(ValueError, match=r"missing field\(s\) \['std'\]"):
        ModelCard.from_dict({k: v for k, v in data.items() if k != "std"})
    with pytest.raises(ValueError, match="card_version 99 is not supported"):
        ModelCard.from_dict({**data, "card_version": 99})
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelCard.from_json("{not json")


def test_a_nan_std_in_the_json_is_refused():
    """JSON has no NaN, but Python's json module reads and writes one: a hand-edited card can hold it."""
    text = ModelCard(**CARD).to_json().replace('"std": [0.35]', '"std": [NaN]')
    with pytest.raises(ValueError, match="std must be finite numbers"):
        ModelCard.from_json(text)


def test_decode_is_full_for_a_card_written_before_it_and_only_scaled_is_written_out():
    old = ModelCard(**CARD).to_dict()
    assert "decode" not in old and ModelCard.from_dict(old).decode == "full"  # reads as it did, writes as it did
    scaled = ModelCard(**CARD, decode="scaled")
    assert scaled.to_dict()["decode"] == "scaled" and ModelCard.from_json(scaled.to_json()) == scaled
