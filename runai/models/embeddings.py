# -*- test-case-name: runai.test.test_embeddings -*-
"""Textual-inversion embeddings: the files of the model folder, their names, and which
model takes which.

An embedding is a few learned word vectors in a file, used by its name anywhere in a
prompt (A1111's way: the file name without its extension; where two files share one, the
path relative to the model folder without it). The formats:

- A1111 ``.pt``: ``{"string_to_param": {"*": tensor}, "name", "step", "sd_checkpoint",
  "sd_checkpoint_name"}`` (torch 1.11's ``ParameterDict`` too). A ``.pt`` is a pickle: it
  is read statically for the listing (:mod:`runai.models.pickle_walk`) and loaded only
  through runai's restricted unpickler (:func:`runai.models.checkpoint.load_object`),
  never a plain ``torch.load``.
- ``.safetensors`` with one ``emb_params`` tensor (kohya), diffusers' single-key files
  (``{"<token>": tensor}``, ``.bin`` or ``.safetensors``), and pairs for two CLIP encoders
  (``clip_l``, ``clip_g``: SDXL's, which SD3's encoders take too).

A model takes an embedding whose width is its text encoder's (a pair: both widths); any
other is skipped, logged once and listed as ``skipped``, and its name stays a word.

Torch-free but for :func:`load`, which the worker calls: the reactor resolves the names a
prompt uses (:func:`resolve`) and lists the files. The folder is walked again when one of
its folders changes or every :data:`REFRESH_SECONDS`; each file is read once per size and
modification time. Nothing outside the model folder is opened.
"""

import hashlib
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from twisted.logger import Logger

from runai.core import prompts
from runai.models import checkpoint, pickle_walk, walk
from runai.models.classify import SD3, SDXL, V1, V2
from runai.models.paths import read_json

log = Logger()

SUFFIXES = (".pt", ".bin", ".safetensors")
MAX_FILE_BYTES = 16 * 1024 * 1024  # 75 vectors of 2048 floats are 600 KB
MAX_VECTORS = 75  # one chunk
REFRESH_SECONDS = 10.0
PAIR = ("clip_l", "clip_g")
# The widths of the encoders that take embeddings, for model files (a folder says its own).
WIDTHS = {V1: (768,), V2: (1024,), SDXL: (768, 1280), SD3: (768, 1280)}


@dataclass(frozen=True)
class EmbeddingFile:
    """One embedding file, as its header says (no tensor is read)."""

    name: str  # as prompts name it
    relative: str  # relative to the model folder, with its extension
    path: str  # resolved
    size: int
    vectors: int
    widths: tuple  # per set of vectors: (768,), or (768, 1280) for a clip_l, clip_g pair
    keys: tuple = ()  # () for one set, PAIR for a pair
    step: object = None
    sd_checkpoint: object = None
    sd_checkpoint_name: object = None

    def listing(self):
        """An entry of A1111's ``GET /sdapi/v1/embeddings``."""
        return {"step": self.step, "sd_checkpoint": self.sd_checkpoint, "sd_checkpoint_name": self.sd_checkpoint_name,
                "shape": sum(self.widths), "vectors": self.vectors}


@dataclass(frozen=True)
class EmbeddingRef:
    """An embedding a job uses: its name and its file (resolved, inside the model folder)."""

    name: str
    path: str


def vector_sets(data, shape_of, parameters_of):
    """``{key: value}`` of the vectors in a file's top-level mapping (key None for one set,
    ``clip_l``/``clip_g`` for a pair); None where it is no embedding. ``shape_of(value)``:
    a tensor's shape, else None; ``parameters_of(value)``: a ParameterDict's mapping."""
    if not isinstance(data, dict) or not data:
        return None
    if "string_to_param" in data:
        params = data["string_to_param"]
        params = params if isinstance(params, dict) else parameters_of(params)
        if not isinstance(params, dict) or len(params) != 1:
            return None
        sets = {None: next(iter(params.values()))}
    elif "clip_l" in data and "clip_g" in data:
        sets = {key: data[key] for key in PAIR}
    elif len(data) == 1:
        sets = {None: next(iter(data.values()))}
    else:
        return None
    shapes = [shape_of(value) for value in sets.values()]
    if any(s is None or not 1 <= len(s) <= 2 or 0 in s for s in shapes):
        return None
    rows = {1 if len(s) == 1 else s[0] for s in shapes}
    return sets if len(rows) == 1 and next(iter(rows)) <= MAX_VECTORS else None


def _walked_parameters(value):
    state = pickle_walk.opaque_state(value)
    return state.get("_parameters") if isinstance(state, dict) else None


def _shape(shape):
    return (1,) + tuple(shape) if len(shape) == 1 else tuple(shape)


