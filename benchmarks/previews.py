"""Live previews' cost: txt2img with a preview every step vs none, on the real engine.

Goal: previews every step cost under 5% of the generation time at 512x512 on an SD
1.5-sized UNet (random weights, CPU).

Builds Stable Diffusion 1.5's real architecture with random weights
(``runai.test.tiny.build_sd15_pipeline``, float32, about 4 GB in memory) in a temporary
model folder and loads it once in one ``runai.engine.engine.Engine`` on the CPU. Then
``--runs`` pairs of the same request (512x512, ``--steps`` steps, euler_a, seed 1), one
with ``preview_every=1`` and one without, interleaved (order alternating), each timed from
``generate`` to its image; the same seed gives the same image either way (checked). Also
times the preview itself (the family's latent-to-RGB map and the PNG of one pixel per
latent) over the latents of a 512x512 image, alone, to show where the cost is. On 2 cores
a step of SD 1.5 at 512x512 takes seconds: the whole run takes a few minutes.

``--decoder taesd`` puts a TAESD decoder of the real architecture (diffusers'
``AutoencoderTiny`` defaults, random weights, 4.9 MB) in the model folder as
``VAE-approx/taesd_decoder.safetensors``: the previews are then full-size TAESD pictures,
and the preview alone is TAESD's decode and the PNG of the whole picture.

    .venv/bin/python benchmarks/previews.py [--runs 2] [--steps 3] [--size 512] [--decoder cheap|taesd]
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2, help="pairs of runs (default 2)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--tiny", action="store_true", help="a tiny model instead (smoke test)")
    parser.add_argument("--decoder", choices=("cheap", "taesd"), default="cheap",
                        help="the previews: the linear map (default) or a TAESD decoder in the model folder")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from runai import families
    from runai.core.requests import GenerationRequest
    from runai.engine.engine import Engine, encode_png
    from runai.engine.previews import Previews
    from runai.models.library import ModelLibrary
    from runai.test.tiny import build_sd15_pipeline, build_tiny_pipeline

    tmp = tempfile.mkdtemp(prefix="runai-previews-")
    try:
        path = os.path.join(tmp, "v1", "bench")
        started = time.perf_counter()
        if args.tiny:
            build_tiny_pipeline(path)
        else:
            build_sd15_pipeline(path, dtype=torch.float32)
        print(f"built the {'tiny' if args.tiny else 'SD 1.5-sized'} pipeline in {time.perf_counter() - started:.1f} s",
              flush=True)
        if args.decoder == "taesd":
            write_taesd(os.path.join(tmp, "VAE-approx", "taesd_decoder.safetensors"))
        engine = Engine(device="cpu", dtype="float32", library=ModelLibrary(tmp))
        engine.load(path, "v1/bench")
        base = GenerationRequest(action="txt2img", model_path=path, model_name="v1/bench", prompt="a lighthouse",
                                 steps=args.steps, width=args.size, height=args.size, seed=1, scheduler="euler_a")

        def run(every):
            previews = []

            def on_progress(step, total, preview=None):
                if preview is not None:
                    previews.append(preview)
            images = []
            request = GenerationRequest(**dict(vars(base), preview_every=every))
            start = time.perf_counter()
            engine.generate(request, on_progress, images.append, lambda: False)
            return time.perf_counter() - start, images[0].png, len(previews)

        run(0)  # warm-up
        plain, previewed, pngs = [], [], set()
        for k in range(args.runs):
            for every in ((0, 1) if k % 2 == 0 else (1, 0)):
                seconds, png, count = run(every)
                (previewed if every else plain).append(seconds)
                pngs.add(png)
                print(f"  {'previews every step' if every else 'no previews        '}: {seconds:7.2f} s"
                      f"{f' ({count} previews)' if every else ''}", flush=True)
        assert len(pngs) == 1, "previews changed the image"

        family = families.for_version("v1")
        latents = torch.randn(1, 4, args.size // 8, args.size // 8)
        previews = Previews(tmp, "cpu", torch.float32, args.decoder)
        timings = []
        for _ in range(50 if args.decoder == "cheap" else 5):
            start = time.perf_counter()
            picture = previews.picture(family, latents, args.size, args.size)
            encode_png(picture)
            timings.append(time.perf_counter() - start)
        one = statistics.median(timings)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    p, q = statistics.median(plain), statistics.median(previewed)
    cost = (q - p) / p
    print()
    print(f"no previews: median {p:.2f} s; previews every step: median {q:.2f} s ({args.steps} steps, "
          f"{args.size}x{args.size}, {torch.get_num_threads()} torch threads)")
    how = f"map + PNG of {args.size // 8}x{args.size // 8}" if args.decoder == "cheap" else \
        f"TAESD + PNG of {picture.width}x{picture.height}"
    print(f"one preview alone ({how}): {one * 1000:.2f} ms, "
          f"{one * args.steps / p:.3%} of a generation")
    print(f"VERDICT: {args.decoder} previews every step cost {cost:+.2%} of the generation time (goal: under 5%)"
          f"{'' if cost < 0.05 else ' - NOT MET'}")


def write_taesd(path):
    """A TAESD decoder file of the real architecture with random weights, keyed as
    madebyollin's ``taesd_decoder.safetensors`` (diffusers' decoder layer k is its k + 1)."""
    import torch
    from diffusers import AutoencoderTiny
    from safetensors.torch import save_file

    torch.manual_seed(0)
    decoder = AutoencoderTiny().decoder.layers.state_dict()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file({f"{int(k.split('.')[0]) + 1}.{k.split('.', 1)[1]}": v.contiguous() for k, v in decoder.items()}, path)


if __name__ == "__main__":
    main()
