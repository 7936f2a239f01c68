"""Hires fix (runai.core.hires, runai.engine.hires): the request's second pass, every family
in the engine, diffusers' own two passes for a plain prompt, and both doors."""

import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import requests
import torch
from PIL import Image
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase

from runai.broker import wire
from runai.core import errors
from runai.core.requests import Limits
from runai.doors.legacy.parse import parse_request
from runai.engine.engine import Engine
from runai.models.library import ModelLibrary
from runai.test.test_e2e import png_of, tiny_model_dir
from runai.test.test_flow_families import flow_models
from runai.test.test_http import HttpTestCase, pixels

_engines = {}


def engine_for(models):
    if models not in _engines:
        _engines[models] = Engine(device="cpu", dtype="float32", library=ModelLibrary(models), cache_models=3)
    return _engines[models]


def hires_request(models, model="v1/tiny", scheduler="euler_a", **options):
    base = {"txt2img_model": model, "txt2img_prompt": "a lighthouse", "txt2img_negative_prompt": "fog",
            "txt2img_steps": 3, "txt2img_width": 80, "txt2img_height": 64, "txt2img_seed": 7,
            "txt2img_scheduler": scheduler, "enable_hr": True, "hr_scale": 1.5, "strength": 0.5}
    base.update(options)
    return parse_request({"action": "txt2img", "options": base}, Path(models), Limits())


def run(models, req, cancel_at=None):
    progress, images = [], []

    def cancelled():
        return cancel_at is not None and len(progress) >= cancel_at
    engine_for(models).generate(req, lambda s, t, p=None: progress.append((s, t)), images.append, cancelled)
    return progress, images


class ParseTests(SynchronousTestCase):
    def test_the_second_pass_as_asked(self):
        req = hires_request(tiny_model_dir())
        self.assertEqual((req.width, req.height), (80, 64))
        self.assertEqual((req.hires.width, req.hires.height, req.hires.steps, req.hires.strength, req.hires.upscaler),
                         (120, 96, 3, 0.5, "Latent"))
        sized = hires_request(tiny_model_dir(), hr_resize_x=160)
        self.assertEqual((sized.hires.width, sized.hires.height), (160, 128))
        self.assertIsNone(parse_request({"action": "txt2img", "options": {"txt2img_model": "v1/tiny"}},
                                        Path(tiny_model_dir()), Limits()).hires)

    def test_limits_and_names(self):
        cases = [(dict(hr_scale=4, txt2img_width=1024), errors.OUT_OF_RANGE, "size limit"),
                 (dict(hr_upscaler="4x-UltraSharp"), errors.BAD_REQUEST, "UltraSharp"),
                 (dict(hr_scale=9), errors.OUT_OF_RANGE, "hr_scale"),
                 (dict(strength=0.1, hr_second_pass_steps=3), errors.OUT_OF_RANGE, "second pass"),
                 (dict(txt2img_n_samples=8, hr_scale=4, txt2img_width=512, txt2img_height=512), errors.OUT_OF_RANGE,
                  "pixels")]
        for options, code, named in cases:
            with self.assertRaises(errors.RunaiError) as caught:
                hires_request(tiny_model_dir(), **options)
            self.assertEqual(caught.exception.code, code, options)
            self.assertIn(named, caught.exception.message)
        with self.assertRaises(errors.RunaiError) as caught:
            hires_request(flow_models(), model="flux/dev", scheduler="euler", hr_scheduler="euler_a")
        self.assertEqual(caught.exception.code, errors.BAD_REQUEST)

    def test_the_pass_travels_through_the_broker(self):
        req = replace(hires_request(tiny_model_dir(), hr_prompt="a tower"), id="k")
        fields = wire.encode_job(req, "k", "front")
        job = wire.decode_job({k.encode(): v if isinstance(v, bytes) else str(v).encode() for k, v in fields.items()})
        again = job.request(tiny_model_dir())
        self.assertEqual(again.hires, req.hires)


