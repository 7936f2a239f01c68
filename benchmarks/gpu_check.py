"""GPU check: SD 1.5-, SDXL-, SD3.5- and FLUX.1-sized txt2img through the runai server vs diffusers in-process.

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

With ``--family sdxl`` the same is done for a random-weight pipeline with SDXL 1.0 base's
architecture (``runai.test.tiny_xl.build_sdxl_pipeline``) at 1024x1024, 30 steps, asking
the server for ``euler`` (SDXL's own scheduler); it also reports the server's log line on
the VAE's precision (the server decodes SDXL's original VAE in float32).

The flow-matching families (``runai.test.tiny_flow``), in bfloat16 (float16 overflows in
T5; the server gets ``--dtype bfloat16``), 1024x1024, 28 steps, the server asked for
``euler`` (FlowMatchEulerDiscreteScheduler, the models' own):

* ``--family sd3``: SD 3.5 Large's architecture (``build_sd3_pipeline``; 8.1 B transformer
  parameters, T5-XXL, CLIP-L and bigG; ~28 GB on disk), or Medium's with
  ``--sd3-variant medium`` (~16.5 GB), guidance 7.0 (the server's ``scale``; in-process
  ``guidance_scale=7.0``: classifier-free guidance, two transformer passes per step);
* ``--family flux``: FLUX.1 dev's architecture (``build_flux_pipeline``; 11.9 B
  transformer parameters, T5-XXL, CLIP-L; ~34 GB on disk), distilled guidance 3.5 (the
  server's ``distilled_cfg_scale``; in-process ``FluxPipeline(guidance_scale=3.5)``: the
  guidance embedding, one pass per step).

Their random weights are created on the GPU directly in bfloat16 (torch's default dtype
is bfloat16 while the builder runs, so the float32 copy of ~67 GB for FLUX is never made)
and saved to the temporary folder, which needs the free space said above; it is removed
at the end of each family's check, before the next family's is built. ``--tmp-dir`` (or
TMPDIR) puts it elsewhere; ``--depth N`` caps every layer stack of these two builders
(real widths, a quick check of the plumbing; the timings then are not the real model's).

``--family all`` (the default) runs sd15, sdxl, sd3 and flux one after the other; a family
that fails is reported (traceback, and the server's log tail for a server error) and the
next one still runs; the exit status is 1 if any failed.

For every family it reports the share of each image that is not black (a half-precision
model that overflows gives black or NaN images; NaN becomes black in the PNG), whether
the in-process latents hold NaN or inf after the last step, the server's log lines on
the VAE and on invalid values, and the peak GPU memory: in-process from
``torch.cuda.max_memory_allocated`` (and ``max_memory_reserved``), and for both sides the
device's used memory above its level before the side started, sampled every 0.2 s with
``nvidia-smi`` (or ``torch.cuda.mem_get_info`` where there is no nvidia-smi), which
counts the CUDA context and the caching allocator's reserve too.

The server is asked for ``plms`` for SD 1.5, which is the model's own scheduler (PNDM
without PRK steps, as in SD 1.5's config), so both sides run the same 51 UNet evaluations
for 50 steps. Prints the GPU, torch and diffusers versions and whether xformers is
available (the server uses it when it is; the in-process call uses diffusers' default
SDPA). SD 1.5 and SDXL take about 2-3 minutes on an H100; SD3.5 Large and FLUX.1 dev each
a few minutes more, mostly building and saving the folder and loading it twice (the
build time is printed).

Smoke test on a CPU, with tiny float32 pipelines (add ``--family sd3``, ``flux`` or
``all``):

    .venv/bin/python benchmarks/gpu_check.py --tiny --device cpu --steps 2 --size 64

Its figures say little on a small shared CPU: the server's and this process's OpenMP
threads compete (a tiny FLUX step took 0.2 s on the server and 0.005 s in-process on 2
busy cores); ``OMP_NUM_THREADS=1`` in front makes both sides comparable.
"""

import argparse
import contextlib
import gc
import importlib.util
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Optional

sys.dont_write_bytecode = True  # write nothing into the checkout
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from _support import Server  # noqa: E402

