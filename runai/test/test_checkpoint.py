"""runai.models.checkpoint: header-only reads and the restricted unpickler (the static
pickle walk has its own tests, in test_pickle_walk)."""

import json
import os
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import torch
from twisted.trial.unittest import SynchronousTestCase

from runai.models import checkpoint
from runai.test.library_fixtures import counting_reads, write_header_only, write_lightning_ckpt


class Marker:
    """Unpickling this runs code: it creates the file ``path``."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').write('ran')",))


class SystemCall:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


class SafetensorsHeaderTests(SynchronousTestCase):
    def setUp(self):
        self.dir = Path(self.mktemp())
        self.dir.mkdir()

    def test_reads_names_dtypes_shapes_and_metadata(self):
        path = write_header_only(self.dir / "a.safetensors", {"x.weight": (2, 3), "y": (4,)}, dtype="F32",
                                 metadata={"modelspec.prediction_type": "v"})
        tensors, metadata = checkpoint.read_safetensors_header(path)
        self.assertEqual(tensors, {"x.weight": checkpoint.TensorInfo("F32", (2, 3)),
                                   "y": checkpoint.TensorInfo("F32", (4,))})
        self.assertEqual(metadata, {"modelspec.prediction_type": "v"})

    def test_agrees_with_safetensors(self):
        from safetensors.torch import save_file

        path = self.dir / "real.safetensors"
        save_file({"a": torch.zeros(3, 5, dtype=torch.float16), "b": torch.ones(7)}, str(path), {"k": "v"})
        shapes, metadata = checkpoint.tensor_shapes(path)
        self.assertEqual(shapes, {"a": (3, 5), "b": (7,)})
        self.assertEqual(metadata, {"k": "v"})

    def test_reads_only_the_header(self):
        # 4 GiB on paper (sparse on disk): the read must stop at the end of the header.
        path = write_header_only(self.dir / "big.safetensors", {"w": (32768, 32768)}, dtype="F32")
        self.assertGreaterEqual(path.stat().st_size, 4 * 2**30)
        with counting_reads() as counter:
            checkpoint.read_safetensors_header(path)
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
        self.assertEqual(counter.bytes, 8 + length)

    def assertRefused(self, data, words):
        path = self.dir / "bad.safetensors"
        path.write_bytes(data)
        with self.assertRaises(checkpoint.CheckpointError) as caught:
            checkpoint.read_safetensors_header(path)
        self.assertIn(words, caught.exception.message)

    def test_malformed_files(self):
        header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
        self.assertRefused(b"\x01\x02", "too short")
        self.assertRefused(struct.pack("<Q", 2**40) + b"{}", "cannot be right")
        self.assertRefused(struct.pack("<Q", 5) + b"{nope", "not JSON")
        self.assertRefused(struct.pack("<Q", 2) + b"[]", "not a JSON object")
        # The header promises 16 bytes of data; only 4 are there: a truncated download.
        self.assertRefused(struct.pack("<Q", len(header)) + header + b"\x00" * 4, "truncated")
        bad_shape = json.dumps({"w": {"dtype": "F32", "shape": ["x"], "data_offsets": [0, 0]}}).encode()
        self.assertRefused(struct.pack("<Q", len(bad_shape)) + bad_shape, "malformed")

    def test_missing_file(self):
        with self.assertRaises(checkpoint.CheckpointError):
            checkpoint.read_safetensors_header(self.dir / "nope.safetensors")


class RestrictedUnpicklerTests(SynchronousTestCase):
    def setUp(self):
        self.dir = Path(self.mktemp()).absolute()
        self.dir.mkdir()
        self.marker = self.dir / "marker"

    def evil_ckpt(self, payload, name="evil.ckpt", **kwargs):
        path = self.dir / name
        torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(2)}, "evil": payload}, str(path), **kwargs)
        return path

    def assertRefusedAndInert(self, path):
        with self.assertRaises(checkpoint.CheckpointError) as caught:
            checkpoint.load_state_dict(path)
        self.assertIn("refused to unpickle", caught.exception.message)
        self.assertFalse(self.marker.exists(), "the checkpoint's code ran")
        return caught.exception

    def test_code_in_a_ckpt_is_refused_and_does_not_run(self):
        error = self.assertRefusedAndInert(self.evil_ckpt(Marker(self.marker)))
        self.assertIn("exec", error.message)

    def test_system_call_is_refused(self):
        error = self.assertRefusedAndInert(self.evil_ckpt(SystemCall(self.marker)))
        # torch blocks the whole module; its message names the global: so does ours.
        self.assertIn(f"GLOBAL {os.system.__module__}.system whose module", error.message)
        self.assertNotIn("Check the documentation", error.message)

    def test_refused_global_is_named_without_torch_advice(self):
        error = self.assertRefusedAndInert(self.evil_ckpt(Marker(self.marker)))
        self.assertIn("GLOBAL exec was not an allowed global", error.message)
        for advice in ("Please use", "weights_only", "add_safe_globals"):
            self.assertNotIn(advice, error.message)

    def test_legacy_format_is_refused_too(self):
        path = self.evil_ckpt(Marker(self.marker), _use_new_zipfile_serialization=False)
        self.assertRefusedAndInert(path)

    def test_evil_under_any_suffix(self):
        # .pt/.pth/.bin go through the same gate.
        for suffix in (".pt", ".pth", ".bin"):
            self.assertRefusedAndInert(self.evil_ckpt(Marker(self.marker), name="evil" + suffix))

    def test_the_static_walk_runs_nothing(self):
        shapes = checkpoint.ckpt_tensor_shapes(self.evil_ckpt(Marker(self.marker)))
        self.assertEqual(shapes, {"model.diffusion_model.x": (2,)})
        self.assertFalse(self.marker.exists())

    def test_only_weights_only_loads(self):
        # Whatever path the loader takes, torch.load is only ever called weights-only.
        calls = []
        real_load = torch.load

        def spy(*args, **kwargs):
            calls.append(kwargs.get("weights_only"))
            return real_load(*args, **kwargs)

        self.patch(torch, "load", spy)
        with self.assertRaises(checkpoint.CheckpointError):
            checkpoint.load_state_dict(self.evil_ckpt(Marker(self.marker)))
        checkpoint.load_state_dict(write_lightning_ckpt(self.dir / "ok.ckpt", {"a": torch.ones(1)}))
        self.assertEqual(calls, [True, True])

    def test_stand_ins_are_removed_after_the_load(self):
        checkpoint.load_state_dict(write_lightning_ckpt(self.dir / "ok.ckpt", {"a": torch.ones(1)}))
        # Compared by content, not order: torch registers some globals of its own lazily.
        allowed = torch.serialization.get_safe_globals()
        for entry in checkpoint.STAND_INS:
            self.assertNotIn(entry, allowed)
            self.assertNotIn(entry[0], allowed)


class LightningCheckpointTests(SynchronousTestCase):
    """SD 1.x .ckpt files name a pytorch_lightning callback and numpy scalars."""

    def setUp(self):
        self.dir = Path(self.mktemp())
        self.dir.mkdir()
        self.state = {"model.diffusion_model.input_blocks.0.0.weight": torch.randn(8, 9, 3, 3),
                      "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.randn(4)}
        self.path = write_lightning_ckpt(self.dir / "sd.ckpt", self.state)

    def test_the_file_names_those_globals(self):
        with zipfile.ZipFile(self.path) as archive:
            data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
        for name in (b"pytorch_lightning.callbacks.model_checkpoint\nModelCheckpoint",
                     b"numpy.core.multiarray\nscalar", b"numpy\ndtype"):
            self.assertIn(name, data)

    def test_plain_weights_only_refuses_it(self):
        # Which is why the stand-ins exist.
        with self.assertRaises(pickle.UnpicklingError):
            torch.load(str(self.path), weights_only=True)

    def test_loads_with_stand_ins(self):
        loaded = checkpoint.load_state_dict(self.path)
        self.assertEqual(set(loaded), set(self.state))
        for key, tensor in self.state.items():
            self.assertTrue(torch.equal(loaded[key], tensor))

    def test_static_walk_finds_the_shapes(self):
        self.assertEqual(checkpoint.ckpt_tensor_shapes(self.path),
                         {k: tuple(v.shape) for k, v in self.state.items()})

    def test_stand_ins_keep_nothing(self):
        inert = checkpoint.ModelCheckpoint("anything", key="value")
        inert.__setstate__({"__class__": "evil", "dirpath": "/"})
        self.assertEqual(vars(inert), {})
        self.assertIsInstance(checkpoint.numpy_scalar(np.dtype("f8"), b"x" * 8), checkpoint.NumpyScalar)


class SDXLCheckpointTests(SynchronousTestCase):
    """An SDXL .ckpt (the weights under "state_dict", as torch.save writes them, or as
    pytorch_lightning does) goes through the same two ways in: the static walk for its
    shapes, the weights-only unpickler for its tensors."""

    def setUp(self):
        from runai.test import xl_fixtures

        self.dir = Path(self.mktemp())
        self.dir.mkdir()
        self.state = xl_fixtures.xl_state("base")
        self.paths = [xl_fixtures.write_ckpt(self.dir / "xl.ckpt", self.state),
                      write_lightning_ckpt(self.dir / "xl-lightning.ckpt", self.state)]

    def test_static_walk_and_weights_only_load(self):
        from runai.models.classify import classify_state

        for path in self.paths:
            shapes = checkpoint.ckpt_tensor_shapes(path)
            self.assertEqual(shapes, {k: tuple(v.shape) for k, v in self.state.items()}, path.name)
            self.assertEqual(classify_state(shapes).version, "sdxl")
            loaded = checkpoint.load_state_dict(path)
            self.assertEqual(set(loaded), set(self.state))
            self.assertEqual([k for k, v in self.state.items() if not torch.equal(loaded[k], v)], [])

    def test_half_precision(self):
        half = {k: v.half() for k, v in self.state.items()}
        path = write_lightning_ckpt(self.dir / "half.ckpt", half)
        self.assertEqual({v.dtype for v in checkpoint.load_state_dict(path).values()}, {torch.float16})
