# -*- test-case-name: runai.test.test_tap -*-
"""``twistd runai``: the service tree that wires the core, its back end (local workers,
or a broker), its doors (the legacy socket, HTTP) and the history. The options are
:mod:`runai.options`.

Imports nothing heavy: torch is imported in the worker thread once the server listens.
"""

import atexit
import ipaddress
import os
import sys

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import defer, endpoints
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger
from zope.interface import implementer

from runai.backends.local import LocalWorker
from runai.core.queue import JobQueue
from runai.core.service import Core
from runai.doors.legacy.factory import RunaiFactory
from runai.models.library import ModelLibrary
from runai.options import Options  # twistd reads a plugin's Options here

log = Logger(namespace="runai.tap")

__all__ = ["Options", "makeService", "local_workers", "existing_temporary_folder"]


def _is_loopback(host):
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


@implementer(IStreamServerEndpoint)
class _Announced:
    """An endpoint whose listening is announced: the address logged (``runai listening
    on``, which scripts wait for), then ``started(port)``; a failure to listen is logged
    and stops the reactor rather than leave a server that serves nothing."""

    log = Logger(namespace="runai.tap")

    def __init__(self, endpoint, description, started, reactor):
        self.endpoint = endpoint
        self.description = description
        self.started = started
        self.reactor = reactor

    def listen(self, factory):
        return self.endpoint.listen(factory).addCallbacks(self._listened, self._failed)

    def _listened(self, port):
        self.started(port)
        return port

    def _failed(self, failure):
        if failure.check(defer.CancelledError):
            return None
        error = failure.value
        if failure.check(CannotListenError):
            cause = getattr(error.socketError, "strerror", None) or error.socketError
            line = f"cannot listen on {self.description}: {str(cause).lower()}"
            self.log.error("runai: {line}", line=line)
        else:
            line = f"cannot listen on {self.description}: {type(error).__name__}: {error}"
            self.log.failure("runai could not listen on {description}", failure, description=self.description)
        self.fail_start(line)
        return None

    def fail_start(self, line):
        """End a start that cannot serve: ``line`` on stderr, the reactor stopped, and exit
        status 1 once twistd has cleaned up (twistd has no way to say it itself), so that a
        service manager sees the failure at once and restarts the service."""
        # twistd sends sys.stderr to its log: this line goes to the process's own stderr.
        stderr = sys.__stderr__ or sys.stderr
        stderr.write(f"runai: {line}\n")
        stderr.flush()
        atexit.register(_exit_status, 1)
        # The listen may fail while twistd starts the services, before the reactor runs.
        if self.reactor.running:
            self.reactor.stop()
        else:
            self.reactor.callWhenRunning(self.reactor.stop)


def _exit_status(code):
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        if stream is not None:
            stream.flush()
    os._exit(code)


def _announce(factory, workers, model_dir, tls_endpoint):
    def started(port):
        address = port.getHost()
        log.info("runai listening on {host}:{port}, models in {models}",
                 host=getattr(address, "host", address), port=getattr(address, "port", ""), models=model_dir)
        if not _is_loopback(getattr(address, "host", "127.0.0.1")) and not tls_endpoint:
            log.warn("Listening beyond loopback: anyone who can reach this port can queue jobs on "
                     "this machine; prefer an ssl: endpoint on networks you do not trust")
            if factory.core.store is not None and factory.token is None:
                log.warn("--db without --token-file beyond loopback: anyone who can reach this port "
                         "can read and delete the history")
        if not model_dir.is_dir():
            log.warn("The model folder {models} does not exist yet", models=model_dir)
        factory.server_started()
        for worker in workers:
            worker.warm_up()
    return started


def existing_temporary_folder():
    """The temporary folder, found without writing anything: ``tempfile.gettempdir()``
    creates and deletes a probe file there to test it."""
    for name in ("TMPDIR", "TEMP", "TMP"):
        folder = os.environ.get(name)
        if folder and os.path.isdir(folder):
            return folder
    for folder in ("/tmp", "/var/tmp", "/usr/tmp"):
        if os.path.isdir(folder):
            return folder
    return os.getcwd()


