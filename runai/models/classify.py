# -*- test-case-name: runai.test.test_classify -*-
"""What a model is, from its content: the classification rules of the model library.

Models are told apart by their content, never by their folder alone: key names and
shapes from a ``.safetensors`` header or a static walk of a ``.ckpt`` pickle (see
:mod:`runai.models.checkpoint`), ``unet/config.json`` and the scheduler config of a
diffusers folder, and a side-car ``<name>.yaml`` (the original LDM config, as
AUTOMATIC1111 keeps them). The folder (``v1/``, ``v2/``) is only a hint
(:func:`folder_hint`); where it disagrees with the weights, the weights win.

Torch-free, and nothing outside the model folder is opened: every config and side-car is
resolved, symlinks included, and checked for containment before it is read.
"""

from dataclasses import dataclass, replace
from pathlib import Path

from twisted.logger import Logger

from runai.models import flowparts, upscaler_keys
from runai.models.paths import contained, read_json

log = Logger()

V1, V2, SDXL, SD3, FLUX, UNKNOWN = "v1", "v2", "sdxl", "sd3", "flux", "unknown"
# FLUX.1's variants: guidance-distilled (a guidance embedding), step-distilled (none), and
# the inpainting model (the masked picture and the mask beside the latents).
FLUX_DEV, FLUX_SCHNELL, FLUX_FILL = "dev", "schnell", "fill"
FLUX_CONTROL = "control"  # Depth and Canny: a control image beside the latents (not served)
# The SDXL refiner: the second stage of SDXL, which only refines a base model's latents
# (one text encoder, an aesthetic score in its size conditioning). Listed, never served.
REFINER = "refiner"
REFINER_REFUSAL = (
    "it is an SDXL refiner, the second stage of SDXL: it refines another model's images and "
    "cannot generate alone; use an SDXL base model (or one of its fine-tunes)"
)
# SDXL's added-embedding input: the pooled bigG text (1280) and 256 per size number; the
# base has 6 size numbers (2816), the refiner 5 (2560, an aesthetic score for the target size).
SDXL_REFINER_LABEL_WIDTH = 2560

# Width of the text embedding the UNet attends to, for the real model sizes.
CONTEXT_DIMS = {768: V1, 1024: V2, 2048: SDXL, 1280: SDXL}

UNET = "model.diffusion_model."
IN_CONV = UNET + "input_blocks.0.0.weight"

MAX_SIDECAR_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Classification:
    """What a model's content says it is."""

    # "pipeline" (a whole SD model), "refiner" (SDXL's second stage), "vae", "lora",
    # "embedding", "text_encoder" (SD3's and FLUX.1's companion files), "upscaler"
    # (ESRGAN and its family, runai.models.upscalers), "unknown"
    kind: str = UNKNOWN
    version: str = UNKNOWN
    inpainting: bool = False
    in_channels: object = None
    prediction_type: object = None  # "epsilon", "v_prediction", or None when the content does not say
    pipeline_class: object = None  # diffusers folders only
    notes: tuple = ()
    variant: object = None  # within a family, where it matters: FLUX.1 "dev", "schnell", "fill"


# -- content rules ---------------------------------------------------------------------


