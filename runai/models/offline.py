# -*- test-case-name: runai.test.test_singlefile,runai.test.test_offline -*-
"""No model hub, ever, and no noise: the environment that keeps huggingface_hub offline,
and diffusers' and transformers' own messages in runai's log rather than on stderr.

huggingface_hub reads these variables once, when diffusers or transformers first import
it. Every runai module that imports diffusers or transformers at module level imports
this module first::

    from runai.models import offline  # before diffusers and transformers

    del offline  # imported for what importing it does

A variable already set in the environment is left as it is.
"""

import logging
import os
import re

from twisted.logger import Logger, LogLevel

ENVIRONMENT = {
    # A server must never reach out to a model hub, nor stall while trying to.
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DISABLE_TELEMETRY": "1",
    # Progress bars would go to the server's stderr, one line per load and per image.
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    # transformers fetches attention kernels from the Hub by default on CUDA, and fails a
    # load where the `kernels` package is missing.
    "USE_HUB_KERNELS": "NO",
}

_log = Logger(namespace="runai.libraries")

for _name, _value in ENVIRONMENT.items():
    os.environ.setdefault(_name, _value)


# Notices a user can do nothing about: runai needs no torchvision (transformers falls back
# to PIL image processors), and casts no model with fp32 modules to keep. Not logged.
_IDLE_NOTICES = (
    re.compile(r"requires torchvision \(not installed\)"),
    re.compile(r"that should be kept in float32: \[\]"),
)


class _ToTheLog(logging.Handler):
    """diffusers' and transformers' own log records, into runai's log: at warning level
    at most (a library's notice is not the server's error), each message once, and none
    of :data:`_IDLE_NOTICES`."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def emit(self, record):
        message = record.getMessage()
        if message in self.seen or any(notice.search(message) for notice in _IDLE_NOTICES):
            return
        self.seen.add(message)
        level = LogLevel.warn if record.levelno >= logging.WARNING else LogLevel.debug
        _log.emit(level, "{library}: {notice}", library=record.name, notice=message)


def _route_library_logs():
    """The libraries print to stderr, which twistd logs at error level; send their records
    to runai's log instead. Their own loggers' settings (levels) are kept."""
    import importlib

    handler = _ToTheLog()
    for library in ("transformers", "diffusers"):
        try:
            importlib.import_module(f"{library}.utils.logging").disable_default_handler()
        except (ImportError, AttributeError):
            continue
        logger = logging.getLogger(library)
        logger.addHandler(handler)
        logger.propagate = False


_route_library_logs()
