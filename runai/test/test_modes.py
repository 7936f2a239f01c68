"""img2img, inpaint, outpaint, long prompts, input images and the safety checker, on
tiny random-weight models: the real diffusers pipelines, on the CPU."""

import atexit
import base64
import io
import os
import shutil
import struct
import tempfile
import zlib

import numpy as np
import torch
from PIL import Image
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase, TestCase

from runai.core import errors
from runai.core import images as core_images
from runai.families import clip_text as prompts
from runai.engine.engine import Engine
from runai.core.requests import Limits
from runai.doors.legacy.parse import parse_request
from runai.core.schedulers import SCHEDULERS
from runai.test.test_e2e import LiveServer

_root = None


def models():
    """v1/tiny (ordinary), v1/tiny-inpainting (9-channel UNet), and two safety checkers."""
    global _root
    if _root is None:
        from runai.test.tiny import build_tiny_pipeline
        _root = os.path.realpath(tempfile.mkdtemp(prefix="runai-modes-"))
        # trial has no tearDownModule: remove it when the test run ends.
        atexit.register(shutil.rmtree, _root, True)
        tiny = build_tiny_pipeline(os.path.join(_root, "v1", "tiny"))
        _make_inpainting(tiny, os.path.join(_root, "v1", "tiny-inpainting"))
        _make_checker(os.path.join(_root, "checkers", "flags-all"), flag=True)
        _make_checker(os.path.join(_root, "checkers", "flags-none"), flag=False)
    return _root




def _make_inpainting(source, target):
    from diffusers import UNet2DConditionModel
    shutil.copytree(source, target)
    config = dict(UNet2DConditionModel.load_config(os.path.join(source, "unet")))
    config["in_channels"] = 9
    torch.manual_seed(7)
    unet = UNet2DConditionModel.from_config(config)
    shutil.rmtree(os.path.join(target, "unet"))
    unet.save_pretrained(os.path.join(target, "unet"))


def _make_checker(path, flag):
    """A random-weight safety checker whose thresholds flag every image, or none.

    Its concept thresholds are what decide: cosine similarities lie in [-1, 1], so a
    threshold of -2 flags everything and one of 2 flags nothing, through the real code.
    """
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor
    config = CLIPConfig(
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=100),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=8,
    )
    torch.manual_seed(3)
    checker = StableDiffusionSafetyChecker(config)
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(-2.0 if flag else 2.0)
        checker.special_care_embeds_weights.fill_(2.0)
    checker.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)


def png(image, format="PNG"):
    buf = io.BytesIO()
    image.save(buf, format=format)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def picture(size=(64, 64), mode="RGB"):
    rng = np.random.default_rng(0)
    channels = len(mode)
    data = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(data if channels > 1 else data[..., 0], mode)


