"""runai.models.pickle_walk: the names and shapes in a .ckpt, read without unpickling it."""

import io
import pickle
import struct
import zipfile
from pathlib import Path

import torch
from twisted.trial.unittest import SynchronousTestCase

from runai.models import pickle_walk
from runai.models.errors import CheckpointError
from runai.test.test_checkpoint import Marker


class StaticWalkTests(SynchronousTestCase):
    def setUp(self):
        self.dir = Path(self.mktemp())
        self.dir.mkdir()

    def test_nested_state_dict_and_parameters(self):
        path = self.dir / "p.ckpt"
        torch.save({"state_dict": {"state_dict": {"a": torch.nn.Parameter(torch.zeros(3, 4)), "n": 5}}}, str(path))
        self.assertEqual(pickle_walk.ckpt_tensor_shapes(path), {"a": (3, 4)})

    def test_plain_state_dict(self):
        path = self.dir / "plain.pt"
        torch.save(torch.nn.Linear(3, 2).state_dict(), str(path))
        self.assertEqual(pickle_walk.ckpt_tensor_shapes(path), {"weight": (2, 3), "bias": (2,)})

    def test_legacy_format(self):
        path = self.dir / "legacy.ckpt"
        torch.save({"w": torch.zeros(5, 6)}, str(path), _use_new_zipfile_serialization=False)
        self.assertEqual(pickle_walk.ckpt_tensor_shapes(path), {"w": (5, 6)})

    def test_not_a_checkpoint(self):
        for data in (b"", b"garbage" * 10, b"PK\x03\x04broken zip"):
            path = self.dir / "x.ckpt"
            path.write_bytes(data)
            with self.assertRaises(CheckpointError):
                pickle_walk.ckpt_tensor_shapes(path)

    def test_lengths_the_file_cannot_hold_are_refused_unread(self):
        # A legacy (non-zip) pickle declares its own lengths: 13 bytes may declare 32 TB.
        for name, data in (
            ("bytes8.ckpt", b"\x80\x04\x8e" + struct.pack("<Q", 2**45) + b"\x00\x00"),
            ("unicode8.ckpt", b"\x80\x04\x8d" + struct.pack("<Q", 2**40) + b"abc"),
            ("bytes4.ckpt", b"\x80\x03B" + struct.pack("<I", 2**31) + b"abc"),
        ):
            path = self.dir / name
            path.write_bytes(data)
            with self.assertRaises(CheckpointError) as caught:
                pickle_walk.ckpt_tensor_shapes(path)
            self.assertIn("malformed pickle", caught.exception.message, name)

    def test_a_line_is_read_within_bounds(self):
        # Text opcodes read up to a newline: one that never comes is not read whole.
        path = self.dir / "line.ckpt"
        path.write_bytes(b"S'" + b"x" * 4096)
        self.patch(pickle_walk, "MAX_PICKLE_BYTES", 1024)
        with open(path, "rb") as f:
            reader = pickle_walk._BoundedReader(f)
            self.assertEqual((len(reader.read(1)), len(reader.readline())), (1, 1023))
        with self.assertRaises(CheckpointError):
            pickle_walk.ckpt_tensor_shapes(path)

    def test_zip_without_pickle(self):
        path = self.dir / "z.ckpt"
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("archive/readme.txt", "hi")
        with self.assertRaises(CheckpointError) as caught:
            pickle_walk.ckpt_tensor_shapes(path)
        self.assertIn("data.pkl", caught.exception.message)

    def test_pickle_that_is_not_a_dict(self):
        path = self.dir / "list.ckpt"
        torch.save([torch.zeros(1)], str(path))
        with self.assertRaises(CheckpointError):
            pickle_walk.ckpt_tensor_shapes(path)

    def test_walk_of_hostile_opcodes(self):
        # Any pickle at all: the walk builds stubs, never the objects.
        data = pickle.dumps({"x": Marker(self.dir / "m"), "y": [1, (2, 3)], "z": {frozenset([1])}}, protocol=4)
        result = pickle_walk.walk(io.BytesIO(data))
        self.assertIsInstance(result, dict)
        self.assertFalse((self.dir / "m").exists())
