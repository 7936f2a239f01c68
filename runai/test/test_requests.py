"""runai.core.requests and runai.core.fields: requests as the core takes them, from any
door's fields (here plain dictionaries; the legacy door's are tested in test_legacy_parse)."""

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