def describe(path):
    """``(vectors, widths, keys, step, sd_checkpoint, sd_checkpoint_name)`` of an embedding
    file, from its header or a static walk of its pickle; None for any other file."""
    if str(path).lower().endswith(".safetensors"):
        tensors, _ = checkpoint.read_safetensors_header(path)
        data, shape_of, extra = tensors, (lambda v: v.shape), {}
    else:
        data = pickle_walk.read_object(path)
        shape_of, extra = pickle_walk.tensor_shape, data if isinstance(data, dict) else {}
    sets = vector_sets(data, shape_of, _walked_parameters)
    if sets is None:
        return None
    shapes = [_shape(shape_of(v)) for v in sets.values()]
    text = [extra.get(k) if isinstance(extra.get(k), str) else None for k in ("sd_checkpoint", "sd_checkpoint_name")]
    step = extra.get("step") if isinstance(extra.get("step"), int) and not isinstance(extra.get("step"), bool) else None
    keys = () if None in sets else PAIR
    return (shapes[0][0], tuple(s[1] for s in shapes), keys, step, *text)


def fits(file, widths):
    """Whether a model whose encoders take ``widths`` (:func:`expected_widths`) takes ``file``."""
    if not widths:
        return False
    return file.widths == tuple(widths) and file.keys == (() if len(widths) == 1 else PAIR)


def expected_widths(model_path, model_dir, family, classification):
    """The widths of the model's encoders that take embeddings (their ``config.json`` in a
    folder, else the family's released widths); None where it takes none."""
    encoders = getattr(family, "embedding_encoders", ())
    if not encoders:
        return None
    path = Path(model_path)
    if path.is_dir():
        widths = [(read_json(model_dir, path / name / "config.json") or {}).get("hidden_size")
                  for name, _ in encoders]
        if all(isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in widths):
            return tuple(widths)
    widths = WIDTHS.get(getattr(classification, "version", None))
    return widths if widths and len(widths) == len(encoders) else None


def _read_embedding(resolved, size):
    """:func:`describe`'s answer for a file of ``size`` bytes, or None: not an embedding
    that can be read (a model's file, often)."""
    if not 0 < size <= MAX_FILE_BYTES:
        return None
    try:
        return describe(resolved)
    except Exception:
        return None


class EmbeddingIndex:
    """The embedding files of one model folder; thread-safe."""

    def __init__(self, model_dir):
        self.model_dir = Path(os.path.realpath(model_dir))
        self._lock = threading.Lock()
        self._describe = walk.ReadOnce(_read_embedding)  # resolved -> (describe()'s answer or None, size)
        self._files, self._folders, self._scanned = None, {}, 0.0
        self._lookups = {}  # widths -> prompts.name_index of the files that fit
        self._reported = set()

    def _scan(self):
        found, folders = walk.model_files(self.model_dir, SUFFIXES)
        files = []
        for path, resolved in found:
            try:
                info, size = self._describe(resolved)
            except OSError:
                continue
            if info is not None:
                files.append((path.relative_to(self.model_dir).as_posix(), str(resolved), size, info))
        named = walk.short_names([relative for relative, *_ in files])
        entries = []
        for relative, resolved, size, info in files:
            name = named[relative]
            vectors, widths, keys, step, sd_checkpoint, sd_checkpoint_name = info
            entries.append(EmbeddingFile(name=name, relative=relative, path=resolved, size=size, vectors=vectors,
                                         widths=widths, keys=keys, step=step, sd_checkpoint=sd_checkpoint,
                                         sd_checkpoint_name=sd_checkpoint_name))
        entries.sort(key=lambda e: e.name)
        return entries, folders

    def files(self, refresh=False):
        """Every embedding file, sorted by name; walked again when a folder changed, after
        :data:`REFRESH_SECONDS`, or when ``refresh``."""
        with self._lock:
            files, folders, scanned = self._files, self._folders, self._scanned
        if (files is not None and not refresh and time.monotonic() - scanned < REFRESH_SECONDS
                and not walk.changed(folders)):
            return files
        files, folders = self._scan()
        with self._lock:
            self._files, self._folders, self._scanned = files, folders, time.monotonic()
            self._lookups = {}
        return files

    def lookup(self, widths):
        """``(taken, others)`` for a model whose encoders take ``widths``: each a
        ``({name: EmbeddingFile}, name index)`` of the files it takes, and of the rest."""
        files = self.files()
        with self._lock:
            if widths in self._lookups:
                return self._lookups[widths]
        taken = {f.name: f for f in files if fits(f, widths)}
        others = {f.name: f for f in files if f.name not in taken}
        found = ((taken, prompts.name_index(taken)), (others, prompts.name_index(others)))
        with self._lock:
            self._lookups[widths] = found
        return found

    def report_skipped(self, file, widths, model_name):
        """Log, once per file and model width, that a model does not take ``file``."""
        key = (file.path, widths)
        with self._lock:
            if key in self._reported:
                return
            if len(self._reported) > 4096:
                self._reported.clear()
            self._reported.add(key)
        log.warn("embedding {name} ({shape} wide) does not fit {model} ({widths}): skipped", name=file.name,
                 shape="+".join(map(str, file.widths)), model=model_name,
                 widths="+".join(map(str, widths)) if widths else "it takes no embeddings")


