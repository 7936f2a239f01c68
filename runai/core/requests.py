"""Turn a decoded client message into a typed, validated request.

Torch-free: runs on the reactor thread, so that bad input is answered at once and never
reaches the worker. Every size the client controls is bounded here.
"""

import json
import os
import secrets
from dataclasses import dataclass
from typing import Optional, Union

from runai.core import errors
from runai.doors.legacy.history import HISTORY_ACTIONS, parse_history
from runai.core.images import EncodedImage, check_image
from runai.models.paths import resolve_model, safety_checker_path
from runai.core.schedulers import DEFAULT_SCHEDULER, SCHEDULERS

GENERATION_ACTIONS = ("txt2img", "img2img", "inpaint", "outpaint")
# The model library: list the model folder, convert a checkpoint into a diffusers folder.
LIBRARY_ACTIONS = ("models", "convert")
SERVED_ACTIONS = GENERATION_ACTIONS
# Actions that start from the client's picture, and those that repaint part of it.
IMAGE_ACTIONS = ("img2img", "inpaint", "outpaint")
MASK_ACTIONS = ("inpaint", "outpaint")
MAX_ID_LENGTH = 128
MAX_SEED = 2**32 - 1


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
class Ping:
    id: object = None


@dataclass(frozen=True)
class Cancel:
    id: object = None


@dataclass(frozen=True)
class ListModels:
    id: object = None


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
    scheduler: str = DEFAULT_SCHEDULER
    ddim_eta: float = 0.0
    strength: float = 0.8
    pos_x: int = 0
    pos_y: int = 0
    pixels: Optional[EncodedImage] = None  # img2img, inpaint, outpaint
    mask: Optional[EncodedImage] = None  # white = repaint; transparency in pixels counts too
    nsfw_filter: bool = False
    safety_checker: Optional[str] = None  # the checker's folder, when asked for and installed
    id: object = None

    @property
    def image_count(self):
        return self.n_samples * self.n_iter

    def seeds(self):
        """Image k of the request has seed ``seed + k``, whatever the batch size."""
        return [self.seed + k for k in range(self.image_count)]


Request = Union[Ping, Cancel, GenerationRequest, ListModels, ConvertRequest]


def decode_message(payload):
    """UTF-8 JSON object from a message's bytes, or a RunaiError."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as e:
        raise errors.RunaiError(errors.BAD_ENCODING, f"the message is not valid UTF-8 (byte {e.start})")
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise errors.RunaiError(errors.BAD_JSON, f"the message is not valid JSON: {e}")
    if not isinstance(obj, dict):
        raise errors.RunaiError(errors.BAD_JSON, "the message must be a JSON object")
    return obj


def request_id(obj):
    """The client's optional ``id``, if it is one we can echo; else None."""
    value = obj.get("id")
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int) or (isinstance(value, str) and len(value) <= MAX_ID_LENGTH):
        return value
    return None


def reqtype(obj):
    action = obj.get("action")
    return action if isinstance(action, str) and len(action) <= 64 else None


