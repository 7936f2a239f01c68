"""Random-weight SD3 and FLUX.1 pipelines, built locally, for tests and benchmarks.

The same idea as :mod:`runai.test.tiny` and :mod:`runai.test.tiny_xl` for the two
flow-matching families: the *structure* of Stable Diffusion 3.5 (an MMDiT transformer,
two CLIP text encoders with projections plus a T5 encoder, a 16-channel VAE with a shift
factor, a FlowMatchEulerDiscreteScheduler with shift 3) and of FLUX.1 dev / schnell / Fill
(a FLUX transformer over 2x2-packed latents, one CLIP and one T5 encoder, FLUX's VAE and
scheduler configs) at a size of a few MB, so that the server's real loading and sampling
paths run on a CPU in well under a second per image. The T5 tokenizer is a small Unigram
vocabulary written here (:func:`write_t5_tokenizer`); the CLIP ones are tiny's byte-level
tokenizer. The images are noise.

What diffusers 0.42.1 (with transformers 5.25) does with these folders, as
runai.test.test_tiny_flow checks it (or, where a point says so, as its source reads):

* ``model_index.json`` ``_class_name``: "StableDiffusion3Pipeline", "FluxPipeline" (dev
  and schnell alike: only the transformer's ``guidance_embeds`` and the scheduler config
  differ), "FluxFillPipeline". The T5 tokenizer is listed as ["transformers",
  "T5Tokenizer"]: in transformers 5 ``T5TokenizerFast`` *is* ``T5Tokenizer`` (an alias,
  backed by ``tokenizers``), so real folders' "T5TokenizerFast" loads as the same class.
  SD3 and FluxPipeline folders also list image_encoder and feature_extractor as
  [null, null]; FluxFillPipeline has no such entries. ``DiffusionPipeline.from_pretrained``
  picks the class from ``_class_name``. Loading: ``Cls.from_pretrained(path,
  local_files_only=True[, dtype=...])`` (``torch_dtype=`` still works but is deprecated).
* Default size: FLUX pipelines (all four) draw 1024x1024 when height/width are not
  given, whatever the model (``default_sample_size`` is hard-coded 128) and whatever the
  input image's size; SD3's draw transformer.sample_size * 8 (64 here, 1024 real), also
  for img2img/inpaint. The input image is resized to height x width. So: always pass
  ``height`` and ``width``.
* Sides must be multiples of vae_scale_factor * patch_size for SD3 (8 * 2 = 16, here as
  in the real models: ValueError otherwise) and of vae_scale_factor * 2 = 16 for FLUX
  (latents packed 2x2), which only logs a warning and rounds down (72 -> 64).
* ``max_sequence_length`` (T5 tokens) defaults to 256 (SD3) and 512 (FLUX, Fill); every
  pipeline raises ValueError above 512. The T5 input is padded to it, not to the prompt:
  it is the T5 part of the transformer's sequence, so a short one is faster. The CLIP
  tokenizers always take 77 tokens (tokenizer.model_max_length), truncating with a
  warning (source).
* Guidance. SD3: ``guidance_scale`` (default 7.0) is classifier-free guidance when > 1
  (negative prompt "" by default; the batch doubles); <= 1 runs the prompt alone. FLUX
  dev and Fill: ``guidance_scale`` (defaults 3.5 FluxPipeline, 7.0 FluxImg2ImgPipeline
  and FluxInpaintPipeline, 30.0 FluxFillPipeline) is *not* CFG: it goes into the
  transformer's guidance embedding (``guidance_embeds=True``), one forward pass per step.
  Schnell (``guidance_embeds=False``) ignores it. Real CFG in FLUX needs
  ``true_cfg_scale`` > 1 *and* a ``negative_prompt`` (two passes per step).
* Schedulers: FlowMatchEulerDiscreteScheduler. FLUX pipelines always pass custom
  ``sigmas`` = linspace(1, 1/steps, steps) and ``mu`` computed from the image's token
  count with the config's base/max_image_seq_len and base/max_shift. dev's config has
  ``use_dynamic_shifting=True`` (``mu`` shifts; ``shift`` unused); schnell's False with
  ``shift=1.0`` (no shift; ``mu`` ignored). SD3: {num_train_timesteps 1000, shift 3.0},
  no dynamic shifting.
* img2img / inpaint: StableDiffusion3Img2ImgPipeline, StableDiffusion3InpaintPipeline,
  FluxImg2ImgPipeline, FluxInpaintPipeline, each ``Cls(**pipe.components)`` of the
  loaded txt2img pipeline, called with ``image=`` (and ``mask_image=``, white =
  repaint), ``strength``, ``height``, ``width``. They run steps - int(steps * (1 -
  strength)) steps (2 steps at 0.1 -> 1; 10 at 0.3 -> 3); ``strength`` defaults to 0.6 in
  all four. At strength 0 (no step) FLUX img2img/inpaint and SD3 inpaint raise
  ValueError and SD3 img2img a RuntimeError from a reshape. FluxInpaintPipeline and
  StableDiffusion3InpaintPipeline use the *base* transformer and blend the known latents
  back in at each step; only Fill's transformer takes the mask.
* FluxFillPipeline: ``pipe(prompt, image=, mask_image=, height=, width=, ...)``; both
  images are required (ValueError without them), ``strength`` defaults to 1.0. Its
  transformer's ``in_channels`` = 4 * latent_channels (noisy latents, packed 2x2) + 4 *
  latent_channels (the masked image's latents, packed) + 4 * vae_scale_factor ** 2 (the
  mask, pixel-unshuffled to the latent grid, packed) = 64 + 64 + 256 = 384 for 16
  latent channels and a VAE factor of 8, and ``out_channels`` = 64 (it would default to
  in_channels). FluxFillPipeline takes the latent channels from the VAE's config;
  FluxPipeline from transformer.in_channels // 4, so it cannot drive a Fill transformer.
* The VAEs have 16 latent channels, no quant_conv/post_quant_conv and a
  ``shift_factor``; the pipelines decode ``latents / scaling_factor + shift_factor``
  (source).
* SD3 text: the two CLIP encoders' penultimate hidden states (widths w1 + w2) are
  concatenated, zero-padded to the T5 width (= the transformer's joint_attention_dim;
  a negative pad would silently crop: source) and followed by T5's states along the sequence (77
  + max_sequence_length tokens); their pooled projections concatenated (p1 + p2) are
  the transformer's pooled_projection_dim. FLUX: the CLIPTextModel's pooler output
  (width = pooled_projection_dim) and T5's states alone as text tokens (width =
  joint_attention_dim).
"""

