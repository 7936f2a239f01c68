# -*- test-case-name: runai.test.test_framing -*-
"""The legacy runai packet framing, sans-IO: bytes in, events out.

A message is UTF-8 JSON cut into packets of P bytes, the last one padded with NUL bytes,
followed by one end-of-message (EOM) packet of P NUL bytes. Between messages, a packet of
P ``x`` bytes asks the server to quit and one of P ``c`` bytes to cancel; inside a message
the same bytes are data (the original server got this wrong). See
``shared/reference/legacy-wire-format.md``.

TCP may split or merge packets anywhere, so the decoder keeps one byte buffer and never
assumes one read is one packet. No Twisted and no sockets here.

A large message does not stay in that buffer: the part already searched for the EOM moves
into the message's body (an ``io.BytesIO``), so the buffer stays small, and the body
becomes the payload's ``bytes`` without a copy (``BytesIO.getvalue``). Every byte of a
large message is copied once into the body, as it would be into one growing buffer; none
is copied again to make the ``bytes`` that the JSON decoder takes.
"""

import io
from dataclasses import dataclass

DEFAULT_PACKET_SIZE = 1024
DEFAULT_MAX_MESSAGE_SIZE = 64 * 1024 * 1024


# Messages at least this large are handed over in the decoder's own buffer (a bytearray)
# when they arrive in one feed.
HANDOVER_SIZE = 64 * 1024
# Once this many bytes of a message have been searched, they move from the buffer into
# the message's body: the buffer, searched and appended to, stays this small (and cached).
FLUSH_SIZE = 64 * 1024


@dataclass(frozen=True, eq=True)
class Message:
    """A whole message, NUL padding stripped: ``bytes``, or for a large message that
    arrived in one feed the decoder's own ``bytearray`` (no copy). Either decodes and
    compares the same."""

    payload: bytes


@dataclass(frozen=True)
class Control:
    """A control packet seen between messages: ``"quit"`` or ``"cancel"``."""

    kind: str


QUIT = Control("quit")
CANCEL = Control("cancel")


class MessageTooLarge(Exception):
    """The message being received has grown past the limit; the stream cannot be resynchronised."""

    def __init__(self, size, limit):
        super().__init__(f"message larger than {limit} bytes (at least {size} received)")
        self.size = size
        self.limit = limit


def encode(payload, packet_size=DEFAULT_PACKET_SIZE):
    """Frame ``payload``: whole packets, NUL padded, then the EOM packet."""
    if not payload:
        # It would be all NUL: indistinguishable from an EOM, so no receiver would see it.
        raise ValueError("an empty payload cannot be framed")
    if payload[-1:] == b"\x00":
        # Trailing NULs would be stripped by every receiver: refuse rather than corrupt.
        raise ValueError("a payload must not end with a NUL byte")
    padding = -len(payload) % packet_size
    return b"".join((payload, bytes(padding), bytes(packet_size)))


