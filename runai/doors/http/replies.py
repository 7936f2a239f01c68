# -*- test-case-name: runai.test.test_http -*-
"""What the HTTP door answers: AUTOMATIC1111's shapes, runai's errors as HTTP statuses."""

import base64
import json
import time

import runai
from runai.core import errors
from runai.core.pngtext import parameters_text, png_with_text
from runai.doors.http.lora_hashes import infotext_value
from runai.doors.http.samplers import names_of
from runai.models import embeddings

# runai's error codes as HTTP statuses; anything else is 500.
STATUS = {
    errors.BAD_ENCODING: 400,
    errors.BAD_JSON: 400,
    errors.BAD_REQUEST: 422,
    errors.OUT_OF_RANGE: 422,
    errors.PATH_OUTSIDE_MODEL_DIR: 422,
    errors.SAFETY_CHECKER_MISSING: 422,
    errors.UNKNOWN_SCHEDULER: 404,
    errors.MODEL_NOT_FOUND: 404,
    errors.NOT_FOUND: 404,
    errors.UNAUTHORIZED: 401,
    errors.MESSAGE_TOO_LARGE: 413,
    errors.QUEUE_FULL: 503,
    errors.SHUTTING_DOWN: 503,
    errors.BROKER_UNAVAILABLE: 503,
    errors.OUT_OF_MEMORY: 507,
}
# Reason phrases twisted.web does not know.
REASONS = {
    400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 408: "Request Timeout", 413: "Content Too Large",
    414: "URI Too Long", 422: "Unprocessable Content", 431: "Request Header Fields Too Large",
    500: "Internal Server Error", 503: "Service Unavailable", 507: "Insufficient Storage",
}
# An error's detail quotes what the client sent: at most this much of it comes back.
MAX_DETAIL_CHARS = 1000


def bounded(text, limit=MAX_DETAIL_CHARS):
    """``text``, cut to ``limit`` characters: a message names what was wrong first, and
    whatever it quotes of the request comes after."""
    if len(text) <= limit:
        return text
    more = f"... ({len(text)} characters)"
    return text[:limit - len(more)] + more


def error(error):
    """``(status, body)`` for a RunaiError."""
    return STATUS.get(error.code, 500), {"error": error.code, "detail": bounded(error.message)}


def quote(text):
    """An infotext value as AUTOMATIC1111 writes it: as it is, or JSON-quoted where it has
    a comma, a colon or a line break."""
    return text if not any(mark in text for mark in ",:\n") else json.dumps(text, ensure_ascii=False)


def infotext(request, seed, checkpoints, lora_hashes=()):
    """The ``parameters`` text AUTOMATIC1111 writes into each PNG and into ``infotexts``
    (``lora_hashes``: ``[(name, short hash)]`` of the job's LoRAs, both passes')."""
    sampler, schedule = names_of(request.scheduler)
    fields = [
        ("Steps", request.steps), ("Sampler", sampler), ("Schedule type", schedule),
        ("CFG scale", f"{request.scale:g}"), ("Seed", seed), ("Size", f"{request.width}x{request.height}"),
        ("Model hash", checkpoints.hash_of(request.model_name)),
        ("Model", request.model_name),
    ]
    if getattr(request, "distilled_scale", None) is not None:
        # Forge's field, for models conditioned on a distilled guidance.
        fields.insert(4, ("Distilled CFG Scale", f"{request.distilled_scale:g}"))
    if request.action != "txt2img":
        fields.append(("Denoising strength", f"{request.strength:g}"))
    hires = getattr(request, "hires", None)
    if hires is not None:
        fields += [("Denoising strength", f"{hires.strength:g}"), ("Hires upscale", f"{hires.scale:g}"),
                   ("Hires steps", hires.steps), ("Hires upscaler", hires.upscaler)]
        # AUTOMATIC1111's, where the second pass has prompts of its own (their <lora:...> included).
        if hires.prompt and hires.prompt != request.prompt:
            fields.append(("Hires prompt", quote(hires.prompt)))
        if hires.negative_prompt and hires.negative_prompt != request.negative_prompt:
            fields.append(("Hires negative prompt", quote(hires.negative_prompt)))
    fields.append(("Lora hashes", infotext_value(lora_hashes)))
    fields.append(("TI hashes", infotext_value(ti_hashes(request))))
    fields.append(("Version", f"runai {runai.__version__}"))
    return parameters_text(request.prompt, request.negative_prompt, fields)


def ti_hashes(request):
    """``[(name, short hash)]`` of the embeddings the job's prompts used (small files,
    hashed once per size and modification time)."""
    found = [(ref.name, embeddings.short_hash(ref.path)) for ref in getattr(request, "embeddings", ())]
    return [(name, sha) for name, sha in found if sha]


def generated(request, images, echo, checkpoints, started, lora_hashes=()):
    """``{"images", "parameters", "info"}`` for the images of a finished job (withheld
    ones, flagged by the safety checker, are not sent), as JSON bytes; ``echo`` is the
    ``parameters`` as JSON text (:func:`runai.doors.http.parse.echo`)."""
    sent = [image for image in images if not getattr(image, "withheld", False)]
    infotexts = [infotext(request, image.seed, checkpoints, lora_hashes) for image in sent]
    sampler, schedule = names_of(request.scheduler)
    seeds = request.seeds()
    info = {
        "prompt": request.prompt, "all_prompts": [request.prompt] * len(sent),
        "negative_prompt": request.negative_prompt, "all_negative_prompts": [request.negative_prompt] * len(sent),
        "seed": request.seed, "all_seeds": [image.seed for image in sent] or seeds,
        "subseed": -1, "all_subseeds": [-1] * len(sent), "subseed_strength": 0,
        "width": request.width, "height": request.height, "sampler_name": sampler, "scheduler": schedule,
        "cfg_scale": request.scale, "steps": request.steps, "batch_size": request.n_samples,
        "n_iter": request.n_iter, "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": request.model_name, "sd_model_hash": checkpoints.hash_of(request.model_name),
        "sd_vae_name": None, "sd_vae_hash": None, "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": request.strength if request.action != "txt2img" else None,
        "extra_generation_params": {}, "index_of_first_image": 0, "infotexts": infotexts, "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(started)), "clip_skip": 1,
        "is_using_inpainting_conditioning": request.action == "inpaint", "version": f"runai {runai.__version__}",
        "nsfw_checked": [getattr(image, "nsfw_checked", None) for image in sent],
        "withheld": len(images) - len(sent),
    }
    head = json.dumps({"images": [base64.b64encode(png_with_text(image.png, {"parameters": text})).decode("ascii")
                                  for image, text in zip(sent, infotexts)]})
    return f'{head[:-1]}, "parameters": {echo}, "info": {json.dumps(json.dumps(info))}}}'.encode("utf-8")
