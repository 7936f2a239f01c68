"""Tests for runai.doors.legacy.framing: the legacy packet framing, encoder and sans-IO decoder."""

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from runai.doors.legacy import framing
from runai.doors.legacy.framing import CANCEL, QUIT, Decoder, Message, MessageTooLarge, encode
from runai.test.framing_fixtures import CountingBuffer, feed_all, hostile_payload, split

SMALL_PACKET_SIZES = (16, 32)
PACKET_SIZES = SMALL_PACKET_SIZES + (framing.DEFAULT_PACKET_SIZE,)


# Strategies ----------------------------------------------------------------------------

def payloads(p):
    """JSON-ish payloads: start with '{' (so never a control packet), no NUL anywhere,
    lengths that favour the packet boundaries."""
    lengths = st.one_of(
        st.integers(1, 4 * p),
        st.integers(1, 4).map(lambda k: k * p),
        st.integers(1, 4).map(lambda k: k * p - 1),
        st.integers(1, 4).map(lambda k: k * p + 1),
    )

    def body(n):
        rest = n - 1
        return st.one_of(
            st.binary(min_size=rest, max_size=rest).map(lambda b: b.replace(b"\x00", b"n")),
            # Whole packets of 'x' or 'c' inside a message are data, not control packets.
            st.sampled_from([b"x", b"c"]).map(lambda c: c * rest),
            st.text(min_size=rest, max_size=rest, alphabet='xc"{}: ').map(lambda t: t.encode()),
        ).map(lambda b: b"{" + b)

    return lengths.flatmap(body)


def items(p):
    """One element of a stream: a message, a control packet, or a stray EOM."""
    return st.one_of(
        payloads(p).map(Message),
        st.sampled_from([QUIT, CANCEL, "stray-eom"]),
    )


def stream_of(p, elements):
    chunks, expected = [], []
    for element in elements:
        if isinstance(element, Message):
            chunks.append(encode(element.payload, p))
            expected.append(element)
        elif element is QUIT:
            chunks.append(b"x" * p)
            expected.append(QUIT)
        elif element is CANCEL:
            chunks.append(b"c" * p)
            expected.append(CANCEL)
        else:
            chunks.append(bytes(p))
    return b"".join(chunks), expected


# Encoder ------------------------------------------------------------------------------

