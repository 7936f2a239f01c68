"""runai.models.convert: single file -> diffusers folder and back, checked against
diffusers' own loader; the ``convert`` action, in the worker and over a socket; the
``runai convert`` command (runai.cli.models)."""

import os
import shutil
import types
from pathlib import Path

import torch
from twisted.internet import reactor, threads
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase, TestCase

from runai.models import checkpoint
from runai.cli import main as cli
from runai.models import classify
from runai.models import convert
from runai.core import errors
from runai.models import library
from runai.client import BlockingClient
from runai.engine.engine import Engine
from runai.core.requests import ConvertRequest
from runai.doors.legacy.parse import parse_request
from runai.backends.local import LocalWorker
from runai.test import library_fixtures as fx
from runai.test.library_fixtures import assertSameWeights, reference
from runai.models.library import ModelLibrary
from runai.test.support import make_server


class ImportTests(SynchronousTestCase):
    """LDM single file -> diffusers folder, and the round trip."""

    def setUp(self):
        self.models = Path(self.mktemp()).absolute()
        shutil.copytree(fx.model_folder() / "runwayml", self.models / "runwayml")
        shutil.copytree(fx.model_folder() / "stabilityai", self.models / "stabilityai")
        (self.models / "v1").mkdir()
        (self.models / "v2").mkdir()
        self.library = library.ModelLibrary(self.models)

    def convert(self, source, target, **kwargs):
        entry = self.library.describe(source)
        return convert.single_file_to_diffusers(source, target, self.models, entry, **kwargs)

    def test_round_trip(self):
        from diffusers import StableDiffusionPipeline

        for kind, version, source in (("v1", "v1", "v1/a.ckpt"), ("v2", "v2", "v2/b.safetensors")):
            path = self.models / source
            if source.endswith(".ckpt"):
                fx.write_lightning_ckpt(path, fx.ldm_state(kind))
            else:
                convert.diffusers_to_single_file(fx.tiny_source(kind), path)
            target = path.with_suffix("")
            steps = []
            self.assertEqual(self.convert(path, target, on_progress=lambda *s: steps.append(s)), version)
            self.assertEqual(steps, [(k, len(convert.STAGES)) for k in range(1, len(convert.STAGES) + 1)])
            back = StableDiffusionPipeline.from_pretrained(str(target), local_files_only=True, low_cpu_mem_usage=False)
            assertSameWeights(self, back, reference(kind))
            self.assertEqual(classify.classify_diffusers(target, self.models).version, version)

    def test_inpainting_folder_says_so(self):
        path = self.models / "v1" / "in.safetensors"
        convert.diffusers_to_single_file(fx.tiny_source("v1-inpaint"), path)
        self.convert(path, self.models / "v1" / "in")
        c = classify.classify_diffusers(self.models / "v1" / "in", self.models)
        self.assertEqual((c.inpainting, c.pipeline_class), (True, "StableDiffusionInpaintPipeline"))

    def test_cancel_and_failure_leave_nothing(self):
        path = self.models / "v1" / "a.safetensors"
        convert.diffusers_to_single_file(fx.tiny_source("v1"), path)
        with self.assertRaises(errors.JobCancelled):
            self.convert(path, self.models / "v1" / "a", is_cancelled=lambda: True)
        from diffusers import StableDiffusionPipeline

        def full_disk(self, *args, **kwargs):
            os.makedirs(args[0], exist_ok=True)
            (Path(args[0]) / "half.bin").write_bytes(b"x")
            raise OSError(28, "No space left on device")

        self.patch(StableDiffusionPipeline, "save_pretrained", full_disk)
        with self.assertRaises(convert.ConvertError) as caught:
            self.convert(path, self.models / "v1" / "a")
        self.assertIn("No space left", caught.exception.message)
        self.assertEqual(sorted(os.listdir(self.models / "v1")), ["a.safetensors"])

    def test_never_overwrites(self):
        path = self.models / "v1" / "a.safetensors"
        convert.diffusers_to_single_file(fx.tiny_source("v1"), path)
        (self.models / "v1" / "a").mkdir()
        with self.assertRaises(convert.ConvertError):
            self.convert(path, self.models / "v1" / "a")
        self.assertEqual(os.listdir(self.models / "v1" / "a"), [])


