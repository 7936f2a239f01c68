# -*- test-case-name: runai.test.test_singlefile_flow -*-
"""An SD3 or FLUX.1 pipeline from one ``.safetensors`` file and its companions, offline.

Worker thread only (imports torch and diffusers).

The file holds the transformer and, for a whole checkpoint, any of the VAE and text
encoders (:mod:`runai.models.flowparts`); what it lacks comes from companion files
(:mod:`runai.models.companions`). The architecture, scheduler and tokenizers come from a
diffusers copy of the base model in the model folder or from the configs runai ships, sized
by the weights (:mod:`runai.models.flowconfigs`). The transformer and VAE are converted by
diffusers' own single-file functions (the text encoders are in transformers' layout already,
under a prefix), built on the meta device and filled with
:func:`runai.models.assemble.fill`: every weight present and of the right shape, never a
random one. float8 files (``torch.float8_e4m3fn``, ComfyUI's "scaled" ones too) are upcast
as they load; ``dtype`` None keeps the transformer's own precision (float8: bfloat16) for
the whole pipeline.
"""

from runai.models import offline  # before diffusers and transformers

import collections
import os
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel, SD3Transformer2DModel
from diffusers.loaders import single_file_utils
from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel, T5TokenizerFast
from twisted.logger import Logger

from runai.models import checkpoint, flowconfigs, flowparts, loadlock
from runai.models.assemble import (
    clip_tokenizer, fill, first_tokenizer, text_encoder as build_clip, tokenizer_at)
from runai.models.companions import LABELS, ROLES, VAE, find_companions
from runai.models.errors import CheckpointError, LoadError
from runai.models.flowconfigs import FLUX, SD3, TOKENIZER_FOLDERS, TOKENIZER_MODELS
from runai.models.flowparts import CLIP_G, CLIP_L, T5XXL

del offline  # imported for what importing it does

log = Logger()

SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
T5_FILE_SETS = (("tokenizer.json",), ("spiece.model",))
# diffusers' FLUX.1 converter splits a single block's fused linear1 at FLUX.1's width.
FLUX_CONVERTER_WIDTH = 3072
TOKENIZER_FILES = {
    CLIP_L: f"vocab.json and merges.txt (or a tokenizer.json) in {TOKENIZER_MODELS[CLIP_L]}/",
    CLIP_G: f"vocab.json and merges.txt (or a tokenizer.json) in {TOKENIZER_MODELS[CLIP_G]}/",
    T5XXL: f"tokenizer.json (or spiece.model) in {TOKENIZER_MODELS[T5XXL]}/",
}
TOKENIZER_NAMES = {CLIP_L: "CLIP-L", CLIP_G: "CLIP-G", T5XXL: "T5"}


# -- tokenizers -----------------------------------------------------------------------


def t5_tokenizer_at(model_dir, folder):
    """``folder`` (resolved) if it holds a T5 tokenizer inside ``model_dir``, else None."""
    return tokenizer_at(model_dir, folder, T5_FILE_SETS)


def _tokenizer_candidates(model_dir, family, base, role):
    own = [base.folder / TOKENIZER_FOLDERS[family][role]] if base.folder is not None else []
    others = []
    for fam, bases in ((FLUX, flowconfigs.FLUX_BASES), (SD3, flowconfigs.SD3_BASES)):
        if role in TOKENIZER_FOLDERS[fam]:
            others += [model_dir / b / TOKENIZER_FOLDERS[fam][role] for names in bases.values() for b in names]
    if role in (CLIP_L, CLIP_G):
        others.append(model_dir / SDXL_BASE / ("tokenizer" if role == CLIP_L else "tokenizer_2"))
    return own + [model_dir / TOKENIZER_MODELS[role]] + others


