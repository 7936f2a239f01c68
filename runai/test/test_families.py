"""The family layer (runai.families): one module per family, and nothing else that names one."""

import re
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

import runai
from runai import families
from runai.core.schedulers import SCHEDULERS
from runai.families.base import Family

ROOT = Path(runai.__file__).parent
NAMES = re.compile(r"sdxl|sd3|flux", re.IGNORECASE)
# Where a family's name belongs: its own module, the model library (which recognises
# models by content and builds single files), and the tests.
ALLOWED = ("families/sd.py", "families/sdxl.py", "families/sd3.py", "families/flux.py", "families/flow.py")


class LayerTests(SynchronousTestCase):
    def test_no_module_outside_the_families_and_the_model_library_names_a_family(self):
        offenders = []
        for path in sorted(ROOT.rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel.startswith(("test/", "models/")) or rel in ALLOWED:
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if NAMES.search(line):
                    offenders.append(f"{rel}:{number}: {line.strip()}")
        self.assertEqual(offenders, [])

    def test_importing_the_families_and_the_request_parser_imports_no_torch(self):
        code = ("import sys, runai.families, runai.core.requests; "
                "heavy = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]; "
                "print(heavy)")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
        self.assertEqual(out.stdout.strip(), "[]")

    def test_every_family_module_is_registered_once(self):
        modules = sorted(p.stem for p in (ROOT / "families").glob("*.py")
                         if "\nFAMILY = " in p.read_text())
        self.assertEqual(len(families.FAMILIES), len(modules))
        self.assertTrue(all(isinstance(f, Family) for f in families.FAMILIES))
        versions = [v for f in families.FAMILIES for v in f.versions]
        self.assertEqual(len(versions), len(set(versions)))
        self.assertEqual(set(families.served_versions()), {"v1", "v2", "sdxl", "sd3", "flux"})

    def test_what_each_family_says(self):
        for family in families.FAMILIES:
            defaults = family.defaults(None)
            self.assertIn(defaults.scheduler, family.schedulers, family)
            self.assertTrue(set(family.schedulers) <= set(SCHEDULERS), family)
            self.assertEqual(defaults.size % family.size_multiple, 0, family)
            self.assertGreater(family.latent.channels, 0)
            self.assertTrue(family.pipeline_classes and family.weight_folders and family.label, family)
        sd, sdxl = families.for_version("v1"), families.for_version("sdxl")
        sd3, flux = families.for_version("sd3"), families.for_version("flux")
        self.assertIs(families.for_version("v2"), sd)
        self.assertEqual([f.defaults().size for f in (sd, sdxl, sd3, flux)], [512, 1024, 1024, 1024])
        self.assertEqual(set(sd.schedulers), set(SCHEDULERS))
        self.assertNotIn("euler_a", flux.schedulers)
        self.assertEqual((sd3.latent.channels, flux.latent.channels, flux.latent.packed), (16, 16, True))
        self.assertIn("transformer", families.weight_folders())
        self.assertIn("text_encoder_3", families.weight_folders())
        self.assertIsNone(families.for_version("unknown"))

    def test_a_pipeline_is_told_by_its_class_or_a_base(self):
        class StableDiffusionXLPipeline:
            pass

        class MyFineTunedPipeline(StableDiffusionXLPipeline):
            pass

        self.assertIs(families.for_pipeline(MyFineTunedPipeline()), families.for_version("sdxl"))
        with self.assertRaises(LookupError):
            families.for_pipeline(object())
