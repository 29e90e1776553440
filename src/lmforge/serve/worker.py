"""The engine thread: the only caller of `Scheduler.step()`; HTTP handlers talk to it through
queues.

    worker = EngineWorker(engine, max_queue=64, metrics=metrics)
    worker.start()
    job = worker.submit(prompt_ids, params)          # from a handler, on the event loop
    async for event in job.events(): ...             # StreamEvents of the job's n samples
    worker.cancel(job)                               # the client left: its rows leave at the next step

Every request shares one continuous batch (`Scheduler`), so concurrent clients decode together.
`submit` raises APIError(429) when `max_queue` requests are already waiting for a row. Events
cross from the engine thread to the handler's event loop with `call_soon_threadsafe`; a job's
stream ends with None once all its n samples finished. A failing step (a bug, out of memory)
ends every job in flight with an error instead of killing the thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field

from lmforge.infer.rows import Request, StreamEvent
from lmforge.infer.sampling import SamplingParams
from lmforge.serve.metrics import Metrics
from lmforge.serve.protocol import APIError

log = logging.getLogger("lmforge.serve")


class EngineFailure(Exception):
    """The engine failed while generating (not the client's fault)."""


@dataclass
class Job:
    request: Request
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    arrival: float
    n_left: int
    first_at: float | None = None
    last_at: dict[int, float] = field(default_factory=dict)  # sample index -> time of its last event
    generated: int = 0

    @property
    def cached_tokens(self) -> int:
        return self.request.cached_tokens

    async def events(self):
        """The job's events as they come; raises EngineFailure if the engine failed."""
        async for batch in self.batches():
            for event in batch:
                yield event

    async def batches(self):
        """The job's events in lists: all that arrived by the time the reader looks (a reader
        that falls behind the engine writes several tokens at once, not one write per token)."""
        while True:
            items = [await self.queue.get()]
            while not self.queue.empty():
                items.append(self.queue.get_nowait())
            events = []
            for item in items:
                if isinstance(item, EngineFailure):
                    raise item
                if item is None:
                    yield events
                    return
                events.append(item)
            yield events


class EngineWorker:
    def __init__(self, engine, max_queue: int = 64, max_batch_size: int | None = None, metrics: Metrics | None = None):
        self.engine = engine
        self.scheduler = engine.scheduler(max_batch_size)
        self.max_queue = max_queue
        self.metrics = metrics or Metrics()
        self.jobs: dict[int, Job] = {}  # request id -> job
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="lmforge-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()
        self.thread.join(timeout=30)

    # ---- from the handlers ----
    def submit(self, prompt_ids: list[int], params: SamplingParams, queue: asyncio.Queue | None = None) -> Job:
        """Queue one request; call on the event loop that will read its events (several jobs may
        share one `queue`: their events carry their request ids)."""
        loop = asyncio.get_running_loop()
        with self.lock:
            if len(self.scheduler.waiting) >= self.max_queue:
                raise APIError(429, f"the server's queue is full ({self.max_queue} requests waiting); retry later",
                               code="queue_full")
            try:
                request = self.scheduler.add(prompt_ids, params)
            except ValueError as e:  # what the engine refuses up front (a response_format the budget cannot finish)
                raise APIError(400, str(e), param="max_tokens" if "max_tokens" in str(e) else None) from None
            job = Job(request, loop, queue if queue is not None else asyncio.Queue(), time.perf_counter(), params.n)
            self.jobs[request.id] = job
        self.metrics.count_tokens(prompt=len(prompt_ids))
        self.wake.set()
        return job

    def cancel(self, job: Job) -> None:
        """Free the job's rows at the next step (a client that disconnected)."""
        self.scheduler.cancel(job.request)
        with self.lock:
            self.jobs.pop(job.request.id, None)
        self.wake.set()

    @property
    def running(self) -> int:
        return len({row.request.id for row in self.scheduler.rows})

    @property
    def waiting(self) -> int:
        return len(self.scheduler.waiting)

    # ---- the engine thread ----
    def _run(self) -> None:
        while not self.stopping:
            if not self.scheduler.has_work:
                self.wake.wait(timeout=0.5)
                self.wake.clear()
                continue
            try:
                events = self.scheduler.step()
            except Exception as e:  # fail the jobs in flight, keep serving
                log.exception("engine step failed")
                self._fail_all(e)
                continue
            self._dispatch(events)

    def _dispatch(self, events: list[StreamEvent]) -> None:
        """Hand each event to its job's queue: one call into each event loop per step, not per event."""
        now = time.perf_counter()
        out: dict[asyncio.AbstractEventLoop, list] = {}
        with self.lock:
            for event in events:
                job = self.jobs.get(event.request_id)
                if job is None:  # cancelled meanwhile
                    continue
                job.generated += 1
                if job.first_at is None:
                    job.first_at = now
                    self.metrics.observe(ttft=now - job.arrival)
                    self.metrics.count_tokens(cached=job.cached_tokens)
                elif event.index in job.last_at:
                    self.metrics.observe(per_token=now - job.last_at[event.index])
                job.last_at[event.index] = now
                items = out.setdefault(job.loop, [])
                items.append((job.queue, event))
                if event.finish_reason is not None:
                    job.n_left -= 1
                    if job.n_left == 0:
                        del self.jobs[event.request_id]
                        self.metrics.observe(e2e=now - job.arrival)
                        items.append((job.queue, None))
        self.metrics.count_tokens(generated=len(events))
        for loop, items in out.items():
            _send(loop, items)

    def _fail_all(self, error: Exception) -> None:
        """After a failed step: end every job with EngineFailure and start from an empty batch."""
        with self.lock:
            jobs, self.jobs = list(self.jobs.values()), {}
            self.scheduler = self.engine.scheduler(self.scheduler.max_batch_size)
        failure = EngineFailure(f"{type(error).__name__}: {error}")
        for job in jobs:
            _send(job.loop, [(job.queue, failure)])


def _put_all(items) -> None:
    for queue, item in items:
        queue.put_nowait(item)


def _send(loop: asyncio.AbstractEventLoop, items: list) -> None:
    """Put (queue, item) pairs on queues of `loop`, from the engine thread (the loop may be gone
    when the server is shutting down)."""
    try:
        loop.call_soon_threadsafe(_put_all, items)
    except RuntimeError:  # the loop is closed
        pass