class Decoder:
    """Reassembles messages and control packets from a byte stream.

    Call :meth:`feed` with whatever bytes arrived; it returns the events that are now
    complete. Linear in the bytes fed: the EOM search resumes where it stopped.
    """

    def __init__(self, packet_size=DEFAULT_PACKET_SIZE, max_message_size=DEFAULT_MAX_MESSAGE_SIZE):
        if packet_size < 1:
            raise ValueError("packet size must be positive")
        self.packet_size = packet_size
        self.max_message_size = max_message_size
        # The most bytes a message within the limit can take, padding included.
        self._max_padded = -(-max_message_size // packet_size) * packet_size
        self._eom = bytes(packet_size)
        self._quit = b"x" * packet_size
        self._cancel = b"c" * packet_size
        self._buffer = bytearray()
        # Offset in the buffer from which no run of P NULs has been ruled out yet.
        self._scan = 0
        # The start of the current message that has left the buffer (searched, and no
        # EOM in it), and how many bytes that is: the buffer starts at this offset.
        self._body = None
        self._flushed = 0
        self._in_message = False
        self._failed = False

    @property
    def buffered(self):
        """Bytes of an incomplete packet or message held; 0 means the stream is between messages."""
        return self._flushed + len(self._buffer)

    @property
    def in_message(self):
        return self._in_message

    def feed(self, data):
        if self._failed:
            raise MessageTooLarge(self.buffered, self.max_message_size)
        self._buffer += data
        events = []
        while True:
            event = self._next_event()
            if event is None:
                break
            events.append(event)
        if self._in_message and self._scan - self.packet_size >= FLUSH_SIZE:
            self._flush()
        return events

    def _flush(self):
        """Move the searched part of the message into its body, all but its last packet
        (the EOM's boundary is never before the scan offset, so the last data packet,
        whose padding is stripped at the end, stays in the buffer)."""
        n = self._scan - self.packet_size
        if self._body is None:
            self._body = io.BytesIO()
        with memoryview(self._buffer) as view:
            self._body.write(view[:n])
        del self._buffer[:n]  # from the front of a bytearray: no copy
        self._flushed += n
        self._scan -= n

    def _next_event(self):
        size = self.packet_size
        buffer = self._buffer
        while not self._in_message:
            if len(buffer) < size:
                return None
            first = bytes(buffer[:size])
            if first == self._quit:
                del buffer[:size]
                return QUIT
            if first == self._cancel:
                del buffer[:size]
                return CANCEL
            if first == self._eom:
                # A stray EOM between messages carries nothing; the old clients never send
                # one, so skipping it is the most forgiving reading. A loop, not recursion:
                # a run of stray EOMs in one feed must not exhaust the stack.
                del buffer[:size]
                continue
            self._in_message = True
            self._scan = 0
        return self._find_message_end()

    def _find_message_end(self):
        size = self.packet_size
        buffer = self._buffer
        # Offsets in the buffer; the message's own are ``flushed`` more.
        flushed = self._flushed
        while True:
            start = buffer.find(self._eom, self._scan)
            if start < 0:
                # A run of P NULs could still begin in the last P-1 bytes.
                self._scan = max(self._scan, len(buffer) - size + 1)
                # Beyond the largest padded message plus a partial EOM: give up now, before
                # buffering more of a message that will be refused anyway.
                if flushed + len(buffer) > self._max_padded + size - 1:
                    self._failed = True
                    raise MessageTooLarge(flushed + len(buffer), self.max_message_size)
                return None
            # Padding NULs run straight into the EOM, so the EOM is the first packet
            # boundary at or after the start of the run, if that packet is all NUL.
            boundary = -(-(flushed + start) // size) * size - flushed
            if boundary + size > len(buffer):
                self._scan = start
                # The EOM cannot lie before this boundary; past the largest padded message
                # the message is refused anyway. Without this check, chunks that each end in
                # an unaligned run of NULs would grow the buffer without bound.
                if flushed + boundary > self._max_padded:
                    self._failed = True
                    raise MessageTooLarge(flushed + len(buffer), self.max_message_size)
                return None
            if buffer[boundary:boundary + size] == self._eom:
                if flushed + boundary > self._max_padded:
                    self._failed = True
                    raise MessageTooLarge(flushed + boundary, self.max_message_size)
                # Only the last data packet can end in NULs: an all-NUL packet before it
                # would have been the EOM. Strip there alone, and copy the payload once
                # (bytes(buffer[:boundary]) copies a large message twice).
                end = boundary
                if boundary:
                    end -= size - len(buffer[boundary - size:boundary].rstrip(b"\x00"))
                if self._body is not None:
                    # The rest of a large message joins its body, which becomes the
                    # payload's bytes without a copy.
                    with memoryview(buffer) as view:
                        self._body.write(view[:end])
                    payload = self._body.getvalue()
                    self._body = None
                    self._flushed = 0
                    del buffer[:boundary + size]
                elif boundary + size == len(buffer) and end >= HANDOVER_SIZE:
                    # The message fills the buffer, as a large one usually does: hand the
                    # buffer itself over instead of copying megabytes (half the cost of a
                    # 32 MiB message), and start a new one.
                    payload = buffer
                    del payload[end:]
                    self._buffer = bytearray()
                else:
                    with memoryview(buffer) as view:
                        payload = bytes(view[:end])
                    del buffer[:boundary + size]
                self._in_message = False
                self._scan = 0
                if len(payload) > self.max_message_size:
                    self._failed = True
                    raise MessageTooLarge(len(payload), self.max_message_size)
                return Message(payload)
            # The packet at the boundary holds a non-NUL byte, so no run of P NULs that
            # starts before it can contain an aligned EOM: resume after the boundary. Runs
            # are at least P apart, so hostile NUL runs cannot make this quadratic.
            self._scan = boundary + 1
