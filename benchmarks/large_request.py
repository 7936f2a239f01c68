"""Large requests: a 32 MiB request through the real server vs a plain loopback socket.

Goal: a 32 MiB request answered within 1.5x of the floor, measured side by side.

The request is a ping padded to ``--size-mib`` (32) MiB, ``{"action": "ping", "pad":
"xxxx..."}``, framed at packet size 1024 with ``runai.doors.legacy.framing.encode``. Two
servers, each in its own process, get the same framed bytes:

* ``runai``: the real server, ``twistd --nodaemon --pidfile= --logfile=- runai --port 0
  --model-dir TMP`` (``benchmarks/_support.py``): the legacy door as ``twistd`` wires it,
  on the real reactor, with its parse pool; it answers ``pong``. It loads torch in its
  worker thread once it listens (seconds of CPU, holding the GIL much of the time), so the
  timing starts only once it has gone idle (a request meanwhile takes up to twice as long);
* ``floor``: a plain Python socket server that reads with ``recv(1 MiB)`` into one
  ``bytearray`` until the stream ends with an aligned end-of-message packet, strips the
  EOM and the padding, runs ``json.loads`` on the payload, and answers a framed ``pong``.

The client code is the same for both: connect (untimed), start the clock, ``sendall`` the
framed request, read until the reply's end-of-message packet, stop the clock. Each server
gets one untimed warm-up request, then ``--repeat`` (9) timed requests each, interleaved
(the order alternates every round), each on a new connection. Prints every run, the
medians and their ratio, and the ratio of the two medians against the goal.

    .venv/bin/python benchmarks/large_request.py [--repeat 9] [--size-mib 32]
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.dont_write_bytecode = True  # write nothing into the checkout
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from _support import Server  # noqa: E402

from runai.doors.legacy import framing  # noqa: E402

PACKET = framing.DEFAULT_PACKET_SIZE
EOM = bytes(PACKET)
FLOOR_READ = 1 << 20
GOAL = 1.5


def padded_ping(size):
    """The framed request: a ping whose payload is exactly ``size`` bytes."""
    head, tail = b'{"action": "ping", "pad": "', b'"}'
    payload = head + b"x" * (size - len(head) - len(tail)) + tail
    assert len(payload) == size
    return framing.encode(payload, PACKET)


def ends_message(buf):
    """Whether ``buf`` ends with an end-of-message packet on a packet boundary (only the
    tail is looked at: a 32 MiB buffer is not scanned again on every read)."""
    return len(buf) >= 2 * PACKET and len(buf) % PACKET == 0 and buf[-PACKET:] == EOM


def wait_idle(pid, timeout=300):
    """Wait until process ``pid`` uses no CPU for a while: the real server loads torch and
    the engine in its worker thread after it listens, and that must not run meanwhile."""
    tick = os.sysconf("SC_CLK_TCK")

    def cpu():
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / tick  # utime + stime

    deadline, quiet, last = time.monotonic() + timeout, 0, cpu()
    while quiet < 4 and time.monotonic() < deadline:
        time.sleep(0.25)
        now = cpu()
        quiet = quiet + 1 if now - last < 0.02 else 0
        last = now


# The floor (run in a subprocess) ---------------------------------------------------------

def serve_floor():
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    print(f"PORT {listener.getsockname()[1]}", flush=True)
    while True:
        conn, _ = listener.accept()
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            buf = bytearray()
            while not ends_message(buf):
                data = conn.recv(FLOOR_READ)
                if not data:
                    break
                buf += data
            else:
                # Strip the EOM, then the padding (only the last data packet holds any),
                # in place: no copy of the payload before json.loads decodes it.
                end = len(buf) - PACKET
                last = bytes(buf[end - PACKET:end])
                del buf[end - PACKET + len(last.rstrip(b"\x00")):]
                obj = json.loads(buf)
                reply = {"action": "pong", "version": "floor", "queued": 0, "busy": False,
                         "id": obj.get("id")}
                conn.sendall(framing.encode(json.dumps(reply, separators=(",", ":")).encode(), PACKET))
                # Wait for the client to close, so that the next accept is the next run.
                conn.recv(1)


def start_floor():
    args = [sys.executable, os.path.abspath(__file__), "--serve-floor"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, cwd=ROOT,
                            env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
    line = proc.stdout.readline()
    if not line.startswith("PORT "):
        proc.kill()
        raise SystemExit(f"the floor server did not start: {line!r}")
    return proc, int(line.split()[1])


# The client (this process), the same for both ---------------------------------------------

def send_once(port, framed):
    """First byte sent -> the reply's EOM received, in seconds; and the reply."""
    sock = socket.create_connection(("127.0.0.1", port))
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        got = bytearray()
        start = time.perf_counter()
        sock.sendall(framed)
        while not ends_message(got):
            data = sock.recv(1 << 16)
            if not data:
                raise ConnectionError("the server closed the connection")
            got += data
        elapsed = time.perf_counter() - start
    finally:
        sock.close()
    reply = json.loads(bytes(got[:-PACKET]).rstrip(b"\x00"))
    if reply.get("action") != "pong":
        raise SystemExit(f"expected a pong, got {reply!r}")
    return elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--size-mib", type=float, default=32)
    parser.add_argument("--serve-floor", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_floor:
        return serve_floor()

    size = int(args.size_mib * 1024 * 1024)
    framed = padded_ping(size)
    print(f"request: a ping padded to {size} payload bytes, {len(framed)} framed bytes (packet size "
          f"{PACKET}); {args.repeat} timed runs per server, interleaved; {os.cpu_count()} CPUs")

    tmp = tempfile.mkdtemp(prefix="runai-bench-")
    runai = floor = None
    try:
        os.mkdir(os.path.join(tmp, "models"))
        runai = Server(os.path.join(tmp, "models"), tmp)
        floor, floor_port = start_floor()
        waited = time.perf_counter()
        wait_idle(runai.pid)
        print(f"the server went idle {time.perf_counter() - waited:.1f} s after it listened")
        ports = {"runai": runai.port, "floor": floor_port}
        for name in ports:  # one untimed run each: imports, page faults, TCP warm-up
            send_once(ports[name], framed)
        results = {name: [] for name in ports}
        order = list(ports)
        for _ in range(args.repeat):
            for name in order:
                results[name].append(send_once(ports[name], framed))
            order.reverse()
    finally:
        if floor is not None:
            floor.kill()
            floor.wait()
        if runai is not None:
            runai.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    mb = len(framed) / 1e6
    medians = {}
    for name, label in (("runai", "runai (twistd, real path)"), ("floor", "floor (recv 1 MiB + json.loads)")):
        med = medians[name] = statistics.median(results[name])
        runs = " ".join(f"{t * 1000:.0f}" for t in results[name])
        print(f"{label:>32}: median {med * 1000:6.1f} ms ({mb / med:6.0f} MB/s), min "
              f"{min(results[name]) * 1000:6.1f} ms; runs, ms: {runs}")
    ratio = medians["runai"] / medians["floor"]
    paired = statistics.median(r / f for r, f in zip(results["runai"], results["floor"]))
    print(f"ratio runai/floor: {ratio:.2f}x (median of paired runs {paired:.2f}x)")
    verdict = "MET" if ratio <= GOAL else "NOT MET"
    print(f"VERDICT: {verdict}: a {args.size_mib:g} MiB request in {medians['runai'] * 1000:.0f} ms through "
          f"the real server, {ratio:.2f}x the floor's {medians['floor'] * 1000:.0f} ms (goal: within {GOAL}x)")


if __name__ == "__main__":
    main()
