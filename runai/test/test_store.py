"""Tests for runai.history.store: what the store keeps and reads back, what reaches the
disk, its thread, its life as a Service, and a real server killed while it writes.

The key and the file's opening and migrations have their own tests (test_history_key,
test_history_database); the helpers they share are in store_fixtures.

Every test opens real SQLCipher files in its own temporary folder. The store's pool is
swapped for a synchronous one (the reactor for one whose callFromThread runs at once),
so most tests run its thread's work in line; StoreThreadTests run the real thread.
"""

import io
import json
import os
import signal
import stat
import threading

from PIL import Image
from twisted.application import service
from twisted.application.service import IService
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.logger import Logger, LogLevel
from twisted.trial.unittest import SynchronousTestCase, TestCase

from runai.core import errors
from runai.history import database, store
from runai.history.database import StoreError
from runai.client import BlockingClient
from runai.core.images import EncodedImage
from runai.test.support import FakeImage, ManualPool, SyncPool, SyncReactor
from runai.test.store_fixtures import (
    KEY, PROMPT_MARKER, StoreTestCase, png, raw_connect, request, start_twistd, tiny_request,
)


class DatabaseTests(StoreTestCase):
    def test_round_trip(self):
        s = self.open_store()
        pngs = [png(42), png(43)]
        req = request(pixels=EncodedImage(b"x" * 10, "PNG", 8, 8, "RGB"))
        self.record_done(s, req, [42, 43], pngs)
        [item] = self.result(s.history(10))
        self.assertEqual(item["request_id"], 1)
        self.assertEqual((item["action"], item["model"], item["prompt"], item["negative_prompt"]),
                         ("txt2img", "v1/tiny", "a lighthouse", "fog"))
        self.assertEqual((item["status"], item["images"], item["seconds"], item["error"]), ("done", 2, 1.5, None))
        self.assertEqual(item["client_id"], "job-1")
        self.assertLess(item["time"], item["finished"])
        params = item["params"]
        self.assertEqual((params["steps"], params["seed"], params["width"], params["scheduler"]), (3, 42, 64, "euler_a"))
        self.assertEqual(params["pixels"], {"format": "PNG", "width": 8, "height": 8, "bytes": 10})
        # Absolute paths stay out: they would leak into exported files.
        self.assertNotIn("model_path", params)
        self.assertNotIn("/home/me", json.dumps(item))
        got = self.result(s.get(1))
        self.assertEqual([(i["index"], i["seed"], i["width"]) for i in got["image_list"]], [(0, 42, 64), (1, 43, 64)])
        self.assertEqual([self.result(s.image(i["image_id"])) for i in got["image_list"]], pngs)
        self.assertIsNone(self.result(s.get(99)))
        self.assertIsNone(self.result(s.image(99)))

    def test_failures_and_cancellations(self):
        s = self.open_store()
        s.failed(s.begin(request(rid=1)), errors.RunaiError(errors.OUT_OF_MEMORY, "the device ran out of memory"))
        s.failed(s.begin(request(rid=2)), errors.JobCancelled())
        running = s.begin(request(rid=3))
        items = {i["client_id"]: i for i in self.result(s.history(10))}
        self.assertEqual((items[1]["status"], items[1]["error"]["code"]), ("failed", errors.OUT_OF_MEMORY))
        self.assertEqual((items[2]["status"], items[2]["error"]["code"]), ("cancelled", errors.CANCELLED))
        self.assertEqual((items[3]["status"], items[3]["error"]), ("queued", None))
        self.assertIsNotNone(running.id)

    def test_newest_first_limit_before_query(self):
        s = self.open_store()
        prompts = ["a red lighthouse", "a blue car", "A RED barn", "100% red_ish", "Ünïcödé RED", "100x redXish"]
        for k, prompt in enumerate(prompts):
            self.record_done(s, request(prompt, seed=k), [k])
        ids = lambda items: [i["request_id"] for i in items]  # noqa: E731
        self.assertEqual(ids(self.result(s.history(50))), [6, 5, 4, 3, 2, 1])
        self.assertEqual(ids(self.result(s.history(2))), [6, 5])
        self.assertEqual(ids(self.result(s.history(2, before=5))), [4, 3])
        self.assertEqual(ids(self.result(s.history(50, query="red"))), [6, 5, 4, 3, 1])
        self.assertEqual(ids(self.result(s.history(50, query="ünïcödé"))), [5])
        # % and _ are text, not wildcards.
        self.assertEqual(ids(self.result(s.history(50, query="100% red_"))), [4])
        self.assertEqual(ids(self.result(s.history(50, query="red", before=4))), [3, 1])
        self.assertEqual(ids(self.result(s.history(50, query="redX"))), [6])
        self.assertEqual(self.result(s.history(50, query="nothing like it")), [])

    def test_delete(self):
        s = self.open_store()
        self.record_done(s, request(seed=1), [1, 2])
        self.record_done(s, request(seed=5), [5])
        self.assertTrue(self.result(s.delete(1)))
        self.assertFalse(self.result(s.delete(1)))
        self.assertIsNone(self.result(s.get(1)))
        self.assertEqual([i["request_id"] for i in self.result(s.history(10))], [2])
        # The images went with it; a later request gets a new id, never the deleted one.
        self.record_done(s, request(seed=9), [9])
        s.stopService()
        conn = raw_connect(self.path)
        self.assertEqual(conn.execute("SELECT request_id FROM images ORDER BY id").fetchall(), [(2,), (3,)])
        conn.close()

    def test_images_of_a_deleted_request_are_not_kept(self):
        s = self.open_store()
        record = s.begin(request())
        self.result(s.delete(record.id))
        s.add_image(record, FakeImage(png(1), 1, 64, 64, 0))
        s.finish(record, "done")
        self.assertEqual(self.result(s.history(10)), [])
        s.stopService()
        conn = raw_connect(self.path)
        self.assertEqual(conn.execute("SELECT count(*) FROM images").fetchone(), (0,))
        conn.close()

    def test_requests_in_flight_are_marked_interrupted_at_the_next_start(self):
        s = self.open_store()
        self.record_done(s, request(seed=1), [1])
        record = s.begin(request(seed=2))
        s.add_image(record, FakeImage(png(2), 2, 64, 64, 0))
        s.stopService()
        s = self.open_store()
        statuses = [(i["status"], i["images"]) for i in self.result(s.history(10))]
        self.assertEqual(statuses, [("interrupted", 1), ("done", 1)])

    def test_file_is_private_and_in_wal_mode(self):
        s = self.open_store()
        self.record_done(s, request(), [1])
        mode = stat.S_IMODE(os.stat(self.path).st_mode)
        self.assertEqual(mode & 0o077, 0, oct(mode))
        for suffix in ("-wal", "-shm"):
            if os.path.exists(self.path + suffix):
                self.assertEqual(stat.S_IMODE(os.stat(self.path + suffix).st_mode) & 0o077, 0)
        conn = raw_connect(self.path)
        self.assertEqual(conn.execute("PRAGMA journal_mode").fetchone()[0], "wal")
        self.assertEqual(conn.execute("PRAGMA user_version").fetchone()[0], database.SCHEMA_VERSION)
        self.assertEqual(conn.execute("PRAGMA application_id").fetchone()[0], database.APPLICATION_ID)
        conn.close()

    def test_nothing_in_plaintext_on_disk(self):
        s = self.open_store()
        image = png(7)
        self.record_done(s, request(f"{PROMPT_MARKER} at dusk", negative_prompt="NEGATIVE-" + PROMPT_MARKER),
                         [7], [image])

        def check(when):
            files = [name for name in os.listdir(self.folder)]
            self.assertIn("history.db", files)
            for name in files:
                with open(os.path.join(self.folder, name), "rb") as f:
                    data = f.read()
                for needle in (PROMPT_MARKER.encode(), PROMPT_MARKER.encode("utf-16-le"), b"IHDR", image[100:132],
                               b"lighthouse", b"txt2img", b"CREATE TABLE", b"SQLite format 3"):
                    self.assertNotIn(needle, data, f"{needle!r} readable in {name} ({when})")
        check("open")
        s.stopService()
        check("closed")

    def test_persists_across_restarts(self):
        s = self.open_store()
        self.record_done(s, request(PROMPT_MARKER), [3], [png(3)])
        s.stopService()
        s = self.open_store()
        [item] = self.result(s.history(1))
        self.assertEqual(item["prompt"], PROMPT_MARKER)
        [meta] = self.result(s.get(item["request_id"]))["image_list"]
        self.assertEqual(self.result(s.image(meta["image_id"])), png(3))


