"""Dynamic batching of transcription requests onto one model.

Requests wait in a bounded queue; one worker thread owns the model. It takes the oldest request,
gathers the ones that arrive within ``batch_wait`` seconds (up to ``max_batch_seconds`` of audio
in all), and runs them through :meth:`w2v2.transcribe.Transcriber.transcribe_many`, whose chunks
of consecutive files share forward passes: several short requests cost about one padded batch.
The queue never grows past ``max_queue`` (:class:`QueueFull` instead, which the server turns into
429 with Retry-After), and a request cancelled by its client before its turn is skipped.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from ..transcribe import Transcriber

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The queue holds ``max_queue`` requests: try again later."""


@dataclass(eq=False)
class Job:
    """One request: the audio file to transcribe and where its result goes."""

    path: str
    seconds: float  # audio length, for gathering batches (0 when unknown)
    future: Future = field(default_factory=Future)
    cancelled: bool = False  # the client went away: skip the work if it has not started


class Batcher:
    def __init__(self, transcriber: Transcriber, max_queue: int = 16, max_batch_seconds: float = 240.0,
                 batch_wait: float = 0.01):
        if max_queue < 1 or max_batch_seconds <= 0 or batch_wait < 0:
            raise ValueError("max_queue must be at least 1, max_batch_seconds positive and batch_wait non-negative")
        self.transcriber = transcriber
        self.max_batch_seconds = max_batch_seconds
        self.batch_wait = batch_wait
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._work, name="w2v2-batcher", daemon=True)
        self._carry: Job | None = None  # taken from the queue but over the last batch's limit: starts the next
        self.batches = 0  # batches run so far (for /health and the load test)
        self.skipped = 0  # requests whose client went away before their turn

    # ------------------------------------------------------------------ client side
    def start(self) -> None:
        self._thread.start()

    def submit(self, path: str, seconds: float) -> Job:
        job = Job(path, seconds)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"{self._queue.maxsize} requests are already waiting") from None
        return job

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    def stop(self, timeout: float | None = None) -> None:
        """Finish every queued request, then end the worker."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout)

    # ------------------------------------------------------------------ worker side
    def _work(self) -> None:
        while True:
            first, self._carry = self._carry or self._queue.get(), None
            if first is None:
                return
            batch, stop = self._gather(first)
            self._run(batch)
            if stop:
                return

    def _gather(self, first: Job) -> tuple[list[Job], bool]:
        """``first`` and whatever arrives within ``batch_wait`` while the audio fits in
        ``max_batch_seconds`` (a first request longer than that runs alone); True when the
        stop sign came."""
        batch, total = [first], first.seconds
        deadline = time.monotonic() + self.batch_wait
        while True:
            try:
                job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return batch, False
            if job is None:
                return batch, True
            if total + job.seconds > self.max_batch_seconds:
                self._carry = job
                return batch, False
            batch.append(job)
            total += job.seconds

    def _run(self, batch: list[Job]) -> None:
        # Neighbours share padded forward passes: in length order, a short request is not padded
        # to a long one's width (each answer goes to its own future, so the order is free).
        batch = sorted(batch, key=lambda job: job.seconds)

        def sources():
            # Read lazily: a job cancelled while earlier ones run is skipped when its turn comes.
            for job in batch:
                if job.cancelled:
                    job.future.cancel()
                if job.future.set_running_or_notify_cancel():  # False: cancelled
                    yield job, job.path
                else:
                    self.skipped += 1
                    log.info("skipped 1 request: its client went away before its turn")

        self.batches += 1
        try:
            for job, result in self.transcriber.transcribe_many(sources()):
                if isinstance(result, BaseException):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)
        except BaseException as e:  # the model itself failed (out of memory, say): every job left in the batch
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(e)
            if not isinstance(e, Exception):
                raise
