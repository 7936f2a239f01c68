# -*- test-case-name: runai.test.test_upscalers -*-
"""Upscaling a picture, in the worker thread: a built-in filter (None, Lanczos, Nearest)
or a model upscaler (ESRGAN and its family, loaded by :mod:`runai.models.upscaler_load`).

A model runs on tiles (:data:`TILE` pixels with :data:`OVERLAP` pixels of overlap, blended
by a linear feather) so that a large picture fits in memory; progress is reported per tile
and a cancel is honoured between tiles. Where the model's own scale is not the asked one,
AUTOMATIC1111's way is followed: the model runs again while the picture is smaller than
asked (three times at most), then a Lanczos resize gives the exact size. Transparency is
kept: the alpha channel is resized with Lanczos beside the model's colours.
"""

from dataclasses import dataclass

import numpy as np
from PIL import Image

from runai.core import errors, images
from runai.models import upscalers, upscaler_load

PIXEL_FILTERS = {"Lanczos": Image.LANCZOS, "Nearest": Image.NEAREST, "None": Image.BICUBIC}
TILE = 192
OVERLAP = 16
MAX_PASSES = 3
_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


def _starts(length, tile, overlap):
    """Where the tiles along one side start: every ``tile - overlap``, the last one flush
    with the end."""
    if length <= tile:
        return [0]
    step = tile - overlap
    starts = list(range(0, length - tile, step))
    return starts + [length - tile]


def tile_count(width, height, tile=TILE, overlap=OVERLAP):
    return len(_starts(width, tile, overlap)) * len(_starts(height, tile, overlap))


def _ramp(length, start, end, total, feather):
    """One side's blending weights of a tile: rising over ``feather`` pixels from an edge
    inside the picture, flat at the picture's own edges; never zero."""
    import torch

    weights = torch.ones(length)
    if feather <= 0:
        return weights
    steps = torch.arange(1, length + 1, dtype=torch.float32) / (feather + 1)
    if start > 0:
        weights = torch.minimum(weights, steps)
    if end < total:
        weights = torch.minimum(weights, steps.flip(0))
    return weights