def find_tokenizers(model_dir, family, variant, base, roles):
    """``{role: (folder, its name in the model folder)}`` for the text encoders ``roles``;
    raises LoadError naming the files to put where."""
    found, lacking = {}, []
    for role in roles:
        candidates = _tokenizer_candidates(model_dir, family, base, role)
        if role == T5XXL:
            folder = next((f for f in (t5_tokenizer_at(model_dir, c) for c in candidates) if f is not None), None)
            rel = folder.relative_to(model_dir).as_posix() if folder is not None else None
        else:
            folder, rel = first_tokenizer(model_dir, candidates)
        if folder is None:
            lacking.append(role)
        found[role] = (folder, rel)
    if lacking:
        base_name = flowconfigs.base_candidates(family, variant)[0][0]
        raise LoadError(
            f"a {LABELS[family]} single-file model needs the "
            f"{' and '.join(TOKENIZER_NAMES[r] for r in roles)} tokenizers, and the model folder has no "
            f"{' and no '.join(TOKENIZER_NAMES[r] for r in lacking)} tokenizer: put "
            + "; ".join(TOKENIZER_FILES[r] for r in lacking)
            + f"; or a diffusers copy of {base_name} (model_index.json, each component's config.json, "
            f"scheduler/scheduler_config.json and its tokenizer folders) in {base_name}/, inside the model folder")
    return found


def _t5_tokenizer(folder, rel):
    try:
        return T5TokenizerFast.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:
        raise LoadError(f"cannot read the T5 tokenizer in {rel} ({type(e).__name__}): put its tokenizer.json "
                        "there (a folder with only spiece.model needs the sentencepiece package)")


# -- reading and converting -------------------------------------------------------------


def _load(path, shown):
    try:
        return checkpoint.load_state_dict(path)
    except CheckpointError as e:
        raise LoadError(f"{shown}: {e.message}")


def transformer_dtype(tensors):
    """The precision most of the weights are in; float8 runs as bfloat16."""
    counts = collections.Counter()
    for tensor in tensors:
        if tensor.is_floating_point():
            counts[tensor.dtype] += tensor.numel()
    dtype = counts.most_common(1)[0][0] if counts else torch.float32
    return torch.bfloat16 if dtype.itemsize == 1 else dtype


def part(state, prefix, dtype):
    """The weights under ``prefix``, without it; ComfyUI's "scaled" float8 weights
    (``X.weight`` with a ``X.scale_weight``) multiplied out in ``dtype``."""
    weights = flowparts.sub(state, prefix)
    for key in [k for k in weights if k.endswith(".scale_weight")]:
        weight = key[:-len("scale_weight")] + "weight"
        if weight in weights:
            weights[weight] = weights[weight].to(dtype) * weights[key].to(dtype)
    return {k: v for k, v in weights.items()
            if not (k.endswith(".scale_weight") or k.endswith(".scale_input") or k == "scaled_fp8")}


def _shapes(weights):
    return {k: tuple(v.shape) for k, v in weights.items()}


def _fill(model, converted, what, source, device, dtype):
    model = fill(model, converted, what, source, device, dtype, assign=True)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise LoadError(f"{what} weight {left[0]} was not filled")
    return model.eval()


def _meta(build, config):
    """``build(config)`` on the meta device: no memory for weights that are overwritten."""
    # Under the load lock (runai.models.loadlock): another thread's load may have torch patched.
    with loadlock.loading(), torch.device("meta"):
        return build(config)


def convert_flux(weights, width):
    """diffusers' FLUX.1 conversion of BFL ``weights``, for a transformer ``width`` wide:
    the converter splits the single blocks' fused q/k/v/MLP at FLUX.1's width, so it is
    handed stand-ins of that shape (on the meta device: no memory) and the real ones are
    split here at the model's own."""
    work, fused = dict(weights), {}
    for key in [k for k in work if k.startswith("single_blocks.") and ".linear1." in k]:
        fused[key] = work[key]
        shape = (7 * FLUX_CONVERTER_WIDTH,) + tuple(work[key].shape[1:])
        work[key] = torch.empty(shape, device="meta")
    converted = single_file_utils.convert_flux_transformer_checkpoint_to_diffusers(work)
    for key, tensor in fused.items():
        index, kind = key.split(".")[1], key.rsplit(".", 1)[1]
        q, k, v, mlp = torch.split(tensor, (width, width, width, tensor.shape[0] - 3 * width), dim=0)
        block = f"single_transformer_blocks.{index}."
        for name, value in (("attn.to_q", q), ("attn.to_k", k), ("attn.to_v", v), ("proj_mlp", mlp)):
            converted[f"{block}{name}.{kind}"] = value
    return converted


