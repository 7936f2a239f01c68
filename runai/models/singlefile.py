# -*- test-case-name: runai.test.test_singlefile -*-
"""A Stable Diffusion pipeline from one ``.safetensors`` or ``.ckpt`` file, offline.

Worker thread only (imports torch and diffusers).

The file is read by :mod:`runai.models.checkpoint` (a ``.ckpt`` through the restricted
unpickler) and converted with diffusers' own single-file conversion functions. The
architecture, scheduler and tokenizer come from a diffusers copy of the base model in the
model folder, or from the configs runai ships (:mod:`runai.models.sdconfigs`) with a
tokenizer from the model folder: never from the Hub (:func:`find_base_configs`).
diffusers' ``from_single_file`` is not called with a path at all, so it can never take a
name for a Hub repository, nor unpickle a ``.ckpt`` its own way.

:func:`pipeline_from_single_file` hands a file to its family (:mod:`runai.families`); SD
1.x/2.x are built here, SDXL in :mod:`runai.models.singlefile_xl`, the same way.
"""

from runai.models import offline  # before diffusers and transformers

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from diffusers.loaders import single_file_utils
from transformers import CLIPTextModel
from twisted.logger import Logger

from runai import families
from runai.models import checkpoint
from runai.models import sdconfigs
from runai.models import singlefile_xl
from runai.models.assemble import (
    clip_tokenizer, first_tokenizer, majority_dtype, scheduler_from, text_encoder as build_text_encoder, unet_and_vae)
from runai.models.classify import SDXL, V1, V2
from runai.models.errors import CheckpointError, LoadError
from runai.models.paths import read_json

del offline  # imported for what importing it does

log = Logger()

V1_BASES = ["runwayml/stable-diffusion-v1-5", "stable-diffusion-v1-5/stable-diffusion-v1-5",
            "CompVis/stable-diffusion-v1-4"]
