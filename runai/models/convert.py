# -*- test-case-name: runai.test.test_convert -*-
"""Converting between a single-file checkpoint and a diffusers folder, both ways.

* :func:`single_file_to_diffusers` loads a ``.safetensors``/``.ckpt`` the way the server
  does (restricted unpickling, local configs only: :mod:`runai.models.singlefile`) and
  saves it as a diffusers folder. :func:`run_request` is the server's ``convert`` action.
* :func:`diffusers_to_single_file` writes a diffusers folder as one ``.safetensors`` in
  the original key layout (LDM's for SD 1.x/2.x, :mod:`runai.models.ldm_layout`; sgm's for
  SDXL, :mod:`runai.models.xl_layout`), which AUTOMATIC1111 and diffusers'
  ``from_single_file`` both load.

Both write to a hidden temporary name beside the destination and rename it into place
when complete (:mod:`runai.models.atomic`), so that an interrupted conversion never leaves
half a model that the library would list, and never replace anything that exists.
"""

import time
from dataclasses import dataclass
from pathlib import Path

from twisted.logger import Logger

from runai.core import errors
from runai.models.atomic import check_free, write_then_rename
from runai.models import loadlock
from runai.models import xl_layout
from runai.models.classify import SDXL, V1, V2, classify_diffusers
from runai.models.errors import MAX_CAUSE_CHARS, CheckpointError, ConvertError, LoadError
from runai.models.ldm_layout import clip_to_ldm, open_clip_to_ldm, unet_to_ldm, vae_to_ldm
from runai.models.paths import check_tree, contained, read_json
from runai.models.singlefile import pipeline_from_single_file

log = Logger()

STAGES = ("read", "unet", "vae", "text_encoder", "tokenizer", "save")


@dataclass(frozen=True)
class ConvertResult:
    path: str  # the new model, relative to the model folder (or as given, for the command)
    source: str
    version: str
    seconds: float


# -- single file -> diffusers ------------------------------------------------------------------


def single_file_to_diffusers(src, dst, model_dir, entry, on_progress=None, is_cancelled=None, shown=None):
    """Save the single-file model ``src`` as a diffusers folder at ``dst``.

    ``entry`` is its :class:`runai.models.library.ModelEntry`; configs and tokenizer come from
    ``model_dir``. ``on_progress(step, total)`` follows each stage; a true
    ``is_cancelled()`` stops at the next stage with JobCancelled.
    """
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline

    src, dst = Path(src), Path(dst)
    shown = shown or str(dst)
    total = len(STAGES)
    report = on_progress or (lambda step, total: None)
    cancelled = is_cancelled or (lambda: False)

    def stage(name):
        if cancelled():
            raise errors.JobCancelled()
        # The denoiser is a UNet or a transformer, one stage either way.
        index = STAGES.index("unet" if name == "transformer" else name)
        if index:
            report(index, total)

    check_free(dst, shown)
    try:
        # Under the process's load lock, as every load (runai.models.loadlock): a worker
        # may be loading a model beside this conversion.
        with loadlock.loading():
            pipe = pipeline_from_single_file(src, model_dir, entry, device="cpu", dtype=None, on_step=stage)
    except LoadError as e:
        raise ConvertError(e.message)
    stage("save")
    if entry.classification.inpainting and type(pipe) is StableDiffusionPipeline:
        # So that the folder says what it is, for runai's list and for other tools (an
        # SDXL inpainting model is already a StableDiffusionXLInpaintPipeline).
        pipe = StableDiffusionInpaintPipeline(**pipe.components, requires_safety_checker=False)

    def save(temporary):
        pipe.save_pretrained(str(temporary), safe_serialization=True)
        if cancelled():
            raise errors.JobCancelled()

    write_then_rename(dst, shown, save)
    report(total, total)
    return entry.classification.version


def run_request(request, loader, on_progress, is_cancelled):
    """The server's ``convert`` action (worker thread): returns a ConvertResult."""
    started = time.monotonic()
    if loader.library is None:
        raise errors.RunaiError(errors.INTERNAL, "this engine has no model folder")
    try:
        # Checked again here, in the worker, just before it is read: a link may have been
        # swapped in since the request was parsed.
        source = contained(loader.model_dir, request.model_path)
        if source is None:
            raise ConvertError("it leads outside the model folder (it changed on disk since the request came in)")
        entry = loader.library.describe(source, request.model_name)
        version = single_file_to_diffusers(
            source, request.target_path, loader.model_dir, entry,
            on_progress=on_progress, is_cancelled=is_cancelled, shown=request.target_name,
        )
    except (ConvertError, LoadError, CheckpointError) as e:
        # Before RunaiError, which they all are: the client is told what was converted.
        raise errors.RunaiError(errors.CONVERT_FAILED, f"could not convert {request.model_name!r}: {e.message}")
    except errors.RunaiError:
        raise  # a cancel, or an error that is already the client's
    except Exception as e:
        # diffusers' conversion functions, the device (out of memory), a file that went
        # away: all of them a conversion that could not finish, never the server's fault.
        log.failure("converting {name} failed", name=request.model_name)
        cause = errors.scrub(f"{type(e).__name__}: {e}", loader.model_dir, names=(
            (request.model_path, request.model_name), (request.target_path, request.target_name)))
        raise errors.RunaiError(errors.CONVERT_FAILED,
                                f"could not convert {request.model_name!r}: {cause[:MAX_CAUSE_CHARS]}")
    return ConvertResult(request.target_name, request.model_name, version, time.monotonic() - started)


