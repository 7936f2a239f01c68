"""Random-weight SDXL pipelines, built locally, for tests and benchmarks.

The same idea as :mod:`runai.test.tiny` for the SDXL family: the *structure* of SDXL 1.0
(two text encoders whose hidden states are concatenated, the second one's pooled and
projected output plus six size numbers as the "text_time" added embedding, linear
projections, several transformer layers per block, an Euler scheduler config like the
base model's, a VAE with ``force_upcast``) at a size of a few MB, so that the server's real
loading, scheduling and serving paths run on a CPU in seconds.

``kind="inpaint"`` makes a 9-channel inpainting UNet; ``kind="refiner"`` makes a model with
the refiner's structure (only the second, bigG-like text encoder; an aesthetic score in
place of the target size, so 5 size numbers).
"""

from pathlib import Path

from runai.test import tiny  # sets the offline environment before diffusers imports

import torch  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (  # noqa: E402
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

# SDXL 1.0 base's scheduler_config.json (an EulerDiscreteScheduler).
SDXL_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    interpolation_type="linear",
    steps_offset=1,
    timestep_spacing="leading",
    use_karras_sigmas=False,
)
SDXL_VAE_SCALING = 0.13025
KINDS = ("base", "inpaint", "refiner")


def _text_config(tokenizer, hidden, layers, heads, act, projection):
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=tiny.MAX_TOKENS,
        hidden_act=act,
        projection_dim=projection,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_tiny_sdxl_pipeline(
    path,
    seed=0,
    *,
    kind="base",
    block_out_channels=(32, 64),
    text_hidden=(16, 32),
    time_embed_dim=8,
    vae_block_out_channels=(16, 16, 16, 16),
    sample_size=16,
    force_upcast=True,
    dtype=torch.float32,
):
    """Write a random-weight SDXL pipeline folder at ``path``; return the path.

    ``text_hidden`` are the widths of the two text encoders (768 and 1280 in SDXL 1.0); the
    UNet attends to both, concatenated (2048 in SDXL 1.0). The pooled width of the second
    encoder is its own width. The weights depend only on ``seed`` and the sizes; the images
    are noise. ``force_upcast`` goes into the VAE's config as in SDXL's original VAE (the
    fp16-fixed VAE has it False).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    refiner = kind == "refiner"
    # A real refiner has only the second tokenizer.
    for name in ("tokenizer_2",) if refiner else ("tokenizer", "tokenizer_2"):
        tiny.write_tokenizer(path / name)
    tokenizer_2 = CLIPTokenizer.from_pretrained(str(path / "tokenizer_2"), local_files_only=True)
    tokenizer = tokenizer_2 if refiner else CLIPTokenizer.from_pretrained(str(path / "tokenizer"),
                                                                         local_files_only=True)
    hidden_1, hidden_2 = text_hidden
    context = hidden_2 if refiner else hidden_1 + hidden_2
    # Six size numbers (original size, crop corner, target size), or five for the refiner
    # (original size, crop corner, aesthetic score), each embedded, plus the pooled text.
    time_ids = 5 if refiner else 6
    levels = len(block_out_channels)

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=9 if kind == "inpaint" else 4,
        out_channels=4,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
        block_out_channels=tuple(block_out_channels),
        layers_per_block=2,
        attention_head_dim=tuple(max(1, c // 16) for c in block_out_channels),
        transformer_layers_per_block=tuple(range(1, levels + 1)),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=time_ids * time_embed_dim + hidden_2,
        cross_attention_dim=context,
        norm_num_groups=min(32, min(block_out_channels)),
    )
    torch.manual_seed(seed + 1)
    vae = tiny.tiny_vae(vae_block_out_channels, sample_size, SDXL_VAE_SCALING, force_upcast=force_upcast)
    torch.manual_seed(seed + 2)
    text_encoder = None if refiner else CLIPTextModel(
        _text_config(tokenizer, hidden_1, 2, 4, "quick_gelu", hidden_1))
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer_2, hidden_2, 2, 4, "gelu", hidden_2))
    if dtype != torch.float32:
        unet, vae, text_encoder_2 = unet.to(dtype), vae.to(dtype), text_encoder_2.to(dtype)
        text_encoder = text_encoder.to(dtype) if text_encoder is not None else None
    scheduler = EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG)
    components = dict(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                      tokenizer=None if refiner else tokenizer, tokenizer_2=tokenizer_2, unet=unet,
                      scheduler=scheduler)
    if kind == "inpaint":
        pipe = StableDiffusionXLInpaintPipeline(**components, requires_aesthetics_score=False)
    elif refiner:
        pipe = StableDiffusionXLImg2ImgPipeline(**components, requires_aesthetics_score=True,
                                                force_zeros_for_empty_prompt=False)
    else:
        pipe = StableDiffusionXLPipeline(**components)
    pipe.save_pretrained(str(path), safe_serialization=True)
    return path


SDXL_VOCAB_SIZE = 49408


def build_sdxl_pipeline(path, dtype=torch.float16, seed=0, device=None):
    """Write a random-weight pipeline with SDXL 1.0 base's real architecture (UNet 2.6 B
    parameters, CLIP ViT-L and OpenCLIP bigG text encoders, the original VAE with
    ``force_upcast``), for GPU benchmarks: the same work per step as SDXL 1.0 without
    downloading it. ``device`` (e.g. "cuda") builds there. The images are noise, and in
    float16 the random UNet may give NaN latents; only timings and the VAE's precision
    policy mean anything.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer", "tokenizer_2"):
        tiny.write_tokenizer(path / name)
    tokenizer = CLIPTokenizer.from_pretrained(str(path / "tokenizer"), local_files_only=True)
    tokenizer_2 = CLIPTokenizer.from_pretrained(str(path / "tokenizer_2"), local_files_only=True)
    if len(tokenizer) > SDXL_VOCAB_SIZE:
        raise AssertionError("the synthetic tokenizer must fit CLIP's vocabulary")

    def text_config(tok, hidden, layers, heads, act):
        config = _text_config(tok, hidden, layers, heads, act, hidden)
        config.vocab_size = SDXL_VOCAB_SIZE
        config.intermediate_size = hidden * 4
        return config

    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        unet = UNet2DConditionModel(
            sample_size=128, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(320, 640, 1280), layers_per_block=2, attention_head_dim=(5, 10, 20),
            transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816, cross_attention_dim=2048, norm_num_groups=32,
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
            layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=1024,
            scaling_factor=SDXL_VAE_SCALING, force_upcast=True,
        )
        text_encoder = CLIPTextModel(text_config(tokenizer, 768, 12, 12, "quick_gelu"))
        text_encoder_2 = CLIPTextModelWithProjection(text_config(tokenizer_2, 1280, 32, 20, "gelu"))
    if dtype != torch.float32:
        unet, text_encoder, text_encoder_2 = unet.to(dtype), text_encoder.to(dtype), text_encoder_2.to(dtype)
        vae = vae.to(dtype)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet,
                                     scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG))
    pipe.save_pretrained(str(path), safe_serialization=True)
    return path