V1_INPAINT_BASES = ["runwayml/stable-diffusion-inpainting", "stable-diffusion-v1-5/stable-diffusion-inpainting"]
V2_EPS_BASES = ["stabilityai/stable-diffusion-2-1-base", "stabilityai/stable-diffusion-2-base"]
V2_V_BASES = ["stabilityai/stable-diffusion-2-1", "stabilityai/stable-diffusion-2"]
V2_INPAINT_BASES = ["stabilityai/stable-diffusion-2-inpainting"]
# CLIP's BPE vocabulary is the same for SD 1.x and 2.x: any of these tokenizers will do.
TOKENIZER_FOLDERS = ["openai/clip-vit-large-patch14", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"]
CONFIG_FILES = ("unet/config.json", "vae/config.json", "text_encoder/config.json", "scheduler/scheduler_config.json")
# What runai builds from one file (which of them it serves is the library's word).
LOADABLE_VERSIONS = (V1, V2, SDXL)


def base_candidates(version, inpainting, v_prediction):
    if version == SDXL:
        return singlefile_xl.base_candidates(inpainting)
    if version == V1:
        return (V1_INPAINT_BASES if inpainting else []) + V1_BASES
    first, then = (V2_V_BASES, V2_EPS_BASES) if v_prediction else (V2_EPS_BASES, V2_V_BASES)
    return (V2_INPAINT_BASES if inpainting else []) + first + then


@dataclass
class BaseConfigs:
    source: str  # for messages: which base model the architecture came from
    unet: dict
    vae: dict
    text_encoder: dict
    scheduler: dict
    tokenizer: Path
    tokenizer_source: str


def find_base_configs(model_dir, version, inpainting=False, prediction_type=None):
    """The architecture and tokenizer for a single file of ``version``, from local files.

    Raises LoadError naming the files to put where when no tokenizer is to be found. For
    SDXL, :func:`runai.models.singlefile_xl.find_xl_base_configs`'s answer.
    """
    if version == SDXL:
        return singlefile_xl.find_xl_base_configs(model_dir, inpainting)
    model_dir = Path(os.path.realpath(model_dir))
    v_prediction = prediction_type == "v_prediction"
    chosen = None
    for rel in base_candidates(version, inpainting, v_prediction):
        configs = [read_json(model_dir, model_dir / rel / f) for f in CONFIG_FILES]
        if all(c is not None for c in configs):
            chosen = (f"the configs of {rel} in the model folder", *configs, model_dir / rel)
            break
    if chosen is None:
        rel, shipped = sdconfigs.SHIPPED[(version, v_prediction)]
        chosen = (f"runai's built-in configs of {rel}", shipped["unet"], shipped["vae"],
                  shipped["text_encoder"], shipped["scheduler"], None)
    source, unet, vae, text_encoder, scheduler, folder = chosen
    searched = ([folder / "tokenizer"] if folder is not None else []) + [model_dir / t for t in TOKENIZER_FOLDERS]
    searched += [model_dir / b / "tokenizer" for b in V1_BASES + V2_EPS_BASES + V2_V_BASES]
    tokenizer, tokenizer_source = first_tokenizer(model_dir, searched)
    if tokenizer is None:
        base = base_candidates(version, inpainting, v_prediction)[0]
        raise LoadError(
            f"a {version} single-file model needs a CLIP tokenizer, and the model folder has none: put "
            f"vocab.json and merges.txt (or a tokenizer.json) in {TOKENIZER_FOLDERS[0]}/ "
            "(from openai/clip-vit-large-patch14), "
            f"or a diffusers copy of {base} (model_index.json, unet/config.json, vae/config.json, "
            "text_encoder/config.json, scheduler/scheduler_config.json, tokenizer/) in "
            f"{base}/, inside the model folder"
        )
    return BaseConfigs(source, dict(unet), dict(vae), dict(text_encoder), dict(scheduler), tokenizer, tokenizer_source)


def looks_v_prediction(unet):
    """AUTOMATIC1111's test for SD 2.x v-models: on a flat latent at the last timestep an
    epsilon model predicts noise near the input, a v-model something far below it."""
    param = next(unet.parameters())
    with torch.inference_mode():
        x = torch.full((1, unet.config.in_channels, 8, 8), 0.5, device=param.device, dtype=param.dtype)
        cond = torch.full((1, 2, unet.config.cross_attention_dim), 0.5, device=param.device, dtype=param.dtype)
        t = torch.tensor([999], device=param.device)
        out = unet(x, t, encoder_hidden_states=cond).sample
        return (out.float() - x.float()).mean().item() < -1


def pipeline_from_single_file(path, model_dir, entry, device="cpu", dtype=None, on_step=None, modules=()):
    """The pipeline of a ``.safetensors``/``.ckpt`` file, built by its family; raises LoadError.

    ``entry`` is the file's :class:`runai.models.library.ModelEntry`; ``dtype`` None keeps the
    checkpoint's own precision (for conversion). ``on_step(what)`` follows each stage.
    ``modules``: companion files the client chose, for families that take them.
    """
    step = on_step or (lambda what: None)
    c = entry.classification
    if entry.error:
        raise LoadError(entry.error)
    family = families.for_version(c.version)
    if c.kind not in ("pipeline", "refiner") or (c.kind == "refiner" and family is None):
        raise LoadError(f"it is not a Stable Diffusion model (it looks like a {c.kind} file)")
    if family is None:
        raise LoadError(f"it is a {c.version} model; runai serves "
                        + ", ".join(f.label for f in families.FAMILIES))
    return family.from_single_file(path, model_dir, entry, device, dtype, step, modules=tuple(modules) or None)


def sd_pipeline_from_file(path, model_dir, entry, device, dtype, step):
    """A StableDiffusionPipeline from an SD 1.x/2.x file; the arguments are
    :func:`pipeline_from_single_file`'s (the SD family's ``from_single_file``)."""
    c = entry.classification
    if c.kind != "pipeline":
        raise LoadError(f"it is not a Stable Diffusion model (it looks like a {c.kind} file)")
    if c.version not in LOADABLE_VERSIONS:
        raise LoadError(f"it is a {c.version} model; runai serves Stable Diffusion 1.x, 2.x and XL")
    base = find_base_configs(model_dir, c.version, c.inpainting, c.prediction_type)
    step("read")
    try:
        state = checkpoint.load_state_dict(path)
    except CheckpointError as e:
        raise LoadError(e.message)
    if dtype is None:
        dtype = majority_dtype(state)

    unet_config = dict(base.unet)
    if c.in_channels and c.in_channels != unet_config.get("in_channels"):
        unet_config["in_channels"] = c.in_channels
    if c.version == V2 and c.prediction_type != "epsilon":
        # SD 2.1's v-model needs attention in float32 to avoid NaNs in float16.
        unet_config["upcast_attention"] = True
    unet, vae = unet_and_vae(state, unet_config, base.vae, base.source, device, dtype, step)

    step("text_encoder")
    if single_file_utils.is_open_clip_model(state):
        def convert(model):
            return single_file_utils.convert_open_clip_checkpoint(model, state, prefix="cond_stage_model.model.")
    elif single_file_utils.is_clip_model(state):
        def convert(model):
            return single_file_utils.convert_ldm_clip_checkpoint(state)
    else:
        raise LoadError("the checkpoint has no text encoder (no cond_stage_model weights)")
    text_encoder = build_text_encoder(CLIPTextModel, base.text_encoder, convert, "text encoder", base.source,
                                      device, dtype)
    del convert
    state = None  # the file's tensors: no longer needed

    step("tokenizer")
    tokenizer = clip_tokenizer(base.tokenizer, text_encoder.config.max_position_embeddings)
    v2_bases = V2_EPS_BASES + V2_V_BASES + V2_INPAINT_BASES
    if c.version == V2 and not any(base.tokenizer_source.startswith(b + "/") for b in v2_bases):
        # SD 2's own tokenizer pads with "!", not with the end token as CLIP's does; a
        # tokenizer borrowed from elsewhere is made to pad as SD 2's.
        tokenizer.pad_token = "!"
    scheduler_config = dict(base.scheduler)
    prediction = c.prediction_type
    if prediction is None and c.version == V2 and unet.config.cross_attention_dim == 1024 \
            and unet.config.in_channels == 4:
        prediction = "v_prediction" if looks_v_prediction(unet) else "epsilon"
        log.info("{name}: no config says how it predicts; its UNet looks like {p}", name=entry.name, p=prediction)
    if prediction is not None:
        scheduler_config["prediction_type"] = prediction
    scheduler = scheduler_from(scheduler_config)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    log.info("{name}: {version} model, built with {source}, tokenizer from {tokenizer}",
             name=entry.name, version=c.version, source=base.source, tokenizer=base.tokenizer_source)
    return pipe
