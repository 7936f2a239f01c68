"""End to end over real 127.0.0.1 sockets, with the real worker thread and a tiny model.

The client here frames and reads exactly like the legacy Krita client: it pads to whole
packets, sends the EOM packet, reads P bytes at a time and strips the NULs.
"""

import atexit
import base64
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile

from PIL import Image
from twisted.internet import reactor, threads
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase, TestCase

from runai.core import errors
from runai.backends.local import LocalWorker
from runai.models.library import ModelLibrary
from runai.test.support import make_server, reported_port

P = 1024
_models = None


def tiny_model_dir():
    """One model folder for the whole module, built on first use: v1/tiny."""
    global _models
    if _models is None:
        from runai.test.tiny import build_tiny_pipeline
        _models = os.path.realpath(tempfile.mkdtemp(prefix="runai-models-"))
        # trial has no tearDownModule: remove it when the test run ends.
        atexit.register(shutil.rmtree, _models, True)
        build_tiny_pipeline(os.path.join(_models, "v1", "tiny"))
    return _models




class LegacyClient:
    """Frames like the legacy Krita plugin's socket client."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=120)

    def send(self, obj):
        data = json.dumps(obj).encode("utf-8")
        data += b"\x00" * (-len(data) % P)
        for i in range(0, len(data), P):
            self.sock.sendall(data[i:i + P])
        self.sock.sendall(b"\x00" * P)

    def send_raw(self, data):
        self.sock.sendall(data)

    def _packet(self):
        packet = b""
        while len(packet) < P:
            chunk = self.sock.recv(P - len(packet))
            if not chunk:
                raise ConnectionError("closed")
            packet += chunk
        return packet

    def receive(self):
        parts = []
        while True:
            packet = self._packet()
            if packet == b"\x00" * P:
                return json.loads(b"".join(parts).rstrip(b"\x00"))
            parts.append(packet)

    def until_final(self):
        messages = []
        while True:
            message = self.receive()
            messages.append(message)
            if "error" in message or message.get("action") == "done":
                return messages

    def close(self):
        self.sock.close()


def legacy_request(models, seed=1, steps=2, **extra):
    options = {
        "model_base_path": models,
        "txt2img_model": os.path.join(models, "v1", "tiny"),
        "txt2img_prompt": "a lighthouse", "txt2img_negative_prompt": "fog",
        "txt2img_steps": steps, "txt2img_scale": 7.5, "txt2img_seed": seed,
        "txt2img_height": 64, "txt2img_width": 64, "txt2img_n_samples": 1,
        "txt2img_scheduler": "euler_a", "pos_x": 3, "pos_y": 4, "do_nsfw_filter": False,
    }
    options.update(extra)
    return {"action": "txt2img", "options": options}


def png_of(message):
    return base64.b64decode(message["image"])


class LiveServer:
    """A real server on 127.0.0.1 with its real worker thread, for trial TestCases."""

    def start_server(self, models, **factory_options):
        self.worker = LocalWorker(reactor, device="cpu", dtype="float32",
                                  engine_options=dict(library=ModelLibrary(models)))
        self.worker.startService()
        self.queue, self.core, self.factory = make_server(reactor, models, self.worker,
                                                          pool=reactor.getThreadPool(), **factory_options)
        self.port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.addCleanup(self.worker.stopService)
        self.addCleanup(self.queue.stopService)
        self.addCleanup(self.port.stopListening)

    def in_thread(self, f, *args):
        return threads.deferToThread(f, *args)

    def cancel_mid_job(self, request):
        """Send ``request``, and a cancel packet once its first reply arrives; every reply
        until its end."""
        def run():
            client = LegacyClient(self.port.getHost().port)
            try:
                client.send(request)
                first = client.receive()
                client.send_raw(b"c" * P)
                return [first] + client.until_final()
            finally:
                client.close()
        return self.in_thread(run)

    def talk(self, *requests):
        """Send each request on one legacy connection; return the replies of each."""
        def run():
            client = LegacyClient(self.port.getHost().port)
            try:
                answers = []
                for request in requests:
                    client.send(request)
                    answers.append(client.until_final())
                return answers
            finally:
                client.close()
        return self.in_thread(run)


class EndToEndTests(LiveServer, TestCase):
    timeout = 300

    def setUp(self):
        self.models = tiny_model_dir()
        self.start_server(self.models, idle_timeout=30)

    @inlineCallbacks
    def test_legacy_client_gets_an_image(self):
        [replies] = yield self.talk(legacy_request(self.models, seed=5, steps=3))
        progress = [m for m in replies if m.get("action") == 4]
        self.assertEqual([(m["step"], m["total"]) for m in progress], [(1, 3), (2, 3), (3, 3)])
        [image] = [m for m in replies if "image" in m]
        self.assertEqual((image["reqtype"], image["pos_x"], image["pos_y"], image["seed"]), ("txt2img", 3, 4, 5))
        picture = Image.open(io.BytesIO(png_of(image)))
        self.assertEqual((picture.format, picture.size), ("PNG", (64, 64)))
        self.assertEqual(replies[-1]["action"], "done")

    @inlineCallbacks
    def test_same_request_same_bytes(self):
        a, b, c = yield self.talk(legacy_request(self.models, seed=9), legacy_request(self.models, seed=9),
                                  legacy_request(self.models, seed=10))
        first, second, other = (png_of(next(m for m in r if "image" in m)) for r in (a, b, c))
        self.assertEqual(first, second)
        self.assertNotEqual(first, other)

    @inlineCallbacks
    def test_several_clients_at_once(self):
        results = yield gatherResults([self.talk(legacy_request(self.models, seed=s)) for s in range(4)])
        seeds = sorted(next(m for m in replies if "image" in m)["seed"] for [replies] in results)
        self.assertEqual(seeds, [0, 1, 2, 3])

    @inlineCallbacks
    def test_hostile_input_then_still_serving(self):
        bad = [
            {"action": "txt2img", "options": {"txt2img_model": "../../../etc", "txt2img_prompt": "x"}},
            legacy_request(self.models, model_base_path="/"),
            legacy_request(self.models, txt2img_steps=-5),
            legacy_request(self.models, txt2img_width=1 << 20),
            {"action": "update"},
        ]
        answers = yield self.talk(*bad, legacy_request(self.models))
        codes = [replies[-1].get("error", {}).get("code") for replies in answers]
        self.assertEqual(codes, [errors.PATH_OUTSIDE_MODEL_DIR, errors.PATH_OUTSIDE_MODEL_DIR,
                                 errors.OUT_OF_RANGE, errors.OUT_OF_RANGE, errors.UNKNOWN_ACTION, None])
        self.assertEqual(answers[-1][-1]["action"], "done")

    @inlineCallbacks
    def test_large_requests_are_parsed_off_the_reactor_in_order(self):
        import threading
        import numpy as np
        threads_used = []
        build = self.factory.build

        def recording(obj):
            threads_used.append(threading.current_thread())
            return build(obj)
        self.factory.build = recording
        canvas = Image.fromarray(np.random.default_rng(1).integers(0, 256, (512, 512, 3), dtype=np.uint8))
        buf = io.BytesIO()
        canvas.save(buf, format="PNG")
        big = legacy_request(self.models, txt2img_steps=2)
        big["action"] = "img2img"
        big["options"] = {k.replace("txt2img_", "img2img_"): v for k, v in big["options"].items()}
        big["options"].update(pixels=base64.b64encode(buf.getvalue()).decode(), img2img_strength=0.1)
        self.assertGreater(len(json.dumps(big)), self.factory.parse_in_thread_bytes)

        def run():
            client = LegacyClient(self.port.getHost().port)
            try:
                # Three requests at once: the large one must not be overtaken by the others.
                client.send(big)
                client.send({"action": "ping", "id": "after"})
                client.send({"action": "fly", "id": "last"})
                return [client.receive() for _ in range(3)]
            finally:
                client.close()
        first, second, third = yield self.in_thread(run)
        self.assertEqual((first["error"]["code"], first["reqtype"]), (errors.OUT_OF_RANGE, "img2img"))
        self.assertEqual((second["action"], second["id"]), ("pong", "after"))
        self.assertEqual((third["error"]["code"], third["id"]), (errors.UNKNOWN_ACTION, "last"))
        self.assertIsNot(threads_used[0], threading.main_thread())
        self.assertIs(threads_used[1], threading.main_thread())

    @inlineCallbacks
    def test_cancel_packet_stops_the_job(self):
        replies = yield self.cancel_mid_job(legacy_request(self.models, steps=150))
        self.assertEqual(replies[-1]["error"]["code"], errors.CANCELLED)
        steps = [m["step"] for m in replies if m.get("action") == 4]
        self.assertLess(len(steps), 150)
        self.assertFalse(any("image" in m for m in replies))
        [after] = yield self.talk(legacy_request(self.models))
        self.assertEqual(after[-1]["action"], "done")

    @inlineCallbacks
    def test_disconnect_mid_job_does_not_stop_others(self):
        def leave():
            client = LegacyClient(self.port.getHost().port)
            client.send(legacy_request(self.models, steps=150))
            client.receive()
            client.close()
        yield self.in_thread(leave)
        [replies] = yield self.talk(legacy_request(self.models))
        self.assertEqual(replies[-1]["action"], "done")


class TwistdTests(SynchronousTestCase):
    """The installed commands, as a user runs them: twistd runai, then runai generate."""

    def test_twistd_serves_runai_generate(self):
        models = tiny_model_dir()
        workdir = self.mktemp()
        os.makedirs(workdir)
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        server = subprocess.Popen(
            [twistd, "--nodaemon", "--pidfile=", "--logfile=-", "runai", "--port", "0",
             "--model-dir", models, "--device", "cpu", "--auto-shutdown", "--timeout", "60"],
            cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.addCleanup(lambda: server.poll() is None and server.kill())
        port = reported_port(server, timeout=120)
        self.assertIsNotNone(port, "the server did not report its port")

        output = os.path.join(self.mktemp() + "-out", "lighthouse.png")
        os.makedirs(os.path.dirname(output))
        cli = subprocess.run(
            [sys.executable, "-m", "runai.cli.main", "generate", "a lighthouse", "-m", "v1/tiny", "-o", output,
             "--port", str(port), "--steps", "2", "--width", "64", "--height", "96", "--seed", "3"],
            capture_output=True, text=True, timeout=120,
        )
        self.assertEqual(cli.returncode, 0, cli.stderr)
        self.assertIn("step 2/2", cli.stderr)
        self.assertEqual(Image.open(output).size, (64, 96))

        refused = subprocess.run(
            [sys.executable, "-m", "runai.cli.main", "generate", "x", "-m", "../../etc", "--port", str(port)],
            capture_output=True, text=True, timeout=60,
        )
        self.assertEqual(refused.returncode, 1)
        self.assertIn("path_outside_model_dir", refused.stderr)

        # An x packet stops an --auto-shutdown server; it leaves no file behind.
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"x" * P)
            sock.recv(1)
        self.assertEqual(server.wait(timeout=60), 0)
        server.stdout.close()
        self.assertEqual(os.listdir(workdir), [])
