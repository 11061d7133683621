"""Work sharing inside one sr-serve replica: batching small requests into shared backend calls, the
LRU of samplers, and waiting for work that must finish even when its request is cancelled. No Ray here.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar, cast

from PIL import Image

from sr_runtime import SRInputError, Upscaler

T = TypeVar("T")
R = TypeVar("R")


class SamplerCache:
    """A bounded LRU of `Upscaler`s at temperature > 0, one per (temperature, seed).

    Each entry costs one backend session plus its noise bank: (16 + batch - 1)
    rows of noise_dim floats, 125 MB for the shipped model (noise_dim 1.01 M,
    batch 16), so 4 entries are about 0.5-1 GB per replica. An evicted entry is
    dropped, not closed: a request still running on it finishes, and its memory
    goes when that request lets go of it.

    A hit never waits for a miss: entries are built one at a time in a worker
    thread, and a build finishes (and is kept) even if the request that asked
    for it has gone; requests for a key being built share that build.
    """

    def __init__(self, create: Callable[[float, int], Upscaler], capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"the sampler cache needs at least one entry, got {capacity}")
        self._create = create
        self._capacity = capacity
        self._entries: OrderedDict[tuple[float, int], Upscaler] = OrderedDict()
        self._building: dict[tuple[float, int], asyncio.Task[Upscaler]] = {}
        self._build_lock = asyncio.Lock()  # one construction at a time: each allocates a session and a bank

    async def get(self, temperature: float, seed: int) -> Upscaler:
        key = (temperature, seed)
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        task = self._building.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._build(key))
            task.add_done_callback(_retrieve)
            self._building[key] = task
        return await asyncio.shield(task)

    async def _build(self, key: tuple[float, int]) -> Upscaler:
        try:
            async with self._build_lock:
                upscaler = await asyncio.to_thread(self._create, *key)
        finally:
            del self._building[key]
        self._entries[key] = upscaler
        if len(self._entries) > self._capacity:
            self._entries.popitem(last=False)
        return upscaler

    def __len__(self) -> int:
        return len(self._entries)


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Marks a background future's exception as seen: the requests that wanted it report it, if any remain."""
    if not future.cancelled():
        future.exception()


async def wait_through_cancellation(future: asyncio.Future[T]) -> None:
    """Wait until `future` is done, whatever cancellations arrive meanwhile (the caller re-raises them)."""
    while not future.done():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait({future})
    _retrieve(future)


class QueueBatcher(Generic[T, R]):
    """Packs the items queued while the previous call ran into the next call.

    Why not `@serve.batch`: Ray Serve (2.60) forms the next batch as soon as the
    previous one is launched and queues it behind that one, so behind a
    multi-second CPU call each batch holds only what arrived within the batch
    wait (measured: 1 to 2.2 images per batch at 16 clients). Here one consumer
    takes a batch only when the previous call has returned, so everything that
    queued meanwhile, up to `max_items`, shares the next call. A lone item waits
    `wait_s` once for company.
    """

    def __init__(self, run: Callable[[list[T]], Awaitable[list[R]]], max_items: int, wait_s: float) -> None:
        if max_items < 1 or wait_s < 0:
            raise ValueError(f"need max_items >= 1 and wait_s >= 0, got {max_items} and {wait_s}")
        self._run = run
        self._max_items = max_items
        self._wait_s = wait_s
        self._queue: asyncio.Queue[tuple[T, asyncio.Future[R]]] = asyncio.Queue()
        self._consumer: asyncio.Task[None] | None = None
        self._running: set[asyncio.Future[R]] = set()  # the futures of the call in progress
        self.batches = 0
        self.items = 0

    async def submit(self, item: T) -> R:
        """`item`'s result, computed in a call shared with whatever else is queued.

        Cancelled while queued, the item is dropped; cancelled while its call
        runs, this waits for the call to return before re-raising, so the
        caller's slots are not given up while its item still computes.
        """
        loop = asyncio.get_running_loop()
        if self._consumer is None or self._consumer.done():
            self._consumer = loop.create_task(self._consume())
        future: asyncio.Future[R] = loop.create_future()
        self._queue.put_nowait((item, future))
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            if future in self._running:
                await wait_through_cancellation(future)
            else:
                future.cancel()
            raise

    async def _consume(self) -> None:
        while True:
            batch = [await self._queue.get()]
            if self._queue.qsize() < self._max_items - 1 and self._wait_s > 0:
                await asyncio.sleep(self._wait_s)
            while len(batch) < self._max_items and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            batch = [(item, future) for item, future in batch if not future.cancelled()]  # clients gone
            if not batch:
                continue
            self._running = {future for _, future in batch}
            try:
                results = await self._run([item for item, _ in batch])
            except Exception as exc:  # noqa: BLE001 - any failure must reach every waiting request, or it hangs
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
            else:
                for (_, future), result in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(result)
            finally:
                self._running = set()
            self.batches += 1
            self.items += len(batch)


def run_each_or_together(upscaler: Upscaler, images: list[Image.Image]) -> list[Image.Image | SRInputError]:
    """`run_many` over all images; if one image fails, each runs alone so that only its request fails."""
    try:
        return list(cast(list[Image.Image], upscaler.run_many(images)))  # PIL images in, PIL images out
    except SRInputError:
        if len(images) == 1:
            raise
    results: list[Image.Image | SRInputError] = []
    for image in images:
        try:
            results.append(upscaler.run(image))
        except SRInputError as exc:
            results.append(exc)
    return results
