# -*- test-case-name: runai.test.test_broker_front -*-
"""The back end of a front server (``twistd runai --broker URL``): jobs go onto a Redis
stream, and workers on other machines (:mod:`runai.broker.consumer`) run them.

A job is added to the jobs stream and, in the same script, to a sorted set of the jobs
waiting or running (its rank is the job's position). Workers send its events to this
front's own reply stream, which the front reads (``XREAD BLOCK``) and deletes as it goes.
Each run of a job is an *attempt* with its own id: when a worker dies and another takes
the job over, the front follows the new attempt only, drops what the old one still sends,
and never forwards an image index twice, so the client sees the job restart (progress
from step 1 again) and one set of images.

A poll (every :attr:`BrokerBackend.poll_interval` seconds) keeps this front's key alive
(workers drop the jobs of a front that is gone), reads the positions of its waiting
jobs, and the workers alive (each one's key, with what it has loaded). While Redis cannot
be reached, new jobs are refused at once (``broker_unavailable``); jobs in flight keep
waiting for :attr:`grace` seconds, and fail with that code after. A job that Redis no
longer knows (Redis restarted without its data) fails with it too.
"""

import collections
import json
import os
import secrets
import time

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from runai.broker import wire
from runai.broker.client import Backoff, is_connection_error
from runai.broker.replies import Flight, ReplyReader, unavailable
from runai.core import errors
from runai.core.interfaces import IBackend
from runai.core.requests import ConvertRequest

# XADD to the jobs stream and ZADD to the queue in one step; returns the entry's id and rank.
_SUBMIT = """
local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 2))
local ms, seq = string.match(id, '(%d+)-(%d+)')
redis.call('ZADD', KEYS[2], tonumber(ms) * 1000 + tonumber(seq), ARGV[1])
return {id, redis.call('ZRANK', KEYS[2], ARGV[1])}
"""


