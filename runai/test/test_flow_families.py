"""SD3 and FLUX.1 diffusers folders in the engine, on tiny random-weight pipelines
(runai.test.tiny_flow): every mode, determinism, batches, progress, cancel, schedulers,
and, for a plain prompt, the very image diffusers' own pipeline paints with the same seed,
scheduler, steps and guidance.
"""

import atexit
import io
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from twisted.trial.unittest import SynchronousTestCase

from runai import families
from runai.core import errors
from runai.core.requests import GenerationRequest, Limits
from runai.doors.legacy.parse import parse_request
from runai.engine import modes
from runai.engine.engine import Engine
from runai.models.library import ModelLibrary

_root = None
FLOW_MODELS = ("sd3/medium", "flux/dev", "flux/schnell", "flux/fill")


def flow_models():
    """A model folder (a realpath) of tiny flow-matching folders, built on first use:

    sd3/medium     an SD3.5-structured pipeline
    flux/dev       FLUX.1 dev's structure (guidance embedding, dynamic shifting)
    flux/schnell   FLUX.1 schnell's (no guidance embedding, shift 1)
    flux/fill      FLUX.1 Fill's (the masked picture and the mask beside the latents)
    """
    global _root
    if _root is None:
        from runai.test.tiny_flow import build_tiny_flux_pipeline, build_tiny_sd3_pipeline

        root = Path(os.path.realpath(tempfile.mkdtemp(prefix="runai-flow-")))
        atexit.register(shutil.rmtree, root, True)
        build_tiny_sd3_pipeline(root / "sd3" / "medium")
        for kind in ("dev", "schnell", "fill"):
            build_tiny_flux_pipeline(root / "flux" / kind, kind=kind)
        _root = root
    return _root


def request(model="flux/dev", **overrides):
    family = families.for_version(model.split("/")[0])
    defaults = family.defaults(ModelLibrary(flow_models()).describe(flow_models() / model).classification)
    fields = dict(action="txt2img", model_path=str(flow_models() / model), model_name=model,
                  prompt="a lighthouse at dusk", steps=2, width=64, height=64, seed=1234,
                  scheduler=defaults.scheduler, scale=defaults.scale, distilled_scale=defaults.distilled_scale)
    fields.update(overrides)
    return GenerationRequest(**fields)


def picture(size=(64, 64)):
    rng = np.random.default_rng(3)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def encoded(image):
    from runai.core.images import check_image
    import base64

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return check_image(base64.b64encode(buffer.getvalue()).decode("ascii"), "pixels")


