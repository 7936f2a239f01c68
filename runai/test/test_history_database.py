"""Tests for runai.history.database: opening a file (refusing a wrong key, a foreign file
or a newer schema before anything is written), and the schema's migrations."""

import os
import shutil
import sqlite3
import subprocess
import sys

from runai.history import database
from runai.history.key import Key
from runai.test.store_fixtures import KEY, PROMPT_MARKER, StoreTestCase, digest, files_state, raw_connect, request



class RefusalTests(StoreTestCase):
    """Wrong key, foreign files, newer schemas: refused before anything is written."""

    def make_database(self):
        s = self.open_store()
        self.record_done(s, request(), [1])
        s.stopService()

    def assertRefused(self, words, key=KEY):
        before = files_state(self.folder)
        with self.assertRaises(database.StoreError) as e:
            database.check(self.path, key)
        self.assertIn(words, str(e.exception))
        self.assertIn("left as it was", str(e.exception))
        self.assertEqual(files_state(self.folder), before)
        return str(e.exception)

    def test_wrong_key(self):
        self.make_database()
        message = self.assertRefused("wrong key", Key("incorrect horse"))
        self.assertNotIn("incorrect horse", message)
        self.assertEqual(database.check(self.path, KEY), 1)

    def test_wrong_key_after_a_crash_leaves_the_wal_alone(self):
        # A snapshot of the files while a connection has uncheckpointed writes: what a
        # killed server leaves. A read-write connection would fold the WAL in on close.
        s = self.open_store()
        self.record_done(s, request(), [1])
        crashed = os.path.join(self.folder, "crashed")
        os.makedirs(crashed)
        for suffix in ("", "-wal", "-shm"):
            shutil.copy(self.path + suffix, os.path.join(crashed, "history.db" + suffix))
        s.stopService()
        self.folder, self.path = crashed, os.path.join(crashed, "history.db")
        self.assertGreater(os.path.getsize(self.path + "-wal"), 0)
        before = {name: digest(os.path.join(crashed, name)) for name in ("history.db", "history.db-wal")}
        with self.assertRaises(database.StoreError):
            database.check(self.path, Key("incorrect horse"))
        after = {name: digest(os.path.join(crashed, name)) for name in ("history.db", "history.db-wal")}
        self.assertEqual(after, before)
        self.assertEqual(database.check(self.path, KEY), 1)

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
        conn.execute(f"PRAGMA user_version = {database.SCHEMA_VERSION + 1}")
        conn.close()
        self.assertRefused("newer runai")

    def test_not_a_regular_file(self):
        os.makedirs(self.path)
        self.assertRaises(database.StoreError, database.check, self.path, KEY)

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
        self.assertEqual(database.check(self.path, KEY), 0)
        conn = raw_connect(self.path)
        self.assertEqual(conn.execute("PRAGMA user_version").fetchone()[0], database.SCHEMA_VERSION)
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        self.assertTrue({"requests", "images"} <= tables)
        conn.close()

    def test_later_migrations_apply_in_order_and_keep_the_data(self):
        s = self.open_store()
        self.record_done(s, request(PROMPT_MARKER), [1])
        s.stopService()

        def backfill(conn):
            conn.execute("UPDATE requests SET note = 'from v2'")
        migrations = database.MIGRATIONS + (("ALTER TABLE requests ADD COLUMN note TEXT",), backfill)
        conn = database.open_database(self.path, KEY, migrations)
        self.assertEqual(conn.execute("PRAGMA user_version").fetchone()[0], database.SCHEMA_VERSION + 2)
        self.assertEqual(conn.execute("SELECT prompt, note FROM requests").fetchall(), [(PROMPT_MARKER, "from v2")])
        conn.close()
        database.open_database(self.path, KEY, migrations).close()  # nothing left to do
        # This runai does not know version 3: it refuses rather than guess.
        self.assertRaises(database.StoreError, database.check, self.path, KEY)

    def test_a_failed_migration_is_rolled_back(self):
        database.check(self.path, KEY)
        migrations = database.MIGRATIONS + (("CREATE TABLE extra (x)", "THIS IS NOT SQL"),)
        self.assertRaises(database.StoreError, database.open_database, self.path, KEY, migrations)
        conn = raw_connect(self.path)
        self.assertEqual(conn.execute("PRAGMA user_version").fetchone()[0], database.SCHEMA_VERSION)
        self.assertEqual(conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'extra'").fetchone(), (0,))
        conn.close()
