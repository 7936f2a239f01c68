# -*- test-case-name: runai.test.test_singlefile_flow -*-
"""The architecture of an SD3 or FLUX.1 single file: configs found locally, sized by its weights.

A single file holds weights, not configs. They come from a diffusers copy of the base model
in the model folder (:data:`FLUX_BASES`, :data:`SD3_BASES`: ``model_index.json`` and each
component's ``config.json``), or else from the public configs of those models that runai
ships as package data (``runai/models/flow_configs/<org>/<name>/<component>/config.json``), and
never from the Hub. Every size the weights can tell is then taken from the weights
(:func:`flux_transformer`, :func:`sd3_transformer`, :func:`vae`, :func:`clip`, :func:`t5`):
layer counts, widths, heads where a norm's shape says them, input channels, the guidance
embedding, so that a fine-tune, a pruned model or a small test model loads with the right
shapes. What the weights cannot say (activations, the VAE's latent scaling, the scheduler)
is the base model's.

Torch-free: every function works on ``{name: shape}`` tables, which a safetensors header
gives without reading a tensor.
"""

import json
import math
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from runai.models.paths import read_json

FLUX, SD3 = "flux", "sd3"
FLUX_DEV, FLUX_SCHNELL, FLUX_FILL = "black-forest-labs/FLUX.1-dev", "black-forest-labs/FLUX.1-schnell", \
    "black-forest-labs/FLUX.1-Fill-dev"
SD35_LARGE, SD35_LARGE_TURBO, SD35_MEDIUM, SD3_MEDIUM = (
    "stabilityai/stable-diffusion-3.5-large", "stabilityai/stable-diffusion-3.5-large-turbo",
    "stabilityai/stable-diffusion-3.5-medium", "stabilityai/stable-diffusion-3-medium-diffusers")
FLUX_BASES = {"dev": [FLUX_DEV], "schnell": [FLUX_SCHNELL], "fill": [FLUX_FILL, FLUX_DEV]}
SD3_BASES = {"large": [SD35_LARGE, SD35_LARGE_TURBO], "medium": [SD35_MEDIUM], "sd3": [SD3_MEDIUM]}
# What runai ships (package data: runai/models/flow_configs/<org>/<name>/<component>/*.json),
# for each variant: the configs of this model.
SHIPPED_FOLDER = "flow_configs"
SHIPPED = {(FLUX, "dev"): FLUX_DEV, (FLUX, "schnell"): FLUX_SCHNELL, (FLUX, "fill"): FLUX_FILL,
           (SD3, "large"): SD35_LARGE, (SD3, "medium"): SD35_MEDIUM, (SD3, "sd3"): SD35_MEDIUM}
# Component -> config file, per family: the roles' names in a diffusers folder.
FILES = {
    FLUX: {"transformer": "transformer/config.json", "vae": "vae/config.json",
           "clip_l": "text_encoder/config.json", "t5xxl": "text_encoder_2/config.json",
           "scheduler": "scheduler/scheduler_config.json"},
    SD3: {"transformer": "transformer/config.json", "vae": "vae/config.json",
          "clip_l": "text_encoder/config.json", "clip_g": "text_encoder_2/config.json",
          "t5xxl": "text_encoder_3/config.json", "scheduler": "scheduler/scheduler_config.json"},
}
# The tokenizer folder of each text encoder in a diffusers folder of the family.
TOKENIZER_FOLDERS = {FLUX: {"clip_l": "tokenizer", "t5xxl": "tokenizer_2"},
                     SD3: {"clip_l": "tokenizer", "clip_g": "tokenizer_2", "t5xxl": "tokenizer_3"}}
# Where a tokenizer may come from when no base folder has it: the models' own repositories.
TOKENIZER_MODELS = {"clip_l": "openai/clip-vit-large-patch14",
                    "clip_g": "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k",
                    "t5xxl": "google/t5-v1_1-xxl"}


@dataclass
class BaseConfigs:
    source: str  # for messages: which base model the configs came from
    configs: dict  # component -> config dict
    folder: object  # the base model's folder in the model folder, or None (shipped configs)
    own_scheduler: bool  # whether the scheduler is the variant's own (not a sibling's)


