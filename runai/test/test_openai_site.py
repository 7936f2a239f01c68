"""runai.doors.openai.site: the OpenAI door on the HTTP door's hardened site, answering
early in OpenAI's error shape with its Bearer token, driven byte by byte through a
StringTransport and a Clock (no model, no worker)."""

import base64
import json

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import resource

from runai.doors.openai import site
from runai.test import test_http_site as http_site
from runai.test.test_http_site import status

TOKEN = b"an-openai-token-of-some-length"
FIELDS = {"message", "type", "param", "code"}


class Echo(resource.Resource):
    """Answers the size of the body it was given (without taking it from the request, as a
    route that never reads its body); counts what it saw."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.seen = []

    def render(self, request):
        size = len(request.content.getvalue())
        self.seen.append(size)
        return json.dumps({"size": size}).encode()


def error_of(data):
    """The ``error`` object of an OpenAI error response, checked for its shape."""
    body = json.loads(data.split(b"\r\n\r\n", 1)[1])
    assert set(body) == {"error"} and set(body["error"]) == FIELDS, body
    return body["error"]


class SiteTestCase(http_site.SiteTestCase):
    """The HTTP door's site tests' set-up, on the OpenAI door's Site and its Bearer token."""

    def setUp(self):
        self.clock = MemoryReactorClock()
        self.echo = Echo()
        root = resource.Resource()
        root.putChild(b"v1", self.echo)
        self.site = site.Site(root, self.max_body, timeout=self.timeout, token=TOKEN.decode(), reactor=self.clock)

    def head(self, method=b"POST", path=b"/v1/images/generations", length=None, auth=b"Bearer " + TOKEN,
             extra=b""):
        return http_site.request_head(method, path, length, auth, extra)


class AuthTests(SiteTestCase):
    def test_refused_from_the_headers_before_any_body(self):
        channel, transport = self.connect()
        channel.dataReceived(self.head(length=90_000, auth=None))
        self.assertEqual(status(transport.value()), 401)  # before a byte of the body
        self.assertIn(b'WWW-Authenticate: Bearer realm="runai"', transport.value())
        error = error_of(transport.value())
        self.assertEqual((error["type"], error["code"], error["param"]), ("authentication_error", "unauthorized", None))
        for _ in range(8):
            channel.dataReceived(b"x" * 10_000)
        self.assertEqual(self.site.body_bytes, 0)
        self.assertEqual(channel.requests[0].content.getvalue(), b"")  # never held
        self.assertFalse(transport.disconnecting)  # still reading (and dropping) the body
        channel.dataReceived(b"x" * 10_000)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.echo.seen, [])
        self.assertEqual(transport.value().count(b"HTTP/1.1"), 1)

    def test_only_the_bearer_token_passes(self):
        basic = b"Basic " + base64.b64encode(b"me:" + TOKEN)  # the HTTP door's other way: not OpenAI's
        for auth in (b"Bearer wrong", b"Bearer \xff\xfe", b"\xff\xfe\x80", b"Bearer", b"", basic, TOKEN,
                     b"Bearer " + TOKEN + b"x"):
            channel, transport = self.connect()
            channel.dataReceived(self.head(method=b"GET", path=b"/v1/models", auth=auth))
            self.assertEqual(status(transport.value()), 401, auth)
            self.assertTrue(transport.disconnecting)
        channel, transport = self.connect()
        channel.dataReceived(self.head(length=50) + b"x" * 50)
        self.assertEqual(status(transport.value()), 200)
        self.assertEqual(self.echo.seen, [50])

    def test_the_same_answers_whatever_the_split(self):
        cases = [(self.head(length=3000, auth=b"Bearer nope") + b"x" * 3000, 401),
                 (self.head(length=self.max_body + 1) + b"x" * (self.max_body + 1), 413),
                 (self.head(length=3000) + b"x" * 3000, 200)]
        for data, code in cases:
            for size in (1, 7, 1000, len(data)):
                channel, transport = self.connect()
                for start in range(0, len(data), size):
                    channel.dataReceived(data[start:start + size])
                self.assertEqual((status(transport.value()), transport.value().count(b"HTTP/1.1 ")), (code, 1),
                                 (code, size))
                self.assertEqual(transport.disconnecting, code != 200, (code, size))
                self.assertEqual(self.site.body_bytes, 0)

    def test_the_token_check_reads_bytes(self):
        from twisted.web.test.requesthelper import DummyRequest

        request = DummyRequest([b""])
        request.requestHeaders.setRawHeaders(b"authorization", [b"Bearer \xff\xfe"])
        self.assertFalse(site.authorized(request, TOKEN))
        self.assertTrue(site.authorized(request, None))
        request.requestHeaders.setRawHeaders(b"authorization", [b"bearer  " + TOKEN + b" "])
        self.assertTrue(site.authorized(request, TOKEN))
        self.assertTrue(site.authorized(request, TOKEN.decode()))


