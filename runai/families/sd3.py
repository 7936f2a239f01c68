# -*- test-case-name: runai.test.test_families,runai.test.test_flow_families -*-
"""Stable Diffusion 3 and 3.5 (Large, Medium, Large Turbo): an MMDiT transformer, two CLIP
text encoders with projection and T5-XXL, a 16-channel VAE, flow matching.

- Recognised (:mod:`runai.models.classify`): a folder of ``StableDiffusion3Pipeline``
  (``transformer/`` of ``SD3Transformer2DModel``); a file with
  ``model.diffusion_model.joint_blocks.*`` keys (the text encoders, when inside, under
  ``text_encoders.clip_l.*``, ``text_encoders.clip_g.*``, ``text_encoders.t5xxl.*``).
- Prompts: the text, which diffusers encodes: CLIP sees its first 77 tokens, T5 up to
  256.
- Defaults: 1024 x 1024, 28 steps, guidance 7.0 (diffusers' own), flow Euler with the
  model's shift; the samplers of :mod:`runai.families.flow`.
- Latents: 16 channels, ``z = (x - 0.0609) * 1.5305`` for SD3.5's VAE (the folder's
  ``vae/config.json`` says its own).
- Single files (:mod:`runai.models.singlefile_flow`): with the text encoders inside, or with
  ``clip_l``, ``clip_g`` and ``t5xxl`` files beside them or in the model folder's
  ``text_encoder/`` (:mod:`runai.models.companions`); without any T5, on CLIP alone.
"""

from runai.families.base import Defaults, LatentFormat, Modes
from runai.families.flow import EULER, FlowFamily

VERSION = "sd3"
PIPELINE_MODULE = "diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3"


class StableDiffusion3(FlowFamily):
    versions = (VERSION,)
    label = "SD3"
    latent = LatentFormat(channels=16, scaling_factor=1.5305, shift_factor=0.0609, rgb_factors=(
        (-0.0922, -0.0175, 0.0749), (0.0311, 0.0633, 0.0954), (0.1994, 0.0927, 0.0458), (0.0856, 0.0339, 0.0902),
        (0.0587, 0.0272, -0.0496), (-0.0006, 0.1104, 0.0309), (0.0978, 0.0306, 0.0427), (-0.0042, 0.1038, 0.1358),
        (-0.0194, 0.0020, 0.0669), (-0.0488, 0.0130, -0.0268), (0.0922, 0.0988, 0.0951), (-0.0278, 0.0524, -0.0542),
        (0.0332, 0.0456, 0.0895), (-0.0069, -0.0030, -0.0810), (-0.0596, -0.0465, -0.0293),
        (-0.1448, -0.1463, -0.1189)), rgb_bias=(0.2394, 0.2135, 0.1925))
    weight_folders = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
    pipeline_classes = ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline",
                        "StableDiffusion3InpaintPipeline")
    prompt_loggers = (PIPELINE_MODULE, PIPELINE_MODULE + "_img2img", PIPELINE_MODULE + "_inpaint")
    # Single files with their companions (VAE, CLIP, T5 beside them): runai.models.singlefile_flow.
    single_files = True

    def defaults(self, classification=None):
        return Defaults(size=1024, steps=28, scale=7.0, scheduler=EULER)

    def from_single_file(self, path, model_dir, entry, device, dtype, step, modules=None):
        # modules: the companion files the client chose (Forge's forge_additional_modules).
        from runai.models.singlefile_flow import pipeline_from_flow_file

        return pipeline_from_flow_file(path, model_dir, entry, device, dtype, step, modules=modules)

    def folder_pipeline(self, classification):
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline, {}

    def modes(self):
        from diffusers import (
            StableDiffusion3Img2ImgPipeline, StableDiffusion3InpaintPipeline, StableDiffusion3Pipeline)

        return Modes(StableDiffusion3Pipeline, StableDiffusion3Img2ImgPipeline, StableDiffusion3InpaintPipeline)


FAMILY = StableDiffusion3()
