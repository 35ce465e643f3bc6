"""Calibrated probabilities and unsure answers: the fitting on controlled logits, the card that
carries the result, the export that fits it on held-out images, and the engine that applies it."""

import asyncio
import dataclasses
import json

import numpy as np
import pytest

from export.calibrate import confidence_threshold, energy_threshold, expected_calibration_error, fit, fit_temperature
from model_store import ModelCard
from model_store.calibration import LOW_CONFIDENCE, OUT_OF_DISTRIBUTION, Calibration, scores
from model_store.engine import OnnxClassifier, Outcomes, Scored, answer, unsure, unsure_reasons
from model_store.store import DEFAULT_MODEL_FILE, read_onnx_card
from serving.config import ServingConfig
from serving.edge import Edge
from serving.handlers import Handlers
from serving.model_set import ModelSet
from tests.conftest import png_bytes
from tests.test_edge import client

CARD = dict(arch="lenet_bn", class_names=("a", "b", "c"), in_channels=1, height=28, width=28, mean=(0.3,), std=(0.35,))
CALIBRATION = Calibration(
    temperature=1.5,
    energy_threshold=-3.0,
    id_acceptance=0.95,
    target_accuracy=0.99,
    validation_images=600,
    confidence_threshold=0.9,
)


def drawn_at(temperature: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits, and labels drawn from softmax(logits / temperature): calibrated exactly at that temperature."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, (20000, 10)).astype(np.float32)
    cumulative = np.cumsum(scores(logits, temperature)[0].astype(np.float64), axis=1)
    labels = (rng.random((len(logits), 1)) > cumulative).sum(axis=1).clip(0, 9)
    return logits, labels


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.5])
def test_the_fitted_temperature_is_the_one_the_labels_were_drawn_at(temperature):
    logits, labels = drawn_at(temperature)
    fitted = fit_temperature(logits, labels)
    assert fitted == pytest.approx(temperature, rel=0.03)
    if temperature != 1.0:  # softmax(logits) is miscalibrated, the fitted temperature repairs it
        before = expected_calibration_error(scores(logits)[0], labels)
        assert expected_calibration_error(scores(logits, fitted)[0], labels) < min(0.02, before / 4)


def test_ece_is_the_image_weighted_gap_between_accuracy_and_confidence_per_bin():
    probabilities = np.array([[0.95, 0.05], [0.95, 0.05], [0.55, 0.45], [0.45, 0.55]])
    labels = np.array([0, 1, 0, 0])
    # bin (0.933, 1]: confidence 0.95, accuracy 0.5; bin (0.533, 0.6]: two answers at 0.55, one right
    assert expected_calibration_error(probabilities, labels) == pytest.approx((2 * 0.45 + 2 * 0.05) / 4)


def test_the_confidence_threshold_accepts_the_most_answers_that_reach_the_target():
    confidence = np.array([0.99, 0.98, 0.97, 0.97, 0.9, 0.8, 0.7])
    correct = np.array([True, True, True, False, True, True, False])
    assert confidence_threshold(confidence, correct, 1.0) == 0.98  # not 0.97: its tie holds a wrong answer
    assert confidence_threshold(confidence, correct, 0.8) == 0.8  # 5 of 6 right
    assert confidence_threshold(confidence, correct, 0.7) == 0.7  # everything: 5 of 7
    assert confidence_threshold(confidence[::-1], correct[::-1], 1.0) == 0.98  # order does not matter
    assert confidence_threshold(np.array([0.9, 0.8]), np.array([False, True]), 0.99) is None
    assert energy_threshold(np.arange(100.0), 0.95) == 94.0  # 95 of the 100 at or below


def test_unsure_says_out_of_distribution_first_then_low_confidence():
    assert CALIBRATION.unsure_reason(0.95, -5.0) is None
    assert CALIBRATION.unsure_reason(0.5, -5.0) == LOW_CONFIDENCE
    assert CALIBRATION.unsure_reason(0.5, -1.0) == CALIBRATION.unsure_reason(0.99, -1.0) == OUT_OF_DISTRIBUTION
    unreachable = Calibration(1.0, -3.0, 0.95, 0.99, 600)  # no threshold reached the target: nothing is sure
    assert unreachable.unsure_reason(1.0, -5.0) == LOW_CONFIDENCE
    probabilities = np.array([[0.95, 0.05], [0.5, 0.5], [0.99, 0.01]])
    energies = np.array([-5.0, -5.0, -1.0])
    assert CALIBRATION.accepted(probabilities, energies).tolist() == [
        CALIBRATION.unsure_reason(p.max(), e) is None for p, e in zip(probabilities, energies)
    ]
    assert not unreachable.accepted(probabilities, energies).any()


