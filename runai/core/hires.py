# -*- test-case-name: runai.test.test_hires -*-
"""Hires fix, as AUTOMATIC1111 users ask for it: a txt2img at the asked size, upscaled, then
repainted by a second img2img pass at the larger size.

Torch-free: the request parser reads it on the reactor thread
(:func:`hires_request`); the worker runs it (:mod:`runai.engine.hires`). The names are
AUTOMATIC1111's, on both doors: ``enable_hr``, ``hr_scale`` (or ``hr_resize_x`` /
``hr_resize_y``), ``hr_upscaler``, ``hr_second_pass_steps`` (0: as ``steps``),
``hr_prompt``, ``hr_negative_prompt`` (and their ``<lora:...>``: :mod:`runai.core.hires_loras`),
and the second pass's scheduler (``hr_scheduler``; ``hr_sampler_name`` over HTTP);
``denoising_strength`` (``strength`` on the socket) is the second pass's. ``hr_upscaler`` is
a latent mode, a built-in pixel upscaler, or a model upscaler of the model folder by its
name (``4x-UltraSharp``).
"""

from dataclasses import dataclass
from typing import Optional

from runai.core import errors
from runai.models import upscalers

# AUTOMATIC1111's latent upscale modes -> (torch interpolation mode, antialias).
LATENT_UPSCALE_MODES = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
# Upscalers that work on pixels and need no model.
PIXEL_UPSCALERS = ("None", "Lanczos", "Nearest")
DEFAULT_UPSCALER = "Latent"
DEFAULT_STRENGTH = 0.7
MAX_SCALE = 4.0


@dataclass(frozen=True)
class Hires:
    """The second pass of a hires-fix request."""

    width: int  # the final size
    height: int
    scale: float
    upscaler: str
    steps: int  # the second pass's steps (before strength)
    strength: float
    prompt: str
    negative_prompt: str
    scheduler: Optional[str] = None  # None: the first pass's
    # runai.models.loras.LoraRef of the second pass's prompts (runai.core.hires_loras); None: the first pass's.
    loras: Optional[tuple] = None

    @property
    def latent(self):
        """``(mode, antialias)`` of a latent upscale, or None for a pixel upscaler."""
        return LATENT_UPSCALE_MODES.get(self.upscaler)


def upscaler_names():
    """Every upscaler a request may name, latent modes first."""
    return tuple(LATENT_UPSCALE_MODES) + PIXEL_UPSCALERS


def _check_model_upscaler(name, model_dir):
    """RunaiError unless ``name`` is a model upscaler of ``model_dir``: the worker finds it
    by name in its own folder (a broker's worker too)."""
    if model_dir is None:
        raise errors.RunaiError(
            errors.BAD_REQUEST, f"unknown hr_upscaler {name[:64]!r}; known: {', '.join(upscaler_names())}")
    try:
        upscalers.find(model_dir, name, upscaler_names())
    except errors.RunaiError as e:
        raise errors.RunaiError(e.code, f"hr_upscaler: {e.message}") from None


def _final_size(fields, width, height, limits, multiple):
    """The second pass's size: ``hr_resize_x``/``hr_resize_y`` (one of them: the other
    keeps the aspect ratio), else ``hr_scale`` times the first pass's."""
    scale = fields.number("hr_scale", 2.0, 1.0, MAX_SCALE)
    resize_x = fields.integer("hr_resize_x", 0, 0, limits.max_size)
    resize_y = fields.integer("hr_resize_y", 0, 0, limits.max_size)
    if resize_x or resize_y:
        final_w = resize_x or round(resize_y * width / height)
        final_h = resize_y or round(resize_x * height / width)
        scale = max(final_w / width, final_h / height)
    else:
        final_w, final_h = round(width * scale), round(height * scale)
    # To the size multiple, as AUTOMATIC1111 rounds (down), never below the first pass.
    final_w = max(width, final_w // multiple * multiple)
    final_h = max(height, final_h // multiple * multiple)
    if max(final_w, final_h) > limits.max_size:
        raise errors.RunaiError(
            errors.OUT_OF_RANGE,
            f"hires fix would paint {final_w}x{final_h}; the size limit is {limits.max_size}")
    return final_w, final_h, scale


def hires_request(fields, limits, width, height, steps, n_samples, multiple, check_scheduler, inpainting=False,
                  model_dir=None):
    """The :class:`Hires` of a txt2img request with ``enable_hr``, else None; raises
    RunaiError. ``check_scheduler(name)`` validates the second pass's scheduler;
    ``hr_upscaler`` may name a model upscaler of ``model_dir`` (:mod:`runai.models.upscalers`)."""
    if not fields.boolean("enable_hr"):
        return None
    if inpainting:
        raise errors.RunaiError(errors.BAD_REQUEST, "hires fix needs a model that is not an inpainting model")
    final_w, final_h, scale = _final_size(fields, width, height, limits, multiple)
    if n_samples * final_w * final_h > limits.max_batch_pixels:
        raise errors.RunaiError(
            errors.OUT_OF_RANGE,
            f"n_samples x the hires size is {n_samples * final_w * final_h} pixels; "
            f"the limit is {limits.max_batch_pixels}")
    upscaler = fields.string("hr_upscaler", default=DEFAULT_UPSCALER, max_chars=128) or DEFAULT_UPSCALER
    if upscaler not in upscaler_names():
        _check_model_upscaler(upscaler, model_dir)
    second_steps = fields.integer("hr_second_pass_steps", 0, 0, limits.max_steps) or steps
    strength = fields.number("strength", DEFAULT_STRENGTH, 0.0, 1.0)
    if int(second_steps * strength) < 1:
        raise errors.RunaiError(
            errors.OUT_OF_RANGE,
            f"hires steps x denoising strength is {second_steps * strength:g}: the second pass would run no "
            "step; raise either")
    scheduler = fields.string("hr_scheduler", default="", max_chars=64) or None
    if scheduler is not None:
        check_scheduler(scheduler)
    return Hires(
        width=final_w, height=final_h, scale=scale, upscaler=upscaler, steps=second_steps, strength=strength,
        prompt=fields.string("hr_prompt", default="", max_chars=limits.max_prompt_chars),
        negative_prompt=fields.string("hr_negative_prompt", default="", max_chars=limits.max_prompt_chars),
        scheduler=scheduler,
    )
