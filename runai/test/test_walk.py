"""runai.models.walk: the one bounded walk of the model folder, as the library, the LoRA,
embedding and upscaler indexes ask for it. Torch-free: empty files stand for models."""

import os
from pathlib import Path

from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from runai.models import walk


def touch(path, text=""):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


class ModelFilesTests(SynchronousTestCase):
    def setUp(self):
        base = Path(os.path.realpath(self.mktemp()))
        self.root = base / "models"
        self.outside = base / "outside"
        root = self.root
        touch(root / "a.safetensors")
        touch(root / "sub" / "b.PTH")
        touch(root / "sub" / "notes.txt")
        touch(root / ".cache" / "hidden.safetensors")
        touch(root / ".half.safetensors")
        touch(root / "pipe" / "model_index.json", "{}")
        touch(root / "pipe" / "unet" / "inner.safetensors")
        touch(root / "clip" / "config.json", "{}")
        touch(root / "clip" / "model.safetensors")
        touch(self.outside / "model_index.json", "{}")
        touch(self.outside / "far.safetensors")
        os.symlink(root / "pipe", root / "linked-pipe")
        os.symlink(root / "sub", root / "linked-sub")
        os.symlink(self.outside, root / "escape")
        os.symlink(self.outside / "far.safetensors", root / "far.safetensors")
        os.symlink(root / "a.safetensors", root / "sub" / "again.safetensors")
        os.symlink(root, root / "sub" / "loop")
        # Eight levels are walked: a file in the eighth is found, one in the ninth is not;
        # a diffusers folder in the eighth is reported all the same, as it is not entered.
        deep = root.joinpath(*[f"l{i}" for i in range(1, walk.MAX_DEPTH + 1)])
        touch(deep / "deepest.safetensors")
        touch(deep / "l9" / "too-deep.safetensors")
        touch(deep / "deep-pipe" / "model_index.json", "{}")
        self.deep = deep

    def names(self, found):
        return sorted(path.relative_to(self.root).as_posix() for path, _ in found)

    def test_files(self):
        found, folders = walk.model_files(self.root, (".safetensors", ".pth"))
        deep = self.deep.relative_to(self.root).as_posix()
        self.assertEqual(self.names(found), sorted([
            "a.safetensors", "sub/b.PTH", "sub/again.safetensors", f"{deep}/deepest.safetensors"]))
        resolved = dict((path.name, r) for path, r in found)
        self.assertEqual(resolved["again.safetensors"], self.root / "a.safetensors")
        for path, r in found:
            self.assertTrue(r.is_relative_to(self.root), r)
        # Folders walked: the root, sub, l1..l8; never a diffusers, component, hidden or linked one.
        self.assertEqual(len(folders), 2 + walk.MAX_DEPTH)
        self.assertIn(str(self.deep), folders)
        self.assertFalse(any("pipe" in f or "clip" in f or ".cache" in f or "linked" in f for f in folders))

    def test_diffusers_folders_when_asked(self):
        found, _ = walk.model_files(self.root, (".safetensors",), diffusers=True)
        deep = self.deep.relative_to(self.root).as_posix()
        self.assertEqual(self.names(found), sorted([
            "a.safetensors", "sub/again.safetensors", f"{deep}/deepest.safetensors", "pipe", "linked-pipe",
            f"{deep}/deep-pipe"]))
        self.assertEqual(dict((p.name, r) for p, r in found)["linked-pipe"], self.root / "pipe")
        self.assertEqual(self.names(walk.model_files(self.root, (), diffusers=True)[0]),
                         sorted(["pipe", "linked-pipe", f"{deep}/deep-pipe"]))

    def test_entries_are_bounded(self):
        events = []

        def observe(event):
            if event.get("log_level") == LogLevel.warn:
                events.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        self.patch(walk, "MAX_ENTRIES", 3)
        found, _ = walk.model_files(self.root, (".safetensors", ".pth"), diffusers=True)
        self.assertLessEqual(len(found), 3)
        self.assertTrue(any(e.get("n") == 3 for e in events), events)

    def test_changed(self):
        _, folders = walk.model_files(self.root, (".safetensors",))
        self.assertFalse(walk.changed(folders))
        os.utime(self.root / "sub", ns=(1, 1))
        self.assertTrue(walk.changed(folders))
