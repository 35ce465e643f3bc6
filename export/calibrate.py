"""Fit the card's :class:`~model_store.calibration.Calibration` on a run's validation logits, and
measure what it changes: negative log-likelihood and expected calibration error, before and after.

Everything here is numpy on logits, so it works the same on any graph's outputs (fp32, fp16,
int8): export fits on the logits of the graph it ships, not of the PyTorch model.
"""

from __future__ import annotations

import math

import numpy as np

from model_store.calibration import Calibration, scores

ECE_BINS = 15
TEMPERATURE_RANGE = (0.05, 20.0)  # far beyond what a trained classifier needs either way


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true labels under ``softmax(logits / temperature)``."""
    scaled = logits.astype(np.float64) / temperature
    top = scaled.max(axis=1)
    log_total = top + np.log(np.exp(scaled - top[:, None]).sum(axis=1))
    return float(np.mean(log_total - scaled[np.arange(len(labels)), labels]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray, tolerance: float = 1e-6) -> float:
    """The temperature of least NLL, by golden-section search on log T.

    NLL is convex in 1/T (a log-sum-exp of a linear function minus a linear function), so it has one
    minimum along any monotone reparametrization: golden-section search finds it without gradients.
    """
    low, high = (math.log(t) for t in TEMPERATURE_RANGE)
    ratio = (math.sqrt(5) - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    fa, fb = nll(logits, labels, math.exp(a)), nll(logits, labels, math.exp(b))
    while high - low > tolerance:
        if fa <= fb:
            high, b, fb = b, a, fa
            a = high - ratio * (high - low)
            fa = nll(logits, labels, math.exp(a))
        else:
            low, a, fa = a, b, fb
            b = low + ratio * (high - low)
            fb = nll(logits, labels, math.exp(b))
    return math.exp((low + high) / 2)


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE: over ``bins`` equal-width bins of the largest probability, the image-weighted mean gap
    between a bin's accuracy and its mean confidence (bin i holds (i/bins, (i+1)/bins])."""
    confidence = probabilities.max(axis=1).astype(np.float64)
    correct = probabilities.argmax(axis=1) == labels
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    gaps = np.abs(np.bincount(which, correct, bins) - np.bincount(which, confidence, bins))
    return float(gaps.sum() / max(1, len(labels)))


def confidence_threshold(confidence: np.ndarray, correct: np.ndarray, target: float) -> float | None:
    """The lowest threshold whose accepted answers (confidence >= it) are right at least ``target``
    of the time, so the most answers are accepted; None when no threshold gets there."""
    order = np.argsort(-confidence, kind="stable")
    ranked, right = confidence[order], correct[order]
    accuracy = np.cumsum(right) / np.arange(1, len(right) + 1)
    # Only cut between different confidences: a threshold accepts every tie of the last accepted answer.
    cuts = np.flatnonzero(np.append(ranked[:-1] > ranked[1:], True))
    good = cuts[accuracy[cuts] >= target]
    return float(ranked[good[-1]]) if len(good) else None


def energy_threshold(energies: np.ndarray, acceptance: float) -> float:
    """The energy at or below which ``acceptance`` of these (in-distribution) images lie."""
    ranked = np.sort(energies)
    return float(ranked[max(0, math.ceil(acceptance * len(ranked)) - 1)])


def fit(logits: np.ndarray, labels: np.ndarray, target_accuracy: float, id_acceptance: float) -> Calibration:
    """The calibration of validation ``logits``: temperature first, then both thresholds under it."""
    temperature = fit_temperature(logits, labels)
    probabilities, energies = scores(logits, temperature)
    correct = probabilities.argmax(axis=1) == labels
    return Calibration(
        temperature=temperature,
        energy_threshold=energy_threshold(energies, id_acceptance),
        id_acceptance=id_acceptance,
        target_accuracy=target_accuracy,
        confidence_threshold=confidence_threshold(probabilities.max(axis=1), correct, target_accuracy),
        validation_images=len(labels),
    )


def measure(logits: np.ndarray, labels: np.ndarray, calibration: Calibration) -> dict[str, float]:
    """What the calibration does on these images: NLL and ECE before and after, and the share of
    answers accepted (not unsure) with their accuracy."""
    before = scores(logits)[0]
    after, energies = scores(logits, calibration.temperature)
    accepted = calibration.accepted(after, energies)
    correct = after.argmax(axis=1) == labels
    return {
        "images": len(labels),
        "accuracy": float(correct.mean()),
        "nll_before": nll(logits, labels),
        "nll_after": nll(logits, labels, calibration.temperature),
        "ece_before": expected_calibration_error(before, labels),
        "ece_after": expected_calibration_error(after, labels),
        "accepted": float(accepted.mean()),
        # left out when none is accepted: the model store's metadata holds no nulls
        **({"accepted_accuracy": float(correct[accepted].mean())} if accepted.any() else {}),
    }
