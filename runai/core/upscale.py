# -*- test-case-name: runai.test.test_upscalers,runai.test.test_upscale_doors -*-
"""An upscale request: client pictures made larger by an upscaler, on the same queue as
generation.

Torch-free: doors build it on the reactor's thread pool (the pictures are decoded whole
there, :func:`runai.core.images.check_image`). Every size is checked before the job
waits: each picture's own (at most the limits' side and pixel count) and the size it
would come out at. The upscaler is a built-in filter (None, Lanczos, Nearest) or a model
file of the model folder (:mod:`runai.models.upscalers`), found before queueing; the
worker runs it (:mod:`runai.engine.upscale`).
"""

from dataclasses import dataclass
from typing import Optional

from runai.core import errors
from runai.core.hires import PIXEL_UPSCALERS
from runai.core.images import EncodedImage, check_image
from runai.models import upscalers

MAX_IMAGES = 16
MAX_UPSCALE = 8.0
DEFAULT_SCALE = 2.0
MAX_NAME_CHARS = 256


@dataclass(frozen=True)
class UpscaleRequest:
    """Pictures to upscale: by ``scale``, or to ``width`` x ``height`` (one of them: the
    other keeps the aspect ratio; both with ``crop``: cover the box, then cut its middle;
    both without: stretched to it)."""

    images: tuple  # EncodedImage, checked
    upscaler: str  # a built-in's name, or a model file's as requests name it
    upscaler_path: Optional[str] = None  # the model file (resolved, inside the model folder); None: a built-in
    scale: float = DEFAULT_SCALE
    width: int = 0
    height: int = 0
    crop: bool = False
    names: tuple = ()  # what the client called each picture (extra-batch-images), for its own use
    pos_x: int = 0  # echoed with each picture, as generation replies do
    pos_y: int = 0
    id: object = None
    action: str = "upscale"

    @property
    def image_count(self):
        return len(self.images)

    @property
    def model_name(self):
        """What logs name the job's model by: its upscaler."""
        return self.upscaler

    @property
    def builtin(self):
        return self.upscaler in PIXEL_UPSCALERS

    def target(self, width, height):
        """``(resize_w, resize_h, box)``: the size a ``width`` x ``height`` picture is
        upscaled to, and the box then cut out of it (None: kept whole)."""
        if self.width and self.height:
            if not self.crop:
                return self.width, self.height, None
            scale = max(self.width / width, self.height / height)
            resize_w, resize_h = max(self.width, round(width * scale)), max(self.height, round(height * scale))
            left, top = (resize_w - self.width) // 2, (resize_h - self.height) // 2
            return resize_w, resize_h, (left, top, left + self.width, top + self.height)
        if self.width:
            return self.width, max(1, round(height * self.width / width)), None
        if self.height:
            return max(1, round(width * self.height / height)), self.height, None
        return max(1, int(width * self.scale)), max(1, int(height * self.scale)), None


def find_upscaler(name, model_dir, label="'upscaler'"):
    """``(name, path)`` of the upscaler a request names: a built-in (path None) or a model
    file; raises RunaiError naming the known ones."""
    if not isinstance(name, str) or not name or len(name) > MAX_NAME_CHARS:
        raise errors.RunaiError(errors.BAD_REQUEST, f"{label} must be an upscaler's name")
    if name in PIXEL_UPSCALERS:
        return name, None
    return name, upscalers.find(model_dir, name, PIXEL_UPSCALERS).path


def _check_sizes(request, limits, label):
    for k, image in enumerate(request.images):
        what = label if len(request.images) == 1 else f"{label} {k}"
        if max(image.width, image.height) > limits.max_size or image.width * image.height > limits.max_batch_pixels:
            raise errors.RunaiError(
                errors.OUT_OF_RANGE, f"{what} is {image.width}x{image.height}; an upscale takes at most "
                                     f"{limits.max_size} per side and {limits.max_batch_pixels} pixels")
        resize_w, resize_h, box = request.target(image.width, image.height)
        final_w, final_h = (box[2] - box[0], box[3] - box[1]) if box else (resize_w, resize_h)
        if max(resize_w, resize_h) > limits.max_size or resize_w * resize_h > limits.max_batch_pixels:
            raise errors.RunaiError(
                errors.OUT_OF_RANGE, f"{what} would be upscaled to {resize_w}x{resize_h}; the limits are "
                                     f"{limits.max_size} per side and {limits.max_batch_pixels} pixels")
        if final_w < 1 or final_h < 1:
            raise errors.RunaiError(errors.OUT_OF_RANGE, f"{what} would have no pixels left")


def upscale_request(fields, model_dir, limits, images=None, names=(), id=None):
    """An :class:`UpscaleRequest` from ``fields`` (runai's names: ``image``, ``upscaler``,
    ``scale``, ``width``, ``height``, ``crop``, ``pos_x``, ``pos_y``); ``images``: the
    pictures a door has checked already (else the ``image`` field, checked here). Raises
    RunaiError before anything is queued."""
    label, _ = fields.lookup("image")
    if images is None:
        raw = fields.raw("image")
        if raw is None:
            raise errors.RunaiError(errors.BAD_REQUEST, f"missing {label} (the picture to upscale)")
        images = [raw if isinstance(raw, EncodedImage) else check_image(raw, "image")]
    images = tuple(images)
    if not 1 <= len(images) <= MAX_IMAGES:
        raise errors.RunaiError(errors.OUT_OF_RANGE, f"an upscale takes 1 to {MAX_IMAGES} pictures, not {len(images)}")
    name, path = find_upscaler(fields.string("upscaler", default="None", max_chars=MAX_NAME_CHARS) or "None",
                               model_dir, fields.lookup("upscaler")[0])
    request = UpscaleRequest(
        images=images, upscaler=name, upscaler_path=path,
        scale=fields.number("scale", DEFAULT_SCALE, 1.0, MAX_UPSCALE),
        width=fields.integer("width", 0, 0, limits.max_size), height=fields.integer("height", 0, 0, limits.max_size),
        crop=fields.boolean("crop"), names=tuple(names),
        pos_x=fields.integer("pos_x", 0, -(2**31), 2**31 - 1), pos_y=fields.integer("pos_y", 0, -(2**31), 2**31 - 1),
        id=id,
    )
    _check_sizes(request, limits, label)
    return request
