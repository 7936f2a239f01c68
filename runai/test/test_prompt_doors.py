"""A1111's prompt syntax and embeddings through both doors of a real server (the socket's
``embeddings`` action and ``runai embeddings``; the HTTP door's ``/sdapi/v1/embeddings``,
``refresh-embeddings``, ``TI hashes``), and the fields A1111's clients really send: a
seed as a string, a null denoising strength, a ``data:`` URL, always-on scripts."""

import base64
import io
import re
import sys

import requests
from PIL import Image
from twisted.internet.defer import inlineCallbacks

from runai.cli import main as cli
from runai.client import BlockingClient, ServerError, txt2img_request
from runai.test.prompt_fixtures import SD_WIDTH, prompt_models, vectors, write_embedding
from runai.test.test_http import HttpTestCase


class PromptDoorTests(HttpTestCase):
    def model_dir(self):
        return str(prompt_models())

    def body(self, **fields):
        body = dict(prompt="a lighthouse", steps=1, width=64, height=64, seed=3,
                    override_settings={"sd_model_checkpoint": "v1/tiny"})
        body.update(fields)
        return body

    def socket(self, f):
        def run():
            with BlockingClient(port=self.port.getHost().port, timeout=120) as client:
                return f(client)
        return self.in_thread(run)

    @inlineCallbacks
    def test_syntax_runai_does_not_build_is_refused_on_both_doors(self):
        reply = yield self.in_thread(self.post, "txt2img", self.body(prompt="a [cat|dog]"))
        self.assertEqual(reply.status_code, 422)
        self.assertEqual(reply.json()["error"], "bad_request")
        self.assertIn("'prompt'", reply.json()["detail"])
        self.assertIn("[a|b]", reply.json()["detail"])
        reply = yield self.in_thread(self.post, "txt2img", self.body(negative_prompt="<hypernet:x:1>"))
        self.assertEqual((reply.status_code, reply.json()["error"]), (422, "bad_request"))
        self.assertIn("hypernet", reply.json()["detail"])

        def refused(client):
            try:
                client.run(txt2img_request("a cat AND a dog", "v1/tiny", steps=1, width=64, height=64))
            except ServerError as e:
                return e
        error = yield self.socket(refused)
        self.assertEqual(error.code, "bad_request")
        self.assertIn("AND", error.message)

    @inlineCallbacks
    def test_embeddings_are_listed_as_a1111_lists_them(self):
        write_embedding(self, "fits", "pt", vectors(2, SD_WIDTH), step=7)
        write_embedding(self, "xl", "pair", {"clip_l": vectors(1, 16), "clip_g": vectors(1, 32)})
        reply = yield self.in_thread(self.post, "options", {"sd_model_checkpoint": "v1/tiny"})
        self.assertEqual(reply.status_code, 200)
        listed = yield self.in_thread(lambda: requests.get(f"{self.base}/embeddings", timeout=60).json())
        self.assertEqual(listed, {
            "loaded": {"fits": {"step": 7, "sd_checkpoint": "abcdef12", "sd_checkpoint_name": "base",
                                "shape": SD_WIDTH, "vectors": 2}},
            "skipped": {"xl": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": 48,
                               "vectors": 1}}})
        reply = yield self.in_thread(self.post, "refresh-embeddings", {})
        self.assertEqual((reply.status_code, reply.json()), (200, None))
        # The socket: the same for a model it names, and every file without one.
        mine = yield self.socket(lambda client: client.embeddings("v1/tiny"))
        self.assertEqual(mine, listed)
        every = yield self.socket(lambda client: client.embeddings())
        self.assertEqual(sorted(every["loaded"]), ["fits", "xl"])
        missing = yield self.socket(lambda client: self.assertRaises(ServerError, client.embeddings, "v1/none"))
        self.assertEqual(missing.code, "model_not_found")
        # The command line.
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        status = yield self.in_thread(cli.main, ["embeddings", "--port", str(self.port.getHost().port),
                                                 "-m", "v1/tiny"])
        self.assertEqual(status, 0)
        self.assertEqual(out.getvalue(), f"fits  (2 vector(s), {SD_WIDTH} wide)\n"
                                         "xl  (1 vector(s), 48 wide; does not fit v1/tiny)\n")

    @inlineCallbacks
    def test_fields_as_clients_send_them(self):
        write_embedding(self, "tiemb", "pt", vectors(1, SD_WIDTH))
        # A seed as a string (the Photoshop plugin), an embedding: TI hashes in the infotext.
        reply = yield self.in_thread(self.post, "txt2img", self.body(prompt="a lighthouse, tiemb", seed="123"))
        self.assertEqual(reply.status_code, 200, reply.text)
        info = reply.json()["info"]
        self.assertIn('"seed": 123', info)
        self.assertTrue(re.search(r'TI hashes: \\"tiemb: [0-9a-f]{12}\\"', info), info)
        # A data: URL and a null denoising strength (aiyabot).
        buffer = io.BytesIO()
        Image.new("RGB", (64, 64), (20, 120, 200)).save(buffer, format="PNG")
        picture = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
        reply = yield self.in_thread(self.post, "img2img", self.body(init_images=[picture], denoising_strength=None,
                                                                     steps=2))
        self.assertEqual(reply.status_code, 200, reply.text)
        # Scripts runai does not have are refused naming them; empty entries ask for nothing.
        reply = yield self.in_thread(self.post, "txt2img", self.body(
            alwayson_scripts={"ControlNet": {"args": [{"enabled": True, "module": "canny"}]}}))
        self.assertEqual(reply.status_code, 422)
        self.assertIn("ControlNet", reply.json()["detail"])
        reply = yield self.in_thread(self.post, "txt2img", self.body(
            alwayson_scripts={"ADetailer": {"args": []}, "Refiner": {}}, script_name=None, script_args=[]))
        self.assertEqual(reply.status_code, 200, reply.text)
        reply = yield self.in_thread(self.post, "txt2img", self.body(script_name="x/y plot"))
        self.assertEqual(reply.status_code, 422)
        self.assertIn("x/y plot", reply.json()["detail"])