class EngineTests(SynchronousTestCase):
    def test_every_family_paints_the_final_size_counting_both_passes(self):
        for models, model, scheduler in ((tiny_model_dir(), "v1/tiny", "euler_a"),
                                         (flow_models(), "flux/dev", "euler"), (flow_models(), "sd3/medium", "euler")):
            for upscaler in ("Latent", "Latent (bicubic antialiased)", "Lanczos"):
                req = hires_request(models, model, scheduler, hr_upscaler=upscaler, txt2img_width=64,
                                    txt2img_height=64, hr_scale=1.5)
                progress, [image] = run(models, req)
                self.assertEqual((image.width, image.height), (96, 96), (model, upscaler))
                self.assertEqual(Image.open(io.BytesIO(image.png)).size, (96, 96))
                steps = [s for s, _ in progress]
                self.assertEqual(steps, list(range(1, len(steps) + 1)))
                self.assertEqual(progress[-1][0], progress[-1][1], (model, upscaler, progress))
                self.assertGreater(len(steps), 3, (model, upscaler))  # both passes counted

    def test_deterministic_and_each_option_counts(self):
        models = tiny_model_dir()
        a = run(models, hires_request(models))[1][0].png
        self.assertEqual(a, run(models, hires_request(models))[1][0].png)
        for options in (dict(hr_upscaler="Lanczos"), dict(hr_prompt="a tower"), dict(strength=0.9),
                        dict(hr_second_pass_steps=6)):
            self.assertNotEqual(a, run(models, hires_request(models, **options))[1][0].png, options)

    def test_diffusers_own_two_passes_give_the_same_image(self):
        from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

        models = tiny_model_dir()
        [mine] = run(models, hires_request(models))[1]
        pipe = StableDiffusionPipeline.from_pretrained(str(Path(models) / "v1" / "tiny"), local_files_only=True,
                                                       safety_checker=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        config = dict(pipe.scheduler.config)
        pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(config)
        latents = pipe("a lighthouse", negative_prompt="fog", width=80, height=64, num_inference_steps=3,
                       generator=[torch.Generator("cpu").manual_seed(7)], output_type="latent").images
        latents = torch.nn.functional.interpolate(latents, size=(12, 15), mode="bilinear", antialias=False)
        second = StableDiffusionImg2ImgPipeline(**pipe.components, requires_safety_checker=False)
        second.set_progress_bar_config(disable=True)
        second.scheduler = EulerAncestralDiscreteScheduler.from_config(config)
        theirs = second("a lighthouse", negative_prompt="fog", image=latents, strength=0.5, num_inference_steps=3,
                        generator=[torch.Generator("cpu").manual_seed(7)]).images[0]
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(mine.png)).convert("RGB")),
                                      np.asarray(theirs.convert("RGB")))

    def test_a_cancel_stops_the_second_pass(self):
        models = tiny_model_dir()
        req = hires_request(models, hr_second_pass_steps=40, strength=1.0)
        with self.assertRaises(errors.JobCancelled):
            run(models, req, cancel_at=5)


class DoorTests(HttpTestCase):
    @inlineCallbacks
    def test_webuiapi_and_the_socket_paint_the_same_hires_image(self):
        result = yield self.in_thread(lambda: self.client().txt2img(
            prompt="a lighthouse", negative_prompt="fog", seed=7, steps=3, width=80, height=64, cfg_scale=7.5,
            sampler_name="Euler a", enable_hr=True, hr_scale=1.5, hr_upscaler="Latent", denoising_strength=0.5))
        [image] = result.images
        self.assertEqual(image.size, (120, 96))
        self.assertIn("Hires upscale: 1.5, Hires steps: 3, Hires upscaler: Latent", image.info["parameters"])
        [replies] = yield self.talk({"action": "txt2img", "options": {
            "txt2img_model": "v1/tiny", "txt2img_prompt": "a lighthouse", "txt2img_negative_prompt": "fog",
            "txt2img_steps": 3, "txt2img_width": 80, "txt2img_height": 64, "txt2img_seed": 7,
            "txt2img_scheduler": "euler_a", "txt2img_scale": 7.5, "enable_hr": True, "hr_scale": 1.5,
            "strength": 0.5}})
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        self.assertEqual(pixels(buffer.getvalue()), pixels(png_of([m for m in replies if "image" in m][0])))

    @inlineCallbacks
    def test_the_upscaler_lists(self):
        upscalers = yield self.in_thread(lambda: requests.get(f"{self.base}/upscalers", timeout=30).json())
        modes = yield self.in_thread(lambda: requests.get(f"{self.base}/latent-upscale-modes", timeout=30).json())
        self.assertEqual([u["name"] for u in upscalers], ["None", "Lanczos", "Nearest"])
        self.assertIn({"name": "Latent (nearest-exact)"}, modes)
        bad = yield self.in_thread(self.post, "txt2img", {"prompt": "x", "enable_hr": True, "hr_upscaler": "nope"})
        self.assertEqual(bad.status_code // 100, 4, bad.text)
        self.assertIn("nope", bad.json()["detail"])
