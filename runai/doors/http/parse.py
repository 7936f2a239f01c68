# -*- test-case-name: runai.test.test_http_parse -*-
"""AUTOMATIC1111's request bodies as core requests.

Clients send some 45 keys (``webuiapi`` sends every one it knows); runai reads those it
can honour and ignores the rest. Errors name AUTOMATIC1111's field (``'cfg_scale'``).
"""

import base64
import io
import json
import math
import re

from runai.core import errors
from runai.core.fields import Fields
from runai.core.images import check_image
from runai.core.requests import generation_request
from runai.doors.http.samplers import scheduler_for
from runai.doors.jsonobject import decode_object

# runai's field -> AUTOMATIC1111's
NAMES = {
    "prompt": "prompt",
    "negative_prompt": "negative_prompt",
    "steps": "steps",
    "scale": "cfg_scale",
    "seed": "seed",
    "width": "width",
    "height": "height",
    "n_samples": "batch_size",
    "n_iter": "n_iter",
    "strength": "denoising_strength",
    "ddim_eta": "eta",  # used by DDIM, as the socket's ddim_eta
    # Forge's name for the guidance a guidance-distilled model is conditioned on.
    "distilled_cfg_scale": "distilled_cfg_scale",
    # Forge's companion files (VAE, text encoders) for a model that needs them.
    "modules": "forge_additional_modules",
    # Hires fix (the same names on the socket; the second pass's sampler is worked out below).
    **{name: name for name in ("enable_hr", "hr_scale", "hr_resize_x", "hr_resize_y", "hr_upscaler",
                               "hr_second_pass_steps", "hr_prompt", "hr_negative_prompt")},
}
MAX_MASK_BLUR = 64
# Numbers some clients send as strings ("seed": "123"), which AUTOMATIC1111's request
# models take (pydantic reads them): read as numbers here too.
NUMERIC = frozenset(("seed", "steps", "cfg_scale", "width", "height", "batch_size", "n_iter", "denoising_strength",
                     "eta", "distilled_cfg_scale"))
_NUMBER_TEXT = re.compile(r"\s*[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?\s*")
# What a reply's "parameters" repeats of its request: the fields of AUTOMATIC1111's own
# request models (unknown keys are dropped there too), without the pictures (AUTOMATIC1111
# leaves them out unless asked with include_init_images).
ECHOED = frozenset((
    "prompt", "negative_prompt", "styles", "seed", "subseed", "subseed_strength", "seed_resize_from_h",
    "seed_resize_from_w", "sampler_name", "sampler_index", "scheduler", "batch_size", "n_iter", "steps",
    "cfg_scale", "distilled_cfg_scale", "width", "height", "restore_faces", "tiling", "do_not_save_samples",
    "do_not_save_grid", "eta", "denoising_strength", "s_min_uncond", "s_churn", "s_tmax", "s_tmin", "s_noise",
    "override_settings", "override_settings_restore_afterwards", "refiner_checkpoint", "refiner_switch_at",
    "disable_extra_networks", "comments", "enable_hr", "firstphase_width", "firstphase_height", "hr_scale",
    "hr_upscaler", "hr_second_pass_steps", "hr_resize_x", "hr_resize_y", "hr_checkpoint_name", "hr_sampler_name",
    "hr_scheduler", "hr_prompt", "hr_negative_prompt", "force_task_id", "script_name", "script_args",
    "send_images", "save_images", "alwayson_scripts", "infotext", "resize_mode", "image_cfg_scale", "mask_blur",
    "mask_blur_x", "mask_blur_y", "inpainting_fill", "inpaint_full_res", "inpaint_full_res_padding",
    "inpainting_mask_invert", "initial_noise_multiplier", "include_init_images", "forge_additional_modules",
))


class A1111Fields(Fields):
    """A body's fields under AUTOMATIC1111's names; ``given`` holds what the door worked
    out itself (the model, the scheduler, the images), by runai's names."""

    def __init__(self, body, given):
        self.body = body
        self.given = given

    def lookup(self, name):
        if name in self.given:
            label, value = self.given[name]
            return repr(label), value
        a1111 = NAMES.get(name)
        if a1111 is None:
            return repr(name), None
        value = self.body.get(a1111)
        if a1111 in NUMERIC and isinstance(value, str) and len(value) < 64 and _NUMBER_TEXT.fullmatch(value):
            value = float(value) if any(c in value for c in ".eE") else int(value)
        return repr(a1111), value


def check_scripts(body):
    """AUTOMATIC1111 answers 422 for a script it does not have, and runai has none: an
    ``alwayson_scripts`` entry, or a ``script_name``, is refused naming it. An entry
    without arguments (``{}``, ``{"args": []}``, as ``webuiapi`` sends for each script it
    saw listed) asks for nothing and is ignored."""
    scripts = body.get("alwayson_scripts")
    if scripts is not None and not isinstance(scripts, dict):
        raise errors.RunaiError(errors.BAD_REQUEST, "'alwayson_scripts' must be an object")
    for name, value in (scripts or {}).items():
        args = value.get("args") if isinstance(value, dict) else value
        if value in (None, {}) or (isinstance(args, list) and all(a in (None, "", [], {}) for a in args)):
            continue
        raise errors.RunaiError(errors.BAD_REQUEST, f"always on script {name[:100]!r} not found: runai has no scripts")
    script = body.get("script_name")
    if script not in (None, "", "None"):
        shown = script[:100] if isinstance(script, str) else script
        raise errors.RunaiError(errors.BAD_REQUEST, f"script {shown!r} not found: runai has no scripts")


