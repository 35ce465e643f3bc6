"""Each served model watches its own inputs: a drift window over its last answers
(``model_store.drift``), compared with the reference export fitted on held-out images.

The figures are Prometheus gauges, ``classify_drift{model, statistic}``, beside their levels,
``classify_drift_level{model, statistic}``, so one alert rule fits every model and statistic
(``deploy/prometheus-rules.yaml``): ``classify_drift > on(model, statistic) classify_drift_level``.
``GET /monitor`` answers the same figures, fresh, with the levels and a short history for the
``/ui`` charts.

Each service worker watches the answers it gave; the gauges keep the highest worker's figure
(``livemax``), so an alert fires when any worker's window crosses. A model exported before the
drift reference existed is served as before and listed as not monitored, with the reason.
"""

from __future__ import annotations

import threading
import time
from collections import deque

import numpy as np

from model_store.drift import STATISTICS, Window
from model_store.engine import OnnxClassifier, Outcomes, Scored
from serving import metrics

# The figures cost about 2 ms (a covariance of the window's features and one 84 x 84 eigen-
# decomposition): recomputed from the batch path at most this often, and on every GET /monitor.
REFRESH_S = 1.0
HISTORY_EVERY_S = 10.0  # a point of the /ui charts at most this often ...
HISTORY_POINTS = 360  # ... and this many kept per model: an hour at full rate, about 50 KB


class Monitor:
    """One served model's engine, with its drift window in the batch path: :meth:`score` is the
    batcher's unit of work."""

    def __init__(self, name: str, engine: OnnxClassifier, clock=time.monotonic):
        self.engine, self.clock = engine, clock
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
        self._gauges = {s: metrics.drift.labels(model=name, statistic=s) for s in STATISTICS} if self.window else {}
        if reference is not None:
            for statistic, level in reference.levels.items():
                metrics.drift_level.labels(model=name, statistic=statistic).set(level)

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

    def refresh(self) -> dict[str, float] | None:
        """Recompute the figures, set the gauges and, at most every HISTORY_EVERY_S, keep a point."""
        if self.window is None:
            return None
        now = self.clock()
        self._refreshed = now
        with self._lock:  # a copy, so that the arithmetic runs outside the lock
            self._take_in()
            if not self.window.full:
                return None
            snapshot, seen = self.window.copy(), self.seen
        figures = snapshot.figures()
        for statistic, gauge in self._gauges.items():
            gauge.set(figures[statistic])
        if now - self._recorded >= HISTORY_EVERY_S:
            self._recorded = now
            self.history.append({"time": round(time.time(), 1), "images": seen, **figures})
        return figures

    def describe(self, tag: str) -> dict:
        """What ``GET /monitor`` answers for this model: the window now, the levels, the alerts."""
        if self.window is None:
            return {
                "model": tag,
                "monitored": False,
                "reason": "its graph has no drift reference: export it again (python -m export, or "
                "python -m export.ood_head on the graph)",
            }
        figures = self.refresh()
        reference = self.window.reference
        return {
            "model": tag,
            "monitored": True,
            "window": reference.window,
            "images_seen": self.seen,
            "figures": figures,  # null until the window is full
            "levels": reference.levels,
            "alerts": self.window.alerts(figures),
            "history": list(self.history),
        }
