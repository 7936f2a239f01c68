"""Test doubles for the threading around the engine (never for diffusers itself).

The queue's ordering, positions and cancellation are tested deterministically by running
the worker's thread-pool calls by hand; the real engine is exercised end to end elsewhere.
"""

import json
import os
import re
import time
from dataclasses import dataclass

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from runai.backends.local import LocalWorker
from runai.core import errors
from runai.core.queue import JobQueue
from runai.core.service import Core
from runai.client import txt2img_request
from runai.doors.legacy import framing
from runai.doors.legacy.factory import RunaiFactory
from runai.history.recorder import Recorder
from runai.models.library import ModelLibrary

CORE_OPTIONS = ("refuse_unchecked", "log_prompts")


def make_server(reactor, models, worker, store=None, pool=None, **options):
    """``(queue, core, factory)``: the legacy door in front of the core, in front of a
    queue of ``worker`` (or of a list of workers), as ``twistd runai`` wires them; ``store`` keeps the history.
    ``options`` go to the core or the factory, by name."""
    queue = JobQueue(worker if isinstance(worker, list) else [worker])
    core = Core(queue, ModelLibrary(models), reactor, pool=pool, recorder=Recorder(store) if store else None,
                **{k: v for k, v in options.items() if k in CORE_OPTIONS})
    factory = RunaiFactory(core, reactor, parse_pool=pool,
                           **{k: v for k, v in options.items() if k not in CORE_OPTIONS})
    return queue, core, factory


def _call(on_result, f, args, kwargs):
    """What a ThreadPool does with a call, minus the thread."""
    try:
        result = f(*args, **kwargs)
    except BaseException:
        on_result(False, Failure())
    else:
        on_result(True, result)


class SyncPool:
    """A pool whose calls run in line, when they are made."""

    def __init__(self):
        self.started = self.stopped = False

    def start(self):
        self.started = True

    def stop(self):
        self.stopped = True

    def callInThreadWithCallback(self, on_result, f, *args, **kwargs):
        _call(on_result, f, args, kwargs)


class ManualPool:
    """Stands in for the worker's ThreadPool: calls run when the test says so."""

    def __init__(self):
        self.calls = []
        self.started = False
        self.stopped = False

    def start(self):
        self.started = True

    def stop(self):
        self.stopped = True

    def callInThreadWithCallback(self, on_result, f, *args, **kwargs):
        self.calls.append((on_result, f, args, kwargs))

    def run_one(self):
        _call(*self.calls.pop(0))


class SyncReactor(Clock):
    """A clock whose callFromThread runs at once: the "worker thread" is the test itself."""

    def callFromThread(self, f, *args, **kwargs):
        f(*args, **kwargs)


@dataclass(frozen=True)
class FakeImage:
    png: bytes
    seed: int
    width: int
    height: int
    index: int


class ScriptedEngine:
    """Runs ``steps`` fake steps, honouring cancellation like the real engine.

    ``during_step(step)`` lets a test act mid-job (cancel, disconnect) as a client would.
    """

    def __init__(self):
        self.during_step = None
        self.requests = []

    def generate(self, request, on_progress, on_image, is_cancelled):
        self.requests.append(request)
        total = request.steps * request.n_iter
        for step in range(1, total + 1):
            if is_cancelled():
                raise errors.JobCancelled()
            if self.during_step is not None:
                self.during_step(step)
            on_progress(step, total)
        for index, seed in enumerate(request.seeds()):
            on_image(FakeImage(b"\x89PNG fake %d" % seed, seed, request.width, request.height, index))
        return request.image_count


def decode_all(data, packet_size=framing.DEFAULT_PACKET_SIZE):
    """Every message in ``data`` as JSON; asserts the stream ends on a message boundary."""
    decoder = framing.Decoder(packet_size)
    messages = [json.loads(e.payload) for e in decoder.feed(data)]
    assert decoder.buffered == 0, f"{decoder.buffered} bytes of an unfinished reply"
    return messages


def frame(obj, packet_size=framing.DEFAULT_PACKET_SIZE):
    return framing.encode(json.dumps(obj).encode("utf-8"), packet_size)


class FactoryTestCase(SynchronousTestCase):
    """The real factory, protocol and queue, on StringTransports and a clock, with a
    scripted engine whose jobs run when the test calls ``self.pool.run_one()``."""

    def setUp(self):
        self.models = os.path.realpath(self.mktemp())
        os.makedirs(os.path.join(self.models, "v1", "tiny"))
        with open(os.path.join(self.models, "v1", "tiny", "model_index.json"), "w") as f:
            f.write("{}")
        self.reactor = SyncReactor()
        self.pool = ManualPool()
        self.engine = ScriptedEngine()
        self.worker = LocalWorker(self.reactor, engine_factory=lambda device, dtype: self.engine, pool=self.pool)
        self.queue, self.core, self.factory = make_server(self.reactor, self.models, self.worker,
                                                          **self.factory_options())

    def factory_options(self):
        return {}

    def connect(self):
        proto = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 12345))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 12345))
        proto.makeConnection(transport)
        return proto, transport

    def replies(self, transport):
        messages = decode_all(transport.value())
        transport.clear()
        return messages


class ServerTestCase(FactoryTestCase):
    """A server whose auto-shutdown stops are recorded in ``self.stopped``."""

    auto_shutdown = False

    def factory_options(self):
        self.stopped = []
        return dict(stop=lambda: self.stopped.append(True), idle_timeout=30, auto_shutdown=self.auto_shutdown,
                    timeout=10)

    def request(self, **options):
        options.setdefault("steps", 3)
        return txt2img_request("a lighthouse", "v1/tiny", **options)


def reported_port(server, timeout=120):
    """The port a ``twistd ... runai`` subprocess (its output piped, as text) reports it
    listens on, or None if it ends or says nothing within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = server.stdout.readline()
        if not line:
            return None
        found = re.search(r"runai listening on 127\.0\.0\.1:(\d+)", line)
        if found:
            return int(found.group(1))
    return None
