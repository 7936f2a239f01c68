"""runai.core.requests and runai.core.fields: requests as the core takes them, from any
door's fields (here plain dictionaries; the legacy door's are tested in test_legacy_parse)."""

import json
import os
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from runai.core import errors
from runai.core.fields import DictFields
from runai.core.requests import Limits, convert_request, generation_request


class GenerationRequestTests(SynchronousTestCase):
    def setUp(self):
        self.models = Path(os.path.realpath(self.mktemp()))
        os.makedirs(os.path.join(self.models, "v1", "tiny"))
        open(os.path.join(self.models, "v1", "tiny", "model_index.json"), "w").close()

    def make(self, **fields):
        fields.setdefault("model", "v1/tiny")
        return generation_request("txt2img", DictFields(fields), self.models, Limits(), id="x")

    def test_plain_names(self):
        request = self.make(prompt="a lighthouse", steps=30, seed=4, width=640, n_samples=2)
        self.assertEqual((request.prompt, request.steps, request.seed, request.width, request.height, request.id),
                         ("a lighthouse", 30, 4, 640, 512, "x"))
        self.assertEqual(request.seeds(), [4, 5])
        self.assertEqual(request.model_name, "v1/tiny")

    def test_errors_name_the_field(self):
        for fields, code, named in (
            (dict(steps=0), errors.OUT_OF_RANGE, "option 'steps'"),
            (dict(width=100), errors.OUT_OF_RANGE, "option 'width'"),
            (dict(prompt=3), errors.BAD_REQUEST, "option 'prompt'"),
            (dict(do_nsfw_filter="yes"), errors.BAD_REQUEST, "option 'do_nsfw_filter'"),
            (dict(scheduler="warp"), errors.UNKNOWN_SCHEDULER, "warp"),
            (dict(model="../x"), errors.PATH_OUTSIDE_MODEL_DIR, "../x"),
        ):
            with self.assertRaises(errors.RunaiError) as e:
                self.make(**fields)
            self.assertEqual(e.exception.code, code, fields)
            self.assertIn(named, e.exception.message)

    def test_convert_request(self):
        open(os.path.join(self.models, "v1", "old.ckpt"), "wb").close()
        request = convert_request(DictFields({"model": "v1/old.ckpt"}), self.models, id=3)
        self.assertEqual((request.model_name, request.target_name, request.id), ("v1/old.ckpt", "v1/old", 3))


class FamilyDefaultSizeTests(SynchronousTestCase):
    """A txt2img request without a size paints at what its model family was trained at."""

    def setUp(self):
        self.models = Path(os.path.realpath(self.mktemp()))
        # Configs alone: the size is read from what the library says, before any load.
        xl = self.models / "sdxl" / "base"
        (xl / "unet").mkdir(parents=True)
        (xl / "model_index.json").write_text(json.dumps({
            "_class_name": "StableDiffusionXLPipeline", "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}))
        (xl / "unet" / "config.json").write_text(json.dumps({"addition_embed_type": "text_time", "in_channels": 4}))
        v1 = self.models / "v1" / "tiny"
        (v1 / "unet").mkdir(parents=True)
        (v1 / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
        (v1 / "unet" / "config.json").write_text(json.dumps({"cross_attention_dim": 768, "in_channels": 4}))

    def make(self, action="txt2img", limits=Limits(), **fields):
        fields.setdefault("model", "sdxl/base")
        return generation_request(action, DictFields(fields), self.models, limits)

    def size(self, **fields):
        request = self.make(**fields)
        return request.width, request.height

    def test_sdxl_defaults_to_1024(self):
        self.assertEqual(self.size(), (1024, 1024))
        self.assertEqual(self.size(width=768), (768, 1024))
        self.assertEqual(self.size(height=640), (1024, 640))
        self.assertEqual(self.size(width=512, height=512), (512, 512))

    def test_other_families_keep_512(self):
        self.assertEqual(self.size(model="v1/tiny"), (512, 512))

    def test_the_limits_still_apply(self):
        self.assertEqual(self.size(limits=Limits(max_size=768)), (768, 768))
        with self.assertRaises(errors.RunaiError) as caught:
            self.make(n_samples=3, limits=Limits(max_batch_pixels=2 * 1024 * 1024))
        self.assertEqual(caught.exception.code, errors.OUT_OF_RANGE)
        self.assertEqual(self.make(n_samples=8).n_samples, 8)

    def test_img2img_without_a_size_paints_at_the_pictures_size(self):
        import base64
        import io

        from PIL import Image

        buffer = io.BytesIO()
        Image.new("RGB", (200, 120)).save(buffer, format="PNG")
        pixels = base64.b64encode(buffer.getvalue()).decode("ascii")
        request = self.make("img2img", pixels=pixels)
        self.assertEqual((request.width, request.height), (200, 120))

    def test_an_unreadable_model_keeps_512(self):
        (self.models / "sdxl" / "base" / "model_index.json").write_text("{not json")
        self.assertEqual(self.size(), (512, 512))
