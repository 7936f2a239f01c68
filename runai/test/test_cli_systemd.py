"""runai.cli.systemd: ``runai systemd-unit`` prints a unit with this install's real paths
(and ``systemd-analyze verify`` passes it, where systemd is installed); the shipped
``systemd/runai@.service`` is the same unit in template form."""

import io
import os
import pwd
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import SkipTest, SynchronousTestCase

import runai
from runai.cli import main, systemd, systemd_worker

CHECKOUT = Path(runai.__file__).resolve().parent.parent


def directives(text):
    """``{key: [values]}`` of a unit's lines, comments left out."""
    found = {}
    for line in text.splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


def exec_start(text):
    [line] = directives(text)["ExecStart"]
    return shlex.split(line.replace("%%", "%"))


class UnitTests(SynchronousTestCase):
    def setUp(self):
        self.models = os.path.realpath(self.mktemp())
        os.makedirs(self.models)
        self.user = pwd.getpwuid(os.geteuid()).pw_name

    def unit(self, *argv):
        stdout, stderr = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", stdout)
        self.patch(main.sys, "stderr", stderr)
        self.patch(os, "environ", {k: v for k, v in os.environ.items() if k != "SUDO_USER"})
        status = main.main(["systemd-unit", *argv])
        return status, stdout.getvalue(), stderr.getvalue()

    def test_this_installs_real_paths(self):
        status, text, _ = self.unit("--model-dir", self.models)
        self.assertEqual(status, 0)
        found = directives(text)
        command = exec_start(text)
        twistd = os.path.join(os.path.dirname(os.path.abspath(sys.executable)), "twistd")
        self.assertEqual(command, [twistd, "--nodaemon", "--pidfile=", "--logfile=-", "runai",
                                   "--model-dir", self.models])
        self.assertTrue(os.path.isabs(command[0]) and os.access(command[0], os.X_OK))
        self.assertEqual(found["WorkingDirectory"], [str(CHECKOUT)])
        self.assertTrue((CHECKOUT / "runai" / "__init__.py").exists())
        self.assertEqual((found["User"], found["Type"], found["ProtectHome"]), ([self.user], ["simple"], ["read-only"]))
        self.assertNotIn("%i", text)
        self.assertNotIn("ReadWritePaths", found)

    def test_the_users_model_folder_by_default(self):
        status, text, stderr = self.unit()
        self.assertEqual(status, 0)
        model_dir = os.path.join(pwd.getpwuid(os.geteuid()).pw_dir, "stablediffusion")
        self.assertEqual(exec_start(text)[-2:], ["--model-dir", model_dir])
        if not os.path.isdir(model_dir):
            self.assertIn(f"warning: the model folder {model_dir} does not exist", stderr)

    def test_more_options_paths_made_absolute_and_the_db_folder_writable(self):
        here = os.path.abspath(".")  # where the command is typed; the service starts elsewhere
        status, text, stderr = self.unit("--model-dir", self.models, "--", "--port", "6000", "--db", "h.db",
                                         "--db-key-file", "db.key", "--token-file=secret/token", "--log-prompts")
        self.assertEqual(status, 0)
        self.assertEqual(exec_start(text)[7:], ["--port", "6000", "--db", os.path.join(here, "h.db"),
                                                "--db-key-file", os.path.join(here, "db.key"),
                                                f"--token-file={here}/secret/token", "--log-prompts"])
        self.assertEqual(directives(text)["ReadWritePaths"], [here])
        self.assertEqual(stderr, "" if self.user != "root" else
                         "runai systemd-unit: warning: the unit runs the server as root; name its user with --user\n")

    def test_a_db_without_its_key_file_is_warned_about(self):
        status, text, stderr = self.unit("--model-dir", self.models, "--", "--db", "h.db")
        self.assertEqual(status, 0)
        self.assertIn("warning: --db without --db-key-file", stderr)

    def test_spaces_and_percent_signs_are_escaped(self):
        odd = os.path.join(self.models, "my models 100%")
        os.makedirs(odd)
        status, text, _ = self.unit("--model-dir", odd)
        self.assertEqual(status, 0)
        self.assertIn(f'--model-dir "{odd.replace("%", "%%")}"', text)
        self.assertEqual(exec_start(text)[-1], odd)

    def test_what_stops_it(self):
        for argv, said in ((["--user", "no-such-user-here"], "there is no user 'no-such-user-here'"),
                           (["--", "-m", "/elsewhere"], "runai systemd-unit's own --model-dir"),
                           (["--", "--model-dir=/elsewhere"], "runai systemd-unit's own --model-dir"),
                           (["--", "--db"], "--db needs a value")):
            status, text, stderr = self.unit(*argv)
            self.assertEqual((status, text), (1, ""), argv)
            self.assertIn(said, stderr)

    def test_a_python_without_twistd_beside_it(self):
        self.patch(sys, "executable", os.path.join(self.models, "python"))
        status, text, stderr = self.unit("--model-dir", self.models)
        self.assertEqual((status, text), (1, ""))
        self.assertIn("there is no twistd beside", stderr)

    def test_the_shipped_template_is_the_same_unit(self):
        shipped = (CHECKOUT / "systemd" / "runai@.service").read_text()
        self.assertEqual(shipped, systemd.template_unit())
        status, text, _ = self.unit("--model-dir", self.models)
        # The same lines, but for the header, the paths and the user.
        generated = [line for line in text.splitlines() if not line.startswith("#")]
        template = [line for line in shipped.splitlines() if not line.startswith("#")]
        self.assertEqual(len(generated), len(template))
        differ = {a.partition("=")[0] for a, b in zip(generated, template) if a != b}
        self.assertEqual(differ, {"Description", "User", "ExecStart", "WorkingDirectory"})


