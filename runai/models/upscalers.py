# -*- test-case-name: runai.test.test_upscalers -*-
"""The upscaler files of the model folder (ESRGAN and its family), and their names.

A file is an upscaler by its keys (:mod:`runai.models.upscaler_keys`), whatever its
folder: a ``.safetensors`` header, or a static walk of a ``.pth``/``.pt``/``.ckpt``
pickle (:mod:`runai.models.pickle_walk`: nothing is unpickled here). Names are
AUTOMATIC1111's: the file name without its extension (``4x-UltraSharp``); where two
files share one, each is named by its path relative to the model folder, without the
extension. The relative path, with or without its extension, is accepted too.

Torch-free: it runs on the reactor and its thread pool. The folder is walked at most every
:data:`REFRESH_SECONDS`, and each file is read once per size and modification time. The
worker loads them (:mod:`runai.models.upscaler_load`).
"""

import os
import threading
from dataclasses import dataclass
from pathlib import Path

from runai.core import errors
from runai.models import checkpoint, pickle_walk, upscaler_keys, walk
from runai.models.paths import contained

SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt")
REFRESH_SECONDS = 10.0
MAX_NAME_CHARS = 1024
# The largest ESRGAN files are ~70 MB; a bigger pickle is a whole model, not walked here.
MAX_PICKLE_BYTES = 512 * 1024 * 1024


@dataclass(frozen=True)
class UpscalerFile:
    """One upscaler file of the model folder."""

    name: str  # as requests name it
    relative: str  # path relative to the model folder, with its extension
    path: str  # resolved
    arch: str  # spandrel's architecture id: ESRGAN, Compact
    scale: int
    size: int

    def listing(self):
        """The entry of AUTOMATIC1111's ``GET /sdapi/v1/upscalers``: the model folder's
        relative name as its path, never the server's own folders."""
        return {"name": self.name, "model_name": self.arch, "model_path": self.relative, "model_url": None,
                "scale": self.scale}


def shapes_of(path):
    """``{name: shape}`` of an upscaler file's weights (unwrapped), without loading them;
    raises CheckpointError."""
    if str(path).lower().endswith(".safetensors"):
        return checkpoint.tensor_shapes(path)[0]
    state = upscaler_keys.unwrap(pickle_walk.state_dict_of(pickle_walk.read_object(path)))
    if not isinstance(state, dict):
        return {}
    shapes = {}
    for key, value in state.items():
        shape = pickle_walk.tensor_shape(value)
        if isinstance(key, str) and shape is not None:
            shapes[key] = shape
    return shapes


def arch_of(path, size):
    """The :class:`runai.models.upscaler_keys.Arch` of the file at ``path``, or None."""
    if not str(path).lower().endswith(".safetensors") and size > MAX_PICKLE_BYTES:
        return None
    try:
        return upscaler_keys.detect(shapes_of(path))
    except Exception:  # a malformed file is not an upscaler; the library says what it is
        return None


class UpscalerIndex(walk.NamedFiles):
    """The upscaler files of one model folder; thread-safe."""

    refresh_seconds = REFRESH_SECONDS

    def __init__(self, model_dir):
        self.model_dir = Path(os.path.realpath(model_dir))
        self._lock = threading.Lock()
        self._describe = walk.ReadOnce(arch_of)  # resolved -> (Arch or None, size)
        self._files = None
        self._names = {}
        self._scanned = 0.0

    def _scan(self):
        found = []
        for path, resolved in walk.model_files(self.model_dir, SUFFIXES)[0]:
            try:
                arch, size = self._describe(resolved)
            except OSError:
                continue
            if arch is not None:
                found.append((path.relative_to(self.model_dir).as_posix(), resolved, arch, size))
        named = walk.short_names([relative for relative, *_ in found])
        entries = []
        for relative, resolved, arch, size in found:
            entries.append(UpscalerFile(name=named[relative], relative=relative, path=str(resolved), arch=arch.name,
                                        scale=arch.scale, size=size))
        entries.sort(key=lambda e: e.name)
        names = {}
        for entry in entries:
            names[os.path.splitext(entry.relative)[0]] = entry
            names[entry.relative] = entry
        for entry in entries:
            names[entry.name] = entry
        return entries, names

    def find(self, name):
        """The :class:`UpscalerFile` named ``name``, or None; raises RunaiError for a name
        that is no name at all."""
        if not isinstance(name, str) or not name or len(name) > MAX_NAME_CHARS or "\x00" in name:
            raise errors.RunaiError(errors.BAD_REQUEST, "an upscaler name must be a non-empty string of at most "
                                    f"{MAX_NAME_CHARS} characters")
        return self._named(name)


# index(model_dir): the :class:`UpscalerIndex` of that folder, one per folder for the process.
index = walk.PerFolder(UpscalerIndex)


def find(model_dir, name, builtins=()):
    """The :class:`UpscalerFile` of the model upscaler ``name``; raises RunaiError
    (``bad_request``) naming the known ones (``builtins`` first) when there is none."""
    found = index(model_dir).find(name)
    if found is not None:
        return found
    known = list(builtins) + [entry.name for entry in index(model_dir).files()]
    shown = ", ".join(known[:40]) + (", ..." if len(known) > 40 else "")
    try:
        outside = contained(Path(os.path.realpath(model_dir)), Path(os.path.realpath(model_dir)) / name) is None
    except (OSError, ValueError):
        outside = False
    if outside:
        raise errors.RunaiError(errors.PATH_OUTSIDE_MODEL_DIR, f"upscaler {name[:64]!r} is outside the model folder")
    raise errors.RunaiError(errors.BAD_REQUEST, f"unknown upscaler {name[:64]!r}; known: {shown}")


def listing(model_dir, refresh=False):
    """The model upscalers as AUTOMATIC1111's ``GET /sdapi/v1/upscalers`` lists them."""
    return [entry.listing() for entry in index(model_dir).files(refresh=refresh)]
