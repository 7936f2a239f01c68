# -*- test-case-name: runai.test.test_broker_front -*-
"""A front's reply stream: what workers send about its jobs, read (``XREAD BLOCK``),
followed attempt by attempt, told to each job's listener, and deleted once read.

The front follows one attempt per job: the first that starts, then each one that starts
after it (a worker took the job over from one that stopped answering). What an earlier
attempt still sends is dropped; an image index told once is never told again; a restart
is told as the job running now (``job_queued(job, 0)``), and its progress starts again
from step 1.
"""

from twisted.logger import Logger

from runai.broker import wire
from runai.broker.client import BLOCK_MS, is_connection_error
from runai.core import errors


class Flight:
    """What the front knows of one of its jobs on the broker."""

    def __init__(self, job, key):
        self.job = job
        self.key = key
        self.entry = None  # the jobs stream entry id, once added
        self.attempt = None  # the attempt followed
        self.images = set()  # image indexes told to the client
        self.missing = 0  # polls in a row that found the job gone from Redis
        self.missing_at = 0  # the front's read count when it was first found gone
        self.cancelled = False  # this front asked its worker to stop it


def unavailable(message="the server cannot reach its job broker (Redis); try again later"):
    return errors.RunaiError(errors.BROKER_UNAVAILABLE, message)


class ReplyReader:
    """The reading half of :class:`runai.broker.front.BrokerBackend` (a mixin: it shares
    the backend's flights, connection and retry timers)."""

    log = Logger()

    def _read(self):
        if self._stopping:
            return
        d = self.connection.call(self.connection.redis.xread, {self.reply: self._last_id}, count=64, block=BLOCK_MS)
        d.addCallbacks(self._got, self._read_failed)

    def _got(self, streams):
        self._read_backoff.reset()
        self._reads += 1
        ids = []
        try:
            for _, entries in streams or ():
                for entry_id, fields in entries:
                    self._last_id = entry_id
                    ids.append(entry_id)
                    self._take(entry_id, fields)
        finally:  # whatever an entry holds, the reading goes on
            if ids and not self._stopping:
                self._fire([("XDEL", self.reply, *ids)])  # read: not kept
            self._read()

    def _take(self, entry_id, fields):
        """One entry of the reply stream, told to its job's listener; a malformed one (not
        from a worker of this version, or damaged) is dropped with one line in the log."""
        try:
            event = wire.decode_event(fields)
        except Exception as e:  # WireError, or whatever else a damaged entry makes decoding raise
            entry = entry_id.decode("ascii", "replace") if isinstance(entry_id, bytes) else str(entry_id)
            self.log.warn("Dropped a malformed entry {entry} of the reply stream: {message}", entry=entry,
                          message=getattr(e, "message", None) or repr(e))
            return
        try:
            self._dispatch(event)
        except Exception:  # a listener's bug must not stop the reading
            self.log.failure("A job listener failed on a {kind} event", kind=event.type)

    def _read_failed(self, failure):
        if self._stopping:
            return
        if is_connection_error(failure):
            self._went_down(failure)
            self._last_id = b"0-0"
        else:
            self.log.failure("Reading the reply stream failed", failure)
        self._later(self._read_backoff.next(), self._read)
        self._read_call = self._calls[-1] if self._calls else None

    def _dispatch(self, event):
        flight = self._flights.get(event.key)
        if flight is None:
            return  # a job that ended, was cancelled, or is another front's
        job = flight.job
        if event.type == "start":
            if event.attempt == flight.attempt:
                return
            if flight.attempt is not None:
                self.log.warn("Job {serial} restarts on worker {worker} (delivery {n}): its worker stopped "
                              "answering", serial=job.serial, worker=event.data.get("worker"),
                              n=event.data.get("deliveries"))
            restart = flight.attempt is not None
            flight.attempt = event.attempt
            job.state = "running"
            if restart or job.position != 0:
                # Running now; a restart is told so again, and its progress starts from step 1.
                job.position = 0
                job.listener.job_queued(job, 0)
            return
        if event.attempt != flight.attempt:
            return  # a stale attempt's, taken over since
        if event.type == "progress":
            if event.preview is None:
                job.listener.job_progress(job, int(event.data["step"]), int(event.data["total"]))
            else:
                job.listener.job_progress(job, int(event.data["step"]), int(event.data["total"]), event.preview)
        elif event.type == "image":
            if event.image.index not in flight.images:
                flight.images.add(event.image.index)
                job.listener.job_image(job, event.image)
        elif event.type in ("done", "failed"):
            del self._flights[flight.key]
            if event.type == "done":
                job.state = "done"
                job.listener.job_done(job, event.data["result"], float(event.data["seconds"]))
            else:
                error = wire.event_error(event)
                if error.code == errors.CANCELLED and not flight.cancelled:
                    # Stopped by its worker, not by this front: the worker lost sight of the
                    # job's front on the broker (a Redis that restarted without its data).
                    error = unavailable("the job broker (Redis) lost this job (restarted without its data?); "
                                        "send it again")
                self._fail(job, error)

    def _fail(self, job, error):
        job.state = "failed"
        job.listener.job_failed(job, error)


