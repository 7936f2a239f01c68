"""The model library: what is in the model folder, and what each model is.

Torch-free, so that the reactor can answer a ``models`` request without waiting for the
worker. Models are told apart by their content, never by their folder alone: key names
and shapes from a ``.safetensors`` header or a static walk of a ``.ckpt`` pickle (see
:mod:`runai.checkpoint`), ``unet/config.json`` and the scheduler config of a diffusers
folder, and a side-car ``<name>.yaml`` (the original LDM config, as AUTOMATIC1111 keeps
them). The folder (``v1/``, ``v2/``) is only a hint; where it disagrees with the weights,
the weights win and a warning says so.

Nothing outside the model folder is opened: every path is resolved, symlinks included,
and checked for containment before it is read.
"""

import json
import os
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path

from twisted.logger import Logger

from runai.models import checkpoint
from runai.models.paths import contained

log = Logger()

DIFFUSERS = "diffusers"
SAFETENSORS = "safetensors"
CKPT = "ckpt"
FILE_FORMATS = {".safetensors": SAFETENSORS, ".ckpt": CKPT}
# A model named without an extension resolves to the first of these that exists.
FORMAT_PREFERENCE = (DIFFUSERS, SAFETENSORS, CKPT)

V1, V2, SDXL, UNKNOWN = "v1", "v2", "sdxl", "unknown"
SERVED_VERSIONS = (V1, V2)
SERVED_PIPELINES = (
    "StableDiffusionPipeline",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
)

# Width of the text embedding the UNet attends to, for the real model sizes.
CONTEXT_DIMS = {768: V1, 1024: V2, 2048: SDXL, 1280: SDXL}

UNET = "model.diffusion_model."
IN_CONV = UNET + "input_blocks.0.0.weight"

# Bounds on one scan, which runs whenever a client asks for the list.
MAX_DEPTH = 8
MAX_ENTRIES = 20_000
MAX_SIDECAR_BYTES = 1024 * 1024
MAX_JSON_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Classification:
    """What a model's content says it is."""

    kind: str = UNKNOWN  # "pipeline" (a whole SD model), "vae", "lora", "embedding", "unknown"
    version: str = UNKNOWN
    inpainting: bool = False
    in_channels: object = None
    prediction_type: object = None  # "epsilon", "v_prediction", or None when the content does not say
    pipeline_class: object = None  # diffusers folders only
    notes: tuple = ()


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
    if not any(k.startswith(UNET) for k in keys):
        return Classification(kind=_non_pipeline_kind(shapes))
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
    return Classification(
        kind="pipeline", version=version, inpainting=in_channels == 9, in_channels=in_channels,
        prediction_type=prediction, notes=tuple(notes),
    )


def _non_pipeline_kind(shapes):
    keys = list(shapes)
    if any(k.startswith("first_stage_model.") for k in keys) or (
        "encoder.conv_in.weight" in shapes and "decoder.conv_out.weight" in shapes
    ):
        return "vae"
    if any("lora_" in k or ".lora." in k or "lora_A" in k for k in keys):
        return "lora"
    if any(k in ("string_to_param", "emb_params", "clip_l", "clip_g") or k.startswith("string_to_param") for k in keys):
        return "embedding"
    return UNKNOWN


