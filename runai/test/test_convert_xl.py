"""runai.models.convert and runai.models.xl_layout for SDXL: a diffusers folder -> one
.safetensors in the original sgm layout, checked against diffusers' own single-file loader
weight for weight and against the key names and shapes of the released SDXL 1.0 file; and
a single file -> a diffusers folder that classifies as SDXL and reloads to the same weights."""

import shutil
import types
from pathlib import Path

import torch
from safetensors import safe_open
from twisted.trial.unittest import SynchronousTestCase

from runai.core.requests import ConvertRequest
from runai.models import classify, convert, library, sdconfigs, xl_layout
from runai.models.errors import ConvertError
from runai.test import library_fixtures as fx
from runai.test import xl_fixtures as xfx
from runai.test.library_fixtures import assertSameWeights

XL_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
PREFIXES = ("model.diffusion_model.", "first_stage_model.", "conditioner.embedders.0.transformer.text_model.",
            "conditioner.embedders.1.model.")


def read(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


class ExportTests(SynchronousTestCase):
    """diffusers folder -> single file."""

    def export(self, kind, **kwargs):
        path = Path(self.mktemp()).absolute().with_suffix(".safetensors")
        path.parent.mkdir(parents=True, exist_ok=True)
        convert.diffusers_to_single_file(xfx.xl_source(kind), path, **kwargs)
        return path

    def test_diffusers_own_loader_reads_the_same_weights(self):
        from diffusers import StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline

        for kind, cls in (("base", StableDiffusionXLPipeline), ("inpaint", StableDiffusionXLInpaintPipeline)):
            path = self.export(kind)
            theirs = cls.from_single_file(str(path), config=str(xfx.xl_source(kind)), local_files_only=True)
            assertSameWeights(self, theirs, xfx.xl_reference(kind), XL_COMPONENTS)

    def test_the_refiner_too(self):
        from diffusers import StableDiffusionXLImg2ImgPipeline

        path = self.export("refiner")
        state, metadata = read(path)
        self.assertFalse(any(k.startswith("conditioner.embedders.1.") for k in state))
        self.assertIn("conditioner.embedders.0.model.text_projection", state)
        self.assertEqual(metadata["modelspec.architecture"], "stable-diffusion-xl-v1-refiner")
        theirs = StableDiffusionXLImg2ImgPipeline.from_single_file(
            str(path), config=str(xfx.xl_source("refiner")), local_files_only=True)
        assertSameWeights(self, theirs, xfx.xl_reference("refiner"), ("unet", "vae", "text_encoder_2"))

    def test_the_layout(self):
        state, metadata = read(self.export("base"))
        ref = xfx.xl_reference("base")
        self.assertEqual([k for k in state if not k.startswith(PREFIXES)], [])
        unet = "model.diffusion_model."
        self.assertTrue(torch.equal(state[unet + "label_emb.0.0.weight"], ref.unet.add_embedding.linear_1.weight))
        self.assertTrue(torch.equal(state[unet + "label_emb.0.2.weight"], ref.unet.add_embedding.linear_2.weight))
        # Two transformer blocks at the second level (transformer_layers_per_block (1, 2)).
        self.assertIn(unet + "input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight", state)
        self.assertIn(unet + "middle_block.1.transformer_blocks.1.attn2.to_k.weight", state)
        big_g = "conditioner.embedders.1.model."
        encoder = ref.text_encoder_2
        self.assertTrue(torch.equal(state[big_g + "text_projection"], encoder.text_projection.weight.t()))
        attention = encoder.text_model.encoder.layers[1].self_attn
        fused = torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight])
        self.assertTrue(torch.equal(state[big_g + "transformer.resblocks.1.attn.in_proj_weight"], fused))
        for key in ("positional_embedding", "token_embedding.weight", "ln_final.weight"):
            self.assertIn(big_g + key, state)
        clip = "conditioner.embedders.0.transformer.text_model."
        self.assertTrue(torch.equal(state[clip + "final_layer_norm.weight"], ref.text_encoder.final_layer_norm.weight))
        self.assertEqual((metadata["modelspec.architecture"], metadata["modelspec.prediction_type"]),
                         ("stable-diffusion-xl-v1-base", "epsilon"))
        _, inpaint_metadata = read(self.export("inpaint"))
        self.assertEqual(inpaint_metadata["modelspec.architecture"], "stable-diffusion-xl-v1-base/inpainting")

    def real_size(self):
        """SDXL 1.0 base at its real size from the shipped configs, on the meta device (no
        memory): ``(models, the state dict as a folder of them would be exported)``."""
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        from runai.models.assemble import text_config

        configs = sdconfigs.sdxl_base()
        with torch.device("meta"):
            models = dict(unet=UNet2DConditionModel.from_config(configs["unet"]),
                          vae=AutoencoderKL.from_config(configs["vae"]),
                          text_encoder=CLIPTextModel(text_config(configs["text_encoder"])),
                          text_encoder_2=CLIPTextModelWithProjection(text_config(configs["text_encoder_2"])))
            state = xl_layout.to_sgm(models["unet"].state_dict(), configs["unet"], models["vae"].state_dict(),
                                     configs["vae"], models["text_encoder"].state_dict(),
                                     models["text_encoder_2"].state_dict())
        return configs, models, state

    def test_real_sdxl_names_and_shapes(self):
        # The key names and shapes of the released file.
        _, _, state = self.real_size()
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        self.assertEqual({k: shapes.get(k) for k in fx.SDXL_BASE}, fx.SDXL_BASE)
        self.assertEqual(shapes["model.diffusion_model.output_blocks.2.2.conv.weight"], (1280, 1280, 3, 3))
        self.assertIn("model.diffusion_model.middle_block.1.transformer_blocks.9.attn1.to_q.weight", shapes)
        self.assertEqual(classify.classify_state(shapes).version, "sdxl")

    def test_real_size_round_trip_of_names(self):
        # diffusers' single-file converters, as runai's loader calls them, give back every
        # weight of every model at SDXL's real size, each in its shape.
        from diffusers.loaders import single_file_utils as sfu

        configs, models, state = self.real_size()
        with torch.device("meta"):
            back = dict(
                unet=sfu.convert_ldm_unet_checkpoint(state, configs["unet"]),
                vae=sfu.convert_ldm_vae_checkpoint(state, configs["vae"]),
                text_encoder=sfu.convert_ldm_clip_checkpoint(state, remove_prefix=xl_layout.CLIP_L),
                text_encoder_2=sfu.convert_open_clip_checkpoint(models["text_encoder_2"], state,
                                                                prefix=xl_layout.BIG_G))
        if not hasattr(models["text_encoder"], "text_model"):  # transformers >= 5.6 flattened it
            back["text_encoder"] = {k.removeprefix("text_model."): v for k, v in back["text_encoder"].items()}
        for name, model in models.items():
            want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
            self.assertEqual({k: tuple(back[name][k].shape) for k in want if k in back[name]}, want, name)

    def test_half(self):
        state, _ = read(self.export("base", dtype=torch.float16))
        self.assertEqual({t.dtype for t in state.values()}, {torch.float16})

    def test_refuses_what_is_not_sdxl(self):
        ref = xfx.xl_reference("base")
        config = dict(ref.unet.config, addition_embed_type=None)
        with self.assertRaises(ConvertError):
            xl_layout.to_sgm(ref.unet.state_dict(), config, {}, {}, {}, {})
        without_projection = {k: v for k, v in ref.text_encoder_2.state_dict().items() if "projection" not in k}
        with self.assertRaises(ConvertError) as caught:
            xl_layout.big_g_to_sgm(without_projection)
        self.assertIn("text_projection", caught.exception.message)