class _Options:
    """Reads ``<action>_<name>`` (the legacy spelling) or plain ``<name>``."""

    def __init__(self, action, options):
        self.action = action
        self.options = options

    def _raw(self, name):
        prefixed = f"{self.action}_{name}"
        if prefixed in self.options:
            return prefixed, self.options[prefixed]
        if name in self.options:
            return name, self.options[name]
        return prefixed, None

    def raw(self, name, required=False):
        key, value = self._raw(name)
        if value is None and required:
            raise errors.RunaiError(errors.BAD_REQUEST, f"missing option {name!r} (the {self.action} input image)")
        return value

    def string(self, name, default=None, max_chars=None):
        key, value = self._raw(name)
        if value is None:
            if default is None:
                raise errors.RunaiError(errors.BAD_REQUEST, f"missing option {key!r}")
            return default
        if not isinstance(value, str):
            raise errors.RunaiError(errors.BAD_REQUEST, f"option {key!r} must be a string")
        if max_chars is not None and len(value) > max_chars:
            raise errors.RunaiError(errors.OUT_OF_RANGE, f"option {key!r} is longer than {max_chars} characters")
        return value

    def integer(self, name, default, low, high):
        key, value = self._raw(name)
        if value is None:
            return default
        return errors.check_integer(value, f"option {key!r}", low, high)

    def number(self, name, default, low, high):
        key, value = self._raw(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise errors.RunaiError(errors.BAD_REQUEST, f"option {key!r} must be a number")
        if not low <= value <= high:
            raise errors.RunaiError(errors.OUT_OF_RANGE, f"option {key!r} must be between {low} and {high}, not {value}")
        return float(value)


def _size(opts, name, limits, default=512):
    value = opts.integer(name, default, limits.min_size, limits.max_size)
    if value % limits.size_multiple:
        raise errors.RunaiError(
            errors.OUT_OF_RANGE,
            f"option '{opts.action}_{name}' must be a multiple of {limits.size_multiple}, not {value}",
        )
    return value


def parse_generation(action, options, model_dir, limits):
    opts = _Options(action, options)
    base_path = options.get("model_base_path")
    model_path, model_name = resolve_model(model_dir, opts.string("model"), base_path)
    prompt = opts.string("prompt", default="", max_chars=limits.max_prompt_chars)
    negative = opts.string("negative_prompt", default="", max_chars=limits.max_prompt_chars)
    steps = opts.integer("steps", 20, 1, limits.max_steps)
    pixels = mask = None
    default_width = default_height = 512
    if action in IMAGE_ACTIONS:
        pixels = check_image(opts.raw("pixels", required=True), "pixels")
        # Without an explicit size, paint at the picture's own size (to the multiple of 8),
        # scaled down to the size limit if it is larger.
        multiple = limits.size_multiple
        scale = min(1.0, limits.max_size / max(pixels.width, pixels.height))
        default_width = max(limits.min_size, int(pixels.width * scale) // multiple * multiple)
        default_height = max(limits.min_size, int(pixels.height * scale) // multiple * multiple)
    if action in MASK_ACTIONS:
        raw_mask = opts.raw("mask")
        mask = None if raw_mask is None else check_image(raw_mask, "mask")
    width = _size(opts, "width", limits, default_width)
    height = _size(opts, "height", limits, default_height)
    strength = opts.number("strength", 1.0 if action in MASK_ACTIONS else 0.8, 0.0, 1.0)
    if action in IMAGE_ACTIONS and int(steps * strength) < 1:
        raise errors.RunaiError(
            errors.OUT_OF_RANGE,
            f"steps x strength is {steps * strength:g}: no denoising step would run; raise either",
        )
    nsfw_filter = options.get("do_nsfw_filter", False)
    if not isinstance(nsfw_filter, bool):
        raise errors.RunaiError(errors.BAD_REQUEST, "option 'do_nsfw_filter' must be true or false")
    n_samples = opts.integer("n_samples", 1, 1, limits.max_samples)
    n_iter = opts.integer("n_iter", 1, 1, limits.max_iter)
    if n_samples * width * height > limits.max_batch_pixels:
        raise errors.RunaiError(
            errors.OUT_OF_RANGE,
            f"n_samples x width x height is {n_samples * width * height} pixels; "
            f"the limit is {limits.max_batch_pixels}",
        )
    seed = opts.integer("seed", -1, -1, MAX_SEED)
    if seed == -1:
        # Legacy clients send -1 (or nothing) for "any seed"; the reply says which one.
        seed = secrets.randbelow(MAX_SEED - limits.max_samples * limits.max_iter)
    if seed + n_samples * n_iter - 1 > MAX_SEED:
        raise errors.RunaiError(errors.OUT_OF_RANGE, f"seed + number of images must not exceed {MAX_SEED}")
    scheduler = opts.string("scheduler", default=DEFAULT_SCHEDULER, max_chars=64)
    if scheduler not in SCHEDULERS:
        raise errors.RunaiError(
            errors.UNKNOWN_SCHEDULER,
            f"unknown scheduler {scheduler!r}; valid: {', '.join(sorted(SCHEDULERS))}",
        )
    return dict(
        action=action,
        model_path=str(model_path),
        model_name=model_name,
        prompt=prompt,
        negative_prompt=negative,
        steps=steps,
        scale=opts.number("scale", 7.5, 0.0, limits.max_scale),
        seed=seed,
        width=width,
        height=height,
        n_samples=n_samples,
        n_iter=n_iter,
        scheduler=scheduler,
        ddim_eta=opts.number("ddim_eta", 0.0, 0.0, 1.0),
        strength=strength,
        pos_x=opts.integer("pos_x", 0, -(2**31), 2**31 - 1),
        pos_y=opts.integer("pos_y", 0, -(2**31), 2**31 - 1),
        pixels=pixels,
        mask=mask,
        nsfw_filter=nsfw_filter,
        safety_checker=safety_checker_path(model_dir) if nsfw_filter else None,
    )


def parse_convert(obj, model_dir, rid):
    """``convert_model`` names a .safetensors/.ckpt; the new folder goes beside it."""
    options = obj.get("options", {})
    if not isinstance(options, dict):
        raise errors.RunaiError(errors.BAD_REQUEST, "'options' must be a JSON object")
    opts = _Options("convert", options)
    source, name = resolve_model(model_dir, opts.string("model", max_chars=4096), options.get("model_base_path"))
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
                          target_name=target_name, id=rid)


def parse_request(obj, model_dir, limits=Limits()):
    """A validated request from a decoded message; raises :class:`RunaiError`."""
    action = obj.get("action")
    rid = request_id(obj)
    if "id" in obj and obj["id"] is not None and rid is None:
        raise errors.RunaiError(
            errors.BAD_REQUEST, f"'id' must be an integer or a string of at most {MAX_ID_LENGTH} characters"
        )
    if not isinstance(action, str):
        raise errors.RunaiError(errors.BAD_REQUEST, "the request has no 'action' string")
    if action == "ping":
        return Ping(id=rid)
    if action == "cancel":
        return Cancel(id=rid)
    if action in SERVED_ACTIONS:
        options = obj.get("options", {})
        if not isinstance(options, dict):
            raise errors.RunaiError(errors.BAD_REQUEST, "'options' must be a JSON object")
        # pos_x/pos_y sit in options for legacy clients, at the top level for some others.
        merged = {k: v for k, v in obj.items() if k in ("pos_x", "pos_y")}
        merged.update(options)
        return GenerationRequest(id=rid, **parse_generation(action, merged, model_dir, limits))
    if action == "models":
        return ListModels(id=rid)
    if action == "convert":
        return parse_convert(obj, model_dir, rid)
    if action in HISTORY_ACTIONS:
        return parse_history(action, obj, rid)
    raise errors.RunaiError(
        errors.UNKNOWN_ACTION,
        f"unknown action {action[:64]!r}; known: "
        f"{', '.join(('ping', 'cancel') + SERVED_ACTIONS + LIBRARY_ACTIONS + HISTORY_ACTIONS)}",
    )
