# -*- test-case-name: runai.test.test_metrics -*-
"""Whether a service can run jobs now, for ``GET /health`` and ``runai_workers``.

A check is a callable returning a :class:`Health`: on a server with local workers (and on
``twistd runai-worker``), whether a worker's thread is alive; on a front server
(``--broker``), whether Redis answers and some worker was seen on it lately.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Health:
    workers: int  # workers that can take jobs now
    reason: str = ""  # why none can, when none can

    @property
    def ok(self):
        return self.workers > 0

    def body(self):
        if self.ok:
            return {"status": "ok", "workers": self.workers}
        return {"status": "unavailable", "reason": self.reason}


def worker_alive(worker):
    """A local worker (:class:`runai.backends.local.LocalWorker`) is started and its thread lives."""
    threads = getattr(getattr(worker, "pool", None), "threads", ())
    return bool(getattr(worker, "running", False)) and any(thread.is_alive() for thread in threads)


def local_check(workers):
    """The check of a process whose ``workers`` run the jobs on its own devices."""
    workers = list(workers)

    def check():
        alive = sum(1 for worker in workers if worker_alive(worker))
        if alive:
            return Health(alive)
        if not workers:
            return Health(0, "this server has no workers")
        return Health(0, "no worker thread is alive (the workers stopped or died)")
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
