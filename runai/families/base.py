# -*- test-case-name: runai.test.test_families -*-
"""What every model family says about itself: the :class:`Family` a family module fills in.

A family is a kind of model that needs its own code. Its module
(:mod:`runai.families.sd`, ...) says in one place how its models are recognised,
which pipeline runs each mode, how prompts are encoded, its defaults, its schedulers, its
latent format and how a single file of it becomes a pipeline. The engine, the queue, the
doors and the request parser ask the family; none of them names one.

Torch-free at import: the request parser reads a family's defaults and scheduler names on
the reactor thread. What runs on the worker (pipelines, encoders) imports diffusers inside
the methods that need it.
"""

from dataclasses import dataclass
from typing import Optional

from runai.core.schedulers import DEFAULT_SCHEDULER, SCHEDULERS


@dataclass(frozen=True)
class LatentFormat:
    """How a family's VAE latents look: what a preview or an upscaler in latent space needs.

    A latent ``z`` decodes as ``vae.decode(z / scaling_factor + shift_factor)``. ``packed``:
    the transformer sees 2x2 patches of the latent as one token, which must be
    unpacked before anything looks at the picture.
    """

    channels: int
    scaling_factor: float
    shift_factor: float = 0.0
    packed: bool = False
    downscale: int = 8  # pixels per latent, per side
    # A linear map from a latent's channels to RGB in -1..1 (``channels`` rows of R, G, B,
    # and a bias): a preview that needs no weights, one pixel per latent (the factors are
    # the ones ComfyUI's previews use for each family).
    rgb_factors: tuple = ()
    rgb_bias: tuple = (0.0, 0.0, 0.0)
    # The TAESD decoder that previews the latents at full size when its weights are in the
    # model folder (``taesd``: ``VAE-approx/taesd_decoder.safetensors``, ...); "": none.
    taesd: str = ""


@dataclass(frozen=True)
class Defaults:
    """What a request for a model of the family gets where it says nothing."""

    size: int = 512
    steps: int = 20
    scale: float = 7.5
    scheduler: str = DEFAULT_SCHEDULER
    # The guidance a guidance-distilled model is conditioned on, None where the model has
    # no such input.
    distilled_scale: Optional[float] = None


@dataclass(frozen=True)
class Modes:
    """The diffusers pipeline classes of a family's modes."""

    txt2img: type
    img2img: type
    inpaint: type
    # A model trained to repaint (a 9-channel SD UNet, say) runs every mode with
    # this one; None: such models are not of this family.
    inpaint_model: Optional[type] = None


