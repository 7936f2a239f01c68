"""Test doubles for the threading around the engine (never for diffusers itself).

The queue's ordering, positions and cancellation are tested deterministically by running
the worker's thread-pool calls by hand; the real engine is exercised end to end elsewhere.
"""

import json
from dataclasses import dataclass

from twisted.internet.task import Clock
from twisted.python.failure import Failure

from runai import errors, framing


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
        on_result, f, args, kwargs = self.calls.pop(0)
        try:
            result = f(*args, **kwargs)
        except BaseException:
            on_result(False, Failure())
        else:
            on_result(True, result)


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
