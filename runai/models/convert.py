"""Converting between a single-file checkpoint and a diffusers folder, both ways.

* :func:`single_file_to_diffusers` loads a ``.safetensors``/``.ckpt`` the way the server
  does (restricted unpickling, local configs only) and saves it as a diffusers folder.
* :func:`diffusers_to_single_file` writes a diffusers folder as one ``.safetensors`` in
  the original LDM key layout (``model.diffusion_model.*``, ``first_stage_model.*``,
  ``cond_stage_model.*``), which AUTOMATIC1111 and diffusers' ``from_single_file`` both
  load. diffusers ships this direction only as a script outside its wheel, hard-wired to
  SD's sizes; the mapping here is derived from the UNet's config, so it works for any
  size, and is checked against diffusers' own loader by the tests.

Both write to a hidden temporary name beside the destination and rename it into place
when complete, so that an interrupted conversion never leaves half a model that the
library would list, and never replace anything that exists.
"""

import errno
import os
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from twisted.logger import Logger

from runai.core import errors
from runai.models import library
from runai.models.loader import LoadError, check_tree, pipeline_from_single_file
from runai.models.paths import contained

log = Logger()

STAGES = ("read", "unet", "vae", "text_encoder", "tokenizer", "save")


class ConvertError(Exception):
    def __init__(self, message):
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class ConvertResult:
    path: str  # the new model, relative to the model folder (or as given, for the command)
    source: str
    version: str
    seconds: float


def _temporary_beside(dst):
    return dst.parent / f".{dst.name}.runai-{secrets.token_hex(4)}.tmp"


