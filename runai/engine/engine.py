# -*- test-case-name: runai.test.test_engine,runai.test.test_modes,runai.test.test_engine_xl -*-
"""The torch side: turns a request into PNG images, on the models a
:class:`runai.models.cache.ModelLoader` keeps loaded.

Only the server's single worker thread imports and calls this module. Nothing in it is
thread-safe, and nothing needs to be: one job runs at a time, and the loaded pipelines
are the worker's alone.
"""

from runai.models import offline  # before diffusers and transformers

import io
import logging
import warnings
from dataclasses import dataclass
from typing import Optional

import diffusers
import torch
import transformers
from twisted.logger import Logger

from runai import families
from runai.core import errors
from runai.core.requests import GENERATION_ACTIONS
from runai.engine import hires as hires_fix
from runai.engine import modes
from runai.engine.device import resolve_device, resolve_dtype
from runai.engine.previews import Previews
from runai.engine.safety import SafetyChecker
from runai.models import lora_apply, upscaler_load
from runai.models.cache import ModelLoader

del offline  # imported for what importing it does

log = Logger()

diffusers.utils.logging.disable_progress_bar()
transformers.utils.logging.disable_progress_bar()


class _DropPromptText(logging.Filter):
    """Drop diffusers' warning that quotes the truncated part of a long prompt.

    Prompts are the users' data: they go to the log at debug level or not at all. The
    engine reports truncation itself, without the text.
    """

    def filter(self, record):
        return not str(record.msg).startswith("The following part of your input was truncated")


for _family in families.FAMILIES:
    for _name in _family.prompt_loggers:
        logging.getLogger(_name).addFilter(_DropPromptText())

# Some pipelines upcast the VAE for every float16 decode (runai's policy, see
# runai.models.cache.vae_decode_dtype) through a method they deprecate, warning each time.
warnings.filterwarnings("ignore", message="`upcast_vae` is deprecated", category=FutureWarning)


@dataclass(frozen=True)
class GeneratedImage:
    png: bytes
    seed: int
    width: int
    height: int
    index: int  # position among the request's images, 0 .. n_samples * n_iter - 1
    nsfw_checked: Optional[bool] = None  # None: not asked for; False: asked, checker missing
    withheld: bool = False  # flagged by the safety checker: no pixels go out


class _Progress:
    """Steps done in a request, and the total they are counted against."""

    def __init__(self, runs):
        self.done = 0
        self.single = False
        self._runs = runs  # denoising runs still counted in the total
        self._offset = 0  # steps done before the count changed

    def go_single(self, images_left):
        # Every remaining image becomes a run of its own: the total grows, once.
        self.single = True
        self._offset = self.done
        self._runs = images_left

    def total(self, per_run):
        return self._offset + per_run * self._runs