def build_transformer(family, weights, base, device, dtype):
    shapes = _shapes(weights)
    if family == FLUX:
        config = flowconfigs.flux_transformer(base.configs["transformer"], shapes)
        model = _meta(FluxTransformer2DModel.from_config, config)
        converted = convert_flux(weights, config["num_attention_heads"] * config["attention_head_dim"])
    else:
        config = flowconfigs.sd3_transformer(base.configs["transformer"], shapes)
        model = _meta(SD3Transformer2DModel.from_config, config)
        converted = single_file_utils.convert_sd3_transformer_checkpoint_to_diffusers(dict(weights))
    return _fill(model, converted, "transformer", base.source, device, dtype)


def build_vae(weights, base, device, dtype):
    config = flowconfigs.vae(base.configs["vae"], _shapes(weights))
    model = _meta(AutoencoderKL.from_config, config)
    converted = single_file_utils.convert_ldm_vae_checkpoint(weights, config)
    return _fill(model, converted, "VAE", base.source, device, dtype)


def _outer(prefix):
    """Where a CLIP model's ``text_projection`` sits: beside its ``text_model.``."""
    return prefix[:-len("text_model.")] if prefix.endswith("text_model.") else prefix


def build_clip_model(role, family, state, prefix, base, device, dtype):
    outer = _outer(prefix)
    weights = part(state, prefix, dtype)
    projection = state.get(outer + "text_projection.weight")
    shapes = _shapes(weights)
    if projection is not None:
        shapes["text_projection.weight"] = tuple(projection.shape)
    config = flowconfigs.clip(base.configs[role], shapes)
    cls = CLIPTextModel if family == FLUX else CLIPTextModelWithProjection
    converted = {"text_model." + k: v for k, v in weights.items() if not k.endswith("position_ids")}
    if cls is CLIPTextModelWithProjection:
        # SD3's CLIP-L files often have no projection; SD3 pools it unprojected (diffusers
        # puts an identity there too).
        converted["text_projection.weight"] = projection if projection is not None else torch.eye(
            config["hidden_size"], dtype=dtype)
    what = {CLIP_L: "CLIP-L", CLIP_G: "CLIP-G"}[role]
    return build_clip(cls, config, lambda model: converted, what, base.source, device, dtype).eval()


def build_t5(weights, base_config, source, device, dtype):
    config = flowconfigs.t5(base_config, _shapes(weights))
    config = T5Config(**{k: v for k, v in config.items() if k not in ("architectures", "_name_or_path")})
    model = _meta(T5EncoderModel, config)
    converted = dict(weights)
    shared = converted.get("shared.weight", converted.get("encoder.embed_tokens.weight"))
    converted.setdefault("shared.weight", shared)
    converted.setdefault("encoder.embed_tokens.weight", shared)
    model = _fill(model, converted, "T5-XXL", source, device, dtype)
    model.encoder.embed_tokens.weight = model.shared.weight  # tied, as transformers leaves them
    if dtype == torch.float16:
        # As transformers loads T5 in float16: its feed-forward outputs in float32 (they overflow).
        for name, module in model.named_modules():
            if name.endswith(".wo"):
                module.float()
    return model


def _companion_prefix(role, shapes):
    if role == VAE:
        return flowparts.vae_prefix(shapes)
    if role == T5XXL:
        return flowparts.t5_prefixes(shapes)[0]
    return flowparts.clip_prefixes(shapes)[0][0]


