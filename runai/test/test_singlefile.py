"""runai.models.singlefile: every model in the folder, single files included, loads offline
and generates; the architecture and tokenizer come from the model folder or runai's own
configs (runai.models.sdconfigs), never from the Hub (runai.models.offline)."""

import io
import json
import os
import shutil
from pathlib import Path

import torch
from PIL import Image
from twisted.trial.unittest import SynchronousTestCase

from runai.engine import modes
from runai.engine.engine import Engine
from runai.models import library
from runai.models import singlefile
from runai.models.errors import LoadError
from runai.test import library_fixtures as fx
from runai.test.test_cache import LoaderTestCase, generate, request
from runai.test.tiny import write_tokenizer


class EveryModelTests(LoaderTestCase):
    def test_each_served_entry_generates(self):
        # The shared folder's SDXL file is a header without weights (for the library's
        # tests); tiny SDXL single files generate in test_singlefile_xl.
        engine = self.engine()
        served = [e for e in library.ModelLibrary(self.models).scan()
                  if e.served and e.classification.version != "sdxl"]
        self.assertEqual(len(served), sum(1 for v in fx.EXPECTED.values() if v[4] and v[0] != "sdxl"))
        for entry in served:
            [image] = generate(engine, request(self.models, entry.name))
            self.assertEqual(Image.open(io.BytesIO(image.png)).size, (64, 64), entry.name)

    def test_three_formats_one_model_same_image(self):
        engine = self.engine()
        pngs = {name: generate(engine, request(self.models, name))[0].png
                for name in ("v1/both", "v1/both.safetensors", "v1/both.ckpt")}
        self.assertEqual(len(set(pngs.values())), 1, "the formats load different weights")

    def test_single_file_matches_its_source_weights(self):
        engine = self.engine()
        reference = Engine(device="cpu", dtype="float32").load(str(fx.tiny_source("v2")))
        pipe = engine.load(str(self.models / "v2" / "tiny.safetensors"))
        for component in ("unet", "vae", "text_encoder"):
            mine, theirs = getattr(pipe, component).state_dict(), getattr(reference, component).state_dict()
            self.assertEqual(set(mine), set(theirs), component)
            for key in theirs:
                self.assertTrue(torch.equal(mine[key], theirs[key]), f"{component} {key}")

    def test_configs_follow_the_content(self):
        engine = self.engine()
        inpaint = engine.load(str(self.models / "v1" / "inpaint.safetensors"))
        self.assertEqual(inpaint.unet.config.in_channels, 9)
        self.assertTrue(modes.is_inpainting_model(inpaint))
        vpred = engine.load(str(self.models / "v2" / "vpred.safetensors"))
        self.assertEqual(vpred.scheduler.config.prediction_type, "v_prediction")
        self.assertTrue(vpred.unet.config.upcast_attention)
        eps = engine.load(str(self.models / "v2" / "tiny.safetensors"))
        self.assertEqual(eps.scheduler.config.prediction_type, "epsilon")

    def test_engine_dtype_applies_to_single_files(self):
        engine = Engine(device="cpu", dtype="bfloat16", library=library.ModelLibrary(self.models))
        pipe = engine.load(str(self.models / "v1" / "both.ckpt"))
        for module in (pipe.unet, pipe.vae, pipe.text_encoder):
            self.assertEqual(module.dtype, torch.bfloat16)


