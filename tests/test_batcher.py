"""The dynamic batcher on its own: coalescing, bounded queue, deadlines (no server needed)."""
import asyncio
import contextlib
import threading
import time

import pytest

from gmv_server.admission import Admission
from gmv_server.batcher import DeadlinePassedError, DynamicBatcher, QueueFullError
from gmv_server.metrics import ServerMetrics


def recording_runner(delay_s: float = 0.0):
    batches = []

    def run(images, top_ks, checkpoint=None):
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


def test_full_admission_is_refused_at_once():
    async def main():
        admission = Admission(max_requests=2, tenant_share=1.0, metrics=ServerMetrics())
        async with admission.admit("a"), admission.admit("b"):
            with pytest.raises(QueueFullError, match="2 requests in progress"):
                async with admission.admit("c"):
                    pass
        async with admission.admit("c"):  # places are given back when requests end
            pass

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
    def broken(images, top_ks, checkpoint=None):
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
    def run(images, top_ks, checkpoint=None):
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


def gated_runner():
    """A runner whose first batch blocks until released, recording every batch's items."""
    gate, started, batches = threading.Event(), threading.Event(), []

    def run(images, top_ks, checkpoint=None):
        batches.append(list(images))
        started.set()
        gate.wait(5)
        return list(images)

    return run, gate, started, batches


@pytest.mark.parametrize("policy", ["fair", "fifo"])
def test_a_flooding_tenant_does_not_delay_another_tenants_request(policy):
    run, gate, started, batches = gated_runner()

    async def main():
        batcher = DynamicBatcher(run, ServerMetrics(), max_batch_size=4, max_queue_delay_s=0, max_queue_size=64,
                                 queue_policy=policy)
        batcher.start()
        first = asyncio.create_task(batcher.submit("a-first", 1, None, tenant="a"))
        await asyncio.to_thread(started.wait)
        flood = [asyncio.create_task(batcher.submit(f"a{i}", 1, None, tenant="a")) for i in range(20)]
        await asyncio.sleep(0)
        victim = asyncio.create_task(batcher.submit("b", 1, None, tenant="b"))
        await asyncio.sleep(0)
        gate.set()
        await asyncio.gather(first, victim, *flood)
        await batcher.stop()

    asyncio.run(main())
    batch_of_b = next(i for i, batch in enumerate(batches) if "b" in batch)
    if policy == "fair":
        # the very next batch, taken in turn, and first in it: a tenant with no backlog goes first
        assert batch_of_b == 1 and batches[1][:2] == ["b", "a0"]
    else:
        assert batch_of_b == len(batches) - 1  # arrival order: behind the whole flood


def test_past_its_share_a_tenant_waits_in_its_own_line_and_past_that_is_refused():
    from gmv_server.admission import REQUEST_OVERHEAD_BYTES

    async def main():
        # a's line holds 4 requests of 1,000 bytes
        admission = Admission(max_requests=8, tenant_share=0.5, metrics=ServerMetrics(),
                              line_bytes=4 * (1000 + REQUEST_OVERHEAD_BYTES))
        order = []

        async def request(tenant, name, hold: asyncio.Event):
            async with admission.admit(tenant, size=1000):
                order.append(name)
                await hold.wait()

        held = [asyncio.Event() for _ in range(8)]
        running = [asyncio.create_task(request("a", f"a{i}", held[i])) for i in range(4)]
        await asyncio.sleep(0)
        waiting = [asyncio.create_task(request("a", f"a{i}", held[i])) for i in range(4, 8)]
        await asyncio.sleep(0.01)
        assert order == ["a0", "a1", "a2", "a3"]  # a4..a7 wait in a's line
        with pytest.raises(QueueFullError, match="tenant 'a'"):  # the line is full
            async with admission.admit("a", size=1000):
                pass
        other = asyncio.Event()
        others = [asyncio.create_task(request("b", f"b{i}", other)) for i in range(4)]
        await asyncio.sleep(0.01)
        assert sorted(order[4:]) == ["b0", "b1", "b2", "b3"]  # another tenant gets in at once
        with pytest.raises(QueueFullError, match="8 requests in progress"):
            async with admission.admit("c"):
                pass
        held[2].set()  # one of a's places frees: the first in a's line takes it
        await asyncio.sleep(0.01)
        assert order[-1] == "a4"
        for event in [*held, other]:
            event.set()
        await asyncio.gather(*running, *waiting, *others)
        assert order[-3:] == ["a5", "a6", "a7"]  # first come, first served

    asyncio.run(main())


