"""SD3 and FLUX.1 diffusers folders end to end: the legacy socket protocol and the
AUTOMATIC1111 HTTP door, over real 127.0.0.1 sockets, with the real worker thread and
tiny models (runai.test.test_flow_families.flow_models)."""

import base64
import io

from PIL import Image
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from runai.core import errors
from runai.test.test_e2e import LegacyClient, LiveServer, png_of
from runai.test.test_flow_families import flow_models, half_mask, picture
from runai.test.test_http import HttpTestCase, pixels


def flow_request(action="txt2img", model="flux/dev", seed=5, steps=2, **extra):
    options = {f"{action}_model": model, f"{action}_prompt": "a lighthouse", f"{action}_steps": steps,
               f"{action}_seed": seed, f"{action}_width": 64, f"{action}_height": 64}
    options.update(extra)
    return {"action": action, "options": options}


def encoded(image):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def images_of(replies):
    return [m for m in replies if "image" in m]


class SocketTests(LiveServer, TestCase):
    timeout = 300

    def setUp(self):
        self.models = flow_models()
        self.start_server(str(self.models), idle_timeout=60)

    @inlineCallbacks
    def test_txt2img_deterministic_with_progress(self):
        for model in ("sd3/medium", "flux/dev", "flux/schnell"):
            a, b, c = yield self.talk(flow_request(model=model), flow_request(model=model),
                                      flow_request(model=model, seed=6))
            progress = [(m["step"], m["total"]) for m in a if m.get("action") == 4]
            self.assertEqual(progress, [(1, 2), (2, 2)], model)
            [image] = images_of(a)
            self.assertEqual((image["reqtype"], image["seed"]), ("txt2img", 5))
            self.assertEqual(Image.open(io.BytesIO(png_of(image))).size, (64, 64))
            self.assertEqual(png_of(image), png_of(images_of(b)[0]), model)
            self.assertNotEqual(png_of(image), png_of(images_of(c)[0]), model)

    @inlineCallbacks
    def test_the_distilled_guidance_is_an_option(self):
        default, explicit, other = yield self.talk(
            flow_request(), flow_request(txt2img_distilled_cfg_scale=3.5), flow_request(txt2img_distilled_cfg_scale=9))
        self.assertEqual(png_of(images_of(default)[0]), png_of(images_of(explicit)[0]))
        self.assertNotEqual(png_of(images_of(default)[0]), png_of(images_of(other)[0]))

    @inlineCallbacks
    def test_batches_have_seed_plus_k(self):
        [replies] = yield self.talk(flow_request(model="sd3/medium", seed=7, txt2img_n_samples=2, txt2img_n_iter=2))
        self.assertEqual([m["seed"] for m in images_of(replies)], [7, 8, 9, 10])

    @inlineCallbacks
    def test_every_mode(self):
        sent = dict(pixels=encoded(picture()), mask=encoded(half_mask()))
        for model in ("sd3/medium", "flux/dev", "flux/fill"):
            answers = yield self.talk(
                flow_request("img2img", model=model, pixels=sent["pixels"], img2img_strength=0.5),
                flow_request("inpaint", model=model, **sent),
                flow_request("outpaint", model=model, pos_x=64, pos_y=-32, **sent),
            )
            for replies, action in zip(answers, ("img2img", "inpaint", "outpaint")):
                self.assertEqual(replies[-1]["action"], "done", (model, action, replies[-1]))
                [image] = images_of(replies)
                self.assertEqual(image["reqtype"], action)
                self.assertEqual(Image.open(io.BytesIO(png_of(image))).size, (64, 64))

    @inlineCallbacks
    def test_models_are_listed_with_their_family(self):
        def ask_models():
            client = LegacyClient(self.port.getHost().port)
            try:
                client.send({"action": "models", "id": 1})
                return client.receive()
            finally:
                client.close()
        listing = yield self.in_thread(ask_models)
        seen = {m["name"]: (m["version"], m["served"], m["inpainting"]) for m in listing["models"]}
        self.assertEqual(seen, {"sd3/medium": ("sd3", True, False), "flux/dev": ("flux", True, False),
                                "flux/schnell": ("flux", True, False), "flux/fill": ("flux", True, True)})

    @inlineCallbacks
    def test_a_scheduler_the_family_cannot_run_is_a_bad_request(self):
        refused, after = yield self.talk(flow_request(txt2img_scheduler="euler_a"),
                                         flow_request(txt2img_scheduler="euler"))
        self.assertEqual(refused[-1]["error"]["code"], errors.BAD_REQUEST)
        self.assertIn("euler", refused[-1]["error"]["message"])
        self.assertEqual(after[-1]["action"], "done")

    @inlineCallbacks
    def test_cancel_packet_stops_the_job(self):
        replies = yield self.cancel_mid_job(flow_request(steps=150))
        self.assertEqual(replies[-1]["error"]["code"], errors.CANCELLED)
        self.assertEqual(images_of(replies), [])


