# -*- test-case-name: runai.test.test_cache,runai.test.test_cache_companions -*-
"""What a model weighs and when it changed on disk: the sizes the cache counts
(:func:`pipeline_bytes`, :func:`estimate_bytes` before a load) and the signature that
tells a stale cached copy (:func:`disk_signature`). Worker thread only (imports torch).
"""

import os
from pathlib import Path

import torch

from runai import families
from runai.models import checkpoint, sources
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
# Of a diffusers folder's sub-folders, how many the signature looks into (a model has ten at most).
MAX_COMPONENT_FOLDERS = 64


def disk_signature(path):
    """Changes when the model on disk is replaced, so a stale cached copy is reloaded: the
    ``os.stat`` (size, mtime, inode) of a file, or of a diffusers folder's model_index.json
    and of every file in its component folders (weights, configs, tokenizers). Opens no file."""
    probes = [path]
    if os.path.isdir(path):
        probes = [os.path.join(path, "model_index.json")]
        try:
            with os.scandir(path) as it:
                subs = sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))
        except OSError:
            subs = []
        for sub in sorted(set(subs[:MAX_COMPONENT_FOLDERS]) | set(WEIGHT_FOLDERS)):
            try:
                with os.scandir(os.path.join(path, sub)) as it:
                    probes += sorted(e.path for e in it if not e.name.startswith("."))[:sources.MAX_FOLDER_ENTRIES]
            except OSError:
                pass
    return tuple(sources.stat_of(probe) for probe in probes)


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
