# -*- test-case-name: runai.test.test_http -*-
"""An HTTP request's job: its images gathered for one reply, and its progress for
``/sdapi/v1/progress``."""

import base64
import time

from twisted.internet.defer import Deferred
from zope.interface import implementer

from runai.core import errors
from runai.core.interfaces import IJobListener


@implementer(IJobListener)
class HttpJob:
    """Listens to one job; ``result`` fires with its images (also the ones made before an
    interrupt, as AUTOMATIC1111 answers one), or fails with its RunaiError."""

    def __init__(self, running, clock=time.monotonic):
        self.running = running  # the door's jobs in progress, for /progress
        self.clock = clock
        self.images = []
        self.result = Deferred()
        self.job = None
        self.step = 0
        self.total = 0
        self.started = None
        self.interrupted = False
        self.preview = None  # the latest preview's PNG, when the job makes them

    def job_queued(self, job, position):
        self.job = job
        if self not in self.running:
            self.running.append(self)

    def job_progress(self, job, step, total, preview=None):
        if self.started is None:
            self.started = self.clock()
        self.step, self.total = step, total
        if preview is not None:
            self.preview = preview

    def job_image(self, job, image):
        self.images.append(image)

    def job_done(self, job, result, seconds):
        self._end()
        self.result.callback(self.images)

    def job_failed(self, job, error):
        self._end()
        if error.code == errors.CANCELLED and self.interrupted:
            self.result.callback(self.images)
        else:
            self.result.errback(error)

    def _end(self):
        if self in self.running:
            self.running.remove(self)

    def progress(self):
        """``(fraction done, seconds left by the pace so far)``."""
        if not self.total:
            return 0.0, 0.0
        done = self.step / self.total
        elapsed = self.clock() - self.started if self.started is not None else 0.0
        return done, (elapsed / done - elapsed) if done else 0.0


def progress_reply(running, queued_and_busy, skip_current_image=False):
    """``GET /sdapi/v1/progress``: of this door's oldest job in progress, with its latest
    preview as ``current_image`` unless ``skip_current_image``; never a prompt."""
    queued, busy = queued_and_busy
    current = next((job for job in running if job.started is not None), None)
    fraction, eta = current.progress() if current is not None else (0.0, 0.0)
    return {
        "progress": fraction, "eta_relative": eta,
        "state": {
            "skipped": False, "interrupted": bool(current and current.interrupted),
            "job": f"task({current.job.serial})" if current is not None else "",
            "job_count": queued + (1 if busy else 0), "job_timestamp": "0", "job_no": 0,
            "sampling_step": current.step if current else 0, "sampling_steps": current.total if current else 0,
        },
        "current_image": (base64.b64encode(current.preview).decode("ascii")
                          if current is not None and current.preview is not None and not skip_current_image
                          else None),
        "textinfo": None,
    }
