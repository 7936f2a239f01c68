# -*- test-case-name: runai.test.test_families,runai.test.test_flow_families -*-
"""Stable Diffusion 3 and 3.5 (Large, Medium, Large Turbo): an MMDiT transformer, two CLIP
text encoders with projection and T5-XXL, a 16-channel VAE, flow matching.

- Recognised (:mod:`runai.models.classify`): a folder of ``StableDiffusion3Pipeline``
  (``transformer/`` of ``SD3Transformer2DModel``); a file with
  ``model.diffusion_model.joint_blocks.*`` keys (the text encoders, when inside, under
  ``text_encoders.clip_l.*``, ``text_encoders.clip_g.*``, ``text_encoders.t5xxl.*``).
- Prompts: the text, which diffusers encodes: CLIP sees its first 77 tokens, T5 up to
  256. A1111's weights and embeddings (SDXL's pairs) go to both CLIP encoders (their
  first chunk of 75 tokens), which runai encodes; T5 gets the text without the syntax.
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
    latent = LatentFormat(channels=16, scaling_factor=1.5305, shift_factor=0.0609, taesd="taesd3", rgb_factors=(
        (-0.0922, -0.0175, 0.0749), (0.0311, 0.0633, 0.0954), (0.1994, 0.0927, 0.0458), (0.0856, 0.0339, 0.0902),
        (0.0587, 0.0272, -0.0496), (-0.0006, 0.1104, 0.0309), (0.0978, 0.0306, 0.0427), (-0.0042, 0.1038, 0.1358),
        (-0.0194, 0.0020, 0.0669), (-0.0488, 0.0130, -0.0268), (0.0922, 0.0988, 0.0951), (-0.0278, 0.0524, -0.0542),
        (0.0332, 0.0456, 0.0895), (-0.0069, -0.0030, -0.0810), (-0.0596, -0.0465, -0.0293),
        (-0.1448, -0.1463, -0.1189)), rgb_bias=(0.2394, 0.2135, 0.1925))
    weight_folders = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
    pipeline_classes = ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline",
                        "StableDiffusion3InpaintPipeline")
    prompt_loggers = (PIPELINE_MODULE, PIPELINE_MODULE + "_img2img", PIPELINE_MODULE + "_inpaint")
    # SDXL's pairs of embeddings: the same two CLIP encoders.
    embedding_encoders = (("text_encoder", "clip_l"), ("text_encoder_2", "clip_g"))
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

    def text(self, pipe, request, device):
        """The text where it says nothing more, which diffusers encodes; else embeddings
        encoded here: weights and textual inversions through both CLIP encoders, the
        plain text through T5."""
        from runai.families import clip_text

        texts = [clip_text.parsed(request.prompt), clip_text.parsed(request.negative_prompt)]
        found = clip_text.vectors(pipe, request, self.embedding_encoders)
        if clip_text.is_plain(texts, found):
            return dict(prompt=texts[0].plain, negative_prompt=texts[1].plain)
        return encode(pipe, *texts, device, found)

    def batch_text(self, text, count):
        # The pipeline repeats the embeddings it encodes for each image, not those it is
        # given (it takes their batch for the prompts'): they come repeated, one image each.
        if "prompt_embeds" not in text or count == 1:
            return text
        repeated = {k: v.repeat(count, *([1] * (v.ndim - 1))) for k, v in text.items()}
        return dict(repeated, num_images_per_prompt=1)


def encode(pipe, prompt, negative_prompt, device, found=None, max_sequence_length=256):
    """The four embeddings of ``StableDiffusion3Pipeline.encode_prompt`` (one row each), with
    A1111's weights and embeddings in the CLIP encoders' hidden states: their first chunk,
    as CLIP sees 77 tokens; T5 encodes the plain text. ``found``: the embeddings' vectors
    (:func:`runai.families.clip_text.vectors`)."""
    import torch

    from runai.families import clip_text

    texts = [clip_text.parsed(prompt), clip_text.parsed(negative_prompt)]
    pairs = [(pipe.tokenizer, pipe.text_encoder, "clip_l"), (pipe.tokenizer_2, pipe.text_encoder_2, "clip_g")]
    encoded = clip_text.encode_with(pairs, texts, found or {}, device, penultimate=True, limit=1)
    out = {}
    for (hidden, pooled), text, prefix in zip(encoded, texts, ("", "negative_")):
        clip = torch.cat(hidden, dim=-1).to(dtype=pipe.text_encoder.dtype, device=device)
        with torch.inference_mode():
            t5 = pipe._get_t5_prompt_embeds(prompt=text.plain, max_sequence_length=max_sequence_length, device=device)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        out[prefix + "prompt_embeds"] = torch.cat([clip, t5], dim=-2)
        out[prefix + "pooled_prompt_embeds"] = torch.cat(pooled, dim=-1)
    return out


FAMILY = StableDiffusion3()
