# -*- test-case-name: runai.test.test_cli_systemd -*-
"""``runai systemd-unit``: print a systemd unit that runs this install's server.

The unit names this install's real paths: the ``twistd`` beside the Python that runs
this command (the virtual environment's), the folder that holds the ``runai`` package
(the checkout, for the README's install) as working directory, and the model folder,
so that ``systemd-analyze verify`` passes once it is installed as docs/operations.md says.
``systemd/runai@.service`` in the checkout is the same unit in template form, for a
checkout in ``~/runai`` (:func:`template_unit`; a test keeps the two the same).
"""

import argparse
import os
import pwd
import shlex
import sys

import runai

# twistd runai's options whose value is a file: made absolute, since the service does
# not start in the folder where the command was typed.
PATH_OPTIONS = ("--db", "--db-key-file", "--token-file")
MODEL_DIR_OPTIONS = ("-m", "--model-dir")

SANDBOX_RULES = """\
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=read-only
PrivateTmp=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
SystemCallArchitectures=native
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
"""
LOOPBACK_ONLY = """\
# No network egress: only loopback traffic passes. Serving a LAN (--listen with
# interface=0.0.0.0) needs IPAddressAllow= for that network as well.
IPAddressDeny=any
IPAddressAllow=localhost
"""
GPU = """\
# The GPU: /dev/nvidia* stay visible (no PrivateDevices=). Where the devices are not
# world-accessible, add SupplementaryGroups= with the group that owns them.
"""
SANDBOX = ("# Sandboxing: nothing to write, nothing to reach but loopback clients.\n"
           + SANDBOX_RULES + LOOPBACK_ONLY + GPU)

TEMPLATE_HEADER = """\
# runai as a system service for one user: `runai@alice` runs as alice, serves the models in
# /home/alice/stablediffusion from the checkout in /home/alice/runai (set up with the
# README's first command). A checkout anywhere else: print a unit with its real paths
# instead, `.venv/bin/runai systemd-unit > runai.service` (docs/operations.md#systemd); this
# file is that unit in template form. For a checkout in ~/runai:
#   sudo cp systemd/runai@.service /etc/systemd/system/
#   sudo systemctl enable --now runai@$USER
#   journalctl -u runai@$USER -f
"""


def exec_word(word, specifiers=False):
    """``word`` as one word of an ``ExecStart=`` line: ``$`` and ``\\`` (and ``%``,
    unless ``specifiers`` are meant) escaped, quoted when it holds white space."""
    word = word.replace("\\", "\\\\").replace('"', '\\"').replace("$", "$$")
    if not specifiers:
        word = word.replace("%", "%%")
    return f'"{word}"' if word == "" or any(c.isspace() or c == "'" for c in word) else word


def path_value(path, specifiers=False):
    """A path as the value of ``WorkingDirectory=``: ``%`` escaped."""
    return path if specifiers else path.replace("%", "%%")


def unit_text(header, description, user, home, twistd, workdir, model_dir, options=(), read_write=(),
              specifiers=False):
    """The unit, as text. ``specifiers``: the values hold systemd specifiers (``%i``) on
    purpose, so ``%`` is not escaped."""
    command = [twistd, "--nodaemon", "--pidfile=", "--logfile=-", "runai", "--model-dir", model_dir, *options]
    lines = [
        header + "[Unit]",
        f"Description={description}",
        "After=network.target",
        "",
        "[Service]",
        "Type=simple",
        f"User={user}",
        "# Foreground, no pid file, logs to stdout (journald): twistd leaves no file behind.",
        "ExecStart=" + " ".join(exec_word(w, specifiers) for w in command),
        "# Serving a LAN over TLS (docs/tls.md, \"TLS, for a server on a LAN\"): the key, its",
        f"# certificate and the token live in {home}/.config/runai/, a folder of mode 700 whose",
        f"# key.pem and token are mode 600: readable by {user}, the service's user, only (the service",
        "# reads them at start; it never needs them writable). Append to the ExecStart= line:",
        f"#   --token-file {home}/.config/runai/token --listen ssl:50007:interface=0.0.0.0:privateKey="
        f"{home}/.config/runai/key.pem:certKey={home}/.config/runai/cert.pem",
        "# and let the LAN in below (IPAddressAllow=). With a key or certificate that cannot serve,",
        "# each start fails at once: twistd's usage text in the journal ends with a line naming the file.",
        f"WorkingDirectory={path_value(workdir, specifiers)}",
        "Restart=on-failure",
        "RestartSec=5",
        "Environment=HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1",
        "",
        SANDBOX.rstrip("\n"),
    ]
    for path in read_write:
        lines.append("# The history (--db) is written here.")
        path = path_value(path, specifiers)
        lines.append(f'ReadWritePaths="{path}"' if any(c.isspace() for c in path) else f"ReadWritePaths={path}")
    lines += ["", "[Install]", "WantedBy=multi-user.target", ""]
    return "\n".join(lines)