from pathlib import Path

from runai.models import offline  # before diffusers and transformers

from runai.test import tiny
from runai.test.tiny_xl import _text_config

import torch  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxFillPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from tokenizers import Tokenizer, decoders, pre_tokenizers, processors  # noqa: E402
from tokenizers.models import Unigram  # noqa: E402
from transformers import (  # noqa: E402
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

del offline  # imported for what importing it does

# The schedulers' configs of the real models (scheduler/scheduler_config.json).
SD3_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=3.0)
FLUX_DEV_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)
FLUX_SCHNELL_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)

# The VAEs' latent normalisation (vae/config.json).
SD3_VAE_SCALING, SD3_VAE_SHIFT = 1.5305, 0.0609
FLUX_VAE_SCALING, FLUX_VAE_SHIFT = 0.3611, 0.1159
LATENT_CHANNELS = 16

FLUX_KINDS = ("dev", "schnell", "fill")
SD3_VARIANTS = ("large", "medium")

# T5's special tokens and their ids, as in every T5 vocabulary.
T5_PAD, T5_EOS, T5_UNK = "<pad>", "</s>", "<unk>"
# The real tokenizer_3 (SD3) / tokenizer_2 (FLUX) configs say 512; the pipelines pass
# their own max_sequence_length anyway.
T5_MAX_LENGTH = 512
T5_VOCAB_SIZE = 32128  # T5 v1.1 XXL's embedding rows (32100 pieces, rounded up)
CLIP_VOCAB_SIZE = 49408

_WORDS = """
a an the of and or in on at to with by for from as is are was be it this that these
those its his her their our your my no not very more most all any some one two three
four five six seven eight nine ten red green blue yellow orange purple pink black white
gray grey brown gold silver dark light bright big small large tiny tall old new young
beautiful cute happy sad photo photograph picture painting drawing sketch portrait
landscape art style digital oil watercolor render detailed high quality realistic
cinematic lighting sunset sunrise night day sky sun moon star stars cloud clouds rain
snow fog sea ocean lake river water beach mountain mountains forest tree trees flower
flowers garden field city street house castle tower bridge road car boat ship train
cat dog bird horse fish lion tiger bear fox wolf dragon robot man woman girl boy child
people person face eyes hair hat dress astronaut knight wizard lighthouse dusk dawn
standing sitting walking running flying riding holding wearing under over above behind
near inside outside background foreground close up view wide angle shot
""".split()


