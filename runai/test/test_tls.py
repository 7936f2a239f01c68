"""TLS at both ends, with real handshakes on 127.0.0.1 and certificates made here: the
start-up checks of an ssl: endpoint, the blocking, Twisted and command-line clients
against the real server, and twistd with ``--listen ssl:...`` end to end."""

import io
import os
import subprocess
import sys
import time

from cryptography.hazmat.primitives import serialization
from twisted.internet import defer, endpoints, reactor, threads
from twisted.internet.defer import inlineCallbacks
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

from runai import tap, tls
from runai.options import OptionError, checked_endpoint
from runai.backends.local import LocalWorker
from runai.cli import main
from runai.client import BlockingClient, RunaiClientProtocol, ServerError, connect_client
from runai.test.support import ScriptedEngine, make_server, reported_port
from runai.test.tls_fixtures import make_certificate, ssl_endpoint

TOKEN = "a-token-of-twenty-characters"


class EndpointArgumentsTests(SynchronousTestCase):
    def test_split_as_twisted_splits(self):
        self.assertEqual(tls.endpoint_arguments("ssl:50007:privateKey=k.pem:certKey=c=1.pem"),
                         (["ssl", "50007"], {"privateKey": "k.pem", "certKey": "c=1.pem"}))
        self.assertEqual(tls.endpoint_arguments(r"ssl:0:a\:b.pem:certKey=C\:\\x.pem"),
                         (["ssl", "0", "a:b.pem"], {"certKey": "C:\\x.pem"}))
        self.assertEqual(tls.endpoint_arguments("tcp:7"), (["tcp", "7"], {}))