def template_unit():
    """``systemd/runai@.service``: the unit for a checkout in ``~/runai``, one instance per user."""
    return unit_text(TEMPLATE_HEADER, "runai Stable Diffusion server for %i", "%i", "/home/%i",
                     "/home/%i/runai/.venv/bin/twistd", "/home/%i/runai", "/home/%i/stablediffusion", specifiers=True)


class UnitError(Exception):
    """What stops ``runai systemd-unit`` from printing a unit that would work, in one line."""


def default_user():
    """Who runs the command; under sudo, who called sudo."""
    if os.geteuid() == 0 and os.environ.get("SUDO_USER"):
        return os.environ["SUDO_USER"]
    return pwd.getpwuid(os.geteuid()).pw_name


def service_options(options):
    """twistd runai's extra options for ExecStart=, path values made absolute, and the
    folders the service must be able to write (that of ``--db``)."""
    options = list(options[1:] if options[:1] == ["--"] else options)
    read_write = []
    i = 0
    while i < len(options):
        name, equals, value = options[i].partition("=")
        if name in MODEL_DIR_OPTIONS:
            raise UnitError("give the model folder as runai systemd-unit's own --model-dir, before --")
        if name in PATH_OPTIONS:
            if not equals:
                i += 1
                if i == len(options):
                    raise UnitError(f"{name} needs a value")
                value = options[i]
            value = os.path.abspath(os.path.expanduser(value))
            options[i] = f"{name}={value}" if equals else value
            if name == "--db":
                read_write.append(os.path.dirname(value))
        i += 1
    return options, read_write


def install_unit(user=None, model_dir=None, options=()):
    """``(unit text, warnings)`` for this install; raises :class:`UnitError`."""
    user = user or default_user()
    try:
        home = pwd.getpwnam(user).pw_dir
    except KeyError:
        raise UnitError(f"there is no user {user!r} on this machine (--user)") from None
    twistd = os.path.join(os.path.dirname(os.path.abspath(sys.executable)), "twistd")
    if not os.access(twistd, os.X_OK):
        raise UnitError(f"there is no twistd beside {sys.executable}; run the runai of the environment "
                        "that serves (.venv/bin/runai systemd-unit)")
    workdir = os.path.dirname(os.path.dirname(os.path.abspath(runai.__file__)))
    model_dir = os.path.abspath(os.path.expanduser(model_dir) if model_dir else os.path.join(home, "stablediffusion"))
    options, read_write = service_options(list(options))
    warnings = []
    if not os.path.isdir(model_dir):
        warnings.append(f"the model folder {model_dir} does not exist (yet)")
    warnings += [f"{path} (the --db folder) does not exist; the service will not start without it"
                 for path in read_write if not os.path.isdir(path)]
    if read_write and not any(w.partition("=")[0] == "--db-key-file" for w in options):
        warnings.append("--db without --db-key-file: the service has no RUNAI_DB_KEY in its environment; "
                        "give the key's file with --db-key-file")
    if user == "root":
        warnings.append("the unit runs the server as root; name its user with --user")
    made_by = ["runai", "systemd-unit", "--user", user, "--model-dir", model_dir] + (["--", *options] if options else [])
    header = (
        f"# runai as a system service: {user} runs the server of the install in {workdir}.\n"
        f"# Made by: {shlex.join(made_by)}\n"
        "# Install it (docs/operations.md#systemd):\n"
        "#   sudo install -m 644 runai.service /etc/systemd/system/runai.service\n"
        "#   sudo systemctl daemon-reload && sudo systemctl enable --now runai\n"
        "#   journalctl -u runai -f\n"
    )
    text = unit_text(header, f"runai Stable Diffusion server ({user})", user, home, twistd, workdir, model_dir,
                     options, read_write)
    return text, warnings


def systemd_unit_command(args):
    return print_unit(install_unit, args.user, args.model_dir, args.options)


def print_unit(make, *arguments):
    """The unit ``make(*arguments)`` gives on stdout and its warnings on stderr: 0; or its
    UnitError on stderr: 1."""
    try:
        text, warnings = make(*arguments)
    except UnitError as e:
        print(f"runai systemd-unit: {e}", file=sys.stderr)
        return 1
    for warning in warnings:
        print(f"runai systemd-unit: warning: {warning}", file=sys.stderr)
    sys.stdout.write(text)
    return 0


def add_commands(commands):
    u = commands.add_parser(
        "systemd-unit", help="print a systemd unit (runai.service) that runs this install's server",
        description="Print a systemd unit that runs this install's twistd runai, with its real paths: "
                    "save it as runai.service and install it as docs/operations.md#systemd says. Options "
                    "after -- are added to twistd runai's (e.g. -- --port 6000 --db ~/runai.db).",
    )
    u.add_argument("--user", default=None, help="the user the server runs as (default: you)")
    u.add_argument("--model-dir", default=None, metavar="DIR",
                   help="the model folder (default: the user's ~/stablediffusion)")
    u.add_argument("options", nargs=argparse.REMAINDER, help="-- then more twistd runai options")
    u.set_defaults(func=systemd_unit_command)
    return u
