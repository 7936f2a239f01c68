"""GPU check: SD 1.5- and SDXL-sized fp16 txt2img through the runai server vs diffusers in-process.

For a machine with an NVIDIA GPU (H100/H200). Builds a random-weight pipeline with Stable
Diffusion 1.5's architecture (``runai.test.tiny.build_sd15_pipeline``, float16, built on
the GPU) in a temporary folder, then:

1. starts the real server (``twistd --nodaemon --pidfile= --logfile=- runai --port 0
   --device cuda``), sends one warm-up request (it loads the model), and times ``--runs``
   512x512, 50-step txt2img requests through the socket: it/s from the progress messages
   (steps between the first and the last progress message, over the time between them)
   and the whole request (sent -> image received); then stops the server;
2. loads the same folder in-process with diffusers' defaults
   (``from_pretrained(dtype=float16).to("cuda")``, the model's own scheduler), warms up
   once and times ``--runs`` calls (``torch.cuda.synchronize`` around each), with it/s
   from step-end callback timestamps, measured as on the server side.

With ``--family sdxl`` (or ``all``, the default: SD 1.5 then SDXL, one after the other) the
same is done for a random-weight pipeline with SDXL 1.0 base's architecture
(``runai.test.tiny_xl.build_sdxl_pipeline``) at 1024x1024, 30 steps, asking the server for
``euler`` (SDXL's own scheduler); it also reports the share of the server's image that is
not black (a float16 VAE that overflows gives black or NaN images; the server decodes
SDXL's original VAE in float32) and the server's log line on the VAE's precision.

The server is asked for ``plms``, which is the model's own scheduler (PNDM without PRK
steps, as in SD 1.5's config), so both sides run the same 51 UNet evaluations for 50
steps. Prints the GPU, torch and diffusers versions and whether xformers is available (the
server uses it when it is; the in-process call uses diffusers' default SDPA). The whole
run takes about 2-3 minutes on an H100.

Smoke test on a CPU, with a tiny float32 pipeline:

    .venv/bin/python benchmarks/gpu_check.py --tiny --device cpu --steps 2 --size 64
"""

import argparse
import gc
import importlib.util
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
SCALE = 7.5
SEED = 42


def xformers_status():
    if importlib.util.find_spec("xformers") is None:
        return "not installed"
    try:
        import xformers

        return f"installed, {xformers.__version__}"
    except Exception as e:  # noqa: BLE001 - a broken install is worth reporting, not dying for
        return f"installed but does not import: {type(e).__name__}: {e}"


def sync(device):
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def rate(stamps):
    """(steps per second between the first and the last stamp, seconds between them)."""
    if len(stamps) < 2:
        return float("nan"), float("nan")
    span = stamps[-1] - stamps[0]
    return (len(stamps) - 1) / span, span


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    parser.add_argument("--family", choices=("sd15", "sdxl", "all"), default="all")
    parser.add_argument("--steps", type=int, default=None, help="default 50 (SD 1.5), 30 (SDXL)")
    parser.add_argument("--size", type=int, default=None, help="default 512 (SD 1.5), 1024 (SDXL)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per side (default 3)")
    parser.add_argument("--tiny", action="store_true",
                        help="a tiny float32 pipeline instead of the SD 1.5-sized fp16 one (smoke test)")
    args = parser.parse_args()
    for family in ("sd15", "sdxl") if args.family == "all" else (args.family,):
        check(family, args)


def not_black(png):
    """The share of pixels of ``png`` that are not pure black."""
    import io

    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    return float((pixels.max(axis=2) > 0).mean())