def half_mask(size=(64, 64)):
    mask = Image.new("L", size, 0)
    mask.paste(255, (0, 0, size[0] // 2, size[1]))
    return mask


class Run:
    def __init__(self, engine, req, cancel_when=None):
        self.progress, self.images = [], []
        cancel_when = cancel_when or (lambda run: False)
        self.count = engine.generate(req, lambda s, t: self.progress.append((s, t)), self.images.append,
                                     lambda: cancel_when(self))


def pixels(png):
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


class LibraryTests(SynchronousTestCase):
    def test_folders_are_classified_and_served(self):
        listing = {e.name: e for e in ModelLibrary(flow_models()).scan()}
        seen = {name: (e.version, e.classification.variant, e.served, e.classification.inpainting)
                for name, e in listing.items()}
        self.assertEqual(seen, {
            "sd3/medium": ("sd3", None, True, False),
            "flux/dev": ("flux", "dev", True, False),
            "flux/schnell": ("flux", "schnell", True, False),
            "flux/fill": ("flux", "fill", True, True),
        })

    def test_defaults_follow_the_family_and_variant(self):
        parse = lambda model, **options: parse_request(  # noqa: E731
            {"action": "txt2img", "options": dict({"txt2img_model": model, "txt2img_prompt": "x"}, **options)},
            flow_models(), Limits())
        dev, schnell, sd3 = parse("flux/dev"), parse("flux/schnell"), parse("sd3/medium")
        self.assertEqual((dev.width, dev.steps, dev.scheduler, dev.distilled_scale), (1024, 28, "euler", 3.5))
        self.assertEqual((schnell.steps, schnell.scheduler, schnell.distilled_scale), (4, "euler", None))
        self.assertEqual((sd3.width, sd3.steps, sd3.scale, sd3.scheduler), (1024, 28, 7.0, "euler"))
        self.assertEqual(parse("flux/fill").distilled_scale, 30.0)
        self.assertEqual(parse("flux/dev", txt2img_distilled_cfg_scale=2.5).distilled_scale, 2.5)

    def test_a_scheduler_the_family_cannot_run_is_refused_naming_those_it_can(self):
        with self.assertRaises(errors.RunaiError) as caught:
            parse_request({"action": "txt2img", "options": {"txt2img_model": "flux/dev", "txt2img_prompt": "x",
                                                            "txt2img_scheduler": "euler_a"}}, flow_models(), Limits())
        self.assertEqual(caught.exception.code, errors.BAD_REQUEST)
        self.assertIn("'euler_a'", caught.exception.message)
        self.assertIn("euler", caught.exception.message.split("run ")[-1])

    def test_sizes_are_multiples_of_16(self):
        with self.assertRaises(errors.RunaiError) as caught:
            parse_request({"action": "txt2img", "options": {"txt2img_model": "sd3/medium", "txt2img_prompt": "x",
                                                            "txt2img_width": 72}}, flow_models(), Limits())
        self.assertEqual(caught.exception.code, errors.OUT_OF_RANGE)
        self.assertIn("multiple of 16", caught.exception.message)


_engine = None


def shared_engine():
    """One engine for the module: the four tiny models stay loaded between tests."""
    global _engine
    if _engine is None:
        _engine = Engine(device="cpu", dtype="float32", library=ModelLibrary(flow_models()), cache_models=4)
    return _engine


class EngineTests(SynchronousTestCase):
    def setUp(self):
        self.engine = shared_engine()

    def test_txt2img_is_diffusers_own_image(self):
        """The same seed, scheduler, steps and guidance as diffusers' pipeline: the same pixels."""
        from diffusers import FluxPipeline, StableDiffusion3Pipeline

        for model, cls, call in (
            ("sd3/medium", StableDiffusion3Pipeline, dict(guidance_scale=7.0, negative_prompt="")),
            ("flux/dev", FluxPipeline, dict(guidance_scale=3.5)),
            ("flux/schnell", FluxPipeline, {}),
        ):
            req = request(model, steps=3)
            [mine] = Run(self.engine, req).images
            pipe = cls.from_pretrained(str(flow_models() / model), local_files_only=True)
            pipe.set_progress_bar_config(disable=True)
            theirs = pipe("a lighthouse at dusk", num_inference_steps=3, height=64, width=64,
                          generator=[torch.Generator("cpu").manual_seed(1234)], **call).images[0]
            np.testing.assert_array_equal(pixels(mine.png), np.asarray(theirs.convert("RGB")), err_msg=model)

    def test_same_seed_same_bytes_and_batches_have_seed_plus_k(self):
        for model in ("sd3/medium", "flux/dev"):
            a = Run(self.engine, request(model, seed=5)).images[0].png
            b = Run(self.engine, request(model, seed=5)).images[0].png
            c = Run(self.engine, request(model, seed=6)).images[0].png
            self.assertEqual(a, b)
            self.assertNotEqual(a, c)
            run = Run(self.engine, request(model, seed=5, n_samples=2, n_iter=2))
            self.assertEqual([i.seed for i in run.images], [5, 6, 7, 8])
            self.assertEqual(run.progress, [(s, 4) for s in range(1, 5)])  # 2 steps x 2 batches
            # Image k of a batch is image k alone, up to batched arithmetic.
            np.testing.assert_allclose(pixels(run.images[0].png), pixels(a), atol=2)

    def test_every_mode(self):
        init, mask = encoded(picture()), encoded(half_mask())
        for model in FLOW_MODELS:
            for action, extra in (("txt2img", {}), ("img2img", dict(pixels=init, strength=0.5)),
                                  ("inpaint", dict(pixels=init, mask=mask, strength=1.0)),
                                  ("outpaint", dict(pixels=init, mask=mask, strength=1.0))):
                run = Run(self.engine, request(model, action=action, steps=2, **extra))
                [image] = run.images
                self.assertEqual((image.width, image.height), (64, 64), (model, action))
                self.assertEqual(Image.open(io.BytesIO(image.png)).size, (64, 64))
                self.assertTrue(run.progress, (model, action))
            if action == "inpaint":
                # The unmasked half is the client's own picture.
                kept = pixels(image.png)[:, 40:]
                np.testing.assert_array_equal(kept, np.asarray(picture())[:, 40:])

    def test_the_fill_model_runs_every_mode_with_its_own_pipeline(self):
        base = self.engine.load(str(flow_models() / "flux" / "fill"))
        self.assertTrue(modes.is_inpainting_model(base))
        for action in ("txt2img", "img2img", "inpaint"):
            req = request("flux/fill", action=action, strength=0.5 if action == "img2img" else 1.0)
            inputs = modes.Inputs(picture(), half_mask()) if action != "txt2img" else modes.Inputs()
            cls, kwargs = modes.plan(base, req, inputs)
            self.assertEqual(cls.__name__, "FluxFillPipeline")
            self.assertIn("mask_image", kwargs)

    def test_flow_schedulers(self):
        sd3 = families.for_version("sd3")
        for name in sorted(sd3.schedulers):
            [image] = Run(self.engine, request("sd3/medium", scheduler=name)).images
            self.assertEqual((image.width, image.height), (64, 64), name)
        flux = families.for_version("flux")
        for name in sorted(flux.schedulers):
            [image] = Run(self.engine, request("flux/dev", scheduler=name)).images
            self.assertEqual((image.width, image.height), (64, 64), name)

    def test_a_scheduler_of_another_family_is_refused_in_the_worker_too(self):
        with self.assertRaises(errors.RunaiError) as caught:
            Run(self.engine, request("flux/dev", scheduler="ddim"))
        self.assertEqual(caught.exception.code, errors.BAD_REQUEST)

    def test_cancel_stops_at_the_next_step(self):
        with self.assertRaises(errors.JobCancelled):
            Run(self.engine, request("flux/dev", steps=20), cancel_when=lambda run: len(run.progress) >= 2)

    def test_the_cache_counts_every_component(self):
        entry = self.engine.loader.get(str(flow_models() / "sd3" / "medium"))
        pipe = entry.pipe
        expected = sum(p.numel() * p.element_size()
                       for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
                       for p in getattr(pipe, name).parameters())
        self.assertGreaterEqual(entry.nbytes, expected)
        from runai.models.cache import estimate_bytes

        self.assertGreaterEqual(estimate_bytes(str(flow_models() / "sd3" / "medium"), torch.float32), expected)


class PlacementTests(SynchronousTestCase):
    def test_text_encoders_on_the_cpu_paint_the_same_image(self):
        """--text-encoders cpu: the encoders' inputs and outputs are moved by hooks, every
        encoding path runs unchanged (here both devices are the CPU: the same pixels)."""
        engine = Engine(device="cpu", dtype="float32", library=ModelLibrary(flow_models()), text_encoders="cpu")
        for model in ("sd3/medium", "flux/dev"):
            mine = Run(engine, request(model)).images[0].png
            pipe = engine.pipe
            for name in families.for_pipeline(pipe).text_encoder_names:
                encoder = getattr(pipe, name)
                self.assertEqual(encoder.device.type, "cpu")
                self.assertTrue(encoder._forward_pre_hooks and encoder._forward_hooks, name)
            self.assertEqual(mine, Run(shared_engine(), request(model)).images[0].png, model)

    def test_moved_reaches_every_tensor(self):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        from runai.families.base import moved

        out = BaseModelOutputWithPooling(last_hidden_state=torch.ones(1, 2), pooler_output=torch.zeros(1),
                                         hidden_states=(torch.ones(1), torch.ones(2)))
        again = moved(out, torch.device("meta"))
        self.assertIsInstance(again, BaseModelOutputWithPooling)
        self.assertEqual({again[0].device.type, again.pooler_output.device.type}
                         | {h.device.type for h in again.hidden_states}, {"meta"})
        self.assertEqual(moved({"x": [torch.ones(1)], "n": 3}, torch.device("meta"))["x"][0].device.type, "meta")

    def test_flow_models_load_in_bfloat16_on_a_gpu_under_auto(self):
        flux, sd = families.for_version("flux"), families.for_version("v1")
        self.patch(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
        cuda, cpu = torch.device("cuda"), torch.device("cpu")
        self.assertEqual(flux.auto_dtype(torch.float16, cuda), torch.bfloat16)
        self.assertEqual(flux.auto_dtype(torch.float32, cpu), torch.float32)
        self.assertEqual(sd.auto_dtype(torch.float16, cuda), torch.float16)
        engine = Engine(device="cpu", dtype="auto", library=ModelLibrary(flow_models()))
        self.assertEqual(engine.loader.dtype_of(str(flow_models() / "flux" / "dev")), torch.float32)
