"""What travels through Redis: requests and events, to fields and back."""

import os

from twisted.trial.unittest import SynchronousTestCase

from runai.broker import wire
from runai.core import errors
from runai.core.images import EncodedImage
from runai.core.requests import GenerationRequest
from runai.models import loras
from runai.test.lora_fixtures import write_lora_header
from runai.test.support import FakeImage


def redis_like(fields):
    """Fields as redis-py hands them back: bytes names, bytes values."""
    def raw(value):
        return value if isinstance(value, bytes) else str(value).encode()
    return {k.encode(): raw(v) for k, v in fields.items()}


class RequestTests(SynchronousTestCase):
    def setUp(self):
        self.models = os.path.realpath(self.mktemp())
        os.makedirs(os.path.join(self.models, "v1", "tiny"))
        with open(os.path.join(self.models, "v1", "tiny", "model_index.json"), "w") as f:
            f.write("{}")

    def request(self, **extra):
        values = dict(action="inpaint", model_path="/the/front/models/v1/tiny", model_name="v1/tiny",
                      prompt="a lighthouse \u2603", negative_prompt="fog", steps=7, scale=6.5, seed=2**32 - 9,
                      width=64, height=128, n_samples=2, n_iter=3, scheduler="euler_a", strength=0.5, pos_x=-3,
                      pos_y=4, nsfw_filter=True, safety_checker="/the/front/checker", id="client-id",
                      pixels=EncodedImage(b"\x89PNG pixels", "PNG", 64, 128, "RGBA"),
                      mask=EncodedImage(b"\xff\xd8 mask", "JPEG", 64, 128, "L"))
        values.update(extra)
        return GenerationRequest(**values)

    def test_a_request_round_trips_with_the_model_resolved_in_the_workers_folder(self):
        original = self.request()
        fields = wire.encode_job(original, "front-1", "front")
        self.assertNotIn(b"/the/front", b"".join(v if isinstance(v, bytes) else str(v).encode()
                                                 for v in fields.values()))
        job = wire.decode_job(redis_like(fields))
        self.assertEqual((job.key, job.front), ("front-1", "front"))
        decoded = job.request(self.models)
        self.assertEqual(decoded.model_path, os.path.join(self.models, "v1", "tiny"))
        self.assertIsNone(decoded.safety_checker)  # not installed on this worker
        self.assertEqual(decoded.id, "front-1")
        for name in ("action", "model_name", "prompt", "negative_prompt", "steps", "scale", "seed", "width",
                     "height", "n_samples", "n_iter", "scheduler", "strength", "pos_x", "pos_y", "nsfw_filter",
                     "pixels", "mask"):
            self.assertEqual(getattr(decoded, name), getattr(original, name), name)

    def test_a_name_outside_the_workers_folder_or_missing(self):
        for name, code in (("../../etc", errors.PATH_OUTSIDE_MODEL_DIR), ("v1/other", errors.MODEL_NOT_FOUND)):
            job = wire.decode_job(redis_like(wire.encode_job(self.request(model_name=name), "k", "f")))
            e = self.assertRaises(errors.RunaiError, job.request, self.models)
            self.assertEqual(e.code, code)

    def test_loras_travel_by_name_and_are_found_in_the_workers_folder(self):
        write_lora_header(os.path.join(self.models, "loras", "style.safetensors"))
        ref = loras.LoraRef(name="style", path="/the/front/models/loras/style.safetensors", te=0.5, unet=0.75)
        fields = wire.encode_job(self.request(loras=(ref,)), "k", "f")
        self.assertNotIn(b"/the/front", b"".join(v if isinstance(v, bytes) else str(v).encode()
                                                 for v in fields.values()))
        decoded = wire.decode_job(redis_like(fields)).request(self.models)
        self.assertEqual(decoded.loras, (loras.LoraRef(
            name="style", path=os.path.join(self.models, "loras", "style.safetensors"), te=0.5, unet=0.75),))
        missing = wire.decode_job(redis_like(wire.encode_job(self.request(loras=(
            loras.LoraRef(name="gone", path="/x", te=1.0, unet=1.0),)), "k", "f")))
        self.assertEqual(self.assertRaises(errors.RunaiError, missing.request, self.models).code,
                         errors.MODEL_NOT_FOUND)

    def test_another_version_is_refused(self):
        fields = dict(wire.encode_job(self.request(), "k", "f"), v=99)
        e = self.assertRaises(errors.RunaiError, wire.decode_job(redis_like(fields)).request, self.models)
        self.assertIn("version", e.message)
        self.assertRaises(wire.WireError, wire.decode_job, {b"v": b"1"})


