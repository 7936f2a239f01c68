# -*- test-case-name: runai.test.test_singlefile_xl -*-
"""An SDXL pipeline from one ``.safetensors`` or ``.ckpt`` file, offline.

Worker thread only (imports torch and diffusers).

As :mod:`runai.models.singlefile` does for SD 1.x/2.x: the file is read by
:mod:`runai.models.checkpoint` (a ``.ckpt`` through the restricted unpickler) and converted
with diffusers' own single-file conversion functions into models built from configs found
locally (:func:`find_xl_base_configs`): a diffusers copy of SDXL 1.0 base in the model folder
(its configs and both tokenizers), else the configs runai ships
(:func:`runai.models.sdconfigs.sdxl_base`) with the tokenizers of the two CLIP models in
the model folder. A 9-channel UNet makes an inpainting pipeline. The refiner is refused:
it is a second stage for the base model's latents, not a model to start from.
"""

from runai.models import offline  # before diffusers and transformers

import os
from dataclasses import dataclass
from pathlib import Path

from diffusers import StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline
from diffusers.loaders import single_file_utils
from transformers import CLIPTextModel, CLIPTextModelWithProjection
from twisted.logger import Logger

from runai.models import checkpoint
from runai.models import sdconfigs
from runai.models.assemble import (
    clip_tokenizer, first_tokenizer, majority_dtype, scheduler_from, text_encoder as build_text_encoder, unet_and_vae)
from runai.models.classify import REFINER, REFINER_REFUSAL
from runai.models.errors import CheckpointError, LoadError
from runai.models.paths import read_json
from runai.models.xl_layout import BIG_G, CLIP_L, REFINER_BIG_G

del offline  # imported for what importing it does

log = Logger()

XL_BASES = [sdconfigs.SDXL_BASE_NAME]
XL_INPAINT_BASES = ["diffusers/stable-diffusion-xl-1.0-inpainting-0.1"]
CLIP_L_FOLDER = "openai/clip-vit-large-patch14"
BIG_G_FOLDER = "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"
CONFIG_FILES = tuple(sdconfigs.SDXL_FILES.items())


def base_candidates(inpainting):
    return (XL_INPAINT_BASES if inpainting else []) + XL_BASES


@dataclass
class XLBaseConfigs:
    source: str  # for messages: which base model the architecture came from
    unet: dict
    vae: dict
    text_encoder: dict
    text_encoder_2: dict
    scheduler: dict
    tokenizer: Path
    tokenizer_2: Path
    tokenizer_source: str
    tokenizer_2_source: str
    base_model_index: dict  # the base folder's model_index.json; {} for the shipped configs


def _missing_message(lacking):
    base = XL_BASES[0]
    files = ", ".join(rel for _, rel in CONFIG_FILES)
    return (
        f"an SDXL single-file model needs two CLIP tokenizers, and the model folder has no {lacking}: put "
        f"vocab.json and merges.txt (or a tokenizer.json) in {CLIP_L_FOLDER}/ (from {CLIP_L_FOLDER}) and in "
        f"{BIG_G_FOLDER}/ (from {BIG_G_FOLDER}), or a diffusers copy of {base} (model_index.json, {files}, "
        f"tokenizer/, tokenizer_2/) in {base}/, inside the model folder"
    )


def find_xl_base_configs(model_dir, inpainting=False):
    """The architecture and both tokenizers for an SDXL single file, from local files.

    Raises LoadError naming the files to put where when a tokenizer is not to be found.
    """
    model_dir = Path(os.path.realpath(model_dir))
    folder = None
    for rel in base_candidates(inpainting):
        configs = {name: read_json(model_dir, model_dir / rel / f) for name, f in CONFIG_FILES}
        if all(c is not None for c in configs.values()):
            source, folder = f"the configs of {rel} in the model folder", model_dir / rel
            index = read_json(model_dir, folder / "model_index.json") or {}
            break
    else:
        configs = sdconfigs.sdxl_base()
        source, index = f"runai's built-in configs of {XL_BASES[0]}", {}
    bases = [model_dir / b for b in XL_BASES + XL_INPAINT_BASES]
    own = [folder] if folder is not None else []
    tokenizer, tokenizer_source = first_tokenizer(
        model_dir, [f / "tokenizer" for f in own] + [model_dir / CLIP_L_FOLDER] + [b / "tokenizer" for b in bases])
    tokenizer_2, tokenizer_2_source = first_tokenizer(
        model_dir, [f / "tokenizer_2" for f in own] + [model_dir / BIG_G_FOLDER] + [b / "tokenizer_2" for b in bases])
    lacking = [what for what, found in ((f"{CLIP_L_FOLDER} tokenizer", tokenizer),
                                        (f"{BIG_G_FOLDER} tokenizer", tokenizer_2)) if found is None]
    if lacking:
        raise LoadError(_missing_message(" and no ".join(lacking)))
    return XLBaseConfigs(source, *(dict(configs[name]) for name, _ in CONFIG_FILES), tokenizer, tokenizer_2,
                         tokenizer_source, tokenizer_2_source, index if isinstance(index, dict) else {})


