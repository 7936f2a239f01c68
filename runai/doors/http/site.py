# -*- test-case-name: runai.test.test_http_site,runai.test.test_http_site_live,runai.test.test_http -*-
"""The HTTP door's twisted.web site, and what it bounds before a route sees a request.

- The shared secret is checked from the headers, before any body is read: a request
  without it is answered 401 at once; its body is read and dropped, never held.
- Bodies are held in memory (twisted.web would spill a large one into a temporary file:
  runai writes nothing to disk): up to ``max_body`` bytes each (413 past it) and
  ``max_bodies`` for every body being received at once (503 past it); a refused body is
  dropped as it arrives.
- At most ``max_connections`` connections; one more is answered 503 and closed.
- A request line over ``max_url`` bytes is answered 414; headers over
  ``totalHeadersSize`` bytes or ``maxHeaders`` lines, 431.
- Times follow ``--idle-timeout`` (``timeout``): a connection silent for that long is
  closed; a request's headers must all arrive within it, and its body at
  ``min_body_rate`` bytes a second beyond it. A trickled request is answered 408 and closed.

An answer given here, before twisted.web's request machinery would give one, is a whole
response that closes the connection. After an early answer the body still being sent is
read and dropped (what its length declares, or ``max_body`` bytes; at most
:data:`MAX_DROPPED`) before the close, so that a client that sends its whole body before
reading sees the answer rather than a reset connection. The connection's own bounds (URL
and header sizes, times, the cap) and its early answers are :mod:`runai.doors.http.channel`.
"""

import base64
import binascii
import hmac
import io
import json
import re

from twisted.logger import Logger
from twisted.web import resource, server

from runai.core import errors
from runai.doors import refusals
from runai.doors.http.channel import Busy, Channel

# Every body being received at once, together, is at most this (or twice --max-message-size).
MAX_BODIES = 512 * 1024 * 1024
# After an early answer, at most this much of the body is read and dropped before the close.
MAX_DROPPED = 1024 * 1024 * 1024
# Past the first --idle-timeout seconds, a body must keep coming at this pace.
MIN_BODY_RATE = 16 * 1024
# HTTP clients: more than the socket door's 64, since each AUTOMATIC1111 call is a
# connection of its own and chat front ends poll /progress beside it.
MAX_CONNECTIONS = 256
# The listen backlog of the --http endpoint, so that a burst of connections waits for the
# reactor to accept them instead of being reset (the kernel caps it at net.core.somaxconn).
BACKLOG = 1024

_log = Logger(namespace="runai.doors.http.site")


def error_body(status, error):
    """AUTOMATIC1111's error body: ``{"error": code, "detail": message}``."""
    return json.dumps({"error": error.code, "detail": error.message}).encode("utf-8")


def unauthorized_error():
    return errors.RunaiError(errors.UNAUTHORIZED, "this server needs its token: Authorization: Bearer TOKEN, "
                                                  "or HTTP Basic with the token as the password")


AUTHENTICATE = ("WWW-Authenticate", 'Basic realm="runai"')


def authorized(request, token):
    """True when no token is needed, or the request carries it: ``Authorization: Bearer
    TOKEN``, or HTTP Basic with the token as the password (what AUTOMATIC1111's
    ``--api-auth`` clients send). Read from the header's bytes, whatever they are;
    constant-time."""
    if token is None:
        return True
    header = (request.requestHeaders.getRawHeaders(b"authorization") or [b""])[0]
    scheme, _, value = header.strip().partition(b" ")
    given = b""
    if scheme.lower() == b"bearer":
        given = value.strip()
    elif scheme.lower() == b"basic":
        try:
            decoded = base64.b64decode(value.strip(), validate=True)
        except (binascii.Error, ValueError):
            decoded = b""
        given = decoded.partition(b":")[2]
    return hmac.compare_digest(given, token)


def unauthorized(request):
    """Mark ``request`` 401 (with ``WWW-Authenticate``) and return its RunaiError."""
    request.setHeader(AUTHENTICATE[0], AUTHENTICATE[1])
    return unauthorized_error()


