# -*- test-case-name: runai.test.test_cli_systemd -*-
"""``runai systemd-unit --worker --broker URL``: a systemd unit for ``twistd runai-worker``.

The server's unit (:mod:`runai.cli.systemd`) with the worker's command line and the same
sandbox, but for the network: a worker listens on nothing and must reach its broker. A
broker named by IP address (or ``localhost``) is the only address it may reach besides
loopback (``IPAddressAllow=``); one named by host name leaves the unit without an IP filter,
since its address is only known once resolved. The Redis password never appears in the
unit: ``--broker-password-file`` names a file (made absolute), or an ``EnvironmentFile=``
(mode 600) gives ``RUNAI_BROKER_PASSWORD``.
"""

import ipaddress
import os
import shlex
import sys

import runai
from runai.broker.url import PASSWORD_VARIABLE, parse_url
from runai.cli import systemd

# runai-worker's options whose value is a file, made absolute.
PATH_OPTIONS = ("--broker-password-file", "--broker-ca-file", "--token-file")
OWN_OPTIONS = ("-m", "--model-dir", "--broker")


def network_lines(host):
    """The sandbox's network part: loopback and the broker's address, or no IP filter."""
    if host == "localhost":
        return ["# Network: loopback only, where the broker is.", "IPAddressDeny=any", "IPAddressAllow=localhost"]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return [f"# Network: the broker is named by host name ({host}), so no IP filter is set (its address is",
                "# known only once resolved). Give --broker an IP address to let the worker reach loopback",
                "# and the broker only (IPAddressDeny=any, IPAddressAllow=localhost ADDRESS)."]
    return ["# Network: loopback and the broker only.", "IPAddressDeny=any", f"IPAddressAllow=localhost {address}"]


def worker_options(options):
    """runai-worker's extra options, path values made absolute."""
    options = list(options[1:] if options[:1] == ["--"] else options)
    i = 0
    while i < len(options):
        name, equals, value = options[i].partition("=")
        if name in OWN_OPTIONS:
            raise systemd.UnitError(f"give {name} as runai systemd-unit's own option, before --")
        if name in PATH_OPTIONS:
            if not equals:
                i += 1
                if i == len(options):
                    raise systemd.UnitError(f"{name} needs a value")
                value = options[i]
            value = os.path.abspath(os.path.expanduser(value))
            options[i] = f"{name}={value}" if equals else value
        i += 1
    return options


