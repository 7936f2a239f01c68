# -*- test-case-name: runai.test.test_legacy_protocol -*-
"""The server side of a legacy connection: framing in and out, limits, backpressure.

Messages go to the connection's :class:`runai.doors.legacy.session.Session`, which owns
the connection's state and its requests; this class only turns bytes into messages and
replies into bytes.

Backpressure: the protocol is its transport's streaming producer. When the client stops
reading and the transport's buffer fills, Twisted pauses it, and it stops reading (and
handling) that client's requests until the buffer has drained; a long reply (the images of
a ``history_get``) waits on :meth:`RunaiProtocol.when_writable` between its messages.

Large requests: Twisted's TCP transport reads at most its ``bufferSize`` (64 KiB) per
trip through the reactor, so a 32 MiB request would take 512 of them; while a large
message comes in, the protocol raises it to :data:`LARGE_READ_SIZE`. The same attribute is
how much unsent data pauses the transport's producer, so it is raised for no longer than
the large message takes to arrive.
"""

import collections
import json

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from zope.interface import implementer

from runai.core import errors
from runai.doors.legacy import framing, replies
from runai.doors.legacy.session import Session

# While a message larger than LARGE_MESSAGE is being received, the transport reads up to
# LARGE_READ_SIZE bytes at a time.
LARGE_MESSAGE = 64 * 1024
LARGE_READ_SIZE = 1024 * 1024


@implementer(IPushProducer)
class RunaiProtocol(Protocol, TimeoutMixin):
    log = Logger()

    def __init__(self):
        self.decoder = None
        self.session = None
        self.closing = False
        # Backpressure: paused while the transport's buffer is full (the client is not reading).
        self.paused = False
        self._producer = False  # registered with the transport as its producer
        self._events = collections.deque()  # decoded, not yet handled: held while paused
        self._handling = False
        self._parsing = None  # a large request being parsed off the reactor: hold the rest
        self._writable = []  # Deferreds of when_writable(), fired at resumeProducing
        self._read_size = None  # the transport's own bufferSize, if it has one
        self._large_reads = False

    # Twisted events ------------------------------------------------------------------

    def connectionMade(self):
        factory = self.factory
        # Replies are whole messages written at once; with Nagle's algorithm a small one
        # (a progress message, an image's last segment) waits for the client's delayed
        # ACK, adding tens of milliseconds to each request. Not every transport is TCP.
        try:
            self.transport.setTcpNoDelay(True)
        except (AttributeError, OSError):
            pass
        self.decoder = framing.Decoder(factory.packet_size, factory.max_message_size)
        self.session = Session(self, factory)
        # The factory's reactor, so that tests drive idle timeouts with a task.Clock.
        self.callLater = factory.reactor.callLater
        self._read_size = getattr(self.transport, "bufferSize", None)
        self.transport.registerProducer(self, True)
        self._producer = True
        factory.client_connected(self)

    def dataReceived(self, data):
        if self.closing:
            return
        try:
            events = self.decoder.feed(data)
        except framing.MessageTooLarge as e:
            self.refuse(errors.RunaiError(errors.MESSAGE_TOO_LARGE, str(e)))
            return
        self._events.extend(events)
        self._size_reads()
        self._handle_events()
        self._arm_idle_timeout()

    def _size_reads(self):
        """Read a large message in large reads; anything else as the transport would."""
        large = self.decoder.buffered >= LARGE_MESSAGE
        if large != self._large_reads and self._read_size is not None:
            self._large_reads = large
            self.transport.bufferSize = max(LARGE_READ_SIZE, self._read_size) if large else self._read_size

    def _arm_idle_timeout(self):
        if not self.closing:
            # Only a client stuck half-way through a message is timed out: an idle
            # connection between messages is a client waiting for its images. Nor is one
            # while paused: then it is the server that does not read.
            self.setTimeout(self.factory.idle_timeout if self.decoder.buffered and not self.paused else None)

    def _handle_events(self):
        """Handle the requests received, in order, until the client has to read first."""
        if self._handling:
            return
        self._handling = True
        try:
            while self._events and not self.paused and not self.closing and self._parsing is None:
                event = self._events.popleft()
                if isinstance(event, framing.Message):
                    parsing = self.session.message(event.payload)
                    if isinstance(parsing, defer.Deferred) and not parsing.called:
                        # Requests are answered in order: the next waits for this one.
                        self._parsing = parsing
                        parsing.addBoth(self._parsed)
                elif event is framing.CANCEL:
                    self.session.cancel_running()
                elif event is framing.QUIT:
                    self.session.quit()
        finally:
            self._handling = False

    def _parsed(self, result):
        self._parsing = None
        self._handle_events()
        return result

    def timeoutConnection(self):
        self.log.info("Dropping {peer}: half a message, then {timeout}s of silence",
                      peer=self.transport.getPeer(), timeout=self.factory.idle_timeout)
        self.refuse(errors.RunaiError(
            errors.IDLE_TIMEOUT,
            f"no data for {self.factory.idle_timeout:g}s in the middle of a message",
        ))

    def connectionLost(self, reason):
        self.closing = True
        self.setTimeout(None)
        self._unregister()
        self._events.clear()
        self._release_writers()
        if self.session is not None:
            self.session.lost()
        self.factory.client_lost(self)

    # IPushProducer: called by the transport ---------------------------------------------

    def pauseProducing(self):
        """The transport's buffer is full: the client is not reading what we send. Stop
        reading its requests, so that it cannot ask for more, until it catches up."""
        if self.paused or self.closing:
            return
        self.paused = True
        self.setTimeout(None)
        pause = getattr(self.transport, "pauseProducing", None)
        if pause is not None:
            pause()

    def resumeProducing(self):
        """The transport's buffer has drained: read the client again, and go on sending."""
        if not self.paused:
            return
        self.paused = False
        if not self.closing:
            resume = getattr(self.transport, "resumeProducing", None)
            if resume is not None:
                resume()
        self._release_writers()
        self._handle_events()
        self._arm_idle_timeout()

    def stopProducing(self):
        """The connection is gone (``connectionLost`` follows): nothing more is sent."""
        self._producer = False  # the transport has forgotten us already
        self.closing = True
        self._events.clear()
        self._release_writers()

    def when_writable(self):
        """A Deferred that fires when more may be sent: at once, unless the transport has
        paused us; then when it resumes us (or the connection ends: check ``closing``)."""
        if not self.paused or self.closing:
            return defer.succeed(None)
        d = defer.Deferred()
        self._writable.append(d)
        return d

    def _release_writers(self):
        # One at a time: a writer may fill the buffer again, and the others then wait.
        while self._writable and (self.closing or not self.paused):
            self._writable.pop(0).callback(None)

    def _unregister(self):
        if self._producer:
            self._producer = False
            self.transport.unregisterProducer()

    # Replies -------------------------------------------------------------------------

    def send_message(self, message):
        if self.closing:
            return
        payload = json.dumps(message, separators=(",", ":")).encode("utf-8")
        self.transport.write(framing.encode(payload, self.factory.packet_size))

    def send_error(self, error, reqtype=None, request_id=None):
        self.send_message(replies.error(error, reqtype, request_id))

    def refuse(self, error):
        """Answer ``error`` (the framing's own: no request was read) and close; counted
        with --metrics, as the core counts the refusals of the requests it hears of."""
        self.factory.core.refused(error)
        self.send_error(error)
        self.close()

    def close(self):
        if not self.closing:
            self.closing = True
            self.setTimeout(None)
            # A producer still registered would hold the connection open once the buffer drains.
            self._unregister()
            self._events.clear()
            self.transport.loseConnection()
            self._release_writers()
