# -*- test-case-name: runai.test.test_convert_xl -*-
"""The original key layout of an SDXL model (Stability AI's ``sgm`` code), from diffusers' own.

An SDXL single file keeps the UNet and VAE as SD 1.x/2.x files do
(``model.diffusion_model.*`` with ``label_emb.0.0``/``label_emb.0.2`` for the size
conditioning, ``first_stage_model.*``: :mod:`runai.models.ldm_layout`), and its text
encoders as the ``conditioner``'s embedders:

* the base model's first, OpenAI CLIP ViT-L, under ``conditioner.embedders.0.transformer.``
  with transformers' names;
* its second, OpenCLIP ViT-bigG, under ``conditioner.embedders.1.model.`` with OpenCLIP's
  names (q/k/v fused into ``in_proj``, ``ln_final``, ``positional_embedding``) and the
  projection as OpenCLIP keeps it, transposed (``text_projection``);
* the refiner has only the second, as ``conditioner.embedders.0.model.``.

This is the layout AUTOMATIC1111 and diffusers' ``from_single_file`` load; the tests check
it against the latter, weight for weight.
"""

from runai.models.errors import ConvertError
from runai.models.ldm_layout import clip_to_ldm, open_clip_to_ldm, unet_to_ldm, vae_to_ldm

CLIP_L = "conditioner.embedders.0.transformer."
BIG_G = "conditioner.embedders.1.model."
REFINER_BIG_G = "conditioner.embedders.0.model."
PROJECTION = "text_projection.weight"


def clip_l_to_sgm(state):
    """The first text encoder (a CLIPTextModel's state dict)."""
    return {CLIP_L + k.removeprefix("cond_stage_model.transformer."): v for k, v in clip_to_ldm(state).items()}


def big_g_to_sgm(state, prefix=BIG_G):
    """The second text encoder (a CLIPTextModelWithProjection's state dict)."""
    state = dict(state)
    projection = state.pop(PROJECTION, None)
    if projection is None:
        raise ConvertError("the second text encoder has no text_projection: it is not SDXL's")
    out = open_clip_to_ldm(state, prefix=prefix)
    # OpenCLIP multiplies by its projection from the right: x @ text_projection.
    out[prefix + "text_projection"] = projection.t()
    return out


def to_sgm(unet, unet_config, vae, vae_config, text_encoder, text_encoder_2):
    """The whole SDXL state dict from the components' state dicts; ``text_encoder`` None
    for a refiner (the second encoder then is the conditioner's first embedder)."""
    if unet_config.get("addition_embed_type") != "text_time":
        raise ConvertError("the UNet has no size conditioning (addition_embed_type text_time): it is not SDXL's")
    state = {}
    state.update(unet_to_ldm(unet, unet_config, sdxl=True))
    state.update(vae_to_ldm(vae, vae_config))
    if text_encoder is None:
        state.update(big_g_to_sgm(text_encoder_2, REFINER_BIG_G))
    else:
        state.update(clip_l_to_sgm(text_encoder))
        state.update(big_g_to_sgm(text_encoder_2))
    return state


def architecture(inpainting, refiner):
    """The ``modelspec.architecture`` of an SDXL file (Stability AI's model spec)."""
    if refiner:
        return "stable-diffusion-xl-v1-refiner"
    return "stable-diffusion-xl-v1-base" + ("/inpainting" if inpainting else "")
