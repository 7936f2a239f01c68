"""runai.cli.history: `runai history list|export|delete`, against fakes and a real server."""

import argparse
import base64
import io
import json
import os
import signal
import subprocess
import sys

from PIL import Image
from twisted.trial.unittest import SynchronousTestCase

from runai.cli import history as history_cli
from runai.core import pngtext
from runai.history import store
from runai.client import BlockingClient
from runai.test.store_fixtures import KEY, PROMPT_MARKER, start_twistd, tiny_request


def cli(port, *args, cwd=None):
    return subprocess.run([sys.executable, "-m", "runai.cli.main", *args, "--port", str(port)],
                          capture_output=True, text=True, timeout=120, cwd=cwd)


class ExportFormatTests(SynchronousTestCase):
    def test_png_text_chunks(self):
        out = io.BytesIO()
        Image.new("RGB", (8, 8), (10, 20, 30)).save(out, "PNG")
        original = out.getvalue()
        item = {"request_id": 3, "action": "txt2img", "model": "v1/tiny", "prompt": "phare à l'aube ☀",
                "negative_prompt": "fog", "params": {"steps": 20, "scheduler": "euler_a", "scale": 7.5}}
        about = {"seed": 42, "width": 8, "height": 8, "index": 0}
        texts = {"parameters": history_cli.parameters_text(item, about), "runai": json.dumps(item)}
        tagged = pngtext.png_with_text(original, texts)
        picture = Image.open(io.BytesIO(tagged))
        picture.load()
        self.assertEqual(picture.text["parameters"],
                         "phare à l'aube ☀\nNegative prompt: fog\n"
                         "Steps: 20, Sampler: euler_a, CFG scale: 7.5, Seed: 42, Size: 8x8, Model: v1/tiny")
        self.assertEqual(json.loads(picture.text["runai"]), item)
        self.assertEqual(picture.tobytes(), Image.open(io.BytesIO(original)).tobytes())
        self.assertRaises(ValueError, pngtext.png_with_text, b"GIF89a", texts)


class FakeServer:
    """Stands in for a BlockingClient: answers the history actions with ``items`` and
    ``images`` (the image messages of every history_get)."""

    def __init__(self, items, images):
        self.items, self.images, self.replies = items, images, []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def send(self, obj):
        rid = obj.get("id")
        if obj["action"] == "history":
            self.replies.append({"action": "history", "items": self.items, "next_before": None, "id": rid})
        elif obj["action"] == "history_get":
            item = {"request_id": obj["request_id"], "action": "txt2img", "model": "v1/tiny", "prompt": "p",
                    "negative_prompt": "", "params": {}}
            self.replies.append({"action": "history_get", "item": item, "id": rid})
            self.replies.extend(dict(m, id=rid) for m in self.images)
            self.replies.append({"action": "done", "images": len(self.images), "id": rid})

    def receive(self):
        return self.replies.pop(0)


class ExportNamesTests(SynchronousTestCase):
    """File names are made of the server's request ids and image indexes: only whole
    numbers are used; anything else stops the export with a plain message."""

    def setUp(self):
        picture = io.BytesIO()
        Image.new("RGB", (4, 4)).save(picture, "PNG")
        self.image = base64.b64encode(picture.getvalue()).decode("ascii")
        self.root = os.path.realpath(self.mktemp())
        self.out = os.path.join(self.root, "a", "b", "out")
        self.stdout, self.stderr = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", self.stdout)
        self.patch(sys, "stderr", self.stderr)

    def export(self, items=(), indexes=(0,), request_ids=None):
        server = FakeServer(list(items), [{"image": self.image, "seed": 1, "width": 4, "height": 4, "index": i}
                                          for i in indexes])
        self.patch(history_cli, "connect", lambda args: server)
        args = argparse.Namespace(directory=self.out, request_id=request_ids, limit=None, before=None, query=None)
        return history_cli.export_command(args)

    def written(self):
        return sorted(os.path.relpath(os.path.join(d, f), self.root) for d, _, files in os.walk(self.root)
                      for f in files)

    def test_whole_numbers_make_the_names(self):
        self.assertEqual(self.export([{"request_id": 3}], indexes=(0, 1)), 0)
        self.assertEqual(self.written(), ["a/b/out/runai-3-0.png", "a/b/out/runai-3-1.png"])

    def test_bad_indexes_are_refused(self):
        for index in ("../../../escaped", "0/../../x", True, 1.0, -1, None, [0], "1"):
            self.assertEqual(self.export(indexes=(index,), request_ids=[3]), 1, index)
            self.assertIn("image index", self.stderr.getvalue())
            self.assertIn(repr(index), self.stderr.getvalue())
        self.assertEqual(self.written(), [])

    def test_bad_request_ids_are_refused(self):
        for request_id in ("../../escaped", True, 2.0, 0, None, "7"):
            self.assertEqual(self.export([{"request_id": request_id}]), 1, request_id)
            self.assertIn("request id", self.stderr.getvalue())
        self.assertEqual(self.written(), [])


