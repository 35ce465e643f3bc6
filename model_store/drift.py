"""Drift: how far a window of a model's recent answers is from what it answered on held-out images.

Export fits a :class:`DriftReference` on the run's validation split and writes it into the graph's
metadata beside the card; the service keeps a :class:`Window` of each model's last ``window``
answers and compares the two (``serving.monitor``). The statistics, each higher when further away:

- ``out_of_distribution_share``, ``low_confidence_share``: the share of the window answered unsure,
  by reason (``model_store.calibration``);
- ``class_psi``: the population stability index of the predicted classes against their shares on
  held-out images, ``sum((p - q) * ln(p / q))``;
- ``feature_frechet``: the Fréchet distance between Gaussians fitted to the window's penultimate
  features and to the held-out ones (the distance FID uses), ``|m1 - m2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2)``;
- ``mean_ood_distance``: the mean out-of-distribution distance (the kNN distance of the features).

A statistic's level is fitted at export on windows drawn from held-out images that the reference
itself was not fitted on, so an in-distribution window stays under it and an alert rule needs no
tuning (:func:`fit_levels` says how high). Torch-free: serving imports it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from model_store.calibration import REASON_OF_CODE, UNSURE_REASONS
from model_store.card import json_object
from model_store.errors import UsageError

ONNX_METADATA_KEY = "drift_reference"  # beside the card's "model_card": 30-70 KB of statistics it need not carry
STATISTICS = (
    "out_of_distribution_share",
    "low_confidence_share",
    "class_psi",
    "feature_frechet",
    "mean_ood_distance",
)
# Reason codes as a window stores them: Calibration.reason_codes'.
OUT_OF_DISTRIBUTION, LOW_CONFIDENCE = (list(REASON_OF_CODE).index(r) for r in UNSURE_REASONS)
DEFAULT_WINDOW = 1000
MAX_WINDOW = 100_000  # answers: 34 MB of buffers for the LeNet's 84 features, the most a graph may ask for
LEVEL_WINDOWS = 1000  # in-distribution windows a level is fitted on
# A level is the mean of a log-normal fitted to those windows plus 6 of its standard deviations.
# "What 99% of windows stay under" would alert on an undisturbed stream most of the time: the
# service looks at its sliding window every second, hundreds of nearly independent windows a
# day, five statistics each. At 3.72 deviations (one window in 10,000), 100,000 test images still
# raised 24 alerts (BENCHMARKS.md, "Drift"); a real shift moves a figure by tens of deviations, so
# the margin costs an alert little time.
LEVEL_Z = 6.0
PSI_PSEUDOCOUNT = 0.5  # per class, so that a class the window never predicted is finite, not infinite


@dataclass(frozen=True)
class DriftReference:
    window: int  # answers per window: the statistics compare this many recent answers
    class_shares: tuple[float, ...]  # share of each predicted class on the held-out images
    feature_mean: tuple[float, ...]  # mean of the penultimate features on them [D]
    feature_cov: tuple[tuple[float, ...], ...]  # their covariance [D, D]
    levels: dict[str, float]  # per statistic of STATISTICS: an in-distribution window stays under it
    images: int  # held-out images the shares, mean and covariance were fitted on
    level_images: int  # other held-out images, never in the reference, the levels' windows were drawn from

    def __post_init__(self) -> None:
        # It comes back from a graph's metadata, which anyone can edit: check what the monitor relies on.
        for name in ("window", "images", "level_images"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UsageError(f"drift reference: {name} must be a positive integer, got {value!r}")
        if self.window > MAX_WINDOW:  # the service allocates the window's buffers from it
            raise UsageError(f"drift reference: window must be at most {MAX_WINDOW:,}, got {self.window:,}")
        shares, mean, cov = (_floats(self, name) for name in ("class_shares", "feature_mean", "feature_cov"))
        if shares.ndim != 1 or len(shares) < 2 or not (shares > 0).all() or abs(shares.sum() - 1) > 1e-6:
            raise UsageError("drift reference: class_shares must be positive shares of at least 2 classes summing to 1")
        if (
            mean.ndim != 1
            or cov.shape != (len(mean), len(mean))
            or not (np.isfinite(mean).all() and np.isfinite(cov).all())
        ):
            raise UsageError(
                f"drift reference: feature_mean [D] and feature_cov [D, D] must be finite, got shapes "
                f"{list(mean.shape)} and {list(cov.shape)}"
            )
        levels = self.levels
        if (
            not isinstance(levels, dict)
            or sorted(levels) != sorted(STATISTICS)
            or not all(map(_is_finite, levels.values()))
        ):
            raise UsageError(f"drift reference: levels must give a finite number for each of {list(STATISTICS)}")

    @property
    def classes(self) -> int:
        return len(self.class_shares)

    @property
    def features(self) -> int:
        return len(self.feature_mean)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DriftReference:
        data = json_object(text, "drift reference")
        known = {f.name for f in dataclasses.fields(cls)}
        if set(data) != known:
            raise UsageError(f"drift reference: expected the fields {sorted(known)}, got {sorted(data)}")
        return cls(**data)


class Gaussian:
    """A reference's feature mean and covariance, with the covariance's square root computed once:
    each Fréchet distance to it then costs one symmetric eigendecomposition."""

    def __init__(self, mean: np.ndarray, cov: np.ndarray):
        self.mean = np.asarray(mean, np.float64)
        self.cov = np.asarray(cov, np.float64)
        values, vectors = np.linalg.eigh(self.cov)
        self.root = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T

    def frechet(self, mean: np.ndarray, cov: np.ndarray) -> float:
        """The Fréchet distance of N(mean, cov) to this one. tr((S1 S2)^1/2) is the sum of the
        square roots of the eigenvalues of S1^1/2 S2 S1^1/2, a symmetric matrix: no general sqrtm."""
        inner = np.linalg.eigvalsh(self.root @ cov @ self.root)
        cross = np.sqrt(np.clip(inner, 0, None)).sum()
        gap = self.mean - mean
        return float(gap @ gap + np.trace(self.cov) + np.trace(cov) - 2 * cross)


def class_psi(classes: np.ndarray, shares: np.ndarray) -> float:
    """Population stability index of predicted ``classes`` [N] against reference ``shares``."""
    counts = np.bincount(classes, minlength=len(shares)).astype(np.float64) + PSI_PSEUDOCOUNT
    observed = counts / counts.sum()
    return float(((observed - shares) * np.log(observed / shares)).sum())


def statistics(
    reference: Gaussian,
    shares: np.ndarray,
    classes: np.ndarray,
    reasons: np.ndarray,
    distances: np.ndarray,
    features: np.ndarray,
) -> dict[str, float]:
    """Every statistic of STATISTICS for one window of answers: predicted ``classes`` [N], reason
    codes [N] (``Calibration.reason_codes``), OOD ``distances`` [N] and penultimate ``features`` [N, D]."""
    features = np.asarray(features, np.float64)
    return {
        "out_of_distribution_share": float(np.mean(reasons == OUT_OF_DISTRIBUTION)),
        "low_confidence_share": float(np.mean(reasons == LOW_CONFIDENCE)),
        "class_psi": class_psi(classes, shares),
        "feature_frechet": reference.frechet(features.mean(axis=0), np.cov(features, rowvar=False)),
        "mean_ood_distance": float(np.mean(distances)),
    }


def fit_reference(classes: np.ndarray, features: np.ndarray, num_classes: int) -> tuple[np.ndarray, Gaussian]:
    """The predicted-class shares and the feature Gaussian of held-out answers (classes [N], features [N, D])."""
    counts = np.bincount(classes, minlength=num_classes).astype(np.float64) + PSI_PSEUDOCOUNT
    features = np.asarray(features, np.float64)
    return counts / counts.sum(), Gaussian(features.mean(axis=0), np.cov(features, rowvar=False))


def fit_levels(
    shares: np.ndarray, gaussian: Gaussian, answers: tuple[np.ndarray, ...], window: int, seed: int = 0
) -> dict[str, float]:
    """Each statistic's level: :data:`LEVEL_WINDOWS` windows of ``window`` answers drawn from
    held-out ``answers`` (classes, reason codes, distances, features) that are not the
    reference's, and a log-normal fitted to each statistic's values: its mean plus
    :data:`LEVEL_Z` standard deviations, in logs.

    Each window is drawn with replacement from a resample of the answers (a two-stage bootstrap):
    its spread then counts the held-out set's own sampling error beside the window's. Those few
    thousand images are not the population: on the LeNet's test images the mean OOD distance
    sits 0.8 window deviations above theirs, and every window of real traffic moves with it.

    A share can be 0 in every window (no answer was unsure for that reason): its level is then
    one answer in the window, the least that can be told from none."""
    rng = np.random.default_rng(seed)
    values: dict[str, list[float]] = {name: [] for name in STATISTICS}
    count = len(answers[0])
    for _ in range(LEVEL_WINDOWS):
        drawn = rng.integers(0, count, count)[rng.integers(0, count, window)]
        for name, value in statistics(gaussian, shares, *(part[drawn] for part in answers)).items():
            values[name].append(value)
    levels = {}
    for name, seen in values.items():
        seen = np.asarray(seen)
        positive = seen[seen > 0]
        if len(positive) < len(seen):  # a share of 0 has no log; 1/window is the next value it can take
            positive = np.maximum(seen, 1 / window)
        logs = np.log(positive)
        levels[name] = float(np.exp(logs.mean() + LEVEL_Z * logs.std()))
    return levels


class Window:
    """The last ``reference.window`` answers of one model, in ring buffers: bounded memory
    (about 4 bytes x (features + 2) per answer), and :meth:`figures` over them once full."""

    def __init__(self, reference: DriftReference):
        size, self.reference = reference.window, reference
        self.shares = np.asarray(reference.class_shares, np.float64)
        self.gaussian = Gaussian(np.asarray(reference.feature_mean), np.asarray(reference.feature_cov))
        self.classes = np.zeros(size, np.int32)
        self.reasons = np.zeros(size, np.int8)
        self.distances = np.zeros(size, np.float32)
        self.features = np.zeros((size, reference.features), np.float32)
        self.seen = 0  # answers ever added

    def add(self, classes: np.ndarray, reasons: np.ndarray, distances: np.ndarray, features: np.ndarray) -> None:
        """Append a batch of answers (the oldest fall out): arrays of one length, as :func:`statistics` takes."""
        size = len(self.classes)
        count = len(classes)
        if count > size:  # only the last window's worth can stay
            classes, reasons, distances, features = (a[-size:] for a in (classes, reasons, distances, features))
        at = (self.seen + count - len(classes)) % size  # where the first answer kept goes
        first = min(len(classes), size - at)
        for store, new in zip(
            (self.classes, self.reasons, self.distances, self.features), (classes, reasons, distances, features)
        ):
            store[at : at + first] = new[:first]
            store[: len(new) - first] = new[first:]
        self.seen += count

    def copy(self) -> Window:
        """A copy whose buffers can be read while this window goes on filling."""
        other = copy.copy(self)
        for name in ("classes", "reasons", "distances", "features"):
            setattr(other, name, getattr(self, name).copy())
        return other

    @property
    def full(self) -> bool:
        return self.seen >= len(self.classes)

    def figures(self) -> dict[str, float] | None:
        """The statistics of the window, or None until it holds a full window of answers: fewer
        would be compared with levels fitted for a full one."""
        if not self.full:
            return None
        return statistics(self.gaussian, self.shares, self.classes, self.reasons, self.distances, self.features)

    def alerts(self, figures: dict[str, float] | None) -> list[str]:
        """The statistics of ``figures`` above their level."""
        if figures is None:
            return []
        return [name for name in STATISTICS if figures[name] > self.reference.levels[name]]


def _floats(reference: DriftReference, name: str) -> np.ndarray:
    try:
        return np.asarray(getattr(reference, name), np.float64)
    except (TypeError, ValueError):  # not numbers, or ragged
        raise UsageError(f"drift reference: {name} must be numbers in a regular array") from None


def _is_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
