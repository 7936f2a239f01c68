"""runai.models.library: discovery of the models in the model folder, their entries and the
cache of classifications, and the ``models`` action."""

import json
import os
import shutil
import struct
from pathlib import Path

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from runai.models import checkpoint
from runai.core import errors
from runai.models import library
from runai.backends.local import LocalWorker
from runai.doors.legacy import replies
from runai.test import library_fixtures as fx
from runai.test.support import ManualPool, ScriptedEngine, SyncReactor, decode_all, frame, make_server


class ScanTests(SynchronousTestCase):
    def setUp(self):
        self.models = fx.model_folder()
        self.library = library.ModelLibrary(self.models)

    def test_the_list_is_right(self):
        entries = {e.name: e for e in self.library.scan()}
        self.assertEqual(sorted(entries), sorted(fx.EXPECTED))
        for name, (version, fmt, inpainting, prediction, served) in fx.EXPECTED.items():
            wire = replies.model(entries[name])
            self.assertEqual(
                (wire["version"], wire["format"], wire["inpainting"], wire["prediction_type"], wire["served"]),
                (version, fmt, inpainting, prediction, served), name,
            )
            self.assertGreater(wire["size"], 0, name)
            self.assertFalse(wire["loaded"])

    def test_sizes(self):
        entries = {e.name: e for e in self.library.scan()}
        path = self.models / "v1" / "both.safetensors"
        self.assertEqual(entries["v1/both.safetensors"].size, path.stat().st_size)
        total = sum(p.stat().st_size for p in (self.models / "v1" / "both").rglob("*") if p.is_file())
        self.assertEqual(entries["v1/both"].size, total)

    def test_kinds(self):
        entries = {e.name: e for e in self.library.scan()}
        self.assertEqual(entries["v1/vae.safetensors"].classification.kind, "vae")
        self.assertEqual(entries["v1/both.ckpt"].classification.kind, "pipeline")
        self.assertEqual(entries["v1/inpaint.safetensors"].classification.in_channels, 9)
        self.assertEqual(entries["v2/vpred.safetensors"].sidecar, "v2/vpred.yaml")

    def test_weights_win_over_the_folder(self):
        events = fx.capture_warnings(self)
        entry = library.ModelLibrary(self.models).describe(self.models / "v1" / "misplaced.safetensors")
        self.assertEqual(entry.version, "v2")
        self.assertTrue(any(e.get("hint") == "v1" and e.get("version") == "v2" for e in events), events)

    def test_links_outside_and_component_folders_are_skipped(self):
        names = [e.name for e in self.library.scan()]
        self.assertNotIn("v1/outside.safetensors", names)
        self.assertFalse(any(n.startswith("openai/") for n in names))
        # Nor the weights inside a diffusers folder.
        self.assertFalse(any(n.startswith("v1/both/") for n in names))

    def test_follows_the_disk(self):
        models = Path(self.mktemp()).absolute()
        (models / "v1").mkdir(parents=True)
        lib = library.ModelLibrary(models)
        self.assertEqual(lib.scan(), [])
        target = models / "v1" / "new.safetensors"
        shutil.copy(self.models / "v1" / "both.safetensors", target)
        [entry] = lib.scan()
        self.assertEqual((entry.name, entry.version), ("v1/new.safetensors", "v1"))
        # Replaced by v2 weights: the cached classification must not survive.
        os.unlink(target)
        shutil.copy(self.models / "v2" / "tiny.safetensors", target)
        os.utime(target, ns=(1, 1))
        [entry] = lib.scan()
        self.assertEqual(entry.version, "v2")
        os.unlink(target)
        self.assertEqual(lib.scan(), [])

    def test_hidden_and_half_written_are_skipped(self):
        models = Path(self.mktemp()).absolute()
        (models / ".cache").mkdir(parents=True)
        shutil.copy(self.models / "v1" / "both.safetensors", models / ".cache" / "x.safetensors")
        shutil.copy(self.models / "v1" / "both.safetensors", models / ".x.runai-1234.tmp")
        self.assertEqual(library.ModelLibrary(models).scan(), [])

    def test_unreadable_checkpoint_is_listed_with_its_error(self):
        models = Path(self.mktemp()).absolute()
        (models / "v1").mkdir(parents=True)
        (models / "v1" / "broken.safetensors").write_bytes(b"\x00" * 3)
        [entry] = library.ModelLibrary(models).scan()
        wire = replies.model(entry)
        self.assertFalse(wire["served"])
        self.assertIn("too short", wire["error"])

    def test_symlink_loop_ends(self):
        models = Path(self.mktemp()).absolute()
        (models / "v1").mkdir(parents=True)
        os.symlink(models, models / "v1" / "loop")
        self.assertEqual(library.ModelLibrary(models).scan(), [])

    def test_a_link_to_a_diffusers_folder_inside_is_listed(self):
        models = Path(self.mktemp()).absolute()
        shutil.copytree(self.models / "v1" / "both", models / "v1" / "both")
        os.symlink(models / "v1" / "both", models / "alias")
        os.symlink(self.models / "v1" / "both", models / "elsewhere")  # outside this folder
        entries = {e.name: e for e in library.ModelLibrary(models).scan()}
        self.assertEqual(sorted(entries), ["alias", "v1/both"])
        self.assertEqual(entries["alias"].path, str((models / "v1" / "both").resolve()))
        self.assertTrue(entries["alias"].served)