class HttpTests(HttpTestCase):
    def model_dir(self):
        return str(flow_models())

    @inlineCallbacks
    def test_txt2img_with_webuiapi_as_the_socket_paints_it(self):
        for model, extra in (("flux/dev", {}), ("sd3/medium", dict(cfg_scale=7.0))):
            result = yield self.in_thread(lambda: self.client().txt2img(
                prompt="a lighthouse", seed=5, steps=2, width=64, height=64, sampler_name="Euler",
                override_settings={"sd_model_checkpoint": model}, **extra))
            [image] = result.images
            self.assertEqual(image.size, (64, 64))
            self.assertEqual((result.info["seed"], result.info["sd_model_name"]), (5, model))
            [replies] = yield self.talk(flow_request(model=model))
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            self.assertEqual(pixels(buffer.getvalue()), pixels(png_of(images_of(replies)[0])), model)

    @inlineCallbacks
    def test_img2img_with_a_mask_on_the_fill_model(self):
        red = Image.new("RGB", (64, 64), (200, 30, 30))
        mask = Image.new("L", (64, 64), 0)
        mask.paste(255, (0, 0, 32, 64))
        result = yield self.in_thread(lambda: self.client().img2img(
            images=[red], mask_image=mask, prompt="a door", seed=3, steps=2, width=64, height=64,
            denoising_strength=1.0, mask_blur=0, sampler_name="Euler",
            override_settings={"sd_model_checkpoint": "flux/fill"}))
        [image] = result.images
        self.assertEqual(image.size, (64, 64))
        self.assertEqual(image.convert("RGB").getpixel((60, 10)), (200, 30, 30))

    @inlineCallbacks
    def test_without_a_sampler_the_family_picks_and_euler_a_is_refused(self):
        body = {"prompt": "x", "steps": 2, "width": 64, "height": 64,
                "override_settings": {"sd_model_checkpoint": "flux/schnell"}}
        response = yield self.in_thread(self.post, "txt2img", body)
        self.assertEqual(response.status_code, 200, response.text)
        self.assertIn("Sampler: Euler,", response.json()["info"])
        self.assertNotIn("Distilled CFG Scale", response.json()["info"])  # schnell has none
        response = yield self.in_thread(self.post, "txt2img", dict(body, sampler_name="Euler a"))
        self.assertEqual(response.status_code // 100, 4, response.text)
        self.assertIn("euler", response.json()["detail"])

    @inlineCallbacks
    def test_distilled_cfg_scale_as_forge_names_it(self):
        body = {"prompt": "x", "steps": 2, "width": 64, "height": 64, "seed": 4, "sampler_name": "Euler",
                "override_settings": {"sd_model_checkpoint": "flux/dev"}}
        answers = []
        for extra in ({}, {"distilled_cfg_scale": 3.5}, {"distilled_cfg_scale": 8}):
            answers.append((yield self.in_thread(self.post, "txt2img", dict(body, **extra))))
        default, same, other = answers
        self.assertEqual(default.json()["images"], same.json()["images"])
        self.assertIn("Distilled CFG Scale: 8,", other.json()["info"])
        self.assertNotEqual(default.json()["images"], other.json()["images"])
