# -*- test-case-name: runai.test.test_legacy_parse,runai.test.test_http_parse -*-
"""What every door's requests are: one JSON object, in UTF-8."""

import json

from runai.core import errors


def decode_object(data, what="message"):
    """The JSON object in ``data`` (bytes), or RunaiError ``bad_encoding`` / ``bad_json``
    naming ``what`` it is (a message, a body)."""
    try:
        text = str(data, "utf-8")  # from bytes or a bytearray alike, without a copy
    except UnicodeDecodeError as e:
        raise errors.RunaiError(errors.BAD_ENCODING, f"the {what} is not valid UTF-8 (byte {e.start})")
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise errors.RunaiError(errors.BAD_JSON, f"the {what} is not valid JSON: {e}")
    if not isinstance(obj, dict):
        raise errors.RunaiError(errors.BAD_JSON, f"the {what} must be a JSON object")
    return obj
