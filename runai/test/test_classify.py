"""runai.models.classify: what a model is, from its content (key names and shapes, diffusers
configs, side-car configs), whatever folder it is in."""

import os
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from runai.doors.legacy import replies
from runai.models import checkpoint
from runai.models import classify
from runai.models import library
from runai.test import library_fixtures as fx


class RealLayoutTests(SynchronousTestCase):
    """Header-only files with the released models' key names and shapes."""

    def setUp(self):
        self.dir = Path(self.mktemp()).absolute()

    def classify(self, shapes, name="x.safetensors", metadata=None):
        path = fx.write_header_only(self.dir / name, shapes, metadata=metadata)
        tensors, meta = checkpoint.tensor_shapes(path)
        return classify.classify_state(tensors, meta)

    def test_layout_matches_the_released_files(self):
        sd15 = fx.real_layout("v1")
        for key, shape in fx.KNOWN_SD15.items():
            self.assertEqual(sd15.get(key), shape, key)
        count = lambda prefix: sum(1 for k in sd15 if k.startswith(prefix))  # noqa: E731
        # The counts of v1-5-pruned-emaonly: 686 UNet, 248 VAE, 197 text encoder tensors.
        self.assertEqual(count("model.diffusion_model."), 686)
        self.assertEqual(count("first_stage_model."), 248)
        self.assertEqual(count("cond_stage_model."), 197)
        sd21 = fx.real_layout("v2")
        for key, shape in fx.KNOWN_SD21.items():
            self.assertEqual(sd21.get(key), shape, key)

    def test_sd15(self):
        c = self.classify(fx.real_layout("v1"))
        self.assertEqual((c.kind, c.version, c.inpainting, c.prediction_type), ("pipeline", "v1", False, "epsilon"))

    def test_sd15_inpainting(self):
        c = self.classify(fx.real_layout("v1", inpainting=True))
        self.assertEqual((c.version, c.inpainting, c.in_channels), ("v1", True, 9))

    def test_sd21(self):
        c = self.classify(fx.real_layout("v2"))
        # The weights alone do not tell 2.x-base from 768-v: left to configs and the load.
        self.assertEqual((c.version, c.inpainting, c.prediction_type), ("v2", False, None))

    def test_sd2_inpainting(self):
        c = self.classify(fx.real_layout("v2", inpainting=True))
        self.assertEqual((c.version, c.inpainting), ("v2", True))

    def test_sdxl(self):
        c = self.classify(fx.SDXL_BASE)
        self.assertEqual((c.kind, c.version), ("pipeline", "sdxl"))

    def test_sdxl_refiner(self):
        # The refiner's one text encoder, OpenCLIP bigG, is embedder 0; its label width is 2560.
        refiner = {k.replace("conditioner.embedders.1.", "conditioner.embedders.0."): v
                   for k, v in fx.SDXL_BASE.items() if not k.startswith("conditioner.embedders.0.")}
        refiner["model.diffusion_model.label_emb.0.0.weight"] = (1536, 2560)
        c = self.classify(refiner)
        self.assertEqual((c.kind, c.version), ("refiner", "sdxl"))
        entry = library.ModelLibrary(self.dir).describe(self.dir / "x.safetensors")
        self.assertFalse(entry.served)
        self.assertEqual(replies.model(entry)["kind"], "refiner")
        # A UNet alone, by its label width.
        unet_only = {k: v for k, v in refiner.items() if k.startswith("model.")}
        self.assertEqual(self.classify(unet_only, "u.safetensors").kind, "refiner")
        base_unet = {k: v for k, v in fx.SDXL_BASE.items() if k.startswith("model.")}
        self.assertEqual(self.classify(base_unet, "b.safetensors").kind, "pipeline")

    def test_sdxl_inpainting(self):
        shapes = dict(fx.SDXL_BASE)
        shapes["model.diffusion_model.input_blocks.0.0.weight"] = (320, 9, 3, 3)
        c = self.classify(shapes)
        self.assertEqual((c.kind, c.version, c.inpainting, c.in_channels), ("pipeline", "sdxl", True, 9))

    def test_sdxl_without_label_emb(self):
        c = self.classify({k: v for k, v in fx.SDXL_BASE.items() if "label_emb" not in k})
        self.assertEqual(c.version, "sdxl")

    def test_unet_alone_by_context_width(self):
        for width, version in ((768, "v1"), (1024, "v2"), (2048, "sdxl")):
            shapes = {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, width)}
            self.assertEqual(self.classify(shapes).version, version)

    def test_modelspec_prediction_type(self):
        c = self.classify(fx.real_layout("v2"), metadata={"modelspec.prediction_type": "v"})
        self.assertEqual(c.prediction_type, "v_prediction")

    def test_v_pred_key(self):
        c = self.classify(dict(fx.real_layout("v2"), v_pred=()))
        self.assertEqual(c.prediction_type, "v_prediction")

    def test_not_a_whole_model(self):
        lora = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 320)}
        self.assertEqual(self.classify(lora).kind, "lora")
        self.assertEqual(self.classify({"string_to_param.*": (1, 768)}).kind, "embedding")
        self.assertEqual(self.classify({"something": (1,)}).kind, "unknown")
        self.assertEqual(self.classify({"<cat-toy>": (768,)}).kind, "embedding")  # diffusers' learned_embeds

    def test_folder_says_v1_weights_say_v2(self):
        models = self.dir
        fx.write_header_only(models / "v1" / "sd21.safetensors", fx.real_layout("v2"))
        events = fx.capture_warnings(self)
        entry = library.ModelLibrary(models).describe(models / "v1" / "sd21.safetensors")
        self.assertEqual(entry.version, "v2")
        self.assertTrue(any("weights are" in e.get("log_format", "") for e in events))

    def test_sidecar_says_v(self):
        models = self.dir
        fx.write_header_only(models / "v2" / "sd21-768.safetensors", fx.real_layout("v2"))
        (models / "v2" / "sd21-768.yaml").write_text("model:\n  params:\n    parameterization: v\n")
        entry = library.ModelLibrary(models).describe(models / "v2" / "sd21-768.safetensors")
        self.assertEqual((entry.version, entry.classification.prediction_type), ("v2", "v_prediction"))
        self.assertEqual(replies.model(entry)["config"], "v2/sd21-768.yaml")

    def test_sidecar_without_parameterization_is_epsilon(self):
        models = self.dir
        fx.write_header_only(models / "v2" / "base.safetensors", fx.real_layout("v2"))
        (models / "v2" / "base.yaml").write_text("model:\n  params:\n    linear_start: 0.00085\n")
        entry = library.ModelLibrary(models).describe(models / "v2" / "base.safetensors")
        self.assertEqual(entry.classification.prediction_type, "epsilon")

    def test_sidecar_link_outside_is_ignored(self):
        models = self.dir / "models"
        fx.write_header_only(models / "v2" / "m.safetensors", fx.real_layout("v2"))
        secret = self.dir / "secret.yaml"
        secret.write_text("model:\n  params:\n    parameterization: v\n")
        os.symlink(secret, models / "v2" / "m.yaml")
        entry = library.ModelLibrary(models).describe(models / "v2" / "m.safetensors")
        self.assertIsNone(entry.classification.prediction_type)
        self.assertIsNone(entry.sidecar)

    def test_classifying_a_huge_file_reads_its_header_only(self):
        path = fx.write_header_only(self.dir / "big.safetensors", fx.real_layout("v1"), dtype="F32",
                                    pad_to=8 * 2**30)
        with fx.counting_reads() as counter:
            entry = library.ModelLibrary(self.dir).describe(path)
        self.assertEqual(entry.version, "v1")
        self.assertLess(counter.bytes, 1024 * 1024)