class RunRequestTests(SynchronousTestCase):
    """The ``convert`` action's errors are ``convert_failed`` (or bad_request), whatever
    raised them; never ``internal``."""

    def setUp(self):
        self.models = Path(self.mktemp()).absolute()
        shutil.copytree(fx.model_folder() / "runwayml", self.models / "runwayml")
        (self.models / "v1").mkdir()
        shutil.copy(fx.model_folder() / "v1" / "both.safetensors", self.models / "v1" / "m.safetensors")
        self.loader = types.SimpleNamespace(library=library.ModelLibrary(self.models), model_dir=self.models)

    def run_request(self, name="v1/m.safetensors", is_cancelled=lambda: False):
        req = ConvertRequest(model_path=str(self.models / name), model_name=name,
                             target_path=str(self.models / "v1" / "m"), target_name="v1/m")
        return convert.run_request(req, self.loader, lambda step, total: None, is_cancelled)

    def assertFails(self, *words, name="v1/m.safetensors", code=errors.CONVERT_FAILED):
        with self.assertRaises(errors.RunaiError) as caught:
            self.run_request(name)
        self.assertEqual(caught.exception.code, code)
        for word in (name,) + words:
            self.assertIn(word, caught.exception.message)
        self.assertNotIn(str(self.models), caught.exception.message)
        self.assertFalse(os.path.lexists(self.models / "v1" / "m"))

    def test_an_error_inside_diffusers(self):
        from diffusers.loaders import single_file_utils

        def conversion(checkpoint, config, *args, **kwargs):
            raise KeyError("first_stage_model.encoder.conv_in.weight")

        self.patch(single_file_utils, "convert_ldm_vae_checkpoint", conversion)
        self.assertFails("KeyError", "first_stage_model.encoder.conv_in.weight")
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)
        self.assertEqual(os.listdir(self.models / "v1"), ["m.safetensors"])

    def test_out_of_memory(self):
        def oom(path):
            raise torch.OutOfMemoryError(f"CUDA out of memory reading {path}")

        self.patch(checkpoint, "load_state_dict", oom)
        self.assertFails("OutOfMemoryError", "out of memory")
        self.flushLoggedErrors(torch.OutOfMemoryError)

    def test_a_source_that_went_away(self):
        os.unlink(self.models / "v1" / "m.safetensors")
        self.assertFails("not a model")
        self.flushLoggedErrors(ValueError)

    def test_a_source_swapped_for_a_link_outside(self):
        outside = self.models.parent / "elsewhere.safetensors"
        os.rename(self.models / "v1" / "m.safetensors", outside)
        os.symlink(outside, self.models / "v1" / "m.safetensors")
        self.assertFails("outside the model folder")

    def test_cancel_is_still_a_cancel(self):
        with self.assertRaises(errors.JobCancelled):
            self.run_request(is_cancelled=lambda: True)

    def test_targets_without_a_name_are_refused_when_parsed(self):
        for name in ("..ckpt", "...safetensors", ".hidden.ckpt", "v1/..ckpt"):
            source = self.models / name
            shutil.copy(self.models / "v1" / "m.safetensors", source)
            with self.assertRaises(errors.RunaiError) as caught:
                parse_request({"action": "convert", "options": {"convert_model": name}}, self.models)
            self.assertEqual(caught.exception.code, errors.BAD_REQUEST, name)
            os.unlink(source)




