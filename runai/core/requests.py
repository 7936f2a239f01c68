# -*- test-case-name: runai.test.test_legacy_parse,runai.test.test_requests -*-
"""Requests as the core takes them: validated, typed, in no door's wire format.

A door reads its own format into :class:`runai.core.fields.Fields` and calls
:func:`generation_request` or :func:`convert_request`, which check every value and every
size a client controls before anything waits in the queue. Torch-free: this runs on the
reactor thread, or in its thread pool for a large request and for one with images, which
are decoded whole here (:func:`runai.core.images.check_image`).
"""

import functools
import math
import os
import secrets
from dataclasses import dataclass
from typing import Optional

from runai import families
from runai.core import errors, hires_loras, prompts
from runai.core.hires import Hires, hires_request
from runai.core.images import EncodedImage, check_image
from runai.core.schedulers import SCHEDULERS
from runai.families.base import Defaults
from runai.models import embeddings, loras
from runai.models.library import ModelLibrary
from runai.models.paths import resolve_model, safety_checker_path

GENERATION_ACTIONS = ("txt2img", "img2img", "inpaint", "outpaint")
# Actions that start from the client's picture, and those that repaint part of it.
IMAGE_ACTIONS = ("img2img", "inpaint", "outpaint")
MASK_ACTIONS = ("inpaint", "outpaint")
MAX_SEED = 2**32 - 1
MAX_MODEL_NAME_CHARS = 4096
# Companion files a request may name (a VAE and three text encoders at most, in practice).
MAX_MODULES = 8
# The size a txt2img request without one paints at where the model's family is unknown;
# a family's own is what it was trained at (runai.families).
DEFAULT_SIZE = 512


@dataclass(frozen=True)
class Limits:
    """Bounds on what a client may ask for; the server's options may tighten them."""

    max_steps: int = 150
    min_size: int = 64
    max_size: int = 2048
    size_multiple: int = 8
    max_samples: int = 8
    max_iter: int = 16
    # n_samples images of width x height are denoised together: bound their sum.
    max_batch_pixels: int = 8 * 1024 * 1024
    max_prompt_chars: int = 20_000
    max_scale: float = 50.0


@dataclass(frozen=True)
class ConvertRequest:
    """A single-file checkpoint to become a diffusers folder beside it."""

    model_path: str  # resolved .safetensors/.ckpt, inside the model folder
    model_name: str
    target_path: str  # the folder to create: the file's name without its extension
    target_name: str
    id: object = None
    action: str = "convert"


@dataclass(frozen=True)
class GenerationRequest:
    action: str
    model_path: str  # resolved, inside the model folder
    model_name: str  # relative to the model folder, for logs and replies
    prompt: str
    negative_prompt: str = ""
    steps: int = 20
    scale: float = 7.5
    seed: int = 0
    width: int = 512
    height: int = 512
    n_samples: int = 1
    n_iter: int = 1
    scheduler: str = Defaults.scheduler
    ddim_eta: float = 0.0
    # The guidance a guidance-distilled model is conditioned on; None: the family's.
    distilled_scale: Optional[float] = None
    # Companion files the client chose for a model that needs them (a VAE, text encoders):
    # their names in the model folder, and resolved (inside it); () lets the server find them.
    modules: tuple = ()
    module_paths: tuple = ()
    # Every this many steps a progress event carries a small preview of the picture; 0: none.
    preview_every: int = 0
    hires: Optional[Hires] = None  # txt2img's second, larger pass (hires fix)
    strength: float = 0.8
    pos_x: int = 0
    pos_y: int = 0
    pixels: Optional[EncodedImage] = None  # img2img, inpaint, outpaint
    mask: Optional[EncodedImage] = None  # white = repaint; transparency in pixels counts too
    nsfw_filter: bool = False
    safety_checker: Optional[str] = None  # the checker's folder, when asked for and installed
    loras: tuple = ()  # runai.models.loras.LoraRef: the prompt's <lora:...>, each with its weights
    # runai.models.embeddings.EmbeddingRef: the embeddings the prompts use that the model takes.
    embeddings: tuple = ()
    id: object = None

    @property
    def image_count(self):
        return self.n_samples * self.n_iter

    def seeds(self):
        """Image k of the request has seed ``seed + k``, whatever the batch size."""
        return [self.seed + k for k in range(self.image_count)]


def _size(fields, name, limits, default=512, multiple=None):
    multiple = multiple or limits.size_multiple
    value = fields.integer(name, default, limits.min_size, limits.max_size)
    if value % multiple:
        raise errors.RunaiError(
            errors.OUT_OF_RANGE,
            f"{fields.lookup(name)[0]} must be a multiple of {multiple}, not {value}",
        )
    return value


@functools.lru_cache(maxsize=8)
def _library(model_dir):
    # Its classifications are cached: a request costs a stat per file that says what a
    # model is, and the first request for a model reads its configs or header once.
    return ModelLibrary(model_dir)


