# -*- test-case-name: runai.test.test_broker_client -*-
"""The connection to Redis: redis-py called in a thread pool of the broker's own.

Every call returns a Deferred that fires on the reactor thread. Blocking reads (``XREAD
BLOCK``, ``XREADGROUP BLOCK``) block a pool thread for at most :data:`BLOCK_MS`, never the
reactor, and each takes its own connection from redis-py's (thread-safe) pool. redis-py
opens a fresh connection after a broken one; :class:`Backoff` spaces the retries of the
loops that use it, so that a Redis that is down is not hammered.
"""

import functools
import threading

from twisted.application import service
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

# How long a blocking read waits for an entry: bounds how long a stop waits for it too.
BLOCK_MS = 1000
SOCKET_TIMEOUT = 10.0


def make_redis(address):
    """A redis-py client for ``address`` (:class:`runai.broker.url.BrokerAddress`)."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    # One immediate retry (a pooled connection that a restarted Redis closed); the loops
    # that call it space their own retries (Backoff), so redis-py's would only add seconds.
    options = dict(host=address.host, port=address.port, db=address.db, username=address.username,
                   password=address.password, socket_timeout=SOCKET_TIMEOUT, socket_connect_timeout=5.0,
                   health_check_interval=30, decode_responses=False, retry=Retry(NoBackoff(), 1))
    if address.tls:
        options.update(ssl=True, ssl_cert_reqs="required", ssl_ca_certs=address.ca_file)
    return redis.Redis(**options)


def is_connection_error(failure_or_error):
    """True when ``failure_or_error`` says that Redis cannot be reached (as opposed to a
    command that Redis refused)."""
    import redis

    error = getattr(failure_or_error, "value", failure_or_error)
    return isinstance(error, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError))


class Backoff:
    """Delays between retries: ``first`` doubled after each failure up to ``most``."""

    def __init__(self, first=0.2, most=5.0):
        self.first = first
        self.most = most
        self.current = first

    def next(self):
        delay = self.current
        self.current = min(self.most, self.current * 2)
        return delay

    def reset(self):
        self.current = self.first


class RedisConnection(service.Service):
    """redis-py's client and the threads that call it. ``redis`` is a redis-py client (or a
    test double); ``threads`` must cover every blocking reader plus a few commands."""

    log = Logger()

    def __init__(self, redis, reactor, threads=4, name="runai-broker"):
        self.redis = redis
        self.reactor = reactor
        self.pool = ThreadPool(minthreads=0, maxthreads=threads, name=name)
        self.pool.threadFactory = functools.partial(threading.Thread, daemon=True)

    def startService(self):
        super().startService()
        self.pool.start()

    def stopService(self):
        """Join the threads off the reactor thread: a blocking read ends within BLOCK_MS."""
        super().stopService()
        stopped = defer.Deferred()
        threading.Thread(target=lambda: (self.pool.stop(), self.reactor.callFromThread(stopped.callback, None)),
                         name="runai-broker-stop", daemon=True).start()
        return stopped

    def call(self, f, *args, **kwargs):
        """``f(*args, **kwargs)`` in a pool thread; a Deferred of its result."""
        return deferToThreadPool(self.reactor, self.pool, f, *args, **kwargs)

    def execute(self, *args):
        """One Redis command, e.g. ``execute("XLEN", stream)``."""
        return self.call(self.redis.execute_command, *args)

    def pipeline(self, commands):
        """Several commands in one round trip, not atomic: ``commands`` is a list of
        argument tuples; a Deferred of the list of their replies (an error raises)."""
        def run():
            pipe = self.redis.pipeline(transaction=False)
            for command in commands:
                pipe.execute_command(*command)
            return pipe.execute()
        return self.call(run)

    def script(self, source):
        """A Lua script; call it with ``(keys, args)``. Sent whole each time (EVAL): a
        restarted Redis has forgotten every script loaded before, and these are short."""
        return lambda keys, args: self.call(self.redis.eval, source, len(keys), *keys, *args)
