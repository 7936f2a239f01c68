# -*- test-case-name: runai.test.test_broker_front -*-
"""The worker side: one :class:`Consumer` per local worker takes jobs from the jobs stream
through the workers' consumer group, runs them on its :class:`LocalWorker`, and sends
their events to the front that owns them.

When idle it first takes over a job whose worker stopped answering (``XAUTOCLAIM`` with
a min-idle of ``deadline``), else waits for a new one (``XREADGROUP BLOCK``). While a job
runs it refreshes its claim every ``deadline / 3`` (``XCLAIM ... JUSTID``, only while it
still owns the entry), so a long job never looks dead, and polls the job's cancel key
every ``cancel_poll`` seconds, so a cancel or a client's disconnect stops it within a
step (a front also pushes the cancel: :mod:`runai.broker.cancels`). Events go out in order, retried with backoff while Redis is away. At the end the
entry is acknowledged and deleted (only if this consumer still owns it): nothing of the
job stays in Redis. A job delivered more than ``max_deliveries`` times fails instead of
running again, so that a job that kills its workers does not loop forever.
"""

import collections
import json
import os
import secrets

from twisted.application import service
from twisted.internet import task
from twisted.logger import Logger

from runai.broker import wire
from runai.broker.client import BLOCK_MS, Backoff, is_connection_error
from runai.core import errors
from runai.core.jobs import Job, NullListener

# Refresh this consumer's claim on its entry, if it still owns it: 1, else 0.
_HEARTBEAT = """
local p = redis.pcall('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if p.err or #p == 0 or p[1][2] ~= ARGV[2] then return 0 end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'JUSTID')
return 1
"""
# Acknowledge and delete the entry, if this consumer still owns it; then drop the job's keys.
_FINISH = """
-- A Redis that restarted empty has no group: nothing is owned, nothing to acknowledge.
local p = redis.pcall('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if not p.err and #p > 0 and p[1][2] == ARGV[2] then
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
  redis.call('XDEL', KEYS[1], ARGV[3])
  redis.call('ZREM', KEYS[2], ARGV[4])
  redis.call('DEL', KEYS[3])
  return 1
end
return 0
"""
REPLY_MAXLEN = 10000


class _Forward(NullListener):
    """Hears the local worker's events for one attempt and sends them to the front."""

    def __init__(self, consumer, run):
        self.consumer = consumer
        self.run = run

    def job_progress(self, job, step, total, preview=None):
        self.consumer._send(self.run, wire.progress_event(self.run.key, self.run.attempt, step, total, preview))

    def job_image(self, job, image):
        self.consumer._send(self.run, wire.image_event(self.run.key, self.run.attempt, image))


class _Run:
    def __init__(self, entry, wire_job, deliveries):
        self.entry = entry
        self.key = wire_job.key
        self.front = wire_job.front
        self.wire_job = wire_job
        self.deliveries = deliveries
        self.attempt = secrets.token_hex(8)
        self.job = None
        self.lost = False  # another consumer owns the entry now
        self.front_gone = False  # stopped because its front's key was gone from Redis
        self.announced = False  # its start event is sent
        self.started = None