class CommandLineTests(SynchronousTestCase):
    def test_history_commands_against_a_real_server(self):
        folder = os.path.realpath(self.mktemp())
        os.makedirs(folder)
        path = os.path.join(folder, "history.db")
        key_file = os.path.join(folder, "key")
        with open(key_file, "w") as f:
            f.write(KEY.reveal() + "\n")
        env = {k: v for k, v in os.environ.items() if k != "RUNAI_DB_KEY"}
        server, port, _ = start_twistd(self, "--db", path, "--db-key-file", key_file, env=env)

        out = os.path.join(folder, "out.png")
        made = cli(port, "generate", f"{PROMPT_MARKER} at dusk", "-m", "v1/tiny", "-o", out, "-q",
                   "--steps", "1", "--width", "64", "--height", "64", "--seed", "7", "--n-samples", "2")
        self.assertEqual(made.returncode, 0, made.stderr)
        with BlockingClient("127.0.0.1", port, timeout=60) as client:
            client.run(tiny_request("a quiet harbour", seed=1))

        listed = cli(port, "history", "list")
        self.assertEqual(listed.returncode, 0, listed.stderr)
        lines = listed.stdout.splitlines()
        self.assertEqual(len(lines), 2)
        self.assertIn("a quiet harbour", lines[0])
        self.assertIn(PROMPT_MARKER, lines[1])
        self.assertIn("done", lines[1])
        found = cli(port, "history", "list", "--json", "--query", "ZEBRA")
        [item] = json.loads(found.stdout)
        self.assertEqual((item["request_id"], item["images"], item["params"]["seed"]), (1, 2, 7))

        exported = os.path.join(folder, "export")
        done = cli(port, "history", "export", exported, "--query", "zebra")
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(sorted(os.listdir(exported)), ["runai-1-0.png", "runai-1-1.png"])
        for index in range(2):
            picture = Image.open(os.path.join(exported, f"runai-1-{index}.png"))
            picture.load()
            self.assertTrue(picture.text["parameters"].startswith(f"{PROMPT_MARKER} at dusk\n"))
            self.assertIn(f"Seed: {7 + index}", picture.text["parameters"])
            self.assertEqual(json.loads(picture.text["runai"])["request_id"], 1)
            self.assertEqual(picture.tobytes(), Image.open(os.path.join(folder, f"out-{index}.png")).tobytes())
        again = cli(port, "history", "export", exported)
        self.assertEqual(again.returncode, 0, again.stderr)
        self.assertIn("exists", again.stderr)
        self.assertEqual(sorted(os.listdir(exported)), ["runai-1-0.png", "runai-1-1.png", "runai-2-0.png"])

        self.assertEqual(cli(port, "history", "delete", "1").returncode, 0)
        gone = cli(port, "history", "delete", "1")
        self.assertEqual(gone.returncode, 1)
        self.assertIn("not_found", gone.stderr)
        self.assertEqual(len(cli(port, "history", "list").stdout.splitlines()), 1)

        # A clean stop closes the database: the WAL is folded in and removed. (twistd
        # exits by the signal that stopped it.)
        server.terminate()
        self.assertEqual(server.wait(timeout=60), -signal.SIGTERM)
        self.assertFalse(os.path.exists(path + "-wal"))
        self.assertEqual(store.check(path, KEY), 1)
