# -*- test-case-name: runai.test.test_broker_e2e -*-
"""A front server's back end (``twistd runai --broker URL``): the Redis connection and
the :class:`runai.broker.front.BrokerBackend`, in place of local workers and their queue."""

from twisted.application import service
from twisted.logger import Logger

from runai.broker.client import RedisConnection, make_redis
from runai.broker.front import BrokerBackend

log = Logger(namespace="runai.tap")


class _Connection(RedisConnection):
    def startService(self):
        super().startService()
        log.info("runai front: jobs go to the workers through {broker}", broker=self.address.display)


def front_backend(config, reactor, parent):
    """The BrokerBackend for ``config`` (its ``broker-address``), its connection started
    before it and stopped after it, both children of ``parent``."""
    address = config["broker-address"]
    connection = _Connection(make_redis(address), reactor, threads=4)
    connection.address = address
    node = service.MultiService()
    connection.setServiceParent(node)
    backend = BrokerBackend(connection, reactor, config["model-dir"])
    backend.setServiceParent(node)
    node.setServiceParent(parent)
    return backend
