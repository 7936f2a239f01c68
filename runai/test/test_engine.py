"""Tests for runai.engine.engine (and the device and precision it picks, runai.engine.device),
on a tiny random-weight pipeline built once per test run.

The images are noise; what is tested is the plumbing: sizes, seeds, determinism,
progress, cancellation, scheduler switching and model (re)loading.
"""

import atexit
import io
import json
import logging
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

import torch

from runai.core import errors
from runai.engine.engine import Engine, GeneratedImage, encode_png
from runai.core.requests import GenerationRequest
from runai.core.schedulers import SCHEDULERS
from runai.test.tiny import build_tiny_pipeline

_models = {}


def tiny_model(name="tiny"):
    """Path of a tiny model folder, built on first use and shared by all the tests:
    building is cheap, but not free, and the tests never write to it."""
    if "root" not in _models:
        root = tempfile.mkdtemp(prefix="runai-test-engine-")
        atexit.register(shutil.rmtree, root, True)
        _models["root"] = Path(root)
    if name not in _models:
        path = _models["root"] / name
        if name == "tiny":
            build_tiny_pipeline(path)
        else:
            # A second model at another path: a copy, so that what differs is the path.
            shutil.copytree(tiny_model(), path)
        _models[name] = str(path)
    return _models[name]


def request(**overrides):
    fields = dict(
        action="txt2img",
        model_path=tiny_model(),
        model_name="tiny",
        prompt="a lighthouse at dusk",
        steps=2,
        width=64,
        height=64,
        seed=1234,
        scheduler="euler_a",
    )
    fields.update(overrides)
    return GenerationRequest(**fields)


class Recorder:
    """The three callbacks of Engine.generate, recording what they were given."""

    def __init__(self, cancel_when=None):
        self.progress = []
        self.images = []
        self.cancel_when = cancel_when or (lambda recorder: False)

    def on_progress(self, step, total):
        self.progress.append((step, total))

    def on_image(self, image):
        self.images.append(image)

    def is_cancelled(self):
        return self.cancel_when(self)

    def run(self, engine, req):
        return engine.generate(req, self.on_progress, self.on_image, self.is_cancelled)


def generate(engine, req):
    recorder = Recorder()
    count = recorder.run(engine, req)
    assert count == len(recorder.images)
    return recorder


def pixels(image):
    return np.asarray(Image.open(io.BytesIO(image.png)).convert("RGB"), dtype=np.int16)


def png_chunk_types(data):
    types = []
    pos = 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        types.append(data[pos + 4 : pos + 8].decode("ascii"))
        pos += 12 + length
    return types


class EngineTestCase(SynchronousTestCase):
    """One intra-op thread: the tiny model gains nothing from more, and on a busy
    machine (CI, other tests in parallel) OpenMP's spinning threads can make these
    tests ten times slower."""

    def setUp(self):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        self.addCleanup(torch.set_num_threads, threads)
        self.engine = Engine(device="cpu")