def _t5_vocab():
    """[(piece, log-probability)]: T5's three special pieces first (ids 0, 1, 2), then
    "▁", whole words (preferred), "▁" + each printable ASCII character, and each
    character alone, so that any ASCII text tokenizes without <unk>."""
    chars = [chr(c) for c in range(33, 127)]
    vocab = [(T5_PAD, 0.0), (T5_EOS, 0.0), (T5_UNK, 0.0), ("▁", -3.0)]
    seen = {piece for piece, _ in vocab}
    pieces = [("▁" + w, -5.0 - 0.01 * i) for i, w in enumerate(_WORDS)]
    pieces += [("▁" + c, -8.0) for c in chars] + [(c, -10.0) for c in chars]
    for piece, score in pieces:
        if piece not in seen:
            seen.add(piece)
            vocab.append((piece, score))
    return vocab


def write_t5_tokenizer(folder, model_max_length=T5_MAX_LENGTH):
    """Write a T5-style tokenizer (tokenizer.json, tokenizer_config.json) to ``folder``:
    a Unigram model of a few hundred pieces (<pad> 0, </s> 1, <unk> 2 as in T5), a
    Metaspace pre-tokenizer and a post-processor appending </s>, as T5TokenizerFast
    (``T5Tokenizer`` in transformers 5) saves it. Returns the vocabulary size."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = _t5_vocab()
    backend = Tokenizer(Unigram(vocab, unk_id=2, byte_fallback=False))
    # T5Tokenizer rebuilds these same two when it loads (only the vocabulary and the
    # post-processor come from tokenizer.json), so what is saved is what is loaded.
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
    ])
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    backend.post_processor = processors.TemplateProcessing(
        single=["$A", T5_EOS], pair=["$A", T5_EOS, "$B", T5_EOS], special_tokens=[(T5_EOS, 1)])
    tokenizer = T5TokenizerFast(tokenizer_object=backend, vocab=vocab, extra_ids=0,
                                eos_token=T5_EOS, unk_token=T5_UNK, pad_token=T5_PAD,
                                model_max_length=model_max_length)
    tokenizer.save_pretrained(str(folder))
    return len(tokenizer)


def t5_tokenizer(folder, **kwargs):
    """Write the T5 tokenizer to ``folder`` and load it as the pipelines do."""
    write_t5_tokenizer(folder, **kwargs)
    return T5TokenizerFast.from_pretrained(str(folder), local_files_only=True)


def _clip_tokenizer(folder):
    tiny.write_tokenizer(folder)
    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


def _t5_config(vocab_size, d_model, layers, heads, d_kv, d_ff):
    """A T5 v1.1 encoder's config (gated GELU, untied embeddings) at the given sizes."""
    return T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=d_kv,
        d_ff=d_ff,
        num_layers=layers,
        num_decoder_layers=layers,
        num_heads=heads,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        dropout_rate=0.1,
        layer_norm_epsilon=1e-6,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )


def flow_vae(block_out_channels, sample_size, scaling_factor, shift_factor, layers_per_block=1,
             latent_channels=LATENT_CHANNELS):
    """An AutoencoderKL shaped like SD3's and FLUX's: 16 latent channels, no quant convs,
    a shift factor, force_upcast. (tiny.tiny_vae fixes 4 latent channels and has the
    quant convs, so it does not fit.) ``sample_size`` is in pixels."""
    levels = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        latent_channels=latent_channels,
        norm_num_groups=min(32, min(block_out_channels)),
        sample_size=sample_size,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
        force_upcast=True,
    )


def _cast(modules, dtype):
    if dtype == torch.float32:
        return modules
    return {k: (m.to(dtype) if m is not None else None) for k, m in modules.items()}


def parameter_count(module):
    """The number of parameters of ``module`` (buffers not counted); works on "meta"."""
    return sum(p.numel() for p in module.parameters())


# -- tiny ---------------------------------------------------------------------------------------


