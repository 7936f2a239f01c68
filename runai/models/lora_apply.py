# -*- test-case-name: runai.test.test_lora_apply -*-
"""Merging a job's LoRAs into the loaded model's weights, and taking them out exactly.

Worker side (torch); the engine calls :func:`apply` once per job, after the model is
loaded and before the prompt is encoded. As AUTOMATIC1111 does, each LoRA's delta is
merged into the weights it patches, ``W' = W + weight * scale * delta`` (the ``unet``
weight on the denoiser, ``te`` on the text encoders), so a job with LoRAs runs as fast as
one without. The merged weight is a new tensor put in the module's place; the original
is kept as it was and put back when the next job asks for another set, so the model
without LoRAs is the model as loaded, bit for bit (nothing is ever subtracted). A job
asking for the set merged already (same files, same weights) pays nothing: the model's
cache entry (:class:`runai.models.cache.Loaded`) keeps its :class:`Merged` state.

Module names: kohya's flattened ones (``lora_unet_down_blocks_0_..._to_q``; SDXL's in
the original UNet's ``input_blocks_4_1_...``, renamed with diffusers' own
``_maybe_map_sgm_blocks_to_diffusers``) are looked up in a map built from the model's
``named_modules`` (the path with "." -> "_"); diffusers' and peft's dotted ones
directly. For the flow families, LoRA files in the formats diffusers converts (kohya's
and BFL's FLUX.1 names) go through the pipeline's own ``lora_state_dict`` first. Every
LoRA is checked against the model, shapes included, before any weight changes: one that
does not fit is an error naming it and the family it looks made for.
"""

import os

import torch
import torch.nn.functional as F
from twisted.logger import Logger

from runai.core import errors
from runai.models import lora_files, lora_keys
from runai.models.paths import contained

log = Logger()

DENOISER = "<denoiser>"
KOHYA_PREFIXES = (("lora_unet_", DENOISER), ("lora_transformer_", DENOISER), ("lora_te1_", "text_encoder"),
                  ("lora_te2_", "text_encoder_2"), ("lora_te3_", "text_encoder_3"), ("lora_te_", "text_encoder"))
DOTTED_PREFIXES = (("unet.", DENOISER), ("transformer.", DENOISER), ("text_encoder_2.", "text_encoder_2"),
                   ("text_encoder_3.", "text_encoder_3"), ("text_encoder.", "text_encoder"))
# The original (SGM/LDM) UNet's names for what diffusers names otherwise, once the blocks
# are renamed; flattened, as kohya writes them.
SGM_RENAMES = (("input_blocks_0_0", "conv_in"), ("input_blocks_", "down_blocks_"), ("middle_block_", "mid_block_"),
               ("output_blocks_", "up_blocks_"), ("time_embed_0", "time_embedding_linear_1"),
               ("time_embed_2", "time_embedding_linear_2"), ("label_emb_0_0", "add_embedding_linear_1"),
               ("label_emb_0_2", "add_embedding_linear_2"), ("in_layers_2", "conv1"), ("out_layers_3", "conv2"),
               ("emb_layers_1", "time_emb_proj"), ("skip_connection", "conv_shortcut"))
# Older diffusers attention-processor names of the modules they patch.
PROCESSOR_RENAMES = (("to_q_lora", "to_q"), ("to_k_lora", "to_k"), ("to_v_lora", "to_v"), ("to_out_lora", "to_out.0"))


class Merged:
    """What is merged into one loaded model: the set's key, and the weights it replaced."""

    def __init__(self):
        self.key = ()
        self.originals = []  # (module, original Parameter)
        self.nbytes = 0  # of the merged weights (the originals are kept beside them)
        self.merges = 0  # sets merged so far: a test can tell a set merged once
        self.maps = {}  # component name -> {flattened and dotted module name: module}


# -- the model's modules -----------------------------------------------------------------

def _components(pipe, family):
    denoiser = family.denoiser(pipe)
    found = {DENOISER: denoiser}
    for name in family.text_encoder_names:
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            found[name] = module
    return found


