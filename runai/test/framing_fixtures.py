"""Byte streams for the legacy framing's tests and benchmarks: cutting and feeding them,
hostile payloads, and a decoder buffer that counts the decoder's work."""


def feed_all(decoder, chunks):
    events = []
    for chunk in chunks:
        events.extend(decoder.feed(chunk))
    return events


def split(data, points):
    """``data`` cut at the given offsets (any order, duplicates allowed)."""
    cuts = sorted(set(p for p in points if 0 < p < len(data)))
    edges = [0] + cuts + [len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:])]


def hostile_payload(packet_size, length, rng_bytes=b"ab{}"):
    """A payload of about ``length`` bytes full of NUL runs of P..2P-1 bytes that never
    hold a whole aligned packet of NULs (so none of them is an EOM).

    A run starting at offset ``o`` (0 < o < P) within a packet holds an aligned packet
    only if it is at least ``2P - o`` long, so each run is at most ``2P - o - 1``.
    """
    p = packet_size
    out = bytearray(b"{")
    i = 0
    while len(out) < length:
        offset = len(out) % p
        if offset == 0:
            out += b"a"
            continue
        longest = 2 * p - offset - 1
        run = p + (i * 7919) % (longest - p + 1) if longest >= p else 0
        if run >= p:
            out += bytes(run)
        out += rng_bytes[i % len(rng_bytes):i % len(rng_bytes) + 1]
        i += 1
    return bytes(out)


class CountingBuffer(bytearray):
    """A decoder's buffer that counts the bytes its searches and slices go over: the
    decoder's work, without a clock."""

    def __init__(self):
        super().__init__()
        self.work = 0

    def find(self, sub, start=0, *end):
        found = super().find(sub, start, *end)
        self.work += (found + len(sub) if found >= 0 else len(self)) - start
        return found

    def __getitem__(self, index):
        item = super().__getitem__(index)
        if isinstance(index, slice):
            self.work += len(item)
        return item