class OffTheHotPathTests(StoreTestCase):
    def test_calls_only_queue_work_for_the_store_thread(self):
        pool = ManualPool()
        s = self.open_store(pool=pool)
        record = s.begin(request())
        s.add_image(record, FakeImage(png(1), 1, 64, 64, 0))
        s.finish(record, "done")
        # Nothing ran on the caller's thread: not even the open.
        self.assertFalse(os.path.exists(self.path))
        self.assertIsNone(record.id)
        self.assertEqual(len(pool.calls), 4)
        while pool.calls:
            pool.run_one()
        self.assertEqual(record.id, 1)
        self.assertEqual(s.pending_bytes, 0)
        d = s.history(5)
        self.assertNoResult(d)
        pool.run_one()
        self.assertEqual(self.successResultOf(d)[0]["status"], "done")

    def test_a_stalled_disk_drops_images_not_the_server(self):
        pool = ManualPool()
        s = self.open_store(pool=pool)
        events = []
        s.log = Logger(observer=events.append)
        s.max_pending_bytes = 3 * len(png(1))
        record = s.begin(request())
        for index in range(5):
            s.add_image(record, FakeImage(png(1), 1, 64, 64, index))
        self.assertEqual(len(pool.calls), 2 + 3)
        self.assertEqual(s.pending_bytes, 3 * len(png(1)))
        self.assertEqual([e["log_level"] for e in events], [LogLevel.warn] * 2)
        while pool.calls:
            pool.run_one()
        self.assertEqual(s.pending_bytes, 0)
        d = s.get(1)
        pool.run_one()
        self.assertEqual(self.successResultOf(d)["images"], 3)

    def test_writes_after_stop_are_dropped(self):
        s = self.open_store()
        record = s.begin(request())
        s.stopService()
        s.add_image(record, FakeImage(png(1), 1, 64, 64, 0))
        s.finish(record, "done")
        self.failureResultOf(s.history(1), StoreError)

    def test_a_failed_write_is_logged_and_the_store_goes_on(self):
        s = self.open_store()
        record = s.begin(request())
        s.add_image(record, FakeImage(png(1), 1, None, 64, 0))  # width is NOT NULL
        self.assertEqual(len(self.flushLoggedErrors()), 1)
        self.assertEqual(s.pending_bytes, 0)
        s.finish(record, "done")
        self.assertEqual(self.result(s.history(1))[0]["status"], "done")


