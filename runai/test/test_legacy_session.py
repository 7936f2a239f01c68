"""runai.doors.legacy.session: a connection's requests, its token, its jobs' replies,
cancels and disconnects, on the real core and queue with a scripted engine."""

from runai.core import errors
from runai.client import txt2img_request
from runai.doors.legacy.factory import AutoShutdown
from runai.doors.legacy.session import Session
from runai.test.support import ManualPool, ServerTestCase, frame

P = 1024


class RobustnessTests(ServerTestCase):
    def test_a_bug_costs_one_request_not_the_connection(self):
        def broken(session, job_id):
            raise RuntimeError("a bug")
        self.patch(Session, "cancel", broken)
        proto, transport = self.connect()
        proto.dataReceived(frame({"action": "cancel", "id": 1}))
        [reply] = self.replies(transport)
        self.assertEqual(reply["error"]["code"], errors.INTERNAL)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        proto.dataReceived(frame({"action": "ping"}))
        self.assertEqual(self.replies(transport)[0]["action"], "pong")

    def test_connection_limit(self):
        self.factory.max_connections = 2
        self.connect()
        self.connect()
        self.assertIsNone(self.factory.buildProtocol(None))

    def test_queued_input_images_are_bounded(self):
        import base64
        import io
        from PIL import Image
        buf = io.BytesIO()
        Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, format="PNG")
        pixels = base64.b64encode(buf.getvalue()).decode()
        self.core.max_queued_input_bytes_per_owner = len(buf.getvalue()) * 2
        proto, transport = self.connect()
        for _ in range(3):
            request = txt2img_request("x", "v1/tiny", steps=3)
            request["action"] = "img2img"
            request["options"] = {k.replace("txt2img", "img2img"): v for k, v in request["options"].items()}
            request["options"]["pixels"] = pixels
            proto.dataReceived(frame(request))
        errors_seen = [m["error"]["code"] for m in self.replies(transport) if "error" in m]
        self.assertEqual(errors_seen, [errors.QUEUE_FULL])


