"""The optional history: every request and the images it produced, kept in one SQLCipher
database that is unreadable without the user's key.

Off by default. ``runai.tap`` imports this module only when ``--db`` is given, so a server
started without it runs none of this code and writes nothing.

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
import pathlib
import stat
import time

from twisted.application import service
from twisted.internet.defer import fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.threadpool import ThreadPool

KEY_ENV = "RUNAI_DB_KEY"
MAX_KEY_BYTES = 64 * 1024
APPLICATION_ID = 0x72756E61  # "runa", in the database header: tells runai's files apart

# Each migration takes the schema from version N to N + 1 (index N); the version lives in
# ``PRAGMA user_version``. Append, never edit: files in the field went through the old ones.
MIGRATIONS = (
    (
        f"PRAGMA application_id = {APPLICATION_ID}",
        """CREATE TABLE requests (
            id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused, even after a delete
            created REAL NOT NULL,                 -- unix time of the request
            finished REAL,
            action TEXT NOT NULL,
            model TEXT NOT NULL,
            prompt TEXT NOT NULL,
            negative_prompt TEXT NOT NULL,
            params TEXT NOT NULL,                  -- JSON: every other parameter
            client_id TEXT,                        -- JSON: the client's "id", if any
            status TEXT NOT NULL,                  -- queued, done, failed, cancelled, interrupted
            error_code TEXT,
            error_message TEXT,
            seconds REAL
        )""",
        """CREATE TABLE images (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            request_id INTEGER NOT NULL REFERENCES requests (id) ON DELETE CASCADE,
            idx INTEGER NOT NULL,
            seed INTEGER,
            width INTEGER NOT NULL,
            height INTEGER NOT NULL,
            created REAL NOT NULL,
            png BLOB NOT NULL
        )""",
        "CREATE INDEX images_by_request ON images (request_id, idx)",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)

STATUSES = ("queued", "done", "failed", "cancelled", "interrupted")


class StoreError(Exception):
    """The store cannot be used; the message is meant for the user, as is."""


class Key:
    """A passphrase that keeps itself out of reprs, logs and tracebacks."""

    __slots__ = ("_value",)

    def __init__(self, value):
        self._value = value

    def reveal(self):
        return self._value

    def __repr__(self):
        return "<runai.history.store.Key (hidden)>"

    __str__ = __repr__


def _key_text(data, where):
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError:
            raise StoreError(f"the key in {where} is not UTF-8 text")
    # One trailing newline is what `echo` and editors add; it is not part of the key.
    if data.endswith("\r\n"):
        data = data[:-2]
    elif data.endswith("\n"):
        data = data[:-1]
    if not data:
        raise StoreError(f"the key in {where} is empty")
    if "\x00" in data:
        raise StoreError(f"the key in {where} contains a NUL character")
    return Key(data)


def load_key(key_file=None, environ=None):
    """The key from ``key_file`` or else ``$RUNAI_DB_KEY``; never from the command line,
    where ``ps`` would show it. Raises :class:`StoreError`."""
    if key_file is not None:
        try:
            with open(key_file, "rb") as f:
                data = f.read(MAX_KEY_BYTES + 1)
                mode = os.fstat(f.fileno()).st_mode
        except OSError as e:
            raise StoreError(f"cannot read the key file {key_file}: {e.strerror or e}")
        if mode & 0o077:
            Store.log.warn("The key file {key_file} can be read by other users (mode {mode:o}); "
                           "chmod 600 it", key_file=key_file, mode=stat.S_IMODE(mode))
        if len(data) > MAX_KEY_BYTES:
            raise StoreError(f"the key file {key_file} is larger than {MAX_KEY_BYTES} bytes")
        return _key_text(data, f"the key file {key_file}")
    environ = os.environ if environ is None else environ
    value = environ.get(KEY_ENV)
    if value is None:
        raise StoreError(f"--db needs a key: --db-key-file FILE, or the {KEY_ENV} environment variable")
    return _key_text(value, KEY_ENV)


def check_options(options, environ=None):
    """``--db`` and ``--db-key-file`` for :class:`runai.tap.Options`: resolves the path,
    loads the key into ``options["db-key"]``; raises UsageError. Opens no database."""
    if options["db"] is None:
        if options["db-key-file"] is not None:
            raise usage.UsageError("--db-key-file needs --db")
        return
    path = os.path.abspath(os.path.expanduser(options["db"]))
    if os.path.isdir(path):
        raise usage.UsageError(f"--db {path} is a folder; give the path of a database file")
    if not os.path.isdir(os.path.dirname(path)):
        raise usage.UsageError(f"--db {path}: the folder {os.path.dirname(path)} does not exist")
    try:
        options["db-key"] = load_key(options["db-key-file"], environ)
    except StoreError as e:
        raise usage.UsageError(str(e))
    options["db"] = path


def _driver():
    try:
        from sqlcipher3 import dbapi2
    except ImportError:
        raise StoreError("--db needs the SQLCipher binding: pip install 'runai[db]' (the sqlcipher3-binary package)")
    return dbapi2


def _contains(text, needle):
    """Case-insensitive substring test for any script (SQLite's LIKE folds ASCII only)."""
    if text is None or needle is None:
        return 0
    return int(needle.casefold() in text.casefold())


def _connect(driver, path, key, read_only):
    uri = pathlib.Path(path).as_uri() + ("?mode=ro" if read_only else "?mode=rw")
    conn = driver.connect(uri, uri=True, isolation_level=None, check_same_thread=False, timeout=30)
    try:
        try:
            # SQLCipher prints decryption failures to stderr; runai says it more plainly.
            conn.execute("PRAGMA cipher_log_level = NONE")
        except driver.Error:
            pass
        conn.execute("PRAGMA key = '{}'".format(key.reveal().replace("'", "''")))
        # SQLCipher 4's settings, pinned so a later SQLCipher with other defaults still
        # reads files written today.
        conn.execute("PRAGMA cipher_compatibility = 4")
        try:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except driver.DatabaseError as e:
            raise StoreError(
                f"cannot decrypt {path}: wrong key, or not a runai database ({e}); the file was left as it was"
            )
    except BaseException:
        conn.close()
        raise
    return conn


def _identify(conn, path, known=SCHEMA_VERSION):
    """Refuse a file that is not runai's, or that a newer runai wrote (without writing)."""
    app_id = conn.execute("PRAGMA application_id").fetchone()[0]
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    objects = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
    if app_id != APPLICATION_ID and (app_id != 0 or objects or version):
        raise StoreError(f"{path} is an SQLCipher database, but not a runai one; the file was left as it was")
    if version > known:
        raise StoreError(
            f"{path} was written by a newer runai (schema {version}; this one knows up to {known}); "
            "the file was left as it was"
        )
    return version


def migrate(conn, migrations=MIGRATIONS):
    """Apply the missing migrations, each in its own transaction; returns the version."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    for target in range(version + 1, len(migrations) + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            step = migrations[target - 1]
            if callable(step):
                step(conn)
            else:
                for statement in step:
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {target}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        version = target
    return version


def _remove_empty_wal(created):
    """A read-only connection leaves the (empty) -wal and -shm it created; remove them,
    so that a refused file has nothing new beside it. A WAL with content stays."""
    wal = [name for name in created if name.endswith("-wal")]
    if wal and os.path.exists(wal[0]) and os.path.getsize(wal[0]):
        return
    for name in created:
        try:
            os.remove(name)
        except FileNotFoundError:
            pass


def open_database(path, key, migrations=MIGRATIONS, driver=None):
    """An open, checked, migrated connection to the database at ``path``.

    An existing file is first opened read-only, so that a wrong key, or a file that is
    not runai's, is refused before anything is written to it (a read-write connection
    would, on closing, fold a left-over WAL into the file). A missing file is created,
    readable by its owner only. Raises :class:`StoreError`.
    """
    driver = driver or _driver()
    path = os.path.abspath(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        info = None
    except OSError as e:
        raise StoreError(f"cannot open {path}: {e.strerror or e}")
    try:
        if info is not None:
            if not stat.S_ISREG(info.st_mode):
                raise StoreError(f"{path} is not a regular file")
            if not os.access(path, os.R_OK | os.W_OK):
                raise StoreError(f"{path} is not readable and writable by this user")
            if info.st_size:
                leftovers = [path + suffix for suffix in ("-wal", "-shm") if not os.path.exists(path + suffix)]
                conn = _connect(driver, path, key, read_only=True)
                try:
                    _identify(conn, path, len(migrations))
                finally:
                    conn.close()
                    _remove_empty_wal(leftovers)
        else:
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            except FileExistsError:
                pass
            except OSError as e:
                raise StoreError(f"cannot create {path}: {e.strerror or e}")
        conn = _connect(driver, path, key, read_only=False)
        try:
            _identify(conn, path, len(migrations))
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("PRAGMA secure_delete = ON")  # a deleted image is overwritten, not left in free pages
            conn.execute("PRAGMA temp_store = MEMORY")  # no temporary files beside the database
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise StoreError(f"{path}: SQLite refused the WAL journal (got {mode!r})")
            conn.execute("PRAGMA synchronous = FULL")
            migrate(conn, migrations)
            conn.create_function("runai_contains", 2, _contains, deterministic=True)
        except BaseException:
            conn.close()
            raise
        return conn
    except driver.Error as e:
        raise StoreError(f"cannot open {path}: {e}")


def check(path, key):
    """Open, check and migrate the database once, then close it: what the server does
    at start, before it listens. Returns the number of requests kept."""
    conn = open_database(path, key)
    try:
        return conn.execute("SELECT count(*) FROM requests").fetchone()[0]
    finally:
        conn.close()


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
    return f"<{type(value).__name__}>"


# Kept in their own columns, or not kept: absolute paths say where the user's files are,
# and would leak into exported PNGs.
_NOT_PARAMS = ("prompt", "negative_prompt", "id", "model_path", "safety_checker")


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


class Store:
    """The database, its thread, and the reactor-side calls that feed it."""

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
        self.running = False
        self._conn = None

    # Lifecycle (reactor thread) -------------------------------------------------------

    def start(self):
        self.pool.start()
        self.running = True
        self._call(self._open).addErrback(
            lambda f: self.log.failure("The history database {path} could not be opened", f, path=self.path))

    def stop(self):
        """Write what is queued, close the database and join the thread."""
        if not self.running:
            return
        self._call(self._close).addErrback(lambda f: self.log.failure("Closing the history database", f))
        self.running = False
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


class StoreService(service.Service):
    """Starts the store's thread first and stops it last, after the worker: the jobs
    that the worker fails on its way out are still written."""

    def __init__(self, store):
        self.store = store

    def startService(self):
        super().startService()
        self.store.start()

    def stopService(self):
        super().stopService()
        self.store.stop()
