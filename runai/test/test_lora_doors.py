"""LoRAs through the doors: ``GET /sdapi/v1/loras``, ``POST /sdapi/v1/refresh-loras`` and
the ``Lora hashes`` infotext on the HTTP door, the ``loras`` action on the socket, and
``runai loras``; against a real server with a tiny model and a tiny kohya LoRA."""

import atexit
import hashlib
import io
import os
import shutil
import sys
import tempfile

import requests
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase, TestCase

from runai.cli import main as cli
from runai.cli import models as models_cli
from runai.doors.http import lora_hashes
from runai.models import loras
from runai.test import lora_fixtures as lf
from runai.test.test_e2e import LegacyClient, LiveServer, legacy_request, png_of, tiny_model_dir
from runai.test.test_http import HttpTestCase

_folder = []


def lora_model_dir():
    """A model folder of its own (v1/tiny, copied) with ``loras/style.safetensors``."""
    if not _folder:
        from diffusers import UNet2DConditionModel

        root = os.path.realpath(tempfile.mkdtemp(prefix="runai-lora-doors-"))
        atexit.register(shutil.rmtree, root, True)
        shutil.copytree(os.path.join(tiny_model_dir(), "v1", "tiny"), os.path.join(root, "v1", "tiny"))
        unet = UNet2DConditionModel.from_pretrained(os.path.join(root, "v1", "tiny", "unet"))
        targets = [("lora_unet_", unet, n) for n in lf.modules_of(unet, ("attn2.to_k", "attn2.to_v", "proj_out"))]
        lf.save(os.path.join(root, "loras", "style.safetensors"), lf.kohya_state(targets, std=1.0),
                metadata={"ss_output_name": "painterly"})
        _folder.append(root)
    return _folder[0]


class HttpLoraTests(HttpTestCase):
    def model_dir(self):
        return lora_model_dir()

    @inlineCallbacks
    def test_the_list_and_a_refresh_as_a1111_answers(self):
        listed = yield self.in_thread(lambda: self.client().get_loras())
        self.assertEqual(listed, [{"name": "style", "alias": "painterly", "path": "loras/style.safetensors",
                                   "metadata": {"ss_output_name": "painterly"}}])
        extra = os.path.join(self.models, "loras", "later.safetensors")
        shutil.copy(os.path.join(self.models, "loras", "style.safetensors"), extra)
        self.addCleanup(loras.refresh, self.models)  # after the removal: the other tests see one LoRA
        self.addCleanup(os.remove, extra)
        response = yield self.in_thread(lambda: self.post("refresh-loras", {}))
        self.assertEqual(response.status_code, 200)
        listed = yield self.in_thread(lambda: requests.get(f"{self.base}/loras", timeout=30).json())
        self.assertEqual([e["name"] for e in listed], ["later", "style"])

    @inlineCallbacks
    def test_a_lora_in_the_prompt_changes_the_image_and_is_hashed(self):
        def run(prompt):
            return self.post("txt2img", {"prompt": prompt, "seed": 5, "steps": 2, "width": 64, "height": 64}).json()
        plain = yield self.in_thread(run, "a lighthouse")
        styled = yield self.in_thread(run, "a lighthouse <lora:style:0.8>")
        self.assertNotEqual(plain["images"], styled["images"])
        with open(os.path.join(self.models, "loras", "style.safetensors"), "rb") as f:
            sha = hashlib.sha256(f.read()).hexdigest()
        import json
        info = json.loads(styled["info"])
        self.assertIn(f'Lora hashes: "style: {sha[:12]}"', info["infotexts"][0])
        self.assertNotIn("Lora hashes", json.loads(plain["info"])["infotexts"][0])
        missing = yield self.in_thread(run, "a lighthouse <lora:nope:1>")
        self.assertEqual(missing["error"], "model_not_found")


class SocketLoraTests(LiveServer, TestCase):
    timeout = 300

    def setUp(self):
        self.models = lora_model_dir()
        self.start_server(self.models)

    def ask(self, request):
        def run():
            client = LegacyClient(self.port.getHost().port)
            try:
                client.send(request)
                return [client.receive()]
            finally:
                client.close()
        return self.in_thread(run)

    @inlineCallbacks
    def test_the_loras_action_and_an_unknown_name(self):
        listed = yield self.ask({"action": "loras", "id": 7})
        missing, styled, plain = yield self.talk(
            legacy_request(self.models, txt2img_prompt="a lighthouse <lora:nope:1>"),
            legacy_request(self.models, txt2img_prompt="a lighthouse <lora:painterly:1:0.5>"),
            legacy_request(self.models))
        self.assertEqual(listed, [{"action": "loras", "id": 7, "loras": [
            {"name": "style", "alias": "painterly", "path": "loras/style.safetensors", "version": "unknown",
             "size": os.path.getsize(os.path.join(self.models, "loras", "style.safetensors"))}]}])
        self.assertEqual(missing[-1]["error"]["code"], "model_not_found")
        self.assertIn("'nope'", missing[-1]["error"]["message"])
        [a] = [png_of(m) for m in styled if "image" in m]
        [b] = [png_of(m) for m in plain if "image" in m]
        self.assertNotEqual(a, b)


class CliTests(SynchronousTestCase):
    def listing(self, files, *argv):
        class Client:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                pass

            def loras(self):
                return files
        self.patch(models_cli, "connect", lambda args, timeout: Client())
        stdout = io.StringIO()
        self.patch(sys, "stdout", stdout)
        self.assertEqual(cli.main(["loras", *argv]), 0)
        return stdout.getvalue()

    def test_runai_loras(self):
        self.assertIn("no LoRAs", self.listing([]))
        self.assertEqual(self.listing([{"name": "style", "path": "loras/style.safetensors", "version": "v1",
                                        "size": 2048}]),
                         "<lora:style:1>  loras/style.safetensors  (v1; 2.0 KB)\n")
        self.assertEqual(self.listing([], "--json"), "[]\n")

    def test_the_infotext_value(self):
        self.assertIsNone(lora_hashes.infotext_value([]))
        self.assertEqual(lora_hashes.infotext_value([("a:b", "0123456789ab"), ("c", "ba9876543210")]),
                         '"ab: 0123456789ab, c: ba9876543210"')
