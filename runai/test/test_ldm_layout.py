"""runai.models.ldm_layout: diffusers -> the original LDM layout, written as single files
(by runai.models.convert) and read back by diffusers' own ``from_single_file``."""

from pathlib import Path

import torch
from safetensors import safe_open
from twisted.trial.unittest import SynchronousTestCase

from runai.models import convert
from runai.models import ldm_layout
from runai.test import library_fixtures as fx
from runai.test.library_fixtures import assertSameWeights, reference


class ExportTests(SynchronousTestCase):
    """diffusers -> LDM single file, read back by diffusers' ``from_single_file``."""

    def export(self, kind, **kwargs):
        dst = Path(self.mktemp()).absolute() / f"{kind}.safetensors"
        dst.parent.mkdir()
        convert.diffusers_to_single_file(fx.tiny_source(kind), dst, **kwargs)
        return dst

    def diffusers_loads(self, path, kind, cls=None):
        from diffusers import StableDiffusionPipeline

        cls = cls or StableDiffusionPipeline
        return cls.from_single_file(str(path), config=str(fx.tiny_source(kind)), local_files_only=True,
                                    safety_checker=None)

    def test_v1_with_diffusers_loader(self):
        path = self.export("v1")
        assertSameWeights(self, self.diffusers_loads(path, "v1"), reference("v1"))

    def test_v2_openclip_with_diffusers_loader(self):
        path = self.export("v2")
        with safe_open(str(path), "pt") as f:
            keys = set(f.keys())
        self.assertIn("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight", keys)
        self.assertFalse(any(k.startswith("cond_stage_model.transformer.") for k in keys))
        assertSameWeights(self, self.diffusers_loads(path, "v2"), reference("v2"))

    def test_inpainting_with_diffusers_loader(self):
        from diffusers import StableDiffusionInpaintPipeline

        path = self.export("v1-inpaint")
        loaded = self.diffusers_loads(path, "v1-inpaint", StableDiffusionInpaintPipeline)
        self.assertEqual(loaded.unet.config.in_channels, 9)
        assertSameWeights(self, loaded, reference("v1-inpaint"))

    def test_metadata_says_what_it_is(self):
        with safe_open(str(self.export("v2-v")), "pt") as f:
            metadata = f.metadata()
        self.assertEqual(metadata["modelspec.prediction_type"], "v")
        self.assertEqual(metadata["modelspec.architecture"], "stable-diffusion-v2-768-v")

    def test_half(self):
        path = self.export("v1", dtype=torch.float16)
        with safe_open(str(path), "pt") as f:
            self.assertEqual(f.get_tensor("model.diffusion_model.out.2.weight").dtype, torch.float16)

    def test_never_overwrites(self):
        path = self.export("v1")
        before = path.read_bytes()
        with self.assertRaises(convert.ConvertError) as caught:
            convert.diffusers_to_single_file(fx.tiny_source("v2"), path)
        self.assertIn("already exists", caught.exception.message)
        self.assertEqual(path.read_bytes(), before)

    def test_refuses_what_it_cannot_map(self):
        dst = Path(self.mktemp()).absolute()
        with self.assertRaises(convert.ConvertError):
            ldm_layout.unet_to_ldm({"add_embedding.linear_1.weight": torch.zeros(1)},
                                dict(block_out_channels=[4], layers_per_block=1, down_block_types=["DownBlock2D"],
                                     up_block_types=["UpBlock2D"], addition_embed_type="text_time"))
        with self.assertRaises(convert.ConvertError):
            convert.diffusers_to_single_file(fx.tiny_source("v1"), dst.with_suffix(".ckpt"))
