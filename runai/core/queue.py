"""One FIFO queue of generation jobs, served by one dedicated thread that owns torch.

The queue lives on the reactor thread; only :meth:`Worker._execute` runs in the worker
thread. The worker thread is the only one that imports torch and touches the device, so
CUDA state never crosses threads, and the reactor keeps answering while a job runs. The
pool is the worker's own one-thread pool: the reactor's shared pool (DNS and friends)
is never blocked by a 30-second generation.
"""

import collections
import itertools
import threading
import time

from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from runai.core import errors


class Job:
    """One generation request from one client, and the way back to that client.

    ``listener`` receives, on the reactor thread: ``job_queued(job, position)``,
    ``job_progress(job, step, total)``, ``job_image(job, image)``, ``job_done(job, count,
    seconds)`` and ``job_failed(job, error)``.
    """

    _serial = itertools.count(1)

    def __init__(self, request, owner, listener):
        self.serial = next(self._serial)
        self.request = request
        self.owner = owner
        self.listener = listener
        self.cancel_event = threading.Event()
        self.state = "new"
        self.position = None

    @property
    def id(self):
        return self.request.id

    def __repr__(self):
        return f"<Job {self.serial} id={self.id!r} {self.request.action} {self.state}>"


def _default_engine_factory(device, dtype, **options):
    # Imported here, in the worker thread, so that the server listens before torch loads.
    from runai.engine.engine import Engine

    return Engine(device=device, dtype=dtype, **options)


class Worker:
    log = Logger()

    max_queued = 256
    max_queued_per_owner = 16

    def __init__(self, reactor, device="auto", dtype="auto", engine_factory=_default_engine_factory, pool=None,
                 engine_options=None):
        self.reactor = reactor
        self.device = device
        self.dtype = dtype
        self._engine_factory = engine_factory
        # More keywords for the engine factory: model_dir, cache_models, cache_bytes.
        self.engine_options = dict(engine_options or {})
        self._engine = None
        self.pool = pool if pool is not None else ThreadPool(minthreads=1, maxthreads=1, name="runai-worker")
        self._queue = collections.deque()
        self.running = None
        self._stopping = False

    # Lifecycle -----------------------------------------------------------------------

    def start(self):
        self.pool.start()

    def warm_up(self):
        """Load torch and the engine in the worker thread while the server already listens."""
        return deferToThreadPool(self.reactor, self.pool, self._get_engine).addErrback(
            lambda f: self.log.failure("The inference engine could not start", f)
        )

    def stop(self):
        """Drop the queue, cancel the running job (reported cancelled at once, while the
        history store still runs), and join the worker thread."""
        self._stopping = True
        while self._queue:
            job = self._queue.popleft()
            self._fail(job, errors.RunaiError(errors.SHUTTING_DOWN, "the server is shutting down"))
        running = self.running
        if running is not None and running.state == "running":
            running.cancel_event.set()
            # Its outcome would reach the reactor (callFromThread) only after this call, once
            # the services stopped after the worker (the history store) are gone: report it
            # now, on the reactor thread, and send what the thread still reports nowhere.
            self._fail(running, errors.JobCancelled("the server is shutting down"))

            class Gone:
                def __getattr__(self, name):
                    return lambda *args, **kwargs: None
            running.listener = Gone()
        # ThreadPool.stop joins the thread; the running job stops at its next step.
        self.pool.stop()

    # Queue ---------------------------------------------------------------------------

    @property
    def queued(self):
        return len(self._queue)

    @property
    def busy(self):
        return self.running is not None

    def loaded_models(self):
        """Paths of the models the engine holds loaded now (a snapshot, safe to read here)."""
        loader = getattr(self._engine, "loader", None)
        return tuple(getattr(loader, "loaded_paths", ()))

    def jobs_of(self, owner):
        jobs = [job for job in self._queue if job.owner is owner]
        if self.running is not None and self.running.owner is owner:
            jobs.insert(0, self.running)
        return jobs

    def submit(self, job):
        """Queue ``job``; raises RunaiError when the queue is full or the server stops."""
        if self._stopping:
            raise errors.RunaiError(errors.SHUTTING_DOWN, "the server is shutting down")
        if len(self._queue) >= self.max_queued:
            raise errors.RunaiError(errors.QUEUE_FULL, f"the server's queue is full ({self.max_queued} jobs)")
        if sum(1 for j in self._queue if j.owner is job.owner) >= self.max_queued_per_owner:
            raise errors.RunaiError(
                errors.QUEUE_FULL, f"this connection already has {self.max_queued_per_owner} jobs waiting"
            )
        job.state = "queued"
        self._queue.append(job)
        self._report_positions()
        self._run_next()

    def cancel(self, job):
        """Cancel a queued job now, or the running one at its next step."""
        if job.state == "queued":
            self._queue.remove(job)
            self._fail(job, errors.JobCancelled())
            self._report_positions()
        elif job.state == "running":
            job.cancel_event.set()

    def drop_owner(self, owner):
        """A client went away: forget its queued jobs and stop its running one."""
        for job in list(self._queue):
            if job.owner is owner:
                self._queue.remove(job)
                job.state = "dropped"
        if self.running is not None and self.running.owner is owner:
            self.running.cancel_event.set()
        self._report_positions()

    def _report_positions(self):
        # Position = jobs ahead of this one, the running one included; told on change only.
        ahead = 1 if self.running is not None else 0
        for index, job in enumerate(self._queue):
            position = ahead + index
            if position and position != job.position:
                job.position = position
                job.listener.job_queued(job, position)

    def _run_next(self):
        if self.running is not None or not self._queue or self._stopping:
            return
        job = self._queue.popleft()
        job.state = "running"
        self.running = job
        self._report_positions()
        started = time.monotonic()
        d = deferToThreadPool(self.reactor, self.pool, self._execute, job)
        d.addCallbacks(self._succeeded, self._errored, callbackArgs=(job, started), errbackArgs=(job,))
        d.addBoth(self._finished, job)

    def _succeeded(self, count, job, started):
        job.state = "done"
        job.listener.job_done(job, count, time.monotonic() - started)

    def _errored(self, failure, job):
        error = failure.value
        if not isinstance(error, errors.RunaiError):
            if type(error).__name__ == "OutOfMemoryError":
                error = errors.RunaiError(errors.OUT_OF_MEMORY, f"the device ran out of memory: {error}")
            else:
                self.log.failure("Job {job!r} failed", failure, job=job)
                error = errors.RunaiError(errors.INTERNAL, f"generation failed: {type(error).__name__}: {error}")
        self._fail(job, error)

    def _fail(self, job, error):
        job.state = "failed"
        job.listener.job_failed(job, error)

    def _finished(self, _, job):
        self.running = None
        self._run_next()

    # Worker thread -------------------------------------------------------------------

    def _get_engine(self):
        if self._engine is None:
            self._engine = self._engine_factory(self.device, self.dtype, **self.engine_options)
        return self._engine

    def _execute(self, job):
        if job.cancel_event.is_set():
            raise errors.JobCancelled()
        engine = self._get_engine()
        call = self.reactor.callFromThread
        if job.request.action == "convert":
            return engine.convert(
                job.request,
                on_progress=lambda step, total: call(job.listener.job_progress, job, step, total),
                is_cancelled=job.cancel_event.is_set,
            )
        return engine.generate(
            job.request,
            on_progress=lambda step, total: call(job.listener.job_progress, job, step, total),
            on_image=lambda image: call(job.listener.job_image, job, image),
            is_cancelled=job.cancel_event.is_set,
        )
