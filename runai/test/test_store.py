"""The encrypted store: keys, schema and migrations, what reaches the disk, threads,
and a real server killed while it writes.

Every test opens real SQLCipher files in its own temporary folder. The store's pool is
swapped for a synchronous one (the reactor for one whose callFromThread runs at once),
so most tests run its thread's work in line; one test runs the real thread.
"""

import hashlib
import io
import json
import os
import re
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time

from PIL import Image
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.logger import Logger, LogLevel
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

from runai import tap
from runai.core import errors
from runai.history import store
from runai.client import BlockingClient
from runai.core.images import EncodedImage
from runai.core.requests import GenerationRequest
from runai.test.support import FakeImage, ManualPool, SyncPool, SyncReactor

KEY = store.Key("correct horse battery staple")
PROMPT_MARKER = "zebra-lighthouse-7f3a9c"


def request(prompt="a lighthouse", seed=42, rid="job-1", **extra):
    fields = dict(action="txt2img", model_path="/home/me/stablediffusion/v1/tiny", model_name="v1/tiny",
                  prompt=prompt, negative_prompt="fog", steps=3, seed=seed, width=64, height=64, id=rid)
    fields.update(extra)
    return GenerationRequest(**fields)


def png(seed, size=64):
    """A real PNG of noise (so that it does not compress away)."""
    data = hashlib.sha256(str(seed).encode()).digest() * (size * size * 3 // 32 + 1)
    out = io.BytesIO()
    Image.frombytes("RGB", (size, size), data[:size * size * 3]).save(out, "PNG")
    return out.getvalue()


def digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def files_state(folder):
    return {name: digest(os.path.join(folder, name)) for name in sorted(os.listdir(folder))}


def raw_connect(path, key=KEY):
    """A plain SQLCipher connection, outside runai's code paths."""
    from sqlcipher3 import dbapi2
    conn = dbapi2.connect(path, isolation_level=None)
    conn.execute("PRAGMA cipher_log_level = NONE")
    conn.execute("PRAGMA key = '{}'".format(key.reveal().replace("'", "''")))
    return conn


class StoreTestCase(SynchronousTestCase):
    def setUp(self):
        self.folder = os.path.realpath(self.mktemp())
        os.makedirs(self.folder)
        self.path = os.path.join(self.folder, "history.db")
        self.clock = [1_700_000_000.0]

    def now(self):
        self.clock[0] += 1
        return self.clock[0]

    def open_store(self, pool=None, key=KEY, **kwargs):
        s = store.Store(self.path, key, SyncReactor(), pool=pool or SyncPool(), now=self.now, **kwargs)
        s.start()
        self.addCleanup(s.stop)
        return s

    def result(self, d):
        return self.successResultOf(d)

    def record_done(self, s, req, seeds, pngs=None):
        record = s.begin(req)
        for index, seed in enumerate(seeds):
            s.add_image(record, FakeImage(pngs[index] if pngs else png(seed), seed, 64, 64, index))
        s.finish(record, "done", seconds=1.5)
        return record


class KeyTests(StoreTestCase):
    def write(self, data):
        name = os.path.join(self.folder, "key")
        with open(name, "wb") as f:
            f.write(data)
        return name

    def test_key_file_one_trailing_newline_stripped(self):
        self.assertEqual(store.load_key(self.write(b"s3cret\n")).reveal(), "s3cret")
        self.assertEqual(store.load_key(self.write(b"s3cret\r\n")).reveal(), "s3cret")
        self.assertEqual(store.load_key(self.write(b" s3 cret \n\n")).reveal(), " s3 cret \n")
        self.assertEqual(store.load_key(self.write("clé ünï".encode())).reveal(), "clé ünï")

    def test_bad_key_files(self):
        for data, words in ((b"", "empty"), (b"\n", "empty"), (b"\xff\xfe", "UTF-8"), (b"a\x00b", "NUL"),
                            (b"k" * (store.MAX_KEY_BYTES + 1), "larger")):
            with self.assertRaises(store.StoreError) as e:
                store.load_key(self.write(data))
            self.assertIn(words, str(e.exception))
        with self.assertRaises(store.StoreError) as e:
            store.load_key(os.path.join(self.folder, "missing"))
        self.assertIn("cannot read the key file", str(e.exception))

    def test_environment_and_precedence(self):
        self.assertEqual(store.load_key(None, {"RUNAI_DB_KEY": "from-env"}).reveal(), "from-env")
        self.assertEqual(store.load_key(self.write(b"from-file"), {"RUNAI_DB_KEY": "from-env"}).reveal(), "from-file")
        with self.assertRaises(store.StoreError) as e:
            store.load_key(None, {})
        self.assertIn("--db-key-file", str(e.exception))
        self.assertIn("RUNAI_DB_KEY", str(e.exception))
        self.assertRaises(store.StoreError, store.load_key, None, {"RUNAI_DB_KEY": ""})

    def test_key_never_shown(self):
        key = store.Key("hunter2-very-secret")
        self.assertNotIn("hunter2", repr(key) + str(key) + repr({"db-key": key}))

    def parse(self, *args, env=None):
        self.patch(os, "environ", dict(env or {}))
        options = tap.Options()
        options.parseOptions(list(args))
        return options

    def test_options(self):
        options = self.parse("--db", self.path, env={"RUNAI_DB_KEY": "k"})
        self.assertEqual((options["db"], options["db-key"].reveal()), (self.path, "k"))
        options = self.parse("--db", self.path, "--db-key-file", self.write(b"filekey\n"))
        self.assertEqual(options["db-key"].reveal(), "filekey")
        self.assertIsNone(self.parse()["db-key"])
        # Parsing opens no database and writes nothing.
        self.assertFalse(os.path.exists(self.path))

    def test_option_errors_are_usage_errors(self):
        key_file = self.write(b"k")
        for args, env, words in (
            (["--db", self.path], {}, "needs a key"),
            (["--db-key-file", key_file], {"RUNAI_DB_KEY": "k"}, "needs --db"),
            (["--db", self.folder], {"RUNAI_DB_KEY": "k"}, "is a folder"),
            (["--db", os.path.join(self.folder, "no", "such.db")], {"RUNAI_DB_KEY": "k"}, "does not exist"),
            (["--db", self.path, "--db-key-file", key_file + "-missing"], {}, "cannot read"),
        ):
            with self.assertRaises(usage.UsageError) as e:
                self.parse(*args, env=env)
            self.assertIn(words, str(e.exception))

    def test_no_key_option_on_the_command_line(self):
        self.assertRaises(usage.UsageError, self.parse, "--db", self.path, "--db-key", "k",
                          env={"RUNAI_DB_KEY": "k"})


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
        s.stop()
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
        s.stop()
        conn = raw_connect(self.path)
        self.assertEqual(conn.execute("SELECT count(*) FROM images").fetchone(), (0,))
        conn.close()

    def test_requests_in_flight_are_marked_interrupted_at_the_next_start(self):
        s = self.open_store()
        self.record_done(s, request(seed=1), [1])
        record = s.begin(request(seed=2))
        s.add_image(record, FakeImage(png(2), 2, 64, 64, 0))
        s.stop()
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
        self.assertEqual(conn.execute("PRAGMA user_version").fetchone()[0], store.SCHEMA_VERSION)
        self.assertEqual(conn.execute("PRAGMA application_id").fetchone()[0], store.APPLICATION_ID)
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
        s.stop()
        check("closed")

    def test_persists_across_restarts(self):
        s = self.open_store()
        self.record_done(s, request(PROMPT_MARKER), [3], [png(3)])
        s.stop()
        s = self.open_store()
        [item] = self.result(s.history(1))
        self.assertEqual(item["prompt"], PROMPT_MARKER)
        [meta] = self.result(s.get(item["request_id"]))["image_list"]
        self.assertEqual(self.result(s.image(meta["image_id"])), png(3))


class RefusalTests(StoreTestCase):
    """Wrong key, foreign files, newer schemas: refused before anything is written."""

    def make_database(self):
        s = self.open_store()
        self.record_done(s, request(), [1])
        s.stop()

    def assertRefused(self, words, key=KEY):
        before = files_state(self.folder)
        with self.assertRaises(store.StoreError) as e:
            store.check(self.path, key)
        self.assertIn(words, str(e.exception))
        self.assertIn("left as it was", str(e.exception))
        self.assertEqual(files_state(self.folder), before)
        return str(e.exception)

    def test_wrong_key(self):
        self.make_database()
        message = self.assertRefused("wrong key", store.Key("incorrect horse"))
        self.assertNotIn("incorrect horse", message)
        self.assertEqual(store.check(self.path, KEY), 1)

    def test_wrong_key_after_a_crash_leaves_the_wal_alone(self):
        # A snapshot of the files while a connection has uncheckpointed writes: what a
        # killed server leaves. A read-write connection would fold the WAL in on close.
        s = self.open_store()
        self.record_done(s, request(), [1])
        crashed = os.path.join(self.folder, "crashed")
        os.makedirs(crashed)
        for suffix in ("", "-wal", "-shm"):
            shutil.copy(self.path + suffix, os.path.join(crashed, "history.db" + suffix))
        s.stop()
        self.folder, self.path = crashed, os.path.join(crashed, "history.db")
        self.assertGreater(os.path.getsize(self.path + "-wal"), 0)
        before = {name: digest(os.path.join(crashed, name)) for name in ("history.db", "history.db-wal")}
        with self.assertRaises(store.StoreError):
            store.check(self.path, store.Key("incorrect horse"))
        after = {name: digest(os.path.join(crashed, name)) for name in ("history.db", "history.db-wal")}
        self.assertEqual(after, before)
        self.assertEqual(store.check(self.path, KEY), 1)

    def test_not_a_database(self):
        with open(self.path, "wb") as f:
            f.write(os.urandom(8192))
        self.assertRefused("wrong key, or not a runai database")

    def test_plain_sqlite_file(self):
        conn = sqlite3.connect(self.path)
        conn.execute("CREATE TABLE t (x)")
        conn.commit()
        conn.close()
        self.assertRefused("not a runai database")

    def test_another_programs_sqlcipher_file(self):
        conn = raw_connect(self.path)
        conn.execute("CREATE TABLE notes (x)")
        conn.close()
        self.assertRefused("not a runai one")

    def test_newer_schema(self):
        self.make_database()
        conn = raw_connect(self.path)
        conn.execute(f"PRAGMA user_version = {store.SCHEMA_VERSION + 1}")
        conn.close()
        self.assertRefused("newer runai")

    def test_not_a_regular_file(self):
        os.makedirs(self.path)
        self.assertRaises(store.StoreError, store.check, self.path, KEY)

    def test_twistd_refuses_the_wrong_key_without_a_traceback(self):
        self.make_database()
        before = files_state(self.folder)
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        env = dict(os.environ, RUNAI_DB_KEY="incorrect horse")
        out = subprocess.run(
            [twistd, "--nodaemon", "--pidfile=", "--logfile=-", "runai", "--port", "0",
             "--model-dir", self.folder, "--device", "cpu", "--db", self.path],
            capture_output=True, text=True, timeout=60, env=env, cwd=self.folder,
        )
        self.assertNotEqual(out.returncode, 0)
        self.assertIn("wrong key", out.stderr)
        self.assertNotIn("Traceback", out.stdout + out.stderr)
        self.assertNotIn("incorrect horse", out.stdout + out.stderr)
        self.assertNotIn("listening", out.stdout)
        self.assertEqual(files_state(self.folder), before)


class MigrationTests(StoreTestCase):
    def test_new_file_gets_the_current_schema(self):
        self.assertEqual(store.check(self.path, KEY), 0)
        conn = raw_connect(self.path)
        self.assertEqual(conn.execute("PRAGMA user_version").fetchone()[0], store.SCHEMA_VERSION)
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        self.assertTrue({"requests", "images"} <= tables)
        conn.close()

    def test_later_migrations_apply_in_order_and_keep_the_data(self):
        s = self.open_store()
        self.record_done(s, request(PROMPT_MARKER), [1])
        s.stop()

        def backfill(conn):
            conn.execute("UPDATE requests SET note = 'from v2'")
        migrations = store.MIGRATIONS + (("ALTER TABLE requests ADD COLUMN note TEXT",), backfill)
        conn = store.open_database(self.path, KEY, migrations)
        self.assertEqual(conn.execute("PRAGMA user_version").fetchone()[0], store.SCHEMA_VERSION + 2)
        self.assertEqual(conn.execute("SELECT prompt, note FROM requests").fetchall(), [(PROMPT_MARKER, "from v2")])
        conn.close()
        store.open_database(self.path, KEY, migrations).close()  # nothing left to do
        # This runai does not know version 3: it refuses rather than guess.
        self.assertRaises(store.StoreError, store.check, self.path, KEY)

    def test_a_failed_migration_is_rolled_back(self):
        store.check(self.path, KEY)
        migrations = store.MIGRATIONS + (("CREATE TABLE extra (x)", "THIS IS NOT SQL"),)
        self.assertRaises(store.StoreError, store.open_database, self.path, KEY, migrations)
        conn = raw_connect(self.path)
        self.assertEqual(conn.execute("PRAGMA user_version").fetchone()[0], store.SCHEMA_VERSION)
        self.assertEqual(conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'extra'").fetchone(), (0,))
        conn.close()


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
        s.stop()
        s.add_image(record, FakeImage(png(1), 1, 64, 64, 0))
        s.finish(record, "done")
        self.failureResultOf(s.history(1), store.StoreError)

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
        s.start()
        self.addCleanup(s.stop)
        record = s.begin(request())
        s.add_image(record, FakeImage(png(1), 1, 64, 64, 0))
        s.finish(record, "done", seconds=0.1)
        [item] = yield s.history(5)
        self.assertEqual((item["status"], item["images"]), ("done", 1))
        self.assertEqual(len(threads), 5)  # open, request, image, finish, history
        self.assertEqual(len(set(threads)), 1)
        self.assertIsNot(threads[0], threading.main_thread())
        self.assertIn("runai-store", threads[0].name)


# A real server, killed mid-write ---------------------------------------------------------

def tiny_models():
    """The tiny model folder shared by the end-to-end tests (read only)."""
    from runai.test.test_e2e import tiny_model_dir
    return tiny_model_dir()


def start_twistd(testcase, *args, env=None, cwd=None, stderr=None):
    """``twistd runai`` on a free port; returns (process, port, log file). Logs go to a
    file so that a chatty server never blocks on a full pipe."""
    logs = os.path.realpath(testcase.mktemp())
    os.makedirs(logs)
    log_path = os.path.join(logs, "server.log")
    log = open(log_path, "w")
    testcase.addCleanup(log.close)
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    server = subprocess.Popen(
        [twistd, "--nodaemon", "--pidfile=", "--logfile=-", "runai", "--port", "0",
         "--model-dir", tiny_models(), "--device", "cpu", *args],
        cwd=cwd or logs, env=env, stdout=log, stderr=stderr or subprocess.STDOUT,
    )
    testcase.addCleanup(lambda: server.poll() is None and server.kill())
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and server.poll() is None:
        with open(log_path) as f:
            found = re.search(r"runai listening on 127\.0\.0\.1:(\d+)", f.read())
        if found:
            return server, int(found.group(1)), log_path
        time.sleep(0.05)
    with open(log_path) as f:
        testcase.fail(f"the server did not start:\n{f.read()}")


def tiny_request(prompt, seed, n_samples=1, n_iter=1, rid=None):
    from runai.client import txt2img_request
    return txt2img_request(prompt, "v1/tiny", request_id=rid, steps=1, seed=seed, width=64, height=64,
                           n_samples=n_samples, n_iter=n_iter)


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
        s.start()
        items = self.successResultOf(s.history(10))
        self.assertEqual([i["status"] for i in items], ["interrupted", "done", "done"])
        s.stop()
        conn = raw_connect(path)
        self.assertEqual(conn.execute("PRAGMA integrity_check").fetchall(), [("ok",)])
        conn.close()