def models_action(models):
    """The server's answer to ``{"action": "models"}`` over the socket, for ``models``."""
    worker = LocalWorker(SyncReactor(), engine_factory=lambda device, dtype: ScriptedEngine(), pool=ManualPool())
    _, _, factory = make_server(SyncReactor(), models, worker)
    proto = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(frame({"action": "models"}))
    [reply] = decode_all(transport.value())
    return reply


class MalformedModelTests(SynchronousTestCase):
    """One malformed model file or config never costs the client the rest of the list."""

    BAD = ("v1/dictdim", "v2/listdim.safetensors", "v1/huge.ckpt", "v1/odd.safetensors")

    def setUp(self):
        real = checkpoint.tensor_shapes

        def tensor_shapes(path):
            if str(path).endswith("odd.safetensors"):
                raise RuntimeError(f"surprise in {path}")
            return real(path)

        self.patch(checkpoint, "tensor_shapes", tensor_shapes)
        self.models = self.folder(*self.BAD)

    def folder(self, *bad):
        models = Path(self.mktemp()).absolute()
        shared = fx.model_folder()
        v1, v2 = models / "v1", models / "v2"
        v1.mkdir(parents=True)
        v2.mkdir()
        shutil.copy(shared / "v1" / "both.safetensors", v1 / "good.safetensors")
        if "v1/dictdim" in bad:
            # A mapping where unet/config.json has a width.
            shutil.copytree(shared / "v1" / "both", v1 / "dictdim")
            config = v1 / "dictdim" / "unet" / "config.json"
            config.write_text(json.dumps(dict(json.loads(config.read_text()), cross_attention_dim={})))
        if "v2/listdim.safetensors" in bad:
            # A list where the side-car has a width.
            shutil.copy(shared / "v2" / "tiny.safetensors", v2 / "listdim.safetensors")
            (v2 / "listdim.yaml").write_text(
                "model:\n  params:\n    unet_config:\n      params:\n        context_dim: [768]\n")
        if "v1/huge.ckpt" in bad:
            # 13 bytes of a legacy (non-zip) pickle that declare a 32 TB string.
            (v1 / "huge.ckpt").write_bytes(b"\x80\x04\x8e" + struct.pack("<Q", 2**45) + b"\x00\x00")
        if "v1/odd.safetensors" in bad:
            # A file whose classification fails in a way nobody foresaw (see setUp).
            shutil.copy(shared / "v1" / "both.safetensors", v1 / "odd.safetensors")
        return models

    def test_each_alone(self):
        for name in self.BAD:
            entries = library.ModelLibrary(self.folder(name)).scan()
            self.assertEqual(sorted(e.name for e in entries), sorted(["v1/good.safetensors", name]))
        self.flushLoggedErrors(RuntimeError)

    def test_every_model_is_listed(self):
        lib = library.ModelLibrary(self.models)
        entries = {e.name: e for e in lib.scan()}
        self.assertEqual(sorted(entries), ["v1/dictdim", "v1/good.safetensors", "v1/huge.ckpt",
                                           "v1/odd.safetensors", "v2/listdim.safetensors"])
        good = replies.model(entries["v1/good.safetensors"])
        self.assertEqual((good["version"], good["served"], good.get("error")), ("v1", True, None))
        # Bad values in configs are ignored: the content decides.
        self.assertEqual((entries["v1/dictdim"].version, entries["v1/dictdim"].error), ("v1", None))
        listdim = entries["v2/listdim.safetensors"]
        self.assertEqual((listdim.version, listdim.sidecar, listdim.error), ("v2", "v2/listdim.yaml", None))
        # Unreadable files are listed, with why.
        huge = replies.model(entries["v1/huge.ckpt"])
        self.assertFalse(huge["served"])
        self.assertIn("malformed pickle", huge["error"])
        odd = replies.model(entries["v1/odd.safetensors"])
        self.assertFalse(odd["served"])
        self.assertIn("RuntimeError: surprise in v1/odd.safetensors", odd["error"])
        self.assertNotIn(str(self.models), odd["error"])
        # Logged once, not on every scan.
        lib.scan()
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_the_models_action_answers(self):
        reply = models_action(self.models)
        self.assertEqual(len(reply["models"]), 5, reply)
        self.flushLoggedErrors(RuntimeError)