@implementer(IBackend)
class BrokerBackend(ReplyReader, service.Service):
    """An IBackend whose workers are other processes, reached through Redis. ``connection``
    is a started :class:`runai.broker.client.RedisConnection`; ``model_dir`` is the
    front's model folder, the catalogue that workers' model names are read in."""

    log = Logger()

    max_queued = 256  # this front's jobs waiting
    max_queued_per_owner = 16
    poll_interval = 1.0
    grace = 60.0  # how long jobs in flight wait for a Redis that cannot be reached
    front_ttl = 30  # seconds this front's key lives without a poll
    reply_ttl = 600  # seconds the reply stream lives without a poll
    missing_polls = 3  # polls that must find a job gone before it is failed as lost

    def __init__(self, connection, reactor, model_dir, keys=None, front_id=None, now=time.monotonic):
        self.connection = connection
        self.reactor = reactor
        self.model_dir = str(model_dir)
        self.keys = keys or wire.Keys()
        self.front = front_id or secrets.token_hex(8)
        self.reply = self.keys.reply(self.front)
        self.now = now
        self.available = False  # until the first poll reaches Redis
        self.workers = {}  # alive worker name -> {"busy", "loaded", ...}
        self._flights = {}  # job key -> _Flight, in submission order
        self._queue_size = 0
        self._down_since = None
        self._last_id = b"0-0"
        self._reads = 0  # reads of the reply stream done
        self._read_call = None  # a read waiting for its retry
        self._stopping = False
        self._calls = []  # pending delayed calls
        self._outbox = collections.deque()  # flights to put on the stream, in order
        self._submitting = False
        self._backoff = Backoff()
        self._read_backoff = Backoff()
        self._submit = connection.script(_SUBMIT)

    # IBackend --------------------------------------------------------------------------

    @property
    def queued(self):
        """Jobs waiting on the broker, every front's."""
        return max(0, self._queue_size - self.busy_workers, sum(1 for f in self._flights.values()
                                                                 if f.job.state == "queued"))

    @property
    def busy_workers(self):
        return sum(1 for w in self.workers.values() if w.get("busy"))

    @property
    def busy(self):
        return self.busy_workers > 0 or any(f.job.state == "running" for f in self._flights.values())

    @property
    def workers_alive(self):
        return len(self.workers)

    def loaded_models(self):
        """The models some worker has loaded, as paths in the front's model folder."""
        loaded = []
        for info in self.workers.values():
            for name in info.get("loaded", ()):
                path = os.path.join(self.model_dir, name)
                if path not in loaded:
                    loaded.append(path)
        return tuple(loaded)

    def jobs(self):
        flights = list(self._flights.values())
        return ([f.job for f in flights if f.job.state == "running"]
                + [f.job for f in flights if f.job.state == "queued"])

    def jobs_of(self, owner):
        return [job for job in self.jobs() if job.owner is owner]

    def submit(self, job):
        if self._stopping:
            raise errors.RunaiError(errors.SHUTTING_DOWN, "the server is shutting down")
        if not self.available:
            raise unavailable()
        if isinstance(job.request, ConvertRequest):
            raise errors.RunaiError(errors.NOT_IMPLEMENTED, "a front server (--broker) converts no models: run "
                                                            "`runai convert` on each worker's machine")
        waiting = [f.job for f in self._flights.values() if f.job.state == "queued"]
        if len(waiting) >= self.max_queued:
            raise errors.RunaiError(errors.QUEUE_FULL, f"the server's queue is full ({self.max_queued} jobs)")
        if sum(1 for j in waiting if j.owner is job.owner) >= self.max_queued_per_owner:
            raise errors.RunaiError(
                errors.QUEUE_FULL, f"this connection already has {self.max_queued_per_owner} jobs waiting")
        flight = Flight(job, f"{self.front}-{job.serial}")
        self._flights[flight.key] = flight
        job.state = "queued"
        # Told at once, as the local queue does: an estimate, corrected once Redis answers.
        job.position = self._queue_size
        job.listener.job_queued(job, job.position)
        self._outbox.append(flight)
        self._pump()

    def _pump(self):
        # One submission at a time: the stream keeps the order the clients sent.
        if self._submitting or not self._outbox:
            return
        flight = self._outbox.popleft()
        if flight.job.state != "queued":
            self._pump()
            return
        self._submitting = True
        fields = wire.encode_job(flight.job.request, flight.key, self.front)
        args = [flight.key] + [item for pair in fields.items() for item in pair]
        d = self._submit([self.keys.jobs, self.keys.queue], args)
        d.addCallbacks(self._submitted, self._submit_failed, callbackArgs=(flight,), errbackArgs=(flight,))
        d.addBoth(self._pumped)

    def _pumped(self, _):
        self._submitting = False
        self._pump()

    def _submitted(self, reply, flight):
        entry, rank = reply
        flight.entry = entry
        if flight.job.state == "queued" and rank is not None:
            self._tell_position(flight.job, int(rank))

    def _submit_failed(self, failure, flight):
        if is_connection_error(failure):
            self._went_down(failure)
        else:
            self.log.failure("A job could not be put on the broker", failure)
        if self._flights.pop(flight.key, None) is not None:
            self._fail(flight.job, unavailable("the job could not be put on the job broker (Redis); try again"))

    def cancel(self, job):
        flight = self._flight_of(job)
        if flight is None:
            return
        if job.state == "queued":
            del self._flights[flight.key]
            self._fail(job, errors.JobCancelled())
            self._withdraw(flight)
        elif job.state == "running":
            job.cancel_event.set()
            self._signal_cancel([flight])

    def cancel_running(self, owner):
        self._signal_cancel([f for f in self._flights.values() if f.job.owner is owner and f.job.state == "running"])

    def drop_owner(self, owner):
        dropped = [f for f in self._flights.values() if f.job.owner is owner and f.job.state == "queued"]
        for flight in dropped:
            del self._flights[flight.key]
        for flight in dropped:
            self._fail(flight.job, errors.JobCancelled("the client disconnected"))
            self._withdraw(flight)
        self.cancel_running(owner)
        return [f.job for f in dropped]

    def _flight_of(self, job):
        return next((f for f in self._flights.values() if f.job is job), None)

    def _withdraw(self, flight):
        """Take a job that will not run off the queue; the worker that takes its entry
        sees the cancel, and deletes it without running it."""
        # Not XDEL: an entry a worker has read already would stay in its pending list
        # with no id to acknowledge (Redis 6.2). The worker that takes it deletes it.
        self._fire([("SET", self.keys.cancel(flight.key), 1, "EX", 3600), ("ZREM", self.keys.queue, flight.key)])

    def _signal_cancel(self, flights):
        """The cancel key (checked by the worker that takes or runs the job), then a push
        to the workers that stops the running job at its next step."""
        commands = []
        for flight in flights:
            flight.cancelled = True
            commands += [("SET", self.keys.cancel(flight.key), 1, "EX", 3600),
                         ("PUBLISH", self.keys.cancels, flight.key)]
        if commands:
            self._fire(commands)

    def _fire(self, commands):
        """Commands whose outcome nobody waits for; a failure is logged."""
        return self.connection.pipeline(commands).addErrback(
            lambda f: self.log.warn("A broker command failed: {error}", error=f.getErrorMessage()))

    # Service ---------------------------------------------------------------------------

    def startService(self):
        super().startService()
        self._stopping = False
        self._poll()
        self._read()

    def stopService(self):
        """Fail what waits, report the running jobs cancelled now (as the local queue
        does), ask their workers to stop, and delete this front's keys."""
        super().stopService()
        self._stopping = True
        for call in self._calls:
            if call.active():
                call.cancel()
        self._calls = []
        flights = list(self._flights.values())
        self._flights.clear()
        for flight in flights:
            if flight.job.state == "queued":
                self._fail(flight.job, errors.RunaiError(errors.SHUTTING_DOWN, "the server is shutting down"))
            else:
                self._fail(flight.job, errors.JobCancelled("the server is shutting down"))
            flight.job.detach()
        commands = [("SET", self.keys.cancel(f.key), 1, "EX", 3600) for f in flights]
        commands += [("ZREM", self.keys.queue, f.key) for f in flights]
        commands += [("DEL", self.reply, self.keys.front(self.front))]
        if not self.available:
            return None
        d = self._fire(commands)
        return _within(self.reactor, d, 2.0)

    def _later(self, seconds, f):
        if self._stopping:
            return
        self._calls = [c for c in self._calls if c.active()]
        self._calls.append(self.reactor.callLater(seconds, f))

    # The poll --------------------------------------------------------------------------

    def _poll(self):
        if self._stopping:
            return
        flights = [f for f in self._flights.values() if f.entry is not None]
        d = self.connection.call(self._poll_redis, [f.key for f in flights])
        d.addCallbacks(self._polled, self._poll_failed, callbackArgs=(flights,))

    def _poll_redis(self, keys):
        """In a pool thread: keep this front alive, read ranks and the workers."""
        pipe = self.connection.redis.pipeline(transaction=False)
        pipe.set(self.keys.front(self.front), 1, ex=self.front_ttl)
        pipe.expire(self.reply, self.reply_ttl)
        pipe.zcard(self.keys.queue)
        pipe.smembers(self.keys.workers)
        for key in keys:
            pipe.zrank(self.keys.queue, key)
        replies = pipe.execute()
        names = sorted(replies[3])
        keys = [self.keys.worker(name.decode("utf-8", "replace")) for name in names]
        infos = self.connection.redis.mget(keys) if names else []
        gone = [n for n, info in zip(names, infos) if info is None]
        if gone:
            self.connection.redis.srem(self.keys.workers, *gone)
        workers = {}
        for name, info in zip(names, infos):
            if info is not None:
                workers[name.decode("utf-8", "replace")] = _worker_info(info)
        return replies[2], replies[4:], workers

    def _polled(self, result, flights):
        try:
            self._read_poll(result, flights)
        finally:
            self._later(self.poll_interval, self._poll)

    def _read_poll(self, result, flights):
        queue_size, ranks, workers = result
        if not self.available:
            self.log.info("The job broker is reachable{again}", again=" again" if self._down_since else "")
            self._last_id = b"0-0"  # a restarted Redis numbers its entries from 0 again
            if self._read_call is not None and self._read_call.active():
                self._read_call.cancel()  # no need to wait for the retry
                self._read()
        self.available = True
        self._down_since = None
        self._backoff.reset()
        self._queue_size = int(queue_size)
        self.workers = workers
        for flight, rank in zip(flights, ranks):
            if self._flights.get(flight.key) is not flight:
                continue
            if rank is None:
                # Done (its last event is on its way: it is sent before the job leaves the
                # queue, so two reads later it has come), or lost with Redis's data.
                if not flight.missing:
                    flight.missing_at = self._reads
                flight.missing += 1
                if flight.missing >= self.missing_polls and self._reads - flight.missing_at >= 2:
                    del self._flights[flight.key]
                    self._fail(flight.job, unavailable(
                        "the job broker (Redis) lost this job (restarted without its data?); send it again"))
                continue
            flight.missing = 0
            if flight.job.state == "queued":
                self._tell_position(flight.job, int(rank))

    def _poll_failed(self, failure):
        if not is_connection_error(failure):
            self.log.failure("The broker poll failed", failure)
        else:
            self._went_down(failure)
        if self._down_since is not None and self.now() - self._down_since > self.grace:
            flights = list(self._flights.values())
            self._flights.clear()
            for flight in flights:
                self._fail(flight.job, unavailable(
                    f"the job broker (Redis) could not be reached for {self.grace:g}s while this job was in flight"))
        self._later(self._backoff.next(), self._poll)

    def _went_down(self, failure):
        if self.available or self._down_since is None:
            self.log.warn("The job broker (Redis) cannot be reached: {error}", error=failure.getErrorMessage())
        self.available = False
        if self._down_since is None:
            self._down_since = self.now()

    def _tell_position(self, job, position):
        if position != job.position:
            job.position = position
            job.listener.job_queued(job, position)


def _worker_info(raw):
    """A worker's key, as the fronts read it: ``{"busy", "loaded", ...}``; a malformed one
    (not from a worker of this version, or damaged) counts as a live, idle worker with
    nothing loaded, rather than stop the poll."""
    try:
        info = json.loads(raw)
    except ValueError:
        info = None
    if not isinstance(info, dict):
        return {"busy": False, "loaded": [], "malformed": True}
    loaded = info.get("loaded")
    if not isinstance(loaded, list) or not all(isinstance(name, str) for name in loaded):
        info["loaded"] = []
    return info


def _within(reactor, d, seconds):
    """``d``, or None after ``seconds``: a stop does not wait long for a Redis that hangs."""
    done = defer.Deferred()
    timer = reactor.callLater(seconds, lambda: done.called or done.callback(None))

    def fired(_):
        if timer.active():
            timer.cancel()
        if not done.called:
            done.callback(None)
    d.addBoth(fired)
    return done
