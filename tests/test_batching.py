import asyncio
import threading

import numpy as np
import pytest

from serving.batching import MicroBatcher


def test_concurrent_submits_are_batched_and_each_gets_its_own_row():
    sizes, running = [], threading.Event()
    go = threading.Event()

    def gated_double(batch: np.ndarray) -> np.ndarray:
        running.set()
        go.wait(10)  # the first batch runs until every other submit has queued
        return batch * 2

    async def main():
        batcher = MicroBatcher(gated_double, max_batch_size=8, on_batch=lambda size, waits, seconds: sizes.append(size))
        first = asyncio.create_task(batcher.submit(np.array([0])))
        await asyncio.to_thread(running.wait, 10)
        rest = [asyncio.create_task(batcher.submit(np.array([i]))) for i in range(1, 20)]
        await asyncio.sleep(0)  # let them all queue
        go.set()
        return await asyncio.gather(first, *rest)

    results = asyncio.run(main())
    assert [int(r[0]) for r in results] == [2 * i for i in range(20)]
    assert sizes == [1, 8, 8, 3]


def test_small_batches_run_on_the_event_loop_and_larger_ones_on_a_thread():
    threads = []

    def record(batch: np.ndarray) -> np.ndarray:
        threads.append((len(batch), threading.get_ident()))
        return batch

    async def main():
        batcher = MicroBatcher(record, max_batch_size=8, inline_max=2)
        await batcher.submit(np.array([0]))
        await asyncio.gather(*(batcher.submit(np.array([i])) for i in range(3)))
        return threading.get_ident()

    loop_thread = asyncio.run(main())
    assert [size for size, _ in threads] == [1, 3]
    assert threads[0][1] == loop_thread and threads[1][1] != loop_thread


def test_a_failing_batch_fails_its_requests_and_the_batcher_keeps_going():
    calls = []

    def flaky(batch: np.ndarray) -> np.ndarray:
        calls.append(len(batch))
        if len(calls) == 1:
            raise RuntimeError("engine broke")
        return batch

    async def main():
        batcher = MicroBatcher(flaky)
        with pytest.raises(RuntimeError, match="engine broke"):
            await batcher.submit(np.zeros(1))
        return await batcher.submit(np.ones(1))

    assert asyncio.run(main())[0] == 1.0


def test_batch_size_must_be_positive():
    with pytest.raises(ValueError, match="max_batch_size must be at least 1, got 0"):
        MicroBatcher(lambda x: x, max_batch_size=0)


def test_max_wait_fills_a_batch_that_would_otherwise_run_at_size_one():
    """Inputs arriving one at a time run alone without a wait, and fill a batch with one. The batch
    closes once full, long before its minute is up: the test decides when each input arrives."""

    async def one_at_a_time(max_wait_s: float) -> tuple[list, list[int]]:
        sizes = []
        batcher = MicroBatcher(
            lambda b: b, max_batch_size=8, max_wait_s=max_wait_s, on_batch=lambda size, *_: sizes.append(size)
        )
        submitted = []
        for i in range(8):
            submitted.append(asyncio.create_task(batcher.submit(np.array([i]))))
            while not max_wait_s and len(sizes) <= i:  # without a wait: until this input's batch has run
                await asyncio.sleep(0)
            await asyncio.sleep(0)  # with one: the batcher has taken the input and waits for more
        return await asyncio.gather(*submitted), sizes

    eager, eager_sizes = asyncio.run(one_at_a_time(0.0))
    filled, filled_sizes = asyncio.run(one_at_a_time(60.0))
    assert [int(r[0]) for r in eager] == [int(r[0]) for r in filled] == list(range(8))
    assert eager_sizes == [1] * 8 and filled_sizes == [8]


@pytest.mark.processes
def test_a_batch_that_does_not_fill_runs_when_its_wait_is_over():
    sizes = []

    async def main():
        batcher = MicroBatcher(
            lambda b: b, max_batch_size=8, max_wait_s=0.05, on_batch=lambda size, *_: sizes.append(size)
        )
        return await asyncio.gather(*(batcher.submit(np.array([i])) for i in range(3)))

    assert [int(r[0]) for r in asyncio.run(main())] == [0, 1, 2] and sizes == [3]
