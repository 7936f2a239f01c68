# -*- test-case-name: runai.test.test_metrics -*-
"""``--metrics ENDPOINT`` and ``--metrics-public``, taken by ``twistd runai`` and ``twistd
runai-worker`` alike. Imports nothing heavy: prometheus_client loads only with --metrics."""

import re

from twisted.python import usage

from runai import tls

PARAMETERS = [
    ["metrics", None, None, "Serve Prometheus metrics (/metrics) and a health check (/health) on this Twisted "
                            "endpoint, e.g. tcp:9108:interface=127.0.0.1, or a port number (on 127.0.0.1); "
                            "off unless given."],
]
FLAGS = [
    ["metrics-public", None, "Serve --metrics without the --token-file token (by default, when the server has "
                             "one, /metrics and /health need it as the HTTP API does)."],
]


def metrics_endpoint(value):
    """The endpoint description of ``--metrics``: a bare port number listens on 127.0.0.1
    (as ``--port`` does without ``--host``); anything else is a Twisted endpoint."""
    text = str(value).strip()
    if re.fullmatch(r"\d+", text):
        port = int(text)
        if not 0 <= port <= 65535:
            raise usage.UsageError(f"--metrics: port must be between 0 and 65535, not {port}")
        return f"tcp:port={port}:interface=127.0.0.1"
    if not text:
        raise usage.UsageError("--metrics needs an endpoint, e.g. tcp:9108:interface=127.0.0.1")
    return text


def check(config):
    """``config["metrics"]`` as an endpoint description Twisted can listen on (a
    UsageError naming the option otherwise); ``--metrics-public`` needs ``--metrics``."""
    if config.get("metrics") is None:
        if config.get("metrics-public"):
            raise usage.UsageError("--metrics-public needs --metrics")
        return
    description = metrics_endpoint(config["metrics"])
    try:
        tls.check_server_endpoint(description)
    except ValueError as e:
        raise usage.UsageError(f"--metrics: {e}") from None
    config["metrics"] = description
