"""Upscaling through the doors, on a live server with its real worker: AUTOMATIC1111's
``/upscalers``, ``/extra-single-image`` and ``/extra-batch-images`` (with requests and the
real webuiapi client), the socket's ``upscale`` action, and ``runai upscale``."""

import base64
import io
import os
import sys

import requests
from PIL import Image
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from runai.cli import main
from runai.test.test_e2e import png_of
from runai.test.test_http import HttpTestCase
from runai.test.test_upscalers import b64png, picture
from runai.test.upscaler_fixtures import upscaler_model_dir


def size_of(b64):
    with Image.open(io.BytesIO(base64.b64decode(b64))) as image:
        return image.size


class UpscaleDoorsTests(HttpTestCase):
    def model_dir(self):
        return upscaler_model_dir()

    @inlineCallbacks
    def test_upscalers_listed_builtins_first_without_the_servers_paths(self):
        listed = (yield self.in_thread(requests.get, f"{self.base}/upscalers")).json()
        self.assertEqual([entry["name"] for entry in listed],
                         ["None", "Lanczos", "Nearest", "2x-Tiny", "2x-TinyPickle", "4x-Compact"])
        self.assertEqual(listed[5], {"name": "4x-Compact", "model_name": "Compact",
                                     "model_path": "RealESRGAN/4x-Compact.pth", "model_url": None, "scale": 4})
        self.assertNotIn(self.models, str(listed))
        models = (yield self.in_thread(requests.get, f"{self.base}/sd-models")).json()
        self.assertEqual([model["filename"] for model in models], ["v1/tiny"])  # no upscaler as a checkpoint

    @inlineCallbacks
    def test_extra_single_image_and_the_socket_agree(self):
        image = b64png(picture(40, 32))
        body = {"image": image, "upscaler_1": "2x-Tiny", "upscaling_resize": 2}
        first = (yield self.in_thread(self.post, "extra-single-image", body)).json()
        self.assertEqual(size_of(first["image"]), (80, 64))
        self.assertIn("2x-Tiny", first["html_info"])
        again = (yield self.in_thread(self.post, "extra-single-image", body)).json()
        self.assertEqual(first["image"], again["image"])
        [replies] = yield self.talk({"action": "upscale", "id": 9, "image": image, "upscaler": "2x-Tiny", "scale": 2,
                                     "pos_x": 3})
        [sent] = [m for m in replies if "image" in m]
        self.assertEqual((sent["reqtype"], sent["id"], sent["width"], sent["height"], sent["pos_x"]),
                         ("upscale", 9, 80, 64, 3))
        self.assertEqual(png_of(sent), base64.b64decode(first["image"]))
        progress = [m for m in replies if m.get("action") == 4]
        self.assertEqual(progress[-1]["step"], progress[-1]["total"])
        self.assertEqual(replies[-1]["action"], "done")
        # To a box, cut to it (resize_mode 1, upscaling_crop by default).
        boxed = (yield self.in_thread(self.post, "extra-single-image", {
            "image": image, "upscaler_1": "4x-Compact", "resize_mode": 1, "upscaling_resize_w": 100,
            "upscaling_resize_h": 90})).json()
        self.assertEqual(size_of(boxed["image"]), (100, 90))

    @inlineCallbacks
    def test_extra_batch_images(self):
        body = {"imageList": [{"data": b64png(picture(40, 32)), "name": "a.png"},
                              {"data": b64png(picture(24, 24, seed=2)), "name": "b.png"}],
                "upscaler_1": "Lanczos", "upscaling_resize": 1.5}
        answer = (yield self.in_thread(self.post, "extra-batch-images", body)).json()
        self.assertEqual([size_of(image) for image in answer["images"]], [(60, 48), (36, 36)])
        result = yield self.in_thread(lambda: self.client().extra_batch_images(
            [picture(20, 16), picture(16, 16, seed=3)], name_list=["a", "b"], upscaler_1="2x-Tiny"))
        self.assertEqual([image.size for image in result.images], [(40, 32), (32, 32)])

    @inlineCallbacks
    def test_bad_input_is_refused_before_queueing(self):
        image = b64png(picture(40, 32))
        cases = [({"image": image, "upscaler_1": "4x-UltraSharp"}, 422, "4x-UltraSharp"),
                 ({"image": "%%%", "upscaler_1": "2x-Tiny"}, 422, "base64"),
                 ({"image": b64png(picture(400, 300)), "upscaler_1": "2x-Tiny", "upscaling_resize": 8}, 422, "3200x2400"),
                 ({"image": image, "resize_mode": 3}, 422, "resize_mode"),
                 ({"image": image, "gfpgan_visibility": 0.5}, 422, "gfpgan")]
        for body, status, named in cases:
            answer = yield self.in_thread(self.post, "extra-single-image", body)
            self.assertEqual(answer.status_code, status, body.get("upscaler_1"))
            self.assertIn(named, answer.json()["detail"])
        answer = yield self.in_thread(lambda: requests.post(f"{self.base}/extra-batch-images", data=b"{", timeout=30))
        self.assertEqual(answer.status_code, 400)
        self.assertEqual(self.queue.queued, 0)
        [replies] = yield self.talk({"action": "upscale", "image": image, "upscaler": "nope"})
        self.assertEqual(replies[-1]["error"]["code"], "bad_request")

    @inlineCallbacks
    def test_webuiapi_extra_single_image(self):
        def run():
            return self.client().extra_single_image(picture(40, 32), upscaler_1="4x-Compact", upscaling_resize=4)
        result = yield self.in_thread(run)
        self.assertEqual(result.image.size, (160, 128))

    @inlineCallbacks
    def test_runai_upscale(self):
        folder = self.mktemp()
        os.makedirs(folder)
        source, target = os.path.join(folder, "in.png"), os.path.join(folder, "out.png")
        picture(40, 32).save(source)
        port = str(self.port.getHost().port)
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        code = yield self.in_thread(main.main, ["upscale", source, "-u", "2x-TinyPickle", "--width", "60", "-o", target,
                                                "-q", "--port", port])
        self.assertEqual(code, 0)
        with Image.open(target) as written:
            self.assertEqual(written.size, (60, 48))
        code = yield self.in_thread(main.main, ["upscale", source, "-u", "2x-TinyPickle", "-o", target, "-q",
                                                "--port", port])
        self.assertEqual(code, 1)  # never overwritten without --force
        self.assertEqual(out.getvalue(), target + "\n")
        self.assertIn("already exists", err.getvalue())
        out.truncate(0), out.seek(0)
        code = yield self.in_thread(main.main, ["upscalers", "--port", port])
        self.assertEqual(code, 0)
        self.assertEqual(out.getvalue().splitlines(), [
            "None  (built in)", "Lanczos  (built in)", "Nearest  (built in)",
            "2x-Tiny  ESRGAN/2x-Tiny.safetensors  (ESRGAN x2)", "2x-TinyPickle  ESRGAN/2x-TinyPickle.pth  (ESRGAN x2)",
            "4x-Compact  RealESRGAN/4x-Compact.pth  (Compact x4)"])


class BrokerTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def test_an_upscale_job_runs_on_a_broker_worker(self):
        from runai.core.fields import DictFields
        from runai.core.jobs import Job
        from runai.core.requests import Limits
        from runai.core.upscale import upscale_request
        from runai.engine.engine import Engine
        from runai.models.library import ModelLibrary
        from runai.test.redis_fixtures import BrokerSetup, Recorder, start_redis, wait_until

        models = upscaler_model_dir()
        setup = BrokerSetup(self, start_redis(self).url, models)
        front = setup.front()
        setup.consumer(Engine(device="cpu", dtype="float32", library=ModelLibrary(models)), "w1")
        yield wait_until(lambda: front.available)
        request = upscale_request(DictFields({"image": b64png(picture(40, 32)), "upscaler": "2x-Tiny"}), models,
                                  Limits(), id="u")
        recorder = Recorder()
        front.submit(Job(request, object(), recorder))
        yield wait_until(lambda: recorder.ended("u"), timeout=50)
        self.assertEqual(recorder.of("u")[-1], ("u", "done", 1))
        [(_, _, index, png)] = recorder.of("u", "image")
        with Image.open(io.BytesIO(png)) as image:
            self.assertEqual((index, image.size), (0, (80, 64)))
