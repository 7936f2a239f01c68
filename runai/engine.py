"""The torch side: loads a diffusers model and turns a request into PNG images.

Only the server's single worker thread imports and calls this module. Nothing in it is
thread-safe, and nothing needs to be: one job runs at a time, and the loaded pipeline is
the worker's alone.
"""

import os

# huggingface_hub reads these once, at import: set them before diffusers/transformers
# import it. A server must never reach out to a model hub, nor stall while trying to.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("DISABLE_TELEMETRY", "1")
# Progress bars would go to the server's stderr, one line per load and per image.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import copy  # noqa: E402
import gc  # noqa: E402
import io  # noqa: E402
import logging  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Optional  # noqa: E402

import diffusers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from diffusers import StableDiffusionPipeline  # noqa: E402
from twisted.logger import Logger  # noqa: E402

from runai import errors, modes, prompts  # noqa: E402
from runai.request import GENERATION_ACTIONS  # noqa: E402
from runai.safety import SafetyChecker  # noqa: E402
from runai.schedulers import make_scheduler  # noqa: E402

log = Logger()

diffusers.utils.logging.disable_progress_bar()
transformers.utils.logging.disable_progress_bar()

DTYPES = {
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}

# Cap on how much of an exception's text goes into a client's error message.
MAX_CAUSE_CHARS = 500


def _dtype_keyword():
    """``dtype`` where diffusers has it, else the older ``torch_dtype``.

    Newer diffusers deprecate ``torch_dtype`` (with a warning on every load); older ones
    silently ignore ``dtype``, which would load float32 onto the GPU.
    """
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401
    except ImportError:
        return "torch_dtype"
    return "dtype"


DTYPE_KEYWORD = _dtype_keyword()


class _DropPromptText(logging.Filter):
    """Drop diffusers' warning that quotes the truncated part of a long prompt.

    Prompts are the users' data: they go to the log at debug level or not at all. The
    engine reports truncation itself, without the text.
    """

    def filter(self, record):
        return not str(record.msg).startswith("The following part of your input was truncated")


for _name in (
    "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion",
    "diffusers.pipelines.stable_diffusion",
):
    logging.getLogger(_name).addFilter(_DropPromptText())


@dataclass(frozen=True)
class GeneratedImage:
    png: bytes
    seed: int
    width: int
    height: int
    index: int  # position among the request's images, 0 .. n_samples * n_iter - 1
    nsfw_checked: Optional[bool] = None  # None: not asked for; False: asked, checker missing
    withheld: bool = False  # flagged by the safety checker: no pixels go out


