"""runai.doors.legacy.history: the history actions over the socket, their parsing, and a
server without --db, which must write nothing at all."""

import base64
import os
import socket
import subprocess
import sys
from dataclasses import dataclass

from twisted.application import service
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from runai import tap
from runai.core import errors
from runai.doors.legacy import history
from runai.history import store
from runai.client import BlockingClient, txt2img_request
from runai.doors.legacy.parse import parse_request
from runai.test.support import FactoryTestCase, FakeImage, ScriptedEngine, SyncPool, frame
from runai.test.store_fixtures import KEY, PROMPT_MARKER, files_state, start_twistd, tiny_models, tiny_request

P = 1024


class ParseTests(SynchronousTestCase):
    def parse(self, obj):
        return parse_request(obj, "/nonexistent")

    def test_defaults_and_placement(self):
        self.assertEqual(self.parse({"action": "history"}), history.HistoryList(limit=50))
        self.assertEqual(self.parse({"action": "history", "id": "h", "limit": 5, "before": 9, "query": "sea"}),
                         history.HistoryList(limit=5, before=9, query="sea", id="h"))
        # Legacy-style, inside options, with or without the action prefix.
        self.assertEqual(self.parse({"action": "history", "options": {"history_limit": 7, "query": "x"}}),
                         history.HistoryList(limit=7, query="x"))
        self.assertEqual(self.parse({"action": "history", "query": ""}), history.HistoryList())
        self.assertEqual(self.parse({"action": "history_get", "request_id": 3.0}), history.HistoryGet(3))
        self.assertEqual(self.parse({"action": "history_delete", "request_id": 4, "id": 1}),
                         history.HistoryDelete(4, id=1))

    def test_limits(self):
        cases = [
            ({"action": "history", "limit": 0}, errors.OUT_OF_RANGE),
            ({"action": "history", "limit": history.MAX_LIMIT + 1}, errors.OUT_OF_RANGE),
            ({"action": "history", "limit": "5"}, errors.BAD_REQUEST),
            ({"action": "history", "limit": True}, errors.BAD_REQUEST),
            ({"action": "history", "limit": 2.5}, errors.BAD_REQUEST),
            ({"action": "history", "before": 0}, errors.OUT_OF_RANGE),
            ({"action": "history", "before": 2**63}, errors.OUT_OF_RANGE),
            ({"action": "history", "query": 5}, errors.BAD_REQUEST),
            ({"action": "history", "query": "q" * (history.MAX_QUERY_CHARS + 1)}, errors.OUT_OF_RANGE),
            ({"action": "history_get"}, errors.BAD_REQUEST),
            ({"action": "history_get", "request_id": "1"}, errors.BAD_REQUEST),
            ({"action": "history_delete", "request_id": -1}, errors.OUT_OF_RANGE),
            ({"action": "history_delete", "request_id": None}, errors.BAD_REQUEST),
        ]
        for obj, code in cases:
            with self.assertRaises(errors.RunaiError) as e:
                self.parse(obj)
            self.assertEqual(e.exception.code, code, obj)
        self.assertEqual(self.parse({"action": "history", "limit": history.MAX_LIMIT}).limit, history.MAX_LIMIT)
        self.assertEqual(len(self.parse({"action": "history", "query": "q" * history.MAX_QUERY_CHARS}).query),
                         history.MAX_QUERY_CHARS)

    def test_unknown_action_lists_history_actions(self):
        with self.assertRaises(errors.RunaiError) as e:
            self.parse({"action": "histories"})
        self.assertIn("history_get", e.exception.message)


@dataclass(frozen=True)
class WithheldImage(FakeImage):
    withheld: bool = True


class ServerTestCase(FactoryTestCase):
    """The factory with a real store (run in line) and a scripted engine."""

    with_store = True

    def factory_options(self):
        self.store = None
        if self.with_store:
            folder = os.path.realpath(self.mktemp())
            os.makedirs(folder)
            self.store = store.Store(os.path.join(folder, "h.db"), KEY, self.reactor, pool=SyncPool())
            self.store.startService()
            self.addCleanup(self.store.stopService)
        return dict(store=self.store)

    def ask(self, proto, transport, obj):
        proto.dataReceived(frame(obj))
        return self.replies(transport)

    def generate(self, proto, transport, prompt=PROMPT_MARKER, **options):
        options.setdefault("steps", 2)
        proto.dataReceived(frame(txt2img_request(prompt, "v1/tiny", **options)))
        self.pool.run_one()
        return self.replies(transport)


