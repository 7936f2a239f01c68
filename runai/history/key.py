# -*- test-case-name: runai.test.test_history_key -*-
"""The history database's key: read from a file or the environment, never from the
command line, and kept out of reprs, logs and tracebacks.

This is what ``twistd runai --db`` runs while it parses its options (:func:`check_options`);
it opens no database and needs no SQLCipher.
"""

import os
import stat

from twisted.logger import Logger
from twisted.python import usage

from runai.history.database import StoreError

KEY_ENV = "RUNAI_DB_KEY"
MAX_KEY_BYTES = 64 * 1024

log = Logger()


class Key:
    """A passphrase that keeps itself out of reprs, logs and tracebacks."""

    __slots__ = ("_value",)

    def __init__(self, value):
        self._value = value

    def reveal(self):
        return self._value

    def __repr__(self):
        return "<runai.history.key.Key (hidden)>"

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
            log.warn("The key file {key_file} can be read by other users (mode {mode:o}); "
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
    """``--db`` and ``--db-key-file`` for :class:`runai.options.Options`: resolves the path,
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
