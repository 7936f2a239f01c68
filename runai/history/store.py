# -*- test-case-name: runai.test.test_store -*-
"""The optional history: every request and the images it produced, kept in one SQLCipher
database that is unreadable without the user's key.

Off by default. ``runai.tap`` imports this package only when ``--db`` is given, so a server
started without it runs none of this code and writes nothing. The key is read by
:mod:`runai.history.key`; the file is opened and migrated by :mod:`runai.history.database`.

Threads: every database call runs on the store's own one-thread pool (``runai-store``),
never on the reactor and never on the GPU worker. From the reactor, writes are
fire-and-forget (:meth:`Store.begin`, :meth:`Store.add_image`, :meth:`Store.finish`) and
reads return Deferreds that fire on the reactor. The pool runs its calls in order, so a
request's row is written before its images, and a read sees every earlier write.

Durability: WAL journal, ``synchronous=FULL``, one transaction per row. A process killed
mid-write loses at most the row in flight; the request then stays ``queued`` in the file
and is marked ``interrupted`` at the next start.
"""

import dataclasses
import json
import os
import time

from twisted.application import service
from twisted.internet.defer import fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from runai.history.database import MIGRATIONS, StoreError, check, open_database


def _jsonable(value):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)) and all(v is None or isinstance(v, (bool, int, float, str)) for v in value):
        return list(value)
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes>"
    if all(hasattr(value, name) for name in ("data", "format", "width", "height")):
        # A client's input image (img2img pixels, a mask): described, not kept.
        return {"format": value.format, "width": value.width, "height": value.height, "bytes": len(value.data)}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        # A part of a request (the hires pass): its fields, never a path on the server.
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value) if f.name != "path"}
    if isinstance(value, (list, tuple)) and all(dataclasses.is_dataclass(v) for v in value):
        return [_jsonable(v) for v in value]
    return f"<{type(value).__name__}>"


# Kept in their own columns, or not kept: absolute paths say where the user's files are,
# and would leak into exported PNGs.
_NOT_PARAMS = ("prompt", "negative_prompt", "id", "model_path", "safety_checker", "module_paths")


def params_of(request):
    """Every parameter of a generation request but the prompts, as JSON-ready values."""
    if dataclasses.is_dataclass(request):
        names = [f.name for f in dataclasses.fields(request)]
    else:
        names = list(vars(request))
    return {name: _jsonable(getattr(request, name)) for name in names if name not in _NOT_PARAMS}


class Record:
    """A handle on one request's row; its ``id`` is set on the store's thread."""

    __slots__ = ("id",)

    def __init__(self):
        self.id = None


def _item(row):
    (rid, created, finished, action, model, prompt, negative, params, client_id, status,
     code, message, seconds, images) = row
    return {
        "request_id": rid, "time": created, "finished": finished, "action": action, "model": model,
        "prompt": prompt, "negative_prompt": negative, "params": json.loads(params),
        "client_id": json.loads(client_id) if client_id is not None else None,
        "status": status, "error": {"code": code, "message": message} if code is not None else None,
        "seconds": seconds, "images": images,
    }


_ITEM_COLUMNS = """r.id, r.created, r.finished, r.action, r.model, r.prompt, r.negative_prompt, r.params,
    r.client_id, r.status, r.error_code, r.error_message, r.seconds,
    (SELECT count(*) FROM images i WHERE i.request_id = r.id)"""


