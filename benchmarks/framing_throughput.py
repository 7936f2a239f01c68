"""Framing throughput: runai's codec + Twisted protocol stack vs a plain loopback socket.

Goal: framing throughput at least half of a plain loopback socket.

This measures the codec and the socket, not a request: its runai servers replace the
session (no parse, no parse pool) and its floor reads 64 KiB at a time. The time of a large
request through the real server, against a floor that reads 1 MiB at a time and decodes
the JSON, is ``benchmarks/large_request.py``'s.

One 32 MiB message (a JSON object with one long base64 string, like an image in an
img2img request), framed with ``runai.doors.legacy.framing.encode`` at packet size 1024, is sent over
127.0.0.1 by this process to a server running in a subprocess:

* ``runai``: the real ``RunaiProtocol`` + ``Decoder`` behind a ``RunaiFactory`` on the
  real Twisted reactor, whose ``message_received`` answers with the payload length
  instead of parsing a generation request (the point is codec + socket);
* ``runai+json``: the same, but ``json.loads`` the payload before answering;
* ``plain``: a plain Python socket server that reads (``recv(65536)``, Twisted's read
  size) until it holds all the bytes, then answers.

Every server answers with the same framed bytes (one packet + EOM). The client code is
the same for all: connect, start the clock, ``sendall`` the framed message, read the
answer, stop the clock. Each server is measured ``--repeat`` times, interleaved, on a new
connection each time; the median is reported.

    .venv/bin/python benchmarks/framing_throughput.py [--repeat 5] [--size-mib 32]
"""

import argparse
import base64
import json
import os
import statistics
import subprocess
import sys
import time

sys.dont_write_bytecode = True  # write nothing into the checkout
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from runai.doors.legacy import framing

PACKET = framing.DEFAULT_PACKET_SIZE
MODES = ("plain", "runai", "runai+json")
READ_SIZE = 1 << 16


def answer(length, server_seconds):
    """The framed answer every server sends: the same size whatever the numbers."""
    payload = json.dumps({"received": length, "server_s": round(server_seconds, 6)}).encode()
    return framing.encode(payload.ljust(96), PACKET)  # ljust: trailing spaces, never NUL


# Servers (run in a subprocess) ----------------------------------------------------------

def serve_plain(expected):
    import socket

    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    print(f"PORT {listener.getsockname()[1]}", flush=True)
    while True:
        conn, _ = listener.accept()
        with conn:
            buf = bytearray()
            first = None
            while len(buf) < expected:
                data = conn.recv(READ_SIZE)
                if not data:
                    break
                if first is None:
                    first = time.perf_counter()
                buf += data
            if len(buf) < expected:
                continue
            # The payload length, as the runai server reports it: only the last data
            # packet holds padding, so strip NULs there alone (no copy of the message).
            last = bytes(buf[expected - 2 * PACKET:expected - PACKET])
            length = expected - 2 * PACKET + len(last.rstrip(b"\x00"))
            conn.sendall(answer(length, time.perf_counter() - first))
            # Wait for the client to close, so that the next accept is the next run.
            conn.recv(1)


def serve_runai(parse_json):
    from twisted.internet import reactor

    from runai.doors.legacy.factory import RunaiFactory
    from runai.doors.legacy.protocol import RunaiProtocol

    class BenchSession:
        """Stands in for the connection's session: answers each message with its timing."""

        def __init__(self, proto):
            self.proto = proto

        def message(self, payload):
            length = len(payload)
            if parse_json:
                json.loads(payload)
            seconds = time.perf_counter() - self.proto.first
            self.proto.first = None
            self.proto.transport.write(answer(length, seconds))

        def lost(self):
            pass

    class TimedProtocol(RunaiProtocol):
        first = None

        def connectionMade(self):
            super().connectionMade()
            self.session = BenchSession(self)

        def dataReceived(self, data):
            if self.first is None:
                self.first = time.perf_counter()
            super().dataReceived(data)

    class BenchFactory(RunaiFactory):
        protocol = TimedProtocol

    # No core: the bench session answers every message itself.
    factory = BenchFactory(None, reactor)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    print(f"PORT {port.getHost().port}", flush=True)
    reactor.run()


# Client (this process) -------------------------------------------------------------------

