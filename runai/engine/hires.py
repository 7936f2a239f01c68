# -*- test-case-name: runai.test.test_hires -*-
"""Hires fix in the worker: the first pass at the asked size, its upscale, and the second
pass (img2img at the final size) on the same loaded model. Worker thread only.

The first pass of a latent upscale ends in latents (no decode); they are resized in
latent space (:meth:`runai.families.base.Family.upscale_latents`: packed ones are
unpacked first) and handed to the family's img2img pipeline as its starting latents. A
pixel upscaler (Lanczos, Nearest, None: a plain resize) or a model upscaler (ESRGAN and its
family, :mod:`runai.engine.upscale`) works on the decoded first pass.
Progress counts both passes; a cancel stops either; the second pass has its own steps,
denoising strength, prompts, LoRAs and scheduler where the request gives them. Where its
LoRAs differ from the first pass's (:mod:`runai.core.hires_loras`), the merged set is
switched between the passes (and back before the next batch's first pass); the model keeps
the last set merged, as after any job, and the next job's merge puts it right.
"""

from dataclasses import replace

from runai.core.hires_loras import second_pass_loras
from runai.engine import modes, upscale
from runai.models import lora_apply

PIXEL_FILTERS = upscale.PIXEL_FILTERS


def run(engine, base, family, pipe, request, seeds, progress, on_progress, is_cancelled, mode_kwargs, text):
    """Both passes of one batch of a hires-fix ``request``; returns its final PIL images."""
    hires = request.hires
    latent = hires.latent
    # Until the second pass starts, its length is estimated by its steps x strength
    # (exact for first-order schedulers); then the total is the real one.
    estimate = max(1, int(hires.steps * hires.strength))
    first = {}
    second_loras = second_pass_loras(request)
    # The first pass's set (merged already for the first batch: then this costs nothing).
    lora_apply.apply(engine.loader, family, request.loras)

    def first_total(pipeline):
        first["timesteps"] = pipeline.num_timesteps
        return pipeline.num_timesteps + estimate

    out = engine._run_batch(pipe, request, seeds, progress, on_progress, is_cancelled, mode_kwargs, text,
                            output_type="latent" if latent else "pil", per_run=first_total)
    if latent:
        mode, antialias = latent
        image = family.upscale_latents(out, request.height, request.width, hires.height, hires.width, mode,
                                       antialias)
    else:
        # A built-in filter, or a model upscaler found by name in this worker's model folder.
        upscaler = upscale.Upscaler(hires.upscaler, model_dir=engine.loader.model_dir, device=engine.device,
                                    dtype=engine.dtype)
        image = [upscaler(picture, hires.width, hires.height, is_cancelled=is_cancelled) for picture in out]
    del out

    second = replace(request, width=hires.width, height=hires.height, steps=hires.steps,
                     scheduler=hires.scheduler or request.scheduler, prompt=hires.prompt or request.prompt,
                     negative_prompt=hires.negative_prompt or request.negative_prompt, loras=second_loras)
    img2img = engine._modes.get(base, family.modes().img2img)
    img2img.scheduler = family.make_scheduler(second.scheduler, engine._scheduler_config)
    # The second pass's set, in place of the first's where they differ (before its text is encoded).
    lora_apply.apply(engine.loader, family, second_loras)
    if (second.prompt, second.negative_prompt, second.loras) != (request.prompt, request.negative_prompt,
                                                                 request.loras):
        text = engine._text(family, img2img, second)
    kwargs = dict(family.guidance(second), image=image, strength=hires.strength, **family.conditioning(second))
    if modes.takes_size(type(img2img)):
        kwargs.update(height=hires.height, width=hires.width)
    return engine._run_batch(img2img, second, seeds, progress, on_progress, is_cancelled, kwargs, text,
                             per_run=lambda pipeline: first["timesteps"] + pipeline.num_timesteps)
