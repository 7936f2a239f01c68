"""Tests for runai.doors.legacy.parse: decoding and validating legacy requests, down to the
core's checks of every value (runai.core.requests, runai.core.fields)."""

import json
import os
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from runai.core import errors
from runai.core.requests import MAX_SEED, GenerationRequest, Limits
from runai.doors.legacy.parse import MAX_ID_LENGTH, Cancel, Ping, decode_message, parse_request
from runai.core.schedulers import DEFAULT_SCHEDULER, SCHEDULERS


class DecodeMessageTests(SynchronousTestCase):
    def assert_code(self, payload, code):
        with self.assertRaises(errors.RunaiError) as caught:
            decode_message(payload)
        self.assertEqual(caught.exception.code, code)

    def test_object(self):
        self.assertEqual(decode_message(b'{"action": "ping", "id": 3}'), {"action": "ping", "id": 3})

    def test_utf8(self):
        self.assertEqual(decode_message('{"p": "caf\u00e9 \u732b"}'.encode()), {"p": "caf\u00e9 \u732b"})

    def test_not_utf8(self):
        self.assert_code(b'{"a": "\xff\xfe"}', errors.BAD_ENCODING)
        self.assert_code('{"a": "é"}'.encode("latin-1"), errors.BAD_ENCODING)

    def test_not_json(self):
        self.assert_code(b"{action: ping}", errors.BAD_JSON)
        self.assert_code(b"", errors.BAD_JSON)
        self.assert_code(b'{"a": 1', errors.BAD_JSON)

    def test_not_an_object(self):
        self.assert_code(b'["action", "ping"]', errors.BAD_JSON)
        self.assert_code(b'"ping"', errors.BAD_JSON)
        self.assert_code(b"42", errors.BAD_JSON)
        self.assert_code(b"null", errors.BAD_JSON)

    def test_deeply_nested(self):
        self.assert_code(b"[" * 100_000 + b"]" * 100_000, errors.BAD_JSON)
        self.assert_code(b'{"a":' * 100_000 + b"1" + b"}" * 100_000, errors.BAD_JSON)


class ModelDirMixin:
    def make_model_dir(self):
        root = Path(self.mktemp())
        model = root / "models" / "v1" / "tiny"
        model.mkdir(parents=True)
        (model / "model_index.json").write_text("{}")
        return Path(os.path.realpath(root / "models"))


