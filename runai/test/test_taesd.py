"""TAESD live previews: decoders found in the model folder (A1111's/ComfyUI's single file,
a diffusers AutoencoderTiny folder), full-size previews mid-job, and the linear map when
the weights are absent, refused or broken."""

import atexit
import base64
import io
import os
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderTiny
from PIL import Image
from safetensors.torch import save_file
from twisted.internet.defer import inlineCallbacks
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from runai import families
from runai.core.requests import GenerationRequest
from runai.engine.engine import Engine, encode_png
from runai.engine.previews import Previews
from runai.models import taesd
from runai.models.library import ModelLibrary
from runai.test import test_http
from runai.test.test_e2e import legacy_request
from runai.test.test_http import HttpTestCase

_built = {}


def tiny_taesd(latent_channels, seed=0):
    """A random AutoencoderTiny of a few KB: TAESD's architecture, narrow."""
    torch.manual_seed(seed)
    return AutoencoderTiny(latent_channels=latent_channels, encoder_block_out_channels=(8, 8, 8, 8),
                           decoder_block_out_channels=(8, 8, 8, 8), num_encoder_blocks=(1, 1, 1, 1),
                           num_decoder_blocks=(1, 1, 1, 1)).eval()


def original_decoder_state(model):
    """The decoder's weights as TAESD's own file names them (diffusers' layer k is its k + 1)."""
    return {f"{int(k.split('.')[0]) + 1}.{k.split('.', 1)[1]}": v.contiguous()
            for k, v in model.decoder.layers.state_dict().items()}


