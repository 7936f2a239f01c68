"""runai.models.singlefile_flow, companions, flowconfigs and flowparts: SD3 and FLUX.1 single
files as Forge and ComfyUI users keep them (a FLUX.1 transformer alone, float8 too, beside
ae.safetensors, clip_l.safetensors and t5xxl_*.safetensors; a ComfyUI checkpoint with
everything inside; SD3 with or without its text encoders) load offline into the very
weights of the diffusers folder they were written from, and paint its very pixels; what is
missing is named; the client's choice overrides the search; nothing outside the model
folder is ever read.
"""

import os
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from twisted.trial.unittest import SynchronousTestCase

from runai.core.requests import GenerationRequest
from runai.engine.engine import Engine
from runai.models import companions, flowconfigs, flowparts
from runai.models.classify import classify_state
from runai.models.checkpoint import tensor_shapes
from runai.models.errors import LoadError
from runai.models.library import ModelLibrary
from runai.models.singlefile import pipeline_from_single_file
from runai.models.singlefile_flow import pipeline_from_flow_file
from runai.test import flow_fixtures as ff
from runai.test.test_flow_families import Run, pixels

FLUX_PARTS = ("transformer", "vae", "text_encoder", "text_encoder_2")
SD3_PARTS = FLUX_PARTS + ("text_encoder_3",)

_folders = {}


def root():
    return ff.model_folder()


def folder_pipe(base):
    """The diffusers folder's own pipeline (float32), loaded once."""
    if base not in _folders:
        cls = StableDiffusion3Pipeline if base == ff.SD3_BASE else FluxPipeline
        if base == ff.FLUX_BASES["fill"]:
            from diffusers import FluxFillPipeline as cls
        _folders[base] = cls.from_pretrained(str(root() / base), local_files_only=True)
    return _folders[base]


def load(name, model_dir=None, dtype=torch.float32, modules=None):
    model_dir = model_dir or root()
    entry = ModelLibrary(model_dir).describe(model_dir / name)
    return pipeline_from_flow_file(model_dir / name, model_dir, entry, "cpu", dtype, lambda s: None, modules=modules)


def scratch(test):
    """A fresh, empty model folder for one test."""
    path = Path(os.path.realpath(tempfile.mkdtemp(prefix="runai-flow-scratch-")))
    test.addCleanup(shutil.rmtree, str(path), True)
    return path


def place(target, *names):
    for name in names:
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        source = root() / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, target / name)


class SameWeights:
    def assertSameWeights(self, mine, base, parts, transform=None):
        theirs = folder_pipe(base)
        for part in parts:
            a, b = getattr(mine, part).state_dict(), getattr(theirs, part).state_dict()
            self.assertEqual(set(a), set(b), part)
            for key in b:
                expected = transform(part, b[key]) if transform else b[key]
                self.assertTrue(torch.equal(a[key], expected), f"{part}: {key}")