def _read_json(path, model_dir):
    resolved = contained(model_dir, path)
    if resolved is None or not resolved.is_file():
        return None
    if resolved.stat().st_size > MAX_JSON_BYTES:
        return None
    try:
        value = json.loads(resolved.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def classify_diffusers(folder, model_dir):
    """Classify a diffusers folder from its ``model_index.json``, UNet and scheduler configs."""
    folder = Path(folder)
    index = _read_json(folder / "model_index.json", model_dir)
    if index is None:
        return Classification(notes=("model_index.json is unreadable",))
    pipeline_class = index.get("_class_name") if isinstance(index.get("_class_name"), str) else None
    unet = _read_json(folder / "unet" / "config.json", model_dir) or {}
    scheduler = _read_json(folder / "scheduler" / "scheduler_config.json", model_dir) or {}
    text_encoder = _read_json(folder / "text_encoder" / "config.json", model_dir) or {}
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
    return Classification(
        kind="pipeline", version=version, inpainting=in_channels == 9, in_channels=in_channels,
        prediction_type=prediction, pipeline_class=pipeline_class,
    )


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


# -- entries -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelEntry:
    name: str  # relative to the model folder
    path: str  # resolved
    format: str
    size: int
    classification: Classification = field(default_factory=Classification)
    sidecar: object = None  # name of the side-car yaml, if one was honoured
    error: object = None

    @property
    def version(self):
        return self.classification.version

    @property
    def served(self):
        c = self.classification
        if self.error or c.kind != "pipeline" or c.version not in SERVED_VERSIONS:
            return False
        return self.format != DIFFUSERS or c.pipeline_class in SERVED_PIPELINES

    def to_wire(self, loaded=()):
        c = self.classification
        wire = {
            "name": self.name,
            "version": c.version,
            "format": self.format,
            "kind": c.kind,
            "inpainting": c.inpainting,
            "in_channels": c.in_channels,
            "prediction_type": c.prediction_type,
            "size": self.size,
            "served": self.served,
            "loaded": self.path in loaded,
        }
        if self.sidecar:
            wire["config"] = self.sidecar
        if self.error:
            wire["error"] = self.error
        return wire


def model_format(path):
    """``diffusers``, ``safetensors`` or ``ckpt`` for a resolved path; None otherwise."""
    path = Path(path)
    if path.is_dir():
        return DIFFUSERS if (path / "model_index.json").is_file() else None
    if path.is_file():
        return FILE_FORMATS.get(path.suffix.lower())
    return None


def _folder_size(folder, limit=10_000):
    total = 0
    for count, (root, _, files) in enumerate(os.walk(folder)):
        if count > limit:
            break
        for name in files:
            try:
                total += os.stat(os.path.join(root, name), follow_symlinks=False).st_size
            except OSError:
                pass
    return total


def _signature(path, fmt):
    """What must change on disk for a cached classification to be stale."""
    parts = [path]
    probes = [path]
    if fmt == DIFFUSERS:
        probes = [os.path.join(path, p) for p in ("model_index.json", "unet/config.json",
                                                   "scheduler/scheduler_config.json", "text_encoder/config.json")]
    else:
        probes.append(str(sidecar_path(path)))
    for probe in probes:
        try:
            st = os.stat(probe)
            parts.append((st.st_size, st.st_mtime_ns))
        except OSError:
            parts.append(None)
    return tuple(parts)


class ModelLibrary:
    """Finds and classifies the models in one model folder; thread-safe.

    Classifications are cached by file size and modification time, so a listing costs
    one ``stat`` per known model and follows changes on disk without a restart.
    """

    def __init__(self, model_dir):
        self.model_dir = Path(os.path.realpath(model_dir))
        self._cache = {}
        self._lock = threading.Lock()

    def describe(self, path, name=None):
        """The entry of one model at the resolved ``path`` (already checked for containment)."""
        path = str(path)
        if name is None:
            name = Path(path).relative_to(self.model_dir).as_posix()
        fmt = model_format(path)
        if fmt is None:
            raise ValueError(f"{name!r} is not a model")
        key = _signature(path, fmt)
        with self._lock:
            cached = self._cache.get(key)
        if cached is not None:
            return replace(cached, name=name) if cached.name != name else cached
        try:
            entry = self._classify(path, name, fmt)
        except Exception as e:
            # One malformed file must never hide the others: it is listed, with why. The
            # entry is cached like any other, so this is logged once, not on every scan.
            entry = self._failed(path, name, fmt, e)
        with self._lock:
            if len(self._cache) > 4096:
                self._cache.clear()
            self._cache[key] = entry
        return entry

    def _failed(self, path, name, fmt, e):
        log.failure("cannot classify {name}", name=name)
        # The server's own paths are no business of a client's.
        cause = f"{type(e).__name__}: {e}".replace(path, name).replace(str(self.model_dir) + os.sep, "")
        try:
            size = os.path.getsize(path) if fmt != DIFFUSERS else 0
        except OSError:
            size = 0
        return ModelEntry(name=name, path=path, format=fmt, size=size,
                          error=f"cannot read this model: {cause[:300]}")

    def _classify(self, path, name, fmt):
        error = None
        sidecar = None
        if fmt == DIFFUSERS:
            size = _folder_size(path)
            classification = classify_diffusers(path, self.model_dir)
        else:
            size = os.path.getsize(path)
            try:
                shapes, metadata = checkpoint.tensor_shapes(path)
            except checkpoint.CheckpointError as e:
                classification, error = Classification(), e.message
            else:
                classification = classify_state(shapes, metadata)
            said = read_sidecar(path, self.model_dir)
            if said is not None:
                sidecar = sidecar_path(name).as_posix()
                classification = _apply_sidecar(classification, said, name)
        hint = folder_hint(name)
        c = classification
        if c.kind == "pipeline" and c.version == UNKNOWN and hint:
            classification = replace(c, version=hint)
        elif c.kind == "pipeline" and hint and hint != c.version:
            log.warn(
                "{name} is in a {hint} folder but its weights are {version}; serving it as {version}",
                name=name, hint=hint, version=c.version,
            )
        for note in c.notes:
            log.warn("{name}: {note}", name=name, note=note)
        if error:
            log.warn("cannot classify {name}: {error}", name=name, error=error)
        return ModelEntry(name=name, path=path, format=fmt, size=size, classification=classification,
                          sidecar=sidecar, error=error)

    def scan(self):
        """Every model in the folder, sorted by name."""
        entries = []
        root = self.model_dir
        visited = 0
        pending = [(root, 0)]
        while pending:
            folder, depth = pending.pop()
            try:
                with os.scandir(folder) as it:
                    children = sorted(it, key=lambda e: e.name)
            except OSError:
                continue
            for child in children:
                visited += 1
                if visited > MAX_ENTRIES:
                    log.warn("the model folder has more than {n} entries; the list stops there", n=MAX_ENTRIES)
                    pending = []
                    break
                if child.name.startswith("."):
                    continue  # .cache, .git, half-written conversions
                entry = self._visit(Path(child.path), child, depth, pending)
                if entry is not None:
                    entries.append(entry)
        entries.sort(key=lambda e: e.name)
        return entries

    def _visit(self, path, child, depth, pending):
        try:
            is_link = child.is_symlink()
            if is_link:
                # Followed only to a place inside the model folder, and never descended:
                # a link may point at an ancestor.
                if contained(self.model_dir, path) is None:
                    log.debug("skipping {path}: it leads outside the model folder", path=str(path))
                    return None
            if child.is_dir():
                if (path / "model_index.json").is_file():
                    return self._entry(path)
                if (path / "config.json").is_file():
                    return None  # a transformers or component folder (CLIP, safety checker)
                if not is_link and depth < MAX_DEPTH:
                    pending.append((path, depth + 1))
                return None
            if child.is_file() and path.suffix.lower() in FILE_FORMATS:
                return self._entry(path)
        except OSError:
            return None
        return None

    def _entry(self, path):
        name = path.relative_to(self.model_dir).as_posix()
        resolved = contained(self.model_dir, path)
        if resolved is None:
            return None
        try:
            return self.describe(resolved, name)
        except (OSError, ValueError):
            return None  # gone since the folder was read, or not a model after all
        except Exception as e:
            # describe() turns a failed classification into an entry with its error;
            # whatever is left must still not cost the client the rest of the list.
            fmt = FILE_FORMATS.get(path.suffix.lower(), DIFFUSERS)
            return self._failed(str(resolved), name, fmt, e)


def _apply_sidecar(c, said, name):
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
