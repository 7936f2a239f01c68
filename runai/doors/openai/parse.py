# -*- test-case-name: runai.test.test_openai_parts,runai.test.test_openai -*-
"""OpenAI's image request fields as core requests.

``/v1/images/generations`` takes JSON; ``/edits`` and ``/variations`` take
multipart/form-data, whose text fields are typed here (``"n": "2"`` is 2). The fields
runai honours are read through :class:`OpenAIFields`, so every limit and every check is
the core's (:func:`runai.core.requests.generation_request`), and errors name OpenAI's
field (``'size'``, ``'n'``) or runai's extension (``'seed'``, ``'steps'``,
``'guidance_scale'``, ``'negative_prompt'``, ``'strength'``, ``'scheduler'``). Fields
runai has no use for (``user``, ``style``, ``background: auto``, ...) are ignored.
"""

import base64
import io
import re
from dataclasses import dataclass
from typing import Optional

from runai.core import errors
from runai.core.fields import Fields, check_integer
from runai.core.images import check_image, decode
from runai.core.requests import generation_request

MAX_N = 10
MAX_MODEL_CHARS = 4096
# runai's field -> the body's: OpenAI's own names, and runai's extensions.
NAMES = {
    "prompt": "prompt",
    "negative_prompt": "negative_prompt",
    "steps": "steps",
    "scale": "guidance_scale",
    "seed": "seed",
    "strength": "strength",
    "scheduler": "scheduler",
}
# Form fields are text: these are read as numbers and booleans.
INTEGERS = ("n", "seed", "steps", "partial_images", "output_compression")
NUMBERS = ("guidance_scale", "strength")
BOOLEANS = ("stream",)
# ``quality`` scales the family's default steps; an explicit ``steps`` wins.
QUALITY_STEPS = {"auto": 1.0, "standard": 1.0, "medium": 1.0, "low": 0.5, "high": 1.5, "hd": 1.5,
                 "xhigh": 2.0, "max": 2.0}
STYLES = ("vivid", "natural")
# output_format -> (Content-Type, Pillow's format)
FORMATS = {"png": ("image/png", "PNG"), "jpeg": ("image/jpeg", "JPEG"), "webp": ("image/webp", "WEBP")}
# Variations repaint this much of the picture unless ``strength`` says otherwise.
VARIATION_STRENGTH = 0.7
SIZE_RE = re.compile(r"^([0-9]{1,5})x([0-9]{1,5})$")
# Picture modes that cannot hold transparency: no need to decode them to look for it.
OPAQUE_MODES = ("1", "L", "RGB", "CMYK", "YCbCr", "I", "F", "I;16", "LAB", "HSV")


class OpenAIFields(Fields):
    """A body's fields under OpenAI's names; ``given`` holds what the door worked out
    itself (the model, the size, the images, the batch), as ``(label, value)``."""

    def __init__(self, body, given):
        self.body = body
        self.given = given

    def lookup(self, name):
        if name in self.given:
            return self.given[name]
        key = NAMES.get(name)
        if key is None:
            return repr(name), None
        return repr(key), self.body.get(key)


@dataclass(frozen=True)
class Reply:
    """How the client wants its answer."""

    response_format: str = "b64_json"
    output_format: str = "png"
    compression: Optional[int] = None
    quality: str = "auto"
    stream: bool = False
    partial_images: int = 0

    @property
    def content_type(self):
        return FORMATS[self.output_format][0]


def form_body(form):
    """A form's text fields as a body: numbers and booleans typed, an empty field absent."""
    body = {}
    for name in form.fields:
        value = form.field(name)
        if value == "":
            continue
        try:
            if name in INTEGERS:
                value = int(value)
            elif name in NUMBERS:
                value = float(value)
            elif name in BOOLEANS:
                value = {"true": True, "false": False, "1": True, "0": False}[value.strip().lower()]
        except (ValueError, KeyError):
            kind = "an integer" if name in INTEGERS else "a number" if name in NUMBERS else "true or false"
            raise errors.RunaiError(errors.BAD_REQUEST, f"{name!r} must be {kind}, not {value[:40]!r}")
        body[name] = value
    return body


def _choice(body, name, choices, default):
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, str) or value not in choices:
        raise errors.RunaiError(errors.BAD_REQUEST,
                                f"{name!r} must be one of {', '.join(choices)}, not {str(value)[:40]!r}")
    return value


def _integer(body, name, default, low, high):
    value = body.get(name)
    return default if value is None else check_integer(value, repr(name), low, high)


def reply_options(body, streams=True):
    """The :class:`Reply` a body asks for; ``streams``: whether the route can stream."""
    stream = body.get("stream", False) or False
    if not isinstance(stream, bool):
        raise errors.RunaiError(errors.BAD_REQUEST, "'stream' must be true or false")
    if stream and not streams:
        raise errors.RunaiError(errors.BAD_REQUEST, "'stream' is not available on this route")
    _choice(body, "style", STYLES, None)  # accepted, and without effect
    if body.get("background") == "transparent":
        raise errors.RunaiError(errors.BAD_REQUEST, "'background': runai paints opaque images; send auto or opaque")
    _choice(body, "background", ("auto", "opaque", "transparent"), None)
    return Reply(
        response_format=_choice(body, "response_format", ("b64_json", "url"), "b64_json"),
        output_format=_choice(body, "output_format", tuple(FORMATS), "png"),
        compression=_integer(body, "output_compression", None, 0, 100),
        quality=_choice(body, "quality", tuple(QUALITY_STEPS), "auto"),
        stream=stream,
        partial_images=_integer(body, "partial_images", 0, 0, 3),
    )


