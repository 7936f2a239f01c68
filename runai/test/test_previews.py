"""Live previews: every family's cheap latent-to-RGB picture, made in the worker every
``preview_every`` steps, on the socket's progress messages, AUTOMATIC1111's ``/progress``
``current_image``, and through the broker's wire."""

import base64
import io
import os

import requests
import torch
from PIL import Image
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase

from runai import families
from runai.broker import wire
from runai.core.requests import GenerationRequest
from runai.doors.http.jobs import HttpJob, progress_reply
from runai.engine.engine import Engine
from runai.models.library import ModelLibrary
from runai.test.test_e2e import legacy_request, png_of, tiny_model_dir
from runai.test.test_flow_families import flow_models, request as flow_request
from runai.test.test_http import HttpTestCase


def size_of(png):
    with Image.open(io.BytesIO(png)) as image:
        return image.size


class Recorder:
    def __init__(self):
        self.steps, self.previews = [], []

    def __call__(self, step, total, preview=None):
        self.steps.append(step)
        if preview is not None:
            self.previews.append((step, preview))


class EngineTests(SynchronousTestCase):
    def run_job(self, engine, req):
        progress, images = Recorder(), []
        engine.generate(req, progress, images.append, lambda: False)
        return progress, images

    def test_every_family_previews_at_one_pixel_per_latent_and_the_image_is_unchanged(self):
        sd = Engine(device="cpu", dtype="float32", library=ModelLibrary(tiny_model_dir()))
        plain = GenerationRequest(action="txt2img", model_path=os.path.join(tiny_model_dir(), "v1", "tiny"),
                                  model_name="v1/tiny", prompt="a lighthouse", steps=4, width=64, height=48, seed=3)
        flow = Engine(device="cpu", dtype="float32", library=ModelLibrary(flow_models()), cache_models=2)
        for engine, req in ((sd, plain), (flow, flow_request("flux/dev", steps=4, width=64, height=48)),
                            (flow, flow_request("sd3/medium", steps=4, width=64, height=48))):
            quiet, images = self.run_job(engine, req)
            self.assertEqual(quiet.previews, [], req.model_name)
            previewed, again = self.run_job(engine, GenerationRequest(**dict(vars(req), preview_every=2)))
            self.assertEqual([step for step, _ in previewed.previews], [2, 4], req.model_name)
            self.assertEqual({size_of(png) for _, png in previewed.previews}, {(8, 6)}, req.model_name)
            self.assertEqual(again[0].png, images[0].png, req.model_name)

    def test_the_linear_map_and_the_unpacking(self):
        flux, sd = families.for_version("flux"), families.for_version("v1")
        # A latent of all zeros is the bias: mid-grey shifted by it.
        image = sd.preview(torch.zeros(1, 4, 2, 3), 16, 24)
        self.assertEqual((image.size, image.getpixel((0, 0))), ((3, 2), (127, 127, 127)))
        # FLUX: channel c of latent pixel (y, x) sits in token (y//2, x//2), slot c*4 + (y%2)*2 + x%2.
        packed = torch.zeros(1, 1 * 2, 16 * 4)
        packed[0, 1, 0 * 4 + 1 * 2 + 0] = 10.0  # channel 0 at pixel (1, 2)
        image = flux.preview(packed, 16, 32)
        self.assertEqual(image.size, (4, 2))
        bright = {xy for xy in ((x, y) for x in range(4) for y in range(2))
                  if image.getpixel(xy) != image.getpixel((0, 0))}
        self.assertEqual(bright, {(2, 1)})

    def test_previews_travel_through_the_broker(self):
        fields = wire.progress_event("k", "1", 3, 10, b"\x89PNG...")
        event = wire.decode_event({k.encode(): v if isinstance(v, bytes) else str(v).encode()
                                   for k, v in fields.items()})
        self.assertEqual((event.data, event.preview), ({"step": 3, "total": 10}, b"\x89PNG..."))
        plain = wire.decode_event({k.encode(): str(v).encode() for k, v in wire.progress_event("k", "1", 1, 2).items()})
        self.assertIsNone(plain.preview)

    def test_the_http_progress_shows_the_latest_preview_unless_skipped(self):
        running = []
        job = HttpJob(running, clock=lambda: 5.0)
        job.job_queued(type("Job", (), {"serial": 1})(), 0)
        job.job_progress(None, 1, 4)
        self.assertIsNone(progress_reply(running, (0, True))["current_image"])
        job.job_progress(None, 2, 4, b"png-2")
        job.job_progress(None, 3, 4)
        self.assertEqual(base64.b64decode(progress_reply(running, (0, True))["current_image"]), b"png-2")
        self.assertIsNone(progress_reply(running, (0, True), skip_current_image=True)["current_image"])


class SocketTests(HttpTestCase):
    @inlineCallbacks
    def test_preview_every_puts_a_png_on_progress_messages(self):
        [replies] = yield self.talk(legacy_request(self.models, steps=4, txt2img_preview_every=2))
        progress = [m for m in replies if m.get("action") == 4]
        self.assertEqual([(m["step"], "preview" in m) for m in progress], [(1, False), (2, True), (3, False), (4, True)])
        self.assertEqual(size_of(base64.b64decode(progress[1]["preview"])), (8, 8))
        [quiet] = yield self.talk(legacy_request(self.models, steps=4))
        self.assertFalse(any("preview" in m for m in quiet))
        self.assertEqual(png_of([m for m in quiet if "image" in m][0]), png_of([m for m in replies if "image" in m][0]))

    @inlineCallbacks
    def test_progress_gives_current_image_as_the_options_say(self):
        options = yield self.in_thread(
            lambda: requests.post(f"{self.base}/options", json={"show_progress_every_n_steps": 1}, timeout=30))
        self.assertEqual(options.status_code, 200, options.text)
        got = yield self.in_thread(lambda: requests.get(f"{self.base}/options", timeout=30).json())
        self.assertEqual((got["live_previews_enable"], got["show_progress_every_n_steps"]), (True, 1))
        long_job = self.in_thread(lambda: self.client().txt2img(prompt="x", steps=150, width=64, height=64))

        def watch():
            for _ in range(3000):
                progress = requests.get(f"{self.base}/progress", timeout=30).json()
                if progress["current_image"]:
                    skipped = requests.get(f"{self.base}/progress?skip_current_image=true", timeout=30).json()
                    requests.post(f"{self.base}/interrupt", timeout=30)
                    return progress, skipped
                import time
                time.sleep(0.01)
            requests.post(f"{self.base}/interrupt", timeout=30)
            return progress, progress
        progress, skipped = yield self.in_thread(watch)
        yield long_job
        self.assertEqual(size_of(base64.b64decode(progress["current_image"])), (8, 8))
        self.assertIsNone(skipped["current_image"])
        off = yield self.in_thread(
            lambda: requests.post(f"{self.base}/options", json={"live_previews_enable": False}, timeout=30))
        self.assertEqual(off.status_code, 200)
        bad = yield self.in_thread(
            lambda: requests.post(f"{self.base}/options", json={"show_progress_every_n_steps": "often"}, timeout=30))
        self.assertEqual(bad.status_code, 422, bad.text)