class StoreThreadTests(TestCase):
    """The real pool: database calls run on the store's thread only."""

    @inlineCallbacks
    def test_every_database_call_runs_on_the_store_thread(self):
        folder = self.mktemp()
        os.makedirs(folder)
        s = store.Store(os.path.join(folder, "h.db"), KEY, reactor)
        threads = []
        real_run = s._run

        def run(f, *args):
            threads.append(threading.current_thread())
            return real_run(f, *args)
        s._run = run
        s.startService()
        self.addCleanup(s.stopService)
        record = s.begin(request())
        s.add_image(record, FakeImage(png(1), 1, 64, 64, 0))
        s.finish(record, "done", seconds=0.1)
        [item] = yield s.history(5)
        self.assertEqual((item["status"], item["images"]), ("done", 1))
        self.assertEqual(len(threads), 5)  # open, request, image, finish, history
        self.assertEqual(len(set(threads)), 1)
        self.assertIsNot(threads[0], threading.main_thread())
        self.assertIn("runai-store", threads[0].name)

    def test_stop_service_writes_what_is_queued_then_closes(self):
        folder = os.path.realpath(self.mktemp())
        os.makedirs(folder)
        path = os.path.join(folder, "h.db")
        s = store.Store(path, KEY, reactor)
        s.startService()
        record = s.begin(request())
        for index in range(4):
            s.add_image(record, FakeImage(png(index), index, 64, 64, index))
        s.finish(record, "done")
        s.stopService()  # returns once the thread has run every call and stopped
        self.assertFalse(os.path.exists(path + "-wal"))
        conn = raw_connect(path)
        self.assertEqual(conn.execute("SELECT status FROM requests").fetchall(), [("done",)])
        self.assertEqual(conn.execute("SELECT count(*) FROM images").fetchone(), (4,))
        conn.close()


class ServiceTests(StoreTestCase):
    """The store is a Service: ``twistd runai --db`` starts it first and stops it last."""

    def test_in_a_service_tree_it_writes_what_later_services_record_on_their_way_out(self):
        pool = ManualPool()
        s = store.Store(self.path, KEY, SyncReactor(), pool=pool, now=self.now)
        self.assertTrue(IService.providedBy(s))
        top = service.MultiService()
        s.setServiceParent(top)
        records = []

        class Worker(service.Service):
            """Fails its running job as it stops, as the real worker does."""

            def stopService(self):
                s.failed(records[0], errors.JobCancelled())
                return super().stopService()

        Worker().setServiceParent(top)
        self.assertFalse(s.running)
        top.startService()
        self.assertTrue(s.running and pool.started)
        records.append(s.begin(request()))
        self.successResultOf(top.stopService())
        self.assertFalse(s.running)
        self.assertTrue(pool.stopped)
        # The thread runs what was queued before it stopped: the open, the request, the
        # outcome the worker recorded while it stopped, and last the close.
        while pool.calls:
            pool.run_one()
        self.assertFalse(os.path.exists(self.path + "-wal"))  # closed: the WAL is folded in
        conn = raw_connect(self.path)
        self.assertEqual(conn.execute("SELECT status, error_code FROM requests").fetchall(),
                         [("cancelled", errors.CANCELLED)])
        conn.close()

    def test_start_and_stop_without_a_parent(self):
        pool = ManualPool()
        s = store.Store(self.path, KEY, SyncReactor(), pool=pool, now=self.now)
        s.startService()
        self.assertTrue(s.running and pool.started)
        s.stopService()
        self.assertFalse(s.running)
        self.assertTrue(pool.stopped)
        queued = len(pool.calls)
        s.stopService()  # a second stop queues nothing
        self.assertEqual(len(pool.calls), queued)


