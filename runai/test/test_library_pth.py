"""runai.models.library: upscaler ``.pth`` files in the listing, with kind "upscaler",
read by the static pickle walk (never unpickled); any other ``.pth`` is not listed, and
none is ever a model."""

import os
import shutil
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from runai.core import errors
from runai.doors.legacy import replies
from runai.models import library
from runai.models.paths import resolve_model
from runai.test import library_fixtures as fx
from runai.test.test_library import models_action


_pth = {}


def pth_folder():
    """One model folder for this module: the tiny upscalers (runai.test.upscaler_fixtures),
    a v1 model, and ``other/``: ``.pth`` files that are no upscalers, and ``evil.pth``,
    upscaler weights beside a call that must never run (it would create ``ran``)."""
    if "models" not in _pth:
        import atexit
        import tempfile

        import torch

        from runai.test.test_checkpoint import SystemCall
        from runai.test.upscaler_fixtures import esrgan_state, write_upscalers

        models = Path(os.path.realpath(tempfile.mkdtemp(prefix="runai-pth-")))
        atexit.register(shutil.rmtree, str(models), True)
        write_upscalers(models)
        shutil.copy(fx.model_folder() / "v1" / "both.safetensors", models / "v1.safetensors")
        other = models / "other"
        other.mkdir()
        # A model's weights, another network's, a broken file: not upscalers.
        torch.save({"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3)}},
                   str(other / "sd.pth"))
        torch.save({"params": {"encoder.weight": torch.zeros(4, 4)}}, str(other / "restorer.pth"))
        (other / "broken.pth").write_bytes(b"\x80\x04not a pickle")
        torch.save({"params_ema": esrgan_state(), "x": SystemCall(models / "ran")}, str(other / "evil.pth"))
        _pth["models"] = models
    return _pth["models"]


class PthUpscalerTests(SynchronousTestCase):
    def setUp(self):
        self.models = pth_folder()
        self.marker = self.models / "ran"

    def counted(self):
        calls = []
        real = library.upscalers.arch_of

        def arch_of(path, size):
            calls.append(Path(path).name)
            return real(path, size)

        self.patch(library.upscalers, "arch_of", arch_of)
        return calls

    def test_listed_as_upscalers_never_served(self):
        entries = {e.name: e for e in library.ModelLibrary(self.models).scan()}
        self.assertEqual(sorted(entries), ["ESRGAN/2x-Tiny.safetensors", "ESRGAN/2x-TinyPickle.pth",
                                           "RealESRGAN/4x-Compact.pth", "other/evil.pth", "v1.safetensors"])
        self.assertFalse(self.marker.exists())
        for name, variant in (("ESRGAN/2x-TinyPickle.pth", "ESRGAN"), ("RealESRGAN/4x-Compact.pth", "Compact"),
                              ("other/evil.pth", "ESRGAN")):
            entry = entries[name]
            wire = replies.model(entry)
            self.assertEqual((wire["kind"], wire["variant"], wire["format"], wire["version"], wire["served"]),
                             ("upscaler", variant, "pth", "unknown", False), name)
            self.assertEqual(wire["size"], (self.models / name).stat().st_size)
            self.assertEqual(entry.path, str(self.models / name))
            self.assertFalse(entry.is_companion)
        self.assertTrue(entries["v1.safetensors"].served)

    def test_never_a_model(self):
        lib = library.ModelLibrary(self.models)
        for name in ("ESRGAN/2x-TinyPickle.pth", "other/sd.pth"):
            with self.assertRaises(ValueError):
                lib.describe(self.models / name)
            with self.assertRaises(errors.RunaiError) as caught:
                resolve_model(self.models, name)
            self.assertEqual(caught.exception.code, errors.MODEL_NOT_FOUND)

    def test_read_once_per_size_and_time(self):
        calls = self.counted()
        lib = library.ModelLibrary(self.models)
        first = lib.scan()
        self.assertEqual(sorted(calls), ["2x-TinyPickle.pth", "4x-Compact.pth", "broken.pth", "evil.pth",
                                         "restorer.pth", "sd.pth"])
        del calls[:]
        self.assertEqual(lib.scan(), first)
        self.assertEqual(calls, [])
        path = self.models / "other" / "restorer.pth"
        before = path.stat()
        self.addCleanup(os.utime, path, ns=(before.st_atime_ns, before.st_mtime_ns))
        os.utime(path, ns=(1, 1))
        self.assertEqual(lib.scan(), first)
        self.assertEqual(calls, ["restorer.pth"])

    def test_folders_without_them_read_no_pickle(self):
        calls = self.counted()
        self.assertEqual(len(library.ModelLibrary(fx.model_folder()).scan()), len(fx.EXPECTED))
        self.assertEqual(calls, [])

    def test_the_models_action_lists_them(self):
        reply = models_action(self.models)
        kinds = {m["name"]: (m["kind"], m["format"], m["served"]) for m in reply["models"]}
        self.assertEqual(kinds["RealESRGAN/4x-Compact.pth"], ("upscaler", "pth", False))
        self.assertNotIn("other/sd.pth", kinds)
