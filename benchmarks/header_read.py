"""Classifying a .safetensors file reads its header only: the time does not grow with size.

Writes .safetensors files with the key names of Stable Diffusion 1.5 (1,131 tensors, the
same header for every file up to the digits of its shapes and offsets) in a temporary
folder: one of about 1 MB, and sparse ones of 4 GB and 64 GB (sparse: they take a few
hundred KB on disk whatever their size). For each, the median of ``--runs`` calls of
``runai.models.checkpoint.read_safetensors_header`` and of ``runai.models.library.ModelLibrary.describe``
(the whole classification, as the ``models`` action does it, on a cold cache each time),
and the bytes read. ``--full`` adds, for contrast, the time to read the whole file
(sparse, so this is memory bandwidth, not disk).

    .venv/bin/python benchmarks/header_read.py [--runs 20] [--full]
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

from runai.models import checkpoint
from runai.models import library
from runai.test.library_fixtures import counting_reads, real_layout, write_header_only  # noqa: E402

SIZES = (("1 MB", 2**20), ("4 GB", 4 * 2**30), ("64 GB", 64 * 2**30))


def median_seconds(f, runs):
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        f()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def read_all(path):
    with open(path, "rb") as f:
        while f.read(64 * 2**20):
            pass


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--full", action="store_true", help="also time reading the whole file (up to 4 GB)")
    args = parser.parse_args()

    layout = real_layout("v1")
    tiny = {k: (1,) * len(shape) for k, shape in layout.items()}  # same names and ranks, 1 element each
    work = Path(tempfile.mkdtemp(prefix="runai-header-bench-"))
    try:
        print(f"{'file':>6} {'on disk':>10} {'header':>10} {'read header':>12} {'classify':>10} {'bytes read':>11}"
              + (f" {'read all':>10}" if args.full else ""))
        for label, size in SIZES:
            shapes = tiny if size < 2**30 else layout
            path = write_header_only(work / "v1" / f"model-{label.replace(' ', '')}.safetensors", shapes,
                                     dtype="F16", pad_to=size)
            with open(path, "rb") as f:
                header = int.from_bytes(f.read(8), "little")
            t_header = median_seconds(lambda: checkpoint.read_safetensors_header(path), args.runs)
            # A new library each time: no cached classification.
            t_classify = median_seconds(lambda: library.ModelLibrary(work).describe(path), args.runs)
            with counting_reads() as counter:
                entry = library.ModelLibrary(work).describe(path)
            assert entry.version == "v1", entry
            on_disk = os.stat(path).st_blocks * 512
            line = (f"{label:>6} {on_disk / 2**20:>8.2f}MB {header / 1024:>8.1f}KB {t_header * 1e3:>10.2f}ms "
                    f"{t_classify * 1e3:>8.2f}ms {counter.bytes:>11,}")
            if args.full:
                line += f" {median_seconds(lambda: read_all(path), 1):>9.2f}s" if size <= 4 * 2**30 else f" {'-':>10}"
            print(line, flush=True)
        print(f"\nsizes are apparent sizes; each time is the median of {args.runs} runs. "
              "'bytes read' is all the classification reads of the file.")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
