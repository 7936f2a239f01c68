# -*- test-case-name: runai.test.test_cache,runai.test.test_cache_companions,runai.test.test_engine_xl -*-
"""Loading Stable Diffusion pipelines, offline, and keeping the recent ones loaded.

Worker thread only (imports torch and diffusers).

* A diffusers folder loads with ``from_pretrained`` from local files only, once every
  file in it is known to lie inside the model folder (:func:`runai.models.paths.check_tree`),
  as the pipeline its family says (:mod:`runai.families`). Refiners are refused: they
  cannot generate alone.
* A ``.safetensors`` or ``.ckpt`` file is described by the server's
  :class:`runai.models.library.ModelLibrary` and assembled by its family.
* :class:`ModelLoader` keeps the most recently used pipelines in an LRU cache bounded in
  models or in bytes, so switching back to a model costs nothing.
"""

from runai.models import offline  # before diffusers and transformers

import collections
import copy
import gc
import importlib
import itertools
import os
import time
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
from twisted.logger import Logger

from runai import families
from runai.core import errors
from runai.models import loadlock, sources
from runai.models.classify import REFINER, REFINER_REFUSAL, classify_diffusers
from runai.models.errors import MAX_CAUSE_CHARS, LoadError
from runai.models.footprint import disk_signature, estimate_bytes, pipeline_bytes
from runai.models.paths import check_tree, contained
from runai.models.singlefile import pipeline_from_single_file

del offline  # imported for what importing it does

log = Logger()


def _dtype_keyword():
    """``dtype`` where diffusers has it, else the older ``torch_dtype``.

    Newer diffusers deprecate ``torch_dtype`` (with a warning on every load); older ones
    silently ignore ``dtype``, which would load float32 onto the GPU.
    """
    try:
        deprecation_utils = importlib.import_module("diffusers.utils.deprecation_utils")
    except ImportError:
        return "torch_dtype"
    return "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"


DTYPE_KEYWORD = _dtype_keyword()


@dataclass
class Loaded:
    path: str
    name: str
    pipe: object
    scheduler_config: dict
    nbytes: int
    signature: tuple
    seconds: float
    modules: tuple = ()  # the companion files it was built with, as the client chose them
    sources: tuple = ()  # the stats of every other file it was built from (runai.models.sources)
    dtype: object = None  # the precision it runs in (a family may need another than the default)
    loras: object = None  # the LoRAs merged into its weights (runai.models.lora_apply.Merged)



# Bytes: torch's CPU kernels choose their path by where a weight starts, and weights that
# diffusers reads straight from a folder's safetensors mapping start at the file's offsets.
WEIGHT_ALIGNMENT = 64


