"""Grouping the query-gradient work of concurrent requests into batches.

Query gradients are the expensive part of a request (``T_q x M`` per-sample gradients per
checkpoint); on a CPU or a GPU one batch of ``B`` images costs much less than ``B`` batches of one.
``QueryBatcher`` keeps a bounded queue of waiting requests. When the worker is free it waits
``window`` seconds after the first waiting request for others to join, takes up to
``max_batch_images`` images (whole requests, in arrival order), and runs ``compute`` on one worker
thread (the event loop never runs torch). A request that would push the waiting images above
``max_pending_images`` is refused at once with :class:`ServiceBusyError`, so a flood costs bounded
memory; a request whose client went away before its batch started is dropped from the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from retrac.errors import RetracError

log = logging.getLogger("retrac.serve")

Conditioning = Tensor | list[str] | None  # per image: class labels (n,), prompts (n strings), or none
Compute = Callable[[Tensor, Conditioning], dict[str, np.ndarray]]


def join_conditioning(parts: list[Conditioning]) -> Conditioning:
    """The conditioning of concatenated requests: labels concatenated, prompt lists chained."""
    if parts[0] is None:
        return None
    if isinstance(parts[0], Tensor):
        return torch.cat(parts)
    return [prompt for part in parts for prompt in part]


class ServiceBusyError(RetracError):
    """The query-gradient queue is full (HTTP 503 with ``Retry-After``)."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class BatchTiming:
    """Where one request's query-gradient time went.

    Attributes:
        queued_s: from joining the queue to its batch starting.
        compute_s: the batch's gradient time (shared by every request in the batch).
        batch_images: images in that batch (this request's and the others').
    """

    queued_s: float
    compute_s: float
    batch_images: int


@dataclass
class _Waiting:
    images: Tensor
    labels: Conditioning
    future: asyncio.Future
    arrived: float = field(default_factory=time.perf_counter)

    @property
    def size(self) -> int:
        return int(self.images.shape[0])


@dataclass
class BatcherStats:
    """Counters since start: batches run, images in them, requests refused, the largest batch."""

    batches: int = 0
    images: int = 0
    requests: int = 0
    refused: int = 0
    dropped: int = 0
    largest_batch: int = 0

    def to_dict(self) -> dict:
        mean = self.images / self.batches if self.batches else 0.0
        return {
            "batches": self.batches,
            "images": self.images,
            "requests": self.requests,
            "refused_busy": self.refused,
            "dropped_disconnected": self.dropped,
            "largest_batch": self.largest_batch,
            "mean_batch_images": round(mean, 3),
        }