# A real server, killed mid-write ---------------------------------------------------------

class KilledServerTests(SynchronousTestCase):
    def test_sigkill_while_storing_images(self):
        folder = os.path.realpath(self.mktemp())
        os.makedirs(folder)
        path = os.path.join(folder, "history.db")
        env = dict(os.environ, RUNAI_DB_KEY=KEY.reveal())
        server, port, log_path = start_twistd(self, "--db", path, env=env)
        kept = {}
        with BlockingClient("127.0.0.1", port, timeout=120) as client:
            for k in range(2):
                images = client.run(tiny_request(f"{PROMPT_MARKER} number {k}", seed=10 * k, n_samples=2))
                kept[k] = [image.png for image in images]
            # A read queues behind every earlier write: once it answers, both are on disk.
            client.send({"action": "history", "id": "h"})
            reply = client.receive()
            self.assertEqual([(i["status"], i["images"]) for i in reply["items"]], [("done", 2), ("done", 2)])
            # 128 images, written one by one while they come: kill it in the middle.
            client.send(tiny_request(f"{PROMPT_MARKER} in flight", seed=100, n_samples=8, n_iter=16))
            received = 0
            while received < 12:
                message = client.receive()
                self.assertNotIn("error", message)
                received += "image" in message
            os.kill(server.pid, signal.SIGKILL)
            self.assertEqual(server.wait(timeout=30), -signal.SIGKILL)

        conn = raw_connect(path)
        self.assertEqual(conn.execute("PRAGMA integrity_check").fetchall(), [("ok",)])
        rows = conn.execute("SELECT id, prompt, status FROM requests ORDER BY id").fetchall()
        self.assertEqual([r[2] for r in rows[:2]], ["done", "done"])
        self.assertEqual([r[1] for r in rows], [f"{PROMPT_MARKER} number 0", f"{PROMPT_MARKER} number 1",
                                                f"{PROMPT_MARKER} in flight"])
        self.assertEqual(rows[2][2], "queued")  # in flight when killed
        for k in range(2):
            stored = [bytes(r[0]) for r in conn.execute(
                "SELECT png FROM images WHERE request_id = ? ORDER BY idx", (k + 1,))]
            self.assertEqual(stored, kept[k])
        partial = conn.execute("SELECT png FROM images WHERE request_id = 3").fetchall()
        self.assertLessEqual(len(partial), 128)
        for (data,) in partial:  # every image that made it is whole
            Image.open(io.BytesIO(bytes(data))).verify()
        conn.close()

        with open(log_path) as f:
            log = f.read()
        self.assertIn("History database", log)
        for line in log.splitlines():  # prompts are logged at debug level only
            self.assertTrue(PROMPT_MARKER not in line or "#debug]" in line, line)
        self.assertNotIn(KEY.reveal(), log)

        # Nothing readable in the files the killed server left.
        for name in os.listdir(folder):
            with open(os.path.join(folder, name), "rb") as f:
                data = f.read()
            self.assertNotIn(PROMPT_MARKER.encode(), data, name)
            for png_bytes in kept[0] + kept[1]:
                middle = len(png_bytes) // 2
                self.assertNotIn(png_bytes[middle:middle + 32], data, name)
                self.assertNotIn(png_bytes[-64:], data, name)

        # The next start marks the interrupted request; the file is still sound.
        s = store.Store(path, KEY, SyncReactor(), pool=SyncPool())
        s.startService()
        items = self.successResultOf(s.history(10))
        self.assertEqual([i["status"] for i in items], ["interrupted", "done", "done"])
        s.stopService()
        conn = raw_connect(path)
        self.assertEqual(conn.execute("PRAGMA integrity_check").fetchall(), [("ok",)])
        conn.close()
