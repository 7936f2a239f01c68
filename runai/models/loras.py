# -*- test-case-name: runai.test.test_loras -*-
"""The LoRA files of the model folder, and the names prompts use for them.

A prompt says ``<lora:name:0.8>``; :func:`resolve` finds ``name`` among the LoRA files of
the model folder (any ``.safetensors``, ``.pt`` or ``.ckpt`` whose keys are a LoRA's, see
:mod:`runai.models.lora_keys`) and answers a :class:`LoraRef` with the file's resolved
path. Names are A1111's: the file name without its extension; where two files share one,
each is named by its path relative to the model folder, without the extension. The
relative path, with or without its extension, is accepted too, and so is the name the
trainer wrote in the metadata (``ss_output_name``, A1111's alias) where no file has it.

Torch-free: it runs on the reactor. The folder is walked at most every
:data:`REFRESH_SECONDS` (or on :func:`refresh`), and each file's header is read once per
size and modification time. Nothing outside the model folder is opened: a symlink is
followed only to a place inside it, and names are looked up, never joined to a path.
"""

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from twisted.logger import Logger

from runai.core import errors
from runai.models import checkpoint, lora_keys, walk
from runai.models.classify import UNKNOWN
from runai.models.paths import contained

log = Logger()

SUFFIXES = (".safetensors", ".pt", ".ckpt")
REFRESH_SECONDS = 10.0
MAX_NAME_CHARS = 1024
# A .pt/.ckpt LoRA is small; a bigger pickle is a whole model, whose pickle is not walked.
MAX_PICKLE_BYTES = 512 * 1024 * 1024
# A1111 answers the whole safetensors metadata; kohya's holds tag frequencies that can
# run to megabytes. A listing keeps at most this much of it: short values, few keys.
MAX_METADATA_KEYS = 64
MAX_METADATA_VALUE = 4096
MAX_METADATA_TOTAL = 64 * 1024


@dataclass(frozen=True)
class LoraRef:
    """One LoRA a job applies: its name, its file (resolved, inside the model folder), and
    its weights on the text encoders and on the denoiser."""

    name: str
    path: str
    te: float = 1.0
    unet: float = 1.0


@dataclass(frozen=True)
class LoraFile:
    """One LoRA file of the model folder, as a listing tells it."""

    name: str  # as prompts name it
    alias: str  # the trainer's name for it (ss_output_name), else the name
    relative: str  # path relative to the model folder, with its extension
    path: str  # resolved
    size: int
    family: str = UNKNOWN  # what it was trained for, as far as its keys and metadata say
    metadata: dict = field(default_factory=dict, compare=False)  # bounded

    def listing(self):
        """The entry of A1111's ``GET /sdapi/v1/loras``."""
        return {"name": self.name, "alias": self.alias, "path": self.relative, "metadata": dict(self.metadata)}


def bounded_metadata(metadata):
    """A slice of safetensors metadata small enough to list: values over
    :data:`MAX_METADATA_VALUE` characters are left out (never cut: many are JSON)."""
    kept, total = {}, 0
    for key in sorted(metadata):
        value = str(metadata[key])
        if len(kept) >= MAX_METADATA_KEYS or len(value) > MAX_METADATA_VALUE or total + len(value) > MAX_METADATA_TOTAL:
            continue
        kept[str(key)[:200]] = value
        total += len(value)
    return kept


def _read_lora(resolved, size):
    """``(is a LoRA, family, metadata)`` of a file of ``size`` bytes, from its header (or
    its pickle's static walk)."""
    try:
        if resolved.suffix.lower() != ".safetensors" and size > MAX_PICKLE_BYTES:
            raise ValueError("a whole model, not a LoRA")  # its pickle is not walked on the reactor
        shapes, metadata = checkpoint.tensor_shapes(resolved)
    except Exception:
        return (False, UNKNOWN, {})
    lora = lora_keys.is_lora(shapes)
    family = lora_keys.family_of(shapes, metadata) if lora else UNKNOWN
    return (lora, family, bounded_metadata(metadata) if lora else {})