@pytest.mark.parametrize(
    "calibration",
    [CALIBRATION, Calibration(1.0, -3.0, 0.95, 0.99, 600), dataclasses.replace(CALIBRATION, knn_threshold=2.0)],
)
def test_a_batch_gets_the_reasons_each_row_gets_alone(calibration):
    # float32 rows on both sides of each threshold and at it: the batch rule compares them as the
    # scalar one does, in float64, not against thresholds rounded to float32
    energies = np.array([-3.0, -2.9999999, -3.0000001, -5.0, 0.0, -3.0, -5.0], np.float32)
    confidences = np.array([0.9, 0.9, 0.8999999, 0.9000001, 0.5, 1.0, 0.89], np.float32)
    distances = np.array([2.0, 1.9999999, 2.0000001, 0.5, 9.0], np.float32)  # the kNN rule's, likewise
    grids = np.meshgrid(energies, confidences, distances)
    grid_energies, grid_confidences, grid_distances = (a.ravel() for a in grids)
    probabilities = np.stack([grid_confidences, 1 - grid_confidences], axis=1)
    expected = [
        calibration.unsure_reason(float(c), float(e), float(d))
        for c, e, d in zip(grid_confidences, grid_energies, grid_distances)
    ]
    assert calibration.unsure_reasons(grid_confidences, grid_energies, grid_distances).tolist() == expected
    assert {None, LOW_CONFIDENCE, OUT_OF_DISTRIBUTION} >= set(expected) and OUT_OF_DISTRIBUTION in expected
    # one rule decides out_of_distribution: the distance where the card has a kNN threshold, else the energy
    judged_by = grid_distances.astype(float) > 2.0 if calibration.knn_threshold else grid_energies.astype(float) > -3.0
    assert [reason == OUT_OF_DISTRIBUTION for reason in expected] == judged_by.tolist()
    outcomes = Outcomes(probabilities, grid_energies, grid_distances)
    reasons = unsure_reasons(outcomes, calibration)
    rows = outcomes.rows()
    assert [{"unsure": r is not None, "unsure_reason": r} for r in reasons] == [unsure(r, calibration) for r in rows]
    assert unsure_reasons(outcomes, None) is None  # no calibration: every row null
    assert unsure_reasons(Outcomes.empty(2, has_ood=True), calibration).tolist() == []
    if calibration.knn_threshold is not None:  # a distance the rule needs and was not given is a bug, not a guess
        with pytest.raises(ValueError, match="OOD distance"):
            calibration.unsure_reason(0.95, -5.0)


def test_the_card_carries_the_calibration_and_cards_without_one_still_load():
    card = ModelCard(**CARD, calibration=CALIBRATION)
    again = ModelCard.from_json(card.to_json())
    assert again == card and again.calibration == CALIBRATION
    unreachable = ModelCard(**CARD, calibration=Calibration(1.0, -3.0, 0.95, 0.99, 600))
    assert "confidence_threshold" not in unreachable.to_dict()["calibration"]  # no nulls in the store's metadata
    assert ModelCard.from_json(unreachable.to_json()) == unreachable
    plain = ModelCard(**CARD)
    assert "calibration" not in plain.to_dict()  # an uncalibrated card's JSON is what it was before the field
    assert ModelCard.from_dict(plain.to_dict()).calibration is None


@pytest.mark.parametrize(
    "change, message",
    [
        ({"temperature": 0.0}, "temperature must be positive"),
        ({"temperature": float("nan")}, "temperature must be a finite number"),
        ({"confidence_threshold": 1.5}, "confidence_threshold must be in"),
        ({"id_acceptance": 0.0}, r"id_acceptance must be in \(0, 1\]"),
        ({"validation_images": 0}, "validation_images must be a positive integer"),
        ({"knn_threshold": -1.0}, "knn_threshold must be a number >= 0 or null"),
        ({"knn_threshold": float("inf")}, "knn_threshold must be a number >= 0 or null"),
        ({"colour": "red"}, "expected the fields"),
    ],
)
def test_a_bad_calibration_in_a_card_is_refused_with_the_reason(change, message):
    data = ModelCard(**CARD, calibration=CALIBRATION).to_dict()
    data["calibration"] = {**data["calibration"], **change}
    with pytest.raises(ValueError, match=f"model card: calibration: {message}"):
        ModelCard.from_dict(data)


def test_fit_sets_both_thresholds_under_the_fitted_temperature():
    logits, labels = drawn_at(2.0, seed=1)
    calibration = fit(logits, labels, 0.9, 0.95)
    probabilities, energies = scores(logits, calibration.temperature)
    accepted = probabilities.max(axis=1) >= calibration.confidence_threshold
    assert (probabilities.argmax(axis=1) == labels)[accepted].mean() >= 0.9
    assert np.mean(energies <= calibration.energy_threshold) == pytest.approx(0.95, abs=1e-3)
    assert calibration.validation_images == len(labels)


