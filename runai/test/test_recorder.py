"""runai.history.recorder: the history hears jobs as any door does."""

from twisted.trial.unittest import SynchronousTestCase

from runai.core import errors
from runai.history.recorder import Recorder
from runai.test.support import FakeImage


class FakeStore:
    def __init__(self):
        self.calls = []

    def begin(self, request):
        self.calls.append(("begin", request))
        return "record"

    def add_image(self, record, image):
        self.calls.append(("image", record, image.index))

    def finish(self, record, status, error=None, seconds=None):
        self.calls.append(("finish", record, status))

    def failed(self, record, error):
        self.calls.append(("failed", record, error.code))


class WithheldImage(FakeImage):
    withheld = True


class RecorderTests(SynchronousTestCase):
    def test_a_request_is_written_when_the_back_end_takes_it(self):
        store = FakeStore()
        listener = Recorder(store).listener("the request")
        self.assertEqual(store.calls, [])  # refused before the queue: nothing kept
        listener.job_queued(None, 2)
        listener.job_queued(None, 1)
        listener.job_image(None, FakeImage(b"png", 1, 8, 8, 0))
        listener.job_image(None, WithheldImage(b"", 2, 8, 8, 1))
        listener.job_done(None, 2, 1.5)
        self.assertEqual(store.calls, [("begin", "the request"), ("image", "record", 0), ("finish", "record", "done")])

    def test_failures_and_cancels(self):
        store = FakeStore()
        listener = Recorder(store).listener("r")
        listener.job_queued(None, 0)
        listener.job_failed(None, errors.JobCancelled("the client disconnected"))
        self.assertEqual(store.calls[-1], ("failed", "record", errors.CANCELLED))
