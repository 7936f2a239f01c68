# -*- test-case-name: runai.test.test_http -*-
"""What the HTTP door answers: AUTOMATIC1111's shapes, runai's errors as HTTP statuses."""

import base64
import json
import time

import runai
from runai.core import errors
from runai.core.pngtext import parameters_text, png_with_text
from runai.doors.http.samplers import names_of

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
    errors.OUT_OF_MEMORY: 507,
}


def error(error):
    """``(status, body)`` for a RunaiError."""
    return STATUS.get(error.code, 500), {"error": error.code, "detail": error.message}


def infotext(request, seed, checkpoints):
    """The ``parameters`` text AUTOMATIC1111 writes into each PNG and into ``infotexts``."""
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
    fields.append(("Version", f"runai {runai.__version__}"))
    return parameters_text(request.prompt, request.negative_prompt, fields)


def generated(request, images, body, checkpoints, started):
    """``{"images", "parameters", "info"}`` for the images of a finished job (withheld
    ones, flagged by the safety checker, are not sent)."""
    sent = [image for image in images if not getattr(image, "withheld", False)]
    infotexts = [infotext(request, image.seed, checkpoints) for image in sent]
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
    return {
        "images": [base64.b64encode(png_with_text(image.png, {"parameters": text})).decode("ascii")
                   for image, text in zip(sent, infotexts)],
        "parameters": body,
        "info": json.dumps(info),
    }
