"""Switching back to a cached model vs loading it the first time.

Goal: switching back at least 20 times faster than the first load.

Builds, in a temporary model folder, a benchmark-sized random-weight model
(``runai.test.tiny.SMALL_SIZES``; ``--sd15`` for Stable Diffusion 1.5's real size, which
wants a GPU and 5 GB of disk) in three formats: a diffusers folder (``v1/a``), the same
weights as an LDM-layout ``.safetensors`` (``v1/b.safetensors``) and as a
pytorch_lightning-style ``.ckpt`` (``v1/c.ckpt``), plus the base model folder the single
files take their configs from. Then, in one ``Engine`` with ``--cache-size`` models (3 by
default): the first load of each (``engine.load``, timed to the loaded pipeline), then
``--runs`` rounds of switching a -> b -> c -> a, each switch timed. The first load is
a cold load (files in the page cache, as they are after a first read on a server).

    .venv/bin/python benchmarks/model_cache.py [--runs 5] [--device auto] [--sd15]
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.dont_write_bytecode = True  # write nothing into the checkout
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

NAMES = ("v1/a", "v1/b.safetensors", "v1/c.ckpt")


def build(models, sd15, device):
    import torch

    from runai.models import convert
    from runai.test.library_fixtures import write_lightning_ckpt
    from runai.test.tiny import SMALL_SIZES, build_sd15_pipeline, build_tiny_pipeline

    base = models / "runwayml" / "stable-diffusion-v1-5"
    if sd15:
        build_sd15_pipeline(base, dtype=torch.float16, device="cuda" if torch.cuda.is_available() else None)
    else:
        build_tiny_pipeline(base, **SMALL_SIZES, sample_size=32)
    shutil.copytree(base, models / "v1" / "a")
    convert.diffusers_to_single_file(base, models / "v1" / "b.safetensors")
    state, _ = convert.diffusers_to_ldm(base)
    write_lightning_ckpt(models / "v1" / "c.ckpt", state)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--cache-size", type=int, default=3)
    parser.add_argument("--sd15", action="store_true", help="SD 1.5-sized weights instead of a small model")
    args = parser.parse_args()

    from runai.engine.engine import Engine
    from runai.models.library import ModelLibrary

    models = Path(tempfile.mkdtemp(prefix="runai-cache-bench-"))
    try:
        started = time.perf_counter()
        build(models, args.sd15, args.device)
        print(f"built the models in {time.perf_counter() - started:.1f}s", flush=True)
        engine = Engine(device=args.device, dtype=args.dtype, library=ModelLibrary(models),
                        cache_models=args.cache_size)
        first = {}
        for name in NAMES:
            started = time.perf_counter()
            engine.load(str(models / name), name)
            first[name] = time.perf_counter() - started
        switches = {name: [] for name in NAMES}
        for _ in range(args.runs):
            for name in NAMES[1:] + NAMES[:1]:
                started = time.perf_counter()
                engine.load(str(models / name), name)
                switches[name].append(time.perf_counter() - started)
        assert engine.load_count == len(NAMES), "a switch reloaded from disk"
        print(f"\non {engine.device} ({engine.dtype}), cache of {args.cache_size} models, "
              f"{engine.loader.used_bytes / 2**20:.0f} MB cached")
        print(f"{'model':<18} {'first load':>11} {'switch back':>12} {'ratio':>10}")
        worst = None
        for name in NAMES:
            back = statistics.median(switches[name])
            ratio = first[name] / back
            worst = ratio if worst is None else min(worst, ratio)
            print(f"{name:<18} {first[name] * 1e3:>9.1f}ms {back * 1e6:>10.1f}us {ratio:>9.0f}x")
        print(f"\ngoal: switching back >= 20x faster than the first load: "
              f"{'met' if worst >= 20 else 'NOT met'} (worst {worst:.0f}x; median of {args.runs} switches)")
    finally:
        shutil.rmtree(models, ignore_errors=True)


if __name__ == "__main__":
    main()
