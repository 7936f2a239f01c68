# -*- test-case-name: runai.test.test_broker_e2e,runai.test.test_health -*-
"""``twistd runai-worker --broker URL --model-dir DIR --device cuda:0 [--device cuda:1]``:
GPU workers for front servers on other machines, through Redis.

One :class:`runai.backends.local.LocalWorker` per ``--device`` (as ``twistd runai``
builds them), each served by one :class:`runai.broker.consumer.Consumer`. Listens on
nothing but ``--metrics`` (guarded by ``--token-file``); connects to Redis only. Imports
nothing heavy: torch loads in the worker threads.
"""

import os
import socket

from twisted.application import service
from twisted.logger import Logger
from twisted.python import usage

from runai.broker import options as broker_options
from runai.broker.cancels import CancelListener
from runai.broker.client import RedisConnection, make_redis
from runai.broker.consumer import Consumer
from runai.models.library import ModelLibrary
from runai.ops import options as ops_options
from runai.options import WORKER_PARAMETERS, WorkerOptions, _number, checked_model_dir
from runai.tap import announced_service, existing_temporary_folder, local_workers

log = Logger(namespace="runai.worker")


class Options(WorkerOptions):
    synopsis = "--broker URL [options]"
    longdesc = ("Run Stable Diffusion jobs that front servers (twistd runai --broker URL) put on a Redis "
                "stream, one worker per --device. Listens on nothing but --metrics, if given.")
    optParameters = broker_options.PARAMETERS + [
        ["model-dir", "m", "~/stablediffusion", "The model folder; jobs name models relative to it, as in the "
                                                "front's folder, and reach nothing outside it."],
        *WORKER_PARAMETERS,
        ["shutdown-timeout", None, 5.0, "Seconds a stop waits for the running denoising step to end.",
         _number(float, "shutdown-timeout")],
        ["claim-timeout", None, 30.0, "Seconds without a heartbeat before another worker takes a job over from "
                                      "one that stopped answering (it beats every third of this).",
         _number(float, "claim-timeout")],
        ["max-deliveries", None, 3, "A job taken this many times without finishing fails instead of running "
                                    "again.", _number(int, "max-deliveries")],
        ["name", None, None, "This process's name among the workers (default: host-pid); each device adds -N."],
        ["token-file", None, None, "A file holding a shared secret that every --metrics request must carry "
                                   "(Authorization: Bearer TOKEN, or HTTP Basic with it as the password) unless "
                                   "--metrics-public; a worker takes no other request."],
        *ops_options.PARAMETERS,
    ]
    optFlags = ops_options.FLAGS

    def postOptions(self):
        broker_options.check(self, required=True)
        self.check_workers()
        if not self["claim-timeout"] >= 0.3:
            raise usage.UsageError("--claim-timeout must be at least 0.3 seconds")
        if not 1 <= self["max-deliveries"] <= 100:
            raise usage.UsageError("--max-deliveries must be between 1 and 100")
        if not self["shutdown-timeout"] > 0:
            raise usage.UsageError("--shutdown-timeout must be a positive number of seconds")
        self["model-dir"] = checked_model_dir(self["model-dir"])
        self["name"] = self["name"] or f"{socket.gethostname()}-{os.getpid()}"
        self.read_token_file()
        if self["token"] is not None and self["metrics"] is None:
            raise usage.UsageError("--token-file needs --metrics: on runai-worker it guards only the metrics")
        ops_options.check(self)


class _Announce(service.Service):
    """Says the workers are up (scripts and tests wait for the line), and loads torch and
    the engine in each worker's thread."""

    def __init__(self, workers, config):
        self.workers = workers
        self.config = config

    def startService(self):
        super().startService()
        log.info("runai worker {name}: {n} device(s) ({devices}) taking jobs from {broker}, models in {models}",
                 name=self.config["name"], n=len(self.workers), devices=", ".join(self.config["devices"]),
                 broker=self.config["broker-address"].display, models=self.config["model-dir"])
        if not os.path.isdir(self.config["model-dir"]):
            log.warn("The model folder {models} does not exist yet", models=self.config["model-dir"])
        for worker in self.workers:
            worker.warm_up()


def makeService(config, reactor=None):
    if reactor is None:
        from twisted.internet import reactor
    # As twistd runai: diffusers imports torch._dynamo, which wants this folder to exist.
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", existing_temporary_folder())
    top = service.MultiService()
    library = ModelLibrary(config["model-dir"])
    workers = local_workers(config, reactor, library)
    # A blocking read per consumer, the cancel listener's, and room for events and heartbeats.
    connection = RedisConnection(make_redis(config["broker-address"]), reactor, threads=2 * len(workers) + 4)
    connection.setServiceParent(top)
    consumers = []
    served = workers
    if config.get("metrics") is not None:
        from runai.ops.wiring import worker_metrics  # only with --metrics: prometheus_client loads then

        served, site, started = worker_metrics(config, reactor, workers)
        metrics = announced_service(config["metrics"], site, started, reactor)
        metrics.setName("metrics")
        metrics.setServiceParent(top)
    for index, worker in enumerate(workers):
        worker.setServiceParent(top)
        consumer = Consumer(connection, served[index], reactor, config["model-dir"], f"{config['name']}-{index}",
                            deadline=config["claim-timeout"], max_deliveries=config["max-deliveries"],
                            device=worker.device)
        consumer.setServiceParent(top)
        consumers.append(consumer)
    CancelListener(connection, reactor, consumers).setServiceParent(top)
    _Announce(workers, config).setServiceParent(top)
    return top