class LoadTests(SynchronousTestCase, SameWeights):
    def test_a_flux_transformer_alone_takes_its_companions_and_the_folders_weights(self):
        found = companions.find_companions(root(), root() / "flux/flux1-dev.safetensors",
                                           ModelLibrary(root()).describe(root() / "flux/flux1-dev.safetensors")
                                           .classification)
        self.assertEqual({r: p.relative_to(root()).as_posix() for r, p in found.items()},
                         {"vae": "vae/ae.safetensors", "clip_l": "text_encoder/clip_l.safetensors",
                          "t5xxl": "text_encoder/t5xxl_fp16.safetensors"})  # fp16 before fp8
        pipe = load("flux/flux1-dev.safetensors")
        self.assertIsInstance(pipe, FluxPipeline)
        self.assertSameWeights(pipe, ff.FLUX_BASES["dev"], FLUX_PARTS)
        self.assertEqual(dict(pipe.scheduler.config), dict(folder_pipe(ff.FLUX_BASES["dev"]).scheduler.config))

    def test_a_comfyui_checkpoint_with_everything_inside(self):
        pipe = load("flux/flux1-dev-checkpoint.safetensors")
        self.assertSameWeights(pipe, ff.FLUX_BASES["dev"], FLUX_PARTS)

    def test_float8_is_upcast_within_its_rounding(self):
        pipe = load("flux/flux1-dev-fp8.safetensors")
        self.assertSameWeights(pipe, ff.FLUX_BASES["dev"], ("transformer",),
                               lambda part, t: t.to(torch.float8_e4m3fn).to(torch.float32))
        exact = folder_pipe(ff.FLUX_BASES["dev"]).transformer.state_dict()
        for key, value in pipe.transformer.state_dict().items():
            big = exact[key].abs() > 0.02  # e4m3's normal range; smaller ones round absolutely
            torch.testing.assert_close(value[big], exact[key][big], rtol=2 ** -4, atol=0)
        self.assertSameWeights(pipe, ff.FLUX_BASES["dev"], ("vae", "text_encoder", "text_encoder_2"))
        # dtype None: the file's own precision, float8 running as bfloat16, for every part.
        native = load("flux/flux1-dev-fp8.safetensors", dtype=None)
        self.assertEqual({getattr(native, p).dtype for p in FLUX_PARTS}, {torch.bfloat16})

    def test_schnell_and_fill(self):
        schnell = load("flux/flux1-schnell.safetensors")
        self.assertFalse(schnell.transformer.config.guidance_embeds)
        self.assertEqual(schnell.scheduler.config.shift, 1.0)  # schnell's own, from its base folder
        self.assertSameWeights(schnell, ff.FLUX_BASES["schnell"], FLUX_PARTS)
        fill = load("flux/flux1-fill-dev.safetensors")
        self.assertEqual(type(fill).__name__, "FluxFillPipeline")
        self.assertEqual((fill.transformer.config.in_channels, fill.transformer.config.out_channels), (384, 64))
        self.assertSameWeights(fill, ff.FLUX_BASES["fill"], FLUX_PARTS)

    def test_sd3_with_and_without_its_text_encoders(self):
        for name in ("sd3/sd3.5_large_incl_clips_t5xxl.safetensors", "sd3/sd3.5_large.safetensors"):
            pipe = load(name)
            self.assertIsInstance(pipe, StableDiffusion3Pipeline)
            self.assertSameWeights(pipe, ff.SD3_BASE, SD3_PARTS)

    def test_sd3_runs_on_clip_alone_without_a_t5(self):
        model_dir = scratch(self)
        place(model_dir, ff.SD3_BASE, "sd3/sd3.5_large.safetensors", "sd3/clip_l.safetensors", "sd3/clip_g.safetensors")
        pipe = load("sd3/sd3.5_large.safetensors", model_dir)
        self.assertIsNone(pipe.text_encoder_3)
        engine = Engine(device="cpu", dtype="float32", library=ModelLibrary(model_dir))
        req = request("sd3/sd3.5_large.safetensors", model_path=str(model_dir / "sd3/sd3.5_large.safetensors"))
        [image] = Run(engine, req).images
        self.assertEqual(pixels(image.png).shape, (64, 64, 3))

    def test_runais_own_configs_and_the_tokenizer_folders_without_a_base_folder(self):
        model_dir = scratch(self)
        place(model_dir, "flux/flux1-dev.safetensors", "vae/ae.safetensors", "text_encoder/clip_l.safetensors",
              "text_encoder/t5xxl_fp16.safetensors")
        base = root() / ff.FLUX_BASES["dev"]
        with self.assertRaises(LoadError) as caught:
            load("flux/flux1-dev.safetensors", model_dir)
        message = caught.exception.message
        for needed in ("openai/clip-vit-large-patch14/", "google/t5-v1_1-xxl/", "black-forest-labs/FLUX.1-dev/",
                       "tokenizer.json"):
            self.assertIn(needed, message)
        shutil.copytree(base / "tokenizer", model_dir / "openai" / "clip-vit-large-patch14")
        # A T5 folder with a spiece.model that cannot be read (here: not one at all) is named.
        (model_dir / "google" / "t5-v1_1-xxl").mkdir(parents=True)
        (model_dir / "google" / "t5-v1_1-xxl" / "spiece.model").write_bytes(b"not a sentencepiece model")
        with self.assertRaises(LoadError) as caught:
            load("flux/flux1-dev.safetensors", model_dir)
        self.assertIn("cannot read the T5 tokenizer in google/t5-v1_1-xxl", caught.exception.message)
        shutil.rmtree(model_dir / "google" / "t5-v1_1-xxl")
        shutil.copytree(base / "tokenizer_2", model_dir / "google" / "t5-v1_1-xxl")
        pipe = load("flux/flux1-dev.safetensors", model_dir)
        # Sized by the weights, whatever runai's FLUX.1 dev configs say; the scheduler is dev's.
        self.assertSameWeights(pipe, ff.FLUX_BASES["dev"], FLUX_PARTS)
        self.assertTrue(pipe.scheduler.config.use_dynamic_shifting)
        self.assertEqual(pipe.vae.config.scaling_factor, 0.3611)

    def test_sd3_on_runais_own_configs_pads_clip_g_as_sd3_does(self):
        model_dir = scratch(self)
        place(model_dir, "sd3/sd3.5_large_incl_clips_t5xxl.safetensors")
        base = root() / ff.SD3_BASE
        for folder, model in (("tokenizer", "openai/clip-vit-large-patch14"),
                              ("tokenizer_2", "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"),
                              ("tokenizer_3", "google/t5-v1_1-xxl")):
            shutil.copytree(base / folder, model_dir / model)
        pipe = load("sd3/sd3.5_large_incl_clips_t5xxl.safetensors", model_dir)
        self.assertSameWeights(pipe, ff.SD3_BASE, SD3_PARTS)
        self.assertEqual((pipe.tokenizer_2.pad_token, pipe.scheduler.config.shift), ("!", 3.0))
        self.assertNotEqual(pipe.tokenizer.pad_token, "!")

    def test_the_family_is_what_serves_them(self):
        library = ModelLibrary(root())
        for name in ("flux/flux1-dev.safetensors", "sd3/sd3.5_large.safetensors"):
            entry = library.describe(root() / name)
            self.assertTrue(entry.served, name)
            pipe = pipeline_from_single_file(root() / name, root(), entry, "cpu", torch.float32)
            self.assertEqual(pipe.transformer.dtype, torch.float32)


