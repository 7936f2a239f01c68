"""Several local workers in one server (``--device`` given several times): one thread,
engine and cache per device, one FIFO queue in front of them all."""

import threading

from twisted.internet import reactor
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from runai import tap
from runai.options import OptionError
from runai.backends.local import LocalWorker
from runai.core import errors
from runai.core.jobs import NullListener
from runai.core.queue import JobQueue
from runai.models.library import ModelLibrary
from runai.test.support import ScriptedEngine
from runai.test.test_e2e import LegacyClient, LiveServer, legacy_request, png_of, tiny_model_dir


class DeviceOptionTests(SynchronousTestCase):
    def parse(self, *args):
        options = tap.Options()
        options.parseOptions(list(args))
        return options

    def test_one_auto_device_by_default(self):
        options = self.parse()
        self.assertEqual((options["devices"], options["device"]), (["auto"], "auto"))

    def test_device_given_several_times(self):
        options = self.parse("--device", "cuda:0", "--device=cuda:1", "--device", "cpu")
        self.assertEqual(options["devices"], ["cuda:0", "cuda:1", "cpu"])

    def test_every_device_is_checked(self):
        for args in (["--device", "cpu", "--device", "tpu"], ["--device", "cuda:x", "--device", "cpu"]):
            with self.assertRaises(OptionError) as caught:
                self.parse(*args)
            self.assertIn("--device", caught.exception.message)

    def test_one_worker_per_device_and_one_queue(self):
        options = self.parse("--port", "0", "--device", "cpu", "--device", "cpu")
        service = tap.makeService(options, reactor=MemoryReactorClock())
        workers = [s for s in service if isinstance(s, LocalWorker)]
        [queue] = [s for s in service if isinstance(s, JobQueue)]
        self.assertEqual(len(workers), 2)
        self.assertEqual(queue.workers, workers)
        # Each has its own thread (and so its own engine and cache), named apart.
        self.assertNotEqual(workers[0].pool, workers[1].pool)
        self.assertEqual([w.pool.name for w in workers], ["runai-worker-0-cpu", "runai-worker-1-cpu"])
        # The CPU's cores are shared between them, not claimed twice.
        self.assertEqual({w.cpu_threads for w in workers}, {max(1, (__import__("os").cpu_count() or 1) // 2)})

    def test_a_single_worker_keeps_torch_defaults(self):
        service = tap.makeService(self.parse("--port", "0", "--device", "cpu"), reactor=MemoryReactorClock())
        [worker] = [s for s in service if isinstance(s, LocalWorker)]
        self.assertIsNone(worker.cpu_threads)


class Request:
    action = "txt2img"
    model_path = "/models/a"
    n_samples = n_iter = image_count = 1
    steps = 2
    width = height = 64

    def seeds(self):
        return [0]


class RendezvousEngine(ScriptedEngine):
    """An engine whose job ends only when another worker's job is running at the same
    time: both wait at one barrier, which breaks (failing both) if they run one after
    the other."""

    def __init__(self, barrier):
        super().__init__()
        self.barrier = barrier

    def generate(self, request, on_progress, on_image, is_cancelled):
        self.barrier.wait()
        return super().generate(request, on_progress, on_image, is_cancelled)


class ConcurrencyTests(TestCase):
    timeout = 60

    def workers(self, count, barrier):
        made = []
        for index in range(count):
            worker = LocalWorker(reactor, device="cpu", name=f"test-worker-{index}",
                                 engine_factory=lambda device, dtype, **_: RendezvousEngine(barrier))
            worker.startService()
            self.addCleanup(worker.stopService)
            made.append(worker)
        return made

    def submit(self, queue, count):
        from runai.core.jobs import Job

        heard = Heard()
        for _ in range(count):
            queue.submit(Job(Request(), owner=object(), listener=heard))
        return heard

    @inlineCallbacks
    def test_two_workers_run_two_jobs_at_once(self):
        queue = JobQueue(self.workers(2, threading.Barrier(2, timeout=20)))
        heard = self.submit(queue, 2)
        self.assertEqual((len(queue.running_jobs), queue.queued), (2, 0))
        while len(heard.ended) < 2:
            yield deferLater(0.05)
        self.assertEqual(heard.ended, ["done", "done"])

    @inlineCallbacks
    def test_one_worker_runs_them_one_after_the_other(self):
        # The same rendezvous with one worker breaks: the test above can fail.
        queue = JobQueue(self.workers(1, threading.Barrier(2, timeout=1)))
        heard = self.submit(queue, 2)
        self.assertEqual((len(queue.running_jobs), queue.queued), (1, 1))
        while len(heard.ended) < 2:
            yield deferLater(0.05)
        self.assertEqual(heard.ended, [errors.INTERNAL, errors.INTERNAL])
        self.assertIn("BrokenBarrierError", heard.messages[0])
        self.assertEqual(len(self.flushLoggedErrors(threading.BrokenBarrierError)), 2)


class Heard(NullListener):
    def __init__(self):
        self.ended = []
        self.messages = []

    def job_done(self, job, result, seconds):
        self.ended.append("done")

    def job_failed(self, job, error):
        self.ended.append(error.code)
        self.messages.append(error.message)


def deferLater(seconds):
    from twisted.internet.task import deferLater as later

    return later(reactor, seconds, lambda: None)


class TwoCpuWorkersEndToEnd(LiveServer, TestCase):
    """The real engine on two CPU worker threads behind the real socket door."""

    timeout = 300

    def setUp(self):
        self.models = tiny_model_dir()
        library = ModelLibrary(self.models)
        self.workers = [LocalWorker(reactor, device="cpu", dtype="float32", name=f"e2e-worker-{i}",
                                    cpu_threads=1, engine_options=dict(library=library)) for i in range(2)]
        for worker in self.workers:
            worker.startService()
            self.addCleanup(worker.stopService)
        from runai.test.support import make_server

        self.queue, self.core, self.factory = make_server(reactor, self.models, list(self.workers),
                                                          pool=reactor.getThreadPool(), idle_timeout=30)
        self.port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.addCleanup(self.queue.stopService)
        self.addCleanup(self.port.stopListening)

    @inlineCallbacks
    def test_same_seed_same_bytes_on_either_worker(self):
        pictures = []
        for worker in self.workers:
            # Each worker in turn, with its own engine and cache.
            self.queue.workers = [worker]
            [replies] = yield self.talk(legacy_request(self.models, seed=7))
            pictures.append(png_of(next(m for m in replies if "image" in m)))
        self.assertEqual([len(w.loaded_models()) for w in self.workers], [1, 1])
        self.queue.workers = list(self.workers)
        results = yield gatherResults([self.talk(legacy_request(self.models, seed=7)) for _ in range(4)])
        pictures.extend(png_of(next(m for m in replies if "image" in m)) for [replies] in results)
        self.assertEqual(len(pictures), 6)
        self.assertEqual(len(set(pictures)), 1)

    @inlineCallbacks
    def test_a_short_job_finishes_beside_a_long_one_which_can_still_be_cancelled(self):
        port = self.port.getHost().port

        def long_job():
            client = LegacyClient(port)
            try:
                client.send(legacy_request(self.models, steps=150))
                replies = [client.receive()]
                while replies[-1].get("action") != 4:
                    replies.append(client.receive())
                short = LegacyClient(port)
                try:
                    short.send(legacy_request(self.models, seed=3))
                    beside = short.until_final()
                finally:
                    short.close()
                client.send_raw(b"c" * 1024)
                return beside, replies + client.until_final()
            finally:
                client.close()

        beside, cancelled = yield self.in_thread(long_job)
        # The short job was not queued behind the long one: another worker took it, and it
        # ended while the long one still ran (which was then cancelled short of its end).
        self.assertEqual(beside[-1]["action"], "done")
        self.assertFalse(any(m.get("action") == "queued" and m.get("position") for m in beside), beside)
        self.assertEqual(cancelled[-1]["error"]["code"], errors.CANCELLED)
        self.assertLess(len([m for m in cancelled if m.get("action") == 4]), 150)

    @inlineCallbacks
    def test_ping_counts_the_workers(self):
        def ping():
            client = LegacyClient(self.port.getHost().port)
            try:
                client.send({"action": "ping"})
                return client.receive()
            finally:
                client.close()
        pong = yield self.in_thread(ping)
        self.assertEqual((pong["action"], pong["workers"], pong["queued"]), ("pong", 2, 0))
