# -*- test-case-name: runai.test.test_families,runai.test.test_engine_xl -*-
"""SDXL: a UNet with size conditioning, two CLIP text encoders, a 4-channel VAE.

- Recognised (:mod:`runai.models.classify`): a folder with ``text_encoder_2`` or a UNet
  whose added embedding is ``text_time``; a file with ``conditioner.embedders.*`` text
  encoder keys or a UNet with ``label_emb`` (size conditioning). The refiner (one bigG
  text encoder, an aesthetic score) is listed and refused: it cannot generate alone.
- Single files (:mod:`runai.models.singlefile_xl`): the SGM key layout
  (:mod:`runai.models.xl_layout`), configs and both tokenizers from SDXL 1.0 base in the
  model folder, or the configs runai ships with the two CLIP tokenizers.
- Prompts: A1111's syntax (weights, BREAK, embeddings: SDXL's ``clip_l``/``clip_g`` pairs),
  chunks of 75 tokens through both encoders, their penultimate hidden states
  joined along the width as diffusers joins them; the pooled embedding is the second
  encoder's projected output of the first chunk (what diffusers computes for a prompt that
  fits, which is that first chunk). An empty negative prompt is zeros where the model
  says so (``force_zeros_for_empty_prompt``), as diffusers does.
- Size conditioning as diffusers' default, said explicitly so every mode does the same:
  original and target size the requested size, crop corner (0, 0).
- Defaults: 1024 x 1024, 20 steps, guidance 7.5, every scheduler runai names. No invisible
  watermark. float16 decodes in float32 unless the VAE is the fp16-fixed one.
"""

from runai.families.base import Defaults, Family, LatentFormat, Modes
from runai.models.classify import SDXL as VERSION

PIPELINE_MODULE = "diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl"


class StableDiffusionXL(Family):
    versions = (VERSION,)
    label = "SDXL"
    latent = LatentFormat(channels=4, scaling_factor=0.13025, taesd="taesdxl", rgb_factors=(
        (0.3651, 0.4232, 0.4341), (-0.2533, -0.0042, 0.1068), (0.1076, 0.1111, -0.0362), (-0.3165, -0.2492, -0.2188)),
        rgb_bias=(0.1084, -0.0175, -0.0011))
    weight_folders = ("unet", "vae", "text_encoder", "text_encoder_2")
    pipeline_classes = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline",
                        "StableDiffusionXLInpaintPipeline")
    prompt_loggers = (PIPELINE_MODULE, PIPELINE_MODULE + "_img2img", PIPELINE_MODULE + "_inpaint")
    embedding_encoders = (("text_encoder", "clip_l"), ("text_encoder_2", "clip_g"))

    def defaults(self, classification=None):
        return Defaults(size=1024)

    def folder_pipeline(self, classification):
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline, dict(add_watermarker=False)

    def from_single_file(self, path, model_dir, entry, device, dtype, step, modules=None):
        # A whole checkpoint: companion files (``modules``) are not used.
        from runai.models.singlefile_xl import pipeline_from_xl_file

        return pipeline_from_xl_file(path, model_dir, entry, device, dtype, step)

    def after_load(self, pipe, name, dtype):
        import torch
        from twisted.logger import Logger

        from runai.models.cache import vae_decode_dtype

        # No invisible watermark, however the pipeline was built: the user's images are
        # theirs, and the same seed gives the same bytes with or without the package.
        pipe.watermark = None
        decode = vae_decode_dtype(pipe.vae, dtype)
        why = ("SDXL's original VAE overflows in float16" if decode != dtype
               else "the fp16-fixed VAE" if dtype == torch.float16 else "no upcast needed")
        Logger(namespace=__name__).info("{name}: the VAE decodes in {decode} ({why})", name=name,
                                        decode=str(decode).removeprefix("torch."), why=why)

    def modes(self):
        from diffusers import (
            StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline)

        return Modes(StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline,
                     inpaint_model=StableDiffusionXLInpaintPipeline)

    def derive(self, pipe, cls):
        derived = cls(**pipe.components, add_watermarker=False,
                      force_zeros_for_empty_prompt=pipe.config.force_zeros_for_empty_prompt)
        derived.set_progress_bar_config(disable=True)
        return derived

    def is_inpainting_model(self, pipe):
        return pipe.unet.config.in_channels == 9

    def conditioning(self, request):
        hw = (request.height, request.width)
        return dict(original_size=hw, target_size=hw, crops_coords_top_left=(0, 0))

    def guidance(self, request):
        return dict(guidance_scale=request.scale, eta=request.ddim_eta)

    def text(self, pipe, request, device):
        from runai.families import clip_text

        texts = [clip_text.parsed(request.prompt), clip_text.parsed(request.negative_prompt)]
        found = clip_text.vectors(pipe, request, self.embedding_encoders)
        if clip_text.is_plain(texts, found) and clip_text.fits(pipe, texts):
            # No negative prompt is None to diffusers, which then zeroes the negative
            # embeddings (force_zeros_for_empty_prompt), as encode() does.
            return dict(prompt=texts[0].plain, negative_prompt=texts[1].plain or None)
        return encode(pipe, *texts, device, found)


def encode(pipe, prompt, negative_prompt, device, found=None):
    """The four embeddings an SDXL pipeline takes, as its keyword arguments: the prompt's
    and the negative prompt's, of equal length, and their pooled embeddings; one row each.
    ``found``: the embeddings' vectors (:func:`runai.families.clip_text.vectors`)."""
    import torch

    from runai.families import clip_text

    texts = [clip_text.parsed(prompt), clip_text.parsed(negative_prompt)]
    pairs = [(pipe.tokenizer, pipe.text_encoder, "clip_l"), (pipe.tokenizer_2, pipe.text_encoder_2, "clip_g")]
    encoded = clip_text.encode_with(pairs, texts, found or {}, device, penultimate=True)
    dtype = pipe.unet.dtype
    # Joined along the width as diffusers joins them; the pooled embedding is the second
    # encoder's projected output (CLIPTextModelWithProjection), of the first chunk.
    (embeds, pooled), (negative, negative_pooled) = [
        (clip_text.joined(torch.cat(hidden, dim=-1), dtype), pools[-1].to(dtype)) for hidden, pools in encoded]
    if not texts[1].plain and pipe.config.force_zeros_for_empty_prompt:
        negative, negative_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
    return dict(prompt_embeds=embeds, negative_prompt_embeds=negative, pooled_prompt_embeds=pooled,
                negative_pooled_prompt_embeds=negative_pooled)


FAMILY = StableDiffusionXL()