def _int(value):
    """``value`` if it is an int (not a bool), else None: configs are JSON/YAML from the
    disk, and a list or a mapping where a width belongs must not reach a dict lookup."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _text_encoder_version(keys):
    for key in keys:
        if key.startswith("conditioner.embedders."):
            return SDXL
    for key in keys:
        if key.startswith("cond_stage_model.model."):
            return V2  # OpenCLIP ViT-H, SD 2.x
        if key.startswith("cond_stage_model.transformer."):
            return V1  # OpenAI CLIP ViT-L, SD 1.x
    return None


def _unet_version(shapes):
    if any(k.startswith(UNET + "label_emb.") for k in shapes):
        return SDXL, None  # size conditioning: only SDXL among these has it
    context = None
    for key in sorted(shapes):
        if key.startswith(UNET) and key.endswith(".attn2.to_k.weight") and len(shapes[key]) == 2:
            context = shapes[key][1]
            break
    if context in CONTEXT_DIMS:
        return CONTEXT_DIMS[context], context
    # A width of no released model (a small test model, a pruned experiment): SD 2.x
    # projects into its transformers with Linear layers, SD 1.x with 1x1 convolutions.
    for key in sorted(shapes):
        if key.startswith(UNET) and key.endswith(".proj_in.weight"):
            return (V2 if len(shapes[key]) == 2 else V1), context
    return None, context


def classify_state(shapes, metadata=None):
    """Classify an LDM-layout state dict from ``{name: shape}`` (and safetensors metadata)."""
    metadata = metadata or {}
    keys = list(shapes)
    notes = []
    if _non_pipeline_kind(shapes) == "lora":
        return Classification(kind="lora")  # before the flow rules: a FLUX.1 LoRA may use BFL's names
    flow = _classify_flow_state(shapes)
    if flow is not None:
        return flow
    if not any(k.startswith(UNET) for k in keys):
        return _non_pipeline(shapes)
    unet_version, context = _unet_version(shapes)
    te_version = _text_encoder_version(keys)
    version = unet_version or te_version or UNKNOWN
    if unet_version and te_version and unet_version != te_version:
        notes.append(f"the UNet looks {unet_version} but the text encoder looks {te_version}")
    in_channels = None
    if IN_CONV in shapes and len(shapes[IN_CONV]) == 4:
        in_channels = shapes[IN_CONV][1]
    prediction = None
    spec = str(metadata.get("modelspec.prediction_type", "")).lower()
    if "v_pred" in shapes or spec in ("v", "v_prediction", "v-prediction"):
        prediction = "v_prediction"
    elif spec in ("epsilon", "eps"):
        prediction = "epsilon"
    elif version == V1:
        # SD 1.x was released for epsilon only; the rare v-prediction fine-tune comes
        # with a side-car config, which overrides this.
        prediction = "epsilon"
    kind = REFINER if version == SDXL and _is_refiner_state(shapes) else "pipeline"
    return Classification(
        kind=kind, version=version, inpainting=in_channels == 9, in_channels=in_channels,
        prediction_type=prediction, notes=tuple(notes),
    )


def _classify_flow_state(shapes):
    """SD3 (MMDiT ``joint_blocks``) and FLUX.1 (BFL ``double_blocks``/``single_blocks``,
    often without the ``model.diffusion_model.`` prefix: a transformer-only file)."""
    if any(k.startswith(UNET + "joint_blocks.") for k in shapes):
        return Classification(kind="pipeline", version=SD3, in_channels=_patch_channels(shapes, UNET + "x_embedder."),
                              prediction_type="flow")
    for prefix in (UNET, ""):
        if any(k.startswith(prefix + "double_blocks.") for k in shapes) and \
                any(k.startswith(prefix + "single_blocks.") for k in shapes):
            img_in = shapes.get(prefix + "img_in.weight")
            in_channels = img_in[1] if img_in is not None and len(img_in) == 2 else None
            if in_channels is not None and in_channels > 2 * 64:
                variant = FLUX_FILL  # the latents, the masked picture's and the mask
            elif in_channels is not None and in_channels > 64:
                variant = FLUX_CONTROL  # the latents and a depth or edge map's: not served
            elif any(k.startswith(prefix + "guidance_in.") for k in shapes):
                variant = FLUX_DEV
            else:
                variant = FLUX_SCHNELL
            return Classification(kind="pipeline", version=FLUX, in_channels=in_channels, inpainting=variant == FLUX_FILL,
                                  prediction_type="flow", variant=variant)
    return None


def _patch_channels(shapes, prefix):
    proj = shapes.get(prefix + "proj.weight")
    return proj[1] if proj is not None and len(proj) == 4 else None


def _is_refiner_state(shapes):
    """An SDXL refiner's state dict: its one text encoder (OpenCLIP bigG) is embedder 0 (the
    base has CLIP-L there and bigG as embedder 1); a UNet alone tells by its label width."""
    keys = list(shapes)
    if any(k.startswith("conditioner.embedders.") for k in keys):
        return (any(k.startswith("conditioner.embedders.0.model.") for k in keys)
                and not any(k.startswith("conditioner.embedders.1.") for k in keys))
    label = shapes.get(UNET + "label_emb.0.0.weight")
    return label is not None and len(label) == 2 and label[1] == SDXL_REFINER_LABEL_WIDTH


def _non_pipeline(shapes):
    """A file without a denoiser. SD3's and FLUX.1's companion files are told by content
    (:mod:`runai.models.flowparts`): a VAE says its latent channels in ``in_channels`` where
    they are not SD's 4 (16 for SD3's and FLUX.1's); a text encoder is ``kind``
    "text_encoder" with ``variant`` "clip_l", "clip_g", "t5xxl" (or "clip": a CLIP of a
    width no released model has)."""
    kind = _non_pipeline_kind(shapes)
    if kind == UNKNOWN and flowparts.vae_prefix(shapes) is not None:
        kind = "vae"  # ComfyUI's "vae." prefix
    if kind == "vae":
        latent = next((c for c in (flowparts.latent_channels(shapes, p) for p in flowparts.VAE_PREFIXES)
                       if c is not None), None)
        return Classification(kind=kind, in_channels=latent if latent != 4 else None)
    if kind == UNKNOWN:
        variant = flowparts.text_encoder_variant(shapes)
        if variant is not None:
            return Classification(kind="text_encoder", variant=variant)
        arch = upscaler_keys.detect(upscaler_keys.unwrap(shapes))
        if arch is not None:  # ESRGAN and its family: listed, never served as a checkpoint
            return Classification(kind="upscaler", variant=arch.name)
    return Classification(kind=kind)


def _non_pipeline_kind(shapes):
    keys = list(shapes)
    if any(k.startswith("first_stage_model.") for k in keys) or (
        "encoder.conv_in.weight" in shapes and "decoder.conv_out.weight" in shapes
    ):
        return "vae"
    if any("lora_" in k or ".lora." in k or "lora_A" in k or ".hada_w" in k or ".lokr_w" in k for k in keys):
        return "lora"  # LyCORIS's LoHa and LoKr too
    if any(k in ("string_to_param", "emb_params", "clip_l", "clip_g") or k.startswith("string_to_param") for k in keys):
        return "embedding"
    if len(keys) == 1 and keys[0].startswith("<") and keys[0].endswith(">") and 1 <= len(shapes[keys[0]]) <= 2:
        return "embedding"  # diffusers' learned_embeds: {"<token>": vectors}
    return UNKNOWN


def classify_diffusers(folder, model_dir):
    """Classify a diffusers folder from its ``model_index.json``, UNet and scheduler configs."""
    folder = Path(folder)
    index = read_json(model_dir, folder / "model_index.json")
    if index is None:
        return Classification(notes=("model_index.json is unreadable",))
    pipeline_class = index.get("_class_name") if isinstance(index.get("_class_name"), str) else None
    unet = read_json(model_dir, folder / "unet" / "config.json") or {}
    scheduler = read_json(model_dir, folder / "scheduler" / "scheduler_config.json") or {}
    text_encoder = read_json(model_dir, folder / "text_encoder" / "config.json") or {}
    if not unet and "transformer" in index:
        return _classify_flow_folder(folder, model_dir, pipeline_class)
    if not unet:
        return Classification(pipeline_class=pipeline_class, notes=("no unet/config.json",))
    context = unet.get("cross_attention_dim")
    if isinstance(context, list):
        context = context[0] if context else None
    context = _int(context)
    sdxl = unet.get("addition_embed_type") == "text_time" or "text_encoder_2" in index
    if sdxl or (pipeline_class and "XL" in pipeline_class):
        version = SDXL
    elif context in CONTEXT_DIMS:
        version = CONTEXT_DIMS[context]
    elif unet.get("use_linear_projection") or text_encoder.get("hidden_act") == "gelu":
        version = V2
    else:
        version = V1
    in_channels = _int(unet.get("in_channels", 4))
    prediction = scheduler.get("prediction_type")
    prediction = prediction if isinstance(prediction, str) and prediction else "epsilon"
    kind = REFINER if version == SDXL and _is_refiner_folder(index) else "pipeline"
    return Classification(
        kind=kind, version=version, inpainting=in_channels == 9, in_channels=in_channels,
        prediction_type=prediction, pipeline_class=pipeline_class,
    )


def _classify_flow_folder(folder, model_dir, pipeline_class):
    """An SD3 or FLUX.1 folder, from its transformer's (and VAE's) config."""
    transformer = read_json(model_dir, folder / "transformer" / "config.json") or {}
    cls = transformer.get("_class_name")
    in_channels = _int(transformer.get("in_channels"))
    if cls == "SD3Transformer2DModel":
        return Classification(kind="pipeline", version=SD3, in_channels=in_channels, prediction_type="flow",
                              pipeline_class=pipeline_class)
    if cls == "FluxTransformer2DModel":
        vae = read_json(model_dir, folder / "vae" / "config.json") or {}
        packed = (_int(vae.get("latent_channels")) or 16) * 4
        if (in_channels or 0) > 2 * packed or pipeline_class == "FluxFillPipeline":
            variant = FLUX_FILL
        elif (in_channels or 0) > packed:
            variant = FLUX_CONTROL
        elif transformer.get("guidance_embeds") is False:
            variant = FLUX_SCHNELL
        else:
            variant = FLUX_DEV
        return Classification(kind="pipeline", version=FLUX, in_channels=in_channels, prediction_type="flow",
                              inpainting=variant == FLUX_FILL, pipeline_class=pipeline_class, variant=variant)
    return Classification(pipeline_class=pipeline_class, notes=("no unet/config.json",))


def _is_refiner_folder(index):
    """An SDXL refiner folder has no first text encoder (``[null, null]`` or none at all), or
    says that its UNet is conditioned on an aesthetic score."""
    first = index.get("text_encoder")
    has_first = isinstance(first, list) and len(first) == 2 and all(isinstance(p, str) for p in first)
    return not has_first or index.get("requires_aesthetics_score") is True


def sidecar_path(path):
    """The side-car LDM config of a checkpoint: ``v1/x.yaml`` beside ``v1/x.safetensors``."""
    path = Path(path)
    return path.with_name(path.stem + ".yaml")


def read_sidecar(path, model_dir):
    """What a side-car yaml says: ``{"prediction_type", "version", "in_channels"}``, each
    only if it says so; None without a (readable, contained) side-car."""
    candidate = sidecar_path(path)
    resolved = contained(model_dir, candidate)
    try:
        if resolved is None or not resolved.is_file() or resolved.stat().st_size > MAX_SIDECAR_BYTES:
            return None
        import yaml

        config = yaml.safe_load(resolved.read_text(encoding="utf-8"))
    except Exception:
        log.warn("ignoring the unreadable side-car config {name}", name=candidate.name)
        return None
    if not isinstance(config, dict):
        return None
    model = config.get("model") if isinstance(config.get("model"), dict) else {}
    params = model.get("params") if isinstance(model.get("params"), dict) else {}
    said = {}
    # LatentDiffusion's default parameterization is "eps": an LDM config that does not
    # name one is an epsilon model.
    said["prediction_type"] = "v_prediction" if params.get("parameterization") == "v" else "epsilon"
    unet = (params.get("unet_config") or {}).get("params") if isinstance(params.get("unet_config"), dict) else None
    if isinstance(unet, dict):
        if _int(unet.get("in_channels")) is not None:
            said["in_channels"] = unet["in_channels"]
        if _int(unet.get("context_dim")) in CONTEXT_DIMS:
            said["version"] = CONTEXT_DIMS[unet["context_dim"]]
    if "sgm." in str(model.get("target", "")):
        said["version"] = SDXL
    return said


def folder_hint(name):
    """The version a model's place in the folder suggests (``v1/...``), or None."""
    parts = name.lower().split("/")
    if parts[0] in (V1, V2):
        return parts[0]
    if parts[0] in ("sdxl", "xl"):
        return SDXL
    joined = "/".join(parts[:2])
    if "stable-diffusion-v1" in joined or joined.startswith("compvis/stable-diffusion"):
        return V1
    if "stable-diffusion-2" in joined:
        return V2
    if "stable-diffusion-xl" in joined:
        return SDXL
    return None


def apply_sidecar(c, said):
    """Classification ``c`` with what a side-car said (:func:`read_sidecar`) applied: its
    prediction type wins; its version and width only fill in what the weights leave open."""
    notes = list(c.notes)
    version = c.version
    in_channels = c.in_channels
    if c.kind != "pipeline":
        return c
    if "version" in said and said["version"] != c.version:
        if c.version == UNKNOWN:
            version = said["version"]
        else:
            notes.append(f"the side-car config says {said['version']} but the weights are {c.version}")
    if in_channels is None and "in_channels" in said:
        in_channels = said["in_channels"]
    prediction = c.prediction_type
    if "prediction_type" in said:
        prediction = said["prediction_type"]
    return replace(c, version=version, in_channels=in_channels, inpainting=in_channels == 9,
                   prediction_type=prediction, notes=tuple(notes))
