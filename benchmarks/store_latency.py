"""History store: what a stored image costs the reactor, and what it costs the store's thread.

The server calls ``Store.add_image`` on the reactor for every image it sends out. That
call must only hand the bytes to the store's own thread; encryption, the write and the
fsync happen there. This script measures, with a real SQLCipher file in a temporary
folder, the real store thread and the real reactor:

* ``enqueue``: the time ``add_image`` takes on the reactor (per image);
* ``reactor lag``: the worst delay of a 1 ms timer on the reactor while the images are
  written (what every other client would feel);
* ``write``: the store thread's time per image (SQLCipher encryption + WAL write + fsync,
  one transaction per image), from the first enqueue to the last commit.

Goal: under 1 ms per image on the reactor (median), and no reactor stall over 20 ms.

    .venv/bin/python benchmarks/store_latency.py [--images 100] [--kib 400]
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from twisted.internet import reactor, task  # noqa: E402
from twisted.internet.defer import inlineCallbacks  # noqa: E402

from runai.history import database, store  # noqa: E402
from runai.history.key import Key  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--kib", type=int, default=400, help="PNG size (a 512x512 SD image is 300-500 KiB)")
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="runai-store-bench-")
    path = os.path.join(folder, "history.db")
    key = Key("benchmark key")
    database.check(path, key)
    s = store.Store(path, key, reactor)
    result = {}

    @inlineCallbacks
    def run():
        s.startService()
        yield s.history(1)  # opened
        request = SimpleNamespace(action="txt2img", model_name="v1/bench", prompt="a lighthouse",
                                  negative_prompt="", steps=20, seed=1, id=None)
        record = s.begin(request)
        images = [SimpleNamespace(png=os.urandom(args.kib * 1024), seed=k, width=512, height=512, index=k)
                  for k in range(args.images)]
        lags, last = [], [time.perf_counter()]

        def tick():
            now = time.perf_counter()
            lags.append(now - last[0] - 0.001)
            last[0] = now
        ticker = task.LoopingCall(tick)
        ticker.start(0.001, now=False)
        enqueue = []
        started = time.perf_counter()
        for image in images:
            t = time.perf_counter()
            s.add_image(record, image)
            enqueue.append(time.perf_counter() - t)
        s.finish(record, "done")
        yield s.history(1)  # queued behind every write: fires once they are all committed
        written = time.perf_counter() - started
        ticker.stop()
        result.update(enqueue=enqueue, lags=lags, written=written)
        s.stopService()
        reactor.stop()

    reactor.callWhenRunning(run)
    reactor.run()
    n, mib = args.images, args.images * args.kib / 1024
    enqueue = result["enqueue"]
    print(f"{n} images of {args.kib} KiB ({mib:.0f} MiB); SQLCipher, WAL, synchronous=FULL, one commit per image")
    print(f"enqueue on the reactor: median {statistics.median(enqueue) * 1e6:.0f} us, "
          f"max {max(enqueue) * 1e6:.0f} us per image")
    print(f"reactor lag while writing: median {statistics.median(result['lags']) * 1e3:.2f} ms, "
          f"max {max(result['lags']) * 1e3:.1f} ms ({len(result['lags'])} ticks)")
    print(f"store thread: {result['written'] / n * 1e3:.1f} ms per image, {mib / result['written']:.0f} MiB/s")
    print(f"file: {os.path.getsize(path) / 2**20:.0f} MiB")
    shutil.rmtree(folder)
    ok = statistics.median(enqueue) < 0.001 and max(result["lags"]) < 0.020
    print(f"VERDICT: {'PASS' if ok else 'FAIL'}: a stored image costs the reactor "
          f"{statistics.median(enqueue) * 1e6:.0f} us (goal < 1 ms), worst reactor lag "
          f"{max(result['lags']) * 1e3:.1f} ms while writing (goal < 20 ms)")


if __name__ == "__main__":
    main()
