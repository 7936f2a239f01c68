"""The legacy framing decoder's time on hostile input grows linearly with the bytes fed.

Goal: 4x the bytes takes under 10x the time (linear is ~4x, quadratic ~16x), and a
2 MiB message decodes in under 2 s.

A message full of NUL runs that never hold a whole aligned packet (each one could be the
start of the end-of-message packet until the decoder looks; built by
``runai.test.framing_fixtures.hostile_payload``), framed at packet size P, is fed to
``runai.doors.legacy.framing.Decoder`` in small unaligned chunks, as a slow or hostile
client would send it. A decoder that rescanned its buffer on each feed, or at each run,
would take minutes. For each (P, chunk), the best of ``--runs`` decodes of a ``--size-kib``
message and of one 4x as large. The test suite checks the same property without a clock,
by counting the bytes the decoder goes over (``test_framing.HostileInputTests``).

    .venv/bin/python benchmarks/decoder_linearity.py [--runs 3] [--size-kib 512]
"""

import argparse
import os
import sys
import time

sys.dont_write_bytecode = True  # write nothing into the checkout
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from runai.doors.legacy.framing import Decoder, Message, encode  # noqa: E402
from runai.test.framing_fixtures import hostile_payload  # noqa: E402

CASES = ((1024, 1000), (16, 1000))  # (packet size, chunk size)


def decode_seconds(p, size, chunk, runs):
    """The best of ``runs`` decodes of a hostile ``size``-byte message fed in ``chunk``-byte pieces."""
    payload = hostile_payload(p, size)
    stream = encode(payload, p)
    chunks = [stream[i:i + chunk] for i in range(0, len(stream), chunk)]
    best = None
    for _ in range(runs):
        decoder = Decoder(p)
        events = []
        started = time.perf_counter()
        for piece in chunks:
            events.extend(decoder.feed(piece))
        elapsed = time.perf_counter() - started
        assert events == [Message(payload)], "the decoder lost the message"
        best = elapsed if best is None else min(best, elapsed)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--size-kib", type=int, default=512, help="the smaller message; the larger is 4x")
    args = parser.parse_args()
    small_size = args.size_kib * 1024
    large_size = 4 * small_size
    print(f"{'P':>5} {'chunk':>6} {f'{small_size >> 10} KiB':>10} {f'{large_size >> 10} KiB':>10} "
          f"{'ratio':>6} {'MB/s':>7}")
    worst_ratio, slowest, ok = 0.0, 0.0, True
    for p, chunk in CASES:
        small = decode_seconds(p, small_size, chunk, args.runs)
        large = decode_seconds(p, large_size, chunk, args.runs)
        ratio = large / small
        worst_ratio, slowest = max(worst_ratio, ratio), max(slowest, large)
        # 50 ms of slack for a small message's tiny time, as the timed test this replaces had.
        ok = ok and large < 10 * small + 0.05 and large < 2.0
        print(f"{p:>5} {chunk:>6} {small * 1e3:>8.1f}ms {large * 1e3:>8.1f}ms {ratio:>6.2f} "
              f"{large_size / large / 1e6:>7.1f}", flush=True)
    print(f"\nbest of {args.runs} runs each; ratio: the larger message's time over the smaller's (linear: ~4)")
    print(f"VERDICT: {'PASS' if ok else 'FAIL'}: 4x the bytes took {worst_ratio:.1f}x the time at worst "
          f"(goal < 10x, give or take 50 ms), the {large_size >> 20} MiB message {slowest:.2f} s at worst (goal < 2 s)")


if __name__ == "__main__":
    main()
