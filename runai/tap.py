"""``twistd runai``: command-line options and the service tree.

Imports nothing heavy: torch is imported in the worker thread once the server listens.
"""

import ipaddress
import os
import re
import tempfile

from twisted.application import service
from twisted.internet import endpoints
from twisted.logger import Logger
from twisted.python import usage

from runai.doors.legacy import framing
from runai.doors.legacy.factory import RunaiFactory
from runai.core.queue import Worker

DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")
DTYPES = ("auto", "float16", "bfloat16", "float32")


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


def _positive(kind):
    def convert(value):
        number = kind(value)
        if number <= 0:
            raise ValueError(f"must be positive, not {value}")
        return number
    return convert


class Options(usage.Options):
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
    ]
    optParameters = [
        ["host", None, "127.0.0.1", "Interface to listen on (ignored with --listen)."],
        ["port", "p", 50007, "TCP port to listen on (ignored with --listen).", int],
        ["listen", None, None, "A Twisted server endpoint description that overrides --host and "
                               "--port, e.g. tcp:50007:interface=0.0.0.0 or ssl:... for TLS."],
        ["model-dir", "m", "~/stablediffusion", "The model folder; clients can reach nothing outside it."],
        ["packet-size", None, framing.DEFAULT_PACKET_SIZE, "Packet size in bytes (the legacy clients use 1024).", int],
        ["max-message-size", None, framing.DEFAULT_MAX_MESSAGE_SIZE,
         "Largest request in bytes; a larger one is refused and its connection closed.", int],
        ["timeout", None, 60.0, "Seconds without a client before an --auto-shutdown server stops.", float],
        ["idle-timeout", None, 60.0, "Drop a connection that sent part of a message, then nothing for this long "
                                     "(seconds).", float],
        ["device", None, "auto", "auto, cpu, cuda or cuda:N."],
        ["dtype", None, "auto", "auto (float16 on CUDA, float32 on CPU), float16, bfloat16 or float32."],
        ["cache-size", None, "2", "How many models to keep loaded (e.g. 2), or how much memory their weights "
                                  "may take (e.g. 8GiB, 6000MB); the least recently used one goes first."],
        ["db", None, None, "Keep a history of requests and images in this SQLCipher database file "
                           "(encrypted; created if missing). Without it nothing is written."],
        ["db-key-file", None, None, "A file holding the --db key (else the RUNAI_DB_KEY environment "
                                    "variable; never on the command line)."],
        ["token-file", None, None, "A file holding a shared secret that every request must carry as "
                                   "\"token\" (for servers listening beyond loopback)."],
        ["missing-safety-checker", None, "unchecked",
         "When a client asks for the NSFW filter and CompVis/stable-diffusion-safety-checker is not in "
         "the model folder: 'refuse' the request, or generate 'unchecked' and say so in each reply."],
    ]

    def postOptions(self):
        if not 0 <= self["port"] <= 65535:
            raise usage.UsageError(f"--port must be between 0 and 65535, not {self['port']}")
        if not 16 <= self["packet-size"] <= 1024 * 1024:
            raise usage.UsageError("--packet-size must be between 16 and 1048576 bytes")
        if not self["packet-size"] <= self["max-message-size"] <= 1024 ** 3:
            raise usage.UsageError("--max-message-size must be between --packet-size and 1 GiB")
        for name in ("timeout", "idle-timeout"):
            if not self[name] > 0:
                raise usage.UsageError(f"--{name} must be a positive number of seconds")
        if not DEVICE_RE.match(self["device"]):
            raise usage.UsageError(f"--device must be auto, cpu, cuda or cuda:N, not {self['device']!r}")
        if self["missing-safety-checker"] not in ("refuse", "unchecked"):
            raise usage.UsageError("--missing-safety-checker must be 'refuse' or 'unchecked'")
        if self["dtype"] not in DTYPES:
            raise usage.UsageError(f"--dtype must be one of {', '.join(DTYPES)}, not {self['dtype']!r}")
        try:
            self["cache-models"], self["cache-bytes"] = parse_cache_size(self["cache-size"])
        except ValueError as e:
            raise usage.UsageError(f"--cache-size: {e}")
        self["model-dir"] = os.path.realpath(os.path.expanduser(self["model-dir"]))
        self["token"] = None
        if self["token-file"] is not None:
            try:
                with open(os.path.expanduser(self["token-file"]), encoding="utf-8") as f:
                    self["token"] = f.read().strip()
            except (OSError, UnicodeDecodeError) as e:
                raise usage.UsageError(f"--token-file: cannot read {self['token-file']}: {e}")
            if len(self["token"]) < 16:
                raise usage.UsageError("--token-file: the token must be at least 16 characters")
        self["db-key"] = None
        if self["db"] is not None or self["db-key-file"] is not None:
            from runai.history.store import check_options  # only with --db: without it no store code runs
            check_options(self)
        if self["listen"] is None:
            host = endpoints.quoteStringArgument(self["host"])
            self["endpoint"] = f"tcp:port={self['port']}:interface={host}"
        else:
            self["endpoint"] = self["listen"]