class StartupCheckTests(SynchronousTestCase):
    """``--listen ssl:...`` whose key or certificate cannot serve: a UsageError in one line
    naming the file (twistd prints it and exits 1), never a server that does not listen."""

    def setUp(self):
        self.folder = os.path.realpath(self.mktemp())
        self.key, self.cert = make_certificate(self.folder)
        self.other_key, self.other_cert = make_certificate(self.folder, stem="other")

    def listen(self, description):
        options = tap.Options()
        options.parseOptions(["--listen", description])
        return options["endpoint"]

    def refused(self, description, *words):
        with self.assertRaises(OptionError) as caught:
            self.listen(description)
        message = caught.exception.message
        self.assertTrue(message.startswith("--listen: "), message)
        self.assertNotIn("\n", message)
        for word in words:
            self.assertIn(word, message)
        return message

    def write(self, name, data):
        path = os.path.join(self.folder, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def test_a_good_pair_is_taken(self):
        description = ssl_endpoint(self.key, self.cert, 50007)
        self.assertEqual(self.listen(description), description)

    def test_key_and_certificate_in_one_file(self):
        with open(self.key, "rb") as k, open(self.cert, "rb") as c:
            both = self.write("both.pem", k.read() + c.read())
        self.listen(f"ssl:50007:privateKey={both}")

    def test_missing_key(self):
        missing = os.path.join(self.folder, "nokey.pem")
        self.refused(ssl_endpoint(missing, self.cert), "cannot read the private key", missing, "No such file")

    def test_missing_certificate(self):
        missing = os.path.join(self.folder, "nocert.pem")
        self.refused(ssl_endpoint(self.key, missing), "cannot read the certificate", missing)

    def test_unreadable_key(self):
        self.refused(ssl_endpoint(self.folder, self.cert), "cannot read the private key", self.folder)

    def test_bad_key(self):
        bad = self.write("bad.pem", b"-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
        self.refused(ssl_endpoint(bad, self.cert), bad, "no PEM private key")
        self.refused(ssl_endpoint(self.cert, self.cert), self.cert, "no PEM private key")

    def test_bad_certificate(self):
        self.refused(ssl_endpoint(self.key, self.key), self.key, "no PEM certificate")
        self.refused(f"ssl:0:privateKey={self.key}", self.key, "no PEM certificate")

    def test_mismatched_pair(self):
        self.refused(ssl_endpoint(self.key, self.other_cert), "does not match", self.key, self.other_cert)

    def test_encrypted_key(self):
        with open(self.key, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), None)
        encrypted = self.write("encrypted.pem", key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase")))
        self.refused(ssl_endpoint(encrypted, self.cert), encrypted, "encrypted")

    def test_home_is_not_expanded_and_says_so(self):
        self.refused("ssl:0:privateKey=~/key.pem:certKey=~/cert.pem", "~/key.pem", "$HOME")

    def test_other_endpoints(self):
        self.assertEqual(self.listen("tcp:0:interface=127.0.0.1"), "tcp:0:interface=127.0.0.1")
        self.refused("nosuchkind:1", "Unknown endpoint type")
        self.refused("tcp:notaport", "cannot listen on")

    def test_the_http_door_can_check_its_own(self):
        self.assertEqual(checked_endpoint("http", "tcp:7860"), "tcp:7860")
        with self.assertRaises(usage.UsageError) as caught:
            checked_endpoint("http", ssl_endpoint(self.key, self.other_cert))
        self.assertTrue(str(caught.exception).startswith("--http: the private key"))


class ClientContextTests(SynchronousTestCase):
    def test_ca_file_errors_name_the_file(self):
        folder = self.mktemp()
        os.makedirs(folder)
        missing = os.path.join(folder, "missing.pem")
        not_pem = os.path.join(folder, "token")
        with open(not_pem, "w") as f:
            f.write(TOKEN)
        for ca_file, words in ((missing, "No such file"), (not_pem, "it holds no PEM certificate")):
            for make in (tls.client_context, lambda ca: tls.client_options("localhost", ca)):
                with self.assertRaises(tls.TLSError) as caught:
                    make(ca_file)
                self.assertIn(f"cannot read the CA file {ca_file}: {words}", str(caught.exception))

    def test_verifies_by_default(self):
        import ssl

        context = tls.client_context()
        self.assertEqual((context.verify_mode, context.check_hostname), (ssl.CERT_REQUIRED, True))
        self.assertGreaterEqual(context.minimum_version, ssl.TLSVersion.TLSv1_2)


class _Closing(RunaiClientProtocol):
    """A client protocol whose ``lost`` fires once its connection is closed."""

    def __init__(self):
        super().__init__()
        self.lost = defer.Deferred()

    def connectionLost(self, reason):
        super().connectionLost(reason)
        self.lost.callback(None)


class LiveTLSTests(TestCase):
    """The real legacy door behind ``ssl:`` endpoints on 127.0.0.1 (and the same server on
    a plain port), a scripted engine behind it, a token asked for."""

    timeout = 60

    @inlineCallbacks
    def setUp(self):
        folder = os.path.realpath(self.mktemp())
        self.key, self.cert = make_certificate(folder)
        _, self.other_ca = make_certificate(folder, stem="other")
        # Named for localhost only: 127.0.0.1 is not in it.
        self.named_key, self.named_cert = make_certificate(folder, ips=(), stem="named")
        models = os.path.join(folder, "models")
        os.makedirs(os.path.join(models, "v1", "tiny"))
        with open(os.path.join(models, "v1", "tiny", "model_index.json"), "w") as f:
            f.write("{}")
        worker = LocalWorker(reactor, engine_factory=lambda device, dtype: ScriptedEngine())
        worker.startService()
        self.addCleanup(worker.stopService)
        queue, _, factory = make_server(reactor, models, worker, pool=reactor.getThreadPool(), token=TOKEN,
                                        idle_timeout=30)
        self.addCleanup(queue.stopService)
        self.port = yield self.listen(ssl_endpoint(self.key, self.cert), factory)
        self.named_port = yield self.listen(ssl_endpoint(self.named_key, self.named_cert), factory)
        self.plain_port = yield self.listen("tcp:0:interface=127.0.0.1", factory)

    @inlineCallbacks
    def listen(self, description, factory):
        port = yield endpoints.serverFromString(reactor, description).listen(factory)
        self.addCleanup(port.stopListening)
        return port.getHost().port

    def blocking(self, f, *args, **kwargs):
        return threads.deferToThread(f, *args, **kwargs)

    def ping(self, host="localhost", port=None, **options):
        def run():
            with BlockingClient(host, port or self.port, timeout=30, **options) as client:
                return client.ping()
        return self.blocking(run)

    def refused(self, d, *words):
        def check(error):
            message = str(error)
            self.assertNotIn("\n", message)
            for word in words:
                self.assertIn(word, message)
        return self.assertFailure(d, tls.TLSError).addCallback(check)

    @inlineCallbacks
    def test_token_and_images_over_tls(self):
        for host in ("localhost", "127.0.0.1"):
            pong = yield self.ping(host, tls=True, ca_file=self.cert, token=TOKEN)
            self.assertEqual(pong["action"], "pong")

        def generate():
            with BlockingClient("localhost", self.port, timeout=30, token=TOKEN, tls=True, ca_file=self.cert) as c:
                return c.generate("a lighthouse", "v1/tiny", steps=2, width=64, height=64, seed=5)
        [image] = yield self.blocking(generate)
        self.assertEqual((image.png, image.seed), (b"\x89PNG fake 5", 5))

    @inlineCallbacks
    def test_the_token_is_still_asked_for(self):
        error = yield self.assertFailure(self.ping(tls=True, ca_file=self.cert), ServerError)
        self.assertEqual(error.code, "unauthorized")

    @inlineCallbacks
    def test_a_certificate_that_does_not_verify_is_refused(self):
        yield self.refused(self.ping(tls=True, ca_file=self.other_ca, token=TOKEN),
                           f"the certificate of localhost:{self.port} did not verify against {self.other_ca}")
        yield self.refused(self.ping(tls=True, token=TOKEN), "did not verify against the system's trust store",
                           "--ca-file")
        yield self.refused(self.ping("127.0.0.1", self.named_port, tls=True, ca_file=self.named_cert, token=TOKEN),
                           "did not verify", "mismatch")
        pong = yield self.ping("localhost", self.named_port, tls=True, ca_file=self.named_cert, token=TOKEN)
        self.assertEqual(pong["action"], "pong")

    @inlineCallbacks
    def test_a_plain_client_on_the_tls_port_leaves_it_serving(self):
        error = yield self.assertFailure(self.ping(token=TOKEN), ConnectionError)
        self.assertIn("connect with TLS (--tls)", str(error))
        pong = yield self.ping(tls=True, ca_file=self.cert, token=TOKEN)
        self.assertEqual(pong["action"], "pong")

    @inlineCallbacks
    def test_a_tls_client_on_a_plain_port_says_so(self):
        started = time.monotonic()

        def ping():
            return BlockingClient("localhost", self.plain_port, timeout=0.5, tls=True, ca_file=self.cert)
        yield self.refused(self.blocking(ping), f"localhost:{self.plain_port} did not answer the TLS handshake "
                                                "within 0.5 s", "ssl: endpoint")
        self.assertLess(time.monotonic() - started, 10)

    @inlineCallbacks
    def test_twisted_client_over_tls(self):
        protocol = _Closing()
        protocol.token = TOKEN
        connected = yield connect_client(reactor, "localhost", self.port, protocol, tls=True, ca_file=self.cert)
        self.assertIs(connected, protocol)
        self.assertTrue(protocol.handshake_done)
        [pong] = yield protocol.request({"action": "ping"})
        self.assertEqual(pong["action"], "pong")
        protocol.transport.loseConnection()
        yield protocol.lost

    @inlineCallbacks
    def test_twisted_client_over_plain_tcp(self):
        protocol = _Closing()
        protocol.token = TOKEN
        yield connect_client(reactor, "127.0.0.1", self.plain_port, protocol)
        [pong] = yield protocol.request({"action": "ping"})
        self.assertEqual((pong["action"], protocol.handshake_done), ("pong", False))
        protocol.transport.loseConnection()
        yield protocol.lost

    @inlineCallbacks
    def test_twisted_client_refuses_what_does_not_verify(self):
        cases = [
            (self.port, "localhost", dict(ca_file=self.other_ca), "did not verify against"),
            (self.port, "localhost", {}, "did not verify against the system's trust store"),
            (self.named_port, "127.0.0.1", dict(ca_file=self.named_cert), "it is not a certificate for 127.0.0.1"),
            (self.plain_port, "localhost", dict(ca_file=self.cert, handshake_timeout=0.5),
             "did not answer the TLS handshake within 0.5 s"),
        ]
        for port, host, options, words in cases:
            protocol = _Closing()
            protocol.token = TOKEN
            yield self.refused(connect_client(reactor, host, port, protocol, tls=True, **options), words)
            yield protocol.lost

    @inlineCallbacks
    def test_command_line(self):
        folder = self.mktemp()
        os.makedirs(folder)
        token_file = os.path.join(folder, "token")
        with open(token_file, "w") as f:
            f.write(TOKEN + "\n")

        def run(*argv):
            out, err = io.StringIO(), io.StringIO()
            self.patch(sys, "stdout", out)
            self.patch(sys, "stderr", err)
            code = main.main(["ping", "--port", str(self.port), "--token-file", token_file, *argv])
            return code, out.getvalue(), err.getvalue()
        code, out, err = yield self.blocking(run, "--tls", "--ca-file", self.cert, "--host", "localhost")
        self.assertEqual((code, err), (0, ""))
        self.assertRegex(out, r"^runai \S+: 0 queued, idle, 1 worker\n$")
        code, out, err = yield self.blocking(run, "--ca-file", self.other_ca)
        self.assertEqual((code, out), (1, ""))
        self.assertRegex(err, rf"^runai: the certificate of 127\.0\.0\.1:{self.port} did not verify against "
                              rf".*other-cert\.pem: .+\n$")


class TwistdTests(SynchronousTestCase):
    """The installed commands as docs/tls.md runs them: twistd runai --listen ssl:...
    --token-file, then runai ping --tls --ca-file; and a bad pair stops twistd at once."""

    def setUp(self):
        self.folder = os.path.realpath(self.mktemp())
        self.key, self.cert = make_certificate(self.folder)
        self.token_file = os.path.join(self.folder, "token")
        with open(self.token_file, "w") as f:
            f.write(TOKEN + "\n")
        self.models = os.path.join(self.folder, "models")
        os.makedirs(self.models)

    def twistd(self, listen):
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        return subprocess.Popen(
            [twistd, "--nodaemon", "--pidfile=", "--logfile=-", "runai", "--listen", listen,
             "--token-file", self.token_file, "--model-dir", self.models, "--device", "cpu"],
            cwd=self.folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )

    def test_ping_over_tls(self):
        server = self.twistd(ssl_endpoint(self.key, self.cert))
        self.addCleanup(lambda: server.poll() is None and server.kill())
        port = reported_port(server, timeout=60)
        self.assertIsNotNone(port, "the server did not report its port")
        cli = subprocess.run(
            [sys.executable, "-m", "runai.cli.main", "ping", "--tls", "--ca-file", self.cert, "--host", "localhost",
             "--port", str(port), "--token-file", self.token_file],
            capture_output=True, text=True, timeout=60,
        )
        self.assertEqual(cli.returncode, 0, cli.stderr)
        self.assertRegex(cli.stdout, r"^runai \S+: \d+ queued, (idle|busy), 1 worker\n$")
        server.terminate()
        server.wait(timeout=60)
        server.stdout.close()

    def test_a_mismatched_pair_stops_twistd_at_start(self):
        _, other_cert = make_certificate(self.folder, stem="other")
        server = self.twistd(ssl_endpoint(self.key, other_cert))
        self.addCleanup(lambda: server.poll() is None and server.kill())
        output, _ = server.communicate(timeout=60)
        self.assertEqual(server.returncode, 1)
        self.assertIn(f"--listen: the private key {self.key} does not match the certificate {other_cert}\n",
                      output.splitlines(keepends=True)[-1])
        self.assertNotIn("Traceback", output)