PROMPT = "a lighthouse at dusk, oil painting"
SCALE = 7.5
SEED = 42
FAMILIES = ("sd15", "sdxl", "sd3", "flux")
FLOW = ("sd3", "flux")
GIB = 1 << 30


@dataclass(frozen=True)
class Spec:
    """What one family's check runs: its defaults, guidance and the folder's size."""

    name: str
    steps: int
    size: int
    scheduler: str
    options: dict  # the server's guidance options
    guidance_scale: float  # the in-process call's
    disk_gb: Optional[float] = None  # the real-size folder, for the free-space check


def spec_of(family, args):
    if family == "sdxl":
        return Spec("SDXL", 30, 1024, "euler", dict(scale=SCALE), SCALE)
    if family == "sd3":
        large = args.sd3_variant == "large"
        return Spec(f"SD3.5 {args.sd3_variant.capitalize()}", 28, 1024, "euler", dict(scale=7.0), 7.0,
                    28.0 if large else 16.5)
    if family == "flux":
        # FLUX.1 dev has no classifier-free guidance: the server ignores "scale"; the
        # guidance it is conditioned on is distilled_cfg_scale, diffusers' guidance_scale.
        return Spec("FLUX.1 dev", 28, 1024, "euler", dict(distilled_cfg_scale=3.5), 3.5, 34.0)
    return Spec("SD 1.5", 50, 512, "plms", dict(scale=SCALE), SCALE)


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
    parser.add_argument("--family", choices=FAMILIES + ("all",), default="all",
                        help="sd15, sdxl, sd3 (SD3.5), flux (FLUX.1 dev), or all of them one after "
                             "the other (default all)")
    parser.add_argument("--steps", type=int, default=None,
                        help="default 50 (SD 1.5), 30 (SDXL), 28 (SD3, FLUX)")
    parser.add_argument("--size", type=int, default=None,
                        help="default 512 (SD 1.5), 1024 (SDXL, SD3, FLUX); a multiple of 16 for SD3 "
                             "and FLUX (the tiny SD3 takes at most 512)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per side (default 3)")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny float32 pipelines instead of the real-size half-precision ones "
                             "(float16 for SD 1.5 and SDXL, bfloat16 for SD3 and FLUX): a smoke test")
    parser.add_argument("--sd3-variant", choices=("large", "medium"), default="large",
                        help="SD 3.5's architecture for --family sd3 (default large)")
    parser.add_argument("--depth", type=int, default=None,
                        help="cap every layer stack of the real-size SD3 and FLUX builders at N layers "
                             "(real widths; a quick check, not the real model's timings)")
    parser.add_argument("--tmp-dir", default=None,
                        help="where the models' temporary folders go (default: TMPDIR or the system's); "
                             "SD3.5 Large needs ~28 GB free, FLUX.1 dev ~34 GB")
    args = parser.parse_args()
    families = FAMILIES if args.family == "all" else (args.family,)
    require_device(args.device)  # once, not once per family
    failed = []
    for family in families:
        if len(families) == 1:
            check(family, args)
            continue
        try:
            check(family, args)
        except (Exception, SystemExit) as e:  # noqa: BLE001 - report it, and go on to the next family
            traceback.print_exc()
            print(f"FAILED ({family}): {type(e).__name__}: {e}", flush=True)
            failed.append(family)
        free_gpu_memory(args.device)
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
        raise SystemExit(1)


def require_device(device):
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {device} was asked for, but torch {torch.__version__} sees no CUDA device "
                         f"here (a CPU-only torch build, or no GPU/driver). For a smoke test on a CPU: "
                         f"{sys.argv[0]} --tiny --device cpu --steps 2 --size 64")


def free_gpu_memory(device):
    import torch

    gc.collect()
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()


def not_black(png):
    """The share of pixels of ``png`` that are not pure black."""
    import io

    from PIL import Image

    return not_black_image(Image.open(io.BytesIO(png)))


def not_black_image(image):
    """The share of pixels of a PIL image that are not pure black."""
    import numpy as np

    pixels = np.asarray(image.convert("RGB"))
    return float((pixels.max(axis=2) > 0).mean())


