"""runai.models.library and runai.models.paths: discovery, classification by content, best format,
and the ``models`` action."""

import json
import os
import shutil
import struct
from pathlib import Path

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from runai.models import checkpoint
from runai.core import errors
from runai.models import library
from runai.models.paths import resolve_model
from runai.doors.legacy.factory import RunaiFactory
from runai.test import library_fixtures as fx
from runai.test.support import ManualPool, ScriptedEngine, SyncReactor, decode_all, frame
from runai.core.queue import Worker


def capture_warnings(test):
    events = []

    def observe(event):
        if event.get("log_level") in (LogLevel.warn, LogLevel.error):
            events.append(event)

    globalLogPublisher.addObserver(observe)
    test.addCleanup(globalLogPublisher.removeObserver, observe)
    return events


class ScanTests(SynchronousTestCase):
    def setUp(self):
        self.models = fx.model_folder()
        self.library = library.ModelLibrary(self.models)

    def test_the_list_is_right(self):
        entries = {e.name: e for e in self.library.scan()}
        self.assertEqual(sorted(entries), sorted(fx.EXPECTED))
        for name, (version, fmt, inpainting, prediction, served) in fx.EXPECTED.items():
            wire = entries[name].to_wire()
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
        events = capture_warnings(self)
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
        wire = entry.to_wire()
        self.assertFalse(wire["served"])
        self.assertIn("too short", wire["error"])

    def test_symlink_loop_ends(self):
        models = Path(self.mktemp()).absolute()
        (models / "v1").mkdir(parents=True)
        os.symlink(models, models / "v1" / "loop")
        self.assertEqual(library.ModelLibrary(models).scan(), [])


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
        good = entries["v1/good.safetensors"].to_wire()
        self.assertEqual((good["version"], good["served"], good.get("error")), ("v1", True, None))
        # Bad values in configs are ignored: the content decides.
        self.assertEqual((entries["v1/dictdim"].version, entries["v1/dictdim"].error), ("v1", None))
        listdim = entries["v2/listdim.safetensors"]
        self.assertEqual((listdim.version, listdim.sidecar, listdim.error), ("v2", "v2/listdim.yaml", None))
        # Unreadable files are listed, with why.
        huge = entries["v1/huge.ckpt"].to_wire()
        self.assertFalse(huge["served"])
        self.assertIn("malformed pickle", huge["error"])
        odd = entries["v1/odd.safetensors"].to_wire()
        self.assertFalse(odd["served"])
        self.assertIn("RuntimeError: surprise in v1/odd.safetensors", odd["error"])
        self.assertNotIn(str(self.models), odd["error"])
        # Logged once, not on every scan.
        lib.scan()
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_the_models_action_answers(self):
        factory = RunaiFactory(Worker(SyncReactor(), engine_factory=lambda device, dtype: ScriptedEngine(),
                                      pool=ManualPool()), self.models, clock=SyncReactor())
        proto = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.dataReceived(frame({"action": "models"}))
        [reply] = decode_all(transport.value())
        self.assertEqual(len(reply["models"]), 5, reply)
        self.flushLoggedErrors(RuntimeError)


