"""runai.doors.http.site: what the HTTP door bounds before a route sees a request (the
token from the headers, body sizes and the body budget, URL and header sizes, connections,
times), driven byte by byte through a StringTransport and a Clock."""

import json

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import resource

from runai.doors.http import site

TOKEN = b"an-http-token-of-some-length"


class Echo(resource.Resource):
    """Answers the size of the body it was given; counts what it saw."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.seen = []

    def render(self, request):
        body = request.take_body()
        self.seen.append(len(body))
        return json.dumps({"size": len(body)}).encode()


def status(data):
    """The status code of the (first) response in ``data``, or None."""
    return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else None


def body_of(data):
    return json.loads(data.split(b"\r\n\r\n", 1)[1])


def request_head(method, path, length, authorization, extra):
    """A request's head: ``Content-Length`` and ``Authorization`` when not None, then the
    raw header lines ``extra``."""
    lines = [b"%s %s HTTP/1.1" % (method, path), b"Host: x"]
    if length is not None:
        lines.append(b"Content-Length: %d" % length)
    if authorization is not None:
        lines.append(b"Authorization: " + authorization)
    return b"\r\n".join(lines) + b"\r\n" + extra + b"\r\n"


def strict_json(text):
    """JSON as JSON is: NaN and Infinity are not in it."""
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


class SiteTestCase(SynchronousTestCase):
    token = TOKEN
    max_body = 100_000
    timeout = 10.0

    def setUp(self):
        self.clock = MemoryReactorClock()
        self.echo = Echo()
        self.site = site.Site(self.echo, self.max_body, timeout=self.timeout, token=self.token, reactor=self.clock,
                              early=True)

    def connect(self):
        channel = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 12345))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 12345))
        channel.makeConnection(transport)
        return channel, transport

    def head(self, method=b"POST", path=b"/x", length=None, auth=TOKEN, extra=b""):
        return request_head(method, path, length, None if auth is None else b"Bearer " + auth, extra)


class AuthTests(SiteTestCase):
    def test_refused_from_the_headers_before_any_body(self):
        channel, transport = self.connect()
        channel.dataReceived(self.head(length=90_000, auth=None))
        # Answered at once, before a byte of the body.
        self.assertEqual(status(transport.value()), 401)
        self.assertIn(b"WWW-Authenticate: Basic", transport.value())
        self.assertEqual(body_of(transport.value())["error"], "unauthorized")
        for _ in range(8):
            channel.dataReceived(b"x" * 10_000)
        self.assertEqual(self.site.body_bytes, 0)
        self.assertEqual(channel.requests[0].content.getvalue(), b"")  # never held
        self.assertFalse(transport.disconnecting)  # still reading (and dropping) the body
        channel.dataReceived(b"x" * 10_000)  # the last of it
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.echo.seen, [])
        self.assertEqual(transport.value().count(b"HTTP/1.1"), 1)

    def test_a_header_that_is_not_utf8_or_a_wrong_token(self):
        for auth in (b"\xff\xfe\x80", TOKEN + b"\xff", b"", b"Bearer", b"Basic \xff", b"Basic !!!"):
            channel, transport = self.connect()
            channel.dataReceived(b"GET /x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + auth + b"\r\n\r\n")
            self.assertEqual(status(transport.value()), 401, auth)
            self.assertTrue(transport.disconnecting)
        channel, transport = self.connect()
        channel.dataReceived(b"GET /x HTTP/1.1\r\nHost: x\r\nAuthorization: \xff\xfe\r\n\r\n")
        self.assertEqual(status(transport.value()), 401)

    def test_basic_with_the_token_as_password(self):
        import base64

        channel, transport = self.connect()
        basic = base64.b64encode(b"me:" + TOKEN)
        channel.dataReceived(b"POST /x HTTP/1.1\r\nHost: x\r\nAuthorization: Basic " + basic
                             + b"\r\nContent-Length: 3\r\n\r\nabc")
        self.assertEqual(status(transport.value()), 200)
        self.assertEqual(self.echo.seen, [3])

    def test_a_client_waiting_for_100_continue_is_answered_and_closed(self):
        channel, transport = self.connect()
        channel.dataReceived(self.head(length=50_000, auth=None, extra=b"Expect: 100-continue\r\n"))
        self.assertEqual(status(transport.value()), 401)
        self.assertNotIn(b"100 Continue", transport.value())
        self.assertTrue(transport.disconnecting)


class SizeTests(SiteTestCase):
    def test_a_declared_body_over_the_limit_is_413_at_once(self):
        channel, transport = self.connect()
        channel.dataReceived(self.head(length=self.max_body + 1))
        self.assertEqual(status(transport.value()), 413)
        self.assertEqual(self.site.body_bytes, 0)

    def test_a_chunked_body_over_the_limit_is_413_as_it_crosses_it(self):
        channel, transport = self.connect()
        channel.dataReceived(b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                             b"Authorization: Bearer " + TOKEN + b"\r\n\r\n")
        chunk = b"x" * 30_000
        for _ in range(3):
            channel.dataReceived(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        self.assertEqual(transport.value(), b"")
        self.assertEqual(self.site.body_bytes, 90_000)
        channel.dataReceived(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        self.assertEqual(status(transport.value()), 413)
        self.assertEqual((self.site.body_bytes, channel.requests[0].content.getvalue()), (0, b""))

    def test_the_bodies_of_every_connection_share_a_budget(self):
        self.site.max_bodies = 150_000
        first, _ = self.connect()
        first.dataReceived(self.head(length=90_000))
        second, transport = self.connect()
        second.dataReceived(self.head(length=90_000))
        self.assertEqual(status(transport.value()), 503)
        self.assertEqual(body_of(transport.value())["error"], "queue_full")
        first.dataReceived(b"x" * 90_000)  # answered: its body is the route's, the budget free
        self.assertEqual(self.site.body_bytes, 0)
        third, transport = self.connect()
        third.dataReceived(self.head(length=90_000) + b"y" * 90_000)
        self.assertEqual(status(transport.value()), 200)

    def test_a_body_the_route_never_took_frees_its_share(self):
        self.echo.render = lambda request: self.echo.seen.append(len(request.content.getvalue())) or b"{}"
        for _ in range(3):
            channel, transport = self.connect()
            channel.dataReceived(self.head(length=90_000) + b"x" * 90_000)
            self.assertEqual(status(transport.value()), 200)
            self.assertEqual(self.site.body_bytes, 0)
        self.assertEqual(self.echo.seen, [90_000] * 3)

    def test_a_lost_connection_frees_its_share(self):
        channel, _ = self.connect()
        channel.dataReceived(self.head(length=90_000) + b"x" * 1000)
        self.assertEqual(self.site.body_bytes, 90_000)
        channel.connectionLost(None)
        self.assertEqual(self.site.body_bytes, 0)

    def test_a_long_url_is_414_and_long_headers_431(self):
        cases = [
            (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n", 414),  # over max_url
            (b"GET /" + b"a" * 20_000, 414),  # no end of line yet, over the line limit
            (self.head(method=b"GET", extra=b"X-Big: " + b"b" * 17_000 + b"\r\n"), 431),
            (self.head(method=b"GET", extra=b"".join(b"X-%d: 1234567890\r\n" % i for i in range(1200))), 431),
            (self.head(method=b"GET", extra=b"".join(b"X-%d: 1\r\n" % i for i in range(600))), 431),
        ]
        for data, code in cases:
            channel, transport = self.connect()
            channel.dataReceived(data)
            self.assertEqual(status(transport.value()), code, data[:40])
            self.assertTrue(transport.disconnecting)
            self.assertEqual(body_of(transport.value())["error"], "message_too_large")
        channel, transport = self.connect()
        channel.dataReceived(b"GET /" + b"a" * 4000 + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN
                             + b"\r\n\r\n")
        self.assertEqual(status(transport.value()), 200)


class TimeTests(SiteTestCase):
    def test_trickled_headers_are_408_and_closed(self):
        channel, transport = self.connect()
        for byte in self.head(method=b"GET")[:-4]:
            channel.dataReceived(bytes([byte]))
            self.clock.advance(0.2)  # never silent for the idle timeout
            if transport.disconnecting:
                break
        self.assertTrue(transport.disconnecting)
        self.assertEqual(status(transport.value()), 408)
        self.assertEqual(body_of(transport.value())["error"], "idle_timeout")
        self.assertLessEqual(self.clock.seconds(), self.timeout + 0.2)

    def test_a_trickled_body_is_408_and_closed(self):
        channel, transport = self.connect()
        channel.dataReceived(self.head(length=50_000))
        for _ in range(200):
            channel.dataReceived(b"x" * 10)
            self.clock.advance(1)
            if transport.disconnecting:
                break
        self.assertEqual(status(transport.value()), 408)
        self.assertLess(self.clock.seconds(), self.timeout + 3)
        self.assertEqual(self.site.body_bytes, 0)

    def test_a_body_at_a_steady_pace_takes_as_long_as_it_needs(self):
        self.site.min_body_rate = 2000
        channel, transport = self.connect()
        channel.dataReceived(self.head(length=99_000))
        for _ in range(33):  # 33 s at 3 KB/s: past the 10 s, and faster than 2 KB/s beyond them
            channel.dataReceived(b"x" * 3000)
            self.clock.advance(1)
        self.assertEqual(status(transport.value()), 200)
        self.assertEqual(self.echo.seen, [99_000])

    def test_silence_mid_request_is_408(self):
        channel, transport = self.connect()
        channel.dataReceived(self.head(length=1000) + b"x" * 10)
        self.clock.advance(self.timeout)
        self.assertEqual(status(transport.value()), 408)
        self.assertTrue(transport.disconnecting)

    def test_an_idle_connection_between_requests_is_closed_without_an_answer(self):
        channel, transport = self.connect()
        channel.dataReceived(self.head(method=b"GET"))
        self.assertEqual(status(transport.value()), 200)
        transport.clear()
        self.clock.advance(self.timeout)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")


class ConnectionTests(SiteTestCase):
    def test_connections_over_the_cap_are_503(self):
        self.site.max_connections = 3
        channels = [self.connect() for _ in range(3)]
        extra, transport = self.connect()
        self.assertEqual(status(transport.value()), 503)
        self.assertTrue(transport.disconnecting)
        channels[0][0].connectionLost(None)
        _, transport = self.connect()
        self.assertEqual(transport.value(), b"")
        self.assertFalse(transport.disconnecting)

    def test_the_listen_backlog(self):
        self.assertEqual(site.with_backlog("tcp:7860:interface=127.0.0.1"), "tcp:7860:interface=127.0.0.1:backlog=1024")
        self.assertEqual(site.with_backlog("ssl:7860:privateKey=k.pem"), "ssl:7860:privateKey=k.pem:backlog=1024")
        self.assertEqual(site.with_backlog("tcp:7860:backlog=10"), "tcp:7860:backlog=10")
        self.assertEqual(site.with_backlog("systemd:domain=INET:index=0"), "systemd:domain=INET:index=0")


class ReplyTests(SynchronousTestCase):
    def test_statuses_and_details(self):
        from runai.core import errors
        from runai.doors.http import replies

        self.assertEqual(replies.error(errors.RunaiError(errors.BROKER_UNAVAILABLE, "no Redis"))[0], 503)
        status, body = replies.error(errors.RunaiError(errors.BAD_REQUEST, "x" * 50_000))
        self.assertEqual(status, 422)
        self.assertLessEqual(len(body["detail"]), replies.MAX_DETAIL_CHARS)

    def test_the_echo_is_json(self):
        from runai.doors.http import parse

        nested = [float("nan")]
        for _ in range(500):
            nested = [nested, float("inf")]
        echo = parse.echo({"prompt": "x", "comments": {"n": nested}, "unknown": float("nan"), "seed": -1,
                           "init_images": ["..."]})
        parsed = strict_json(echo)
        self.assertEqual(set(parsed), {"prompt", "comments", "seed"})


class LateSiteTests(SiteTestCase):
    """A site that does not answer early (no door's since the OpenAI door answers early): a
    body over the limit is dropped as it comes and left to the resource to answer."""

    token = None

    def setUp(self):
        super().setUp()
        self.site.early = False

    def test_too_large_is_the_resources_to_answer(self):
        seen = []
        self.echo.render = lambda request: seen.append((request.too_large, request.content.getvalue())) or b"{}"
        channel, transport = self.connect()
        channel.dataReceived(self.head(length=self.max_body + 10, auth=None) + b"x" * (self.max_body + 10))
        self.assertEqual(seen, [(True, b"")])
