"""runai.cli.generate: ``runai generate`` in its four modes and ``runai schedulers``; the
requests it builds (runai.client.generation_request), what it checks before sending, and,
end to end, img2img, inpaint and outpaint against a real ``twistd runai``."""

import base64
import io
import os
import subprocess
import sys
import threading
from pathlib import Path

from PIL import Image
from twisted.trial.unittest import SynchronousTestCase

from runai.cli import generate, main
from runai.client import Image as ClientImage, ServerError, generation_request, txt2img_request
from runai.core import errors
from runai.core.schedulers import SCHEDULERS
from runai.test.support import reported_port
from runai.test.test_e2e import tiny_model_dir


class RequestTests(SynchronousTestCase):
    def test_txt2img_request_is_unchanged(self):
        self.assertEqual(txt2img_request("a lighthouse", "v1/tiny", request_id="r", steps=3, seed=None),
                         {"action": "txt2img", "id": "r",
                          "options": {"txt2img_prompt": "a lighthouse", "txt2img_model": "v1/tiny",
                                      "txt2img_steps": 3}})

    def test_every_mode_in_the_legacy_format(self):
        request = generation_request("outpaint", "more sea", "v1/tiny", pixels=b"\x89PNG", mask="bWFzaw==",
                                     strength=0.5, n_iter=2, pos_x=64, pos_y=-8, negative_prompt="fog")
        self.assertEqual(request, {"action": "outpaint", "options": {
            "outpaint_prompt": "more sea", "outpaint_model": "v1/tiny", "outpaint_strength": 0.5,
            "outpaint_n_iter": 2, "pos_x": 64, "pos_y": -8, "outpaint_negative_prompt": "fog",
            "outpaint_pixels": base64.b64encode(b"\x89PNG").decode(), "outpaint_mask": "bWFzaw=="}})

    def test_the_server_reads_what_it_builds(self):
        from runai.doors.legacy.parse import parse_request

        models = Path(self.mktemp()).absolute()
        (models / "v1" / "tiny").mkdir(parents=True)
        (models / "v1" / "tiny" / "model_index.json").write_text("{}")
        buf = io.BytesIO()
        Image.new("RGB", (64, 96), "white").save(buf, format="PNG")
        for action in ("img2img", "inpaint", "outpaint"):
            request = parse_request(generation_request(action, "p", "v1/tiny", pixels=buf.getvalue(),
                                                       mask=buf.getvalue() if action != "img2img" else None,
                                                       steps=4, strength=0.5, n_iter=2, pos_x=3, pos_y=4,
                                                       scheduler="ddim"), models)
            self.assertEqual((request.action, request.width, request.height, request.steps, request.strength,
                              request.n_iter, request.pos_x, request.pos_y, request.scheduler),
                             (action, 64, 96, 4, 0.5, 2, 3, 4, "ddim"))
            self.assertEqual(request.mask is None, action == "img2img")


class FakeClient:
    def __init__(self, images=(), error=None):
        self.images, self.error, self.requests = list(images), error, []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def run(self, request, on_message=None):
        self.requests.append(request)
        if self.error is not None:
            raise self.error
        return self.images


# What the command sends as it is: files that start as a PNG does.
PICTURE = b"\x89PNG\r\n\x1a\npicture bytes"
MASK = b"\x89PNG\r\n\x1a\nmask bytes"