def make_message(size):
    """A framed JSON message whose payload is exactly ``size`` bytes."""
    head = b'{"action": "bench", "data": "'
    tail = b'"}'
    n = size - len(head) - len(tail)
    data = base64.b64encode(os.urandom(n * 3 // 4 + 3))[:n]
    payload = head + data + tail
    assert len(payload) == size
    return payload, framing.encode(payload, PACKET)


def start_server(mode, expected):
    args = [sys.executable, os.path.abspath(__file__), "--serve", mode, "--expected", str(expected)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    line = proc.stdout.readline()
    if not line.startswith("PORT "):
        proc.kill()
        raise SystemExit(f"the {mode} server did not start: {line!r}")
    return proc, int(line.split()[1])


def send_once(port, framed):
    """Same code for every server: first byte sent -> answer received."""
    import socket

    sock = socket.create_connection(("127.0.0.1", port))
    try:
        want = 2 * PACKET
        got = bytearray()
        start = time.perf_counter()
        sock.sendall(framed)
        while len(got) < want:
            data = sock.recv(want - len(got))
            if not data:
                raise ConnectionError("server closed the connection")
            got += data
        elapsed = time.perf_counter() - start
    finally:
        sock.close()
    reply = json.loads(bytes(got[:PACKET]).rstrip(b"\x00"))
    return elapsed, reply


def decoder_alone(framed, chunk=READ_SIZE):
    """The Decoder without sockets or Twisted: feed 64 KiB chunks, as the reactor would."""
    chunks = [framed[i:i + chunk] for i in range(0, len(framed), chunk)]
    decoder = framing.Decoder(PACKET)
    start = time.perf_counter()
    events = []
    for c in chunks:
        events.extend(decoder.feed(c))
    elapsed = time.perf_counter() - start
    assert len(events) == 1
    return elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--size-mib", type=float, default=32)
    parser.add_argument("--serve", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--expected", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.serve == "plain":
        return serve_plain(args.expected)
    if args.serve in ("runai", "runai+json"):
        return serve_runai(args.serve == "runai+json")

    size = int(args.size_mib * 1024 * 1024)
    payload, framed = make_message(size)
    mb = len(framed) / 1e6
    print(f"message: {len(payload)} payload bytes, {len(framed)} framed bytes "
          f"(packet size {PACKET}); {args.repeat} runs per server, median reported")

    servers = {mode: start_server(mode, len(framed)) for mode in MODES}
    results = {mode: [] for mode in MODES}
    server_side = {mode: [] for mode in MODES}
    try:
        for mode in MODES:  # one untimed run each: imports, page faults, TCP warm-up
            send_once(servers[mode][1], framed)
        for _ in range(args.repeat):
            for mode in MODES:
                elapsed, reply = send_once(servers[mode][1], framed)
                if reply["received"] != len(payload):
                    raise SystemExit(f"{mode}: server got {reply['received']} bytes, expected {len(payload)}")
                results[mode].append(elapsed)
                server_side[mode].append(reply["server_s"])
    finally:
        for proc, _ in servers.values():
            proc.kill()
            proc.wait()

    medians = {}
    for mode in MODES:
        med = statistics.median(results[mode])
        medians[mode] = med
        runs = " ".join(f"{t * 1000:.0f}" for t in results[mode])
        print(f"{mode:>11}: median {med * 1000:7.1f} ms = {mb / med:7.1f} MB/s "
              f"(runs, ms: {runs}; server first byte -> answer, median "
              f"{statistics.median(server_side[mode]) * 1000:.1f} ms)")

    dec = statistics.median(decoder_alone(framed) for _ in range(3))
    print(f"Decoder.feed alone, 64 KiB chunks, no socket: {dec * 1000:.1f} ms = {mb / dec:.1f} MB/s")

    ratio = medians["plain"] / medians["runai"]
    ratio_json = medians["plain"] / medians["runai+json"]
    print(f"ratio runai/plain: {ratio:.2f} (with json.loads: {ratio_json:.2f})")
    verdict = "MET" if ratio >= 0.5 else "NOT MET"
    print(f"VERDICT: {verdict}: runai framing at {ratio:.0%} of a plain loopback socket "
          f"(goal: at least 50%)")


if __name__ == "__main__":
    main()