def request(name, **overrides):
    fields = dict(action="txt2img", model_path=str(root() / name), model_name=name, prompt="a lighthouse at dusk",
                  steps=2, width=64, height=64, seed=1234, scheduler="euler")
    if name.startswith(("flux", "black-forest-labs")):
        fields.update(scale=1.0, distilled_scale=3.5)
    else:
        fields.update(scale=7.0)
    fields.update(overrides)
    return GenerationRequest(**fields)


class EngineTests(SynchronousTestCase):
    def test_the_same_seed_paints_the_folders_pixels(self):
        engine = Engine(device="cpu", dtype="float32", library=ModelLibrary(root()), cache_models=2)
        for single, folder in (("flux/flux1-dev.safetensors", ff.FLUX_BASES["dev"]),
                               ("sd3/sd3.5_large.safetensors", ff.SD3_BASE)):
            [mine] = Run(engine, request(single)).images
            [theirs] = Run(engine, request(folder)).images
            self.assertEqual(mine.png, theirs.png, single)
        [image] = Run(engine, request("flux/flux1-dev-fp8.safetensors")).images
        self.assertEqual(pixels(image.png).shape, (64, 64, 3))


class CompanionTests(SynchronousTestCase, SameWeights):
    def test_a_missing_companion_is_named_with_where_to_put_it(self):
        model_dir = scratch(self)
        place(model_dir, ff.FLUX_BASES["dev"], "flux/flux1-dev.safetensors", "text_encoder/clip_l.safetensors")
        with self.assertRaises(LoadError) as caught:
            load("flux/flux1-dev.safetensors", model_dir)
        message = caught.exception.message
        for needed in ("transformer-only", "ae.safetensors", "clip_l.safetensors", "t5xxl_fp16.safetensors",
                       "vae/", "text_encoder/", "beside it (in flux/)", "found for the VAE and T5-XXL"):
            self.assertIn(needed, message)
        self.assertNotIn(str(model_dir), message)

    def test_the_clients_choice_overrides_the_search(self):
        model_dir = scratch(self)
        place(model_dir, ff.FLUX_BASES["dev"], "flux/flux1-dev.safetensors", "vae/ae.safetensors",
              "text_encoder/clip_l.safetensors", "text_encoder/t5xxl_fp16.safetensors",
              "text_encoder/t5xxl_fp8_e4m3fn.safetensors")
        from safetensors.torch import load_file

        halved = {k: v / 2 for k, v in load_file(str(model_dir / "vae/ae.safetensors")).items()}
        ff.write(model_dir / "vae" / "other.safetensors", halved)
        chosen = [model_dir / "vae" / "other.safetensors", model_dir / "text_encoder" / "t5xxl_fp8_e4m3fn.safetensors"]
        pipe = load("flux/flux1-dev.safetensors", model_dir, modules=chosen)
        self.assertSameWeights(pipe, ff.FLUX_BASES["dev"], ("vae", "text_encoder_2"), lambda part, t: (
            t / 2 if part == "vae" else t.to(torch.float8_e4m3fn).to(torch.float32)))
        self.assertSameWeights(pipe, ff.FLUX_BASES["dev"], ("transformer", "text_encoder"))

    def test_a_chosen_file_of_no_needed_role_is_named(self):
        c = ModelLibrary(root()).describe(root() / "flux/flux1-dev.safetensors").classification
        for chosen, said in (("sd3/sd3.5_large.safetensors", "sd3.5_large.safetensors is not a VAE or text encoder"),
                             ("flux/flux1-dev.safetensors", "flux1-dev.safetensors is not a VAE or text encoder"),
                             ("sd3/clip_g.safetensors", "sd3/clip_g.safetensors is a CLIP-G, not one of the VAE, "
                                                        "CLIP-L and T5-XXL that a FLUX.1 model takes")):
            with self.assertRaises(LoadError) as caught:
                companions.find_companions(root(), root() / "flux/flux1-dev.safetensors", c, chosen=[root() / chosen])
            self.assertIn(said, caught.exception.message)
        # SD3's 16-wide CLIP-L fits no FLUX.1 role of this model: its CLIP-L is 32 wide.
        with self.assertRaises(LoadError) as caught:
            companions.find_companions(root(), root() / "flux/flux1-dev.safetensors", c,
                                       chosen=[root() / "sd3/clip_l.safetensors"])
        self.assertIn("sd3/clip_l.safetensors does not fit", caught.exception.message)

    def test_a_link_to_elsewhere_is_never_used(self):
        model_dir = scratch(self)
        outside = scratch(self)
        place(model_dir, "flux/flux1-dev.safetensors", "vae/ae.safetensors", "text_encoder/clip_l.safetensors",
              "text_encoder/t5xxl_fp16.safetensors")
        shutil.copy(root() / "text_encoder/t5xxl_fp16.safetensors", outside / "t5xxl_fp16.safetensors")
        # Named to rank first among the T5 files, were it looked at.
        link = model_dir / "text_encoder" / "t5xxl_a_fp16.safetensors"
        link.symlink_to(outside / "t5xxl_fp16.safetensors")
        c = ModelLibrary(model_dir).describe(model_dir / "flux/flux1-dev.safetensors").classification
        found = companions.find_companions(model_dir, model_dir / "flux/flux1-dev.safetensors", c)
        self.assertEqual(found["t5xxl"], model_dir / "text_encoder" / "t5xxl_fp16.safetensors")
        with self.assertRaises(LoadError) as caught:
            companions.find_companions(model_dir, model_dir / "flux/flux1-dev.safetensors", c, chosen=[link])
        self.assertIn("outside the model folder", caught.exception.message)
        os.remove(model_dir / "text_encoder" / "t5xxl_fp16.safetensors")
        with self.assertRaises(LoadError) as caught:
            companions.find_companions(model_dir, model_dir / "flux/flux1-dev.safetensors", c)
        self.assertIn("found for the T5-XXL", caught.exception.message)


