"""A small async batching queue: requests from many connections share one generate() call.

Each image becomes a queue item with a future. One collector task takes the first waiting item, gathers more for up to
`max_wait_s` (or until `max_batch_size`), groups them by generation options (one generate() call cannot mix beam
widths) and runs each group in a single model thread. While a batch runs, new requests pile up in the queue, so under
load batches fill without any waiting at all; an idle server adds at most `max_wait_s` to a request.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

POLL_S = 0.001


class BatchQueue:
    """Collect (image, options) items into batches and run `run_batch(images, options) -> captions` on them."""

    def __init__(self, run_batch: Callable[[list, object], list[str]], max_batch_size: int = 16,
                 max_wait_s: float = 0.005):
        if max_batch_size < 1 or max_wait_s < 0:
            raise ValueError(f"need max_batch_size >= 1 and max_wait_s >= 0, got {max_batch_size}, {max_wait_s}")
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.batch_sizes: Counter[int] = Counter()
        self.requests = 0
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        # One thread owns the model: torch already uses every core inside one generate(), and a single owner keeps
        # GPU memory and CUDA streams simple.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="captune-model")
        self._stats_lock = threading.Lock()

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._collect(), name="captune-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        while self._queue is not None and not self._queue.empty():
            _, _, future = self._queue.get_nowait()
            if not future.done():
                future.set_exception(RuntimeError("server shutting down"))
        self._executor.shutdown(wait=True)

    async def submit(self, images: list, options) -> list[str]:
        """Queue `images` (decoded) with `options`; returns their captions in order once their batches ran."""
        if self._queue is None:
            raise RuntimeError("BatchQueue.start() was not called")
        loop = asyncio.get_running_loop()
        futures = []
        for image in images:
            future = loop.create_future()
            self._queue.put_nowait((image, options, future))
            futures.append(future)
        with self._stats_lock:
            self.requests += 1
        return list(await asyncio.gather(*futures))

    def stats(self) -> dict:
        with self._stats_lock:
            sizes = dict(sorted(self.batch_sizes.items()))
            requests = self.requests
        return {
            "requests": requests,
            "images": sum(size * count for size, count in sizes.items()),
            "batches": sum(sizes.values()),
            "max_batch_size_seen": max(sizes, default=0),
            "batch_sizes": {str(size): count for size, count in sizes.items()},
            "queue_depth": self._queue.qsize() if self._queue is not None else 0,
            "max_batch_size": self.max_batch_size,
            "max_wait_ms": self.max_wait_s * 1000,
        }

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [await self._queue.get()]
            deadline = loop.time() + self.max_wait_s
            # Poll rather than wait_for(queue.get()): cancelling a get that just completed can drop an item.
            while len(items) < self.max_batch_size:
                if not self._queue.empty():
                    items.append(self._queue.get_nowait())
                elif loop.time() < deadline:
                    await asyncio.sleep(POLL_S)
                else:
                    break
            groups: dict = {}
            for item in items:
                groups.setdefault(item[1], []).append(item)
            for options, group in groups.items():
                # A client that disconnected cancelled its future: don't spend the model on it.
                group = [item for item in group if not item[2].done()]
                if group:
                    await self._run(loop, options, group)

    async def _run(self, loop, options, group: list) -> None:
        try:
            captions = await loop.run_in_executor(self._executor, self.run_batch, [item[0] for item in group], options)
        except Exception as exc:  # the requests fail with it; the server goes on
            for _, _, future in group:
                if not future.done():
                    future.set_exception(exc)
            return
        with self._stats_lock:
            self.batch_sizes[len(group)] += 1
        for (_, _, future), caption in zip(group, captions):
            if not future.done():
                future.set_result(caption)