class HistoryServerTests(ServerTestCase):
    def test_generation_recorded_listed_fetched_deleted(self):
        proto, transport = self.connect()
        request = txt2img_request(PROMPT_MARKER, "v1/tiny", request_id="r1", steps=2, seed=42, n_samples=2)
        request["options"].update(pos_x=5, pos_y=9)
        proto.dataReceived(frame(request))
        self.pool.run_one()
        original = [m for m in self.replies(transport) if "image" in m]

        [reply] = self.ask(proto, transport, {"action": "history", "id": 1})
        self.assertEqual((reply["action"], reply["reqtype"], reply["id"], reply["next_before"]),
                         ("history", "history", 1, None))
        [item] = reply["items"]
        self.assertEqual((item["request_id"], item["prompt"], item["status"], item["images"], item["client_id"]),
                         (1, PROMPT_MARKER, "done", 2, "r1"))
        self.assertEqual((item["params"]["seed"], item["params"]["steps"], item["params"]["pos_x"]), (42, 2, 5))

        messages = self.ask(proto, transport, {"action": "history_get", "request_id": 1, "id": "g"})
        self.assertEqual([m.get("action") for m in messages], ["history_get", None, None, "done"])
        self.assertTrue(all(m["id"] == "g" for m in messages))
        self.assertEqual(messages[0]["item"]["request_id"], 1)
        images = messages[1:3]
        # What a legacy client shows: the same keys and values as the generation's replies.
        for got, sent in zip(images, original):
            self.assertEqual({k: got[k] for k in sent if k != "id"}, {k: v for k, v in sent.items() if k != "id"})
            self.assertEqual(got["reqtype"], "txt2img")
            self.assertEqual(got["request_id"], 1)
        self.assertEqual(base64.b64decode(images[0]["image"]), b"\x89PNG fake 42")
        self.assertEqual((messages[-1]["reqtype"], messages[-1]["images"]), ("history_get", 2))

        [deleted] = self.ask(proto, transport, {"action": "history_delete", "request_id": 1})
        self.assertEqual((deleted["action"], deleted["request_id"], deleted["deleted"]), ("history_delete", 1, True))
        for action in ("history_get", "history_delete"):
            [error] = self.ask(proto, transport, {"action": action, "request_id": 1, "id": 5})
            self.assertEqual((error["error"]["code"], error["reqtype"], error["id"]), (errors.NOT_FOUND, action, 5))
        self.assertEqual(self.ask(proto, transport, {"action": "history"})[0]["items"], [])

    def test_paging_and_query(self):
        proto, transport = self.connect()
        for k, prompt in enumerate(["a red barn", "a blue sea", "a RED sky"]):
            self.generate(proto, transport, prompt, seed=k)
        [page] = self.ask(proto, transport, {"action": "history", "limit": 2})
        self.assertEqual([i["request_id"] for i in page["items"]], [3, 2])
        self.assertEqual(page["next_before"], 2)
        [page] = self.ask(proto, transport, {"action": "history", "limit": 2, "before": 2})
        self.assertEqual(([i["request_id"] for i in page["items"]], page["next_before"]), ([1], None))
        [found] = self.ask(proto, transport, {"action": "history", "query": "red"})
        self.assertEqual([i["prompt"] for i in found["items"]], ["a RED sky", "a red barn"])

    def test_failures_cancellations_and_disconnects_are_recorded(self):
        a, ta = self.connect()
        self.engine.during_step = lambda step: step == 1 and a.dataReceived(b"c" * P)
        self.generate(a, ta, "cancelled one", steps=3)

        def boom(step):
            raise RuntimeError("kaboom")
        self.engine.during_step = boom
        self.generate(a, ta, "failed one")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.engine.during_step = None
        # Two jobs, then the client leaves: the running one is cancelled, the queued one dropped.
        a.dataReceived(frame(txt2img_request("running one", "v1/tiny", steps=2)))
        a.dataReceived(frame(txt2img_request("queued one", "v1/tiny", steps=2)))
        a.connectionLost(None)
        self.pool.run_one()

        b, tb = self.connect()
        [reply] = self.ask(b, tb, {"action": "history"})
        got = [(i["prompt"], i["status"], (i["error"] or {}).get("code")) for i in reply["items"]]
        self.assertEqual(got, [
            ("queued one", "cancelled", errors.CANCELLED),
            ("running one", "cancelled", errors.CANCELLED),
            ("failed one", "failed", errors.INTERNAL),
            ("cancelled one", "cancelled", errors.CANCELLED),
        ])
        self.assertIn("disconnected", reply["items"][0]["error"]["message"])

    def test_withheld_images_are_not_kept(self):
        class Flagging(ScriptedEngine):
            def generate(self, request, on_progress, on_image, is_cancelled):
                on_image(WithheldImage(b"", request.seed, 64, 64, 0))
                on_image(FakeImage(b"\x89PNG ok", request.seed + 1, 64, 64, 1))
                return 2
        self.engine = Flagging()
        proto, transport = self.connect()
        self.generate(proto, transport)
        [reply] = self.ask(proto, transport, {"action": "history"})
        self.assertEqual(reply["items"][0]["images"], 1)

    def test_bad_history_requests_keep_the_connection(self):
        proto, transport = self.connect()
        for obj, code in (({"action": "history", "limit": 10**6}, errors.OUT_OF_RANGE),
                          ({"action": "history", "query": "x" * 5000}, errors.OUT_OF_RANGE),
                          ({"action": "history_get", "request_id": "all"}, errors.BAD_REQUEST)):
            [reply] = self.ask(proto, transport, obj)
            self.assertEqual(reply["error"]["code"], code)
            self.assertFalse(transport.disconnecting)
        self.assertEqual(self.ask(proto, transport, {"action": "ping"})[0]["action"], "pong")

    def test_history_get_stops_when_the_client_leaves(self):
        proto, transport = self.connect()
        self.generate(proto, transport, n_samples=3)
        reads = []
        real = self.store.image

        def image(image_id):
            reads.append(image_id)
            proto.connectionLost(None)
            return real(image_id)
        self.store.image = image
        proto.dataReceived(frame({"action": "history_get", "request_id": 1}))
        self.assertEqual(len(reads), 1)


