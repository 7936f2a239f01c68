"""The tiny SD3 and FLUX.1 pipelines of runai.test.tiny_flow, as diffusers itself loads
and runs them: every folder loads offline with its own pipeline class, every mode (txt2img,
img2img, inpaint, FLUX Fill) draws an image of the asked size, a seed gives the same pixels
twice, the T5 tokenizer survives the disk, the folders are small, and the facts about
diffusers written at the top of tiny_flow hold.
"""

import atexit
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from runai.test import tiny_flow  # sets the offline environment before diffusers imports

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from diffusers.utils import logging as diffusers_logging  # noqa: E402
from twisted.trial.unittest import SynchronousTestCase  # noqa: E402

# No "Loading pipeline components" bars in the test log (runai.engine does the same).
diffusers_logging.disable_progress_bar()

PROMPT = "a lighthouse at dusk"
SIZE = 64
SEQ = 32  # T5 tokens: short, for speed
SEEDS = {"sd3": 11, "dev": 12, "schnell": 13, "fill": 14}
CLASS_NAMES = {"sd3": "StableDiffusion3Pipeline", "dev": "FluxPipeline", "schnell": "FluxPipeline",
               "fill": "FluxFillPipeline"}

_state = {}


def _root():
    if "root" not in _state:
        root = Path(os.path.realpath(tempfile.mkdtemp(prefix="runai-flow-")))
        # trial has no tearDownModule: remove it when the test run ends.
        atexit.register(shutil.rmtree, str(root), True)
        _state["root"] = root
    return _state["root"]


def source(kind):
    """The tiny folder ``kind`` (sd3, dev, schnell, fill), built once per process."""
    if ("folder", kind) not in _state:
        path = _root() / kind
        if kind == "sd3":
            tiny_flow.build_tiny_sd3_pipeline(path, seed=SEEDS[kind])
        else:
            tiny_flow.build_tiny_flux_pipeline(path, seed=SEEDS[kind], kind=kind)
        _state[("folder", kind)] = path
    return _state[("folder", kind)]


def _pipeline_class(kind):
    import diffusers

    return getattr(diffusers, CLASS_NAMES[kind])


