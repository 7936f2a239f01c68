# -*- test-case-name: runai.test.test_requests,runai.test.test_queue -*-
"""The errors a client can be told about, each with a stable machine-readable code.

Clients branch on ``code``; ``message`` is for people. Keep codes stable: they are part
of the protocol documented in docs/socket-protocol.md.
"""

import os

# Codes, in one place so that the docs, the server and the client agree.
BAD_ENCODING = "bad_encoding"  # the message is not UTF-8
BAD_JSON = "bad_json"  # the message is not JSON, or not a JSON object
UNKNOWN_ACTION = "unknown_action"
BAD_REQUEST = "bad_request"  # a missing option, or one of the wrong type
OUT_OF_RANGE = "out_of_range"  # an option outside its limits
UNKNOWN_SCHEDULER = "unknown_scheduler"
MODEL_NOT_FOUND = "model_not_found"
PATH_OUTSIDE_MODEL_DIR = "path_outside_model_dir"
MODEL_LOAD_FAILED = "model_load_failed"
CONVERT_FAILED = "convert_failed"  # a convert action that could not finish
MESSAGE_TOO_LARGE = "message_too_large"
QUEUE_FULL = "queue_full"
NOT_FOUND = "not_found"  # cancel of a job this client does not have
NOT_IMPLEMENTED = "not_implemented"
CANCELLED = "cancelled"
SHUTTING_DOWN = "shutting_down"
OUT_OF_MEMORY = "out_of_memory"
SAFETY_CHECKER_MISSING = "safety_checker_missing"
UNAUTHORIZED = "unauthorized"  # --token-file is set and the request's token is wrong
IDLE_TIMEOUT = "idle_timeout"  # half a message, then silence
NO_STORE = "no_store"  # a history action, and the server runs without --db
BROKER_UNAVAILABLE = "broker_unavailable"  # a front server (--broker) cannot reach Redis
INTERNAL = "internal"


class RunaiError(Exception):
    """The base of runai's errors: a stable ``code`` for programs and a ``message`` for
    people. A door reports it in its own wire format (the legacy socket as
    ``{"error": {"code", "message"}}``). Subclasses that always carry one code (a model
    that cannot be loaded, a conversion that failed) set it for their callers."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code
        self.message = message

    def __repr__(self):
        return f"RunaiError({self.code!r}, {self.message!r})"


def scrub(text, model_dir=None, names=()):
    """``text`` without the server's own paths: each ``(path, name)`` in ``names`` becomes
    the name the client used, and the model folder's prefix goes. A client learns nothing
    of where the server keeps its files from an error message."""
    text = str(text)
    for path, name in names:
        if path:
            text = text.replace(str(path), str(name))
    if model_dir is not None:
        text = text.replace(str(model_dir).rstrip("/\\") + os.sep, "")
    return text


class JobCancelled(RunaiError):
    """Raised inside the worker when a job is cancelled; stops the pipeline at a step."""

    def __init__(self, message="the job was cancelled"):
        super().__init__(CANCELLED, message)
