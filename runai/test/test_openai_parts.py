"""The OpenAI door's parts without a server: multipart bodies, the url store on a Clock,
request fields, errors, and server-sent events."""

import base64
import io
import json
import time
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest
from urllib3.filepost import encode_multipart_formdata

from runai.core import errors
from runai.core.requests import Limits
from runai.doors.openai import multipart, parse, replies
from runai.doors.openai.store import ImageStore
from runai.doors.openai.stream import EventStream, OpenAIJob


def body_of(fields):
    data, content_type = encode_multipart_formdata(fields, boundary="b0undary")
    return data, content_type


def png(size=(64, 64), color=(1, 2, 3)):
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return out.getvalue()


class MultipartTests(SynchronousTestCase):
    def refused(self, body, content_type, code=errors.BAD_REQUEST, **limits):
        error = self.assertRaises(errors.RunaiError, multipart.parse, body, content_type, **limits)
        self.assertEqual(error.code, code, error.message)
        return error.message

    def test_fields_and_files(self):
        data, content_type = body_of([("prompt", "a lighthouse ✓"), ("n", "2"), ("stream", "true"),
                                      ("image", ("p.png", b"\x89PNG\r\n--b0undar", "image/png"))])
        form = multipart.parse(data, content_type)
        self.assertEqual(form.field("prompt"), "a lighthouse ✓")
        [image] = form.files["image"]
        self.assertEqual((image.filename, image.content_type, image.data),
                         ("p.png", "image/png", b"\x89PNG\r\n--b0undar"))
        self.assertEqual(parse.form_body(form), {"prompt": "a lighthouse ✓", "n": 2, "stream": True})

    def test_preamble_epilogue_and_rfc2231_names(self):
        body = (b"ignored preamble\r\n--xx\r\nContent-Disposition: form-data; name=\"image\"; "
                b"filename*=UTF-8''caf%C3%A9.png\r\n\r\nDATA\r\n--xx--\r\nepilogue")
        form = multipart.parse(body, "multipart/form-data; boundary=xx")
        self.assertEqual(form.files["image"][0].filename, "café.png")

    def test_malformed_bodies(self):
        data, content_type = body_of([("prompt", "x")])
        self.assertIn("multipart/form-data", self.refused(data, "application/json"))
        self.refused(data, "multipart/form-data")  # no boundary
        self.refused(data, "multipart/form-data; boundary=other")
        self.refused(data[:-20], content_type)  # truncated
        self.refused(b"--b0undary\r\nContent-Disposition: form-data\r\n\r\nx\r\n--b0undary--", content_type)
        self.refused(b"--b0undary\r\nContent-Disposition: form-data; name=a\r\n" + b"X: y\r\n" * 2000, content_type)
        self.refused(b"--b0undary\r\n\r\nx\r\n--b0undary--", content_type)
        self.refused(b"--b0undary\r\nContent-Disposition: form-data; name=a\r\n\r\n\xff\r\n--b0undary--",
                     content_type, code=errors.BAD_ENCODING)

    def test_bounds(self):
        data, content_type = body_of([(f"f{i}", "x") for i in range(10)])
        self.refused(data, content_type, code=errors.OUT_OF_RANGE, max_parts=9)
        data, content_type = body_of([("prompt", "x" * 101)])
        self.refused(data, content_type, code=errors.OUT_OF_RANGE, max_field_bytes=100)
        data, content_type = body_of([("n", "1"), ("n", "2")])
        form = multipart.parse(data, content_type)
        self.assertRaises(errors.RunaiError, form.field, "n")

    def test_a_large_file_parses_quickly(self):
        data, content_type = body_of([("image", ("p.png", b"\r\n-" * (6 * 1024 * 1024), "image/png"))])
        started = time.monotonic()
        form = multipart.parse(data, content_type)
        self.assertEqual(len(form.files["image"][0].data), 18 * 1024 * 1024)
        self.assertLess(time.monotonic() - started, 2.0)

    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=300), st.integers(min_value=0, max_value=400))
    def test_hostile_bytes_are_refused_or_parsed(self, noise, cut):
        data, content_type = body_of([("prompt", "x"), ("image", ("p.png", b"12345", "image/png"))])
        for body in (noise, data[:cut] + noise, data[:cut]):
            try:
                multipart.parse(body, content_type)
            except errors.RunaiError:
                pass