class ImageTests(EngineTestCase):

    def test_png_of_requested_size(self):
        recorder = generate(self.engine, request(width=96, height=64))
        self.assertEqual(len(recorder.images), 1)
        image = recorder.images[0]
        self.assertIsInstance(image, GeneratedImage)
        self.assertEqual((image.width, image.height, image.seed, image.index), (96, 64, 1234, 0))
        decoded = Image.open(io.BytesIO(image.png))
        self.assertEqual(decoded.format, "PNG")
        self.assertEqual(decoded.size, (96, 64))
        self.assertEqual(decoded.mode, "RGB")

    def test_png_has_no_metadata(self):
        # Text or time chunks would make equal images differ in bytes.
        png = generate(self.engine, request()).images[0].png
        self.assertEqual(set(png_chunk_types(png)), {"IHDR", "IDAT", "IEND"})
        self.assertEqual(encode_png(Image.open(io.BytesIO(png))), png)

    def test_same_request_same_bytes(self):
        first = generate(self.engine, request()).images[0].png
        again = generate(self.engine, request()).images[0].png
        # A fresh engine loads the model again: loading must not perturb anything either.
        fresh = generate(Engine(device="cpu"), request()).images[0].png
        self.assertEqual(first, again)
        self.assertEqual(first, fresh)

    def test_different_seed_different_bytes(self):
        a = generate(self.engine, request(seed=1)).images[0]
        b = generate(self.engine, request(seed=2)).images[0]
        self.assertNotEqual(a.png, b.png)

    def test_prompt_changes_image(self):
        a = generate(self.engine, request(prompt="a cat")).images[0]
        b = generate(self.engine, request(prompt="a dog")).images[0]
        self.assertNotEqual(a.png, b.png)

    def test_batch_images_have_consecutive_seeds(self):
        batch = generate(self.engine, request(seed=40, n_samples=2)).images
        self.assertEqual([(i.seed, i.index) for i in batch], [(40, 0), (41, 1)])
        self.assertNotEqual(batch[0].png, batch[1].png)
        alone = generate(self.engine, request(seed=41)).images[0]
        # Each image has its own generator, so image 1 of the batch starts from the same
        # noise as seed 41 alone. The pixels are not always bit-equal: a batch of 2
        # (4 with guidance) takes other matmul/conv code paths than a batch of 1, and
        # the float32 rounding differences can move a pixel by one level.
        self.assertLessEqual(int(np.abs(pixels(batch[1]) - pixels(alone)).max()), 2)

    def test_iterations_have_consecutive_seeds(self):
        images = generate(self.engine, request(seed=40, n_iter=3)).images
        self.assertEqual([(i.seed, i.index) for i in images], [(40, 0), (41, 1), (42, 2)])
        alone = generate(self.engine, request(seed=42)).images[0]
        # Batches of one compute exactly as a single request does.
        self.assertEqual(images[2].png, alone.png)

    def test_samples_and_iterations(self):
        images = generate(self.engine, request(seed=7, n_samples=2, n_iter=2)).images
        self.assertEqual([(i.seed, i.index) for i in images], [(7, 0), (8, 1), (9, 2), (10, 3)])
        self.assertEqual(len({i.png for i in images}), 4)

    def test_ddim_eta_is_used(self):
        # eta > 0 makes DDIM stochastic, so it must change the image: proof it is passed.
        still = generate(self.engine, request(scheduler="ddim", ddim_eta=0.0)).images[0]
        noisy = generate(self.engine, request(scheduler="ddim", ddim_eta=1.0)).images[0]
        self.assertNotEqual(still.png, noisy.png)

    def test_unserved_action(self):
        with self.assertRaises(errors.RunaiError) as caught:
            generate(self.engine, request(action="convert"))
        self.assertEqual(caught.exception.code, errors.NOT_IMPLEMENTED)


class ProgressTests(EngineTestCase):

    def test_progress_per_step(self):
        recorder = generate(self.engine, request(steps=3))
        self.assertEqual(recorder.progress, [(1, 3), (2, 3), (3, 3)])

    def test_progress_counts_over_iterations(self):
        recorder = generate(self.engine, request(steps=2, n_iter=3, n_samples=2))
        self.assertEqual(recorder.progress, [(step, 6) for step in range(1, 7)])
        self.assertEqual(len(recorder.images), 6)

    def test_progress_of_second_order_scheduler(self):
        # Heun evaluates the model twice per step but the last: the total is the
        # number of model evaluations, which is what takes time.
        recorder = generate(self.engine, request(steps=3, scheduler="heun", n_iter=2))
        total = 2 * (2 * 3 - 1)
        self.assertEqual(recorder.progress, [(step, total) for step in range(1, total + 1)])

    def test_cancel_during_steps(self):
        recorder = Recorder(cancel_when=lambda r: len(r.progress) >= 1)
        with self.assertRaises(errors.JobCancelled) as caught:
            recorder.run(self.engine, request(steps=4, n_iter=2))
        self.assertEqual(caught.exception.code, errors.CANCELLED)
        self.assertEqual(recorder.progress, [(1, 8)])
        self.assertEqual(recorder.images, [])

    def test_cancel_between_iterations(self):
        recorder = Recorder(cancel_when=lambda r: len(r.images) >= 1)
        with self.assertRaises(errors.JobCancelled):
            recorder.run(self.engine, request(steps=2, n_iter=3))
        self.assertEqual(len(recorder.images), 1)
        self.assertEqual(recorder.progress, [(1, 6), (2, 6)])

    def test_cancel_before_start(self):
        recorder = Recorder(cancel_when=lambda r: True)
        with self.assertRaises(errors.JobCancelled):
            recorder.run(self.engine, request())
        self.assertEqual((recorder.progress, recorder.images), ([], []))
        # Not even the model was loaded: a cancelled job must not cost a load.
        self.assertEqual(self.engine.load_count, 0)

    def test_engine_usable_after_cancel(self):
        with self.assertRaises(errors.JobCancelled):
            Recorder(cancel_when=lambda r: len(r.progress) >= 1).run(self.engine, request())
        after = generate(self.engine, request()).images[0]
        fresh = generate(Engine(device="cpu"), request()).images[0]
        self.assertEqual(after.png, fresh.png)


