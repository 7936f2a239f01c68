# -*- test-case-name: runai.test.test_families,runai.test.test_flow_families -*-
"""FLUX.1 (dev, schnell, Fill, and their fine-tunes): an MMDiT transformer on 2x2-packed
latents, CLIP-L (pooled) and T5-XXL, a 16-channel VAE, flow matching.

- Recognised (:mod:`runai.models.classify`): a folder of ``FluxPipeline`` or
  ``FluxFillPipeline`` (``transformer/`` of ``FluxTransformer2DModel``); a file with BFL
  keys (``double_blocks.*``, ``single_blocks.*``, with or without
  ``model.diffusion_model.``). dev has a guidance embedding (``guidance_in.*``, or
  ``guidance_embeds`` in the transformer's config), schnell has none; Fill's transformer
  takes the masked picture and the mask beside the latents (384 input channels, not 64).
- Guidance as each variant needs it: dev is guidance-distilled, the guidance it is
  conditioned on is ``distilled_cfg_scale`` (Forge's name; 3.5 by default, 30 for Fill),
  and there is no classifier-free guidance, so ``scale`` and the negative prompt are not
  used; schnell takes no guidance at all.
- Prompts: the text, which diffusers encodes: CLIP sees its first 77 tokens, T5 up to 512
  (256 for schnell). A1111's syntax is read and its weights dropped: both encoders get
  the plain text (CLIP gives only its pooled output); no embeddings.
- Defaults: 1024 x 1024; dev 28 steps, schnell 4; flow Euler with the model's shift
  schedule. The samplers of :mod:`runai.families.flow` that take custom sigmas.
- Modes: txt2img, img2img, inpaint, outpaint with the FLUX pipelines of each; a Fill model
  runs every mode with ``FluxFillPipeline`` (txt2img and img2img as a repaint of the whole
  canvas).
- Latents: 16 channels, ``z = (x - 0.1159) * 0.3611``, packed 2x2 into 64-wide tokens.
- Single files (:mod:`runai.models.singlefile_flow`): a transformer alone (BFL keys, float8
  too) with ``ae.safetensors``, ``clip_l.safetensors`` and a ``t5xxl_*.safetensors`` beside
  it or in the model folder's ``vae/`` and ``text_encoder/`` (:mod:`runai.models.companions`),
  or a ComfyUI checkpoint with them inside.
"""

from runai.families.base import Defaults, LatentFormat, Modes
from runai.families.flow import EULER, FLOW_SCHEDULERS, FlowFamily

VERSION = "flux"
DEV, SCHNELL, FILL, CONTROL = "dev", "schnell", "fill", "control"
DISTILLED_SCALE = 3.5
FILL_DISTILLED_SCALE = 30.0
PIPELINE_MODULE = "diffusers.pipelines.flux.pipeline_flux"
# FLUX's pipelines hand every scheduler custom sigmas: only these take them.
SCHEDULERS = {name: FLOW_SCHEDULERS[name] for name in (EULER, "unipc")}


class Flux(FlowFamily):
    versions = (VERSION,)
    label = "FLUX.1"
    latent = LatentFormat(channels=16, scaling_factor=0.3611, shift_factor=0.1159, packed=True, rgb_factors=(
        (-0.0346, 0.0244, 0.0681), (0.0034, 0.0210, 0.0687), (0.0275, -0.0668, -0.0433), (-0.0174, 0.0160, 0.0617),
        (0.0859, 0.0721, 0.0329), (0.0004, 0.0383, 0.0115), (0.0405, 0.0861, 0.0915), (-0.0236, -0.0185, -0.0259),
        (-0.0245, 0.0250, 0.1180), (0.1008, 0.0755, -0.0421), (-0.0515, 0.0201, 0.0011), (0.0428, -0.0012, -0.0036),
        (0.0817, 0.0765, 0.0749), (-0.1264, -0.0522, -0.1103), (-0.0280, -0.0881, -0.0499),
        (-0.1262, -0.0982, -0.0778)), rgb_bias=(-0.0329, -0.0718, -0.0851), taesd="taef1")
    weight_folders = ("transformer", "vae", "text_encoder", "text_encoder_2")
    schedulers = SCHEDULERS
    pipeline_classes = ("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline", "FluxFillPipeline")
    prompt_loggers = (PIPELINE_MODULE, PIPELINE_MODULE + "_img2img", PIPELINE_MODULE + "_inpaint",
                      PIPELINE_MODULE + "_fill")
    # Single files with their companions (VAE, CLIP, T5 beside them): runai.models.singlefile_flow.
    single_files = True

    def serves(self, classification):
        # Depth and Canny take a control image beside the latents: no request gives one.
        return self.variant(classification) != CONTROL

    def defaults(self, classification=None):
        variant = self.variant(classification)
        if variant == SCHNELL:
            return Defaults(size=1024, steps=4, scale=0.0, scheduler=EULER, distilled_scale=None)
        return Defaults(size=1024, steps=28, scale=1.0, scheduler=EULER,
                        distilled_scale=FILL_DISTILLED_SCALE if variant == FILL else DISTILLED_SCALE)

    def from_single_file(self, path, model_dir, entry, device, dtype, step, modules=None):
        # modules: the companion files the client chose (Forge's forge_additional_modules).
        from runai.models.errors import LoadError
        from runai.models.singlefile_flow import pipeline_from_flow_file

        if not self.serves(entry.classification):
            raise LoadError("it is a FLUX.1 Depth or Canny model, which needs a control image runai cannot take")

        return pipeline_from_flow_file(path, model_dir, entry, device, dtype, step, modules=modules)

    def folder_pipeline(self, classification):
        from diffusers import FluxFillPipeline, FluxPipeline

        return (FluxFillPipeline if self.variant(classification) == FILL else FluxPipeline), {}

    def modes(self):
        from diffusers import FluxFillPipeline, FluxImg2ImgPipeline, FluxInpaintPipeline, FluxPipeline

        return Modes(FluxPipeline, FluxImg2ImgPipeline, FluxInpaintPipeline, inpaint_model=FluxFillPipeline)

    def is_inpainting_model(self, pipe):
        # Fill's transformer takes the packed latents, the masked picture's and the mask.
        packed = pipe.vae.config.latent_channels * 4
        return pipe.transformer.config.in_channels > packed

    def guidance(self, request):
        # The distilled guidance feeds the guidance embedding where the model has one;
        # diffusers ignores it for schnell. No true CFG: scale is not used.
        scale = request.distilled_scale
        return dict(guidance_scale=DISTILLED_SCALE if scale is None else scale)

    def text(self, pipe, request, device):
        # No classifier-free guidance: the negative prompt has nothing to steer. CLIP gives
        # only its pooled output: both encoders get the text without A1111's syntax (its
        # weights mean nothing to T5; LoRA tags are taken out).
        from runai.core import prompts

        return dict(prompt=prompts.parse(request.prompt).plain)


FAMILY = Flux()
