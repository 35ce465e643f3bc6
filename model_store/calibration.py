"""Calibrated probabilities and when to be unsure: what export fits on a run's validation split and
writes into the card, and the few lines of arithmetic that export, serving and the benchmarks share.

The network's logits become probabilities as ``softmax(logits / temperature)``: one temperature,
fitted by negative log-likelihood on images held out of training (Guo et al., "On Calibration of
Modern Neural Networks", 2017). It divides every logit alike, so the ranking, hence the label and
the accuracy, never changes; only how sure the probabilities say the model is.

An answer is unsure for one of two reasons, checked in this order:

- ``out_of_distribution``: the image's penultimate features are further from those of held-out
  images than a threshold that accepted 95% of the held-out images not in the bank (``knn_threshold``:
  the distance to the k-th nearest of them on the bank's first principal axes, Sun et al.,
  "Out-of-Distribution Detection with Deep Nearest Neighbors", 2022, without their normalising;
  ``export.ood_head`` says why). A card
  exported before that has no ``knn_threshold`` and uses the energy, ``-logsumexp(logits /
  temperature)`` (Liu et al., "Energy-based Out-of-distribution Detection", 2020), above a
  threshold that accepted 95% of the validation images. Export fits both; only one decides.
- ``low_confidence``: the largest calibrated probability is below the threshold at which the
  accepted validation answers were right ``target_accuracy`` of the time.

This module stays torch-free: serving imports it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from model_store.errors import UsageError

LOW_CONFIDENCE, OUT_OF_DISTRIBUTION = "low_confidence", "out_of_distribution"
UNSURE_REASONS = (OUT_OF_DISTRIBUTION, LOW_CONFIDENCE)
# A batch's reasons as int8 codes (:meth:`Calibration.reason_codes`): 0 sure, then UNSURE_REASONS' order.
REASON_OF_CODE = np.array([None, *UNSURE_REASONS], object)


@dataclass(frozen=True)
class Calibration:
    temperature: float  # probabilities = softmax(logits / temperature); fitted by NLL on the validation split
    energy_threshold: float  # energy above this: out_of_distribution ...
    id_acceptance: float  # ... set so that this share of the validation images was accepted, e.g. 0.95
    target_accuracy: float  # accepted answers were to be right this often on validation, e.g. 0.99 ...
    validation_images: int  # how many held-out images these were set on
    # ... at a largest probability of at least this. None, and left out of the JSON (the model store's
    # metadata holds no nulls): no threshold got there on validation, so every answer is low_confidence.
    confidence_threshold: float | None = None
    # The graph's OOD distance (export.ood_head) above this: out_of_distribution, in place of the
    # energy rule. None, and left out of the JSON: a graph without that head, judged by its energy.
    knn_threshold: float | None = None

    def __post_init__(self) -> None:
        # Like the card that holds it, it may come back from a file someone edited.
        for name in ("temperature", "energy_threshold", "id_acceptance", "target_accuracy"):
            if not _is_finite(getattr(self, name)):
                raise UsageError(f"calibration: {name} must be a finite number, got {getattr(self, name)!r}")
        if self.temperature <= 0:
            raise UsageError(f"calibration: temperature must be positive, got {self.temperature!r}")
        for name in ("id_acceptance", "target_accuracy"):
            if not 0 < getattr(self, name) <= 1:
                raise UsageError(f"calibration: {name} must be in (0, 1], got {getattr(self, name)!r}")
        threshold = self.confidence_threshold
        if threshold is not None and not (_is_finite(threshold) and 0 <= threshold <= 1):
            raise UsageError(f"calibration: confidence_threshold must be in [0, 1] or null, got {threshold!r}")
        distance = self.knn_threshold
        if distance is not None and not (_is_finite(distance) and distance >= 0):
            raise UsageError(f"calibration: knn_threshold must be a number >= 0 or null, got {distance!r}")
        count = self.validation_images
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise UsageError(f"calibration: validation_images must be a positive integer, got {count!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        known = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(data, dict) or not known - {"confidence_threshold", "knn_threshold"} <= set(data) <= known:
            got = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise UsageError(f"calibration: expected the fields {sorted(known)}, got {got}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return {name: value for name, value in dataclasses.asdict(self).items() if value is not None}

    def unsure_reason(self, confidence: float, energy: float, distance: float | None = None) -> str | None:
        """Why an answer of this largest calibrated probability, energy and OOD distance (None: the
        graph has no OOD head) is unsure; None: it is not."""
        if self.knn_threshold is not None and distance is None:
            raise ValueError("this calibration judges by the OOD distance, and none was given")
        if distance > self.knn_threshold if self.knn_threshold is not None else energy > self.energy_threshold:
            return OUT_OF_DISTRIBUTION
        if self.confidence_threshold is None or confidence < self.confidence_threshold:
            return LOW_CONFIDENCE
        return None

    def unsure_reasons(
        self, confidences: np.ndarray, energies: np.ndarray, distances: np.ndarray | None = None
    ) -> np.ndarray:
        """:meth:`unsure_reason` of every row at once, for the batch scorer: object [N] of reasons and
        None. The same comparisons in the same order, so a row gets the reason it would get alone."""
        return REASON_OF_CODE[self.reason_codes(confidences, energies, distances)]

    def reason_codes(
        self, confidences: np.ndarray, energies: np.ndarray, distances: np.ndarray | None = None
    ) -> np.ndarray:
        """:meth:`unsure_reasons` as int8 codes [N] (REASON_OF_CODE): what a drift window stores."""
        # in float64, as the Python floats of the scalar rule: NumPy would compare float32 arrays with
        # the thresholds rounded to float32, and a row at a threshold could get another answer
        out_of_distribution = self.out_of_distribution(energies, distances)
        low = ~out_of_distribution
        if self.confidence_threshold is not None:
            low &= np.asarray(confidences, np.float64) < self.confidence_threshold
        return out_of_distribution.astype(np.int8) + 2 * low.astype(np.int8)

    def out_of_distribution(self, energies: np.ndarray, distances: np.ndarray | None = None) -> np.ndarray:
        """bool [N]: which rows the out-of-distribution rule flags (in float64, see unsure_reasons)."""
        if self.knn_threshold is None:
            return np.asarray(energies, np.float64) > self.energy_threshold
        if distances is None:
            raise ValueError("this calibration judges by the OOD distance, and none was given")
        return np.asarray(distances, np.float64) > self.knn_threshold

    def accepted(
        self, probabilities: np.ndarray, energies: np.ndarray, distances: np.ndarray | None = None
    ) -> np.ndarray:
        """``unsure_reason(...) is None`` for every row at once: bool [N]."""
        if self.confidence_threshold is None:
            return np.zeros(len(energies), bool)
        return ~self.out_of_distribution(energies, distances) & (probabilities.max(axis=1) >= self.confidence_threshold)


def scores(logits: np.ndarray, temperature: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities [N, classes], energies [N]) of logits [N, classes]: ``softmax(logits / T)``
    and ``-logsumexp(logits / T)``, from the same exponentials."""
    scaled = logits / temperature if temperature != 1.0 else logits
    top = scaled.max(axis=1, keepdims=True)
    shifted = np.exp(scaled - top)
    total = shifted.sum(axis=1, keepdims=True)
    return shifted / total, -(top + np.log(total))[:, 0]


def _is_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
