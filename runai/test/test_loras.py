"""The LoRA files of the model folder and their names (runai.models.loras), and what
their keys say (runai.models.lora_keys): torch-free, from headers written by hand."""

import os

from twisted.trial.unittest import SynchronousTestCase

from runai.core import errors
from runai.models import classify, lora_keys, loras, walk
from runai.models.library import ModelLibrary
from runai.test.lora_fixtures import write_lora_header


class Net:
    def __init__(self, name, te=1.0, unet=1.0):
        self.name, self.te, self.unet = name, te, unet


class NameTests(SynchronousTestCase):
    def setUp(self):
        self.models = os.path.realpath(self.mktemp())
        write_lora_header(os.path.join(self.models, "loras", "style.safetensors"),
                          metadata={"ss_output_name": "painterly", "ss_tag_frequency": "x" * 100_000,
                                    "ss_base_model_version": "sd_v1"})
        write_lora_header(os.path.join(self.models, "loras", "a", "twin.safetensors"))
        write_lora_header(os.path.join(self.models, "loras", "b", "twin.safetensors"))
        write_lora_header(os.path.join(self.models, "v1", "not-a-lora.safetensors"),
                          modules=()).write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")

    def resolve(self, *names):
        return loras.resolve(self.models, [Net(n) for n in names])

    def test_names_as_a1111_names_them(self):
        listing = loras.listing(self.models)
        self.assertEqual([(e["name"], e["alias"], e["path"]) for e in listing], [
            ("loras/a/twin", "loras/a/twin", "loras/a/twin.safetensors"),
            ("loras/b/twin", "loras/b/twin", "loras/b/twin.safetensors"),
            ("style", "painterly", "loras/style.safetensors")])
        # A bounded slice of the metadata: the long values are left out, never cut.
        self.assertEqual(listing[2]["metadata"], {"ss_base_model_version": "sd_v1", "ss_output_name": "painterly"})
        style = os.path.join(self.models, "loras", "style.safetensors")
        for name in ("style", "loras/style", "loras/style.safetensors", "painterly"):
            self.assertEqual(self.resolve(name), (loras.LoraRef(name, style, 1.0, 1.0),), name)
        [twin] = self.resolve("loras/b/twin")
        self.assertEqual(twin.path, os.path.join(self.models, "loras", "b", "twin.safetensors"))
        [weighted] = loras.resolve(self.models, [Net("style", te=0.25, unet=-0.5)])
        self.assertEqual((weighted.te, weighted.unet), (0.25, -0.5))
        self.assertEqual(loras.files(self.models)[2].family, classify.V1)

    def test_unknown_ambiguous_and_outside_names(self):
        for name, code in (("nope", errors.MODEL_NOT_FOUND), ("twin", errors.MODEL_NOT_FOUND),
                           ("../../etc/passwd", errors.PATH_OUTSIDE_MODEL_DIR),
                           ("/etc/passwd", errors.PATH_OUTSIDE_MODEL_DIR),
                           ("v1/not-a-lora", errors.MODEL_NOT_FOUND), ("", errors.BAD_REQUEST)):
            e = self.assertRaises(errors.RunaiError, self.resolve, name)
            self.assertEqual(e.code, code, name)
            if name:
                self.assertIn(repr(name), e.message)
        e = self.assertRaises(errors.RunaiError, loras.resolve, self.models, [Net("style", unet=float("nan"))])
        self.assertEqual(e.code, errors.OUT_OF_RANGE)

    def test_a_link_out_of_the_folder_is_not_listed(self):
        outside = os.path.realpath(self.mktemp())
        write_lora_header(os.path.join(outside, "secret.safetensors"))
        os.symlink(os.path.join(outside, "secret.safetensors"),
                   os.path.join(self.models, "loras", "secret.safetensors"))
        os.symlink(outside, os.path.join(self.models, "elsewhere"))
        loras.refresh(self.models)
        self.assertNotIn("secret", [e["name"] for e in loras.listing(self.models)])
        self.assertRaises(errors.RunaiError, self.resolve, "secret")

    def test_a_new_file_is_found_without_waiting(self):
        self.resolve("style")
        write_lora_header(os.path.join(self.models, "loras", "new.safetensors"))
        self.patch(walk.time, "monotonic", lambda: 1e12)  # the last walk is old enough to walk again
        self.assertEqual(self.resolve("new")[0].name, "new")
        os.remove(os.path.join(self.models, "loras", "new.safetensors"))
        loras.refresh(self.models)
        self.assertRaises(errors.RunaiError, self.resolve, "new")

    def test_the_library_lists_them_as_loras(self):
        kinds = {e.name: e.classification.kind for e in ModelLibrary(self.models).scan()}
        self.assertEqual(kinds["loras/style.safetensors"], "lora")


class KeyTests(SynchronousTestCase):
    def family(self, shapes, metadata=None):
        return lora_keys.family_of(shapes, metadata)

    def test_families_from_keys_and_metadata(self):
        self.assertEqual(self.family({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": (4, 768)}),
                         classify.SDXL)
        self.assertEqual(self.family({"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
                                      ".lora_down.weight": (4, 1024)}), classify.V2)
        self.assertEqual(self.family({"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
                                      ".lora_A.weight": (4, 768)}), classify.V1)
        self.assertEqual(self.family({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": (4, 3072)}),
                         classify.FLUX)
        self.assertEqual(self.family({"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": (4, 1536)}),
                         classify.SD3)
        self.assertEqual(self.family({"transformer.transformer_blocks.0.attn.add_k_proj.lora_A.weight": (4, 1536)}),
                         classify.UNKNOWN)  # SD3's or FLUX.1's: the model's modules will tell
        self.assertEqual(self.family({"x.lora_down.weight": (4, 8)}, {"modelspec.architecture":
                                                                       "stable-diffusion-xl-v1-base/lora"}),
                         classify.SDXL)
        self.assertEqual(self.family({"lora_unet_x.lora_down.weight": (4, 8)}), classify.UNKNOWN)

    def test_lycoris_files_are_loras_not_models(self):
        for key in ("lora_unet_x.hada_w1_a", "lora_unet_x.lokr_w1", "double_blocks.0.img_attn.qkv.lora_A.weight"):
            shapes = {key: (4, 4), "double_blocks.0.x.weight": (4, 4), "single_blocks.0.x.weight": (4, 4)}
            self.assertTrue(lora_keys.is_lora(shapes))
            self.assertEqual(classify.classify_state(shapes).kind, "lora", key)