class SchedulerTests(EngineTestCase):

    def test_every_scheduler(self):
        for name in SCHEDULERS:
            recorder = generate(self.engine, request(scheduler=name))
            self.assertEqual(len(recorder.images), 1, name)
            self.assertEqual(Image.open(io.BytesIO(recorder.images[0].png)).size, (64, 64), name)
            total = recorder.progress[-1][1]
            self.assertEqual(recorder.progress, [(s, total) for s in range(1, total + 1)], name)
            self.assertGreaterEqual(total, 2, name)

    def test_schedulers_do_not_leak_into_each_other(self):
        # Karras sigmas, and DPM singlestep's habit of rewriting its own config in
        # set_timesteps, must not carry over to the next request's scheduler.
        before = generate(self.engine, request(steps=3)).images[0].png
        for name in ("dpmpp_2m_karras", "dpmpp_sde", "lms_karras", "plms"):
            generate(self.engine, request(steps=3, scheduler=name))
        after = generate(self.engine, request(steps=3)).images[0].png
        self.assertEqual(before, after)
        self.assertEqual(self.engine.load_count, 1)

    def test_schedulers_differ(self):
        a = generate(self.engine, request(scheduler="euler")).images[0].png
        b = generate(self.engine, request(scheduler="dpmpp_2m")).images[0].png
        self.assertNotEqual(a, b)


class LoadingTests(EngineTestCase):

    def test_model_stays_loaded(self):
        generate(self.engine, request())
        pipe = self.engine.pipe
        generate(self.engine, request(seed=99))
        self.assertEqual(self.engine.load_count, 1)
        self.assertIs(self.engine.pipe, pipe)

    def test_other_model_replaces_loaded_one(self):
        first = generate(self.engine, request()).images[0].png
        other = generate(self.engine, request(model_path=tiny_model("copy"), model_name="copy"))
        self.assertEqual(self.engine.load_count, 2)
        self.assertEqual(self.engine.model_path, tiny_model("copy"))
        self.assertEqual(other.images[0].png, first)
        generate(self.engine, request())
        self.assertEqual(self.engine.load_count, 3)

    def assertLoadFails(self, path, name="broken"):
        with self.assertRaises(errors.RunaiError) as caught:
            generate(self.engine, request(model_path=str(path), model_name=name))
        error = caught.exception
        self.assertEqual(error.code, errors.MODEL_LOAD_FAILED)
        self.assertIn(repr(name), error.message)
        # The client named the model; the server's folder layout is not its business.
        self.assertNotIn(str(path), error.message)
        self.assertIsNone(self.engine.pipe)
        return error

    def test_missing_model(self):
        self.assertLoadFails(Path(self.mktemp()).absolute() / "nowhere", "nowhere")

    def test_broken_model_index(self):
        path = Path(self.mktemp()).absolute()
        path.mkdir()
        (path / "model_index.json").write_text("{not json")
        self.assertLoadFails(path)

    def test_missing_weights(self):
        path = Path(self.mktemp()).absolute()
        shutil.copytree(tiny_model(), path)
        for weights in (path / "unet").glob("*.safetensors"):
            weights.unlink()
        self.assertLoadFails(path)

    def test_wrong_component_class(self):
        path = Path(self.mktemp()).absolute()
        shutil.copytree(tiny_model(), path)
        index = json.loads((path / "model_index.json").read_text())
        index["unet"] = ["diffusers", "NoSuchModel"]
        (path / "model_index.json").write_text(json.dumps(index))
        self.assertLoadFails(path)

    def test_a_tokenizer_json_alone_is_a_tokenizer(self):
        # What current transformers writes: no vocab.json and merges.txt beside it.
        path = Path(self.mktemp()).absolute()
        shutil.copytree(tiny_model(), path)
        self.assertTrue((path / "tokenizer" / "tokenizer.json").is_file())
        for name in ("vocab.json", "merges.txt"):
            (path / "tokenizer" / name).unlink()
        alone = generate(self.engine, request(model_path=str(path), model_name="json")).images[0].png
        self.assertEqual(alone, generate(self.engine, request()).images[0].png)

    def test_failed_load_unloads_previous_and_recovers(self):
        generate(self.engine, request())
        self.assertLoadFails(Path(self.mktemp()).absolute() / "nowhere", "nowhere")
        self.assertIsNone(self.engine.model_path)
        self.assertEqual(len(generate(self.engine, request()).images), 1)
        self.assertEqual(self.engine.load_count, 2)

    def test_prompt_not_logged_above_debug(self):
        # A prompt longer than CLIP's 77 tokens is encoded in chunks and logged as such;
        # prompts stay out of any log but the debug one.
        secret = "zebra " * 60
        events = []
        records = []

        class Handler(logging.Handler):
            def emit(self, record):
                records.append(record.getMessage())

        handler = Handler()
        diffusers_logger = logging.getLogger("diffusers")
        diffusers_logger.addHandler(handler)
        globalLogPublisher.addObserver(events.append)
        try:
            generate(self.engine, request(prompt=secret, negative_prompt=secret))
        finally:
            globalLogPublisher.removeObserver(events.append)
            diffusers_logger.removeHandler(handler)
        for message in records:
            self.assertNotIn("zebra", message)
        for event in events:
            if event.get("log_level") != LogLevel.debug:
                self.assertNotIn("zebra", repr(event))
        self.assertTrue(any("in {n} chunks" in (e.get("log_format") or "") for e in events), "chunking is reported")