def worker_unit(broker, user=None, model_dir=None, password_file=None, ca_file=None, options=()):
    """``(unit text, warnings)`` for a worker of this install; raises UnitError."""
    user = user or systemd.default_user()
    try:
        home = systemd.pwd.getpwnam(user).pw_dir
    except KeyError:
        raise systemd.UnitError(f"there is no user {user!r} on this machine (--user)") from None
    try:
        # Only the URL: the password file may be readable by the service's user alone.
        address = parse_url(broker)
    except ValueError as e:
        raise systemd.UnitError(f"--broker: {e}") from None
    if ca_file is not None and not address.tls:
        raise systemd.UnitError("--broker-ca-file needs a rediss:// URL")
    twistd = os.path.join(os.path.dirname(os.path.abspath(sys.executable)), "twistd")
    if not os.access(twistd, os.X_OK):
        raise systemd.UnitError(f"there is no twistd beside {sys.executable}; run the runai of the environment "
                                "that serves (.venv/bin/runai systemd-unit)")
    workdir = os.path.dirname(os.path.dirname(os.path.abspath(runai.__file__)))
    model_dir = os.path.abspath(os.path.expanduser(model_dir) if model_dir else os.path.join(home, "stablediffusion"))
    own = ["--broker", broker]
    for name, path in (("--broker-password-file", password_file), ("--broker-ca-file", ca_file)):
        if path is not None:
            own += [name, os.path.abspath(os.path.expanduser(path))]
    extra = worker_options(list(options))
    warnings = []
    if not os.path.isdir(model_dir):
        warnings.append(f"the model folder {model_dir} does not exist (yet)")
    if password_file is None and not any(w.partition("=")[0] == "--broker-password-file" for w in extra):
        warnings.append("no --broker-password-file: the worker reads RUNAI_BROKER_PASSWORD from its environment; "
                        "uncomment the unit's EnvironmentFile= line, or Redis is reached without a password")
    if user == "root":
        warnings.append("the unit runs the worker as root; name its user with --user")
    command = [twistd, "--nodaemon", "--pidfile=", "--logfile=-", "runai-worker", *own, "--model-dir", model_dir,
               *extra]
    made_by = ["runai", "systemd-unit", "--worker", "--user", user, "--model-dir", model_dir, *own] + (
        ["--", *extra] if extra else [])
    lines = [
        f"# A runai worker as a system service: {user} runs twistd runai-worker of the install in {workdir},",
        f"# taking jobs from the broker at {address.display}.",
        f"# Made by: {shlex.join(made_by)}",
        "# Install it (docs/operations.md#systemd):",
        "#   sudo install -m 644 runai-worker.service /etc/systemd/system/runai-worker.service",
        "#   sudo systemctl daemon-reload && sudo systemctl enable --now runai-worker",
        "#   journalctl -u runai-worker -f",
        "[Unit]",
        f"Description=runai worker ({user}) for {address.display}",
        "After=network-online.target",
        "Wants=network-online.target",
        "",
        "[Service]",
        "Type=simple",
        f"User={user}",
        "# Foreground, no pid file, logs to stdout (journald). It listens on nothing.",
        "ExecStart=" + " ".join(systemd.exec_word(w) for w in command),
        f"# The Redis password: --broker-password-file names a file readable by {user} only (mode 600),",
        f"# or this file (mode 600, owned by root: systemd reads it) holds {PASSWORD_VARIABLE}=...; never",
        "# the URL, where every user of the machine reads it.",
        "#EnvironmentFile=/etc/runai/worker.env",
        f"WorkingDirectory={systemd.path_value(workdir)}",
        "Restart=on-failure",
        "RestartSec=5",
        "Environment=HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1",
        "",
        "# Sandboxing: nothing to write; no network but the broker's.",
        systemd.SANDBOX_RULES.rstrip("\n"),
        *network_lines(address.host),
        systemd.GPU.rstrip("\n"),
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ]
    return "\n".join(lines), warnings


def unit_command(args):
    """``runai systemd-unit``: the worker's unit with ``--worker``, else the server's."""
    if not args.worker:
        if args.broker or args.broker_password_file or args.broker_ca_file:
            print("runai systemd-unit: --broker and its options are for a worker's unit: add --worker",
                  file=sys.stderr)
            return 1
        return systemd.systemd_unit_command(args)
    if not args.broker:
        print("runai systemd-unit: --worker needs --broker redis://HOST:PORT/DB (or rediss://)", file=sys.stderr)
        return 1
    return systemd.print_unit(worker_unit, args.broker, args.user, args.model_dir, args.broker_password_file,
                              args.broker_ca_file, args.options)


def add_commands(commands):
    """``systemd-unit`` (:mod:`runai.cli.systemd`) with the worker's options."""
    u = systemd.add_commands(commands)
    u.add_argument("--worker", action="store_true",
                   help="a unit for twistd runai-worker (GPU worker of a front on another machine) instead of "
                        "the server (default); options after -- are added to runai-worker's (e.g. -- --device cuda:0)")
    u.add_argument("--broker", default=None, metavar="URL",
                   help="with --worker: the Redis URL, no password in it (default: none)")
    u.add_argument("--broker-password-file", default=None, metavar="FILE",
                   help="with --worker: the file holding the Redis password (default: none; an "
                        f"EnvironmentFile= with {PASSWORD_VARIABLE})")
    u.add_argument("--broker-ca-file", default=None, metavar="FILE",
                   help="with --worker: the CA certificate(s) of a rediss:// broker (default: the system's)")
    u.set_defaults(func=unit_command)
    return u
