# -*- test-case-name: runai.test.test_broker_wire -*-
"""What travels through Redis: the keys, a job's request as stream fields, and a job's
events (start, progress, image, done, failed) back to its front.

A request travels as the fields a worker needs and nothing of the front's machine: the
model's name relative to the model folder (never the front's absolute path: each worker
resolves it in its own ``--model-dir``), the client's images as the checked bytes the
front holds (PNG, JPEG, ... with their format and size), scalars as one JSON object.
Every entry carries :data:`VERSION`; a reader refuses another.
"""

import dataclasses
import json
import math
import typing
from pathlib import Path
from dataclasses import dataclass, fields as dataclass_fields
from typing import Optional

from runai.core import errors
from runai.core.images import EncodedImage
from runai.core.hires import Hires
from runai.core.requests import GenerationRequest, resolve_modules
from runai.core.upscale import MAX_IMAGES as MAX_UPSCALE_IMAGES
from runai.core.upscale import UpscaleRequest, find_upscaler
from runai.models import embeddings, loras
from runai.models.paths import resolve_model, safety_checker_path

VERSION = 1
PREFIX = "runai:"
GROUP = "runai-workers"

# The request's scalar fields, as they travel (model_path and images travel otherwise).
_SCALARS = tuple(f.name for f in dataclass_fields(GenerationRequest)
                 if f.name not in ("model_path", "pixels", "mask", "safety_checker", "id", "module_paths"))


class Keys:
    """The Redis keys of one deployment (``prefix`` apart, fronts and workers agree)."""

    def __init__(self, prefix=PREFIX):
        self.prefix = prefix
        self.jobs = prefix + "jobs"  # the stream of jobs, read by the workers' group
        self.queue = prefix + "queue"  # sorted set of job keys waiting or running: positions
        self.workers = prefix + "workers"  # set of worker names (each with a key that expires)
        self.cancels = prefix + "cancels"  # pub/sub channel: the keys of jobs cancelled

    def reply(self, front):
        return f"{self.prefix}reply:{front}"

    def front(self, front):
        return f"{self.prefix}front:{front}"

    def cancel(self, job_key):
        return f"{self.prefix}cancel:{job_key}"

    def worker(self, name):
        return f"{self.prefix}worker:{name}"


class WireError(errors.RunaiError):
    def __init__(self, message):
        super().__init__(errors.INTERNAL, message)


def _text(value):
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _fields(entry):
    """Stream fields with text names (redis-py hands bytes); WireError for a name that is
    not UTF-8."""
    try:
        return {_text(k): v for k, v in entry.items()}
    except (UnicodeDecodeError, AttributeError) as e:
        raise WireError(f"an entry with a malformed field name: {e!r}") from None


# The types of the request's scalars that a worker checks before it runs anything.
_TYPES = {int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
          str: lambda v: isinstance(v, str), bool: lambda v: isinstance(v, bool),
          tuple: lambda v: isinstance(v, (list, tuple))}


def _check_scalars(values):
    """WireError unless each plain scalar of a job has its field's type (an entry that did
    not come from a front of this version, or was damaged)."""
    for field in dataclass_fields(GenerationRequest):
        if field.name not in values:
            continue
        kind, optional = field.type, False
        if typing.get_origin(kind) is typing.Union and type(None) in typing.get_args(kind):
            optional, kind = True, next(k for k in typing.get_args(kind) if k is not type(None))
        check = _TYPES.get(kind)
        value = values[field.name]
        if check is not None and not (optional and value is None) and not check(value):
            raise WireError(f"a job with a malformed request: {field.name!r} is not {kind.__name__}")


def _check_version(fields):
    try:
        version = _text(fields.get("v", b"?"))
    except UnicodeDecodeError:
        version = "?"
    if version != str(VERSION):
        raise WireError(f"broker wire version {version} is not {VERSION}: run the same runai on fronts and workers")


def _image_fields(name, image):
    if image is None:
        return {}
    meta = {"format": image.format, "width": image.width, "height": image.height, "mode": image.mode}
    return {name: image.data, name + "_meta": json.dumps(meta)}


def _image(fields, name):
    if name not in fields:
        return None
    meta = json.loads(fields[name + "_meta"])
    return EncodedImage(data=bytes(fields[name]), format=meta["format"], width=int(meta["width"]),
                        height=int(meta["height"]), mode=meta["mode"])


# Requests --------------------------------------------------------------------------------