def align_weights(pipe):
    """Give every weight of ``pipe`` that starts off a 64-byte boundary memory of its own,
    so that a model computes the same pixels on the CPU whether it came from a folder or a
    single file (torch 2.14's kernels differ in the last bits between the two)."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            for tensor in itertools.chain(component.parameters(), component.buffers()):
                if tensor.data_ptr() % WEIGHT_ALIGNMENT:
                    tensor.data = tensor.data.clone(memory_format=torch.preserve_format)


TEXT_ENCODER_PLACES = ("device", "cpu")


def vae_decode_dtype(vae, dtype):
    """The precision a pipeline of ``dtype`` decodes in with ``vae``.

    SDXL's original VAE overflows in float16 (black or NaN images): its config says
    ``force_upcast``, and the SDXL pipelines then decode in float32. The fp16-fixed VAE
    (``madebyollin/sdxl-vae-fp16-fix``) says ``force_upcast: false`` and decodes in float16.
    bfloat16 has float32's range: nothing to upcast.
    """
    if dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        return torch.float32
    return dtype


class ModelLoader:
    """Loads pipelines onto one device and keeps the recently used ones loaded.

    The cache holds at most ``max_models`` pipelines and, when ``max_bytes`` is set, at
    most that many bytes of weights (the model in use always stays, even if alone it is
    larger). ``load_count`` counts loads from disk; ``loaded_paths`` is a snapshot that
    other threads may read, and ``loaded_bytes`` the bytes of their weights.
    """

    # Told the seconds of each load from disk, in the loading thread (--metrics); None: nobody.
    load_observer = None
    loaded_bytes = 0

    def __init__(self, device, dtype, library=None, max_models=1, max_bytes=None, dtype_auto=False,
                 text_encoders="device"):
        self.device = device
        self.dtype = dtype
        # "auto" lets each family pick its precision on a GPU (bfloat16 for the flow families).
        self.dtype_auto = dtype_auto
        # "cpu": text encoders stay in the computer's memory and encode prompts there.
        if text_encoders not in TEXT_ENCODER_PLACES:
            raise ValueError(f"text_encoders must be one of {TEXT_ENCODER_PLACES}, not {text_encoders!r}")
        self.text_encoders = text_encoders
        # The server's one ModelLibrary: it says what a single file is, and its folder is
        # where single files find their base configs and what every model must lie inside.
        self.library = library
        self.model_dir = library.model_dir if library is not None else None
        self.max_models = max(1, int(max_models))
        self.max_bytes = max_bytes
        self._cache = collections.OrderedDict()
        self.current = None
        self.load_count = 0
        self.loaded_paths = ()
        self.loras = None  # LoRA files read (runai.models.lora_files.LoraStore): in the budget too

    @property
    def used_bytes(self):
        loras = self.loras.nbytes if self.loras is not None else 0
        return sum(entry.nbytes for entry in self._cache.values()) + loras

    def get(self, model_path, model_name=None, modules=()):
        """The :class:`Loaded` entry of ``model_path``, from the cache or from disk.

        ``modules``: the resolved companion files a client chose (a VAE, text encoders)
        for a model file that needs them; () lets the family find them.
        Raises RunaiError(MODEL_LOAD_FAILED) with a message fit for the client.
        """
        path = str(model_path)
        name = model_name or path
        modules = tuple(str(m) for m in modules)
        signature = disk_signature(path)
        entry = self._cache.get(path)
        stale = entry is not None and self._stale(entry, signature, modules)
        if entry is not None and not stale:
            self._cache.move_to_end(path)
            self.current = entry
            return entry
        if entry is not None:
            log.info("model {name}: {why}; loading it again", name=name, why=stale)
            self._drop(path)
        self.current = None
        dtype = self.dtype_of(path)
        estimate = estimate_bytes(path, dtype) if self.max_bytes else 0
        self._make_room(estimate)
        started = time.monotonic()
        log.info("loading model {name}", name=name)
        with sources.recording() as used:  # the other files it is built from: companions, configs
            pipe, cause, oom = self._try_load(path, name, dtype, modules)
            if oom and self._cache:
                # Whatever else is cached may be what stands in the way: drop it and try again.
                log.info("out of memory loading {name}; unloading the other models and retrying", name=name)
                self.unload()
                pipe, cause, oom = self._try_load(path, name, dtype, modules)
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
        family = families.for_pipeline(pipe)
        family.after_load(pipe, name, dtype)
        if self.text_encoders == "cpu":
            family.place_text_encoders(pipe, torch.device("cpu"))
            log.info("{name}: the text encoders stay on the CPU", name=name)
        entry = Loaded(
            path=path, name=name, pipe=pipe,
            # Each request builds its scheduler from this pristine copy, so a request's
            # overrides (Karras sigmas, ...) never leak into the next request's scheduler.
            scheduler_config=copy.deepcopy(dict(pipe.scheduler.config)),
            nbytes=pipeline_bytes(pipe), signature=signature, seconds=time.monotonic() - started,
            modules=modules, dtype=dtype, sources=tuple(used),
        )
        self._cache[path] = entry
        self.current = entry
        self.load_count += 1
        if self.load_observer is not None:
            self.load_observer(entry.seconds)  # --metrics (runai.ops.metrics)
        self._trim(keep=path)
        self._publish()
        log.info("loaded model {name} in {seconds:.1f}s ({mb} MB); {n} model(s) cached",
                 name=name, seconds=entry.seconds, mb=entry.nbytes // 2**20, n=len(self._cache))
        return entry

    def _stale(self, entry, signature, modules):
        """Why the cached ``entry`` is not the model on disk any more, or None: from
        ``os.stat`` alone (its own files, and the companions and configs it was built from)."""
        if entry.modules != modules:
            return "the client chose other companion files"
        changed = sources.first_difference(entry.signature, signature) or sources.changed(entry.sources)
        if changed is None:
            return None
        resolved = Path(os.path.realpath(changed))
        root = Path(os.path.realpath(self.model_dir)) if self.model_dir is not None else None
        inside = root is not None and resolved.is_relative_to(root)
        shown = resolved.relative_to(root).as_posix() if inside else resolved.name
        return f"its file {shown} changed on disk"

    def dtype_of(self, path):
        """The precision ``path`` runs in: the loader's, unless ``--dtype auto`` lets the
        model's family choose (bfloat16 on a GPU for the flow families: float16 overflows
        in T5)."""
        if not self.dtype_auto:
            return self.dtype
        try:
            if os.path.isdir(path):
                inside = self.model_dir if self.model_dir is not None else Path(os.path.realpath(path))
                version = classify_diffusers(path, inside).version
            elif self.library is not None:
                version = self.library.describe(path).version
            else:
                return self.dtype
        except (OSError, ValueError):
            return self.dtype
        family = families.for_version(version)
        return family.auto_dtype(self.dtype, self.device) if family is not None else self.dtype

    def _try_load(self, path, name, dtype, modules=()):
        """(pipe, None, False) or (None, cause, out_of_memory)."""
        def load():
            if os.path.isdir(path):
                pipe = self._load_folder(path, dtype)
            else:
                pipe = self._load_file(path, name, dtype, modules)
            if self.device.type == "cpu":
                align_weights(pipe)
            return pipe

        try:
            # One load at a time in the process (diffusers and transformers patch torch
            # process-wide while they load), and one read from disk for loaders that want
            # the same model at once: runai.models.loadlock.
            key = (path, disk_signature(path), str(self.model_dir), dtype, modules)
            pipe = loadlock.load_once(key, self.device, load, name)
        except torch.OutOfMemoryError:
            return None, "the device ran out of memory", True
        except LoadError as e:
            return None, e.message[:MAX_CAUSE_CHARS], False
        except Exception as e:
            # The server's own paths are no business of the client's.
            cause = errors.scrub(f"{type(e).__name__}: {e}", self.model_dir, names=((path, name),))
            return None, cause[:MAX_CAUSE_CHARS], False
        return pipe, None, False

    def _inside(self, path):
        """``path`` resolved again, here in the worker, just before it is opened: it was
        checked when the request was parsed, and a link may have been swapped in since."""
        resolved = contained(self.model_dir, path)
        if resolved is None:
            raise LoadError("it leads outside the model folder (it changed on disk since the request came in)")
        return str(resolved)

    def _load_folder(self, path, dtype):
        if self.model_dir is not None:
            path = self._inside(path)
            check_tree(self.model_dir, path)
        inside = self.model_dir if self.model_dir is not None else Path(os.path.realpath(path))
        c = classify_diffusers(path, inside)
        if c.kind == REFINER:
            raise LoadError(REFINER_REFUSAL)
        family = families.for_version(c.version) or families.for_version("v1")
        cls, options = family.folder_pipeline(c)
        pipe = cls.from_pretrained(
            path,
            local_files_only=True,
            **{DTYPE_KEYWORD: dtype},
            **options,
            # Without accelerate, diffusers warns and falls back to False anyway.
            low_cpu_mem_usage=diffusers.utils.is_accelerate_available(),
        )
        if family.denoiser(pipe).dtype != dtype:
            # Whatever the keyword's fate in some diffusers release, never run in
            # another precision than the one asked for.
            pipe = pipe.to(dtype=dtype)
        return self._place(family, pipe)

    def _place(self, family, pipe):
        """``pipe`` on the device; its text encoders too, unless they stay on the CPU."""
        if self.text_encoders == "device":
            return pipe.to(self.device)
        for name, component in pipe.components.items():
            if isinstance(component, torch.nn.Module) and name not in family.text_encoder_names:
                component.to(self.device)
        return pipe

    def _load_file(self, path, name, dtype, modules=()):
        if self.library is None:
            raise LoadError("single-file models need the server's model folder (for their configs)")
        path = self._inside(path)
        entry = self.library.describe(path, name)
        if entry.classification.kind == REFINER:
            raise LoadError(REFINER_REFUSAL)
        return pipeline_from_single_file(path, self.model_dir, entry, self.device, dtype, modules=modules)

    def _use_fast_attention(self, pipe):
        # diffusers uses torch's SDPA (AttnProcessor2_0) by default; xformers can still
        # save memory on some CUDA setups, so use it when it is installed and works.
        if self.device.type != "cuda":
            return
        try:
            importlib.import_module("xformers")
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
        self.loaded_bytes = sum(entry.nbytes for entry in self._cache.values())

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
