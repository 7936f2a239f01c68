# -*- test-case-name: runai.test.test_tap,runai.test.test_workers -*-
"""The command-line options of ``twistd runai`` and ``twistd runai-worker``: parsed and
checked at start, so that a bad one ends the start with one line naming it.

Imports nothing heavy, and reads only the files the options name (a token file, an ssl:
endpoint's key and certificate).
"""

import os
import re

from twisted.internet import endpoints
from twisted.python import usage

from runai import tls
from runai.doors.legacy import framing
from runai.ops import options as ops_options
from runai.tokenfile import read_server_token

DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")
DTYPES = ("auto", "float16", "bfloat16", "float32")
MAX_WORKERS = 64


_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
# A memory bound still caps the count: each cached model holds more than its weights.
MAX_CACHED_MODELS = 32


def parse_cache_size(value):
    """``(models, bytes)`` from ``--cache-size``: ``"3"`` is three models, ``"8GiB"`` (or
    8G, 8GB: binary units all) is up to 8 GiB of weights; bytes is None for a count."""
    text = str(value).strip()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(?:i?[bB])?", text)
    if not match:
        raise ValueError(f"expected a number of models (2) or a size (8GiB), not {value!r}")
    number, unit = float(match.group(1)), match.group(2).lower()
    if not unit and not text[-1:].isalpha():
        if not number.is_integer() or not 1 <= number <= MAX_CACHED_MODELS:
            raise ValueError(f"a number of models must be a whole number from 1 to {MAX_CACHED_MODELS}")
        return int(number), None
    size = int(number * _UNITS[unit])
    if size < 2**20:
        raise ValueError(f"{value!r} is too small for any model")
    return MAX_CACHED_MODELS, size


# --idle-unload: a number and an optional unit (s, m, h); at most a week.
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600}
MAX_IDLE_UNLOAD = 7 * 24 * 3600


