"""SD3 and FLUX.1 single files in the layouts their users keep, written from the tiny
diffusers folders of runai.test.test_flow_families.flow_models() (copied, never rebuilt).

The inverse of diffusers' single-file conversions: a FLUX transformer in BFL's layout (q,
k, v fused in ``double_blocks.N.img_attn.qkv``, q/k/v/MLP fused in
``single_blocks.N.linear1``, the final modulation's halves swapped), an SD3 MMDiT in its
original layout (``joint_blocks.N.x_block/context_block``), the VAE in the original
(LDM/BFL AE) layout, CLIP and T5 in transformers' layout under a prefix; and
:func:`model_folder`, a model folder laid out as Forge and ComfyUI users have theirs.
"""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from runai.models import ldm_layout
from runai.models.paths import read_json

FLUX_BASES = {"dev": "black-forest-labs/FLUX.1-dev", "schnell": "black-forest-labs/FLUX.1-schnell",
              "fill": "black-forest-labs/FLUX.1-Fill-dev"}
SD3_BASE = "stabilityai/stable-diffusion-3.5-large"
UNET = "model.diffusion_model."

_state = {}


def folder_state(folder, component):
    """The weights of one component of a diffusers folder."""
    state = {}
    for path in sorted(Path(folder, component).glob("*.safetensors")):
        state.update(load_file(str(path)))
    return state


def _swap(weight):
    first, second = weight.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _take(state, used, key):
    used.add(key)
    return state[key]


def _rename(state, used, out, table):
    for theirs, mine in table.items():
        for kind in ("weight", "bias", "scale"):
            key = f"{theirs}.{kind}"
            if key in state:
                out[f"{mine}.{'weight' if kind == 'scale' else kind}"] = _take(state, used, key)


def _check_all_used(state, used, what):
    left = sorted(set(state) - used)
    if left:
        raise AssertionError(f"{what} weights without a place in the original layout: {left[:5]}")


def flux_to_bfl(state, prefix=""):
    """A diffusers FluxTransformer2DModel state dict in BFL's layout."""
    out, used = {}, set()
    _rename(state, used, out, {
        "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
        "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
        "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
        "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
        "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
        "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
        "context_embedder": "txt_in", "x_embedder": "img_in", "proj_out": "final_layer.linear"})
    for kind in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{kind}"] = _swap(_take(state, used, f"norm_out.linear.{kind}"))
    blocks = {int(k.split(".")[1]) for k in state if k.startswith("transformer_blocks.")}
    for i in blocks:
        d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{b}img_attn.qkv.{kind}"] = torch.cat([_take(state, used, f"{d}attn.to_{x}.{kind}") for x in "qkv"])
            out[f"{b}txt_attn.qkv.{kind}"] = torch.cat(
                [_take(state, used, f"{d}attn.add_{x}_proj.{kind}") for x in "qkv"])
        out[f"{b}img_attn.norm.query_norm.scale"] = _take(state, used, f"{d}attn.norm_q.weight")
        out[f"{b}img_attn.norm.key_norm.scale"] = _take(state, used, f"{d}attn.norm_k.weight")
        out[f"{b}txt_attn.norm.query_norm.scale"] = _take(state, used, f"{d}attn.norm_added_q.weight")
        out[f"{b}txt_attn.norm.key_norm.scale"] = _take(state, used, f"{d}attn.norm_added_k.weight")
        _rename(state, used, out, {
            f"{d}norm1.linear": f"{b}img_mod.lin", f"{d}norm1_context.linear": f"{b}txt_mod.lin",
            f"{d}ff.net.0.proj": f"{b}img_mlp.0", f"{d}ff.net.2": f"{b}img_mlp.2",
            f"{d}ff_context.net.0.proj": f"{b}txt_mlp.0", f"{d}ff_context.net.2": f"{b}txt_mlp.2",
            f"{d}attn.to_out.0": f"{b}img_attn.proj", f"{d}attn.to_add_out": f"{b}txt_attn.proj"})
    singles = {int(k.split(".")[1]) for k in state if k.startswith("single_transformer_blocks.")}
    for i in singles:
        s, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{b}linear1.{kind}"] = torch.cat([_take(state, used, f"{s}{x}.{kind}")
                                                   for x in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")])
        out[f"{b}norm.query_norm.scale"] = _take(state, used, f"{s}attn.norm_q.weight")
        out[f"{b}norm.key_norm.scale"] = _take(state, used, f"{s}attn.norm_k.weight")
        _rename(state, used, out, {f"{s}norm.linear": f"{b}modulation.lin", f"{s}proj_out": f"{b}linear2"})
    _check_all_used(state, used, "FLUX transformer")
    return {prefix + k: v for k, v in out.items()}


