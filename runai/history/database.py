# -*- test-case-name: runai.test.test_history_database -*-
"""The history's SQLCipher file: the schema and its migrations, and opening a file
safely (refusing a wrong key, a foreign file or a newer schema before writing anything).

Every function here blocks on the disk: :class:`runai.history.store.Store` calls them on
its own thread, and ``twistd runai --db`` calls :func:`check` once before it listens.
"""

import os
import pathlib
import stat

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
    """The store cannot be used (its key, its file, or a closed store); the message is
    meant for the user, as is."""


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