def _module_map(module, text=False):
    """``{name: module}`` of the Linear and Conv2d modules: dotted, and flattened as kohya
    writes them. A text encoder's names also with the ``text_model.`` that transformers 4's
    CLIP had (and LoRAs keep), where the loaded one has none."""
    table = {}
    for name, child in module.named_modules():
        if isinstance(child, (torch.nn.Linear, torch.nn.Conv2d)) and name:
            names = [name] + ([f"text_model.{name}"] if text and not name.startswith("text_model.") else [])
            for alias in names:
                table.setdefault(alias, child)
                table.setdefault(alias.replace(".", "_"), child)
    return table


def _sgm_names(keys, denoiser):
    """``{kohya key: key with diffusers' block names}`` for a UNet LoRA in SGM names."""
    config = getattr(denoiser, "config", None)
    sgm = [k for k in keys if k.startswith("lora_unet_") and
           any(p in k for p in ("input_blocks", "middle_block", "output_blocks"))]
    if not sgm or config is None or not hasattr(config, "layers_per_block"):
        return {}
    from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers

    try:
        mapped = _maybe_map_sgm_blocks_to_diffusers({k: k for k in sgm}, config)
    except (ValueError, IndexError, KeyError):
        return {}
    renamed = {}
    for new, old in mapped.items():
        for before, after in SGM_RENAMES:
            new = new.replace(before, after)
        if new.endswith("_op"):
            new = new[:-3] + "_conv"  # a downsampler
        if new.endswith("_out_2"):
            new = new[:-6] + "_conv_out"
        renamed[old] = new
    return renamed


def _target(key, maps, sgm):
    """``(component, module)`` that a patch's module ``key`` names, or (component, None)."""
    key = sgm.get(key, key)
    for prefix, component in KOHYA_PREFIXES:
        if key.startswith(prefix):
            return component, maps.get(component, {}).get(key[len(prefix):])
    key = key.replace("base_model.model.", "")
    component = DENOISER
    for prefix, name in DOTTED_PREFIXES:
        if key.startswith(prefix):
            component, key = name, key[len(prefix):]
            break
    key = key.replace(".processor.", ".")
    for before, after in PROCESSOR_RENAMES:
        if key.endswith("." + before):
            key = key[: -len(before)] + after
    return component, maps.get(component, {}).get(key)


# -- deltas ----------------------------------------------------------------------------------

def _cp(core, wa, wb):
    """A CP/Tucker-decomposed weight (LoCon's lora_mid, LoHa's hada_t, LoKr's lokr_t2)."""
    temp = torch.einsum("i j k l, j r -> i r k l", core, wb)
    return torch.einsum("i j k l, i r -> r j k l", temp, wa)


def _lora_delta(t, shape):
    up, down = t["up"], t["down"]
    if "mid" in t:
        return torch.einsum("n m k l, i n, m j -> i j k l", t["mid"], up.flatten(1), down.flatten(1))
    if len(shape) == 4 and down.dim() == 4 and down.shape[2:] != (1, 1):
        return F.conv2d(down.transpose(0, 1), up).transpose(0, 1)  # a LoCon convolution, as peft merges it
    if len(shape) == 4 and up.dim() == 4:
        return (up.flatten(1) @ down.flatten(1)).unsqueeze(2).unsqueeze(3)
    return up.flatten(1) @ down.flatten(1)


def _loha_delta(t, shape):
    def half(n):
        a, b = t[f"hada_w{n}_a"], t[f"hada_w{n}_b"]
        if f"hada_t{n}" in t:
            return _cp(t[f"hada_t{n}"], a, b)
        return a.flatten(1) @ b.flatten(1)
    return half(1).reshape(shape) * half(2).reshape(shape)


def _lokr_delta(t, shape):
    def factor(n):
        if f"lokr_w{n}" in t:
            return t[f"lokr_w{n}"]
        a, b = t[f"lokr_w{n}_a"], t[f"lokr_w{n}_b"]
        if n == "2" and "lokr_t2" in t:
            return _cp(t["lokr_t2"], a, b)
        return a.flatten(1) @ b.flatten(1)
    w1, w2 = factor("1"), factor("2")
    if w2.dim() == 4 and w1.dim() == 2:
        w1 = w1.unsqueeze(2).unsqueeze(3)
    return torch.kron(w1, w2)


def _rank(patch):
    t = patch.tensors
    if patch.kind == "lora":
        return t["down"].shape[0]
    if patch.kind == "loha":
        return t["hada_w1_b"].shape[0]
    if patch.kind == "lokr":
        for part in ("lokr_w1_b", "lokr_w2_b"):
            if part in t:
                return t[part].shape[0]
    return None