class ShutdownTests(ServerTestCase):
    def test_a_clean_stop_records_the_running_job_as_cancelled(self):
        # The service tree of ``twistd runai --db``: the store starts first, stops last.
        top = service.MultiService()
        self.store.setServiceParent(top)
        self.worker.setServiceParent(top)
        self.queue.setServiceParent(top)
        proto, transport = self.connect()
        proto.dataReceived(frame(txt2img_request("running one", "v1/tiny", request_id="r", steps=2)))
        proto.dataReceived(frame(txt2img_request("queued one", "v1/tiny", request_id="q", steps=2)))
        self.replies(transport)
        self.successResultOf(top.stopService())
        self.assertFalse(self.store.running)
        # The worker thread's outcome reaches the reactor (callFromThread) only now, after
        # the store has closed: it must not be the one that records the job, nor reply twice.
        self.pool.run_one()
        replies = self.replies(transport)
        self.assertEqual(sorted((m["id"], m["error"]["code"]) for m in replies),
                         [("q", errors.SHUTTING_DOWN), ("r", errors.CANCELLED)])
        # The next start: nothing was left "queued", so nothing shows as interrupted.
        reopened = store.Store(self.store.path, KEY, self.reactor, pool=SyncPool())
        reopened.startService()
        self.addCleanup(reopened.stopService)
        items = self.successResultOf(reopened.history(10))
        self.assertEqual([(i["prompt"], i["status"], (i["error"] or {}).get("code")) for i in items], [
            ("queued one", "failed", errors.SHUTTING_DOWN),
            ("running one", "cancelled", errors.CANCELLED),
        ])
        self.assertIn("shutting down", items[1]["error"]["message"])


class WithoutStoreTests(ServerTestCase):
    with_store = False

    def test_history_actions_say_no_store(self):
        proto, transport = self.connect()
        self.assertEqual(self.generate(proto, transport)[-1]["action"], "done")
        for obj in ({"action": "history"}, {"action": "history_get", "request_id": 1},
                    {"action": "history_delete", "request_id": 1}):
            [reply] = self.ask(proto, transport, dict(obj, id=7))
            self.assertEqual((reply["error"]["code"], reply["reqtype"], reply["id"]),
                             (errors.NO_STORE, obj["action"], 7))
            self.assertIn("--db", reply["error"]["message"])


