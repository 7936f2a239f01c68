"""Random-weight Stable Diffusion pipelines, built locally, for tests and benchmarks.

Nothing here touches the network: the tests must run where no model hub is reachable, and
the weights of a real checkpoint would make them slow and large. The pipelines have the
*shape* of Stable Diffusion (VAE scale factor 8, CLIP-style tokenizer of 77 tokens, a
PNDM/PLMS scheduler config like SD 1.5's) so the code paths the server takes are the real
ones; only the numbers are noise.
"""

import json
import os
from pathlib import Path

# Set before diffusers/transformers import huggingface_hub, which reads them once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    PNDMScheduler,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
MAX_TOKENS = 77
SD15_VOCAB_SIZE = 49408

# SD 1.5's scheduler_config.json, so scheduler switching is tested against the config the
# server will really meet (leading timestep spacing, steps_offset 1, PLMS without PRK).
SD15_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    trained_betas=None,
    skip_prk_steps=True,
    set_alpha_to_one=False,
    steps_offset=1,
)

# A benchmark-sized random model: about 2 s for a 20-step 256x256 image on 2 CPU cores,
# big enough that per-step overheads in the server show up next to the model's own time.
SMALL_SIZES = dict(
    block_out_channels=(64, 128, 256),
    layers_per_block=1,
    cross_attention_dim=128,
    attention_head_dim=8,
    vae_block_out_channels=(32, 32, 64, 64),
    text_layers=2,
)


def _bytes_to_unicode():
    """GPT-2/CLIP's reversible map from bytes to printable characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


def write_tokenizer(folder):
    """Write a byte-level CLIP tokenizer (vocab.json, merges.txt) to ``folder``.

    Every byte appears both as a word piece and as a word end (``</w>``), as in CLIP's
    vocabulary, so any text tokenizes without unknown tokens and without merges; the
    special tokens come last, as in CLIP. Returns the vocabulary size.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    config = dict(
        tokenizer_class="CLIPTokenizer",
        model_max_length=MAX_TOKENS,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=EOS,
        pad_token=EOS,
        do_lower_case=True,
    )
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return len(vocab)


def _tokenizer(folder):
    write_tokenizer(folder)
    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


def _save(path, unet, vae, text_encoder, tokenizer, dtype, prediction_type="epsilon"):
    if dtype != torch.float32:
        unet, vae, text_encoder = unet.to(dtype), vae.to(dtype), text_encoder.to(dtype)
    scheduler = PNDMScheduler(**SD15_SCHEDULER_CONFIG, prediction_type=prediction_type)
    # model_index.json names the inpainting pipeline for a 9-channel UNet, as real
    # inpainting models' folders do.
    cls = StableDiffusionInpaintPipeline if unet.config.in_channels == 9 else StableDiffusionPipeline
    pipe = cls(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(path), safe_serialization=True)
    return Path(path)


def tiny_vae(block_out_channels, sample_size, scaling_factor=0.18215, **config):
    """A random-weight AutoencoderKL with one level per entry of ``block_out_channels``
    (a VAE scale factor of 2 ** (levels - 1)) for latents of ``sample_size``; ``config``
    adds to its config (``force_upcast``)."""
    levels = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=min(32, min(block_out_channels)),
        sample_size=sample_size * 2 ** (levels - 1),
        scaling_factor=scaling_factor,
        **config,
    )


def build_tiny_pipeline(
    path,
    seed=0,
    *,
    block_out_channels=(32, 64),
    layers_per_block=1,
    cross_attention_dim=32,
    attention_head_dim=8,
    vae_block_out_channels=(16, 16, 16, 16),
    text_layers=2,
    text_heads=4,
    sample_size=8,
    dtype=torch.float32,
    version="v1",
    in_channels=4,
    prediction_type="epsilon",
):
    """Write a random-weight StableDiffusionPipeline folder at ``path``; return the path.

    The defaults make a model of a few MB that draws a 64x64 image in 2 steps in well
    under a second on a CPU; ``SMALL_SIZES`` makes one for benchmarks. The weights depend
    only on ``seed`` and the sizes. The text encoder's width is ``cross_attention_dim``,
    since the UNet attends to its hidden states.

    ``version="v2"`` gives the model SD 2.x's structure at the same small size: Linear
    projections into the UNet's transformers and a GELU (OpenCLIP-like) text encoder, so
    that it converts to and from the OpenCLIP checkpoint layout; ``in_channels=9`` makes
    an inpainting model; ``prediction_type`` goes into the scheduler config.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer(path / "tokenizer")
    vocab_size = len(tokenizer)
    # The first UNet level has no cross-attention, like SD's last (lowest) level, so both
    # block types are exercised; the rest attend to the prompt.
    levels = len(block_out_channels)
    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1)
    up = ("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",)
    groups = min(32, min(block_out_channels))

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=4,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=attention_head_dim,
        norm_num_groups=groups,
        use_linear_projection=version == "v2",
    )
    torch.manual_seed(seed + 1)
    vae = tiny_vae(vae_block_out_channels, sample_size)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=cross_attention_dim,
            intermediate_size=cross_attention_dim * 4,
            num_hidden_layers=text_layers,
            num_attention_heads=text_heads,
            max_position_embeddings=MAX_TOKENS,
            hidden_act="gelu" if version == "v2" else "quick_gelu",
            projection_dim=cross_attention_dim,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    return _save(path, unet, vae, text_encoder, tokenizer, dtype, prediction_type)


def build_sd15_pipeline(path, dtype=torch.float16, seed=0, device=None):
    """Write a random-weight pipeline with Stable Diffusion 1.5's real architecture.

    For GPU benchmarks: the same ~1.07 B parameters and the same work per step as SD 1.5,
    without downloading it. The tokenizer is the synthetic byte-level one (its ids are far
    below CLIP's 49408, the text encoder's vocabulary size). ``device`` (e.g. "cuda")
    builds there, which is much faster than initialising a billion weights on a CPU.
    The images are noise, and in float16 may even be NaN; only timings mean anything.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer(path / "tokenizer")
    if len(tokenizer) > SD15_VOCAB_SIZE:
        raise AssertionError("the synthetic tokenizer must fit CLIP's vocabulary")
    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        unet = UNet2DConditionModel(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            cross_attention_dim=768,
            attention_head_dim=8,
            norm_num_groups=32,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            norm_num_groups=32,
            sample_size=512,
            scaling_factor=0.18215,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=SD15_VOCAB_SIZE,
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
                max_position_embeddings=MAX_TOKENS,
                hidden_act="quick_gelu",
                projection_dim=768,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    return _save(path, unet, vae, text_encoder, tokenizer, dtype)