def test_export_calibrates_on_the_held_out_images_and_ece_drops_on_the_test_set(exported):
    card = read_onnx_card(exported)
    figures = card.metrics["calibration"]
    assert card.calibration.validation_images == figures["validation"]["images"] == 6000  # 10% of 60,000
    assert figures["test"]["images"] == 10000 and figures["ece_bins"] == 15
    test = figures["test"]  # images the temperature was not fitted on
    assert test["ece_after"] < test["ece_before"] and test["nll_after"] < test["nll_before"]
    assert 0.2 < card.calibration.temperature < 5


def test_the_engine_applies_the_temperature_and_answers_unsure(exported, fashion_test):
    classifier = OnnxClassifier(exported, device="cpu")
    pixels = np.concatenate([fashion_test[0][:32, None], np.random.default_rng(0).integers(0, 256, (8, 1, 28, 28))])
    pixels = pixels.astype(np.uint8)
    logits = classifier.logits(pixels)
    expected, energies = scores(logits, classifier.card.calibration.temperature)
    assert classifier.temperature == classifier.card.calibration.temperature
    assert np.allclose(classifier.predict(pixels), expected, atol=1e-6)
    rows = classifier.score(pixels)
    assert all(
        np.allclose(r.probabilities, p, atol=1e-6) and r.energy == pytest.approx(e)
        for r, p, e in zip(rows, expected, energies)
    )
    answers = [answer(row, classifier.card, 3) for row in rows]
    for row, got in zip(rows, answers):
        reason = classifier.card.calibration.unsure_reason(float(row.probabilities.max()), row.energy, row.distance)
        assert got["unsure"] is (reason is not None) and got["unsure_reason"] == reason
        assert len(got["top_k"]) == 3 and got["label"] == got["top_k"][0]["label"]  # the answer is there either way


def test_a_model_without_calibration_answers_unsure_null(uncalibrated, fashion_test):
    classifier = OnnxClassifier(uncalibrated, device="cpu")
    assert classifier.card.calibration is None and classifier.temperature == 1.0
    row = classifier.score(np.zeros((1, 1, 28, 28), np.uint8))[0]
    got = answer(row, classifier.card, 2)
    assert got["unsure"] is None and got["unsure_reason"] is None and len(got["top_k"]) == 2
    assert json.loads(json.dumps(got))["unsure"] is None
    assert isinstance(row, Scored)
    # and so does the service, through the edge, its handlers and the batcher
    config = ServingConfig()
    handlers = Handlers(ModelSet(config, [("plain", "v1", uncalibrated)]), config)
    edge = Edge(None, config, lambda: handlers)

    async def main():
        async with client(edge) as http:
            return await http.post("/classify", files={"image": ("x.png", png_bytes(fashion_test[0][0]))})

    answered = asyncio.run(main()).json()
    assert answered["unsure"] is None and answered["unsure_reason"] is None and answered["label"]


def test_the_shipped_model_is_calibrated():
    card = read_onnx_card(DEFAULT_MODEL_FILE)
    assert card.calibration is not None and card.calibration.validation_images == 6000
    test = card.metrics["calibration"]["test"]
    assert test["ece_after"] < test["ece_before"] and abs(test["accuracy"] - card.metrics["test_acc"]) < 1e-9


def _ood_eval():
    from benchmarks import ood_eval

    return ood_eval


def test_the_ood_benchmark_s_auroc_on_controlled_scores():
    from benchmarks.ood_sets import auroc

    known = np.array([0.0, 1.0, 2.0, 3.0])
    assert auroc(known, known + 10) == 1.0 and auroc(known + 10, known) == 0.0
    assert auroc(known, known) == 0.5  # every tie counts half
    assert auroc(np.array([0.0, 2.0]), np.array([1.0, 3.0])) == 0.75  # 3 of the 4 pairs ranked right


def test_the_ood_benchmark_measures_every_set_and_draws_the_diagram(exported, fashion_test, tmp_path):
    ood_eval = _ood_eval()
    document, figure = tmp_path / "BENCHMARKS.md", tmp_path / "reliability.png"
    argv = ["--onnx", str(exported), "--write", str(document), "--figure", str(figure)]
    text = ood_eval.main(ood_eval.get_args_parser().parse_args(argv))
    rows = [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith("| lenet_bn")
    ]
    # the test set's row, then digits, photographs, noise and blank images, then all of them
    assert len(rows) == 1 + 4 + 1
    assert [row[1].split(" (")[0] for row in rows[1:5]] == [
        "scikit-learn digits",
        "scikit-image photographs",
        "uniform noise",
        "blank, every grey level",
    ]
    assert all(row[2] == "kNN distance" for row in rows[1:5])  # the export's OOD head is what the rule uses
    assert all(0 <= float(row[i]) <= 1 for row in rows[1:5] for i in range(3, 9))
    assert rows[5][1] == "**all 3,953: answered unsure**" and 0 <= float(rows[5][-1].strip("*")) <= 1
    assert "<!-- ood-eval:start -->" in document.read_text()
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and figure.stat().st_size < 100_000