class RealLayoutTests(SynchronousTestCase):
    """Header-only files with the released models' key names and shapes."""

    def setUp(self):
        self.dir = Path(self.mktemp()).absolute()

    def classify(self, shapes, name="x.safetensors", metadata=None):
        path = fx.write_header_only(self.dir / name, shapes, metadata=metadata)
        tensors, meta = checkpoint.tensor_shapes(path)
        return library.classify_state(tensors, meta)

    def test_layout_matches_the_released_files(self):
        sd15 = fx.real_layout("v1")
        for key, shape in fx.KNOWN_SD15.items():
            self.assertEqual(sd15.get(key), shape, key)
        count = lambda prefix: sum(1 for k in sd15 if k.startswith(prefix))  # noqa: E731
        # The counts of v1-5-pruned-emaonly: 686 UNet, 248 VAE, 197 text encoder tensors.
        self.assertEqual(count("model.diffusion_model."), 686)
        self.assertEqual(count("first_stage_model."), 248)
        self.assertEqual(count("cond_stage_model."), 197)
        sd21 = fx.real_layout("v2")
        for key, shape in fx.KNOWN_SD21.items():
            self.assertEqual(sd21.get(key), shape, key)

    def test_sd15(self):
        c = self.classify(fx.real_layout("v1"))
        self.assertEqual((c.kind, c.version, c.inpainting, c.prediction_type), ("pipeline", "v1", False, "epsilon"))

    def test_sd15_inpainting(self):
        c = self.classify(fx.real_layout("v1", inpainting=True))
        self.assertEqual((c.version, c.inpainting, c.in_channels), ("v1", True, 9))

    def test_sd21(self):
        c = self.classify(fx.real_layout("v2"))
        # The weights alone do not tell 2.x-base from 768-v: left to configs and the load.
        self.assertEqual((c.version, c.inpainting, c.prediction_type), ("v2", False, None))

    def test_sd2_inpainting(self):
        c = self.classify(fx.real_layout("v2", inpainting=True))
        self.assertEqual((c.version, c.inpainting), ("v2", True))

    def test_sdxl(self):
        c = self.classify(fx.SDXL_BASE)
        self.assertEqual((c.kind, c.version), ("pipeline", "sdxl"))

    def test_sdxl_without_label_emb(self):
        c = self.classify({k: v for k, v in fx.SDXL_BASE.items() if "label_emb" not in k})
        self.assertEqual(c.version, "sdxl")

    def test_unet_alone_by_context_width(self):
        for width, version in ((768, "v1"), (1024, "v2"), (2048, "sdxl")):
            shapes = {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, width)}
            self.assertEqual(self.classify(shapes).version, version)

    def test_modelspec_prediction_type(self):
        c = self.classify(fx.real_layout("v2"), metadata={"modelspec.prediction_type": "v"})
        self.assertEqual(c.prediction_type, "v_prediction")

    def test_v_pred_key(self):
        c = self.classify(dict(fx.real_layout("v2"), v_pred=()))
        self.assertEqual(c.prediction_type, "v_prediction")

    def test_not_a_whole_model(self):
        lora = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 320)}
        self.assertEqual(self.classify(lora).kind, "lora")
        self.assertEqual(self.classify({"string_to_param.*": (1, 768)}).kind, "embedding")
        self.assertEqual(self.classify({"something": (1,)}).kind, "unknown")

    def test_folder_says_v1_weights_say_v2(self):
        models = self.dir
        fx.write_header_only(models / "v1" / "sd21.safetensors", fx.real_layout("v2"))
        events = capture_warnings(self)
        entry = library.ModelLibrary(models).describe(models / "v1" / "sd21.safetensors")
        self.assertEqual(entry.version, "v2")
        self.assertTrue(any("weights are" in e.get("log_format", "") for e in events))

    def test_sidecar_says_v(self):
        models = self.dir
        fx.write_header_only(models / "v2" / "sd21-768.safetensors", fx.real_layout("v2"))
        (models / "v2" / "sd21-768.yaml").write_text("model:\n  params:\n    parameterization: v\n")
        entry = library.ModelLibrary(models).describe(models / "v2" / "sd21-768.safetensors")
        self.assertEqual((entry.version, entry.classification.prediction_type), ("v2", "v_prediction"))
        self.assertEqual(entry.to_wire()["config"], "v2/sd21-768.yaml")

    def test_sidecar_without_parameterization_is_epsilon(self):
        models = self.dir
        fx.write_header_only(models / "v2" / "base.safetensors", fx.real_layout("v2"))
        (models / "v2" / "base.yaml").write_text("model:\n  params:\n    linear_start: 0.00085\n")
        entry = library.ModelLibrary(models).describe(models / "v2" / "base.safetensors")
        self.assertEqual(entry.classification.prediction_type, "epsilon")

    def test_sidecar_link_outside_is_ignored(self):
        models = self.dir / "models"
        fx.write_header_only(models / "v2" / "m.safetensors", fx.real_layout("v2"))
        secret = self.dir / "secret.yaml"
        secret.write_text("model:\n  params:\n    parameterization: v\n")
        os.symlink(secret, models / "v2" / "m.yaml")
        entry = library.ModelLibrary(models).describe(models / "v2" / "m.safetensors")
        self.assertIsNone(entry.classification.prediction_type)
        self.assertIsNone(entry.sidecar)

    def test_classifying_a_huge_file_reads_its_header_only(self):
        path = fx.write_header_only(self.dir / "big.safetensors", fx.real_layout("v1"), dtype="F32",
                                    pad_to=8 * 2**30)
        with fx.counting_reads() as counter:
            entry = library.ModelLibrary(self.dir).describe(path)
        self.assertEqual(entry.version, "v1")
        self.assertLess(counter.bytes, 1024 * 1024)


class DiffusersClassificationTests(SynchronousTestCase):
    def test_tiny_folders(self):
        models = fx.model_folder()
        for rel, version in (("runwayml/stable-diffusion-v1-5", "v1"),
                             ("stabilityai/stable-diffusion-2-1-base", "v2")):
            c = library.classify_diffusers(models / rel, models)
            self.assertEqual((c.kind, c.version, c.inpainting), ("pipeline", version, False), rel)

    def test_inpainting_and_v_prediction(self):
        inpaint = fx.tiny_source("v1-inpaint")
        c = library.classify_diffusers(inpaint, inpaint)
        self.assertEqual((c.version, c.inpainting, c.pipeline_class), ("v1", True, "StableDiffusionInpaintPipeline"))
        vpred = fx.tiny_source("v2-v")
        c = library.classify_diffusers(vpred, vpred)
        self.assertEqual((c.version, c.prediction_type), ("v2", "v_prediction"))


