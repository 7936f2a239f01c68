"""SDXL diffusers folders in the engine (runai.engine.engine, modes, prompts) and the loader
(runai.models.cache), on tiny random-weight SDXL pipelines (runai.test.tiny_xl).

The images are noise; what is tested is the plumbing: the SDXL pipelines of every mode,
sizes, seeds, determinism, progress, cancellation, every scheduler, long prompts through
both text encoders, the float16 VAE rule, and the refiner's refusal.
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

from runai.core import errors
from runai.core.requests import GenerationRequest
from runai.core.schedulers import SCHEDULERS
from runai.engine import modes
from runai.families import clip_text as prompts
from runai.families import sdxl
from runai.engine.engine import Engine
from runai.models import cache

_root = None


def xl_models():
    """A model folder (a realpath) of tiny SDXL folders, built on first use:

    sdxl/base            the base model's structure (original VAE: force_upcast)
    sdxl/inpaint         a 9-channel inpainting UNet
    sdxl/refiner         the refiner's structure: listed, never served
    sdxl/fp16fix         the base's weights with the fp16-fixed VAE's config
    sdxl/tokenizer-json  the base with tokenizers of one tokenizer.json each
    """
    global _root
    if _root is None:
        from runai.test.tiny_xl import build_tiny_sdxl_pipeline

        root = Path(os.path.realpath(tempfile.mkdtemp(prefix="runai-xl-")))
        # trial has no tearDownModule: remove it when the test run ends.
        atexit.register(shutil.rmtree, root, True)
        for kind in ("base", "inpaint", "refiner"):
            build_tiny_sdxl_pipeline(root / "sdxl" / kind, kind=kind)
        build_tiny_sdxl_pipeline(root / "sdxl" / "fp16fix", force_upcast=False)
        shutil.copytree(root / "sdxl" / "base", root / "sdxl" / "tokenizer-json")
        for tokenizer in ("tokenizer", "tokenizer_2"):
            for name in ("vocab.json", "merges.txt"):
                (root / "sdxl" / "tokenizer-json" / tokenizer / name).unlink()
        _root = root
    return _root


def request(model="sdxl/base", **overrides):
    fields = dict(action="txt2img", model_path=str(xl_models() / model), model_name=model,
                  prompt="a lighthouse at dusk", steps=2, width=64, height=64, seed=1234, scheduler="euler_a")
    fields.update(overrides)
    return GenerationRequest(**fields)


class Run:
    def __init__(self, engine, req, cancel_when=None):
        self.progress, self.images = [], []
        cancel_when = cancel_when or (lambda run: False)
        self.count = engine.generate(req, lambda s, t: self.progress.append((s, t)), self.images.append,
                                     lambda: cancel_when(self))

    @property
    def png(self):
        [image] = self.images
        return image.png


def decoded(image):
    return np.asarray(Image.open(io.BytesIO(image.png)).convert("RGB"), dtype=np.int16)


def png(image):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    from runai.core.images import check_image
    import base64

    return check_image(base64.b64encode(buf.getvalue()).decode("ascii"), "pixels")


def picture(size=(64, 64), mode="RGB"):
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], len(mode)), dtype=np.uint8), mode)


def half_mask(size=(64, 64)):
    mask = Image.new("L", size, 0)
    mask.paste(255, (size[0] // 2, 0, size[0], size[1]))
    return mask


class XLTestCase(SynchronousTestCase):
    dtype = "float32"

    def setUp(self):
        xl_models()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        self.addCleanup(torch.set_num_threads, threads)
        self.engine = Engine(device="cpu", dtype=self.dtype)


class Txt2ImgTests(XLTestCase):
    def test_an_sdxl_pipeline_of_the_requested_size(self):
        run = Run(self.engine, request(width=96, height=64))
        [image] = run.images
        self.assertEqual((image.width, image.height, image.seed, image.index), (96, 64, 1234, 0))
        self.assertEqual(Image.open(io.BytesIO(image.png)).size, (96, 64))
        self.assertEqual(type(self.engine.pipe).__name__, "StableDiffusionXLPipeline")
        self.assertEqual(run.progress, [(1, 2), (2, 2)])

    def test_same_seed_same_bytes_other_seed_other_bytes(self):
        first = Run(self.engine, request()).png
        self.assertEqual(Run(self.engine, request()).png, first)
        self.assertEqual(Run(Engine(device="cpu"), request()).png, first)
        self.assertNotEqual(Run(self.engine, request(seed=1235)).png, first)
        self.assertNotEqual(Run(self.engine, request(prompt="a dog")).png, first)
        self.assertNotEqual(Run(self.engine, request(negative_prompt="fog")).png, first)

    def test_batches_have_seed_plus_k(self):
        run = Run(self.engine, request(seed=40, n_samples=2, n_iter=2))
        self.assertEqual([(i.seed, i.index) for i in run.images], [(40, 0), (41, 1), (42, 2), (43, 3)])
        self.assertEqual(len({i.png for i in run.images}), 4)
        self.assertEqual(run.progress, [(s, 4) for s in range(1, 5)])
        # Within a batch of two, other matmul paths may move a pixel by a level or two.
        alone = Run(self.engine, request(seed=41)).images[0]
        self.assertLessEqual(int(np.abs(decoded(run.images[1]) - decoded(alone)).max()), 2)
        # Batches of one compute exactly as a single request does.
        iterations = Run(self.engine, request(seed=40, n_iter=3))
        self.assertEqual([i.seed for i in iterations.images], [40, 41, 42])
        self.assertEqual(iterations.images[2].png, Run(self.engine, request(seed=42)).png)

    def test_every_scheduler(self):
        for name in SCHEDULERS:
            run = Run(self.engine, request(scheduler=name))
            self.assertEqual(Image.open(io.BytesIO(run.png)).size, (64, 64), name)
            total = run.progress[-1][1]
            self.assertEqual(run.progress, [(s, total) for s in range(1, total + 1)], name)
            self.assertGreaterEqual(total, 2, name)
        self.assertEqual(self.engine.load_count, 1)

    def test_schedulers_built_from_the_sdxl_config(self):
        from runai.engine.schedulers import make_scheduler

        self.engine.load(str(xl_models() / "sdxl" / "base"))
        config = self.engine._scheduler_config
        self.assertEqual(config["timestep_spacing"], "leading")
        for name, spec in SCHEDULERS.items():
            scheduler = make_scheduler(name, config)
            self.assertEqual(type(scheduler).__name__, spec.class_name, name)
            self.assertEqual(scheduler.config.beta_end, 0.012, name)

    def test_cancel_during_steps_and_before_start(self):
        run = []
        with self.assertRaises(errors.JobCancelled):
            Run(self.engine, request(steps=4, n_iter=2), cancel_when=lambda r: run.append(r) or len(r.progress) >= 1)
        self.assertEqual((run[-1].progress, run[-1].images), ([(1, 8)], []))
        fresh = Engine(device="cpu")
        with self.assertRaises(errors.JobCancelled):
            Run(fresh, request(), cancel_when=lambda r: True)
        self.assertEqual(fresh.load_count, 0)
        # Usable after a cancel, and unchanged by it.
        self.assertEqual(Run(self.engine, request()).png, Run(fresh, request()).png)

    def test_size_conditioning_is_diffusers_default(self):
        self.engine.load(str(xl_models() / "sdxl" / "base"))
        for action in ("txt2img", "img2img", "inpaint"):
            req = request(action=action, width=96, height=64)
            inputs = modes.Inputs(picture((96, 64)), half_mask((96, 64)))
            _, kwargs = modes.plan(self.engine.pipe, req, inputs)
            self.assertEqual((kwargs["original_size"], kwargs["target_size"], kwargs["crops_coords_top_left"]),
                             ((64, 96), (64, 96), (0, 0)), action)

    def test_a_tokenizer_json_alone_is_a_tokenizer(self):
        # What current transformers writes: the same weights give the same image.
        self.assertEqual(Run(self.engine, request("sdxl/tokenizer-json")).png, Run(self.engine, request()).png)

    def test_the_refiner_is_refused(self):
        with self.assertRaises(errors.RunaiError) as caught:
            Run(self.engine, request("sdxl/refiner"))
        self.assertEqual(caught.exception.code, errors.MODEL_LOAD_FAILED)
        self.assertIn("refiner", caught.exception.message)
        self.assertIn("second stage", caught.exception.message)
        self.assertEqual(self.engine.load_count, 0)


class ModeTests(XLTestCase):
    def image_request(self, action, model="sdxl/base", **overrides):
        fields = dict(action=action, pixels=png(picture()), mask=png(half_mask()) if action != "img2img" else None,
                      strength=1.0 if action != "img2img" else 0.5, steps=4)
        fields.update(overrides)
        return request(model, **fields)

    def test_img2img(self):
        run = Run(self.engine, self.image_request("img2img"))
        # strength 0.5 of 4 steps: the last 2 of the schedule run.
        self.assertEqual(run.progress, [(1, 2), (2, 2)])
        self.assertEqual(Image.open(io.BytesIO(run.png)).size, (64, 64))
        self.assertEqual(Run(self.engine, self.image_request("img2img")).png, run.png)
        self.assertNotEqual(Run(self.engine, self.image_request("img2img", strength=1.0)).png, run.png)
        self.assertEqual(type(self.engine._modes.get(self.engine.pipe, sdxl.FAMILY.modes().img2img)).__name__,
                         "StableDiffusionXLImg2ImgPipeline")

    def check_keeps_unmasked(self, model, action="inpaint"):
        run = Run(self.engine, self.image_request(action, model))
        self.assertEqual(len(run.progress), 4)
        out, original = decoded(run.images[0]), np.asarray(picture(), dtype=np.int16)
        self.assertEqual(np.abs(out[:, :32] - original[:, :32]).max(), 0)
        self.assertGreater(np.abs(out[:, 32:] - original[:, 32:]).mean(), 10)
        self.assertEqual(Run(self.engine, self.image_request(action, model)).png, run.png)

    def test_inpaint_with_the_base_model(self):
        self.check_keeps_unmasked("sdxl/base")

    def test_inpaint_with_an_inpainting_model(self):
        self.check_keeps_unmasked("sdxl/inpaint")
        self.assertEqual(self.engine.pipe.unet.config.in_channels, 9)

    def test_outpaint(self):
        self.check_keeps_unmasked("sdxl/base", "outpaint")

    def test_an_inpainting_model_serves_txt2img_and_img2img(self):
        self.assertEqual(Image.open(io.BytesIO(Run(self.engine, request("sdxl/inpaint")).png)).size, (64, 64))
        run = Run(self.engine, self.image_request("img2img", "sdxl/inpaint"))
        self.assertEqual(Image.open(io.BytesIO(run.png)).size, (64, 64))

    def test_every_scheduler_in_the_image_modes(self):
        for name in SCHEDULERS:
            for action, model in (("img2img", "sdxl/base"), ("inpaint", "sdxl/inpaint")):
                run = Run(self.engine, self.image_request(action, model, scheduler=name, steps=3))
                self.assertEqual(Image.open(io.BytesIO(run.png)).size, (64, 64), (name, action))

    def test_every_mode_cancels_at_the_next_step(self):
        for action in ("txt2img", "img2img", "inpaint", "outpaint"):
            req = self.image_request(action) if action != "txt2img" else request(steps=4)
            runs = []
            with self.assertRaises(errors.JobCancelled):
                Run(self.engine, req, cancel_when=lambda r: runs.append(r) or len(r.progress) >= 1)
            self.assertEqual(([s for s, _ in runs[-1].progress], runs[-1].images), ([1], []), action)


class LongPromptTests(XLTestCase):
    def setUp(self):
        super().setUp()
        self.pipe = self.engine.load(str(xl_models() / "sdxl" / "base"))

    def test_a_prompt_that_fits_encodes_as_diffusers_encodes_it(self):
        # One chunk is exactly what diffusers computes, negative and pooled embeddings included.
        for negative in ("fog", ""):
            mine = sdxl.encode(self.pipe, "a lighthouse", negative, self.engine.device)
            with torch.inference_mode():
                theirs = self.pipe.encode_prompt("a lighthouse", device=self.engine.device,
                                                 negative_prompt=negative or None)
            names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
                     "negative_pooled_prompt_embeds")
            for name, tensor in zip(names, theirs):
                self.assertEqual(mine[name].shape, tensor.shape, name)
                self.assertTrue(torch.allclose(mine[name], tensor, atol=1e-5), (name, negative))
        self.assertEqual(float(mine["negative_prompt_embeds"].abs().max()), 0.0)

    def test_a_long_prompt_is_encoded_in_chunks_through_both_encoders(self):
        tokenizer = self.pipe.tokenizer
        words = "a lighthouse on a cliff at dusk, purple sky, waves".split()
        prompt_words = []
        while len(prompts.token_ids(tokenizer, " ".join(prompt_words))) < 200:
            prompt_words.append(words[len(prompt_words) % len(words)])
        long_prompt = " ".join(prompt_words)
        ids = prompts.token_ids(tokenizer, long_prompt)
        # Its first whole words that fit in 75 tokens: what a cut would have kept.
        n = max(k for k in range(len(prompt_words))
                if len(prompts.token_ids(tokenizer, " ".join(prompt_words[:k]))) <= 75)
        first_75 = " ".join(prompt_words[:n])
        self.assertEqual(ids[:len(prompts.token_ids(tokenizer, first_75))], prompts.token_ids(tokenizer, first_75))
        text = sdxl.encode(self.pipe, long_prompt, "fog", self.engine.device)
        chunks = -(-len(ids) // 75)
        width = self.pipe.text_encoder.config.hidden_size + self.pipe.text_encoder_2.config.hidden_size
        self.assertEqual(text["prompt_embeds"].shape, (1, chunks * 77, width))
        self.assertEqual(text["negative_prompt_embeds"].shape, text["prompt_embeds"].shape)
        self.assertEqual(text["pooled_prompt_embeds"].shape, (1, self.pipe.text_encoder_2.config.projection_dim))
        # The words past the 75th token change the image: they were not cut.
        long_png = Run(self.engine, request(prompt=long_prompt)).png
        self.assertNotEqual(long_png, Run(self.engine, request(prompt=first_75)).png)
        self.assertEqual(Run(self.engine, request(prompt=long_prompt)).png, long_png)

    def test_too_long_refused(self):
        with self.assertRaises(errors.RunaiError) as caught:
            Run(self.engine, request(prompt="x " * 5000))
        self.assertEqual(caught.exception.code, errors.OUT_OF_RANGE)


class HalfPrecisionTests(XLTestCase):
    """float16 on the CPU, where this torch runs it: the decode's precision, watched."""

    dtype = "float16"

    def decode_dtypes(self, model, **overrides):
        self.engine.load(str(xl_models() / model))
        seen = []
        hook = self.engine.pipe.vae.decoder.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
        self.addCleanup(hook.remove)
        run = Run(self.engine, request(model, scheduler="euler", **overrides))
        return seen, decoded(run.images[0])

    def test_the_original_vae_decodes_in_float32(self):
        seen, pixels = self.decode_dtypes("sdxl/base")
        self.assertEqual(seen, [torch.float32])
        self.assertEqual(self.engine.pipe.unet.dtype, torch.float16)
        # Back in float16 for the next request, with the rest of the model.
        self.assertEqual(self.engine.pipe.vae.dtype, torch.float16)
        self.assertGreater(pixels.std(), 0)

    def test_the_fp16_fixed_vae_decodes_in_float16(self):
        seen, _ = self.decode_dtypes("sdxl/fp16fix")
        self.assertEqual(seen, [torch.float16])

    def test_the_img2img_and_inpaint_pipelines_follow_the_same_rule(self):
        for action, extra in (("img2img", {}), ("inpaint", {"mask": png(half_mask())})):
            seen, _ = self.decode_dtypes("sdxl/base", action=action, pixels=png(picture()), strength=0.5, steps=4,
                                         **extra)
            self.assertEqual(seen, [torch.float32], action)
            self.assertEqual(self.engine.pipe.vae.dtype, torch.float16, action)

    def test_a_vae_that_overflows_in_float16_gives_finite_pixels(self):
        # Weights scaled so that the decoder's activations pass float16's 65504: the
        # original VAE's failure, at a tiny size. Upcast, every pixel is finite.
        self.engine.load(str(xl_models() / "sdxl" / "base"))
        vae = self.engine.pipe.vae
        with torch.no_grad():
            vae.decoder.conv_in.weight.mul_(1e5)
        self.addCleanup(self.engine.unload)
        outputs = []
        hook = vae.decoder.register_forward_hook(lambda m, args, out: outputs.append(out))
        self.addCleanup(hook.remove)
        Run(self.engine, request(scheduler="euler"))
        self.assertTrue(bool(torch.isfinite(outputs[-1]).all()))
        # The same decoder in float16 overflows: the rule is what keeps the pixels.
        latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            half = vae.decoder.conv_in(latents.half())
        self.assertFalse(bool(torch.isfinite(half).all()))

    def test_the_rule(self):
        self.engine.load(str(xl_models() / "sdxl" / "base"))
        original = self.engine.pipe.vae
        fixed = self.engine.load(str(xl_models() / "sdxl" / "fp16fix")).vae
        self.assertEqual(cache.vae_decode_dtype(original, torch.float16), torch.float32)
        self.assertEqual(cache.vae_decode_dtype(fixed, torch.float16), torch.float16)
        for dtype in (torch.float32, torch.bfloat16):
            self.assertEqual(cache.vae_decode_dtype(original, dtype), dtype)

    def test_the_load_says_which(self):
        from twisted.logger import globalLogPublisher

        events = []
        globalLogPublisher.addObserver(events.append)
        try:
            self.engine.load(str(xl_models() / "sdxl" / "base"), "sdxl/base")
            self.engine.load(str(xl_models() / "sdxl" / "fp16fix"), "sdxl/fp16fix")
        finally:
            globalLogPublisher.removeObserver(events.append)
        said = [(e["name"], e["decode"]) for e in events if "the VAE decodes in" in (e.get("log_format") or "")]
        self.assertEqual(said, [("sdxl/base", "float32"), ("sdxl/fp16fix", "float16")])


class SafetyCheckerTests(XLTestCase):
    """The NSFW checker looks at pixels, whatever the model family."""

    def checker(self, flag):
        from runai.test.test_modes import _make_checker

        path = Path(self.mktemp()).absolute()
        _make_checker(str(path), flag=flag)
        return str(path)

    def test_flagged_withheld_clean_marked_checked(self):
        [flagged] = Run(self.engine, request(nsfw_filter=True, safety_checker=self.checker(True))).images
        self.assertEqual((flagged.withheld, flagged.png), (True, b""))
        [clean] = Run(self.engine, request(nsfw_filter=True, safety_checker=self.checker(False))).images
        self.assertEqual((clean.withheld, clean.nsfw_checked), (False, True))
        self.assertEqual(clean.png, Run(self.engine, request()).png)