class ImportTests(SynchronousTestCase):
    """single file -> diffusers folder."""

    def setUp(self):
        self.models = Path(self.mktemp()).absolute()
        shutil.copytree(xfx.xl_model_folder(), self.models)
        self.library = library.ModelLibrary(self.models)

    def convert(self, name, target, **kwargs):
        entry = self.library.describe(self.models / name)
        return convert.single_file_to_diffusers(self.models / name, self.models / target, self.models, entry,
                                                **kwargs)

    def test_round_trip(self):
        from diffusers import StableDiffusionXLPipeline

        for name in ("sdxl/base.safetensors", "sdxl/base.ckpt"):
            target = name.replace(".", "-")
            steps = []
            self.assertEqual(self.convert(name, target, on_progress=lambda *s: steps.append(s)), "sdxl")
            self.assertEqual(steps, [(k, len(convert.STAGES)) for k in range(1, len(convert.STAGES) + 1)])
            c = classify.classify_diffusers(self.models / target, self.models)
            self.assertEqual((c.kind, c.version, c.inpainting, c.pipeline_class),
                             ("pipeline", "sdxl", False, "StableDiffusionXLPipeline"), name)
            back = StableDiffusionXLPipeline.from_pretrained(str(self.models / target), local_files_only=True)
            reference = xfx.xl_reference("base")
            assertSameWeights(self, back, reference, XL_COMPONENTS)
            self.assertEqual(dict(back.scheduler.config), dict(reference.scheduler.config))
            self.assertEqual(back.tokenizer_2.get_vocab(), reference.tokenizer_2.get_vocab())
            self.assertTrue(self.library.describe(self.models / target).served)

    def test_inpainting_folder_says_so(self):
        from diffusers import StableDiffusionXLInpaintPipeline

        self.convert("sdxl/inpaint.safetensors", "sdxl/inpaint")
        c = classify.classify_diffusers(self.models / "sdxl" / "inpaint", self.models)
        self.assertEqual((c.version, c.inpainting, c.pipeline_class),
                         ("sdxl", True, "StableDiffusionXLInpaintPipeline"))
        back = StableDiffusionXLInpaintPipeline.from_pretrained(str(self.models / "sdxl" / "inpaint"),
                                                                local_files_only=True)
        assertSameWeights(self, back, xfx.xl_reference("inpaint"), XL_COMPONENTS)

    def test_the_refiner_is_refused_and_leaves_nothing(self):
        with self.assertRaises(ConvertError) as caught:
            self.convert("sdxl/refiner.safetensors", "sdxl/refiner")
        self.assertIn("refiner", caught.exception.message)
        self.assertFalse((self.models / "sdxl" / "refiner").exists())

    def test_the_convert_action(self):
        loader = types.SimpleNamespace(library=self.library, model_dir=self.models)
        req = ConvertRequest(model_path=str(self.models / "sdxl" / "base.ckpt"), model_name="sdxl/base.ckpt",
                             target_path=str(self.models / "sdxl" / "from-ckpt"), target_name="sdxl/from-ckpt")
        result = convert.run_request(req, loader, lambda step, total: None, lambda: False)
        self.assertEqual((result.path, result.version), ("sdxl/from-ckpt", "sdxl"))
        self.assertEqual(classify.classify_diffusers(self.models / "sdxl" / "from-ckpt", self.models).version, "sdxl")
