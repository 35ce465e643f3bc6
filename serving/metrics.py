"""Prometheus metrics the service adds to BentoML's own on ``/metrics``.

Scale replicas on ``classify_in_flight`` (or its queue-time histogram): it rises before latency does.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import bentoml

_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, float("inf"))

# Per request, recorded by serving.edge: the hot routes bypass BentoML's request metrics. Labels
# come from fixed sets (the service's routes, the statuses the edge answers), so clients cannot grow them.
requests = bentoml.metrics.Counter(
    name="classify_requests",
    documentation="classify requests answered, by route and status",
    labelnames=["route", "status"],
)
request_seconds = bentoml.metrics.Histogram(
    name="classify_request_seconds",
    documentation="time from a classify request's start to its answer",
    labelnames=["route"],
    buckets=_SECONDS,
)
batch_size = bentoml.metrics.Histogram(
    name="classify_batch_size",
    documentation="images per ONNX Runtime call",
    labelnames=["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, float("inf")),
)
queue_seconds = bentoml.metrics.Histogram(
    name="classify_queue_seconds",
    documentation="time an image waited for its batch to start",
    labelnames=["model"],
    buckets=_SECONDS,
)
inference_seconds = bentoml.metrics.Histogram(
    name="classify_inference_seconds",
    documentation="time of one ONNX Runtime call (one batch)",
    labelnames=["model"],
    buckets=_SECONDS,
)
decode_seconds = bentoml.metrics.Histogram(
    name="classify_decode_seconds",
    documentation="time to decode and resize one image",
    buckets=_SECONDS,
)
rejected = bentoml.metrics.Counter(
    name="classify_rejected",
    documentation="requests or images refused, by reason",
    labelnames=["reason"],
)
# Drift (serving.monitor): per model and statistic (model_store.drift.STATISTICS, a fixed set), the
# figure of the model's window of recent answers and the level an in-distribution window of as many
# answers stays under. No sample until a model's window has answers enough to be judged (never a 0
# for "not known"); -1 (serving.monitor.UNKNOWN) once the version that made the figure is gone.
drift = bentoml.metrics.Gauge(
    name="classify_drift",
    documentation="how far the model's last answers are from its held-out ones, per statistic",
    labelnames=["model", "statistic"],
    multiprocess_mode="livemax",  # the worker whose window is furthest
)
drift_level = bentoml.metrics.Gauge(
    name="classify_drift_level",
    documentation="the level of classify_drift that in-distribution windows of as many answers stay under, "
    "fitted at export",
    labelnames=["model", "statistic"],
    multiprocess_mode="livemax",  # the highest: a worker with fewer answers is judged against a higher level
)
drift_answers = bentoml.metrics.Gauge(
    name="classify_drift_answers",
    documentation="the answers classify_drift is over: the model's last ones, up to its window",
    labelnames=["model"],
    multiprocess_mode="livemax",
)
# Capture (serving.capture): captures stored per model and reason (model_store.captures.REASONS),
# dropped by reason (rate, queue_full, quota, store_error, duplicate: fixed sets), evicted per model.
captured = bentoml.metrics.Counter(
    name="classify_captured",
    documentation="images kept for review, by model and why (out_of_distribution, low_confidence, sample)",
    labelnames=["model", "reason"],
)
capture_dropped = bentoml.metrics.Counter(
    name="classify_capture_dropped",
    documentation="captures not kept: rate (over SERVING_CAPTURE_RATE), queue_full, quota (every capture "
    "labelled), store_error (the store failed), duplicate (that image is stored already)",
    labelnames=["reason"],
)
capture_evicted = bentoml.metrics.Counter(
    name="classify_capture_evicted",
    documentation="unlabelled captures removed, oldest first, to keep a model's store within its quota",
    labelnames=["model"],
)
# Rollout (serving.rollout): per model name (served ones only), side (live, candidate), outcome
# (sure, unsure, error) and event (a fixed set): clients cannot grow them.
rollout_answers = bentoml.metrics.Counter(
    name="classify_rollout_answers",
    documentation="images scored during a rollout, by model, side (live, candidate) and outcome (sure, unsure, error)",
    labelnames=["model", "side", "outcome"],
)
rollout_agreement = bentoml.metrics.Gauge(
    name="classify_rollout_agreement",
    documentation="share of the live model's sure answers that the candidate gave the same class",
    labelnames=["model"],
    multiprocess_mode="livemax",
)
rollout_percent = bentoml.metrics.Gauge(
    name="classify_rollout_percent",
    documentation="share of requests the candidate answers (0: shadow, or no rollout)",
    labelnames=["model"],
    multiprocess_mode="livemax",
)
rollout_events = bentoml.metrics.Counter(
    name="classify_rollout_events",
    documentation="rollout events: started, canary, promoted, rolled_back, auto_rolled_back, shadow_skipped",
    labelnames=["model", "event"],
)
in_flight = bentoml.metrics.Gauge(
    name="classify_in_flight",
    documentation="classify requests being served now",
    multiprocess_mode="livesum",
)


def forget_dead_workers() -> list[int]:
    """Drop the live-gauge files of service processes that died without saying so; returns their pids.

    In multiprocess mode each process keeps its gauges in files named by its pid, and "livesum"
    counts only live processes only if someone removes a dead one's files. After a worker is killed
    (kill -9, the OOM killer) nobody does: its last ``classify_in_flight`` counted forever, and an
    autoscaler saw load that was not there. Each worker calls this at start, so a respawned one
    cleans up after the one it replaces; it also zeroes its own gauge, in case it got the dead
    one's pid (likely in a container's small pid space).
    """
    from prometheus_client import multiprocess

    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    dead = []
    if directory:
        for path in Path(directory).glob("gauge_live*_*.db"):
            pid = int(match.group(1)) if (match := re.search(r"_(\d+)\.db$", path.name)) else None
            if pid is not None and pid != os.getpid() and not _alive(pid):
                multiprocess.mark_process_dead(pid, directory)
                dead.append(pid)
    in_flight.set(0)
    return sorted(set(dead))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True