class VerifyTests(SynchronousTestCase):
    """``systemd-analyze verify``, where it is installed and can verify a unit here."""

    def verify(self, text):
        folder = Path(self.mktemp()).absolute()
        folder.mkdir()
        (folder / "runai.service").write_text(text)
        return subprocess.run(["systemd-analyze", "verify", str(folder / "runai.service")],
                              capture_output=True, text=True, timeout=60)

    def setUp(self):
        if shutil.which("systemd-analyze") is None:
            raise SkipTest("systemd-analyze is not installed")
        trivial = self.verify("[Service]\nType=oneshot\nExecStart=/bin/true\n")
        if trivial.returncode != 0:
            raise SkipTest(f"systemd-analyze cannot verify units here: {trivial.stderr.strip()}")

    def test_the_printed_unit_verifies(self):
        models = os.path.realpath(self.mktemp())
        os.makedirs(models)
        db = os.path.realpath(self.mktemp())
        os.makedirs(db)
        for options in ((), ("--", "--port", "6000", "--db", os.path.join(db, "history.db"))):
            text, _ = systemd.install_unit(model_dir=models, options=options)
            result = self.verify(text)
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertNotIn("runai.service", result.stdout + result.stderr)

    def test_the_shipped_template_fails_outside_home_runai(self):
        # What the issue found: the template names /home/%i/runai, absent here.
        result = self.verify(systemd.template_unit().replace("%i", "nobody-here"))
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("/home/nobody-here/runai/.venv/bin/twistd", result.stderr)

    def test_the_worker_unit_verifies(self):
        models = os.path.realpath(self.mktemp())
        os.makedirs(models)
        for broker in ("redis://10.0.0.1:6379/0", "rediss://redis.example:6380/1"):
            text, _ = systemd_worker.worker_unit(broker, model_dir=models, password_file="/etc/runai/redis.pass",
                                                 options=["--", "--device", "cpu"])
            result = self.verify(text)
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertNotIn("runai.service", result.stdout + result.stderr)


