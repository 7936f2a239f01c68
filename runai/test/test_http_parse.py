"""runai.doors.http.parse and runai.doors.http.samplers: AUTOMATIC1111's bodies and names
as core requests, without a server."""

import base64
import io
import os
from pathlib import Path

from PIL import Image
from twisted.trial.unittest import SynchronousTestCase

from runai.core import errors
from runai.core.requests import Limits
from runai.doors.http import parse, samplers


def png(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


class SamplerTests(SynchronousTestCase):
    def test_names_and_schedules(self):
        self.assertEqual(samplers.scheduler_for(None), "euler_a")
        self.assertEqual(samplers.scheduler_for("Euler a", "automatic"), "euler_a")
        self.assertEqual(samplers.scheduler_for("DPM++ 2M", "karras"), "dpmpp_2m_karras")
        self.assertEqual(samplers.scheduler_for("DPM++ 2M Karras"), "dpmpp_2m_karras")
        self.assertEqual(samplers.scheduler_for("lms karras"), "lms_karras")
        self.assertEqual(samplers.scheduler_for("k_euler"), "euler")
        self.assertEqual(samplers.scheduler_for("unipc"), "unipc")  # runai's own name
        for sampler, schedule in (("Warp", None), ("Euler a", "karras"), ("DDIM", "exponential")):
            with self.assertRaises(errors.RunaiError) as e:
                samplers.scheduler_for(sampler, schedule)
            self.assertEqual(e.exception.code, errors.UNKNOWN_SCHEDULER)

    def test_every_sampler_is_a_runai_scheduler_and_back(self):
        from runai.core.schedulers import SCHEDULERS

        for name, (plain, karras) in samplers.SAMPLERS.items():
            self.assertIn(plain, SCHEDULERS)
            self.assertEqual(samplers.names_of(plain), (name, "Automatic"))
            if karras:
                self.assertIn(karras, SCHEDULERS)
                self.assertEqual(samplers.names_of(karras), (name, "Karras"))
        self.assertEqual([s["name"] for s in samplers.sampler_list()], list(samplers.SAMPLERS))


class ParseTests(SynchronousTestCase):
    def setUp(self):
        self.models = Path(os.path.realpath(self.mktemp()))
        (self.models / "v1" / "tiny").mkdir(parents=True)
        (self.models / "v1" / "tiny" / "model_index.json").write_text("{}")

    def test_txt2img_fields(self):
        body = {"prompt": "a lighthouse", "negative_prompt": "fog", "cfg_scale": 5, "steps": 12, "seed": 9,
                "batch_size": 2, "n_iter": 3, "width": 640, "height": 384, "sampler_name": "DDIM",
                "eta": 1.0, "hr_scale": 2, "alwayson_scripts": {}}
        request = parse.txt2img(body, "v1/tiny", self.models, Limits())
        self.assertEqual((request.prompt, request.negative_prompt, request.scale, request.steps, request.seed),
                         ("a lighthouse", "fog", 5.0, 12, 9))
        self.assertEqual((request.n_samples, request.n_iter, request.width, request.height, request.scheduler),
                         (2, 3, 640, 384, "ddim"))
        self.assertEqual(request.model_name, "v1/tiny")

    def test_model_override(self):
        self.assertEqual(parse.wanted_model({"override_settings": {"sd_model_checkpoint": "x [abc]"}}), "x [abc]")
        self.assertIsNone(parse.wanted_model({}))
        with self.assertRaises(errors.RunaiError):
            parse.wanted_model({"override_settings": "x"})

    def test_img2img_mask_inverted_and_blurred(self):
        picture = png(Image.new("RGB", (64, 64), (10, 20, 30)))
        mask = Image.new("L", (64, 64), 0)
        mask.paste(255, (0, 0, 32, 64))
        body = {"init_images": [picture], "mask": png(mask), "inpainting_mask_invert": 1, "mask_blur": 2,
                "denoising_strength": 0.4}
        request = parse.img2img(body, "v1/tiny", self.models, Limits())
        self.assertEqual((request.action, request.strength, request.width, request.height),
                         ("inpaint", 0.4, 64, 64))
        with Image.open(io.BytesIO(request.mask.data)) as got:
            got = got.convert("L")
            self.assertEqual((got.getpixel((2, 10)), got.getpixel((62, 10))), (0, 255))
            self.assertTrue(0 < got.getpixel((32, 10)) < 255)  # blurred at the edge
        plain = parse.img2img({"init_images": [picture]}, "v1/tiny", self.models, Limits())
        self.assertEqual((plain.action, plain.mask), ("img2img", None))

    def test_bad_bodies(self):
        for body, code, named in (
            ({"init_images": []}, errors.BAD_REQUEST, "init_images"),
            ({"init_images": ["!!"]}, errors.BAD_REQUEST, "init_images"),
            ({"init_images": [png(Image.new("RGB", (8, 8)))], "mask": png(Image.new("L", (8, 8), 255)),
              "mask_blur": -1}, errors.OUT_OF_RANGE, "mask_blur"),
        ):
            with self.assertRaises(errors.RunaiError) as e:
                parse.img2img(body, "v1/tiny", self.models, Limits())
            self.assertEqual(e.exception.code, code)
            self.assertIn(named, e.exception.message)
        for data, code in ((b"[1]", errors.BAD_JSON), (b"\xff", errors.BAD_ENCODING), (b"{", errors.BAD_JSON)):
            with self.assertRaises(errors.RunaiError) as e:
                parse.decode_body(data)
            self.assertEqual(e.exception.code, code)
            self.assertIn("the body", e.exception.message)


class FuzzTests(SynchronousTestCase):
    """Whatever JSON a client sends, the answer is a RunaiError (a 4xx), never a crash."""

    def test_any_json_values(self):
        from hypothesis import given, settings, strategies as st

        models = Path(os.path.realpath(self.mktemp()))
        (models / "v1" / "tiny").mkdir(parents=True)
        (models / "v1" / "tiny" / "model_index.json").write_text("{}")
        values = st.recursive(
            st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=True) | st.text(max_size=20),
            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
            max_leaves=6)
        keys = st.sampled_from(["prompt", "negative_prompt", "steps", "cfg_scale", "seed", "width", "height",
                                "batch_size", "n_iter", "sampler_name", "scheduler", "eta", "denoising_strength",
                                "init_images", "mask", "mask_blur", "inpainting_mask_invert", "override_settings"])

        @settings(max_examples=300, deadline=None)
        @given(st.dictionaries(keys, values, max_size=8), st.booleans())
        def check(body, image):
            try:
                parse.wanted_model(body)
                (parse.img2img if image else parse.txt2img)(body, "v1/tiny", models, Limits())
            except errors.RunaiError as e:
                self.assertIn(replies_status(e), (400, 404, 413, 422))

        check()


def replies_status(error):
    from runai.doors.http.replies import error as as_http

    return as_http(error)[0]