def loaded(kind):
    """The folder ``kind`` as its pipeline class loads it, offline; loaded once."""
    if ("pipe", kind) not in _state:
        pipe = _pipeline_class(kind).from_pretrained(str(source(kind)), local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        _state[("pipe", kind)] = pipe
    return _state[("pipe", kind)]


def derived(kind, cls_name):
    """A pipeline of class ``cls_name`` made of the loaded ``kind``'s components."""
    import diffusers

    pipe = getattr(diffusers, cls_name)(**loaded(kind).components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generator(seed=1234):
    return torch.Generator().manual_seed(seed)


def pixels(image):
    return np.asarray(image.convert("RGB"))


def init_image(size=(SIZE, SIZE)):
    x = np.linspace(0, 255, size[0], dtype=np.uint8)
    rgb = np.stack([np.tile(x, (size[1], 1)), np.tile(x[::-1], (size[1], 1)),
                    np.full((size[1], size[0]), 90, np.uint8)], axis=-1)
    return Image.fromarray(rgb, "RGB")


def mask_image(size=(SIZE, SIZE)):
    mask = Image.new("L", size, 0)
    mask.paste(255, (size[0] // 4, size[1] // 4, 3 * size[0] // 4, 3 * size[1] // 4))
    return mask


def folder_bytes(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def weights_digest(path):
    digest = hashlib.sha256()
    for name in sorted(str(p.relative_to(path)) for p in Path(path).rglob("*.safetensors")):
        digest.update(name.encode())
        digest.update((Path(path) / name).read_bytes())
    return digest.hexdigest()


class FoldersTests(SynchronousTestCase):
    def test_model_index(self):
        """model_index.json names the pipeline class and the components' classes; the T5
        tokenizer is T5Tokenizer (T5TokenizerFast's name in transformers 5)."""
        for kind, cls_name in CLASS_NAMES.items():
            index = json.loads((source(kind) / "model_index.json").read_text())
            self.assertEqual(index["_class_name"], cls_name, kind)
            self.assertEqual(index["scheduler"], ["diffusers", "FlowMatchEulerDiscreteScheduler"])
            self.assertEqual(index["vae"], ["diffusers", "AutoencoderKL"])
            t5 = "tokenizer_3" if kind == "sd3" else "tokenizer_2"
            self.assertEqual(index[t5], ["transformers", "T5Tokenizer"], kind)
        sd3 = json.loads((source("sd3") / "model_index.json").read_text())
        self.assertEqual(sd3["transformer"], ["diffusers", "SD3Transformer2DModel"])
        self.assertEqual(sd3["text_encoder"], ["transformers", "CLIPTextModelWithProjection"])
        self.assertEqual(sd3["text_encoder_3"], ["transformers", "T5EncoderModel"])
        dev = json.loads((source("dev") / "model_index.json").read_text())
        self.assertEqual(dev["transformer"], ["diffusers", "FluxTransformer2DModel"])
        self.assertEqual(dev["text_encoder"], ["transformers", "CLIPTextModel"])

    def test_load(self):
        """Each folder loads offline with its class, and with DiffusionPipeline (which
        reads the class from model_index.json)."""
        from diffusers import DiffusionPipeline

        for kind in CLASS_NAMES:
            self.assertEqual(type(loaded(kind)).__name__, CLASS_NAMES[kind])
            auto = DiffusionPipeline.from_pretrained(str(source(kind)), local_files_only=True)
            self.assertEqual(type(auto).__name__, CLASS_NAMES[kind])

    def test_sizes(self):
        """A few MB each."""
        for kind in CLASS_NAMES:
            size = folder_bytes(source(kind))
            self.assertGreater(size, 100_000, kind)
            self.assertLess(size, 4_000_000, kind)

    def test_configs(self):
        """The configs the server will read: latent channels, VAE factors, schedulers,
        the guidance embedding, the Fill transformer's channels."""
        sd3, dev, schnell, fill = (loaded(k) for k in ("sd3", "dev", "schnell", "fill"))
        for pipe in (sd3, dev, schnell, fill):
            self.assertEqual(pipe.vae.config.latent_channels, 16)
            self.assertEqual(pipe.vae_scale_factor, 8)
            self.assertFalse(pipe.vae.config.use_quant_conv)
            self.assertTrue(pipe.vae.config.force_upcast)
        self.assertEqual((sd3.vae.config.scaling_factor, sd3.vae.config.shift_factor), (1.5305, 0.0609))
        self.assertEqual((dev.vae.config.scaling_factor, dev.vae.config.shift_factor), (0.3611, 0.1159))
        self.assertEqual(sd3.scheduler.config.shift, 3.0)
        self.assertFalse(sd3.scheduler.config.use_dynamic_shifting)
        self.assertEqual(sd3.transformer.config.patch_size, 2)
        self.assertEqual(sd3.transformer.config.pooled_projection_dim,
                         sd3.text_encoder.config.projection_dim + sd3.text_encoder_2.config.projection_dim)
        self.assertEqual(sd3.transformer.config.joint_attention_dim, sd3.text_encoder_3.config.d_model)
        self.assertTrue(dev.scheduler.config.use_dynamic_shifting)
        self.assertEqual((dev.scheduler.config.base_shift, dev.scheduler.config.max_shift), (0.5, 1.15))
        self.assertFalse(schnell.scheduler.config.use_dynamic_shifting)
        self.assertEqual(schnell.scheduler.config.shift, 1.0)
        self.assertTrue(dev.transformer.config.guidance_embeds)
        self.assertFalse(schnell.transformer.config.guidance_embeds)
        self.assertTrue(fill.transformer.config.guidance_embeds)
        self.assertEqual(dev.transformer.config.in_channels, 64)
        self.assertEqual((fill.transformer.config.in_channels, fill.transformer.config.out_channels), (384, 64))
        self.assertEqual(dev.transformer.config.pooled_projection_dim, dev.text_encoder.config.hidden_size)
        self.assertEqual(dev.transformer.config.joint_attention_dim, dev.text_encoder_2.config.d_model)

    def test_deterministic_weights(self):
        """The same seed writes the same weights; another seed, others."""
        root = _root() / "determinism"
        a = weights_digest(tiny_flow.build_tiny_flux_pipeline(root / "a", seed=5, kind="schnell"))
        b = weights_digest(tiny_flow.build_tiny_flux_pipeline(root / "b", seed=5, kind="schnell"))
        c = weights_digest(tiny_flow.build_tiny_flux_pipeline(root / "c", seed=6, kind="schnell"))
        self.assertEqual(a, b)
        self.assertNotEqual(a, c)
        d = weights_digest(tiny_flow.build_tiny_sd3_pipeline(root / "d", seed=5))
        e = weights_digest(tiny_flow.build_tiny_sd3_pipeline(root / "e", seed=5))
        self.assertEqual(d, e)
        self.assertEqual(weights_digest(source("sd3")), weights_digest(
            tiny_flow.build_tiny_sd3_pipeline(root / "f", seed=SEEDS["sd3"])))

    def test_dtype(self):
        """``dtype`` is the weights' dtype on disk, as from_pretrained finds it."""
        from diffusers import FluxPipeline

        path = tiny_flow.build_tiny_flux_pipeline(_root() / "bf16", kind="schnell", dtype=torch.bfloat16)
        pipe = FluxPipeline.from_pretrained(str(path), local_files_only=True, dtype=torch.bfloat16)
        for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
            self.assertEqual(getattr(pipe, name).dtype, torch.bfloat16, name)

    def test_bad_kind(self):
        self.assertRaises(ValueError, tiny_flow.build_tiny_flux_pipeline, _root() / "bad", kind="pro")


class T5TokenizerTests(SynchronousTestCase):
    def setUp(self):
        from transformers import T5TokenizerFast

        self.folder = _root() / "t5" / self.id().rsplit(".", 1)[-1]
        self.size = tiny_flow.write_t5_tokenizer(self.folder)
        self.tokenizer = T5TokenizerFast.from_pretrained(str(self.folder), local_files_only=True)

    def test_special_ids(self):
        """pad 0, eos 1, unk 2, as T5; a few hundred pieces; no sentinels."""
        tok = self.tokenizer
        self.assertEqual((tok.pad_token_id, tok.eos_token_id, tok.unk_token_id), (0, 1, 2))
        self.assertEqual(len(tok), self.size)
        self.assertTrue(200 < self.size < 1000, self.size)
        self.assertEqual(tok.model_max_length, 512)

    def test_encode(self):
        """Words are one piece each, other ASCII falls back to characters, </s> ends every
        sequence, and only non-ASCII is <unk>."""
        tok = self.tokenizer
        ids = tok("a photo of a cat").input_ids
        self.assertEqual(tok.convert_ids_to_tokens(ids), ["▁a", "▁photo", "▁of", "▁a", "▁cat", "</s>"])
        text = "Zebra-42 on the MOON, (8k)!"
        ids = tok(text).input_ids
        self.assertEqual(ids[-1], 1)
        self.assertNotIn(2, ids)
        self.assertEqual(tok.decode(ids, skip_special_tokens=True), text)
        self.assertIn(2, tok("café").input_ids)

    def test_round_trip(self):
        """What is saved is what loads: the same ids, from a second save too."""
        from transformers import T5TokenizerFast

        again = self.folder.parent / (self.folder.name + "-again")
        self.tokenizer.save_pretrained(str(again))
        reloaded = T5TokenizerFast.from_pretrained(str(again), local_files_only=True)
        for text in ("a photo of a cat", "A Lighthouse at dusk, 4k!", "", "x" * 600):
            self.assertEqual(reloaded(text).input_ids, self.tokenizer(text).input_ids)

    def test_pipeline_padding(self):
        """As the pipelines call it: padded with <pad> to max_sequence_length, truncated
        to it with </s> kept last."""
        tok = self.tokenizer
        ids = tok("a cat", padding="max_length", max_length=8, truncation=True).input_ids
        self.assertEqual(ids, [4, tok.convert_tokens_to_ids("▁cat"), 1, 0, 0, 0, 0, 0])
        ids = tok("a " * 20, padding="max_length", max_length=8, truncation=True).input_ids
        self.assertEqual(ids, [4] * 7 + [1])


class SD3Tests(SynchronousTestCase):
    def txt2img(self, **kwargs):
        args = dict(height=SIZE, width=SIZE, num_inference_steps=2, generator=generator(),
                    max_sequence_length=SEQ)
        args.update(kwargs)
        return loaded("sd3")(PROMPT, **args).images[0]

    def test_txt2img(self):
        image = self.txt2img()
        self.assertEqual(image.size, (SIZE, SIZE))
        self.assertGreater(pixels(image).std(), 0)

    def test_same_seed(self):
        self.assertTrue(np.array_equal(pixels(self.txt2img()), pixels(self.txt2img())))
        self.assertFalse(np.array_equal(pixels(self.txt2img()), pixels(self.txt2img(generator=generator(7)))))

    def test_defaults(self):
        """Without height and width: the transformer's sample_size times 8 (64 here);
        max_sequence_length's default (256) works too."""
        pipe = loaded("sd3")
        image = pipe(PROMPT, num_inference_steps=1, generator=generator()).images[0]
        self.assertEqual(image.size, (SIZE, SIZE))

    def test_sizes(self):
        """Sides in multiples of 16 (VAE 8 x patch 2); others raise."""
        self.assertEqual(self.txt2img(height=96, width=128, num_inference_steps=1).size, (128, 96))
        self.assertRaises(ValueError, self.txt2img, height=72)

    def test_guidance(self):
        """guidance_scale > 1 is classifier-free guidance; 1 runs the prompt alone."""
        self.assertFalse(np.array_equal(pixels(self.txt2img(guidance_scale=1.0)),
                                        pixels(self.txt2img(guidance_scale=7.0))))

    def test_max_sequence_length(self):
        self.assertRaises(ValueError, self.txt2img, max_sequence_length=513)

    def test_img2img(self):
        pipe = derived("sd3", "StableDiffusion3Img2ImgPipeline")
        image = pipe(PROMPT, image=init_image(), strength=0.6, height=SIZE, width=SIZE, num_inference_steps=2,
                     generator=generator(), max_sequence_length=SEQ).images[0]
        self.assertEqual(image.size, (SIZE, SIZE))

    def test_img2img_size(self):
        """The output's size is height x width, not the input image's (which is resized)."""
        pipe = derived("sd3", "StableDiffusion3Img2ImgPipeline")
        image = pipe(PROMPT, image=init_image((80, 48)), height=48, width=80, num_inference_steps=2,
                     generator=generator(), max_sequence_length=SEQ).images[0]
        self.assertEqual(image.size, (80, 48))

    def test_img2img_steps(self):
        """steps - int(steps * (1 - strength)) steps run: at least one unless strength is
        0, where SD3 img2img fails (not with a ValueError)."""
        pipe = derived("sd3", "StableDiffusion3Img2ImgPipeline")
        for steps, strength, expected in ((2, 0.1, 1), (10, 0.3, 3), (4, 0.6, 3)):
            calls = []
            pipe(PROMPT, image=init_image(), strength=strength, height=SIZE, width=SIZE,
                 num_inference_steps=steps, max_sequence_length=SEQ, output_type="latent",
                 callback_on_step_end=lambda p, i, t, kw: calls.append(i) or {})
            self.assertEqual(len(calls), expected, (steps, strength))
        self.assertRaises(Exception, pipe, PROMPT, image=init_image(), strength=0.0, height=SIZE, width=SIZE,
                          num_inference_steps=2, max_sequence_length=SEQ)

    def test_inpaint(self):
        pipe = derived("sd3", "StableDiffusion3InpaintPipeline")
        for strength in (1.0, 0.6):
            image = pipe(PROMPT, image=init_image(), mask_image=mask_image(), strength=strength, height=SIZE,
                         width=SIZE, num_inference_steps=2, generator=generator(),
                         max_sequence_length=SEQ).images[0]
            self.assertEqual(image.size, (SIZE, SIZE))
        self.assertRaises(ValueError, pipe, PROMPT, image=init_image(), mask_image=mask_image(), strength=0.0,
                          height=SIZE, width=SIZE, num_inference_steps=2, max_sequence_length=SEQ)


class FluxTests(SynchronousTestCase):
    kind = "dev"

    def txt2img(self, **kwargs):
        args = dict(height=SIZE, width=SIZE, num_inference_steps=2, generator=generator(),
                    max_sequence_length=SEQ)
        args.update(kwargs)
        return loaded(self.kind)(PROMPT, **args).images[0]

    def test_txt2img(self):
        image = self.txt2img()
        self.assertEqual(image.size, (SIZE, SIZE))
        self.assertGreater(pixels(image).std(), 0)

    def test_same_seed(self):
        self.assertTrue(np.array_equal(pixels(self.txt2img()), pixels(self.txt2img())))
        self.assertFalse(np.array_equal(pixels(self.txt2img()), pixels(self.txt2img(generator=generator(7)))))

    def test_default_sequence(self):
        """max_sequence_length's default (512) works; above 512 raises."""
        pipe = loaded(self.kind)
        image = pipe(PROMPT, height=SIZE, width=SIZE, num_inference_steps=1, generator=generator()).images[0]
        self.assertEqual(image.size, (SIZE, SIZE))
        self.assertRaises(ValueError, self.txt2img, max_sequence_length=513)

    def test_sizes(self):
        """Sides in multiples of 16 (VAE 8 x 2x2 packing); others are rounded down, not refused."""
        self.assertEqual(self.txt2img(height=96, width=128, num_inference_steps=1).size, (128, 96))
        self.assertEqual(self.txt2img(height=72, width=64, num_inference_steps=1).size, (64, 64))

    def test_guidance(self):
        """dev: guidance_scale feeds the guidance embedding (changes the image with one
        pass per step); schnell ignores it. true_cfg_scale with a negative prompt is real CFG."""
        low = pixels(self.txt2img(guidance_scale=1.0))
        high = pixels(self.txt2img(guidance_scale=7.0))
        self.assertEqual(not np.array_equal(low, high), self.kind == "dev")
        cfg = pixels(self.txt2img(guidance_scale=1.0, true_cfg_scale=4.0, negative_prompt="fog"))
        self.assertFalse(np.array_equal(low, cfg))

    def test_img2img(self):
        pipe = derived(self.kind, "FluxImg2ImgPipeline")
        image = pipe(PROMPT, image=init_image((80, 48)), strength=0.6, height=48, width=80, num_inference_steps=2,
                     generator=generator(), max_sequence_length=SEQ).images[0]
        self.assertEqual(image.size, (80, 48))

    def test_img2img_steps(self):
        """As SD3: steps - int(steps * (1 - strength)); 0 steps is a ValueError."""
        pipe = derived(self.kind, "FluxImg2ImgPipeline")
        for steps, strength, expected in ((2, 0.1, 1), (10, 0.3, 3)):
            calls = []
            pipe(PROMPT, image=init_image(), strength=strength, height=SIZE, width=SIZE,
                 num_inference_steps=steps, max_sequence_length=SEQ, output_type="latent",
                 callback_on_step_end=lambda p, i, t, kw: calls.append(i) or {})
            self.assertEqual(len(calls), expected, (steps, strength))
        self.assertRaises(ValueError, pipe, PROMPT, image=init_image(), strength=0.0, height=SIZE, width=SIZE,
                          num_inference_steps=2, max_sequence_length=SEQ)

    def test_inpaint(self):
        pipe = derived(self.kind, "FluxInpaintPipeline")
        image = pipe(PROMPT, image=init_image(), mask_image=mask_image(), strength=1.0, height=SIZE, width=SIZE,
                     num_inference_steps=2, generator=generator(), max_sequence_length=SEQ).images[0]
        self.assertEqual(image.size, (SIZE, SIZE))


class FluxSchnellTests(FluxTests):
    kind = "schnell"


class FluxFillTests(SynchronousTestCase):
    def fill(self, size=(SIZE, SIZE), **kwargs):
        args = dict(image=init_image(size), mask_image=mask_image(size), height=size[1], width=size[0],
                    num_inference_steps=2, generator=generator(), max_sequence_length=SEQ)
        args.update(kwargs)
        return loaded("fill")(PROMPT, **args).images[0]

    def test_fill(self):
        image = self.fill()
        self.assertEqual(image.size, (SIZE, SIZE))
        self.assertEqual(self.fill((96, 48)).size, (96, 48))

    def test_same_seed(self):
        self.assertTrue(np.array_equal(pixels(self.fill()), pixels(self.fill())))

    def test_strength(self):
        """strength defaults to 1.0; below it, fewer steps from the image."""
        self.assertEqual(self.fill(strength=0.5).size, (SIZE, SIZE))

    def test_needs_image(self):
        """No image (txt2img) is refused: Fill draws only into a masked image."""
        pipe = loaded("fill")
        self.assertRaises(ValueError, pipe, PROMPT, height=SIZE, width=SIZE, num_inference_steps=1,
                          max_sequence_length=SEQ)

    def test_not_a_flux_pipeline(self):
        """Its transformer takes 384 channels: FluxPipeline cannot drive it."""
        from diffusers import FluxPipeline

        pipe = FluxPipeline(**loaded("fill").components)
        pipe.set_progress_bar_config(disable=True)
        self.assertRaises(RuntimeError, pipe, PROMPT, height=SIZE, width=SIZE, num_inference_steps=1,
                          max_sequence_length=SEQ)


class RealArchitectureTests(SynchronousTestCase):
    """The benchmark builders' models, on the meta device: no memory, no weights; the
    parameter counts are the real models'."""

    def setUp(self):
        from transformers import CLIPTokenizer

        folder = _root() / "clip-tokenizer"
        if not folder.exists():
            from runai.test import tiny

            tiny.write_tokenizer(folder)
        self.tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)

    def counts(self, modules):
        return {name: tiny_flow.parameter_count(module) for name, module in modules.items()}

    def test_flux(self):
        counts = self.counts(tiny_flow.flux_modules(self.tokenizer, "dev", device="meta"))
        self.assertEqual(counts["transformer"], 11_901_408_320)
        self.assertEqual(counts["text_encoder"], 123_060_480)  # CLIP ViT-L/14's text model
        self.assertEqual(counts["text_encoder_2"], 4_762_310_656)  # T5 v1.1 XXL's encoder
        self.assertEqual(counts["vae"], 83_819_683)
        schnell = tiny_flow.flux_modules(self.tokenizer, "schnell", device="meta", depth=1)["transformer"]
        self.assertFalse(schnell.config.guidance_embeds)
        self.assertEqual((schnell.config.num_layers, schnell.config.num_single_layers), (1, 1))

    def test_sd3(self):
        large = self.counts(tiny_flow.sd3_modules(self.tokenizer, self.tokenizer, "large", device="meta"))
        self.assertEqual(large["transformer"], 8_056_627_520)
        self.assertEqual(large["text_encoder"], 123_650_304)  # CLIP-L with its projection
        self.assertEqual(large["text_encoder_2"], 694_659_840)  # OpenCLIP bigG with its projection
        self.assertEqual(large["text_encoder_3"], 4_762_310_656)
        medium = tiny_flow.sd3_modules(self.tokenizer, self.tokenizer, "medium", device="meta", depth=4)
        self.assertEqual(medium["transformer"].config.dual_attention_layers, (0, 1, 2, 3))