class Family:
    """A model family. Subclasses set the class attributes and override the methods whose
    defaults do not fit."""

    #: The library's version strings of the family's models (``"v1"``, ``"v2"``, ...).
    versions = ()
    #: For messages: "Stable Diffusion 1.x/2.x".
    label = ""
    #: Scheduler name -> :class:`runai.core.schedulers.SchedulerSpec` that the family runs.
    schedulers = SCHEDULERS
    latent = LatentFormat(channels=4, scaling_factor=0.18215)
    #: A diffusers folder's component folders that hold weights (the cache counts them).
    weight_folders = ("unet", "vae", "text_encoder")
    #: diffusers pipeline class names of the family (a folder's ``_class_name``, a loaded pipeline).
    pipeline_classes = ()
    #: Sizes must be a multiple of this (beside the server's limit): a transformer on 2x2
    #: patches of an 8x latent needs 16.
    size_multiple = 8
    #: Whether single files (``.safetensors``, ``.ckpt``) of the family are served.
    single_files = True
    #: diffusers loggers that quote the truncated part of a prompt (the engine filters them).
    prompt_loggers = ()
    #: The text encoders that take textual-inversion embeddings, each with the key of its
    #: vectors in a file that holds a set per encoder (``clip_l``, ``clip_g``), or None
    #: where the family has one; empty: the family takes none (:mod:`runai.models.embeddings`).
    embedding_encoders = ()

    # -- torch-free: the request parser, the library ------------------------------------

    def defaults(self, classification=None):
        """The :class:`Defaults` for a model of this family (``classification``: the
        model's :class:`runai.models.classify.Classification`, when known)."""
        return Defaults()

    def check_scheduler(self, name):
        """Whether the family runs the scheduler ``name``."""
        return name in self.schedulers

    def serves(self, classification):
        """Whether runai generates with this model of the family (some variants need
        inputs no request can give)."""
        return True

    def variant(self, classification):
        """A model's variant within the family, where it matters (guidance-distilled or not)."""
        return getattr(classification, "variant", None)

    # -- the worker ----------------------------------------------------------------------

    def folder_pipeline(self, classification):
        """``(pipeline class, from_pretrained options)`` for a diffusers folder."""
        raise NotImplementedError

    @property
    def text_encoder_names(self):
        """The pipeline's components that encode prompts."""
        return tuple(name for name in self.weight_folders if name.startswith("text_encoder"))

    def auto_dtype(self, dtype, device):
        """The precision a model of the family loads in under ``--dtype auto`` (``dtype``:
        the server's auto choice for ``device``)."""
        return dtype

    def place_text_encoders(self, pipe, device):
        """Keep the text encoders on ``device`` (the CPU, to spare the GPU's memory): their
        inputs go there and their outputs come back to the denoiser's device, so every
        encoding path (diffusers' own, runai's chunks) works unchanged."""
        target = self.denoiser(pipe).device
        for name in self.text_encoder_names:
            module = getattr(pipe, name, None)
            if module is None:
                continue
            module.to(device)
            module.register_forward_pre_hook(
                lambda module, args, kwargs: (moved(args, device), moved(kwargs, device)), with_kwargs=True)
            module.register_forward_hook(lambda module, args, output: moved(output, target))

    def from_single_file(self, path, model_dir, entry, device, dtype, step, modules=None):
        """A pipeline from one ``.safetensors``/``.ckpt`` (and the companion files the
        family takes: ``modules``, the ones the client chose, else found by convention);
        raises :class:`runai.models.errors.LoadError`."""
        from runai.models.errors import LoadError

        raise LoadError(f"single-file {self.label} models are not served yet; use a diffusers folder")

    def make_scheduler(self, name, base_config):
        """The scheduler ``name``, built from the model's own scheduler config."""
        import diffusers

        spec = self.schedulers[name]
        return getattr(diffusers, spec.class_name).from_config(dict(base_config), **spec.config)

    def after_load(self, pipe, name, dtype):
        """Settle a freshly loaded pipeline (watermarks off, precision notes in the log)."""

    def modes(self):
        """The family's :class:`Modes`."""
        raise NotImplementedError

    def derive(self, pipe, cls):
        """A pipeline of ``cls`` sharing ``pipe``'s components (no load, no memory)."""
        derived = cls(**pipe.components)
        derived.set_progress_bar_config(disable=True)
        return derived

    def denoiser(self, pipe):
        """The network that denoises: the UNet, or the transformer."""
        return pipe.unet

    def is_inpainting_model(self, pipe):
        """Whether the loaded model was trained to repaint (its denoiser takes the mask)."""
        return False

    def preview(self, latents, height, width):
        """A small RGB picture (PIL, one pixel per latent) of the first image of a batch
        of ``latents`` as the pipeline holds them, by the family's linear map: cheap (no
        weights, no decoder), made in the worker."""
        import numpy as np
        import torch
        from PIL import Image

        # (1, h/2 * w/2, channels * 4) -> (1, channels, h, w): 2x2 patches unpacked.
        latent = self.unpack(latents[:1].detach().float(), height, width)
        factors = torch.tensor(self.latent.rgb_factors, dtype=latent.dtype, device=latent.device)
        bias = torch.tensor(self.latent.rgb_bias, dtype=latent.dtype, device=latent.device)
        rgb = torch.nn.functional.linear(latent[0].movedim(0, -1), factors.T, bias)
        pixels = ((rgb + 1.0) * 127.5).clamp(0, 255).to(torch.uint8).cpu().numpy()
        return Image.fromarray(np.ascontiguousarray(pixels), "RGB")

    def unpack(self, latents, height, width):
        """``latents`` as (batch, channels, height / 8, width / 8), 2x2-packed ones unpacked."""
        if not self.latent.packed:
            return latents
        h, w = height // self.latent.downscale, width // self.latent.downscale
        batch = latents.shape[0]
        latents = latents.view(batch, h // 2, w // 2, self.latent.channels, 2, 2)
        return latents.permute(0, 3, 1, 4, 2, 5).reshape(batch, self.latent.channels, h, w)

    def upscale_latents(self, latents, height, width, new_height, new_width, mode="bilinear", antialias=False):
        """A first pass's latents resized for a picture of ``new_width`` x ``new_height``,
        as the family's img2img pipeline takes them to start from (unpacked)."""
        import torch

        latents = self.unpack(latents, height, width)
        size = (new_height // self.latent.downscale, new_width // self.latent.downscale)
        options = dict(antialias=antialias) if mode in ("bilinear", "bicubic") else {}
        return torch.nn.functional.interpolate(latents, size=size, mode=mode, **options)

    def conditioning(self, request):
        """Mode-independent call arguments beyond the size (size conditioning)."""
        return {}

    def guidance(self, request):
        """The call arguments for the request's guidance (and other sampler options)."""
        return dict(guidance_scale=request.scale)

    def text(self, pipe, request, device):
        """The prompt's call arguments: the text, or embeddings encoded here."""
        return dict(prompt=request.prompt, negative_prompt=request.negative_prompt)

    def batch_text(self, text, count):
        """:meth:`text`'s arguments for a batch of ``count`` images (a pipeline that does
        not repeat the embeddings it is given gets them repeated here, and
        ``num_images_per_prompt`` 1)."""
        return text

    def mode_options(self, cls, request):
        """Extra call arguments for pipeline class ``cls``."""
        return {}

    def __repr__(self):
        return f"<family {self.label}>"


def moved(value, device):
    """``value`` with every tensor in it (tuples, lists, dicts, model outputs) on ``device``."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        items = {k: moved(v, device) for k, v in value.items()}
        try:
            return type(value)(**items)
        except TypeError:
            return items
    if isinstance(value, (tuple, list)):
        return type(value)(moved(v, device) for v in value)
    return value
