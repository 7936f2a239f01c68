"""Tests for runai.cli.common and runai.cli.main: the connection options, the token, the
client they make, and the ``runai`` command's own pieces: how it reports the server's
errors and broken connections. (The ``generate``, ``history``, ``models``, ``convert`` and
``systemd-unit`` subcommands have their own tests.)"""

import io
import os
import socket
import threading

from twisted.trial.unittest import SynchronousTestCase

from runai.cli import common, generate, main
from runai.client import ServerError
from runai.core import errors
from runai.doors.legacy import framing


class TokenTests(SynchronousTestCase):
    def setUp(self):
        self.patch(os, "environ", {})

    def args(self, token_file=None):
        return main.parser().parse_args(["ping"] + (["--token-file", token_file] if token_file else []))

    def write(self, text):
        path = os.path.realpath(self.mktemp())
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def test_from_a_file_stripped(self):
        self.assertEqual(common.token(self.args(self.write("  s3cret-token-value \n"))), "s3cret-token-value")

    def test_file_before_environment(self):
        os.environ["RUNAI_TOKEN"] = "from-env"
        self.assertEqual(common.token(self.args(self.write("from-file"))), "from-file")
        self.assertEqual(common.token(self.args()), "from-env")

    def test_none_without_file_or_environment(self):
        self.assertIsNone(common.token(self.args()))
        os.environ["RUNAI_TOKEN"] = ""
        self.assertIsNone(common.token(self.args()))

    def test_home_is_expanded(self):
        home = os.path.realpath(self.mktemp())
        os.makedirs(home)
        with open(os.path.join(home, "token"), "w") as f:
            f.write("in-home")
        os.environ["HOME"] = home
        self.assertEqual(common.token(self.args("~/token")), "in-home")


class ConnectTests(SynchronousTestCase):
    def setUp(self):
        self.made = []
        self.patch(common, "BlockingClient", lambda *args, **kwargs: self.made.append((args, kwargs)) or "client")
        self.patch(os, "environ", {"RUNAI_TOKEN": "t0ken"})

    def test_from_the_options(self):
        args = main.parser().parse_args(["history", "list", "--host", "10.0.0.2", "--port", "6000",
                                         "--packet-size", "64"])
        self.assertEqual(common.connect(args), "client")
        self.assertEqual(self.made, [(("10.0.0.2", 6000, 64), {"timeout": 120, "token": "t0ken",
                                                                "tls": False, "ca_file": None})])

    def test_defaults_and_timeout(self):
        args = main.parser().parse_args(["ping"])
        common.connect(args, timeout=None)
        self.assertEqual(self.made, [(("127.0.0.1", 50007, framing.DEFAULT_PACKET_SIZE),
                                      {"timeout": None, "token": "t0ken", "tls": False, "ca_file": None})])

    def test_tls_and_a_ca_file(self):
        for argv, tls, ca_file in ((["--tls"], True, None), (["--tls", "--ca-file", "c.pem"], True, "c.pem"),
                                   (["--ca-file", "c.pem"], True, "c.pem")):
            self.made.clear()
            common.connect(main.parser().parse_args(["models", *argv]))
            [(_, options)] = self.made
            self.assertEqual((options["tls"], options["ca_file"]), (tls, ca_file), argv)

    def test_every_server_command_takes_the_connection_options(self):
        for argv in (["generate", "p", "-m", "v1/x"], ["ping"], ["models"], ["history", "list"],
                     ["history", "export", "out"], ["history", "delete", "1"]):
            args = main.parser().parse_args(argv + ["--port", "1", "--token-file", "f"])
            self.assertEqual((args.port, args.token_file, args.host), (1, "f", "127.0.0.1"), argv)


