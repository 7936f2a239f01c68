# -*- test-case-name: runai.test.test_http_parse -*-
"""AUTOMATIC1111's request bodies as core requests.

Clients send some 45 keys (``webuiapi`` sends every one it knows); runai reads those it
can honour and ignores the rest. Errors name AUTOMATIC1111's field (``'cfg_scale'``).
"""

import base64
import io
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
    # Forge's name for the guidance a guidance-distilled model is conditioned on.
    "distilled_cfg_scale": "distilled_cfg_scale",
    # Forge's companion files (VAE, text encoders) for a model that needs them.
    "modules": "forge_additional_modules",
}
MAX_MASK_BLUR = 64


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
        return repr(a1111), self.body.get(a1111)


def decode_body(data):
    """The JSON object of a request body, or RunaiError (``bad_encoding``, ``bad_json``)."""
    return decode_object(data, "body")


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
    given = {"model": ("sd_model_checkpoint", model), "scheduler": ("sampler_name", _scheduler(body))}
    return generation_request("txt2img", A1111Fields(body, given), model_dir, limits)


def img2img(body, model, model_dir, limits):
    """img2img, or inpaint when the body has a ``mask``; checks (decodes) the images, so
    it runs off the reactor thread."""
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
