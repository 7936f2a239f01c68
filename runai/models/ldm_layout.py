# -*- test-case-name: runai.test.test_ldm_layout -*-
"""The original LDM key layout of a Stable Diffusion 1.x/2.x model, from diffusers' own.

A single-file checkpoint names its weights as the original code did
(``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.*``), which
AUTOMATIC1111 and diffusers' ``from_single_file`` both load. diffusers ships this
direction only as a script outside its wheel, hard-wired to SD's sizes; the UNet mapping
here is derived from the UNet's config, so it works for any size, and is checked against
diffusers' own loader by the tests. Each function maps one component's state dict and
raises ConvertError for a weight that has no place in the original layout. SDXL's UNet
is the same layout plus its size-conditioning embedding (``sdxl=True``); the rest of the
SDXL layout is :mod:`runai.models.xl_layout`.
"""

from runai.models.classify import UNET
from runai.models.errors import ConvertError

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
            raise ConvertError(f"a UNet with a different {what} per level is not a Stable Diffusion UNet")
        return value[0]
    return value


def unet_prefixes(config, sdxl=False):
    """``{diffusers prefix: (LDM prefix, is_resnet)}`` for a UNet2DConditionModel config.

    ``sdxl``: the UNet may have SDXL's added "text_time" embedding (``label_emb`` in the
    original layout); without it, a UNet with any added embedding is refused.
    """
    levels = len(config["block_out_channels"])
    per_level = _int_per_level(config.get("layers_per_block", 2), levels, "layers_per_block")
    added = config.get("addition_embed_type")
    if config.get("class_embed_type") or (added and not (sdxl and added == "text_time")):
        raise ConvertError("UNets with added embeddings other than SDXL's are not converted")
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
    if added:
        table["add_embedding.linear_1."] = ("label_emb.0.0.", False)
        table["add_embedding.linear_2."] = ("label_emb.0.2.", False)
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


def unet_to_ldm(state, config, sdxl=False):
    def rename(is_resnet, rest, tensor):
        return (_rename_first(rest, _RESNET) if is_resnet else rest), tensor

    return _map(state, unet_prefixes(config, sdxl), UNET, "UNet", rename)


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


def open_clip_to_ldm(state, prefix="cond_stage_model.model."):
    """SD 2.x (and SDXL's second encoder): OpenCLIP names, with q/k/v fused into ``in_proj``."""
    import torch

    state = _text_keys(state)
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
