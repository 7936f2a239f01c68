# -*- test-case-name: runai.test.test_queue -*-
"""A job: one request from one owner (a client connection), and who hears about it."""

import itertools
import threading
import time

from zope.interface import implementer

from runai.core.interfaces import IJobListener


@implementer(IJobListener)
class NullListener:
    """Hears nothing: what a detached job reports to."""

    def job_queued(self, job, position):
        pass

    def job_progress(self, job, step, total, preview=None):
        pass

    def job_image(self, job, image):
        pass

    def job_done(self, job, result, seconds):
        pass

    def job_failed(self, job, error):
        pass


@implementer(IJobListener)
class Listeners:
    """Several listeners heard as one, in order: the door that answers the client, then
    whatever else records the job (the history)."""

    def __init__(self, *listeners):
        self.listeners = listeners

    def job_queued(self, job, position):
        for listener in self.listeners:
            listener.job_queued(job, position)

    def job_progress(self, job, step, total, preview=None):
        for listener in self.listeners:
            listener.job_progress(job, step, total, preview)

    def job_image(self, job, image):
        for listener in self.listeners:
            listener.job_image(job, image)

    def job_done(self, job, result, seconds):
        for listener in self.listeners:
            listener.job_done(job, result, seconds)

    def job_failed(self, job, error):
        for listener in self.listeners:
            listener.job_failed(job, error)


class Job:
    """One request (a :mod:`runai.core.requests` object) from one owner.

    ``owner`` is whatever the door uses to tell its clients apart (compared by identity);
    ``listener`` (an :class:`IJobListener`) hears the job's events on the reactor thread.
    ``state`` goes new -> queued -> running -> done or failed.
    """

    _serial = itertools.count(1)
    # Bytes its door keeps for it beyond the request (what a reply repeats of the request):
    # the queue's byte limits count them with the request's images.
    held_bytes = 0

    def __init__(self, request, owner, listener):
        self.serial = next(self._serial)
        self.request = request
        self.owner = owner
        self.listener = listener
        self.cancel_event = threading.Event()
        # When it entered each state (time.monotonic()), for the queue and run times of --metrics.
        self.stamps = {}
        self.state = "new"
        self.position = None

    @property
    def state(self):
        return self._state

    @state.setter
    def state(self, value):
        self._state = value
        self.stamps[value] = time.monotonic()

    @property
    def id(self):
        return self.request.id

    def detach(self):
        """Report nothing more: the job's outcome has been told already (a shutdown), and
        whatever its thread still reports goes nowhere."""
        self.listener = NullListener()

    def __repr__(self):
        return f"<Job {self.serial} id={self.id!r} {self.request.action} {self.state}>"
