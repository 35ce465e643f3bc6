"""Adaptive batching inside the serving process.

Concurrent requests each submit one input; a single loop runs the engine on everything that
queued up while the previous batch was running (up to ``max_batch_size``). An idle server thus
answers at batch 1 with no added wait, and a loaded one batches as wide as its backlog. A
``max_wait_s`` above zero lets a batch wait that long for more inputs (more throughput per call on
a GPU, at that cost in latency).

A batch runs on a thread, so the event loop goes on reading and decoding meanwhile; but one of at
most ``inline_max`` inputs runs on the loop itself: for a small model at low load, the hop to a
thread and back costs more CPU and latency than the inference (LeNet at batch 1: ~0.03 ms).

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


class MicroBatcher:
    """``await submit(x)`` -> ``infer(stack([x, ...]))[i]``, with concurrent submits batched together.

    ``on_batch(size, waits, seconds)`` is told each batch's size, how long each of its inputs
    waited in the queue, and how long the engine took. Batches of at most ``inline_max`` inputs
    run on the event loop, larger ones on a thread.
    """

    def __init__(
        self,
        infer: Callable[[np.ndarray], np.ndarray],
        max_batch_size: int = 64,
        max_wait_s: float = 0.0,
        on_batch: Callable[[int, list[float], float], None] | None = None,
        inline_max: int = 0,
    ):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.infer, self.max_batch_size, self.max_wait_s, self.on_batch = infer, max_batch_size, max_wait_s, on_batch
        self.inline_max = inline_max
        self.closed = False
        self._queue: asyncio.Queue[tuple[np.ndarray, asyncio.Future, float] | None] | None = None
        self._worker: asyncio.Task | None = None

    async def submit(self, item: np.ndarray) -> np.ndarray:
        if self._worker is None or self._worker.done():
            # Created on first use: the queue and task belong to the event loop that serves requests.
            self._queue = asyncio.Queue()
            self._worker = asyncio.create_task(self._run())
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((item, future, time.perf_counter()))  # unbounded: admission is bounded upstream
        return await future

    def close(self) -> None:
        """Stop once what is queued is answered (a model unloaded or replaced). A submit that
        comes later is still answered: it starts a worker that stops again when the queue is empty."""
        self.closed = True
        if self._queue is not None:
            self._queue.put_nowait(None)  # wakes an idle worker to see it is closed

    async def _run(self) -> None:
        assert self._queue is not None
        while True:
            if self.closed and self._queue.empty():
                return
            batch = [await self._queue.get()]
            if self.max_wait_s > 0:
                deadline = time.perf_counter() + self.max_wait_s
                while len(batch) < self.max_batch_size and (left := deadline - time.perf_counter()) > 0:
                    try:
                        batch.append(await asyncio.wait_for(self._queue.get(), left))
                    except TimeoutError:
                        break
            while len(batch) < self.max_batch_size and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            # None: close()'s wake-up call; a cancelled future: a client that gave up
            batch = [entry for entry in batch if entry is not None and not entry[1].cancelled()]
            if not batch:
                continue
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
