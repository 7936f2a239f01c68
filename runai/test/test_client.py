"""The Twisted client protocol, against a StringTransport standing in for the server."""

import json

from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from runai.client import RunaiClientProtocol, txt2img_request
from runai.test.support import decode_all, frame


class ClientProtocolTests(SynchronousTestCase):
    def setUp(self):
        self.client = RunaiClientProtocol()
        self.transport = StringTransport()
        self.client.makeConnection(self.transport)

    def sent(self):
        messages = decode_all(self.transport.value())
        self.transport.clear()
        return messages

    def reply(self, message):
        self.client.dataReceived(frame(message))

    def test_generation_fires_on_done_with_every_message(self):
        d = self.client.request(txt2img_request("a lighthouse", "v1/tiny"))
        [sent] = self.sent()
        rid = sent["id"]
        self.assertEqual(sent["options"]["txt2img_model"], "v1/tiny")
        self.reply({"action": 4, "step": 1, "total": 1, "id": rid})
        self.assertNoResult(d)
        self.reply({"image": "aGk=", "id": rid})
        self.reply({"action": "done", "id": rid})
        messages = self.successResultOf(d)
        self.assertEqual([m.get("action", "image") for m in messages], [4, "image", "done"])

    def test_cancel_does_not_take_the_jobs_answer(self):
        d = self.client.request(dict(txt2img_request("x", "v1/tiny"), id="job"))
        self.successResultOf(self.client.request({"action": "cancel", "id": "job"}))
        self.assertEqual([m["action"] for m in self.sent()], ["txt2img", "cancel"])
        self.reply({"error": {"code": "cancelled", "message": "cancelled"}, "id": "job"})
        [message] = self.successResultOf(d)
        self.assertEqual(message["error"]["code"], "cancelled")

    def test_single_reply_actions(self):
        for action in ("ping", "models", "history", "history_delete"):
            d = self.client.request({"action": action})
            [sent] = self.sent()
            answer = "pong" if action == "ping" else action
            self.reply({"action": answer, "id": sent["id"]})
            self.assertEqual(self.successResultOf(d)[0]["action"], answer)

    def test_token_is_sent(self):
        self.client.token = "s3cret-s3cret-s3cret"
        self.client.request({"action": "ping"})
        self.assertEqual(self.sent()[0]["token"], "s3cret-s3cret-s3cret")

    def test_connection_lost_fails_waiting_requests(self):
        d = self.client.request({"action": "ping"})
        self.client.connectionLost(Failure(ConnectionError("gone")))
        self.failureResultOf(d, ConnectionError)

    def test_replies_are_framed_like_the_legacy_client(self):
        self.client.request({"action": "ping"})
        data = self.transport.value()
        self.assertEqual(len(data) % 1024, 0)
        self.assertEqual(data[-1024:], bytes(1024))
        self.assertEqual(json.loads(data[:1024].rstrip(b"\0"))["action"], "ping")


class ClientTests(SynchronousTestCase):
    def test_twisted_client_gets_the_models_reply(self):
        from runai.client import RunaiClientProtocol

        client = RunaiClientProtocol()
        client.makeConnection(StringTransport())
        d = client.request({"action": "models", "id": "m"})
        got = []
        d.addCallback(got.append)
        client.message_received({"action": "models", "models": [], "id": "m"})
        self.assertEqual(got, [[{"action": "models", "models": [], "id": "m"}]])