def scale(patch):
    """``alpha / rank`` where the file gives an alpha (and a rank), else 1."""
    rank = _rank(patch)
    return patch.alpha / rank if patch.alpha is not None and rank else 1.0


DELTAS = {"lora": _lora_delta, "loha": _loha_delta, "lokr": _lokr_delta, "full": lambda t, shape: t["diff"].clone()}


def delta(patch, weight_shape, device=None, dtype=torch.float32):
    """The unscaled delta of one patch, shaped like the weight (``device`` "meta": shapes
    alone, to check a LoRA against a model without computing anything)."""
    tensors = {k: v.to(device=device, dtype=dtype) for k, v in patch.tensors.items()}
    d = DELTAS[patch.kind](tensors, tuple(weight_shape))
    if tuple(d.shape) != tuple(weight_shape):
        if d.numel() != torch.Size(weight_shape).numel() or d.shape[0] != weight_shape[0]:
            raise ValueError(f"a delta of {tuple(d.shape)} for a weight of {tuple(weight_shape)}")
        d = d.reshape(weight_shape)
    return d.contiguous()  # a tensor of its own: the merge scales it in place


# -- one job's set ------------------------------------------------------------------------

def _label(model_family, denoiser):
    """The model's family as a LoRA's family is named (SD 1.x or 2.x told by the width the
    UNet attends to, where it is a released model's)."""
    width = getattr(getattr(denoiser, "config", None), "cross_attention_dim", None)
    versions = model_family.versions
    if len(versions) > 1 and width in lora_keys.CONTEXT_WIDTHS:
        versions = (lora_keys.CONTEXT_WIDTHS[width],)
    return versions


def _plan(ref, network, family, maps, components):
    """``[(module, multiplier, patch)]`` of one LoRA on this model; raises RunaiError
    (before any weight changes) where it does not fit."""
    versions = _label(family, components[DENOISER])
    made_for = lora_keys.label(network.family)
    if network.family != lora_keys.UNKNOWN and network.family not in versions:
        this = lora_keys.label(versions[0]) if len(versions) == 1 else family.label
        raise errors.RunaiError(errors.BAD_REQUEST, f"LoRA {ref.name!r} is for {made_for} models; this model is {this}")
    sgm = _sgm_names(network.patches, components[DENOISER])
    planned, unmatched = [], []
    for key, patch in network.patches.items():
        component, module = _target(key, maps, sgm)
        if module is None:
            unmatched.append(key)
            continue
        weight = ref.unet if component == DENOISER else ref.te
        try:
            shape = delta(patch, module.weight.shape, device="meta").shape
        except (ValueError, RuntimeError, IndexError, KeyError) as e:
            raise errors.RunaiError(
                errors.BAD_REQUEST,
                f"LoRA {ref.name!r} does not fit this {family.label} model ({key[:120]}: {str(e)[:120]}); "
                f"it looks made for {made_for}") from None
        del shape
        if weight:
            planned.append((module, weight * scale(patch), patch))
    if unmatched and len(unmatched) == len(network.patches):
        raise errors.RunaiError(errors.BAD_REQUEST, f"LoRA {ref.name!r} matches nothing in this {family.label} "
                                f"model (e.g. {unmatched[0][:120]}); it looks made for {made_for}")
    if unmatched:
        log.warn("LoRA {name}: {n} of its modules match nothing in the model (e.g. {key}); merging the rest",
                 name=ref.name, n=len(unmatched), key=unmatched[0][:120])
    return planned


def _converter(pipe):
    """The pipeline's own diffusers conversion, for the flow families' non-diffusers
    formats (kohya's and BFL's FLUX.1 names); None where runai reads the file itself."""
    convert = getattr(type(pipe), "lora_state_dict", None)
    if convert is None or not hasattr(pipe, "transformer"):
        return None

    def run(state, metadata):
        keys = list(state)
        if any(k.startswith(("transformer.", "text_encoder", "lora_transformer_")) for k in keys) \
                or any(".hada_" in k or ".lokr_" in k for k in keys):
            return state  # diffusers' own names, or LyCORIS: read here as they are
        theirs = ("lora_unet_", "diffusion_model.", "double_blocks", "single_blocks")
        if not any(k.startswith(theirs) or "processor" in k for k in keys):
            return state
        try:
            converted = convert(dict(state))
        except Exception as e:  # diffusers asserts what it expects of the real model's sizes
            raise errors.RunaiError(errors.BAD_REQUEST, f"diffusers cannot convert this LoRA for a "
                                    f"{type(pipe).__name__}: {type(e).__name__}: {str(e)[:200]}") from None
        return converted[0] if isinstance(converted, tuple) else converted
    run.key = type(pipe).__name__  # what the store keeps its result under
    return run


