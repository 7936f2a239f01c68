"""SD3 and FLUX.1 single files with their companion files, end to end: over the socket and
the AUTOMATIC1111 door (``forge_additional_modules``, ``/sdapi/v1/sd-modules``), and
``convert`` to a diffusers folder (runai.test.flow_fixtures.model_folder)."""

import io
import os
import shutil
import tempfile
from pathlib import Path

import webuiapi
from PIL import Image
from twisted.internet.defer import inlineCallbacks

from runai.core import errors
from runai.models.library import ModelLibrary
from runai.test import flow_fixtures as ff
from runai.test.test_e2e import LegacyClient, LiveServer, png_of
from runai.test.test_e2e_flow import encoded, flow_request, images_of
from runai.test.test_flow_families import half_mask, picture
from runai.test.test_http import HttpTestCase, pixels
from twisted.trial.unittest import TestCase

FLUX_FILE = "flux/flux1-dev.safetensors"
FLUX_FOLDER = "black-forest-labs/FLUX.1-dev"
SD3_FILE = "sd3/sd3.5_large_incl_clips_t5xxl.safetensors"
SD3_FOLDER = "stabilityai/stable-diffusion-3.5-large"
MODULES = ["vae/ae.safetensors", "text_encoder/clip_l.safetensors", "text_encoder/t5xxl_fp16.safetensors"]


class SocketTests(LiveServer, TestCase):
    timeout = 300

    def setUp(self):
        self.models = ff.model_folder()
        self.start_server(str(self.models), idle_timeout=60)

    @inlineCallbacks
    def test_a_file_with_companions_paints_its_folders_image(self):
        for file, folder in ((FLUX_FILE, FLUX_FOLDER), (SD3_FILE, SD3_FOLDER), ("sd3/sd3.5_large.safetensors",
                                                                             SD3_FOLDER)):
            from_file, from_folder = yield self.talk(flow_request(model=file), flow_request(model=folder))
            self.assertEqual(from_file[-1]["action"], "done", (file, from_file[-1]))
            self.assertEqual(png_of(images_of(from_file)[0]), png_of(images_of(from_folder)[0]), file)

    @inlineCallbacks
    def test_every_mode_from_a_file(self):
        sent = dict(pixels=encoded(picture()), mask=encoded(half_mask()))
        for model in (FLUX_FILE, "flux/flux1-fill-dev.safetensors", SD3_FILE):
            answers = yield self.talk(
                flow_request("img2img", model=model, pixels=sent["pixels"], img2img_strength=0.5),
                flow_request("inpaint", model=model, **sent))
            for replies in answers:
                self.assertEqual(replies[-1]["action"], "done", (model, replies[-1]))
                self.assertEqual(Image.open(io.BytesIO(png_of(images_of(replies)[0]))).size, (64, 64))

    @inlineCallbacks
    def test_modules_choose_the_companions(self):
        chosen, fp8, wrong, outside = yield self.talk(
            flow_request(model=FLUX_FILE, txt2img_modules=MODULES),
            flow_request(model=FLUX_FILE, txt2img_modules=[MODULES[0], MODULES[1],
                                                           "text_encoder/t5xxl_fp8_e4m3fn.safetensors"]),
            flow_request(model=FLUX_FILE, txt2img_modules=["sd3/clip_g.safetensors"]),
            flow_request(model=FLUX_FILE, txt2img_modules=["../elsewhere.safetensors"]))
        [default] = yield self.talk(flow_request(model=FLUX_FILE))
        self.assertEqual(png_of(images_of(chosen)[0]), png_of(images_of(default)[0]))
        self.assertEqual(fp8[-1]["action"], "done")
        self.assertEqual(wrong[-1]["error"]["code"], errors.MODEL_LOAD_FAILED)
        self.assertIn("CLIP-G", wrong[-1]["error"]["message"])
        self.assertEqual(outside[-1]["error"]["code"], errors.PATH_OUTSIDE_MODEL_DIR)

    @inlineCallbacks
    def test_files_and_companions_are_listed(self):
        def ask_models():
            client = LegacyClient(self.port.getHost().port)
            try:
                client.send({"action": "models", "id": 1})
                return client.receive()
            finally:
                client.close()
        listing = yield self.in_thread(ask_models)
        by_name = {m["name"]: m for m in listing["models"]}
        self.assertEqual((by_name[FLUX_FILE]["version"], by_name[FLUX_FILE]["served"]), ("flux", True))
        self.assertEqual((by_name[SD3_FILE]["version"], by_name[SD3_FILE]["served"]), ("sd3", True))
        self.assertEqual((by_name["vae/ae.safetensors"]["kind"], by_name["vae/ae.safetensors"]["served"]),
                         ("vae", False))
        self.assertEqual((by_name["text_encoder/t5xxl_fp16.safetensors"]["kind"],
                          by_name["text_encoder/t5xxl_fp16.safetensors"]["variant"]), ("text_encoder", "t5xxl"))
        self.assertEqual(by_name["flux/flux1-schnell.safetensors"]["variant"], "schnell")