def variant_of(family, variant, shapes=None):
    """The variant that picks base models: FLUX.1's ("dev", "schnell", "fill"), or for SD3
    "large", "medium" (3.5 Medium's MMDiT-X: second attentions) or "sd3" (3.0, no QK norm)."""
    if family == FLUX:
        return variant if variant in FLUX_BASES else "dev"
    shapes = shapes or {}
    if any(".attn2." in k for k in shapes):
        return "medium"
    if shapes and not any(".ln_q." in k for k in shapes):
        return "sd3"
    return "large"


def shipped(family, variant):
    """``(name, {component: config})`` that runai ships for ``variant``."""
    name = SHIPPED[(family, variant)]
    folder = resources.files("runai.models").joinpath(SHIPPED_FOLDER, *name.split("/"))
    return name, {role: json.loads(folder.joinpath(*rel.split("/")).read_text(encoding="utf-8"))
                  for role, rel in FILES[family].items()}


def base_candidates(family, variant):
    """The base folders to look for, the variant's own first, then its siblings."""
    bases = FLUX_BASES if family == FLUX else SD3_BASES
    own = list(bases[variant])
    return own, own + [b for names in bases.values() for b in names if b not in own]


def find_base(model_dir, family, variant):
    """The first complete diffusers copy of a base model in the model folder, else runai's
    shipped configs. The scheduler is a sibling's only where the variant's own is absent
    (schnell's is not dev's)."""
    model_dir = Path(os.path.realpath(model_dir))
    own, candidates = base_candidates(family, variant)
    for rel in candidates:
        configs = {role: read_json(model_dir, model_dir / rel / f) for role, f in FILES[family].items()}
        if all(c is not None for c in configs.values()):
            if rel not in own:
                configs["scheduler"] = shipped(family, variant)[1]["scheduler"]
            return BaseConfigs(f"the configs of {rel} in the model folder", configs, model_dir / rel, rel in own)
    name, configs = shipped(family, variant)
    return BaseConfigs(f"runai's built-in configs of {name}", configs, None, True)


# -- sizes from the weights --------------------------------------------------------------


class MissingWeight(KeyError):
    """A weight the architecture needs is not in the file."""


def _get(shapes, key):
    try:
        return tuple(shapes[key])
    except KeyError:
        raise MissingWeight(key)


def count(shapes, prefix):
    """How many numbered blocks ``prefix.N.`` the weights have."""
    indices = set()
    for key in shapes:
        if key.startswith(prefix):
            head = key[len(prefix):].split(".", 1)[0]
            if head.isdigit():
                indices.add(int(head))
    return max(indices) + 1 if indices else 0


