# -*- test-case-name: runai.test.test_local -*-
"""A worker on this machine: one dedicated thread that owns torch, the device and the
model cache.

Only :meth:`LocalWorker._execute` runs in that thread. It is the only one that imports
torch and touches the device, so CUDA state never crosses threads, and the reactor keeps
answering while a job runs. The pool is the worker's own one-thread pool: the reactor's
shared pool (DNS and friends) is never blocked by a 30-second generation.
"""

import functools
import threading

from twisted.application import service
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from runai.backends import memory as models_memory
from runai.backends.idle import IdleTimer
from runai.core import errors
from runai.core.interfaces import IWorker
from runai.core.memory import IMemoryControl


def default_engine_factory(device, dtype, **options):
    # Imported here, in the worker thread, so that the server listens before torch loads.
    from runai.engine.engine import Engine

    return Engine(device=device, dtype=dtype, **options)


def _limit_cpu_threads(count):
    # In the worker thread: torch is never imported on the reactor thread.
    import torch

    torch.set_num_threads(count)


@implementer(IWorker, IMemoryControl)
class LocalWorker(service.Service):
    """Runs jobs on ``device`` in its own thread; a Service that starts the thread (and
    loads torch and the engine in it, while the server already listens) and joins it."""

    log = Logger()
    # Told the seconds of each model load, in the worker thread (--metrics); None: nobody.
    load_observer = None

    def __init__(self, reactor, device="auto", dtype="auto", engine_factory=default_engine_factory, pool=None,
                 engine_options=None, stop_timeout=5.0, name=None, cpu_threads=None, idle_unload=None, clock=None):
        self.reactor = reactor
        # --idle-unload: the models leave the device after that many seconds without a job.
        self.idle = IdleTimer(clock or reactor, idle_unload, self._idle) if idle_unload else None
        self._last_model = None  # what an unload dropped: what a reload loads again
        # How long a stop waits for the running step to end before the process goes on
        # without it (a step of a large batch on a slow device takes minutes).
        self.stop_timeout = stop_timeout
        self.device = device
        self.dtype = dtype
        self._engine_factory = engine_factory
        # More keywords for the engine factory: library, cache_models, cache_bytes.
        self.engine_options = dict(engine_options or {})
        # torch's intra-op threads for this process, when several workers share the CPU.
        self.cpu_threads = cpu_threads
        self._engine = None
        self._stepping = False  # the worker thread is running a job's steps
        self._loading = False  # the worker thread is loading torch and the engine
        if pool is None:
            pool = ThreadPool(minthreads=1, maxthreads=1, name=name or f"runai-{device}")
            # A daemon: a step that outlives the stop's deadline does not hold the exit.
            pool.threadFactory = functools.partial(threading.Thread, daemon=True)
        self.pool = pool

    def startService(self):
        super().startService()
        self.pool.start()

    def stopService(self):
        """Join the thread, without blocking the reactor: the running job was cancelled
        (and answered) by the queue and stops at its next step. Fires when it has, or
        after ``stop_timeout`` seconds, whichever is first."""
        super().stopService()
        if self.idle is not None:
            self.idle.stop()
        if not any(thread.is_alive() for thread in getattr(self.pool, "threads", ())):
            self.pool.stop()
            return defer.succeed(None)
        if self._loading and not self._stepping:
            # Still starting (torch and the engine loading): no step to wait for, and the
            # load may take a minute. The thread (a daemon) is joined if it can be before the exit.
            threading.Thread(target=self.pool.stop, name="runai-worker-stop", daemon=True).start()
            return defer.succeed(None)
        stopped = defer.Deferred()

        def joined(late):
            if stopped.called:
                return
            if late:
                self.log.warn("The worker's step did not end within {seconds}s of the stop; exiting without "
                              "waiting for it", seconds=self.stop_timeout)
            else:
                deadline.cancel()
            stopped.callback(None)

        deadline = self.reactor.callLater(self.stop_timeout, joined, True)
        threading.Thread(target=lambda: (self.pool.stop(), self.reactor.callFromThread(joined, False)),
                         name="runai-worker-stop", daemon=True).start()
        return stopped

    def warm_up(self):
        """Load torch and the engine in the worker thread while the server already listens."""
        return deferToThreadPool(self.reactor, self.pool, self._get_engine).addErrback(
            lambda f: self.log.failure("The inference engine could not start", f)
        )

    def loaded_models(self):
        """Paths of the models the engine holds loaded now (a snapshot, safe to read here)."""
        loader = getattr(self._engine, "loader", None)
        return tuple(getattr(loader, "loaded_paths", ()))

    def cache_bytes(self):
        """Bytes of the weights the engine holds loaded now (a snapshot, safe to read here)."""
        return getattr(getattr(self._engine, "loader", None), "loaded_bytes", 0)

    def run(self, job):
        if self.idle is None:
            return deferToThreadPool(self.reactor, self.pool, self._execute, job).addErrback(self._error)
        self.idle.job_started()
        d = deferToThreadPool(self.reactor, self.pool, self._execute, job).addErrback(self._error)
        return d.addBoth(lambda result: (self.idle.job_finished(), result)[1])

    # IMemoryControl: queued on the worker thread, after the running job.

    def unload(self):
        return deferToThreadPool(self.reactor, self.pool, self._unload)

    def reload(self):
        return deferToThreadPool(self.reactor, self.pool, self._reload)

    def memory(self):
        return deferToThreadPool(self.reactor, self.pool,
                                 lambda: models_memory.device_memory(self._get_engine().device))

    def _idle(self):
        if not self.running:
            return
        seconds = self.idle.seconds
        self.unload().addCallbacks(
            lambda n: self.log.info("Idle for {seconds:g}s: unloaded {n} model(s) from {device}",
                                    seconds=seconds, n=n, device=self.device) if n else None,
            lambda f: self.log.failure("Unloading the idle models failed", f))

    def _error(self, failure):
        error = failure.value
        if type(error).__name__ == "OutOfMemoryError":
            # torch's, raised where the engine did not catch it (a load, a VAE decode).
            raise errors.RunaiError(errors.OUT_OF_MEMORY, f"the device ran out of memory: {error}")
        return failure

    # The worker thread -----------------------------------------------------------------

    def _get_engine(self):
        if self._engine is None:
            self._loading = True
            try:
                return self._load_engine()
            finally:
                self._loading = False
        return self._engine

    def _load_engine(self):
        if self._engine is None:
            if self.cpu_threads is not None:
                _limit_cpu_threads(self.cpu_threads)
            self._engine = self._engine_factory(self.device, self.dtype, **self.engine_options)
            loader = getattr(self._engine, "loader", None)
            if self.load_observer is not None and loader is not None:
                loader.load_observer = self.load_observer
        return self._engine

    def _unload(self):
        if self._engine is None:
            return 0
        self._last_model = models_memory.remembered(self._engine) or self._last_model
        return models_memory.unload(self._engine)

    def _reload(self):
        engine = self._get_engine()
        return models_memory.reload(engine, models_memory.remembered(engine) or self._last_model)

    def _execute(self, job):
        if job.cancel_event.is_set():
            raise errors.JobCancelled()
        engine = self._get_engine()
        call = self.reactor.callFromThread

        # Through the job, not a listener captured now: a detached job reports nowhere.
        def on_progress(step, total, preview=None):
            if preview is None:
                call(lambda: job.listener.job_progress(job, step, total))
            else:
                call(lambda: job.listener.job_progress(job, step, total, preview))

        self._stepping = True
        try:
            return self._run_on(engine, job, call, on_progress)
        finally:
            self._stepping = False

    def _run_on(self, engine, job, call, on_progress):
        if job.request.action == "convert":
            return engine.convert(job.request, on_progress=on_progress, is_cancelled=job.cancel_event.is_set)
        if job.request.action == "upscale":
            return engine.upscale(job.request, on_progress=on_progress,
                                  on_image=lambda image: call(lambda: job.listener.job_image(job, image)),
                                  is_cancelled=job.cancel_event.is_set)
        return engine.generate(
            job.request,
            on_progress=on_progress,
            on_image=lambda image: call(lambda: job.listener.job_image(job, image)),
            is_cancelled=job.cancel_event.is_set,
        )
