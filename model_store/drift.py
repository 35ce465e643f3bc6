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
tuning (:func:`fit_levels` says how high). A window is judged before it is full: from
:data:`EARLY_ANSWERS`'s first count of answers, against the levels fitted for windows of that many
(a statistic of 100 answers spreads wider than one of 1,000, and the Fréchet distance and the PSI
sit higher), so a stream that is wrong from its first image alerts within a few hundred of them.
Torch-free: serving imports it.
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
LEVEL_CHUNK_FLOATS = 4_000_000  # features of the windows fitted at once: 32 MB of float64
# Partial windows are judged at these counts of answers, each against levels fitted for windows of
# that size; between two counts, against the smaller one's levels, which are the higher (a window's
# statistics spread less and their bias shrinks as it grows). Two counts cost export about 5 s more.
EARLY_ANSWERS = (100, 300)
SHARES = ("out_of_distribution_share", "low_confidence_share")  # at most 1 by definition
# A level is the mean of a log-normal fitted to those windows plus 6 of its standard deviations.
# "What 99% of windows stay under" would alert on an undisturbed stream most of the time: the
# service looks at its sliding window every second, hundreds of nearly independent windows a
# day, five statistics each. At 3.72 deviations (one window in 10,000), 100,000 test images still
# raised 24 alerts (BENCHMARKS.md, "Drift"); a real shift moves a figure by tens of deviations, so
# the margin costs an alert little time.
LEVEL_Z = 6.0
# A share is a count of answers out of the window's, and its level the count whose binomial tail
# is the normal's beyond LEVEL_Z deviations (1e-9). The log-normal fits a count badly where it is
# small: on windows of 100 answers, most of them with 0 to 5 out of distribution, it put the level
# at 0.88 for the LeNet and at 1.1 for the ResNet-20, a share no window could exceed.
LEVEL_TAIL = 0.5 * math.erfc(LEVEL_Z / math.sqrt(2))
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
    # Levels for a window that holds fewer answers than ``window``, by that count (a decimal string:
    # JSON's keys are); {} in a graph exported before them, whose window is judged only once full.
    early_levels: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)

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
        if not _is_levels(self.levels):
            raise UsageError(f"drift reference: levels must give a finite number for each of {list(STATISTICS)}")
        early = self.early_levels
        if not isinstance(early, dict) or not all(
            isinstance(count, str)
            and count.isascii()
            and count.isdigit()
            and 0 < int(count) < self.window
            and _is_levels(levels)
            for count, levels in early.items()
        ):
            raise UsageError(
                f"drift reference: early_levels must map counts of answers under the window ({self.window:,}) "
                f"to levels for each of {list(STATISTICS)}"
            )

    @property
    def classes(self) -> int:
        return len(self.class_shares)

    @property
    def features(self) -> int:
        return len(self.feature_mean)

    @property
    def minimum_answers(self) -> int:
        """The fewest answers a window is judged on: the smallest count levels were fitted for."""
        return min([int(count) for count in self.early_levels] + [self.window])

    def levels_for(self, answers: int) -> tuple[int, dict[str, float]] | None:
        """The levels a window of ``answers`` is judged against, with the count they were fitted
        for (the largest at most ``answers``); None under :attr:`minimum_answers`."""
        fitted = {int(count): levels for count, levels in self.early_levels.items()} | {self.window: self.levels}
        counts = [count for count in fitted if count <= answers]
        return (max(counts), fitted[max(counts)]) if counts else None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DriftReference:
        data = json_object(text, "drift reference")
        known = {f.name for f in dataclasses.fields(cls)}
        if set(data) not in (known, known - {"early_levels"}):  # a graph exported before them has none
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
    :data:`LEVEL_Z` standard deviations, in logs; a share's from the binomial (:func:`share_level`).

    Each window is drawn with replacement from a resample of the answers (a two-stage bootstrap):
    its spread then counts the held-out set's own sampling error beside the window's. Those few
    thousand images are not the population: on the LeNet's test images the mean OOD distance
    sits 0.8 window deviations above theirs, and every window of real traffic moves with it.
    A share's level can come out at 1 (nearly every held-out answer unsure for that reason), which
    no window could exceed: :func:`fit_all_levels` clamps it."""
    rng = np.random.default_rng(seed)
    count = len(answers[0])
    classes, reasons, distances, features = answers
    features = np.asarray(features, np.float64)
    rates: dict[str, list[float]] = {name: [] for name in SHARES}  # each resample's share, per reason
    values: dict[str, list[np.ndarray]] = {}
    chunk = max(1, LEVEL_CHUNK_FLOATS // (window * features.shape[1]))
    for start in range(0, LEVEL_WINDOWS, chunk):
        drawn = []
        for _ in range(min(chunk, LEVEL_WINDOWS - start)):
            resample = rng.integers(0, count, count)
            drawn.append(resample[rng.integers(0, count, window)])
            for name, code in zip(SHARES, (OUT_OF_DISTRIBUTION, LOW_CONFIDENCE)):
                # half an answer more, so that a reason no held-out answer had is rare, not impossible
                rates[name].append((np.count_nonzero(reasons[resample] == code) + 0.5) / (count + 1))
        rows = np.stack(drawn)
        for name, value in window_statistics(gaussian, shares, classes[rows], distances[rows], features[rows]).items():
            values.setdefault(name, []).append(value)
    levels = {name: share_level(np.asarray(seen), window) for name, seen in rates.items()}
    for name, seen in values.items():
        logs = np.log(np.maximum(np.concatenate(seen), np.finfo(np.float64).tiny))  # a Fréchet distance can round to 0
        levels[name] = float(np.exp(logs.mean() + LEVEL_Z * logs.std()))
    return {name: levels[name] for name in STATISTICS}


def window_statistics(
    reference: Gaussian, shares: np.ndarray, classes: np.ndarray, distances: np.ndarray, features: np.ndarray
) -> dict[str, np.ndarray]:
    """:func:`statistics`' class PSI, Fréchet distance and mean OOD distance for many windows at
    once: ``classes`` [B, N], ``distances`` [B, N], ``features`` [B, N, D] -> [B] each. The level fit
    looks at a thousand windows; one at a time, numpy's overhead per call was most of its time."""
    counts = (classes[..., None] == np.arange(len(shares))).sum(axis=1) + PSI_PSEUDOCOUNT
    observed = counts / counts.sum(axis=1, keepdims=True)
    psi = ((observed - shares) * np.log(observed / shares)).sum(axis=1)
    mean = features.mean(axis=1)
    centered = features - mean[:, None]
    cov = centered.transpose(0, 2, 1) @ centered / (features.shape[1] - 1)
    inner = np.linalg.eigvalsh(reference.root @ cov @ reference.root)
    cross = np.sqrt(np.clip(inner, 0, None)).sum(axis=1)
    gap = reference.mean - mean
    frechet = (gap * gap).sum(axis=1) + np.trace(reference.cov) + np.trace(cov, axis1=1, axis2=2) - 2 * cross
    return {"class_psi": psi, "feature_frechet": frechet, "mean_ood_distance": distances.mean(axis=1)}