def store(loader):
    """The loader's :class:`runai.models.lora_files.LoraStore`, made on first use: at most
    a quarter of the cache's byte budget where it has one."""
    if loader.loras is None:
        budget = lora_files.DEFAULT_STORE_BYTES
        if loader.max_bytes:
            budget = min(budget, loader.max_bytes // 4)
        loader.loras = lora_files.LoraStore(budget)
    return loader.loras


def _key(refs):
    key = []
    for ref in refs:
        if ref.te or ref.unet:
            st = os.stat(ref.path)
            key.append((ref.path, st.st_size, st.st_mtime_ns, float(ref.te), float(ref.unet)))
    return tuple(key)


def restore(entry):
    """Put back every weight a merge replaced (the model as loaded, bit for bit)."""
    merged = entry.loras
    if merged is None or not merged.originals:
        if merged is not None:
            merged.key = ()
        return
    for module, original in reversed(merged.originals):
        module.weight = original
    entry.nbytes -= merged.nbytes
    merged.originals, merged.key, merged.nbytes = [], (), 0


def apply(loader, family, refs):
    """Merge the LoRAs ``refs`` (:class:`runai.models.loras.LoraRef`) into the model in
    use (``loader.current``), in place of whatever set is merged; raises RunaiError."""
    entry = loader.current
    try:
        key = _key(refs)
    except OSError:
        raise errors.RunaiError(errors.MODEL_NOT_FOUND, "a LoRA file of the request is gone from the model folder")
    if entry.loras is None:
        if not key:
            return
        entry.loras = Merged()
    merged = entry.loras
    if key == merged.key:
        return
    pipe = entry.pipe
    components = _components(pipe, family)
    for name, module in components.items():
        if name not in merged.maps:
            merged.maps[name] = _module_map(module, text=name != DENOISER)
    plans = []
    convert = _converter(pipe)
    model_dir = getattr(loader, "model_dir", None)
    for ref in refs:
        if ref.te or ref.unet:
            # Checked again here, just before it is read: a link may have been swapped in.
            if model_dir is not None and contained(model_dir, ref.path) is None:
                raise errors.RunaiError(errors.PATH_OUTSIDE_MODEL_DIR, f"LoRA {ref.name!r} leads outside the model "
                                        "folder (it changed on disk since the request came in)")
            network = store(loader).get(ref.path, ref.name, convert)
            plans += _plan(ref, network, family, merged.maps, components)
    restore(entry)
    merged.key = None  # until the merge is whole: a failed one is taken out by the next job
    try:
        _merge(entry, plans)
    except torch.OutOfMemoryError:
        failed = True
    else:
        failed = False
    if failed:  # outside the except block, so that its frames let the tensors go
        restore(entry)
        raise errors.RunaiError(errors.OUT_OF_MEMORY, "out of memory merging the LoRAs into the model")
    merged.key = key
    merged.merges += 1


def _merge(entry, plans):
    merged = entry.loras
    by_module = {}
    for module, multiplier, patch in plans:
        by_module.setdefault(module, []).append((multiplier, patch))
    with torch.no_grad():
        for module, patches in by_module.items():
            weight = module.weight
            total = None
            for multiplier, patch in patches:
                # In place where it is the same arithmetic (peft's: (B @ A) * scale, + W), so
                # that one new tensor per module is all a merge allocates.
                d = delta(patch, weight.shape, device=weight.device).mul_(multiplier)
                total = d if total is None else total.add_(d)
            total = total.to(weight.dtype)
            new = torch.nn.Parameter(total.add_(weight), requires_grad=weight.requires_grad)
            merged.originals.append((module, weight))
            module.weight = new
            merged.nbytes += new.numel() * new.element_size()
            entry.nbytes += new.numel() * new.element_size()
