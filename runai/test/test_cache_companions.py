"""runai.models.sources, and what it gives runai.models.cache and loadlock: a cached pipeline
is loaded again once a file it was built from changes on disk (a FLUX.1 file's companions,
chosen or found; an SD file's base configs; a diffusers folder's component files), and
only then; the check takes ``os.stat`` calls and opens no file; a load another worker made
is not copied once one of its companions changed."""

import builtins
import io
import os
import shutil
import tempfile
import time
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from safetensors.torch import load_file, save_file
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from runai.models import cache, loadlock, sources
from runai.models.library import ModelLibrary
from runai.test import flow_fixtures as ff
from runai.test import library_fixtures as fx

FLUX = "flux/flux1-dev.safetensors"
FLUX_FILES = (ff.FLUX_BASES["dev"], FLUX, "vae/ae.safetensors", "text_encoder/clip_l.safetensors",
              "text_encoder/t5xxl_fp16.safetensors", "text_encoder/t5xxl_fp8_e4m3fn.safetensors")


def scratch(test, source, names):
    """A fresh model folder (a realpath) holding copies of ``names`` from ``source``."""
    root = Path(os.path.realpath(tempfile.mkdtemp(prefix="runai-cache-companions-")))
    test.addCleanup(shutil.rmtree, str(root), True)
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if (source / name).is_dir() else shutil.copy)(source / name, root / name)
    return root


def rewrite_doubled(path):
    """Replace the .safetensors ``path`` (same name, a new file) by one with every weight doubled."""
    state = {k: (v.float() * 2).to(v.dtype) for k, v in load_file(str(path)).items()}
    fresh = path.with_name(path.name + ".new")
    save_file(state, str(fresh))
    os.replace(fresh, path)


def loader(root):
    return cache.ModelLoader(torch.device("cpu"), torch.float32, library=ModelLibrary(root), max_models=2)


