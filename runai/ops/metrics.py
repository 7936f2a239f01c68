# -*- test-case-name: runai.test.test_metrics -*-
"""What ``--metrics`` counts: one :class:`Metrics` per service, in its own
``CollectorRegistry`` (never the global one).

Label values come from closed sets only: door names, actions, outcomes, runai's error
codes and the doors' own refusals (:mod:`runai.doors.refusals`); anything else is
``other``. Never a prompt, a path or an image. What can be read when scraped (the queue,
the workers, the cache, device memory) is read then, through callbacks, not kept up to
date by hand. Imported only with --metrics (prometheus_client loads then); never imports
torch (device memory is read only where torch is loaded already).
"""

import sys
import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from zope.interface import implementer

from runai.core import errors
from runai.core.interfaces import IJobListener
from runai.core.jobs import NullListener
from runai.core.requests import GENERATION_ACTIONS
from runai.doors import refusals

DOORS = ("legacy", "http", "openai", "broker")
ACTIONS = GENERATION_ACTIONS + ("convert", "upscale")
CODES = frozenset(value for name, value in vars(errors).items() if name.isupper() and isinstance(value, str))
# A refusal's code: runai's, or one of a transport's own (a URL too long, a connection over the cap).
REFUSAL_CODES = CODES | refusals.CODES
# A job ended: done, or failed; cancelled covers a client's cancel and a shutdown's.
OK, ERROR, CANCELLED = "ok", "error", "cancelled"
OTHER = "other"
JOB_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, float("inf"))
WAIT_BUCKETS = (0.01, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, float("inf"))
LOAD_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, float("inf"))
# Set on a RunaiError once counted (a job's failure, or a refusal): a door that reports it
# again (the HTTP door answers a job's failure as it answers a refusal) does not count it twice.
_COUNTED = "_runai_metrics_counted"


def _closed(value, allowed):
    return value if value in allowed else OTHER


def door_of(listener):
    """The door a job's listener belongs to, from its module (``runai.doors.<door>...``)."""
    parts = type(listener).__module__.split(".")
    return _closed(parts[2] if parts[:2] == ["runai", "doors"] and len(parts) > 2 else None, DOORS)


def outcome_of(error):
    return CANCELLED if error.code in (errors.CANCELLED, errors.SHUTTING_DOWN) else ERROR


class Metrics:
    """The metrics of one service. ``watch`` gives it what it reads when scraped."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.registry = registry = CollectorRegistry()
        self.jobs = Counter("runai_jobs", "Jobs that ended, by door, action and outcome (ok, error, cancelled).",
                            ["door", "action", "outcome"], registry=registry)
        self.job_seconds = Histogram("runai_job_seconds", "Seconds a job ran (model load included), from its "
                                     "start on a worker to its end.", buckets=JOB_BUCKETS, registry=registry)
        self.queue_wait = Histogram("runai_queue_wait_seconds", "Seconds a job waited in the queue before a worker "
                                    "took it.", buckets=WAIT_BUCKETS, registry=registry)
        self.model_loads = Counter("runai_model_loads", "Models loaded from disk.", registry=registry)
        self.model_load_seconds = Histogram("runai_model_load_seconds", "Seconds a model took to load from disk.",
                                            buckets=LOAD_BUCKETS, registry=registry)
        self.refused = Counter("runai_requests_refused", "Requests answered with an error before they became "
                               "a job, by error code.", ["code"], registry=registry)
        self.gauges = _Gauges()
        registry.register(self.gauges)

    def watch(self, **callbacks):
        """What to read when scraped, each a callable: ``queue_depth``, ``jobs_running``,
        ``workers``, ``workers_failing``, ``cache_bytes`` (numbers) and ``device_memory`` (``{device: bytes}``)."""
        self.gauges.callbacks.update(callbacks)

    # Hooks -----------------------------------------------------------------------------

    def job_listener(self, listener):
        """A listener that counts the job of ``listener`` (a door's) when it ends."""
        return _JobMetrics(self, door_of(listener))

    def count_refused(self, error):
        """``error`` (a RunaiError) was answered instead of a job; counted once."""
        if getattr(error, _COUNTED, False):
            return
        _mark(error)
        self.refused.labels(_closed(error.code, CODES)).inc()

    def count_code(self, code):
        """A door refused a request or a connection by itself, before the core heard of it
        (a door's ``on_refused``): counted under ``code``."""
        self.refused.labels(_closed(code, REFUSAL_CODES)).inc()

    def job_ended(self, job, door, outcome, end=None):
        """Count ``job``, with its queue wait and run time from the times it changed state."""
        stamps = getattr(job, "stamps", {})
        end = self.clock() if end is None else end
        queued, running = stamps.get("queued"), stamps.get("running")
        if queued is not None and running is not None:
            self.queue_wait.observe(max(0.0, running - queued))
        if running is not None:
            self.job_seconds.observe(max(0.0, end - running))
        action = _closed(getattr(job.request, "action", None), ACTIONS)
        self.jobs.labels(_closed(door, DOORS), action, outcome).inc()

    def model_loaded(self, seconds):
        """A model was loaded from disk in ``seconds`` (called from a worker's thread)."""
        self.model_loads.inc()
        self.model_load_seconds.observe(seconds)


def _mark(error):
    try:
        setattr(error, _COUNTED, True)
    except AttributeError:
        pass


@implementer(IJobListener)
class _JobMetrics(NullListener):
    """Counts one job when it ends. Heard before the door's listener, so that the error of
    a failed job is marked before the door answers it."""

    def __init__(self, metrics, door):
        self.metrics = metrics
        self.door = door

    def job_done(self, job, result, seconds):
        self.metrics.job_ended(job, self.door, OK)

    def job_failed(self, job, error):
        _mark(error)
        self.metrics.job_ended(job, self.door, outcome_of(error))


class _Gauges:
    """The gauges read when scraped: each callback that is set, and device memory."""

    NAMES = {
        "queue_depth": ("runai_queue_depth", "Jobs waiting for a worker."),
        "jobs_running": ("runai_jobs_running", "Jobs running now."),
        "workers": ("runai_workers", "Workers that can take jobs now."),
        "workers_failing": ("runai_workers_failing", "Live workers whose last jobs all failed to load a model or "
                                                     "on the device (none can serve until one succeeds)."),
        "cache_bytes": ("runai_model_cache_bytes", "Bytes of model weights the workers keep loaded."),
    }

    def __init__(self):
        self.callbacks = {}

    def collect(self):
        for key, (name, documentation) in self.NAMES.items():
            callback = self.callbacks.get(key)
            if callback is not None:
                yield GaugeMetricFamily(name, documentation, value=float(callback()))
        memory = GaugeMetricFamily("runai_device_memory_bytes", "Bytes torch has allocated on each CUDA device.",
                                   labels=["device"])
        read = self.callbacks.get("device_memory", cuda_memory)
        for device, allocated in sorted(read().items()):
            memory.add_metric([device], float(allocated))
        yield memory


def cuda_memory(modules=sys.modules):
    """``{"cuda:N": bytes allocated}`` where this process has torch loaded and CUDA
    started; empty otherwise (a scrape never imports torch nor starts CUDA)."""
    torch = modules.get("torch")
    cuda = getattr(torch, "cuda", None)
    try:
        if cuda is None or not cuda.is_initialized():
            return {}
        return {f"cuda:{index}": cuda.memory_allocated(index) for index in range(cuda.device_count())}
    except Exception:  # a device gone bad: no figure rather than a failed scrape
        return {}
