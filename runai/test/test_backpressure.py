"""Backpressure: a client that does not read its socket cannot make the server queue
replies. The protocol is its transport's streaming producer; paused, it stops reading the
client, and a ``history_get`` sends its next image only once the client has caught up."""

import base64
import json
import os
import socket

from twisted.internet import reactor, task, threads
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IPushProducer
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import TestCase

from runai.core import errors
from runai.doors.legacy import framing
from runai.doors.legacy.protocol import LARGE_READ_SIZE
from runai.backends.local import LocalWorker
from runai.test.support import FakeImage, decode_all, frame, make_server
from runai.test.test_legacy_history import ServerTestCase
from runai.test.store_fixtures import request, running_store


class SlowReader(StringTransport):
    """A transport whose buffer is full as soon as it holds anything, like a TCP transport
    whose client does not read: it pauses its producer, as Twisted's transports do. The
    client reads everything with :meth:`drain`, which resumes the producer."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.full = False

    def write(self, data):
        super().write(data)
        if not self.full and self.producer is not None:
            self.full = True
            self.producer.pauseProducing()

    def drain(self):
        messages = decode_all(self.value())
        self.clear()
        if self.full:
            self.full = False
            if self.producer is not None:
                self.producer.resumeProducing()
        return messages


def kinds(messages):
    return [m.get("action") or ("image" if "image" in m else "error" if "error" in m else None) for m in messages]


class BackpressureTests(ServerTestCase):
    def connect_slow(self):
        proto = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 12345))
        transport = SlowReader(peerAddress=IPv4Address("TCP", "127.0.0.1", 12345))
        proto.makeConnection(transport)
        return proto, transport

    def stored_request(self, n_samples=3):
        proto, transport = self.connect()
        self.generate(proto, transport, n_samples=n_samples)
        proto.connectionLost(None)
        reads = []
        real = self.store.image

        def image(image_id):
            reads.append(image_id)
            return real(image_id)
        self.store.image = image
        return reads

    def test_registered_as_a_streaming_producer(self):
        proto, transport = self.connect()
        self.assertIs(transport.producer, proto)
        self.assertTrue(transport.streaming)
        self.assertTrue(IPushProducer.providedBy(proto))
        proto.connectionLost(None)
        self.assertIsNone(transport.producer)

    def test_paused_stops_reading_the_client_until_resumed(self):
        proto, transport = self.connect()
        proto.pauseProducing()
        self.assertEqual(transport.producerState, "paused")  # no more reads from its socket
        # Requests already read are held, not handled, while the client does not read.
        proto.dataReceived(frame({"action": "ping", "id": 1}) + frame({"action": "ping", "id": 2}))
        self.assertEqual(transport.value(), b"")
        proto.resumeProducing()
        self.assertEqual(transport.producerState, "producing")
        self.assertEqual([m["id"] for m in self.replies(transport)], [1, 2])

    def test_no_idle_timeout_while_the_server_does_not_read(self):
        proto, transport = self.connect()
        proto.dataReceived(frame({"action": "ping"})[:100])  # half a message
        proto.pauseProducing()
        self.reactor.advance(self.factory.idle_timeout * 2)
        self.assertFalse(transport.disconnecting)
        proto.resumeProducing()  # reading again: the client has its full time to go on
        self.reactor.advance(self.factory.idle_timeout - 1)
        self.assertFalse(transport.disconnecting)
        self.reactor.advance(1)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.replies(transport)[0]["error"]["code"], errors.IDLE_TIMEOUT)

    def test_when_writable(self):
        proto, _ = self.connect()
        self.successResultOf(proto.when_writable())
        proto.pauseProducing()
        d = proto.when_writable()
        self.assertNoResult(d)
        proto.resumeProducing()
        self.successResultOf(d)
        proto.pauseProducing()
        d = proto.when_writable()
        proto.connectionLost(None)  # fires too, so that nothing waits forever
        self.successResultOf(d)
        self.assertTrue(proto.closing)

    def test_history_get_sends_an_image_only_once_the_client_has_read(self):
        reads = self.stored_request(n_samples=3)
        proto, transport = self.connect_slow()
        proto.dataReceived(frame({"action": "history_get", "request_id": 1, "id": "g"}))
        # The item filled the buffer: no image was read from the store, let alone sent.
        self.assertEqual(reads, [])
        self.assertEqual(transport.producerState, "paused")
        self.assertEqual(kinds(transport.drain()), ["history_get"])
        self.assertEqual(len(reads), 1)
        # Each image waits for the client to read the one before.
        self.assertEqual(kinds(transport.drain()), ["image"])
        self.assertEqual(len(reads), 2)
        self.assertEqual(kinds(transport.drain()), ["image"])
        self.assertEqual(len(reads), 3)
        last = transport.drain()
        self.assertEqual(kinds(last), ["image", "done"])
        self.assertEqual(last[-1]["images"], 3)
        self.assertEqual(transport.drain(), [])
        self.assertIsNone(proto.session.history_get)

    def test_one_history_get_at_a_time(self):
        self.stored_request(n_samples=2)
        real, waiting = self.store.image, []

        def image(image_id):  # a slow disk: the read ends when the test says so
            waiting.append((Deferred(), image_id))
            return waiting[-1][0]
        self.store.image = image
        proto, transport = self.connect()
        proto.dataReceived(frame({"action": "history_get", "request_id": 1, "id": "a"}))
        proto.dataReceived(frame({"action": "history_get", "request_id": 1, "id": "b"}))
        messages = self.replies(transport)
        self.assertEqual([(m["id"], k) for m, k in zip(messages, kinds(messages))],
                         [("a", "history_get"), ("b", "error")])
        self.assertEqual(messages[1]["error"]["code"], errors.QUEUE_FULL)
        self.assertIn("history_get", messages[1]["error"]["message"])
        while waiting:
            d, image_id = waiting.pop(0)
            d.callback(self.successResultOf(real(image_id)))
        messages = self.replies(transport)
        self.assertEqual(kinds(messages), ["image", "image", "done"])
        self.assertTrue(all(m["id"] == "a" for m in messages))
        # Once done, the next one is served.
        self.store.image = real
        proto.dataReceived(frame({"action": "history_get", "request_id": 1, "id": "c"}))
        messages = self.replies(transport)
        self.assertEqual(kinds(messages), ["history_get", "image", "image", "done"])
        self.assertTrue(all(m["id"] == "c" for m in messages))

    def test_held_requests_wait_for_the_reply_in_progress(self):
        self.stored_request(n_samples=2)
        proto, transport = self.connect_slow()
        proto.dataReceived(frame({"action": "history_get", "request_id": 1, "id": "a"})
                           + frame({"action": "ping", "id": "p"}))
        # The ping was read with the history_get, but is handled only once the client reads.
        self.assertEqual(kinds(transport.drain()), ["history_get"])
        self.assertEqual(kinds(transport.drain()), ["image"])
        messages = transport.drain()
        self.assertEqual([(m["id"], k) for m, k in zip(messages, kinds(messages))],
                         [("a", "image"), ("a", "done")])
        self.assertEqual([(m["id"], m["action"]) for m in transport.drain()], [("p", "pong")])

    def test_a_client_that_leaves_while_paused(self):
        reads = self.stored_request(n_samples=3)
        proto, transport = self.connect_slow()
        proto.dataReceived(frame({"action": "history_get", "request_id": 1}))
        self.assertEqual(kinds(transport.drain()), ["history_get"])
        self.assertEqual(len(reads), 1)
        proto.connectionLost(None)
        self.assertEqual(len(reads), 1)
        self.assertIsNone(proto.session.history_get)
        self.assertIsNone(transport.producer)

    def test_transport_stops_producing_while_waiting(self):
        reads = self.stored_request(n_samples=2)
        proto, transport = self.connect_slow()
        proto.dataReceived(frame({"action": "history_get", "request_id": 1}))
        # What a TCP transport does when the connection drops: stopProducing, then
        # connectionLost (the transport has already forgotten its producer by then).
        transport.producer = None
        proto.stopProducing()
        proto.connectionLost(None)
        self.assertEqual(reads, [])
        self.assertIsNone(proto.session.history_get)

    def test_close_unregisters_before_losing_the_connection(self):
        # A producer still registered holds a TCP or TLS connection open after loseConnection.
        proto, transport = self.connect_slow()
        order = []
        real_unregister, real_lose = transport.unregisterProducer, transport.loseConnection
        transport.unregisterProducer = lambda: (order.append("unregister"), real_unregister())
        transport.loseConnection = lambda: (order.append("lose"), real_lose())
        proto.pauseProducing()
        proto.close()
        self.assertEqual(order, ["unregister", "lose"])
        self.assertIsNone(transport.producer)
        proto.resumeProducing()  # a late resume does not touch the closing transport
        proto.connectionLost(None)  # and nothing is unregistered twice
        self.assertEqual(order, ["unregister", "lose"])


class RealSocketTests(TestCase):
    """Twisted's own TCP transport, a real store, and a client that stops reading."""

    timeout = 120
    images = 24
    image_bytes = 1024 * 1024

    @inlineCallbacks
    def setUp(self):
        self.store = running_store(self, reactor)
        record = self.store.begin(request())
        self.pngs = [os.urandom(self.image_bytes) for _ in range(self.images)]
        for index, data in enumerate(self.pngs):
            self.store.add_image(record, FakeImage(data, index, 64, 64, index))
        self.store.finish(record, "done", seconds=1.0)
        yield self.store.history(1)  # the writes above are done
        models = os.path.realpath(self.mktemp())
        os.makedirs(models)
        _, _, self.factory = make_server(reactor, models, LocalWorker(reactor), store=self.store,
                                         pool=reactor.getThreadPool())
        self.port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)

    def buffered(self):
        """What the server holds for its one client, beyond what the kernel took."""
        [proto] = self.factory.clients
        t = proto.transport
        return len(t.dataBuffer) - t.offset + t._tempDataLen

    @inlineCallbacks
    def test_a_client_that_does_not_read_holds_little_of_the_server(self):
        def connect():
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            sock.connect(("127.0.0.1", self.port.getHost().port))
            sock.sendall(frame({"action": "history_get", "request_id": 1, "id": "g"}))
            return sock
        sock = yield threads.deferToThread(connect)
        self.addCleanup(sock.close)
        # The client reads nothing for a while: without backpressure the server would queue
        # all of the ~32 MB of base64 images by now.
        yield task.deferLater(reactor, 1.5, lambda: None)
        [proto] = self.factory.clients
        self.assertTrue(proto.paused)
        self.assertLess(self.buffered(), 4 * 1024 * 1024)

        def read_all():
            decoder, messages = framing.Decoder(framing.DEFAULT_PACKET_SIZE), []
            while not messages or messages[-1].get("action") != "done":
                data = sock.recv(1 << 20)
                if not data:
                    raise AssertionError("the server closed the connection")
                messages.extend(json_of(e) for e in decoder.feed(data))
            return messages
        messages = yield threads.deferToThread(read_all)
        images = [m for m in messages if "image" in m]
        self.assertEqual([m["index"] for m in images], list(range(self.images)))
        self.assertEqual([base64.b64decode(m["image"]) for m in images], self.pngs)
        self.assertEqual(messages[-1]["images"], self.images)
        self.assertIsNone(proto.session.history_get)