class CommandTests(SynchronousTestCase):
    def setUp(self):
        self.folder = os.path.realpath(self.mktemp())
        os.makedirs(self.folder)
        self.picture = self.file("picture.png", PICTURE)
        self.client = FakeClient([ClientImage(b"png %d" % k, 7 + k, 64, -8) for k in range(4)])
        self.connects = []
        self.patch(generate, "connect", lambda args, timeout: self.connects.append(args) or self.client)
        self.stdout, self.stderr = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", self.stdout)
        self.patch(main.sys, "stderr", self.stderr)

    def file(self, name, data):
        path = os.path.join(self.folder, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def read(self, name):
        with open(os.path.join(self.folder, name), "rb") as f:
            return f.read()

    def run_cli(self, *argv):
        return main.main(["generate", "a lighthouse", "-m", "v1/tiny", "-q", *argv])

    def sent(self):
        [request] = self.client.requests
        return request["action"], request["options"]

    def test_the_mode_follows_from_the_options(self):
        for argv, action in (([], "txt2img"), (["--init-image", "p.png"], "img2img"),
                             (["--init-image", "p.png", "--mask", "m.png"], "inpaint"),
                             (["--init-image", "p.png", "--outpaint"], "outpaint"),
                             (["--init-image", "p.png", "--outpaint", "--mask", "m.png"], "outpaint")):
            self.assertEqual(generate.mode(main.parser().parse_args(["generate", "x", "-m", "m", *argv])), action)

    def test_img2img_sends_the_picture_and_strength(self):
        out = os.path.join(self.folder, "out.png")
        self.assertEqual(self.run_cli("--init-image", self.picture, "--strength", "0.4", "-o", out,
                                      "--negative-prompt", "fog", "--scheduler", "ddim", "--n-iter", "1"), 0)
        action, options = self.sent()
        self.assertEqual(action, "img2img")
        self.assertEqual((options["img2img_pixels"], options["img2img_strength"], options["img2img_negative_prompt"],
                          options["img2img_scheduler"], options["img2img_n_iter"]),
                         (base64.b64encode(PICTURE).decode(), 0.4, "fog", "ddim", 1))
        self.assertNotIn("img2img_mask", options)
        self.assertEqual(self.read("out.png"), b"png 0")
        self.assertEqual(self.stdout.getvalue(), f"{out} (seed 7)\n")

    def test_inpaint_sends_the_mask_and_the_negative_aliases_work(self):
        mask = self.file("mask.png", MASK)
        for flag in ("-n", "--negative", "--negative-prompt"):
            self.client.requests.clear()
            self.assertEqual(self.run_cli("--init-image", self.picture, "--mask", mask, flag, "fog", "--force",
                                          "-o", os.path.join(self.folder, "in.png")), 0)
            action, options = self.sent()
            self.assertEqual((action, options["inpaint_mask"], options["inpaint_negative_prompt"]),
                             ("inpaint", base64.b64encode(MASK).decode(), "fog"))

    def test_outpaint_sends_and_prints_the_position(self):
        self.assertEqual(self.run_cli("--init-image", self.picture, "--outpaint", "--pos-x", "64", "--pos-y", "-8",
                                      "--n-samples", "2", "--n-iter", "2", "-o", os.path.join(self.folder, "o.png")), 0)
        action, options = self.sent()
        self.assertEqual((action, options["pos_x"], options["pos_y"], options["outpaint_n_samples"],
                          options["outpaint_n_iter"]), ("outpaint", 64, -8, 2, 2))
        self.assertEqual(self.stdout.getvalue().splitlines(),
                         [f"{self.folder}/o-{k}.png (seed {7 + k}, position 64,-8)" for k in range(4)])

    def test_options_that_need_a_picture(self):
        for argv in (["--mask", self.picture], ["--outpaint"], ["--strength", "0.5"]):
            self.assertEqual(self.run_cli(*argv), 2, argv)
            self.assertIn("needs --init-image FILE", self.stderr.getvalue())
        self.assertEqual(self.connects, [])

    def test_an_unreadable_input_is_said_before_connecting(self):
        missing = os.path.join(self.folder, "missing.png")
        self.assertEqual(self.run_cli("--init-image", self.picture, "--mask", missing,
                                      "-o", os.path.join(self.folder, "x.png")), 1)
        self.assertEqual(self.stderr.getvalue(), f"runai: cannot read --mask {missing}: No such file or directory\n")
        self.assertEqual(self.connects, [])

    def test_no_output_file_is_overwritten_without_force(self):
        self.file("out-1.png", b"mine")
        out = os.path.join(self.folder, "out.png")
        self.assertEqual(self.run_cli("--n-samples", "2", "-o", out), 1)
        self.assertIn("out-1.png already exists; --force overwrites", self.stderr.getvalue())
        self.assertEqual((self.connects, self.read("out-1.png")), ([], b"mine"))
        self.assertFalse(os.path.exists(os.path.join(self.folder, "out-0.png")))

        self.client.images = self.client.images[:2]
        self.assertEqual(self.run_cli("--n-samples", "2", "-o", out, "--force"), 0)
        self.assertEqual((self.read("out-0.png"), self.read("out-1.png")), (b"png 0", b"png 1"))

    def test_a_missing_folder_is_said_before_connecting(self):
        self.assertEqual(self.run_cli("-o", os.path.join(self.folder, "nowhere", "out.png")), 1)
        self.assertIn("there is no folder", self.stderr.getvalue())
        self.assertEqual(self.connects, [])

    def test_a_file_made_while_generating_is_kept(self):
        out = os.path.join(self.folder, "late.png")
        run = self.client.run

        def meanwhile(request, on_message=None):
            self.file("late.png", b"someone else's")
            return run(request, on_message)
        self.client.run = meanwhile
        self.assertEqual(self.run_cli("-o", out), 1)
        self.assertEqual(self.read("late.png"), b"someone else's")
        self.assertIn("late.png appeared while generating; it is kept", self.stderr.getvalue())

    def test_an_internal_error_is_a_failure_not_a_refusal(self):
        self.client.error = ServerError(errors.INTERNAL, "an unexpected failure (logged)")
        self.assertEqual(self.run_cli("-o", os.path.join(self.folder, "out.png")), 1)
        self.assertEqual(self.stderr.getvalue(),
                         "runai: the server failed: an unexpected failure (logged) (internal)\n")

    def test_scheduler_choices(self):
        text = main.parser()._subparsers._group_actions[0].choices["generate"].format_help()
        for name in SCHEDULERS:
            self.assertIn(name, text)
        self.assertRaises(SystemExit, main.parser().parse_args, ["generate", "x", "-m", "m", "--scheduler", "nope"])

    def test_schedulers_command(self):
        self.assertEqual(main.main(["schedulers"]), 0)
        self.assertEqual(self.stdout.getvalue().split(), list(SCHEDULERS))
        self.assertEqual(self.connects, [])


class GenerateEndToEndTests(SynchronousTestCase):
    """``runai generate`` as a user runs it, against ``twistd runai`` with a tiny model."""

    def test_img2img_inpaint_outpaint(self):
        models = tiny_model_dir()
        workdir = os.path.realpath(self.mktemp())
        os.makedirs(workdir)
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        server = subprocess.Popen(
            [twistd, "--nodaemon", "--pidfile=", "--logfile=-", "runai", "--port", "0", "--model-dir", models,
             "--device", "cpu", "--auto-shutdown", "--timeout", "60"],
            cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.addCleanup(lambda: server.poll() is None and server.kill())
        port = reported_port(server, timeout=120)
        self.assertIsNotNone(port, "the server did not report its port")
        # Keep reading its log, so that a full pipe never stops it.
        threading.Thread(target=server.stdout.read, daemon=True).start()

        picture = Image.new("RGBA", (64, 64), (200, 80, 40, 255))
        picture.paste((0, 0, 0, 0), (32, 0, 64, 64))  # the right half is transparent: outpaint it
        picture.save(os.path.join(workdir, "canvas.png"))
        mask = Image.new("L", (64, 64), 0)
        mask.paste(255, (16, 16, 48, 48))
        mask.save(os.path.join(workdir, "mask.png"))

        def runai(*argv):
            return subprocess.run([sys.executable, "-m", "runai.cli.main", "generate", "a lighthouse", "-m", "v1/tiny",
                                   "--port", str(port), "--steps", "2", "--seed", "5", "-q", *argv],
                                  cwd=workdir, capture_output=True, text=True, timeout=120)

        img2img = runai("--init-image", "canvas.png", "--strength", "0.5", "-o", "img2img.png",
                        "--negative-prompt", "fog", "--scheduler", "ddim")
        self.assertEqual((img2img.returncode, img2img.stdout), (0, "img2img.png (seed 5)\n"), img2img.stderr)
        inpaint = runai("--init-image", "canvas.png", "--mask", "mask.png", "-o", "inpaint.png", "-n", "fog")
        self.assertEqual((inpaint.returncode, inpaint.stdout), (0, "inpaint.png (seed 5)\n"), inpaint.stderr)
        outpaint = runai("--init-image", "canvas.png", "--outpaint", "--pos-x", "64", "--pos-y", "-32",
                         "--n-iter", "2", "-o", "outpaint.png")
        self.assertEqual((outpaint.returncode, outpaint.stdout),
                         (0, "outpaint-0.png (seed 5, position 64,-32)\noutpaint-1.png (seed 6, position 64,-32)\n"),
                         outpaint.stderr)
        for name in ("img2img.png", "inpaint.png", "outpaint-0.png", "outpaint-1.png"):
            self.assertEqual(Image.open(os.path.join(workdir, name)).size, (64, 64), name)
        # Inpaint keeps the picture outside the mask.
        self.assertEqual(Image.open(os.path.join(workdir, "inpaint.png")).convert("RGB").getpixel((2, 2)),
                         (200, 80, 40))

        again = runai("--init-image", "canvas.png", "-o", "img2img.png")
        self.assertEqual(again.returncode, 1)
        self.assertIn("img2img.png already exists", again.stderr)
        refused = runai("--init-image", "mask.png", "--strength", "0.1", "-o", "weak.png")
        self.assertEqual(refused.returncode, 1)
        self.assertIn("runai: the server refused: steps x strength", refused.stderr)
        self.assertIn("(out_of_range)", refused.stderr)


class RoughEdgeTests(SynchronousTestCase):
    """What a newcomer meets: errors that name the flags typed, input files checked before
    anything is sent, progress that ends before an error."""

    setUp, file, run_cli = CommandTests.setUp, CommandTests.file, CommandTests.run_cli

    def test_a_file_that_is_not_a_picture_is_refused_before_connecting(self):
        notes = self.file("notes.txt", b"not a picture at all")
        for argv, named in ((["--init-image", notes], "--init-image"),
                            (["--init-image", self.picture, "--mask", notes], "--mask")):
            self.stderr.truncate(0)
            self.stderr.seek(0)
            self.assertEqual(self.run_cli(*argv, "-o", os.path.join(self.folder, "x.png")), 1)
            self.assertEqual(self.stderr.getvalue(), f"runai: {named} {notes} is not a picture: PNG, JPEG or WebP\n")
        self.assertEqual(self.connects, [])
        webp = self.file("p.webp", b"RIFF\x10\x00\x00\x00WEBPVP8 ")
        self.assertEqual(self.run_cli("--init-image", webp, "-o", os.path.join(self.folder, "w.png")), 0)

    def test_the_servers_errors_name_the_flags(self):
        for message, said in (
                ("option 'img2img_width' must be between 64 and 2048, not 100", "--width must be between 64 and 2048"),
                ("option 'img2img_n_samples' must be between 1 and 8, not 9", "--n-samples must be between 1 and 8"),
                ("option 'img2img_negative_prompt' is longer than 20000 characters", "--negative-prompt is longer"),
                ("option 'pos_x' must be an integer", "--pos-x must be an integer"),
                ("option 'img2img_pixels' is not valid base64", "--init-image is not valid base64")):
            self.client.error = ServerError(errors.OUT_OF_RANGE, message)
            self.stderr.truncate(0)
            self.stderr.seek(0)
            self.assertEqual(self.run_cli("--init-image", self.picture, "-o", os.path.join(self.folder, "o.png")), 1)
            line = self.stderr.getvalue()
            self.assertIn(said, line)
            self.assertNotIn("img2img_", line)

    def test_progress_ends_before_an_error_or_interrupted(self):
        def failing(request, on_message=None):
            on_message({"action": 4, "step": 3, "total": 20})
            raise ServerError(errors.INTERNAL, "it broke")
        self.client.run = failing
        self.assertEqual(main.main(["generate", "x", "-m", "v1/tiny", "-o", os.path.join(self.folder, "a.png")]), 1)
        self.assertTrue(self.stderr.getvalue().endswith("step 3/20\nrunai: the server failed: it broke (internal)\n"),
                        self.stderr.getvalue())

        def interrupted(request, on_message=None):
            on_message({"action": 4, "step": 5, "total": 20})
            raise KeyboardInterrupt()
        self.client.run = interrupted
        self.stderr.truncate(0)
        self.stderr.seek(0)
        self.assertEqual(main.main(["generate", "x", "-m", "v1/tiny", "-o", os.path.join(self.folder, "b.png")]), 130)
        self.assertTrue(self.stderr.getvalue().endswith("step 5/20\nrunai: interrupted\n"), self.stderr.getvalue())
