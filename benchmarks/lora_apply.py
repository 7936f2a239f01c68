"""Merging a rank-32 LoRA into an SD 1.5-sized UNet, and taking it out again.

Goal: applying under 1 s on a 2-core CPU in float32; removing costs next to nothing (the
original weights are put back, never recomputed).

Builds Stable Diffusion 1.5's UNet (860 M parameters, random weights, float32) in
memory, and a kohya-format LoRA of rank ``--rank`` (32) over every module a kohya LoRA
trains by default: the attention projections (q, k, v, out), the feed-forward and the
1x1 projections of each of the UNet's 16 transformers (192 modules). Then ``--runs``
rounds of ``lora_apply.apply`` with the LoRA (timed: "apply") and without it (timed:
"remove"), as the engine calls it between two jobs; the first apply, which also reads
the file, is reported apart. Checks that removing gives the original weights bit for bit.

    .venv/bin/python benchmarks/lora_apply.py [--runs 5] [--rank 32] [--threads N]
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

sys.dont_write_bytecode = True  # write nothing into the checkout
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
           "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")


def sd15_unet():
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    # Stable Diffusion 1.5's UNet, as runai.test.tiny.build_sd15_pipeline builds it.
    return UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
        attention_head_dim=8, norm_num_groups=32,
    ).eval()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch's intra-op threads (default: torch's)")
    args = parser.parse_args()

    import torch

    from runai import families
    from runai.models import lora_apply
    from runai.models.cache import Loaded, pipeline_bytes
    from runai.models.loras import LoraRef
    from runai.test import lora_fixtures

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    unet = sd15_unet()
    pipe = types.SimpleNamespace(unet=unet, components={"unet": unet})
    print(f"SD 1.5 UNet built in {time.perf_counter() - started:.1f} s: "
          f"{sum(p.numel() for p in unet.parameters()) / 1e6:.0f} M parameters, float32, "
          f"{torch.get_num_threads()} thread(s)")
    targets = [("lora_unet_", unet, n) for n in lora_fixtures.modules_of(unet, TARGETS)]
    state = lora_fixtures.kohya_state(targets, rank=args.rank, alpha=args.rank / 2, std=0.01)
    lora_bytes = sum(t.numel() * t.element_size() for t in state.values())
    touched_bytes = sum(unet.get_submodule(n).weight.numel() * 4 for _, _, n in targets)
    with tempfile.TemporaryDirectory(prefix="runai-bench-lora-") as folder:
        path = lora_fixtures.save(Path(folder) / "bench.safetensors", state)
        del state
        entry = Loaded(path="sd15", name="sd15", pipe=pipe, scheduler_config={}, nbytes=pipeline_bytes(pipe),
                       signature=(), seconds=0.0)
        loader = types.SimpleNamespace(current=entry, loras=None, max_bytes=None)
        family = families.for_version("v1")
        original = {k: v.clone() for k, v in unet.state_dict().items()}
        ref = (LoraRef("bench", str(path), 1.0, 0.8),)

        t = time.perf_counter()
        lora_apply.apply(loader, family, ref)
        first = time.perf_counter() - t
        t = time.perf_counter()
        lora_apply.apply(loader, family, ())
        first_remove = time.perf_counter() - t
        applies, removes = [], []
        for _ in range(args.runs):
            t = time.perf_counter()
            lora_apply.apply(loader, family, ref)
            applies.append(time.perf_counter() - t)
            t = time.perf_counter()
            lora_apply.apply(loader, family, ())
            removes.append(time.perf_counter() - t)
        t = time.perf_counter()
        lora_apply.apply(loader, family, ref)
        lora_apply.apply(loader, family, ref)
        same = time.perf_counter() - t
        lora_apply.apply(loader, family, ())
        exact = all(torch.equal(v, unet.state_dict()[k]) for k, v in original.items())

    print(f"LoRA: rank {args.rank}, {len(targets)} modules touched ({touched_bytes / 2**20:.0f} MiB of weights), "
          f"{lora_bytes / 2**20:.1f} MiB of LoRA tensors")
    print(f"first apply (reads the file): {first * 1000:8.1f} ms; first remove {first_remove * 1000:.2f} ms")
    print(f"apply  (median of {args.runs}): {statistics.median(applies) * 1000:8.1f} ms "
          f"(min {min(applies) * 1000:.1f}, max {max(applies) * 1000:.1f})")
    print(f"remove (median of {args.runs}): {statistics.median(removes) * 1000:8.3f} ms "
          f"(min {min(removes) * 1000:.3f}, max {max(removes) * 1000:.3f})")
    print(f"apply + the same set again: {same * 1000:.1f} ms (the second costs nothing)")
    print(f"weights after removing: {'the originals, bit for bit' if exact else 'DIFFERENT (a bug)'}")
    goal = statistics.median(applies) < 1.0
    print(f"goal (apply under 1 s): {'met' if goal else 'NOT met'}")
    return 0 if goal and exact else 1


if __name__ == "__main__":
    sys.exit(main())
