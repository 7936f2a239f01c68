# -*- test-case-name: runai.test.test_cli -*-
"""What every ``runai`` subcommand that talks to a server shares: the connection
options, the server's token, and the client they make."""

import argparse
import os

from runai.client import BlockingClient
from runai.doors.legacy import framing


def connection_options():
    """The options of every command that asks a server: an argparse parent parser."""
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--host", default="127.0.0.1")
    options.add_argument("--port", type=int, default=50007)
    options.add_argument("--packet-size", type=int, default=framing.DEFAULT_PACKET_SIZE)
    options.add_argument("--token-file", default=None,
                         help="file holding the server's token (or set RUNAI_TOKEN)")
    options.add_argument("--tls", action="store_true",
                         help="connect over TLS (a server listening with ssl:), verifying its certificate "
                              "and host name against the system's trust store, or --ca-file")
    options.add_argument("--ca-file", default=None, metavar="FILE",
                         help="PEM certificate(s) to trust instead of the system's, e.g. a self-signed "
                              "server's cert.pem (implies --tls)")
    return options


def token(args):
    """The server's shared secret: from a file or the environment, never the command line."""
    if args.token_file:
        with open(os.path.expanduser(args.token_file), encoding="utf-8") as f:
            return f.read().strip()
    return os.environ.get("RUNAI_TOKEN") or None


def connect(args, timeout=120):
    """A :class:`BlockingClient` connected to the server that ``args`` name; ``timeout``
    (seconds, None: none) bounds the connection and each read."""
    return BlockingClient(args.host, args.port, args.packet_size, timeout=timeout, token=token(args),
                          tls=args.tls or args.ca_file is not None, ca_file=args.ca_file)
