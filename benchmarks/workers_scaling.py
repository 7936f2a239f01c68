"""Jobs per second with 1, 2, ... CPU workers in one server (``--device cpu`` given N times).

Builds a random-weight pipeline in a temporary folder (the tiny test model by default,
``--model small`` for ``runai.test.tiny.SMALL_SIZES``), then for each worker count starts
the real server (``twistd --nodaemon --pidfile= --logfile=- runai --port 0 --device cpu
[--device cpu ...]``), warms every worker up (N jobs at once, so each loads the model into
its own cache), and sends ``--jobs`` txt2img requests at once, from as many clients, through
the real socket protocol (``runai.client.BlockingClient``), several rounds. It prints the
jobs per second of each round, their median, and the speed-up over one worker.

On a machine with C cores, one worker runs torch with C intra-op threads and N workers
with C // N each (what ``twistd runai`` does): the scaling shown is what running whole jobs
side by side gains over splitting each step across the cores. Small models gain the most,
since a small step parallelises poorly.

    .venv/bin/python benchmarks/workers_scaling.py [--workers 1 2] [--jobs 8] [--rounds 3]
        [--model tiny|small] [--size 64] [--steps 10]
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time

sys.dont_write_bytecode = True  # write nothing into the checkout
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from _support import Server  # noqa: E402


def run_at_once(port, requests):
    """Send each request from its own client at the same time; seconds until all are done."""
    from runai.client import BlockingClient

    errors = []
    barrier = threading.Barrier(len(requests) + 1)

    def one(request):
        try:
            with BlockingClient(port=port, timeout=600) as client:
                barrier.wait()
                client.run(request)
        except Exception as e:  # reported below; the measure is void
            errors.append(e)

    threads = [threading.Thread(target=one, args=(r,)) for r in requests]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    if errors:
        raise SystemExit(f"a request failed: {errors[0]!r}")
    return time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--jobs", type=int, default=8, help="requests sent at once per round (default 8)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", choices=("tiny", "small"), default="tiny")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from runai.client import txt2img_request
    from runai.test.tiny import SMALL_SIZES, build_tiny_pipeline

    tmp = tempfile.mkdtemp(prefix="runai-bench-")
    try:
        models = os.path.join(tmp, "models")
        build_tiny_pipeline(os.path.join(models, "bench", "model"), **(SMALL_SIZES if args.model == "small" else {}))
        workdir = os.path.join(tmp, "work")
        os.makedirs(workdir)

        def request(seed):
            return txt2img_request("a lighthouse at dusk", "bench/model", seed=seed, steps=args.steps,
                                   width=args.size, height=args.size, scheduler="euler_a")

        print(f"{os.cpu_count()} CPUs; {args.model} model, {args.size}x{args.size}, {args.steps} steps; "
              f"{args.jobs} jobs at once, {args.rounds} rounds per worker count", flush=True)
        baseline = None
        for count in args.workers:
            server = Server(models, workdir, *(["--device", "cpu"] * count))
            try:
                run_at_once(server.port, [request(seed) for seed in range(count)])  # each worker loads
                rates = []
                for round_ in range(args.rounds):
                    seconds = run_at_once(server.port, [request(100 * round_ + k) for k in range(args.jobs)])
                    rates.append(args.jobs / seconds)
                median = statistics.median(rates)
                baseline = baseline or median
                print(f"{count} worker(s): " + ", ".join(f"{r:.2f}" for r in rates)
                      + f" jobs/s; median {median:.2f} jobs/s, {median / baseline:.2f}x one worker", flush=True)
            finally:
                server.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