def json_of(event):
    return json.loads(event.payload)


class LargeRequestTests(TestCase):
    """Twisted's own TCP transport reads a large request in large reads (its bufferSize),
    and gets its own write buffer threshold (the same attribute) back once it has arrived."""

    timeout = 120

    @inlineCallbacks
    def test_large_reads_then_the_usual_threshold(self):
        models = os.path.realpath(self.mktemp())
        os.makedirs(models)
        _, _, factory = make_server(reactor, models, LocalWorker(reactor), pool=reactor.getThreadPool())
        seen, protos = [], []

        class Recording(factory.protocol):
            def connectionMade(self):
                protos.append(self)
                super().connectionMade()

            def dataReceived(self, data):
                seen.append(self.transport.bufferSize)
                super().dataReceived(data)

        factory.protocol = Recording
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        request = frame({"action": "ping", "id": "big", "pad": "x" * (8 * 1024 * 1024)})

        def ping():
            with socket.create_connection(("127.0.0.1", port.getHost().port)) as sock:
                sock.sendall(request)
                reply = b""
                while not reply.endswith(bytes(framing.DEFAULT_PACKET_SIZE)):
                    data = sock.recv(1 << 16)
                    if not data:
                        raise AssertionError("the server closed the connection")
                    reply += data
                return decode_all(reply)
        replies = yield threads.deferToThread(ping)
        [proto] = protos
        self.assertEqual([(m["action"], m["id"]) for m in replies], [("pong", "big")])
        default = type(proto.transport).bufferSize
        self.assertEqual(seen[0], default)
        self.assertIn(LARGE_READ_SIZE, seen)
        self.assertEqual(proto.transport.bufferSize, default)