def test_a_unary_request_in_line_gives_up_at_its_deadline():
    async def main():
        admission = Admission(max_requests=2, tenant_share=0.5, metrics=ServerMetrics())
        async with admission.admit("a"):
            with pytest.raises(DeadlinePassedError):
                async with admission.admit("a", deadline=time.monotonic() + 0.05):
                    pass
        async with admission.admit("a"):  # the line was left clean
            pass

    asyncio.run(main())


def test_a_bulk_lane_gives_way_to_an_interactive_batch_between_stages():
    """Tenant a has a backlog, so its batches are bulk; b's single request is interactive, and
    while it runs a's lane stops at its next checkpoint instead of competing for the cores."""
    events, b_running, release_b = [], threading.Event(), threading.Event()

    def run(images, top_ks, checkpoint=None):
        if images[0] == "b":
            events.append("b starts")
            b_running.set()
            release_b.wait(5)
            events.append("b ends")
        else:
            for stage in range(3):
                checkpoint()
                events.append(f"{images[0]} stage {stage}")
                time.sleep(0.02)
        return list(images)

    async def main():
        batcher = DynamicBatcher(run, ServerMetrics(), max_batch_size=2, max_queue_delay_s=0, lanes=2)
        batcher.start()
        flood = [asyncio.create_task(batcher.submit(f"a{i}", 1, None, tenant="a")) for i in range(8)]
        await asyncio.sleep(0.03)
        victim = asyncio.create_task(batcher.submit("b", 1, None, tenant="b"))
        await asyncio.to_thread(b_running.wait, 5)
        await asyncio.sleep(0.1)  # a's lane would run several stages here if it did not give way
        release_b.set()
        await asyncio.gather(victim, *flood)
        await batcher.stop()

    asyncio.run(main())
    during_b = events[events.index("b starts") + 1:events.index("b ends")]
    assert len(during_b) <= 1, events  # at most the stage a's lane was already in
def test_a_streams_item_waits_for_a_place_instead_of_failing():
    async def main():
        admission = Admission(max_requests=2, tenant_share=1.0, metrics=ServerMetrics())
        entered = []

        async def item(i, hold_s):
            async with admission.admit("a", wait=True):
                entered.append(i)
                await asyncio.sleep(hold_s)

        tasks = [asyncio.create_task(item(i, 0.05)) for i in range(6)]
        await asyncio.sleep(0.01)
        assert len(entered) == 2  # the rest wait, none refused
        await asyncio.gather(*tasks)
        return entered

    assert sorted(asyncio.run(main())) == list(range(6))


def test_with_two_lanes_a_flood_leaves_a_lane_for_another_tenant():
    gate, flood_started, batches = threading.Event(), threading.Event(), []

    def run(images, top_ks, checkpoint=None):
        batches.append(list(images))
        if images[0].startswith("a"):
            flood_started.set()
            gate.wait(5)  # the flood's batch is slow
        return list(images)

    async def main():
        batcher = DynamicBatcher(run, ServerMetrics(), max_batch_size=4, max_queue_delay_s=0, lanes=2)
        batcher.start()
        flood = [asyncio.create_task(batcher.submit(f"a{i}", 1, None, tenant="a")) for i in range(12)]
        await asyncio.to_thread(flood_started.wait)
        victim = await asyncio.wait_for(batcher.submit("b", 1, None, tenant="b"), 2)  # not behind the flood
        assert sum(1 for batch in batches if batch[0].startswith("a")) == 1  # the flood held one lane only
        gate.set()
        await asyncio.gather(*flood)
        await batcher.stop()
        return victim

    assert asyncio.run(main()) == "b"


def test_two_lanes_filling_at_once_do_not_split_one_tenants_burst():
    run, batches = recording_runner()

    async def main():
        batcher = DynamicBatcher(run, ServerMetrics(), max_batch_size=32, max_queue_delay_s=0.2, lanes=2)
        batcher.start()
        # The burst arrives while both lanes are idle: the first lane to take a request holds its
        # tenant, so the other lane leaves the rest of the burst to it.
        first = asyncio.create_task(batcher.submit("x0", 1, None, tenant="x"))
        await asyncio.sleep(0.02)
        rest = [asyncio.create_task(batcher.submit(f"x{i}", 1, None, tenant="x")) for i in range(1, 16)]
        await asyncio.gather(first, *rest)
        await batcher.stop()

    asyncio.run(main())
    assert [len(batch) for batch in batches] == [16]