def _is_loopback(host):
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


class WorkerService(service.Service):
    """Starts the worker thread first and stops it last (after the listener closes)."""

    def __init__(self, worker):
        self.worker = worker

    def startService(self):
        super().startService()
        self.worker.start()

    def stopService(self):
        super().stopService()
        self.worker.stop()


class ListenService(service.Service):
    log = Logger()

    def __init__(self, reactor, description, factory):
        self.reactor = reactor
        self.description = description
        self.factory = factory
        self.port = None
        self._listening = None

    def startService(self):
        super().startService()
        endpoint = endpoints.serverFromString(self.reactor, self.description)
        self._listening = endpoint.listen(self.factory)
        self._listening.addCallbacks(self._listened, self._failed)

    def _listened(self, port):
        self.port = port
        address = port.getHost()
        self.log.info("runai listening on {host}:{port}, models in {models}",
                      host=getattr(address, "host", address), port=getattr(address, "port", ""),
                      models=self.factory.model_dir)
        if not _is_loopback(getattr(address, "host", "127.0.0.1")):
            self.log.warn("Listening beyond loopback: anyone who can reach this port can queue jobs on "
                          "this machine; prefer an ssl: endpoint on networks you do not trust")
            if getattr(self.factory, "store", None) is not None and getattr(self.factory, "token", None) is None:
                self.log.warn("--db without --token-file beyond loopback: anyone who can reach this port "
                              "can read and delete the history")
        if not self.factory.model_dir.is_dir():
            self.log.warn("The model folder {models} does not exist yet", models=self.factory.model_dir)
        self.factory.server_started()
        self.factory.worker.warm_up()
        return port

    def _failed(self, failure):
        self.log.failure("runai could not listen on {description}", failure, description=self.description)
        if self.reactor.running:
            self.reactor.stop()

    def stopService(self):
        super().stopService()
        if self.port is not None:
            return self.port.stopListening()
        if self._listening is not None:
            self._listening.cancel()


def makeService(config, reactor=None):
    if reactor is None:
        from twisted.internet import reactor

    stopping = []

    def stop():
        # Once only: a second x packet, or one during Ctrl-C, must not raise ReactorNotRunning.
        if reactor.running and not stopping:
            stopping.append(True)
            reactor.stop()

    store = None
    if config.get("db") is not None:
        from runai.history import store as history_store
        store = history_store.from_config(config, reactor)  # a wrong key stops here, with a message
    # diffusers imports torch._dynamo, which creates $TMPDIR/torchinductor_$USER at import
    # time; runai compiles nothing. A folder that exists keeps "writes nothing" true.
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.gettempdir())
    worker = Worker(reactor, device=config["device"], dtype=config["dtype"], engine_options=dict(
        model_dir=config["model-dir"], cache_models=config.get("cache-models", 2),
        cache_bytes=config.get("cache-bytes"),
    ))
    factory = RunaiFactory(
        worker, config["model-dir"], clock=reactor, stop=stop,
        packet_size=config["packet-size"], max_message_size=config["max-message-size"],
        idle_timeout=config["idle-timeout"], auto_shutdown=config["auto-shutdown"], timeout=config["timeout"],
        refuse_unchecked=config["missing-safety-checker"] == "refuse",
        token=config["token"],
        log_prompts=config["log-prompts"], store=store,
    )
    top = service.MultiService()
    if store is not None:
        history_store.StoreService(store).setServiceParent(top)  # started first, stopped last
    WorkerService(worker).setServiceParent(top)
    ListenService(reactor, config["endpoint"], factory).setServiceParent(top)
    return top
