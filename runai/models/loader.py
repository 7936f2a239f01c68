"""Loading Stable Diffusion pipelines, offline, and keeping the recent ones loaded.

Worker thread only (imports torch and diffusers).

* A diffusers folder loads with ``from_pretrained`` from local files only, once every
  file in it is known to lie inside the model folder.
* A ``.safetensors`` or ``.ckpt`` file is read by :mod:`runai.checkpoint` (a ``.ckpt``
  through the restricted unpickler) and converted with diffusers' own single-file
  conversion functions. The architecture, scheduler and tokenizer come from a diffusers
  copy of the base model in the model folder, or from the configs runai ships
  (:mod:`runai.sdconfigs`) with a tokenizer from the model folder: never from the Hub.
  diffusers' ``from_single_file`` is not called with a path at all, so it can never take
  a name for a Hub repository, nor unpickle a ``.ckpt`` its own way.
* :class:`ModelLoader` keeps the most recently used pipelines in an LRU cache bounded in
  models or in bytes, so switching back to a model costs nothing.
"""

import os

# huggingface_hub reads these once, at import: set them before diffusers/transformers
# import it (the ``runai convert`` command imports this module before the engine).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import collections  # noqa: E402
import copy  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import diffusers  # noqa: E402
import torch  # noqa: E402
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from diffusers.loaders import single_file_utils  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402
from twisted.logger import Logger  # noqa: E402

from runai.models import checkpoint
from runai.core import errors
from runai.models import library
from runai.models import sdconfigs
from runai.models.paths import contained  # noqa: E402

try:
    from transformers.initialization import no_init_weights  # noqa: E402
except ImportError:  # transformers 4.x
    from transformers.modeling_utils import no_init_weights  # noqa: E402

log = Logger()

# Cap on how much of an exception's text goes into a client's error message.
MAX_CAUSE_CHARS = 500


def _dtype_keyword():
    """``dtype`` where diffusers has it, else the older ``torch_dtype``.

    Newer diffusers deprecate ``torch_dtype`` (with a warning on every load); older ones
    silently ignore ``dtype``, which would load float32 onto the GPU.
    """
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401
    except ImportError:
        return "torch_dtype"
    return "dtype"


DTYPE_KEYWORD = _dtype_keyword()


class LoadError(Exception):
    """A model that cannot be loaded; the message names what is missing, and where."""

    def __init__(self, message):
        super().__init__(message)
        self.message = message


# -- containment -------------------------------------------------------------------------


def check_tree(model_dir, folder, limit=10_000):
    """Raise LoadError unless everything under ``folder`` resolves inside ``model_dir``.

    A diffusers folder is many files, and ``from_pretrained`` follows symlinks: one link
    to elsewhere in ``unet/`` would have it open a file outside the model folder.
    """
    model_dir = Path(os.path.realpath(model_dir))
    pending = [Path(folder)]
    seen = set()
    count = 0
    while pending:
        current = pending.pop()
        try:
            children = list(os.scandir(current))
        except OSError as e:
            raise LoadError(f"cannot read {current.name}: {e.strerror}")
        for child in children:
            count += 1
            if count > limit:
                raise LoadError(f"the model folder {Path(folder).name} has more than {limit} files")
            resolved = contained(model_dir, child.path)
            if resolved is None:
                shown = os.path.relpath(child.path, model_dir) if current != Path(folder) else child.name
                raise LoadError(f"{shown} is a link to a place outside the model folder")
            if resolved.is_dir() and resolved not in seen:
                seen.add(resolved)
                pending.append(resolved)


# -- base configs for single files -----------------------------------------------------

V1_BASES = ["runwayml/stable-diffusion-v1-5", "stable-diffusion-v1-5/stable-diffusion-v1-5",
            "CompVis/stable-diffusion-v1-4"]