def resolve_device(device="auto"):
    """A ``torch.device`` from "auto", "cpu", "cuda" or "cuda:N"; RunaiError if unusable."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise errors.RunaiError(errors.INTERNAL, f"bad device {device!r}: {e}")
    if resolved.type == "cpu":
        return resolved
    if resolved.type != "cuda":
        raise errors.RunaiError(
            errors.INTERNAL, f"unsupported device {device!r}; use auto, cpu, cuda or cuda:N"
        )
    if not torch.cuda.is_available():
        raise errors.RunaiError(
            errors.INTERNAL, f"device {device!r} was asked for, but CUDA is not available here"
        )
    count = torch.cuda.device_count()
    if resolved.index is not None and resolved.index >= count:
        raise errors.RunaiError(
            errors.INTERNAL, f"device {device!r} was asked for, but there are only {count} CUDA devices"
        )
    return resolved


def resolve_dtype(dtype, device):
    """A ``torch.dtype``: "auto" is float16 on CUDA (half the memory, tensor cores), else
    float32 (half precision is slow, and partly unsupported, on CPUs)."""
    if dtype in (None, "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
    elif dtype in DTYPES:
        return DTYPES[dtype]
    raise errors.RunaiError(
        errors.INTERNAL, f"unsupported dtype {dtype!r}; use auto, float16, bfloat16 or float32"
    )


def encode_png(image):
    """PNG bytes of a PIL image: no text chunks, no timestamps, so equal pixels give equal
    bytes, which is what lets clients (and tests) compare results."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class Engine:
    """Holds at most one loaded pipeline and runs requests on it.

    ``load_count`` counts loads from disk, so that callers (and tests) can tell that a
    model stays loaded between requests.
    """

    def __init__(self, device="auto", dtype="auto"):
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.pipe = None
        self.model_path = None
        self.load_count = 0
        self._scheduler_config = None
        self._modes = modes.ModePipelines()
        self._safety = None
        log.info("engine on {device} with {dtype}", device=str(self.device), dtype=str(self.dtype))

    # -- model ------------------------------------------------------------------------

    def load(self, model_path, model_name=None):
        """Load the diffusers folder ``model_path`` unless it is the one loaded already.

        ``model_name`` is how the client named it, for messages (default: the path).
        Raises RunaiError(MODEL_LOAD_FAILED).
        """
        model_path = str(model_path)
        name = model_name or model_path
        if self.pipe is not None and self.model_path == model_path:
            return self.pipe
        # Free the old model first: two SD models at once may not fit on the GPU.
        self.unload()
        log.info("loading model {name}", name=name)
        try:
            pipe = StableDiffusionPipeline.from_pretrained(
                model_path,
                local_files_only=True,
                **{DTYPE_KEYWORD: self.dtype},
                safety_checker=None,
                requires_safety_checker=False,
                # Without accelerate, diffusers warns and falls back to False anyway.
                low_cpu_mem_usage=diffusers.utils.is_accelerate_available(),
            )
            if pipe.unet.dtype != self.dtype:
                # Whatever the keyword's fate in some diffusers release, never run in
                # another precision than the one asked for.
                pipe = pipe.to(self.device, self.dtype)
            else:
                pipe = pipe.to(self.device)
        except Exception as e:
            pipe = None
            # The server's own paths are no business of the client's.
            cause = f"{type(e).__name__}: {e}".replace(model_path, name)[:MAX_CAUSE_CHARS]
        else:
            cause = None
        if cause is not None:
            # Outside the except block, so that the traceback, and the half-loaded
            # weights its frames hold, are gone before memory is freed.
            self._free_memory()
            # The cause is the whole story for a bad folder; a traceback would only add
            # diffusers' internals to the log.
            log.error("loading model {name} failed: {cause}", name=name, cause=cause)
            raise errors.RunaiError(errors.MODEL_LOAD_FAILED, f"could not load model {name!r}: {cause}")
        pipe.set_progress_bar_config(disable=True)
        self._use_fast_attention(pipe)
        self.pipe = pipe
        self.model_path = model_path
        # Each request builds its scheduler from this pristine copy, so a request's
        # overrides (Karras sigmas, ...) never leak into the next request's scheduler.
        self._scheduler_config = copy.deepcopy(dict(pipe.scheduler.config))
        self.load_count += 1
        log.info("loaded model {name}", name=name)
        return pipe

    def _use_fast_attention(self, pipe):
        # diffusers uses torch's SDPA (AttnProcessor2_0) by default; xformers can still
        # save memory on some CUDA setups, so use it when it is installed and works.
        if self.device.type != "cuda":
            return
        try:
            import xformers  # noqa: F401
        except ImportError:
            return
        try:
            pipe.enable_xformers_memory_efficient_attention()
            log.info("using xformers memory-efficient attention")
        except Exception:
            log.failure("xformers is installed but could not be enabled; using SDPA")

    def unload(self):
        if self.pipe is None:
            return
        log.info("unloading model")
        self.pipe = None
        self.model_path = None
        self._scheduler_config = None
        self._free_memory()

    def _free_memory(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- generation -------------------------------------------------------------------

    def generate(self, request, on_progress, on_image, is_cancelled):
        """Run a txt2img, img2img, inpaint or outpaint request; returns the image count.

        ``on_progress(step, total)`` follows each denoising step, counted over all of the
        request's batches; ``on_image(GeneratedImage)`` follows each image; a true
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
        base = self.load(request.model_path, request.model_name)
        if is_cancelled():
            raise errors.JobCancelled()
        cls, mode_kwargs = modes.plan(base, request, inputs)
        pipe = self._modes.get(base, cls)
        pipe.scheduler = make_scheduler(request.scheduler, self._scheduler_config)
        log.debug("prompt {prompt!r} negative {negative!r}", prompt=request.prompt, negative=request.negative_prompt)
        if prompts.needs_chunks(pipe.tokenizer, request.prompt, request.negative_prompt):
            embeds = prompts.encode(pipe, request.prompt, request.negative_prompt, self.device)
            log.info("long prompt encoded in {n} chunks", n=embeds[0].shape[1] // pipe.tokenizer.model_max_length)
        else:
            embeds = None

        seeds = request.seeds()
        done = 0  # denoising steps run in earlier batches
        produced = 0
        try:
            for batch in range(request.n_iter):
                if is_cancelled():
                    raise errors.JobCancelled()
                batch_seeds = seeds[batch * request.n_samples : (batch + 1) * request.n_samples]
                images, done = self._run_batch(
                    pipe, request, batch_seeds, done, on_progress, is_cancelled, mode_kwargs, embeds
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

    def _check(self, request, images):
        """Safety-checker flags per image, or None when not asked for or not installed."""
        if not request.nsfw_filter or request.safety_checker is None:
            return None
        if self._safety is None:
            self._safety = SafetyChecker(self.device, self.dtype)
        return self._safety.flags(request.safety_checker, images)

    def _run_batch(self, pipe, request, seeds, done, on_progress, is_cancelled, mode_kwargs, embeds):
        """Denoise one batch; returns (PIL images, steps done so far in the request)."""
        # One generator per image: image k's noise depends on its seed alone, so it comes
        # out the same in a batch of 4 as alone (up to batched arithmetic).
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        counter = {"done": done}

        def on_step_end(pipeline, i, t, callback_kwargs):
            # num_timesteps is the length of the schedule actually run: more than
            # ``steps`` for second-order schedulers (Heun, DPM2) and for PLMS, fewer
            # than ``steps`` for img2img and inpainting below strength 1.
            per_batch = pipeline.num_timesteps
            counter["done"] = done + i + 1
            on_progress(counter["done"], per_batch * request.n_iter)
            if is_cancelled():
                raise errors.JobCancelled()
            return callback_kwargs

        if embeds is None:
            text = dict(prompt=request.prompt, negative_prompt=request.negative_prompt)
        else:
            text = dict(prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1])
        with torch.inference_mode():
            result = pipe(
                **text,
                **mode_kwargs,
                num_images_per_prompt=len(seeds),
                num_inference_steps=request.steps,
                guidance_scale=request.scale,
                eta=request.ddim_eta,
                generator=generators,
                output_type="pil",
                callback_on_step_end=on_step_end,
            )
        return result.images, counter["done"]