def encode_job(request, key, front):
    """The stream fields of ``request`` (a GenerationRequest or an UpscaleRequest), job
    ``key``, replies to ``front``."""
    if isinstance(request, UpscaleRequest):
        return _encode_upscale(request, key, front)
    scalars = {name: getattr(request, name) for name in _SCALARS}
    # LoRAs travel by the name the prompt gave, with their weights: found again by the worker.
    scalars["loras"] = [[ref.name, ref.te, ref.unet] for ref in request.loras]
    # Embeddings travel by name, found again in the worker's folder.
    scalars["embeddings"] = [ref.name for ref in request.embeddings]
    if request.hires is not None:
        # The second pass's LoRAs travel by name too (None: the first pass's).
        refs = request.hires.loras
        scalars["hires"] = dict(dataclasses.asdict(request.hires),
                                loras=None if refs is None else [[ref.name, ref.te, ref.unet] for ref in refs])
    fields = {"v": VERSION, "key": key, "front": front, "request": json.dumps(scalars)}
    fields.update(_image_fields("pixels", request.pixels))
    fields.update(_image_fields("mask", request.mask))
    return fields


@dataclass(frozen=True)
class WireJob:
    key: str
    front: str
    fields: dict  # the raw fields, decoded into a request by :meth:`request`

    def request(self, model_dir):
        """The GenerationRequest, its model resolved in ``model_dir`` (this worker's own):
        raises RunaiError (``model_not_found``, ``path_outside_model_dir``)."""
        _check_version(self.fields)
        if _text(self.fields.get("kind", b"")) == "upscale":
            return _upscale_request(self.fields, Path(model_dir), self.key)
        try:
            scalars = json.loads(self.fields["request"])
            values = {name: scalars[name] for name in _SCALARS}
        except (KeyError, ValueError, TypeError) as e:
            raise WireError(f"a job with a malformed request: {e!r}") from None
        _check_scalars(values)
        model_dir = Path(model_dir)
        model_path, model_name = resolve_model(model_dir, values.pop("model_name"))
        if values.get("hires") is not None:
            try:
                hires = Hires(**values["hires"])
                if hires.loras is not None:
                    hires = dataclasses.replace(hires, loras=tuple(
                        loras.LoraRef(name=str(n), path="", te=te, unet=unet) for n, te, unet in hires.loras))
            except (TypeError, ValueError) as e:
                raise WireError(f"a job with a malformed hires pass: {e!r}") from None
            values["hires"] = hires if hires.loras is None else dataclasses.replace(
                hires, loras=loras.resolve(model_dir, hires.loras))
        # Companion files travel by name too, and are found in this worker's folder.
        values["modules"], module_paths = resolve_modules(model_dir, values.get("modules") or ())
        try:
            wanted = [loras.LoraRef(name=str(n), path="", te=te, unet=unet)
                      for n, te, unet in values.get("loras") or ()]
        except (TypeError, ValueError) as e:
            raise WireError(f"a job with malformed LoRAs: {e!r}") from None
        values["loras"] = loras.resolve(model_dir, wanted)
        names = values.get("embeddings") or []
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise WireError("a job with malformed embeddings")
        values["embeddings"] = embeddings.by_names(model_dir, names)
        safety = safety_checker_path(model_dir) if values["nsfw_filter"] else None
        return GenerationRequest(model_path=str(model_path), model_name=model_name, safety_checker=safety,
                                 module_paths=module_paths,
                                 pixels=_image(self.fields, "pixels"), mask=_image(self.fields, "mask"), id=self.key,
                                 **values)


# Upscale jobs: the upscaler by name (found again in the worker's folder), the pictures as
# image0, image1, ... with their meta.
_UPSCALE_SCALARS = {"upscaler": str, "scale": float, "width": int, "height": int, "crop": bool, "pos_x": int,
                    "pos_y": int}


def _encode_upscale(request, key, front):
    scalars = {name: getattr(request, name) for name in _UPSCALE_SCALARS}
    scalars.update(names=list(request.names), images=len(request.images))
    fields = {"v": VERSION, "key": key, "front": front, "kind": "upscale", "request": json.dumps(scalars)}
    for k, image in enumerate(request.images):
        fields.update(_image_fields(f"image{k}", image))
    return fields