def encode_png(image):
    """PNG bytes of a PIL image: no text chunks, no timestamps, so equal pixels give equal
    bytes, which is what lets clients (and tests) compare results."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class Engine:
    """Runs requests on the pipelines its :class:`runai.models.cache.ModelLoader` keeps
    loaded (one by default; ``cache_models``/``cache_bytes`` keep more).

    ``library`` is the server's :class:`runai.models.library.ModelLibrary`: the model
    folder, where single files find their base configs and tokenizer. Without one, only
    diffusers folders load. ``load_count`` counts loads from disk, so that callers (and
    tests) can tell that a model stays loaded between requests.
    """

    def __init__(self, device="auto", dtype="auto", library=None, cache_models=1, cache_bytes=None,
                 text_encoders="device", preview_decoder="auto"):
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        # Loading, single files and the cache of loaded models live in runai.models.
        self.loader = ModelLoader(self.device, self.dtype, library, max_models=cache_models, max_bytes=cache_bytes,
                                  dtype_auto=dtype in (None, "auto"), text_encoders=text_encoders)
        self._modes = modes.ModePipelines()
        self._safety = None
        # Previews mid-job: TAESD where its weights are in the model folder, else the linear map.
        self._previews = Previews(self.loader.model_dir, self.device, self.dtype, preview_decoder)
        log.info("engine on {device} with {dtype}", device=str(self.device), dtype=str(self.dtype))

    # -- model ------------------------------------------------------------------------

    def load(self, model_path, model_name=None, modules=()):
        """Load the model at ``model_path`` (a diffusers folder, a ``.safetensors`` or
        ``.ckpt`` file) unless it is cached; it becomes ``pipe``.

        ``model_name`` is how the client named it, for messages (default: the path);
        ``modules`` the companion files it chose (resolved), for a file that needs them.
        Raises RunaiError(MODEL_LOAD_FAILED).
        """
        return self.loader.get(model_path, model_name, modules).pipe

    @property
    def pipe(self):
        """The pipeline of the model used last, or None."""
        current = self.loader.current
        return current.pipe if current is not None else None

    @property
    def model_path(self):
        current = self.loader.current
        return current.path if current is not None else None

    @property
    def load_count(self):
        """Loads from disk, so that callers (and tests) can tell a cached model from a reload."""
        return self.loader.load_count

    @property
    def _scheduler_config(self):
        current = self.loader.current
        return current.scheduler_config if current is not None else None

    def unload(self):
        self._safety = None  # the NSFW checker's weights too: it loads again when asked for
        upscaler_load.forget()  # and the upscalers' (runai.engine.upscale loads them again)
        self._previews.forget()  # and the TAESD preview decoders'
        self.loader.unload()

    def _free_memory(self):
        self.loader.free_memory()

    def convert(self, request, on_progress, is_cancelled):
        """Run a convert request: a single-file checkpoint becomes a diffusers folder.

        Returns a :class:`runai.models.convert.ConvertResult`.
        """
        from runai.models import convert

        return convert.run_request(request, self.loader, on_progress, is_cancelled)

    def upscale(self, request, on_progress, on_image, is_cancelled):
        """Run an upscale request (:mod:`runai.engine.upscale`); returns the picture count."""
        from runai.engine import upscale

        return upscale.run_request(request, self.device, self.dtype, self.loader.model_dir, on_progress, on_image,
                                   is_cancelled)

    # -- generation -------------------------------------------------------------------

    def generate(self, request, on_progress, on_image, is_cancelled):
        """Run a txt2img, img2img, inpaint or outpaint request; returns the image count.

        ``on_progress(step, total)`` follows each denoising step, counted over all of the
        request's batches (``on_progress(step, total, preview)`` every ``preview_every``
        steps, with a small PNG of the picture so far); ``on_image(GeneratedImage)`` follows each image; a true
        ``is_cancelled()`` stops the job at the next step with JobCancelled.
        """
        if request.action not in GENERATION_ACTIONS:
            raise errors.RunaiError(
                errors.NOT_IMPLEMENTED, f"action {request.action!r} is not served by this engine"
            )
        if is_cancelled():
            raise errors.JobCancelled()
        # Decoded before the model loads: a broken image should not cost a load.
        inputs = modes.prepare_inputs(request)
        base = self.load(request.model_path, request.model_name, request.module_paths)
        if is_cancelled():
            raise errors.JobCancelled()
        family = families.for_pipeline(base)
        if not family.check_scheduler(request.scheduler):
            # The parser checks this against the library's word; the model on disk may
            # have changed family since.
            raise errors.RunaiError(errors.BAD_REQUEST, f"{family.label} models do not run {request.scheduler!r}")
        lora_apply.apply(self.loader, family, request.loras)  # merged, or taken out, before the text is encoded
        cls, mode_kwargs = modes.plan(base, request, inputs)
        pipe = self._modes.get(base, cls)
        pipe.scheduler = family.make_scheduler(request.scheduler, self._scheduler_config)
        text = self._text(family, pipe, request)
        mode_kwargs = dict(mode_kwargs, **family.guidance(request))

        seeds = request.seeds()
        # Steps done so far, and how the progress total is counted: by batches, until a
        # batch does not fit in memory and the rest run one image at a time.
        progress = _Progress(request.n_iter)
        produced = 0
        try:
            for batch in range(request.n_iter):
                if is_cancelled():
                    raise errors.JobCancelled()
                batch_seeds = seeds[batch * request.n_samples : (batch + 1) * request.n_samples]
                if request.hires is not None:
                    images = hires_fix.run(self, base, family, pipe, request, batch_seeds, progress, on_progress,
                                           is_cancelled, mode_kwargs, text)
                else:
                    images = self._denoise(
                        pipe, request, batch_seeds, progress, on_progress, is_cancelled, mode_kwargs, text,
                        images_left=len(seeds) - batch * request.n_samples,
                    )
                images = [modes.finish(image, request, inputs) for image in images]
                flags = self._check(request, images)
                for k, image in enumerate(images):
                    index = batch * request.n_samples + k
                    withheld = flags is not None and flags[k]
                    on_image(
                        GeneratedImage(
                            png=b"" if withheld else encode_png(image),
                            seed=seeds[index],
                            width=image.width,
                            height=image.height,
                            index=index,
                            nsfw_checked=None if not request.nsfw_filter else flags is not None,
                            withheld=withheld,
                        )
                    )
                    produced += 1
        except torch.OutOfMemoryError:
            out_of_memory = True
        else:
            out_of_memory = False
        if out_of_memory:
            # Freed outside the except block: the traceback's frames hold the batch's
            # tensors until it ends, and the model stays loaded for the next request.
            self._free_memory()
            raise errors.RunaiError(
                errors.OUT_OF_MEMORY,
                f"out of memory generating {request.n_samples} image(s) of "
                f"{request.width}x{request.height}; try fewer samples or a smaller size",
            )
        return produced

    def _text(self, family, pipe, request):
        """The prompt's arguments to the pipeline, as the family encodes them: the text
        where it fits, which diffusers encodes; else embeddings encoded in chunks."""
        # A prompt encoded in chunks is logged as such by the family (its text never is).
        return family.text(pipe, request, self.device)

    def _check(self, request, images):
        """Safety-checker flags per image, or None when not asked for or not installed."""
        if not request.nsfw_filter or request.safety_checker is None:
            return None
        if self._safety is None:
            self._safety = SafetyChecker(self.device, self.dtype)
        return self._safety.flags(request.safety_checker, images)

    def _denoise(self, pipe, request, seeds, progress, on_progress, is_cancelled, mode_kwargs, text,
                 images_left):
        """One batch as one batch where memory allows, else one image at a time."""
        if not progress.single:
            try:
                return self._run_batch(pipe, request, seeds, progress, on_progress, is_cancelled, mode_kwargs,
                                       text)
            except torch.OutOfMemoryError:
                if len(seeds) == 1:
                    raise
            # Outside the except block, so that the failed batch's tensors are gone.
            self._free_memory()
            log.warn("a batch of {n} images of {w}x{h} does not fit in memory: one at a time",
                     n=len(seeds), w=request.width, h=request.height)
            progress.go_single(images_left)
        images = []
        for seed in seeds:
            images += self._run_batch(pipe, request, [seed], progress, on_progress, is_cancelled, mode_kwargs,
                                      text)
        return images

    def _run_batch(self, pipe, request, seeds, progress, on_progress, is_cancelled, mode_kwargs, text,
                   output_type="pil", per_run=None):
        """Denoise one batch; returns its PIL images (its latents with ``output_type``
        "latent"). ``per_run(pipeline)``: the steps one batch counts for in the progress
        total (default: this pipeline's)."""
        per_run = per_run or (lambda pipeline: pipeline.num_timesteps)
        # One generator per image: image k's noise depends on its seed alone, so it comes
        # out the same in a batch of 4 as alone (up to batched arithmetic).
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        start = progress.done

        def on_step_end(pipeline, i, t, callback_kwargs):
            # num_timesteps is the length of the schedule actually run: more than
            # ``steps`` for second-order schedulers (Heun, DPM2) and for PLMS, fewer
            # than ``steps`` for img2img and inpainting below strength 1.
            progress.done = start + i + 1
            every = request.preview_every
            if every and (i + 1) % every == 0 and "latents" in callback_kwargs:
                # Here, in the worker: TAESD, or a linear map and a PNG of one pixel per latent.
                preview = self._previews.picture(families.for_pipeline(pipeline),
                                                 callback_kwargs["latents"], request.height, request.width)
                on_progress(progress.done, progress.total(per_run(pipeline)), encode_png(preview))
            else:
                on_progress(progress.done, progress.total(per_run(pipeline)))
            if is_cancelled():
                raise errors.JobCancelled()
            return callback_kwargs

        # Some pipelines move the VAE to float32 for a float16 decode and back after it;
        # an error in between (out of memory) must not leave it there for the next request.
        vae_dtype = pipe.vae.dtype
        try:
            # The family may repeat the prompt's embeddings itself (num_images_per_prompt 1).
            call = {"num_images_per_prompt": len(seeds), **families.for_pipeline(pipe).batch_text(text, len(seeds))}
            with torch.inference_mode():
                result = pipe(
                    **call,
                    **mode_kwargs,
                    num_inference_steps=request.steps,
                    generator=generators,
                    output_type=output_type,
                    callback_on_step_end=on_step_end,
                )
        finally:
            if pipe.vae.dtype != vae_dtype:
                pipe.vae.to(dtype=vae_dtype)
        return result.images