class WorkerUnitTests(SynchronousTestCase):
    """``runai systemd-unit --worker``: twistd runai-worker with the server's sandbox, the
    broker's address let through, and no password on the command line."""

    unit = UnitTests.unit

    def setUp(self):
        self.models = os.path.realpath(self.mktemp())
        os.makedirs(self.models)
        self.user = pwd.getpwuid(os.geteuid()).pw_name

    def test_the_workers_command_line(self):
        here = os.path.abspath(".")
        status, text, stderr = self.unit("--worker", "--broker", "redis://10.0.0.1:6379/0", "--broker-password-file",
                                         "redis.pass", "--model-dir", self.models, "--", "--device", "cuda:0",
                                         "--device", "cuda:1", "--broker-ca-file=ca.pem")
        self.assertEqual(status, 0, stderr)
        twistd = os.path.join(os.path.dirname(os.path.abspath(sys.executable)), "twistd")
        self.assertEqual(exec_start(text), [
            twistd, "--nodaemon", "--pidfile=", "--logfile=-", "runai-worker", "--broker", "redis://10.0.0.1:6379/0",
            "--broker-password-file", os.path.join(here, "redis.pass"), "--model-dir", self.models,
            "--device", "cuda:0", "--device", "cuda:1", f"--broker-ca-file={here}/ca.pem"])
        found = directives(text)
        self.assertEqual((found["User"], found["Type"], found["WorkingDirectory"]),
                         ([self.user], ["simple"], [str(CHECKOUT)]))
        self.assertEqual((found["IPAddressDeny"], found["IPAddressAllow"]), (["any"], ["localhost 10.0.0.1"]))
        self.assertNotIn("ReadWritePaths", found)
        self.assertNotIn("EnvironmentFile", found)  # offered in a comment only
        self.assertIn("#EnvironmentFile=", text)
        # The server's sandbox, but for the network.
        server = directives(UnitTests.unit(self, "--model-dir", self.models)[1])
        for key in ("ProtectSystem", "ProtectHome", "PrivateTmp", "NoNewPrivileges", "RestrictAddressFamilies",
                    "SystemCallArchitectures", "Environment", "Restart"):
            self.assertEqual(found[key], server[key], key)
        self.assertEqual(server["IPAddressAllow"], ["localhost"])
        self.assertEqual(stderr, "" if self.user != "root" else
                         "runai systemd-unit: warning: the unit runs the worker as root; name its user with --user\n")

    def test_the_metrics_token_file_is_made_absolute(self):
        here = os.path.abspath(".")
        for extra, expected in ((["--token-file", "metrics.token"], ["--token-file", f"{here}/metrics.token"]),
                                (["--token-file=~/metrics.token"],
                                 [f"--token-file={os.path.expanduser('~/metrics.token')}"])):
            status, text, stderr = self.unit("--worker", "--broker", "redis://10.0.0.1:6379/0", "--model-dir",
                                             self.models, "--", "--metrics", "9108", *extra)
            self.assertEqual(status, 0, stderr)
            self.assertEqual(exec_start(text)[-len(expected) - 2:], ["--metrics", "9108", *expected])

    def test_a_broker_by_host_name_has_no_ip_filter(self):
        status, text, stderr = self.unit("--worker", "--broker", "rediss://redis.lan:6380/2", "--model-dir",
                                         self.models)
        self.assertEqual(status, 0, stderr)
        found = directives(text)
        self.assertNotIn("IPAddressDeny", found)
        self.assertNotIn("IPAddressAllow", found)
        self.assertIn("named by host name (redis.lan)", text)
        self.assertIn("warning: no --broker-password-file", stderr)
        status, text, _ = self.unit("--worker", "--broker", "redis://[::1]:6379/0", "--model-dir", self.models)
        self.assertEqual(directives(text)["IPAddressAllow"], ["localhost ::1"])

    def test_what_stops_it(self):
        for argv, said in (
                (["--worker"], "--worker needs --broker"),
                (["--broker", "redis://10.0.0.1/0"], "add --worker"),
                (["--worker", "--broker", "redis://:secret@10.0.0.1/0"], "the URL holds a password"),
                (["--worker", "--broker", "http://10.0.0.1/"], "expected redis://"),
                (["--worker", "--broker", "redis://10.0.0.1/0", "--broker-ca-file", "ca.pem"], "needs a rediss://"),
                (["--worker", "--broker", "redis://10.0.0.1/0", "--", "--broker", "redis://x/0"], "own option"),
                (["--worker", "--broker", "redis://10.0.0.1/0", "--", "-m", "/x"], "own option"),
                (["--worker", "--broker", "redis://10.0.0.1/0", "--", "--broker-password-file"], "needs a value"),
                (["--worker", "--broker", "redis://10.0.0.1/0", "--user", "no-such-user-here"], "there is no user")):
            status, text, stderr = self.unit(*argv)
            self.assertEqual((status, text), (1, ""), argv)
            self.assertIn(said, stderr)
            self.assertEqual(len(stderr.splitlines()), 1, stderr)