class LibraryTests(SynchronousTestCase):
    def test_the_library_lists_the_companions_by_content(self):
        entries = {e.name: e for e in ModelLibrary(root()).scan()}
        seen = {n: (e.classification.kind, e.classification.variant, e.classification.in_channels, e.served)
                for n, e in entries.items() if e.classification.kind != "pipeline"}
        # The tiny CLIP models are of widths no released model has: "clip".
        self.assertEqual(seen, {
            "vae/ae.safetensors": ("vae", None, 16, False),
            "text_encoder/clip_l.safetensors": ("text_encoder", "clip", None, False),
            "text_encoder/t5xxl_fp16.safetensors": ("text_encoder", "t5xxl", None, False),
            "text_encoder/t5xxl_fp8_e4m3fn.safetensors": ("text_encoder", "t5xxl", None, False),
            "sd3/clip_l.safetensors": ("text_encoder", "clip", None, False),
            "sd3/clip_g.safetensors": ("text_encoder", "clip", None, False),
            "sd3/t5xxl_fp16.safetensors": ("text_encoder", "t5xxl", None, False),
        })
        modules = companions.sd_modules(ModelLibrary(root()))
        self.assertIn({"model_name": "ae", "filename": "vae/ae.safetensors"}, modules)
        self.assertEqual(len(modules), 7)


