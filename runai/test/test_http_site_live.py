"""runai.doors.http.site through a real server on 127.0.0.1, with the real Api, core and
worker: what the door bounds, seen from a client (the byte-by-byte tests are in
runai.test.test_http_site)."""

import gc
import json
import socket
import time
import tracemalloc

import requests
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks

from runai.doors.http import site
from runai.test.test_http import HttpTestCase
from runai.test.test_http_site import TOKEN, strict_json


def raw_post(port, path, body, headers=b"", close=False):
    """POST ``body`` on a plain socket; the response's bytes (none with ``close``: the
    socket is closed as soon as the request is sent)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    try:
        sock.sendall(b"POST /sdapi/v1/%s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nConnection: close\r\n%s\r\n"
                     % (path.encode(), len(body), headers) + body)
        if close:
            return b""
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return data
            data += chunk
    finally:
        sock.close()


class DoorTests(HttpTestCase):
    token = TOKEN.decode()

    def auth(self):
        return {"Authorization": f"Bearer {self.token}"}

    def post_auth(self, path, body):
        return self.post(path, body, headers=self.auth())

    def spy_submissions(self):
        """Each request the core is asked to queue, and each job's end."""
        seen = []
        submit = self.core.submit

        def spying(request, owner, listener, held_bytes=0):
            job = submit(request, owner, listener, held_bytes=held_bytes)
            seen.append(job)
            return job
        self.core.submit = spying
        return seen

    @inlineCallbacks
    def test_a_client_that_leaves_before_its_job_is_queued_leaves_no_job(self):
        import base64
        import io

        from PIL import Image

        submitted = self.spy_submissions()
        picture = io.BytesIO()
        Image.effect_noise((1024, 1024), 64).convert("RGB").save(picture, format="PNG")
        body = json.dumps({"prompt": "x", "steps": 150, "width": 64, "height": 64, "denoising_strength": 1.0,
                           "init_images": [base64.b64encode(picture.getvalue()).decode()]}).encode()
        parses = []
        real_build = self.api._off_reactor
        self.api._off_reactor = lambda f, *args: parses.append(f) or real_build(f, *args)
        port = self.http.getHost().port
        auth = b"Authorization: Bearer " + TOKEN + b"\r\n"
        for _ in range(3):
            yield self.in_thread(raw_post, port, "img2img", body, auth, True)
        yield self.in_thread(time.sleep, 1.0)
        self.assertTrue(parses)  # the images were checked in the pool, a thread hop away
        # Gone before the hop back: nothing queued; or queued and cancelled, never run to its end.
        self.assertEqual([job.state for job in submitted if job.state not in ("failed",)], [])
        self.assertEqual(self.core.status(), (0, False))

    @inlineCallbacks
    def test_refused_large_requests_free_their_memory_at_once(self):
        big = 6 * 1024 * 1024  # under the test site's 8 MiB limit
        cases = [
            ("txt2img", b'{"prompt": "' + b"x" * big + b'"', self.auth(), 400),  # not JSON: cut short
            ("txt2img", b'{"prompt": "x", "steps": 0, "junk": "' + b"y" * big + b'"}', self.auth(), 422),
            ("img2img", json.dumps({"prompt": "x", "init_images": ["A" * big + "!"]}).encode(), self.auth(), 422),
            ("txt2img", b'{"prompt": "' + b"z" * big + b'"}', {}, 401),  # no token: never read into memory
            ("txt2img", b"\xff" * big, self.auth(), 400),  # not UTF-8
            ("txt2img", b"{" * (9 * 1024 * 1024), self.auth(), 413),  # over the limit: answered, then dropped
        ]

        def refuse_all():
            answers = []
            for path, body, headers, _ in cases:
                answers.append(requests.post(f"{self.base}/{path}", data=body, headers=headers, timeout=60).status_code)
            return answers

        yield self.in_thread(refuse_all)  # the first time: imports, caches, pools warm up
        gc.collect()
        gc.disable()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for _ in range(3):
                answers = yield self.in_thread(refuse_all)
                self.assertEqual(answers, [status for _, _, _, status in cases])
            grown = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
            gc.enable()
        # Eighteen refusals of 6 to 9 MiB each: what is kept is well under one of them.
        self.assertLess(grown, 4 * 1024 * 1024, f"{grown / 2**20:.1f} MiB kept")

    @inlineCallbacks
    def test_a_queued_job_keeps_its_request_and_parameters_not_its_body(self):
        blocker = self.talk(__import__("runai.test.test_e2e", fromlist=["legacy_request"]).legacy_request(
            self.models, steps=60))
        yield self.in_thread(time.sleep, 0.3)
        submitted = self.spy_submissions()
        body = {"prompt": "x", "steps": 1, "width": 64, "height": 64, "ignored": "i" * 3_000_000,
                "comments": {"note": "c" * 1000}}
        waiting = self.in_thread(self.post_auth, "txt2img", body)
        yield self.in_thread(lambda: [time.sleep(0.02) for _ in range(500) if not submitted])
        [job] = submitted
        self.assertEqual(job.state, "queued")
        self.assertLess(job.held_bytes, 2000)  # the echoed parameters: no "ignored"
        self.assertGreater(job.held_bytes, 1000)  # ... but "comments", as AUTOMATIC1111 echoes it
        self.assertEqual(job.owner.content.getvalue(), b"")  # the request holds no body
        # The queue's byte limits count what the door keeps.
        self.core.max_queued_input_bytes = job.held_bytes + 500
        response = yield self.in_thread(self.post_auth, "txt2img", body)
        self.assertEqual((response.status_code, response.json()["error"]), (503, "queue_full"))
        self.core.max_queued_input_bytes = 512 * 1024 * 1024
        yield blocker
        response = yield waiting
        self.assertEqual(response.status_code, 200)
        self.assertNotIn("ignored", response.json()["parameters"])
        self.assertEqual(response.json()["parameters"]["comments"], {"note": "c" * 1000})

    @inlineCallbacks
    def test_nan_and_infinity_never_reach_a_reply(self):
        body = (b'{"prompt": "x", "steps": 1, "width": 64, "height": 64, "junk": NaN, "subseed_strength": Infinity,'
                b' "comments": {"a": [NaN, -Infinity, 1.5]}, "s_noise": -Infinity}')
        response = yield self.in_thread(lambda: requests.post(f"{self.base}/txt2img", data=body, timeout=60,
                                                               headers=self.auth()))
        self.assertEqual(response.status_code, 200)
        reply = strict_json(response.text)
        self.assertEqual(reply["parameters"]["comments"], {"a": [None, None, 1.5]})
        self.assertIsNone(reply["parameters"]["subseed_strength"])
        strict_json(reply["info"])
        for body in (b'{"prompt": "x", "steps": NaN}', b'{"prompt": "x", "cfg_scale": Infinity}'):
            response = yield self.in_thread(lambda: requests.post(f"{self.base}/txt2img", data=body, timeout=60,
                                                                   headers=self.auth()))
            self.assertEqual(response.status_code, 422)
            strict_json(response.text)

    @inlineCallbacks
    def test_errors_quote_little_of_what_was_sent(self):
        long = "Q" * 100_000
        for body in ({"prompt": "x", "sampler_name": long}, {"prompt": "x", "scheduler": "karras", "sampler_name":
                     "Euler a", "override_settings": {"sd_model_checkpoint": long}},
                     {"prompt": "x", "sampler_name": "DDIM", "scheduler": long}):
            response = yield self.in_thread(self.post_auth, "txt2img", body)
            self.assertIn(response.status_code, (404, 422), response.text[:200])
            detail = response.json()["detail"]
            self.assertLess(len(detail), 1000)
            self.assertNotIn("Q" * 200, detail)
        self.assertEqual(response.reason, "Not Found")
        response = yield self.in_thread(self.post_auth, "txt2img", {"prompt": "x", "steps": 0})
        self.assertEqual((response.status_code, response.reason), (422, "Unprocessable Content"))

    @inlineCallbacks
    def test_eta_is_ddims_eta(self):
        submitted = self.spy_submissions()
        response = yield self.in_thread(self.post_auth, "txt2img", {"prompt": "x", "steps": 1, "width": 64,
                                                                    "height": 64, "sampler_name": "DDIM", "eta": 0.7})
        self.assertEqual(response.status_code, 200)
        self.assertEqual((submitted[0].request.scheduler, submitted[0].request.ddim_eta), ("ddim", 0.7))
        response = yield self.in_thread(self.post_auth, "txt2img", {"prompt": "x", "eta": 2})
        self.assertEqual(response.status_code, 422)
        self.assertIn("'eta'", response.json()["detail"])

    @inlineCallbacks
    def test_a_burst_of_200_connections_is_served(self):
        from twisted.internet import endpoints

        port = yield endpoints.serverFromString(reactor, site.with_backlog("tcp:0:interface=127.0.0.1")).listen(
            self.site)
        self.addCleanup(port.stopListening)
        self.assertEqual(port.backlog, site.BACKLOG)

        def burst():
            socks = []
            for _ in range(200):
                sock = socket.socket()
                sock.setblocking(False)
                sock.connect_ex(("127.0.0.1", port.getHost().port))
                socks.append(sock)
            answers = []
            for sock in socks:
                sock.setblocking(True)
                sock.settimeout(30)
                try:
                    sock.sendall(b"GET /sdapi/v1/samplers HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                                 b"Authorization: Bearer " + TOKEN + b"\r\n\r\n")
                    answers.append(sock.recv(12))
                except OSError as e:
                    answers.append(type(e).__name__)
                finally:
                    sock.close()
            return answers
        answers = self.in_thread(burst)
        reactor.callLater(0, time.sleep, 0.3)  # the reactor is busy while they come
        answers = yield answers
        self.assertEqual(set(answers), {b"HTTP/1.1 200"})
