"""A1111's emphasis and BREAK through the CLIP encoders (runai.families.clip_text, and the
SD, SDXL and SD3 families' text), on tiny random-weight models: weights of 1 paint the
plain prompt's very image, others another; runai's own encoding of a plain prompt is
diffusers' to the bit."""

import torch
from twisted.trial.unittest import SynchronousTestCase

from runai.families import clip_text, sd3
from runai.test.prompt_fixtures import core_request, png, prompt_models, shared_engine

MODELS = ("v1/tiny", "sdxl/base", "sd3/medium")


class EmphasisTests(SynchronousTestCase):
    def setUp(self):
        self.engine = shared_engine()

    def test_weight_one_is_the_plain_image_and_another_weight_is_not(self):
        for model in MODELS:
            plain = png(self.engine, core_request(model, "a lighthouse at dusk"))
            self.assertEqual(png(self.engine, core_request(model, "a (lighthouse:1.0) at dusk")), plain, model)
            self.assertNotEqual(png(self.engine, core_request(model, "a (lighthouse:1.5) at dusk")), plain, model)
        # Weights that come to 1 are 1; the negative prompt takes weights too.
        self.assertEqual(png(self.engine, core_request("v1/tiny", "a [(lighthouse)] at dusk")),
                         png(self.engine, core_request("v1/tiny", "a lighthouse at dusk")))
        self.assertNotEqual(png(self.engine, core_request("v1/tiny", "a lighthouse", negative="(fog:1.3)")),
                            png(self.engine, core_request("v1/tiny", "a lighthouse", negative="fog")))

    def test_runais_encoding_of_a_plain_prompt_is_diffusers_own(self):
        pipe = self.engine.load(str(prompt_models() / "v1" / "tiny"))
        embeds, negative = clip_text.encode(pipe, "a lighthouse", "fog", self.engine.device)
        with torch.inference_mode():
            theirs = pipe.encode_prompt("a lighthouse", self.engine.device, 1, True, "fog")
        self.assertTrue(torch.equal(embeds, theirs[0]))
        self.assertTrue(torch.equal(negative, theirs[1]))

        pipe = self.engine.load(str(prompt_models() / "sd3" / "medium"))
        mine = sd3.encode(pipe, "a lighthouse at dusk", "", self.engine.device)
        with torch.inference_mode():
            theirs = pipe.encode_prompt("a lighthouse at dusk", None, None, device=self.engine.device,
                                        negative_prompt="")
        for name, tensor in zip(("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
                                 "negative_pooled_prompt_embeds"), theirs):
            self.assertTrue(torch.equal(mine[name], tensor), name)
        # The whole image too, a batch of two included (the pipeline does not repeat
        # embeddings it is given: the family does).
        request = core_request("sd3/medium", "a lighthouse at dusk", n_samples=2)
        images = []
        self.engine.generate(request, lambda s, t: None, images.append, lambda: False)
        self.patch(clip_text, "is_plain", lambda texts, found: False)
        own = []
        self.engine.generate(request, lambda s, t: None, own.append, lambda: False)
        self.assertEqual([i.png for i in own], [i.png for i in images])

    def test_break_starts_a_chunk(self):
        pipe = self.engine.load(str(prompt_models() / "v1" / "tiny"))
        embeds, negative = clip_text.encode(pipe, "a lighthouse BREAK at dusk", "", self.engine.device)
        self.assertEqual((embeds.shape[1], negative.shape[1]), (2 * 77, 2 * 77))
        one, _ = clip_text.encode(pipe, "a lighthouse at dusk", "", self.engine.device)
        self.assertEqual(one.shape[1], 77)
        self.assertNotEqual(png(self.engine, core_request("v1/tiny", "a lighthouse BREAK at dusk")),
                            png(self.engine, core_request("v1/tiny", "a lighthouse at dusk")))

    def test_chunks_follow_a1111(self):
        pipe = self.engine.load(str(prompt_models() / "v1" / "tiny"))
        tokenizer = pipe.tokenizer
        ids = clip_text.token_ids(tokenizer, "ab")
        chunks = clip_text.chunk_lists(tokenizer, [clip_text.parsed("BREAK (ab:1.5) BREAK"),
                                                   clip_text.parsed("x" * 80)], {})
        self.assertEqual([len(c) for c in chunks], [2, 2])
        self.assertEqual(chunks[0][0], ([], [], []))  # a BREAK first: an empty chunk
        self.assertEqual(chunks[0][1][:2], (ids, [1.5] * len(ids)))
        self.assertEqual([len(c[0]) for c in chunks[1]], [75, 5])
        rows, weights, fixes = clip_text.rows(tokenizer, chunks[0])
        self.assertEqual([len(r) for r in rows] + [len(w) for w in weights], [77] * 4)
        self.assertEqual(weights[1][:1 + len(ids) + 1], [1.0] + [1.5] * len(ids) + [1.0])


class EmphasizeTests(SynchronousTestCase):
    def test_a1111s_original_emphasis(self):
        hidden = torch.randn(2, 77, 8, generator=torch.Generator().manual_seed(0)) + 0.5
        weights = [[1.0] * 77, [1.0] + [1.5] * 3 + [1.0] * 73]
        out = clip_text.emphasize(hidden, weights)
        self.assertTrue(torch.equal(out[0], hidden[0]))  # all ones: untouched
        expected = hidden[1] * torch.tensor(weights[1])[:, None]
        expected = expected * (hidden[1].mean() / expected.mean())
        self.assertTrue(torch.allclose(out[1], expected))
        self.assertAlmostEqual(float(out[1].mean()), float(hidden[1].mean()), places=5)
