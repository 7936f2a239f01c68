# -*- test-case-name: runai.test.test_legacy_parse,runai.test.test_http_parse -*-
"""What every door's requests are: one JSON object, in UTF-8; and how an error message
quotes a value from one."""

import json

from runai.core import errors

# An error message quotes at most this much of a value the client sent.
MAX_QUOTED_CHARS = 100


def decode_object(data, what="message"):
    """The JSON object in ``data`` (bytes, a bytearray or a memoryview), or RunaiError
    ``bad_encoding`` / ``bad_json`` naming ``what`` it is (a message, a body).

    The error is raised outside the ``except``: it carries no context, so that nothing of
    ``data`` (a decoding error holds all of it) outlives the refusal."""
    error = None
    try:
        text = str(data, "utf-8")  # from any bytes-like object, without a copy
    except UnicodeDecodeError as e:
        error = errors.RunaiError(errors.BAD_ENCODING, f"the {what} is not valid UTF-8 (byte {e.start})")
    if error is not None:
        raise error
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as e:
        error = errors.RunaiError(errors.BAD_JSON, f"the {what} is not valid JSON: {e}")
    if error is not None:
        raise error
    if not isinstance(obj, dict):
        raise errors.RunaiError(errors.BAD_JSON, f"the {what} must be a JSON object")
    return obj


def quoted(value, limit=MAX_QUOTED_CHARS):
    """``repr(value)`` for an error message, cut to about ``limit`` characters."""
    text = repr(value) if not isinstance(value, str) or len(value) <= limit else repr(value[:limit]) + "..."
    return text if len(text) <= limit + 8 else text[:limit] + "..."
