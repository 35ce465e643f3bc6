"""Capture: each image a model answered ``unsure``, and a random sample of its sure answers, kept
with what it answered (``model_store.captures``), so that people can label them (``/review``).
Off unless ``SERVING_CAPTURE`` names a store: a folder, or ``s3://bucket/prefix``.

Capture stays off the request path. A request only decides (its answer's reason, a random draw for
a sure one, a token bucket for the rate cap) and hands the bytes it already holds to a bounded
queue; one writer thread hashes and stores them. A full queue, and a slow, full, read-only or
vanished store, drop captures and count them (``classify_capture_dropped{reason}``); a request is
never failed, slowed or blocked by them, and capture resumes by itself once the store takes
writes again.

Bounds, per service worker: the queue holds at most :data:`QUEUE_ITEMS` captures and
``SERVING_CAPTURE_QUEUE_MB`` of bytes; at most ``SERVING_CAPTURE_RATE`` captures a second are
taken. Per model, the store holds at most ``SERVING_CAPTURE_MAX_IMAGES`` images and
``SERVING_CAPTURE_MAX_MB`` of them; past either, the oldest capture nobody has labelled yet is
evicted for the new one (``classify_capture_evicted``), and when every capture is labelled the new
one is dropped (reason ``quota``). A worker counts what the store held when it first wrote for a
model, plus what it wrote since: with several workers or replicas on one store, each keeps its own
count, so the store holds at most that many times the quota. Labels given elsewhere (the CLI,
another replica) reach the count when it is read again, every :data:`BOOK_REFRESH_S`.
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass

from model_store.captures import CaptureStore, extension
from model_store.engine import Scored, rank
from serving import metrics
from serving.logs import log_event

QUEUE_ITEMS = 256  # captures waiting for the writer, at most
TOP = 3  # the probabilities kept with each capture: the review page shows the top 3
BOOK_REFRESH_S = 600.0  # the store's captures and labels read again this often, per model
WARN_EVERY_S = 60.0  # a failing store is logged at most this often


@dataclass
class Pending:
    model: str  # the model's name: its folder in the store
    tag: str
    data: bytes
    scored: Scored
    class_names: tuple[str, ...]
    reason: str
    time: float


class Book:
    """What the store holds for one model, as this worker counts it: each capture's size, oldest
    first, and which are labelled (those are never evicted)."""

    def __init__(self, store: CaptureStore, model: str, clock):
        self.read_at = clock()
        self.sizes: OrderedDict[str, int] = OrderedDict()
        labelled = store.labels(model)
        for row in store.rows(model):
            self.sizes[row["sha256"]] = row["bytes"]
        self.labelled = set(labelled) & set(self.sizes)
        self.bytes = sum(self.sizes.values())

    def add(self, sha: str, size: int) -> None:
        self.sizes[sha] = size
        self.bytes += size

    def oldest_unlabelled(self) -> str | None:
        return next((sha for sha in self.sizes if sha not in self.labelled), None)

    def forget(self, sha: str) -> None:
        self.bytes -= self.sizes.pop(sha, 0)
        self.labelled.discard(sha)


class Capture:
    """The queue and its writer thread; :meth:`offer` is called on the event loop for each answer."""

    def __init__(
        self,
        store: CaptureStore,
        sample: float,
        rate: float,
        max_images: int,
        max_bytes: int,
        queue_bytes: int,
        clock=time.monotonic,
    ):
        self.store, self.sample, self.rate = store, sample, rate
        self.max_images, self.max_bytes, self.queue_bytes = max_images, max_bytes, queue_bytes
        self.clock = clock
        self.tokens, self.filled_at = max(1.0, rate), clock()  # the rate cap's bucket: a second's worth
        self.queue: deque[Pending] = deque()
        self.queued_bytes = 0
        self.books: dict[str, Book] = {}
        self.failing_since: float | None = None
        self.warned_at = -float("inf")
        self.ready = threading.Condition()
        self.closed = False
        self.writer = threading.Thread(target=self.run, name="capture-writer", daemon=True)
        self.writer.start()

    @classmethod
    def from_config(cls, config) -> Capture:
        """The capture ``config`` (a ServingConfig) asks for; a store that cannot be opened stops the service."""
        return cls(
            CaptureStore(config.capture),
            config.capture_sample,
            config.capture_rate,
            config.capture_max_images,
            config.capture_max_mb * 2**20,
            config.capture_queue_mb * 2**20,
        )

    # On the event loop: decide and enqueue, nothing that waits. ----------------------------------

    def offer(self, model, data: bytes, scored: Scored, unsure_reason: str | None) -> None:
        """Keep this answer's image if the rules say so: ``model`` is the ServedModel that answered."""
        reason = unsure_reason or ("sample" if self.sample and random.random() < self.sample else None)
        if reason is None:
            return
        now = self.clock()
        self.tokens = min(max(1.0, self.rate), self.tokens + (now - self.filled_at) * self.rate)
        self.filled_at = now
        if self.tokens < 1:
            return metrics.capture_dropped.labels(reason="rate").inc()
        self.tokens -= 1
        size = len(data)
        with self.ready:
            if len(self.queue) >= QUEUE_ITEMS or self.queued_bytes + size > self.queue_bytes:
                return metrics.capture_dropped.labels(reason="queue_full").inc()
            card = model.engine.card
            self.queue.append(Pending(model.name, model.tag, data, scored, card.class_names, reason, time.time()))
            self.queued_bytes += size
            self.ready.notify()

    # The writer thread. --------------------------------------------------------------------------

    def run(self) -> None:
        while True:
            with self.ready:
                while not self.queue and not self.closed:
                    self.ready.wait()
                if self.closed and not self.queue:
                    return
                item = self.queue.popleft()
                self.queued_bytes -= len(item.data)
            try:
                self.write(item)
            except Exception as err:  # the store failed: count, say so now and then, go on
                metrics.capture_dropped.labels(reason="store_error").inc()
                self.books.pop(item.model, None)  # read again once the store answers
                now = self.clock()
                if self.failing_since is None:
                    self.failing_since = now
                if now - self.warned_at >= WARN_EVERY_S:
                    self.warned_at = now
                    log_event("capture_store_failing", logging.WARNING, store=self.store.uri, error=f"{err}"[:500])
            else:
                if self.failing_since is not None:
                    log_event(
                        "capture_store_back", store=self.store.uri, after_s=round(self.clock() - self.failing_since, 1)
                    )
                    self.failing_since = None

    def book(self, model: str) -> Book:
        book = self.books.get(model)
        if book is None or self.clock() - book.read_at > BOOK_REFRESH_S:
            if book is None:
                removed = self.store.repair(model)  # what a kill left: images without a row
                if removed:
                    log_event("capture_repaired", model=model, removed=removed)
            book = self.books[model] = Book(self.store, model, self.clock)
        return book

    def write(self, item: Pending) -> None:
        data = bytes(item.data)
        sha = hashlib.sha256(data).hexdigest()
        book = self.book(item.model)
        if sha in book.sizes:
            return metrics.capture_dropped.labels(reason="duplicate").inc()  # stored once
        if len(data) > self.max_bytes:
            return metrics.capture_dropped.labels(reason="quota").inc()
        while len(book.sizes) + 1 > self.max_images or book.bytes + len(data) > self.max_bytes:
            oldest = book.oldest_unlabelled()
            if oldest is None:
                return metrics.capture_dropped.labels(reason="quota").inc()
            self.store.remove(item.model, oldest)
            book.forget(oldest)
            metrics.capture_evicted.labels(model=item.model).inc()
        self.store.add(item.model, row(item, sha, len(data)), data)
        book.add(sha, len(data))
        metrics.captured.labels(model=item.model, reason=item.reason).inc()

    def labelled(self, model: str, shas: list[str]) -> None:
        """Labels given through this worker: those captures are no longer evicted."""
        if (book := self.books.get(model)) is not None:
            book.labelled.update(sha for sha in shas if sha in book.sizes)

    def removed(self, model: str, sha: str) -> None:
        if (book := self.books.get(model)) is not None:
            book.forget(sha)

    def close(self, timeout_s: float = 5.0) -> None:
        with self.ready:
            self.closed = True
            self.ready.notify()
        self.writer.join(timeout_s)


def row(item: Pending, sha: str, size: int) -> dict:
    """A capture's manifest row."""
    probabilities = item.scored.probabilities
    top = rank(probabilities, min(TOP, len(probabilities))).tolist()
    ranked = [{"label": item.class_names[i], "probability": float(probabilities[i])} for i in top]
    return {
        "sha256": sha,
        "model": item.tag,
        "time": item.time,
        "reason": item.reason,
        "label": ranked[0]["label"],
        "probability": ranked[0]["probability"],
        "top_k": ranked,
        "ood_distance": None if item.scored.distance is None else float(item.scored.distance),
        "energy": float(item.scored.energy),
        "bytes": size,
        "ext": extension(item.data),
    }
