"""The ``<lora:...>`` of ``hr_prompt`` on the hires fix's second pass (runai.core.hires_loras,
runai.engine.hires): each pass with its own LoRAs, checked against the two passes done by
hand through the engine, the model as loaded after the job (a cancel too), the refusals
before the queue, the broker's wire and the infotext."""

import atexit
import hashlib
import io
import json
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase

from runai.broker import wire
from runai.core import errors, prompts
from runai.core.hires_loras import job_loras, second_pass_loras
from runai.core.images import EncodedImage
from runai.core.requests import Limits
from runai.doors.http import replies
from runai.doors.legacy.parse import parse_request
from runai.engine.engine import Engine
from runai.families import for_pipeline
from runai.models import lora_apply
from runai.models.library import ModelLibrary
from runai.test import lora_fixtures as lf
from runai.test.test_e2e import tiny_model_dir
from runai.test.test_http import HttpTestCase

UNET_MODULES = ("attn1.to_q", "attn2.to_k", "attn2.to_v", "proj_out")
TE_MODULES = ("mlp.fc1", "mlp.fc2")
_shared = {}


def shared():
    """A model folder of its own (v1/tiny, copied, with two LoRAs: style and detail), an
    engine on it, and the model's weights as loaded; built once for the module."""
    if not _shared:
        root = os.path.realpath(tempfile.mkdtemp(prefix="runai-hires-loras-"))
        atexit.register(shutil.rmtree, root, True)
        shutil.copytree(os.path.join(tiny_model_dir(), "v1", "tiny"), os.path.join(root, "v1", "tiny"))
        engine = Engine(device="cpu", dtype="float32", library=ModelLibrary(root))
        pipe = engine.load(os.path.join(root, "v1", "tiny"))
        targets = ([("lora_unet_", pipe.unet, n) for n in lf.modules_of(pipe.unet, UNET_MODULES)]
                   + [("lora_te_", pipe.text_encoder, n) for n in lf.modules_of(pipe.text_encoder, TE_MODULES)])
        for seed, name in enumerate(("style", "detail"), start=1):
            lf.save(os.path.join(root, "loras", name + ".safetensors"), lf.kohya_state(targets, seed=seed, std=1.0))
        # A LoRA for no module of this model: refused by the merge, in the worker.
        lf.write_lora_header(os.path.join(root, "loras", "alien.safetensors"), modules=("lora_unet_no_such_module",))
        _shared.update(root=root, engine=engine, pristine=weights(engine))
    return _shared


def weights(engine):
    return {f"{c}.{k}": v.detach().clone() for c in ("unet", "text_encoder")
            for k, v in getattr(engine.pipe, c).state_dict().items()}


def hires_request(prompt="a lighthouse", hr_prompt="", **options):
    base = {"txt2img_model": "v1/tiny", "txt2img_prompt": prompt, "txt2img_negative_prompt": "fog",
            "txt2img_steps": 3, "txt2img_width": 64, "txt2img_height": 64, "txt2img_seed": 7,
            "txt2img_scheduler": "euler_a", "enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Lanczos",
            "strength": 0.5, "hr_prompt": hr_prompt}
    base.update(options)
    return parse_request({"action": "txt2img", "options": base}, Path(shared()["root"]), Limits())


class HiresLoraTestCase(SynchronousTestCase):
    def setUp(self):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        self.addCleanup(torch.set_num_threads, threads)
        self.engine = shared()["engine"]

    def pngs(self, req, cancel_at=None):
        """The job's PNGs (``cancel_at``: cancelled once that many progress events came)."""
        progress, images = [], []
        self.engine.generate(req, lambda *event: progress.append(event[:2]), images.append,
                             lambda: cancel_at is not None and len(progress) >= cancel_at)
        return [image.png for image in images]

    def run_job(self, req, cancel_at=None):
        """The SHA-256 of the job's PNGs (short to compare; a failure prints no megabytes)."""
        return [hashlib.sha256(png).hexdigest() for png in self.pngs(req, cancel_at)]

    def by_hand(self, req):
        """The two passes as two jobs: the txt2img with the first pass's LoRAs, its Lanczos
        upscale, an img2img with the second pass's prompts and LoRAs."""
        hires = req.hires
        [first] = self.pngs(replace(req, hires=None))
        upscaled = Image.open(io.BytesIO(first)).convert("RGB").resize((hires.width, hires.height), Image.LANCZOS)
        buffer = io.BytesIO()
        upscaled.save(buffer, format="PNG")
        pixels = EncodedImage(data=buffer.getvalue(), format="PNG", width=hires.width, height=hires.height, mode="RGB")
        second = replace(req, action="img2img", hires=None, width=hires.width, height=hires.height,
                         steps=hires.steps, strength=hires.strength, prompt=hires.prompt or req.prompt,
                         negative_prompt=hires.negative_prompt or req.negative_prompt,
                         loras=second_pass_loras(req), pixels=pixels)
        [final] = self.run_job(second)
        return final

    def merged(self):
        return self.engine.loader.current.loras

    def assertPristine(self):
        """After the job, the next job's merge (here: of no LoRA) leaves the model as loaded."""
        lora_apply.apply(self.engine.loader, for_pipeline(self.engine.pipe), ())
        now, pristine = weights(self.engine), shared()["pristine"]
        self.assertEqual(sorted(now), sorted(pristine))
        self.assertEqual([k for k in pristine if not torch.equal(now[k], pristine[k])], [])


