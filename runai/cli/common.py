# -*- test-case-name: runai.test.test_cli -*-
"""What every ``runai`` subcommand that talks to a server shares: the connection
options, the server's token, and the client they make."""

import argparse
import os
import sys

from runai.client import BlockingClient
from runai.doors.legacy import framing
from runai.tokenfile import read_token


class CommandError(Exception):
    """What is wrong before anything is sent (a token file, an input file), in one line;
    the command prints it as ``runai: LINE`` and exits 1."""


class ProgressLine:
    """One line of progress on stderr, rewritten in place; :meth:`end` closes it, so that
    whatever is printed next (an error, "interrupted") starts on a line of its own."""

    current = None  # the line open now, if any: what main() ends before it prints

    def __init__(self, stream=None):
        self.stream = stream if stream is not None else sys.stderr
        self.open = False

    def show(self, text):
        self.stream.write(f"\r{text}")
        self.stream.flush()
        self.open = True
        ProgressLine.current = self

    def end(self):
        if self.open:
            self.stream.write("\n")
            self.stream.flush()
            self.open = False
        if ProgressLine.current is self:
            ProgressLine.current = None


def end_progress():
    """End the progress line left open, if any."""
    if ProgressLine.current is not None:
        ProgressLine.current.end()


def connection_options():
    """The options of every command that asks a server: an argparse parent parser."""
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--host", default="127.0.0.1", help="the server's host (default 127.0.0.1)")
    options.add_argument("--port", type=int, default=50007, help="the server's port (default 50007)")
    options.add_argument("--packet-size", type=int, default=framing.DEFAULT_PACKET_SIZE,
                         help=f"the server's --packet-size (default {framing.DEFAULT_PACKET_SIZE})")
    options.add_argument("--token-file", default=None, metavar="FILE",
                         help="file holding the server's token (default: the RUNAI_TOKEN environment variable, "
                              "or no token)")
    options.add_argument("--tls", action="store_true",
                         help="connect over TLS (a server listening with ssl:), verifying its certificate "
                              "and host name against the system's trust store, or --ca-file (default: plain TCP)")
    options.add_argument("--ca-file", default=None, metavar="FILE",
                         help="PEM certificate(s) to trust instead of the system's, e.g. a self-signed "
                              "server's cert.pem (implies --tls; default: the system's trust store)")
    return options


def token(args):
    """The server's shared secret: from a file or the environment, never the command line.
    A file that cannot be one (missing, empty, not text) is a :class:`CommandError`."""
    if args.token_file:
        try:
            return read_token(args.token_file)
        except ValueError as e:
            raise CommandError(str(e)) from None
    return os.environ.get("RUNAI_TOKEN") or None


def connect(args, timeout=120):
    """A :class:`BlockingClient` connected to the server that ``args`` name; ``timeout``
    (seconds, None: none) bounds the connection and each read."""
    return BlockingClient(args.host, args.port, args.packet_size, timeout=timeout, token=token(args),
                          tls=args.tls or args.ca_file is not None, ca_file=args.ca_file)
