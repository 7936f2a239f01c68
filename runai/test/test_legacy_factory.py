"""runai.doors.legacy.factory: auto-shutdown, driven by a Clock."""

from runai.test.support import ServerTestCase

P = 1024


class AutoShutdownTests(ServerTestCase):
    auto_shutdown = True

    def test_no_client_within_timeout(self):
        self.factory.server_started()
        self.reactor.advance(9.9)
        self.assertEqual(self.stopped, [])
        self.reactor.advance(0.1)
        self.assertEqual(self.stopped, [True])

    def test_timeout_after_last_client_leaves(self):
        self.factory.server_started()
        a, _ = self.connect()
        b, _ = self.connect()
        self.reactor.advance(100)
        a.connectionLost(None)
        self.reactor.advance(100)
        self.assertEqual(self.stopped, [])
        b.connectionLost(None)
        self.reactor.advance(9)
        c, _ = self.connect()
        self.reactor.advance(100)
        self.assertEqual(self.stopped, [])
        c.connectionLost(None)
        self.reactor.advance(10)
        self.assertEqual(self.stopped, [True])

    def test_quit_packet_stops_server(self):
        self.factory.server_started()
        proto, _ = self.connect()
        proto.dataReceived(b"x" * P)
        self.assertEqual(self.stopped, [True])
