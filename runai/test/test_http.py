"""The AUTOMATIC1111-compatible HTTP door (runai.doors.http), driven by the real
``webuiapi`` client library and by ``requests``, against a real server on 127.0.0.1 with
the real worker thread and a tiny model; socket clients share its queue."""

import base64
import io
import json
import socket

import requests
import webuiapi
from PIL import Image
from twisted.internet import reactor, task
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from runai.doors.http.api import Api
from runai.doors.http.site import make_site
from runai.test.test_e2e import LiveServer, legacy_request, png_of, tiny_model_dir

TOKEN = "an-http-token-of-some-length"


def pixels(png):
    with Image.open(io.BytesIO(png)) as image:
        return image.convert("RGB").tobytes()


class HttpTestCase(LiveServer, TestCase):
    timeout = 300
    token = None

    def model_dir(self):
        """The model folder the server serves (a subclass's own)."""
        return tiny_model_dir()

    def setUp(self):
        self.models = self.model_dir()
        self.start_server(self.models)
        self.api = Api(self.core, reactor, pool=reactor.getThreadPool(), token=self.token)
        self.site = make_site(self.api, max_body=8 * 1024 * 1024)
        self.http = self.listen(self.site)
        self.base = f"http://127.0.0.1:{self.http.getHost().port}/sdapi/v1"

    def listen(self, site):
        """Listen on 127.0.0.1; at the end, close the connections clients keep alive."""
        channels = []
        build = site.buildProtocol
        site.buildProtocol = lambda addr: channels.append(build(addr)) or channels[-1]
        port = reactor.listenTCP(0, site, interface="127.0.0.1")

        def close():
            for channel in channels:
                if getattr(channel, "transport", None) is not None:
                    channel.transport.abortConnection()
            return task.deferLater(reactor, 0.05, lambda: None)
        self.addCleanup(port.stopListening)
        self.addCleanup(close)
        return port

    def client(self, **auth):
        return webuiapi.WebUIApi(host="127.0.0.1", port=self.http.getHost().port, **auth)

    def post(self, path, body, **kwargs):
        return requests.post(f"{self.base}/{path}", json=body, timeout=120, **kwargs)


class WebuiapiTests(HttpTestCase):
    @inlineCallbacks
    def test_txt2img_same_seed_same_image_as_the_socket(self):
        def run():
            return self.client().txt2img(prompt="a lighthouse", negative_prompt="fog", seed=11, steps=2,
                                         width=64, height=64, cfg_scale=7.5, sampler_name="Euler a")
        result = yield self.in_thread(run)
        [image] = result.images
        self.assertEqual(image.size, (64, 64))
        self.assertEqual((result.info["seed"], result.info["all_seeds"], result.info["sd_model_name"]),
                         (11, [11], "v1/tiny"))
        self.assertIn("Steps: 2, Sampler: Euler a", image.info["parameters"])
        self.assertIn("Seed: 11", result.info["infotexts"][0])
        self.assertEqual(result.parameters["prompt"], "a lighthouse")
        [replies] = yield self.talk(legacy_request(self.models, seed=11, steps=2))
        [sent] = [m for m in replies if "image" in m]
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        self.assertEqual(pixels(buffer.getvalue()), pixels(png_of(sent)))

    @inlineCallbacks
    def test_batches_and_random_seeds(self):
        result = yield self.in_thread(lambda: self.client().txt2img(
            prompt="x", seed=-1, steps=1, width=64, height=64, batch_size=2, n_iter=2))
        self.assertEqual(len(result.images), 4)
        seeds = result.info["all_seeds"]
        self.assertEqual(seeds, list(range(seeds[0], seeds[0] + 4)))

    @inlineCallbacks
    def test_img2img_with_a_mask(self):
        picture = Image.new("RGB", (64, 64), (200, 30, 30))
        mask = Image.new("L", (64, 64), 0)
        mask.paste(255, (0, 0, 32, 64))
        result = yield self.in_thread(lambda: self.client().img2img(
            images=[picture], mask_image=mask, prompt="a door", seed=3, steps=4, width=64, height=64,
            denoising_strength=0.5, mask_blur=0))
        [image] = result.images
        self.assertEqual(image.size, (64, 64))
        # Outside the mask the client's own pixels come back untouched.
        self.assertEqual(image.convert("RGB").getpixel((60, 10)), (200, 30, 30))
        self.assertTrue(result.info["is_using_inpainting_conditioning"])
        plain = yield self.in_thread(lambda: self.client().img2img(
            images=[picture], prompt="a door", seed=3, steps=4, width=64, height=64, denoising_strength=0.5))
        self.assertEqual(len(plain.images), 1)

    @inlineCallbacks
    def test_models_options_and_samplers(self):
        def run():
            api = self.client()
            titles = api.util_get_model_names()
            api.util_set_model("v1/tiny")
            return titles, api.get_options(), api.get_samplers(), api.get_schedulers(), api.get_sd_models()
        titles, options, samplers, schedules, models = yield self.in_thread(run)
        self.assertEqual(len(titles), 1)
        self.assertTrue(titles[0].startswith("v1/tiny"))
        self.assertTrue(options["sd_model_checkpoint"].startswith("v1/tiny"))
        self.assertEqual(models[0]["model_name"], "v1_tiny")
        self.assertFalse(any("/" in (m["filename"] or "")[:1] for m in models))  # no server paths
        names = {s["name"] for s in samplers}
        self.assertTrue({"Euler a", "DPM++ 2M", "DDIM", "UniPC", "PLMS"} <= names)
        self.assertIn("karras", {s["name"] for s in schedules})

    @inlineCallbacks
    def test_the_hash_comes_and_names_the_model(self):
        import hashlib
        import os

        def run():
            api = self.client()
            for _ in range(200):
                models = api.get_sd_models()
                if models[0]["sha256"]:
                    return models[0]
                import time
                time.sleep(0.05)
            return models[0]
        model = yield self.in_thread(run)
        folder = os.path.join(self.models, "v1", "tiny")
        digest = hashlib.sha256()
        for part in ("unet", "vae", "text_encoder"):
            for name in sorted(os.listdir(os.path.join(folder, part))):
                if name.endswith((".safetensors", ".bin")):
                    with open(os.path.join(folder, part, name), "rb") as f:
                        digest.update(f.read())
        self.assertEqual(model["sha256"], digest.hexdigest())
        self.assertEqual(model["title"], f"v1/tiny [{digest.hexdigest()[:10]}]")
        response = yield self.in_thread(self.post, "txt2img", {
            "prompt": "x", "steps": 1, "width": 64, "height": 64,
            "override_settings": {"sd_model_checkpoint": model["hash"]}})
        self.assertEqual(response.status_code, 200, response.text)

    @inlineCallbacks
    def test_a_karras_schedule(self):
        result = yield self.in_thread(lambda: self.client().txt2img(
            prompt="x", steps=2, width=64, height=64, sampler_name="DPM++ 2M", scheduler="karras"))
        self.assertIn("Schedule type: Karras", result.info["infotexts"][0])