def decode_body(data):
    """The JSON object of a request body, or RunaiError (``bad_encoding``, ``bad_json``)."""
    return decode_object(data, "body")


def echo(body):
    """The ``parameters`` a reply repeats, as JSON text: :data:`ECHOED` keys only, with
    every NaN and infinity (which Python's JSON reader takes, and JSON has not) as null.
    A job keeps this rather than its body."""
    parts = []
    for key in sorted(ECHOED.intersection(body)):
        value = body[key]
        try:
            try:
                text = json.dumps(value, allow_nan=False)
            except ValueError:
                text = json.dumps(_finite(value), allow_nan=False)
        except RecursionError:
            text = "null"
        parts.append(f"{json.dumps(key)}: {text}")
    return "{" + ", ".join(parts) + "}"


def _finite(value):
    """``value`` with each NaN and infinity in it replaced by None, in place (iteratively:
    a body nests as deep as the JSON reader allows)."""
    top = [value]
    stack = [(top, 0)]
    while stack:
        container, key = stack.pop()
        item = container[key]
        if isinstance(item, float) and not math.isfinite(item):
            container[key] = None
        elif isinstance(item, list):
            stack.extend((item, index) for index in range(len(item)))
        elif isinstance(item, dict):
            stack.extend((item, name) for name in item)
    return top[0]


def wanted_model(body):
    """``override_settings.sd_model_checkpoint``, if the body picks a model for itself."""
    override = body.get("override_settings")
    if override is None:
        return None
    if not isinstance(override, dict):
        raise errors.RunaiError(errors.BAD_REQUEST, "'override_settings' must be an object")
    wanted = override.get("sd_model_checkpoint")
    if wanted is not None and not isinstance(wanted, str):
        raise errors.RunaiError(errors.BAD_REQUEST, "'sd_model_checkpoint' must be a string")
    return wanted or None


def _string(body, name):
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise errors.RunaiError(errors.BAD_REQUEST, f"{name!r} must be a string")
    return value


def _scheduler(body):
    """runai's scheduler for the body's sampler; None where it names none, so that the
    model's family picks its own (Euler a for SD, flow Euler for flow models)."""
    sampler = _string(body, "sampler_name") or _string(body, "sampler_index")
    schedule = _string(body, "scheduler")
    if not sampler and (schedule or "automatic").strip().lower() == "automatic":
        return None
    return scheduler_for(sampler, schedule)


def txt2img(body, model, model_dir, limits):
    """A txt2img core request for ``model`` (runai's name) from a body."""
    check_scripts(body)
    given = {"model": ("sd_model_checkpoint", model), "scheduler": ("sampler_name", _scheduler(body))}
    hr_sampler = _string(body, "hr_sampler_name")
    if hr_sampler and hr_sampler != "Use same sampler":
        given["hr_scheduler"] = ("hr_sampler_name", scheduler_for(hr_sampler, _string(body, "hr_scheduler")))
    return generation_request("txt2img", A1111Fields(body, given), model_dir, limits)


def img2img(body, model, model_dir, limits):
    """img2img, or inpaint when the body has a ``mask``; checks (decodes) the images, so
    it runs off the reactor thread."""
    check_scripts(body)
    images = body.get("init_images")
    if not isinstance(images, list) or len(images) != 1:
        raise errors.RunaiError(errors.BAD_REQUEST, "'init_images' must be a list of one base64 image")
    pixels = check_image(images[0], "init_images")
    mask = body.get("mask")
    given = {"model": ("sd_model_checkpoint", model), "scheduler": ("sampler_name", _scheduler(body)),
             "pixels": ("init_images", pixels)}
    if mask is not None:
        given["mask"] = ("mask", _adjusted_mask(check_image(mask, "mask"), body))
    action = "inpaint" if mask is not None else "img2img"
    return generation_request(action, A1111Fields(body, given), model_dir, limits)


def _adjusted_mask(encoded, body):
    """The mask as AUTOMATIC1111 would use it: inverted (``inpainting_mask_invert``) and
    blurred (``mask_blur``), white = repaint."""
    invert = body.get("inpainting_mask_invert", 0)
    if invert not in (0, 1, True, False):
        raise errors.RunaiError(errors.OUT_OF_RANGE, "'inpainting_mask_invert' must be 0 or 1")
    blur = body.get("mask_blur", 0) or 0
    if isinstance(blur, bool) or not isinstance(blur, (int, float)) or not 0 <= blur <= MAX_MASK_BLUR:
        raise errors.RunaiError(errors.OUT_OF_RANGE, f"'mask_blur' must be between 0 and {MAX_MASK_BLUR}")
    if not invert and not blur:
        return encoded
    from PIL import Image, ImageFilter, ImageOps

    with Image.open(io.BytesIO(encoded.data)) as image:
        rgba = image.convert("RGBA")
    # Transparent parts of a mask mean "keep", as in the socket protocol.
    gray = Image.composite(rgba.convert("L"), Image.new("L", rgba.size, 0), rgba.getchannel("A"))
    if invert:
        gray = ImageOps.invert(gray)
    if blur:
        gray = gray.filter(ImageFilter.GaussianBlur(blur))
    out = io.BytesIO()
    gray.save(out, format="PNG")
    return check_image(base64.b64encode(out.getvalue()).decode("ascii"), "mask")