def share_level(rates: np.ndarray, window: int) -> float:
    """The level of a share of ``window`` answers whose rate is each of ``rates`` (resamples of the
    held-out answers) in turn: k / window for the fewest answers k that windows drawn so exceed
    with a chance of at most :data:`LEVEL_TAIL`, the binomial tail averaged over the rates."""
    log_factorials = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, window + 1)))])
    k = np.arange(window + 1)
    log_choose = log_factorials[window] - log_factorials[k] - log_factorials[window - k]
    above = np.zeros(window + 1)  # the chance of more than k answers, averaged over the rates
    rates, weights = np.unique(rates, return_counts=True)
    for rate, weight in zip(rates, weights):
        pmf = np.exp(log_choose + k * math.log(rate) + (window - k) * math.log1p(-rate))
        above += weight * (np.cumsum(pmf[::-1])[::-1] - pmf)  # summed from the top: no 1 - (1 - 1e-9)
    fewest = np.argmax(above / weights.sum() <= LEVEL_TAIL)  # `above` falls to 0 at k = window
    return float(fewest / window)


@dataclass(frozen=True)
class Clamp:
    """A share's level that came out at 1 or more, which no window could exceed, and was set to
    one answer under 1: a window of nothing but such answers still alerts."""

    answers: int  # the window size the level was fitted for
    statistic: str
    fitted: float
    level: float


def fit_all_levels(
    shares: np.ndarray, gaussian: Gaussian, answers: tuple[np.ndarray, ...], window: int, seed: int = 0
) -> tuple[dict[str, float], dict[str, dict[str, float]], list[Clamp]]:
    """The levels of a full ``window`` and of each smaller count of :data:`EARLY_ANSWERS`, each
    fitted as :func:`fit_levels` fits them, on windows of that many answers; and the shares'
    levels that were clamped under 1."""
    fitted = {count: fit_levels(shares, gaussian, answers, count, seed) for count in EARLY_ANSWERS if count < window}
    fitted[window] = fit_levels(shares, gaussian, answers, window, seed)
    clamps = [
        Clamp(count, name, levels[name], 1 - 1 / count)
        for count, levels in fitted.items()
        for name in SHARES
        if levels[name] >= 1
    ]
    for clamp in clamps:
        fitted[clamp.answers][clamp.statistic] = clamp.level
    full = fitted.pop(window)
    return full, {str(count): levels for count, levels in fitted.items()}, clamps


@dataclass(frozen=True)
class Reading:
    """A window's statistics now, and what they are judged against."""

    answers: int  # the answers the figures are over: the window's, or fewer while it fills
    figures: dict[str, float]  # per statistic of STATISTICS
    level_answers: int  # the window size the levels were fitted for: answers, or the largest count under it
    levels: dict[str, float]

    @property
    def alerts(self) -> list[str]:
        """The statistics above their level."""
        return [name for name in STATISTICS if self.figures[name] > self.levels[name]]


class Window:
    """The last ``reference.window`` answers of one model, in ring buffers: bounded memory
    (about 4 bytes x (features + 2) per answer), and :meth:`read` over them from
    ``reference.minimum_answers`` on."""

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

    @property
    def answers(self) -> int:
        """The answers the window holds: all it has seen, up to its size."""
        return min(self.seen, len(self.classes))

    def read(self) -> Reading | None:
        """The statistics of the answers held and their levels; None under the reference's
        minimum_answers, for which no level was fitted."""
        count = self.answers
        fitted = self.reference.levels_for(count)
        if fitted is None:
            return None
        # While the ring fills, its first `count` rows are the answers (add writes from 0 on).
        held = (part[:count] for part in (self.classes, self.reasons, self.distances, self.features))
        return Reading(count, statistics(self.gaussian, self.shares, *held), *fitted)


def _floats(reference: DriftReference, name: str) -> np.ndarray:
    try:
        return np.asarray(getattr(reference, name), np.float64)
    except (TypeError, ValueError):  # not numbers, or ragged
        raise UsageError(f"drift reference: {name} must be numbers in a regular array") from None


def _is_levels(levels: Any) -> bool:
    return isinstance(levels, dict) and sorted(levels) == sorted(STATISTICS) and all(map(_is_finite, levels.values()))


def _is_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