V1_INPAINT_BASES = ["runwayml/stable-diffusion-inpainting", "stable-diffusion-v1-5/stable-diffusion-inpainting"]
V2_EPS_BASES = ["stabilityai/stable-diffusion-2-1-base", "stabilityai/stable-diffusion-2-base"]
V2_V_BASES = ["stabilityai/stable-diffusion-2-1", "stabilityai/stable-diffusion-2"]
V2_INPAINT_BASES = ["stabilityai/stable-diffusion-2-inpainting"]
# CLIP's BPE vocabulary is the same for SD 1.x and 2.x: any of these tokenizers will do.
TOKENIZER_FOLDERS = ["openai/clip-vit-large-patch14", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"]
CONFIG_FILES = ("unet/config.json", "vae/config.json", "text_encoder/config.json", "scheduler/scheduler_config.json")
TOKENIZER_FILES = ("vocab.json", "merges.txt")


def base_candidates(version, inpainting, v_prediction):
    if version == library.V1:
        return (V1_INPAINT_BASES if inpainting else []) + V1_BASES
    first, then = (V2_V_BASES, V2_EPS_BASES) if v_prediction else (V2_EPS_BASES, V2_V_BASES)
    return (V2_INPAINT_BASES if inpainting else []) + first + then


@dataclass
class BaseConfigs:
    source: str  # for messages: which base model the architecture came from
    unet: dict
    vae: dict
    text_encoder: dict
    scheduler: dict
    tokenizer: Path
    tokenizer_source: str


def _read_config(model_dir, path):
    resolved = contained(model_dir, path)
    if resolved is None or not resolved.is_file():
        return None
    try:
        value = json.loads(resolved.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _tokenizer_at(model_dir, folder):
    resolved = contained(model_dir, folder)
    if resolved is None or not resolved.is_dir():
        return None
    for name in TOKENIZER_FILES:
        found = contained(model_dir, resolved / name)
        if found is None or not found.is_file():
            return None
    try:
        # from_pretrained reads whatever else is there (tokenizer_config.json, ...): all
        # of it must be inside the model folder too.
        check_tree(model_dir, resolved, limit=1000)
    except LoadError:
        return None
    return resolved


def find_base_configs(model_dir, version, inpainting=False, prediction_type=None):
    """The architecture and tokenizer for a single file of ``version``, from local files.

    Raises LoadError naming the files to put where when no tokenizer is to be found.
    """
    model_dir = Path(os.path.realpath(model_dir))
    v_prediction = prediction_type == "v_prediction"
    chosen = None
    for rel in base_candidates(version, inpainting, v_prediction):
        configs = [_read_config(model_dir, model_dir / rel / f) for f in CONFIG_FILES]
        if all(c is not None for c in configs):
            chosen = (f"the configs of {rel} in the model folder", *configs, model_dir / rel)
            break
    if chosen is None:
        rel, shipped = sdconfigs.SHIPPED[(version, v_prediction)]
        chosen = (f"runai's built-in configs of {rel}", shipped["unet"], shipped["vae"],
                  shipped["text_encoder"], shipped["scheduler"], None)
    source, unet, vae, text_encoder, scheduler, folder = chosen
    tokenizer = tokenizer_source = None
    searched = ([folder / "tokenizer"] if folder is not None else []) + [model_dir / t for t in TOKENIZER_FOLDERS]
    searched += [model_dir / b / "tokenizer" for b in V1_BASES + V2_EPS_BASES + V2_V_BASES]
    for candidate in searched:
        tokenizer = _tokenizer_at(model_dir, candidate)
        if tokenizer is not None:
            tokenizer_source = tokenizer.relative_to(model_dir).as_posix()
            break
    if tokenizer is None:
        base = base_candidates(version, inpainting, v_prediction)[0]
        raise LoadError(
            f"a {version} single-file model needs a CLIP tokenizer, and the model folder has none: put "
            f"vocab.json and merges.txt in {TOKENIZER_FOLDERS[0]}/ (from openai/clip-vit-large-patch14), "
            f"or a diffusers copy of {base} (model_index.json, unet/config.json, vae/config.json, "
            "text_encoder/config.json, scheduler/scheduler_config.json, tokenizer/) in "
            f"{base}/, inside the model folder"
        )
    return BaseConfigs(source, dict(unet), dict(vae), dict(text_encoder), dict(scheduler), tokenizer, tokenizer_source)


# -- single files ---------------------------------------------------------------------------


def _fill(model, converted, what, source, device, dtype, assign):
    expected = model.state_dict()
    missing = [k for k in expected if k not in converted or converted[k] is None]
    if missing:
        raise LoadError(
            f"the checkpoint lacks {len(missing)} of the {len(expected)} {what} weights "
            f"(e.g. {', '.join(sorted(missing)[:3])}): it is not a whole Stable Diffusion model, "
            f"or not one that fits {source}"
        )
    tensors = {}
    for key, want in expected.items():
        have = converted[key]
        if tuple(have.shape) != tuple(want.shape):
            raise LoadError(
                f"{what} weight {key} has shape {list(have.shape)} where {source} "
                f"want {list(want.shape)}"
            )
        # A copy, always: model weights must never alias the file's memory map (a file
        # rewritten in place would pull the pages out from under a running model).
        tensors[key] = have.to(device=device, dtype=dtype or have.dtype, copy=True)
    model.load_state_dict(tensors, strict=True, assign=assign)
    return model


def _majority_dtype(state):
    counts = collections.Counter()
    for key, tensor in state.items():
        if key.startswith(library.UNET) and tensor.is_floating_point():
            counts[tensor.dtype] += tensor.numel()
    return counts.most_common(1)[0][0] if counts else torch.float32


def _scheduler_from(config):
    cls = getattr(diffusers, str(config.get("_class_name", "")), None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        cls = PNDMScheduler
    return cls.from_config(config)


def looks_v_prediction(unet):
    """AUTOMATIC1111's test for SD 2.x v-models: on a flat latent at the last timestep an
    epsilon model predicts noise near the input, a v-model something far below it."""
    param = next(unet.parameters())
    with torch.inference_mode():
        x = torch.full((1, unet.config.in_channels, 8, 8), 0.5, device=param.device, dtype=param.dtype)
        cond = torch.full((1, 2, unet.config.cross_attention_dim), 0.5, device=param.device, dtype=param.dtype)
        t = torch.tensor([999], device=param.device)
        out = unet(x, t, encoder_hidden_states=cond).sample
        return (out.float() - x.float()).mean().item() < -1


def pipeline_from_single_file(path, model_dir, entry, device="cpu", dtype=None, on_step=None):
    """A StableDiffusionPipeline from a ``.safetensors``/``.ckpt`` file; raises LoadError.

    ``entry`` is the file's :class:`runai.models.library.ModelEntry`; ``dtype`` None keeps the
    checkpoint's own precision (for conversion). ``on_step(what)`` follows each stage.
    """
    step = on_step or (lambda what: None)
    c = entry.classification
    if entry.error:
        raise LoadError(entry.error)
    if c.kind != "pipeline":
        raise LoadError(f"it is not a Stable Diffusion model (it looks like a {c.kind} file)")
    if c.version not in library.SERVED_VERSIONS:
        raise LoadError(f"it is a {c.version} model; runai serves Stable Diffusion 1.x and 2.x")
    base = find_base_configs(model_dir, c.version, c.inpainting, c.prediction_type)
    step("read")
    try:
        state = checkpoint.load_state_dict(path)
    except checkpoint.CheckpointError as e:
        raise LoadError(e.message)
    if dtype is None:
        dtype = _majority_dtype(state)

    unet_config = dict(base.unet)
    if c.in_channels and c.in_channels != unet_config.get("in_channels"):
        unet_config["in_channels"] = c.in_channels
    if c.version == library.V2 and c.prediction_type != "epsilon":
        # SD 2.1's v-model needs attention in float32 to avoid NaNs in float16.
        unet_config["upcast_attention"] = True
    step("unet")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
    converted = single_file_utils.convert_ldm_unet_checkpoint(state, unet_config)
    unet = _fill(unet, converted, "UNet", base.source, device, dtype, assign=True)
    del converted

    step("vae")
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(base.vae)
    converted = single_file_utils.convert_ldm_vae_checkpoint(state, base.vae)
    vae = _fill(vae, converted, "VAE", base.source, device, dtype, assign=True)
    del converted

    step("text_encoder")
    te_config = CLIPTextConfig(**{k: v for k, v in base.text_encoder.items() if k != "architectures"})
    # Built without random initialisation (every weight is overwritten), and not on the
    # meta device: CLIP's position ids are a buffer that no checkpoint holds.
    with no_init_weights():
        text_encoder = CLIPTextModel(te_config)
    if single_file_utils.is_open_clip_model(state):
        converted = single_file_utils.convert_open_clip_checkpoint(
            text_encoder, state, prefix="cond_stage_model.model.")
    elif single_file_utils.is_clip_model(state):
        converted = single_file_utils.convert_ldm_clip_checkpoint(state)
    else:
        raise LoadError("the checkpoint has no text encoder (no cond_stage_model weights)")
    if not hasattr(text_encoder, "text_model"):
        # transformers >= 5.6 flattened CLIPTextModel; the converters still emit the prefix.
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    text_encoder = _fill(text_encoder, converted, "text encoder", base.source, "cpu", dtype, assign=False)
    text_encoder = text_encoder.to(device=device, dtype=dtype)
    del converted, state

    step("tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(str(base.tokenizer), local_files_only=True)
    v2_bases = V2_EPS_BASES + V2_V_BASES + V2_INPAINT_BASES
    if c.version == library.V2 and not any(base.tokenizer_source.startswith(b + "/") for b in v2_bases):
        # SD 2's own tokenizer pads with "!", not with the end token as CLIP's does; a
        # tokenizer borrowed from elsewhere is made to pad as SD 2's.
        tokenizer.pad_token = "!"
    scheduler_config = dict(base.scheduler)
    prediction = c.prediction_type
    if prediction is None and c.version == library.V2 and unet.config.cross_attention_dim == 1024 \
            and unet.config.in_channels == 4:
        prediction = "v_prediction" if looks_v_prediction(unet) else "epsilon"
        log.info("{name}: no config says how it predicts; its UNet looks like {p}", name=entry.name, p=prediction)
    if prediction is not None:
        scheduler_config["prediction_type"] = prediction
    scheduler = _scheduler_from(scheduler_config)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    log.info("{name}: {version} model, built with {source}, tokenizer from {tokenizer}",
             name=entry.name, version=c.version, source=base.source, tokenizer=base.tokenizer_source)
    return pipe


# -- the cache ------------------------------------------------------------------------------


@dataclass
class Loaded:
    path: str
    name: str
    pipe: object
    scheduler_config: dict
    nbytes: int
    signature: tuple
    seconds: float


def pipeline_bytes(pipe):
    """Bytes of the weights a pipeline holds (shared tensors counted once)."""
    seen = set()
    total = 0
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            for tensor in list(component.parameters()) + list(component.buffers()):
                key = (tensor.device, tensor.data_ptr())
                if key not in seen:
                    seen.add(key)
                    total += tensor.numel() * tensor.element_size()
    return total


def _disk_signature(path):
    """Changes when the model on disk is replaced, so a stale cached copy is reloaded."""
    probes = [path]
    if os.path.isdir(path):
        probes = [os.path.join(path, "model_index.json")]
        for sub in ("unet", "vae", "text_encoder"):
            try:
                probes += sorted(e.path for e in os.scandir(os.path.join(path, sub)))
            except OSError:
                pass
    signature = []
    for probe in probes:
        try:
            st = os.stat(probe)
            signature.append((probe, st.st_size, st.st_mtime_ns))
        except OSError:
            signature.append((probe, None))
    return tuple(signature)


def estimate_bytes(path, dtype):
    """What loading ``path`` will take, from file headers and sizes, before loading it."""
    files = [path]
    if os.path.isdir(path):
        files = [str(p) for sub in ("unet", "vae", "text_encoder") for p in Path(path, sub).glob("*")
                 if p.suffix in (".safetensors", ".bin", ".ckpt")]
    total = 0
    size = torch.tensor([], dtype=dtype).element_size()
    for name in files:
        try:
            if name.endswith(".safetensors"):
                tensors, _ = checkpoint.read_safetensors_header(name)
                for info in tensors.values():
                    numel = 1
                    for d in info.shape:
                        numel *= d
                    total += numel * size
            else:
                total += os.path.getsize(name)
        except (OSError, checkpoint.CheckpointError):
            pass
    return total


class ModelLoader:
    """Loads pipelines onto one device and keeps the recently used ones loaded.

    The cache holds at most ``max_models`` pipelines and, when ``max_bytes`` is set, at
    most that many bytes of weights (the model in use always stays, even if alone it is
    larger). ``load_count`` counts loads from disk; ``loaded_paths`` is a snapshot that
    other threads may read.
    """

    def __init__(self, device, dtype, model_dir=None, max_models=1, max_bytes=None):
        self.device = device
        self.dtype = dtype
        self.model_dir = Path(os.path.realpath(model_dir)) if model_dir else None
        self.library = library.ModelLibrary(self.model_dir) if self.model_dir else None
        self.max_models = max(1, int(max_models))
        self.max_bytes = max_bytes
        self._cache = collections.OrderedDict()
        self.current = None
        self.load_count = 0
        self.loaded_paths = ()

    @property
    def used_bytes(self):
        return sum(entry.nbytes for entry in self._cache.values())

    def get(self, model_path, model_name=None):
        """The :class:`Loaded` entry of ``model_path``, from the cache or from disk.

        Raises RunaiError(MODEL_LOAD_FAILED) with a message fit for the client.
        """
        path = str(model_path)
        name = model_name or path
        signature = _disk_signature(path)
        entry = self._cache.get(path)
        if entry is not None and entry.signature == signature:
            self._cache.move_to_end(path)
            self.current = entry
            return entry
        if entry is not None:
            log.info("{name} changed on disk; loading it again", name=name)
            self._drop(path)
        self.current = None
        estimate = estimate_bytes(path, self.dtype) if self.max_bytes else 0
        self._make_room(estimate)
        started = time.monotonic()
        log.info("loading model {name}", name=name)
        pipe, cause, oom = self._try_load(path, name)
        if oom and self._cache:
            # Whatever else is cached may be what stands in the way: drop it and try again.
            log.info("out of memory loading {name}; unloading the other models and retrying", name=name)
            self.unload()
            pipe, cause, oom = self._try_load(path, name)
        if cause is not None:
            # Outside the except block, so that the traceback, and the half-loaded
            # weights its frames hold, are gone before memory is freed.
            self.free_memory()
            # The cause is the whole story for a bad model; a traceback would only add
            # diffusers' internals to the log.
            log.error("loading model {name} failed: {cause}", name=name, cause=cause)
            raise errors.RunaiError(errors.MODEL_LOAD_FAILED, f"could not load model {name!r}: {cause}")
        pipe.set_progress_bar_config(disable=True)
        self._use_fast_attention(pipe)
        entry = Loaded(
            path=path, name=name, pipe=pipe,
            # Each request builds its scheduler from this pristine copy, so a request's
            # overrides (Karras sigmas, ...) never leak into the next request's scheduler.
            scheduler_config=copy.deepcopy(dict(pipe.scheduler.config)),
            nbytes=pipeline_bytes(pipe), signature=signature, seconds=time.monotonic() - started,
        )
        self._cache[path] = entry
        self.current = entry
        self.load_count += 1
        self._trim(keep=path)
        self._publish()
        log.info("loaded model {name} in {seconds:.1f}s ({mb} MB); {n} model(s) cached",
                 name=name, seconds=entry.seconds, mb=entry.nbytes // 2**20, n=len(self._cache))
        return entry

    def _try_load(self, path, name):
        """(pipe, None, False) or (None, cause, out_of_memory)."""
        try:
            if os.path.isdir(path):
                pipe = self._load_folder(path)
            else:
                pipe = self._load_file(path, name)
        except torch.OutOfMemoryError:
            return None, "the device ran out of memory", True
        except LoadError as e:
            return None, e.message[:MAX_CAUSE_CHARS], False
        except Exception as e:
            # The server's own paths are no business of the client's.
            cause = f"{type(e).__name__}: {e}".replace(path, name)
            if self.model_dir is not None:
                cause = cause.replace(str(self.model_dir) + os.sep, "")
            return None, cause[:MAX_CAUSE_CHARS], False
        return pipe, None, False

    def _inside(self, path):
        """``path`` resolved again, here in the worker, just before it is opened: it was
        checked when the request was parsed, and a link may have been swapped in since."""
        resolved = contained(self.model_dir, path)
        if resolved is None:
            raise LoadError("it leads outside the model folder (it changed on disk since the request came in)")
        return str(resolved)

    def _load_folder(self, path):
        if self.model_dir is not None:
            path = self._inside(path)
            check_tree(self.model_dir, path)
        pipe = StableDiffusionPipeline.from_pretrained(
            path,
            local_files_only=True,
            **{DTYPE_KEYWORD: self.dtype},
            safety_checker=None,
            requires_safety_checker=False,
            # Without accelerate, diffusers warns and falls back to False anyway.
            low_cpu_mem_usage=diffusers.utils.is_accelerate_available(),
        )
        if pipe.unet.dtype != self.dtype:
            # Whatever the keyword's fate in some diffusers release, never run in
            # another precision than the one asked for.
            return pipe.to(self.device, self.dtype)
        return pipe.to(self.device)

    def _load_file(self, path, name):
        if self.library is None:
            raise LoadError("single-file models need the server's model folder (for their configs)")
        path = self._inside(path)
        entry = self.library.describe(path, name)
        return pipeline_from_single_file(path, self.model_dir, entry, self.device, self.dtype)

    def _use_fast_attention(self, pipe):
        # diffusers uses torch's SDPA (AttnProcessor2_0) by default; xformers can still
        # save memory on some CUDA setups, so use it when it is installed and works.
        if self.device.type != "cuda":
            return
        try:
            import xformers  # noqa: F401
        except ImportError:
            return
        try:
            pipe.enable_xformers_memory_efficient_attention()
            log.info("using xformers memory-efficient attention")
        except Exception:
            log.failure("xformers is installed but could not be enabled; using SDPA")

    def _make_room(self, estimate):
        dropped = False
        while self._cache and (
            len(self._cache) >= self.max_models
            or (self.max_bytes is not None and self.used_bytes + estimate > self.max_bytes)
        ):
            self._drop(next(iter(self._cache)))
            dropped = True
        if dropped:
            # Before the next model loads: two SD models at once may not fit on the GPU.
            self.free_memory()

    def _trim(self, keep):
        while self.max_bytes is not None and self.used_bytes > self.max_bytes and len(self._cache) > 1:
            oldest = next(p for p in self._cache if p != keep)
            self._drop(oldest)
            self.free_memory()

    def _drop(self, path):
        entry = self._cache.pop(path, None)
        if entry is None:
            return
        log.info("unloading model {name}", name=entry.name)
        if self.current is entry:
            self.current = None
        self._publish()

    def _publish(self):
        self.loaded_paths = tuple(self._cache)

    def unload(self, model_path=None):
        """Unload one model, or all of them, and give their memory back to the device."""
        paths = [str(model_path)] if model_path is not None else list(self._cache)
        for path in paths:
            self._drop(path)
        self.free_memory()

    def free_memory(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