# index(model_dir): the :class:`EmbeddingIndex` of that folder, one per folder for the process.
index = walk.PerFolder(EmbeddingIndex)


def resolve(model_dir, model_path, family, classification, parsed, model_name=""):
    """The :class:`EmbeddingRef` of each embedding the :class:`runai.core.prompts.Prompt`
    ``parsed`` use (in order, each once) that the model takes; names of embeddings it does
    not take stay words (and are logged once)."""
    widths = expected_widths(model_path, model_dir, family, classification)
    if not widths:
        return ()
    found = index(model_dir)
    (taken, lookup), (others, others_lookup) = found.lookup(widths)
    used = []
    for prompt in parsed:
        used += [name for name in prompts.names_in(prompt, lookup) if name not in used]
        for name in prompts.names_in(prompt, others_lookup):
            found.report_skipped(others[name], widths, model_name)
    return tuple(EmbeddingRef(name=name, path=taken[name].path) for name in used)


def by_names(model_dir, names):
    """The :class:`EmbeddingRef` of each of ``names`` found in ``model_dir`` (a worker's own
    folder, for a job that came through the broker); names it lacks are left out."""
    files = {f.name: f for f in index(model_dir).files()}
    return tuple(EmbeddingRef(name=n, path=files[n].path) for n in names if n in files)


def listing(model_dir, widths=None, model_name="", refresh=False):
    """A1111's ``{"loaded": {name: ...}, "skipped": {name: ...}}``: ``loaded`` what a model
    whose encoders take ``widths`` takes (every file where ``widths`` is ``all``)."""
    found = index(model_dir)
    loaded, skipped = {}, {}
    for f in found.files(refresh=refresh):
        if widths is all or fits(f, widths):
            loaded[f.name] = f.listing()
        else:
            skipped[f.name] = f.listing()
            found.report_skipped(f, widths, model_name)
    return {"loaded": loaded, "skipped": skipped}


def for_model(model_dir, model=None, refresh=False):
    """:func:`listing` for ``model``, a model's name in ``model_dir`` (None: every file is
    listed as loaded); raises RunaiError for a name that is no model there."""
    from runai import families
    from runai.models.library import ModelLibrary
    from runai.models.paths import resolve_model

    if model is None:
        return listing(model_dir, all, refresh=refresh)
    model_dir = Path(os.path.realpath(model_dir))
    path, name = resolve_model(model_dir, model)
    entry = ModelLibrary(model_dir).describe(path, name)
    family = families.for_version(entry.version) if not entry.error else None
    return listing(model_dir, expected_widths(path, model_dir, family, entry.classification), name, refresh)


_hashes = {}


def short_hash(path):
    """The first 12 hex digits of the file's sha256 (A1111's ``TI hashes``), or None."""
    try:
        st = os.stat(path)
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key not in _hashes:
            with open(path, "rb") as f:
                digest = hashlib.sha256(f.read(MAX_FILE_BYTES + 1)).hexdigest()
            if len(_hashes) > 4096:
                _hashes.clear()
            _hashes[key] = digest[:12]
        return _hashes[key]
    except OSError:
        return None


# -- the worker ------------------------------------------------------------------------------

_loaded = {}
_loaded_lock = threading.Lock()
MAX_LOADED = 256


def load(ref):
    """``{key: float32 tensor (vectors, width)}`` of an embedding file (key None for one set,
    ``clip_l``/``clip_g`` for a pair), cached; raises CheckpointError."""
    import torch

    st = os.stat(ref.path)
    key = (ref.path, st.st_size, st.st_mtime_ns)
    with _loaded_lock:
        if key in _loaded:
            return _loaded[key]
    if str(ref.path).lower().endswith(".safetensors"):
        data = checkpoint.load_state_dict(ref.path)
    else:
        data = checkpoint.load_object(ref.path)
    sets = vector_sets(data, lambda v: tuple(v.shape) if isinstance(v, torch.Tensor) else None,
                       lambda v: getattr(v, "_parameters", None))
    if sets is None:
        raise checkpoint.CheckpointError(f"{ref.name} holds no embedding")
    vectors = {k: v.detach().to("cpu", torch.float32).reshape(-1, v.shape[-1]) for k, v in sets.items()}
    with _loaded_lock:
        if len(_loaded) >= MAX_LOADED:
            _loaded.clear()
        _loaded[key] = vectors
    return vectors
