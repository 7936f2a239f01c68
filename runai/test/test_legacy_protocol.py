"""runai.doors.legacy.protocol: framing in and out, limits and timeouts, through a
StringTransport and a Clock."""

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from runai.core import errors
from runai.doors.legacy import framing
from runai.doors.legacy.protocol import LARGE_MESSAGE, LARGE_READ_SIZE
from runai.client import txt2img_request
from runai.test.support import ServerTestCase, frame

P = 1024


class FramingTests(ServerTestCase):
    def test_ping(self):
        proto, transport = self.connect()
        proto.dataReceived(frame({"action": "ping", "id": 7}))
        [pong] = self.replies(transport)
        self.assertEqual(pong["action"], "pong")
        self.assertEqual(pong["id"], 7)
        self.assertEqual((pong["queued"], pong["busy"], pong["workers"]), (0, False, 1))
        self.assertIn("version", pong)

    def test_replies_are_whole_packets(self):
        proto, transport = self.connect()
        proto.dataReceived(frame({"action": "ping", "pad": "y" * 3000}))
        data = transport.value()
        self.assertEqual(len(data) % P, 0)
        self.assertEqual(data[-P:], bytes(P))

    def test_one_byte_at_a_time(self):
        proto, transport = self.connect()
        for byte in frame({"action": "ping", "id": "a"}) + frame({"action": "ping", "id": "b"}):
            proto.dataReceived(bytes([byte]))
        self.assertEqual([m["id"] for m in self.replies(transport)], ["a", "b"])

    def test_bad_input_then_still_serving(self):
        proto, transport = self.connect()
        cases = [
            (framing.encode(b"\xff\xfe not utf-8"), errors.BAD_ENCODING),
            (frame("not an object"), errors.BAD_JSON),
            (framing.encode(b"{not json"), errors.BAD_JSON),
            (framing.encode(b'{"a": ' * 100000), errors.BAD_JSON),
            (frame({"action": "fly"}), errors.UNKNOWN_ACTION),
            (frame({"options": {}}), errors.BAD_REQUEST),
            (frame(self.request(steps=-1)), errors.OUT_OF_RANGE),
            (frame(self.request(steps="20")), errors.BAD_REQUEST),
            (frame(self.request(width=10**9)), errors.OUT_OF_RANGE),
            (frame(txt2img_request("x", "../../etc")), errors.PATH_OUTSIDE_MODEL_DIR),
            (frame(txt2img_request("x", "/etc/passwd")), errors.PATH_OUTSIDE_MODEL_DIR),
            (frame(txt2img_request("x", "v1/missing")), errors.MODEL_NOT_FOUND),
            (frame(self.request(scheduler="warp")), errors.UNKNOWN_SCHEDULER),
        ]
        for data, code in cases:
            proto.dataReceived(data)
            [reply] = self.replies(transport)
            self.assertEqual(reply["error"]["code"], code, reply)
            self.assertTrue(reply["error"]["message"])
            self.assertFalse(transport.disconnecting)
        proto.dataReceived(frame({"action": "ping"}))
        self.assertEqual(self.replies(transport)[0]["action"], "pong")
        self.assertEqual(self.engine.requests, [])

    def test_error_echoes_reqtype_and_id(self):
        proto, transport = self.connect()
        bad = self.request(steps=0)
        bad["id"] = "job-1"
        proto.dataReceived(frame(bad))
        [reply] = self.replies(transport)
        self.assertEqual((reply["reqtype"], reply["id"]), ("txt2img", "job-1"))

    def test_oversized_message_refused_and_closed(self):
        self.factory.max_message_size = 4 * P
        proto, transport = self.connect()
        data = b"{" + b"a" * (20 * P)
        # As TCP delivers it, a read at a time: the refusal comes before the whole is held.
        for i in range(0, len(data), P):
            proto.dataReceived(data[i:i + P])
        [reply] = self.replies(transport)
        self.assertEqual(reply["error"]["code"], errors.MESSAGE_TOO_LARGE)
        self.assertTrue(transport.disconnecting)
        self.assertLessEqual(proto.decoder.buffered, 4 * P + 2 * P)

    def test_half_a_message_then_silence(self):
        proto, transport = self.connect()
        proto.dataReceived(frame({"action": "ping"})[:P // 2])
        self.reactor.advance(29)
        self.assertFalse(transport.disconnecting)
        self.reactor.advance(1)
        [reply] = self.replies(transport)
        self.assertEqual(reply["error"]["code"], errors.IDLE_TIMEOUT)
        self.assertTrue(transport.disconnecting)

    def test_silence_between_messages_is_fine(self):
        proto, transport = self.connect()
        proto.dataReceived(frame({"action": "ping"}))
        self.reactor.advance(3600)
        self.assertFalse(transport.disconnecting)

    def test_trickle_resets_idle_timer(self):
        proto, transport = self.connect()
        data = frame({"action": "ping"})
        for i in range(0, len(data), 100):
            proto.dataReceived(data[i:i + 100])
            self.reactor.advance(20)
        self.assertFalse(transport.disconnecting)
        self.assertEqual(self.replies(transport)[0]["action"], "pong")

    def test_quit_packet_closes_connection_only(self):
        proto, transport = self.connect()
        proto.dataReceived(b"x" * P)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.stopped, [])

    def test_control_bytes_inside_a_message_are_data(self):
        proto, transport = self.connect()
        # "pad" is placed so that whole packets of x and c fall on packet boundaries.
        prefix = '{"action": "ping", "pad": "'
        pad = "x" * (P - len(prefix)) + "x" * P + "c" * P
        proto.dataReceived(frame({"action": "ping", "pad": pad}))
        self.assertEqual(frame({"action": "ping", "pad": pad})[P:2 * P], b"x" * P)
        [pong] = self.replies(transport)
        self.assertEqual(pong["action"], "pong")
        self.assertFalse(transport.disconnecting)
        self.assertEqual(self.stopped, [])


class TCPLikeTransport(StringTransport):
    """Has the attribute that sizes a Twisted TCP transport's reads (and its write buffer)."""

    bufferSize = 65536


class ReadSizeTests(ServerTestCase):
    def connect_tcp(self):
        proto = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 12345))
        transport = TCPLikeTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 12345))
        proto.makeConnection(transport)
        return proto, transport

    def test_large_message_read_in_large_reads(self):
        proto, transport = self.connect_tcp()
        data = frame({"action": "ping", "id": 1, "pad": "x" * (4 * LARGE_MESSAGE)})
        proto.dataReceived(data[:LARGE_MESSAGE - 1])
        self.assertEqual(transport.bufferSize, 65536)
        proto.dataReceived(data[LARGE_MESSAGE - 1:2 * LARGE_MESSAGE])
        self.assertEqual(transport.bufferSize, LARGE_READ_SIZE)
        # The message done, the transport reads and buffers writes as it did before.
        proto.dataReceived(data[2 * LARGE_MESSAGE:])
        self.assertEqual(transport.bufferSize, 65536)
        self.assertEqual([m["id"] for m in self.replies(transport)], [1])

    def test_small_messages_keep_the_read_size(self):
        proto, transport = self.connect_tcp()
        for i in range(3):
            proto.dataReceived(frame({"action": "ping", "id": i, "pad": "x" * 5000}))
            self.assertEqual(transport.bufferSize, 65536)
        self.assertEqual([m["id"] for m in self.replies(transport)], [0, 1, 2])

    def test_large_message_on_a_transport_without_a_read_size(self):
        proto, transport = self.connect()
        proto.dataReceived(frame({"action": "ping", "id": 1, "pad": "x" * (4 * LARGE_MESSAGE)}))
        self.assertEqual([m["id"] for m in self.replies(transport)], [1])
        self.assertFalse(hasattr(transport, "bufferSize"))

    def test_half_a_large_message_then_silence(self):
        # Most of what was received has left the decoder's buffer for the message's body:
        # it is still half a message, timed out as any other.
        proto, transport = self.connect_tcp()
        data = frame({"action": "ping", "pad": "x" * (8 * LARGE_MESSAGE)})
        for i in range(0, 4 * LARGE_MESSAGE, LARGE_MESSAGE):
            proto.dataReceived(data[i:i + LARGE_MESSAGE])
            self.reactor.advance(29)
        self.assertFalse(transport.disconnecting)
        self.reactor.advance(1)
        [reply] = self.replies(transport)
        self.assertEqual(reply["error"]["code"], errors.IDLE_TIMEOUT)
        self.assertTrue(transport.disconnecting)
