"""Adaptive batching inside the serving process.

Concurrent requests each submit one input; a single loop runs the engine on everything that
queued up while the previous batch was running (up to ``max_batch_size``). An idle server thus
answers at batch 1 with no added wait, and a loaded one batches as wide as its backlog. A
``max_wait_s`` above zero lets a batch wait that long for more inputs (more throughput per call on
a GPU, at that cost in latency).

A batch runs on a thread, so the event loop goes on reading and decoding meanwhile; but one of at
most ``inline_max`` inputs runs on the loop itself: for a small model at low load, the hop to a
thread and back costs more CPU and latency than the inference (LeNet at batch 1: ~0.03 ms).

Batching while busy fails where the event loop itself is the bottleneck and hands the batcher one
input per turn: gRPC's server accepts one call a loop turn, so under load its calls reached the
LeNet alone, at 0.2 ms of CPU a batch of one against 0.06 an image in a batch of eight
(BENCHMARKS.md, "The v2 protocol over gRPC"). So a batch smaller than its target waits for more,
up to ``fill_s``, but only when waiting costs no one: while the loop is saturated (it spent at
least :data:`BUSY_SHARE` of its recent time on the CPU: requests are queued in front of it
anyway), and while recent batches found company (with one client, whose next request waits for
this answer, nothing can arrive). Its target is as many inputs as the batches before it held (with
four clients a fifth never comes, and a wait for one would idle the loop), one more every
:data:`REACH_EVERY` batches to see whether the load grew (that wait gives up when no input has
come for :data:`FILL_GAP` usual gaps between arrivals), and at most ``fill_to``: the size at which
its model's images cost near their cheapest, measured at warm-up (``serving.model_set``).

Why not BentoML's ``batchable`` API behind ``bentoml.depends``? That puts an HTTP hop and pickling
between decoding and inference, and in BentoML 1.4.39 the inter-service client closes its session
every 100 requests with requests still in flight (bentoml/BentoML#5541, #5698): about one request
in a hundred failed with a 500 under concurrent load. Batching here has neither problem.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

import numpy as np

logger = logging.getLogger(__name__)

BUSY_SHARE = 0.8  # the loop's CPU time over wall time, at or above which it counts as saturated
BUSY_WINDOW_S = 0.01  # the loop's business is measured over windows at least this long
COMPANY_SHARE = 1 / 64  # batches fill only while at least this share of recent ones had more than one input
REACH_EVERY = 8  # one batch in this many reaches for one input more than the batches before it held
FILL_GAP = 2.0  # a filling batch closes when no input arrived for this many usual gaps between arrivals
MIN_GAP_S = 0.0005  # ... and never sooner than this: a gRPC call takes ~0.5 ms of the loop here
RECENT = 1 / 16  # weight of the latest batch (or gap) in the running shares (and the usual gap)


class MicroBatcher:
    """``await submit(x)`` -> ``infer(stack([x, ...]))[i]``, with concurrent submits batched together.

    ``on_batch(size, waits, seconds)`` is told each batch's size, how long each of its inputs
    waited in the queue, and how long the engine took. Batches of at most ``inline_max`` inputs
    run on the event loop, larger ones on a thread. ``max_wait_s``: every batch waits that long
    to fill (unless full); otherwise, with ``fill_s``, one smaller than ``fill_to`` waits up to
    that long while the loop is busy and requests overlap (the module's docstring).
    """

    def __init__(
        self,
        infer: Callable[[np.ndarray], np.ndarray],
        max_batch_size: int = 64,
        max_wait_s: float = 0.0,
        on_batch: Callable[[int, list[float], float], None] | None = None,
        inline_max: int = 0,
        fill_s: float = 0.0,
        fill_to: int = 1,
    ):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.infer, self.max_batch_size, self.max_wait_s, self.on_batch = infer, max_batch_size, max_wait_s, on_batch
        self.inline_max, self.fill_s, self.fill_to = inline_max, fill_s, fill_to
        self.closed = False
        self._queue: asyncio.Queue[tuple[np.ndarray, asyncio.Future, float] | None] | None = None
        self._worker: asyncio.Task | None = None
        self._target = 0  # the size at which a waiting batch stops waiting
        self._filled: asyncio.Future | None = None  # set while a batch waits: done when it may close
        self._last, self._gap = 0.0, fill_s  # the latest input's arrival, the usual gap between arrivals
        self._company = 0.0  # recent batches' share with more than one input
        self._expect = 0  # inputs a batch waits for: as many as the batches before it held (0: none yet)
        self._batches = 0
        self._busy, self._window = 0.0, (time.perf_counter(), time.thread_time())  # the loop's recent CPU share

    async def submit(self, item: np.ndarray) -> np.ndarray:
        if self._worker is None or self._worker.done():
            # Created on first use: the queue and task belong to the event loop that serves requests.
            self._queue = asyncio.Queue()
            self._worker = asyncio.create_task(self._run())
        loop = asyncio.get_running_loop()
        future, now = loop.create_future(), loop.time()
        if self._filled is not None or not self._queue.empty():  # the pace of inputs that overlap
            self._gap += (min(now - self._last, self.fill_s) - self._gap) * RECENT
        self._last = now
        self._queue.put_nowait((item, future, time.perf_counter()))  # unbounded: admission is bounded upstream
        if self._filled is not None and self._queue.qsize() + 1 >= self._target:
            _close(self._filled)
        return await future

    def close(self) -> None:
        """Stop once what is queued is answered (a model unloaded or replaced). A submit that
        comes later is still answered: it starts a worker that stops again when the queue is empty."""
        self.closed = True
        if self._queue is not None:
            self._queue.put_nowait(None)  # wakes an idle worker to see it is closed
        if self._filled is not None:
            _close(self._filled)

    async def _run(self) -> None:
        assert self._queue is not None
        while True:
            if self.closed and self._queue.empty():
                return
            batch = [await self._queue.get()]
            loop = asyncio.get_running_loop()
            gave_up = False
            if self.max_wait_s > 0:
                await self._fill(self.max_batch_size, loop.time() + self.max_wait_s, None)
            elif self._queue.qsize() + 1 < (target := self._fill_target()) and self._worth_filling():
                # a fill for as many as came before waits for them; one reaching further gives up on a gap
                gap = max(MIN_GAP_S, FILL_GAP * self._gap) if target > self._expect else None
                gave_up = not await self._fill(target, loop.time() + self.fill_s, gap)
            while len(batch) < self.max_batch_size and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            # None: close()'s wake-up call; a cancelled future: a client that gave up
            batch = [entry for entry in batch if entry is not None and not entry[1].cancelled()]
            if not batch:
                continue
            self._company += ((len(batch) > 1) - self._company) * RECENT
            # a fill that gave up lowers the size the next ones wait for by one at most: a pause of a
            # few milliseconds under heavy load does not undo what the fills before it found
            self._expect = max(len(batch), self._expect - 1 if gave_up else self._expect)
            start = time.perf_counter()
            try:
                # The engine releases the GIL; a thread keeps the loop accepting and decoding meanwhile.
                inputs = np.stack([x for x, _, _ in batch])
                if len(batch) <= self.inline_max:
                    outputs = self.infer(inputs)
                else:
                    outputs = await asyncio.to_thread(self.infer, inputs)
            except Exception as err:  # an engine failure fails this batch's requests, not the loop
                logger.exception("inference failed for a batch of %d", len(batch))
                for _, future, _ in batch:
                    if not future.done():
                        future.set_exception(err)
                continue
            if self.on_batch:
                self.on_batch(len(batch), [start - queued for _, _, queued in batch], time.perf_counter() - start)
            for (_, future, _), output in zip(batch, outputs):
                if not future.done():
                    future.set_result(output)

    def _worth_filling(self) -> bool:
        """Whether a batch should wait to fill: a wait is allowed, the loop is saturated, and
        requests overlap. The loop's business is its thread's CPU time over wall time, updated
        once a window (a clock read per batch)."""
        if self.fill_s <= 0 or self.closed:
            return False
        now, cpu = time.perf_counter(), time.thread_time()
        if now - self._window[0] >= BUSY_WINDOW_S:
            self._busy = (cpu - self._window[1]) / (now - self._window[0])
            self._window = (now, cpu)
        return self._busy >= BUSY_SHARE and self._company >= COMPANY_SHARE

    def _fill_target(self) -> int:
        """The size a filling batch waits for (the module's docstring), at least 2."""
        self._batches += 1
        reach = self._expect + 1 if self._batches % REACH_EVERY == 0 else self._expect
        return min(self.fill_to, max(reach, 2))

    async def _fill(self, target: int, until: float, gap: float | None) -> bool:
        """Wait until the batch (its first input taken, the rest queued) has ``target`` inputs, it
        is ``until`` (the loop's clock), or, with ``gap``, no input has arrived for that long. One
        timer at a time, re-armed when it finds that inputs came meanwhile. True: it filled."""
        loop = asyncio.get_running_loop()
        self._target = target
        try:
            while self._queue.qsize() + 1 < target and not self.closed:
                wake = until if gap is None else min(until, self._last + gap)
                if wake <= loop.time():
                    return False
                self._filled = loop.create_future()
                timer = loop.call_at(wake, _close, self._filled)
                try:
                    await self._filled
                finally:
                    timer.cancel()
            return True
        finally:
            self._filled = None


def _close(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)
