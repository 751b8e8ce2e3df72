"""The one thread that owns the model: a bounded queue of speech jobs, batched, cancellable, drained on exit.

MLX work (generation, encoding an uploaded voice) happens on this thread only, so the model is never used from
two threads at once. Jobs that wait together and share `steps` and `cfg_scale` (the batched engine needs one
value of each) run as one `vv.stream_generate_batch` call; every other option goes per script. Up to
`max_batch` jobs are in progress at once: a batch cannot take new scripts once started, so a later request
starts a batch of its own, and the thread advances every batch in progress by one event in turn. A job's `stop`
callable is checked by the engine at each frame: a client that leaves, or a shutdown past its grace period,
ends the job there and frees its slot. A task (encoding an uploaded voice) that is a generator runs step by step
between those events, taking `TASK_SHARE` of the thread's time while speech is generated, so that a long upload
slows generation down instead of stopping it.
"""

import concurrent.futures
import inspect
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Deque, Iterator, List, Optional, Tuple

from .errors import APIError, from_generation_error

logger = logging.getLogger(__name__)

BATCH_WINDOW_S = 0.05  # how long an idle worker waits for requests that arrive together
TASK_SHARE = 0.5  # of the worker's time, what step-by-step tasks get while batches are in progress


class QueueFullError(APIError):
    def __init__(self, retry_after: int):
        super().__init__(503, "The server is busy: its queue is full. Retry later.", code="queue_full",
                         headers={"Retry-After": str(retry_after)})


class ShuttingDownError(APIError):
    def __init__(self):
        super().__init__(503, "The server is shutting down.", code="shutting_down", headers={"Retry-After": "5"})


@dataclass(eq=False)
class Job:
    """One speech request. `emit(kind, payload)` is called on the worker thread with ("audio", float32 chunk),
    then ("end", summary) or ("error", APIError), exactly one of the last two."""

    script: str
    emit: Callable[[str, object], None]
    voices: List = field(default_factory=list)
    steps: Optional[int] = None  # None: the model's default
    cfg_scale: Optional[float] = None
    seed: int = 0
    temperature: float = 0.0
    top_p: float = 1.0
    max_seconds: Optional[float] = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    solo: bool = False  # run alone (after a batch it was part of failed)
    emitted: bool = False  # some audio was sent
    done: bool = False
    frames: int = 0
    audio_seconds: float = 0.0
    truncated: bool = False
    submitted: float = field(default_factory=time.monotonic)
    started: Optional[float] = None

    @property
    def group(self):
        return (self.steps, self.cfg_scale)

    def cancel(self):
        self.cancelled.set()


@dataclass(eq=False)
class _Batch:
    jobs: List[Job]
    events: Iterator  # what vv.stream_generate_batch yields: (script index, response)


