"""Each served model watches its own inputs: a drift window over its last answers
(``model_store.drift``), compared with the reference export fitted on held-out images.

The figures are Prometheus gauges, ``classify_drift{model, statistic}``, beside the levels they are
judged against, ``classify_drift_level{model, statistic}``, and the count of answers they are over,
``classify_drift_answers{model}``, so one alert rule fits every model and statistic
(``deploy/prometheus-rules.yaml``): ``classify_drift > on(model, statistic) classify_drift_level``.
A window is judged from its reference's ``minimum_answers`` (100 for the shipped models) against
levels fitted for that many answers; before that a model's gauges have no sample at all, never a 0
that would read as "no drift". A model unloaded or replaced sets its figures to :data:`UNKNOWN`,
which the rule ignores, until its new version has answers enough. ``GET /monitor`` answers the
same figures, fresh, with their count, the levels and a short history for the ``/ui`` charts.

Each service worker watches the answers it gave; the gauges keep the highest worker's figure
(``livemax``), so an alert fires when any worker's window crosses. A model exported before the
drift reference existed is served as before and listed as not monitored, with the reason.
"""

from __future__ import annotations

import threading
import time
from collections import deque

import numpy as np

from model_store.drift import STATISTICS, Reading, Window
from model_store.engine import OnnxClassifier, Outcomes, Scored
from serving import metrics

# The figures cost about 2 ms (a covariance of the window's features and one 84 x 84 eigen-
# decomposition): recomputed from the batch path at most this often, and on every GET /monitor.
REFRESH_S = 1.0
HISTORY_EVERY_S = 10.0  # a point of the /ui charts at most this often ...
HISTORY_POINTS = 360  # ... and this many kept per model: an hour at full rate, about 50 KB
# A drift gauge's value when its figure is not known (the model's version that made it is gone):
# below every level, and below every figure, so neither the rule nor livemax takes it for one.
UNKNOWN = -1.0


class Monitor:
    """One served model's engine, with its drift window in the batch path: :meth:`score` is the
    batcher's unit of work."""

    def __init__(self, name: str, engine: OnnxClassifier, clock=time.monotonic):
        self.name, self.engine, self.clock = name, engine, clock
        reference = engine.drift_reference
        self.window = Window(reference) if reference is not None else None
        self.history: deque[dict] = deque(maxlen=HISTORY_POINTS)
        self._refreshed = self._recorded = -float("inf")
        # The batch path only keeps each batch's outcomes (arrays it made anyway); the window takes
        # them in at the next refresh, where their reasons cost one vectorized pass for all of them.
        # At most a window's worth waits: older ones would fall out of the window unseen anyway.
        self._pending: deque[Outcomes] = deque()
        self._pending_rows = 0
        self.seen = 0  # answers given, counted here: pending ones may never reach the window
        self._lock = threading.Lock()  # the batch thread adds while a GET /monitor reads
        self._published = self.retired = False  # the gauges: made at the first reading, so no 0 before it

    def score(self, pixels: np.ndarray) -> list[Scored]:
        """Each image's :class:`Scored`, its answer added to the window."""
        outcomes = self.engine.outcomes(pixels)
        if self.window is not None:
            with self._lock:
                self._pending.append(outcomes)
                self._pending_rows += len(outcomes.energies)
                self.seen += len(outcomes.energies)
                while self._pending_rows - len(self._pending[0].energies) >= self.window.reference.window:
                    self._pending_rows -= len(self._pending.popleft().energies)
            if self.clock() - self._refreshed >= REFRESH_S:
                self.refresh()
        return outcomes.rows()

    def _take_in(self) -> None:
        """Move the pending outcomes into the window (under the lock)."""
        if not self._pending:
            return
        batch = Outcomes(*(np.concatenate([getattr(o, name) for o in self._pending]) for name in Outcomes._fields))
        self._pending.clear()
        self._pending_rows = 0
        confidences = batch.probabilities.max(axis=1)
        codes = self.engine.card.calibration.reason_codes(confidences, batch.energies, batch.distances)
        self.window.add(batch.probabilities.argmax(axis=1), codes, batch.distances, batch.features)

    def refresh(self) -> Reading | None:
        """Recompute the figures, set the gauges and, at most every HISTORY_EVERY_S, keep a point.
        None while the window holds fewer answers than its reference's minimum_answers."""
        if self.window is None:
            return None
        now = self.clock()
        self._refreshed = now
        with self._lock:  # a copy, so that the arithmetic runs outside the lock
            self._take_in()
            if self.window.answers < self.window.reference.minimum_answers:
                return None
            snapshot, seen = self.window.copy(), self.seen
        reading = snapshot.read()
        self._publish(reading)
        if now - self._recorded >= HISTORY_EVERY_S:
            self._recorded = now
            point = {"time": round(time.time(), 1), "images": seen, "answers": reading.answers}
            self.history.append(point | reading.figures)
        return reading

    def _publish(self, reading: Reading) -> None:
        if self.retired:  # a batch of the old version, finishing after the new one was installed
            return
        self._published = True
        for statistic in STATISTICS:
            metrics.drift.labels(model=self.name, statistic=statistic).set(reading.figures[statistic])
            metrics.drift_level.labels(model=self.name, statistic=statistic).set(reading.levels[statistic])
        metrics.drift_answers.labels(model=self.name).set(reading.answers)

    def retire(self) -> None:
        """This version of the model no longer serves: its figures are no longer known. Its gauges
        (the model's name's, which the next version takes over) read UNKNOWN until the next one's first reading."""
        self.retired = True
        if self._published:
            for statistic in STATISTICS:
                metrics.drift.labels(model=self.name, statistic=statistic).set(UNKNOWN)
            metrics.drift_answers.labels(model=self.name).set(0)

    def rename(self, name: str) -> None:
        """Publish under ``name`` from now on (a candidate promoted): its old gauges read UNKNOWN."""
        self.retire()
        self.name, self.retired, self._published = name, False, False

    def describe(self, tag: str) -> dict:
        """What ``GET /monitor`` answers for this model: the window now, the levels, the alerts."""
        if self.window is None:
            return {
                "model": tag,
                "monitored": False,
                "reason": "its graph has no drift reference: export it again (python -m export, or "
                "python -m export.ood_head on the graph)",
            }
        reading = self.refresh()
        reference = self.window.reference
        answers = min(self.seen, reference.window)
        if reading is not None:
            level_answers, levels = reading.level_answers, reading.levels
        else:  # the levels the first reading will be judged against
            level_answers, levels = reference.levels_for(reference.minimum_answers)
        return {
            "model": tag,
            "monitored": True,
            "window": reference.window,
            "minimum_answers": reference.minimum_answers,
            "images_seen": self.seen,
            "answers": answers,  # the figures are over these: the last ones, up to a window
            "figures": reading.figures if reading else None,  # null under minimum_answers
            "levels": levels,
            "level_answers": level_answers,  # the window size the levels were fitted for
            "level_images": reference.level_images,  # the held-out images they were fitted on
            "alerts": reading.alerts if reading else [],
            "history": list(self.history),
        }
