"""The server side of a connection: framing in and out, limits, and nothing else.

Requests are handed to the factory (:class:`runai.server.RunaiFactory`), which owns the
queue; this class only turns bytes into messages and replies into bytes.
"""

import json

from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin

from runai import errors, framing


class RunaiProtocol(Protocol, TimeoutMixin):
    log = Logger()

    def __init__(self):
        self.decoder = None
        self.closing = False
        self.jobs = {}  # the client's id -> Job, for jobs queued or running

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
        # The factory's clock, so that tests drive idle timeouts with a task.Clock.
        self.callLater = factory.clock.callLater
        factory.client_connected(self)

    def dataReceived(self, data):
        if self.closing:
            return
        try:
            events = self.decoder.feed(data)
        except framing.MessageTooLarge as e:
            self.send_error(errors.RunaiError(errors.MESSAGE_TOO_LARGE, str(e)))
            self.close()
            return
        for event in events:
            if self.closing:
                return
            if isinstance(event, framing.Message):
                self.factory.message_received(self, event.payload)
            elif event is framing.CANCEL:
                self.factory.cancel_running(self)
            elif event is framing.QUIT:
                self.factory.quit_requested(self)
        if not self.closing:
            # Only a client stuck half-way through a message is timed out: an idle
            # connection between messages is a client waiting for its images.
            self.setTimeout(self.factory.idle_timeout if self.decoder.buffered else None)

    def timeoutConnection(self):
        self.log.info("Dropping {peer}: half a message, then {timeout}s of silence",
                      peer=self.transport.getPeer(), timeout=self.factory.idle_timeout)
        self.send_error(errors.RunaiError(
            errors.IDLE_TIMEOUT,
            f"no data for {self.factory.idle_timeout:g}s in the middle of a message",
        ))
        self.close()

    def connectionLost(self, reason):
        self.closing = True
        self.setTimeout(None)
        self.factory.client_lost(self)

    # Replies -------------------------------------------------------------------------

    def send_message(self, message):
        if self.closing:
            return
        payload = json.dumps(message, separators=(",", ":")).encode("utf-8")
        self.transport.write(framing.encode(payload, self.factory.packet_size))

    def send_error(self, error, reqtype=None, request_id=None):
        self.send_message({
            "error": {"code": error.code, "message": error.message},
            "reqtype": reqtype,
            "id": request_id,
        })

    def close(self):
        if not self.closing:
            self.closing = True
            self.setTimeout(None)
            self.transport.loseConnection()
