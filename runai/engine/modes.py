# -*- test-case-name: runai.test.test_modes,runai.test.test_engine_xl,runai.test.test_flow_families -*-
"""The four generation modes on one loaded model: which pipeline, which inputs, and what
happens to the images afterwards. Worker thread only (imports diffusers).

All modes share the loaded model's weights: the img2img and inpaint pipelines are built
from the txt2img pipeline's components, which costs no memory and no load. Which pipeline
runs each mode, and what else it is called with, is the model family's word
(:mod:`runai.families`).
"""

import inspect
import weakref
from dataclasses import dataclass
from typing import Optional

from PIL import Image

from runai import families
from runai.core import errors
from runai.engine import images


@dataclass
class Inputs:
    """Decoded client images, at the size the request asked for."""

    init: Optional[Image.Image] = None  # RGB
    mask: Optional[Image.Image] = None  # L, white = repaint


def is_inpainting_model(pipe):
    """Whether the loaded model was trained to repaint (its denoiser takes the mask)."""
    return families.for_pipeline(pipe).is_inpainting_model(pipe)


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
            per_model[cls] = families.for_pipeline(pipe).derive(pipe, cls)
        return per_model[cls]


def plan(pipe, request, inputs):
    """The pipeline class and the mode-specific call arguments for ``request``."""
    family = families.for_pipeline(pipe)
    modes = family.modes()
    cls, kwargs = _plan(pipe, family, modes, request, inputs)
    if "height" in kwargs or takes_size(cls):
        # Every pipeline that takes a size gets the request's (img2img's input has it already).
        kwargs.update(height=request.height, width=request.width)
    return cls, dict(kwargs, **family.conditioning(request))


def takes_size(cls):
    """Whether pipeline class ``cls`` is called with a size (img2img's are not: their
    input has it)."""
    return "height" in inspect.signature(cls.__call__).parameters


def _plan(pipe, family, modes, request, inputs):
    if family.is_inpainting_model(pipe):
        # A model trained to repaint cannot run the plain pipelines: give it a canvas to
        # repaint whole (txt2img) or a picture to repaint whole at the request's strength.
        cls = modes.inpaint_model or modes.inpaint
        if request.action == "txt2img":
            init = Image.new("RGB", (request.width, request.height), (127, 127, 127))
            return cls, dict(image=init, mask_image=_full_mask(request), strength=1.0)
        if request.action == "img2img":
            return cls, dict(image=inputs.init, mask_image=_full_mask(request), strength=request.strength)
        return cls, dict(image=inputs.init, mask_image=inputs.mask, strength=request.strength)
    if request.action == "txt2img":
        return modes.txt2img, {}
    if request.action == "img2img":
        return modes.img2img, dict(image=inputs.init, strength=request.strength)
    return modes.inpaint, dict(image=inputs.init, mask_image=inputs.mask, strength=request.strength)


def _full_mask(request):
    return Image.new("L", (request.width, request.height), 255)


def finish(image, request, inputs):
    """Put the client's untouched pixels back around an inpainted or outpainted region."""
    if inputs.mask is not None:
        return images.paste_unmasked(image, inputs.init, inputs.mask)
    return image