class ConvertActionTests(TestCase):
    """The legacy ``convert`` action, over a socket, with the real worker thread."""

    timeout = 240

    def setUp(self):
        self.models = Path(self.mktemp()).absolute()
        shutil.copytree(fx.model_folder() / "runwayml", self.models / "runwayml")
        (self.models / "v1").mkdir()
        fx.write_lightning_ckpt(self.models / "v1" / "legacy.ckpt", fx.ldm_state("v1"))
        self.worker = LocalWorker(reactor, device="cpu", dtype="float32",
                                  engine_options=dict(library=ModelLibrary(self.models), cache_models=2))
        self.worker.startService()
        self.queue, _, self.factory = make_server(reactor, str(self.models), self.worker,
                                                  pool=reactor.getThreadPool())
        self.port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.addCleanup(self.worker.stopService)
        self.addCleanup(self.queue.stopService)
        self.addCleanup(self.port.stopListening)

    def talk(self, *requests):
        def run():
            answers = []
            with BlockingClient("127.0.0.1", self.port.getHost().port, timeout=120) as client:
                for request in requests:
                    client.send(request)
                    replies = []
                    while True:
                        message = client.receive()
                        replies.append(message)
                        if "error" in message or message.get("action") in ("done", "models"):
                            break
                    answers.append(replies)
            return answers

        return threads.deferToThread(run)

    @inlineCallbacks
    def test_convert_then_list_then_generate(self):
        legacy = {"action": "convert", "id": 5,
                  "options": {"convert_model": str(self.models / "v1" / "legacy.ckpt"),
                              "model_base_path": str(self.models)}}
        txt2img = {"action": "txt2img", "options": {
            "txt2img_prompt": "a lighthouse", "txt2img_steps": 2, "txt2img_width": 64, "txt2img_height": 64,
            "txt2img_seed": 3}}

        def gen(model):
            return dict(txt2img, options=dict(txt2img["options"], txt2img_model=model))

        converted, listed, again, a, b = yield self.talk(
            legacy, {"action": "models"}, legacy, gen("v1/legacy.ckpt"), gen("v1/legacy"))
        progress = [m for m in converted if m.get("action") == 4]
        self.assertEqual([(m["step"], m["total"], m["reqtype"], m["id"]) for m in progress],
                         [(k, 6, "convert", 5) for k in range(1, 7)])
        done = converted[-1]
        self.assertEqual((done["action"], done["reqtype"], done["path"], done["format"], done["version"], done["id"]),
                         ("done", "convert", "v1/legacy", "diffusers", "v1", 5))
        names = {m["name"]: m for m in listed[-1]["models"]}
        self.assertEqual(names["v1/legacy"]["format"], "diffusers")
        self.assertEqual(again[-1]["error"]["code"], errors.BAD_REQUEST)  # the folder exists now
        # The converted folder and its source draw the same picture.
        image = lambda replies: next(m["image"] for m in replies if "image" in m)  # noqa: E731
        self.assertEqual(image(a), image(b))

    @inlineCallbacks
    def test_runai_models_command(self):
        import contextlib
        import io

        def run():
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                status = cli.main(["models", "--port", str(self.port.getHost().port)])
            return status, out.getvalue()

        status, output = yield threads.deferToThread(run)
        self.assertEqual(status, 0)
        self.assertIn("v1/legacy.ckpt  (ckpt, v1;", output)
        self.assertIn("runwayml/stable-diffusion-v1-5  (diffusers, v1;", output)

    @inlineCallbacks
    def test_a_bad_checkpoint_is_a_clear_error(self):
        (self.models / "v1" / "junk.ckpt").write_bytes(b"not a checkpoint")
        [replies] = yield self.talk({"action": "convert", "options": {"convert_model": "v1/junk.ckpt"}})
        self.assertEqual(replies[-1]["error"]["code"], errors.CONVERT_FAILED)
        self.assertIn("v1/junk.ckpt", replies[-1]["error"]["message"])
        self.assertNotIn(str(self.models), replies[-1]["error"]["message"])
        self.assertEqual(sorted(os.listdir(self.models / "v1")), ["junk.ckpt", "legacy.ckpt"])


class EngineConvertTests(SynchronousTestCase):
    def test_engine_without_model_folder(self):
        from runai.core.requests import ConvertRequest

        with self.assertRaises(errors.RunaiError):
            Engine(device="cpu").convert(ConvertRequest("a.ckpt", "a.ckpt", "a", "a"), None, lambda: False)