# -- diffusers -> single file (LDM layout) ----------------------------------------------------

def _has(index, component):
    """Whether a diffusers folder's ``model_index.json`` has ``component`` (not [null, null])."""
    value = (index or {}).get(component)
    return isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value)


def diffusers_to_ldm(folder, dtype=None, model_dir=None):
    """``(LDM state dict, metadata)`` for the diffusers folder ``folder``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    folder = Path(folder)
    model_dir = Path(model_dir) if model_dir is not None else folder
    if model_dir is not None:
        try:
            check_tree(model_dir, folder)
        except LoadError as e:
            raise ConvertError(e.message)
    c = classify_diffusers(folder, model_dir)
    # "refiner": however the library comes to call an SDXL refiner, it converts.
    if c.kind not in ("pipeline", "refiner") or c.version not in (V1, V2, SDXL):
        raise ConvertError(f"{folder.name} is not a Stable Diffusion 1.x/2.x/XL diffusers folder ({c.version})")
    # A refiner has no first text encoder.
    refiner = c.version == SDXL and not _has(read_json(model_dir, folder / "model_index.json"), "text_encoder")
    # Loaded as models, not read as files: diffusers renames the keys of older folders
    # (attention naming, .bin weights) on the way in.
    local = dict(local_files_only=True)
    try:
        with loadlock.loading():
            unet = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet", low_cpu_mem_usage=False,
                                                        **local)
            vae = AutoencoderKL.from_pretrained(str(folder), subfolder="vae", low_cpu_mem_usage=False, **local)
            text_encoder = None if refiner else CLIPTextModel.from_pretrained(
                str(folder), subfolder="text_encoder", **local)
            text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
                str(folder), subfolder="text_encoder_2", **local) if c.version == SDXL else None
    except (OSError, ValueError, RuntimeError) as e:
        raise ConvertError(f"cannot read {folder.name}: {type(e).__name__}: {str(e)[:300]}")
    if c.version == SDXL:
        state = xl_layout.to_sgm(unet.state_dict(), dict(unet.config), vae.state_dict(), dict(vae.config),
                                 text_encoder and text_encoder.state_dict(), text_encoder_2.state_dict())
    else:
        state = {}
        state.update(unet_to_ldm(unet.state_dict(), dict(unet.config)))
        state.update(vae_to_ldm(vae.state_dict(), dict(vae.config)))
        text = text_encoder.state_dict()
        state.update(open_clip_to_ldm(text) if c.version == V2 else clip_to_ldm(text))
    out = {}
    for key, tensor in state.items():
        tensor = tensor.detach()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        # Own storage for each: safetensors refuses tensors that share memory.
        out[key] = tensor.contiguous().clone()
    prediction = c.prediction_type or "epsilon"
    if c.version == SDXL:
        architecture = xl_layout.architecture(c.inpainting, refiner)
    else:
        architecture = {
            V1: "stable-diffusion-v1",
            V2: "stable-diffusion-v2-768-v" if prediction == "v_prediction" else "stable-diffusion-v2-512",
        }[c.version] + ("/inpainting" if c.inpainting else "")
    metadata = {
        "format": "pt",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": architecture,
        "modelspec.prediction_type": "v" if prediction == "v_prediction" else "epsilon",
        "modelspec.implementation": "https://github.com/Stability-AI/" + (
            "generative-models" if c.version == SDXL else "stablediffusion"),
    }
    return out, metadata


def diffusers_to_single_file(folder, dst, dtype=None, model_dir=None, shown=None):
    """Write the diffusers folder ``folder`` as one original-layout ``.safetensors`` at ``dst``."""
    from safetensors.torch import save_file

    dst = Path(dst)
    shown = shown or str(dst)
    if dst.suffix.lower() != ".safetensors":
        raise ConvertError(f"{shown} must end in .safetensors")
    check_free(dst, shown)
    state, metadata = diffusers_to_ldm(folder, dtype=dtype, model_dir=model_dir)
    write_then_rename(dst, shown, lambda temporary: save_file(state, str(temporary), metadata=metadata))
    return len(state)