class SecondPassTests(HiresLoraTestCase):
    def test_a_lora_in_hr_prompt_is_the_second_pass_alone(self):
        req = hires_request(hr_prompt="a lighthouse <lora:style:0.8>")
        self.assertEqual(req.loras, ())
        self.assertEqual([(r.name, r.te, r.unet) for r in req.hires.loras], [("style", 0.8, 0.8)])
        [png] = self.pngs(req)
        self.assertEqual(Image.open(io.BytesIO(png)).size, (req.hires.width, req.hires.height))
        styled = hashlib.sha256(png).hexdigest()
        [plain] = self.run_job(hires_request(hr_prompt="a lighthouse"))
        self.assertNotEqual(styled, plain)
        # The first pass without it, the second with it: the same bytes as by hand.
        self.assertEqual(styled, self.by_hand(req))
        self.assertPristine()

    def test_a_prompt_lora_left_out_of_hr_prompt_is_off_in_the_second_pass(self):
        req = hires_request(prompt="a lighthouse <lora:style:0.8>", hr_prompt="a lighthouse")
        self.assertEqual(req.hires.loras, ())
        [mine] = self.run_job(req)
        both = hires_request(prompt="a lighthouse <lora:style:0.8>")  # no hr_prompt: the first pass's LoRAs
        self.assertIsNone(both.hires.loras)
        self.assertEqual(second_pass_loras(both), both.loras)
        [in_both] = self.run_job(both)
        self.assertNotEqual(mine, in_both)
        self.assertEqual(mine, self.by_hand(req))
        self.assertEqual(in_both, self.by_hand(both))

    def test_another_lora_and_another_weight_in_each_pass(self):
        req = hires_request(prompt="a lighthouse <lora:style:0.8>", hr_prompt="a lighthouse <lora:detail:0.5:1.2>",
                            hr_negative_prompt="haze <lora:style:0.3>")
        self.assertEqual([(r.name, r.te, r.unet) for r in req.hires.loras], [("detail", 0.5, 1.2), ("style", 0.3, 0.3)])
        [mine] = self.run_job(req)
        self.assertEqual(mine, self.by_hand(req))

    def test_deterministic_and_switched_only_where_the_sets_differ(self):
        req = hires_request(prompt="a lighthouse <lora:style:0.8>", hr_prompt="a tower <lora:detail:1>",
                            txt2img_n_iter=2)
        a, b = self.run_job(req), self.run_job(req)
        self.assertEqual(len(a), 2)
        self.assertEqual(a, b)  # same seed, same bytes
        self.assertNotEqual(a[0], a[1])
        # The second batch's first pass runs with the first pass's set again.
        self.assertEqual(a[1], self.by_hand(replace(req, seed=req.seed + 1, n_iter=1)))
        # Each batch merges the first pass's set, then the second's.
        before = self.merged().merges
        self.run_job(req)
        self.assertEqual(self.merged().merges - before, 4)
        # The same set in both passes (hr_prompt with the same tag, or none): merged once.
        for same in (hires_request(prompt="a lighthouse <lora:style:0.8>", hr_prompt="a tower <lora:style:0.8>",
                                   txt2img_n_iter=2),
                     hires_request(prompt="a lighthouse <lora:style:0.8>", txt2img_n_iter=2)):
            self.run_job(req)  # ends with the other set merged
            before = self.merged().merges
            self.run_job(same)
            self.assertEqual(self.merged().merges - before, 1)
            before = self.merged().merges
            self.run_job(same)
            self.assertEqual(self.merged().merges - before, 0)

    def test_a_cancel_in_the_second_pass_leaves_nothing_behind(self):
        req = hires_request(prompt="a lighthouse <lora:style:0.8>", hr_prompt="a tower <lora:detail:1>",
                            hr_second_pass_steps=20, strength=1.0)
        first_steps = 3
        with self.assertRaises(errors.JobCancelled):
            self.run_job(req, cancel_at=first_steps + 2)
        # Cancelled in the second pass: its set is merged, and the model's state says so.
        self.assertEqual(self.merged().key, lora_apply._key(req.hires.loras))
        self.assertPristine()
        # And the next jobs are what they are on a model that never saw the cancel.
        plain = hires_request(hr_prompt="a tower")
        [after] = self.run_job(plain)
        [again] = self.run_job(req, cancel_at=None)
        with self.assertRaises(errors.JobCancelled):
            self.run_job(req, cancel_at=first_steps + 2)
        self.assertEqual(self.run_job(req), [again])
        self.assertEqual(self.run_job(plain), [after])
        self.assertPristine()

    def test_a_second_pass_lora_that_does_not_fit_fails_the_job_and_leaves_nothing_behind(self):
        req = hires_request(prompt="a lighthouse <lora:style:0.8>", hr_prompt="a tower <lora:alien:1>")
        with self.assertRaises(errors.RunaiError) as caught:
            self.run_job(req)
        self.assertEqual(caught.exception.code, errors.BAD_REQUEST)
        self.assertIn("'alien'", caught.exception.message)
        good = hires_request(prompt="a lighthouse <lora:style:0.8>", hr_prompt="a tower <lora:detail:1>")
        self.assertEqual(self.run_job(good), [self.by_hand(good)])
        self.assertPristine()


