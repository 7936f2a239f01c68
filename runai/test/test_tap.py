"""The twistd plugin and its options."""

import os

from twisted.application.service import IServiceMaker, IService
from twisted.plugin import getPlugins
from twisted.trial.unittest import SynchronousTestCase

from runai import tap
from runai.options import OptionError


class PluginTests(SynchronousTestCase):
    def test_twistd_finds_runai(self):
        import twisted.plugins
        makers = [m for m in getPlugins(IServiceMaker, twisted.plugins) if m.tapname == "runai"]
        self.assertEqual(len(makers), 1)
        self.assertIs(makers[0].options, tap.Options)


class OptionsTests(SynchronousTestCase):
    def parse(self, *args):
        options = tap.Options()
        options.parseOptions(list(args))
        return options

    def test_defaults_bind_loopback(self):
        options = self.parse()
        self.assertEqual(options["endpoint"], "tcp:port=50007:interface=127.0.0.1")
        self.assertEqual(options["packet-size"], 1024)
        self.assertEqual(options["max-message-size"], 64 * 1024 * 1024)
        self.assertEqual(options["model-dir"], os.path.realpath(os.path.expanduser("~/stablediffusion")))
        self.assertFalse(options["auto-shutdown"])

    def test_host_port_and_listen(self):
        self.assertEqual(self.parse("--host", "::1", "--port", "5")["endpoint"], r"tcp:port=5:interface=\:\:1")
        listen = "tcp:50007:interface=0.0.0.0"
        self.assertEqual(self.parse("--listen", listen, "--port", "9")["endpoint"], listen)

    def test_bad_values_are_usage_errors(self):
        for args in (
            ["--port", "70000"], ["--port", "abc"], ["--packet-size", "0"], ["--packet-size", "8"],
            ["--max-message-size", "10"], ["--timeout", "0"], ["--idle-timeout", "-1"],
            ["--device", "tpu"], ["--device", "cuda:x"], ["--dtype", "int8"], ["--bogus"],
            ["--text-encoders", "gpu"],
        ):
            self.assertRaises(OptionError, self.parse, *args)

    def test_text_encoders_reach_each_workers_engine(self):
        from twisted.internet.testing import MemoryReactorClock

        service = tap.makeService(self.parse("--port", "0", "--device", "cpu", "--text-encoders", "cpu"),
                                  reactor=MemoryReactorClock())
        [worker] = [s for s in service if type(s).__name__ == "LocalWorker"]
        self.assertEqual(worker.engine_options["text_encoders"], "cpu")
        self.assertEqual(self.parse()["text-encoders"], "device")

    def test_token_file(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("a-long-enough-secret\n")
        self.assertEqual(self.parse("--token-file", path)["token"], "a-long-enough-secret")
        self.assertIsNone(self.parse()["token"])
        with open(path, "w") as f:
            f.write("short")
        self.assertRaises(OptionError, self.parse, "--token-file", path)
        self.assertRaises(OptionError, self.parse, "--token-file", path + "-missing")

    def test_a_token_file_that_cannot_be_one_is_said_in_one_line(self):
        folder = os.path.realpath(self.mktemp())
        os.makedirs(folder)
        cases = [(folder + "/missing", "no such file"), (folder, "is a folder"), ("\xff\xfe\x00 binary", "is not text"),
                 ("", "is empty"), ("  \n", "is empty"), ("short", "at least 16 characters")]
        for content, said in cases:
            path = content if content.startswith(folder) else os.path.join(folder, f"token-{len(said)}")
            if not content.startswith(folder):
                with open(path, "wb") as f:
                    f.write(content.encode("latin-1"))
            e = self.assertRaises(OptionError, self.parse, "--token-file", path)
            self.assertTrue(e.message.startswith(f"--token-file {path}") and said in e.message, e.message)
            self.assertNotIn("Errno", e.message)

    def test_a_model_dir_that_is_a_file_is_refused(self):
        path = os.path.realpath(self.mktemp())
        with open(path, "w") as f:
            f.write("not a folder")
        e = self.assertRaises(OptionError, self.parse, "--model-dir", path)
        self.assertEqual(e.message, f"--model-dir {path} is a file, not a folder: give the folder that holds the models")
        from runai.broker.worker_tap import Options as WorkerOptions

        e = self.assertRaises(OptionError, WorkerOptions().parseOptions, ["--broker", "redis://127.0.0.1:1/0",
                                                                          "--model-dir", path])
        self.assertIn("is a file, not a folder", e.message)
        self.assertEqual(self.parse("--model-dir", path + "-later")["model-dir"], path + "-later")  # may come later

    def test_make_service(self):
        from twisted.internet.testing import MemoryReactorClock
        reactor = MemoryReactorClock()
        options = self.parse("--port", "0", "--device", "cpu", "--auto-shutdown", "--timeout", "5")
        service = tap.makeService(options, reactor=reactor)
        self.assertTrue(IService.providedBy(service))
        names = [type(s).__name__ for s in service]
        self.assertEqual(names, ["LocalWorker", "JobQueue", "StreamServerEndpointService"])
        # Nothing heavy was imported to build it: torch loads in the worker thread.
        listen = list(service)[2]
        self.assertEqual(listen.factory.packet_size, 1024)
        self.assertIsNotNone(listen.factory.auto_shutdown)


class StopOnceTests(SynchronousTestCase):
    def test_stop_is_idempotent(self):
        from twisted.internet.testing import MemoryReactorClock
        reactor = MemoryReactorClock()
        reactor.running = True
        calls = []
        reactor.stop = lambda: calls.append(True)
        options = tap.Options()
        options.parseOptions(["--port", "0", "--auto-shutdown"])
        listen = list(tap.makeService(options, reactor=reactor))[-1]
        # Two x packets in one read, or one during Ctrl-C: stop the reactor once.
        listen.factory.stop()
        listen.factory.stop()
        self.assertEqual(calls, [True])


class NoTorchAtStartTests(SynchronousTestCase):
    def test_tap_does_not_import_torch(self):
        import subprocess
        import sys
        code = "import sys, runai.tap, twisted.plugins.runai_plugin; print('torch' in sys.modules)"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        self.assertEqual(out.stdout.strip(), "False")


class ListeningTests(SynchronousTestCase):
    """The door's endpoint, announced: the address logged and the server told, or a
    failure to listen that stops the reactor rather than leave a server serving nothing."""

    def endpoint(self, result):
        from twisted.internet import defer
        from twisted.internet.testing import MemoryReactorClock

        class Endpoint:
            def listen(self, factory):
                return defer.succeed(result) if not isinstance(result, Exception) else defer.fail(result)

        self.reactor = MemoryReactorClock()
        self.reactor.running = True
        self.stops = []
        self.reactor.stop = lambda: self.stops.append(True)
        self.started = []
        self.failed = []
        announced = tap._Announced(Endpoint(), "tcp:50007", self.started.append, self.reactor)
        announced.fail_start = self.failed.append
        return announced

    def test_listening_is_announced(self):
        port = object()
        self.assertIs(self.successResultOf(self.endpoint(port).listen(None)), port)
        self.assertEqual((self.started, self.stops), ([port], []))

    def test_a_failure_to_listen_ends_the_start(self):
        from twisted.internet.error import CannotListenError

        in_use = CannotListenError("", 50007, OSError(98, "Address already in use"))
        self.assertIsNone(self.successResultOf(self.endpoint(in_use).listen(None)))
        self.assertEqual((self.started, self.failed), ([], ["cannot listen on tcp:50007: address already in use"]))

    def test_twistd_exits_at_once_when_the_port_is_taken(self):
        import os
        import socket
        import subprocess
        import sys

        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        self.addCleanup(taken.close)
        port = taken.getsockname()[1]
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        done = subprocess.run([twistd, "--nodaemon", "--pidfile=", "--logfile=-", "runai", "--port", str(port),
                               "--model-dir", self.mktemp()], capture_output=True, text=True, timeout=60)
        self.assertEqual(done.returncode, 1)
        self.assertEqual(done.stderr, f"runai: cannot listen on tcp:port={port}:interface=127.0.0.1: "
                                      "address already in use\n")


class HttpOptionTests(SynchronousTestCase):
    def test_the_http_door_is_off_unless_asked_for(self):
        from twisted.internet.testing import MemoryReactorClock

        def services(*args):
            options = tap.Options()
            options.parseOptions(["--port", "0", *args])
            return list(tap.makeService(options, reactor=MemoryReactorClock()))

        self.assertEqual(len(services()), 3)
        with_http = services("--http", "tcp:0:interface=127.0.0.1")
        self.assertEqual(len(with_http), 4)
        site = with_http[3].factory
        self.assertIs(site.resource.children[b"sdapi"].children[b"v1"].core, with_http[2].factory.core)
        self.assertRaises(OptionError, tap.Options().parseOptions, ["--http", "nonsense:1"])

    def test_the_http_door_follows_the_idle_timeout_and_listens_with_a_deep_backlog(self):
        from twisted.internet.testing import MemoryReactorClock

        from runai.doors.http.site import BACKLOG

        reactor = MemoryReactorClock()
        options = tap.Options()
        options.parseOptions(["--port", "0", "--http", "tcp:7860:interface=127.0.0.1", "--idle-timeout", "7"])
        http = list(tap.makeService(options, reactor=reactor))[3]
        self.assertEqual((http.factory.timeOut, http.factory.request_timeout), (7.0, 7.0))
        http.startService()
        self.addCleanup(http.stopService)
        [(port, factory, backlog, interface)] = reactor.tcpServers
        self.assertEqual((port, factory, backlog, interface), (7860, http.factory, BACKLOG, "127.0.0.1"))


class OneLineErrorTests(SynchronousTestCase):
    def test_twistd_says_a_bad_option_in_one_line(self):
        import os
        import subprocess
        import sys

        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        for args, words in ((["--port", "abc"], "--port must be a whole number"),
                            (["--bogus"], "--bogus"), (["--listen", "nonsense:1"], "--listen")):
            done = subprocess.run([twistd, "--nodaemon", "--pidfile=", "--logfile=-", "runai", *args],
                                  capture_output=True, text=True, timeout=60)
            self.assertEqual(done.returncode, 1, args)
            self.assertEqual(done.stdout, "", args)
            [line] = done.stderr.splitlines()
            self.assertTrue(line.startswith("runai: ") and words in line, line)


class NothingWrittenTests(SynchronousTestCase):
    def test_the_temporary_folder_is_found_without_a_probe_file(self):
        import os

        import tempfile

        folder = os.path.realpath(self.mktemp())
        os.makedirs(folder)
        self.patch(os, "environ", {"TMPDIR": folder})
        self.patch(tempfile, "tempdir", None)  # no answer cached from earlier calls
        opened = []
        real_open = os.open
        self.patch(os, "open", lambda path, *args, **kwargs: opened.append(path) or real_open(path, *args, **kwargs))
        self.assertEqual(tap.existing_temporary_folder(), folder)
        self.assertEqual(opened, [])  # tempfile.gettempdir() would open a probe file here
        self.patch(os, "environ", {"TMPDIR": folder + "-missing"})
        self.assertTrue(os.path.isdir(tap.existing_temporary_folder()))
