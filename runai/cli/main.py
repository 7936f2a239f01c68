# -*- test-case-name: runai.test.test_cli -*-
"""The ``runai`` command: talk to a running runai server from a shell."""

import argparse
import socket
import sys

from runai.cli import generate as generate_cli
from runai.cli import history as history_cli
from runai.cli import models as library_cli
from runai.cli import pull as pull_cli
from runai.cli import systemd_worker as systemd_cli
from runai.cli import upscale as upscale_cli
from runai.cli.common import CommandError, connect, connection_options, end_progress
from runai.client import ServerError
from runai.core import errors

# The codes that say the request itself was wrong or not allowed: the server refused it.
# Any other (internal, out_of_memory, model_load_failed, shutting_down...) is the server
# failing at something it took on.
REFUSALS = frozenset((
    errors.BAD_ENCODING, errors.BAD_JSON, errors.UNKNOWN_ACTION, errors.BAD_REQUEST, errors.OUT_OF_RANGE,
    errors.UNKNOWN_SCHEDULER, errors.PATH_OUTSIDE_MODEL_DIR, errors.MODEL_NOT_FOUND, errors.MESSAGE_TOO_LARGE,
    errors.QUEUE_FULL, errors.NOT_FOUND, errors.UNAUTHORIZED, errors.IDLE_TIMEOUT, errors.NO_STORE,
    errors.SAFETY_CHECKER_MISSING,
))


def ping(args):
    with connect(args, timeout=30) as client:
        pong = client.ping()
    workers = pong.get("workers")
    line = f"runai {pong.get('version')}: {pong.get('queued')} queued, {'busy' if pong.get('busy') else 'idle'}"
    print(line if workers is None else f"{line}, {workers} worker{'s' if workers != 1 else ''}")
    return 0


def parser():
    top = argparse.ArgumentParser(prog="runai", description="Talk to a runai server.")
    common = connection_options()
    commands = top.add_subparsers(dest="command", required=True)

    generate_cli.add_commands(commands, common)
    upscale_cli.add_commands(commands, common)

    p = commands.add_parser("ping", parents=[common], help="check that the server answers")
    p.set_defaults(func=ping)

    history_cli.add_commands(commands, common)
    library_cli.add_commands(commands, common)
    systemd_cli.add_commands(commands)
    pull_cli.add_commands(commands)
    return top


def server_error_line(e):
    """How the ``runai`` command reports the server's ``{"error": ...}``."""
    if e.code in REFUSALS:
        return f"runai: the server refused: {e.message} ({e.code})"
    if e.code == errors.CANCELLED:
        return f"runai: cancelled: {e.message} ({e.code})"
    return f"runai: the server failed: {e.message} ({e.code})"


def connection_error_line(args, e):
    """How the ``runai`` command reports a connection that could not be made or broke."""
    if not hasattr(args, "host"):
        return f"runai: {e}"
    where = f"{args.host}:{args.port}"
    if isinstance(e, ConnectionRefusedError):
        return f"runai: nothing listens on {where}; is the server running?"
    if isinstance(e, socket.gaierror):
        return f"runai: cannot find the host {args.host}: {e.strerror}"
    if isinstance(e, TimeoutError):
        return f"runai: {where} did not answer in time"
    if e.errno is None:
        return f"runai: {e}"  # the client's own one-line account (closed, TLS)
    return f"runai: the connection to {where} failed: {e.strerror}"


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        try:
            return args.func(args)
        finally:
            end_progress()  # what follows starts on a line of its own
    except CommandError as e:
        print(f"runai: {e}", file=sys.stderr)
    except ServerError as e:
        print(server_error_line(e), file=sys.stderr)
    except (ConnectionError, TimeoutError, socket.gaierror) as e:
        print(connection_error_line(args, e), file=sys.stderr)
    except OSError as e:
        print(f"runai: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        print("runai: interrupted", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
