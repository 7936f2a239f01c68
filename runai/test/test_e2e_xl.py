"""SDXL diffusers folders end to end: the legacy socket protocol and the AUTOMATIC1111 HTTP
door, over real 127.0.0.1 sockets, with the real worker thread and tiny SDXL models
(runai.test.test_engine_xl.xl_models)."""

import base64
import io

import webuiapi
from PIL import Image
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase, TestCase

from runai.core import errors
from runai.core.requests import Limits
from runai.doors.legacy.parse import parse_request
from runai.test.test_e2e import LegacyClient, LiveServer, png_of
from runai.test.test_engine_xl import half_mask, picture, xl_models
from runai.test.test_http import HttpTestCase, pixels


def xl_request(action="txt2img", model="sdxl/base", seed=5, steps=2, **extra):
    options = {f"{action}_model": model, f"{action}_prompt": "a lighthouse", f"{action}_negative_prompt": "fog",
               f"{action}_steps": steps, f"{action}_seed": seed, f"{action}_width": 64, f"{action}_height": 64,
               f"{action}_scheduler": "euler_a"}
    options.update(extra)
    return {"action": action, "options": options}


def encoded(image):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def images_of(replies):
    return [m for m in replies if "image" in m]


class DefaultSizeTests(SynchronousTestCase):
    """What a legacy client's request without a size becomes, before anything runs."""

    def parse(self, obj):
        return parse_request(obj, xl_models(), Limits())

    def test_sdxl_defaults_to_1024_and_img2img_to_the_picture(self):
        obj = xl_request()
        del obj["options"]["txt2img_width"], obj["options"]["txt2img_height"]
        request = self.parse(obj)
        self.assertEqual((request.width, request.height), (1024, 1024))
        obj = xl_request("img2img", pixels=encoded(picture((96, 80))))
        del obj["options"]["img2img_width"], obj["options"]["img2img_height"]
        request = self.parse(obj)
        self.assertEqual((request.width, request.height), (96, 80))


class SocketTests(LiveServer, TestCase):
    timeout = 300

    def setUp(self):
        self.models = xl_models()
        self.start_server(str(self.models), idle_timeout=60)

    @inlineCallbacks
    def test_txt2img_deterministic_with_progress(self):
        a, b, c = yield self.talk(xl_request(seed=5), xl_request(seed=5), xl_request(seed=6))
        progress = [(m["step"], m["total"]) for m in a if m.get("action") == 4]
        self.assertEqual(progress, [(1, 2), (2, 2)])
        [image] = images_of(a)
        self.assertEqual((image["reqtype"], image["seed"]), ("txt2img", 5))
        self.assertEqual(Image.open(io.BytesIO(png_of(image))).size, (64, 64))
        self.assertEqual(a[-1]["action"], "done")
        self.assertEqual(png_of(image), png_of(images_of(b)[0]))
        self.assertNotEqual(png_of(image), png_of(images_of(c)[0]))

    @inlineCallbacks
    def test_batches_have_seed_plus_k(self):
        [replies] = yield self.talk(xl_request(seed=7, txt2img_n_samples=2, txt2img_n_iter=2))
        self.assertEqual([m["seed"] for m in images_of(replies)], [7, 8, 9, 10])
        progress = [(m["step"], m["total"]) for m in replies if m.get("action") == 4]
        self.assertEqual(progress, [(s, 4) for s in range(1, 5)])

    @inlineCallbacks
    def test_every_mode(self):
        answers = yield self.talk(
            xl_request("img2img", pixels=encoded(picture()), img2img_strength=0.5),
            xl_request("inpaint", pixels=encoded(picture()), mask=encoded(half_mask())),
            xl_request("inpaint", model="sdxl/inpaint", pixels=encoded(picture()), mask=encoded(half_mask())),
            xl_request("outpaint", pixels=encoded(picture()), mask=encoded(half_mask()), pos_x=64, pos_y=-32),
        )
        for replies, action in zip(answers, ("img2img", "inpaint", "inpaint", "outpaint")):
            [image] = images_of(replies)
            self.assertEqual(image["reqtype"], action)
            self.assertEqual(Image.open(io.BytesIO(png_of(image))).size, (64, 64))
            self.assertEqual(replies[-1]["action"], "done")

    @inlineCallbacks
    def test_the_refiner_is_listed_and_refused(self):
        def ask_models():
            client = LegacyClient(self.port.getHost().port)
            try:
                client.send({"action": "models", "id": 1})
                return client.receive()
            finally:
                client.close()
        listing = yield self.in_thread(ask_models)
        by_name = {m["name"]: m for m in listing["models"]}
        self.assertEqual({n: (m["version"], m["kind"], m["served"], m["inpainting"]) for n, m in by_name.items()}, {
            "sdxl/base": ("sdxl", "pipeline", True, False),
            "sdxl/fp16fix": ("sdxl", "pipeline", True, False),
            "sdxl/inpaint": ("sdxl", "pipeline", True, True),
            "sdxl/refiner": ("sdxl", "refiner", False, False),
            "sdxl/tokenizer-json": ("sdxl", "pipeline", True, False),
        })
        refused, after = yield self.talk(xl_request(model="sdxl/refiner"), xl_request())
        error = refused[-1]["error"]
        self.assertEqual(error["code"], errors.MODEL_LOAD_FAILED)
        self.assertIn("refiner", error["message"])
        self.assertEqual(after[-1]["action"], "done")

    @inlineCallbacks
    def test_cancel_packet_stops_the_job(self):
        replies = yield self.cancel_mid_job(xl_request(steps=150))
        self.assertEqual(replies[-1]["error"]["code"], errors.CANCELLED)
        self.assertLess(len([m for m in replies if m.get("action") == 4]), 150)
        self.assertEqual(images_of(replies), [])
        [after] = yield self.talk(xl_request())
        self.assertEqual(after[-1]["action"], "done")


class HttpTests(HttpTestCase):
    def model_dir(self):
        return str(xl_models())

    @inlineCallbacks
    def test_txt2img_with_webuiapi_as_the_socket_paints_it(self):
        def run():
            # Created here, off the reactor thread: webuiapi blocks.
            client = webuiapi.WebUIApi(host="127.0.0.1", port=self.http.getHost().port)
            return client.txt2img(prompt="a lighthouse", negative_prompt="fog", seed=5, steps=2, width=64, height=64,
                                  cfg_scale=7.5, sampler_name="Euler a",
                                  override_settings={"sd_model_checkpoint": "sdxl/base"})
        result = yield self.in_thread(run)
        [image] = result.images
        self.assertEqual(image.size, (64, 64))
        self.assertEqual((result.info["seed"], result.info["sd_model_name"]), (5, "sdxl/base"))
        [replies] = yield self.talk(xl_request(seed=5, txt2img_scale=7.5))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        self.assertEqual(pixels(buffer.getvalue()), pixels(png_of(images_of(replies)[0])))