def _upscale_request(fields, model_dir, key):
    try:
        scalars = json.loads(fields["request"])
        values = {name: scalars[name] for name in _UPSCALE_SCALARS}
        count, names = scalars["images"], scalars.get("names") or []
        if not all(_TYPES[kind](values[name]) for name, kind in _UPSCALE_SCALARS.items()):
            raise TypeError("a scalar of the wrong type")
        if not _whole(count) or not 1 <= count <= MAX_UPSCALE_IMAGES or not isinstance(names, list) \
                or not all(isinstance(n, str) for n in names):
            raise TypeError("malformed pictures")
        images = tuple(_image(fields, f"image{k}") for k in range(count))
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise WireError(f"a job with a malformed upscale: {e!r}") from None
    if any(image is None for image in images):
        raise WireError("a job with a missing picture")
    name, path = find_upscaler(values.pop("upscaler"), model_dir)
    return UpscaleRequest(images=images, upscaler=name, upscaler_path=path, names=tuple(names), id=key, **values)


def decode_job(entry):
    """A :class:`WireJob` from stream fields; raises WireError."""
    fields = _fields(entry)
    try:
        return WireJob(key=_text(fields["key"]), front=_text(fields["front"]), fields=fields)
    except KeyError as e:
        raise WireError(f"a job without {e}") from None
    except UnicodeDecodeError as e:
        raise WireError(f"a job whose key or front is not UTF-8: {e!r}") from None


# Events ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class WireImage:
    """An image as a worker sent it: what :meth:`IJobListener.job_image` takes."""

    png: bytes
    seed: int
    width: int
    height: int
    index: int
    nsfw_checked: Optional[bool] = None
    withheld: bool = False


@dataclass(frozen=True)
class Event:
    key: str
    attempt: str
    type: str  # start, progress, image, done, failed
    data: dict  # start: worker, deliveries; progress: step, total; done: result, seconds;
    #             failed: code, message
    image: Optional[WireImage] = None
    preview: Optional[bytes] = None  # progress: the picture so far, when asked for


def _event(key, attempt, kind, data, **extra):
    fields = {"v": VERSION, "key": key, "attempt": attempt, "type": kind, "data": json.dumps(data)}
    fields.update(extra)
    return fields


def start_event(key, attempt, worker, deliveries):
    return _event(key, attempt, "start", {"worker": worker, "deliveries": deliveries})


def progress_event(key, attempt, step, total, preview=None):
    if preview is None:
        return _event(key, attempt, "progress", {"step": step, "total": total})
    return _event(key, attempt, "progress", {"step": step, "total": total}, preview=bytes(preview))


def image_event(key, attempt, image):
    meta = {"seed": image.seed, "width": image.width, "height": image.height, "index": image.index,
            "nsfw_checked": getattr(image, "nsfw_checked", None), "withheld": bool(getattr(image, "withheld", False))}
    return _event(key, attempt, "image", meta, png=bytes(image.png))


def done_event(key, attempt, result, seconds):
    return _event(key, attempt, "done", {"result": result, "seconds": seconds})


def failed_event(key, attempt, error):
    return _event(key, attempt, "failed", {"code": error.code, "message": error.message})


def decode_event(entry):
    """An :class:`Event` from stream fields; raises WireError."""
    fields = _fields(entry)
    _check_version(fields)
    try:
        kind = _text(fields["type"])
        data = json.loads(fields["data"])
        _check_event_data(kind, data)
        image = preview = None
        if kind == "image":
            image = WireImage(png=bytes(fields["png"]), **data)
        elif kind == "progress" and "preview" in fields:
            preview = bytes(fields["preview"])
        return Event(key=_text(fields["key"]), attempt=_text(fields["attempt"]), type=kind, data=data, image=image,
                     preview=preview)
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise WireError(f"a malformed event: {e!r}") from None


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _whole(value):
    return isinstance(value, int) and not isinstance(value, bool)


# What each kind of event's data holds, and what a front reads of it.
_EVENT_DATA = {
    "start": {"deliveries": _whole},
    "progress": {"step": _whole, "total": _whole},
    "image": {"seed": _whole, "width": _whole, "height": _whole, "index": _whole},
    "done": {"result": _whole, "seconds": _number},
    "failed": {"code": lambda v: isinstance(v, str), "message": lambda v: isinstance(v, str)},
}


def _check_event_data(kind, data):
    checks = _EVENT_DATA.get(kind)
    if checks is None:
        raise ValueError(f"unknown event type {kind[:40]!r}")
    if not isinstance(data, dict):
        raise TypeError(f"a {kind} event's data is not an object")
    for name, check in checks.items():
        if not check(data.get(name)):
            raise TypeError(f"a {kind} event's {name!r} is missing or of the wrong type")


def event_error(event):
    """The RunaiError of a ``failed`` event."""
    return errors.RunaiError(str(event.data.get("code", errors.INTERNAL)), str(event.data.get("message", "")))