class Store(service.Service):
    """The database, its thread, and the reactor-side calls that feed it.

    A Service: ``twistd runai --db`` starts it first and stops it last, after the worker,
    so that the jobs the worker fails on its way out are still written. :meth:`start` and
    :meth:`stop` do the same for a store used without a service parent.
    """

    log = Logger()

    # Images waiting for the disk, in bytes: past this, new images are not stored (and a
    # warning says so) rather than letting a stalled disk fill the memory.
    max_pending_bytes = 512 * 1024 * 1024

    def __init__(self, path, key, reactor, pool=None, now=time.time, migrations=MIGRATIONS):
        self.path = os.path.abspath(path)
        self._key = key
        self.reactor = reactor
        self.pool = pool if pool is not None else ThreadPool(minthreads=1, maxthreads=1, name="runai-store")
        self.now = now
        self.migrations = migrations
        self.pending_bytes = 0
        self._conn = None

    # Lifecycle (reactor thread) -------------------------------------------------------

    def startService(self):
        """Start the store's thread and open the database on it."""
        self.pool.start()
        super().startService()
        self._call(self._open).addErrback(
            lambda f: self.log.failure("The history database {path} could not be opened", f, path=self.path))

    def stopService(self):
        """Write what is queued, close the database and join the thread."""
        if not self.running:
            return
        self._call(self._close).addErrback(lambda f: self.log.failure("Closing the history database", f))
        super().stopService()
        self.pool.stop()

    def _call(self, f, *args):
        if not self.running:
            return fail(StoreError("the history database is closed"))
        return deferToThreadPool(self.reactor, self.pool, self._run, f, *args)

    # Writes (reactor thread; each returns at once) --------------------------------------

    def _write(self, f, *args):
        if not self.running:
            self.log.debug("History write after the store closed; dropped")
            return succeed(None)
        d = self._call(f, *args)
        d.addErrback(lambda failure: self.log.failure("A history write failed", failure))
        return d

    def begin(self, request):
        """Record a generation request; the returned handle identifies it later."""
        record = Record()
        client_id = json.dumps(request.id) if request.id is not None else None
        row = (self.now(), request.action, request.model_name, request.prompt, request.negative_prompt,
               json.dumps(params_of(request), separators=(",", ":")), client_id)
        self._write(self._insert_request, record, row)
        return record

    def add_image(self, record, image):
        if record is None:
            return
        size = len(image.png)
        if self.pending_bytes + size > self.max_pending_bytes:
            self.log.warn("The history database is {pending} bytes behind; an image was not stored",
                          pending=self.pending_bytes)
            return
        self.pending_bytes += size
        row = (image.index, image.seed, image.width, image.height, self.now(), image.png)
        self._write(self._insert_image, record, row).addBoth(self._written, size)

    def _written(self, result, size):
        self.pending_bytes -= size
        return result

    def finish(self, record, status, error=None, seconds=None):
        """``status``: done, failed or cancelled; ``error``: a RunaiError, for the latter two."""
        if record is None:
            return
        code, message = (error.code, error.message) if error is not None else (None, None)
        self._write(self._finish, record, (status, code, message, seconds, self.now()))

    def failed(self, record, error):
        self.finish(record, "cancelled" if error.code == "cancelled" else "failed", error)

    # Reads (reactor thread; Deferreds fire on the reactor) -----------------------------

    def history(self, limit, before=None, query=None):
        """Up to ``limit`` requests, newest first, older than ``before``, whose prompt
        contains ``query`` (case-insensitively)."""
        return self._call(self._history, limit, before, query)

    def get(self, request_id):
        """One request as a history item, plus ``image_list`` (no PNG bytes); or None."""
        return self._call(self._get, request_id)

    def image(self, image_id):
        """The PNG bytes of one image, or None."""
        return self._call(self._image, image_id)

    def delete(self, request_id):
        """Delete a request and its images; fires True, or False if there was none."""
        return self._call(self._delete, request_id)

    # The store's thread ----------------------------------------------------------------

    def _run(self, f, *args):
        if self._conn is None and f != self._open:
            raise StoreError("the history database is not open")
        return f(*args)

    def _open(self):
        self._conn = open_database(self.path, self._key, self.migrations)
        interrupted = self._conn.execute(
            "UPDATE requests SET status = 'interrupted' WHERE status = 'queued'").rowcount
        count = self._conn.execute("SELECT count(*) FROM requests").fetchone()[0]
        self.reactor.callFromThread(
            self.log.info, "History database {path}: {count} request(s) kept; {interrupted} marked interrupted",
            path=self.path, count=count, interrupted=interrupted)

    def _close(self):
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _insert_request(self, record, row):
        cursor = self._conn.execute(
            "INSERT INTO requests (created, action, model, prompt, negative_prompt, params, client_id, status) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, 'queued')", row)
        record.id = cursor.lastrowid

    def _insert_image(self, record, row):
        if record.id is None:
            return
        # A request deleted while it ran keeps no images.
        self._conn.execute(
            "INSERT INTO images (request_id, idx, seed, width, height, created, png) "
            "SELECT ?, ?, ?, ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM requests WHERE id = ?)",
            (record.id, *row, record.id))

    def _finish(self, record, row):
        if record.id is None:
            return
        self._conn.execute(
            "UPDATE requests SET status = ?, error_code = ?, error_message = ?, seconds = ?, finished = ? "
            "WHERE id = ?", (*row, record.id))

    def _history(self, limit, before, query):
        rows = self._conn.execute(
            f"SELECT {_ITEM_COLUMNS} FROM requests r "
            "WHERE (?1 IS NULL OR r.id < ?1) AND (?2 IS NULL OR runai_contains(r.prompt, ?2)) "
            "ORDER BY r.id DESC LIMIT ?3", (before, query or None, limit)).fetchall()
        return [_item(row) for row in rows]

    def _get(self, request_id):
        row = self._conn.execute(f"SELECT {_ITEM_COLUMNS} FROM requests r WHERE r.id = ?", (request_id,)).fetchone()
        if row is None:
            return None
        item = _item(row)
        item["image_list"] = [
            {"image_id": iid, "index": idx, "seed": seed, "width": w, "height": h}
            for iid, idx, seed, w, h in self._conn.execute(
                "SELECT id, idx, seed, width, height FROM images WHERE request_id = ? ORDER BY idx, id",
                (request_id,))
        ]
        return item

    def _image(self, image_id):
        row = self._conn.execute("SELECT png FROM images WHERE id = ?", (image_id,)).fetchone()
        return bytes(row[0]) if row is not None else None

    def _delete(self, request_id):
        # One statement, one transaction: the images go with it (ON DELETE CASCADE).
        return self._conn.execute("DELETE FROM requests WHERE id = ?", (request_id,)).rowcount > 0


def from_config(config, reactor):
    """The store for ``twistd runai --db``: checked and migrated now, before the server
    listens; a wrong key or an unusable file stops the start with a plain message."""
    try:
        check(config["db"], config["db-key"])
    except StoreError as e:
        raise SystemExit(f"runai: cannot use the history database: {e}")
    return Store(config["db"], config["db-key"], reactor)
