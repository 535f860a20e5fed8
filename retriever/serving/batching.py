"""Adaptive batching for the router: a request waits only while every batch slot is busy or while the callers of a
batch just answered are expected back, and a freed slot takes everything that queued up meanwhile (up to the batch
size).

Why not `@serve.batch` here: it forms a batch as soon as its wait ends, whether or not the previous one is done, so
under load it builds many small batches that then queue behind each other; a router whose downstream calls take
tens of milliseconds needs batches sized by what piled up while it was busy.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Any, Generic, TypeVar

IDLE_FORGET_WAITS = 10  # waits with nothing outstanding after which a Coalescer forgets its peak

Item = TypeVar("Item")
Result = TypeVar("Result")


class Coalescer(Generic[Item, Result]):
    """Runs ``handler`` on batches of submitted items, at most ``max_concurrent`` batches at a time.

    A free slot waits up to ``wait_s`` for more (0: starts at once) while fewer items queue than were outstanding
    (queued or in a batch) at the peak since the last batch started, capped at ``max_batch_size``, and starts as soon
    as that many queue. So callers that come back right after their answer (a closed loop of clients) join one
    batch instead of splitting into groups that alternate. The peak is forgotten after ``IDLE_FORGET_WAITS`` waits
    with nothing outstanding, so a lone caller never waits; callers that do not come back (open-loop traffic right
    after a larger batch) cost a batch at most ``wait_s``."""

    def __init__(
        self,
        handler: Callable[[list[Item]], Awaitable[Sequence[Result | BaseException]]],
        *,
        max_batch_size: int,
        max_concurrent: int,
        wait_s: float = 0.0,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        if max_batch_size < 1 or max_concurrent < 1 or wait_s < 0:
            raise ValueError("max_batch_size and max_concurrent must be at least 1 and wait_s not negative")
        self.handler = handler
        self.max_batch_size = max_batch_size
        self.max_concurrent = max_concurrent
        self.wait_s = wait_s
        self.on_batch = on_batch
        self._queue: list[tuple[Item, asyncio.Future[Result]]] = []
        self._running = 0  # batches started, waiting ones included
        self._filled: asyncio.Event | None = None  # while a started batch waits for more: set when it has them
        self._outstanding = 0  # items queued or in a running batch
        self._peak = 0  # the most outstanding at once since the last batch was taken
        self._idle_since = float("-inf")  # loop time when nothing was outstanding any more
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, item: Item) -> Result:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Result] = loop.create_future()
        if not self._outstanding and loop.time() - self._idle_since > IDLE_FORGET_WAITS * self.wait_s:
            self._peak = 0  # the callers of the last batches are not coming back
        self._queue.append((item, future))
        self._outstanding += 1
        self._peak = max(self._peak, self._outstanding)
        if self._filled is not None and len(self._queue) >= self._wanted():
            self._filled.set()
        self._start_batches()
        return await future

    def _wanted(self) -> int:
        return min(self._peak, self.max_batch_size)

    def _start_batches(self) -> None:
        # One batch waits for more at a time; the items queued now are taken now, so each started batch has some.
        while self._queue and self._running < self.max_concurrent and self._filled is None:
            self._running += 1
            if self.wait_s and len(self._queue) < self._wanted():
                self._filled = asyncio.Event()
                task = asyncio.create_task(self._run(None, self._filled))
            else:
                task = asyncio.create_task(self._run(self._take()))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _take(self) -> list[tuple[Item, asyncio.Future[Result]]]:
        batch = self._queue[: self.max_batch_size]
        del self._queue[: self.max_batch_size]
        self._peak = self._outstanding
        return batch

    async def _run(
        self, batch: list[tuple[Item, asyncio.Future[Result]]] | None, filled: asyncio.Event | None = None
    ) -> None:
        """Answer ``batch``; with ``filled`` instead, first wait for it (or ``wait_s``) and take the batch then."""
        try:
            if filled is not None:
                try:
                    async with asyncio.timeout(self.wait_s):
                        await filled.wait()
                except TimeoutError:
                    pass
                finally:
                    self._filled = None
                batch = self._take()
                self._start_batches()  # what is left over (more than a batch queued) takes a free slot now
            if not batch:
                return
            try:
                if self.on_batch is not None:
                    self.on_batch(len(batch))
                results = await self.handler([item for item, _ in batch])
                for (_, future), result in zip(batch, results, strict=True):
                    if future.done():
                        continue
                    if isinstance(result, BaseException):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
            except BaseException as exc:  # the batch failed as a whole: every caller still waiting gets the error
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
        finally:
            self._outstanding -= len(batch or ())
            if not self._outstanding:
                self._idle_since = asyncio.get_running_loop().time()
            self._running -= 1
            self._start_batches()


class KeyedCoalescer(Generic[Item, Result]):
    """A `Coalescer` per key of the items (``key``; ``settings`` are the Coalescer's): items of different keys never
    share a batch, so a batch is answered when its own work is done, not when the slowest key's is. Keys must come
    from a bounded set (e.g. the served models a search names)."""

    def __init__(self, key: Callable[[Item], Hashable], **settings: Any) -> None:
        Coalescer(**settings)  # the settings are checked now, not at the first request
        self.key = key
        self.settings = settings
        self.coalescers: dict[Hashable, Coalescer[Item, Result]] = {}

    async def submit(self, item: Item) -> Result:
        key = self.key(item)
        coalescer = self.coalescers.get(key)
        if coalescer is None:
            coalescer = self.coalescers[key] = Coalescer(**self.settings)
        return await coalescer.submit(item)