def run_model(descriptor, image, tile=TILE, overlap=OVERLAP, on_tile=None, is_cancelled=None):
    """``image`` (PIL, in the model's channels) through the model, tile by tile; returns a
    PIL image ``descriptor.scale`` times larger. ``on_tile()`` follows each tile; a true
    ``is_cancelled()`` stops between tiles with JobCancelled."""
    import torch

    scale = descriptor.scale
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    pixels = pixels.permute(2, 0, 1).float().div_(255.0)
    channels, height, width = pixels.shape
    out = torch.zeros(descriptor.output_channels, height * scale, width * scale)
    weight = torch.zeros(1, height * scale, width * scale)
    device, dtype = descriptor.device, descriptor.dtype
    tile_h, tile_w = min(tile, height), min(tile, width)
    with torch.inference_mode():
        for y in _starts(height, tile_h, overlap):
            for x in _starts(width, tile_w, overlap):
                if is_cancelled is not None and is_cancelled():
                    raise errors.JobCancelled()
                piece = pixels[:, y:y + tile_h, x:x + tile_w][None].to(device=device, dtype=dtype)
                result = descriptor(piece)[0].float().cpu()
                rows = _ramp(tile_h * scale, y, y + tile_h, height, overlap * scale // 2)
                cols = _ramp(tile_w * scale, x, x + tile_w, width, overlap * scale // 2)
                mask = rows[:, None] * cols[None, :]
                out[:, y * scale:(y + tile_h) * scale, x * scale:(x + tile_w) * scale] += result * mask
                weight[:, y * scale:(y + tile_h) * scale, x * scale:(x + tile_w) * scale] += mask
                if on_tile is not None:
                    on_tile()
    array = out.div_(weight).clamp_(0, 1).mul_(255.0).round_().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array, _MODES[array.shape[2]])


def passes(width, height, scale, target_w, target_h):
    """The sizes a model of ``scale`` paints, pass by pass, to reach ``target_w`` x
    ``target_h`` from ``width`` x ``height`` (AUTOMATIC1111: while the picture is smaller,
    three passes at most; none for a picture as large already; a 1x model, once)."""
    if scale <= 1:
        return [(width, height)]
    sizes = []
    while len(sizes) < MAX_PASSES and (width < target_w or height < target_h):
        width, height = width * scale, height * scale
        sizes.append((width, height))
    return sizes


class Upscaler:
    """One upscaler, by name, for a job: a built-in filter, or a model file found in the
    model folder (``path`` resolved; None: found by name in ``model_dir``)."""

    def __init__(self, name, path=None, model_dir=None, device=None, dtype=None):
        self.name = name
        self.descriptor = None
        if name not in PIXEL_FILTERS:
            if path is None:
                if model_dir is None:
                    raise errors.RunaiError(errors.BAD_REQUEST, f"unknown upscaler {name[:64]!r}")
                path = upscalers.find(model_dir, name, tuple(PIXEL_FILTERS)).path
            import torch

            self.descriptor = upscaler_load.load(path, name, device or torch.device("cpu"), dtype or torch.float32)

    def tiles(self, width, height, target_w, target_h, tile=TILE, overlap=OVERLAP):
        """How many tiles (progress steps) upscaling one picture costs."""
        if self.descriptor is None:
            return 1
        sizes = passes(width, height, self.descriptor.scale, target_w, target_h)
        return sum(tile_count(w, h, tile, overlap) for w, h in ([(width, height)] + sizes)[:len(sizes)])

    def __call__(self, image, width, height, on_tile=None, is_cancelled=None, tile=TILE, overlap=OVERLAP):
        """``image`` (PIL) at ``width`` x ``height``."""
        if self.descriptor is None:
            if on_tile is not None:
                on_tile()
            return image.resize((width, height), PIXEL_FILTERS[self.name])
        alpha = image.getchannel("A") if image.mode in ("RGBA", "LA") else None
        mode = _MODES.get(self.descriptor.input_channels, "RGB")
        picture = image.convert(mode)
        for _ in passes(image.width, image.height, self.descriptor.scale, width, height):
            picture = run_model(self.descriptor, picture, tile, overlap, on_tile, is_cancelled)
        if picture.size != (width, height):
            picture = picture.resize((width, height), Image.LANCZOS)
        if alpha is not None and mode == "RGB":
            picture = picture.convert("RGBA")
            picture.putalpha(alpha.resize((width, height), Image.LANCZOS))
        return picture


@dataclass(frozen=True)
class UpscaledImage:
    """One upscaled picture, as :meth:`IJobListener.job_image` takes it."""

    png: bytes
    width: int
    height: int
    index: int
    seed: int = 0  # nothing random: there to read like a generated image


def run_request(request, device, dtype, model_dir, on_progress, on_image, is_cancelled):
    """Run a :class:`runai.core.upscale.UpscaleRequest`: each picture upscaled, then
    cut to its box; returns the picture count. ``on_progress(tile, total)`` counts tiles
    over all of the request's pictures."""
    from runai.engine.engine import encode_png  # the engine's: no text chunks, equal pixels equal bytes

    if is_cancelled():
        raise errors.JobCancelled()
    # Decoded first: a broken picture should not cost a load.
    pictures = [images.decode(image, "image" if len(request.images) == 1 else f"image {k}")
                for k, image in enumerate(request.images)]
    upscaler = Upscaler(request.upscaler, request.upscaler_path, model_dir, device, dtype)
    plans = [request.target(picture.width, picture.height) for picture in pictures]
    total = sum(upscaler.tiles(p.width, p.height, w, h) for p, (w, h, _) in zip(pictures, plans))
    done = [0]

    def on_tile():
        done[0] += 1
        on_progress(min(done[0], total), total)

    for index, (picture, (width, height, box)) in enumerate(zip(pictures, plans)):
        if is_cancelled():
            raise errors.JobCancelled()
        if picture.mode == "RGBA" and picture.getextrema()[3] == (255, 255):
            picture = picture.convert("RGB")  # opaque: no alpha channel to carry
        result = upscaler(picture, width, height, on_tile=on_tile, is_cancelled=is_cancelled)
        if box is not None:
            result = result.crop(box)
        pictures[index] = None
        on_image(UpscaledImage(png=encode_png(result), width=result.width, height=result.height, index=index))
    return len(plans)