class LoraIndex(walk.NamedFiles):
    """The LoRA files of one model folder; thread-safe."""

    refresh_seconds = REFRESH_SECONDS

    def __init__(self, model_dir):
        self.model_dir = Path(os.path.realpath(model_dir))
        self._lock = threading.Lock()
        self._describe = walk.ReadOnce(_read_lora)  # resolved -> ((is a LoRA, family, metadata), size)
        self._files = None
        self._names = {}
        self._scanned = 0.0

    # -- the walk -------------------------------------------------------------------------

    def _walk(self):
        # The same bounded walk as the embeddings' (runai.models.walk).
        return walk.model_files(self.model_dir, SUFFIXES)[0]

    def _scan(self):
        files = []
        for path, resolved in self._walk():
            try:
                (lora, family, metadata), size = self._describe(resolved)
            except OSError:
                continue
            if lora:
                relative = path.relative_to(self.model_dir).as_posix()
                files.append((relative, resolved, size, family, metadata))
        named = walk.short_names([relative for relative, *_ in files])
        entries = []
        for relative, resolved, size, family, metadata in files:
            name = named[relative]
            alias = str(metadata.get("ss_output_name") or name)[:MAX_NAME_CHARS]
            entries.append(LoraFile(name=name, alias=alias, relative=relative, path=str(resolved), size=size,
                                    family=family, metadata=metadata))
        entries.sort(key=lambda e: e.name)
        names = {}
        for entry in entries:  # the weakest first: a stronger name overwrites
            names.setdefault(entry.alias, entry)
        for entry in entries:
            names[os.path.splitext(entry.relative)[0]] = entry
            names[entry.relative] = entry
        for entry in entries:
            names[entry.name] = entry
        for entry in entries:  # a shared file name: a list of the names to choose from
            if entry.name != Path(entry.relative).stem:
                names.setdefault(Path(entry.relative).stem, [])
                if isinstance(names[Path(entry.relative).stem], list):
                    names[Path(entry.relative).stem].append(entry.name)
        return entries, names

    # -- what callers use -----------------------------------------------------------------

    def find(self, name):
        """The :class:`LoraFile` a prompt's ``name`` stands for; raises RunaiError."""
        if not isinstance(name, str) or not name or len(name) > MAX_NAME_CHARS or "\x00" in name:
            raise errors.RunaiError(errors.BAD_REQUEST, "a LoRA name must be a non-empty string of at most "
                                    f"{MAX_NAME_CHARS} characters")
        entry = self._named(name)  # a file added since the last walk is found at once
        if isinstance(entry, list):
            raise errors.RunaiError(errors.MODEL_NOT_FOUND, f"several LoRA files are named {name!r}; name one by its "
                                    f"path: {', '.join(entry[:5])}")
        if entry is not None:
            return entry
        try:
            outside = contained(self.model_dir, self.model_dir / name) is None
        except (OSError, ValueError):
            outside = False
        if outside:
            raise errors.RunaiError(errors.PATH_OUTSIDE_MODEL_DIR,
                                    f"LoRA {name!r} is outside the server's model folder")
        raise errors.RunaiError(errors.MODEL_NOT_FOUND, f"no LoRA named {name!r} in the model folder")


# index(model_dir): the :class:`LoraIndex` of that folder, one per folder for the process.
index = walk.PerFolder(LoraIndex)


def _weight(value, what, name):
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise errors.RunaiError(errors.BAD_REQUEST, f"the {what} weight of LoRA {name!r} is not a number")
    if number != number or abs(number) > 100.0:
        raise errors.RunaiError(errors.OUT_OF_RANGE, f"the {what} weight of LoRA {name!r} must be within -100 and 100")
    return number


def resolve(model_dir, networks):
    """A :class:`LoraRef` for each of ``networks`` (objects with ``.name``, ``.te``,
    ``.unet``), its file found in ``model_dir``; raises RunaiError (``model_not_found``
    for an unknown name, ``path_outside_model_dir`` for one that leads out)."""
    found = index(model_dir)
    refs = []
    for network in networks:
        entry = found.find(network.name)
        refs.append(LoraRef(name=network.name, path=entry.path, te=_weight(network.te, "text encoder", network.name),
                            unet=_weight(network.unet, "denoiser", network.name)))
    return tuple(refs)


def listing(model_dir, refresh=False):
    """The LoRA files of ``model_dir`` as A1111's ``GET /sdapi/v1/loras`` lists them."""
    return [entry.listing() for entry in index(model_dir).files(refresh=refresh)]


def files(model_dir):
    """The :class:`LoraFile` of every LoRA in ``model_dir``, sorted by name."""
    return list(index(model_dir).files())


def refresh(model_dir):
    """Walk the model folder again now (A1111's ``POST /sdapi/v1/refresh-loras``)."""
    index(model_dir).files(refresh=True)


def relative_name(model_dir, path):
    """``path`` (resolved, inside ``model_dir``) relative to the model folder: how a LoRA
    travels to a worker, which finds it in its own folder with :func:`resolve`."""
    return Path(path).relative_to(Path(os.path.realpath(model_dir))).as_posix()
