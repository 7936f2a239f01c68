# -*- test-case-name: runai.test.test_modes,runai.test.test_engine_xl -*-
"""The four generation modes on one loaded model: which pipeline, which inputs, and what
happens to the images afterwards. Worker thread only (imports diffusers).

All modes share the loaded model's weights: the img2img and inpaint pipelines are built
from the txt2img pipeline's components, which costs no memory and no load. An SDXL model
gets the SDXL pipelines of each mode, with diffusers' default size conditioning: original
and target size the requested size, crop corner (0, 0).
"""

from runai.models import offline  # before diffusers and transformers

import weakref
from dataclasses import dataclass
from typing import Optional

from diffusers import (
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image

from runai.core import errors
from runai.engine import images
from runai.models.cache import is_sdxl

del offline  # imported for what importing it does


@dataclass
class Inputs:
    """Decoded client images, at the size the request asked for."""

    init: Optional[Image.Image] = None  # RGB
    mask: Optional[Image.Image] = None  # L, white = repaint


@dataclass(frozen=True)
class Family:
    """The pipeline classes of a model family's modes (txt2img None: the loaded one's)."""

    txt2img: Optional[type]
    img2img: type
    inpaint: type
    sdxl: bool


SD = Family(None, StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline, sdxl=False)
SDXL = Family(StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline,
              sdxl=True)


def family(pipe):
    return SDXL if is_sdxl(pipe) else SD


def is_inpainting_model(pipe):
    # Inpainting UNets take the latents, the mask and the masked image: 4 + 1 + 4 channels.
    return pipe.unet.config.in_channels == 9


def prepare_inputs(request):
    if request.pixels is None:
        if request.action != "txt2img":
            raise errors.RunaiError(errors.BAD_REQUEST, f"{request.action} needs an input image ('pixels')")
        return Inputs()
    need_mask = request.action in ("inpaint", "outpaint")
    init, mask = images.prepare(request.pixels, request.mask, request.width, request.height, need_mask)
    return Inputs(init, mask if need_mask else None)


class ModePipelines:
    """Derived pipelines per loaded model, kept only as long as that model is loaded."""

    def __init__(self):
        self._derived = weakref.WeakKeyDictionary()

    def get(self, pipe, cls):
        if cls is type(pipe):
            return pipe
        per_model = self._derived.setdefault(pipe, {})
        if cls not in per_model:
            if family(pipe).sdxl:
                derived = cls(**pipe.components, add_watermarker=False,
                              force_zeros_for_empty_prompt=pipe.config.force_zeros_for_empty_prompt)
            else:
                derived = cls(**pipe.components, requires_safety_checker=False)
            derived.set_progress_bar_config(disable=True)
            per_model[cls] = derived
        return per_model[cls]


def plan(pipe, request, inputs):
    """The pipeline class and the mode-specific call arguments for ``request``."""
    f = family(pipe)
    size = dict(width=request.width, height=request.height)
    if f.sdxl:
        # What diffusers does by default, said here so that every mode does the same.
        hw = (request.height, request.width)
        conditioning = dict(original_size=hw, target_size=hw, crops_coords_top_left=(0, 0))
    else:
        conditioning = {}
    cls, kwargs = _plan(pipe, f, request, inputs, size)
    return cls, dict(kwargs, **conditioning)


def _plan(pipe, f, request, inputs, size):
    if is_inpainting_model(pipe):
        # An inpainting UNet cannot run the plain pipelines: give it a canvas to repaint
        # whole (txt2img) or a picture to repaint whole at the request's strength (img2img).
        if request.action == "txt2img":
            init = Image.new("RGB", (request.width, request.height), (127, 127, 127))
            return f.inpaint, dict(size, image=init, mask_image=_full_mask(request), strength=1.0)
        if request.action == "img2img":
            return f.inpaint, dict(
                size, image=inputs.init, mask_image=_full_mask(request), strength=request.strength)
    if request.action == "txt2img":
        return f.txt2img or type(pipe), size
    if request.action == "img2img":
        # The img2img pipeline paints at the size of its input, already resized to the request's.
        return f.img2img, dict(image=inputs.init, strength=request.strength)
    return f.inpaint, dict(
        size, image=inputs.init, mask_image=inputs.mask, strength=request.strength)


def _full_mask(request):
    return Image.new("L", (request.width, request.height), 255)


def finish(image, request, inputs):
    """Put the client's untouched pixels back around an inpainted or outpainted region."""
    if inputs.mask is not None:
        return images.paste_unmasked(image, inputs.init, inputs.mask)
    return image
