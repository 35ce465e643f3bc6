import asyncio
import time

import numpy as np
import pytest

from serving.batching import MicroBatcher


def test_concurrent_submits_are_batched_and_each_gets_its_own_row():
    sizes = []

    def slow_double(batch: np.ndarray) -> np.ndarray:
        time.sleep(0.05)  # while the first batch runs, the others queue up
        return batch * 2

    async def main():
        batcher = MicroBatcher(slow_double, max_batch_size=8, on_batch=sizes.append)
        return await asyncio.gather(*(batcher.submit(np.array([i])) for i in range(20)))

    results = asyncio.run(main())
    assert [int(r[0]) for r in results] == [2 * i for i in range(20)]
    assert sum(sizes) == 20 and max(sizes) == 8 and len(sizes) < 20


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