class StoreTests(SynchronousTestCase):
    def test_kept_until_expiry(self):
        clock = Clock()
        store = ImageStore(clock, ttl=600)
        key = store.put(b"png", "image/png", "png")
        self.assertGreaterEqual(len(key), 40)
        self.assertEqual(store.get(key, "png"), (b"png", "image/png"))
        self.assertIsNone(store.get(key, "jpeg"))
        self.assertIsNone(store.get("other", "png"))
        clock.advance(599)
        self.assertIsNotNone(store.get(key, "png"))
        clock.advance(1)
        self.assertIsNone(store.get(key, "png"))
        self.assertEqual((len(store), store.size, clock.getDelayedCalls()), (0, 0, []))

    def test_least_recently_used_go_first(self):
        clock = Clock()
        store = ImageStore(clock, max_count=2, max_bytes=10)
        a = store.put(b"aaa", "image/png", "png")
        b = store.put(b"bbb", "image/png", "png")
        store.get(a, "png")
        c = store.put(b"ccc", "image/png", "png")  # over the count: b goes
        self.assertEqual([store.get(k, "png") is not None for k in (a, b, c)], [True, False, True])
        d = store.put(b"dddddddd", "image/png", "png")  # over the bytes: a and c go
        self.assertEqual([store.get(k, "png") is not None for k in (a, c, d)], [False, False, True])
        self.assertEqual((len(store), store.size, len(clock.getDelayedCalls())), (1, 8, 1))
        store.clear()
        self.assertEqual((len(store), clock.getDelayedCalls()), (0, []))


class FieldTests(SynchronousTestCase):
    def test_sizes_and_batches(self):
        self.assertEqual(parse.parse_size("512x768"), (512, 768))
        self.assertIsNone(parse.parse_size("auto"))
        self.assertIsNone(parse.parse_size(None))
        for bad in ("512", "512x", "-1x5", "1e3x5", 512, "512X512 "):
            self.assertRaises(errors.RunaiError, parse.parse_size, bad)
        limits = Limits()
        self.assertEqual([parse.batch_size(n, 512, 512, limits) for n in (1, 7, 9, 10)], [1, 7, 3, 5])
        self.assertEqual(parse.batch_size(4, 2048, 2048, limits), 2)

    def test_reply_options(self):
        reply = parse.reply_options({"response_format": "url", "output_format": "webp", "output_compression": 50,
                                     "quality": "hd", "style": "natural", "background": "auto"})
        self.assertEqual((reply.response_format, reply.output_format, reply.compression, reply.content_type),
                         ("url", "webp", 50, "image/webp"))
        self.assertEqual(parse.reply_options({}), parse.Reply())
        for body in ({"response_format": "json"}, {"output_format": "gif"}, {"background": "transparent"},
                     {"style": "bold"}, {"quality": 3}, {"partial_images": 4}, {"stream": "yes"},
                     {"output_compression": 101}):
            self.assertRaises(errors.RunaiError, parse.reply_options, body)
        self.assertRaises(errors.RunaiError, parse.reply_options, {"stream": True}, streams=False)

    def test_form_fields_are_typed(self):
        form = multipart.Form(fields={"n": ["two"]})
        error = self.assertRaises(errors.RunaiError, parse.form_body, form)
        self.assertIn("'n' must be an integer", error.message)
        form = multipart.Form(fields={"guidance_scale": ["4.5"], "seed": [""], "model": ["v1/x"]})
        self.assertEqual(parse.form_body(form), {"guidance_scale": 4.5, "model": "v1/x"})

    def test_core_requests(self):
        from pathlib import Path

        from runai.test.test_e2e import tiny_model_dir

        models = Path(tiny_model_dir())
        request = parse.generation({"prompt": "x", "n": 10, "size": "64x64", "quality": "low", "seed": 7},
                                   "v1/tiny", models, Limits())
        self.assertEqual((request.n_samples, request.n_iter, request.seeds()[-1]), (5, 2, 16))
        self.assertEqual((request.width, request.steps, request.preview_every), (64, 10, 0))
        streamed = parse.generation({"prompt": "x", "stream": True, "partial_images": 3, "steps": 20},
                                    "v1/tiny", models, Limits())
        self.assertEqual(streamed.preview_every, 5)
        error = self.assertRaises(errors.RunaiError, parse.generation, {"size": "64x100"}, "v1/tiny", models, Limits())
        self.assertIn("'size' height must be a multiple of 8", error.message)
        error = self.assertRaises(errors.RunaiError, parse.generation, {"guidance_scale": 99}, "v1/tiny", models,
                                  Limits())
        self.assertEqual(replies.error_reply(error)[1]["error"]["param"], "guidance_scale")
        variation = parse.variation({}, {"image": [multipart.File("image", "p.png", "image/png", png())]},
                                    "v1/tiny", models, Limits())
        self.assertEqual((variation.action, variation.strength, variation.prompt, variation.width),
                         ("img2img", parse.VARIATION_STRENGTH, "", 64))