class SizeTests(SiteTestCase):
    def test_a_declared_body_over_the_limit_is_413_at_once(self):
        channel, transport = self.connect()
        channel.dataReceived(self.head(length=self.max_body + 1))
        self.assertEqual(status(transport.value()), 413)
        error = error_of(transport.value())
        self.assertEqual((error["type"], error["code"]), ("invalid_request_error", "message_too_large"))
        self.assertIn(str(self.max_body), error["message"])
        self.assertEqual(self.site.body_bytes, 0)
        channel.dataReceived(b"x" * (self.max_body + 1))  # read and dropped, then closed
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.echo.seen, [])

    def test_a_chunked_body_over_the_limit_is_413_as_it_crosses_it(self):
        channel, transport = self.connect()
        channel.dataReceived(self.head(extra=b"Transfer-Encoding: chunked\r\n"))
        chunk = b"x" * 30_000
        for _ in range(3):
            channel.dataReceived(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        self.assertEqual((transport.value(), self.site.body_bytes), (b"", 90_000))
        channel.dataReceived(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        self.assertEqual(status(transport.value()), 413)
        self.assertEqual(error_of(transport.value())["code"], "message_too_large")
        self.assertEqual((self.site.body_bytes, channel.requests[0].content.getvalue()), (0, b""))

    def test_a_body_the_route_never_took_frees_its_share(self):
        for _ in range(3):
            channel, transport = self.connect()
            channel.dataReceived(self.head(length=90_000) + b"x" * 90_000)
            self.assertEqual(status(transport.value()), 200)
            self.assertEqual(self.site.body_bytes, 0)
        self.assertEqual(self.echo.seen, [90_000] * 3)

    def test_a_long_url_is_414_and_long_headers_431(self):
        cases = [
            (b"GET /v1/" + b"a" * 9000 + b" HTTP/1.1\r\n", 414),
            (b"GET /v1/" + b"a" * 20_000, 414),  # no end of line yet
            (self.head(method=b"GET", extra=b"X-Big: " + b"b" * 17_000 + b"\r\n"), 431),
            (self.head(method=b"GET", extra=b"".join(b"X-%d: 1\r\n" % i for i in range(600))), 431),
        ]
        for data, code in cases:
            channel, transport = self.connect()
            channel.dataReceived(data)
            self.assertEqual(status(transport.value()), code, data[:40])
            self.assertTrue(transport.disconnecting)
            error = error_of(transport.value())
            self.assertEqual((error["type"], error["code"]), ("invalid_request_error", "message_too_large"))


class TimeTests(SiteTestCase):
    def test_trickled_headers_are_408_and_closed(self):
        channel, transport = self.connect()
        for byte in self.head(method=b"GET", path=b"/v1/models")[:-4]:
            channel.dataReceived(bytes([byte]))
            self.clock.advance(0.2)  # never silent for the idle timeout
            if transport.disconnecting:
                break
        self.assertTrue(transport.disconnecting)
        self.assertEqual(status(transport.value()), 408)
        error = error_of(transport.value())
        self.assertEqual((error["type"], error["code"]), ("invalid_request_error", "idle_timeout"))
        self.assertLessEqual(self.clock.seconds(), self.timeout + 0.2)

    def test_silence_mid_body_is_408(self):
        channel, transport = self.connect()
        channel.dataReceived(self.head(length=1000) + b"x" * 10)
        self.clock.advance(self.timeout)
        self.assertEqual(status(transport.value()), 408)
        self.assertEqual(error_of(transport.value())["code"], "idle_timeout")
        self.assertTrue(transport.disconnecting)
        channel.connectionLost(None)  # what the transport does once it has closed
        self.assertEqual(self.site.body_bytes, 0)


class ConnectionTests(SiteTestCase):
    def test_connections_over_the_cap_are_503(self):
        self.site.max_connections = 2
        first, _ = self.connect()
        self.connect()
        _, transport = self.connect()
        self.assertEqual(status(transport.value()), 503)
        error = error_of(transport.value())
        self.assertEqual((error["type"], error["code"]), ("server_error", "queue_full"))
        self.assertTrue(transport.disconnecting)
        first.connectionLost(None)
        _, transport = self.connect()
        self.assertEqual((transport.value(), transport.disconnecting), (b"", False))

    def test_make_site_puts_the_api_at_v1_with_its_token(self):
        api = resource.Resource()
        api.token = TOKEN
        made = site.make_site(api, max_body=1234, timeout=5, reactor=self.clock)
        self.assertIsInstance(made, site.Site)
        self.assertEqual((made.max_body, made.token, made.early, made.reactor), (1234, TOKEN, True, self.clock))
        self.assertIs(made.resource.children[b"v1"], api)


class TapTests(SynchronousTestCase):
    def test_the_door_follows_the_idle_timeout_and_listens_with_a_deep_backlog(self):
        from runai import tap
        from runai.doors.http.site import BACKLOG

        reactor = MemoryReactorClock()
        options = tap.Options()
        options.parseOptions(["--port", "0", "--device", "cpu", "--openai", "tcp:8123:interface=127.0.0.1",
                              "--idle-timeout", "7", "--max-message-size", "5000"])
        door = list(tap.makeService(options, reactor=reactor))[-1]
        made = door.factory
        self.assertIsInstance(made, site.Site)
        self.assertEqual((made.timeOut, made.request_timeout, made.max_body, made.reactor), (7.0, 7.0, 5000, reactor))
        door.startService()
        self.addCleanup(door.stopService)
        [(port, factory, backlog, interface)] = reactor.tcpServers
        self.assertEqual((port, factory, backlog, interface), (8123, made, BACKLOG, "127.0.0.1"))