class RequestTests(HiresLoraTestCase):
    def test_an_unknown_lora_in_hr_prompt_is_refused_as_in_the_prompt(self):
        codes = []
        for options in (dict(prompt="a lighthouse <lora:nope:1>"), dict(hr_prompt="a tower <lora:nope:1>"),
                        dict(hr_negative_prompt="<lora:nope:1>")):
            with self.assertRaises(errors.RunaiError) as caught:
                hires_request(**options)
            self.assertIn("'nope'", caught.exception.message)
            codes.append(caught.exception.code)
        self.assertEqual(codes, [errors.MODEL_NOT_FOUND] * 3)
        # Without hires fix, hr_prompt is not read.
        self.assertIsNone(hires_request(hr_prompt="<lora:nope:1>", enable_hr=False).hires)

    def test_the_network_limit_counts_both_passes(self):
        half = prompts.MAX_NETWORKS // 2 + 1
        first = "".join(f"<lora:style:{k / 10:g}>" for k in range(half))
        # Named in both passes with the same weights: counted once.
        self.assertEqual(len(hires_request(prompt="a" + first, hr_prompt="b" + first).hires.loras), half)
        other = "".join(f"<lora:detail:{k / 10:g}>" for k in range(half))
        with self.assertRaises(errors.RunaiError) as caught:
            hires_request(prompt="a" + first, hr_prompt="b" + other)
        self.assertEqual(caught.exception.code, errors.OUT_OF_RANGE)
        self.assertIn(f"the limit is {prompts.MAX_NETWORKS}", caught.exception.message)

    def test_the_second_pass_loras_travel_through_the_broker(self):
        root = shared()["root"]
        for req in (hires_request(prompt="x <lora:style:0.8>", hr_prompt="y <lora:detail:0.5:1.5>"),
                    hires_request(prompt="x <lora:style:0.8>", hr_prompt="y"), hires_request(prompt="x <lora:style>")):
            fields = wire.encode_job(replace(req, id="k"), "k", "front")
            self.assertNotIn(root, fields["request"])  # by name, never the front's paths
            job = wire.decode_job({k.encode(): v if isinstance(v, bytes) else str(v).encode()
                                   for k, v in fields.items()})
            self.assertEqual(job.request(root).hires, req.hires)

    def test_the_infotext_names_the_hires_prompt_and_both_passes_loras(self):
        class Checkpoints:
            def hash_of(self, name):
                return "0123456789"

        req = hires_request(prompt="a lighthouse <lora:style:0.8>", hr_prompt="a tower, <lora:detail:1>")
        self.assertEqual([ref.name for ref in job_loras(req)], ["style", "detail"])
        text = replies.infotext(req, 7, Checkpoints(), [("style", "aaaa"), ("detail", "bbbb")])
        self.assertIn('Hires prompt: "a tower, <lora:detail:1>"', text)
        self.assertIn('Lora hashes: "style: aaaa, detail: bbbb"', text)
        self.assertNotIn("Hires negative prompt", text)
        same = hires_request(prompt="a lighthouse <lora:style:0.8>")
        self.assertEqual([ref.name for ref in job_loras(same)], ["style"])
        self.assertNotIn("Hires prompt", replies.infotext(same, 7, Checkpoints(), []))


class HttpTests(HttpTestCase):
    def model_dir(self):
        return shared()["root"]

    @inlineCallbacks
    def test_the_hires_prompt_and_both_passes_lora_hashes_in_the_infotext(self):
        body = {"prompt": "a lighthouse <lora:style:0.8>", "seed": 5, "steps": 2, "width": 64, "height": 64,
                "enable_hr": True, "hr_scale": 1.5, "denoising_strength": 0.5, "hr_prompt": "a tower <lora:detail:1>"}
        reply = yield self.in_thread(lambda: self.post("txt2img", body).json())
        [infotext] = json.loads(reply["info"])["infotexts"]
        sha = {}
        for name in ("style", "detail"):
            with open(os.path.join(self.models, "loras", name + ".safetensors"), "rb") as f:
                sha[name] = hashlib.sha256(f.read()).hexdigest()[:12]
        self.assertIn('Hires prompt: "a tower <lora:detail:1>"', infotext)
        self.assertIn(f'Lora hashes: "style: {sha["style"]}, detail: {sha["detail"]}"', infotext)
        refused = yield self.in_thread(lambda: self.post("txt2img", dict(body, hr_prompt="<lora:nope:1>")))
        self.assertEqual((refused.status_code, refused.json()["error"]), (404, "model_not_found"))