class RealHeaderTests(SynchronousTestCase):
    """The real models' key names and shapes, in header-only files (no weights)."""

    def setUp(self):
        self.model_dir = scratch(self)
        self.files = ff.real_headers(self.model_dir)

    def shapes(self, name):
        return tensor_shapes(self.files[name])[0]

    def test_classification(self):
        seen = {}
        for name in self.files:
            c = classify_state(self.shapes(name))
            seen[name] = (c.kind, c.version, c.variant, c.in_channels)
        self.assertEqual(seen, {
            "flux/flux1-dev.safetensors": ("pipeline", "flux", "dev", 64),
            "vae/ae.safetensors": ("vae", "unknown", None, 16),
            "text_encoder/clip_l.safetensors": ("text_encoder", "unknown", "clip_l", None),
            "text_encoder/clip_g.safetensors": ("text_encoder", "unknown", "clip_g", None),
            "text_encoder/t5xxl_fp8_e4m3fn.safetensors": ("text_encoder", "unknown", "t5xxl", None),
            "text_encoder/t5xxl_fp16.safetensors": ("text_encoder", "unknown", "t5xxl", None),
            "sd3/sd3.5_large.safetensors": ("pipeline", "sd3", None, 16),
        })

    def test_discovery_at_real_sizes(self):
        library = ModelLibrary(self.model_dir)
        shown = {}
        for name in ("flux/flux1-dev.safetensors", "sd3/sd3.5_large.safetensors"):
            c = library.describe(self.model_dir / name).classification
            found = companions.find_companions(self.model_dir, self.model_dir / name, c)
            shown[name] = {r: p.relative_to(self.model_dir).as_posix() for r, p in found.items()}
        self.assertEqual(shown, {
            "flux/flux1-dev.safetensors": {"vae": "vae/ae.safetensors", "clip_l": "text_encoder/clip_l.safetensors",
                                           "t5xxl": "text_encoder/t5xxl_fp16.safetensors"},
            "sd3/sd3.5_large.safetensors": {"clip_l": "text_encoder/clip_l.safetensors",
                                            "clip_g": "text_encoder/clip_g.safetensors",
                                            "t5xxl": "text_encoder/t5xxl_fp16.safetensors"},
        })

    def test_the_weights_size_the_shipped_configs_as_they_are(self):
        _, shipped = flowconfigs.shipped("flux", "dev")
        flux = flowparts.sub(self.shapes("flux/flux1-dev.safetensors"), "")
        derived = flowconfigs.flux_transformer(shipped["transformer"], flux)
        self.assertEqual({k: derived[k] for k in shipped["transformer"]}, shipped["transformer"])
        _, sd35 = flowconfigs.shipped("sd3", "large")
        sd3 = flowparts.sub(self.shapes("sd3/sd3.5_large.safetensors"), "model.diffusion_model.")
        derived = flowconfigs.sd3_transformer(sd35["transformer"], sd3)
        self.assertEqual({k: derived[k] for k in sd35["transformer"]}, sd35["transformer"])
        for role in ("clip_l", "clip_g"):
            name = f"text_encoder/{role}.safetensors"
            shapes = {k.removeprefix("text_model."): v for k, v in self.shapes(name).items()}
            self.assertEqual(flowconfigs.clip(sd35[role], shapes), sd35[role], name)
        t5 = flowconfigs.t5(shipped["t5xxl"], self.shapes("text_encoder/t5xxl_fp16.safetensors"))
        self.assertEqual(t5, shipped["t5xxl"])
        vae = flowconfigs.vae(shipped["vae"], self.shapes("vae/ae.safetensors"))
        self.assertEqual({k: vae[k] for k in shipped["vae"]}, shipped["vae"])


class ShippedConfigTests(SynchronousTestCase):
    def test_every_variant_has_its_configs_and_they_are_package_data(self):
        import configparser
        from pathlib import PurePosixPath

        import runai

        for family, variant in flowconfigs.SHIPPED:
            name, configs = flowconfigs.shipped(family, variant)
            self.assertEqual(set(configs), set(flowconfigs.FILES[family]), name)
        parser = configparser.ConfigParser()
        parser.read(Path(runai.__file__).parent.parent / "setup.cfg")
        patterns = parser["options.package_data"]["runai.models"].split()
        models = Path(flowconfigs.__file__).parent
        shipped = sorted(p.relative_to(models).as_posix()
                         for p in (models / flowconfigs.SHIPPED_FOLDER).rglob("*") if p.is_file())
        self.assertEqual(len(shipped), 5 * 3 + 6 * 2)
        # Matched as setuptools globs: "*" never crosses a "/".
        self.assertEqual([f for f in shipped if not any(PurePosixPath(f).match(p) for p in patterns)], [])
