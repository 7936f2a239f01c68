"""Server overhead: a txt2img request through the runai server vs the same call in-process.

Goal: server overhead under 5% of the in-process call.

Builds a benchmark-sized random-weight pipeline (``runai.test.tiny.SMALL_SIZES``) in a
temporary folder, starts the real server (``twistd --nodaemon --pidfile= --logfile=- runai
--port 0 --model-dir TMP --device cpu``, cwd a temporary folder) and sends it one warm-up
request (it loads the model); loads the same folder in this process with
``StableDiffusionPipeline.from_pretrained``, with the scheduler set as the engine sets it
(``runai.engine.schedulers.make_scheduler``), and warms it up once. Then, ``--runs`` times: one
txt2img request through the server with ``runai.client.BlockingClient`` (request sent ->
image received), and one in-process call with the same prompt, negative prompt, steps,
size, guidance scale and seed.

Fairness on a small machine: the server process is SIGSTOPped whenever it is not serving
a timed request, so it never runs at the same time as the in-process calls. Both sides
use the same torch thread count (``OMP_NUM_THREADS`` for the server,
``torch.set_num_threads`` here), by default torch's own default less one core, which is
left to the server's reactor thread and the client. On 2 cores that is 1 thread: with 2,
a torch step stalls whenever the reactor, the client or anything else takes a core, and
run-to-run noise of +-15% hides a 5% effect (``--threads 2`` measures it anyway). The
machine may be shared, so each run also counts the CPU time other processes took
meanwhile (from /proc) and is retried when they took more than 0.1 core (up to
``--tries``); runs still disturbed are marked ``*``.

    .venv/bin/python benchmarks/server_overhead.py [--runs 7] [--size 256] [--steps 20] [--threads N]
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.dont_write_bytecode = True  # write nothing into the checkout
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from _support import Server  # noqa: E402

PROMPT = "a lighthouse at dusk, oil painting"
NEGATIVE = "fog"
SCALE = 7.5
SEED = 42


CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids):
    """(CPU seconds the whole machine was busy, CPU seconds used by ``pids``) so far."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
    ours = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read().rsplit(")", 1)[1].split()
        ours += int(stat[11]) + int(stat[12])  # utime, stime
    return busy / CLK_TCK, ours / CLK_TCK