class MainTests(SynchronousTestCase):
    def test_output_names(self):
        self.assertEqual(generate._output_names("out.png", 1), ["out.png"])
        self.assertEqual(generate._output_names("a/out.png", 2), ["a/out-0.png", "a/out-1.png"])
        self.assertEqual(generate._output_names("out", 2), ["out-0.png", "out-1.png"])

    def test_progress_bar(self):
        stream = io.StringIO()
        show = generate._progress_bar(stream)
        show({"action": "queued", "position": 2})
        show({"action": 4, "step": 1, "total": 2})
        show({"action": 4, "step": 2, "total": 2})
        self.assertEqual(stream.getvalue(), "queued: 2 job(s) ahead\n"
                                            f"\r[{'#' * 15}{'.' * 15}] step 1/2"
                                            f"\r[{'#' * 30}] step 2/2\n")

    def test_nothing_listening(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        stderr = io.StringIO()
        self.patch(main.sys, "stderr", stderr)
        self.assertEqual(main.main(["ping", "--port", str(port)]), 1)
        self.assertIn(f"nothing listens on 127.0.0.1:{port}", stderr.getvalue())

    def test_a_server_that_closes_without_answering(self):
        with socket.socket() as server:
            server.bind(("127.0.0.1", 0))
            server.listen(1)
            port = server.getsockname()[1]
            stderr = io.StringIO()
            self.patch(main.sys, "stderr", stderr)
            # The server reads the ping (a packet and the end-of-message packet) and closes
            # the connection without a word.
            def read_and_close():
                connection = server.accept()[0]
                with connection:
                    received = b""
                    while len(received) < 2 * framing.DEFAULT_PACKET_SIZE:
                        received += connection.recv(1 << 16)
            accepted = threading.Thread(target=read_and_close)
            accepted.start()
            self.assertEqual(main.main(["ping", "--port", str(port)]), 1)
            accepted.join()
        self.assertIn("the server closed the connection", stderr.getvalue())
        self.assertNotIn("refused", stderr.getvalue())

    def test_a_host_that_does_not_exist(self):
        stderr = io.StringIO()
        self.patch(main.sys, "stderr", stderr)
        self.assertEqual(main.main(["ping", "--host", "no-such-host.invalid"]), 1)
        self.assertIn("runai: cannot find the host no-such-host.invalid", stderr.getvalue())


class ServerErrorTests(SynchronousTestCase):
    """A refusal (the request was wrong) and a failure (the server's side) read differently."""

    def line(self, code):
        return main.server_error_line(ServerError(code, "the message"))

    def test_the_clients_own_bad_input_is_refused(self):
        for code in (errors.BAD_REQUEST, errors.OUT_OF_RANGE, errors.UNKNOWN_SCHEDULER, errors.MODEL_NOT_FOUND,
                     errors.PATH_OUTSIDE_MODEL_DIR, errors.UNAUTHORIZED, errors.MESSAGE_TOO_LARGE):
            self.assertEqual(self.line(code), f"runai: the server refused: the message ({code})")

    def test_a_failure_on_the_servers_side_is_not_a_refusal(self):
        for code in (errors.INTERNAL, errors.OUT_OF_MEMORY, errors.MODEL_LOAD_FAILED, errors.SHUTTING_DOWN,
                     errors.CONVERT_FAILED, "a-code-from-a-newer-server"):
            self.assertEqual(self.line(code), f"runai: the server failed: the message ({code})")
        self.assertEqual(self.line(errors.CANCELLED), "runai: cancelled: the message (cancelled)")

    def test_main_reports_an_internal_error_as_a_failure(self):
        def internal(args):
            raise ServerError(errors.INTERNAL, "an unexpected failure (logged)")
        self.patch(main, "ping", internal)
        stderr = io.StringIO()
        self.patch(main.sys, "stderr", stderr)
        self.assertEqual(main.main(["ping"]), 1)
        self.assertEqual(stderr.getvalue(), "runai: the server failed: an unexpected failure (logged) (internal)\n")


class TokenFileTests(SynchronousTestCase):
    """A token file that cannot be one: one line naming it, before anything is sent."""

    def setUp(self):
        self.patch(os, "environ", {})
        self.stderr = io.StringIO()
        self.patch(main.sys, "stderr", self.stderr)
        self.connected = []
        self.patch(common, "BlockingClient", lambda *args, **kwargs: self.connected.append(args))

    def file(self, data):
        path = os.path.realpath(self.mktemp())
        with open(path, "wb") as f:
            f.write(data)
        return path

    def test_missing_binary_empty_or_a_folder(self):
        folder = os.path.realpath(self.mktemp())
        os.makedirs(folder)
        for path, said in ((folder + "/missing", "no such file"), (self.file(b"\xff\xfe\x00\x01"), "is not text"),
                           (self.file(b" \n"), "is empty"), (folder, "is a folder"),
                           (self.file(b"two\nlines"), "one line")):
            self.stderr.truncate(0)
            self.stderr.seek(0)
            self.assertEqual(main.main(["ping", "--token-file", path]), 1, path)
            [line] = self.stderr.getvalue().splitlines()
            self.assertTrue(line.startswith(f"runai: --token-file {path}") and said in line, line)
            self.assertNotIn("Errno", line)
        self.assertEqual(self.connected, [])


class HelpTests(SynchronousTestCase):
    def test_every_option_has_help_and_says_its_default(self):
        import argparse

        missing = []

        def walk(parser, path):
            for action in parser._actions:
                if isinstance(action, argparse._SubParsersAction):
                    for name, sub in action.choices.items():
                        walk(sub, f"{path} {name}")
                elif not isinstance(action, argparse._HelpAction):
                    said = action.help and (action.required or not action.option_strings or "default" in action.help)
                    if not said:
                        missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
        walk(main.parser(), "runai")
        self.assertEqual(missing, [])

    def test_history_list_limit_zero_is_out_of_range(self):
        stderr = io.StringIO()
        self.patch(main.sys, "stderr", stderr)
        for argv in (["history", "list", "--limit", "0"], ["history", "list", "--limit", "-3"],
                     ["history", "export", "out", "--before", "0"], ["history", "delete", "0"]):
            self.assertRaises(SystemExit, main.parser().parse_args, argv)
        self.assertIn("out of range: must be 1 or more, not 0", stderr.getvalue())
        self.assertEqual(main.parser().parse_args(["history", "list", "--limit", "1"]).limit, 1)