def sd3_to_original(state, prefix=UNET):
    """A diffusers SD3Transformer2DModel state dict in SD3's original (MMDiT) layout."""
    out, used = {}, set()
    out["pos_embed"] = _take(state, used, "pos_embed.pos_embed")
    _rename(state, used, out, {
        "pos_embed.proj": "x_embedder.proj",
        "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
        "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
        "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
        "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
        "context_embedder": "context_embedder", "proj_out": "final_layer.linear"})
    for kind in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{kind}"] = _swap(_take(state, used, f"norm_out.linear.{kind}"))
    blocks = sorted({int(k.split(".")[1]) for k in state if k.startswith("transformer_blocks.")})
    for i in blocks:
        d, x, c = f"transformer_blocks.{i}.", f"joint_blocks.{i}.x_block.", f"joint_blocks.{i}.context_block."
        last = i == blocks[-1]
        for kind in ("weight", "bias"):
            out[f"{x}attn.qkv.{kind}"] = torch.cat([_take(state, used, f"{d}attn.to_{q}.{kind}") for q in "qkv"])
            out[f"{c}attn.qkv.{kind}"] = torch.cat([_take(state, used, f"{d}attn.add_{q}_proj.{kind}") for q in "qkv"])
            if f"{d}attn2.to_q.{kind}" in state:
                out[f"{x}attn2.qkv.{kind}"] = torch.cat([_take(state, used, f"{d}attn2.to_{q}.{kind}") for q in "qkv"])
            context_mod = _take(state, used, f"{d}norm1_context.linear.{kind}")
            out[f"{c}adaLN_modulation.1.{kind}"] = _swap(context_mod) if last else context_mod
        _rename(state, used, out, {
            f"{d}attn.norm_q": f"{x}attn.ln_q", f"{d}attn.norm_k": f"{x}attn.ln_k",
            f"{d}attn.norm_added_q": f"{c}attn.ln_q", f"{d}attn.norm_added_k": f"{c}attn.ln_k",
            f"{d}attn2.norm_q": f"{x}attn2.ln_q", f"{d}attn2.norm_k": f"{x}attn2.ln_k",
            f"{d}attn.to_out.0": f"{x}attn.proj", f"{d}attn.to_add_out": f"{c}attn.proj",
            f"{d}attn2.to_out.0": f"{x}attn2.proj", f"{d}norm1.linear": f"{x}adaLN_modulation.1",
            f"{d}ff.net.0.proj": f"{x}mlp.fc1", f"{d}ff.net.2": f"{x}mlp.fc2",
            f"{d}ff_context.net.0.proj": f"{c}mlp.fc1", f"{d}ff_context.net.2": f"{c}mlp.fc2"})
    _check_all_used(state, used, "SD3 transformer")
    return {prefix + k: v for k, v in out.items()}


def vae_to_original(state, config, prefix=""):
    """A diffusers AutoencoderKL state dict in the original layout (BFL's AE, LDM's VAE)."""
    ldm = ldm_layout.vae_to_ldm(state, config)
    return {prefix + k.removeprefix("first_stage_model."): v for k, v in ldm.items()}


def clip_to_file(state, prefix=""):
    """A CLIP text model's state dict as transformers names it, ``text_model.*`` (and
    ``text_projection.weight``) under ``prefix``."""
    out = {}
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue
        if key.startswith("text_projection."):
            out[prefix + key] = value
        else:
            out[prefix + "text_model." + key.removeprefix("text_model.")] = value
    return out


def t5_to_file(state, prefix=""):
    """A T5 encoder's state dict as ComfyUI keeps it (one copy of the tied embedding)."""
    return {prefix + k: v for k, v in state.items() if k != "encoder.embed_tokens.weight"}


def to_fp8(state):
    """Every floating tensor in float8 (e4m3fn), as "fp8" FLUX.1 and T5 files are."""
    return {k: v.to(torch.float8_e4m3fn) if v.is_floating_point() else v for k, v in state.items()}


def write(path, state):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def flux_parts(folder):
    """``{part: state in the original layout}`` of a tiny FLUX folder."""
    vae_config = read_json(Path(folder), Path(folder) / "vae" / "config.json")
    return {
        "transformer": flux_to_bfl(folder_state(folder, "transformer")),
        "vae": vae_to_original(folder_state(folder, "vae"), vae_config),
        "clip_l": clip_to_file(folder_state(folder, "text_encoder")),
        "t5xxl": t5_to_file(folder_state(folder, "text_encoder_2")),
    }


