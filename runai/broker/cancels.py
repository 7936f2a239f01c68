# -*- test-case-name: runai.test.test_broker_front -*-
"""Cancels pushed to a worker process: a front publishes a cancelled job's key on the
``runai:cancels`` channel, and this listener stops the consumer running it at once, at the
job's next step, however short steps are.

Pub/sub is fire and forget: a message sent while a worker is not listening is lost. So
the cancel key stays the source of truth: a worker checks it when it takes a job, and
polls it while a job runs (:class:`runai.broker.consumer.Consumer`); the push only makes
the common case immediate.
"""

from twisted.application import service
from twisted.logger import Logger

from runai.broker import wire
from runai.broker.client import BLOCK_MS, Backoff, is_connection_error


class CancelListener(service.Service):
    """Listens on ``keys.cancels`` in one thread of ``connection``'s pool and tells each
    of ``consumers`` the job keys it hears."""

    log = Logger()

    def __init__(self, connection, reactor, consumers=(), keys=None):
        self.connection = connection
        self.reactor = reactor
        self.consumers = list(consumers)
        self.keys = keys or wire.Keys()
        self._backoff = Backoff()
        self._retry = None
        self._listening = False

    def startService(self):
        super().startService()
        self._listening = True
        self._listen()

    def stopService(self):
        super().stopService()
        self._listening = False  # the thread ends within BLOCK_MS
        if self._retry is not None and self._retry.active():
            self._retry.cancel()

    def _listen(self):
        if self._listening:
            self.connection.call(self._run).addCallbacks(lambda _: None, self._failed)

    def _run(self):
        """In a pool thread, until the service stops."""
        pubsub = self.connection.redis.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(self.keys.cancels)
            self.reactor.callFromThread(self._backoff.reset)
            while self._listening:
                message = pubsub.get_message(timeout=BLOCK_MS / 1000)
                if message and message.get("type") == "message":
                    data = message["data"]
                    key = data.decode("utf-8", "replace") if isinstance(data, bytes) else str(data)
                    self.reactor.callFromThread(self.heard, key)
        finally:
            pubsub.close()

    def _failed(self, failure):
        if not self._listening:
            return
        if not is_connection_error(failure):
            self.log.failure("The cancel listener failed", failure)
        self._retry = self.reactor.callLater(self._backoff.next(), self._listen)

    def heard(self, job_key):
        for consumer in self.consumers:
            consumer.cancel_if_running(job_key)
