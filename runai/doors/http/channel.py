# -*- test-case-name: runai.test.test_http_site,runai.test.test_openai_site -*-
"""One connection to a hardened twisted.web site (:class:`runai.doors.http.site.Site`),
within the site's bounds of sizes and times, and the answers given before twisted.web's
request machinery would give one.

- A request line over ``max_url`` bytes is answered 414; headers over
  ``totalHeadersSize`` bytes or ``maxHeaders`` lines, 431.
- A request's headers must all arrive within the site's ``request_timeout``, and its body
  at ``min_body_rate`` bytes a second beyond it (408); silence in the middle of a request
  is answered 408 when the connection times out.
- A connection over the site's cap is answered 503 (:class:`Busy`).

An early answer is a whole response (:func:`raw_response`) whose body the site's
``error_body(status, error)`` makes, in its door's shape; it closes the connection, at
once or once the request's body has been read and dropped.
"""

from twisted.internet import protocol
from twisted.logger import Logger
from twisted.web import http

from runai.core import errors
from runai.doors import refusals
from runai.doors.http.replies import REASONS

# A request line longer than this is answered 414 (browsers and proxies take about 8 KB).
MAX_URL = 8 * 1024


def raw_response(status, error, body_of, headers=()):
    """A whole HTTP/1.1 response that closes the connection; ``body_of(status, error)``
    makes its body."""
    body = body_of(status, error)
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}", "Content-Type: application/json",
             f"Content-Length: {len(body)}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + body


class Channel(http.HTTPChannel):
    """One HTTP connection, within the site's bounds of sizes and times."""

    log = Logger()
    max_url = MAX_URL

    def __init__(self):
        super().__init__()
        self.refused = False  # answered early: whatever follows is dropped, then closed
        self._began = None  # when the request being received began (reactor seconds)
        self._received = 0  # its body bytes so far
        self._pace = None  # the DelayedCall that checks its pace

    def connectionMade(self):
        super().connectionMade()
        self.site.connected(self)

    def connectionLost(self, reason):
        self._stop_pace()
        self.site.disconnected(self)
        super().connectionLost(reason)

    # Times -----------------------------------------------------------------------------

    def dataReceived(self, data):
        if self._began is None and not self._handlingRequest and not self.refused:
            self._began = self.site.reactor.seconds()
            self._pace = self.callLater(self.site.request_timeout, self._check_pace)
        super().dataReceived(data)

    def rawDataReceived(self, data):
        if not self._handlingRequest:
            self._received += len(data)
        super().rawDataReceived(data)

    def allContentReceived(self):
        self._stop_pace()
        super().allContentReceived()

    def _stop_pace(self):
        if self._pace is not None and self._pace.active():
            self._pace.cancel()
        self._pace = self._began = None
        self._received = 0

    def _check_pace(self):
        self._pace = None
        timeout = self.site.request_timeout
        elapsed = self.site.reactor.seconds() - self._began
        allowed = timeout + self._received / self.site.min_body_rate
        if elapsed < allowed:
            self._pace = self.callLater(allowed - elapsed, self._check_pace)
            return
        self.log.info("Dropping {peer}: a request that did not arrive within {timeout:g}s",
                      peer=self.transport.getPeer(), timeout=timeout)
        self.refuse(408, errors.RunaiError(
            errors.IDLE_TIMEOUT, f"the request did not arrive in time ({timeout:g}s for the headers, then "
                                 f"at least {self.site.min_body_rate} bytes a second)"))

    def timeoutConnection(self):
        if self._began is not None and not self.refused:
            self.refused = True
            self.transport.write(raw_response(408, errors.RunaiError(
                errors.IDLE_TIMEOUT, f"no data for {self.site.request_timeout:g}s in the middle of a request"),
                body_of=self.site.error_body))
            refusals.tell(self.site, errors.IDLE_TIMEOUT)
        super().timeoutConnection()

    # Sizes -----------------------------------------------------------------------------

    def _in_request_line(self):
        return bool(getattr(self, "_HTTPChannel__first_line", 0))

    def lineReceived(self, line):
        if self._in_request_line():
            if len(line) > self.max_url:
                self._too_long(True)
                return
        elif self._receivedHeaderSize + len(line) > self.totalHeadersSize:
            self._too_long(False)
            return
        super().lineReceived(line)

    def lineLengthExceeded(self, line):
        self._too_long(self._in_request_line())

    def headerReceived(self, line):
        if self._receivedHeaderCount >= self.maxHeaders:
            self._too_long(False)
            return False
        return super().headerReceived(line)

    def _too_long(self, url):
        if url:
            self.refuse(414, errors.RunaiError(errors.MESSAGE_TOO_LARGE,
                                               f"the request's URL is longer than {self.max_url} bytes"))
        else:
            self.refuse(431, errors.RunaiError(
                errors.MESSAGE_TOO_LARGE, f"the request's headers are larger than {self.totalHeadersSize} bytes "
                                          f"or {self.maxHeaders} lines"))

    # Early answers ---------------------------------------------------------------------

    def refuse(self, status, error, headers=(), linger=False):
        """Answer ``status`` now and close: at once, or (``linger``) once the request's body
        has been read and dropped."""
        if not self.refused:
            self.refused = True
            self.persistent = False
            self.transport.write(raw_response(status, error, self.site.error_body, headers))
            refusals.tell(self.site, refusals.http_code(status, error))  # counted with --metrics
        for request in self.requests:
            if not request.finished and hasattr(request, "drop_body"):
                request.drop_body()
        if not linger:
            self._stop_pace()
            self.loseConnection()


class Busy(protocol.Protocol):
    """A connection over the cap: answered 503 and closed."""

    def __init__(self, body_of):
        self.body_of = body_of

    def connectionMade(self):
        self.transport.write(raw_response(503, errors.RunaiError(
            errors.QUEUE_FULL, "the server has too many HTTP connections; try again in a moment"),
            body_of=self.body_of))
        self.transport.loseConnection()