class ConvertTests(LiveServer, TestCase):
    timeout = 300

    def setUp(self):
        # A copy: converting writes into the model folder.
        self.models = Path(os.path.realpath(tempfile.mkdtemp(prefix="runai-flow-convert-")))
        self.addCleanup(shutil.rmtree, self.models, True)
        shutil.copytree(ff.model_folder(), self.models, dirs_exist_ok=True)
        self.start_server(str(self.models), idle_timeout=60)

    @inlineCallbacks
    def test_a_transformer_only_file_becomes_a_folder_that_paints_the_same(self):
        for source, target, version in ((FLUX_FILE, "flux/flux1-dev", "flux"),
                                        (SD3_FILE, "sd3/sd3.5_large_incl_clips_t5xxl", "sd3")):
            [done] = yield self.talk({"action": "convert", "options": {"convert_model": source}})
            self.assertEqual((done[-1]["action"], done[-1].get("path"), done[-1].get("version")),
                             ("done", target, version), done[-1])
            entry = ModelLibrary(self.models).describe(self.models / target)
            self.assertEqual((entry.format, entry.version, entry.served), ("diffusers", version, True))
            from_folder, from_file = yield self.talk(flow_request(model=target), flow_request(model=source))
            self.assertEqual(png_of(images_of(from_folder)[0]), png_of(images_of(from_file)[0]), target)


class HttpTests(HttpTestCase):
    def model_dir(self):
        return str(ff.model_folder())

    @inlineCallbacks
    def test_sd_modules_lists_the_companions(self):
        import requests

        response = yield self.in_thread(lambda: requests.get(f"{self.base}/sd-modules", timeout=60))
        listed = {m["filename"]: m["model_name"] for m in response.json()}
        self.assertEqual(listed["vae/ae.safetensors"], "ae")
        self.assertIn("text_encoder/t5xxl_fp8_e4m3fn.safetensors", listed)
        self.assertNotIn(FLUX_FILE, listed)

    @inlineCallbacks
    def test_forge_additional_modules_and_webuiapi(self):
        body = {"prompt": "a lighthouse", "steps": 2, "width": 64, "height": 64, "seed": 5, "sampler_name": "Euler",
                "override_settings": {"sd_model_checkpoint": FLUX_FILE}}
        chosen = yield self.in_thread(self.post, "txt2img", dict(body, forge_additional_modules=MODULES))
        self.assertEqual(chosen.status_code, 200, chosen.text)
        missing = yield self.in_thread(self.post, "txt2img", dict(body, forge_additional_modules=["vae/none.safetensors"]))
        self.assertEqual(missing.status_code, 404, missing.text)
        result = yield self.in_thread(lambda: webuiapi.WebUIApi(host="127.0.0.1", port=self.http.getHost().port).txt2img(
            prompt="a lighthouse", seed=5, steps=2, width=64, height=64, sampler_name="Euler",
            override_settings={"sd_model_checkpoint": FLUX_FILE}))
        [replies] = yield self.talk(flow_request(model=FLUX_FILE))
        buffer = io.BytesIO()
        result.image.save(buffer, format="PNG")
        self.assertEqual(pixels(buffer.getvalue()), pixels(png_of(images_of(replies)[0])))
        import base64

        self.assertEqual(pixels(base64.b64decode(chosen.json()["images"][0])), pixels(buffer.getvalue()))