def parse_duration(value):
    """Seconds (a float) from ``"90s"``, ``"10m"``, ``"1.5h"`` or ``"30"`` (seconds); a
    ValueError naming ``--idle-unload`` for anything else, zero, or more than a week."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smh]?)", str(value).strip().lower())
    if not match:
        raise ValueError(f"--idle-unload must be a duration such as 90s, 10m or 1h, not {value!r}")
    seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if not 0 < seconds <= MAX_IDLE_UNLOAD:
        raise ValueError(f"--idle-unload must be more than 0 and at most a week, not {value!r}")
    return seconds


class OptionError(SystemExit):
    """A bad option or option value. twistd ends with this one line (``runai: --port: ...``)
    on stderr and exit status 1, instead of printing its whole usage text first (as it
    does for a UsageError): what a user and a service manager need to see."""

    def __init__(self, message):
        super().__init__(f"runai: {message}")
        self.message = message


def checked_endpoint(option, description):
    """``description``, the Twisted endpoint of ``--option``, once Twisted can listen on it:
    for ``ssl:``, its key and certificate readable and a pair. A UsageError naming the
    option and the file otherwise, so that twistd says it in one line and exits 1 at
    start, never a server that does not listen. Reads the files, listens on nothing."""
    try:
        tls.check_server_endpoint(description)
    except ValueError as e:
        raise usage.UsageError(f"--{option}: {e}")
    return description


def checked_model_dir(value):
    """``--model-dir`` resolved; a UsageError when it names something that is not a folder
    (a folder that does not exist yet is said in the log at start, and may come later)."""
    path = os.path.realpath(os.path.expanduser(value))
    if os.path.exists(path) and not os.path.isdir(path):
        raise usage.UsageError(f"--model-dir {value} is a file, not a folder: give the folder that holds the models")
    return path


def _number(kind, option):
    """A coercer for ``--option`` whose error names it."""
    def convert(value):
        try:
            return kind(value)
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            raise ValueError(f"--{option} must be {what}, not {value!r}") from None
    return convert


TEXT_ENCODER_PLACES = ("device", "cpu")
PREVIEW_DECODERS = ("auto", "cheap", "taesd")  # runai.engine.previews.DECODERS, torch-free here
# What every command that runs workers takes, beside --device.
WORKER_PARAMETERS = [
    ["dtype", None, "auto", "auto (float16 on CUDA, bfloat16 there for flow-matching models, float32 on CPU), "
                            "float16, bfloat16 or float32."],
    ["cache-size", None, "2", "How many models each worker keeps loaded (e.g. 2), or how much memory their "
                              "weights may take (e.g. 8GiB, 6000MB); the least recently used one goes first."],
    ["text-encoders", None, "device", "Where the text encoders run: 'device' (with the model) or 'cpu' (in the "
                                      "computer's memory, sparing the GPU's for the model)."],
    ["idle-unload", None, None, "Unload the models from the device after this long without a job (90s, 10m, 1h "
                                "or seconds); the next job loads again. Off unless given.", parse_duration],
    ["preview-decoder", None, "auto", "Live previews: 'auto' (TAESD where its decoder is in the model folder, else "
                                      "the cheap linear map), 'cheap' (the linear map only) or 'taesd' (as auto, "
                                      "warning when a family's decoder is missing)."],
]


class WorkerOptions(usage.Options):
    """What every command that runs workers takes (``twistd runai``, ``twistd runai-worker``):
    ``--device`` (several times: one worker per device), ``--dtype``, ``--cache-size``; a bad
    option ends the start with one line (:class:`OptionError`)."""

    def __init__(self):
        super().__init__()
        self["devices"] = []

    def opt_device(self, device):
        "auto, cpu, cuda or cuda:N (default auto); several times for one worker per device, one queue."
        self["devices"].append(device)

    def parseOptions(self, options=None):
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            raise OptionError(str(e).removeprefix("Parameter type enforcement failed: ")) from None

    def read_token_file(self):
        """``token``: the token of ``--token-file`` (16 characters or more), or None without one."""
        self["token"] = None
        if self["token-file"] is not None:
            try:
                self["token"] = read_server_token(self["token-file"])
            except ValueError as e:
                raise usage.UsageError(str(e)) from None

    def check_workers(self):
        """Check ``--device``, ``--dtype`` and ``--cache-size``; a UsageError naming the option."""
        self["devices"] = self["devices"] or ["auto"]
        for device in self["devices"]:
            if not DEVICE_RE.match(device):
                raise usage.UsageError(f"--device must be auto, cpu, cuda or cuda:N, not {device!r}")
        if len(self["devices"]) > MAX_WORKERS:
            raise usage.UsageError(f"--device: at most {MAX_WORKERS} workers")
        self["device"] = self["devices"][0]
        if self["dtype"] not in DTYPES:
            raise usage.UsageError(f"--dtype must be one of {', '.join(DTYPES)}, not {self['dtype']!r}")
        if self["text-encoders"] not in TEXT_ENCODER_PLACES:
            raise usage.UsageError(
                f"--text-encoders must be {' or '.join(TEXT_ENCODER_PLACES)}, not {self['text-encoders']!r}")
        if self["preview-decoder"] not in PREVIEW_DECODERS:
            raise usage.UsageError(
                f"--preview-decoder must be one of {', '.join(PREVIEW_DECODERS)}, not {self['preview-decoder']!r}")
        try:
            self["cache-models"], self["cache-bytes"] = parse_cache_size(self["cache-size"])
        except ValueError as e:
            raise usage.UsageError(f"--cache-size: {e}")


class Options(WorkerOptions):
    synopsis = "[options]"
    longdesc = (
        "Serve Stable Diffusion models from a model folder over the legacy runai socket "
        "protocol. Binds to 127.0.0.1 unless told otherwise. Writes nothing to disk unless --db is given."
    )
    optFlags = [
        ["log-prompts", None, "Log each request's prompts (at debug level). Off by default: prompts are "
                              "private, and twistd writes debug events to its log."],
        ["auto-shutdown", None, "Stop when no client connected within --timeout of start, "
                                "and --timeout after the last client left; an 'x' packet stops the server."],
        *ops_options.FLAGS,
    ]
    optParameters = [
        ["host", None, "127.0.0.1", "Interface to listen on (ignored with --listen)."],
        ["port", "p", 50007, "TCP port to listen on (ignored with --listen).", _number(int, "port")],
        ["listen", None, None, "A Twisted server endpoint description that overrides --host and "
                               "--port, e.g. tcp:50007:interface=0.0.0.0 or ssl:... for TLS."],
        ["http", None, None, "Also serve an AUTOMATIC1111-compatible HTTP API on this Twisted endpoint, e.g. "
                             "tcp:7860:interface=127.0.0.1 (off unless given)."],
        ["openai", None, None, "Also serve OpenAI's images API (/v1/images/...) on this Twisted endpoint, e.g. "
                               "tcp:8000:interface=127.0.0.1 (off unless given).",
         lambda description: checked_endpoint("openai", description)],
        ["model-dir", "m", "~/stablediffusion", "The model folder; clients can reach nothing outside it."],
        ["packet-size", None, framing.DEFAULT_PACKET_SIZE, "Packet size in bytes (the legacy clients use 1024).",
         _number(int, "packet-size")],
        ["max-message-size", None, framing.DEFAULT_MAX_MESSAGE_SIZE,
         "Largest request in bytes; a larger one is refused and its connection closed.",
         _number(int, "max-message-size")],
        ["timeout", None, 60.0, "Seconds without a client before an --auto-shutdown server stops.",
         _number(float, "timeout")],
        ["idle-timeout", None, 60.0, "Drop a connection that sent part of a message, then nothing for this long "
                                     "(seconds).", _number(float, "idle-timeout")],
        ["shutdown-timeout", None, 5.0, "Seconds a stop waits for the running denoising step to end; the server "
                                        "exits after that even if it has not.", _number(float, "shutdown-timeout")],
        *WORKER_PARAMETERS,
        ["db", None, None, "Keep a history of requests and images in this SQLCipher database file "
                           "(encrypted; created if missing). Without it nothing is written."],
        ["db-key-file", None, None, "A file holding the --db key (else the RUNAI_DB_KEY environment "
                                    "variable; never on the command line)."],
        ["token-file", None, None, "A file holding a shared secret that every request must carry as "
                                   "\"token\" (for servers listening beyond loopback)."],
        ["missing-safety-checker", None, "unchecked",
         "When a client asks for the NSFW filter and CompVis/stable-diffusion-safety-checker is not in "
         "the model folder: 'refuse' the request, or generate 'unchecked' and say so in each reply."],
        # A front server: runai.broker.options says the same for twistd runai-worker.
        ["broker", None, None, "Run no jobs here: put them on this Redis (redis://HOST:PORT/DB, rediss:// for "
                               "TLS) for twistd runai-worker processes (see docs/scale-out.md)."],
        ["broker-password-file", None, None, "A file holding the Redis password (else the RUNAI_BROKER_PASSWORD "
                                             "environment variable; never on the command line)."],
        ["broker-ca-file", None, None, "The CA certificate(s) the rediss:// server's certificate must chain to."],
        *ops_options.PARAMETERS,
    ]

    def postOptions(self):
        if not 0 <= self["port"] <= 65535:
            raise usage.UsageError(f"--port must be between 0 and 65535, not {self['port']}")
        if not 16 <= self["packet-size"] <= 1024 * 1024:
            raise usage.UsageError("--packet-size must be between 16 and 1048576 bytes")
        if not self["packet-size"] <= self["max-message-size"] <= 1024 ** 3:
            raise usage.UsageError("--max-message-size must be between --packet-size and 1 GiB")
        for name in ("timeout", "idle-timeout", "shutdown-timeout"):
            if not self[name] > 0:
                raise usage.UsageError(f"--{name} must be a positive number of seconds")
        self.check_workers()
        if self["missing-safety-checker"] not in ("refuse", "unchecked"):
            raise usage.UsageError("--missing-safety-checker must be 'refuse' or 'unchecked'")
        self["model-dir"] = checked_model_dir(self["model-dir"])
        self.read_token_file()
        self["db-key"] = None
        if self["db"] is not None or self["db-key-file"] is not None:
            from runai.history.key import check_options  # only with --db: without it no store code runs
            check_options(self)
        if self["broker"] is not None or self["broker-password-file"] or self["broker-ca-file"]:
            from runai.broker.options import check  # only with --broker: without it no broker code runs
            check(self)
        if self["listen"] is None:
            host = endpoints.quoteStringArgument(self["host"])
            self["endpoint"] = f"tcp:port={self['port']}:interface={host}"
        else:
            self["endpoint"] = checked_endpoint("listen", self["listen"])
        if self["http"] is not None:
            checked_endpoint("http", self["http"])
        ops_options.check(self)
