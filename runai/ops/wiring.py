# -*- test-case-name: runai.test.test_metrics,runai.test.test_health -*-
"""``--metrics`` in a service tree: what is counted, what is read when scraped, and the
site that serves them. Imported by ``runai/tap.py`` and ``runai/broker/worker_tap.py``
only when ``--metrics`` is given.

- ``twistd runai`` (:func:`front_metrics`): every job that passes through the core (local
  workers, or the workers behind ``--broker``), by door; the refusals, the core's and
  those its doors answer by themselves (:func:`count_door_refusals`); the queue; with
  local workers, their model loads, cache and device memory. ``/health`` follows the
  local workers' threads and their failures (:class:`WatchedWorker`), or Redis and the
  workers seen on it.
- ``twistd runai-worker`` (:func:`worker_metrics`): the jobs it runs, its loads, cache and
  device memory; ``/health`` follows its workers' threads and their failures.
"""

import ipaddress

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import directlyProvides, implementer, providedBy

from runai.core import errors
from runai.core.interfaces import IWorker
from runai.ops.health import FailureWatch, broker_check, local_check
from runai.ops.metrics import OK, Metrics, outcome_of
from runai.ops.site import make_site

log = Logger(namespace="runai.ops")


def front_metrics(config, reactor, core, workers, services=()):
    """``(site, started)`` for ``twistd runai``: ``core`` counts its jobs and refusals into
    a new :class:`Metrics`; ``workers`` are its local workers (none on a front server);
    the doors among ``services`` (the door's factory or site of each) count the refusals
    they answer by themselves."""
    metrics = Metrics()
    core.metrics = metrics
    count_door_refusals(metrics, services)
    backend = core.backend
    if workers:
        watch = FailureWatch()
        # The queue runs its jobs through wrappers that tell the watch how each ended.
        watched = {id(worker): WatchedWorker(worker, watch) for worker in workers}
        backend.workers = [watched.get(id(worker), worker) for worker in getattr(backend, "workers", ())]
        check = local_check(workers, watch)
    else:
        check = broker_check(backend)
    metrics.watch(queue_depth=lambda: backend.queued,
                  jobs_running=lambda: sum(1 for job in backend.jobs() if job.state == "running"),
                  workers=lambda: check().workers)
    if workers:
        metrics.watch(workers_failing=lambda: check().failing)
        _watch_workers(metrics, workers)
    return _site(config, reactor, metrics, check, config.get("token"))


def worker_metrics(config, reactor, workers):
    """``(observed, site, started)`` for ``twistd runai-worker``: ``observed`` are the
    ``workers``, each wrapped to count the jobs it runs, for its broker consumer."""
    metrics = Metrics()
    watch = FailureWatch()
    observed = [ObservedWorker(worker, metrics, watch=watch) for worker in workers]
    check = local_check(workers, watch)
    metrics.watch(jobs_running=lambda: sum(worker.jobs_running for worker in observed),
                  workers=lambda: check().workers, workers_failing=lambda: check().failing)
    _watch_workers(metrics, workers)
    site, started = _site(config, reactor, metrics, check, config.get("token"))
    return observed, site, started


def count_door_refusals(metrics, services):
    """Each of ``services`` whose factory is a door that refuses by itself (it has an
    ``on_refused``: :mod:`runai.doors.refusals`) counts those refusals into ``metrics``."""
    for service in services:
        factory = getattr(service, "factory", None)
        if hasattr(factory, "on_refused"):
            factory.on_refused = metrics.count_code


def _watch_workers(metrics, workers):
    for worker in workers:
        worker.load_observer = metrics.model_loaded
    metrics.watch(cache_bytes=lambda: sum(worker.cache_bytes() for worker in workers))


def _site(config, reactor, metrics, check, token):
    if config.get("metrics-public"):
        token = None
    site = make_site(metrics, check, token=token, reactor=reactor, timeout=config.get("idle-timeout", 60.0))
    site.metrics = metrics
    site.port = None

    def started(port):
        site.port = port
        address = port.getHost()
        host = getattr(address, "host", "127.0.0.1")
        log.info("runai metrics listening on {host}:{port} (/metrics, /health)", host=host,
                 port=getattr(address, "port", ""))
        if token is None and not _is_loopback(host):
            log.warn("The metrics listen beyond loopback without a token: anyone who can reach them can read "
                     "the queue, the job counts and the workers' state")
    return site, started


def _is_loopback(host):
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


@implementer(IWorker)
class WatchedWorker:
    """``worker`` (an IWorker, and whatever else it provides), how each of its jobs ended
    told to ``watch`` (a :class:`runai.ops.health.FailureWatch`): its error's code, never
    its message."""

    def __init__(self, worker, watch=None):
        self.worker = worker
        self.watch = watch
        self.jobs_running = 0
        directlyProvides(self, providedBy(worker))  # IMemoryControl too, where the worker has it

    def __getattr__(self, name):
        if name == "worker":  # not set yet: no recursion
            raise AttributeError(name)
        return getattr(self.worker, name)

    def loaded_models(self):
        return self.worker.loaded_models()

    def run(self, job):
        self.jobs_running += 1
        d = defer.maybeDeferred(self.worker.run, job)
        d.addCallbacks(self._succeeded, self._failed, callbackArgs=(job,), errbackArgs=(job,))
        return d

    def ended(self, job, outcome):
        """``job`` ended with ``outcome`` (ok, error or cancelled)."""

    def _succeeded(self, result, job):
        self.jobs_running -= 1
        if self.watch is not None:
            self.watch.succeeded(self.worker)
        self.ended(job, OK)
        return result

    def _failed(self, failure, job):
        self.jobs_running -= 1
        error = failure.value
        known = isinstance(error, errors.RunaiError)
        if self.watch is not None:
            self.watch.failed(self.worker, error.code if known else errors.INTERNAL)
        self.ended(job, outcome_of(error) if known else "error")
        return failure


class ObservedWorker(WatchedWorker):
    """``worker`` (an IWorker), its jobs counted into ``metrics`` as they end (as door
    ``broker``: a runai-worker's jobs all come through it), and told to ``watch``."""

    def __init__(self, worker, metrics, door="broker", watch=None):
        super().__init__(worker, watch)
        self.metrics = metrics
        self.door = door

    def ended(self, job, outcome):
        self.metrics.job_ended(job, self.door, outcome)