def half_mask(size=(64, 64)):
    mask = Image.new("L", size, 0)
    mask.paste(255, (size[0] // 2, 0, size[0], size[1]))
    return mask


def request(action, model="v1/tiny", **options):
    opts = {f"{action}_model": model, f"{action}_prompt": "a lighthouse", f"{action}_steps": 4,
            f"{action}_seed": 11, f"{action}_width": 64, f"{action}_height": 64}
    opts.update(options)
    return {"action": action, "options": opts}


def parse(obj):
    return parse_request(obj, __import__("pathlib").Path(models()), Limits())


def run(engine, obj, cancel_after=None):
    progress, out = [], []
    engine.generate(parse(obj), lambda s, t: progress.append((s, t)), out.append,
                    lambda: cancel_after is not None and len(progress) >= cancel_after)
    return progress, out


def decoded(image):
    return np.asarray(Image.open(io.BytesIO(image.png)).convert("RGB"), dtype=np.int16)


class ModeTestCase(SynchronousTestCase):
    def setUp(self):
        models()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        self.addCleanup(torch.set_num_threads, threads)
        self.engine = Engine(device="cpu", dtype="float32")


class Img2ImgTests(ModeTestCase):
    def test_size_determinism_and_steps(self):
        obj = request("img2img", pixels=png(picture((80, 48))), img2img_strength=0.5, img2img_width=64,
                      img2img_height=96)
        progress, [image] = run(self.engine, obj)
        self.assertEqual(Image.open(io.BytesIO(image.png)).size, (64, 96))
        # strength 0.5 of 4 steps: the last 2 of the schedule run.
        self.assertEqual(progress, [(1, 2), (2, 2)])
        _, [again] = run(self.engine, obj)
        self.assertEqual(image.png, again.png)
        _, [stronger] = run(self.engine, dict(obj, options=dict(obj["options"], img2img_strength=1.0)))
        self.assertNotEqual(image.png, stronger.png)

    def test_size_defaults_to_the_picture(self):
        obj = request("img2img", pixels=png(picture((100, 75))))
        del obj["options"]["img2img_width"], obj["options"]["img2img_height"]
        self.assertEqual((parse(obj).width, parse(obj).height), (96, 72))

    def test_size_from_a_large_picture_stays_within_the_limits(self):
        obj = request("img2img", pixels=png(Image.new("RGB", (8192, 1024))))
        del obj["options"]["img2img_width"], obj["options"]["img2img_height"]
        self.assertEqual((parse(obj).width, parse(obj).height), (2048, 256))

    def test_image_with_more_bytes_than_pixels_refused(self):
        padded = base64.b64decode(png(picture((8, 8)))) + b"\0" * (2 * 1024 * 1024)
        with self.assertRaises(errors.RunaiError) as caught:
            core_images.check_image(base64.b64encode(padded).decode(), "pixels")
        self.assertEqual(caught.exception.code, errors.BAD_REQUEST)

    def test_every_scheduler(self):
        for name in SCHEDULERS:
            obj = request("img2img", pixels=png(picture()), img2img_scheduler=name, img2img_steps=3)
            _, [image] = run(self.engine, obj)
            self.assertEqual(Image.open(io.BytesIO(image.png)).size, (64, 64), name)

    def test_too_few_steps_for_strength(self):
        obj = request("img2img", pixels=png(picture()), img2img_steps=2, img2img_strength=0.3)
        self.assertRaises(errors.RunaiError, parse, obj)


class InpaintTests(ModeTestCase):
    def check_keeps_unmasked(self, model):
        source = picture()
        obj = request("inpaint", model=model, pixels=png(source), mask=png(half_mask()))
        progress, [image] = run(self.engine, obj)
        self.assertEqual(len(progress), 4)
        out = decoded(image)
        original = np.asarray(source, dtype=np.int16)
        # Unmasked: the client's own pixels. Masked: repainted.
        self.assertEqual(np.abs(out[:, :32] - original[:, :32]).max(), 0)
        self.assertGreater(np.abs(out[:, 32:] - original[:, 32:]).mean(), 10)
        _, [again] = run(self.engine, obj)
        self.assertEqual(image.png, again.png)

    def test_ordinary_model(self):
        self.check_keeps_unmasked("v1/tiny")

    def test_inpainting_model(self):
        self.check_keeps_unmasked("v1/tiny-inpainting")

    def test_inpainting_model_serves_txt2img_and_img2img(self):
        _, [image] = run(self.engine, request("txt2img", model="v1/tiny-inpainting"))
        self.assertEqual(Image.open(io.BytesIO(image.png)).size, (64, 64))
        _, [image] = run(self.engine, request("img2img", model="v1/tiny-inpainting", pixels=png(picture())))
        self.assertEqual(Image.open(io.BytesIO(image.png)).size, (64, 64))

    def test_mask_of_another_size_is_stretched(self):
        obj = request("inpaint", pixels=png(picture()), mask=png(half_mask((16, 16))))
        _, [image] = run(self.engine, obj)
        original = np.asarray(picture(), dtype=np.int16)
        self.assertEqual(np.abs(decoded(image)[:, :32] - original[:, :32]).max(), 0)

    def test_empty_mask_refused(self):
        obj = request("inpaint", pixels=png(picture()), mask=png(Image.new("L", (64, 64), 0)))
        with self.assertRaises(errors.RunaiError) as caught:
            run(self.engine, obj)
        self.assertEqual(caught.exception.code, errors.BAD_REQUEST)

    def test_every_scheduler(self):
        for name in SCHEDULERS:
            obj = request("inpaint", pixels=png(picture()), mask=png(half_mask()), inpaint_scheduler=name,
                          inpaint_steps=3)
            _, [image] = run(self.engine, obj)
            self.assertEqual(Image.open(io.BytesIO(image.png)).size, (64, 64), name)


class OutpaintTests(ModeTestCase):
    def test_transparent_part_is_repainted(self):
        canvas = picture((64, 64), "RGBA")
        pixels = np.asarray(canvas).copy()
        pixels[..., 3] = 255
        pixels[:, 40:, 3] = 0  # the empty strip to paint
        canvas = Image.fromarray(pixels, "RGBA")
        _, [image] = run(self.engine, request("outpaint", pixels=png(canvas), pos_x=-24, pos_y=0))
        out = decoded(image)
        self.assertEqual(np.abs(out[:, :40] - pixels[:, :40, :3].astype(np.int16)).max(), 0)
        self.assertEqual(image.width, 64)


class CancelTests(ModeTestCase):
    def test_every_mode_stops_at_the_next_step(self):
        for action, extra in (("txt2img", {}), ("img2img", {"pixels": png(picture())}),
                              ("inpaint", {"pixels": png(picture()), "mask": png(half_mask())}),
                              ("outpaint", {"pixels": png(picture()), "mask": png(half_mask())})):
            obj = request(action, **extra)
            obj["options"][f"{action}_steps"] = 10
            progress, out = [], []
            with self.assertRaises(errors.JobCancelled):
                self.engine.generate(parse(obj), lambda s, t: progress.append(s), out.append,
                                     lambda: len(progress) >= 1)
            self.assertEqual((progress, out), ([1], []), action)


class LongPromptTests(ModeTestCase):
    def test_long_prompt_is_encoded_in_chunks_not_cut(self):
        engine = self.engine
        long_prompt = " ".join(["lighthouse"] * 40) + " purple"
        cut_prompt = " ".join(["lighthouse"] * 40)
        engine.load(os.path.join(models(), "v1", "tiny"))
        tokenizer = engine.pipe.tokenizer
        self.assertGreater(len(prompts.token_ids(tokenizer, cut_prompt)), 75)
        embeds, negative = prompts.encode(engine.pipe, long_prompt, "", engine.device)
        chunks = embeds.shape[1] // 77
        self.assertGreater(chunks, 1)
        self.assertEqual(embeds.shape, negative.shape)
        # The words past the 75th token change the image: they were not cut.
        _, [a] = run(engine, request("txt2img", txt2img_prompt=long_prompt))
        _, [b] = run(engine, request("txt2img", txt2img_prompt=cut_prompt))
        self.assertNotEqual(a.png, b.png)

    def test_too_long_refused(self):
        with self.assertRaises(errors.RunaiError) as caught:
            run(self.engine, request("txt2img", txt2img_prompt="x " * 5000))
        self.assertEqual(caught.exception.code, errors.OUT_OF_RANGE)


def _png_claiming(width, height):
    """A tiny valid PNG whose header claims width x height: a decompression bomb's header."""
    data = base64.b64decode(png(Image.new("L", (1, 1))))
    ihdr = struct.pack(">II", width, height) + data[24:29]
    chunk = b"IHDR" + ihdr
    return base64.b64encode(data[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))
                            + data[33:]).decode("ascii")


def _png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def corrupt_images():
    """Images whose header is sound and whose pixels or metadata are not, as bytes."""
    good = {fmt: base64.b64decode(png(picture(), fmt)) for fmt in ("PNG", "JPEG", "WEBP")}
    data = good["PNG"]
    head, idat = data[:33], zlib.decompress(data[41:41 + struct.unpack(">I", data[33:37])[0]])
    stream = zlib.compress(idat)
    broken = stream[:len(stream) // 2] + b"\xff" * 64 + stream[len(stream) // 2 + 64:]
    bomb = _png_chunk(b"zTXt", b"k\0\0" + zlib.compress(b"\0" * (8 * 1024 * 1024), 9))
    end = _png_chunk(b"IEND", b"")
    return {
        "truncated PNG": data[:len(data) // 2], "truncated JPEG": good["JPEG"][:len(good["JPEG"]) // 2],
        "truncated WebP": good["WEBP"][:len(good["WEBP"]) // 2],
        "broken IDAT stream": head + _png_chunk(b"IDAT", broken) + end,
        "text-chunk bomb": head + _png_chunk(b"IDAT", stream) + bomb + end,
        "text chunks past Pillow's bound": head + _png_chunk(b"IDAT", stream)
        + _png_chunk(b"zTXt", b"k\0\0" + zlib.compress(b"a" * 1_000_000, 9)) * 70 + end,
    }


class InputImageTests(SynchronousTestCase):
    def code(self, value):
        with self.assertRaises(errors.RunaiError) as caught:
            core_images.check_image(value, "pixels")
        return caught.exception.code

    def test_formats(self):
        for fmt in ("PNG", "JPEG", "WEBP"):
            self.assertEqual(core_images.check_image(png(picture(), fmt), "pixels").format, fmt)
        for fmt in ("GIF", "BMP", "TIFF"):
            self.assertEqual(self.code(png(picture(), fmt)), errors.BAD_REQUEST, fmt)

    def test_garbage(self):
        self.assertEqual(self.code("not base64!!"), errors.BAD_REQUEST)
        self.assertEqual(self.code(base64.b64encode(b"hello").decode()), errors.BAD_REQUEST)
        self.assertEqual(self.code(""), errors.BAD_REQUEST)
        self.assertEqual(self.code(5), errors.BAD_REQUEST)

    def test_bomb_refused_from_its_header(self):
        self.assertEqual(self.code(_png_claiming(50000, 50000)), errors.OUT_OF_RANGE)
        self.assertEqual(self.code(_png_claiming(8192, 8192)), errors.OUT_OF_RANGE)

    def test_base64_length_checked_before_decoding(self):
        with self.assertRaises(errors.RunaiError) as caught:
            core_images.check_image("A" * 101, "mask", max_base64_chars=100)
        self.assertEqual(caught.exception.code, errors.OUT_OF_RANGE)

    def test_data_url_and_alpha(self):
        encoded = core_images.check_image("data:image/png;base64," + png(picture(mode="RGBA")), "pixels")
        self.assertEqual(encoded.mode, "RGBA")

    def test_missing_pixels(self):
        with self.assertRaises(errors.RunaiError) as caught:
            parse(request("img2img"))
        self.assertEqual(caught.exception.code, errors.BAD_REQUEST)

    def test_corrupt_images_refused_on_arrival_naming_the_option(self):
        # Decoded whole on arrival: not answered "internal" after waiting in the queue.
        for name, data in corrupt_images().items():
            encoded = base64.b64encode(data).decode("ascii")
            for what, options in (("pixels", {"pixels": encoded}),
                                  ("mask", {"pixels": png(picture()), "mask": encoded})):
                with self.assertRaises(errors.RunaiError, msg=f"{name} as {what}") as caught:
                    parse(request("inpaint", **options))
                self.assertEqual(caught.exception.code, errors.BAD_REQUEST, f"{name} as {what}")
                self.assertIn(repr(what), caught.exception.message, name)

    def test_the_worker_refuses_a_corrupt_image_too(self):
        # Should one ever get past arrival: the client's error, not a crash of the worker.
        from runai.engine import images as engine_images
        data = corrupt_images()["broken IDAT stream"]
        with self.assertRaises(errors.RunaiError) as caught:
            engine_images.prepare(core_images.EncodedImage(data, "PNG", 64, 64, "RGB"), None, 64, 64, False)
        self.assertEqual(caught.exception.code, errors.BAD_REQUEST)
        self.assertIn("'pixels'", caught.exception.message)


class SafetyCheckerTests(ModeTestCase):
    def use_checker(self, which):
        target = os.path.join(models(), "CompVis", "stable-diffusion-safety-checker")
        if os.path.lexists(target):
            shutil.rmtree(target)
        if which is not None:
            shutil.copytree(os.path.join(models(), "checkers", which), target)
        self.addCleanup(lambda: shutil.rmtree(target, ignore_errors=True))

    def test_flagged_images_are_withheld(self):
        self.use_checker("flags-all")
        _, [image] = run(self.engine, request("txt2img", do_nsfw_filter=True))
        self.assertTrue(image.withheld)
        self.assertEqual(image.png, b"")

    def test_clean_images_are_marked_checked(self):
        self.use_checker("flags-none")
        _, [image] = run(self.engine, request("txt2img", do_nsfw_filter=True))
        self.assertFalse(image.withheld)
        self.assertTrue(image.nsfw_checked)
        _, [unasked] = run(self.engine, request("txt2img", do_nsfw_filter=False))
        self.assertIsNone(unasked.nsfw_checked)
        self.assertEqual(image.png, unasked.png)

    def test_missing_checker_is_never_silent(self):
        self.use_checker(None)
        _, [image] = run(self.engine, request("txt2img", do_nsfw_filter=True))
        self.assertIs(image.nsfw_checked, False)


class SocketTests(LiveServer, TestCase):
    """Every mode through the socket, with a legacy-format client."""

    timeout = 300

    def setUp(self):
        self.start_server(models())

    @inlineCallbacks
    def test_modes_through_the_socket(self):
        answers = yield self.talk(
            request("img2img", pixels=png(picture())),
            request("inpaint", pixels=png(picture()), mask=png(half_mask())),
            request("outpaint", pixels=png(picture()), mask=png(half_mask()), pos_x=64, pos_y=-32),
            request("img2img", pixels="bm90IGFuIGltYWdl"),
            request("inpaint", pixels=png(picture()), mask=_png_claiming(50000, 50000)),
        )
        for action, replies in zip(("img2img", "inpaint", "outpaint"), answers):
            [image] = [m for m in replies if "image" in m]
            self.assertEqual(image["reqtype"], action)
            self.assertEqual(Image.open(io.BytesIO(base64.b64decode(image["image"]))).size, (64, 64))
            self.assertEqual(replies[-1]["action"], "done")
        outpaint = next(m for m in answers[2] if "image" in m)
        self.assertEqual((outpaint["pos_x"], outpaint["pos_y"]), (64, -32))
        self.assertEqual(answers[3][-1]["error"]["code"], errors.BAD_REQUEST)
        self.assertEqual(answers[4][-1]["error"]["code"], errors.OUT_OF_RANGE)

    @inlineCallbacks
    def test_withheld_and_refused(self):
        target = os.path.join(models(), "CompVis", "stable-diffusion-safety-checker")
        shutil.copytree(os.path.join(models(), "checkers", "flags-all"), target)
        self.addCleanup(shutil.rmtree, target, True)
        [replies] = yield self.talk(request("txt2img", do_nsfw_filter=True))
        self.assertFalse(any("image" in m for m in replies))
        withheld = [m for m in replies if m.get("action") == "withheld"]
        self.assertEqual([(m["reason"], m["seed"]) for m in withheld], [("nsfw", 11)])
        shutil.rmtree(target)
        self.core.refuse_unchecked = True
        [replies] = yield self.talk(request("txt2img", do_nsfw_filter=True))
        self.assertEqual(replies[-1]["error"]["code"], errors.SAFETY_CHECKER_MISSING)