class LimitedRequest(server.Request):
    """A request whose body is held in memory within the site's bounds, or refused from
    its headers (the token, the declared length) before any of it is read.

    On a site that does not answer early (``Site.early`` false) a body over the limit is
    dropped as it comes and the request marked ``too_large`` for its resource to answer."""

    refused = False
    too_large = False
    body_size = 0  # body bytes received
    reserved = 0  # bytes of the site's body budget this request holds
    dropped = 0  # body bytes read and dropped after a refusal
    declared = None  # the body's length, as its Content-Length says

    def gotLength(self, length):
        self.content = io.BytesIO()  # never a temporary file on disk
        self.declared = length
        site = self.channel.site
        self.body_limit = site.max_body
        if not site.early:
            self.too_large = length is not None and length > site.max_body
            return
        refusal = site.refusal(self, length)
        if refusal is None and length:
            refusal = self._reserve(length)
        if refusal is not None:
            self._refuse(*refusal)

    def handleContentChunk(self, data):
        if self.refused or self.too_large:
            self.dropped += len(data)
            if self.refused and self.dropped > min(max(self.declared or 0, self.channel.site.max_body), MAX_DROPPED):
                self.channel.loseConnection()
            return
        self.body_size += len(data)
        site = self.channel.site
        if self.body_size > site.max_body:
            if site.early:
                self._refuse(413, too_large(site.max_body))
            else:
                self.too_large = True
                self.content = io.BytesIO()
            return
        if site.early and self.body_size > self.reserved:  # a chunked body: its length was not declared
            refusal = self._reserve(self.body_size - self.reserved)
            if refusal is not None:
                self._refuse(*refusal)
                return
        self.content.write(data)

    def _reserve(self, size):
        site = self.channel.site
        if site.body_bytes + size > site.max_bodies:
            return 503, errors.RunaiError(errors.QUEUE_FULL, "the server is receiving too many large requests "
                                                             "at once; send this one again in a moment")
        site.body_bytes += size
        self.reserved += size
        self.budget = site
        return None

    def _release(self):
        if self.reserved:
            self.budget.body_bytes -= self.reserved
            self.reserved = 0

    def drop_body(self):
        """Hold nothing more of the body, and none of the site's budget."""
        self.content = io.BytesIO()
        self._release()

    def _refuse(self, status, error, headers=()):
        """Answer now; drop the body, and what was held of it."""
        self.refused = True
        self.drop_body()
        # A client waiting for "100 Continue" sends no body after a final answer.
        expects = [value.lower() for value in self.requestHeaders.getRawHeaders(b"expect", [])]
        self.requestHeaders.removeHeader(b"expect")
        self.channel.refuse(status, error, headers, linger=b"100-continue" not in expects)

    def take_body(self):
        """The body received (a memoryview: no copy), which the request stops holding."""
        content, self.content = self.content, io.BytesIO()
        self._release()
        return content.getbuffer()

    def requestReceived(self, command, path, version):
        if self.refused:
            self.channel.loseConnection()  # answered already; the body is read
            return
        super().requestReceived(command, path, version)

    def connectionLost(self, reason):
        self._release()
        super().connectionLost(reason)

    def finish(self):
        self._release()  # a route that never took its body: the budget is not its to keep
        super().finish()


def too_large(limit):
    return errors.RunaiError(errors.MESSAGE_TOO_LARGE, f"the body is larger than {limit} bytes")


class Site(server.Site):
    """The door's site: ``max_body`` is ``--max-message-size``, ``timeout``
    ``--idle-timeout``; ``token`` (bytes, or None) is the shared secret.

    ``early``: refuse a request from its headers (the token, a body too large) at once;
    else its resource answers once the body (dropped) has come. ``error_body(status,
    error)`` makes the body of the answers given here (AUTOMATIC1111's by default)."""

    protocol = Channel
    requestFactory = LimitedRequest
    noisy = False
    max_connections = MAX_CONNECTIONS
    min_body_rate = MIN_BODY_RATE
    on_refused = None  # --metrics: told the code of each answer given before a route (runai.doors.refusals)

    def __init__(self, root, max_body, timeout=60, token=None, reactor=None, early=False, error_body=error_body):
        super().__init__(root, parsePOSTFormSubmission=False, timeout=timeout, reactor=reactor)
        self.early = early
        self.error_body = error_body
        self.max_body = max_body
        self.max_bodies = max(MAX_BODIES, 2 * max_body)
        self.request_timeout = timeout
        self.token = token.encode("utf-8") if isinstance(token, str) else token
        self.body_bytes = 0  # held by the bodies being received
        self.channels = set()
        self._full = False

    def buildProtocol(self, addr):
        if len(self.channels) >= self.max_connections:
            if not self._full:
                _log.warn("Refusing HTTP connections: already {n}", n=len(self.channels))
            self._full = True
            refusals.tell(self, refusals.TOO_MANY_CONNECTIONS)
            return Busy(self.error_body)
        return super().buildProtocol(addr)

    def connected(self, channel):
        self.channels.add(channel)

    def disconnected(self, channel):
        self.channels.discard(channel)
        if len(self.channels) < self.max_connections:
            self._full = False

    def refusal(self, request, length):
        """``(status, error[, headers])`` for a request refused from its headers, or None."""
        if not authorized(request, self.token):
            return 401, unauthorized_error(), (AUTHENTICATE,)
        if length is not None and length > self.max_body:
            return 413, too_large(self.max_body)
        return None


def with_backlog(description, backlog=BACKLOG):
    """An endpoint description with a listen backlog, unless it names one: Twisted's
    default of 50 resets a burst of connections."""
    if re.match(r"(?i)(tcp6?|ssl|unix):", description) and not re.search(r"(?i)(^|:)backlog=", description):
        return f"{description}:backlog={backlog}"
    return description


def make_site(api, max_body, timeout=60, reactor=None):
    """The site: ``api`` (a :class:`runai.doors.http.api.Api`) at ``/sdapi/v1``."""
    root = resource.Resource()
    sdapi = resource.Resource()
    root.putChild(b"sdapi", sdapi)
    sdapi.putChild(b"v1", api)
    return Site(root, max_body, timeout=timeout, token=api.token, reactor=reactor, early=True)
