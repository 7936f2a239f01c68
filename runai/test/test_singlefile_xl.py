"""runai.models.singlefile_xl (through runai.models.singlefile): SDXL .safetensors and .ckpt
files load offline into the same weights as their diffusers folder and generate; the
configs and both tokenizers come from a copy of SDXL base in the model folder, or from the
configs runai ships (runai.models.sdconfigs) with the CLIP models' tokenizers, never from
the Hub; what is missing is named."""

import io
import os
import shutil
from pathlib import Path

import torch
import webuiapi
from PIL import Image
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase, TestCase

from runai.doors.http.api import Api
from runai.doors.http.site import make_site
from runai.engine.engine import Engine
from runai.models import library, sdconfigs, singlefile, singlefile_xl
from runai.models.errors import LoadError
from runai.test import xl_fixtures as xfx
from runai.test.library_fixtures import assertSameWeights, forbid_hub
from runai.test.test_cache import generate, request
from runai.test.test_e2e import LiveServer, legacy_request, png_of
from runai.test.test_http import HttpTestCase, pixels

XL_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
BASE = sdconfigs.SDXL_BASE_NAME


def image(pipe, seed, **kwargs):
    """The pixels of a 64x64 image, 2 steps, as bytes."""
    out = pipe("a lighthouse at dusk", num_inference_steps=2, width=64, height=64, output_type="np",
               generator=torch.Generator().manual_seed(seed), **kwargs).images
    return out.tobytes()


