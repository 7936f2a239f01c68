# -*- test-case-name: runai.test.test_idle_unload -*-
"""``--idle-unload``: a timer on the reactor that fires after a worker has been that long
without a job.

The timer only says when; what happens then (the models leave the device, on the
worker's own thread) is the worker's business: :meth:`runai.backends.local.LocalWorker.unload`.
"""

from twisted.logger import Logger


class IdleTimer:
    """Calls ``fire()`` once ``seconds`` have passed with no job running: stopped when a
    job starts, started again when the last running one ends. ``clock`` provides
    ``IReactorTime`` (the reactor, or a ``task.Clock`` in tests); everything runs on the
    reactor thread."""

    log = Logger()

    def __init__(self, clock, seconds, fire):
        self.clock = clock
        self.seconds = seconds
        self.fire = fire
        self.running = 0  # jobs started and not finished
        self._call = None

    @property
    def armed(self):
        return self._call is not None and self._call.active()

    def job_started(self):
        self.running += 1
        self._cancel()

    def job_finished(self):
        self.running = max(0, self.running - 1)
        if self.running == 0:
            self._arm()

    def stop(self):
        """No more firing (the worker stops)."""
        self._cancel()

    def _arm(self):
        self._cancel()
        self._call = self.clock.callLater(self.seconds, self._fired)

    def _cancel(self):
        if self.armed:
            self._call.cancel()
        self._call = None

    def _fired(self):
        self._call = None
        if self.running == 0:
            self.fire()