def model_family(model_path, model_dir):
    """``(family, classification)`` of the model at ``model_path``, as the library says;
    ``(None, None)`` where it cannot tell (the worker's load will say why)."""
    try:
        entry = _library(model_dir).describe(model_path)
    except (OSError, ValueError):
        return None, None
    if entry.error:
        return None, None
    return families.for_version(entry.version), entry.classification


def _multiple(family, limits):
    """What sizes must be a multiple of: the limits', or the family's where it needs more
    (a transformer on 2x2 patches of the latent)."""
    own = family.size_multiple if family is not None else 1
    return limits.size_multiple * own // math.gcd(limits.size_multiple, own)


def family_default_size(defaults, limits, multiple=None):
    """The side of the square a txt2img request without a size paints at: the family's
    (512 where the model cannot be classified), within the limits."""
    multiple = multiple or limits.size_multiple
    return max(limits.min_size, min(defaults.size, limits.max_size) // multiple * multiple)


def _scheduler(fields, family, defaults):
    return _check_scheduler(fields.string("scheduler", default=defaults.scheduler, max_chars=64), family)


def _check_scheduler(scheduler, family):
    """``scheduler`` if it is a name runai knows and the model's family runs."""
    known = SCHEDULERS if family is None else {**SCHEDULERS, **family.schedulers}
    if scheduler not in known:
        raise errors.RunaiError(
            errors.UNKNOWN_SCHEDULER,
            f"unknown scheduler {scheduler!r}; valid: {', '.join(sorted(known))}",
        )
    if family is not None and not family.check_scheduler(scheduler):
        raise errors.RunaiError(
            errors.BAD_REQUEST,
            f"{family.label} models do not run the scheduler {scheduler!r}; they run "
            f"{', '.join(sorted(family.schedulers))}",
        )
    return scheduler


def resolve_modules(model_dir, names, label="'modules'"):
    """``(names, resolved paths)`` of the companion files a client chose: each a model file
    inside the model folder (relative to it, or absolute inside it)."""
    if names is None:
        return (), ()
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise errors.RunaiError(errors.BAD_REQUEST, f"{label} must be a list of file names")
    if len(names) > MAX_MODULES:
        raise errors.RunaiError(errors.OUT_OF_RANGE, f"{label} names {len(names)} files; the limit is {MAX_MODULES}")
    resolved = [resolve_model(model_dir, name) for name in names]
    return tuple(shown for _, shown in resolved), tuple(str(path) for path, _ in resolved)


def _image(value, what):
    """A client image, checked; one a door has checked already (an EncodedImage) is kept."""
    return value if isinstance(value, EncodedImage) else check_image(value, what)


def generation_request(action, fields, model_dir, limits=Limits(), id=None):
    """A :class:`GenerationRequest` for ``action`` from ``fields`` (plain names: ``model``,
    ``prompt``, ``steps``, ...); raises :class:`runai.core.errors.RunaiError`."""
    base_path = fields.raw("model_base_path")
    model_path, model_name = resolve_model(model_dir, fields.string("model"), base_path)
    family, classification = model_family(model_path, model_dir)
    defaults = family.defaults(classification) if family is not None else Defaults(size=DEFAULT_SIZE)
    prompt = fields.string("prompt", default="", max_chars=limits.max_prompt_chars)
    negative = fields.string("negative_prompt", default="", max_chars=limits.max_prompt_chars)
    parsed = [_parse(fields, "prompt", prompt), _parse(fields, "negative_prompt", negative)]
    steps = fields.integer("steps", min(defaults.steps, limits.max_steps), 1, limits.max_steps)
    pixels = mask = None
    multiple = _multiple(family, limits)
    default_width = default_height = family_default_size(defaults, limits, multiple)
    if action in IMAGE_ACTIONS:
        raw_pixels = fields.raw("pixels")
        if raw_pixels is None:
            raise errors.RunaiError(errors.BAD_REQUEST, f"missing option 'pixels' (the {action} input image)")
        pixels = _image(raw_pixels, "pixels")
        # Without an explicit size, paint at the picture's own size (to the multiple of 8),
        # scaled down to the size limit if it is larger.
        scale = min(1.0, limits.max_size / max(pixels.width, pixels.height))
        default_width = max(limits.min_size, int(pixels.width * scale) // multiple * multiple)
        default_height = max(limits.min_size, int(pixels.height * scale) // multiple * multiple)
    if action in MASK_ACTIONS:
        raw_mask = fields.raw("mask")
        mask = None if raw_mask is None else _image(raw_mask, "mask")
    width = _size(fields, "width", limits, default_width, multiple)
    height = _size(fields, "height", limits, default_height, multiple)
    strength = fields.number("strength", 1.0 if action in MASK_ACTIONS else 0.8, 0.0, 1.0)
    if action in IMAGE_ACTIONS and int(steps * strength) < 1:
        raise errors.RunaiError(
            errors.OUT_OF_RANGE,
            f"steps x strength is {steps * strength:g}: no denoising step would run; raise either",
        )
    nsfw_filter = fields.boolean("do_nsfw_filter")
    n_samples = fields.integer("n_samples", 1, 1, limits.max_samples)
    n_iter = fields.integer("n_iter", 1, 1, limits.max_iter)
    if n_samples * width * height > limits.max_batch_pixels:
        raise errors.RunaiError(
            errors.OUT_OF_RANGE,
            f"n_samples x width x height is {n_samples * width * height} pixels; "
            f"the limit is {limits.max_batch_pixels}",
        )
    seed = fields.integer("seed", -1, -1, MAX_SEED)
    if seed == -1:
        # Legacy clients send -1 (or nothing) for "any seed"; the reply says which one.
        seed = secrets.randbelow(MAX_SEED - limits.max_samples * limits.max_iter)
    if seed + n_samples * n_iter - 1 > MAX_SEED:
        raise errors.RunaiError(errors.OUT_OF_RANGE, f"seed + number of images must not exceed {MAX_SEED}")
    scheduler = _scheduler(fields, family, defaults)
    distilled = defaults.distilled_scale
    hires = None
    if action == "txt2img":
        hires = hires_request(fields, limits, width, height, steps, n_samples, multiple,
                              lambda name: _check_scheduler(name, family),
                              inpainting=bool(classification is not None and classification.inpainting),
                              model_dir=model_dir)
    if hires is not None:
        parsed += [_parse(fields, "hr_prompt", hires.prompt),
                   _parse(fields, "hr_negative_prompt", hires.negative_prompt)]
        hires = hires_loras.with_loras(hires, parsed, model_dir)  # the second pass's <lora:...>
    modules, module_paths = resolve_modules(model_dir, fields.raw("modules"), fields.lookup("modules")[0])
    return GenerationRequest(
        id=id,
        action=action,
        model_path=str(model_path),
        model_name=model_name,
        prompt=prompt,
        negative_prompt=negative,
        steps=steps,
        scale=fields.number("scale", min(defaults.scale, limits.max_scale), 0.0, limits.max_scale),
        seed=seed,
        width=width,
        height=height,
        n_samples=n_samples,
        n_iter=n_iter,
        scheduler=scheduler,
        ddim_eta=fields.number("ddim_eta", 0.0, 0.0, 1.0),
        distilled_scale=fields.number("distilled_cfg_scale", distilled, 0.0, limits.max_scale),
        modules=modules,
        module_paths=module_paths,
        preview_every=fields.integer("preview_every", 0, 0, limits.max_steps),
        hires=hires,
        strength=strength,
        pos_x=fields.integer("pos_x", 0, -(2**31), 2**31 - 1),
        pos_y=fields.integer("pos_y", 0, -(2**31), 2**31 - 1),
        pixels=pixels,
        mask=mask,
        nsfw_filter=nsfw_filter,
        safety_checker=safety_checker_path(model_dir) if nsfw_filter else None,
        loras=_loras(model_dir, parsed[:2]),
        embeddings=embeddings.resolve(model_dir, model_path, family, classification, parsed, model_name),
    )


def _parse(fields, name, text):
    """The :class:`runai.core.prompts.Prompt` of a prompt field; its errors name the field."""
    try:
        return prompts.parse(text)
    except errors.RunaiError as e:
        raise errors.RunaiError(e.code, f"{fields.lookup(name)[0]}: {e.message}") from None


def _loras(model_dir, parsed):
    """The LoRAs the prompt and the negative prompt name (A1111 applies both), resolved in
    the model folder."""
    networks = [network for prompt in parsed for network in prompt.networks]
    if len(networks) > prompts.MAX_NETWORKS:
        raise errors.RunaiError(errors.OUT_OF_RANGE, f"the prompts name {len(networks)} extra networks; "
                                                     f"the limit is {prompts.MAX_NETWORKS}")
    return loras.resolve(model_dir, networks) if networks else ()


def convert_request(fields, model_dir, id=None):
    """A :class:`ConvertRequest`: ``model`` names a .safetensors/.ckpt; the new folder goes
    beside it. Raises :class:`runai.core.errors.RunaiError`."""
    source, name = resolve_model(model_dir, fields.string("model", max_chars=MAX_MODEL_NAME_CHARS),
                                 fields.raw("model_base_path"))
    if source.is_dir():
        raise errors.RunaiError(errors.BAD_REQUEST, f"{name!r} is a diffusers folder already")
    if not source.stem or source.stem.startswith("."):
        # "..ckpt" would convert to "." (or nowhere), ".x.ckpt" to a hidden folder that
        # the library never lists.
        raise errors.RunaiError(
            errors.BAD_REQUEST, f"{name!r} has no name to give its diffusers folder; rename it first")
    # The source was resolved inside the model folder, so its folder is inside it too.
    target = source.with_name(source.stem)
    target_name = target.relative_to(model_dir).as_posix()
    if os.path.lexists(target):
        raise errors.RunaiError(
            errors.BAD_REQUEST,
            f"{target_name!r} already exists; move it away to convert {name!r} (nothing is overwritten)",
        )
    return ConvertRequest(model_path=str(source), model_name=name, target_path=str(target),
                          target_name=target_name, id=id)