class ServiceTests(SynchronousTestCase):
    def setUp(self):
        self.folder = os.path.realpath(self.mktemp())
        os.makedirs(self.folder)
        self.path = os.path.join(self.folder, "h.db")

    def make(self, *args, key=KEY.reveal()):
        self.patch(os, "environ", {"RUNAI_DB_KEY": key})
        options = tap.Options()
        options.parseOptions(["--port", "0", "--device", "cpu", *args])
        return tap.makeService(options, reactor=MemoryReactorClock())

    def test_with_db(self):
        service = self.make("--db", self.path)
        self.assertEqual([type(s).__name__ for s in service],
                         ["Store", "LocalWorker", "JobQueue", "StreamServerEndpointService"])
        factory = list(service)[3].factory
        self.assertIsInstance(factory.core.store, store.Store)
        self.assertFalse(factory.core.store.running)  # its thread starts with the service
        self.assertEqual(store.check(self.path, KEY), 0)  # created and migrated at start

    def test_wrong_key_stops_the_start(self):
        self.make("--db", self.path)
        before = files_state(self.folder)
        with self.assertRaises(SystemExit) as e:
            self.make("--db", self.path, key="not the key")
        self.assertIn("wrong key", str(e.exception.code))
        self.assertEqual(files_state(self.folder), before)

    def test_without_db_no_store_code_runs(self):
        code = ("import sys, runai.tap\n"
                "from twisted.internet.testing import MemoryReactorClock\n"
                "o = runai.tap.Options(); o.parseOptions(['--port', '0'])\n"
                "s = runai.tap.makeService(o, reactor=MemoryReactorClock())\n"
                "print(list(s)[2].factory.core.store, 'runai.history.store' in sys.modules, 'sqlcipher3' in sys.modules)")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env=dict(os.environ, RUNAI_DB_KEY="ignored without --db"))
        self.assertEqual(out.stdout.split(), ["None", "False", "False"])








# Real servers ------------------------------------------------------------------------------





class NoDatabaseTests(SynchronousTestCase):
    def test_a_full_session_without_db_leaves_no_file_anywhere(self):
        root = os.path.realpath(self.mktemp())
        home, work, tmp = (os.path.join(root, name) for name in ("home", "work", "tmp"))
        for folder in (home, work, tmp):
            os.makedirs(folder)
        models = tiny_models()

        def tree(top):
            return sorted((os.path.relpath(os.path.join(d, f), top), os.stat(os.path.join(d, f)).st_mtime_ns)
                          for d, _, files in os.walk(top) for f in files)
        models_before = tree(models)
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("XDG_", "HF_", "TORCH", "TRANSFORMERS_", "RUNAI_"))}
        env.update(HOME=home, TMPDIR=tmp)
        server, port, log_path = start_twistd(self, "--auto-shutdown", "--timeout", "60", env=env, cwd=work)
        with BlockingClient("127.0.0.1", port, timeout=120) as client:
            self.assertIn("version", client.ping())
            images = client.run(tiny_request(PROMPT_MARKER, seed=3, n_samples=2))
            self.assertEqual(len(images), 2)
            for obj in ({"action": "history"}, {"action": "history_get", "request_id": 1}):
                client.send(obj)
                self.assertEqual(client.receive()["error"]["code"], errors.NO_STORE)
        # The SQLCipher library was never even loaded: no database was opened.
        maps = f"/proc/{server.pid}/maps"
        if os.path.exists(maps):
            with open(maps) as f:
                loaded = f.read()
            self.assertIn("libtorch", loaded)  # the check sees the server's libraries
            self.assertNotIn("sqlcipher", loaded)
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"x" * P)
            sock.recv(1)
        self.assertEqual(server.wait(timeout=60), 0)

        self.assertEqual(os.listdir(home), [])
        self.assertEqual(os.listdir(work), [])
        self.assertEqual(os.listdir(tmp), [])
        self.assertEqual(tree(models), models_before)
        with open(log_path) as f:
            log = f.read()
        for line in log.splitlines():  # prompts are logged at debug level only
            self.assertTrue(PROMPT_MARKER not in line or "#debug]" in line, line)