def weights(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def assertDoubled(test, module, before):
    after = module.state_dict()
    test.assertEqual(set(after), set(before))
    test.assertEqual([k for k in before if not torch.equal(after[k], before[k] * 2)], [])


class LoaderTestCase(SynchronousTestCase):
    def setUp(self):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        self.addCleanup(torch.set_num_threads, threads)
        self.logged = []
        observe = lambda event: self.logged.append(event)  # noqa: E731
        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    def reloads_logged(self):
        return [e for e in self.logged if "loading it again" in e.get("log_format", "")]

    def assertReloadLogged(self, name, shown):
        [event] = self.reloads_logged()
        self.assertEqual((event["name"], event["why"]), (name, f"its file {shown} changed on disk"))


class CompanionTests(LoaderTestCase):
    def setUp(self):
        super().setUp()
        self.root = scratch(self, ff.model_folder(), FLUX_FILES)
        self.loader = loader(self.root)

    def get(self, modules=()):
        return self.loader.get(self.root / FLUX, FLUX, modules=modules)

    def test_a_replaced_companion_found_beside_it_is_loaded_again(self):
        first = self.get()
        vae = weights(first.pipe.vae)
        self.assertIs(self.get(), first)
        self.assertEqual(self.loader.load_count, 1)
        rewrite_doubled(self.root / "vae" / "ae.safetensors")
        second = self.get()
        self.assertIsNot(second, first)
        self.assertEqual(self.loader.load_count, 2)
        assertDoubled(self, second.pipe.vae, vae)
        self.assertReloadLogged(FLUX, "vae/ae.safetensors")
        # And then it is a hit again.
        self.assertIs(self.get(), second)
        self.assertEqual(self.loader.load_count, 2)

    def test_a_replaced_companion_the_client_chose_is_loaded_again(self):
        chosen = (str(self.root / "text_encoder" / "clip_l.safetensors"),)
        first = self.get(chosen)
        clip = weights(first.pipe.text_encoder)
        self.assertIs(self.get(chosen), first)
        rewrite_doubled(self.root / "text_encoder" / "clip_l.safetensors")
        second = self.get(chosen)
        self.assertEqual(self.loader.load_count, 2)
        # Only the weights: CLIP's position ids are a buffer no file holds.
        params = dict(second.pipe.text_encoder.named_parameters())
        self.assertEqual([k for k in params if not torch.equal(params[k], clip[k] * 2)], [])
        self.assertReloadLogged(FLUX, "text_encoder/clip_l.safetensors")

    def test_untouched_companions_keep_the_cached_pipeline(self):
        first = self.get()
        # A file beside the companions that the model does not use (the fp8 T5: the fp16 one wins).
        rewrite_doubled(self.root / "text_encoder" / "t5xxl_fp8_e4m3fn.safetensors")
        (self.root / "vae" / "notes.txt").write_text("an unrelated file")
        self.assertIs(self.get(), first)
        self.assertEqual(self.loader.load_count, 1)
        self.assertEqual(self.reloads_logged(), [])
        names = {Path(s[0]).relative_to(self.root).as_posix() for s in first.sources}
        for used in ("vae/ae.safetensors", "text_encoder/clip_l.safetensors", "text_encoder/t5xxl_fp16.safetensors",
                     ff.FLUX_BASES["dev"] + "/tokenizer", ff.FLUX_BASES["dev"] + "/transformer/config.json"):
            self.assertIn(used, names)
        self.assertNotIn("text_encoder/t5xxl_fp8_e4m3fn.safetensors", names)

    def test_a_removed_companion_is_loaded_again_and_fails(self):
        self.get()
        os.unlink(self.root / "text_encoder" / "t5xxl_fp16.safetensors")
        os.unlink(self.root / "text_encoder" / "t5xxl_fp8_e4m3fn.safetensors")
        from runai.core import errors

        with self.assertRaises(errors.RunaiError) as caught:
            self.get()
        self.assertIn("T5-XXL", caught.exception.message)
        self.assertEqual(self.loader.loaded_paths, ())

    def test_the_check_opens_no_file_and_is_cheap(self):
        first = self.get()
        self.assertGreater(len(first.sources), 5)

        def refuse(*args, **kwargs):
            raise AssertionError(f"the cache check opened {args[:1]}")

        for module, name in ((builtins, "open"), (io, "open"), (os, "open"), (safetensors, "safe_open"),
                             (safetensors.torch, "load_file"), (safetensors.torch, "safe_open")):
            self.patch(module, name, refuse)
        started = time.perf_counter()
        for _ in range(100):
            self.assertIs(self.get(), first)
        seconds = (time.perf_counter() - started) / 100
        self.assertEqual(self.loader.load_count, 1)
        # A few dozen os.stat calls: well under a millisecond each on any disk.
        self.assertLess(seconds, 0.05)


class SDAndFolderTests(LoaderTestCase):
    def setUp(self):
        super().setUp()
        self.root = scratch(self, fx.model_folder(), ("runwayml", "stabilityai", "v1/both.safetensors", "v1/both"))
        self.loader = loader(self.root)

    def test_a_changed_base_config_of_a_single_file_is_loaded_again(self):
        name = "v1/both.safetensors"
        first = self.loader.get(self.root / name, name)
        self.assertIs(self.loader.get(self.root / name, name), first)
        config = self.root / "runwayml" / "stable-diffusion-v1-5" / "scheduler" / "scheduler_config.json"
        text = config.read_text()
        self.assertIn('"beta_end": 0.012', text)
        fresh = config.with_name("new.json")
        fresh.write_text(text.replace('"beta_end": 0.012', '"beta_end": 0.013'))
        os.replace(fresh, config)
        second = self.loader.get(self.root / name, name)
        self.assertEqual(self.loader.load_count, 2)
        self.assertEqual((first.scheduler_config["beta_end"], second.scheduler_config["beta_end"]), (0.012, 0.013))
        self.assertReloadLogged(name, "runwayml/stable-diffusion-v1-5/scheduler/scheduler_config.json")

    def test_a_replaced_component_file_of_a_diffusers_folder_is_loaded_again(self):
        name = "v1/both"
        first = self.loader.get(self.root / name, name)
        unet = weights(first.pipe.unet)
        rewrite_doubled(self.root / name / "unet" / "diffusion_pytorch_model.safetensors")
        second = self.loader.get(self.root / name, name)
        self.assertEqual(self.loader.load_count, 2)
        assertDoubled(self, second.pipe.unet, unet)
        self.assertReloadLogged(name, "v1/both/unet/diffusion_pytorch_model.safetensors")
        # A tokenizer file too: every component folder counts, not only those of weights.
        vocab = self.root / name / "tokenizer" / "vocab.json"
        fresh = vocab.with_name("vocab.new")
        shutil.copy(vocab, fresh)
        os.replace(fresh, vocab)
        self.assertIsNot(self.loader.get(self.root / name, name), second)
        self.assertEqual(self.loader.load_count, 3)


class FakePipe:
    def __init__(self, value):
        self.components = {"m": torch.nn.Linear(2, 2)}
        torch.nn.init.constant_(self.components["m"].weight, value)


class LoadOnceTests(SynchronousTestCase):
    """A loader that waits for a model another has just loaded copies it only while the
    files that load was built from are unchanged."""

    def setUp(self):
        self.root = Path(self.mktemp()).absolute()
        self.root.mkdir()
        self.companion = self.root / "ae.safetensors"
        self.companion.write_bytes(b"one")
        self.key = ("model", self.mktemp())
        share = loadlock._Share()
        share.wanting = 1  # another loader, still waiting for it
        share.template = loadlock._Template(FakePipe(1.0))
        with sources.recording() as used:
            sources.note(self.companion)
        share.sources = tuple(used)
        loadlock._shares[self.key] = share
        self.addCleanup(loadlock._shares.pop, self.key, None)

    def load_once(self):
        loads = []

        def load():
            loads.append(1)
            sources.note(self.companion)
            return FakePipe(2.0)

        with sources.recording() as used:
            pipe = loadlock.load_once(self.key, torch.device("cpu"), load, "m")
        return pipe.components["m"].weight[0, 0].item(), len(loads), [s[0] for s in used]

    def test_an_unchanged_load_is_copied_with_its_files(self):
        self.assertEqual(self.load_once(), (1.0, 0, [str(self.companion)]))

    def test_a_changed_companion_is_read_again(self):
        fresh = self.root / "new"
        fresh.write_bytes(b"two")
        os.replace(fresh, self.companion)
        self.assertEqual(self.load_once(), (2.0, 1, [str(self.companion)]))


class SourcesTests(SynchronousTestCase):
    def test_notes_reach_every_recording_of_the_thread_and_only_while_recording(self):
        root = Path(self.mktemp()).absolute()
        (root / "tok").mkdir(parents=True)
        (root / "tok" / "vocab.json").write_text("{}")
        (root / "a").write_text("a")
        sources.note(root / "a")  # nobody records: nothing happens
        with sources.recording() as outer:
            with sources.recording() as inner:
                sources.note(root / "tok", root / "a")
            sources.note(root / "a")
        self.assertFalse(sources.recording_now())
        self.assertEqual([s[0] for s in inner], [str(root / "tok"), str(root / "tok" / "vocab.json"), str(root / "a")])
        self.assertEqual(outer, inner)
        self.assertIsNone(sources.changed(outer))
        (root / "tok" / "vocab.json").write_text("{} ")
        self.assertEqual(sources.changed(outer), str(root / "tok" / "vocab.json"))
        self.assertEqual(sources.stat_of(root / "gone"), (str(root / "gone"), None))

    def test_an_inner_recording_that_ends_leaves_the_outer_one_recording(self):
        path = Path(self.mktemp()).absolute()
        path.write_text("a")
        with sources.recording() as outer:
            with sources.recording():
                pass  # equal to the outer one (both empty), but not it
            sources.note(path)
        self.assertEqual([s[0] for s in outer], [str(path)])

    def test_first_difference(self):
        old = (("a", 1, 2, 3), ("b", 1, 2, 3))
        self.assertIsNone(sources.first_difference(old, old))
        self.assertEqual(sources.first_difference(old, (("a", 1, 2, 3), ("b", 1, 2, 4))), "b")
        self.assertEqual(sources.first_difference(old, (("a", 1, 2, 3),)), "b")
        self.assertEqual(sources.first_difference(old, old + (("c", 1, 2, 3),)), "c")
