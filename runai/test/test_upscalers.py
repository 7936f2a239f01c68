"""Model upscalers: told by their keys (runai.models.upscaler_keys, upscalers), listed with
kind "upscaler", loaded safely (upscaler_load), run tiled (runai.engine.upscale), asked
for with limits (runai.core.upscale), and as hires fix's upscaler."""

import base64
import dataclasses
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from twisted.trial.unittest import SynchronousTestCase

from runai.core import errors
from runai.core.fields import DictFields
from runai.core.images import check_image
from runai.core.requests import Limits
from runai.core.upscale import upscale_request
from runai.engine import upscale
from runai.models import upscaler_keys, upscaler_load, upscalers
from runai.models.library import ModelLibrary
from runai.test.test_checkpoint import SystemCall
from runai.test.upscaler_fixtures import compact_state, esrgan_state, upscaler_model_dir

CPU = torch.device("cpu")


def picture(width=40, height=32, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, len(mode)), dtype=np.uint8).squeeze(), mode)


def b64png(image):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def shapes(state):
    return {k: tuple(v.shape) for k, v in state.items()}


class KeysTests(SynchronousTestCase):
    def test_architectures_and_scales(self):
        self.assertEqual(upscaler_keys.detect(shapes(esrgan_state(scale=2))), upscaler_keys.Arch("ESRGAN", 2))
        self.assertEqual(upscaler_keys.detect(shapes(esrgan_state(scale=4))), upscaler_keys.Arch("ESRGAN", 4))
        self.assertEqual(upscaler_keys.detect(shapes(compact_state(scale=4))), upscaler_keys.Arch("Compact", 4))
        self.assertEqual(upscaler_keys.detect(shapes(compact_state(scale=2))), upscaler_keys.Arch("Compact", 2))
        # Real-ESRGAN's names (conv_first, body.N.rdbM, conv_up1/2), x4 from its two upsamplers.
        real = {"conv_first.weight": (8, 3, 3, 3), "body.0.rdb1.conv1.weight": (4, 8, 3, 3),
                "conv_body.weight": (8, 8, 3, 3), "conv_up1.weight": (8, 8, 3, 3), "conv_up2.weight": (8, 8, 3, 3),
                "conv_hr.weight": (8, 8, 3, 3), "conv_last.weight": (3, 8, 3, 3)}
        self.assertEqual(upscaler_keys.detect(real), upscaler_keys.Arch("ESRGAN", 4))
        # x2plus sees its input pixel-unshuffled: 12 channels in, 3 out.
        self.assertEqual(upscaler_keys.detect(dict(real, **{"conv_first.weight": (8, 12, 3, 3)})).scale, 2)
        for other in ({}, {"model.0.weight": (8, 3, 3, 3)}, {"body.0.weight": (8,), "body.1.weight": (8,)},
                      {"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}):
            self.assertIsNone(upscaler_keys.detect(other), other)

    def test_unwrap(self):
        inner = {"module.a": 1, "module.b": 2}
        self.assertEqual(upscaler_keys.unwrap({"params_ema": inner, "params": {"x": 0}}), {"a": 1, "b": 2})
        self.assertEqual(upscaler_keys.unwrap({"a": 1}), {"a": 1})
        self.assertEqual(upscaler_keys.unwrap([1]), [1])


class IndexTests(SynchronousTestCase):
    def setUp(self):
        self.models = upscaler_model_dir()

    def test_found_by_content_and_named_by_stem(self):
        files = upscalers.index(self.models).files(refresh=True)
        self.assertEqual([(f.name, f.relative, f.arch, f.scale) for f in files], [
            ("2x-Tiny", "ESRGAN/2x-Tiny.safetensors", "ESRGAN", 2),
            ("2x-TinyPickle", "ESRGAN/2x-TinyPickle.pth", "ESRGAN", 2),
            ("4x-Compact", "RealESRGAN/4x-Compact.pth", "Compact", 4)])
        listed = upscalers.listing(self.models)
        self.assertEqual(listed[0], {"name": "2x-Tiny", "model_name": "ESRGAN", "model_path": "ESRGAN/2x-Tiny.safetensors",
                                     "model_url": None, "scale": 2})
        self.assertFalse(any(self.models in str(v) for entry in listed for v in entry.values()))
        for name in ("2x-Tiny", "ESRGAN/2x-Tiny", "ESRGAN/2x-Tiny.safetensors"):
            self.assertEqual(upscalers.find(self.models, name).relative, "ESRGAN/2x-Tiny.safetensors")
        with self.assertRaises(errors.RunaiError) as caught:
            upscalers.find(self.models, "4x-UltraSharp", ("None",))
        self.assertEqual(caught.exception.code, errors.BAD_REQUEST)
        self.assertIn("known: None, 2x-Tiny", caught.exception.message)
        with self.assertRaises(errors.RunaiError) as caught:
            upscalers.find(self.models, "../../etc/passwd")
        self.assertEqual(caught.exception.code, errors.PATH_OUTSIDE_MODEL_DIR)

    def test_the_library_lists_them_as_upscalers_never_served(self):
        entries = {e.name: e for e in ModelLibrary(self.models).scan()}
        entry = entries["ESRGAN/2x-Tiny.safetensors"]
        self.assertEqual((entry.classification.kind, entry.classification.variant, entry.served),
                         ("upscaler", "ESRGAN", False))
        self.assertTrue(entries["v1/tiny"].served)

    def test_shared_stems_are_named_by_path(self):
        folder = Path(self.mktemp())
        for sub in ("a", "b"):
            (folder / sub).mkdir(parents=True)
            save_file(compact_state(scale=2), str(folder / sub / "x.safetensors"))
        self.assertEqual([f.name for f in upscalers.index(folder).files(refresh=True)], ["a/x", "b/x"])

    def test_a_hostile_pickle_is_neither_listed_nor_run(self):
        folder = Path(self.mktemp())
        folder.mkdir()
        marker = folder / "ran"
        torch.save({"params": esrgan_state(), "x": SystemCall(marker)}, str(folder / "evil.pth"))
        # The static walk sees the weights but runs nothing.
        self.assertEqual(upscalers.index(folder).files(refresh=True)[0].name, "evil")
        with self.assertRaises(errors.RunaiError) as caught:
            upscaler_load.load(str(folder / "evil.pth"), "evil", CPU, torch.float32)
        self.assertEqual(caught.exception.code, errors.MODEL_LOAD_FAILED)
        self.assertIn("system", caught.exception.message)
        self.assertFalse(marker.exists())


class LoadTests(SynchronousTestCase):
    def setUp(self):
        self.models = upscaler_model_dir()

    def test_safetensors_and_pickles_load_and_stay_loaded(self):
        for name, arch, scale in (("2x-Tiny", "ESRGAN", 2), ("2x-TinyPickle", "ESRGAN", 2), ("4x-Compact", "Compact", 4)):
            path = upscalers.find(self.models, name).path
            first = upscaler_load.load(path, name, CPU, torch.float32)
            self.assertEqual((first.architecture.id, first.scale), (arch, scale))
            self.assertIs(upscaler_load.load(path, name, CPU, torch.float32), first)

    def test_an_engine_unload_lets_them_go(self):
        from runai.engine.engine import Engine

        path = upscalers.find(self.models, "2x-Tiny").path
        first = upscaler_load.load(path, "2x-Tiny", CPU, torch.float32)
        Engine(device="cpu", dtype="float32", library=ModelLibrary(self.models)).unload()
        self.assertIsNot(upscaler_load.load(path, "2x-Tiny", CPU, torch.float32), first)

    def test_torch_load_only_with_weights_only(self):
        calls = []
        real = torch.load

        def spy(*args, **kwargs):
            calls.append(kwargs.get("weights_only"))
            return real(*args, **kwargs)
        self.patch(torch, "load", spy)
        self.patch(torch.jit, "load", lambda *a, **k: self.fail("torch.jit.load"))
        upscaler_load.forget()
        upscaler_load.load(upscalers.find(self.models, "4x-Compact").path, "4x-Compact", CPU, torch.float32)
        self.assertEqual(calls, [True])


class RunTests(SynchronousTestCase):
    def setUp(self):
        self.models = upscaler_model_dir()

    def upscaler(self, name):
        return upscale.Upscaler(name, model_dir=self.models, device=CPU, dtype=torch.float32)

    def test_sizes_and_determinism(self):
        image = picture(40, 32)
        for name, size in (("2x-Tiny", (80, 64)), ("4x-Compact", (160, 128)), ("Lanczos", (80, 64))):
            scaled = {"4x-Compact": (160, 128)}.get(name, (80, 64))
            out = self.upscaler(name)(image, *scaled)
            self.assertEqual((out.size, out.mode), (size, "RGB"), name)
            again = self.upscaler(name)(image, *scaled)
            self.assertEqual(out.tobytes(), again.tobytes(), name)
        # Another factor than the model's: again while smaller, then resized (A1111).
        self.assertEqual(upscale.passes(40, 32, 2, 120, 96), [(80, 64), (160, 128)])
        self.assertEqual(upscale.passes(40, 32, 4, 40, 32), [])  # as large already: only resized
        self.assertEqual(upscale.passes(40, 32, 1, 40, 32), [(40, 32)])
        self.assertEqual(self.upscaler("2x-Tiny").tiles(400, 300, 1600, 1200), 6 + 20)
        self.assertEqual(self.upscaler("2x-Tiny")(image, 120, 96).size, (120, 96))
        self.assertEqual(self.upscaler("4x-Compact")(image, 60, 48).size, (60, 48))
        # Transparency is kept beside the model's colours.
        rgba = self.upscaler("2x-Tiny")(picture(20, 16, mode="RGBA"), 40, 32)
        self.assertEqual((rgba.mode, rgba.size), ("RGBA", (40, 32)))

    def test_tiles_match_one_pass(self):
        image = picture(72, 56, seed=4)
        for name in ("4x-Compact", "2x-Tiny"):
            descriptor = self.upscaler(name).descriptor
            whole = np.asarray(upscale.run_model(descriptor, image, tile=256), dtype=np.float32)
            ticks = []
            tiled = upscale.run_model(descriptor, image, tile=32, overlap=12, on_tile=lambda: ticks.append(1))
            self.assertEqual(len(ticks), upscale.tile_count(72, 56, 32, 12))
            self.assertGreater(len(ticks), 4)
            diff = np.abs(np.asarray(tiled, dtype=np.float32) - whole)
            self.assertEqual(diff.shape, whole.shape)
            self.assertLess(diff.mean(), 2.0, name)  # of 255
            self.assertLess(np.percentile(diff, 99), 24.0, name)

    def test_cancel_between_tiles(self):
        seen = []
        with self.assertRaises(errors.JobCancelled):
            upscale.run_model(self.upscaler("4x-Compact").descriptor, picture(72, 56), tile=32, overlap=8,
                              on_tile=lambda: seen.append(1), is_cancelled=lambda: len(seen) >= 2)
        self.assertEqual(len(seen), 2)

    def test_a_request_in_the_worker(self):
        fields = DictFields({"image": b64png(picture(40, 32)), "upscaler": "4x-Compact", "width": 100,
                             "height": 100, "crop": True, "pos_x": 5})
        request = upscale_request(fields, Path(self.models), Limits())
        progress, images = [], []
        count = upscale.run_request(request, CPU, torch.float32, self.models, lambda s, t: progress.append((s, t)),
                                    images.append, lambda: False)
        [image] = images
        self.assertEqual((count, image.width, image.height, request.pos_x), (1, 100, 100, 5))
        self.assertEqual(Image.open(io.BytesIO(image.png)).size, (100, 100))
        self.assertEqual(progress, [(1, 1)])
        with self.assertRaises(errors.JobCancelled):
            upscale.run_request(request, CPU, torch.float32, self.models, lambda s, t: None, images.append,
                                lambda: True)


class RequestTests(SynchronousTestCase):
    def setUp(self):
        self.models = Path(upscaler_model_dir())

    def request(self, limits=Limits(), **values):
        values.setdefault("image", b64png(picture(40, 32)))
        return upscale_request(DictFields(values), self.models, limits)

    def test_targets(self):
        self.assertEqual(self.request(upscaler="2x-Tiny").target(40, 32), (80, 64, None))
        self.assertEqual(self.request(scale=3).target(40, 32), (120, 96, None))
        self.assertEqual(self.request(width=100).target(40, 32), (100, 80, None))
        self.assertEqual(self.request(width=100, height=100).target(40, 32), (100, 100, None))
        self.assertEqual(self.request(width=100, height=100, crop=True).target(40, 32), (125, 100, (12, 0, 112, 100)))
        request = self.request(upscaler="ESRGAN/2x-TinyPickle.pth")
        self.assertEqual(Path(request.upscaler_path).name, "2x-TinyPickle.pth")
        self.assertIsNone(self.request(upscaler="Nearest").upscaler_path)

    def test_refused_before_queueing(self):
        small = Limits(max_size=256, max_batch_pixels=128 * 128)
        cases = [(dict(upscaler="4x-Nothing"), Limits(), errors.BAD_REQUEST, "4x-Nothing"),
                 (dict(upscaler="Latent"), Limits(), errors.BAD_REQUEST, "Latent"),
                 (dict(scale=9), Limits(), errors.OUT_OF_RANGE, "scale"),
                 (dict(scale=8), small, errors.OUT_OF_RANGE, "320x256"),
                 (dict(image=b64png(picture(300, 20))), small, errors.OUT_OF_RANGE, "300x20"),
                 (dict(image="not base64!"), Limits(), errors.BAD_REQUEST, "base64"),
                 (dict(image=None), Limits(), errors.BAD_REQUEST, "missing"),
                 (dict(width=-1), Limits(), errors.OUT_OF_RANGE, "width")]
        for values, limits, code, named in cases:
            with self.assertRaises(errors.RunaiError) as caught:
                self.request(limits, **values)
            self.assertEqual(caught.exception.code, code, values)
            self.assertIn(named, caught.exception.message, values)


    def test_its_pictures_count_against_the_queued_bytes(self):
        from runai.core.service import _input_bytes

        request = upscale_request(DictFields({}), self.models, Limits(),
                                  images=[check_image(b64png(picture(40, 32, seed=k)), "image") for k in range(3)])
        self.assertEqual(_input_bytes(request), sum(len(image.data) for image in request.images))
        self.assertGreater(_input_bytes(request), 3 * 40 * 32)

    def test_travels_through_the_broker_by_name(self):
        from runai.broker import wire

        request = upscale_request(DictFields({"image": b64png(picture(40, 32)), "upscaler": "4x-Compact", "width": 64,
                                              "crop": True, "pos_y": 2}), self.models, Limits())
        fields = wire.encode_job(request, "k", "front")
        self.assertNotIn(str(self.models), str(fields))  # no path of the front's machine
        raw = {k.encode(): v if isinstance(v, bytes) else str(v).encode() for k, v in fields.items()}
        again = wire.decode_job(raw).request(self.models)
        self.assertEqual(again, dataclasses.replace(request, id="k"))
        broken = dict(raw, request=raw[b"request"].replace(b'"images": 1', b'"images": 2'))
        with self.assertRaises(wire.WireError):
            wire.decode_job(broken).request(self.models)
        elsewhere = Path(self.mktemp())
        elsewhere.mkdir()
        with self.assertRaises(errors.RunaiError) as caught:  # a worker without that upscaler
            wire.decode_job(raw).request(elsewhere)
        self.assertEqual(caught.exception.code, errors.BAD_REQUEST)


class HiresTests(SynchronousTestCase):
    def test_a_model_upscaler_between_the_passes(self):
        from runai.test.test_hires import hires_request, run

        models = upscaler_model_dir()
        req = hires_request(models, hr_upscaler="2x-Tiny", hr_scale=2, txt2img_width=64, txt2img_height=64)
        self.assertEqual(req.hires.upscaler, "2x-Tiny")
        progress, [image] = run(models, req)
        self.assertEqual((image.width, image.height), (128, 128))
        self.assertEqual(progress[-1][0], progress[-1][1])
        self.assertEqual(image.png, run(models, req)[1][0].png)
        lanczos = hires_request(models, hr_upscaler="Lanczos", hr_scale=2, txt2img_width=64, txt2img_height=64)
        self.assertNotEqual(image.png, run(models, lanczos)[1][0].png)
        with self.assertRaises(errors.RunaiError) as caught:
            hires_request(models, hr_upscaler="4x-Nothing")
        self.assertEqual(caught.exception.code, errors.BAD_REQUEST)
        self.assertIn("hr_upscaler", caught.exception.message)
        # A cancel stops the job.
        with self.assertRaises(errors.JobCancelled):
            run(models, req, cancel_at=3)

