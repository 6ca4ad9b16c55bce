"""The dynamic batcher on its own: coalescing, bounded queue, deadlines (no server needed)."""
import asyncio
import threading
import time

import pytest

from gmv_server.batcher import DeadlinePassedError, DynamicBatcher, QueueFullError
from gmv_server.metrics import ServerMetrics


def recording_runner(delay_s: float = 0.0):
    batches = []

    def run(images, top_ks):
        batches.append(list(images))
        time.sleep(delay_s)
        return [f"result:{image}:{k}" for image, k in zip(images, top_ks)]

    return run, batches


def test_concurrent_requests_are_coalesced_and_uncrossed():
    run, batches = recording_runner()

    async def main():
        batcher = DynamicBatcher(run, ServerMetrics(), max_batch_size=8, max_queue_delay_s=0.05)
        batcher.start()
        results = await asyncio.gather(*(batcher.submit(f"img{i}", i, None) for i in range(20)))
        await batcher.stop()
        return results

    results = asyncio.run(main())
    assert results == [f"result:img{i}:{i}" for i in range(20)]
    assert [len(b) for b in batches] == [8, 8, 4]


def test_full_queue_is_refused_at_once():
    started = threading.Event()

    def slow(images, top_ks):
        started.set()
        time.sleep(0.3)
        return [None] * len(images)

    async def main():
        batcher = DynamicBatcher(slow, ServerMetrics(), max_batch_size=1, max_queue_delay_s=0, max_queue_size=2)
        batcher.start()
        first = asyncio.create_task(batcher.submit("a", 1, None))
        await asyncio.to_thread(started.wait)  # "a" is running; the queue is empty again
        queued = [asyncio.create_task(batcher.submit(x, 1, None)) for x in "bc"]
        await asyncio.sleep(0)
        with pytest.raises(QueueFullError):
            await batcher.submit("d", 1, None)
        await asyncio.gather(first, *queued)
        await batcher.stop()

    asyncio.run(main())


def test_expired_deadline_is_dropped_not_computed():
    run, batches = recording_runner()
    metrics = ServerMetrics()

    async def main():
        batcher = DynamicBatcher(run, metrics, max_batch_size=4, max_queue_delay_s=0.05)
        batcher.start()
        expired = batcher.submit("late", 1, time.monotonic() - 1)
        fine = batcher.submit("ok", 1, time.monotonic() + 10)
        results = await asyncio.gather(expired, fine, return_exceptions=True)
        await batcher.stop()
        return results

    late, ok = asyncio.run(main())
    assert isinstance(late, DeadlinePassedError) and ok == "result:ok:1"
    assert batches == [["ok"]]
    assert metrics.deadline_drops._value.get() == 1


def test_a_failing_batch_fails_each_of_its_callers():
    def broken(images, top_ks):
        raise RuntimeError("model exploded")

    async def main():
        batcher = DynamicBatcher(broken, ServerMetrics(), max_batch_size=4, max_queue_delay_s=0.02)
        batcher.start()
        results = await asyncio.gather(*(batcher.submit(i, 1, None) for i in range(3)), return_exceptions=True)
        await batcher.stop()
        return results

    assert all(isinstance(r, RuntimeError) for r in asyncio.run(main()))


def test_one_failing_request_fails_only_itself():
    """A batch that raises is run request by request, so only the request that fails gets the error."""
    def run(images, top_ks):
        if "bad" in images:
            raise ValueError("this image breaks a stage")
        return [f"ok:{image}" for image in images]

    async def main():
        batcher = DynamicBatcher(run, ServerMetrics(), max_batch_size=8, max_queue_delay_s=0.05)
        batcher.start()
        outcomes = await asyncio.gather(*(batcher.submit(name, 1, None) for name in ["a", "bad", "c"]),
                                        return_exceptions=True)
        await batcher.stop()
        return outcomes

    a, bad, c = asyncio.run(main())
    assert (a, c) == ("ok:a", "ok:c")
    assert isinstance(bad, ValueError)