def folder_bytes(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


@contextlib.contextmanager
def default_dtype(dtype):
    """torch's default dtype set to ``dtype`` inside: modules are created in it."""
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


class DeviceMemory:
    """The device's used memory sampled every 0.2 s in a thread, from ``nvidia-smi``
    (``-lms 200``) or, where there is none, ``torch.cuda.mem_get_info``: whole-device
    figures, so they count every process on the GPU. ``peak_above_base()`` is the peak
    above the first sample, in bytes (None when nothing was read); ``source`` says how."""

    def __init__(self, device):
        import torch

        self.samples = []
        self.error = None
        self._stop = threading.Event()
        self._proc = None
        index = torch.device(device).index
        index = torch.cuda.current_device() if index is None else index
        uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
        smi = shutil.which("nvidia-smi")
        if smi:
            # The UUID names the same GPU whatever CUDA_VISIBLE_DEVICES and the ordering.
            target = f"GPU-{uuid}" if uuid else str(index)
            self.source = f"nvidia-smi -i {target}"
            query = [smi, "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", target]
            try:
                first = subprocess.run(query, capture_output=True, text=True, timeout=30)
                if first.returncode != 0 and uuid:
                    target = str(index)  # an older nvidia-smi, or a MIG device
                    query[-1] = target
                    self.source = f"nvidia-smi -i {target}"
                    first = subprocess.run(query, capture_output=True, text=True, timeout=30)
                self._add_line(first.stdout)
                self._proc = subprocess.Popen(query + ["-lms", "200"], stdout=subprocess.PIPE,
                                              stderr=subprocess.DEVNULL, text=True)
                self._thread = threading.Thread(target=self._read_smi, daemon=True)
            except (OSError, subprocess.SubprocessError) as e:
                self.error = f"{type(e).__name__}: {e}"
                self._thread = None
        else:
            self.source = "torch.cuda.mem_get_info (no nvidia-smi)"
            self._device = torch.device("cuda", index)
            self._poll_torch()
            self._thread = threading.Thread(target=self._read_torch, daemon=True)
        if self._thread is not None:
            self._thread.start()

    def _add_line(self, text):
        for line in text.splitlines():
            try:
                self.samples.append(int(line.strip()) * (1 << 20))  # MiB
            except ValueError:
                self.error = f"nvidia-smi said {line.strip()!r}"

    def _read_smi(self):
        for line in self._proc.stdout:
            self._add_line(line)

    def _poll_torch(self):
        import torch

        free, total = torch.cuda.mem_get_info(self._device)
        self.samples.append(total - free)

    def _read_torch(self):
        while not self._stop.wait(0.2):
            self._poll_torch()

    def stop(self):
        self._stop.set()
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def peak_above_base(self):
        return max(self.samples) - self.samples[0] if self.samples else None

    def describe(self):
        peak = self.peak_above_base()
        if peak is None:
            return f"not read ({self.error or 'no samples'}; {self.source})"
        return (f"{peak / GIB:.1f} GiB above the {self.samples[0] / GIB:.1f} GiB in use before "
                f"(peak {max(self.samples) / GIB:.1f} GiB, {len(self.samples)} samples, {self.source})")


def memory_monitor(device):
    """A :class:`DeviceMemory` on a CUDA device, or None (a CPU, or a failure, printed)."""
    if not device.startswith("cuda"):
        return None
    try:
        return DeviceMemory(device)
    except Exception as e:  # noqa: BLE001 - memory figures are a bonus, not a reason to stop
        print(f"  (no GPU memory sampling: {type(e).__name__}: {e})")
        return None


def stop_monitor(monitor):
    if monitor is None:
        return "not measured (not a CUDA device)"
    monitor.stop()
    return monitor.describe()


def log_lines(text, pattern):
    return [line.strip() for line in text.splitlines() if re.search(pattern, line)]


def check(family, args):
    xl = family == "sdxl"
    flow = family in FLOW
    spec = spec_of(family, args)
    steps = args.steps or spec.steps
    size = args.size or spec.size
    scheduler = spec.scheduler
    name = spec.name
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import diffusers
    import torch
    from diffusers import (
        FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline)
    from diffusers.utils import logging as diffusers_logging

    from runai.client import BlockingClient, ServerError
    from runai.test.tiny import build_sd15_pipeline, build_tiny_pipeline
    from runai.test.tiny_flow import (
        build_flux_pipeline, build_sd3_pipeline, build_tiny_flux_pipeline, build_tiny_sd3_pipeline)
    from runai.test.tiny_xl import build_sdxl_pipeline, build_tiny_sdxl_pipeline

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    device = args.device
    cuda = device.startswith("cuda")
    require_device(device)
    if args.tiny:
        dtype = torch.float32
    else:
        dtype = torch.bfloat16 if flow else torch.float16
    dtype_name = str(dtype).removeprefix("torch.")
    if cuda:
        gpu = f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    else:
        gpu = f"none, {device} ({os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads)"
    print(f"GPU: {gpu}")
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, xformers: {xformers_status()}")
    depth = f", every layer stack capped at {args.depth}" if flow and args.depth and not args.tiny else ""
    print(f"\n== {'tiny ' if args.tiny else ''}{name}-sized random-weight pipeline{depth}, {dtype_name}; "
          f"{size}x{size}, {steps} steps, {scheduler}, {args.runs} timed runs per side", flush=True)
    tmp = tempfile.mkdtemp(prefix="runai-gpu-check-", dir=args.tmp_dir)
    if flow and not args.tiny and not args.depth:
        free = shutil.disk_usage(tmp).free
        if free < (spec.disk_gb + 2) * 1e9:
            shutil.rmtree(tmp, ignore_errors=True)
            raise SystemExit(f"{name} in {dtype_name} needs ~{spec.disk_gb:.0f} GB on disk; "
                             f"{os.path.dirname(tmp)} has {free / 1e9:.1f} GB free: give --tmp-dir (or TMPDIR) "
                             f"with more room, or --depth N for a reduced model")
    server = None
    monitor = None
    server_memory = inproc_device_memory = "not measured"
    try:
        models = os.path.join(tmp, "models")
        model_path = os.path.join(models, "bench", family)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        started = time.perf_counter()
        if args.tiny:
            builders = dict(sd15=build_tiny_pipeline, sdxl=build_tiny_sdxl_pipeline, sd3=build_tiny_sd3_pipeline,
                            flux=build_tiny_flux_pipeline)
            builders[family](model_path)
        elif family == "sd3":
            # Modules are created in bfloat16 (not float32, then cast): half the memory.
            with default_dtype(dtype):
                build_sd3_pipeline(model_path, dtype=dtype, device=device, variant=args.sd3_variant,
                                   depth=args.depth)
        elif family == "flux":
            with default_dtype(dtype):
                build_flux_pipeline(model_path, dtype=dtype, device=device, kind="dev", depth=args.depth)
        else:
            (build_sdxl_pipeline if xl else build_sd15_pipeline)(model_path, dtype=dtype, device=device)
        gc.collect()
        if cuda:
            build_peak = f", peak GPU memory while building {torch.cuda.max_memory_allocated(device) / GIB:.1f} GiB"
            torch.cuda.empty_cache()
        else:
            build_peak = ""
        print(f"built and saved the pipeline in {time.perf_counter() - started:.1f} s", flush=True)
        print(f"  {folder_bytes(model_path) / 1e9:.2f} GB on disk in {tmp} "
              f"({shutil.disk_usage(tmp).free / 1e9:.1f} GB left free){build_peak}", flush=True)

        # 1. Through the server ---------------------------------------------------------
        started = time.perf_counter()
        monitor = memory_monitor(device)
        server = Server(models, tmp, "--device", device, "--dtype", dtype_name)
        options = dict(steps=steps, seed=SEED, width=size, height=size, n_samples=1,
                       n_iter=1, scheduler=scheduler, **spec.options)
        try:
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
                    server_runs.append((its, span, stamps["image"] - start, len(progress), lit))
                    print(f"  server run: {its:.2f} it/s ({len(progress) - 1} steps from 1st to last progress "
                          f"in {span:.3f} s), request {stamps['image'] - start:.3f} s; "
                          f"{lit:.1%} of the image not black", flush=True)
        except (ServerError, OSError):  # an error reply, or the server died (killed for memory?)
            print("server log (last 40 lines):\n" + "".join(server.log[-40:]), flush=True)
            raise
        server.stop()
        server_memory = stop_monitor(monitor)
        monitor = None
        attention = "xformers" if "using xformers" in server.log_text() else "SDPA (diffusers' default)"
        for line in server.log_text().splitlines():
            if "VAE" in line:
                print(f"  server log: {line.strip()}")
        for line in log_lines(server.log_text(), r"(?i)invalid value|\bnan\b|overflow")[:5]:
            print(f"  server log (invalid values?): {line}")
        server = None

        # 2. In-process, diffusers' defaults ----------------------------------------------
        free_gpu_memory(device)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        monitor = memory_monitor(device)
        started = time.perf_counter()
        pipeline_class = dict(sd15=StableDiffusionPipeline, sdxl=StableDiffusionXLPipeline,
                              sd3=StableDiffusion3Pipeline, flux=FluxPipeline)[family]
        pipe = pipeline_class.from_pretrained(model_path, local_files_only=True, dtype=dtype)
        pipe = pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        print(f"in-process load: {time.perf_counter() - started:.1f} s; scheduler "
              f"{type(pipe.scheduler).__name__}", flush=True)

        def call(stamps, finite=None):
            def on_step_end(pipeline, i, t, kwargs):
                stamps.append(time.perf_counter())
                if finite is not None and i == pipeline.num_timesteps - 1:
                    finite.append(bool(torch.isfinite(kwargs["latents"]).all()))  # syncs: warm-up only
                return kwargs

            return pipe(PROMPT, width=size, height=size, num_inference_steps=steps,
                        guidance_scale=spec.guidance_scale,
                        generator=torch.Generator("cpu").manual_seed(SEED), callback_on_step_end=on_step_end)

        finite = []
        warm = call([], finite)  # warm-up
        sync(device)
        latents_finite = ("finite" if all(finite) else "NaN or inf") if finite else "not checked"
        print(f"  in-process warm-up: latents after the last step {latents_finite}; "
              f"{not_black_image(warm.images[0]):.1%} of the image not black", flush=True)
        warm = None
        inproc_runs = []
        for _ in range(args.runs):
            stamps = []
            sync(device)
            start = time.perf_counter()
            result = call(stamps)
            sync(device)
            total = time.perf_counter() - start
            its, span = rate(stamps)
            lit = not_black_image(result.images[0])
            inproc_runs.append((its, span, total, len(stamps), lit))
            print(f"  in-process run: {its:.2f} it/s ({len(stamps) - 1} steps from 1st to last step end "
                  f"in {span:.3f} s), call {total:.3f} s; {lit:.1%} of the image not black", flush=True)
        if cuda:
            inproc_memory = (f"{torch.cuda.max_memory_allocated(device) / GIB:.1f} GiB allocated, "
                             f"{torch.cuda.max_memory_reserved(device) / GIB:.1f} GiB reserved (torch peaks)")
        else:
            inproc_memory = "not measured (not a CUDA device)"
        inproc_device_memory = stop_monitor(monitor)
        monitor = None
        result = pipe = None  # frees the GPU memory before the summary
    finally:
        if server is not None:
            server.stop()
        if monitor is not None:
            monitor.stop()
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
    print(f"not black (least of the runs): server {min(r[4] for r in server_runs):.1%}, "
          f"in-process {min(r[4] for r in inproc_runs):.1%}; in-process latents {latents_finite}")
    if cuda:
        print(f"peak GPU memory: server {server_memory}")
        print(f"                 in-process {inproc_memory}; device {inproc_device_memory}")
    else:
        print("peak GPU memory: not measured (not a CUDA device)")
    print(f"VERDICT ({name}): the server denoises at {ratio:.0%} of in-process diffusers' speed and takes "
          f"{(s_req - i_call) / i_call:+.1%} time per request on {gpu}")


if __name__ == "__main__":
    main()
