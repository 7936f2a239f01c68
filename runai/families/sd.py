# -*- test-case-name: runai.test.test_families,runai.test.test_modes,runai.test.test_engine -*-
"""Stable Diffusion 1.x and 2.x: a UNet, one CLIP text encoder, a 4-channel VAE.

- Recognised (:mod:`runai.models.classify`): a folder of ``StableDiffusionPipeline``; a
  file with ``model.diffusion_model.*`` UNet keys and ``cond_stage_model.transformer.*``
  (1.x, OpenAI CLIP, 768-wide) or ``cond_stage_model.model.*`` (2.x, OpenCLIP, 1024-wide)
  text encoder keys; a 9-channel UNet is an inpainting model.
- Single files (:mod:`runai.models.singlefile`): the LDM key layout
  (:mod:`runai.models.ldm_layout`), configs from a base model in the model folder or the
  SD 1.5 / 2.1 configs runai ships.
- Prompts: A1111's syntax (weights, BREAK, embeddings), longer than 75 tokens in chunks
  of 75 (:mod:`runai.families.clip_text`).
- Defaults: 512 x 512, 20 steps, guidance 7.5, every scheduler runai names.
"""

from runai.families.base import Defaults, Family, LatentFormat, Modes
from runai.models.classify import V1, V2


class StableDiffusion(Family):
    versions = (V1, V2)
    label = "Stable Diffusion 1.x/2.x"
    latent = LatentFormat(channels=4, scaling_factor=0.18215, taesd="taesd", rgb_factors=(
        (0.3512, 0.2297, 0.3227), (0.3250, 0.4974, 0.2350), (-0.2829, 0.1762, 0.2721), (-0.2120, -0.2616, -0.7177)))
    weight_folders = ("unet", "vae", "text_encoder")
    pipeline_classes = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline",
                        "StableDiffusionInpaintPipeline")
    prompt_loggers = ("diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion",
                      "diffusers.pipelines.stable_diffusion")
    embedding_encoders = (("text_encoder", None),)

    def defaults(self, classification=None):
        return Defaults(size=512)

    def folder_pipeline(self, classification):
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline, dict(safety_checker=None, requires_safety_checker=False)

    def from_single_file(self, path, model_dir, entry, device, dtype, step, modules=None):
        # A whole checkpoint: companion files (``modules``) are not used.
        from runai.models.singlefile import sd_pipeline_from_file

        return sd_pipeline_from_file(path, model_dir, entry, device, dtype, step)

    def modes(self):
        from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline, StableDiffusionPipeline

        return Modes(StableDiffusionPipeline, StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline,
                     inpaint_model=StableDiffusionInpaintPipeline)

    def derive(self, pipe, cls):
        derived = cls(**pipe.components, requires_safety_checker=False)
        derived.set_progress_bar_config(disable=True)
        return derived

    def is_inpainting_model(self, pipe):
        # Inpainting UNets take the latents, the mask and the masked image: 4 + 1 + 4 channels.
        return pipe.unet.config.in_channels == 9

    def guidance(self, request):
        return dict(guidance_scale=request.scale, eta=request.ddim_eta)

    def text(self, pipe, request, device):
        """The text where it says nothing more and fits, which diffusers encodes; else
        embeddings encoded here, in chunks, with weights and textual inversions."""
        from runai.families import clip_text

        texts = [clip_text.parsed(request.prompt), clip_text.parsed(request.negative_prompt)]
        found = clip_text.vectors(pipe, request, self.embedding_encoders)
        if clip_text.is_plain(texts, found) and clip_text.fits(pipe, texts):
            return dict(prompt=texts[0].plain, negative_prompt=texts[1].plain)
        embeds, negative = clip_text.encode(pipe, *texts, device, found)
        return dict(prompt_embeds=embeds, negative_prompt_embeds=negative)


FAMILY = StableDiffusion()