def test_tenant_limits_refuse_unary_calls_and_make_stream_items_wait():
    """A tenant's rate (a token bucket of one second's worth) and its requests in flight: unary
    calls past either are refused and counted; stream items wait; other tenants are untouched."""
    from gmv_server.admission import TenantLimits

    async def scenario():
        metrics = ServerMetrics()
        now = [100.0]
        limits = TenantLimits(rate_per_s=2.0, max_in_flight=0, metrics=metrics, clock=lambda: now[0])
        for _ in range(2):  # the burst: two at once
            async with limits.hold("a", wait=False, deadline=None):
                pass
        with pytest.raises(QueueFullError, match="2 requests/s"):
            async with limits.hold("a", wait=False, deadline=None):
                pass
        async with limits.hold("b", wait=False, deadline=None):  # another tenant's bucket
            pass
        now[0] += 0.5  # one token back
        async with limits.hold("a", wait=False, deadline=None):
            pass
        assert metrics.queue_rejections.labels(reason="rate")._value.get() == 1

        in_flight = TenantLimits(rate_per_s=0.0, max_in_flight=1, metrics=metrics)
        async with in_flight.hold("a", wait=False, deadline=None):
            with pytest.raises(QueueFullError, match="1 in flight"):
                async with in_flight.hold("a", wait=False, deadline=None):
                    pass
            async with in_flight.hold("b", wait=False, deadline=None):
                pass
            held = in_flight.hold("a", wait=True, deadline=None)  # kept: it holds its place until exited
            waiter = asyncio.create_task(held.__aenter__())
            await asyncio.sleep(0.05)
            assert not waiter.done()  # a stream item waits for the place
        await asyncio.wait_for(waiter, 1.0)
        with pytest.raises(DeadlinePassedError):
            async with in_flight.hold("a", wait=True, deadline=time.monotonic() + 0.02):
                pass
        await held.__aexit__(None, None, None)
        async with in_flight.hold("a", wait=False, deadline=None):  # the place is free again
            pass

    asyncio.run(scenario())


def test_a_bulk_batch_answers_another_tenants_request_with_its_first_chunk():
    """One lane, so b's single request lands in a's bulk batch: it goes into the first chunk and
    its caller is answered when that chunk ends, not after the whole batch."""
    gate, first_started, chunks = threading.Event(), threading.Event(), []

    def run(images, top_ks, checkpoint=None):
        if images[0] == "a-first":
            first_started.set()
            gate.wait(5)
        checkpoint()
        time.sleep(0.05)
        chunks.append((list(images), time.monotonic()))
        return list(images)

    async def main():
        batcher = DynamicBatcher(run, ServerMetrics(), max_batch_size=8, max_queue_delay_s=0, lanes=1, bulk_chunk=2)
        batcher.start()
        async with batcher.admission.admit("a"), batcher.admission.admit("b"):  # both tenants in progress
            first = asyncio.create_task(batcher.submit("a-first", 1, None, tenant="a"))
            await asyncio.to_thread(first_started.wait)
            flood = [asyncio.create_task(batcher.submit(f"a{i}", 1, None, tenant="a")) for i in range(12)]
            await asyncio.sleep(0)
            victim = asyncio.create_task(batcher.submit("b", 1, None, tenant="b"))
            await asyncio.sleep(0)
            gate.set()
            assert await victim == "b"
            answered = time.monotonic()
            await asyncio.gather(first, *flood)
        await batcher.stop()
        return answered

    answered = asyncio.run(main())
    first_chunk = next(i for i, (images, _) in enumerate(chunks) if "b" in images)
    assert chunks[first_chunk][0][0] == "b" and len(chunks[first_chunk][0]) == 2
    later = [ended for _, ended in chunks[first_chunk + 1:first_chunk + 4]]  # the rest of b's batch
    assert len(later) == 3 and answered < later[-1], (answered, chunks)