class DiffusersClassificationTests(SynchronousTestCase):
    def test_tiny_folders(self):
        models = fx.model_folder()
        for rel, version in (("runwayml/stable-diffusion-v1-5", "v1"),
                             ("stabilityai/stable-diffusion-2-1-base", "v2")):
            c = classify.classify_diffusers(models / rel, models)
            self.assertEqual((c.kind, c.version, c.inpainting), ("pipeline", version, False), rel)

    def test_sdxl_folders(self):
        from runai.test.test_engine_xl import xl_models

        models = xl_models()
        expected = {
            "sdxl/base": ("pipeline", False, "StableDiffusionXLPipeline", True),
            "sdxl/inpaint": ("pipeline", True, "StableDiffusionXLInpaintPipeline", True),
            "sdxl/refiner": ("refiner", False, "StableDiffusionXLImg2ImgPipeline", False),
        }
        for rel, (kind, inpainting, pipeline_class, served) in expected.items():
            c = classify.classify_diffusers(models / rel, models)
            self.assertEqual((c.kind, c.version, c.inpainting, c.pipeline_class),
                             (kind, "sdxl", inpainting, pipeline_class), rel)
            entry = library.ModelLibrary(models).describe(models / rel)
            self.assertEqual(entry.served, served, rel)

    def test_inpainting_and_v_prediction(self):
        inpaint = fx.tiny_source("v1-inpaint")
        c = classify.classify_diffusers(inpaint, inpaint)
        self.assertEqual((c.version, c.inpainting, c.pipeline_class), ("v1", True, "StableDiffusionInpaintPipeline"))
        vpred = fx.tiny_source("v2-v")
        c = classify.classify_diffusers(vpred, vpred)
        self.assertEqual((c.version, c.prediction_type), ("v2", "v_prediction"))