def wanted_model(body):
    """The model a body names, or None for the server's default."""
    model = body.get("model")
    if model is None or model == "":
        return None
    if not isinstance(model, str) or len(model) > MAX_MODEL_CHARS:
        raise errors.RunaiError(errors.BAD_REQUEST, f"'model' must be a model's name of at most {MAX_MODEL_CHARS} "
                                                    "characters (see GET /v1/models)")
    return model


def parse_size(value):
    """``(width, height)`` of ``"WxH"``; None for ``auto`` or no size (the model's family
    decides, or the picture's own size)."""
    if value is None or value == "auto":
        return None
    match = SIZE_RE.match(value) if isinstance(value, str) else None
    if match is None:
        raise errors.RunaiError(errors.BAD_REQUEST, f"'size' must be WIDTHxHEIGHT (e.g. 512x512) or auto, "
                                                    f"not {str(value)[:40]!r}")
    return int(match.group(1)), int(match.group(2))


def batch_size(n, width, height, limits):
    """How many of ``n`` images to paint at once: the largest batch that divides ``n`` and
    fits the limits (image k has seed + k however ``n`` is split)."""
    for samples in range(min(n, limits.max_samples), 0, -1):
        if n % samples == 0 and samples * width * height <= limits.max_batch_pixels and n // samples <= limits.max_iter:
            return samples
    return 1


def _request(action, body, given, model_dir, limits):
    """The core request: ``n`` split into batches, ``quality`` turned into steps, and
    previews every so many steps for a stream's ``partial_images``."""
    n = _integer(body, "n", 1, 1, MAX_N)
    size = parse_size(body.get("size"))
    given = dict(given, n_samples=("'n'", 1), n_iter=("'n'", 1))
    if size is not None:
        given.update(width=("'size' width", size[0]), height=("'size' height", size[1]))
    if body.get("moderation") is not None:
        moderation = _choice(body, "moderation", ("auto", "low"), "low")
        given["do_nsfw_filter"] = ("'moderation'", moderation == "auto")
    first = generation_request(action, OpenAIFields(body, given), model_dir, limits)
    known = len(given)
    factor = QUALITY_STEPS[_choice(body, "quality", tuple(QUALITY_STEPS), "auto")]
    steps = first.steps
    if factor != 1.0 and body.get("steps") is None:
        steps = max(1, min(limits.max_steps, round(first.steps * factor)))
        given["steps"] = ("'quality'", steps)
    partials = _integer(body, "partial_images", 0, 0, 3) if body.get("stream") is True else 0
    if partials:
        # The steps one batch runs: img2img and inpaint run ``steps x strength`` of them.
        run = steps if action == "txt2img" else max(1, int(steps * first.strength))
        given["preview_every"] = ("'partial_images'", max(1, run // (partials + 1)))
    if n == 1 and len(given) == known:
        return first  # nothing more to say: no second look
    samples = batch_size(n, first.width, first.height, limits)
    given.update(n_samples=("'n'", samples), n_iter=("'n'", n // samples))
    return generation_request(action, OpenAIFields(body, given), model_dir, limits)


def generation(body, model, model_dir, limits):
    """``POST /v1/images/generations``: a txt2img request."""
    return _request("txt2img", body, {"model": ("'model'", model)}, model_dir, limits)


def _one_file(files, name, required):
    found = files.get(name, []) + files.get(f"{name}[]", [])
    if not found:
        if required:
            raise errors.RunaiError(errors.BAD_REQUEST, f"missing {name!r}: a PNG, JPEG or WebP file")
        return None
    if len(found) > 1:
        raise errors.RunaiError(errors.BAD_REQUEST, f"{name!r}: runai takes one file, not {len(found)}")
    return check_image(base64.b64encode(found[0].data).decode("ascii"), name)


def _transparent(encoded, what):
    """Whether a checked picture has pixels that are not fully opaque."""
    if encoded.mode in OPAQUE_MODES:
        return False
    return decode(encoded, what).getchannel("A").getextrema()[0] < 255


def repaint_mask(encoded):
    """OpenAI's mask (transparent = repaint) as runai's (white = repaint)."""
    if encoded.mode in OPAQUE_MODES:
        raise errors.RunaiError(errors.BAD_REQUEST, "'mask' has no alpha channel: its transparent pixels mark "
                                                    "where to repaint")
    from PIL import ImageOps

    alpha = decode(encoded, "mask").getchannel("A")
    out = io.BytesIO()
    ImageOps.invert(alpha).save(out, format="PNG")
    return check_image(base64.b64encode(out.getvalue()).decode("ascii"), "mask")


def edit(body, files, model, model_dir, limits):
    """``POST /v1/images/edits``: inpaint where the mask (or the picture) is transparent,
    else img2img. Decodes the images: off the reactor thread."""
    pixels = _one_file(files, "image", required=True)
    mask = _one_file(files, "mask", required=False)
    given = {"model": ("'model'", model), "pixels": ("'image'", pixels)}
    if mask is not None:
        given["mask"] = ("'mask'", repaint_mask(mask))
    action = "inpaint" if mask is not None or _transparent(pixels, "image") else "img2img"
    return _request(action, body, given, model_dir, limits)


def variation(body, files, model, model_dir, limits):
    """``POST /v1/images/variations``: img2img of the picture, with no prompt (unless the
    body brings one) at :data:`VARIATION_STRENGTH`."""
    given = {"model": ("'model'", model), "pixels": ("'image'", _one_file(files, "image", required=True))}
    if body.get("strength") is None:
        given["strength"] = ("'strength'", VARIATION_STRENGTH)
    return _request("img2img", body, given, model_dir, limits)
