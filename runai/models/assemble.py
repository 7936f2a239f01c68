# -*- test-case-name: runai.test.test_singlefile -*-
"""Diffusers and transformers models filled from a converted single-file state dict, and
the tokenizer folders they take: what every single-file family shares
(:mod:`runai.models.singlefile` for SD 1.x/2.x, :mod:`runai.models.singlefile_xl` for SDXL).

Worker thread only (imports torch and diffusers).
"""

from runai.models import offline  # before diffusers and transformers

import collections

import diffusers
import torch
from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
from diffusers.loaders import single_file_utils
from transformers import CLIPTextConfig, CLIPTokenizer

from runai.models import loadlock, sources
from runai.models.classify import UNET
from runai.models.errors import LoadError
from runai.models.paths import check_tree, contained

try:
    from transformers.initialization import no_init_weights
except ImportError:  # transformers 4.x
    from transformers.modeling_utils import no_init_weights

del offline  # imported for what importing it does

# What a CLIP tokenizer folder holds: the BPE files (what openai/clip-vit-large-patch14
# ships), or one tokenizer.json (what current transformers and `runai convert` write).
TOKENIZER_FILE_SETS = (("vocab.json", "merges.txt"), ("tokenizer.json",))


def tokenizer_at(model_dir, folder, file_sets=TOKENIZER_FILE_SETS):
    """``folder`` (resolved) if it holds a tokenizer inside ``model_dir`` (one of
    ``file_sets``, a CLIP tokenizer's by default), else None."""
    resolved = contained(model_dir, folder)
    if resolved is None or not resolved.is_dir():
        return None

    def present(name):
        found = contained(model_dir, resolved / name)
        return found is not None and found.is_file()

    if not any(all(present(name) for name in names) for names in file_sets):
        return None
    try:
        # from_pretrained reads whatever else is there (tokenizer_config.json, ...): all
        # of it must be inside the model folder too.
        check_tree(model_dir, resolved, limit=1000)
    except LoadError:
        return None
    sources.note(resolved)  # the cache reloads when a file in it changes
    return resolved


def first_tokenizer(model_dir, candidates):
    """``(folder, its name in the model folder)`` of the first candidate that is a
    tokenizer, or ``(None, None)``."""
    for candidate in candidates:
        found = tokenizer_at(model_dir, candidate)
        if found is not None:
            return found, found.relative_to(model_dir).as_posix()
    return None, None


def clip_tokenizer(folder, max_positions):
    tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    if tokenizer.model_max_length > max_positions:
        # Without a tokenizer_config.json, transformers takes 1e30 tokens for the limit,
        # and every prompt fails to encode (OverflowError); CLIP's is its positions, 77.
        tokenizer.model_max_length = max_positions
    return tokenizer


def fill(model, converted, what, source, device, dtype, assign):
    """``model`` with every weight from ``converted``, checked for presence and shape."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in converted or converted[k] is None]
    if missing:
        raise LoadError(
            f"the checkpoint lacks {len(missing)} of the {len(expected)} {what} weights "
            f"(e.g. {', '.join(sorted(missing)[:3])}): it is not a whole Stable Diffusion model, "
            f"or not one that fits {source}"
        )
    tensors = {}
    for key, want in expected.items():
        have = converted[key]
        if tuple(have.shape) != tuple(want.shape):
            raise LoadError(
                f"{what} weight {key} has shape {list(have.shape)} where {source} "
                f"want {list(want.shape)}"
            )
        # A copy, always: model weights must never alias the file's memory map (a file
        # rewritten in place would pull the pages out from under a running model).
        tensors[key] = have.to(device=device, dtype=dtype or have.dtype, copy=True)
    model.load_state_dict(tensors, strict=True, assign=assign)
    return model


def text_config(config):
    return CLIPTextConfig(**{k: v for k, v in config.items() if k != "architectures"})


def text_encoder(cls, config, convert, what, source, device, dtype):
    """A transformers CLIP text model of ``cls`` filled with ``convert(model)``'s weights."""
    # Built without random initialisation (every weight is overwritten), and not on the
    # meta device: CLIP's position ids are a buffer that no checkpoint holds.
    # no_init_weights patches torch process-wide: under the load lock (runai.models.loadlock).
    with loadlock.loading(), no_init_weights():
        model = cls(text_config(config))
    converted = convert(model)
    if not hasattr(model, "text_model"):
        # transformers >= 5.6 flattened CLIPTextModel; the converters still emit the prefix.
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    model = fill(model, converted, what, source, "cpu", dtype, assign=False)
    return model.to(device=device, dtype=dtype)


def unet_and_vae(state, unet_config, vae_config, source, device, dtype, step):
    """The UNet and the VAE of a single file's ``state``, built from their configs on the
    meta device (no memory for random weights) and filled with the converted weights."""
    step("unet")
    # Under the load lock (runai.models.loadlock): the meta device is this thread's alone,
    # but a load in another thread may have torch patched (accelerate's empty weights).
    with loadlock.loading(), torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
    converted = single_file_utils.convert_ldm_unet_checkpoint(state, unet_config)
    unet = fill(unet, converted, "UNet", source, device, dtype, assign=True)
    del converted

    step("vae")
    with loadlock.loading(), torch.device("meta"):
        vae = AutoencoderKL.from_config(vae_config)
    converted = single_file_utils.convert_ldm_vae_checkpoint(state, vae_config)
    vae = fill(vae, converted, "VAE", source, device, dtype, assign=True)
    return unet, vae


def majority_dtype(state):
    counts = collections.Counter()
    for key, tensor in state.items():
        if key.startswith(UNET) and tensor.is_floating_point():
            counts[tensor.dtype] += tensor.numel()
    return counts.most_common(1)[0][0] if counts else torch.float32


def scheduler_from(config):
    cls = getattr(diffusers, str(config.get("_class_name", "")), None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        cls = PNDMScheduler
    return cls.from_config(config)
