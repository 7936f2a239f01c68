"""Textual-inversion embeddings (runai.models.embeddings, runai.models.walk, and their use in
runai.families.clip_text): every file format, named and listed as A1111 does, read without
trusting a pickle, fitted to each model's encoders, and used by name in prompts; the model
is left as it was."""

import os

import torch
from twisted.trial.unittest import SynchronousTestCase

from runai.broker import wire
from runai.models import embeddings
from runai.models.errors import CheckpointError
from runai.test.prompt_fixtures import (
    SD_WIDTH, XL_WIDTHS, core_request, png, prompt_models, shared_engine, vectors, write_embedding)


class Evil:
    """Unpickled, it would run a command: the file must be refused, never run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class ListingTests(SynchronousTestCase):
    def test_every_format_is_read_from_its_header(self):
        written = {
            "a1111": write_embedding(self, "a1111", "pt", vectors(3, SD_WIDTH), step=250),
            "old-torch": write_embedding(self, "old-torch", "parameterdict", vectors(1, SD_WIDTH)),
            "kohya": write_embedding(self, "kohya", "emb_params", vectors(2, SD_WIDTH)),
            "concept": write_embedding(self, "concept", "diffusers", vectors(1, SD_WIDTH)[0]),
            "concept-st": write_embedding(self, "concept-st", "diffusers-safetensors", vectors(4, SD_WIDTH)),
            "xl-pair": write_embedding(self, "xl-pair", "pair", {"clip_l": vectors(2, 16), "clip_g": vectors(2, 32)}),
        }
        listed = embeddings.for_model(prompt_models())
        self.assertEqual(listed["skipped"], {})
        loaded = listed["loaded"]
        self.assertEqual(loaded["a1111"], {"step": 250, "sd_checkpoint": "abcdef12", "sd_checkpoint_name": "base",
                                           "shape": SD_WIDTH, "vectors": 3})
        self.assertEqual({name: (e["shape"], e["vectors"]) for name, e in loaded.items()}, {
            "a1111": (SD_WIDTH, 3), "old-torch": (SD_WIDTH, 1), "kohya": (SD_WIDTH, 2), "concept": (SD_WIDTH, 1),
            "concept-st": (SD_WIDTH, 4), "xl-pair": (48, 2)})
        # And the vectors the worker loads (through the restricted unpickler for a .pt).
        for name, path in written.items():
            loaded = embeddings.load(embeddings.EmbeddingRef(name, str(path)))
            rows = 2 if name == "xl-pair" else {"a1111": 3, "kohya": 2, "concept-st": 4}.get(name, 1)
            self.assertEqual(sorted(loaded, key=str), ["clip_g", "clip_l"] if name == "xl-pair" else [None], name)
            for key, tensor in loaded.items():
                self.assertEqual((tensor.dtype, tensor.shape[0]), (torch.float32, rows), name)
        self.assertTrue(torch.equal(embeddings.load(embeddings.EmbeddingRef("x", str(written["a1111"])))[None],
                                    vectors(3, SD_WIDTH)))

    def test_each_model_takes_the_ones_of_its_width(self):
        write_embedding(self, "one", "pt", vectors(1, SD_WIDTH))
        write_embedding(self, "wide", "emb_params", vectors(1, 48))
        write_embedding(self, "pair", "pair", {"clip_l": vectors(1, XL_WIDTHS[0]), "clip_g": vectors(1, XL_WIDTHS[1])})
        sd = embeddings.for_model(prompt_models(), "v1/tiny")
        self.assertEqual((sorted(sd["loaded"]), sorted(sd["skipped"])), (["one"], ["pair", "wide"]))
        for model in ("sdxl/base", "sd3/medium"):
            xl = embeddings.for_model(prompt_models(), model)
            self.assertEqual((sorted(xl["loaded"]), sorted(xl["skipped"])), (["pair"], ["one", "wide"]), model)

    def test_names_are_file_names_and_paths_where_two_share_one(self):
        write_embedding(self, "same", "pt", vectors(1, SD_WIDTH))
        other = prompt_models() / "embeddings" / "more"
        other.mkdir()
        self.addCleanup(other.rmdir)
        path = other / "same.safetensors"
        os.rename(write_embedding(self, "tmp", "emb_params", vectors(1, SD_WIDTH)), path)
        self.addCleanup(path.unlink)
        names = sorted(embeddings.for_model(prompt_models())["loaded"])
        self.assertEqual(names, ["embeddings/more/same", "embeddings/same"])

    def test_other_files_are_not_embeddings(self):
        folder = prompt_models() / "embeddings"
        torch.save({"a": torch.zeros(2), "b": torch.zeros(2)}, folder / "two.pt")
        torch.save({"string_to_param": {"*": torch.zeros(2, 3, 4)}}, folder / "cube.pt")
        (folder / "junk.pt").write_bytes(b"not a pickle")
        for name in ("two.pt", "cube.pt", "junk.pt"):
            self.addCleanup((folder / name).unlink)
        self.assertEqual(embeddings.for_model(prompt_models()), {"loaded": {}, "skipped": {}})

    def test_a_pickle_that_would_run_code_is_refused(self):
        marker = prompt_models() / "embeddings" / "ran"
        path = prompt_models() / "embeddings" / "evil.pt"
        torch.save({"string_to_param": {"*": vectors(1, SD_WIDTH)}, "name": Evil(marker)}, path)
        self.addCleanup(lambda: path.unlink(missing_ok=True))
        # Read statically for the listing: it looks like an embedding, and nothing ran.
        self.assertIn("evil", embeddings.for_model(prompt_models())["loaded"])
        with self.assertRaises(CheckpointError) as caught:
            embeddings.load(embeddings.EmbeddingRef("evil", str(path)))
        self.assertIn("refused to unpickle", caught.exception.message)
        self.assertIn("system", caught.exception.message)
        # A job that names it paints the word, and runs nothing.
        engine = shared_engine()
        request = core_request("v1/tiny", "a lighthouse, evil")
        self.assertEqual([r.name for r in request.embeddings], ["evil"])
        with_it = png(engine, request)
        self.assertFalse(marker.exists())
        path.unlink()
        self.assertEqual(png(engine, core_request("v1/tiny", "a lighthouse, evil")), with_it)


class UseTests(SynchronousTestCase):
    def setUp(self):
        self.engine = shared_engine()

    def test_an_embedding_changes_the_image_and_leaves_the_model_as_it_was(self):
        base = png(self.engine, core_request("v1/tiny", "a lighthouse"))
        as_text = png(self.engine, core_request("v1/tiny", "a lighthouse, tinyemb"))
        pipe = self.engine.load(str(prompt_models() / "v1" / "tiny"))
        weights = pipe.text_encoder.get_input_embeddings().weight.clone()
        tokens = len(pipe.tokenizer)
        vecs = vectors(2, SD_WIDTH, seed=3)
        write_embedding(self, "tinyemb", "pt", vecs)
        request = core_request("v1/tiny", "a lighthouse, tinyemb")
        self.assertEqual([r.name for r in request.embeddings], ["tinyemb"])
        with_pt = png(self.engine, request)
        self.assertNotEqual(with_pt, as_text)
        # The same vectors from a .safetensors (emb_params), under another name: the same image.
        write_embedding(self, "tinyemb2", "emb_params", vecs)
        self.assertEqual(png(self.engine, core_request("v1/tiny", "a lighthouse, TinyEmb2")), with_pt)
        # Weighted, in the negative prompt too.
        self.assertNotEqual(png(self.engine, core_request("v1/tiny", "a lighthouse, (tinyemb:1.3)")), with_pt)
        negative = core_request("v1/tiny", "a lighthouse", negative="tinyemb")
        self.assertEqual([r.name for r in negative.embeddings], ["tinyemb"])
        # Nothing of it stays: the next job without it is the base image, and the model is untouched.
        self.assertEqual(png(self.engine, core_request("v1/tiny", "a lighthouse")), base)
        self.assertTrue(torch.equal(pipe.text_encoder.get_input_embeddings().weight, weights))
        self.assertEqual(len(pipe.tokenizer), tokens)
        self.assertEqual(pipe.text_encoder.get_input_embeddings()._forward_hooks, {})

    def test_a_wrong_width_is_skipped_and_reported(self):
        as_text = png(self.engine, core_request("v1/tiny", "a lighthouse, toowide"))
        write_embedding(self, "toowide", "pt", vectors(1, SD_WIDTH + 8))
        request = core_request("v1/tiny", "a lighthouse, toowide")
        self.assertEqual(request.embeddings, ())
        self.assertEqual(png(self.engine, request), as_text)
        self.assertIn("toowide", embeddings.for_model(prompt_models(), "v1/tiny")["skipped"])

    def test_pairs_for_two_encoders(self):
        pair = {"clip_l": vectors(2, XL_WIDTHS[0], seed=5), "clip_g": vectors(2, XL_WIDTHS[1], seed=6)}
        for model in ("sdxl/base", "sd3/medium"):
            as_text = png(self.engine, core_request(model, "a lighthouse, xlemb"))
            write_embedding(self, "xlemb", "pair", pair)
            request = core_request(model, "a lighthouse, xlemb")
            self.assertEqual([r.name for r in request.embeddings], ["xlemb"], model)
            self.assertNotEqual(png(self.engine, request), as_text, model)
            (prompt_models() / "embeddings" / "xlemb.safetensors").unlink()

    def test_embeddings_travel_by_name_through_the_broker(self):
        write_embedding(self, "wired", "pt", vectors(1, SD_WIDTH))
        request = core_request("v1/tiny", "wired lighthouse")
        fields = wire.encode_job(request, "key-1", "front-1")
        decoded = wire.decode_job({k.encode(): v for k, v in fields.items()}).request(prompt_models())
        self.assertEqual(decoded.embeddings, request.embeddings)