class ErrorTests(HttpTestCase):
    @inlineCallbacks
    def test_bad_values_name_the_field(self):
        cases = [
            ({"prompt": "x", "steps": 0}, 422, "'steps'"),
            ({"prompt": "x", "cfg_scale": "high"}, 422, "'cfg_scale'"),
            ({"prompt": "x", "width": 100}, 422, "'width'"),
            ({"prompt": "x", "batch_size": 99}, 422, "'batch_size'"),
            ({"prompt": "x", "sampler_name": "Warp"}, 404, "Warp"),
            ({"prompt": "x", "sampler_name": "Euler a", "scheduler": "karras"}, 404, "karras"),
            ({"prompt": "x", "override_settings": {"sd_model_checkpoint": "nope"}}, 404, "nope"),
            ({"prompt": "x", "override_settings": {"sd_model_checkpoint": "../../etc/passwd"}}, 404, "passwd"),
        ]
        for body, status, named in cases:
            response = yield self.in_thread(self.post, "txt2img", body)
            self.assertEqual(response.status_code, status, (body, response.text))
            self.assertIn(named, response.json()["detail"])
            self.assertIn("error", response.json())

    @inlineCallbacks
    def test_not_json_bad_images_unknown_routes(self):
        response = yield self.in_thread(lambda: requests.post(f"{self.base}/txt2img", data=b"{nope", timeout=30))
        self.assertEqual(response.status_code, 400)
        response = yield self.in_thread(self.post, "img2img", {"init_images": ["not base64!"], "prompt": "x"})
        self.assertEqual(response.status_code, 422)
        self.assertIn("init_images", response.json()["detail"])
        response = yield self.in_thread(lambda: requests.get(f"{self.base}/cmd-flags", timeout=30))
        self.assertEqual(response.status_code, 404)

    @inlineCallbacks
    def test_a_body_over_the_limit(self):
        self.site.max_body = 1000
        response = yield self.in_thread(self.post, "txt2img", {"prompt": "x" * 5000})
        self.assertEqual(response.status_code, 413)
        # The door goes on serving.
        response = yield self.in_thread(lambda: requests.get(f"{self.base}/samplers", timeout=30))
        self.assertEqual(response.status_code, 200)

    @inlineCallbacks
    def test_empty_lists_for_what_runai_does_not_have(self):
        # The folder has no LoRA and no embedding: their lists are empty too.
        for path in ("loras", "hypernetworks", "scripts", "embeddings", "prompt-styles"):
            response = yield self.in_thread(lambda: requests.get(f"{self.base}/{path}", timeout=30))
            self.assertEqual(response.status_code, 200, path)
            self.assertIn(response.json(), ([], {"txt2img": [], "img2img": []}, {"loaded": {}, "skipped": {}}))