class EventTests(SynchronousTestCase):
    def test_events_round_trip(self):
        image = FakeImage(b"\x89PNG\x00\xff", 12, 64, 64, 1)
        cases = [
            (wire.start_event("k", "a1", "w", 2), "start", {"worker": "w", "deliveries": 2}),
            (wire.progress_event("k", "a1", 3, 20), "progress", {"step": 3, "total": 20}),
            (wire.done_event("k", "a1", 4, 1.5), "done", {"result": 4, "seconds": 1.5}),
            (wire.failed_event("k", "a1", errors.JobCancelled()), "failed",
             {"code": "cancelled", "message": "the job was cancelled"}),
        ]
        for fields, kind, data in cases:
            event = wire.decode_event(redis_like(fields))
            self.assertEqual((event.key, event.attempt, event.type, event.data), ("k", "a1", kind, data))
        event = wire.decode_event(redis_like(wire.image_event("k", "a1", image)))
        self.assertEqual(event.image, wire.WireImage(b"\x89PNG\x00\xff", 12, 64, 64, 1, None, False))
        self.assertEqual(wire.event_error(wire.decode_event(redis_like(cases[3][0]))).code, "cancelled")

    def test_malformed_events_are_refused(self):
        self.assertRaises(wire.WireError, wire.decode_event, {b"v": b"1", b"type": b"progress"})
        self.assertRaises(wire.WireError, wire.decode_event, {b"v": b"2"})


class DamagedTests(SynchronousTestCase):
    """Entries that no front or worker of this version wrote: refused with WireError, never
    another exception (which would leave the entry to be taken again and again)."""

    setUp = RequestTests.setUp
    request = RequestTests.request

    def test_names_and_values_that_are_not_utf8(self):
        fields = redis_like(wire.encode_job(self.request(), "k", "f"))
        for damaged in ({**fields, b"\xff\xfe": b"1"}, {**fields, b"key": b"\xff"}, {**fields, b"front": b"\xfe"}):
            self.assertRaises(wire.WireError, wire.decode_job, damaged)
        job = wire.decode_job({**fields, b"v": b"\xff"})
        self.assertRaises(wire.WireError, job.request, self.models)
        job = wire.decode_job({**fields, b"request": b"\xff{"})
        self.assertRaises(wire.WireError, job.request, self.models)

    def test_scalars_of_the_wrong_type(self):
        import json

        fields = redis_like(wire.encode_job(self.request(), "k", "f"))
        for name, value in (("steps", "7"), ("steps", True), ("scale", None), ("scale", float("nan")),
                            ("prompt", 5), ("nsfw_filter", 1), ("modules", "vae"), ("model_name", ["v1/tiny"])):
            scalars = json.loads(fields[b"request"])
            scalars[name] = value
            job = wire.decode_job({**fields, b"request": json.dumps(scalars).encode()})
            e = self.assertRaises(wire.WireError, job.request, self.models)
            self.assertIn(repr(name), e.message)
        scalars = json.loads(fields[b"request"])
        scalars["distilled_scale"] = None  # Optional: None is its value
        self.assertIsNone(wire.decode_job({**fields, b"request": json.dumps(scalars).encode()})
                          .request(self.models).distilled_scale)

    def test_events_with_missing_or_mistyped_data(self):
        base = {b"v": b"1", b"key": b"k", b"attempt": b"a"}
        damaged = [
            {b"\xff": b"1", **base},
            {**base, b"type": b"progress", b"data": b'{"step": 1}'},
            {**base, b"type": b"progress", b"data": b'{"step": "1", "total": 2}'},
            {**base, b"type": b"progress", b"data": b'[1, 2]'},
            {**base, b"type": b"start", b"data": b'{"worker": "w", "deliveries": true}'},
            {**base, b"type": b"done", b"data": b'{"result": 1, "seconds": Infinity}'},
            {**base, b"type": b"failed", b"data": b'{"code": 5, "message": "x"}'},
            {**base, b"type": b"image", b"data": b'{"seed": 1, "width": 2, "height": 3, "index": 0}'},  # no png
            {**base, b"type": b"image", b"png": b"x", b"data": b'{"seed": 1, "width": 2, "height": 3, "index": 0, '
                                                               b'"more": 1}'},
            {**base, b"type": b"teleport", b"data": b"{}"},
            {**base, b"type": b"\xff", b"data": b"{}"},
            {**base, b"key": b"\xff", b"type": b"progress", b"data": b'{"step": 1, "total": 2}'},
            {**base, b"type": b"progress", b"data": b'\xff'},
        ]
        for fields in damaged:
            self.assertRaises(wire.WireError, wire.decode_event, fields)
