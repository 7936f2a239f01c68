"""--idle-unload: runai.backends.idle's timer, and runai.backends.local's worker unloading
its real tiny model on its own thread (here a pool that runs in line, or when the test
says) once the injected clock says it has been idle that long; the option's parsing."""

import weakref
from pathlib import Path

from twisted.internet import reactor, task
from twisted.internet.defer import inlineCallbacks
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from runai import tap
from runai.backends.idle import IdleTimer
from runai.backends.local import LocalWorker
from runai.broker import worker_tap
from runai.core.jobs import Job, NullListener
from runai.doors.legacy.parse import parse_request
from runai.models.library import ModelLibrary
from runai.options import MAX_IDLE_UNLOAD, OptionError, parse_duration
from runai.test.support import ManualPool, SyncPool, SyncReactor, make_server
from runai.test.test_e2e import LiveServer, legacy_request, png_of, tiny_model_dir


class Images(NullListener):
    def __init__(self):
        self.pngs = []

    def job_image(self, job, image):
        self.pngs.append(image.png)


class IdleTimerTests(SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.fired = []
        self.timer = IdleTimer(self.clock, 2.0, lambda: self.fired.append(self.clock.seconds()))

    def test_fires_once_after_the_last_job(self):
        self.timer.job_started()
        self.clock.advance(10)
        self.assertEqual(self.fired, [])  # a running job is never idle
        self.timer.job_finished()
        self.clock.advance(1.9)
        self.assertEqual(self.fired, [])
        self.clock.advance(0.1)
        self.assertEqual(self.fired, [12.0])
        self.clock.advance(100)
        self.assertEqual(self.fired, [12.0])  # not again without another job

    def test_each_job_starts_the_wait_again(self):
        self.timer.job_started()
        self.timer.job_finished()
        self.clock.advance(1.5)
        self.timer.job_started()
        self.clock.advance(1.5)
        self.timer.job_finished()
        self.clock.advance(1.5)
        self.assertEqual(self.fired, [])
        self.clock.advance(0.5)
        self.assertEqual(self.fired, [5.0])

    def test_two_running_jobs(self):
        self.timer.job_started()
        self.timer.job_started()
        self.timer.job_finished()
        self.clock.advance(5)
        self.assertEqual(self.fired, [])
        self.timer.job_finished()
        self.clock.advance(2)
        self.assertEqual(self.fired, [7.0])

    def test_stop_cancels(self):
        self.timer.job_started()
        self.timer.job_finished()
        self.timer.stop()
        self.clock.advance(5)
        self.assertEqual((self.fired, self.clock.getDelayedCalls()), ([], []))


class IdleWorkerTests(SynchronousTestCase):
    """A LocalWorker with the real engine on the tiny model: its "thread" is the test."""

    def setUp(self):
        self.models = tiny_model_dir()
        self.clock = task.Clock()
        self.pool = SyncPool()
        self.worker = LocalWorker(SyncReactor(), device="cpu", dtype="float32", pool=self.pool,
                                  engine_options=dict(library=ModelLibrary(self.models)), idle_unload=2,
                                  clock=self.clock)
        self.worker.startService()
        self.addCleanup(self.worker.stopService)
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def generate(self, seed=7):
        images = Images()
        request = parse_request(legacy_request(self.models, seed=seed, steps=2), Path(self.models))
        self.assertEqual(self.successResultOf(self.worker.run(Job(request, "owner", images))), 1)
        return images.pngs[0]

    def loaded(self):
        return self.worker.loaded_models()

    def unload_lines(self):
        return [e for e in self.events if "unloaded" in e.get("log_format", "")]

    def test_unloaded_two_seconds_after_the_job(self):
        first = self.generate()
        self.assertEqual(len(self.loaded()), 1)
        unet = weakref.ref(self.worker._engine.pipe.unet)
        self.clock.advance(1.9)
        self.assertEqual(len(self.loaded()), 1)
        self.assertEqual(self.unload_lines(), [])
        self.clock.advance(0.1)
        self.assertEqual(self.loaded(), ())
        self.assertEqual(self.worker._engine.loader._cache, {})
        self.assertIsNone(unet(), "the unloaded model's weights are still referenced")
        [line] = self.unload_lines()
        self.assertEqual((line["n"], line["seconds"], line["device"]), (1, 2, "cpu"))
        # The next job loads the model again, and makes the same picture from the same seed.
        loads = self.worker._engine.load_count
        self.assertEqual(self.generate(), first)
        self.assertEqual(self.worker._engine.load_count, loads + 1)
        self.assertEqual(len(self.loaded()), 1)

    def test_a_new_job_resets_the_timer(self):
        self.generate()
        self.clock.advance(1.5)
        self.generate(seed=8)
        self.clock.advance(1.5)
        self.assertEqual(len(self.loaded()), 1)
        self.clock.advance(0.5)
        self.assertEqual(self.loaded(), ())

    def test_the_unload_waits_for_the_thread_and_a_later_job_loads_again(self):
        pool = ManualPool()
        worker = LocalWorker(SyncReactor(), device="cpu", dtype="float32", pool=pool,
                             engine_options=dict(library=ModelLibrary(self.models)), idle_unload=2, clock=self.clock)
        worker.startService()
        images = Images()
        request = parse_request(legacy_request(self.models, seed=7, steps=2), Path(self.models))
        done = worker.run(Job(request, "owner", images))
        pool.run_one()
        self.assertEqual(self.successResultOf(done), 1)
        self.clock.advance(2)  # the unload is queued on the worker's thread, not run here
        self.assertEqual(len(worker.loaded_models()), 1)
        again = worker.run(Job(request, "owner", images))  # a job that comes meanwhile
        self.assertEqual(len(pool.calls), 2)
        pool.run_one()
        self.assertEqual(worker.loaded_models(), ())
        pool.run_one()
        self.successResultOf(again)
        self.assertEqual(worker._engine.load_count, 2)
        self.assertEqual(images.pngs[0], images.pngs[1])
        worker.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_no_timer_without_the_option(self):
        worker = LocalWorker(SyncReactor(), device="cpu", pool=SyncPool())
        self.assertIsNone(worker.idle)

    def test_a_stopped_worker_unloads_nothing(self):
        self.generate()
        self.worker.stopService()
        self.clock.advance(5)
        self.assertEqual(len(self.loaded()), 1)


class DurationTests(SynchronousTestCase):
    def test_units(self):
        for text, seconds in (("90s", 90), ("10m", 600), ("1h", 3600), ("45", 45), ("1.5m", 90), ("2S", 2),
                              (" 3 h", 10800), ("0.5", 0.5)):
            self.assertEqual(parse_duration(text), seconds, text)

    def test_garbage_zero_negative_and_too_long(self):
        for text in ("", "m", "-5", "-5s", "5d", "5 min", "1e3", "nan", "inf", "0", "0s", "1h30m", "169h",
                     str(MAX_IDLE_UNLOAD + 1)):
            with self.assertRaises(ValueError, msg=text) as caught:
                parse_duration(text)
            self.assertIn("--idle-unload", str(caught.exception))

    def test_runai_option(self):
        options = tap.Options()
        options.parseOptions(["--idle-unload", "10m"])
        self.assertEqual(options["idle-unload"], 600)
        options = tap.Options()
        options.parseOptions([])
        self.assertIsNone(options["idle-unload"])
        with self.assertRaises(OptionError) as caught:
            tap.Options().parseOptions(["--idle-unload=-3s"])
        self.assertIn("--idle-unload must be a duration", caught.exception.message)

    def test_runai_worker_option(self):
        options = worker_tap.Options()
        options.parseOptions(["--broker", "redis://127.0.0.1:6379/0", "--idle-unload", "90s"])
        self.assertEqual(options["idle-unload"], 90)
        self.assertRaises(OptionError, worker_tap.Options().parseOptions,
                          ["--broker", "redis://127.0.0.1:6379/0", "--idle-unload", "soon"])

    def test_the_workers_get_it(self):
        options = tap.Options()
        options.parseOptions(["--idle-unload", "2s", "--device", "cpu", "--device", "cpu"])
        workers = tap.local_workers(options, task.Clock(), ModelLibrary(self.mktemp()))
        self.assertEqual([w.idle.seconds for w in workers], [2, 2])


class RealReactorTests(LiveServer, TestCase):
    """The whole server on the real reactor and worker thread, the socket door in front."""

    timeout = 120

    def setUp(self):
        self.models = tiny_model_dir()
        self.worker = LocalWorker(reactor, device="cpu", dtype="float32", idle_unload=0.5,
                                  engine_options=dict(library=ModelLibrary(self.models)))
        self.worker.startService()
        self.queue, self.core, self.factory = make_server(reactor, self.models, self.worker,
                                                          pool=reactor.getThreadPool())
        self.port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.addCleanup(self.worker.stopService)
        self.addCleanup(self.queue.stopService)
        self.addCleanup(self.port.stopListening)

    @inlineCallbacks
    def test_unloaded_after_the_job_and_the_next_job_works(self):
        [first] = yield self.talk(legacy_request(self.models, seed=4))
        done = reactor.seconds()
        self.assertEqual(len(self.worker.loaded_models()), 1)
        while self.worker.loaded_models() and reactor.seconds() - done < 30:
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(self.worker.loaded_models(), ())
        self.assertGreaterEqual(reactor.seconds() - done, 0.45)
        [second] = yield self.talk(legacy_request(self.models, seed=4))
        self.assertEqual(second[-1]["action"], "done")
        self.assertEqual(*(png_of(next(m for m in replies if "image" in m)) for replies in (first, second)))
