# -*- test-case-name: runai.test.test_singlefile -*-
"""The diffusers component configs of Stable Diffusion 1.5, 2.1 and XL 1.0, shipped with runai.

A single-file checkpoint holds weights but no architecture. diffusers fetches the
architecture from the Hub; runai never does. It takes it from a diffusers copy of the
base model in the model folder when there is one, and from these otherwise. They are
the public configs of runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-2-1
(-base), as data, with nothing that could be fetched. The tokenizer's vocabulary is not
here (1.5 MB of data files): it comes from the model folder.

SDXL 1.0 base's are files, as its diffusers folder has them, in
``runai/models/configs/stable-diffusion-xl-base-1.0/`` (package data): :func:`sdxl_base`.
An SDXL inpainting model is the same with a 9-channel UNet, which the loader sets from
the weights.
"""

import json
from importlib import resources

SDXL_BASE_NAME = "stabilityai/stable-diffusion-xl-base-1.0"
SDXL_FILES = {
    "unet": "unet/config.json",
    "vae": "vae/config.json",
    "text_encoder": "text_encoder/config.json",
    "text_encoder_2": "text_encoder_2/config.json",
    "scheduler": "scheduler/scheduler_config.json",
}

_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "trained_betas": None,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
}

_VAE = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

_UNET = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
}

SD15 = {
    "unet": dict(_UNET, attention_head_dim=8, cross_attention_dim=768, sample_size=64),
    "vae": _VAE,
    "text_encoder": {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "hidden_act": "quick_gelu",
        "hidden_size": 768,
        "intermediate_size": 3072,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": 77,
        "num_attention_heads": 12,
        "num_hidden_layers": 12,
        "projection_dim": 768,
        "vocab_size": 49408,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
    },
    "scheduler": dict(_SCHEDULER, _class_name="PNDMScheduler", prediction_type="epsilon"),
}

_SD21_UNET = dict(
    _UNET,
    attention_head_dim=[5, 10, 20, 20],
    cross_attention_dim=1024,
    use_linear_projection=True,
    dual_cross_attention=False,
)

_SD21_TEXT = {
    "architectures": ["CLIPTextModel"],
    "model_type": "clip_text_model",
    "attention_dropout": 0.0,
    "dropout": 0.0,
    # OpenCLIP ViT-H/14; SD 2 uses its penultimate layer, so 23 of its 24 layers.
    "hidden_act": "gelu",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 16,
    "num_hidden_layers": 23,
    "projection_dim": 512,
    "vocab_size": 49408,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}

SD21_BASE = {
    "unet": dict(_SD21_UNET, sample_size=64, upcast_attention=False),
    "vae": _VAE,
    "text_encoder": _SD21_TEXT,
    "scheduler": dict(_SCHEDULER, _class_name="DDIMScheduler", prediction_type="epsilon"),
}

SD21 = {
    "unet": dict(_SD21_UNET, sample_size=96, upcast_attention=True),
    "vae": dict(_VAE, sample_size=768),
    "text_encoder": _SD21_TEXT,
    "scheduler": dict(_SCHEDULER, _class_name="DDIMScheduler", prediction_type="v_prediction"),
}

# (version, v-prediction) -> the shipped configs and the model they come from.
SHIPPED = {
    ("v1", False): ("runwayml/stable-diffusion-v1-5", SD15),
    ("v1", True): ("runwayml/stable-diffusion-v1-5", SD15),
    ("v2", False): ("stabilityai/stable-diffusion-2-1-base", SD21_BASE),
    ("v2", True): ("stabilityai/stable-diffusion-2-1", SD21),
}


def sdxl_base():
    """``{component: config}`` of SDXL 1.0 base, read from the files runai ships."""
    folder = resources.files("runai.models").joinpath("configs", "stable-diffusion-xl-base-1.0")
    return {name: json.loads(folder.joinpath(*rel.split("/")).read_text(encoding="utf-8"))
            for name, rel in SDXL_FILES.items()}
