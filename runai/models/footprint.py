# -*- test-case-name: runai.test.test_cache -*-
"""What a model weighs and when it changed on disk: the sizes the cache counts
(:func:`pipeline_bytes`, :func:`estimate_bytes` before a load) and the signature that
tells a stale cached copy (:func:`disk_signature`). Worker thread only (imports torch).
"""

import os
from pathlib import Path

import torch

from runai import families
from runai.models import checkpoint
from runai.models.errors import CheckpointError


def pipeline_bytes(pipe):
    """Bytes of the weights a pipeline holds (shared tensors counted once)."""
    seen = set()
    total = 0
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            for tensor in list(component.parameters()) + list(component.buffers()):
                key = (tensor.device, tensor.data_ptr())
                if key not in seen:
                    seen.add(key)
                    total += tensor.numel() * tensor.element_size()
    return total


# The sub-folders of weights of every family's diffusers folders.
WEIGHT_FOLDERS = families.weight_folders()
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt")


def disk_signature(path):
    """Changes when the model on disk is replaced, so a stale cached copy is reloaded."""
    probes = [path]
    if os.path.isdir(path):
        probes = [os.path.join(path, "model_index.json")]
        for sub in WEIGHT_FOLDERS:
            try:
                probes += sorted(e.path for e in os.scandir(os.path.join(path, sub)))
            except OSError:
                pass
    signature = []
    for probe in probes:
        try:
            st = os.stat(probe)
            signature.append((probe, st.st_size, st.st_mtime_ns))
        except OSError:
            signature.append((probe, None))
    return tuple(signature)


def loaded_weight_files(folder):
    """The weight files ``from_pretrained`` loads from one component folder: the plain
    ``.safetensors`` (or its shards) where there are some, else the plain ``.bin``. Hub
    copies also hold ``*.fp16.safetensors`` variants and ``.bin`` twins, loaded only on
    request; counting them would count the model two or three times."""
    files = sorted(p for p in Path(folder).glob("*") if p.suffix in WEIGHT_SUFFIXES)
    # A variant is a second dot before the extension: diffusion_pytorch_model.fp16.safetensors.
    plain = [p for p in files if "." not in p.stem]
    for suffix in WEIGHT_SUFFIXES:
        chosen = [p for p in plain if p.suffix == suffix]
        if chosen:
            return chosen
    return files


def estimate_bytes(path, dtype):
    """What loading ``path`` will take, from file headers and sizes, before loading it:
    every component's weights (every text encoder) in ``dtype``."""
    files = [path]
    if os.path.isdir(path):
        files = [str(p) for sub in WEIGHT_FOLDERS for p in loaded_weight_files(Path(path, sub))]
    total = 0
    size = torch.tensor([], dtype=dtype).element_size()
    for name in files:
        try:
            if name.endswith(".safetensors"):
                tensors, _ = checkpoint.read_safetensors_header(name)
                for info in tensors.values():
                    numel = 1
                    for d in info.shape:
                        numel *= d
                    total += numel * size
            else:
                total += os.path.getsize(name)
        except (OSError, CheckpointError):
            pass
    return total