def local_workers(config, reactor, library):
    """One :class:`LocalWorker` per ``--device``, each with its own thread, pipelines and
    cache, all reading the one model ``library``. Several workers share the CPU's cores
    between them (torch's intra-op threads), so that two CPU workers do not each try to
    use every core."""
    devices = config.get("devices") or [config.get("device", "auto")]
    cpu_threads = max(1, (os.cpu_count() or 1) // len(devices)) if len(devices) > 1 else None
    return [
        LocalWorker(reactor, device=device, dtype=config["dtype"], stop_timeout=config.get("shutdown-timeout", 5.0),
                    name=f"runai-worker-{index}-{device}", cpu_threads=cpu_threads,
                    idle_unload=config.get("idle-unload"), engine_options=dict(
                        library=library, cache_models=config.get("cache-models", 2),
                        cache_bytes=config.get("cache-bytes"), text_encoders=config.get("text-encoders", "device"),
                        preview_decoder=config.get("preview-decoder", "auto")))
        for index, device in enumerate(devices)
    ]


def makeService(config, reactor=None, pool=None):
    """The service tree: the history store (with --db), the worker, the queue, then the
    listening door. Started in that order, stopped in reverse: the door stops taking
    clients, the queue answers every job, the worker's thread is joined, the store writes
    what is left and closes.

    ``pool`` parses large requests and scans the model folder off the reactor thread: by
    default the global reactor's own pool; None with a given ``reactor`` runs them in line.
    """
    if reactor is None:
        from twisted.internet import reactor

        if pool is None:
            pool = reactor.getThreadPool()

    stopping = []

    def stop():
        # Once only: a second x packet, or one during Ctrl-C, must not raise ReactorNotRunning.
        if reactor.running and not stopping:
            stopping.append(True)
            reactor.stop()

    top = service.MultiService()
    recorder = None
    if config.get("db") is not None:
        from runai.history import store as history_store
        from runai.history.recorder import Recorder

        store = history_store.from_config(config, reactor)  # a wrong key stops here, with a message
        store.setServiceParent(top)
        recorder = Recorder(store)
    # diffusers imports torch._dynamo, which creates $TMPDIR/torchinductor_$USER at import
    # time; runai compiles nothing. A folder that exists keeps "writes nothing" true.
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", existing_temporary_folder())
    # One library: the models action lists it, the worker loads from it.
    library = ModelLibrary(config["model-dir"])
    if config.get("broker") is not None:
        from runai.broker.wiring import front_backend  # a front server: the workers are elsewhere

        workers, queue = [], front_backend(config, reactor, top)
    else:
        workers = local_workers(config, reactor, library)
        for worker in workers:
            worker.setServiceParent(top)
        queue = JobQueue(workers)
        queue.setServiceParent(top)
    core = Core(queue, library, reactor, pool=pool, recorder=recorder,
                refuse_unchecked=config["missing-safety-checker"] == "refuse", log_prompts=config["log-prompts"])
    factory = RunaiFactory(
        core, reactor, parse_pool=pool, stop=stop,
        packet_size=config["packet-size"], max_message_size=config["max-message-size"],
        idle_timeout=config["idle-timeout"], auto_shutdown=config["auto-shutdown"], timeout=config["timeout"],
        token=config["token"],
    )
    started = _announce(factory, workers, library.model_dir, tls_endpoint=config["endpoint"].startswith("ssl:"))
    endpoint = _Announced(endpoints.serverFromString(reactor, config["endpoint"]), config["endpoint"], started,
                          reactor)
    StreamServerEndpointService(endpoint, factory).setServiceParent(top)
    if config.get("http") is not None:
        _http_door(config, core, reactor, pool).setServiceParent(top)
    if config.get("openai") is not None:
        _openai_door(config, core, reactor, pool).setServiceParent(top)
    if config.get("metrics") is not None:
        from runai.ops.wiring import front_metrics  # only with --metrics: prometheus_client loads then

        site, started = front_metrics(config, reactor, core, workers, services=list(top))  # top: its doors
        metrics = announced_service(config["metrics"], site, started, reactor)
        metrics.setName("metrics")
        metrics.setServiceParent(top)
    return top


def announced_service(description, factory, started, reactor):
    """A service that listens on the endpoint ``description`` with ``factory``, and calls
    ``started(port)`` once it does; a failure to listen ends the start (:class:`_Announced`)."""
    endpoint = _Announced(endpoints.serverFromString(reactor, description), description, started, reactor)
    return StreamServerEndpointService(endpoint, factory)


def _openai_door(config, core, reactor, pool):
    """OpenAI's images API (``--openai``), on the same core."""
    from runai.doors.http.site import with_backlog
    from runai.doors.openai.api import Api
    from runai.doors.openai.site import make_site

    site = make_site(Api(core, reactor, pool=pool, token=config["token"]), max_body=config["max-message-size"],
                     timeout=config["idle-timeout"], reactor=reactor)

    def started(port):
        address = port.getHost()
        host = getattr(address, "host", "127.0.0.1")
        log.info("runai OpenAI API listening on {host}:{port}", host=host, port=getattr(address, "port", ""))
        if not _is_loopback(host) and (config["token"] is None or not config["openai"].startswith("ssl:")):
            log.warn("The OpenAI API listens beyond loopback without --token-file and an ssl: endpoint: anyone "
                     "who can reach it can queue jobs and read what it answers")

    endpoint = _Announced(endpoints.serverFromString(reactor, with_backlog(config["openai"])), config["openai"],
                          started, reactor)
    return StreamServerEndpointService(endpoint, site)


def _http_door(config, core, reactor, pool):
    """The AUTOMATIC1111-compatible HTTP door (``--http``), on the same core."""
    from runai.doors.http.api import Api
    from runai.doors.http.site import make_site, with_backlog

    site = make_site(Api(core, reactor, pool=pool, token=config["token"]), max_body=config["max-message-size"],
                     timeout=config["idle-timeout"], reactor=reactor)

    def started(port):
        address = port.getHost()
        host = getattr(address, "host", "127.0.0.1")
        log.info("runai HTTP API listening on {host}:{port}", host=host, port=getattr(address, "port", ""))
        if not _is_loopback(host) and (config["token"] is None or not config["http"].startswith("ssl:")):
            log.warn("The HTTP API listens beyond loopback without --token-file and an ssl: endpoint: anyone "
                     "who can reach it can queue jobs and read what it answers")

    endpoint = _Announced(endpoints.serverFromString(reactor, with_backlog(config["http"])), config["http"], started,
                          reactor)
    return StreamServerEndpointService(endpoint, site)
