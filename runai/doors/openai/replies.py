# -*- test-case-name: runai.test.test_openai_parts,runai.test.test_openai -*-
"""What the OpenAI door answers: OpenAI's shapes, runai's errors as the statuses the
official client turns into its exception classes."""

import base64
import io
import json
import re
import time

from runai.core import errors
from runai.doors.openai.parse import FORMATS

# runai's error codes as HTTP statuses (the client's classes: 400 BadRequestError, 401
# AuthenticationError, 404 NotFoundError, 422 UnprocessableEntityError, 429
# RateLimitError, 5xx InternalServerError); anything else is 500.
STATUS = {
    errors.BAD_ENCODING: 400,
    errors.BAD_JSON: 400,
    errors.BAD_REQUEST: 400,
    errors.OUT_OF_RANGE: 400,
    errors.UNKNOWN_SCHEDULER: 400,
    errors.UNKNOWN_ACTION: 400,
    errors.UNAUTHORIZED: 401,
    errors.MODEL_NOT_FOUND: 404,
    errors.PATH_OUTSIDE_MODEL_DIR: 404,
    errors.NOT_FOUND: 404,
    errors.MESSAGE_TOO_LARGE: 413,
    errors.SAFETY_CHECKER_MISSING: 422,
    errors.QUEUE_FULL: 429,
    errors.SHUTTING_DOWN: 503,
    errors.CANCELLED: 503,
    errors.BROKER_UNAVAILABLE: 503,
    errors.OUT_OF_MEMORY: 507,
}
TYPES = {401: "authentication_error", 429: "rate_limit_error"}
# The fields an error may name as its ``param``.
PARAMS = ("model", "prompt", "negative_prompt", "n", "size", "response_format", "output_format",
          "output_compression", "quality", "style", "background", "moderation", "stream", "partial_images",
          "seed", "steps", "guidance_scale", "strength", "scheduler", "image", "mask")
PARAM_RE = re.compile(r"'([a-z_]+)'")
# OpenAI's usage block: runai counts no tokens.
NO_USAGE = {"input_tokens": 0, "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
            "output_tokens": 0, "total_tokens": 0}


def error_reply(error):
    """``(status, body)`` for a RunaiError: ``{"error": {"message", "type", "param",
    "code"}}``, ``code`` being runai's. A model outside the model folder is, to this door,
    a model that does not exist."""
    code = errors.MODEL_NOT_FOUND if error.code == errors.PATH_OUTSIDE_MODEL_DIR else error.code
    status = STATUS.get(code, 500)
    if code == errors.MODEL_NOT_FOUND:
        param = "model"
    else:
        match = PARAM_RE.search(error.message)
        param = match.group(1) if match and match.group(1) in PARAMS else None
    return status, {"error": {"message": error.message, "type": _type(status), "param": param, "code": code}}


def _type(status):
    return TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_body(status, error):
    """The body of an answer the site gives before a route sees the request, with the
    status the site chose (408, 413, 414, 431, 503...): OpenAI's error shape."""
    _, body = error_reply(error)
    body["error"]["type"] = _type(status)
    return json.dumps(body).encode("utf-8")


def encode(image, reply):
    """One finished image in the format the client asked for: ``(bytes, extension)``.
    Converting takes tens of milliseconds for a large image: in the pool."""
    if reply.output_format == "png":
        return image.png, "png"
    from PIL import Image

    out = io.BytesIO()
    with Image.open(io.BytesIO(image.png)) as decoded:
        rgb = decoded.convert("RGB")
    quality = reply.compression if reply.compression is not None else 90
    rgb.save(out, format=FORMATS[reply.output_format][1], quality=quality)
    return out.getvalue(), reply.output_format


def encode_preview(png, request, reply):
    """A live preview (one pixel per latent) at the requested size, in the requested
    format: a stream's partial image (in the pool)."""
    from PIL import Image

    out = io.BytesIO()
    with Image.open(io.BytesIO(png)) as preview:
        scaled = preview.convert("RGB").resize((request.width, request.height), Image.BILINEAR)
    options = {} if reply.output_format == "png" else {"quality": reply.compression or 90}
    scaled.save(out, format=FORMATS[reply.output_format][1], **options)
    return out.getvalue()


def encode_all(images, reply):
    """Every image a job made and did not withhold, encoded (in the pool)."""
    return [(image, *encode(image, reply)) for image in images if not getattr(image, "withheld", False)]


def images_response(encoded, request, reply, url_of):
    """``{"created", "data": [...]}``; each item ``b64_json`` or ``url`` (``url_of(data,
    extension)`` keeps the image and says where), plus runai's ``seed``."""
    data = []
    for image, payload, extension in encoded:
        item = {"url": url_of(payload, extension)} if reply.response_format == "url" else {
            "b64_json": base64.b64encode(payload).decode("ascii")}
        item["seed"] = image.seed
        data.append(item)
    return {
        "created": int(time.time()), "data": data, "background": "opaque",
        "output_format": reply.output_format, "size": f"{request.width}x{request.height}",
    }


def event(kind, payload):
    """One server-sent event: ``event: KIND`` and its JSON."""
    return f"event: {kind}\ndata: {json.dumps(payload)}\n\n".encode("utf-8")


def _event_fields(kind, payload, request, reply):
    return {
        "type": kind, "b64_json": base64.b64encode(payload).decode("ascii"), "created_at": int(time.time()),
        "size": f"{request.width}x{request.height}",
        "quality": reply.quality if reply.quality in ("low", "medium", "high", "auto") else "auto",
        "background": "opaque", "output_format": reply.output_format,
    }


def partial_event(prefix, index, payload, request, reply):
    """``image_generation.partial_image`` (``image_edit.partial_image``): a live preview."""
    kind = f"{prefix}.partial_image"
    return event(kind, dict(_event_fields(kind, payload, request, reply), partial_image_index=index))


def completed_event(prefix, image, payload, request, reply):
    """``image_generation.completed`` (``image_edit.completed``) for one image."""
    kind = f"{prefix}.completed"
    return event(kind, dict(_event_fields(kind, payload, request, reply), usage=NO_USAGE, seed=image.seed))


def error_event(error):
    """The stream's last event when its job fails after the stream began."""
    return event("error", {"type": "error", "error": error_reply(error)[1]["error"]})
