"""Tests for runai.history.key: where the history's key comes from, and ``--db`` and
``--db-key-file`` as ``twistd runai`` parses them."""

import os


from runai import tap
from runai.options import OptionError
from runai.history import key
from runai.history.database import StoreError
from runai.test.store_fixtures import StoreTestCase


class KeyTests(StoreTestCase):
    def write(self, data):
        name = os.path.join(self.folder, "key")
        with open(name, "wb") as f:
            f.write(data)
        return name

    def test_key_file_one_trailing_newline_stripped(self):
        self.assertEqual(key.load_key(self.write(b"s3cret\n")).reveal(), "s3cret")
        self.assertEqual(key.load_key(self.write(b"s3cret\r\n")).reveal(), "s3cret")
        self.assertEqual(key.load_key(self.write(b" s3 cret \n\n")).reveal(), " s3 cret \n")
        self.assertEqual(key.load_key(self.write("clé ünï".encode())).reveal(), "clé ünï")

    def test_bad_key_files(self):
        for data, words in ((b"", "empty"), (b"\n", "empty"), (b"\xff\xfe", "UTF-8"), (b"a\x00b", "NUL"),
                            (b"k" * (key.MAX_KEY_BYTES + 1), "larger")):
            with self.assertRaises(StoreError) as e:
                key.load_key(self.write(data))
            self.assertIn(words, str(e.exception))
        with self.assertRaises(StoreError) as e:
            key.load_key(os.path.join(self.folder, "missing"))
        self.assertIn("cannot read the key file", str(e.exception))

    def test_environment_and_precedence(self):
        self.assertEqual(key.load_key(None, {"RUNAI_DB_KEY": "from-env"}).reveal(), "from-env")
        self.assertEqual(key.load_key(self.write(b"from-file"), {"RUNAI_DB_KEY": "from-env"}).reveal(), "from-file")
        with self.assertRaises(StoreError) as e:
            key.load_key(None, {})
        self.assertIn("--db-key-file", str(e.exception))
        self.assertIn("RUNAI_DB_KEY", str(e.exception))
        self.assertRaises(StoreError, key.load_key, None, {"RUNAI_DB_KEY": ""})

    def test_key_never_shown(self):
        hidden = key.Key("hunter2-very-secret")
        self.assertNotIn("hunter2", repr(hidden) + str(hidden) + repr({"db-key": hidden}))

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
            with self.assertRaises(OptionError) as e:
                self.parse(*args, env=env)
            self.assertIn(words, str(e.exception))

    def test_no_key_option_on_the_command_line(self):
        self.assertRaises(OptionError, self.parse, "--db", self.path, "--db-key", "k",
                          env={"RUNAI_DB_KEY": "k"})
