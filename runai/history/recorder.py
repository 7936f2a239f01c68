# -*- test-case-name: runai.test.test_recorder -*-
"""The history records jobs by listening to them, like any door does.

:meth:`Recorder.listener` gives an :class:`IJobListener` that writes the request when
the back end takes the job (a request refused at the door or by a full queue is not
kept), then its images and its outcome: done, failed, cancelled (a client that went
away, a shutdown). Nothing special happens anywhere else for the history's sake.
"""

from zope.interface import implementer

from runai.core.interfaces import IJobListener


class Recorder:
    """Records jobs in ``store`` (a :class:`runai.history.store.Store`)."""

    def __init__(self, store):
        self.store = store

    def listener(self, request):
        return RecordingListener(self.store, request)


@implementer(IJobListener)
class RecordingListener:
    def __init__(self, store, request):
        self.store = store
        self.request = request
        self.record = None  # the request's row, once the job is taken

    def job_queued(self, job, position):
        if self.record is None:
            self.record = self.store.begin(self.request)

    def job_progress(self, job, step, total, preview=None):
        pass

    def job_image(self, job, image):
        if not getattr(image, "withheld", False):  # a flagged image is not kept
            self.store.add_image(self.record, image)

    def job_done(self, job, result, seconds):
        self.store.finish(self.record, "done", seconds=seconds)

    def job_failed(self, job, error):
        self.store.failed(self.record, error)
