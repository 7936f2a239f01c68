"""The HTTP door under refused large requests: the server's memory stays flat.

Goal: after the first rounds, the server's RSS grows by less than one body over the rest,
and every refusal is answered with its status.

The real server (``twistd --nodaemon --pidfile= --logfile=- runai --port 0 --http
tcp:0:interface=127.0.0.1 --token-file TMP --model-dir TMP``, ``benchmarks/_support.py``)
gets ``--rounds`` (13) rounds of requests of ``--size-mib`` (30) MiB each, every one
refused: no token (401, answered from the headers, the body never held), not JSON (400),
not UTF-8 (400), a txt2img with a large ignored key and an img2img whose picture is not
base64 (both 404: the model folder is empty, so the default model is not found once the
body is parsed), and one over ``--max-message-size`` (413, answered at once, the rest read
and dropped). Each on a new connection, sent whole, then the answer read. After each
round, the server's RSS (``/proc/PID/status``). Prints the RSS per round and its growth
from round 3 on.

    .venv/bin/python benchmarks/http_refusals.py [--rounds 13] [--size-mib 30]
"""

import argparse
import json
import os
import shutil
import socket
import sys
import tempfile
import time

sys.dont_write_bytecode = True  # write nothing into the checkout
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks._support import Server  # noqa: E402

TOKEN = "a-benchmark-token-of-some-length"


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def post(port, path, body, token=True):
    """The status of the answer to ``body``, sent whole on a new connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        head = (f"POST /sdapi/v1/{path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\nConnection: close\r\n"
                + (f"Authorization: Bearer {TOKEN}\r\n" if token else "") + "\r\n").encode()
        try:
            sock.sendall(head + body)
        except OSError as e:
            return f"send failed: {e}"
        data = b""
        while True:
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            data += chunk
    return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else data[:40]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=13)
    parser.add_argument("--size-mib", type=int, default=30)
    args = parser.parse_args()
    size = args.size_mib * 1024 * 1024
    work = tempfile.mkdtemp(prefix="runai-bench-")
    try:
        models = os.path.join(work, "models")
        os.makedirs(models)
        token_file = os.path.join(work, "token")
        with open(token_file, "w") as f:
            f.write(TOKEN + "\n")
        http_port = socket.socket()
        http_port.bind(("127.0.0.1", 0))
        port = http_port.getsockname()[1]
        http_port.close()
        server = Server(models, work, "--http", f"tcp:{port}:interface=127.0.0.1", "--token-file", token_file,
                        "--device", "cpu", "--max-message-size", str(size + size // 4))
        try:
            time.sleep(15)  # torch loads in the worker thread: let it settle
            cases = [
                ("txt2img", b'{"prompt": "' + b"z" * size + b'"}', False, 401),
                ("txt2img", b'{"prompt": "' + b"x" * size + b'"', True, 400),
                ("txt2img", b"\xff" * size, True, 400),
                ("txt2img", json.dumps({"prompt": "x", "steps": 0, "junk": "y" * size}).encode(), True, 404),
                ("img2img", json.dumps({"prompt": "x", "init_images": ["A" * size + "!"]}).encode(), True, 404),
                ("txt2img", b"{" * (size + size // 2), True, 413),
            ]
            print(f"start: {rss_mib(server.pid):.0f} MiB")
            rss, wrong = [], []
            for round_ in range(args.rounds):
                began = time.monotonic()
                for path, body, token, expected in cases:
                    status = post(port, path, body, token)
                    if status != expected:
                        wrong.append((round_, path, expected, status))
                rss.append(rss_mib(server.pid))
                print(f"round {round_ + 1}: {rss[-1]:.0f} MiB, {len(cases)} refusals in "
                      f"{time.monotonic() - began:.1f} s")
        finally:
            server.stop()
        settled = rss[min(2, len(rss) - 1)]
        growth = max(rss) - settled
        print(f"growth after round 3: {growth:.0f} MiB (one body: {args.size_mib} MiB); wrong answers: {wrong}")
        ok = growth < args.size_mib and not wrong
        print(f"VERDICT: {'PASS' if ok else 'FAIL'}: RSS grew {growth:.0f} MiB over rounds 3-{args.rounds} "
              f"(goal: under {args.size_mib} MiB), {len(wrong)} wrong answers")
        return 0 if ok else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