class BestFormatTests(SynchronousTestCase):
    def setUp(self):
        self.models = fx.model_folder()

    def resolve(self, name, base=None):
        path, display = resolve_model(self.models, name, base)
        return display

    def test_folder_then_safetensors_then_ckpt(self):
        self.assertEqual(self.resolve("v1/both"), "v1/both")
        self.assertEqual(self.resolve("v1/pair"), "v1/pair.safetensors")
        self.assertEqual(self.resolve("v1/old"), "v1/old.ckpt")

    def test_explicit_names_are_honoured(self):
        self.assertEqual(self.resolve("v1/both.ckpt"), "v1/both.ckpt")
        self.assertEqual(self.resolve("v1/both.safetensors"), "v1/both.safetensors")
        self.assertEqual(self.resolve(str(self.models / "v1" / "pair.ckpt")), "v1/pair.ckpt")
        self.assertEqual(self.resolve("pair.ckpt", str(self.models / "v1")), "v1/pair.ckpt")

    def test_an_explicit_missing_file_is_not_replaced(self):
        with self.assertRaises(errors.RunaiError) as caught:
            self.resolve("v1/old.safetensors")
        self.assertEqual(caught.exception.code, errors.MODEL_NOT_FOUND)

    def test_not_found_says_what_was_looked_for(self):
        with self.assertRaises(errors.RunaiError) as caught:
            self.resolve("v1/nothing")
        self.assertEqual(caught.exception.code, errors.MODEL_NOT_FOUND)
        self.assertIn("v1/nothing.safetensors", caught.exception.message)

    def test_links_and_escapes_are_refused(self):
        for name in ("v1/outside", "v1/outside.safetensors", "../outside.safetensors", "../outside",
                     str(self.models.parent / "outside.safetensors")):
            with self.assertRaises(errors.RunaiError) as caught:
                self.resolve(name)
            self.assertEqual(caught.exception.code, errors.PATH_OUTSIDE_MODEL_DIR, name)

    def test_other_files_are_not_models(self):
        for name in ("v2/vpred.yaml", "v1/both/unet/config.json"):
            with self.assertRaises(errors.RunaiError) as caught:
                self.resolve(name)
            self.assertEqual(caught.exception.code, errors.MODEL_NOT_FOUND, name)


class ModelsActionTests(SynchronousTestCase):
    def setUp(self):
        self.models = fx.model_folder()
        self.reactor = SyncReactor()
        self.engine = ScriptedEngine()
        self.worker = Worker(self.reactor, engine_factory=lambda device, dtype: self.engine, pool=ManualPool())
        self.factory = RunaiFactory(self.worker, self.models, clock=self.reactor)

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
        self.assertEqual(by_name["sdxl/base.safetensors"]["served"], False)
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
        from runai.tap import parse_cache_size

        self.assertEqual(parse_cache_size("2"), (2, None))
        self.assertEqual(parse_cache_size("8GiB"), (32, 8 * 2**30))
        self.assertEqual(parse_cache_size("8G"), (32, 8 * 2**30))
        self.assertEqual(parse_cache_size("6000MB"), (32, 6000 * 2**20))
        for bad in ("0", "33", "2.5", "lots", "1KB", "-1"):
            with self.assertRaises(ValueError, msg=bad):
                parse_cache_size(bad)

    def test_option_reaches_the_engine(self):
        from twisted.python import usage

        from runai import tap

        config = tap.Options()
        config.parseOptions(["--cache-size", "4GiB", "--model-dir", self.mktemp()])
        self.assertEqual((config["cache-models"], config["cache-bytes"]), (32, 4 * 2**30))
        service = tap.makeService(config, reactor=SyncReactor())
        worker = next(s.worker for s in service if hasattr(s, "worker"))
        self.assertEqual(worker.engine_options, dict(model_dir=config["model-dir"], cache_models=32,
                                                     cache_bytes=4 * 2**30))
        with self.assertRaises(usage.UsageError):
            tap.Options().parseOptions(["--cache-size", "none"])


class ClientTests(SynchronousTestCase):
    def test_twisted_client_gets_the_models_reply(self):
        from runai.client import RunaiClientProtocol

        client = RunaiClientProtocol()
        client.makeConnection(StringTransport())
        d = client.request({"action": "models", "id": "m"})
        got = []
        d.addCallback(got.append)
        client.message_received({"action": "models", "models": [], "id": "m"})
        self.assertEqual(got, [[{"action": "models", "models": [], "id": "m"}]])