class ErrorTests(SynchronousTestCase):
    def test_statuses_types_and_params(self):
        cases = [
            (errors.BAD_REQUEST, "'size' must be WIDTHxHEIGHT", 400, "invalid_request_error", "size"),
            (errors.OUT_OF_RANGE, "option 'image' is 9000x9000", 400, "invalid_request_error", "image"),
            (errors.MODEL_NOT_FOUND, "no model 'dall-e-3'", 404, "invalid_request_error", "model"),
            (errors.UNAUTHORIZED, "token", 401, "authentication_error", None),
            (errors.QUEUE_FULL, "full", 429, "rate_limit_error", None),
            (errors.SAFETY_CHECKER_MISSING, "no checker", 422, "invalid_request_error", None),
            (errors.MESSAGE_TOO_LARGE, "large", 413, "invalid_request_error", None),
            (errors.OUT_OF_MEMORY, "oom", 507, "server_error", None),
            (errors.SHUTTING_DOWN, "bye", 503, "server_error", None),
            (errors.INTERNAL, "oops 'prompt'", 500, "server_error", "prompt"),
        ]
        for code, message, status, kind, param in cases:
            got, body = replies.error_reply(errors.RunaiError(code, message))
            self.assertEqual((got, body["error"]["type"], body["error"]["param"], body["error"]["code"]),
                             (status, kind, param, code))
        status, body = replies.error_reply(errors.RunaiError(errors.PATH_OUTSIDE_MODEL_DIR, "model '../x' ..."))
        self.assertEqual((status, body["error"]["code"], body["error"]["param"]), (404, "model_not_found", "model"))


@dataclass
class Generated:
    png: bytes
    seed: int
    withheld: bool = False


@dataclass
class Request:
    width: int = 64
    height: int = 48


def events(request):
    """The events a DummyRequest was sent: ``(event, data)``; SSE comments left out."""
    found = []
    for block in b"".join(request.written).decode().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if not line.startswith(":"))
        if lines:
            found.append((lines["event"], json.loads(lines["data"])))
    return found


class StreamTests(SynchronousTestCase):
    def stream(self, **reply):
        request = DummyRequest([b""])
        listener = OpenAIJob()
        EventStream(request, listener, Request(), parse.Reply(stream=True, **reply), "image_generation",
                    lambda f, *args: defer.maybeDeferred(f, *args))
        return request, listener

    def test_partials_then_images_then_the_end(self):
        request, listener = self.stream(partial_images=1, output_format="jpeg")
        self.assertEqual(request.responseHeaders.getRawHeaders("content-type"), ["text/event-stream"])
        listener.job_queued(None, 2)
        listener.job_progress(None, 1, 4, png((8, 6)))
        listener.job_progress(None, 2, 4, png((8, 6)))  # one partial asked for: not sent
        listener.job_image(None, Generated(png((64, 48)), 5))
        listener.job_image(None, Generated(png((64, 48)), 6, withheld=True))
        listener.job_done(None, 2, 1.0)
        self.assertIn(b": queued, 2 ahead\n\n", request.written)
        sent = events(request)
        self.assertEqual([kind for kind, _ in sent], ["image_generation.partial_image", "image_generation.completed"])
        partial, completed = sent[0][1], sent[1][1]
        self.assertEqual((partial["partial_image_index"], partial["size"], partial["output_format"]),
                         (0, "64x48", "jpeg"))
        self.assertEqual(Image.open(io.BytesIO(base64.b64decode(partial["b64_json"]))).size, (64, 48))
        self.assertEqual((completed["seed"], completed["usage"]["total_tokens"]), (5, 0))
        self.assertEqual(request.finished, 1)

    def test_a_failure_ends_the_stream_with_an_error_event(self):
        request, listener = self.stream()
        listener.job_image(None, Generated(png(), 1))
        listener.job_failed(None, errors.RunaiError(errors.OUT_OF_MEMORY, "the device ran out of memory"))
        sent = events(request)
        self.assertEqual([kind for kind, _ in sent], ["image_generation.completed", "error"])
        self.assertEqual(sent[1][1]["error"]["code"], "out_of_memory")
        self.assertEqual(request.finished, 1)

    def test_a_client_gone_hears_nothing_more(self):
        request, listener = self.stream()
        request.gone = True
        listener.job_image(None, Generated(png(), 1))
        listener.job_done(None, 1, 1.0)
        self.assertEqual(events(request), [])
        self.assertEqual(request.finished, 0)


class TapTests(SynchronousTestCase):
    def services(self, *args):
        from twisted.internet.testing import MemoryReactorClock

        from runai import tap

        options = tap.Options()
        options.parseOptions(["--port", "0", "--device", "cpu", *args])
        return list(tap.makeService(options, reactor=MemoryReactorClock()))

    def test_the_door_is_off_unless_asked_for(self):
        from runai.doors.openai.api import Api
        from runai.options import OptionError

        plain = self.services()
        with_openai = self.services("--openai", "tcp:0:interface=127.0.0.1", "--max-message-size", "5000")
        self.assertEqual(len(with_openai), len(plain) + 1)
        site = with_openai[-1].factory
        api = site.resource.children[b"v1"]
        self.assertIsInstance(api, Api)
        self.assertIs(api.core, with_openai[len(plain) - 1].factory.core)
        self.assertEqual(site.max_body, 5000)
        from runai import tap

        self.assertRaises(OptionError, tap.Options().parseOptions, ["--openai", "nonsense:1"])

    def test_twistd_lists_the_option(self):
        import os
        import subprocess
        import sys

        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        done = subprocess.run([twistd, "runai", "--help"], capture_output=True, text=True, timeout=60)
        self.assertIn("--openai=", done.stdout)