class OfflineTests(LoaderTestCase):
    def test_nothing_is_fetched_and_from_single_file_is_never_called(self):
        from diffusers import StableDiffusionPipeline

        calls = fx.forbid_hub(self, StableDiffusionPipeline)
        engine = self.engine()
        for name in ("v1/both.safetensors", "v1/old.ckpt", "v2/vpred.safetensors"):
            engine.load(str(self.models / name), name)
        self.assertEqual(calls, [])

    def test_missing_tokenizer_names_the_files(self):
        models = Path(self.mktemp()).absolute()
        (models / "v1").mkdir(parents=True)
        shutil.copy(self.models / "v1" / "both.safetensors", models / "v1" / "m.safetensors")
        error = self.assertLoadFails(self.engine(models), "v1/m.safetensors", "openai/clip-vit-large-patch14/",
                                     "vocab.json", "merges.txt", "runwayml/stable-diffusion-v1-5/", models=models)
        self.assertIn("inside the model folder", error.message)

    def test_shipped_configs_are_used_without_a_base_model(self):
        # A tokenizer but no base model: runai's SD 1.5 configs. They are SD-sized, the tiny
        # checkpoint is not: the error says so, which proves which configs were used.
        models = Path(self.mktemp()).absolute()
        (models / "v1").mkdir(parents=True)
        write_tokenizer(models / "openai" / "clip-vit-large-patch14")
        shutil.copy(self.models / "v1" / "both.safetensors", models / "v1" / "m.safetensors")
        self.assertLoadFails(self.engine(models), "v1/m.safetensors",
                             "runai's built-in configs of runwayml/stable-diffusion-v1-5", "686 UNet weights",
                             models=models)

    def test_base_model_configs_with_a_separate_tokenizer(self):
        models = Path(self.mktemp()).absolute()
        base = models / "runwayml" / "stable-diffusion-v1-5"
        shutil.copytree(fx.tiny_source("v1"), base, ignore=shutil.ignore_patterns("*.safetensors"))
        shutil.rmtree(base / "tokenizer")
        shutil.copytree(fx.tiny_source("v1") / "tokenizer", models / "openai" / "clip-vit-large-patch14")
        (models / "v1").mkdir()
        shutil.copy(self.models / "v1" / "both.safetensors", models / "v1" / "m.safetensors")
        [image] = generate(self.engine(models), request(models, "v1/m.safetensors"))
        self.assertTrue(image.png.startswith(b"\x89PNG"))

    def base_without_tokenizer(self, kind, base):
        """A model folder with the configs of ``base`` (no tokenizer/) and a single file of
        ``kind`` in ``<kind>/m.safetensors``; returns the folder."""
        models = Path(self.mktemp()).absolute()
        shutil.copytree(fx.tiny_source(kind), models / base, ignore=shutil.ignore_patterns("*.safetensors"))
        shutil.rmtree(models / base / "tokenizer")
        (models / kind).mkdir()
        source = {"v1": "v1/both.safetensors", "v2": "v2/tiny.safetensors"}[kind]
        shutil.copy(self.models / source, models / kind / "m.safetensors")
        return models

    def test_vocab_and_merges_alone_make_a_tokenizer(self):
        # What docs/models.md and the error ask for: no tokenizer_config.json, so no
        # model_max_length; CLIP's 77 it is, or every prompt fails to encode.
        models = self.base_without_tokenizer("v1", "runwayml/stable-diffusion-v1-5")
        clip = models / "openai" / "clip-vit-large-patch14"
        write_tokenizer(clip)
        (clip / "tokenizer_config.json").unlink()
        self.assertEqual(sorted(os.listdir(clip)), ["merges.txt", "vocab.json"])
        engine = self.engine(models)
        [image] = generate(engine, request(models, "v1/m.safetensors"))
        self.assertTrue(image.png.startswith(b"\x89PNG"))
        self.assertEqual(engine.load(str(models / "v1" / "m.safetensors")).tokenizer.model_max_length, 77)

    def test_tokenizer_json_alone_is_a_tokenizer_for_every_family(self):
        for kind, base in (("v1", "runwayml/stable-diffusion-v1-5"), ("v2", "stabilityai/stable-diffusion-2-1-base")):
            models = self.base_without_tokenizer(kind, base)
            (models / base / "tokenizer").mkdir()
            shutil.copy(fx.tiny_source(kind) / "tokenizer" / "tokenizer.json", models / base / "tokenizer")
            engine = self.engine(models)
            [image] = generate(engine, request(models, f"{kind}/m.safetensors"))
            self.assertTrue(image.png.startswith(b"\x89PNG"), kind)
            pipe = engine.load(str(models / kind / "m.safetensors"))
            self.assertEqual(pipe.tokenizer.model_max_length, 77, kind)
            self.assertEqual(pipe.tokenizer("a lighthouse").input_ids[-1], pipe.tokenizer.eos_token_id, kind)


class BaseConfigTests(SynchronousTestCase):
    def test_candidates(self):
        self.assertEqual(singlefile.base_candidates("v1", False, False)[0], "runwayml/stable-diffusion-v1-5")
        self.assertEqual(singlefile.base_candidates("v1", True, False)[0], "runwayml/stable-diffusion-inpainting")
        self.assertEqual(singlefile.base_candidates("v2", False, False)[0], "stabilityai/stable-diffusion-2-1-base")
        self.assertEqual(singlefile.base_candidates("v2", False, True)[0], "stabilityai/stable-diffusion-2-1")

    def test_a_base_folder_link_outside_is_not_used(self):
        models = Path(self.mktemp()).absolute()
        elsewhere = models.parent / "elsewhere-base"
        shutil.copytree(fx.tiny_source("v1"), elsewhere)
        (models / "runwayml").mkdir(parents=True)
        os.symlink(elsewhere, models / "runwayml" / "stable-diffusion-v1-5")
        with self.assertRaises(LoadError) as caught:
            singlefile.find_base_configs(models, "v1")
        self.assertIn("vocab.json", caught.exception.message)

    def test_shipped_configs_build_sd_sized_models(self):
        from diffusers import UNet2DConditionModel

        from runai.models import sdconfigs

        for configs, width in ((sdconfigs.SD15, 768), (sdconfigs.SD21_BASE, 1024), (sdconfigs.SD21, 1024)):
            with torch.device("meta"):
                unet = UNet2DConditionModel.from_config(configs["unet"])
            self.assertEqual(unet.config.cross_attention_dim, width)
            self.assertEqual(sum(p.numel() for p in unet.parameters()) // 10**6, 859 if width == 768 else 865)
            json.dumps(configs)  # plain data, as a config.json would be
