# -*- test-case-name: runai.test.test_legacy_factory -*-
"""The legacy socket door's factory: its connections, its options, auto-shutdown.

One factory serves every connection of the door. Each connection's requests are its
:class:`runai.doors.legacy.session.Session`'s; all of them reach the one
:class:`runai.core.service.Core`, so all clients share one queue.
"""

from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger

from runai.core import errors
from runai.core.requests import IMAGE_ACTIONS, Limits
from runai.doors import refusals
from runai.doors.legacy import framing
from runai.doors.legacy.parse import decode_message, parse_request
from runai.doors.legacy.protocol import RunaiProtocol


class AutoShutdown:
    """Stops the server ``timeout`` seconds after start, or after the last client left,
    unless a client is connected by then: what the legacy Krita plugin expects of a
    server it starts itself."""

    log = Logger()

    def __init__(self, clock, timeout, stop):
        self.clock = clock
        self.timeout = timeout
        self.stop = stop
        self._call = None

    def arm(self, why):
        self.disarm()
        self._call = self.clock.callLater(self.timeout, self._fire, why)

    def disarm(self):
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _fire(self, why):
        self._call = None
        self.log.info("Auto-shutdown: no client {why} for {timeout}s; stopping", why=why, timeout=self.timeout)
        self.stop()


class RunaiFactory(ServerFactory):
    """``core`` serves the requests; ``reactor`` is the clock of timeouts; ``parse_pool``
    (a ThreadPool, or None to parse everything in line) takes the large requests and
    those with images."""

    protocol = RunaiProtocol
    log = Logger()

    # Bounds on what clients together can make the server hold; tests may lower them.
    max_connections = 64
    # Requests larger than this are parsed in the parse pool, not on the reactor; so is
    # every request that may carry images, whatever its size (see parse_in_thread).
    parse_in_thread_bytes = 256 * 1024
    # --metrics: told of each connection refused over max_connections (runai.doors.refusals).
    on_refused = None

    def __init__(self, core, reactor, parse_pool=None, stop=None, packet_size=framing.DEFAULT_PACKET_SIZE,
                 max_message_size=framing.DEFAULT_MAX_MESSAGE_SIZE, idle_timeout=60.0,
                 auto_shutdown=False, timeout=60.0, limits=Limits(), token=None):
        self.core = core
        self.reactor = reactor
        self.parse_pool = parse_pool
        # A shared secret for servers listening beyond loopback; None: no token needed.
        self.token = token.encode("utf-8") if isinstance(token, str) else token
        self.stop = stop
        self.packet_size = packet_size
        self.max_message_size = max_message_size
        self.idle_timeout = idle_timeout
        self.limits = limits
        self.clients = set()
        self.auto_shutdown = AutoShutdown(reactor, timeout, self._stop_server) if auto_shutdown else None

    # Lifecycle -----------------------------------------------------------------------

    def server_started(self):
        if self.auto_shutdown is not None:
            self.auto_shutdown.arm("connected")

    def _stop_server(self):
        if self.stop is not None:
            self.stop()

    def buildProtocol(self, addr):
        if len(self.clients) >= self.max_connections:
            self.log.warn("Refusing a connection from {addr}: already {n} clients", addr=addr, n=len(self.clients))
            refusals.tell(self, refusals.TOO_MANY_CONNECTIONS)
            return None
        return super().buildProtocol(addr)

    def client_connected(self, proto):
        self.clients.add(proto)
        self.log.debug("Client connected: {peer}", peer=proto.transport.getPeer())
        if self.auto_shutdown is not None:
            self.auto_shutdown.disarm()

    def client_lost(self, proto):
        self.clients.discard(proto)
        if self.auto_shutdown is not None and not self.clients:
            self.auto_shutdown.arm("reconnected")

    def quit_requested(self, proto):
        if self.auto_shutdown is not None:
            self.log.info("A client asked the server to quit")
            self._stop_server()
        else:
            # Without --auto-shutdown the server is not the client's to stop; the legacy
            # client only means "I am done", so end that one connection.
            proto.close()

    # Requests ------------------------------------------------------------------------

    def parse(self, payload):
        """``(obj, request, error)`` of a message; touches no connection state, so that it
        may run in a thread."""
        obj, error = self.decode(payload)
        return (None, None, error) if error is not None else self.build(obj)

    def decode(self, payload):
        """``(obj, None)``, the message's JSON object, or ``(None, error)``."""
        try:
            return decode_message(payload), None
        except errors.RunaiError as e:
            return None, e

    def build(self, obj):
        """``(obj, request, error)`` of a decoded message (may run in a thread)."""
        try:
            return obj, parse_request(obj, self.core.model_dir, self.limits), None
        except errors.RunaiError as e:
            return obj, None, e

    def reads_images(self, obj):
        """Whether building ``obj``'s request decodes images: then it is built in the parse
        pool (a small PNG can hold 16 Mpx of one colour: tenths of a second to decode)."""
        return obj.get("action") in IMAGE_ACTIONS + ("upscale",)
