"""runai.models.cache: the ModelLoader, through the Engine: what it refuses to load, and the
cache of loaded models."""

import gc
import os
import shutil
import weakref
from pathlib import Path

import torch
from twisted.trial.unittest import SynchronousTestCase

from runai.core import errors
from runai.core.requests import GenerationRequest
from runai.engine.engine import Engine
from runai.models import cache
from runai.models import library
from runai.test import library_fixtures as fx
from runai.test.test_checkpoint import Marker


def request(models, name, **overrides):
    fields = dict(action="txt2img", model_path=str(models / name), model_name=name, prompt="a lighthouse",
                  steps=2, width=64, height=64, seed=7, scheduler="euler")
    fields.update(overrides)
    return GenerationRequest(**fields)


def generate(engine, req):
    images = []
    engine.generate(req, lambda step, total: None, images.append, lambda: False)
    return images


class LoaderTestCase(SynchronousTestCase):
    def setUp(self):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        self.addCleanup(torch.set_num_threads, threads)
        self.models = fx.model_folder()

    def engine(self, models=None, **options):
        return Engine(device="cpu", dtype="float32", library=library.ModelLibrary(models or self.models),
                      **options)

    def assertLoadFails(self, engine, name, *words, models=None):
        with self.assertRaises(errors.RunaiError) as caught:
            engine.load(str((models or self.models) / name), name)
        self.assertEqual(caught.exception.code, errors.MODEL_LOAD_FAILED)
        for word in words:
            self.assertIn(word, caught.exception.message)
        # Never the server's own paths.
        self.assertNotIn(str(models or self.models), caught.exception.message)
        return caught.exception


