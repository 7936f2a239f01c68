"""--metrics: the refusals the doors answer by themselves, before a route or the core
hears of the request (runai.doors.refusals), counted once each, over real sockets."""

import json
import socket
import types

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, reactor, threads
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from runai import tap
from runai.core import errors
from runai.core.queue import JobQueue
from runai.core.service import Core
from runai.doors import refusals
from runai.doors.http.api import Api as HttpApi
from runai.doors.http.site import make_site as http_site
from runai.doors.legacy.factory import RunaiFactory
from runai.doors.openai.api import Api as OpenAIApi
from runai.doors.openai.site import make_site as openai_site
from runai.models.library import ModelLibrary
from runai.ops.metrics import CODES, REFUSAL_CODES, Metrics
from runai.ops.wiring import front_metrics

TOKEN = "a-token-for-the-refusal-tests"
P = 1024  # the legacy packet size
MAX_BODY = 4096
REFUSED = "runai_requests_refused_total"


def refused(text):
    """``{code: count}`` of the refusals in a scrape, by prometheus_client's own parser."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == REFUSED:
                found[sample.labels["code"]] = sample.value
    return found


def exchange(port, data):
    """Send ``data`` to 127.0.0.1:``port`` and read until the server closes; in a thread."""
    def run():
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            try:
                sock.sendall(data)
            except OSError:  # the server may close before it has read everything
                pass
            answer = b""
            while True:
                try:
                    chunk = sock.recv(65536)
                except (ConnectionResetError, socket.timeout):
                    return answer
                if not chunk:
                    return answer
                answer += chunk
    return threads.deferToThread(run)


def http_status(answer):
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else None


def legacy_message(obj):
    data = json.dumps(obj).encode("utf-8")
    return data + bytes(-len(data) % P) + bytes(P)


def legacy_error(answer):
    return json.loads(answer.split(bytes(P))[0].rstrip(b"\x00"))["error"]["code"]


class LiveDoorTests(TestCase):
    """The three doors and the metrics site on 127.0.0.1, a core with no worker behind."""

    def setUp(self):
        self.core = Core(JobQueue([]), ModelLibrary(self.mktemp()), reactor)
        self.legacy = RunaiFactory(self.core, reactor, max_message_size=4 * P, idle_timeout=0.3, token=TOKEN)
        self.http_door = http_site(HttpApi(self.core, reactor, token=TOKEN), max_body=MAX_BODY, timeout=0.3,
                              reactor=reactor)
        self.openai = openai_site(OpenAIApi(self.core, reactor, token=TOKEN), max_body=MAX_BODY, reactor=reactor)
        doors = [types.SimpleNamespace(factory=door) for door in (self.legacy, self.http_door, self.openai)]
        site, _ = front_metrics({"token": None}, reactor, self.core, [], services=doors + [types.SimpleNamespace()])
        self.metrics_site = site
        self.ports = {name: self.listen(door) for name, door in (("legacy", self.legacy), ("http", self.http_door),
                                                                  ("openai", self.openai), ("metrics", site))}

    def listen(self, factory):
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    @defer.inlineCallbacks
    def scrape(self):
        answer = yield exchange(self.ports["metrics"], b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        self.assertEqual(http_status(answer), 200)
        return refused(answer.partition(b"\r\n\r\n")[2].decode("utf-8"))

    def send(self, door, head, body=b""):
        return exchange(self.ports[door], head + b"\r\n\r\n" + body)

    @defer.inlineCallbacks
    def test_http_answers_before_the_routes_are_counted_once_each(self):
        get = b"GET /sdapi/v1/sd-models HTTP/1.1\r\nHost: x"
        answer = yield self.send("http", get)  # no token
        self.assertEqual(http_status(answer), 401)
        answer = yield self.send("http", get + b"\r\nAuthorization: Bearer wrong-" + TOKEN.encode())
        self.assertEqual(http_status(answer), 401)
        body = b"{" + b" " * MAX_BODY + b"}"
        post = (b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Authorization: Bearer " + TOKEN.encode() + b"\r\nContent-Length: %d" % len(body))
        answer = yield self.send("http", post, body)
        self.assertEqual(http_status(answer), 413)
        self.assertEqual(json.loads(answer.partition(b"\r\n\r\n")[2])["error"], errors.MESSAGE_TOO_LARGE)
        answer = yield self.send("http", b"GET /" + b"a" * (9 * 1024) + b" HTTP/1.1\r\nHost: x")
        self.assertEqual(http_status(answer), 414)
        answer = yield self.send("http", get + b"".join(b"\r\nX-%d: " % i + b"y" * 1000 for i in range(20)))
        self.assertEqual(http_status(answer), 431)
        answer = yield exchange(self.ports["http"], get)  # headers that never end: 408 after the timeout
        self.assertEqual(http_status(answer), 408)
        self.http_door.max_connections = 0
        answer = yield self.send("http", get)
        self.assertEqual(http_status(answer), 503)
        found = yield self.scrape()  # the metrics site's own answers are not the doors': not counted
        self.assertEqual(found, {errors.UNAUTHORIZED: 2, errors.MESSAGE_TOO_LARGE: 1, refusals.URI_TOO_LONG: 1,
                                 refusals.HEADERS_TOO_LARGE: 1, errors.IDLE_TIMEOUT: 1,
                                 refusals.TOO_MANY_CONNECTIONS: 1})

    @defer.inlineCallbacks
    def test_a_route_refusal_is_still_counted_by_the_core_not_twice(self):
        body = json.dumps({"prompt": "x", "width": 10 ** 6}).encode()
        post = (b"POST /sdapi/v1/txt2img HTTP/1.0\r\nHost: x\r\nContent-Type: application/json"
                b"\r\nAuthorization: Bearer " + TOKEN.encode() + b"\r\nContent-Length: %d" % len(body))
        answer = yield self.send("http", post, body)
        self.assertEqual(answer.split(b" ", 2)[1], b"404")  # no model: refused by the route
        code = json.loads(answer.partition(b"\r\n\r\n")[2])["error"]
        self.assertIn(code, CODES)
        found = yield self.scrape()
        self.assertEqual(found, {code: 1})

    @defer.inlineCallbacks
    def test_openai_answers_before_the_routes(self):
        post = b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
        answer = yield self.send("openai", post + b"\r\nContent-Length: 2", b"{}")
        self.assertEqual(http_status(answer), 401)
        self.assertEqual(json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["code"], errors.UNAUTHORIZED)
        authorized = post + b"\r\nAuthorization: Bearer " + TOKEN.encode()
        answer = yield self.send("openai", authorized + b"\r\nContent-Length: %d" % (MAX_BODY + 1),
                                 b"x" * (MAX_BODY + 1))
        self.assertEqual(http_status(answer), 413)
        found = yield self.scrape()
        self.assertEqual(found, {errors.UNAUTHORIZED: 1, errors.MESSAGE_TOO_LARGE: 1})

    @defer.inlineCallbacks
    def test_legacy_framing_refusals(self):
        answer = yield exchange(self.ports["legacy"], b"{" + b" " * (8 * P))  # over 4 packets, no end
        self.assertEqual(legacy_error(answer), errors.MESSAGE_TOO_LARGE)
        answer = yield exchange(self.ports["legacy"], b'{"action": "ping"')  # half a message, then silence
        self.assertEqual(legacy_error(answer), errors.IDLE_TIMEOUT)
        # Without the token: the session refuses it through the core, counted there only.
        answer = yield exchange(self.ports["legacy"], legacy_message({"action": "ping"}))
        self.assertEqual(legacy_error(answer), errors.UNAUTHORIZED)
        self.legacy.max_connections = 0
        answer = yield exchange(self.ports["legacy"], b"")
        self.assertEqual(answer, b"")  # closed without an answer
        found = yield self.scrape()
        self.assertEqual(found, {errors.MESSAGE_TOO_LARGE: 1, errors.IDLE_TIMEOUT: 1, errors.UNAUTHORIZED: 1,
                                 refusals.TOO_MANY_CONNECTIONS: 1})


class WiringTests(SynchronousTestCase):
    def doors(self, *args):
        options = tap.Options()
        options.parseOptions(["--port", "0", "--device", "cpu", "--http", "tcp:0:interface=127.0.0.1",
                              "--openai", "tcp:0:interface=127.0.0.1", *args])
        top = tap.makeService(options, reactor=MemoryReactorClock())
        return {s.name or type(s.factory).__module__: s.factory for s in top if hasattr(s, "factory")}

    def test_each_door_counts_with_metrics_only(self):
        for door in self.doors().values():
            self.assertIsNone(door.on_refused)
        doors = self.doors("--metrics", "0")
        metrics = doors.pop("metrics").on_refused  # the metrics site counts none of its own
        self.assertIsNone(metrics)
        self.assertEqual(sorted(doors), ["runai.doors.http.site", "runai.doors.legacy.factory",
                                         "runai.doors.openai.site"])
        counters = {door.on_refused.__self__ for door in doors.values()}
        self.assertEqual(len(counters), 1)
        self.assertIsInstance(counters.pop(), Metrics)

    def test_codes_are_a_closed_set(self):
        metrics = Metrics()
        for code in sorted(refusals.CODES) + [errors.UNAUTHORIZED, "a path/never a label"]:
            metrics.count_code(code)
        from prometheus_client import generate_latest
        found = refused(generate_latest(metrics.registry).decode("utf-8"))
        self.assertEqual(found, {**{code: 1 for code in refusals.CODES}, errors.UNAUTHORIZED: 1, "other": 1})
        self.assertEqual(REFUSAL_CODES - refusals.CODES, CODES)  # never a runai code's name
        self.assertEqual(len(REFUSAL_CODES), len(CODES) + len(refusals.CODES))
        error = errors.RunaiError(errors.MESSAGE_TOO_LARGE, "x")
        self.assertEqual([refusals.http_code(status, error) for status in (401, 408, 413, 414, 431, 503)],
                         [errors.MESSAGE_TOO_LARGE, errors.MESSAGE_TOO_LARGE, errors.MESSAGE_TOO_LARGE,
                          refusals.URI_TOO_LONG, refusals.HEADERS_TOO_LARGE, refusals.TOO_MANY_BODIES])
