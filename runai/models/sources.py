# -*- test-case-name: runai.test.test_cache_companions -*-
"""Which files a pipeline was built from besides its own, and whether one has changed on
disk since: what tells :class:`runai.models.cache.ModelLoader` that a cached pipeline is
stale because a companion file was replaced.

A single file is built with companion files: the VAE and text encoders that the client chose
or that :mod:`runai.models.companions` found, the configs and tokenizer folders of a base
model in the model folder. The code that picks one calls :func:`note`; a load wrapped in
:func:`recording` collects, in its own thread, what was picked and its state on disk at
that moment (before it was read, so that a file replaced while the load reads it is seen
as changed afterwards). :func:`changed` tells, from ``os.stat`` alone (size, mtime, inode;
no file is opened), whether one of them has changed since.

Torch-free and stdlib-only: :mod:`runai.models.paths` notes the configs it reads.
"""

import os
import threading
from contextlib import contextmanager

# A tokenizer folder is noted with its files; more than this many is no tokenizer.
MAX_FOLDER_ENTRIES = 256

_local = threading.local()


def stat_of(path):
    """``(path, size, mtime_ns, inode)`` of ``path`` (links followed), or ``(path, None)``
    if it is not there: what changes when a file is rewritten, replaced or removed."""
    path = str(path)
    try:
        st = os.stat(path)
    except OSError:
        return (path, None)
    return (path, st.st_size, st.st_mtime_ns, st.st_ino)


def stats_of(path):
    """The stats that stand for ``path``: a file's own; a folder's own (its mtime changes
    when an entry is added, removed or replaced) and each of its files'."""
    own = stat_of(path)
    if not os.path.isdir(own[0]):
        return [own]
    try:
        with os.scandir(own[0]) as it:
            names = sorted(e.name for e in it if not e.name.startswith("."))
    except OSError:
        return [own]
    return [own] + [stat_of(os.path.join(own[0], name)) for name in names[:MAX_FOLDER_ENTRIES]]


@contextmanager
def recording():
    """Collect what :func:`note` is told in this thread while the body runs: yields the list
    of stats it fills (each path once). Recordings nest; an inner one's notes reach the
    outer ones too."""
    stack = _local.__dict__.setdefault("stack", [])
    used = []
    stack.append(used)
    try:
        yield used
    finally:
        # By identity: two recordings that noted the same files are equal lists.
        del stack[next(i for i, r in enumerate(stack) if r is used)]


def recording_now():
    """Whether some load in this thread is recording (so that noting is not wasted work)."""
    return bool(getattr(_local, "stack", None))


def note(*paths):
    """Say that the pipeline being loaded in this thread is built from ``paths`` (files or
    folders, resolved); nothing when no load records."""
    if not recording_now():
        return
    add([s for path in paths for s in stats_of(path)])


def add(stats):
    """Put stats taken earlier (:func:`note`'s, kept with a template another loader copies)
    into this thread's recordings."""
    for used in getattr(_local, "stack", ()):
        known = {s[0] for s in used}
        for s in stats:
            if s[0] not in known:
                known.add(s[0])
                used.append(s)


def changed(stats):
    """The first path among ``stats`` that is no longer as it was, or None: ``os.stat``
    calls alone, no file opened."""
    for old in stats:
        if stat_of(old[0]) != tuple(old):
            return old[0]
    return None


def first_difference(old, new):
    """The first path whose stat differs between two signatures (tuples that start with the
    path), or None when they are equal."""
    if old == new:
        return None
    before, after = {s[0]: s for s in old}, {s[0]: s for s in new}
    for path in list(before) + [p for p in after if p not in before]:
        if before.get(path) != after.get(path):
            return path
    return None
