# -*- test-case-name: runai.test.test_http -*-
"""The models as AUTOMATIC1111 shows them: ``title`` (``name [shorthash]``),
``model_name``, ``hash``, ``sha256``; and the model ``/options`` makes the default.

A model's sha256 is computed in a thread, one model at a time, the first time it is
listed, and kept in memory only (nothing is written): until then its title is its name
alone, as AUTOMATIC1111 shows a model it has not hashed yet. A client may name a model
by its title, its name (with or without extension), its ``model_name``, or its hash.
"""

import hashlib
import os

from twisted.internet import defer, threads
from twisted.logger import Logger

from runai.core import errors
from runai.doors.jsonobject import quoted

CHUNK = 4 * 1024 * 1024
# A diffusers folder has no one file to hash: its weights, in a fixed order.
FOLDER_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def _files_of(path):
    if not os.path.isdir(path):
        return [path]
    files = []
    for part in FOLDER_PARTS:
        folder = os.path.join(path, part)
        if os.path.isdir(folder):
            files += sorted(os.path.join(folder, n) for n in os.listdir(folder)
                            if n.endswith((".safetensors", ".bin", ".ckpt")))
    return files


class Stopped(Exception):
    """The server stops: a hash is not finished (it would hold the exit for many seconds)."""


def sha256_of(path, stopping=lambda: False):
    """The sha256 of a model file, or of a diffusers folder's weights (in a pool's thread);
    raises Stopped as soon as ``stopping()`` is true."""
    digest = hashlib.sha256()
    for name in _files_of(path):
        with open(name, "rb") as f:
            while True:
                if stopping():
                    raise Stopped()
                block = f.read(CHUNK)
                if not block:
                    break
                digest.update(block)
    return digest.hexdigest()


def _signature(path):
    try:
        return tuple((os.path.getsize(f), os.stat(f).st_mtime_ns) for f in _files_of(path))
    except OSError:
        return None


def model_name(name):
    """AUTOMATIC1111's ``model_name``: the path with ``/`` as ``_``, without extension."""
    stem, ext = os.path.splitext(name)
    if ext.lower() not in (".safetensors", ".ckpt"):
        stem = name
    return stem.replace("/", "_")


class Checkpoints:
    log = Logger()

    def __init__(self, core, reactor, pool=None):
        self.core = core
        self.reactor = reactor
        self.pool = pool
        self.default = None  # the name of the model /options chose, or None: the first one
        self._hashes = {}  # path -> (signature, sha256)
        self._one_at_a_time = defer.DeferredSemaphore(1)
        self._pending = set()
        self._listed = []
        self._stopping = False
        if hasattr(reactor, "addSystemEventTrigger"):
            reactor.addSystemEventTrigger("before", "shutdown", setattr, self, "_stopping", True)

    def listing(self):
        """A Deferred of the served models, each a dict of AUTOMATIC1111's fields (plus
        ``name``, runai's). Starts hashing what is not hashed yet."""
        return self.core.list_models().addCallback(self._listed_now)

    def _listed_now(self, listed):
        entries, _ = listed
        models = []
        for entry in entries:
            if not entry.served:
                continue
            sha = self._known_hash(entry.path)
            if sha is None:
                self._hash_later(entry.path)
            short = sha[:10] if sha else None
            models.append({
                "title": f"{entry.name} [{short}]" if short else entry.name,
                "model_name": model_name(entry.name),
                "hash": short,
                "sha256": sha,
                "filename": entry.name,  # relative: the server's own paths are not the client's business
                "config": None,
                "name": entry.name,
            })
        self._listed = models
        return models

    def _known_hash(self, path):
        known = self._hashes.get(path)
        if known is not None and known[0] == _signature(path):
            return known[1]
        return None

    def _hash_later(self, path):
        if path in self._pending or self.pool is None:
            return
        self._pending.add(path)

        def run():
            return threads.deferToThreadPool(
                self.reactor, self.pool, lambda: (_signature(path), sha256_of(path, lambda: self._stopping)))

        def done(result):
            self._hashes[path] = result

        def failed(failure):
            if not failure.check(Stopped):
                self.log.failure("Hashing a model failed", failure)

        d = self._one_at_a_time.run(run)
        d.addCallbacks(done, failed)
        d.addBoth(lambda _: self._pending.discard(path))

    # Names -------------------------------------------------------------------------

    def find(self, wanted):
        """The listed model a client's name stands for, or None (from the last listing)."""
        if not isinstance(wanted, str) or not wanted:
            return None
        wanted = wanted.strip()
        for model in self._listed:
            keys = {model["title"], model["name"], model["model_name"], model["title"].lower()}
            stem = os.path.splitext(model["name"])[0]
            keys.update({stem, model["name"].lower()})
            if model["sha256"]:
                keys.update({model["hash"], model["sha256"]})
            if wanted in keys or wanted.lower() in keys:
                return model
        return None

    def resolve(self, wanted):
        """A Deferred of runai's name for the model a client named (``sd_model_checkpoint``),
        listing the folder first if needed; None asks for the default model."""
        def pick(_):
            if wanted is None:
                return self.default_model()
            model = self.find(wanted)
            if model is None:
                raise errors.RunaiError(errors.MODEL_NOT_FOUND, f"no model {quoted(wanted)}: see /sdapi/v1/sd-models")
            return model["name"]

        # A fresh listing only when the answer depends on it: a default set by /options is
        # the answer as it is (a scan per request would be I/O for nothing).
        known = self.default is not None if wanted is None else self.find(wanted) is not None
        if not known:
            return self.listing().addCallback(pick)
        return defer.maybeDeferred(pick, None)

    def default_model(self):
        """The default model's name: what /options set, else the first served one."""
        if self.default is not None:
            return self.default
        if not self._listed:
            raise errors.RunaiError(errors.MODEL_NOT_FOUND, "the model folder holds no model this server can run")
        return self._listed[0]["name"]

    def title_of(self, name):
        for model in self._listed:
            if model["name"] == name:
                return model["title"]
        return name

    def hash_of(self, name):
        for model in self._listed:
            if model["name"] == name:
                return model["hash"]
        return None
