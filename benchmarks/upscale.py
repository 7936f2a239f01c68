"""Upscaling with an ESRGAN-sized model (RRDBNet, 64 filters, 23 blocks, x4, as
4x-UltraSharp and RealESRGAN_x4plus are; random weights) through runai's own path: the
.pth read by the restricted unpickler, spandrel, tiles of 192 px with 16 px of overlap.

Prints the load time, the time of one --size x --size picture made 4x larger (median of
--runs), the tile count, the peak device memory (CUDA) tiled and in one piece, and the
largest difference between the two. VERDICT: tiling keeps the peak memory under a
quarter of the one-piece run's at 512 px (CUDA), and the pictures agree (mean |diff|
under 1/255).

    .venv/bin/python benchmarks/upscale.py                          # CUDA: ~1 min on an H100
    .venv/bin/python benchmarks/upscale.py --device cpu --size 48   # smoke test, ~1 min on 2 cores
"""

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float16 (CUDA default) or float32 (CPU default)")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    from spandrel.architectures.ESRGAN import ESRGAN

    from runai.engine import upscale
    from runai.models import upscaler_load

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    folder = Path(tempfile.mkdtemp(prefix="runai-upscale-bench-"))
    torch.manual_seed(0)
    torch.save({"params_ema": ESRGAN(in_nc=3, out_nc=3, num_filters=64, num_blocks=23, scale=4).state_dict()},
               folder / "4x-Big.pth")
    started = time.perf_counter()
    upscaler = upscale.Upscaler("4x-Big", model_dir=folder, device=device, dtype=dtype)
    print(f"load: {time.perf_counter() - started:.2f}s ({upscaler.descriptor.architecture.id} "
          f"x{upscaler.descriptor.scale}, {upscaler.descriptor.dtype} on {device})")
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8))
    target = args.size * 4
    tiles = upscaler.tiles(args.size, args.size, target, target)

    def timed(tile):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        out = upscale.run_model(upscaler.descriptor, picture, tile=tile)
        if device.type == "cuda":
            torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
        return out, time.perf_counter() - start, peak

    timed(upscale.TILE)  # warm-up
    runs = [timed(upscale.TILE) for _ in range(args.runs)]
    tiled, _, tiled_peak = runs[-1]
    median = statistics.median(seconds for _, seconds, _ in runs)
    print(f"tiled ({upscale.TILE} px, {tiles} tiles): {args.size}px -> {target}px in {median:.2f}s "
          f"(median of {args.runs}), peak {tiled_peak:.0f} MiB")
    whole, seconds, whole_peak = timed(args.size)
    print(f"one piece: {seconds:.2f}s, peak {whole_peak:.0f} MiB")
    diff = np.abs(np.asarray(tiled, dtype=np.float32) - np.asarray(whole, dtype=np.float32))
    print(f"tiled vs one piece: mean |diff| {diff.mean():.3f}, max {diff.max():.0f} (of 255)")
    upscaler_load.forget()
    shutil.rmtree(folder, ignore_errors=True)
    agree = diff.mean() < 1.0
    bounded = device.type != "cuda" or args.size < 512 or tiled_peak < whole_peak / 4
    print(f"VERDICT: {'PASS' if agree and bounded else 'FAIL'} (pictures agree: {agree}; tiled peak bounded: "
          f"{bounded})")


if __name__ == "__main__":
    main()