def check(family, args):
    xl = family == "sdxl"
    steps = args.steps or (30 if xl else 50)
    size = args.size or (1024 if xl else 512)
    scheduler = "euler" if xl else "plms"
    name = "SDXL" if xl else "SD 1.5"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import diffusers
    import torch
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import logging as diffusers_logging

    from runai.client import BlockingClient
    from runai.test.tiny import build_sd15_pipeline, build_tiny_pipeline
    from runai.test.tiny_xl import build_sdxl_pipeline, build_tiny_sdxl_pipeline

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {device} was asked for, but torch {torch.__version__} sees no CUDA device "
                         f"here (a CPU-only torch build, or no GPU/driver). For a smoke test on a CPU: "
                         f"{sys.argv[0]} --tiny --device cpu --steps 2 --size 64")
    dtype = torch.float32 if args.tiny else torch.float16
    dtype_name = str(dtype).removeprefix("torch.")
    if device.startswith("cuda"):
        gpu = f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    else:
        gpu = f"none, {device} ({os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads)"
    print(f"GPU: {gpu}")
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, xformers: {xformers_status()}")
    print(f"\n== {'tiny ' if args.tiny else ''}{name}-sized random-weight pipeline, {dtype_name}; "
          f"{size}x{size}, {steps} steps, {scheduler}, {args.runs} timed runs per side", flush=True)
    tmp = tempfile.mkdtemp(prefix="runai-gpu-check-")
    server = None
    try:
        models = os.path.join(tmp, "models")
        model_path = os.path.join(models, "bench", family)
        started = time.perf_counter()
        if args.tiny:
            (build_tiny_sdxl_pipeline if xl else build_tiny_pipeline)(model_path)
        else:
            (build_sdxl_pipeline if xl else build_sd15_pipeline)(model_path, dtype=dtype, device=device)
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        print(f"built and saved the pipeline in {time.perf_counter() - started:.1f} s", flush=True)

        # 1. Through the server ---------------------------------------------------------
        started = time.perf_counter()
        server = Server(models, tmp, "--device", device, "--dtype", dtype_name)
        options = dict(steps=steps, scale=SCALE, seed=SEED, width=size, height=size, n_samples=1,
                       n_iter=1, scheduler=scheduler)
        with BlockingClient(port=server.port, timeout=600) as client:
            client.generate(PROMPT, f"bench/{family}", **options)  # warm-up: loads the model
            print(f"server start + warm-up request (model load + one image): "
                  f"{time.perf_counter() - started:.1f} s", flush=True)
            server_runs = []
            for _ in range(args.runs):
                progress, stamps = [], {}

                def on_message(message, progress=progress, stamps=stamps):
                    if message.get("action") == 4:
                        progress.append(time.perf_counter())
                    elif "image" in message:
                        stamps["image"] = time.perf_counter()

                start = time.perf_counter()
                images = client.generate(PROMPT, f"bench/{family}", on_message=on_message, **options)
                assert len(images) == 1
                lit = not_black(images[0].png)
                its, span = rate(progress)
                server_runs.append((its, span, stamps["image"] - start, len(progress)))
                print(f"  server run: {its:.2f} it/s ({len(progress) - 1} steps from 1st to last progress "
                      f"in {span:.3f} s), request {stamps['image'] - start:.3f} s; {lit:.1%} of the image not black",
                      flush=True)
        server.stop()
        attention = "xformers" if "using xformers" in server.log_text() else "SDPA (diffusers' default)"
        for line in server.log_text().splitlines():
            if "VAE" in line:
                print(f"  server log: {line.strip()}")
        server = None

        # 2. In-process, diffusers' defaults ----------------------------------------------
        started = time.perf_counter()
        pipeline_class = StableDiffusionXLPipeline if xl else StableDiffusionPipeline
        pipe = pipeline_class.from_pretrained(model_path, local_files_only=True, dtype=dtype)
        pipe = pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        print(f"in-process load: {time.perf_counter() - started:.1f} s; scheduler "
              f"{type(pipe.scheduler).__name__}", flush=True)

        def call(stamps):
            def on_step_end(pipeline, i, t, kwargs):
                stamps.append(time.perf_counter())
                return kwargs

            return pipe(PROMPT, width=size, height=size, num_inference_steps=steps, guidance_scale=SCALE,
                        generator=torch.Generator("cpu").manual_seed(SEED), callback_on_step_end=on_step_end)

        call([])  # warm-up
        sync(device)
        inproc_runs = []
        for _ in range(args.runs):
            stamps = []
            sync(device)
            start = time.perf_counter()
            call(stamps)
            sync(device)
            total = time.perf_counter() - start
            its, span = rate(stamps)
            inproc_runs.append((its, span, total, len(stamps)))
            print(f"  in-process run: {its:.2f} it/s ({len(stamps) - 1} steps from 1st to last step end "
                  f"in {span:.3f} s), call {total:.3f} s", flush=True)
        pipe = None  # frees the GPU memory before the summary
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    s_its = statistics.median(r[0] for r in server_runs)
    s_req = statistics.median(r[2] for r in server_runs)
    i_its = statistics.median(r[0] for r in inproc_runs)
    i_call = statistics.median(r[2] for r in inproc_runs)
    print()
    print(f"server ({attention}):   {s_its:7.2f} it/s, request sent -> image received {s_req:.3f} s "
          f"({server_runs[0][3]} progress messages)")
    print(f"in-process (SDPA):        {i_its:7.2f} it/s, pipe(...) call {i_call:.3f} s "
          f"({inproc_runs[0][3]} step ends)")
    ratio = s_its / i_its
    print(f"server/in-process: it/s {ratio:.1%}, total time {s_req / i_call:.1%} "
          f"({(s_req - i_call) * 1000:+.0f} ms)")
    print(f"VERDICT ({name}): the server denoises at {ratio:.0%} of in-process diffusers' speed and takes "
          f"{(s_req - i_call) / i_call:+.1%} time per request on {gpu}")


if __name__ == "__main__":
    main()
