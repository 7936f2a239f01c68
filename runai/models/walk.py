# -*- test-case-name: runai.test.test_walk,runai.test.test_embeddings -*-
"""The one walk of the model folder: the library's models, LoRAs, embeddings, upscalers.

One bounded walk (:func:`model_files`): 8 levels at most, 20,000 entries, names starting
with ``.`` skipped (``.cache``, ``.git``, half-written conversions), diffusers and
component folders (a ``model_index.json``, a ``config.json``) not entered, a symlink
followed only to a place inside the model folder and never descended (it may point at an
ancestor). The library asks for the diffusers folders it meets too. It also gives each
folder's modification time, so that an index knows when a file was added or removed
(:func:`changed`).

Torch-free: indexes walk on the reactor's thread pool or on the reactor itself.
"""

import os
import threading
import time
from pathlib import Path

from twisted.logger import Logger

from runai.models.paths import contained

log = Logger()

MAX_DEPTH = 8
MAX_ENTRIES = 20_000


def model_files(model_dir, suffixes, diffusers=False):
    """``([(path, resolved)], {folder: mtime_ns})``: the files under ``model_dir`` (resolved)
    whose names end in one of ``suffixes`` (lower case), and the folders walked; with
    ``diffusers``, the diffusers folders (a ``model_index.json``) among the files, a linked
    one or one a level below the deepest walked included.

    Only a link is resolved (a path through unlinked folders of a resolved folder is its
    own resolution): a listing costs no ``realpath`` per file."""
    model_dir = Path(os.path.realpath(model_dir))
    found, folders, visited = [], {}, 0
    pending = [(model_dir, 0)]
    while pending:
        folder, depth = pending.pop()
        try:
            folders[str(folder)] = os.stat(folder).st_mtime_ns
            with os.scandir(folder) as it:
                children = sorted(it, key=lambda e: e.name)
        except OSError:
            continue
        for child in children:
            visited += 1
            if visited > MAX_ENTRIES:
                log.warn("the model folder has more than {n} entries; files beyond are not listed", n=MAX_ENTRIES)
                return found, folders
            if child.name.startswith("."):
                continue
            path = Path(child.path)
            try:
                link = child.is_symlink()
                resolved = contained(model_dir, path) if link else path
                if resolved is None:
                    continue
                if child.is_dir():
                    if (path / "model_index.json").is_file():
                        if diffusers:
                            found.append((path, resolved))
                    elif not (link or depth >= MAX_DEPTH or (path / "config.json").is_file()):
                        pending.append((path, depth + 1))
                elif path.suffix.lower() in suffixes and child.is_file():
                    found.append((path, resolved))
            except OSError:
                continue
    return found, folders


def changed(folders):
    """Whether a folder of :func:`model_files`'s answer was changed (or removed) since."""
    for folder, mtime in folders.items():
        try:
            if os.stat(folder).st_mtime_ns != mtime:
                return True
        except OSError:
            return True
    return False


class PerFolder:
    """One index per model folder for the process: ``PerFolder(make)(model_dir)`` is
    ``make(realpath)``, built once (at most 16 folders kept; tests make many)."""

    def __init__(self, make):
        self._make = make
        self._indexes = {}
        self._lock = threading.Lock()

    def __call__(self, model_dir):
        key = os.path.realpath(model_dir)
        with self._lock:
            found = self._indexes.get(key)
            if found is None:
                if len(self._indexes) > 16:
                    self._indexes.clear()
                found = self._indexes[key] = self._make(key)
            return found


class ReadOnce:
    """What ``read(resolved, size)`` says of each file, read once per path, size and
    modification time (at most 4096 remembered); thread-safe. Calling it gives
    ``(what read said, size)``; ``os.stat`` errors pass through."""

    def __init__(self, read):
        self._read = read
        self._known = {}
        self._lock = threading.Lock()

    def __call__(self, resolved):
        st = os.stat(resolved)
        key = (str(resolved), st.st_size, st.st_mtime_ns)
        with self._lock:
            if key in self._known:
                return self._known[key], st.st_size
        value = self._read(resolved, st.st_size)
        with self._lock:
            if len(self._known) > 4096:
                self._known.clear()
            self._known[key] = value
        return value, st.st_size


def short_names(relatives):
    """``{relative: name}``: each file (a path relative to the model folder) named by its
    file name without extension, as A1111 names them, or, where several share that, by its
    relative path without extension."""
    stems = {}
    for relative in relatives:
        stem = Path(relative).stem
        stems[stem] = stems.get(stem, 0) + 1
    return {relative: Path(relative).stem if stems[Path(relative).stem] == 1 else os.path.splitext(relative)[0]
            for relative in relatives}


class NamedFiles:
    """What an index of named files (LoRAs, upscalers) shares: :meth:`files` walks again
    when the last walk is older than ``refresh_seconds`` (or when asked), and a name not
    found walks again at once (a file added since), at most once a second. A subclass sets
    ``self._lock``, ``self._files = None``, ``self._names = {}``, ``self._scanned = 0.0``
    and gives ``_scan()``: ``(entries, {name: entry})``."""

    refresh_seconds = 10.0

    def files(self, refresh=False):
        """Every file, sorted by name."""
        now = time.monotonic()
        with self._lock:
            if self._files is not None and not refresh and now - self._scanned < self.refresh_seconds:
                return self._files
        entries, names = self._scan()
        with self._lock:
            self._files, self._names, self._scanned = entries, names, now
        return entries

    def _named(self, name):
        """What ``name`` stands for in the names, or None; a fresh walk first if it is
        missing and the last walk is over a second old."""
        self.files()
        with self._lock:
            entry = self._names.get(name)
            stale = time.monotonic() - self._scanned > 1.0
        if entry is None and stale:
            self.files(refresh=True)
            with self._lock:
                entry = self._names.get(name)
        return entry
