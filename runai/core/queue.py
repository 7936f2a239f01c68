# -*- test-case-name: runai.test.test_queue -*-
"""One FIFO queue of jobs for every client, served by local workers.

The queue lives on the reactor thread. Each worker (:class:`runai.core.interfaces.IWorker`,
today :class:`runai.backends.local.LocalWorker`) runs one job at a time; a job waits
until a worker is idle, and goes to one that has its model loaded when there is a
choice. Clients are told their position when it changes.
"""

import collections
import time

from twisted.application import service
from twisted.logger import Logger
from zope.interface import implementer

from runai.core import errors
from runai.core.interfaces import IBackend


@implementer(IBackend)
class JobQueue(service.Service):
    """The local back end: a FIFO queue in front of ``workers``. A Service: stopping it
    fails the waiting jobs (``shutting_down``) and cancels the running ones, reported
    at once, so that nothing waits for a step that may take minutes."""

    log = Logger()

    max_queued = 256
    max_queued_per_owner = 16

    def __init__(self, workers, now=time.monotonic):
        self.workers = list(workers)
        self.now = now
        self._queue = collections.deque()
        self._running = {}  # worker -> job
        self._stopping = False

    # IBackend --------------------------------------------------------------------------

    @property
    def queued(self):
        return len(self._queue)

    @property
    def busy(self):
        return bool(self._running)

    @property
    def workers_alive(self):
        return len(self.workers)

    @property
    def running_jobs(self):
        """The running jobs, in the order of their workers."""
        return [job for job in (self._running.get(w) for w in self.workers) if job is not None]

    def loaded_models(self):
        loaded = []
        for worker in self.workers:
            loaded.extend(p for p in worker.loaded_models() if p not in loaded)
        return tuple(loaded)

    def jobs(self):
        return self.running_jobs + list(self._queue)

    def jobs_of(self, owner):
        return [job for job in self.jobs() if job.owner is owner]

    def submit(self, job):
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
        self._run_next()
        self._report_positions()

    def cancel(self, job):
        if job.state == "queued":
            self._queue.remove(job)
            self._fail(job, errors.JobCancelled())
            self._report_positions()
        elif job.state == "running":
            job.cancel_event.set()

    def cancel_running(self, owner):
        for job in self.running_jobs:
            if job.owner is owner:
                job.cancel_event.set()

    def drop_owner(self, owner):
        dropped = [job for job in self._queue if job.owner is owner]
        for job in dropped:
            self._queue.remove(job)
        for job in dropped:
            self._fail(job, errors.JobCancelled("the client disconnected"))
        self.cancel_running(owner)
        self._report_positions()
        return dropped

    # Service ---------------------------------------------------------------------------

    def startService(self):
        super().startService()
        self._stopping = False

    def stopService(self):
        """Fail what waits, and report the running jobs cancelled now, while the history
        still records: their workers' threads stop at their next step, and whatever they
        report after this goes nowhere."""
        super().stopService()
        self._stopping = True
        while self._queue:
            self._fail(self._queue.popleft(), errors.RunaiError(errors.SHUTTING_DOWN, "the server is shutting down"))
        for job in self.running_jobs:
            if job.state == "running":
                job.cancel_event.set()
                self._fail(job, errors.JobCancelled("the server is shutting down"))
                job.detach()

    # Scheduling ------------------------------------------------------------------------

    def _report_positions(self):
        # Position = jobs ahead of this one, the running ones included; told when the job
        # is taken and again on change.
        ahead = len(self._running)
        for index, job in enumerate(self._queue):
            position = ahead + index
            if position != job.position:
                job.position = position
                job.listener.job_queued(job, position)

    def _idle_worker(self, job):
        idle = [w for w in self.workers if w not in self._running]
        for worker in idle:
            if getattr(job.request, "model_path", None) in worker.loaded_models():
                return worker
        return idle[0] if idle else None

    def _run_next(self):
        while self._queue and not self._stopping:
            worker = self._idle_worker(self._queue[0])
            if worker is None:
                return
            job = self._queue.popleft()
            if job.position is None:
                # Every job hears job_queued once, before anything else: at position 0
                # when it did not wait.
                job.position = 0
                job.listener.job_queued(job, 0)
            job.state = "running"
            self._running[worker] = job
            self._report_positions()
            started = self.now()
            d = worker.run(job)
            d.addCallbacks(self._succeeded, self._failed, callbackArgs=(job, started), errbackArgs=(job,))
            d.addBoth(self._finished, worker)

    def _succeeded(self, result, job, started):
        if job.state != "running":
            return  # told already (a shutdown)
        job.state = "done"
        job.listener.job_done(job, result, self.now() - started)

    def _failed(self, failure, job):
        if job.state != "running":
            return
        error = failure.value
        if not isinstance(error, errors.RunaiError):
            self.log.failure("Job {job!r} failed", failure, job=job)
            error = errors.RunaiError(errors.INTERNAL, f"generation failed: {type(error).__name__}: {error}")
        self._fail(job, error)

    def _fail(self, job, error):
        job.state = "failed"
        job.listener.job_failed(job, error)

    def _finished(self, _, worker):
        self._running.pop(worker, None)
        self._run_next()