class ProgressTests(HttpTestCase):
    @inlineCallbacks
    def test_progress_then_interrupt(self):
        # Never on the reactor thread: WebUIApi() asks the server for its scripts.
        long_job = self.in_thread(lambda: self.client().txt2img(prompt="x", steps=150, width=64, height=64,
                                                                batch_size=4))

        def watch():
            import time
            for _ in range(2000):
                progress = requests.get(f"{self.base}/progress", timeout=30).json()
                if progress["state"]["sampling_step"] >= 2:
                    requests.post(f"{self.base}/interrupt", timeout=30)
                    return progress
                time.sleep(0.01)
            return progress
        progress = yield self.in_thread(watch)
        self.assertGreater(progress["progress"], 0)
        self.assertEqual(progress["state"]["sampling_steps"], 150)
        self.assertEqual(progress["state"]["job_count"], 1)
        self.assertNotIn("prompt", json.dumps(progress))
        result = yield long_job
        self.assertEqual(result.images, [])  # interrupted before the batch's images
        self.assertEqual(self.core.status(), (0, False))

    @inlineCallbacks
    def test_socket_and_http_share_one_queue(self):
        socket_job = self.talk(legacy_request(self.models, steps=60))
        yield self.in_thread(__import__("time").sleep, 0.2)
        http_job = self.in_thread(lambda: self.client().txt2img(prompt="x", steps=1, width=64, height=64))
        yield self.in_thread(__import__("time").sleep, 0.2)
        progress = yield self.in_thread(lambda: requests.get(f"{self.base}/progress", timeout=30).json())
        self.assertEqual(progress["state"]["job_count"], 2)
        [replies] = yield socket_job
        self.assertEqual(replies[-1]["action"], "done")
        result = yield http_job
        self.assertEqual(len(result.images), 1)

    @inlineCallbacks
    def test_a_client_that_disconnects_cancels_its_job(self):
        body = json.dumps({"prompt": "x", "steps": 150, "width": 64, "height": 64, "batch_size": 4}).encode()

        def run():
            import time
            sock = socket.create_connection(("127.0.0.1", self.http.getHost().port), timeout=30)
            sock.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body) + body)
            for _ in range(500):
                if self.core.status()[1]:
                    break
                time.sleep(0.01)
            sock.close()
            for _ in range(1000):
                if self.core.status() == (0, False):
                    return True
                time.sleep(0.01)
            return False
        self.assertTrue((yield self.in_thread(run)))


class AuthTests(HttpTestCase):
    token = TOKEN

    @inlineCallbacks
    def test_token_as_bearer_or_basic_password(self):
        response = yield self.in_thread(lambda: requests.get(f"{self.base}/sd-models", timeout=30))
        self.assertEqual(response.status_code, 401)
        self.assertIn("Basic", response.headers["www-authenticate"])
        wrong = yield self.in_thread(lambda: requests.get(f"{self.base}/sd-models", timeout=30,
                                                          headers={"Authorization": "Bearer nope"}))
        self.assertEqual(wrong.status_code, 401)
        bearer = yield self.in_thread(lambda: requests.get(f"{self.base}/sd-models", timeout=30,
                                                           headers={"Authorization": f"Bearer {TOKEN}"}))
        self.assertEqual(bearer.status_code, 200)
        result = yield self.in_thread(lambda: self.client(username="me", password=TOKEN).txt2img(
            prompt="x", steps=1, width=64, height=64))
        self.assertEqual(len(result.images), 1)
        basic = base64.b64encode(b"me:" + TOKEN.encode()).decode()
        response = yield self.in_thread(lambda: requests.get(f"{self.base}/options", timeout=30,
                                                             headers={"Authorization": f"Basic {basic}"}))
        self.assertEqual(response.status_code, 200)


class HistoryTests(HttpTestCase):
    """With --db, HTTP jobs are recorded as socket jobs are."""

    def setUp(self):
        from runai.test.store_fixtures import running_store

        self.store = running_store(self, reactor)
        self.models = tiny_model_dir()
        self.start_server(self.models, store=self.store)
        self.api = Api(self.core, reactor, pool=reactor.getThreadPool())
        self.http = self.listen(make_site(self.api, max_body=1 << 20))

    @inlineCallbacks
    def test_an_http_job_is_kept(self):
        result = yield self.in_thread(lambda: self.client().txt2img(
            prompt="a kept lighthouse", seed=4, steps=1, width=64, height=64, batch_size=2))
        self.assertEqual(len(result.images), 2)
        [item] = yield self.store.history(10)
        self.assertEqual((item["prompt"], item["status"], item["images"], item["params"]["seed"]),
                         ("a kept lighthouse", "done", 2, 4))
