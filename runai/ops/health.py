# -*- test-case-name: runai.test.test_metrics,runai.test.test_health -*-
"""Whether a service can run jobs now, for ``GET /health`` and ``runai_workers``.

A check is a callable returning a :class:`Health`: on a server with local workers (and on
``twistd runai-worker``), whether a worker's thread is alive and it is not failing (its
last :data:`FAILING_AFTER` jobs all failed to load a model or on the device, a
:class:`FailureWatch` says); on a front server (``--broker``), whether Redis answers and
some worker was seen on it lately.
"""

from dataclasses import dataclass

from runai.core import errors

# A worker whose last this many jobs all failed with one of FAILING_CODES, and none
# succeeded since, is failing: it cannot serve (a model folder it cannot read, a device gone).
FAILING_AFTER = 3
# The server's own failures: a model that cannot be loaded, the device out of memory or
# gone (a device's error reaches the job as ``internal``). A request's own error (a bad
# option, a cancel) neither counts nor clears a streak.
FAILING_CODES = frozenset({errors.MODEL_LOAD_FAILED, errors.OUT_OF_MEMORY, errors.INTERNAL})


@dataclass(frozen=True)
class Health:
    workers: int  # workers that can take jobs now
    reason: str = ""  # why none can, when none can
    failing: int = None  # live workers that are failing (None: this check cannot tell)

    @property
    def ok(self):
        return self.workers > 0

    def body(self):
        if self.ok:
            body = {"status": "ok", "workers": self.workers}
        else:
            body = {"status": "unavailable", "reason": self.reason}
        if self.failing is not None:
            body["failing"] = self.failing
        return body


class FailureWatch:
    """Each worker's streak of jobs that failed with one of :data:`FAILING_CODES`; a job
    that succeeds ends it. Told on the reactor thread, by the wrappers of
    :mod:`runai.ops.wiring`; only codes are kept, never a message."""

    def __init__(self, limit=FAILING_AFTER):
        self.limit = limit
        self._streaks = {}  # worker -> consecutive failures

    def succeeded(self, worker):
        self._streaks.pop(worker, None)

    def failed(self, worker, code):
        if code in FAILING_CODES:
            self._streaks[worker] = self._streaks.get(worker, 0) + 1

    def failing(self, worker):
        return self._streaks.get(worker, 0) >= self.limit


def worker_alive(worker):
    """A local worker (:class:`runai.backends.local.LocalWorker`) is started and its thread lives."""
    threads = getattr(getattr(worker, "pool", None), "threads", ())
    return bool(getattr(worker, "running", False)) and any(thread.is_alive() for thread in threads)


def local_check(workers, watch=None):
    """The check of a process whose ``workers`` run the jobs on its own devices; ``watch``
    (a :class:`FailureWatch`, None: none is ever failing) tells the failing ones."""
    workers = list(workers)

    def check():
        alive = [worker for worker in workers if worker_alive(worker)]
        failing = sum(1 for worker in alive if watch is not None and watch.failing(worker))
        serving = len(alive) - failing
        if serving:
            return Health(serving, failing=failing)
        if not workers:
            return Health(0, "this server has no workers", failing=0)
        if not failing:
            return Health(0, "no worker thread is alive (the workers stopped or died)", failing=0)
        limit = watch.limit
        reason = (f"every live worker is failing: its last {limit} jobs failed to load a model or on the device "
                  f"({', '.join(sorted(FAILING_CODES))})")
        dead = len(workers) - len(alive)
        if dead:
            reason += f"; {dead} worker thread(s) are not alive"
        return Health(0, reason, failing=failing)
    return check


def broker_check(backend):
    """The check of a front server whose ``backend`` (a :class:`runai.broker.front.BrokerBackend`)
    sends the jobs to workers elsewhere."""
    def check():
        if not backend.running:
            return Health(0, "the server is not running its back end (stopping?)")
        if not backend.available:
            return Health(0, "the job broker (Redis) cannot be reached")
        if not backend.workers_alive:
            return Health(0, "no runai-worker has been seen on the job broker lately")
        return Health(backend.workers_alive)
    return check