class EncodeTests(SynchronousTestCase):
    def check_encoding(self, payload, p):
        out = encode(payload, p)
        packets = -(-len(payload) // p)
        self.assertEqual(len(out), (packets + 1) * p, (len(payload), p))
        self.assertEqual(out[:len(payload)], payload)
        self.assertEqual(out[len(payload):], bytes(len(out) - len(payload)))
        self.assertEqual(out[-p:], bytes(p))

    def test_whole_packets_and_eom(self):
        for p in (16, 1024):
            for n in (1, p - 1, p, p + 1, 3 * p):
                self.check_encoding(b"{" + b"a" * (n - 1), p)

    def test_default_packet_size(self):
        out = encode(b'{"a":1}')
        self.assertEqual(len(out), 2048)
        self.assertEqual(out[:7], b'{"a":1}')

    def test_exact_multiple_gets_no_padding_packet(self):
        out = encode(b"{" * 32, 16)
        self.assertEqual(out, b"{" * 32 + bytes(16))

    def test_refuses_trailing_nul(self):
        self.assertRaises(ValueError, encode, b'{"a":1}\x00', 16)
        self.assertRaises(ValueError, encode, b"\x00", 16)

    def test_refuses_empty_payload(self):
        # It would frame as two EOMs, which a receiver skips: the message would vanish.
        self.assertRaises(ValueError, encode, b"", 16)

    def test_round_trip_each_size(self):
        for p in PACKET_SIZES:
            for n in (1, p - 1, p, p + 1, 3 * p):
                payload = b"{" + b"q" * (n - 1)
                self.assertEqual(Decoder(p).feed(encode(payload, p)), [Message(payload)])


# Decoder: round trips -----------------------------------------------------------------

class DecoderRoundTripTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(st.data())
    def test_any_segmentation(self, data):
        p = data.draw(st.sampled_from(PACKET_SIZES), label="packet_size")
        max_items = 4 if p >= 1024 else 10
        elements = data.draw(st.lists(items(p), max_size=max_items), label="elements")
        stream, expected = stream_of(p, elements)
        points = data.draw(st.lists(st.integers(0, len(stream)), max_size=20), label="splits")
        decoder = Decoder(p)
        self.assertEqual(feed_all(decoder, split(stream, points)), expected)
        self.assertEqual(decoder.buffered, 0)
        self.assertFalse(decoder.in_message)

    @settings(max_examples=100, deadline=None)
    @given(st.data())
    def test_hostile_nul_runs_any_segmentation(self, data):
        p = data.draw(st.sampled_from(SMALL_PACKET_SIZES), label="packet_size")
        length = data.draw(st.integers(1, 12 * p), label="length")
        payload = hostile_payload(p, length)
        stream = encode(payload, p) * 2
        points = data.draw(st.lists(st.integers(0, len(stream)), max_size=20), label="splits")
        self.assertEqual(feed_all(Decoder(p), split(stream, points)), [Message(payload)] * 2)

    def test_one_byte_at_a_time(self):
        p = 16
        payloads = [b"{" + b"z" * (n - 1) for n in (1, 15, 16, 17, 48, 50)]
        stream = b"".join(encode(m, p) for m in payloads) + b"x" * p
        decoder = Decoder(p)
        events = []
        for i in range(len(stream)):
            events.extend(decoder.feed(stream[i:i + 1]))
        self.assertEqual(events, [Message(m) for m in payloads] + [QUIT])

    def test_several_messages_in_one_feed(self):
        p = 32
        payloads = [b'{"a":%d}' % i for i in range(50)]
        stream = b"".join(encode(m, p) for m in payloads)
        self.assertEqual(Decoder(p).feed(stream), [Message(m) for m in payloads])

    def test_empty_feed(self):
        decoder = Decoder(16)
        self.assertEqual(decoder.feed(b""), [])
        self.assertEqual(decoder.buffered, 0)

    def test_rejects_bad_packet_size(self):
        self.assertRaises(ValueError, Decoder, 0)


# Decoder: control packets and stray EOMs ----------------------------------------------

class LargeMessageTests(SynchronousTestCase):
    """Large messages are handed over in the decoder's buffer; the bytes must not change."""

    def test_large_message_alone_and_followed(self):
        big = b'{"s": "' + bytes(range(35, 127)) * 3000 + b'"}'
        small = b'{"a": 1}'
        decoder = Decoder(1024, max_message_size=1 << 20)
        stream = encode(big, 1024)
        events = []
        for i in range(0, len(stream), 4096):
            events += decoder.feed(stream[i:i + 4096])
        self.assertEqual(events, [Message(big)])
        # Handed over or copied, the next message must start from a clean buffer.
        events = decoder.feed(encode(big, 1024) + encode(small, 1024))
        self.assertEqual(events, [Message(big), Message(small)])
        self.assertEqual(decoder.feed(encode(big, 1024)), [Message(big)])
        self.assertEqual(decoder.buffered, 0)

    def test_large_message_in_reads_is_bytes(self):
        # Read by read, a large message moves into its body as it is searched; it comes
        # out as bytes (which the JSON decoder takes without another copy), whatever the
        # packet size and however TCP cut it, and the stream goes on after it.
        for p in (1, 16, 1024):
            payload = b"{" + bytes(range(35, 127)) * (3 * framing.FLUSH_SIZE // 92) + b"}"
            stream = encode(payload, p) + encode(b"{}", p) + b"c" * p
            for chunk in (1000, 4099, 65536, 1 << 20):
                events = feed_all(Decoder(p), split(stream, range(0, len(stream), chunk)))
                self.assertEqual(events, [Message(payload), Message(b"{}"), CANCEL], (p, chunk))
                self.assertIs(type(events[0].payload), bytes)

    def test_large_message_buffer_stays_small(self):
        p, chunk = 1024, 65536
        payload = b"{" + b"a" * (1 << 20)
        stream = encode(payload, p)
        decoder = Decoder(p)
        fed = 0
        for piece in split(stream, range(0, len(stream), chunk))[:-1]:
            self.assertEqual(decoder.feed(piece), [])
            fed += len(piece)
            # All of it held, and reported as held; but little of it in the searched buffer.
            self.assertEqual(decoder.buffered, fed)
            self.assertTrue(decoder.in_message)
            self.assertLessEqual(len(decoder._buffer), framing.FLUSH_SIZE + p + chunk)
        self.assertEqual(decoder.feed(stream[fed:]), [Message(payload)])
        self.assertEqual(decoder.buffered, 0)

    def test_every_cut_near_the_end_of_a_large_message(self):
        # The last data packet (whose padding is stripped) and the EOM, cut anywhere, just
        # after the message has moved into its body (so, up to a few bytes before the cut).
        for p, extra in ((16, 5), (16, 16), (1024, 1), (1024, 1023)):
            payload = b"{" + b"q" * (2 * framing.FLUSH_SIZE + extra - 1)
            stream = encode(payload, p) + b"x" * p
            for cut in range(len(stream) - 4 * p, len(stream)):
                self.assertEqual(feed_all(Decoder(p), [stream[:cut], stream[cut:]]), [Message(payload), QUIT],
                                 (p, extra, cut))
                self.assertEqual(feed_all(Decoder(p), [stream[:cut], stream[cut:cut + 1], stream[cut + 1:]]),
                                 [Message(payload), QUIT], (p, extra, cut))

    def test_large_hostile_message(self):
        # NUL runs that are not EOMs, on both sides of where the buffer is cut.
        for p in (16, 1024):
            payload = hostile_payload(p, 3 * framing.FLUSH_SIZE)
            stream = encode(payload, p) * 2
            for chunk in (p - 3, 1000, 65536):
                self.assertEqual(feed_all(Decoder(p), split(stream, range(0, len(stream), chunk))),
                                 [Message(payload)] * 2, (p, chunk))


class ControlPacketTests(SynchronousTestCase):
    p = 16

    def test_quit_and_cancel_between_messages(self):
        p = self.p
        m1, m2 = b'{"a":1}', b'{"b":2}'
        stream = encode(m1, p) + b"x" * p + encode(m2, p) + b"c" * p
        self.assertEqual(Decoder(p).feed(stream), [Message(m1), QUIT, Message(m2), CANCEL])

    def test_control_at_start(self):
        self.assertEqual(Decoder(self.p).feed(b"x" * self.p), [QUIT])
        self.assertEqual(Decoder(self.p).feed(b"c" * self.p), [CANCEL])
        self.assertEqual(Decoder(1024).feed(b"x" * 1024), [QUIT])

    def test_partial_control_packet_waits(self):
        decoder = Decoder(self.p)
        self.assertEqual(decoder.feed(b"x" * (self.p - 1)), [])
        self.assertEqual(decoder.buffered, self.p - 1)
        self.assertFalse(decoder.in_message)
        self.assertEqual(decoder.feed(b"x"), [QUIT])
        self.assertEqual(decoder.buffered, 0)

    def test_almost_control_packet_is_a_message(self):
        p = self.p
        payload = b"x" * (p - 1) + b"y"
        self.assertEqual(Decoder(p).feed(encode(payload, p)), [Message(payload)])

    def test_x_packets_inside_a_message_are_data(self):
        p = self.p
        # '{"a":"' is 6 bytes: packets 1 and 2 are all 'x'.
        payload = b'{"a":"' + b"x" * (3 * p) + b'"}'
        self.assertEqual(payload[p:3 * p], b"x" * 2 * p)
        self.assertEqual(Decoder(p).feed(encode(payload, p)), [Message(payload)])

    def test_c_packet_inside_a_message_is_data(self):
        p = self.p
        payload = b"{" + b"a" * (p - 1) + b"c" * p
        self.assertEqual(Decoder(p).feed(encode(payload, p)), [Message(payload)])

    def test_x_packet_inside_a_message_fed_packet_by_packet(self):
        p = self.p
        payload = b"{" + b"a" * (p - 1) + b"x" * p + b"c" * p + b"}"
        stream = encode(payload, p) + b"c" * p
        decoder = Decoder(p)
        events = feed_all(decoder, [stream[i:i + p] for i in range(0, len(stream), p)])
        self.assertEqual(events, [Message(payload), CANCEL])

    def test_default_size_x_string(self):
        # The old server's bug: a request holding 1024 aligned 'x' characters shut it down.
        payload = b'{"action":"txt2img","options":{"txt2img_prompt":"' + b"x" * 4096 + b'"}}'
        self.assertEqual(Decoder().feed(encode(payload)), [Message(payload)])

    def test_stray_eom_is_skipped(self):
        p = self.p
        m1, m2 = b'{"a":1}', b'{"b":2}'
        stream = bytes(p) + encode(m1, p) + bytes(3 * p) + encode(m2, p) + bytes(p)
        decoder = Decoder(p)
        self.assertEqual(decoder.feed(stream), [Message(m1), Message(m2)])
        self.assertEqual(decoder.buffered, 0)
        self.assertFalse(decoder.in_message)

    def test_many_stray_eoms_in_one_feed(self):
        # Thousands of stray EOMs in one feed (1 MB of NULs at the default size) must
        # neither exhaust the stack nor be taken for a message.
        p = self.p
        decoder = Decoder(p)
        self.assertEqual(decoder.feed(bytes(p * 5000)), [])
        self.assertEqual(decoder.buffered, 0)
        self.assertEqual(decoder.feed(encode(b"{}", p)), [Message(b"{}")])


# Decoder: state reporting -------------------------------------------------------------

class StateTests(SynchronousTestCase):
    def test_partial_message(self):
        p = 16
        stream = encode(b"{" + b"a" * 40, p)  # 3 data packets + EOM
        decoder = Decoder(p)
        self.assertEqual(decoder.buffered, 0)
        self.assertFalse(decoder.in_message)

        self.assertEqual(decoder.feed(stream[:5]), [])
        self.assertEqual(decoder.buffered, 5)
        self.assertFalse(decoder.in_message)  # not even one packet yet

        self.assertEqual(decoder.feed(stream[5:p + 3]), [])
        self.assertEqual(decoder.buffered, p + 3)
        self.assertTrue(decoder.in_message)

        # The data and all but one byte of the EOM.
        self.assertEqual(decoder.feed(stream[p + 3:-1]), [])
        self.assertEqual(decoder.buffered, len(stream) - 1)
        self.assertTrue(decoder.in_message)

        self.assertEqual(decoder.feed(stream[-1:]), [Message(b"{" + b"a" * 40)])
        self.assertEqual(decoder.buffered, 0)
        self.assertFalse(decoder.in_message)

    def test_bytes_after_a_message_stay_buffered(self):
        p = 16
        decoder = Decoder(p)
        self.assertEqual(decoder.feed(encode(b"{}", p) + b"{ab"), [Message(b"{}")])
        self.assertEqual(decoder.buffered, 3)


# Decoder: size limit ------------------------------------------------------------------

class SizeLimitTests(SynchronousTestCase):
    def assert_refused_early(self, decoder, first, chunks):
        """Feed ``first`` and then ``chunks`` until MessageTooLarge; check that the
        decoder held at most the limit plus two packets plus one chunk."""
        p, limit = decoder.packet_size, decoder.max_message_size
        fed = 0
        biggest_chunk = 0
        with self.assertRaises(MessageTooLarge) as caught:
            decoder.feed(first)
            fed += len(first)
            for chunk in chunks:
                biggest_chunk = max(biggest_chunk, len(chunk))
                decoder.feed(chunk)
                fed += len(chunk)
        self.assertLessEqual(fed, limit + 2 * p + biggest_chunk)
        self.assertEqual(caught.exception.limit, limit)
        # Once refused, the stream cannot be resynchronised: every later feed fails.
        self.assertRaises(MessageTooLarge, decoder.feed, encode(b"{}", p))

    def endless(self, chunk):
        for _ in range(100_000):
            yield chunk

    def test_endless_message(self):
        for p, limit in ((16, 1000), (32, 1024), (1024, 5000)):
            self.assert_refused_early(Decoder(p, limit), b"{", self.endless(b"a" * 7))

    def test_endless_message_with_short_nul_runs(self):
        p = 16
        self.assert_refused_early(Decoder(p, 500), b"{", self.endless(b"a" + bytes(p - 1)))

    def test_endless_message_chunks_ending_in_unaligned_nuls(self):
        # Each chunk ends with a run of P NULs that straddles a packet boundary, so the
        # decoder cannot yet tell whether the next packet is the EOM.
        for p, limit in ((16, 100), (16, 4096), (32, 1000)):
            self.assert_refused_early(
                Decoder(p, limit), b"{" + b"a" * (p + 2), self.endless(b"a" * p + bytes(p)))

    def test_endless_message_hostile_nul_runs(self):
        p = 16
        body = hostile_payload(p, 50 * p)[1:]
        self.assert_refused_early(Decoder(p, 300), b"{", self.endless(body))

    def test_endless_large_message(self):
        # Limits larger than the decoder's buffer: what it holds is counted, body included.
        for p, limit in ((16, 200_000), (1024, 300_000)):
            self.assert_refused_early(Decoder(p, limit), b"{", self.endless(b"a" * 65536))
            self.assert_refused_early(Decoder(p, limit), b"{" + b"a" * (p + 2), self.endless(b"a" * 4000 + bytes(p)))

    def test_too_large_in_one_feed(self):
        for p, limit in ((16, 160), (16, 165), (1024, 3000)):
            payload = b"{" + b"a" * limit  # limit + 1 bytes
            self.assertRaises(MessageTooLarge, Decoder(p, limit).feed, encode(payload, p))

    def test_too_large_by_one_in_padding(self):
        # limit + 1 bytes still fit the padded size of a limit-size message: the
        # payload length decides.
        p, limit = 16, 165
        payload = b"{" + b"a" * limit
        self.assertEqual(-(-len(payload) // p), -(-limit // p))
        with self.assertRaises(MessageTooLarge) as caught:
            Decoder(p, limit).feed(encode(payload, p))
        self.assertEqual(caught.exception.size, limit + 1)

    def test_exactly_at_the_limit(self):
        for p, limit in ((16, 160), (16, 165), (32, 1024), (1024, 3000), (1024, 3072)):
            payload = b"{" + b"a" * (limit - 1)
            stream = encode(payload, p) + encode(b"{}", p)
            expected = [Message(payload), Message(b"{}")]
            self.assertEqual(Decoder(p, limit).feed(stream), expected, (p, limit))
            self.assertEqual(
                feed_all(Decoder(p, limit), split(stream, range(0, len(stream), 7))),
                expected, (p, limit))
            self.assertEqual(
                feed_all(Decoder(p, limit), [stream[i:i + 1] for i in range(len(stream))]),
                expected, (p, limit))

    def test_large_limit_read_by_read(self):
        p, limit = 1024, 200_000
        payload = b"{" + b"a" * (limit - 1)
        stream = encode(payload, p) + encode(b"{}", p)
        self.assertEqual(feed_all(Decoder(p, limit), split(stream, range(0, len(stream), 4000))),
                         [Message(payload), Message(b"{}")])
        too_large = encode(payload + b"a", p)
        with self.assertRaises(MessageTooLarge) as caught:
            feed_all(Decoder(p, limit), split(too_large, range(0, len(too_large), 4000)))
        self.assertEqual(caught.exception.size, limit + 1)

    def test_limit_applies_per_message(self):
        p, limit = 16, 100
        stream = b"".join(encode(b"{" + b"a" * (limit - 1), p) for _ in range(20))
        self.assertEqual(len(Decoder(p, limit).feed(stream)), 20)


# Decoder: hostile input, work ---------------------------------------------------------

class HostileInputTests(SynchronousTestCase):
    def test_unaligned_nul_runs_decode(self):
        for p in PACKET_SIZES:
            payload = hostile_payload(p, 20 * p)
            self.assertGreater(payload.count(bytes(p)), 5)  # the runs are really there
            stream = encode(payload, p) + b"x" * p
            self.assertEqual(Decoder(p).feed(stream), [Message(payload), QUIT])
            self.assertEqual(
                feed_all(Decoder(p), split(stream, range(0, len(stream), p - 3))),
                [Message(payload), QUIT])

    def decode_work(self, p, size, chunk):
        """Decode a hostile ``size``-byte message fed in ``chunk``-byte pieces; returns the
        bytes fed and the bytes the decoder went over."""
        payload = hostile_payload(p, size)
        stream = encode(payload, p)
        decoder = Decoder(p)
        decoder._buffer = buffer = CountingBuffer()
        events = feed_all(decoder, [stream[i:i + chunk] for i in range(0, len(stream), chunk)])
        self.assertEqual(events, [Message(payload)])
        return len(stream), buffer.work

    def test_linear_work(self):
        # NUL runs fed in small unaligned chunks: a decoder that rescans its buffer on
        # each feed, or at each run, goes over each byte hundreds of times here. (The
        # time this takes is benchmarks/decoder_linearity.py's.)
        for p, chunk in ((1024, 1000), (16, 1000), (16, 7)):
            fed, work = self.decode_work(p, 256 * 1024, chunk)
            # Every byte is searched at least once (so the count does see the decoder's
            # work). Beyond that: a found run is searched again up to P bytes and the
            # packet after it compared (runs are at least P apart: at most 2x), and each
            # feed searches again at most the P - 1 bytes where a run could begin.
            self.assertGreaterEqual(work, fed, (p, chunk))
            self.assertLessEqual(work, 3 * fed + (fed // chunk + 1) * p, (p, chunk, fed, work))
            # 4x the data: 4x the work.
            fed4, work4 = self.decode_work(p, 1024 * 1024, chunk)
            self.assertLess(work4, 4.5 * work, (p, chunk, work, work4))