def test_tenants_share_the_server_a_while_after_the_second_ones_request_ended():
    """A client that sends one request at a time has none in progress between two of them; the
    server still counts as shared then, so a flood's batches keep giving way to it."""
    async def main():
        admission = Admission(max_requests=8, tenant_share=1.0, metrics=ServerMetrics(), recent_s=0.1)
        async with admission.admit("flood"):
            assert not admission.shared()
            async with admission.admit("probe"):
                assert admission.shared()
            assert admission.shared()  # between the probe's requests
            await asyncio.sleep(0.15)
            assert not admission.shared()  # the probe has gone quiet

    asyncio.run(main())


def test_a_tenant_with_requests_on_their_way_is_bulk_though_none_are_queued():
    """A flood's queue runs empty at moments while many of its requests are still decoding or
    waiting for a place: its batch is bulk all the same, so another tenant's request in it
    goes first instead of waiting for the whole batch."""
    gate, first_started, chunks = threading.Event(), threading.Event(), []

    def run(images, top_ks, checkpoint=None):
        if images[0] == "a-first":
            first_started.set()
            gate.wait(5)
        chunks.append(list(images))
        return list(images)

    async def main():
        batcher = DynamicBatcher(run, ServerMetrics(), max_batch_size=8, max_queue_delay_s=0, lanes=1, bulk_chunk=1)
        batcher.start()
        async with contextlib.AsyncExitStack() as places:
            for _ in range(6):  # a: six requests in progress, only three of them ever queued
                await places.enter_async_context(batcher.admission.admit("a"))
            await places.enter_async_context(batcher.admission.admit("b"))
            first = asyncio.create_task(batcher.submit("a-first", 1, None, tenant="a"))
            await asyncio.to_thread(first_started.wait)
            rest = [asyncio.create_task(batcher.submit(name, 1, None, tenant=tenant))
                    for name, tenant in (("a0", "a"), ("a1", "a"), ("b", "b"))]
            await asyncio.sleep(0)
            gate.set()
            await asyncio.gather(first, *rest)
        await batcher.stop()

    asyncio.run(main())
    assert chunks == [["a-first"], ["b"], ["a0"], ["a1"]]


def test_a_tenant_answered_early_in_a_bulk_batch_gives_up_its_lane():
    """b's request rode in a's bulk batch and was answered with the first chunk; b's next
    request, sent on that answer, goes to the other lane at once instead of waiting for the
    rest of a's batch (b no longer counts as holding the busy lane)."""
    gate_a, gate_c, a_started, c_started = (threading.Event() for _ in range(4))
    chunks = []

    def run(images, top_ks, checkpoint=None):
        if images[0] == "c":
            c_started.set()
            gate_c.wait(5)
        elif images[0] == "a-first":
            a_started.set()
            gate_a.wait(5)
        elif images[0].startswith(("a", "b0")):
            checkpoint()
            time.sleep(0.05)
        chunks.append((list(images), time.monotonic()))
        return list(images)

    async def main():
        batcher = DynamicBatcher(run, ServerMetrics(), max_batch_size=8, max_queue_delay_s=0, lanes=2, bulk_chunk=2)
        batcher.start()
        async with batcher.admission.admit("a"), batcher.admission.admit("b"):  # tenants sharing the server
            c = asyncio.create_task(batcher.submit("c", 1, None, tenant="c"))  # holds one lane
            await asyncio.to_thread(c_started.wait)
            first = asyncio.create_task(batcher.submit("a-first", 1, None, tenant="a"))  # and the other
            await asyncio.to_thread(a_started.wait)
            flood = [asyncio.create_task(batcher.submit(f"a{i}", 1, None, tenant="a")) for i in range(10)]
            b0 = asyncio.create_task(batcher.submit("b0", 1, None, tenant="b"))
            await asyncio.sleep(0)
            gate_a.set()  # a's lane takes a's next batch, and b0 with it
            await b0
            gate_c.set()  # the other lane frees
            assert await asyncio.wait_for(batcher.submit("b1", 1, None, tenant="b"), 5) == "b1"
            answered = time.monotonic()
            await asyncio.gather(c, first, *flood)
        await batcher.stop()
        return answered

    answered = asyncio.run(main())
    mixed = next(i for i, (images, _) in enumerate(chunks) if "b0" in images)
    assert chunks[mixed][0][0] == "b0"
    rest_of_batch = [ended for images, ended in chunks[mixed + 1:] if images[0].startswith("a")][:3]
    assert len(rest_of_batch) == 3 and answered < rest_of_batch[-1], (answered, chunks)