def sd3_parts(folder):
    vae_config = read_json(Path(folder), Path(folder) / "vae" / "config.json")
    return {
        "transformer": sd3_to_original(folder_state(folder, "transformer"), prefix=""),
        "vae": vae_to_original(folder_state(folder, "vae"), vae_config),
        "clip_l": clip_to_file(folder_state(folder, "text_encoder")),
        "clip_g": clip_to_file(folder_state(folder, "text_encoder_2")),
        "t5xxl": t5_to_file(folder_state(folder, "text_encoder_3")),
    }


def _prefixed(state, prefix):
    return {prefix + k: v for k, v in state.items()}


def model_folder():
    """A model folder (a realpath) as Forge and ComfyUI users keep SD3 and FLUX.1, built once:

    black-forest-labs/FLUX.1-dev/, -schnell/, -Fill-dev/, stabilityai/stable-diffusion-3.5-large/
                                      copies of the tiny folders: the base models
    flux/flux1-dev.safetensors        dev's transformer alone, BFL keys (float32)
    flux/flux1-dev-fp8.safetensors    the same in float8_e4m3fn
    flux/flux1-schnell.safetensors, flux/flux1-fill-dev.safetensors
    flux/flux1-dev-checkpoint.safetensors   ComfyUI's checkpoint: model.diffusion_model.*, vae.*,
                                      text_encoders.clip_l.transformer.*, text_encoders.t5xxl.transformer.*
    vae/ae.safetensors                FLUX's VAE, BFL's AE layout
    text_encoder/clip_l.safetensors, t5xxl_fp16.safetensors, t5xxl_fp8_e4m3fn.safetensors
    sd3/sd3.5_large_incl_clips_t5xxl.safetensors   SD3 with everything inside
    sd3/sd3.5_large.safetensors       SD3's MMDiT and VAE (first_stage_model.*), and beside it
    sd3/clip_l.safetensors, sd3/clip_g.safetensors, sd3/t5xxl_fp16.safetensors
    """
    if "root" in _state:
        return _state["root"]
    from runai.test.test_flow_families import flow_models

    tiny = flow_models()
    root = Path(os.path.realpath(tempfile.mkdtemp(prefix="runai-flowfiles-")))
    atexit.register(shutil.rmtree, str(root), True)
    for kind, base in FLUX_BASES.items():
        shutil.copytree(tiny / "flux" / kind, root / base)
    shutil.copytree(tiny / "sd3" / "medium", root / SD3_BASE)

    dev = flux_parts(root / FLUX_BASES["dev"])
    write(root / "flux" / "flux1-dev.safetensors", dev["transformer"])
    write(root / "flux" / "flux1-dev-fp8.safetensors", to_fp8(dev["transformer"]))
    for kind in ("schnell", "fill"):
        other = flux_to_bfl(folder_state(root / FLUX_BASES[kind], "transformer"))
        write(root / "flux" / f"flux1-{kind}{'-dev' if kind == 'fill' else ''}.safetensors", other)
    write(root / "flux" / "flux1-dev-checkpoint.safetensors", {
        **_prefixed(dev["transformer"], UNET), **_prefixed(dev["vae"], "vae."),
        **_prefixed(dev["clip_l"], "text_encoders.clip_l.transformer."),
        **_prefixed(dev["t5xxl"], "text_encoders.t5xxl.transformer.")})
    write(root / "vae" / "ae.safetensors", dev["vae"])
    write(root / "text_encoder" / "clip_l.safetensors", dev["clip_l"])
    write(root / "text_encoder" / "t5xxl_fp16.safetensors", dev["t5xxl"])
    write(root / "text_encoder" / "t5xxl_fp8_e4m3fn.safetensors", to_fp8(dev["t5xxl"]))

    sd3 = sd3_parts(root / SD3_BASE)
    inside = {**_prefixed(sd3["transformer"], UNET), **_prefixed(sd3["vae"], "first_stage_model.")}
    write(root / "sd3" / "sd3.5_large.safetensors", inside)
    write(root / "sd3" / "sd3.5_large_incl_clips_t5xxl.safetensors", {
        **inside, **{f"text_encoders.{r}.transformer." + k: v for r in ("clip_l", "clip_g", "t5xxl")
                     for k, v in sd3[r].items()}})
    for role in ("clip_l", "clip_g"):
        write(root / "sd3" / f"{role}.safetensors", sd3[role])
    write(root / "sd3" / "t5xxl_fp16.safetensors", sd3["t5xxl"])
    _state["root"] = root
    return root


