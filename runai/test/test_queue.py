"""runai.core.queue: the one FIFO queue in front of the workers, with workers whose jobs
end when the test says so."""

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from runai.core import errors
from runai.core.interfaces import IBackend, IJobListener, IWorker
from runai.core.jobs import Job
from runai.core.queue import JobQueue


@implementer(IWorker)
class FakeWorker:
    def __init__(self, loaded=()):
        self.loaded = tuple(loaded)
        self.runs = []  # (job, Deferred)

    def run(self, job):
        d = Deferred()
        self.runs.append((job, d))
        return d

    def loaded_models(self):
        return self.loaded

    def finish(self, result=1):
        job, d = self.runs.pop(0)
        d.callback(result)
        return job


@implementer(IJobListener)
class Heard:
    def __init__(self):
        self.events = []

    def job_queued(self, job, position):
        self.events.append(("queued", job.request.seed, position))

    def job_progress(self, job, step, total):
        self.events.append(("progress", job.request.seed, step))

    def job_image(self, job, image):
        self.events.append(("image", job.request.seed))

    def job_done(self, job, result, seconds):
        self.events.append(("done", job.request.seed, result))

    def job_failed(self, job, error):
        self.events.append(("failed", job.request.seed, error.code))


class Request:
    action = "txt2img"
    id = None

    def __init__(self, seed, model_path="m1"):
        self.seed = seed
        self.model_path = model_path


class QueueTests(SynchronousTestCase):
    def setUp(self):
        self.heard = Heard()
        self.workers = [FakeWorker()]
        self.queue = JobQueue(self.workers, now=lambda: 0.0)
        self.queue.startService()

    def submit(self, seed, owner="a", model_path="m1"):
        job = Job(Request(seed, model_path), owner, self.heard)
        self.queue.submit(job)
        return job

    def test_interfaces(self):
        verifyObject(IBackend, self.queue)
        verifyObject(IWorker, self.workers[0])

    def test_fifo_and_positions(self):
        self.submit(1)
        self.submit(2)
        self.submit(3)
        self.assertEqual(self.heard.events, [("queued", 1, 0), ("queued", 2, 1), ("queued", 3, 2)])
        self.assertEqual((self.queue.queued, self.queue.busy), (2, True))
        self.assertEqual(self.workers[0].finish().request.seed, 1)
        self.assertEqual(self.heard.events[3:], [("done", 1, 1), ("queued", 3, 1)])
        self.assertEqual(self.workers[0].finish().request.seed, 2)
        self.assertEqual(self.workers[0].finish().request.seed, 3)
        self.assertEqual((self.queue.queued, self.queue.busy), (0, False))

    def test_limits(self):
        self.queue.max_queued_per_owner = 1
        self.submit(1)
        self.submit(2)
        with self.assertRaises(errors.RunaiError) as e:
            self.submit(3)
        self.assertEqual(e.exception.code, errors.QUEUE_FULL)
        self.submit(4, owner="b")
        self.queue.max_queued = 2
        with self.assertRaises(errors.RunaiError) as e:
            self.submit(5, owner="c")
        self.assertEqual(e.exception.code, errors.QUEUE_FULL)

    def test_drop_owner_fails_its_waiting_jobs_and_cancels_its_running_one(self):
        running = self.submit(1)
        self.submit(2)
        self.submit(3, owner="b")
        dropped = self.queue.drop_owner("a")
        self.assertEqual([j.request.seed for j in dropped], [2])
        self.assertIn(("failed", 2, errors.CANCELLED), self.heard.events)
        self.assertTrue(running.cancel_event.is_set())
        self.assertEqual(self.queue.jobs_of("a"), [running])

    def test_a_worker_that_fails_is_reported(self):
        self.submit(1)
        job, d = self.workers[0].runs.pop()
        d.errback(Failure(RuntimeError("kaboom")))
        self.assertEqual(self.heard.events[-1], ("failed", 1, errors.INTERNAL))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.submit(2)
        job, d2 = self.workers[0].runs.pop()
        d2.errback(Failure(errors.RunaiError(errors.OUT_OF_MEMORY, "full")))
        self.assertEqual(self.heard.events[-1], ("failed", 2, errors.OUT_OF_MEMORY))

    def test_stop_answers_every_job_at_once(self):
        running = self.submit(1)
        self.submit(2)
        self.queue.stopService()
        self.assertEqual(self.heard.events[-2:], [("failed", 2, errors.SHUTTING_DOWN), ("failed", 1, errors.CANCELLED)])
        self.assertTrue(running.cancel_event.is_set())
        # What the worker's thread reports later goes nowhere.
        self.workers[0].finish()
        self.assertEqual(self.heard.events[-1], ("failed", 1, errors.CANCELLED))
        with self.assertRaises(errors.RunaiError) as e:
            self.submit(3)
        self.assertEqual(e.exception.code, errors.SHUTTING_DOWN)


class SeveralWorkersTests(SynchronousTestCase):
    def test_idle_workers_take_jobs_preferring_a_loaded_model(self):
        cold, warm = FakeWorker(), FakeWorker(loaded=("m2",))
        queue = JobQueue([cold, warm])
        heard = Heard()
        queue.submit(Job(Request(1, "m2"), "a", heard))
        queue.submit(Job(Request(2, "m1"), "a", heard))
        queue.submit(Job(Request(3, "m1"), "a", heard))
        self.assertEqual([j.request.seed for j, _ in warm.runs], [1])
        self.assertEqual([j.request.seed for j, _ in cold.runs], [2])
        self.assertEqual(heard.events, [("queued", 1, 0), ("queued", 2, 0), ("queued", 3, 2)])
        self.assertEqual(queue.loaded_models(), ("m2",))
        warm.finish()
        self.assertEqual([j.request.seed for j, _ in warm.runs], [3])
