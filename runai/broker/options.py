# -*- test-case-name: runai.test.test_broker_url -*-
"""The ``--broker`` options, shared by ``twistd runai`` (a front) and ``twistd runai-worker``."""

from twisted.python import usage

from runai.broker.url import PASSWORD_VARIABLE, parse_url

PARAMETERS = [
    ["broker", None, None, "A Redis URL, redis://HOST:PORT/DB or rediss://HOST:PORT/DB (TLS): jobs go through "
                           "it from front servers to runai-worker processes (no password in it: see "
                           "--broker-password-file)."],
    ["broker-password-file", None, None, f"A file holding the Redis password (else the {PASSWORD_VARIABLE} "
                                         "environment variable; never on the command line)."],
    ["broker-ca-file", None, None, "The CA certificate(s) that the rediss:// server's certificate must chain to "
                                   "(default: the system's)."],
]


def check(config, required=False):
    """``config["broker-address"]`` from the options; a UsageError naming the option."""
    config["broker-address"] = None
    if config.get("broker") is None:
        if required:
            raise usage.UsageError("--broker is required: redis://HOST:PORT/DB or rediss://HOST:PORT/DB")
        if config.get("broker-password-file") or config.get("broker-ca-file"):
            raise usage.UsageError("--broker-password-file and --broker-ca-file need --broker")
        return
    try:
        config["broker-address"] = parse_url(config["broker"], config.get("broker-password-file"),
                                             config.get("broker-ca-file"))
    except ValueError as e:
        raise usage.UsageError(f"--broker: {e}") from None
