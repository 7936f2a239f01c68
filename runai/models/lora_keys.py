# -*- test-case-name: runai.test.test_loras -*-
"""What a LoRA file's keys say: that it is a LoRA, and which family it was trained for.

Torch-free: the library classifies LoRA files on the reactor from their headers
(:func:`runai.models.checkpoint.tensor_shapes`), and the worker names a LoRA's family in
its refusal to merge it into another family's model (:mod:`runai.models.lora_apply`).

The formats: kohya/A1111 (``lora_unet_*``, ``lora_te_*``, ``lora_te1_*``/``lora_te2_*``
with ``.lora_down.weight``, ``.lora_up.weight``, ``.alpha``; LoCon the same on
convolutions), diffusers/peft (``unet.``/``text_encoder.``/``transformer.`` with
``lora_A``/``lora_B``, or the older ``.lora.down``/``.lora.up``), and LyCORIS's LoHa
(``hada_w1_a`` ...) and LoKr (``lokr_w1``/``lokr_w2`` or their ``_a``/``_b`` factors).
"""

from runai.models.classify import FLUX, SD3, SDXL, UNKNOWN, V1, V2

# Parts of a key that only a LoRA (or a LyCORIS network) has.
MARKERS = (".lora_down.", ".lora_up.", ".lora_A.", ".lora_B.", ".lora.down.", ".lora.up.",
           "lora_linear_layer.", ".hada_w1_a", ".hada_w2_b", ".lokr_w1", ".lokr_w2")
PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_transformer_", "lycoris_")

# The text width each family's UNet attends to (its cross-attention keys' input width).
CONTEXT_WIDTHS = {768: V1, 1024: V2, 2048: SDXL}
# What trainers write in the metadata: kohya's ``ss_base_model_version`` and the
# ``modelspec.architecture`` of the Stability model spec, matched by their beginnings.
METADATA_FAMILIES = (
    ("sdxl", SDXL), ("stable-diffusion-xl", SDXL), ("sd_v1", V1), ("stable-diffusion-v1", V1),
    ("sd_v2", V2), ("stable-diffusion-v2", V2), ("flux", FLUX), ("sd3", SD3), ("stable-diffusion-3", SD3),
)
LABELS = {V1: "SD 1.x", V2: "SD 2.x", SDXL: "SDXL", SD3: "SD3", FLUX: "FLUX.1", UNKNOWN: "an unknown family"}


def is_lora(keys):
    """Whether a state dict with these key names is a LoRA (or LyCORIS) network."""
    return any(k.startswith(PREFIXES) or any(m in k for m in MARKERS) for k in keys)


def _down_width(shapes, key):
    shape = shapes.get(key)
    return shape[1] if shape is not None and len(shape) >= 2 else None


def _from_metadata(metadata):
    for name in ("ss_base_model_version", "modelspec.architecture"):
        value = str(metadata.get(name, "")).lower()
        for start, family in METADATA_FAMILIES:
            if value.startswith(start):
                return family
    return None


def family_of(shapes, metadata=None):
    """The family (``classify.V1``, ``V2``, ``SDXL``, ``SD3``, ``FLUX``; ``UNKNOWN``) the
    LoRA with these ``{key: shape}`` was trained for, from its metadata where a trainer
    wrote it, else from its keys: two text encoders, the width of its cross-attention."""
    said = _from_metadata(metadata or {})
    if said:
        return said
    keys = list(shapes)
    if any("single_transformer_blocks" in k or "single_blocks" in k or "double_blocks" in k for k in keys):
        return FLUX
    if any("joint_blocks" in k for k in keys):
        return SD3  # (in diffusers' names, SD3's blocks are FLUX.1's double blocks: not told apart)
    if any(k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.", "te2.", "te1.")) for k in keys):
        return SDXL
    for key in sorted(keys):
        flat = key.replace(".", "_")
        downs = (".lora_down.", ".lora_A.", ".lora.down.", "lora_linear_layer.down")
        if "attn2_to_k" in flat and any(m in key for m in downs):
            family = CONTEXT_WIDTHS.get(_down_width(shapes, key))
            if family:
                return family
    for key in sorted(keys):
        if key.startswith(("lora_te_", "text_encoder.")) and (".lora_down." in key or ".lora_A." in key):
            width = _down_width(shapes, key)
            if width in (768, 1024) and "mlp_fc2" not in key.replace(".", "_"):
                return V1 if width == 768 else V2
    sgm = ("lora_unet_input_blocks_", "lora_unet_output_blocks_", "lora_unet_middle_block_")
    if any(k.startswith(sgm) for k in keys):
        return SDXL  # kohya writes SDXL's UNet with the original (SGM) names, SD 1.x with diffusers'
    return UNKNOWN


def label(family):
    return LABELS.get(family, str(family))