def img2img_request(action="img2img", truncated=False, **options):
    """A small ``action`` request with a 64x64 PNG (cut in half when ``truncated``)."""
    import base64
    import io
    from PIL import Image
    buf = io.BytesIO()
    Image.frombytes("L", (64, 64), bytes(i * 7919 % 251 for i in range(64 * 64))).save(buf, format="PNG")
    data = buf.getvalue()[:len(buf.getvalue()) // 2] if truncated else buf.getvalue()
    request = txt2img_request("x", "v1/tiny", steps=3)
    request["action"] = action
    request["options"] = {k.replace("txt2img", action): v for k, v in request["options"].items()}
    request["options"].update(pixels=base64.b64encode(data).decode(), **options)
    return request


class ImageArrivalTests(ServerTestCase):
    """Client images are decoded whole on arrival, off the reactor, before the queue."""

    def setUp(self):
        super().setUp()
        self.parse_pool = self.factory.parse_pool = ManualPool()

    def test_requests_with_images_are_parsed_in_the_pool_in_order(self):
        proto, transport = self.connect()
        request = img2img_request()
        self.assertLess(len(frame(request)), self.factory.parse_in_thread_bytes)
        proto.dataReceived(frame(request) + frame({"action": "ping", "id": "after"}))
        # The image waits for a thread; the ping waits for the image.
        self.assertEqual((len(self.parse_pool.calls), self.replies(transport)), (1, []))
        self.parse_pool.run_one()
        self.assertEqual(len(self.pool.calls), 1)  # the job reached the queue
        [pong] = self.replies(transport)
        self.assertEqual((pong["action"], pong["id"]), ("pong", "after"))

    def test_other_requests_are_parsed_in_line(self):
        proto, transport = self.connect()
        proto.dataReceived(frame(self.request()) + frame({"action": "ping"}))
        self.assertEqual(self.parse_pool.calls, [])
        self.assertEqual(self.replies(transport)[-1]["action"], "pong")

    def test_an_escaped_action_still_goes_to_the_pool(self):
        import json

        from runai.doors.legacy import framing
        proto, transport = self.connect()
        request = {"action": "img2img", "options": {"model": "v1/tiny", "prompt": "x", "steps": 3,
                                                    "pixels": img2img_request()["options"]["pixels"]}}
        payload = json.dumps(request).replace('"img2img"', '"img2im\\u0067"').encode()
        self.assertNotIn(b"img2img", payload)
        proto.dataReceived(framing.encode(payload))
        self.assertEqual(len(self.parse_pool.calls), 1)
        self.parse_pool.run_one()
        self.assertEqual(len(self.pool.calls), 1)  # an img2img job, queued

    def test_a_corrupt_image_is_refused_before_the_queue(self):
        proto, transport = self.connect()
        truncated = img2img_request(truncated=True)["options"]["pixels"]
        for what, request in (("pixels", img2img_request(truncated=True)),
                              ("mask", img2img_request("inpaint", mask=truncated))):
            proto.dataReceived(frame(request))
            self.parse_pool.run_one()
            [reply] = self.replies(transport)
            self.assertEqual(reply["error"]["code"], errors.BAD_REQUEST)
            self.assertIn(f"option {what!r} is a corrupt or truncated image", reply["error"]["message"])
        self.assertEqual((self.pool.calls, self.engine.requests), ([], []))


class TokenTests(ServerTestCase):
    def setUp(self):
        super().setUp()
        self.factory.token = b"s3cret-s3cret-s3cret"

    def test_no_or_wrong_token_refused_and_closed(self):
        for token in (None, "guess", 5, "\ud800"):
            proto, transport = self.connect()
            message = {"action": "ping"} if token is None else {"action": "ping", "token": token}
            proto.dataReceived(frame(message))
            [reply] = self.replies(transport)
            self.assertEqual(reply["error"]["code"], errors.UNAUTHORIZED)
            self.assertTrue(transport.disconnecting)

    def test_control_packets_need_a_shown_token(self):
        self.factory.auto_shutdown = AutoShutdown(self.reactor, 10, self.factory._stop_server)
        stranger, transport = self.connect()
        stranger.dataReceived(b"x" * P)
        self.assertEqual(self.stopped, [])
        self.assertTrue(transport.disconnecting)
        client, _ = self.connect()
        client.dataReceived(frame({"action": "ping", "token": "s3cret-s3cret-s3cret"}))
        client.dataReceived(b"x" * P)
        self.assertEqual(self.stopped, [True])

    def test_right_token(self):
        proto, transport = self.connect()
        proto.dataReceived(frame({"action": "ping", "token": "s3cret-s3cret-s3cret"}))
        self.assertEqual(self.replies(transport)[0]["action"], "pong")


class QueueTests(ServerTestCase):
    def test_generation_replies(self):
        proto, transport = self.connect()
        request = self.request(seed=42, n_samples=2)
        request["options"]["pos_x"] = 5
        request["options"]["pos_y"] = 9
        request["id"] = "r1"
        proto.dataReceived(frame(request))
        self.assertEqual(self.replies(transport), [])
        self.pool.run_one()
        replies = self.replies(transport)
        progress = [m for m in replies if m.get("action") == 4]
        self.assertEqual([(m["step"], m["total"]) for m in progress], [(1, 3), (2, 3), (3, 3)])
        self.assertTrue(all(m["reqtype"] == "txt2img" and m["id"] == "r1" for m in replies))
        images = [m for m in replies if "image" in m]
        self.assertEqual([m["seed"] for m in images], [42, 43])
        self.assertEqual({(m["pos_x"], m["pos_y"]) for m in images}, {(5, 9)})
        self.assertEqual(replies[-1]["action"], "done")
        self.assertEqual(replies[-1]["images"], 2)

    def test_prompts_stay_out_of_the_log_unless_asked(self):
        from twisted.internet.testing import EventLoggingObserver
        from twisted.logger import globalLogPublisher
        for log_prompts in (False, True):
            events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
            self.core.log_prompts = log_prompts
            proto, _ = self.connect()
            proto.dataReceived(frame(txt2img_request("a secret lighthouse", "v1/tiny")))
            self.pool.run_one()
            logged = any("secret" in repr(event) for event in events)
            self.assertEqual(logged, log_prompts)

    def test_fifo_positions_across_clients(self):
        a, ta = self.connect()
        b, tb = self.connect()
        c, tc = self.connect()
        a.dataReceived(frame(self.request(seed=1)))
        b.dataReceived(frame(self.request(seed=2)))
        c.dataReceived(frame(self.request(seed=3)))
        self.assertEqual(self.replies(ta), [])
        self.assertEqual(self.replies(tb), [{"action": "queued", "position": 1, "reqtype": "txt2img", "id": None}])
        self.assertEqual(self.replies(tc)[0]["position"], 2)
        ping = frame({"action": "ping"})
        a.dataReceived(ping)
        self.assertEqual(self.replies(ta)[0]["queued"], 2)
        self.pool.run_one()
        self.assertEqual(self.replies(ta)[-1]["action"], "done")
        self.assertEqual(self.replies(tc), [{"action": "queued", "position": 1, "reqtype": "txt2img", "id": None}])
        self.pool.run_one()
        self.pool.run_one()
        self.assertEqual([r.seed for r in self.engine.requests], [1, 2, 3])
        self.assertEqual(self.replies(tb)[-1]["action"], "done")
        self.assertEqual(self.replies(tc)[-1]["action"], "done")

    def test_cancel_packet_stops_running_job_at_next_step(self):
        proto, transport = self.connect()
        proto.dataReceived(frame(self.request(steps=10)))
        self.engine.during_step = lambda step: step == 2 and proto.dataReceived(b"c" * P)
        self.pool.run_one()
        replies = self.replies(transport)
        self.assertEqual(replies[-1]["error"]["code"], errors.CANCELLED)
        self.assertEqual(len([m for m in replies if m.get("action") == 4]), 2)
        self.assertFalse(any("image" in m for m in replies))
        # The worker goes on serving.
        proto.dataReceived(frame(self.request()))
        self.engine.during_step = None
        self.pool.run_one()
        self.assertEqual(self.replies(transport)[-1]["action"], "done")

    def test_cancel_by_id_queued_and_unknown(self):
        a, ta = self.connect()
        a.dataReceived(frame(dict(self.request(), id="first")))
        a.dataReceived(frame(dict(self.request(), id="second")))
        self.replies(ta)
        a.dataReceived(frame({"action": "cancel", "id": "second"}))
        [reply] = self.replies(ta)
        self.assertEqual((reply["error"]["code"], reply["id"]), (errors.CANCELLED, "second"))
        a.dataReceived(frame({"action": "cancel", "id": "nope"}))
        self.assertEqual(self.replies(ta)[0]["error"]["code"], errors.NOT_FOUND)
        self.pool.run_one()
        self.assertEqual(self.replies(ta)[-1]["id"], "first")
        self.assertEqual(self.pool.calls, [])

    def test_cancel_by_id_running(self):
        a, ta = self.connect()
        a.dataReceived(frame(dict(self.request(steps=5), id=11)))
        self.engine.during_step = lambda step: step == 1 and a.dataReceived(frame({"action": "cancel", "id": 11}))
        self.pool.run_one()
        replies = self.replies(ta)
        self.assertEqual((replies[-1]["error"]["code"], replies[-1]["id"]), (errors.CANCELLED, 11))

    def test_duplicate_id_refused(self):
        a, ta = self.connect()
        a.dataReceived(frame(dict(self.request(), id="same")))
        a.dataReceived(frame(dict(self.request(), id="same")))
        self.assertEqual(self.replies(ta)[-1]["error"]["code"], errors.BAD_REQUEST)

    def test_another_client_cannot_cancel(self):
        a, ta = self.connect()
        b, tb = self.connect()
        a.dataReceived(frame(dict(self.request(steps=4), id=1)))
        self.engine.during_step = lambda step: step == 1 and (b.dataReceived(b"c" * P),
                                                               b.dataReceived(frame({"action": "cancel", "id": 1})))
        self.pool.run_one()
        self.assertEqual(self.replies(ta)[-1]["action"], "done")
        self.assertEqual(self.replies(tb)[0]["error"]["code"], errors.NOT_FOUND)

    def test_disconnect_drops_queued_and_cancels_running(self):
        a, ta = self.connect()
        b, tb = self.connect()
        a.dataReceived(frame(self.request(steps=5)))
        a.dataReceived(frame(self.request(seed=99)))
        b.dataReceived(frame(self.request(seed=7)))
        self.engine.during_step = lambda step: step == 2 and a.connectionLost(None)
        self.pool.run_one()
        self.assertEqual(len(self.pool.calls), 1)
        self.engine.during_step = None
        self.pool.run_one()
        self.assertEqual([r.seed for r in self.engine.requests][-1], 7)
        self.assertNotIn(99, [r.seed for r in self.engine.requests])
        self.assertEqual(self.replies(tb)[-1]["action"], "done")

    def test_per_client_queue_limit(self):
        self.queue.max_queued_per_owner = 2
        a, ta = self.connect()
        for _ in range(4):
            a.dataReceived(frame(self.request()))
        codes = [m["error"]["code"] for m in self.replies(ta) if "error" in m]
        self.assertEqual(codes, [errors.QUEUE_FULL])

    def test_engine_crash_is_reported_and_worker_goes_on(self):
        proto, transport = self.connect()

        def boom(step):
            raise RuntimeError("kaboom")
        self.engine.during_step = boom
        proto.dataReceived(frame(self.request()))
        self.pool.run_one()
        [reply] = [m for m in self.replies(transport) if "error" in m]
        self.assertEqual(reply["error"]["code"], errors.INTERNAL)
        self.assertIn("kaboom", reply["error"]["message"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.engine.during_step = None
        proto.dataReceived(frame(self.request()))
        self.pool.run_one()
        self.assertEqual(self.replies(transport)[-1]["action"], "done")