def is_refiner_state(state):
    """The refiner's file: its one (bigG) text encoder is the conditioner's first embedder."""
    return not any(k.startswith(CLIP_L) for k in state) and any(k.startswith(REFINER_BIG_G) for k in state)


def pipeline_from_xl_file(path, model_dir, entry, device, dtype, step):
    """A StableDiffusionXL(Inpaint)Pipeline from an SDXL ``.safetensors``/``.ckpt``; raises
    LoadError. The arguments are :func:`runai.models.singlefile.pipeline_from_single_file`'s."""
    c = entry.classification
    if c.kind == REFINER:
        raise LoadError(REFINER_REFUSAL)
    base = find_xl_base_configs(model_dir, c.inpainting)
    step("read")
    try:
        state = checkpoint.load_state_dict(path)
    except CheckpointError as e:
        raise LoadError(e.message)
    if is_refiner_state(state):
        raise LoadError(REFINER_REFUSAL)
    if not any(k.startswith(CLIP_L) for k in state) or not any(k.startswith(BIG_G) for k in state):
        raise LoadError(f"the checkpoint lacks a text encoder (it needs {CLIP_L}* and {BIG_G}* weights)")
    if dtype is None:
        dtype = majority_dtype(state)

    unet_config = dict(base.unet)
    if c.in_channels and c.in_channels != unet_config.get("in_channels"):
        unet_config["in_channels"] = c.in_channels
    unet, vae = unet_and_vae(state, unet_config, base.vae, base.source, device, dtype, step)

    step("text_encoder")
    text_encoder = build_text_encoder(
        CLIPTextModel, base.text_encoder,
        lambda model: single_file_utils.convert_ldm_clip_checkpoint(state, remove_prefix=CLIP_L),
        "first text encoder", base.source, device, dtype)
    text_encoder_2 = build_text_encoder(
        CLIPTextModelWithProjection, base.text_encoder_2,
        lambda model: single_file_utils.convert_open_clip_checkpoint(model, state, prefix=BIG_G),
        "second text encoder", base.source, device, dtype)
    state = None  # the file's tensors: no longer needed

    step("tokenizer")
    tokenizer = clip_tokenizer(base.tokenizer, text_encoder.config.max_position_embeddings)
    tokenizer_2 = clip_tokenizer(base.tokenizer_2, text_encoder_2.config.max_position_embeddings)
    if not any(base.tokenizer_2_source.startswith(b + "/") for b in XL_BASES + XL_INPAINT_BASES):
        # SDXL's second tokenizer pads with "!", as OpenCLIP does, not with the end token
        # as the first does; one from elsewhere is made to pad as SDXL's.
        tokenizer_2.pad_token = "!"
    scheduler_config = dict(base.scheduler)
    if c.prediction_type is not None:
        scheduler_config["prediction_type"] = c.prediction_type
    scheduler = scheduler_from(scheduler_config)
    force_zeros = base.base_model_index.get("force_zeros_for_empty_prompt", True)
    components = dict(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                      tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
                      force_zeros_for_empty_prompt=force_zeros is not False)
    if unet.config.in_channels == 9:
        pipe = StableDiffusionXLInpaintPipeline(**components, requires_aesthetics_score=False)
    else:
        pipe = StableDiffusionXLPipeline(**components)
    log.info("{name}: sdxl model, built with {source}, tokenizers from {tokenizer} and {tokenizer_2}",
             name=entry.name, source=base.source, tokenizer=base.tokenizer_source,
             tokenizer_2=base.tokenizer_2_source)
    return pipe