class ParseRequestTests(ModelDirMixin, SynchronousTestCase):
    def setUp(self):
        self.model_dir = self.make_model_dir()

    def parse(self, obj, limits=Limits()):
        return parse_request(obj, self.model_dir, limits)

    def assert_code(self, obj, code, limits=Limits()):
        with self.assertRaises(errors.RunaiError) as caught:
            self.parse(obj, limits)
        self.assertEqual(caught.exception.code, code, caught.exception.message)
        return caught.exception

    def txt2img(self, id=None, **options):
        """A legacy txt2img request; ``None`` values drop an option."""
        base = {
            "model_base_path": str(self.model_dir),
            "txt2img_model": str(self.model_dir / "v1" / "tiny"),
            "txt2img_prompt": "a cat",
        }
        base.update(options)
        obj = {"action": "txt2img", "options": {k: v for k, v in base.items() if v is not None}}
        if id is not None:
            obj["id"] = id
        return obj

    # Simple actions -------------------------------------------------------------------

    def test_ping(self):
        self.assertEqual(self.parse({"action": "ping"}), Ping(id=None))
        self.assertEqual(self.parse({"action": "ping", "id": 7}), Ping(id=7))

    def test_cancel(self):
        self.assertEqual(self.parse({"action": "cancel", "id": "job-1"}), Cancel(id="job-1"))
        self.assertEqual(self.parse({"action": "cancel", "id": 12}), Cancel(id=12))

    def test_no_action(self):
        self.assert_code({}, errors.BAD_REQUEST)
        self.assert_code({"action": 4}, errors.BAD_REQUEST)
        self.assert_code({"action": None}, errors.BAD_REQUEST)

    def test_unknown_action(self):
        e = self.assert_code({"action": "update"}, errors.UNKNOWN_ACTION)
        self.assertIn("txt2img", e.message)
        self.assertIn("ping", e.message)

    def test_unknown_action_long_name_truncated(self):
        e = self.assert_code({"action": "z" * 10_000}, errors.UNKNOWN_ACTION)
        self.assertLess(len(e.message), 500)

    # txt2img ----------------------------------------------------------------------------

    def test_legacy_txt2img_every_option(self):
        request = self.parse({
            "action": "txt2img",
            "id": "r1",
            "options": {
                "model_base_path": str(self.model_dir),
                "txt2img_model": str(self.model_dir / "v1" / "tiny"),
                "txt2img_prompt": "a cat in a hat",
                "txt2img_negative_prompt": "blurry",
                "txt2img_steps": 33,
                "txt2img_scale": 9,
                "txt2img_seed": 1234,
                "txt2img_height": 640,
                "txt2img_width": 384,
                "txt2img_n_samples": 2,
                "txt2img_strength": 0.25,
                "txt2img_scheduler": "ddim",
                "txt2img_ddim_eta": 0.5,
                "txt2img_n_iter": 3,
                "version": "v1",
                "do_nsfw_filter": True,
                "do_watermark": True,
                "pos_x": 10,
                "pos_y": -20,
            },
        })
        self.assertEqual(request, GenerationRequest(
            action="txt2img",
            model_path=str(self.model_dir / "v1" / "tiny"),
            model_name="v1/tiny",
            prompt="a cat in a hat",
            negative_prompt="blurry",
            steps=33,
            scale=9.0,
            seed=1234,
            width=384,
            height=640,
            n_samples=2,
            n_iter=3,
            scheduler="ddim",
            ddim_eta=0.5,
            strength=0.25,
            pos_x=10,
            pos_y=-20,
            nsfw_filter=True,
            id="r1",
        ))
        self.assertIsInstance(request.scale, float)
        self.assertEqual(request.image_count, 6)

    def test_unprefixed_options(self):
        request = self.parse({
            "action": "txt2img",
            "options": {
                "model": "v1/tiny",
                "prompt": "p",
                "negative_prompt": "n",
                "steps": 5,
                "scale": 3.5,
                "seed": 9,
                "height": 256,
                "width": 128,
                "n_samples": 3,
                "n_iter": 2,
                "scheduler": "lms",
                "ddim_eta": 1.0,
                "strength": 0.0,
            },
        })
        self.assertEqual(
            (request.model_name, request.prompt, request.negative_prompt, request.steps,
             request.scale, request.seed, request.height, request.width, request.n_samples,
             request.n_iter, request.scheduler, request.ddim_eta, request.strength),
            ("v1/tiny", "p", "n", 5, 3.5, 9, 256, 128, 3, 2, "lms", 1.0, 0.0),
        )

    def test_prefixed_option_wins(self):
        request = self.parse(self.txt2img(txt2img_steps=7, steps=8))
        self.assertEqual(request.steps, 7)

    def test_other_action_prefix_ignored(self):
        request = self.parse(self.txt2img(img2img_steps=99))
        self.assertEqual(request.steps, 20)

    def test_defaults(self):
        request = self.parse({"action": "txt2img", "options": {"model": "v1/tiny"}})
        self.assertEqual(
            (request.prompt, request.negative_prompt, request.steps, request.scale,
             request.width, request.height, request.n_samples, request.n_iter,
             request.scheduler, request.ddim_eta, request.strength, request.pos_x, request.pos_y),
            ("", "", 20, 7.5, 512, 512, 1, 1, DEFAULT_SCHEDULER, 0.0, 0.8, 0, 0),
        )

    def test_pos_at_top_level(self):
        obj = self.txt2img()
        obj["pos_x"], obj["pos_y"] = 64, 128
        request = self.parse(obj)
        self.assertEqual((request.pos_x, request.pos_y), (64, 128))

    def test_integral_float_accepted(self):
        self.assertEqual(self.parse(self.txt2img(txt2img_steps=25.0)).steps, 25)

    def test_missing_model(self):
        self.assert_code(self.txt2img(txt2img_model=None), errors.BAD_REQUEST)
        self.assert_code({"action": "txt2img"}, errors.BAD_REQUEST)

    def test_model_not_found(self):
        self.assert_code(self.txt2img(txt2img_model="v1/nope"), errors.MODEL_NOT_FOUND)

    def test_model_outside(self):
        self.assert_code(self.txt2img(txt2img_model="/etc"), errors.PATH_OUTSIDE_MODEL_DIR)
        self.assert_code(self.txt2img(model_base_path="/"), errors.PATH_OUTSIDE_MODEL_DIR)

    def test_options_not_an_object(self):
        self.assert_code({"action": "txt2img", "options": ["model", "v1/tiny"]}, errors.BAD_REQUEST)

    def test_wrong_types(self):
        for options in (
            {"txt2img_steps": "20"},
            {"txt2img_steps": True},
            {"txt2img_steps": 20.5},
            {"txt2img_steps": [20]},
            {"txt2img_scale": "x"},
            {"txt2img_scale": False},
            {"txt2img_scale": float("nan")},
            {"txt2img_prompt": 5},
            {"txt2img_prompt": ["a"]},
            {"txt2img_negative_prompt": {}},
            {"txt2img_width": "512"},
            {"txt2img_seed": "42"},
            {"txt2img_n_samples": 1.5},
            {"txt2img_scheduler": 3},
            {"txt2img_model": 3},
            {"model_base_path": 3},
            {"pos_x": "0"},
        ):
            self.assert_code(self.txt2img(**options), errors.BAD_REQUEST)

    def test_lone_surrogate_in_a_prompt_refused_naming_it(self):
        # JSON carries "\ud83d" (half an emoji) as a str no encoder takes: the tokenizer
        # would crash on it in the worker. Whole emoji are text like any other.
        for name in ("txt2img_prompt", "txt2img_negative_prompt", "prompt", "negative_prompt"):
            for text in ("\ud83d", "a cat \udca9 in a hat"):
                # The plain name only counts where the prefixed one is absent.
                obj = json.loads(json.dumps(self.txt2img(**{"txt2img_prompt": None, "prompt": "a cat", name: text})))
                error = self.assert_code(obj, errors.BAD_REQUEST)
                self.assertIn(repr(name), error.message)
        request = self.parse(json.loads(r'{"action": "txt2img", "options": {"txt2img_model": "v1/tiny", '
                                        r'"txt2img_prompt": "a \ud83d\udc31"}}'))
        self.assertEqual(request.prompt, "a \U0001f431")

    def test_out_of_range(self):
        limits = Limits()
        for options in (
            {"txt2img_steps": 0},
            {"txt2img_steps": -1},
            {"txt2img_steps": 10**9},
            {"txt2img_steps": limits.max_steps + 1},
            {"txt2img_width": 63},
            {"txt2img_width": 65},
            {"txt2img_width": 100_000},
            {"txt2img_height": 56},
            {"txt2img_height": 516},
            {"txt2img_height": limits.max_size + 8},
            {"txt2img_n_samples": 0},
            {"txt2img_n_samples": 1000},
            {"txt2img_n_iter": 0},
            {"txt2img_n_iter": limits.max_iter + 1},
            {"txt2img_scale": -0.5},
            {"txt2img_scale": 1e9},
            {"txt2img_scale": float("inf")},
            {"txt2img_ddim_eta": 1.5},
            {"txt2img_strength": -0.1},
            {"txt2img_seed": -2},
            {"txt2img_seed": MAX_SEED + 1},
            {"txt2img_seed": 10**30},
            {"pos_x": 2**31},
            {"txt2img_prompt": "a" * (limits.max_prompt_chars + 1)},
            {"txt2img_negative_prompt": "a" * (limits.max_prompt_chars + 1)},
            {"txt2img_scheduler": "x" * 1000},
        ):
            self.assert_code(self.txt2img(**options), errors.OUT_OF_RANGE)

    def test_limits_inclusive(self):
        limits = Limits()
        request = self.parse(self.txt2img(
            txt2img_steps=limits.max_steps,
            txt2img_width=limits.min_size,
            txt2img_height=limits.max_size,
            txt2img_n_samples=limits.max_samples,
            txt2img_n_iter=limits.max_iter,
            txt2img_scale=limits.max_scale,
            txt2img_prompt="a" * limits.max_prompt_chars,
            txt2img_seed=MAX_SEED - limits.max_samples * limits.max_iter + 1,
        ))
        self.assertEqual(request.steps, limits.max_steps)
        self.assertEqual(request.seeds()[-1], MAX_SEED)

    def test_seed_plus_images_past_max(self):
        self.assert_code(self.txt2img(txt2img_seed=MAX_SEED, txt2img_n_samples=2), errors.OUT_OF_RANGE)
        self.assertEqual(self.parse(self.txt2img(txt2img_seed=MAX_SEED)).seeds(), [MAX_SEED])

    def test_batch_pixels(self):
        limits = Limits()
        # 3 images of 2048x2048 are 12M pixels, over the 8M limit; 2 are exactly 8M.
        self.assert_code(
            self.txt2img(txt2img_width=2048, txt2img_height=2048, txt2img_n_samples=3),
            errors.OUT_OF_RANGE)
        request = self.parse(self.txt2img(txt2img_width=2048, txt2img_height=2048, txt2img_n_samples=2))
        self.assertEqual(request.n_samples * request.width * request.height, limits.max_batch_pixels)
        # n_iter runs one after another: it does not count towards the batch.
        request = self.parse(self.txt2img(txt2img_width=2048, txt2img_height=2048, txt2img_n_iter=16))
        self.assertEqual(request.image_count, 16)

    def test_tighter_limits(self):
        limits = Limits(max_steps=10, max_batch_pixels=64 * 64, max_prompt_chars=5)
        self.assert_code(self.txt2img(txt2img_steps=11), errors.OUT_OF_RANGE, limits)
        self.assert_code(self.txt2img(txt2img_prompt="abcdef"), errors.OUT_OF_RANGE, limits)
        self.assert_code(self.txt2img(txt2img_prompt="abc"), errors.OUT_OF_RANGE, limits)  # 512x512
        request = self.parse(self.txt2img(
            txt2img_prompt="abc", txt2img_width=64, txt2img_height=64, txt2img_steps=10), limits)
        self.assertEqual(request.steps, 10)

    def test_unknown_scheduler(self):
        e = self.assert_code(self.txt2img(txt2img_scheduler="k_euler_magic"), errors.UNKNOWN_SCHEDULER)
        for name in SCHEDULERS:
            self.assertIn(name, e.message)
        self.assertIn("k_euler_magic", e.message)

    def test_legacy_scheduler_names(self):
        for name in ("euler_a", "euler", "ddpm", "ddim", "plms", "lms", "dpm"):
            self.assertEqual(self.parse(self.txt2img(txt2img_scheduler=name)).scheduler, name)

    def test_random_seed(self):
        limits = Limits()
        seeds = set()
        for options in ({"txt2img_seed": -1}, {}, {"txt2img_seed": None}):
            for _ in range(5):
                request = self.parse(self.txt2img(
                    txt2img_n_samples=limits.max_samples, txt2img_n_iter=limits.max_iter,
                    txt2img_width=64, txt2img_height=64, **options))
                self.assertGreaterEqual(request.seed, 0)
                self.assertLessEqual(request.seeds()[-1], MAX_SEED)
                seeds.add(request.seed)
        # 15 draws from ~4e9 values: all alike would mean no randomness.
        self.assertGreater(len(seeds), 1)

    def test_seed_zero_is_kept(self):
        self.assertEqual(self.parse(self.txt2img(txt2img_seed=0)).seed, 0)

    def test_seeds(self):
        request = self.parse(self.txt2img(txt2img_seed=100, txt2img_n_samples=2, txt2img_n_iter=2))
        self.assertEqual(request.seeds(), [100, 101, 102, 103])
        request = self.parse(self.txt2img(txt2img_seed=5, txt2img_n_samples=3))
        self.assertEqual(request.seeds(), [5, 6, 7])

    # ids ----------------------------------------------------------------------------

    def test_id_echo(self):
        for rid in (0, 1, -5, 2**40, "", "abc", "x" * MAX_ID_LENGTH):
            self.assertEqual(self.parse({"action": "ping", "id": rid}).id, rid)
            self.assertEqual(self.parse(self.txt2img(id=rid)).id, rid)
        self.assertIsNone(self.parse({"action": "ping", "id": None}).id)
        self.assertIsNone(self.parse(self.txt2img()).id)

    def test_bad_ids(self):
        for rid in (True, False, [1], {"a": 1}, 1.5, "x" * (MAX_ID_LENGTH + 1)):
            self.assert_code({"action": "ping", "id": rid}, errors.BAD_REQUEST)
            self.assert_code({"action": "cancel", "id": rid}, errors.BAD_REQUEST)
            self.assert_code(self.txt2img(id=rid), errors.BAD_REQUEST)

    def test_bad_id_checked_before_action(self):
        self.assert_code({"action": "nonsense", "id": [1]}, errors.BAD_REQUEST)

    # Through decode_message -------------------------------------------------------------

    def test_from_wire_bytes(self):
        payload = json.dumps(self.txt2img(id=3, txt2img_steps=12)).encode()
        request = self.parse(decode_message(payload))
        self.assertEqual((request.id, request.steps, request.model_name), (3, 12, "v1/tiny"))
