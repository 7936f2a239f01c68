# -*- test-case-name: runai.test.test_upscale_doors -*-
"""AUTOMATIC1111's upscaler routes: ``GET /sdapi/v1/upscalers``, ``POST
/sdapi/v1/extra-single-image`` and ``POST /sdapi/v1/extra-batch-images``.

The extras run as jobs on the same queue as generation (:mod:`runai.core.upscale`); their
bodies are read, their pictures decoded and their upscaler found in the thread pool,
and refused (422, 400) before anything is queued. Face restorers and a second upscaler
are not there: a body that asks for them with a visibility above 0 is refused, naming it.
"""

import base64

from twisted.internet import defer

from runai.core import errors
from runai.core.fields import Fields
from runai.core.hires import PIXEL_UPSCALERS
from runai.core.images import check_image
from runai.core.upscale import MAX_IMAGES, upscale_request
from runai.doors.http.jobs import HttpJob
from runai.models import upscalers

# runai's field -> AUTOMATIC1111's
NAMES = {"upscaler": "upscaler_1", "scale": "upscaling_resize", "width": "upscaling_resize_w",
         "height": "upscaling_resize_h", "crop": "upscaling_crop"}
# AUTOMATIC1111's defaults for resize_mode 1 (to a size).
DEFAULT_BOX = 512
# What runai has none of: refused where a body asks for it.
ABSENT = {"gfpgan_visibility": "face restorers (GFPGAN)", "codeformer_visibility": "face restorers (CodeFormer)",
          "extras_upscaler_2_visibility": "a second upscaler (upscaler_2)"}


class ExtrasFields(Fields):
    """An extras body under AUTOMATIC1111's names: ``resize_mode`` 0 upscales by
    ``upscaling_resize``, 1 to ``upscaling_resize_w`` x ``upscaling_resize_h`` (cut to it
    with ``upscaling_crop``, the default)."""

    def __init__(self, body):
        self.body = body
        mode = body.get("resize_mode", 0)
        if isinstance(mode, bool) or mode not in (0, 1):
            raise errors.RunaiError(errors.BAD_REQUEST, "'resize_mode' must be 0 (by upscaling_resize) or 1 "
                                                        "(to upscaling_resize_w x upscaling_resize_h)")
        self.to_size = mode == 1

    def lookup(self, name):
        a1111 = NAMES.get(name)
        if a1111 is None:
            return repr(name), None
        value = self.body.get(a1111)
        if name in ("width", "height", "crop") and not self.to_size:
            value = None
        elif name in ("width", "height") and value is None:
            value = DEFAULT_BOX
        elif name == "crop" and value is None:
            value = True
        elif name == "scale" and self.to_size:
            value = None
        return repr(a1111), value


def _check_absent(body):
    for name, what in ABSENT.items():
        value = body.get(name)
        if value in (None, 0, 0.0):
            continue
        if name == "extras_upscaler_2_visibility" and body.get("upscaler_2") in (None, "None", ""):
            continue
        raise errors.RunaiError(errors.BAD_REQUEST, f"{name!r} asks for {what}, which runai does not have; "
                                                    "send 0")


def single_request(body, model_dir, limits):
    """The UpscaleRequest of an ``extra-single-image`` body (decodes its picture: in the pool)."""
    _check_absent(body)
    fields = ExtrasFields(body)
    image = check_image(body.get("image"), "image")
    return upscale_request(fields, model_dir, limits, images=[image])


def batch_request(body, model_dir, limits):
    """The UpscaleRequest of an ``extra-batch-images`` body: ``imageList`` of ``{"data",
    "name"}``, at most :data:`runai.core.upscale.MAX_IMAGES`."""
    _check_absent(body)
    fields = ExtrasFields(body)
    listed = body.get("imageList")
    if not isinstance(listed, list) or not listed:
        raise errors.RunaiError(errors.BAD_REQUEST, "'imageList' must be a list of {\"data\", \"name\"} objects")
    if len(listed) > MAX_IMAGES:
        raise errors.RunaiError(errors.OUT_OF_RANGE, f"'imageList' holds {len(listed)} pictures; the limit is "
                                                     f"{MAX_IMAGES}")
    images, names = [], []
    for k, item in enumerate(listed):
        if not isinstance(item, dict):
            raise errors.RunaiError(errors.BAD_REQUEST, f"'imageList' item {k} must be an object")
        name = item.get("name", "")
        if not isinstance(name, str) or len(name) > 1024:
            raise errors.RunaiError(errors.BAD_REQUEST, f"'imageList' item {k}: 'name' must be a short string")
        images.append(check_image(item.get("data"), f"imageList {k}"))
        names.append(name)
    return upscale_request(fields, model_dir, limits, images=images, names=names)


def html_info(request):
    """What AUTOMATIC1111's extras say they did, as its ``html_info``."""
    if request.width and request.height:
        how = f"Postprocess upscale to: {request.width}x{request.height}"
    else:
        how = f"Postprocess upscale by: {request.scale:g}"
    return f"<p>{how}, Postprocess upscaler: {request.upscaler}</p>"


class Extras:
    """The routes of one :class:`runai.doors.http.api.Api`: its core, pool and limits;
    ``still_there(request)`` raises where the client has left (the Api's own check)."""

    def __init__(self, api, still_there):
        self.api = api
        self.still_there = still_there

    def upscalers(self, request):
        """Built-ins first (None, Lanczos, Nearest), then the model files by name; a model's
        ``model_path`` is its name relative to the model folder."""
        builtins = [{"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": 4}
                    for name in PIXEL_UPSCALERS]
        d = self.api._off_reactor(upscalers.listing, self.api.core.model_dir)
        return d.addCallback(lambda models: builtins + models)

    def single(self, request):
        return self._run(request, single_request,
                         lambda upscale, images: {"html_info": html_info(upscale), "image": _b64(images[0])})

    def batch(self, request):
        return self._run(request, batch_request,
                         lambda upscale, images: {"html_info": html_info(upscale),
                                                  "images": [_b64(image) for image in images]})

    @defer.inlineCallbacks
    def _run(self, request, build, answer):
        api = self.api
        body = yield api._body(request)
        self.still_there(request)
        upscale = yield api._off_reactor(build, body, api.core.model_dir, api.limits)
        del body
        self.still_there(request)
        listener = HttpJob(api.running)
        job = api.core.submit(upscale, request, listener)
        request.notifyFinish().addErrback(lambda _: api.core.cancel(job))
        images = yield listener.result
        if len(images) < upscale.image_count:  # interrupted: no picture half done
            raise errors.JobCancelled()
        return answer(upscale, sorted(images, key=lambda image: image.index))


def _b64(image):
    return base64.b64encode(image.png).decode("ascii")