def build_tiny_sd3_pipeline(
    path,
    seed=0,
    *,
    text_hidden=(16, 32),
    t5_width=64,
    heads=4,
    head_dim=8,
    layers=2,
    patch_size=2,
    sample_size=8,
    pos_embed_max_size=32,
    vae_block_out_channels=(16, 16, 16, 16),
    dtype=torch.float32,
):
    """Write a random-weight StableDiffusion3Pipeline folder at ``path``; return the path.

    SD 3.5's structure at a few MB: an MMDiT of ``layers`` joint blocks with QK RMS-norm
    (``heads`` x ``head_dim`` wide, patch size 2 as in the real models, so the image's
    sides must be multiples of 16), two CLIP encoders with projections of widths
    ``text_hidden`` (768 and 1280 in SD3; the pooled projections concatenated are the
    transformer's ``pooled_projection_dim``), a T5 encoder of width ``t5_width`` (the
    transformer's ``joint_attention_dim``; it must be at least sum(text_hidden)), a
    16-channel VAE (factor 8) with SD3's scaling and shift factors, and SD3's scheduler
    config. ``sample_size`` (latent pixels) makes the default image 64x64;
    ``pos_embed_max_size`` (in patches) allows images up to 512x512. The weights depend
    only on ``seed`` and the sizes.
    """
    if t5_width < sum(text_hidden):
        raise ValueError("the T5 width must hold both CLIP encoders' hidden states")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _clip_tokenizer(path / "tokenizer")
    tokenizer_2 = _clip_tokenizer(path / "tokenizer_2")
    tokenizer_3 = t5_tokenizer(path / "tokenizer_3")
    hidden_1, hidden_2 = text_hidden

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=sample_size,
        patch_size=patch_size,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_layers=layers,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=t5_width,
        caption_projection_dim=heads * head_dim,
        pooled_projection_dim=hidden_1 + hidden_2,
        pos_embed_max_size=pos_embed_max_size,
        qk_norm="rms_norm",
    )
    torch.manual_seed(seed + 1)
    vae = flow_vae(vae_block_out_channels, sample_size * 8, SD3_VAE_SCALING, SD3_VAE_SHIFT)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModelWithProjection(_text_config(tokenizer, hidden_1, 2, 4, "quick_gelu", hidden_1))
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer_2, hidden_2, 2, 4, "gelu", hidden_2))
    torch.manual_seed(seed + 4)
    text_encoder_3 = T5EncoderModel(_t5_config(len(tokenizer_3), t5_width, 2, 4, t5_width // 4, t5_width * 2))
    modules = _cast(dict(transformer=transformer, vae=vae, text_encoder=text_encoder,
                         text_encoder_2=text_encoder_2, text_encoder_3=text_encoder_3), dtype)
    pipe = StableDiffusion3Pipeline(
        **modules, tokenizer=tokenizer, tokenizer_2=tokenizer_2, tokenizer_3=tokenizer_3,
        scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER_CONFIG),
    )
    pipe.save_pretrained(str(path), safe_serialization=True)
    return path


def build_tiny_flux_pipeline(
    path,
    seed=0,
    *,
    kind="dev",
    width=32,
    heads=2,
    layers=1,
    single_layers=1,
    axes_dims_rope=(4, 4, 8),
    vae_block_out_channels=(16, 16, 16, 16),
    dtype=torch.float32,
):
    """Write a random-weight FLUX.1 pipeline folder at ``path``; return the path.

    ``kind``: "dev" (a FluxPipeline with the guidance embedding and dynamic shifting),
    "schnell" (no guidance embedding, shift 1.0) or "fill" (a FluxFillPipeline whose
    transformer also takes the masked image's latents and the mask: 384 input channels,
    64 output, as FLUX.1 Fill dev; with the guidance embedding and dev's scheduler).

    The transformer has ``layers`` double-stream and ``single_layers`` single-stream
    blocks, ``heads`` heads of width/heads (= sum(axes_dims_rope)); the CLIP encoder's
    width is the transformer's ``pooled_projection_dim`` and the T5 encoder's its
    ``joint_attention_dim``, both ``width`` (768 and 4096 in FLUX.1). The VAE has 16
    latent channels, factor 8 (images in multiples of 16) and FLUX's scaling and shift
    factors. The weights depend only on ``seed``, ``kind`` and the sizes.
    """
    if kind not in FLUX_KINDS:
        raise ValueError(f"kind must be one of {FLUX_KINDS}")
    if sum(axes_dims_rope) * heads != width:
        raise ValueError("the RoPE axes must add up to the head width")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _clip_tokenizer(path / "tokenizer")
    tokenizer_2 = t5_tokenizer(path / "tokenizer_2")
    vae_factor = 2 ** (len(vae_block_out_channels) - 1)
    packed = 4 * LATENT_CHANNELS
    in_channels = packed + packed + 4 * vae_factor ** 2 if kind == "fill" else packed

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=in_channels,
        out_channels=packed,
        num_layers=layers,
        num_single_layers=single_layers,
        attention_head_dim=width // heads,
        num_attention_heads=heads,
        joint_attention_dim=width,
        pooled_projection_dim=width,
        guidance_embeds=kind != "schnell",
        axes_dims_rope=tuple(axes_dims_rope),
    )
    torch.manual_seed(seed + 1)
    vae = flow_vae(vae_block_out_channels, 8 * vae_factor, FLUX_VAE_SCALING, FLUX_VAE_SHIFT)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_text_config(tokenizer, width, 2, 4, "quick_gelu", width))
    torch.manual_seed(seed + 3)
    text_encoder_2 = T5EncoderModel(_t5_config(len(tokenizer_2), width, 2, 4, width // 4, width * 2))
    modules = _cast(dict(transformer=transformer, vae=vae, text_encoder=text_encoder,
                         text_encoder_2=text_encoder_2), dtype)
    config = FLUX_SCHNELL_SCHEDULER_CONFIG if kind == "schnell" else FLUX_DEV_SCHEDULER_CONFIG
    cls = FluxFillPipeline if kind == "fill" else FluxPipeline
    pipe = cls(**modules, tokenizer=tokenizer, tokenizer_2=tokenizer_2,
               scheduler=FlowMatchEulerDiscreteScheduler(**config))
    pipe.save_pretrained(str(path), safe_serialization=True)
    return path


# -- the real architectures, for GPU benchmarks -------------------------------------------------

# SD 3.5 transformers (transformer/config.json).
SD35_TRANSFORMERS = {
    "large": dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38,
                  attention_head_dim=64, num_attention_heads=38, joint_attention_dim=4096,
                  caption_projection_dim=2432, pooled_projection_dim=2048, pos_embed_max_size=192,
                  qk_norm="rms_norm"),
    "medium": dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                   attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                   caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                   qk_norm="rms_norm", dual_attention_layers=tuple(range(13))),
}
# FLUX.1 dev's transformer (schnell's has guidance_embeds False).
FLUX_DEV_TRANSFORMER = dict(patch_size=1, in_channels=64, out_channels=None, num_layers=19,
                            num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                            joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                            axes_dims_rope=(16, 56, 56))


