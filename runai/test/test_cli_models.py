"""runai.cli.models: `runai convert`, here, without a server (`runai models` is tested
against a live server in test_convert)."""

from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from runai.cli import main as cli
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
