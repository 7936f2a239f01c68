"""The broker's address and options: URLs, the password's sources, TLS; the front's and
the worker's options; and no broker code at all without --broker."""

import os
import subprocess
import sys

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from runai import tap
from runai.broker import options, url, worker_tap


class UrlTests(SynchronousTestCase):
    def test_redis_and_rediss(self):
        address = url.parse_url("redis://10.0.0.5:6380/2", environ={})
        self.assertEqual((address.host, address.port, address.db, address.tls, address.password),
                         ("10.0.0.5", 6380, 2, False, None))
        address = url.parse_url("rediss://broker.lan", environ={})
        self.assertEqual((address.port, address.db, address.tls), (6379, 0, True))

    def test_a_password_in_the_url_is_refused(self):
        e = self.assertRaises(ValueError, url.parse_url, "redis://:secret@host:6379/0", environ={})
        self.assertIn("--broker-password-file", str(e))
        self.assertNotIn("secret", str(e))

    def test_the_password_from_a_file_or_the_environment_never_shown(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("from-the-file\n")
        address = url.parse_url("redis://h/0", password_file=path, environ={url.PASSWORD_VARIABLE: "env"})
        self.assertEqual(address.password, "from-the-file")
        self.assertEqual(url.parse_url("redis://h/0", environ={url.PASSWORD_VARIABLE: "env"}).password, "env")
        self.assertNotIn("from-the-file", repr(address))
        open(path, "w").close()
        self.assertRaises(ValueError, url.parse_url, "redis://h/0", password_file=path, environ={})
        self.assertRaises(ValueError, url.parse_url, "redis://h/0", password_file=path + ".missing", environ={})

    def test_bad_urls(self):
        for bad in ("http://h/0", "redis://", "redis://h/zero", "redis://h:port/0", "redis://h/0?ssl=1"):
            self.assertRaises(ValueError, url.parse_url, bad, environ={})

    def test_a_ca_file_needs_rediss_and_must_exist(self):
        ca = self.mktemp()
        with open(ca, "w") as f:
            f.write("-----BEGIN CERTIFICATE-----\n")
        self.assertEqual(url.parse_url("rediss://h/0", ca_file=ca, environ={}).ca_file, ca)
        self.assertRaises(ValueError, url.parse_url, "redis://h/0", ca_file=ca, environ={})
        self.assertRaises(ValueError, url.parse_url, "rediss://h/0", ca_file=ca + ".missing", environ={})


class OptionTests(SynchronousTestCase):
    def test_the_front_takes_broker_options(self):
        config = tap.Options()
        config.parseOptions(["--broker", "redis://127.0.0.1:1/3"])
        self.assertEqual(config["broker-address"].db, 3)
        self.assertRaises(SystemExit, tap.Options().parseOptions, ["--broker", "redis://:pw@h/0"])
        self.assertRaises(SystemExit, tap.Options().parseOptions, ["--broker-ca-file", "x"])

    def test_the_worker_needs_a_broker_and_takes_several_devices(self):
        self.assertRaises(usage.UsageError, options.check, {}, required=True)
        config = worker_tap.Options()
        config.parseOptions(["--broker", "redis://127.0.0.1:1/0", "--device", "cpu", "--device", "cpu",
                             "--claim-timeout", "5", "--name", "gpu-box"])
        self.assertEqual(config["devices"], ["cpu", "cpu"])
        self.assertEqual((config["claim-timeout"], config["name"]), (5.0, "gpu-box"))
        for bad in (["--device", "tpu"], ["--claim-timeout", "0"], ["--max-deliveries", "0"]):
            self.assertRaises(SystemExit, worker_tap.Options().parseOptions, ["--broker", "redis://h/0", *bad])

    def test_the_worker_service_tree(self):
        from twisted.internet.testing import MemoryReactorClock
        config = worker_tap.Options()
        config.parseOptions(["--broker", "redis://127.0.0.1:1/0", "--device", "cpu", "--device", "cpu",
                             "--model-dir", self.mktemp()])
        top = worker_tap.makeService(config, reactor=MemoryReactorClock())
        names = [type(s).__name__ for s in top]
        self.assertEqual(names, ["RedisConnection", "LocalWorker", "Consumer", "LocalWorker", "Consumer",
                                 "CancelListener", "_Announce"])
        consumers = [s for s in top if type(s).__name__ == "Consumer"]
        self.assertEqual(len({c.name for c in consumers}), 2)

    def test_the_front_service_tree_has_no_local_worker(self):
        from twisted.internet.testing import MemoryReactorClock
        config = tap.Options()
        config.parseOptions(["--port", "0", "--broker", "redis://127.0.0.1:1/0"])
        top = tap.makeService(config, reactor=MemoryReactorClock())
        names = [type(s).__name__ for s in top]
        self.assertNotIn("LocalWorker", names)
        backend = [s for s in top if type(s).__name__ == "MultiService"][0]
        self.assertEqual([type(s).__name__ for s in backend], ["_Connection", "BrokerBackend"])


class NoBrokerWithoutTheOptionTests(SynchronousTestCase):
    def test_without_broker_nothing_of_it_is_imported(self):
        code = ("import sys, runai.tap as t\n"
                "from twisted.internet.testing import MemoryReactorClock\n"
                "o = t.Options(); o.parseOptions(['--port', '0', '--device', 'cpu'])\n"
                "t.makeService(o, reactor=MemoryReactorClock())\n"
                "print(sorted(m for m in sys.modules if m.startswith(('runai.broker', 'redis'))))\n")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env=dict(os.environ, PYTHONWARNINGS="ignore")).stdout
        self.assertEqual(out.strip(), "[]")
