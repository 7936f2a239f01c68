# -*- test-case-name: runai.test.test_legacy_session -*-
"""Every reply of the legacy socket protocol, as the JSON object it is sent as.

What the old clients read is recorded in ``shared/reference/legacy-wire-format.md``:
a progress message's ``action`` is the number 4, an image message has no ``action``
(a legacy client shows any message with an ``image``), and every reply to a request
carries that request's ``reqtype`` and ``id``.
"""

import base64

import runai
from runai.core.hires import PIXEL_UPSCALERS


def error(error, reqtype=None, request_id=None):
    """``{"error": {"code", "message"}, "reqtype", "id"}`` for a RunaiError."""
    return {"error": {"code": error.code, "message": error.message}, "reqtype": reqtype, "id": request_id}


def of_request(request, message):
    """``message`` as a reply to ``request``: its ``reqtype`` (unless set) and ``id``."""
    message.setdefault("reqtype", request.action)
    message["id"] = request.id
    return message


def pong(request_id, queued, busy, workers):
    return {"action": "pong", "version": runai.__version__, "id": request_id, "queued": queued, "busy": busy,
            "workers": workers}


def queued(position):
    return {"action": "queued", "position": position}


def progress(step, total, preview=None):
    """A progress message; with ``preview`` (PNG bytes, asked for by ``preview_every``)
    the picture so far, base64."""
    message = {"action": 4, "step": step, "total": total}
    if preview is not None:
        message["preview"] = base64.b64encode(preview).decode("ascii")
    return message


def image(request, image, extra=None):
    """An image reply, or ``withheld`` (no ``image`` key: a legacy client ignores it)
    for one the safety checker flagged."""
    about = {"seed": image.seed, "width": image.width, "height": image.height, "index": image.index}
    if getattr(image, "withheld", False):
        return dict(about, action="withheld", reason="nsfw")
    message = {
        "image": base64.b64encode(image.png).decode("ascii"),
        "pos_x": request.pos_x, "pos_y": request.pos_y,
    }
    message.update(about)
    checked = getattr(image, "nsfw_checked", None)
    if checked is not None:
        message["nsfw_checked"] = checked
    return message


def done(count, seconds=None):
    message = {"action": "done", "images": count}
    if seconds is not None:
        message["seconds"] = round(seconds, 3)
    return message


def converted(result, seconds):
    """A ``convert`` job's end: ``result`` is a :class:`runai.models.convert.ConvertResult`."""
    return {"action": "done", "path": result.path, "source": result.source, "format": "diffusers",
            "version": result.version, "seconds": round(seconds, 3)}


def model(entry, loaded=()):
    """One model of the ``models`` list, from a :class:`runai.models.library.ModelEntry`."""
    c = entry.classification
    wire = {
        "name": entry.name,
        "version": c.version,
        "format": entry.format,
        "kind": c.kind,
        "inpainting": c.inpainting,
        "in_channels": c.in_channels,
        "prediction_type": c.prediction_type,
        "size": entry.size,
        "served": entry.served,
        "loaded": entry.path in loaded,
    }
    if c.variant:
        wire["variant"] = c.variant  # within a family (dev, schnell, fill), or a text encoder's (clip_l, t5xxl)
    if entry.sidecar:
        wire["config"] = entry.sidecar
    if entry.error:
        wire["error"] = entry.error
    return wire


def models(entries, loaded, request_id):
    return {"action": "models", "models": [model(e, loaded) for e in entries], "id": request_id}


def loras(files, request_id):
    """The ``loras`` action's answer: each LoRA file (:class:`runai.models.loras.LoraFile`)
    by the name prompts use for it (``<lora:name:weight>``), its path in the model folder,
    the family it was made for and its size."""
    return {"action": "loras", "id": request_id, "loras": [
        {"name": f.name, "alias": f.alias, "path": f.relative, "version": f.family, "size": f.size} for f in files]}


def embeddings(listed, model, request_id):
    """The ``embeddings`` action's answer: A1111's ``loaded`` and ``skipped`` (name ->
    ``step``, ``sd_checkpoint``, ``sd_checkpoint_name``, ``shape``, ``vectors``) for
    ``model``, or every file under ``loaded`` where the request named no model."""
    return {"action": "embeddings", "id": request_id, "model": model, **listed}


def upscalers(listed, request_id):
    """The ``upscalers`` action's answer: the built-in filters, then each model upscaler
    (A1111's listing: ``name``, ``model_name`` (its architecture), ``model_path`` (relative
    to the model folder), ``scale``) by the name an ``upscale`` request gives."""
    builtins = [{"name": name, "path": None, "arch": None, "scale": None} for name in PIXEL_UPSCALERS]
    return {"action": "upscalers", "id": request_id, "upscalers": builtins + [
        {"name": u["name"], "path": u["model_path"], "arch": u["model_name"], "scale": u["scale"]} for u in listed]}
