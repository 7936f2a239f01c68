# -*- test-case-name: runai.test.test_lora_doors -*-
"""The ``Lora hashes`` of AUTOMATIC1111's infotext: ``"name: <sha256[:12]>, ..."``.

Each LoRA file is hashed once per size and modification time, in the pool's threads (a
LoRA is tens to hundreds of MB), while the job runs: the reply waits for the hashes only
if the job was quicker. Kept in memory only.
"""

import json
import os

from twisted.internet import defer, threads

from runai.doors.http.checkpoints import sha256_of

SHORT = 12
MAX_KNOWN = 1024


def _signature(path):
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


class LoraHashes:
    def __init__(self, reactor, pool=None):
        self.reactor = reactor
        self.pool = pool
        self._known = {}  # path -> (signature, sha256)

    def _hash(self, path):
        signature = _signature(path)
        known = self._known.get(path)
        if known is not None and known[0] == signature:
            return known[1]
        sha = sha256_of(path)
        if len(self._known) >= MAX_KNOWN:
            self._known.clear()
        self._known[path] = (signature, sha)
        return sha

    def _all(self, refs):
        found = []
        for ref in refs:
            try:
                found.append((ref.name, self._hash(ref.path)[:SHORT]))
            except OSError:
                continue  # gone since the job ran: the infotext says what it can
        return found

    def of(self, refs):
        """A Deferred of ``[(name, short hash)]`` for the LoRAs ``refs``; never fails."""
        refs = tuple(refs or ())
        if not refs:
            return defer.succeed([])
        if self.pool is None:
            d = defer.maybeDeferred(self._all, refs)
        else:
            d = threads.deferToThreadPool(self.reactor, self.pool, self._all, refs)
        return d.addErrback(lambda _: [])


def infotext_value(hashes):
    """The infotext's value, quoted as AUTOMATIC1111 quotes one with ``:`` in it; None
    (the field left out) without LoRAs."""
    if not hashes:
        return None
    names = ", ".join(f"{name.replace(':', '').replace(',', '')}: {sha}" for name, sha in hashes)
    return json.dumps(names, ensure_ascii=False)
