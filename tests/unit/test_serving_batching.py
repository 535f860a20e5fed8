"""The router's adaptive batching: no wait when idle, everything that queued while busy in the next batch."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest

from retriever.serving.batching import IDLE_FORGET_WAITS, Coalescer, KeyedCoalescer


def run(coro):
    return asyncio.run(coro)


def test_requests_that_queue_while_a_batch_runs_form_the_next_batch() -> None:
    sizes: list[int] = []

    async def handler(items: list[int]) -> list[int]:
        sizes.append(len(items))
        await asyncio.sleep(0.05)
        return [item * 10 for item in items]

    async def main() -> list[int]:
        batcher = Coalescer(handler, max_batch_size=4, max_concurrent=1)
        first = asyncio.create_task(batcher.submit(0))
        await asyncio.sleep(0.01)  # the first batch (one item) is running
        rest = [asyncio.create_task(batcher.submit(i)) for i in range(1, 10)]
        return [await first, *[await task for task in rest]]

    assert run(main()) == [i * 10 for i in range(10)]
    assert sizes == [1, 4, 4, 1]


def timed_handler(seconds: float) -> tuple[list[tuple[float, list[int]]], Callable[[list[int]], Awaitable[list[int]]]]:
    """A handler that answers each batch after ``seconds``, and the (start time, items) of every batch it got."""
    starts: list[tuple[float, list[int]]] = []

    async def handler(items: list[int]) -> list[int]:
        starts.append((time.perf_counter(), list(items)))
        await asyncio.sleep(seconds)
        return items

    return starts, handler


def test_a_free_slot_waits_for_more_while_another_batch_runs_and_an_idle_one_starts_at_once() -> None:
    starts, handler = timed_handler(0.3)

    async def main() -> float:
        batcher = Coalescer(handler, max_batch_size=8, max_concurrent=2, wait_s=0.2)
        began = time.perf_counter()
        first = asyncio.create_task(batcher.submit(0))  # idle service: starts at once
        await asyncio.sleep(0.02)
        second = asyncio.create_task(batcher.submit(1))  # a batch runs: the free slot waits for more
        await asyncio.sleep(0.05)
        third = asyncio.create_task(batcher.submit(2))
        assert await asyncio.gather(first, second, third) == [0, 1, 2]
        return began

    began = run(main())
    assert [items for _, items in starts] == [[0], [1, 2]]
    assert starts[0][0] - began < 0.1  # well before the wait would have ended
    assert starts[1][0] - began >= 0.2


def closed_loop(callers: int, rounds: int, wait_s: float) -> list[int]:
    """Batch sizes when ``callers`` each submit ``rounds`` times, coming back 2 ms after every answer (the way back
    to the client and its next request); caller 0 starts alone, the others 5 ms later, while its batch runs."""
    sizes: list[int] = []

    async def handler(items: list[int]) -> list[int]:
        sizes.append(len(items))
        await asyncio.sleep(0.02)
        return items

    async def main() -> None:
        batcher = Coalescer(handler, max_batch_size=64, max_concurrent=1, wait_s=wait_s)

        async def caller(i: int) -> None:
            await asyncio.sleep(0.005 if i else 0)
            for _ in range(rounds):
                assert await batcher.submit(i) == i
                await asyncio.sleep(0.002)

        await asyncio.gather(*(caller(i) for i in range(callers)))

    run(main())
    return sizes


def test_callers_that_come_back_after_their_answer_join_one_batch() -> None:
    # Without a wait the latecomers and caller 0 alternate as two groups for ever: each batch starts with whoever
    # queued while the other group's batch ran.
    assert closed_loop(8, 6, wait_s=0) == [1, 7] * 6
    # With one, the batch after caller 0's waits for it (8 were outstanding) and from then on all 8 go together; each
    # wait ends when the 8th is back, not after the 1 s (only the last batch, which caller 0 has left, waits it out).
    began = time.perf_counter()
    sizes = closed_loop(8, 6, wait_s=1.0)
    assert sizes[:2] == [1, 8] and sizes.count(8) >= 5, sizes
    assert time.perf_counter() - began < 3.0  # about 1.2 s; 6 s if waits ran to their end


def test_the_peak_is_forgotten_when_nothing_was_outstanding_for_a_while() -> None:
    async def handler(items: list[int]) -> list[int]:
        await asyncio.sleep(0.01)
        return items

    async def main() -> float:
        batcher = Coalescer(handler, max_batch_size=8, max_concurrent=1, wait_s=0.05)
        assert await asyncio.gather(*(batcher.submit(i) for i in range(8))) == list(range(8))
        await asyncio.sleep(0.05 * IDLE_FORGET_WAITS + 0.1)  # idle: those 8 are not coming back
        began = time.perf_counter()
        assert await batcher.submit(8) == 8
        return time.perf_counter() - began

    assert run(main()) < 0.05  # the 10 ms search, not the 50 ms wait


def test_what_is_left_over_when_a_waiting_batch_fills_starts_in_a_free_slot_at_once() -> None:
    starts, handler = timed_handler(0.4)

    async def main() -> float:
        batcher = Coalescer(handler, max_batch_size=4, max_concurrent=3, wait_s=1.0)
        first = asyncio.create_task(batcher.submit(0))  # runs 0.4 s; the next free slot waits for more
        await asyncio.sleep(0.01)
        began = time.perf_counter()
        rest = [asyncio.create_task(batcher.submit(i)) for i in range(1, 11)]
        assert [await task for task in rest] == list(range(1, 11))
        await first
        return began

    began = run(main())
    assert [len(items) for _, items in starts] == [1, 4, 4, 2]
    # The second batch of 4 takes the third slot as soon as the waiting one fills, not when a running batch ends.
    assert starts[1][0] - began < 0.2 and starts[2][0] - began < 0.2


def test_a_lone_caller_never_waits() -> None:
    async def handler(items: list[int]) -> list[int]:
        return items

    async def main() -> float:
        batcher = Coalescer(handler, max_batch_size=8, max_concurrent=1, wait_s=0.5)
        began = time.perf_counter()
        for i in range(5):
            assert await batcher.submit(i) == i
        return time.perf_counter() - began

    assert run(main()) < 0.5


def test_errors_reach_their_own_callers_only() -> None:
    async def handler(items: list[int]) -> list[int | BaseException]:
        return [ValueError(f"bad {item}") if item % 2 else item for item in items]

    async def main() -> list[object]:
        batcher = Coalescer(handler, max_batch_size=8, max_concurrent=2)
        return await asyncio.gather(*(batcher.submit(i) for i in range(4)), return_exceptions=True)

    results = run(main())
    assert results[0] == 0 and results[2] == 2
    assert [str(results[1]), str(results[3])] == ["bad 1", "bad 3"]


def test_a_failing_handler_fails_its_batch_and_the_next_batch_still_runs() -> None:
    calls = {"n": 0}

    async def handler(items: list[int]) -> list[int]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("downstream lost")
        return items

    async def main() -> tuple[object, int]:
        batcher = Coalescer(handler, max_batch_size=8, max_concurrent=1)
        failed = await asyncio.gather(batcher.submit(1), return_exceptions=True)
        return failed[0], await batcher.submit(2)

    error, value = run(main())
    assert isinstance(error, RuntimeError) and value == 2


def test_settings_are_checked() -> None:
    async def handler(items):
        return items

    with pytest.raises(ValueError, match="at least 1"):
        Coalescer(handler, max_batch_size=0, max_concurrent=1)


def test_items_of_different_keys_never_share_a_batch_and_a_slow_key_delays_no_other() -> None:
    batches: list[list[str]] = []
    finished: list[str] = []

    async def handler(items: list[str]) -> list[str]:
        batches.append(list(items))
        await asyncio.sleep(0.3 if items[0].startswith("slow") else 0.01)
        finished.extend(items)
        return [item.upper() for item in items]

    async def main() -> list[str]:
        batcher = KeyedCoalescer(lambda item: item.split("-")[0], handler=handler, max_batch_size=8, max_concurrent=1)
        return await asyncio.gather(*(batcher.submit(item) for item in ("slow-1", "fast-1", "slow-2", "fast-2")))

    assert run(main()) == ["SLOW-1", "FAST-1", "SLOW-2", "FAST-2"]
    assert all(len({item.split("-")[0] for item in batch}) == 1 for batch in batches), batches
    assert sorted(finished[:2]) == ["fast-1", "fast-2"]  # both answered while the first slow batch still ran
