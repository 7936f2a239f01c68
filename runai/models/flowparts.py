# -*- test-case-name: runai.test.test_singlefile_flow,runai.test.test_classify -*-
"""Which parts of an SD3 or FLUX.1 model a file holds, and at what width, from its key names
and shapes alone: the transformer, the VAE, CLIP-L, CLIP-G, T5-XXL.

The layouts users keep:

- FLUX.1 transformer: BFL's keys (``double_blocks.*``, ``single_blocks.*``, ``img_in.*``),
  bare (``flux1-dev.safetensors``) or under ``model.diffusion_model.`` (a ComfyUI checkpoint);
  SD3: ``model.diffusion_model.joint_blocks.*`` (or bare).
- VAE: the original (LDM, BFL's AE) keys ``encoder.down.N.block.M.*``, ``decoder.*``, bare
  (``ae.safetensors``) or under ``first_stage_model.`` or ``vae.``; 16 latent channels.
- CLIP-L / CLIP-G: transformers' ``CLIPTextModel(WithProjection)`` keys ``text_model.*``
  (and ``text_projection.weight``), bare (``clip_l.safetensors``) or under a prefix
  (``text_encoders.clip_l.transformer.`` inside a checkpoint).
- T5-XXL: transformers' ``T5EncoderModel`` keys ``encoder.block.*``, ``shared.weight``,
  bare (``t5xxl_fp16.safetensors``) or under ``text_encoders.t5xxl.transformer.``.

Torch-free: the library classifies with it on the reactor thread.
"""

UNET = "model.diffusion_model."
TRANSFORMER_PREFIXES = (UNET, "")
VAE_PREFIXES = ("first_stage_model.", "vae.", "")
# Where a checkpoint with its text encoders inside keeps each (ComfyUI's and SD3's layout).
INSIDE = {"clip_l": "text_encoders.clip_l.", "clip_g": "text_encoders.clip_g.", "t5xxl": "text_encoders.t5xxl."}
CLIP_L_WIDTH, CLIP_G_WIDTH = 768, 1280
CLIP, CLIP_L, CLIP_G, T5XXL = "clip", "clip_l", "clip_g", "t5xxl"

_CLIP_TOKENS = "embeddings.token_embedding.weight"
_CLIP_POSITIONS = "embeddings.position_embedding.weight"
_CLIP_LAYER = "encoder.layers.0.self_attn.q_proj.weight"
_T5_QUERY = "encoder.block.0.layer.0.SelfAttention.q.weight"


def sub(table, prefix):
    """The entries of ``table`` under ``prefix``, without it."""
    if not prefix:
        return dict(table)
    return {k[len(prefix):]: v for k, v in table.items() if k.startswith(prefix)}


def clip_prefixes(shapes):
    """``[(prefix, outer)]`` of each CLIP text model in ``shapes``: ``prefix`` leads to its
    ``embeddings.*`` (``text_model.`` included), ``outer`` to its ``text_projection.weight``."""
    found = []
    for key in shapes:
        if not key.endswith(_CLIP_TOKENS):
            continue
        prefix = key[:-len(_CLIP_TOKENS)]
        if prefix and not prefix.endswith("."):
            continue
        if prefix + _CLIP_POSITIONS in shapes and prefix + _CLIP_LAYER in shapes:
            outer = prefix[:-len("text_model.")] if prefix.endswith("text_model.") else prefix
            found.append((prefix, outer))
    return sorted(found)


def clip_widths(shapes, prefix, outer):
    """``(hidden width, projection width)`` of the CLIP text model at ``prefix``; the
    projection is the hidden width where there is none (an identity)."""
    hidden = shapes[prefix + _CLIP_POSITIONS][1]
    projection = shapes.get(outer + "text_projection.weight")
    return hidden, (projection[0] if projection is not None and len(projection) == 2 else hidden)