class RefusalTests(LoaderTestCase):
    def test_malicious_ckpt_is_refused_and_does_not_run(self):
        models = Path(self.mktemp()).absolute()
        shutil.copytree(self.models / "runwayml", models / "runwayml")
        (models / "v1").mkdir()
        marker = models.parent / "marker-loader"
        state = dict(fx.ldm_state("v1"))
        torch.save({"state_dict": state, "x": Marker(marker)}, str(models / "v1" / "evil.ckpt"))
        engine = self.engine(models)
        self.assertLoadFails(engine, "v1/evil.ckpt", "refused to unpickle", models=models)
        self.assertFalse(marker.exists())
        # Listing it walks the pickle statically: that runs nothing either.
        [entry] = [e for e in library.ModelLibrary(models).scan() if e.name == "v1/evil.ckpt"]
        self.assertEqual(entry.version, "v1")
        self.assertFalse(marker.exists())

    def test_link_outside_inside_a_diffusers_folder(self):
        models = Path(self.mktemp()).absolute()
        shutil.copytree(fx.tiny_source("v1"), models / "v1" / "m")
        weights = models / "v1" / "m" / "unet" / "diffusion_pytorch_model.safetensors"
        outside = models.parent / "elsewhere.safetensors"
        shutil.move(weights, outside)
        os.symlink(outside, weights)
        self.assertLoadFails(self.engine(models), "v1/m", "outside the model folder", models=models)

    def test_a_file_swapped_for_a_link_outside_after_the_request(self):
        # The request was checked when it was parsed; the worker checks again before it
        # opens the file.
        models = Path(self.mktemp()).absolute()
        shutil.copytree(self.models / "runwayml", models / "runwayml")
        (models / "v1").mkdir()
        outside = models.parent / "swapped.safetensors"
        shutil.copy(self.models / "v1" / "both.safetensors", outside)
        os.symlink(outside, models / "v1" / "m.safetensors")
        self.assertLoadFails(self.engine(models), "v1/m.safetensors", "outside the model folder", models=models)

    def test_a_folder_swapped_for_a_link_outside_after_the_request(self):
        models = Path(self.mktemp()).absolute()
        (models / "v1").mkdir(parents=True)
        outside = models.parent / "swapped"
        outside.mkdir()
        os.symlink(outside, models / "v1" / "m")
        self.assertLoadFails(self.engine(models), "v1/m", "outside the model folder", models=models)

    def test_sdxl_and_non_models(self):
        engine = self.engine()
        self.assertLoadFails(engine, "sdxl/base.safetensors", "sdxl")
        self.assertLoadFails(engine, "v1/vae.safetensors", "not a Stable Diffusion model")

    def test_an_sdxl_refiner_file_is_refused_before_it_is_read(self):
        # Header only: the refusal comes from what the file is, not from a failed load.
        models = Path(self.mktemp()).absolute()
        refiner = {k.replace("conditioner.embedders.1.", "conditioner.embedders.0."): v
                   for k, v in fx.SDXL_BASE.items() if not k.startswith("conditioner.embedders.0.")}
        fx.write_header_only(models / "sdxl" / "refiner.safetensors", refiner)
        self.assertLoadFails(self.engine(models), "sdxl/refiner.safetensors", "refiner", "second stage",
                             models=models)

    def test_truncated_checkpoint(self):
        models = Path(self.mktemp()).absolute()
        shutil.copytree(self.models / "runwayml", models / "runwayml")
        (models / "v1").mkdir()
        data = (self.models / "v1" / "both.safetensors").read_bytes()
        (models / "v1" / "cut.safetensors").write_bytes(data[: len(data) // 2])
        self.assertLoadFails(self.engine(models), "v1/cut.safetensors", "truncated", models=models)

    def test_incomplete_checkpoint(self):
        from safetensors.torch import save_file

        models = Path(self.mktemp()).absolute()
        shutil.copytree(self.models / "runwayml", models / "runwayml")
        (models / "v1").mkdir()
        state = {k: v for k, v in fx.ldm_state("v1").items() if "output_blocks.1." not in k}
        save_file(state, str(models / "v1" / "part.safetensors"))
        self.assertLoadFails(self.engine(models), "v1/part.safetensors", "lacks", "UNet", models=models)


class CacheTests(LoaderTestCase):
    names = ("v1/both", "v1/both.safetensors", "v2/tiny.safetensors")

    def load(self, engine, name):
        return engine.load(str(self.models / name), name)

    def test_switching_back_costs_no_load(self):
        engine = self.engine(cache_models=2)
        a = self.load(engine, self.names[0])
        b = self.load(engine, self.names[1])
        self.assertIsNot(a, b)
        self.assertIs(self.load(engine, self.names[0]), a)
        self.assertIs(self.load(engine, self.names[1]), b)
        self.assertEqual(engine.load_count, 2)
        self.assertEqual(engine.model_path, str(self.models / self.names[1]))

    def test_least_recently_used_goes_first(self):
        engine = self.engine(cache_models=2)
        a, b, c = (str(self.models / n) for n in self.names)
        self.load(engine, self.names[0])
        self.load(engine, self.names[1])
        self.load(engine, self.names[0])  # now b is the oldest
        self.load(engine, self.names[2])
        self.assertEqual(set(engine.loader.loaded_paths), {a, c})
        self.assertEqual(engine.load_count, 3)

    def test_memory_bound(self):
        engine = self.engine()
        one = cache.pipeline_bytes(self.load(engine, self.names[0]))
        # Room for two of the tiny models, not three.
        engine = self.engine(cache_models=32, cache_bytes=int(one * 2.5))
        for name in self.names:
            self.load(engine, name)
        self.assertEqual(len(engine.loader.loaded_paths), 2)
        self.assertLessEqual(engine.loader.used_bytes, int(one * 2.5))
        self.assertNotIn(str(self.models / self.names[0]), engine.loader.loaded_paths)

    def test_unloading_frees_the_model(self):
        from diffusers import StableDiffusionImg2ImgPipeline

        engine = self.engine(cache_models=2)
        pipe = self.load(engine, self.names[1])
        engine._modes.get(pipe, StableDiffusionImg2ImgPipeline)  # derived pipelines must not keep it
        unet = weakref.ref(pipe.unet)
        del pipe
        self.load(engine, self.names[0])
        engine.loader.unload(str(self.models / self.names[1]))
        gc.collect()
        self.assertIsNone(unet(), "the unloaded model's weights are still referenced")
        engine.unload()
        self.assertEqual((engine.pipe, engine.loader.loaded_paths), (None, ()))

    def test_a_changed_file_is_loaded_again(self):
        models = Path(self.mktemp()).absolute()
        shutil.copytree(self.models / "runwayml", models / "runwayml")
        shutil.copytree(self.models / "stabilityai", models / "stabilityai")
        (models / "v1").mkdir()
        target = models / "v1" / "m.safetensors"
        shutil.copy(self.models / "v1" / "both.safetensors", target)
        engine = self.engine(models, cache_models=2)
        first = engine.load(str(target))
        os.unlink(target)
        shutil.copy(self.models / "v2" / "tiny.safetensors", target)
        second = engine.load(str(target))
        self.assertIsNot(first, second)
        self.assertEqual(engine.load_count, 2)
        self.assertEqual(second.unet.config.use_linear_projection, True)

    def test_modes_share_the_cached_weights(self):
        from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline

        engine = self.engine(cache_models=2)
        base = self.load(engine, "v1/both.safetensors")
        for cls in (StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline):
            derived = engine._modes.get(base, cls)
            for component in ("unet", "vae", "text_encoder"):
                self.assertIs(getattr(derived, component), getattr(base, component))
        self.assertEqual(engine.load_count, 1)

    def test_out_of_memory_drops_the_others_and_retries(self):
        engine = self.engine(cache_models=3)
        self.load(engine, self.names[0])
        real = engine.loader._load_file
        failures = []

        def flaky(path, name, *args, **kwargs):
            if not failures:
                failures.append(name)
                raise torch.OutOfMemoryError("simulated")
            return real(path, name, *args, **kwargs)

        self.patch(engine.loader, "_load_file", flaky)
        self.load(engine, self.names[1])
        self.assertEqual(failures, [self.names[1]])
        self.assertEqual(engine.loader.loaded_paths, (str(self.models / self.names[1]),))

    def test_failed_load_leaves_the_others(self):
        engine = self.engine(cache_models=2)
        self.load(engine, self.names[0])
        self.assertLoadFails(engine, "sdxl/base.safetensors", "sdxl")
        self.assertIsNone(engine.pipe)
        self.assertEqual(engine.loader.loaded_paths, (str(self.models / self.names[0]),))


# Parameters of SDXL 1.0 base's components (stabilityai/stable-diffusion-xl-base-1.0).
SDXL_PARAMETERS = {"unet": 2_567_463_684, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840,
                   "vae": 83_653_863}
GiB = 2**30


class SdxlSizeTests(LoaderTestCase):
    def test_the_estimate_counts_both_text_encoders(self):
        from runai.test.test_engine_xl import xl_models

        path = str(xl_models() / "sdxl" / "base")
        engine = Engine(device="cpu", dtype="float32")
        loaded = cache.pipeline_bytes(engine.load(path))
        second_encoder = sum(p.numel() * p.element_size() for p in engine.pipe.text_encoder_2.parameters())
        # The same up to buffers that are not weights (the encoders' position ids).
        self.assertLess(abs(cache.estimate_bytes(path, torch.float32) - loaded), second_encoder / 100)

    def test_a_real_sized_sdxl_folder(self):
        # Header-only files as big on paper as SDXL 1.0's, with the hub's float16 variants
        # and .bin twins beside them, which from_pretrained does not load.
        folder = Path(self.mktemp()).absolute() / "sdxl-base"
        for sub, count in SDXL_PARAMETERS.items():
            name = "model" if sub.startswith("text_encoder") else "diffusion_pytorch_model"
            fx.write_header_only(folder / sub / f"{name}.safetensors", {"w": (count,)}, dtype="F32")
            fx.write_header_only(folder / sub / f"{name}.fp16.safetensors", {"w": (count,)}, dtype="F16")
            fx.write_header_only(folder / sub / f"{name}.bin", {"w": (count,)}, dtype="F32")
        estimate = cache.estimate_bytes(str(folder), torch.float16)
        self.assertEqual(estimate, 2 * sum(SDXL_PARAMETERS.values()))
        self.assertAlmostEqual(estimate / 1e9, 6.94, places=2)
        # --cache-size 8GiB keeps one SDXL model in float16, never two.
        self.assertLess(estimate, 8 * GiB)
        self.assertGreater(2 * estimate, 8 * GiB)

    def test_a_byte_bound_keeps_one_sdxl_model(self):
        from runai.test.test_engine_xl import xl_models

        names = ("sdxl/base", "sdxl/fp16fix")
        one = cache.estimate_bytes(str(xl_models() / names[0]), torch.float32)
        engine = Engine(device="cpu", dtype="float32", cache_models=8, cache_bytes=int(one * 1.5))
        for name in names:
            engine.load(str(xl_models() / name), name)
            self.assertEqual(engine.loader.loaded_paths, (str(xl_models() / name),))
        engine = Engine(device="cpu", dtype="float32", cache_models=8, cache_bytes=int(one * 2.5))
        for name in names:
            engine.load(str(xl_models() / name), name)
        self.assertEqual(len(engine.loader.loaded_paths), 2)


class AlignWeightsTests(SynchronousTestCase):
    """Weights read straight from a safetensors mapping start wherever the file put them;
    on the CPU they get memory of their own, 64-byte aligned, so a folder computes what
    the same weights from a single file compute."""

    def test_misaligned_weights_are_copied_and_aligned_ones_kept(self):
        class Pipe:
            pass

        storage = torch.arange(40, dtype=torch.float32)
        layer = torch.nn.Linear(4, 4)
        layer.weight.data = storage[3:19].view(4, 4)  # 12 bytes into its storage
        layer.bias.data = storage[16:20]  # 64 bytes in: aligned if the storage is
        pipe = Pipe()
        pipe.components = {"unet": layer, "tokenizer": object(), "nothing": None}
        bias = layer.bias.data_ptr()
        expected = layer(torch.ones(1, 4))
        self.assertTrue(layer.weight.data_ptr() % cache.WEIGHT_ALIGNMENT)
        cache.align_weights(pipe)
        self.assertEqual(layer.weight.data_ptr() % cache.WEIGHT_ALIGNMENT, 0)
        self.assertEqual(layer.bias.data_ptr() == bias, bias % cache.WEIGHT_ALIGNMENT == 0)
        self.assertTrue(torch.equal(layer(torch.ones(1, 4)), expected))
        self.assertTrue(torch.equal(layer.weight, torch.arange(3, 19, dtype=torch.float32).view(4, 4)))