class Worker:
    """load() -> pipeline, run on the worker thread. `sampler` is a testing aid handed to every generation
    (tests force speech frames with it); `generate` defaults to `vv.stream_generate_batch`."""

    def __init__(self, load: Callable[[], object], max_queue: int = 16, max_batch: int = 4,
                 sampler=None, generate=None, batch_window: float = BATCH_WINDOW_S, free_when_idle: bool = True):
        if max_queue < 1 or max_batch < 1:
            raise ValueError("max_queue and max_batch must be at least 1")
        self.max_queue, self.max_batch = max_queue, max_batch
        self.sampler, self.batch_window, self.free_when_idle = sampler, batch_window, free_when_idle
        self._load, self._generate = load, generate
        self.pipe = None
        self._cond = threading.Condition()
        self._pending: Deque[Job] = deque()
        self._tasks: Deque = deque()
        self._active: List[Job] = []
        self.live: List = []  # objects with busy() and step(pipe): realtime live sessions (server/live.py)
        self._accepting, self._exit = True, False
        self._stop_at: Optional[float] = None
        self._durations: Deque[float] = deque(maxlen=32)
        self._used = False  # generated since memory was last freed
        self._freed_at = 0.0  # when a job last ended (its slot freed)
        self.counts = {"completed": 0, "failed": 0, "cancelled": 0, "rejected": 0, "batches": 0}
        self._ready = threading.Event()
        self._load_error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name="vibevoice-worker", daemon=True)

    # --- called from the server ------------------------------------------------------------------------------

    def start(self) -> "Worker":
        """Start the thread and wait until the model is loaded; a load error is raised here."""
        self._thread.start()
        self._ready.wait()
        if self._load_error is not None:
            raise self._load_error
        return self

    def submit(self, job: Job) -> None:
        with self._cond:
            if not self._accepting:
                raise ShuttingDownError()
            if len(self._pending) >= self.max_queue:
                self.counts["rejected"] += 1
                raise QueueFullError(self._retry_after())
            self._pending.append(job)
            self._cond.notify_all()

    def call(self, fn: Callable[[object], object]) -> concurrent.futures.Future:
        """Run fn(pipe) on the worker thread, before the next batch (encoding an uploaded voice). If fn returns a
        generator, the worker advances it one step per turn, between the steps of the batches in progress, and
        the future's result is the generator's return value."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if not self._accepting:
                raise ShuttingDownError()
            self._tasks.append((fn, future))
            self._cond.notify_all()
        return future

    def past_grace(self) -> bool:
        """Shutting down and past the grace period: what still runs ends at its next step."""
        return self._stop_at is not None and time.monotonic() > self._stop_at

    def wake(self) -> None:
        """Something a live session holds changed (text, a new utterance): the thread looks again."""
        with self._cond:
            self._cond.notify_all()

    def cancel(self, job: Job) -> None:
        """The client is gone: drop the job if it still waits, else stop it at its next frame."""
        job.cancel()
        with self._cond:
            if job in self._pending:
                self._pending.remove(job)
                self.counts["cancelled"] += 1
                job.done = True
            self._cond.notify_all()

    def drain(self, grace: float) -> None:
        """Shutting down: refuse new work, fail what waits, let running jobs finish within `grace` seconds."""
        with self._cond:
            if self._accepting:
                logger.info("Draining: %d running job(s) get %.1f s to finish; %d queued are refused.",
                            len(self._active), grace, len(self._pending))
            self._accepting = False
            deadline = time.monotonic() + grace
            self._stop_at = deadline if self._stop_at is None else min(self._stop_at, deadline)
            while self._pending:
                job = self._pending.popleft()
                job.done = True
                job.emit("error", ShuttingDownError())
            self._cond.notify_all()

    def stop(self, grace: float = 0.0, timeout: float = 30.0) -> None:
        self.drain(grace)
        with self._cond:
            self._exit = True
            self._cond.notify_all()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def snapshot(self) -> dict:
        with self._cond:
            return {"queued": len(self._pending), "active": sum(not j.done for j in self._active),
                    "accepting": self._accepting, "max_queue": self.max_queue, "max_batch": self.max_batch,
                    **self.counts}

    def _retry_after(self) -> int:
        per_job = sum(self._durations) / len(self._durations) if self._durations else 1.0
        waves = (len(self._pending) + len(self._active)) / self.max_batch
        return int(min(60, max(1, math.ceil(per_job * waves))))

    # --- the worker thread ------------------------------------------------------------------------------------

    def _run(self):
        try:
            self.pipe = self._load()
            if self._generate is None:
                import vibevoice_mlx as vv

                self._generate = vv.stream_generate_batch
        except BaseException as e:  # noqa: BLE001 - handed to start(), which raises it in the caller's thread
            self._load_error = e
            self._ready.set()
            return
        self._ready.set()
        batches: List[_Batch] = []
        stepping: List[Tuple[Iterator, concurrent.futures.Future]] = []  # tasks that run step by step
        owed = 0.0  # seconds of the thread the tasks may still take (a step can overdraw; generation repays it)
        while True:
            task, jobs = None, None
            with self._cond:
                while not (self._pending or self._tasks or batches or stepping or self._exit or self._live_busy()):
                    self._cond.wait()
                if self._exit and not (self._pending or self._tasks or batches or stepping):
                    break
                if self._tasks:
                    task = self._tasks.popleft()
                else:
                    wait = self._gathering(batches)
                    if wait > 0 and not (batches or stepping or self._live_busy()):
                        self._cond.wait(wait)  # idle: let requests that arrive together join
                    elif wait == 0:
                        jobs = self._take_batch(batches)
            try:
                if task is not None:
                    self._run_task(*task, stepping)
                if stepping and (owed >= 0 or not batches):
                    start = time.monotonic()
                    for steps in list(stepping):
                        if not self._advance(*steps):
                            stepping.remove(steps)
                    if batches:  # alone, a task owes nothing
                        owed -= time.monotonic() - start
                if jobs:
                    try:
                        batches.append(self._start_batch(jobs))
                    except Exception as e:  # noqa: BLE001 - a library that fails when called, not when iterated
                        self._batch_failed(jobs, e)
                # One step of every batch in progress, in turn: a long request does not hold up a new one.
                start = time.monotonic()
                for batch in list(batches):
                    if not self._step(batch):
                        batches.remove(batch)
                owed = owed + (time.monotonic() - start) * TASK_SHARE / (1 - TASK_SHARE) if stepping else 0.0
                for live in self.live:  # realtime live sessions: one frame of their batch (server/live.py)
                    self._used |= bool(live.active)  # its memory is freed once idle, as a batch's is
                    live.step(self.pipe)
            except Exception:  # noqa: BLE001 - the worker must outlive any one request
                logger.exception("Worker error")
            with self._cond:
                self._active = [j for b in batches for j in b.jobs if not j.done]
                idle = not (batches or stepping or self._pending or any(live.active for live in self.live))
            if self.free_when_idle and idle and self._used:
                self._used = False
                self._free_memory()

    def _live_busy(self) -> bool:
        return any(live.busy() for live in self.live)

    def _room(self, batches) -> int:
        return self.max_batch - sum(not j.done for b in batches for j in b.jobs)

    def _gathering(self, batches) -> float:
        """Seconds to wait before taking the next batch (0: take it now; -1: no room or nothing waits).

        A batch is taken when it can take every waiting job (or a full batch), or `batch_window` after its first
        job arrived or a slot last freed up: requests that arrive together are generated together, and slots
        that free up together (a batch's jobs end in the same step) are refilled by one batch, not one by one.
        Running batches go on meanwhile."""
        self._drop_cancelled()
        room = self._room(batches)
        if not self._pending or room <= 0:
            return -1
        if self._pending[0].solo or room >= min(len(self._pending), self.max_batch):
            return 0
        since = max(self._pending[0].submitted, self._freed_at)
        return max(0.0, since + self.batch_window - time.monotonic())

    def _drop_cancelled(self):
        while self._pending and self._pending[0].cancelled.is_set():
            self._pending.popleft().done = True
            self.counts["cancelled"] += 1

    def _take_batch(self, batches) -> List[Job]:
        room = self._room(batches)
        first = self._pending[0]
        if first.solo:
            batch = [first]
        else:
            batch = [j for j in self._pending if j.group == first.group and not j.solo
                     and not j.cancelled.is_set()][:room]
        for job in batch:
            self._pending.remove(job)
        self._active = self._active + batch
        return batch

    def _run_task(self, fn, future, stepping):
        if not future.set_running_or_notify_cancel():
            return
        self._used = True
        try:
            result = fn(self.pipe)
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            future.set_exception(e)
            return
        if inspect.isgenerator(result):
            stepping.append((result, future))
        else:
            future.set_result(result)

    def _advance(self, steps, future) -> bool:
        """One step of a task that runs step by step; False once it is over. Past the shutdown's grace it ends."""
        if self._stop_at is not None and time.monotonic() > self._stop_at:
            steps.close()
            future.set_exception(ShuttingDownError())
            return False
        try:
            next(steps)
        except StopIteration as e:
            future.set_result(e.value)
            return False
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            future.set_exception(e)
            return False
        return True

    def _stopper(self, job: Job):
        return lambda: job.cancelled.is_set() or (self._stop_at is not None and time.monotonic() > self._stop_at)

    def _start_batch(self, batch: List[Job]) -> "_Batch":
        start = time.monotonic()
        for job in batch:
            job.started = start
        self.counts["batches"] += 1
        self._used = True
        logger.info("Generating a batch of %d (steps %s, cfg %s)", len(batch), *batch[0].group)
        options = dict(seed=[j.seed for j in batch], max_seconds=[j.max_seconds for j in batch],
                       temperature=[j.temperature for j in batch], top_p=[j.top_p for j in batch],
                       stop=[self._stopper(j) for j in batch])
        # Shared by the whole batch (it was grouped by them); left out, the model's defaults apply.
        options.update({k: v for k, v in zip(("steps", "cfg_scale"), batch[0].group) if v is not None})
        if self.sampler is not None:
            options["sampler"] = self.sampler
        events = self._generate(self.pipe, [j.script for j in batch], [list(j.voices) or None for j in batch],
                                **options)
        return _Batch(batch, iter(events))

    def _step(self, batch: "_Batch") -> bool:
        """Advance a batch by one event; False once it is over (all its jobs ended or failed)."""
        try:
            i, r = next(batch.events)
        except StopIteration:
            for job in batch.jobs:
                if not job.done:
                    self._finish(job)
            return False
        except Exception as e:  # noqa: BLE001 - one bad request must not fail the server
            self._batch_failed(batch.jobs, e)
            return False
        job = batch.jobs[i]
        if not job.done:
            job.frames, job.audio_seconds = r.frames, r.audio_seconds
            job.truncated |= bool(r.truncated)
            if r.audio.size:
                job.emitted = True
                job.emit("audio", r.audio)
            if r.finished:
                self._finish(job)
        return True

    def _finish(self, job: Job):
        job.done = True
        self._freed_at = time.monotonic()
        stopped = job.cancelled.is_set() or (self._stop_at is not None and time.monotonic() > self._stop_at)
        self.counts["cancelled" if job.cancelled.is_set() else "completed"] += 1
        self._durations.append(time.monotonic() - job.started)
        job.emit("end", {"frames": job.frames, "audio_seconds": job.audio_seconds,
                         "truncated": job.truncated or stopped, "stopped": stopped})

    def _batch_failed(self, batch: List[Job], exc: Exception):
        error = from_generation_error(exc)
        # Which script failed is unknown: those that sent no audio yet run again, each alone, so that the bad
        # one fails on its own and the others still get their audio.
        retry = [] if len(batch) == 1 else [j for j in batch if not (j.done or j.emitted or j.cancelled.is_set())]
        for job in batch:
            if not job.done and job not in retry:
                job.done = True
                self.counts["failed"] += 1
                job.emit("error", error)
        if retry and not self._accepting:  # shutting down: nothing runs again
            for job in retry:
                job.done = True
                job.emit("error", ShuttingDownError())
            retry = []
        if retry:
            logger.info("A batch of %d failed (%s); running %d of its jobs again one by one.", len(batch),
                        error.message, len(retry))
            with self._cond:
                for job in reversed(retry):
                    job.solo = True
                    self._pending.appendleft(job)

    def _free_memory(self):
        import vibevoice_mlx as vv

        vv.free_memory()