def _real_vae(scaling, shift):
    return flow_vae((128, 256, 512, 512), 1024, scaling, shift, layers_per_block=2)


def _real_t5(depth):
    return T5EncoderModel(_t5_config(T5_VOCAB_SIZE, 4096, min(24, depth or 24), 64, 64, 10240))


def _real_clip(tokenizer, hidden, layers, heads, act, depth, cls):
    config = _text_config(tokenizer, hidden, min(layers, depth or layers), heads, act, hidden)
    config.vocab_size = CLIP_VOCAB_SIZE
    return cls(config)


def sd3_modules(tokenizer, tokenizer_2, variant="large", device=None, depth=None):
    """The random-weight models of SD 3.5 ``variant`` ("large": 8.1 B transformer
    parameters; "medium": 2.2 B, and a 0.23 B position-embedding buffer), CLIP-L and
    bigG with projections, T5-XXL's encoder (4.8 B) and SD3's VAE, built on ``device``
    ("meta" builds no weights at all). ``depth`` caps every stack's layer count, for
    quick checks."""
    config = dict(SD35_TRANSFORMERS[variant])
    if depth:
        config["num_layers"] = min(config["num_layers"], depth)
        config["dual_attention_layers"] = tuple(
            i for i in config.get("dual_attention_layers", ()) if i < config["num_layers"])
    with torch.device(device or "cpu"):
        return dict(
            transformer=SD3Transformer2DModel(**config),
            vae=_real_vae(SD3_VAE_SCALING, SD3_VAE_SHIFT),
            text_encoder=_real_clip(tokenizer, 768, 12, 12, "quick_gelu", depth, CLIPTextModelWithProjection),
            text_encoder_2=_real_clip(tokenizer_2, 1280, 32, 20, "gelu", depth, CLIPTextModelWithProjection),
            text_encoder_3=_real_t5(depth),
        )