def write_file(model, path):
    """``model``'s decoder as A1111 and ComfyUI keep it: one safetensors file of TAESD's keys."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(original_decoder_state(model), str(path))
    return path


def write_folder(model, path):
    """``model`` as a diffusers folder (``config.json``, ``diffusion_pytorch_model.safetensors``)."""
    model.save_pretrained(str(path), safe_serialization=True)
    return path


def sources():
    """Built once: a tiny SD pipeline folder and the tiny decoders (4 and 16 channels)."""
    if not _built:
        from runai.test.tiny import build_tiny_pipeline

        root = Path(os.path.realpath(tempfile.mkdtemp(prefix="runai-taesd-")))
        atexit.register(shutil.rmtree, root, True)
        build_tiny_pipeline(root / "pipeline")
        _built.update(root=root, four=tiny_taesd(4), sixteen=tiny_taesd(16, seed=1))
    return _built


def size_of(png):
    with Image.open(io.BytesIO(png)) as image:
        return image.size


class Folder:
    """A model folder holding the tiny pipeline as v1/tiny and what a test puts beside it."""

    def __init__(self, case):
        built = sources()
        self.root = Path(os.path.realpath(case.mktemp()))
        shutil.copytree(built["root"] / "pipeline", self.root / "v1" / "tiny")

    def single_file(self, model, name="taesd", folder="VAE-approx"):
        return write_file(model, self.root / folder / f"{name}_decoder.safetensors")

    def diffusers_folder(self, model, relative="madebyollin/taesd"):
        return write_folder(model, self.root / relative)

    def engine(self, decoder="auto"):
        return Engine(device="cpu", dtype="float32", library=ModelLibrary(str(self.root)), preview_decoder=decoder)

    def request(self, **fields):
        return GenerationRequest(**dict(dict(action="txt2img", model_path=str(self.root / "v1" / "tiny"),
                                             model_name="v1/tiny", prompt="a lighthouse", steps=4, width=64,
                                             height=48, seed=3, preview_every=2), **fields))


def run_job(engine, request):
    previews, images = [], []

    def on_progress(step, total, preview=None):
        if preview is not None:
            previews.append(preview)
    engine.generate(request, on_progress, images.append, lambda: False)
    return previews, images[0].png


def warnings_of(events):
    return [formatEvent(e) for e in events if e.get("log_level") is not None and e["log_level"].name == "warn"]


class JobTests(SynchronousTestCase):
    def test_a1111_single_file_gives_full_size_previews_unlike_the_linear_map(self):
        folder = Folder(self)
        folder.single_file(sources()["four"])
        engine = folder.engine()
        previews, image = run_job(engine, folder.request())
        self.assertEqual([size_of(png) for png in previews], [(64, 48), (64, 48)])
        self.assertNotEqual(previews[0], previews[1])  # the picture changes as it forms
        again, image_again = run_job(engine, folder.request())
        self.assertEqual((again, image_again), (previews, image))  # same seed, same bytes
        cheap, cheap_image = run_job(folder.engine("cheap"), folder.request())
        self.assertEqual([size_of(png) for png in cheap], [(8, 6), (8, 6)])
        self.assertEqual(cheap_image, image)  # previews never change the image
        other_seed, _ = run_job(engine, folder.request(seed=4))
        self.assertNotEqual(other_seed, previews)

    def test_a_diffusers_folder_decodes_as_the_same_weights_in_a_single_file(self):
        model = sources()["four"]
        folder = Folder(self)
        folder.diffusers_folder(model)
        from_folder, _ = run_job(folder.engine(), folder.request())
        other = Folder(self)
        other.single_file(model, folder="vae_approx")
        from_file, _ = run_job(other.engine(), other.request())
        self.assertEqual([size_of(png) for png in from_folder], [(64, 48), (64, 48)])
        self.assertEqual(from_folder, from_file)

    def test_without_weights_the_linear_map(self):
        folder = Folder(self)
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        previews, _ = run_job(folder.engine(), folder.request())
        self.assertEqual([size_of(png) for png in previews], [(8, 6), (8, 6)])
        self.assertEqual(warnings_of(events), [])
        told = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        previews, _ = run_job(folder.engine("taesd"), folder.request())
        self.assertEqual([size_of(png) for png in previews], [(8, 6), (8, 6)])
        self.assertEqual(len([w for w in warnings_of(told) if "no taesd decoder" in w]), 1)

    def test_corrupt_weights_fall_back_with_one_clear_log_line_and_no_failed_job(self):
        folder = Folder(self)
        path = folder.single_file(sources()["four"])
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json" + bytes(100))
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        engine = folder.engine()
        previews, image = run_job(engine, folder.request())
        run_job(engine, folder.request())
        self.assertEqual([size_of(png) for png in previews], [(8, 6), (8, 6)])
        [warning] = warnings_of(events)
        self.assertIn("TAESD decoder refused (VAE-approx/taesd_decoder.safetensors is not a readable safetensors", warning)
        self.assertIn("linear map", warning)
        # Good weights put in its place are taken up without a restart.
        folder.single_file(sources()["four"])
        previews, again = run_job(engine, folder.request())
        self.assertEqual([size_of(png) for png in previews], [(64, 48), (64, 48)])
        self.assertEqual(again, image)


class RefusedTests(SynchronousTestCase):
    """What a decoder may not be: each gives the linear map and a warning naming why."""

    def picture(self, root, family="v1", latents=None):
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        family = families.for_version(family)
        latents = torch.randn(1, family.latent.channels, 6, 8) if latents is None else latents
        image = Previews(root, "cpu", torch.float32).picture(family, latents, 48, 64)
        return image.size, warnings_of(events)

    def root(self):
        root = Path(os.path.realpath(self.mktemp()))
        root.mkdir()
        return root

    def test_a_decoder_of_the_wrong_latent_channels(self):
        root = self.root()
        write_file(sources()["sixteen"], root / "VAE-approx" / "taesd_decoder.safetensors")
        size, [warning] = self.picture(root)
        self.assertEqual(size, (8, 6))
        self.assertIn("takes 16 latent channels", warning)

    def test_a_link_out_of_the_model_folder(self):
        root, outside = self.root(), self.root()
        save_file(original_decoder_state(sources()["four"]), str(outside / "taesd_decoder.safetensors"))
        (root / "VAE-approx").symlink_to(outside)
        size, [warning] = self.picture(root)
        self.assertEqual(size, (8, 6))
        self.assertIn("outside the model folder", warning)

    def test_a_file_too_big(self):
        root = self.root()
        write_file(sources()["four"], root / "vae_approx" / "taesd_decoder.safetensors")
        self.patch(taesd, "MAX_BYTES", 1000)
        size, [warning] = self.picture(root)
        self.assertEqual(size, (8, 6))
        self.assertIn("too big", warning)

    def test_a_folder_that_is_not_an_autoencoder_tiny(self):
        root = self.root()
        folder = write_folder(sources()["four"], root / "taesd")
        config = (folder / "config.json").read_text().replace('"AutoencoderTiny"', '"AutoencoderKL"')
        (folder / "config.json").write_text(config)
        size, [warning] = self.picture(root)
        self.assertEqual(size, (8, 6))
        self.assertIn("not an AutoencoderTiny", warning)

    def test_a_config_that_would_build_a_huge_network(self):
        import json

        for change, why in (({"decoder_block_out_channels": [100000] * 4}, "sensible size"),
                            ({"num_decoder_blocks": 3}, "does not describe a TAESD decoder"),
                            ({"act_fn": "os.system"}, "sensible size")):
            root = self.root()
            folder = write_folder(sources()["four"], root / "madebyollin" / "taesd")
            config = dict(json.loads((folder / "config.json").read_text()), **change)
            (folder / "config.json").write_text(json.dumps(config))
            size, [warning] = self.picture(root)
            self.assertEqual(size, (8, 6))
            self.assertIn(why, warning)

    def test_a_file_of_other_keys(self):
        root = self.root()
        (root / "VAE-approx").mkdir()
        save_file({"first_stage_model.weight": torch.zeros(2)}, str(root / "VAE-approx" / "taesd_decoder.safetensors"))
        size, [warning] = self.picture(root)
        self.assertEqual(size, (8, 6))
        self.assertIn("not a TAESD decoder", warning)

    def test_only_safetensors(self):
        root = self.root()
        (root / "VAE-approx").mkdir()
        torch.save(original_decoder_state(sources()["four"]), str(root / "VAE-approx" / "taesd_decoder.pth"))
        self.assertEqual(self.picture(root), ((8, 6), []))


class FamilyTests(SynchronousTestCase):
    """Every family's decoder by name; FLUX.1's latents unpacked first."""

    def test_each_family_finds_its_own_decoder(self):
        root = Path(os.path.realpath(self.mktemp()))
        model = sources()["sixteen"]
        names = [families.for_version(v).latent.taesd for v in ("v1", "v2", "sdxl", "sd3", "flux")]
        self.assertEqual(names, ["taesd", "taesd", "taesdxl", "taesd3", "taef1"])
        write_folder(model, root / "taesd3")
        self.assertIsNone(taesd.find(root, "taef1"))
        self.assertEqual(taesd.find(root, "taesd3").name, "taesd3")

    def test_flux_latents_are_unpacked_before_taef1(self):
        root = Path(os.path.realpath(self.mktemp()))
        model = sources()["sixteen"]
        write_file(model, root / "vae_approx" / "taef1_decoder.safetensors")
        flux = families.for_version("flux")
        torch.manual_seed(5)
        packed = torch.randn(1, (6 // 2) * (8 // 2), 16 * 4)  # a 64x48 picture's latents, 2x2-packed
        image = Previews(root, "cpu", torch.float32).picture(flux, packed, 48, 64)
        self.assertEqual(image.size, (64, 48))
        with torch.inference_mode():
            rgb = model.decoder(flux.unpack(packed, 48, 64))[0]
        expected = ((rgb + 1.0) * 127.5).clamp(0, 255).to(torch.uint8).movedim(0, -1).numpy()
        self.assertEqual(encode_png(image), encode_png(Image.fromarray(expected, "RGB")))
        sd3 = Previews(root, "cpu", torch.float32).picture(families.for_version("sd3"), torch.randn(1, 16, 6, 8), 48, 64)
        self.assertEqual(sd3.size, (8, 6))  # taef1 is FLUX.1's alone

    def test_cheap_never_looks_and_a_bad_switch_is_refused(self):
        root = Path(os.path.realpath(self.mktemp()))
        write_file(sources()["four"], root / "VAE-approx" / "taesd_decoder.safetensors")
        v1 = families.for_version("v1")
        latents = torch.randn(1, 4, 6, 8)
        self.assertEqual(Previews(root, "cpu", torch.float32, "cheap").picture(v1, latents, 48, 64).size, (8, 6))
        self.assertEqual(Previews(None, "cpu", torch.float32).picture(v1, latents, 48, 64).size, (8, 6))
        self.assertEqual(Previews(root, "cpu", torch.float32).picture(v1, latents, 48, 64).size, (64, 48))
        self.assertRaises(ValueError, Previews, root, "cpu", torch.float32, "fancy")


    def test_forget_drops_the_loaded_decoders_and_the_next_preview_loads_again(self):
        root = Path(os.path.realpath(self.mktemp()))
        write_file(sources()["four"], root / "VAE-approx" / "taesd_decoder.safetensors")
        v1 = families.for_version("v1")
        latents = torch.randn(1, 4, 6, 8)
        previews = Previews(root, "cpu", torch.float32)
        first = encode_png(previews.picture(v1, latents, 48, 64))
        self.assertEqual(list(previews._loaded), ["taesd"])
        previews.forget()  # what an unload (Engine.unload) does
        self.assertEqual(previews._loaded, {})
        self.assertEqual(encode_png(previews.picture(v1, latents, 48, 64)), first)
        self.assertEqual(list(previews._loaded), ["taesd"])

class OptionTests(SynchronousTestCase):
    def test_preview_decoder_reaches_each_workers_engine(self):
        from twisted.internet.testing import MemoryReactorClock

        from runai import tap
        from runai.engine import previews
        from runai.options import PREVIEW_DECODERS, OptionError

        self.assertEqual(PREVIEW_DECODERS, previews.DECODERS)
        options = tap.Options()
        options.parseOptions(["--port", "0", "--device", "cpu", "--preview-decoder", "cheap",
                              "--model-dir", os.path.realpath(self.mktemp())])
        service = tap.makeService(options, reactor=MemoryReactorClock())
        [worker] = [s for s in service if type(s).__name__ == "LocalWorker"]
        self.assertEqual(worker.engine_options["preview_decoder"], "cheap")
        default = tap.Options()
        default.parseOptions([])
        self.assertEqual(default["preview-decoder"], "auto")
        self.assertRaises(OptionError, tap.Options().parseOptions, ["--preview-decoder", "fancy"])


class DoorTests(HttpTestCase):
    """A TAESD decoder in the server's model folder: full-size previews on the socket's
    progress messages and in /progress's current_image."""

    def setUp(self):
        folder = Folder(self)
        folder.single_file(sources()["four"])
        self.patch(test_http, "tiny_model_dir", lambda: str(folder.root))
        super().setUp()

    @inlineCallbacks
    def test_socket_progress_carries_full_size_taesd_previews(self):
        [replies] = yield self.talk(legacy_request(self.models, steps=4, txt2img_preview_every=2))
        previews = [base64.b64decode(m["preview"]) for m in replies if m.get("action") == 4 and "preview" in m]
        self.assertEqual([size_of(png) for png in previews], [(64, 64), (64, 64)])
        [again] = yield self.talk(legacy_request(self.models, steps=4, txt2img_preview_every=2))
        self.assertEqual([base64.b64decode(m["preview"]) for m in again if "preview" in m], previews)