class ModelsActionTests(SynchronousTestCase):
    def setUp(self):
        self.models = fx.model_folder()
        self.reactor = SyncReactor()
        self.engine = ScriptedEngine()
        self.worker = LocalWorker(self.reactor, engine_factory=lambda device, dtype: self.engine, pool=ManualPool())
        _, _, self.factory = make_server(self.reactor, self.models, self.worker)

    def ask(self, message):
        proto = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.dataReceived(frame(message))
        return decode_all(transport.value())

    def test_models(self):
        [reply] = self.ask({"action": "models", "id": "m1"})
        self.assertEqual((reply["action"], reply["id"]), ("models", "m1"))
        by_name = {m["name"]: m for m in reply["models"]}
        self.assertEqual(sorted(by_name), sorted(fx.EXPECTED))
        self.assertEqual(by_name["v1/inpaint.safetensors"]["inpainting"], True)
        self.assertEqual(by_name["sdxl/base.safetensors"]["served"], True)
        self.assertEqual(by_name["v1/vae.safetensors"]["served"], False)
        for entry in reply["models"]:
            self.assertFalse(os.path.isabs(entry["name"]))
            self.assertEqual(
                set(entry) - {"config", "error"},
                {"name", "version", "format", "kind", "inpainting", "in_channels", "prediction_type", "size",
                 "served", "loaded"},
            )

    def test_loaded_models_are_marked(self):
        class Loader:
            loaded_paths = (str(self.models / "v1" / "both"),)

        self.engine.loader = Loader()
        self.worker._get_engine()
        [reply] = self.ask({"action": "models"})
        loaded = [m["name"] for m in reply["models"] if m["loaded"]]
        self.assertEqual(loaded, ["v1/both"])

    def test_convert_errors_are_answered_at_once(self):
        cases = [
            ({"convert_model": "../outside.safetensors"}, errors.PATH_OUTSIDE_MODEL_DIR),
            ({"convert_model": "v1/both"}, errors.BAD_REQUEST),  # a folder already
            ({"convert_model": "v1/both.safetensors"}, errors.BAD_REQUEST),  # v1/both exists
            ({"convert_model": "v1/nope.ckpt"}, errors.MODEL_NOT_FOUND),
            ({}, errors.BAD_REQUEST),
        ]
        for options, code in cases:
            [reply] = self.ask({"action": "convert", "options": options})
            self.assertEqual((reply["error"]["code"], reply["reqtype"]), (code, "convert"), options)


class CacheSizeOptionTests(SynchronousTestCase):
    def test_counts_and_sizes(self):
        from runai.options import parse_cache_size

        self.assertEqual(parse_cache_size("2"), (2, None))
        self.assertEqual(parse_cache_size("8GiB"), (32, 8 * 2**30))
        self.assertEqual(parse_cache_size("8G"), (32, 8 * 2**30))
        self.assertEqual(parse_cache_size("6000MB"), (32, 6000 * 2**20))
        for bad in ("0", "33", "2.5", "lots", "1KB", "-1"):
            with self.assertRaises(ValueError, msg=bad):
                parse_cache_size(bad)

    def test_option_reaches_the_engine(self):
        from runai import tap
        from runai.options import OptionError

        config = tap.Options()
        config.parseOptions(["--cache-size", "4GiB", "--model-dir", self.mktemp()])
        self.assertEqual((config["cache-models"], config["cache-bytes"]), (32, 4 * 2**30))
        service = tap.makeService(config, reactor=SyncReactor())
        worker = next(s for s in service if hasattr(s, "engine_options"))
        library = worker.engine_options.pop("library")
        self.assertEqual(str(library.model_dir), config["model-dir"])
        self.assertEqual(worker.engine_options, dict(cache_models=32, cache_bytes=4 * 2**30, text_encoders="device",
                                                    preview_decoder="auto"))
        with self.assertRaises(OptionError):
            tap.Options().parseOptions(["--cache-size", "none"])


class SdxlListingTests(SynchronousTestCase):
    def test_sdxl_folders(self):
        from runai.doors.legacy import replies
        from runai.test.test_engine_xl import xl_models

        listing = {e.name: replies.model(e) for e in library.ModelLibrary(xl_models()).scan()}
        self.assertEqual({n: (m["version"], m["kind"], m["inpainting"], m["served"]) for n, m in listing.items()}, {
            "sdxl/base": ("sdxl", "pipeline", False, True),
            "sdxl/fp16fix": ("sdxl", "pipeline", False, True),
            "sdxl/inpaint": ("sdxl", "pipeline", True, True),
            "sdxl/refiner": ("sdxl", "refiner", False, False),
            "sdxl/tokenizer-json": ("sdxl", "pipeline", False, True),
        })