def scheduler_from(config):
    cls = getattr(diffusers, str(config.get("_class_name", "")), None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        cls = FlowMatchEulerDiscreteScheduler
    return cls.from_config(config)


# -- the pipeline ------------------------------------------------------------------------


def pipeline_from_flow_file(path, model_dir, entry, device, dtype, step, modules=None):
    """A StableDiffusion3Pipeline, FluxPipeline or FluxFillPipeline from an SD3 or FLUX.1
    file and its companions; raises LoadError. The arguments are
    :func:`runai.models.singlefile.pipeline_from_single_file`'s; ``modules``: resolved
    paths of companion files the client chose (Forge's ``forge_additional_modules``)."""
    c = entry.classification
    family = c.version
    if c.kind != "pipeline" or family not in ROLES:
        raise LoadError(f"it is not an SD3 or FLUX.1 model (it looks like a {c.kind} file)")
    label = LABELS[family]
    model_dir, path = Path(os.path.realpath(model_dir)), Path(path)
    try:
        shapes, _ = checkpoint.tensor_shapes(path)
    except CheckpointError as e:
        raise LoadError(e.message)
    inside = flowparts.parts(shapes, family)
    if "transformer" not in inside:
        raise LoadError(f"it has no {label} transformer weights")
    companions = find_companions(model_dir, path, c, chosen=modules, shapes=shapes)
    variant = flowconfigs.variant_of(family, c.variant, flowparts.sub(shapes, inside["transformer"]))
    base = flowconfigs.find_base(model_dir, family, variant)
    texts = [r for r in ROLES[family] if r != VAE and (r in inside or r in companions)]
    tokenizers = find_tokenizers(model_dir, family, variant, base, texts)
    # Read before the weights: a T5 tokenizer folder runai cannot read fails the load at once.
    t5_tokenizer = _t5_tokenizer(*tokenizers[T5XXL]) if T5XXL in tokenizers else None

    step("read")
    state = _load(path, entry.name)
    try:
        prefix = inside["transformer"]
        if dtype is None:
            dtype = transformer_dtype(v for k, v in state.items() if k.startswith(prefix))
        step("transformer")
        transformer = build_transformer(family, part(state, prefix, dtype), base, device, dtype)
        keep = [_outer(p) for r, p in inside.items() if r != "transformer" and r not in companions]
        state = {k: v for k, v in state.items() if any(k.startswith(p) for p in keep)}

        built = {}
        for role in [VAE] + texts:
            step("vae" if role == VAE else "text_encoder")
            if role in companions:
                shown = companions[role].relative_to(model_dir).as_posix()
                source = _load(companions[role], shown)
                prefix = _companion_prefix(role, _shapes(source))
            else:
                source, prefix = state, inside[role]
            if role == VAE:
                built[role] = build_vae(part(source, prefix, dtype), base, device, dtype)
            elif role == T5XXL:
                built[role] = build_t5(part(source, prefix, dtype), base.configs[T5XXL], base.source, device, dtype)
            else:
                built[role] = build_clip_model(role, family, source, prefix, base, device, dtype)
            del source
        state = None
    except KeyError as e:
        raise LoadError(f"the {label} weight {e.args[0]} is missing: the file (or a companion) is not a "
                        f"{label} model, or a damaged one")

    step("tokenizer")
    tokenizer = {}
    for role in texts:
        folder, rel = tokenizers[role]
        if role == T5XXL:
            tokenizer[role] = t5_tokenizer
        else:
            tokenizer[role] = clip_tokenizer(folder, built[role].config.max_position_embeddings)
    if CLIP_G in tokenizer and not rel_in_bases(tokenizers[CLIP_G][1]):
        # SD3's CLIP-G pads with "!", as OpenCLIP does, not with the end token: one from
        # elsewhere is made to pad as SD3's (SDXL's second tokenizer already does).
        tokenizer[CLIP_G].pad_token = "!"
    scheduler = scheduler_from(base.configs["scheduler"])
    if family == FLUX:
        cls = diffusers.FluxFillPipeline if c.variant == "fill" else diffusers.FluxPipeline
        pipe = cls(scheduler=scheduler, vae=built[VAE], transformer=transformer,
                   text_encoder=built[CLIP_L], tokenizer=tokenizer[CLIP_L],
                   text_encoder_2=built[T5XXL], tokenizer_2=tokenizer[T5XXL])
    else:
        if T5XXL not in built:
            log.warn("{name}: no T5-XXL in the file or beside it; SD3 runs with its CLIP models alone",
                     name=entry.name)
        pipe = diffusers.StableDiffusion3Pipeline(
            transformer=transformer, scheduler=scheduler, vae=built[VAE],
            text_encoder=built[CLIP_L], tokenizer=tokenizer[CLIP_L],
            text_encoder_2=built[CLIP_G], tokenizer_2=tokenizer[CLIP_G],
            text_encoder_3=built.get(T5XXL), tokenizer_3=tokenizer.get(T5XXL))
    log.info("{name}: {label} model in {dtype}, built with {source}; {parts}", name=entry.name, label=label,
             dtype=str(dtype).removeprefix("torch."), source=base.source,
             parts=", ".join(f"{r} from {companions[r].relative_to(model_dir).as_posix()}" if r in companions
                             else f"{r} from the file" for r in [VAE] + texts))
    return pipe


def rel_in_bases(rel):
    """Whether a tokenizer's folder is a base model's own (SD3's or SDXL's CLIP-G pads right)."""
    bases = [b for names in flowconfigs.SD3_BASES.values() for b in names] + [SDXL_BASE]
    return any(rel.startswith(b + "/") for b in bases)