def flux_modules(tokenizer, kind="dev", device=None, depth=None):
    """The random-weight models of FLUX.1 ``kind`` ("dev" or "schnell": an 11.9 B
    transformer; CLIP-L; T5-XXL's encoder, 4.8 B; FLUX's VAE), built on ``device``;
    ``depth`` caps every stack's layer count, for quick checks."""
    config = dict(FLUX_DEV_TRANSFORMER, guidance_embeds=kind != "schnell")
    if depth:
        config["num_layers"] = min(config["num_layers"], depth)
        config["num_single_layers"] = min(config["num_single_layers"], depth)
    with torch.device(device or "cpu"):
        return dict(
            transformer=FluxTransformer2DModel(**config),
            vae=_real_vae(FLUX_VAE_SCALING, FLUX_VAE_SHIFT),
            text_encoder=_real_clip(tokenizer, 768, 12, 12, "quick_gelu", depth, CLIPTextModel),
            text_encoder_2=_real_t5(depth),
        )


def build_sd3_pipeline(path, dtype=torch.bfloat16, seed=0, device=None, *, variant="large", depth=None):
    """Write a random-weight pipeline with SD 3.5 Large's (or ``variant="medium"``'s) real
    architecture, for GPU benchmarks: the same work per step without downloading it.
    ``device`` (e.g. "cuda") builds there, much faster than on a CPU. The tokenizers are
    the synthetic ones (their ids fit CLIP's and T5's vocabularies). The folder holds
    about 2 bytes per parameter in bfloat16: ~28 GB for Large (~18 GB without T5), so
    mind the disk. The images are noise; only timings mean anything. ``depth`` caps every
    layer stack, for quick checks of the construction.
    """
    if variant not in SD3_VARIANTS:
        raise ValueError(f"variant must be one of {SD3_VARIANTS}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _clip_tokenizer(path / "tokenizer")
    tokenizer_2 = _clip_tokenizer(path / "tokenizer_2")
    tokenizer_3 = t5_tokenizer(path / "tokenizer_3")
    if max(len(tokenizer), len(tokenizer_2)) > CLIP_VOCAB_SIZE or len(tokenizer_3) > T5_VOCAB_SIZE:
        raise AssertionError("the synthetic tokenizers must fit the real vocabularies")
    torch.manual_seed(seed)
    modules = _cast(sd3_modules(tokenizer, tokenizer_2, variant, device, depth), dtype)
    pipe = StableDiffusion3Pipeline(
        **modules, tokenizer=tokenizer, tokenizer_2=tokenizer_2, tokenizer_3=tokenizer_3,
        scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER_CONFIG),
    )
    pipe.save_pretrained(str(path), safe_serialization=True)
    return path


def build_flux_pipeline(path, dtype=torch.bfloat16, seed=0, device=None, *, kind="dev", depth=None):
    """Write a random-weight pipeline with FLUX.1 dev's (or ``kind="schnell"``'s) real
    architecture, for GPU benchmarks, as :func:`build_sd3_pipeline` does: ~34 GB in
    bfloat16 (transformer 23.8 GB, T5 9.5 GB). ``depth`` caps every layer stack.
    """
    if kind not in ("dev", "schnell"):
        raise ValueError("kind must be dev or schnell")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _clip_tokenizer(path / "tokenizer")
    tokenizer_2 = t5_tokenizer(path / "tokenizer_2")
    if len(tokenizer) > CLIP_VOCAB_SIZE or len(tokenizer_2) > T5_VOCAB_SIZE:
        raise AssertionError("the synthetic tokenizers must fit the real vocabularies")
    torch.manual_seed(seed)
    modules = _cast(flux_modules(tokenizer, kind, device, depth), dtype)
    config = FLUX_SCHNELL_SCHEDULER_CONFIG if kind == "schnell" else FLUX_DEV_SCHEDULER_CONFIG
    pipe = FluxPipeline(**modules, tokenizer=tokenizer, tokenizer_2=tokenizer_2,
                        scheduler=FlowMatchEulerDiscreteScheduler(**config))
    pipe.save_pretrained(str(path), safe_serialization=True)
    return path
