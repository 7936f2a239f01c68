# -*- test-case-name: runai.test.test_openai_parts -*-
"""The images a ``"response_format": "url"`` reply points at: held in memory for a while.

Never written to disk. Each image is kept under an unguessable id (256 random bits) for
``ttl`` seconds, and the store holds at most ``max_count`` images and ``max_bytes`` bytes:
past either bound the least recently used go first. Expiry is a call on the injected
clock (the reactor, or a :class:`twisted.internet.task.Clock` in tests).
"""

import secrets
from collections import OrderedDict

TTL_SECONDS = 600
MAX_COUNT = 256
MAX_BYTES = 256 * 1024 * 1024


class ImageStore:
    def __init__(self, clock, ttl=TTL_SECONDS, max_count=MAX_COUNT, max_bytes=MAX_BYTES):
        self.clock = clock
        self.ttl = ttl
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.size = 0
        self._images = OrderedDict()  # id -> (data, content type, extension, expiry call)

    def __len__(self):
        return len(self._images)

    def put(self, data, content_type, extension):
        """Keep ``data``; its id, to be fetched as ``<id>.<extension>``."""
        key = secrets.token_urlsafe(32)
        call = self.clock.callLater(self.ttl, self._drop, key)
        self._images[key] = (data, content_type, extension, call)
        self.size += len(data)
        while len(self._images) > 1 and (len(self._images) > self.max_count or self.size > self.max_bytes):
            self._drop(next(iter(self._images)))
        return key

    def get(self, key, extension):
        """``(data, content type)`` of a kept image, or None (unknown, expired, another
        extension). A hit makes it the most recently used."""
        kept = self._images.get(key)
        if kept is None or kept[2] != extension:
            return None
        self._images.move_to_end(key)
        return kept[0], kept[1]

    def _drop(self, key):
        kept = self._images.pop(key, None)
        if kept is None:
            return
        self.size -= len(kept[0])
        if kept[3].active():
            kept[3].cancel()

    def clear(self):
        """Forget every image (the server stops)."""
        for key in list(self._images):
            self._drop(key)