class Measured:
    """Runs ``fn`` until other processes stay (nearly) off the CPUs while it runs.

    This machine may be shared: a foreign process on one of 2 cores slows a 2-thread torch
    call several times over. A run during which other processes used more than
    ``max_foreign`` of a core is retried, up to ``tries`` times; if every try was disturbed,
    the least disturbed one is kept and flagged.
    """

    def __init__(self, pids, tries, max_foreign=0.1):
        self.pids = pids
        self.tries = tries
        self.max_foreign = max_foreign
        self.disturbed = 0

    def __call__(self, fn):
        best = None
        for _ in range(self.tries):
            busy0, ours0 = cpu_seconds(self.pids)
            start = time.perf_counter()
            value = fn(start)
            wall = time.perf_counter() - start
            busy1, ours1 = cpu_seconds(self.pids)
            foreign = max(0.0, (busy1 - busy0) - (ours1 - ours0)) / wall  # in cores
            result = (value, foreign, ours1 - ours0)
            if best is None or foreign < best[1]:
                best = result
            if foreign <= self.max_foreign:
                return result
            self.disturbed += 1
        return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7, help="timed runs per side (default 7)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--scheduler", default="euler_a")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for both sides (default: torch's default less one core, at least 1)")
    parser.add_argument("--tries", type=int, default=4,
                        help="tries per run when other processes disturb it (default 4)")
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import diffusers
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    from runai.client import BlockingClient
    from runai.engine.engine import encode_png
    from runai.engine.schedulers import make_scheduler
    from runai.test.tiny import SMALL_SIZES, build_tiny_pipeline

    diffusers_logging.set_verbosity_error()  # the accelerate notice, once per load
    threads = args.threads or max(1, min(torch.get_num_threads(), (os.cpu_count() or 2) - 1))
    torch.set_num_threads(threads)
    size, steps = args.size, args.steps
    options = dict(negative_prompt=NEGATIVE, steps=steps, scale=SCALE, seed=SEED, width=size,
                   height=size, n_samples=1, n_iter=1, scheduler=args.scheduler)

    tmp = tempfile.mkdtemp(prefix="runai-bench-")
    proc = None
    try:
        models = os.path.join(tmp, "models")
        model_path = os.path.join(models, "bench", "small")
        started = time.perf_counter()
        build_tiny_pipeline(model_path, **SMALL_SIZES)
        print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, {threads} torch threads on "
              f"both sides, {os.cpu_count()} CPUs; {size}x{size}, {steps} steps, {args.scheduler}, "
              f"{args.runs} timed runs per side, interleaved", flush=True)
        print(f"built the SMALL_SIZES pipeline in {time.perf_counter() - started:.1f} s", flush=True)

        proc = Server(models, tmp, "--device", "cpu", "--dtype", "float32", env={"OMP_NUM_THREADS": str(threads)})
        client = BlockingClient(port=proc.port, timeout=600)
        started = time.perf_counter()
        client.generate(PROMPT, "bench/small", **options)  # warm-up: loads the model
        print(f"server warm-up (model load + one image): {time.perf_counter() - started:.2f} s", flush=True)
        # From here on the server is SIGSTOPped whenever it is not serving a timed request,
        # so it never runs at the same time as the in-process calls.
        proc.pause()

        pipe = StableDiffusionPipeline.from_pretrained(
            model_path, local_files_only=True, safety_checker=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        pipe.scheduler = make_scheduler(args.scheduler, dict(pipe.scheduler.config))

        def call():
            return pipe(PROMPT, negative_prompt=NEGATIVE, width=size, height=size, num_inference_steps=steps,
                        guidance_scale=SCALE, generator=torch.Generator("cpu").manual_seed(SEED)).images[0]

        started = time.perf_counter()
        call()  # warm-up
        print(f"in-process warm-up (one image): {time.perf_counter() - started:.2f} s", flush=True)

        def server_run(start):
            stamps = {"progress": []}

            def on_message(message):
                now = time.perf_counter()
                if message.get("action") == 4:
                    stamps["progress"].append(now)
                if "image" in message:
                    stamps["image"] = now

            images = client.generate(PROMPT, "bench/small", on_message=on_message, **options)
            assert len(images) == 1
            return stamps["image"] - start, [t - start for t in stamps["progress"]]

        def inprocess_run(start):
            image = call()
            elapsed = time.perf_counter() - start
            png_start = time.perf_counter()
            encode_png(image)
            return elapsed, time.perf_counter() - png_start

        measure_server = Measured([os.getpid(), proc.pid], args.tries)
        measure_inproc = Measured([os.getpid()], args.tries)
        server, inproc = [], []
        for i in range(args.runs):
            proc.resume()
            server.append(measure_server(server_run))
            proc.pause()
            inproc.append(measure_inproc(inprocess_run))
            print(f"run {i + 1}: server {server[-1][0][0]:.3f} s, in-process {inproc[-1][0][0]:.3f} s", flush=True)
        proc.resume()
        client.close()
    finally:
        if proc is not None:
            proc.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    def flag(foreign):
        return "*" if foreign > 0.1 else ""

    server_times = [v[0] for v, _, _ in server]
    inproc_times = [v[0] for v, _, _ in inproc]
    server_med, inproc_med = statistics.median(server_times), statistics.median(inproc_times)
    print()
    print(f"server     (request sent -> image received): median {server_med:.3f} s, min {min(server_times):.3f} s")
    print("    runs: " + ", ".join(f"{v[0]:.3f}{flag(f)}" for v, f, _ in server)
          + f"; CPU s per request (server + client): {statistics.median(c for _, _, c in server):.2f}")
    for (t, progress), _, _ in server:
        if len(progress) >= 2:
            denoise = progress[-1] - progress[0]
            print(f"    to 1st progress {progress[0]:.3f} s, {len(progress) - 1} steps from 1st to last progress "
                  f"{denoise:.3f} s ({(len(progress) - 1) / denoise:.2f} it/s), last progress -> image "
                  f"{t - progress[-1]:.3f} s")
    print(f"in-process (pipe(...) call):                 median {inproc_med:.3f} s, min {min(inproc_times):.3f} s")
    print("    runs: " + ", ".join(f"{v[0]:.3f}{flag(f)}" for v, f, _ in inproc)
          + f"; CPU s per call: {statistics.median(c for _, _, c in inproc):.2f}")
    print(f"    PNG encoding (the server does it, the in-process call does not): "
          f"median {statistics.median(v[1] for v, _, _ in inproc) * 1000:.1f} ms")
    disturbed = measure_server.disturbed + measure_inproc.disturbed
    flagged = sum(1 for _, f, _ in server + inproc if f > 0.1)
    print(f"tries retried because other processes used the CPUs: {disturbed}; kept runs still disturbed "
          f"(marked *): {flagged}")
    overhead = (server_med - inproc_med) / inproc_med
    paired = statistics.median(s / i - 1 for s, i in zip(server_times, inproc_times))
    print(f"overhead: {(server_med - inproc_med) * 1000:+.1f} ms = {overhead:+.1%} of the in-process call "
          f"(min vs min {(min(server_times) / min(inproc_times) - 1):+.1%}, median of paired runs {paired:+.1%})")
    verdict = "MET" if overhead < 0.05 else "NOT MET"
    print(f"VERDICT: {verdict}: server overhead {overhead:+.1%} of the in-process call (goal: under 5%)"
          + (" [some runs disturbed by other processes]" if flagged else ""))


if __name__ == "__main__":
    main()