def real_headers(folder):
    """Header-only files with the real key names and shapes of FLUX.1 dev (transformer
    alone), its ae.safetensors, CLIP-L, CLIP-G, T5-XXL (fp16 and fp8 names) and SD3.5 Large
    (MMDiT and VAE, text encoders apart), a few keys each: what classification and
    companion discovery read. Returns ``{name: path}``."""
    from runai.test.library_fixtures import write_header_only

    folder = Path(folder)

    def clip(hidden, layers, inter):
        return {"text_model.embeddings.token_embedding.weight": (49408, hidden),
                "text_model.embeddings.position_embedding.weight": (77, hidden),
                "text_model.encoder.layers.0.self_attn.q_proj.weight": (hidden, hidden),
                "text_model.encoder.layers.0.mlp.fc1.weight": (inter, hidden),
                f"text_model.encoder.layers.{layers - 1}.self_attn.q_proj.weight": (hidden, hidden),
                "text_model.final_layer_norm.weight": (hidden,), "text_projection.weight": (hidden, hidden)}

    vae = {"encoder.conv_in.weight": (128, 3, 3, 3), "encoder.down.0.block.0.conv1.weight": (128, 128, 3, 3),
           "encoder.down.0.block.1.conv1.weight": (128, 128, 3, 3),
           "encoder.down.1.block.0.conv1.weight": (256, 128, 3, 3),
           "encoder.down.2.block.0.conv1.weight": (512, 256, 3, 3),
           "encoder.down.3.block.0.conv1.weight": (512, 512, 3, 3),
           "encoder.mid.attn_1.q.weight": (512, 512, 1, 1), "encoder.conv_out.weight": (32, 512, 3, 3),
           "decoder.conv_in.weight": (512, 16, 3, 3), "decoder.conv_out.weight": (3, 128, 3, 3)}
    t5 = {"shared.weight": (32128, 4096), "encoder.block.0.layer.0.SelfAttention.q.weight": (4096, 4096),
          "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": (32, 64),
          "encoder.block.0.layer.1.DenseReluDense.wi_0.weight": (10240, 4096),
          "encoder.block.23.layer.1.DenseReluDense.wo.weight": (4096, 10240),
          "encoder.final_layer_norm.weight": (4096,)}
    flux = {"img_in.weight": (3072, 64), "txt_in.weight": (3072, 4096), "time_in.in_layer.weight": (3072, 256),
            "vector_in.in_layer.weight": (3072, 768), "guidance_in.in_layer.weight": (3072, 256),
            "double_blocks.0.img_attn.qkv.weight": (9216, 3072),
            "double_blocks.0.img_attn.norm.query_norm.scale": (128,),
            "double_blocks.18.img_mlp.0.weight": (12288, 3072), "single_blocks.0.linear1.weight": (21504, 3072),
            "single_blocks.37.linear2.weight": (3072, 15360), "final_layer.linear.weight": (64, 3072)}
    sd35 = {UNET + k: v for k, v in {
        "x_embedder.proj.weight": (2432, 16, 2, 2), "pos_embed": (1, 36864, 2432),
        "context_embedder.weight": (2432, 4096), "y_embedder.mlp.0.weight": (2432, 2048),
        "joint_blocks.0.x_block.attn.qkv.weight": (7296, 2432), "joint_blocks.0.x_block.attn.ln_q.weight": (64,),
        "joint_blocks.0.context_block.adaLN_modulation.1.bias": (14592,),
        "joint_blocks.37.x_block.mlp.fc1.weight": (9728, 2432), "final_layer.linear.weight": (64, 2432)}.items()}
    sd35.update({"first_stage_model." + k: v for k, v in vae.items()})
    files = {
        "flux/flux1-dev.safetensors": (flux, "BF16"),
        "vae/ae.safetensors": (vae, "F32"),
        "text_encoder/clip_l.safetensors": (clip(768, 12, 3072), "F16"),
        "text_encoder/clip_g.safetensors": (clip(1280, 32, 5120), "F16"),
        "text_encoder/t5xxl_fp8_e4m3fn.safetensors": (t5, "F16"),
        "text_encoder/t5xxl_fp16.safetensors": (t5, "F16"),
        "sd3/sd3.5_large.safetensors": (sd35, "F16"),
    }
    return {name: write_header_only(folder / name, shapes, dtype=dtype) for name, (shapes, dtype) in files.items()}
