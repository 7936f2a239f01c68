"""runai.models.atomic: a new model appears whole or not at all, and never over anything."""

import os
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from runai.models import atomic
from runai.models.errors import ConvertError


class MoveIntoPlaceTests(SynchronousTestCase):
    """Something that appears at the destination between the check and the rename is
    never replaced."""

    def setUp(self):
        self.dir = Path(self.mktemp()).absolute()
        self.dir.mkdir()

    def appears_after_the_check(self, make):
        real = atomic.check_free

        def check_free(dst, shown):
            real(dst, shown)
            make(Path(dst))

        self.patch(atomic, "check_free", check_free)

    def write_folder(self, temporary):
        temporary.mkdir()
        (temporary / "model_index.json").write_text("{}")

    def test_a_folder_created_meanwhile(self):
        dst = self.dir / "m"
        self.appears_after_the_check(lambda path: path.mkdir())
        with self.assertRaises(ConvertError) as caught:
            atomic.write_then_rename(dst, "v1/m", self.write_folder)
        self.assertIn("already exists", caught.exception.message)
        self.assertEqual(os.listdir(self.dir), ["m"])
        self.assertEqual(os.listdir(dst), [])

    def test_a_file_created_meanwhile(self):
        dst = self.dir / "m.safetensors"
        self.appears_after_the_check(lambda path: path.write_bytes(b"theirs"))
        with self.assertRaises(ConvertError):
            atomic.write_then_rename(dst, "m.safetensors", lambda temporary: temporary.write_bytes(b"ours"))
        self.assertEqual(os.listdir(self.dir), ["m.safetensors"])
        self.assertEqual(dst.read_bytes(), b"theirs")

    def test_without_hard_links(self):
        def no_link(*args, **kwargs):
            raise PermissionError(1, "Operation not permitted")

        self.patch(os, "link", no_link)
        dst = self.dir / "a.safetensors"
        atomic.write_then_rename(dst, "a.safetensors", lambda temporary: temporary.write_bytes(b"ours"))
        self.assertEqual((os.listdir(self.dir), dst.read_bytes()), (["a.safetensors"], b"ours"))
        dst = self.dir / "b.safetensors"
        self.appears_after_the_check(lambda path: path.write_bytes(b"theirs"))
        with self.assertRaises(ConvertError):
            atomic.write_then_rename(dst, "b.safetensors", lambda temporary: temporary.write_bytes(b"ours"))
        self.assertEqual(dst.read_bytes(), b"theirs")
        self.assertEqual(sorted(os.listdir(self.dir)), ["a.safetensors", "b.safetensors"])

    def test_in_place_when_free(self):
        atomic.write_then_rename(self.dir / "m", "m", self.write_folder)
        atomic.write_then_rename(self.dir / "f.safetensors", "f", lambda temporary: temporary.write_bytes(b"x"))
        self.assertEqual(sorted(os.listdir(self.dir)), ["f.safetensors", "m"])
        self.assertEqual(os.listdir(self.dir / "m"), ["model_index.json"])