def clip_variant(shapes, prefix, outer):
    """"clip_l", "clip_g", or "clip" for a width no released model has: by where a
    checkpoint keeps it, else by its width (CLIP ViT-L/14 is 768 wide, OpenCLIP bigG 1280)."""
    for variant in (CLIP_L, CLIP_G):
        if outer.startswith(INSIDE[variant]):
            return variant
    hidden, _ = clip_widths(shapes, prefix, outer)
    return {CLIP_L_WIDTH: CLIP_L, CLIP_G_WIDTH: CLIP_G}.get(hidden, CLIP)


def t5_prefixes(shapes):
    """The prefix of each T5 encoder in ``shapes``."""
    found = []
    for key in shapes:
        if key.endswith(_T5_QUERY):
            prefix = key[:-len(_T5_QUERY)]
            if (not prefix or prefix.endswith(".")) and (
                    prefix + "shared.weight" in shapes or prefix + "encoder.embed_tokens.weight" in shapes):
                found.append(prefix)
    return sorted(found)


def t5_width(shapes, prefix):
    embedding = shapes.get(prefix + "shared.weight") or shapes.get(prefix + "encoder.embed_tokens.weight")
    return embedding[1]


def vae_prefix(shapes, prefixes=VAE_PREFIXES):
    """The prefix of a VAE in the original (LDM/BFL) layout, or None."""
    for prefix in prefixes:
        if (prefix + "encoder.conv_in.weight" in shapes and prefix + "decoder.conv_in.weight" in shapes
                and prefix + "encoder.down.0.block.0.conv1.weight" in shapes):
            return prefix
    return None


def latent_channels(shapes, prefix):
    shape = shapes.get(prefix + "decoder.conv_in.weight")
    return shape[1] if shape is not None and len(shape) == 4 else None


def text_encoder_variant(shapes):
    """"clip_l", "clip_g", "clip", "t5xxl", several joined by "+", or None: what text
    encoders a file without a denoiser holds."""
    variants = [clip_variant(shapes, p, o) for p, o in clip_prefixes(shapes)]
    variants += [T5XXL] * bool(t5_prefixes(shapes))
    variants = sorted(set(variants))
    return "+".join(variants) if variants else None


def transformer_prefix(shapes, family):
    """Where the denoiser's keys start in a file of ``family`` ("flux", "sd3"), or None."""
    probe = "double_blocks.0." if family == "flux" else "joint_blocks.0."
    for prefix in TRANSFORMER_PREFIXES:
        if any(k.startswith(prefix + probe) for k in shapes):
            return prefix
    return None


def parts(shapes, family):
    """``{part: prefix}`` of what a model file of ``family`` holds: "transformer", and any of
    "vae", "clip_l", "clip_g", "t5xxl" that it has inside."""
    found = {}
    transformer = transformer_prefix(shapes, family)
    if transformer is not None:
        found["transformer"] = transformer
    vae = vae_prefix(shapes, VAE_PREFIXES[:-1])
    if vae is not None:
        found["vae"] = vae
    for prefix, outer in clip_prefixes(shapes):
        for variant in (CLIP_L, CLIP_G):
            if outer.startswith(INSIDE[variant]):
                found[variant] = prefix
    for prefix in t5_prefixes(shapes):
        if prefix.startswith(INSIDE[T5XXL]):
            found[T5XXL] = prefix
    return found


def requirements(shapes, family):
    """What the transformer's shapes say its companions must be: ``{"latent": channels,
    "pooled": width of the pooled text, "joint": width of the text tokens}`` (each None
    where the weights do not say)."""
    prefix = transformer_prefix(shapes, family) or ""

    def dim(key, index, divide=1):
        shape = shapes.get(prefix + key)
        return shape[index] // divide if shape is not None and len(shape) > index else None

    if family == "flux":
        return {"latent": dim("final_layer.linear.weight", 0, 4), "pooled": dim("vector_in.in_layer.weight", 1),
                "joint": dim("txt_in.weight", 1)}
    return {"latent": dim("x_embedder.proj.weight", 1), "pooled": dim("y_embedder.mlp.0.weight", 1),
            "joint": dim("context_embedder.weight", 1)}
