# -*- test-case-name: runai.test.test_tap,runai.test.test_cli,runai.test.test_health -*-
"""The shared secret of ``--token-file``, as the server and the ``runai`` command read it:
a file of one line of text. Whatever is wrong with the file is said in one line naming it
(a ValueError), never as a traceback or an ``[Errno 2]``."""

import os

# A token is one line; a file larger than this is not a token file.
MAX_TOKEN_FILE_BYTES = 64 * 1024
# A server's token is at least this long (twistd runai's and runai-worker's --token-file).
MIN_SERVER_TOKEN = 16


def read_token(path, option="--token-file"):
    """The token in ``path`` (``~`` expanded), without surrounding whitespace; ValueError
    naming ``option`` and the file when it cannot be one."""
    where = f"{option} {path}"
    full = os.path.expanduser(path)
    if os.path.isdir(full):
        raise ValueError(f"{where} is a folder; give the file that holds the token")
    try:
        with open(full, "rb") as f:
            data = f.read(MAX_TOKEN_FILE_BYTES + 1)
    except FileNotFoundError:
        raise ValueError(f"{where}: no such file") from None
    except OSError as e:
        raise ValueError(f"{where}: cannot read it: {(e.strerror or str(e)).lower()}") from None
    if len(data) > MAX_TOKEN_FILE_BYTES:
        raise ValueError(f"{where} is larger than {MAX_TOKEN_FILE_BYTES // 1024} KiB: not a token file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{where} is not text (not UTF-8): the token is one line of text") from None
    token = text.strip()
    if not token:
        raise ValueError(f"{where} is empty: put the token in it, e.g. with openssl rand -base64 32")
    if any(ord(c) < 32 or c == "\x7f" for c in token):
        raise ValueError(f"{where} holds control characters or several lines: the token is one line of text")
    return token


def read_server_token(path, option="--token-file"):
    """:func:`read_token`, for a server: a token shorter than :data:`MIN_SERVER_TOKEN`
    characters is refused too (a ValueError naming ``option`` and the file)."""
    token = read_token(path, option)
    if len(token) < MIN_SERVER_TOKEN:
        raise ValueError(f"{option} {path}: the token must be at least {MIN_SERVER_TOKEN} characters")
    return token
