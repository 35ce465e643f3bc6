import asyncio
import threading

import numpy as np
import pytest

from serving import batching
from serving.batching import MicroBatcher
from serving.model_set import fill_size


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


async def _submit_one_per_turn(batcher: MicroBatcher, count: int) -> list:
    """``count`` inputs, one each loop turn, as gRPC's server hands calls over: the answers."""
    submitted = []
    for i in range(count):
        submitted.append(asyncio.create_task(batcher.submit(np.array([i]))))
        await asyncio.sleep(0)
    return await asyncio.gather(*submitted)


def test_a_busy_loop_fills_batches_up_to_the_model_s_size(monkeypatch):
    """Inputs handed over one a loop turn ran one a batch (the test above); with the loop busy and
    requests overlapping, batches wait for more, up to ``fill_to`` and never past it (on the loop,
    so that none can queue while a batch runs). The last one
    cannot fill and runs when its wait (1 s) is over; a gap of 0.5 s between two inputs of the
    producer would close a fill early, far more than a loop turn takes on any machine."""
    monkeypatch.setattr(batching, "BUSY_SHARE", 0.0)  # the test's loop counts as saturated
    monkeypatch.setattr(batching, "MIN_GAP_S", 0.5)
    sizes = []

    async def main():
        batcher = MicroBatcher(
            lambda b: b, 64, on_batch=lambda size, *_: sizes.append(size), inline_max=64, fill_s=1.0, fill_to=4
        )
        await asyncio.gather(batcher.submit(np.array([-2])), batcher.submit(np.array([-1])))  # requests overlap
        return await _submit_one_per_turn(batcher, 64)

    assert [int(r[0]) for r in asyncio.run(main())] == list(range(64))
    assert sizes[0] == 2 and sum(sizes) == 66
    assert max(sizes) == 4 and all(size > 1 for size in sizes[:-1])


def test_a_lone_client_is_never_kept_waiting(monkeypatch):
    """One client at a time (each request sent once the last is answered): nothing can arrive while
    a batch waits, so none waits, even with the loop busy and a minute allowed."""
    monkeypatch.setattr(batching, "BUSY_SHARE", 0.0)
    sizes = []

    async def main():
        batcher = MicroBatcher(lambda b: b, on_batch=lambda size, *_: sizes.append(size), fill_s=60.0, fill_to=8)
        return [await asyncio.wait_for(batcher.submit(np.array([i])), 20) for i in range(20)]

    assert [int(r[0]) for r in asyncio.run(main())] == list(range(20)) and sizes == [1] * 20


def test_an_idle_loop_does_not_wait_for_company():
    """Requests overlapped once, but the loop sleeps between them (it is not saturated): a batch
    waiting would only add latency, so a lone input runs at once despite a minute allowed."""
    sizes = []

    async def main():
        batcher = MicroBatcher(lambda b: b, on_batch=lambda size, *_: sizes.append(size), fill_s=60.0, fill_to=8)
        await asyncio.gather(batcher.submit(np.array([0])), batcher.submit(np.array([1])))
        answers = []
        for i in range(2, 5):
            await asyncio.sleep(0.05)  # the loop idles: its CPU share falls far below BUSY_SHARE
            answers.append(await asyncio.wait_for(batcher.submit(np.array([i])), 20))
        return answers

    assert [int(r[0]) for r in asyncio.run(main())] == [2, 3, 4] and sizes == [2, 1, 1, 1]


def test_fill_size_is_where_an_image_costs_near_its_cheapest():
    # the LeNet measured here (seconds a batch): 1.5 times 0.03 ms an image first holds at 8
    seconds = {1: 0.14e-3, 2: 0.18e-3, 4: 0.24e-3, 8: 0.34e-3, 16: 0.57e-3, 32: 1.0e-3, 64: 1.9e-3}
    assert fill_size(seconds) == 8
    assert fill_size({1: 1e-3, 2: 2e-3}) == 1  # no batch is cheaper an image: nothing to wait for
