# -*- test-case-name: runai.test.test_library,runai.test.test_library_pth -*-
"""The model library: what is in the model folder, and what each model is.

Torch-free, so that the reactor can answer a ``models`` request without waiting for the
worker. A :class:`ModelLibrary` walks one model folder and describes each model it finds
as a :class:`ModelEntry`, classified by content (:mod:`runai.models.classify`), in the
folder's one walk (:mod:`runai.models.walk`). Upscaler ``.pth`` files (ESRGAN and its
family, :mod:`runai.models.upscalers`) are listed too, with kind "upscaler", never served;
any other ``.pth`` is not listed. The classifications are cached, so a listing costs one
``stat`` per known file. The loader asks the same library what a single file is before
it builds a pipeline from it.

Nothing outside the model folder is opened: every path is resolved, symlinks included,
and checked for containment before it is read.
"""

import os
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path

from twisted.logger import Logger

from runai import families
from runai.core import errors
from runai.models import checkpoint, upscalers, walk
from runai.models.classify import (
    UNKNOWN,
    Classification,
    apply_sidecar,
    classify_diffusers,
    classify_state,
    folder_hint,
    read_sidecar,
    sidecar_path,
)
from runai.models.paths import DIFFUSERS, FILE_FORMATS, model_format

log = Logger()

# Upscalers (ESRGAN and its family) saved as pickles: listed, never models.
PTH = "pth"
UPSCALER_SUFFIXES = (".pth",)
SCANNED_SUFFIXES = tuple(FILE_FORMATS) + UPSCALER_SUFFIXES


@dataclass(frozen=True)
class ModelEntry:
    """One model in the folder, as a listing tells it (each front door in its own format)."""

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
    def is_companion(self):
        """A file that completes another model (a VAE, a text encoder), not one to serve."""
        return self.format != DIFFUSERS and not self.error and self.classification.kind in ("vae", "text_encoder")

    @property
    def served(self):
        c = self.classification
        family = families.for_version(c.version)
        if self.error or c.kind != "pipeline" or family is None or not family.serves(c):
            return False
        if self.format != DIFFUSERS:
            return family.single_files
        return c.pipeline_class in family.pipeline_classes


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
        return self._remember(key, entry)

    def _remember(self, key, entry):
        with self._lock:
            if len(self._cache) > 4096:
                self._cache.clear()
            self._cache[key] = entry
        return entry

    def _failed(self, path, name, fmt, e):
        log.failure("cannot classify {name}", name=name)
        # The server's own paths are no business of a client's.
        cause = errors.scrub(f"{type(e).__name__}: {e}", self.model_dir, names=((path, name),))
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
                classification = apply_sidecar(classification, said)
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
        """Every model in the folder, and every upscaler ``.pth`` file, sorted by name."""
        entries = []
        for path, resolved in walk.model_files(self.model_dir, SCANNED_SUFFIXES, diffusers=True)[0]:
            if path.suffix.lower() in UPSCALER_SUFFIXES and not resolved.is_dir():
                entry = self._upscaler(str(resolved), path.relative_to(self.model_dir).as_posix())
            else:
                entry = self._entry(path, resolved)
            if entry is not None:
                entries.append(entry)
        entries.sort(key=lambda e: e.name)
        return entries

    def _upscaler(self, path, name):
        """The entry of an upscaler ``.pth`` (never served: a pickle is never a checkpoint
        here), or None for any other ``.pth``; read by a static walk, never unpickled."""
        try:
            key = _signature(path, PTH)
            with self._lock:
                if key in self._cache:
                    cached = self._cache[key]
                    return replace(cached, name=name) if cached is not None and cached.name != name else cached
            size = os.path.getsize(path)
        except OSError:
            return None
        arch = upscalers.arch_of(path, size)
        return self._remember(key, None if arch is None else ModelEntry(
            name=name, path=path, format=PTH, size=size,
            classification=Classification(kind="upscaler", variant=arch.name)))

    def _entry(self, path, resolved):
        name = path.relative_to(self.model_dir).as_posix()
        try:
            return self.describe(resolved, name)
        except (OSError, ValueError):
            return None  # gone since the folder was read, or not a model after all
        except Exception as e:
            # describe() turns a failed classification into an entry with its error;
            # whatever is left must still not cost the client the rest of the list.
            fmt = FILE_FORMATS.get(path.suffix.lower(), DIFFUSERS)
            return self._failed(str(resolved), name, fmt, e)
