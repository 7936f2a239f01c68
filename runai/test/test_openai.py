"""The OpenAI images API door (runai.doors.openai), driven by the official ``openai``
client against a real server on 127.0.0.1 with the real worker thread and a tiny model;
socket clients share its queue."""

import base64
import io
import time

import openai
import requests
from PIL import Image
from twisted.internet import reactor, task
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from runai.doors.openai.api import Api
from runai.doors.openai.site import make_site
from runai.test.test_e2e import P, LegacyClient, LiveServer, legacy_request, png_of, tiny_model_dir
from runai.test.test_http import pixels

TOKEN = "an-openai-token-of-some-length"
# The socket's legacy_request, as OpenAI fields (runai's extensions through extra_body).
SAME_AS_SOCKET = dict(model="v1/tiny", prompt="a lighthouse", size="64x64",
                      extra_body={"seed": 11, "steps": 2, "negative_prompt": "fog", "guidance_scale": 7.5})


def png(color=(200, 30, 30), size=(64, 64), mode="RGB"):
    out = io.BytesIO()
    Image.new(mode, size, color).save(out, format="PNG")
    return out.getvalue()


def decoded(b64):
    return Image.open(io.BytesIO(base64.b64decode(b64)))


class OpenAITestCase(LiveServer, TestCase):
    timeout = 300
    token = None

    def setUp(self):
        self.models = tiny_model_dir()
        self.start_server(self.models)
        self.clock = task.Clock()
        self.api = Api(self.core, reactor, pool=reactor.getThreadPool(), token=self.token, clock=self.clock)
        self.site = make_site(self.api, max_body=8 * 1024 * 1024)
        channels = []
        build = self.site.buildProtocol
        self.site.buildProtocol = lambda addr: channels.append(build(addr)) or channels[-1]
        self.http = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.base = f"http://127.0.0.1:{self.http.getHost().port}/v1"

        def close():
            for channel in channels:
                if getattr(channel, "transport", None) is not None:
                    channel.transport.abortConnection()
            return task.deferLater(reactor, 0.05, lambda: None)
        self.addCleanup(self.http.stopListening)
        self.addCleanup(close)

    def client(self, key=None, **options):
        options.setdefault("timeout", 120)
        return openai.OpenAI(base_url=self.base, api_key=key or self.token or "unused", max_retries=0, **options)

    def call(self, f, **kwargs):
        """``f(client)`` in a thread (the client blocks); a Deferred of its result. The
        client is closed after, its connections with it."""
        def run():
            with self.client(**kwargs) as client:
                return f(client)
        return self.in_thread(run)

    @staticmethod
    def until(condition, seconds=20):
        """Whether ``condition()`` came true within ``seconds`` (polled, in a thread)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if condition():
                return True
            time.sleep(0.01)
        return False

    def get(self, url, **headers):
        return self.in_thread(lambda: requests.get(url, headers=headers, timeout=60))

    @inlineCallbacks
    def assertRaisesFromClient(self, kind, f, param=None, code=None, key=None):
        try:
            yield self.call(f, key=key)
        except kind as e:
            error = e.body
        else:
            self.fail(f"{kind.__name__} not raised")
        self.assertEqual(set(error), {"message", "type", "param", "code"})
        if param is not None:
            self.assertEqual(error["param"], param, error)
        if code is not None:
            self.assertEqual(error["code"], code, error)
        return error


class GenerationTests(OpenAITestCase):
    @inlineCallbacks
    def test_same_seed_same_pixels_as_the_socket(self):
        result = yield self.call(lambda c: c.images.generate(**SAME_AS_SOCKET))
        [item] = result.data
        self.assertIsNone(item.url)
        image = decoded(item.b64_json)
        self.assertEqual((image.format, image.size), ("PNG", (64, 64)))
        self.assertEqual(item.model_extra["seed"], 11)
        self.assertLess(abs(result.created - time.time()), 60)
        [replies] = yield self.talk(legacy_request(self.models, seed=11, steps=2))
        [sent] = [m for m in replies if "image" in m]
        self.assertEqual(pixels(base64.b64decode(item.b64_json)), pixels(png_of(sent)))

    @inlineCallbacks
    def test_n_images_have_consecutive_seeds_and_the_asked_format(self):
        result = yield self.call(lambda c: c.images.generate(
            model="v1/tiny", prompt="x", n=3, size="64x64", output_format="jpeg", quality="low",
            style="vivid", user="someone", extra_body={"seed": 5, "steps": 2}))
        self.assertEqual([item.model_extra["seed"] for item in result.data], [5, 6, 7])
        self.assertEqual({decoded(item.b64_json).format for item in result.data}, {"JPEG"})
        self.assertEqual(result.output_format, "jpeg")
        webp = yield self.call(lambda c: c.images.generate(prompt="x", size="128x64", output_format="webp",
                                                           extra_body={"steps": 1}))
        self.assertEqual((decoded(webp.data[0].b64_json).format, decoded(webp.data[0].b64_json).size),
                         ("WEBP", (128, 64)))

    @inlineCallbacks
    def test_models(self):
        models = yield self.call(lambda c: list(c.models.list()))
        self.assertEqual([m.id for m in models], ["v1/tiny"])
        model = yield self.call(lambda c: c.models.retrieve("v1/tiny"))
        self.assertEqual((model.id, model.owned_by), ("v1/tiny", "runai"))

    @inlineCallbacks
    def test_url_replies_expire(self):
        result = yield self.call(lambda c: c.images.generate(prompt="x", size="64x64", response_format="url",
                                                             extra_body={"steps": 1}))
        [item] = result.data
        self.assertIsNone(item.b64_json)
        self.assertTrue(item.url.startswith(self.base + "/images/content/") and item.url.endswith(".png"))
        response = yield self.get(item.url)
        self.assertEqual((response.status_code, response.headers["content-type"]), (200, "image/png"))
        self.assertEqual(Image.open(io.BytesIO(response.content)).size, (64, 64))
        self.clock.advance(self.api.store.ttl + 1)
        response = yield self.get(item.url)
        self.assertEqual((response.status_code, response.json()["error"]["code"]), (404, "not_found"))
        self.assertEqual(len(self.api.store), 0)

    @inlineCallbacks
    def test_streaming_sends_the_completed_images(self):
        def run(client):
            with client.images.generate(prompt="x", size="64x64", n=2, stream=True, partial_images=2,
                                        extra_body={"seed": 3, "steps": 3}) as stream:
                return list(stream)
        events = yield self.call(run)
        partials, completed = events[:2], events[2:]
        self.assertEqual([(e.type, e.partial_image_index) for e in partials],
                         [("image_generation.partial_image", 0), ("image_generation.partial_image", 1)])
        self.assertEqual(decoded(partials[0].b64_json).size, (64, 64))  # a preview, scaled up
        self.assertEqual([e.type for e in completed], ["image_generation.completed"] * 2)
        self.assertEqual([e.model_extra["seed"] for e in completed], [3, 4])
        self.assertEqual((decoded(completed[0].b64_json).size, completed[0].size), ((64, 64), "64x64"))


class EditTests(OpenAITestCase):
    @inlineCallbacks
    def test_an_edit_with_a_mask_keeps_the_unmasked_pixels(self):
        mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
        mask.paste((0, 0, 0, 0), (0, 0, 32, 64))  # transparent: repaint the left half
        out = io.BytesIO()
        mask.save(out, format="PNG")
        result = yield self.call(lambda c: c.images.edit(
            image=("picture.png", png(), "image/png"), mask=("mask.png", out.getvalue(), "image/png"),
            prompt="a door", model="v1/tiny", size="64x64", extra_body={"seed": 3, "steps": 2}))
        image = decoded(result.data[0].b64_json).convert("RGB")
        self.assertEqual(image.size, (64, 64))
        self.assertEqual({image.getpixel((x, y)) for x in range(32, 64) for y in range(64)}, {(200, 30, 30)})
        self.assertNotEqual(image.getpixel((5, 10)), (200, 30, 30))

    @inlineCallbacks
    def test_edits_without_a_mask_and_streaming(self):
        canvas = Image.new("RGBA", (64, 64), (10, 120, 10, 255))
        canvas.paste((0, 0, 0, 0), (0, 0, 64, 16))  # transparent: repaint the top
        out = io.BytesIO()
        canvas.save(out, format="PNG")

        def run(client):
            with client.images.edit(image=("c.png", out.getvalue(), "image/png"), prompt="sky", stream=True,
                                    extra_body={"steps": 2}) as stream:
                return list(stream)
        [event] = yield self.call(run)
        self.assertEqual(event.type, "image_edit.completed")
        image = decoded(event.b64_json).convert("RGB")
        self.assertEqual(image.getpixel((30, 50)), (10, 120, 10))
        plain = yield self.call(lambda c: c.images.edit(image=("p.png", png(), "image/png"), prompt="x",
                                                        extra_body={"steps": 2, "strength": 0.5}))
        self.assertEqual(decoded(plain.data[0].b64_json).size, (64, 64))

    @inlineCallbacks
    def test_variations(self):
        result = yield self.call(lambda c: c.images.create_variation(
            image=("p.png", png(), "image/png"), n=2, size="64x64", extra_body={"steps": 2, "seed": 8}))
        self.assertEqual([item.model_extra["seed"] for item in result.data], [8, 9])
        self.assertEqual(decoded(result.data[1].b64_json).size, (64, 64))


class ErrorTests(OpenAITestCase):
    @inlineCallbacks
    def test_errors_are_the_clients_exceptions(self):
        yield self.assertRaisesFromClient(openai.BadRequestError, lambda c: c.images.generate(
            prompt="x", size="huge"), param="size", code="bad_request")
        error = yield self.assertRaisesFromClient(openai.BadRequestError, lambda c: c.images.generate(
            prompt="x", size="100x100"), param="size", code="out_of_range")
        self.assertIn("multiple of 8", error["message"])
        yield self.assertRaisesFromClient(openai.BadRequestError, lambda c: c.images.generate(
            prompt="x", n=11), param="n")
        yield self.assertRaisesFromClient(openai.BadRequestError, lambda c: c.images.generate(
            prompt="x", extra_body={"guidance_scale": "high"}), param="guidance_scale")
        yield self.assertRaisesFromClient(openai.NotFoundError, lambda c: c.images.generate(
            prompt="x", model="dall-e-3"), param="model", code="model_not_found")
        yield self.assertRaisesFromClient(openai.NotFoundError, lambda c: c.images.generate(
            prompt="x", model="../../etc/passwd"), param="model", code="model_not_found")
        yield self.assertRaisesFromClient(openai.NotFoundError, lambda c: c.models.retrieve("nope"))
        yield self.assertRaisesFromClient(openai.BadRequestError, lambda c: c.images.edit(
            image=("p.png", b"not an image", "image/png"), prompt="x"), param="image")
        yield self.assertRaisesFromClient(openai.BadRequestError, lambda c: c.images.edit(
            image=("p.png", png(), "image/png"), mask=("m.png", png(mode="L", color=0), "image/png"),
            prompt="x"), param="mask")

    def post(self, path, **kwargs):
        return self.in_thread(lambda: requests.post(f"{self.base}/{path}", timeout=30, **kwargs))

    @inlineCallbacks
    def test_raw_requests(self):
        response = yield self.post("images/generations", data=b"{nope")
        self.assertEqual((response.status_code, response.json()["error"]["code"]), (400, "bad_json"))
        response = yield self.post("images/edits", json={"prompt": "x"})
        self.assertEqual(response.status_code, 400)
        self.assertIn("multipart/form-data", response.json()["error"]["message"])
        response = yield self.get(f"{self.base}/chat/completions")
        self.assertEqual(response.status_code, 404)
        self.site.max_body = 1000
        response = yield self.post("images/generations", json={"prompt": "x" * 5000})
        self.assertEqual((response.status_code, response.json()["error"]["code"]), (413, "message_too_large"))


class QueueTests(OpenAITestCase):
    @inlineCallbacks
    def test_a_job_shares_the_queue_with_the_socket(self):
        def socket_job_runs():
            client = LegacyClient(self.port.getHost().port)
            client.send(legacy_request(self.models, steps=150))
            client.receive()  # its first step: it runs
            return client
        client = yield self.in_thread(socket_job_runs)
        openai_job = self.call(lambda c: c.images.generate(prompt="x", size="64x64", extra_body={"steps": 1}))
        # The OpenAI job waits behind the socket's; cancelled, that one lets it run.
        self.assertTrue((yield self.in_thread(self.until, lambda: self.core.status() == (1, True))))

        def cancel():
            client.send_raw(b"c" * P)
            try:
                return client.until_final()
            finally:
                client.close()
        replies = yield self.in_thread(cancel)
        self.assertEqual(replies[-1]["error"]["code"], "cancelled")
        result = yield openai_job
        self.assertEqual(len(result.data), 1)

    @inlineCallbacks
    def test_a_client_that_disconnects_cancels_its_job(self):
        started = time.monotonic()
        try:
            yield self.call(lambda c: c.images.generate(prompt="x", size="64x64", n=4, extra_body={"steps": 150}),
                            timeout=1.0)
        except openai.APITimeoutError:
            pass
        else:
            self.fail("the job ended before the client's timeout")
        self.assertTrue((yield self.in_thread(self.until, lambda: self.core.status() == (0, False))))
        self.assertLess(time.monotonic() - started, 20)


class AuthTests(OpenAITestCase):
    token = TOKEN

    @inlineCallbacks
    def test_the_token_is_the_api_key(self):
        error = yield self.assertRaisesFromClient(openai.AuthenticationError, lambda c: c.models.list(),
                                                  code="unauthorized", key="not-the-token")
        self.assertEqual(error["type"], "authentication_error")

    @inlineCallbacks
    def test_url_images_need_the_token(self):
        result = yield self.call(lambda c: c.images.generate(
            prompt="x", size="64x64", response_format="url", extra_body={"steps": 1}))
        url = result.data[0].url
        refused = yield self.get(url)
        self.assertEqual((refused.status_code, refused.json()["error"]["type"]), (401, "authentication_error"))
        self.assertIn("Bearer", refused.headers["www-authenticate"])
        wrong = yield self.get(url, Authorization="Bearer not-the-token")
        self.assertEqual(wrong.status_code, 401)
        fetched = yield self.get(url, Authorization=f"Bearer {TOKEN}")
        self.assertEqual((fetched.status_code, fetched.content[:8]), (200, b"\x89PNG\r\n\x1a\n"))
        models = yield self.call(lambda c: [m.id for m in c.models.list()])
        self.assertEqual(models, ["v1/tiny"])