class XLTestCase(SynchronousTestCase):
    def setUp(self):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        self.addCleanup(torch.set_num_threads, threads)
        self.models = xfx.xl_model_folder()

    def load(self, name, models=None, **kwargs):
        models = models or self.models
        entry = library.ModelLibrary(models).describe(models / name, name)
        return singlefile.pipeline_from_single_file(models / name, models, entry, **kwargs)

    def copy_file(self, models, name="sdxl/base.safetensors"):
        (models / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(self.models / name, models / name)

    def assertLoadFails(self, name, *words, models=None):
        with self.assertRaises(LoadError) as caught:
            self.load(name, models)
        for word in words:
            self.assertIn(word, caught.exception.message)
        self.assertNotIn(str(models or self.models), caught.exception.message)
        return caught.exception.message


class LoadTests(XLTestCase):
    def test_both_formats_load_the_folders_weights(self):
        from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

        reference = xfx.xl_reference("base")
        for name in ("sdxl/base.safetensors", "sdxl/base.ckpt"):
            pipe = self.load(name)
            self.assertIs(type(pipe), StableDiffusionXLPipeline, name)
            assertSameWeights(self, pipe, reference, XL_COMPONENTS)
            self.assertIsInstance(pipe.scheduler, EulerDiscreteScheduler)
            self.assertEqual(dict(pipe.scheduler.config), dict(reference.scheduler.config))
            for tokenizer in ("tokenizer", "tokenizer_2"):
                mine, theirs = getattr(pipe, tokenizer), getattr(reference, tokenizer)
                self.assertEqual((mine.get_vocab(), mine.pad_token, mine.model_max_length),
                                 (theirs.get_vocab(), theirs.pad_token, theirs.model_max_length), tokenizer)
            self.assertTrue(pipe.config.force_zeros_for_empty_prompt)

    def test_generates_as_the_folder_does_deterministically(self):
        pipe = self.load("sdxl/base.safetensors")
        first = image(pipe, 1)
        self.assertEqual(len(first), 64 * 64 * 3 * 4)
        self.assertEqual(image(pipe, 1), first)
        self.assertNotEqual(image(pipe, 2), first)
        self.assertEqual(image(self.load("sdxl/base.ckpt"), 1), first)
        self.assertEqual(image(xfx.xl_reference("base"), 1), first)

    def test_inpainting(self):
        from diffusers import StableDiffusionXLInpaintPipeline

        pipe = self.load("sdxl/inpaint.safetensors")
        self.assertIs(type(pipe), StableDiffusionXLInpaintPipeline)
        self.assertEqual(pipe.unet.config.in_channels, 9)
        assertSameWeights(self, pipe, xfx.xl_reference("inpaint"), XL_COMPONENTS)
        picture = Image.new("RGB", (64, 64), (200, 120, 40))
        mask = Image.new("L", (64, 64), 0)
        mask.paste(255, (16, 16, 48, 48))
        first = image(pipe, 3, image=picture, mask_image=mask, strength=1.0)
        self.assertEqual(image(pipe, 3, image=picture, mask_image=mask, strength=1.0), first)

    def test_precision(self):
        pipe = self.load("sdxl/base.ckpt", dtype=torch.bfloat16)
        for module in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
            self.assertEqual(module.dtype, torch.bfloat16)
        # None keeps the file's own precision (for conversion).
        self.assertEqual(self.load("sdxl/base.safetensors").unet.dtype, torch.float32)

    def test_the_refiner_is_refused(self):
        message = self.assertLoadFails("sdxl/refiner.safetensors", "refiner")
        # Also when the library does not call it a refiner: the weights say so.
        models = Path(self.mktemp()).absolute()
        shutil.copytree(self.models, models)
        entry = library.ModelLibrary(models).describe(models / "sdxl" / "refiner.safetensors")
        from dataclasses import replace

        entry = replace(entry, classification=replace(entry.classification, kind="pipeline"))
        with self.assertRaises(LoadError) as caught:
            singlefile.pipeline_from_single_file(models / "sdxl" / "refiner.safetensors", models, entry)
        self.assertEqual(caught.exception.message, message)

    def test_classified_by_content(self):
        # runai.models.classify is the library's; these are its answers for SDXL single files.
        described = {e.name: e.classification for e in library.ModelLibrary(self.models).scan()}
        expected = {"sdxl/base.safetensors": ("pipeline", False, 4), "sdxl/base.ckpt": ("pipeline", False, 4),
                    "sdxl/inpaint.safetensors": ("pipeline", True, 9), "sdxl/refiner.safetensors": ("refiner", False, 4)}
        for name, (kind, inpainting, channels) in expected.items():
            c = described[name]
            self.assertEqual((c.kind, c.version, c.inpainting, c.in_channels), (kind, "sdxl", inpainting, channels),
                             name)

    def test_nothing_is_fetched(self):
        from diffusers import StableDiffusionXLPipeline

        calls = forbid_hub(self, StableDiffusionXLPipeline)
        for name in ("sdxl/base.safetensors", "sdxl/base.ckpt", "sdxl/inpaint.safetensors"):
            self.load(name)
        self.assertEqual(calls, [])


class BaseConfigTests(XLTestCase):
    def folder(self, tokenizers=True):
        models = xfx.base_configs_only(Path(self.mktemp()).absolute(), tokenizers)
        self.copy_file(models)
        return models

    def test_tokenizers_from_the_clip_folders(self):
        models = self.folder()
        base = singlefile_xl.find_xl_base_configs(models)
        self.assertEqual((base.source, base.tokenizer_source, base.tokenizer_2_source),
                         (f"the configs of {BASE} in the model folder", xfx.CLIP_L_FOLDER, xfx.BIG_G_FOLDER))
        pipe = self.load("sdxl/base.safetensors", models)
        assertSameWeights(self, pipe, xfx.xl_reference("base"), XL_COMPONENTS)
        # SDXL's second tokenizer pads with "!"; the first with its end token.
        self.assertEqual((pipe.tokenizer_2.pad_token, pipe.tokenizer.pad_token), ("!", "<|endoftext|>"))
        self.assertEqual(len(image(pipe, 1)), 64 * 64 * 3 * 4)

    def test_tokenizer_json_alone_is_a_tokenizer(self):
        for where in ("clip folders", "base folder"):
            models = self.folder()
            folders = [models / xfx.CLIP_L_FOLDER, models / xfx.BIG_G_FOLDER]
            if where == "base folder":
                for folder, name in zip(folders, ("tokenizer", "tokenizer_2")):
                    shutil.move(folder, models / BASE / name)
                folders = [models / BASE / "tokenizer", models / BASE / "tokenizer_2"]
            for folder in folders:
                for name in os.listdir(folder):
                    if name != "tokenizer.json":
                        (folder / name).unlink()
            pipe = self.load("sdxl/base.safetensors", models)
            for tokenizer in (pipe.tokenizer, pipe.tokenizer_2):
                self.assertEqual(tokenizer.model_max_length, 77, where)
                self.assertEqual(tokenizer("a lighthouse").input_ids[-1], tokenizer.eos_token_id, where)
            self.assertEqual(len(image(pipe, 1)), 64 * 64 * 3 * 4)

    def test_vocab_and_merges_alone_make_a_tokenizer(self):
        models = self.folder()
        for folder in (models / xfx.CLIP_L_FOLDER, models / xfx.BIG_G_FOLDER):
            for name in os.listdir(folder):
                if name not in ("vocab.json", "merges.txt"):
                    (folder / name).unlink()
        pipe = self.load("sdxl/base.safetensors", models)
        self.assertEqual((pipe.tokenizer.model_max_length, pipe.tokenizer_2.model_max_length), (77, 77))
        self.assertEqual(len(image(pipe, 1)), 64 * 64 * 3 * 4)

    def test_missing_tokenizers_name_the_files(self):
        models = self.folder(tokenizers=False)
        message = self.assertLoadFails(
            "sdxl/base.safetensors", f"{xfx.CLIP_L_FOLDER}/", f"{xfx.BIG_G_FOLDER}/", "vocab.json", "merges.txt",
            "tokenizer.json", f"{BASE}/", "text_encoder_2/config.json", "tokenizer_2/", "inside the model folder",
            models=models)
        self.assertIn(f"has no {xfx.CLIP_L_FOLDER} tokenizer and no {xfx.BIG_G_FOLDER} tokenizer", message)
        shutil.copytree(xfx.xl_source() / "tokenizer", models / xfx.CLIP_L_FOLDER)
        message = self.assertLoadFails("sdxl/base.safetensors", models=models)
        self.assertIn(f"has no {xfx.BIG_G_FOLDER} tokenizer:", message)

    def test_shipped_configs_without_a_base_model(self):
        # The tokenizers but no base model: runai's SDXL 1.0 configs. They are SDXL-sized,
        # the tiny file is not: the error says so, which proves which configs were used.
        models = self.folder()
        shutil.rmtree(models / BASE)
        base = singlefile_xl.find_xl_base_configs(models)
        self.assertEqual(base.source, f"runai's built-in configs of {BASE}")
        shipped = sdconfigs.sdxl_base()
        self.assertEqual((base.unet, base.vae, base.text_encoder, base.text_encoder_2, base.scheduler),
                         tuple(shipped[k] for k in ("unet", "vae", "text_encoder", "text_encoder_2", "scheduler")))
        self.assertLoadFails("sdxl/base.safetensors", f"runai's built-in configs of {BASE}", "UNet weights",
                             models=models)

    def test_the_shipped_configs_are_sdxl_1_0(self):
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        from runai.models.assemble import text_config

        configs = sdconfigs.sdxl_base()
        unet = configs["unet"]
        self.assertEqual((unet["cross_attention_dim"], unet["transformer_layers_per_block"],
                          unet["addition_time_embed_dim"], unet["projection_class_embeddings_input_dim"],
                          unet["in_channels"]), (2048, [1, 2, 10], 256, 2816, 4))
        self.assertEqual((configs["vae"]["scaling_factor"], configs["vae"]["force_upcast"]), (0.13025, True))
        self.assertEqual(configs["scheduler"]["_class_name"], "EulerDiscreteScheduler")
        with torch.device("meta"):
            models = [UNet2DConditionModel.from_config(unet), AutoencoderKL.from_config(configs["vae"]),
                      CLIPTextModel(text_config(configs["text_encoder"])),
                      CLIPTextModelWithProjection(text_config(configs["text_encoder_2"]))]
        # The parameter counts of SDXL 1.0 base's UNet, VAE and text encoders.
        self.assertEqual([sum(p.numel() for p in m.parameters()) for m in models],
                         [2567463684, 83653863, 123060480, 694659840])

    def test_the_shipped_configs_are_package_data(self):
        # What setup.cfg ships (a wheel, not only an editable install) covers every file.
        import configparser
        from pathlib import PurePosixPath

        import runai

        setup = Path(runai.__file__).parent.parent / "setup.cfg"
        parser = configparser.ConfigParser()
        parser.read(setup)
        patterns = parser["options.package_data"]["runai.models"].split()
        models = Path(sdconfigs.__file__).parent
        shipped = sorted(p.relative_to(models).as_posix() for p in (models / "configs").rglob("*") if p.is_file())
        self.assertEqual(len(shipped), len(sdconfigs.SDXL_FILES))
        # Matched as setuptools globs: "*" never crosses a "/".
        self.assertEqual([f for f in shipped if not any(PurePosixPath(f).match(p) for p in patterns)], [])
        self.assertEqual(singlefile.find_base_configs(self.models, "sdxl").source,
                         f"the configs of {BASE} in the model folder")

    def test_an_inpainting_base_comes_first_for_inpainting_files(self):
        models = self.folder()
        inpaint_base = singlefile_xl.XL_INPAINT_BASES[0]
        shutil.copytree(xfx.xl_source("inpaint"), models / inpaint_base, ignore=shutil.ignore_patterns("*.safetensors"))
        self.assertEqual(singlefile.base_candidates("sdxl", True, False), [inpaint_base, BASE])
        self.assertIn(inpaint_base, singlefile_xl.find_xl_base_configs(models, inpainting=True).source)
        self.assertIn(BASE, singlefile_xl.find_xl_base_configs(models).source)
        self.copy_file(models, "sdxl/inpaint.safetensors")
        assertSameWeights(self, self.load("sdxl/inpaint.safetensors", models), xfx.xl_reference("inpaint"),
                          XL_COMPONENTS)

    def test_a_base_folder_link_outside_is_not_used(self):
        models = Path(self.mktemp()).absolute()
        elsewhere = models.parent / "elsewhere-xl-base"
        shutil.copytree(xfx.xl_source(), elsewhere)
        (models / "stabilityai").mkdir(parents=True)
        os.symlink(elsewhere, models / BASE)
        with self.assertRaises(LoadError) as caught:
            singlefile_xl.find_xl_base_configs(models)
        self.assertIn("vocab.json", caught.exception.message)


FORMATS = (BASE, "sdxl/base.safetensors", "sdxl/base.ckpt")


class EngineTests(XLTestCase):
    def test_the_three_formats_generate_the_same_image(self):
        engine = Engine(device="cpu", dtype="float32", library=library.ModelLibrary(self.models))
        pngs = {name: generate(engine, request(self.models, name, seed=11))[0].png for name in FORMATS}
        self.assertEqual(len(set(pngs.values())), 1, "the formats load different weights")
        self.assertEqual(Image.open(io.BytesIO(pngs[FORMATS[1]])).size, (64, 64))
        [other] = generate(engine, request(self.models, "sdxl/base.safetensors", seed=12))
        self.assertNotEqual(other.png, pngs[FORMATS[1]])


class SocketTests(LiveServer, TestCase):
    """An exported SDXL .safetensors and an SDXL .ckpt, over the legacy socket."""

    timeout = 300

    def setUp(self):
        self.models = xfx.xl_model_folder()
        self.start_server(str(self.models), idle_timeout=30)

    def ask(self, name, seed):
        return legacy_request(str(self.models), seed=seed, txt2img_model=str(self.models / name))

    @inlineCallbacks
    def test_single_files_generate_deterministically(self):
        requests = [self.ask(name, 21) for name in FORMATS[1:] * 2] + [self.ask(FORMATS[1], 22)]
        answers = yield self.talk(*requests)
        pngs = []
        for replies in answers:
            [image] = [m for m in replies if "image" in m]
            self.assertEqual(replies[-1]["action"], "done")
            pngs.append(png_of(image))
        self.assertEqual(Image.open(io.BytesIO(pngs[0])).size, (64, 64))
        self.assertEqual(len(set(pngs[:4])), 1, "not deterministic, or the formats differ")
        self.assertNotEqual(pngs[4], pngs[0])


class HttpTests(HttpTestCase):
    """The SDXL folder, its single-file export and the .ckpt, through the AUTOMATIC1111 HTTP
    door with the real webuiapi client: the same pixels from all three."""

    def setUp(self):
        self.models = str(xfx.xl_model_folder())
        self.start_server(self.models)
        self.api = Api(self.core, reactor, pool=reactor.getThreadPool(), token=self.token)
        self.site = make_site(self.api, max_body=8 * 1024 * 1024)
        self.http = self.listen(self.site)

    @inlineCallbacks
    def test_the_three_formats_paint_the_same_over_http(self):
        def run(model, seed):
            # Created here, off the reactor thread: webuiapi blocks.
            client = webuiapi.WebUIApi(host="127.0.0.1", port=self.http.getHost().port)
            result = client.txt2img(prompt="a lighthouse", seed=seed, steps=2, width=64, height=64,
                                    sampler_name="Euler a", override_settings={"sd_model_checkpoint": model})
            [image] = result.images
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            return result.info["sd_model_name"], image.size, pixels(buffer.getvalue())

        answers = []
        for model in FORMATS:
            answers.append((yield self.in_thread(run, model, 31)))
        other = yield self.in_thread(run, FORMATS[1], 32)
        self.assertEqual([name for name, _, _ in answers], list(FORMATS))
        self.assertEqual({size for _, size, _ in answers}, {(64, 64)})
        self.assertEqual(len({p for _, _, p in answers}), 1, "the formats paint differently")
        self.assertNotEqual(other[2], answers[0][2])
