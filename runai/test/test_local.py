"""runai.backends.local: the worker thread that owns the engine (its pool run in line)."""

import threading
import time

from twisted.internet import reactor, task, threads
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase, TestCase

from runai.backends.local import LocalWorker
from runai.core import errors
from runai.core.jobs import Job, NullListener
from runai.test.support import ScriptedEngine, SyncPool, SyncReactor


class OutOfMemoryError(Exception):
    """Named like torch's, which the worker recognises by name (it never imports torch)."""


class Heard(NullListener):
    def __init__(self):
        self.steps = []

    def job_progress(self, job, step, total):
        self.steps.append(step)


class Request:
    action = "txt2img"
    id = None
    steps = 3
    n_iter = 1
    image_count = 1
    width = height = 64

    def seeds(self):
        return [1]


class LocalWorkerTests(SynchronousTestCase):
    def setUp(self):
        self.engine = ScriptedEngine()
        self.made = []

        def factory(device, dtype, **options):
            self.made.append((device, dtype, options))
            return self.engine

        self.worker = LocalWorker(SyncReactor(), device="cpu", dtype="float32", engine_factory=factory,
                                  pool=SyncPool(), engine_options={"cache_models": 3})

    def test_the_engine_is_made_once_in_the_thread(self):
        self.worker.startService()
        self.assertTrue(self.worker.pool.started)
        self.successResultOf(self.worker.warm_up())
        heard = Heard()
        self.assertEqual(self.successResultOf(self.worker.run(Job(Request(), "a", heard))), 1)
        self.assertEqual(heard.steps, [1, 2, 3])
        self.assertEqual(self.made, [("cpu", "float32", {"cache_models": 3})])
        self.worker.stopService()
        self.assertTrue(self.worker.pool.stopped)

    def test_a_cancelled_job_does_not_start(self):
        job = Job(Request(), "a", Heard())
        job.cancel_event.set()
        self.failureResultOf(self.worker.run(job), errors.JobCancelled)
        self.assertEqual(self.engine.requests, [])

    def test_out_of_memory_has_its_code(self):
        def full(step):
            raise OutOfMemoryError("CUDA out of memory")
        self.engine.during_step = full
        failure = self.failureResultOf(self.worker.run(Job(Request(), "a", Heard())), errors.RunaiError)
        self.assertEqual(failure.value.code, errors.OUT_OF_MEMORY)

    def test_a_detached_job_reports_nowhere(self):
        heard = Heard()
        job = Job(Request(), "a", heard)
        self.engine.during_step = lambda step: step == 1 and job.detach()
        self.successResultOf(self.worker.run(job))
        self.assertEqual(heard.steps, [])


class StopTests(TestCase):
    """A stop while a step runs, on the real reactor and a real worker thread: the reactor
    goes on, clients are answered at once, and the stop ends at the deadline even if the
    step has not."""

    timeout = 60

    @inlineCallbacks
    def test_a_stop_does_not_wait_for_a_long_step(self):
        from runai.core.queue import JobQueue

        release = threading.Event()
        started = threading.Event()

        class SlowEngine(ScriptedEngine):
            def generate(self, request, on_progress, on_image, is_cancelled):
                started.set()
                release.wait(30)  # one step that takes long, whatever the cancel says
                return super().generate(request, on_progress, on_image, is_cancelled)

        worker = LocalWorker(reactor, engine_factory=lambda device, dtype: SlowEngine(), stop_timeout=0.5)
        self.addCleanup(release.set)
        queue = JobQueue([worker])
        worker.startService()
        queue.startService()
        heard = Failed()
        queue.submit(Job(Request(), "a", heard))
        yield threads.deferToThread(started.wait, 10)
        queue.stopService()
        self.assertEqual(heard.codes, [errors.CANCELLED])  # answered at once
        began = time.monotonic()
        stopping = worker.stopService()
        self.assertFalse(stopping.called)
        # The reactor is not blocked meanwhile.
        yield task.deferLater(reactor, 0.1, lambda: None)
        self.assertFalse(stopping.called)
        yield stopping
        self.assertLess(time.monotonic() - began, 5)
        self.assertTrue(0.4 < time.monotonic() - began)
        release.set()

    @inlineCallbacks
    def test_an_idle_worker_stops_without_the_deadline(self):
        worker = LocalWorker(reactor, engine_factory=lambda device, dtype: ScriptedEngine(), stop_timeout=30)
        worker.startService()
        yield worker.warm_up()
        began = time.monotonic()
        yield worker.stopService()
        self.assertLess(time.monotonic() - began, 5)
        self.assertFalse(any(thread.is_alive() for thread in worker.pool.threads))

    @inlineCallbacks
    def test_a_worker_still_loading_stops_at_once_without_a_warning(self):
        from twisted.logger import LogLevel, globalLogPublisher

        warnings = []
        observe = lambda event: event.get("log_level") == LogLevel.warn and warnings.append(event)  # noqa: E731
        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        loading, release = threading.Event(), threading.Event()
        self.addCleanup(release.set)

        def slow_engine(device, dtype):
            loading.set()
            release.wait(30)  # torch importing, on a slow disk
            return ScriptedEngine()
        worker = LocalWorker(reactor, engine_factory=slow_engine, stop_timeout=0.5)
        worker.startService()
        warmed = worker.warm_up()
        yield threads.deferToThread(loading.wait, 10)
        began = time.monotonic()
        yield worker.stopService()
        self.assertLess(time.monotonic() - began, 0.3)
        release.set()
        yield warmed
        yield task.deferLater(reactor, 0.6, lambda: None)  # past the stop timeout: nothing more is said
        self.assertEqual(warnings, [])


class Failed(NullListener):
    def __init__(self):
        self.codes = []

    def job_failed(self, job, error):
        self.codes.append(error.code)