class Consumer(service.Service):
    """Serves ``worker`` (an IWorker) from the jobs stream as consumer ``name``."""

    log = Logger()

    def __init__(self, connection, worker, reactor, model_dir, name, keys=None, deadline=30.0, max_deliveries=3,
                 cancel_poll=0.25, device=""):
        self.connection = connection
        self.worker = worker
        self.reactor = reactor
        self.model_dir = os.path.realpath(model_dir)
        self.name = name
        self.keys = keys or wire.Keys()
        self.deadline = deadline
        self.max_deliveries = max_deliveries
        self.cancel_poll = cancel_poll
        self.device = device
        self.current = None  # the _Run in progress
        self._outbox = collections.deque()
        self._sending = False
        self._backoff = Backoff()
        self._send_backoff = Backoff()
        self._take_call = None
        self._heartbeat = connection.script(_HEARTBEAT)
        self._finish_script = connection.script(_FINISH)
        self._beat = task.LoopingCall(self._beat_once)
        self._beat.clock = reactor
        self._watch = task.LoopingCall(self._watch_once)
        self._watch.clock = reactor

    # Service ---------------------------------------------------------------------------

    def startService(self):
        super().startService()
        self._beat.start(self.deadline / 3, now=True)
        self._take()

    def stopService(self):
        """Stop taking jobs. A job still running is left unacknowledged: another worker
        takes it over after the deadline (the local worker's stop cancels it here)."""
        super().stopService()
        for loop in (self._beat, self._watch):
            if loop.running:
                loop.stop()
        if self._take_call is not None and self._take_call.active():
            self._take_call.cancel()
        commands = [("SREM", self.keys.workers, self.name), ("DEL", self.keys.worker(self.name))]
        if self.current is not None:
            self.current.lost = True
            if self.current.job is not None:
                self.current.job.cancel_event.set()
                self.current.job.detach()
        elif not self._outbox:
            # Only with nothing pending: this drops the consumer's pending entries too.
            commands.append(("XGROUP", "DELCONSUMER", self.keys.jobs, wire.GROUP, self.name))
        return self.connection.pipeline(commands).addErrback(lambda _: None)

    def _later(self, seconds, f):
        if self.running:
            self._take_call = self.reactor.callLater(seconds, f)

    # Taking a job ----------------------------------------------------------------------

    def _take(self):
        if not self.running or self.current is not None:
            return
        self.connection.call(self._take_redis).addCallbacks(self._took, self._take_failed)

    def _take_redis(self):
        """In a pool thread: a job whose worker died, else a new one; None after BLOCK_MS."""
        redis = self.connection.redis
        try:
            claimed = redis.xautoclaim(self.keys.jobs, wire.GROUP, self.name, int(self.deadline * 1000),
                                       start_id="0-0", count=1)
            entries = [e for e in claimed[1] if e and e[1] is not None]
            if not entries:
                reply = redis.xreadgroup(wire.GROUP, self.name, {self.keys.jobs: ">"}, count=1, block=BLOCK_MS)
                entries = [e for _, es in reply or () for e in es]
        except Exception as e:
            if "NOGROUP" not in str(e):
                raise
            try:
                redis.xgroup_create(self.keys.jobs, wire.GROUP, id="0", mkstream=True)
            except Exception as e2:
                if "BUSYGROUP" not in str(e2):
                    raise
            return None
        if not entries:
            return None
        entry_id, fields = entries[0]
        pending = redis.xpending_range(self.keys.jobs, wire.GROUP, entry_id, entry_id, 1)
        deliveries = pending[0]["times_delivered"] if pending else 1
        try:
            wire_job = wire.decode_job(fields)
        except Exception as e:  # WireError, or whatever else a damaged entry makes decoding raise
            return entry_id, None, deliveries, getattr(e, "message", None) or repr(e), True, False
        cancelled, front_alive = redis.pipeline(transaction=False).exists(self.keys.cancel(wire_job.key)).exists(
            self.keys.front(wire_job.front)).execute()
        return entry_id, wire_job, deliveries, None, bool(cancelled), bool(front_alive)

    def _take_failed(self, failure):
        if is_connection_error(failure):
            self.log.warn("The job broker (Redis) cannot be reached: {error}", error=failure.getErrorMessage())
        else:
            self.log.failure("Taking a job from the broker failed", failure)
        self._later(self._backoff.next(), self._take)

    def _took(self, taken):
        self._backoff.reset()
        if not self.running:
            return  # stopped meanwhile: an entry read now stays pending, for another worker
        if taken is None:
            self._later(0, self._take)
            return
        entry, wire_job, deliveries, why, cancelled, front_alive = taken
        if not isinstance(wire_job, wire.WireJob):
            self.log.warn("Dropped a malformed job entry {entry}: {why}", entry=entry, why=why)
            self._drop(entry)
            return
        run = self.current = _Run(entry, wire_job, deliveries)
        if not front_alive:
            self.log.info("Dropped job {key}: its front is gone", key=run.key)
            self._end(run)
        elif cancelled:
            self._fail(run, errors.JobCancelled())
        elif deliveries > self.max_deliveries:
            self.log.warn("Job {key} was delivered {n} times and never finished; giving up", key=run.key, n=deliveries)
            self._fail(run, errors.RunaiError(errors.INTERNAL, f"the job stopped {deliveries - 1} workers before "
                                                               "it could finish; it is not tried again"))
        else:
            self._start(run)

    def _drop(self, entry):
        d = self.connection.pipeline([("XACK", self.keys.jobs, wire.GROUP, entry), ("XDEL", self.keys.jobs, entry)])
        d.addErrback(lambda f: self.log.warn("Could not drop entry: {e}", e=f.getErrorMessage()))
        d.addBoth(lambda _: self._take())

    # Running it ------------------------------------------------------------------------

    def _start(self, run):
        self._send_start(run)
        try:
            request = run.wire_job.request(self.model_dir)
        except errors.RunaiError as e:
            self._fail(run, e)
            return
        except Exception as e:  # a bug, or a front of another version: this job fails, the worker goes on
            self.log.failure("Job {key} could not be read", key=run.key)
            self._fail(run, errors.RunaiError(errors.INTERNAL, f"the job could not be read: {type(e).__name__}"))
            return
        run.job = Job(request, None, _Forward(self, run))
        run.job.state = "running"
        run.started = self.reactor.seconds()
        self.log.info("Job {key}: {action} of {model} (delivery {n})", key=run.key, action=request.action,
                      model=request.model_name, n=run.deliveries)
        self._watch.start(self.cancel_poll, now=False)
        self._beat_once()
        d = self.worker.run(run.job)
        d.addCallbacks(self._succeeded, self._failed, callbackArgs=(run,), errbackArgs=(run,))

    def _succeeded(self, result, run):
        seconds = self.reactor.seconds() - run.started
        self.log.info("Job {key} done in {seconds:.2f}s", key=run.key, seconds=seconds)
        self._send(run, wire.done_event(run.key, run.attempt, result, seconds))
        self._end(run)

    def _failed(self, failure, run):
        error = failure.value
        if not isinstance(error, errors.RunaiError):
            self.log.failure("Job {key} failed", failure, key=run.key)
            error = errors.RunaiError(errors.INTERNAL, f"generation failed: {type(error).__name__}: {error}")
        elif error.code == errors.CANCELLED and run.front_gone:
            # Its front's key went with a Redis that restarted without its data: if the
            # front lives, it hears that the broker lost the job, not that it was cancelled.
            error = errors.RunaiError(errors.BROKER_UNAVAILABLE, "the job broker (Redis) lost this job (restarted "
                                                                 "without its data?); send it again")
        else:
            error = errors.RunaiError(error.code, errors.scrub(error.message, self.model_dir))
        self._fail(run, error)

    def _fail(self, run, error):
        self.log.info("Job {key} failed: {code}", key=run.key, code=error.code)
        if not run.lost:
            self._send_start(run)
            self._send(run, wire.failed_event(run.key, run.attempt, error))
        self._end(run)

    def _send_start(self, run):
        if not run.announced:
            run.announced = True
            self._send(run, wire.start_event(run.key, run.attempt, self.name, run.deliveries))

    def _end(self, run):
        """Once its events are out: acknowledge and delete the entry, then take the next."""
        if self._watch.running:
            self._watch.stop()
        if not self.running:
            return  # stopped: the entry stays pending, for another worker to take over
        self._outbox.append((run, None))
        self._pump()

    def _finished(self, run):
        if self.current is run:
            self.current = None
            self._beat_once()  # idle again: the fronts' ping says so at once
        self._take()

    # Events, in order ------------------------------------------------------------------

    def _send(self, run, fields):
        if run.lost:
            return  # another worker runs the job now: the front follows it, not us
        self._outbox.append((run, fields))
        self._pump()

    def _pump(self):
        if self._sending or not self._outbox:
            return
        run, fields = self._outbox[0]
        self._sending = True
        if fields is None:
            d = self._finish_script([self.keys.jobs, self.keys.queue, self.keys.cancel(run.key)],
                                    [wire.GROUP, self.name, run.entry, run.key])
        else:
            reply = self.keys.reply(run.front)
            args = [item for pair in fields.items() for item in pair]
            d = self.connection.pipeline([("XADD", reply, "MAXLEN", "~", REPLY_MAXLEN, "*", *args),
                                          ("EXPIRE", reply, 600)])
        d.addCallbacks(self._sent, self._send_failed)

    def _sent(self, _):
        self._sending = False
        self._send_backoff.reset()
        run, fields = self._outbox.popleft()
        if fields is None:
            self._finished(run)
        self._pump()

    def _send_failed(self, failure):
        self._sending = False
        if not self.running:
            self._outbox.clear()
            return
        if is_connection_error(failure):
            self.log.warn("Cannot send to the job broker (Redis), retrying: {error}", error=failure.getErrorMessage())
        else:
            self.log.failure("Sending to the job broker failed; dropped", failure)
            run, fields = self._outbox.popleft()
            if fields is None:
                self._finished(run)
        self.reactor.callLater(self._send_backoff.next(), self._pump)

    # While it runs ---------------------------------------------------------------------

    def _beat_once(self):
        """Tell the fronts this worker lives (what it has loaded, whether it is busy), and
        refresh the claim on the running job's entry."""
        loaded = [os.path.relpath(p, self.model_dir) for p in self.worker.loaded_models()]
        info = json.dumps({"busy": self.current is not None, "loaded": loaded, "device": self.device})
        ttl = max(1, int(self.deadline * 2))
        self.connection.pipeline([("SET", self.keys.worker(self.name), info, "EX", ttl),
                                  ("SADD", self.keys.workers, self.name)]).addErrback(lambda _: None)
        run = self.current
        if run is not None and run.job is not None and not run.lost:
            d = self._heartbeat([self.keys.jobs], [wire.GROUP, self.name, run.entry])
            d.addCallbacks(lambda owned: self._claim_checked(run, owned), lambda _: None)

    def _claim_checked(self, run, owned):
        if not owned and not run.lost and self.current is run:
            self.log.warn("Job {key} was taken over by another worker; stopping it here", key=run.key)
            run.lost = True
            run.job.cancel_event.set()

    def cancel_if_running(self, job_key):
        """A cancel pushed by a front (:mod:`runai.broker.cancels`)."""
        run = self.current
        if run is not None and run.key == job_key and run.job is not None:
            run.job.cancel_event.set()

    def _watch_once(self):
        run = self.current
        if run is None or run.job is None or run.job.cancel_event.is_set():
            return
        d = self.connection.pipeline([("EXISTS", self.keys.cancel(run.key)), ("EXISTS", self.keys.front(run.front))])

        def checked(replies):
            cancelled, front_alive = replies
            if cancelled or not front_alive:
                run.front_gone = not cancelled
                run.job.cancel_event.set()
        d.addCallbacks(checked, lambda _: None)