class DeviceTests(EngineTestCase):
    def test_cpu(self):
        engine = Engine(device="cpu")
        self.assertEqual((engine.device.type, engine.dtype), ("cpu", torch.float32))

    def test_auto(self):
        engine = Engine()
        expected = "cuda" if torch.cuda.is_available() else "cpu"
        self.assertEqual(engine.device.type, expected)
        self.assertEqual(engine.dtype, torch.float16 if expected == "cuda" else torch.float32)

    def test_dtypes(self):
        for name, dtype in (("float16", torch.float16), ("bfloat16", torch.bfloat16), ("float32", torch.float32)):
            self.assertEqual(Engine(device="cpu", dtype=name).dtype, dtype)

    def test_model_loaded_in_engine_dtype(self):
        # The folder holds float32 weights; the engine's dtype must win, as it will for
        # float32 checkpoints served in float16 on a GPU.
        engine = Engine(device="cpu", dtype="bfloat16")
        recorder = generate(engine, request())
        self.assertEqual(len(recorder.images), 1)
        for module in (engine.pipe.unet, engine.pipe.vae, engine.pipe.text_encoder):
            self.assertEqual(module.dtype, torch.bfloat16)

    def test_bad_dtype(self):
        with self.assertRaises(errors.RunaiError):
            Engine(device="cpu", dtype="int8")

    def test_bad_device(self):
        for device in ("tpu", "not a device", "mps"):
            with self.assertRaises(errors.RunaiError):
                Engine(device=device)

    def test_cuda_unavailable(self):
        if torch.cuda.is_available():
            raise self.skipTest("CUDA is available here")
        for device in ("cuda", "cuda:0", "cuda:3"):
            with self.assertRaises(errors.RunaiError) as caught:
                Engine(device=device)
            self.assertEqual(caught.exception.code, errors.INTERNAL)
            self.assertIn("CUDA", caught.exception.message)


class OutOfMemoryEngine(Engine):
    """The real engine on a device that cannot fit a batch of more than one image."""

    def _run_batch(self, pipe, request, seeds, *args):
        if len(seeds) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated: this is the CPU)")
        return super()._run_batch(pipe, request, seeds, *args)


class BatchFallbackTests(EngineTestCase):
    def test_a_batch_that_does_not_fit_runs_one_image_at_a_time(self):
        engine = OutOfMemoryEngine(device="cpu", dtype="float32")
        recorder = generate(engine, request(n_samples=3, n_iter=2, steps=2, seed=40))
        self.assertEqual([image.seed for image in recorder.images], [40, 41, 42, 43, 44, 45])
        steps = [step for step, total in recorder.progress]
        self.assertEqual(steps, list(range(1, len(steps) + 1)))
        # One image at a time from the first batch on: 6 runs of 2 steps, all counted.
        self.assertEqual(recorder.progress[-1], (12, 12))
        # Each image is the one a single request with its seed gives.
        single = generate(self.engine, request(seed=42, steps=2))
        self.assertEqual(recorder.images[2].png, single.images[0].png)

    def test_a_single_image_that_does_not_fit_is_an_error(self):
        class NothingFits(Engine):
            def _run_batch(self, *args):
                raise torch.OutOfMemoryError("simulated")
        with self.assertRaises(errors.RunaiError) as caught:
            generate(NothingFits(device="cpu", dtype="float32"), request(n_samples=2))
        self.assertEqual(caught.exception.code, errors.OUT_OF_MEMORY)