def _remove(path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except OSError:
            pass


def _exists(shown):
    return ConvertError(f"{shown} already exists; move it away first (nothing is overwritten)")


def _check_free(dst, shown):
    if os.path.lexists(dst):
        raise _exists(shown)


def _move_into_place(temporary, dst, shown):
    """Rename ``temporary`` to ``dst`` unless ``dst`` exists, without the gap between a
    check and a rename in which something could appear at ``dst`` and be replaced."""
    if os.name == "nt":
        os.rename(temporary, dst)  # never replaces there: FileExistsError
        return
    if temporary.is_dir():
        # rename() replaces an empty directory: make dst ours first (mkdir fails if it
        # exists), then replace that empty placeholder. Whatever someone put into it in
        # between makes the rename fail with ENOTEMPTY rather than be replaced.
        try:
            os.mkdir(dst)
        except FileExistsError:
            raise _exists(shown)
        try:
            os.rename(temporary, dst)
        except OSError as e:
            try:
                os.rmdir(dst)  # only if still empty: then it is our placeholder
            except OSError:
                pass
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise _exists(shown)
            raise
        return
    # A hard link is made only where nothing is: the file appears whole, or not at all.
    try:
        os.link(temporary, dst)
    except FileExistsError:
        raise _exists(shown)
    except OSError:
        # A file system without hard links: an exclusively created placeholder, then
        # replaced by the rename.
        try:
            fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            raise _exists(shown)
        placeholder = os.fstat(fd).st_ino
        os.close(fd)
        try:
            os.rename(temporary, dst)
        except OSError:
            try:
                if os.stat(dst, follow_symlinks=False).st_ino == placeholder:
                    os.unlink(dst)
            except OSError:
                pass
            raise
        return
    try:
        os.unlink(temporary)
    except OSError:
        pass  # the model is in place; the caller removes what is left of the temporary


def _write_then_rename(dst, shown, write):
    """``write(path)`` under a hidden name beside ``dst``, then rename it into place: a
    failed or cancelled write leaves nothing behind, and nothing is overwritten."""
    temporary = _temporary_beside(dst)
    try:
        write(temporary)
        _check_free(dst, shown)
        _move_into_place(temporary, dst, shown)
    except OSError as e:
        raise ConvertError(f"cannot write {shown}: {e.strerror or e}")
    finally:
        if os.path.lexists(temporary):
            _remove(temporary)


# -- single file -> diffusers ------------------------------------------------------------------


def single_file_to_diffusers(src, dst, model_dir, entry, on_progress=None, is_cancelled=None, shown=None):
    """Save the single-file model ``src`` as a diffusers folder at ``dst``.

    ``entry`` is its :class:`runai.models.library.ModelEntry`; configs and tokenizer come from
    ``model_dir``. ``on_progress(step, total)`` follows each stage; a true
    ``is_cancelled()`` stops at the next stage with JobCancelled.
    """
    from diffusers import StableDiffusionInpaintPipeline

    src, dst = Path(src), Path(dst)
    shown = shown or str(dst)
    total = len(STAGES)
    report = on_progress or (lambda step, total: None)
    cancelled = is_cancelled or (lambda: False)

    def stage(name):
        if cancelled():
            raise errors.JobCancelled()
        index = STAGES.index(name)
        if index:
            report(index, total)

    _check_free(dst, shown)
    try:
        pipe = pipeline_from_single_file(src, model_dir, entry, device="cpu", dtype=None, on_step=stage)
    except LoadError as e:
        raise ConvertError(e.message)
    stage("save")
    if entry.classification.inpainting:
        # So that the folder says what it is, for runai's list and for other tools.
        pipe = StableDiffusionInpaintPipeline(**pipe.components, requires_safety_checker=False)

    def save(temporary):
        pipe.save_pretrained(str(temporary), safe_serialization=True)
        if cancelled():
            raise errors.JobCancelled()

    _write_then_rename(dst, shown, save)
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
    except errors.RunaiError:
        raise  # a cancel, or an error that is already the client's
    except ConvertError as e:
        raise errors.RunaiError(errors.CONVERT_FAILED, f"could not convert {request.model_name!r}: {e.message}")
    except Exception as e:
        # diffusers' conversion functions, the device (out of memory), a file that went
        # away: all of them a conversion that could not finish, never the server's fault.
        log.failure("converting {name} failed", name=request.model_name)
        cause = f"{type(e).__name__}: {e}"
        for path, name in ((request.model_path, request.model_name), (request.target_path, request.target_name)):
            cause = cause.replace(str(path), str(name))
        if loader.model_dir is not None:
            cause = cause.replace(str(loader.model_dir) + os.sep, "")
        raise errors.RunaiError(errors.CONVERT_FAILED,
                                f"could not convert {request.model_name!r}: {cause[:500]}")
    return ConvertResult(request.target_name, request.model_name, version, time.monotonic() - started)


# -- diffusers -> single file (LDM layout) ----------------------------------------------------

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename_first(rest, table):
    for old, new in table.items():
        if rest == old or rest.startswith(old + "."):
            return new + rest[len(old):]
    return rest


def _int_per_level(value, levels, what):
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ConvertError(f"a UNet with a different {what} per level is not a Stable Diffusion 1.x/2.x UNet")
        return value[0]
    return value


def unet_prefixes(config):
    """``{diffusers prefix: (LDM prefix, is_resnet)}`` for a UNet2DConditionModel config."""
    levels = len(config["block_out_channels"])
    per_level = _int_per_level(config.get("layers_per_block", 2), levels, "layers_per_block")
    if config.get("addition_embed_type") or config.get("class_embed_type"):
        raise ConvertError("SDXL-style UNets (added embeddings) are not converted")
    down, up = config["down_block_types"], config["up_block_types"]
    table = {
        "time_embedding.linear_1.": ("time_embed.0.", False),
        "time_embedding.linear_2.": ("time_embed.2.", False),
        "conv_in.": ("input_blocks.0.0.", False),
        "conv_norm_out.": ("out.0.", False),
        "conv_out.": ("out.2.", False),
        "mid_block.resnets.0.": ("middle_block.0.", True),
        "mid_block.attentions.0.": ("middle_block.1.", False),
        "mid_block.resnets.1.": ("middle_block.2.", True),
    }
    for i in range(levels):
        for j in range(per_level):
            n = 1 + i * (per_level + 1) + j
            table[f"down_blocks.{i}.resnets.{j}."] = (f"input_blocks.{n}.0.", True)
            if "CrossAttn" in down[i]:
                table[f"down_blocks.{i}.attentions.{j}."] = (f"input_blocks.{n}.1.", False)
        if i < levels - 1:
            n = 1 + i * (per_level + 1) + per_level
            table[f"down_blocks.{i}.downsamplers.0.conv."] = (f"input_blocks.{n}.0.op.", False)
    for i in range(levels):
        attention = "CrossAttn" in up[i]
        for j in range(per_level + 1):
            n = i * (per_level + 1) + j
            table[f"up_blocks.{i}.resnets.{j}."] = (f"output_blocks.{n}.0.", True)
            if attention:
                table[f"up_blocks.{i}.attentions.{j}."] = (f"output_blocks.{n}.1.", False)
        if i < levels - 1:
            n = i * (per_level + 1) + per_level
            # After the resnet (0) and, where there is one, the attention (1).
            table[f"up_blocks.{i}.upsamplers.0."] = (f"output_blocks.{n}.{2 if attention else 1}.", False)
    return table


def _map(state, table, prefix, what, rename=None):
    out = {}
    ordered = sorted(table, key=len, reverse=True)
    for key, tensor in state.items():
        match = next((p for p in ordered if key.startswith(p)), None)
        if match is None:
            raise ConvertError(f"{what} weight {key} has no place in the original layout")
        target, flag = table[match]
        rest = key[len(match):]
        if rename is not None:
            rest, tensor = rename(flag, rest, tensor)
        out[prefix + target + rest] = tensor
    return out


def unet_to_ldm(state, config):
    def rename(is_resnet, rest, tensor):
        return (_rename_first(rest, _RESNET) if is_resnet else rest), tensor

    return _map(state, unet_prefixes(config), library.UNET, "UNet", rename)


def vae_to_ldm(state, config):
    levels = len(config["block_out_channels"])
    table = {}
    for side in ("encoder", "decoder"):
        for name, ldm in (("conv_in.", "conv_in."), ("conv_out.", "conv_out."), ("conv_norm_out.", "norm_out.")):
            table[f"{side}.{name}"] = (f"{side}.{ldm}", "plain")
        table[f"{side}.mid_block.resnets.0."] = (f"{side}.mid.block_1.", "resnet")
        table[f"{side}.mid_block.resnets.1."] = (f"{side}.mid.block_2.", "resnet")
        table[f"{side}.mid_block.attentions.0."] = (f"{side}.mid.attn_1.", "attention")
    for name in ("quant_conv.", "post_quant_conv."):
        table[name] = (name, "plain")
    for i in range(levels):
        table[f"encoder.down_blocks.{i}.resnets."] = (f"encoder.down.{i}.block.", "resnet")
        table[f"encoder.down_blocks.{i}.downsamplers.0.conv."] = (f"encoder.down.{i}.downsample.conv.", "plain")
        # LDM numbers the decoder's levels from the lowest resolution up.
        table[f"decoder.up_blocks.{i}.resnets."] = (f"decoder.up.{levels - 1 - i}.block.", "resnet")
        table[f"decoder.up_blocks.{i}.upsamplers.0.conv."] = (f"decoder.up.{levels - 1 - i}.upsample.conv.", "plain")

    def rename(kind, rest, tensor):
        if kind == "resnet":
            return rest.replace("conv_shortcut", "nin_shortcut"), tensor
        if kind == "attention":
            rest = _rename_first(rest, _VAE_ATTENTION)
            if rest.endswith(".weight") and tensor.ndim == 2:
                tensor = tensor.reshape(*tensor.shape, 1, 1)  # LDM's attention is 1x1 convolutions
        return rest, tensor

    return _map(state, table, "first_stage_model.", "VAE", rename)


def _text_keys(state):
    # transformers >= 5.6 dropped the "text_model." level of CLIPTextModel's keys.
    return {k.removeprefix("text_model."): v for k, v in state.items() if not k.endswith("position_ids")}


def clip_to_ldm(state):
    """SD 1.x: OpenAI CLIP keeps transformers' names under ``cond_stage_model.transformer``."""
    return {"cond_stage_model.transformer.text_model." + k: v for k, v in _text_keys(state).items()}


def open_clip_to_ldm(state):
    """SD 2.x: OpenCLIP names, with q/k/v fused into ``in_proj``."""
    import torch

    state = _text_keys(state)
    prefix = "cond_stage_model.model."
    out = {}
    fixed = {
        "embeddings.token_embedding.weight": "token_embedding.weight",
        "embeddings.position_embedding.weight": "positional_embedding",
        "final_layer_norm.weight": "ln_final.weight",
        "final_layer_norm.bias": "ln_final.bias",
    }
    layer_names = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                   "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    fused = {}
    for key, tensor in state.items():
        if key in fixed:
            out[prefix + fixed[key]] = tensor
            continue
        parts = key.split(".")
        if parts[:2] != ["encoder", "layers"] or len(parts) < 5:
            raise ConvertError(f"text encoder weight {key} has no place in the OpenCLIP layout")
        layer, rest = parts[2], ".".join(parts[3:])
        if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
            which, kind = rest.split(".")[1][0], rest.split(".")[-1]
            fused.setdefault((layer, kind), {})[which] = tensor
            continue
        renamed = _rename_first(rest, layer_names)
        if renamed == rest:
            raise ConvertError(f"text encoder weight {key} has no place in the OpenCLIP layout")
        out[f"{prefix}transformer.resblocks.{layer}.{renamed}"] = tensor
    for (layer, kind), qkv in fused.items():
        if set(qkv) != {"q", "k", "v"}:
            raise ConvertError(f"text encoder layer {layer} lacks part of its attention {kind}")
        out[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([qkv["q"], qkv["k"], qkv["v"]])
    return out


def diffusers_to_ldm(folder, dtype=None, model_dir=None):
    """``(LDM state dict, metadata)`` for the diffusers folder ``folder``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    folder = Path(folder)
    model_dir = Path(model_dir) if model_dir is not None else folder
    if model_dir is not None:
        try:
            check_tree(model_dir, folder)
        except LoadError as e:
            raise ConvertError(e.message)
    c = library.classify_diffusers(folder, model_dir)
    if c.kind != "pipeline" or c.version not in library.SERVED_VERSIONS:
        raise ConvertError(f"{folder.name} is not a Stable Diffusion 1.x/2.x diffusers folder ({c.version})")
    # Loaded as models, not read as files: diffusers renames the keys of older folders
    # (attention naming, .bin weights) on the way in.
    local = dict(local_files_only=True)
    try:
        unet = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet", low_cpu_mem_usage=False, **local)
        vae = AutoencoderKL.from_pretrained(str(folder), subfolder="vae", low_cpu_mem_usage=False, **local)
        text_encoder = CLIPTextModel.from_pretrained(str(folder), subfolder="text_encoder", **local)
    except (OSError, ValueError, RuntimeError) as e:
        raise ConvertError(f"cannot read {folder.name}: {type(e).__name__}: {str(e)[:300]}")
    state = {}
    state.update(unet_to_ldm(unet.state_dict(), dict(unet.config)))
    state.update(vae_to_ldm(vae.state_dict(), dict(vae.config)))
    text = text_encoder.state_dict()
    state.update(open_clip_to_ldm(text) if c.version == library.V2 else clip_to_ldm(text))
    out = {}
    for key, tensor in state.items():
        tensor = tensor.detach()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        # Own storage for each: safetensors refuses tensors that share memory.
        out[key] = tensor.contiguous().clone()
    prediction = c.prediction_type or "epsilon"
    metadata = {
        "format": "pt",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": {
            library.V1: "stable-diffusion-v1",
            library.V2: "stable-diffusion-v2-768-v" if prediction == "v_prediction" else "stable-diffusion-v2-512",
        }[c.version] + ("/inpainting" if c.inpainting else ""),
        "modelspec.prediction_type": "v" if prediction == "v_prediction" else "epsilon",
        "modelspec.implementation": "https://github.com/Stability-AI/stablediffusion",
    }
    return out, metadata


def diffusers_to_single_file(folder, dst, dtype=None, model_dir=None, shown=None):
    """Write the diffusers folder ``folder`` as one LDM-layout ``.safetensors`` at ``dst``."""
    from safetensors.torch import save_file

    dst = Path(dst)
    shown = shown or str(dst)
    if dst.suffix.lower() != ".safetensors":
        raise ConvertError(f"{shown} must end in .safetensors")
    _check_free(dst, shown)
    state, metadata = diffusers_to_ldm(folder, dtype=dtype, model_dir=model_dir)
    _write_then_rename(dst, shown, lambda temporary: save_file(state, str(temporary), metadata=metadata))
    return len(state)