def _rope_axes(head_dim):
    # FLUX.1 splits its 128-wide heads 16/56/56 between the (unused) index axis and the two
    # image axes; the same proportions, in even numbers, for another width.
    first = max(2, 2 * round(head_dim * 16 / 128 / 2))
    rest = head_dim - first
    second = 2 * (rest // 4)
    return [first, second, rest - second]


def flux_transformer(base, shapes):
    """FLUX.1's transformer config for BFL-layout ``shapes`` (no prefix)."""
    config = dict(base)
    hidden, in_channels = _get(shapes, "img_in.weight")
    head = _get(shapes, "double_blocks.0.img_attn.norm.query_norm.scale")[0]
    config.update(
        in_channels=in_channels,
        out_channels=_get(shapes, "final_layer.linear.weight")[0],
        num_layers=count(shapes, "double_blocks."),
        num_single_layers=count(shapes, "single_blocks."),
        attention_head_dim=head,
        num_attention_heads=hidden // head,
        joint_attention_dim=_get(shapes, "txt_in.weight")[1],
        pooled_projection_dim=_get(shapes, "vector_in.in_layer.weight")[1],
        guidance_embeds=any(k.startswith("guidance_in.") for k in shapes),
        patch_size=1,
    )
    if sum(config.get("axes_dims_rope") or ()) != head:
        config["axes_dims_rope"] = _rope_axes(head)
    return config


def sd3_transformer(base, shapes):
    """SD3's MMDiT config for original-layout ``shapes`` (no prefix)."""
    config = dict(base)
    hidden, in_channels, patch, _ = _get(shapes, "x_embedder.proj.weight")
    ln_q = shapes.get("joint_blocks.0.x_block.attn.ln_q.weight")
    if ln_q is not None:
        head = ln_q[0]
    else:
        head = config.get("attention_head_dim", 64)
        head = head if hidden % head == 0 else 64
    positions = _get(shapes, "pos_embed")[1]
    context = _get(shapes, "context_embedder.weight")
    config.update(
        patch_size=patch,
        in_channels=in_channels,
        out_channels=_get(shapes, "final_layer.linear.weight")[0] // (patch * patch),
        num_layers=count(shapes, "joint_blocks."),
        attention_head_dim=head,
        num_attention_heads=hidden // head,
        joint_attention_dim=context[1],
        caption_projection_dim=context[0],
        pooled_projection_dim=_get(shapes, "y_embedder.mlp.0.weight")[1],
        pos_embed_max_size=math.isqrt(positions),
        qk_norm="rms_norm" if ln_q is not None else None,
        dual_attention_layers=sorted({int(k.split(".")[1]) for k in shapes
                                      if k.startswith("joint_blocks.") and ".attn2." in k}),
    )
    # The default size (sample_size latent pixels) must fit the position table.
    config["sample_size"] = min(config.get("sample_size", 128), config["pos_embed_max_size"] * patch)
    return config


def vae(base, shapes):
    """An AutoencoderKL config for LDM/BFL-layout VAE ``shapes`` (no prefix)."""
    config = dict(base)
    levels = count(shapes, "encoder.down.")
    blocks = [_get(shapes, f"encoder.down.{i}.block.0.conv1.weight")[0] for i in range(levels)]
    config.update(
        in_channels=_get(shapes, "encoder.conv_in.weight")[1],
        out_channels=_get(shapes, "decoder.conv_out.weight")[0],
        latent_channels=_get(shapes, "decoder.conv_in.weight")[1],
        block_out_channels=blocks,
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        layers_per_block=count(shapes, "encoder.down.0.block."),
        use_quant_conv="quant_conv.weight" in shapes,
        use_post_quant_conv="post_quant_conv.weight" in shapes,
    )
    if "mid_block_add_attention" in config or not any(k.startswith("encoder.mid.attn_1.") for k in shapes):
        config["mid_block_add_attention"] = any(k.startswith("encoder.mid.attn_1.") for k in shapes)
    # Group norms need groups that divide every width.
    config["norm_num_groups"] = math.gcd(config.get("norm_num_groups", 32), *blocks)
    return config


def clip(base, shapes):
    """A CLIP text config for transformers-layout ``shapes`` (``embeddings.*``,
    ``encoder.layers.*``, ``final_layer_norm.*``, optionally ``text_projection.weight``)."""
    config = dict(base)
    positions, hidden = _get(shapes, "embeddings.position_embedding.weight")
    heads = config.get("num_attention_heads", 12)
    if hidden != config.get("hidden_size"):
        heads = hidden // 64 if hidden % 64 == 0 else (heads if hidden % heads == 0 else 1)
    config.update(
        hidden_size=hidden,
        max_position_embeddings=positions,
        vocab_size=_get(shapes, "embeddings.token_embedding.weight")[0],
        num_hidden_layers=count(shapes, "encoder.layers."),
        intermediate_size=_get(shapes, "encoder.layers.0.mlp.fc1.weight")[0],
        num_attention_heads=heads,
        projection_dim=tuple(shapes.get("text_projection.weight", (hidden,)))[0],
    )
    return config


def t5(base, shapes):
    """A T5 encoder config for transformers-layout ``shapes`` (``encoder.block.*``,
    ``shared.weight``)."""
    config = dict(base)
    attention = "encoder.block.0.layer.0.SelfAttention."
    buckets, heads = _get(shapes, attention + "relative_attention_bias.weight")
    embedding = shapes.get("shared.weight") or _get(shapes, "encoder.embed_tokens.weight")
    feed = "encoder.block.0.layer.1.DenseReluDense."
    gated = feed + "wi_0.weight" in shapes
    layers = count(shapes, "encoder.block.")
    config.update(
        vocab_size=embedding[0],
        d_model=embedding[1],
        num_layers=layers,
        num_decoder_layers=layers,
        num_heads=heads,
        relative_attention_num_buckets=buckets,
        d_kv=_get(shapes, attention + "q.weight")[0] // heads,
        d_ff=_get(shapes, feed + ("wi_0.weight" if gated else "wi.weight"))[0],
    )
    if gated != str(config.get("feed_forward_proj", "")).startswith("gated"):
        config["feed_forward_proj"] = "gated-gelu" if gated else "relu"
    return config
