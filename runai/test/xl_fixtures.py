"""Tiny SDXL models as single files, for the tests of single-file SDXL loading and of
``convert`` both ways (test_singlefile_xl, test_convert_xl). Built once per test process,
in a temporary folder, never in the repository.

The single files are runai's own export (diffusers -> the original sgm layout), which
test_convert_xl checks against diffusers' own single-file loader, weight for weight.
"""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import torch

from runai.models import convert
from runai.models.sdconfigs import SDXL_BASE_NAME
from runai.test.tiny_xl import build_tiny_sdxl_pipeline

SEEDS = {"base": 5, "inpaint": 6, "refiner": 7}
CLIP_L_FOLDER = "openai/clip-vit-large-patch14"
BIG_G_FOLDER = "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"

_state = {}


def _root():
    if "root" not in _state:
        root = Path(os.path.realpath(tempfile.mkdtemp(prefix="runai-xl-files-")))
        # trial has no tearDownModule: remove it when the test run ends.
        atexit.register(shutil.rmtree, str(root), True)
        _state["root"] = root
    return _state["root"]


def xl_source(kind="base"):
    """A tiny SDXL diffusers folder outside any model folder: base, inpaint, refiner (all
    of the same sizes, so that the base's configs fit the inpainting model's weights)."""
    if kind not in _state:
        _state[kind] = build_tiny_sdxl_pipeline(_root() / "sources" / kind, seed=SEEDS[kind], kind=kind)
    return _state[kind]


def xl_state(kind="base"):
    """The tiny model's weights in the original sgm layout, as tensors."""
    if ("sgm", kind) not in _state:
        _state[("sgm", kind)] = convert.diffusers_to_ldm(xl_source(kind))[0]
    return _state[("sgm", kind)]


def xl_reference(kind="base"):
    """The tiny model ``kind`` as diffusers itself loads it from its folder."""
    from diffusers import (StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline,
                           StableDiffusionXLPipeline)

    cls = {"base": StableDiffusionXLPipeline, "inpaint": StableDiffusionXLInpaintPipeline,
           "refiner": StableDiffusionXLImg2ImgPipeline}[kind]
    return cls.from_pretrained(str(xl_source(kind)), local_files_only=True, low_cpu_mem_usage=False)


def write_ckpt(path, state):
    """An SDXL ``.ckpt`` as torch writes one: the weights under "state_dict"."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state, "global_step": 0}, str(path))
    return path


def xl_model_folder():
    """The shared SDXL model folder (a realpath). Do not write into it; copy what you change.

    ==========================================  ===================================================
    stabilityai/stable-diffusion-xl-base-1.0/   tiny SDXL base, diffusers: the configs and both
                                                tokenizers of the single files
    sdxl/base.safetensors, sdxl/base.ckpt       the tiny base's export, and as a .ckpt
    sdxl/inpaint.safetensors                    tiny SDXL inpainting (9 channels)
    sdxl/refiner.safetensors                    tiny refiner: listed, never loaded
    ==========================================  ===================================================
    """
    if "models" in _state:
        return _state["models"]
    models = _root() / "models"
    shutil.copytree(xl_source("base"), models / SDXL_BASE_NAME)
    (models / "sdxl").mkdir(parents=True)
    for kind in ("base", "inpaint", "refiner"):
        convert.diffusers_to_single_file(xl_source(kind), models / "sdxl" / f"{kind}.safetensors")
    write_ckpt(models / "sdxl" / "base.ckpt", xl_state("base"))
    _state["models"] = models
    return models


def base_configs_only(models, tokenizers=True):
    """Make ``models`` (a new folder) hold the SDXL base's configs without its tokenizers
    and, if ``tokenizers``, both tokenizers in the CLIP models' own folders; returns it."""
    base = models / SDXL_BASE_NAME
    shutil.copytree(xl_source("base"), base, ignore=shutil.ignore_patterns("*.safetensors"))
    for name, folder in (("tokenizer", CLIP_L_FOLDER), ("tokenizer_2", BIG_G_FOLDER)):
        if tokenizers:
            shutil.copytree(base / name, models / folder)
        shutil.rmtree(base / name)
    return models
