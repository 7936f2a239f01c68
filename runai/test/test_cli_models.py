"""runai.cli.models: `runai convert`, here, without a server (`runai models` is tested
against a live server in test_convert; here, what it prints for an empty model folder)."""

import io
import sys
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from runai.cli import main as cli
from runai.cli import models as models_cli
from runai.test import library_fixtures as fx
from runai.test.library_fixtures import assertSameWeights, reference


class CommandTests(SynchronousTestCase):
    def test_both_directions(self):
        work = Path(self.mktemp()).absolute()
        work.mkdir()
        single = work / "m.safetensors"
        self.assertEqual(cli.main(["convert", str(fx.tiny_source("v2")), str(single)]), 0)
        folder = work / "m"
        self.assertEqual(cli.main(["convert", str(single), str(folder), "--model-dir", str(fx.model_folder())]), 0)
        from diffusers import StableDiffusionPipeline

        assertSameWeights(self, StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True,
                                                                         low_cpu_mem_usage=False),
                          reference("v2"))
        # Again: nothing is overwritten, and the command says so.
        self.assertEqual(cli.main(["convert", str(single), str(folder), "--model-dir", str(fx.model_folder())]), 1)
        self.assertEqual(cli.main(["convert", str(work / "nothing"), str(work / "x")]), 1)


class ModelsTests(SynchronousTestCase):
    def listing(self, models, *argv):
        class Client:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                pass

            def models(self):
                return models
        self.patch(models_cli, "connect", lambda args, timeout: Client())
        stdout = io.StringIO()
        self.patch(sys, "stdout", stdout)
        self.assertEqual(cli.main(["models", *argv]), 0)
        return stdout.getvalue()

    def test_an_empty_model_folder_is_said(self):
        self.assertEqual(self.listing([]),
                         "no models: the server's model folder (its --model-dir, ~/stablediffusion by default) "
                         "holds no diffusers folder, .safetensors or .ckpt file; see docs/models.md, "
                         "\"The model folder\"\n")
        self.assertEqual(self.listing([], "--json"), "[]\n")

    def test_a_model_per_line(self):
        self.assertEqual(self.listing([{"name": "v1/tiny", "format": "diffusers", "version": "v1", "served": True,
                                        "size": 2048}]),
                         "v1/tiny  (diffusers, v1; 2.0 KB)\n")