class QueryBatcher:
    """A bounded queue in front of one query-gradient worker.

    Args:
        compute: ``(images (n, C, H, W), conditioning) -> {method: (n, D) query vectors}``, the
            conditioning being class labels ``(n,)``, ``n`` prompts or ``None``;
            runs on ``executor``, one call at a time.
        executor: the worker (a one-thread executor: the model is not shared between threads).
        window_s: how long to wait after the first waiting request for others.
        max_batch_images: images per ``compute`` call (a larger single request runs alone).
        max_pending_images: images allowed to wait; above it :meth:`submit` raises
            :class:`ServiceBusyError`.
        retry_after_s: the retry hint given with that error.
    """

    def __init__(
        self,
        compute: Compute,
        executor: Executor,
        window_s: float = 0.005,
        max_batch_images: int = 16,
        max_pending_images: int = 64,
        retry_after_s: int = 1,
    ) -> None:
        self.compute = compute
        self.executor = executor
        self.window_s = window_s
        self.max_batch_images = max_batch_images
        self.max_pending_images = max_pending_images
        self.retry_after_s = retry_after_s
        self.stats = BatcherStats()
        self._waiting: list[_Waiting] = []
        self._wakeup: asyncio.Event | None = None
        self._runner: asyncio.Task | None = None
        self._busy = False

    @property
    def pending_images(self) -> int:
        """Images waiting for a batch (not counting the batch being computed)."""
        return sum(w.size for w in self._waiting)

    @property
    def computing(self) -> bool:
        return self._busy

    async def start(self) -> None:
        if self._runner is None:
            self._wakeup = asyncio.Event()
            self._runner = asyncio.create_task(self._run(), name="retrac-query-batcher")

    async def stop(self) -> None:
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
            self._runner = None
        for waiting in self._waiting:
            if not waiting.future.done():
                waiting.future.cancel()
        self._waiting.clear()

    async def submit(
        self, images: Tensor, labels: Conditioning = None
    ) -> tuple[dict[str, np.ndarray], BatchTiming]:
        """Queue ``images`` (with their labels or prompts, one per image) for the next batch and
        wait for their query vectors.

        Returns:
            ``({method: (n, D) float32}, timing)``.

        Raises:
            ServiceBusyError: the queue holds too many images already.
        """
        if self._runner is None or self._wakeup is None:
            raise RuntimeError("QueryBatcher.start() was not awaited (the app's lifespan starts it).")
        n = int(images.shape[0])
        if self.pending_images + n > self.max_pending_images:
            self.stats.refused += 1
            raise ServiceBusyError(
                f"the query-gradient queue is full ({self.pending_images} images waiting, limit "
                f"{self.max_pending_images}); retry after {self.retry_after_s} s.",
                self.retry_after_s,
            )
        self.stats.requests += 1
        waiting = _Waiting(images, labels, asyncio.get_running_loop().create_future())
        self._waiting.append(waiting)
        self._wakeup.set()
        try:
            return await waiting.future
        except asyncio.CancelledError:  # the client went away: free its place if not yet taken
            if waiting in self._waiting:
                self._waiting.remove(waiting)
                self.stats.dropped += 1
            raise

    def _take(self) -> list[_Waiting]:
        """Whole requests in arrival order up to ``max_batch_images`` (always at least one)."""
        batch, size = [], 0
        while self._waiting:
            nxt = self._waiting[0]
            if nxt.future.done():  # cancelled while waiting
                self._waiting.pop(0)
                self.stats.dropped += 1
                continue
            if batch and size + nxt.size > self.max_batch_images:
                break
            batch.append(self._waiting.pop(0))
            size += nxt.size
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wakeup is not None
        while True:
            await self._wakeup.wait()
            if self.window_s > 0:
                await asyncio.sleep(self.window_s)  # let requests arriving together join
            batch = self._take()
            if not self._waiting:
                self._wakeup.clear()
            if not batch:
                continue
            started = time.perf_counter()
            self._busy = True
            try:
                results = await self._compute_batch(loop, batch)
            finally:
                self._busy = False
            compute_s = time.perf_counter() - started
            size = sum(w.size for w in batch)
            self.stats.batches += 1
            self.stats.images += size
            self.stats.largest_batch = max(self.stats.largest_batch, size)
            for waiting, result in zip(batch, results, strict=True):
                if waiting.future.done():
                    continue
                if isinstance(result, BaseException):
                    waiting.future.set_exception(result)
                else:
                    waiting.future.set_result(
                        (result, BatchTiming(started - waiting.arrived, compute_s, size))
                    )

    async def _compute_batch(self, loop, batch: list[_Waiting]) -> list:
        """One ``compute`` call for the whole batch; if it fails, one call per request, so that
        a request whose images fail (a NaN gradient, say) fails alone."""
        try:
            images = torch.cat([w.images for w in batch])
            labels = join_conditioning([w.labels for w in batch])
            vectors = await loop.run_in_executor(self.executor, self.compute, images, labels)
        except Exception as exc:
            if len(batch) == 1:
                return [exc]
            log.info("batch of %d requests failed (%s); computing them one by one", len(batch), exc)
            results = []
            for waiting in batch:
                try:
                    results.append(
                        await loop.run_in_executor(
                            self.executor, self.compute, waiting.images, waiting.labels
                        )
                    )
                except Exception as single:
                    results.append(single)
            return results
        out, start = [], 0
        for waiting in batch:
            out.append({m: v[start : start + waiting.size] for m, v in vectors.items()})
            start += waiting.size
        return out
