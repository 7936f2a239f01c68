"""runai.cli.pull and runai.models.hub_files: ``runai pull`` against a stand-in Hub on
127.0.0.1 (runai.test.standin_hub), never the real one."""

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from twisted.trial.unittest import SynchronousTestCase

from runai.cli import main, pull
from runai.models import hub_files
from runai.models.checkpoint import read_safetensors_header
from runai.test.library_fixtures import tiny_source
from runai.test.standin_hub import Repo, StandInHub

REPO = "test-org/tiny-sd"
_state = {}


def _half(path):
    return {k: v.to(torch.float16) for k, v in load_file(str(path)).items()}


def _bytes(tensors):
    return save(tensors)


def tiny_repo_files():
    """The tiny SD pipeline as a Hub repository holds it: plain weights, fp16 variants
    (the text encoder's in two shards; none for the VAE), .bin/.msgpack/.onnx twins, a
    single file beside the folders, an onnx/ folder, a README."""
    if "files" not in _state:
        source = tiny_source("v1")
        files = {p.relative_to(source).as_posix(): p.read_bytes() for p in source.rglob("*") if p.is_file()}
        unet = _half(source / "unet/diffusion_pytorch_model.safetensors")
        files["unet/diffusion_pytorch_model.fp16.safetensors"] = _bytes(unet)
        text = _half(source / "text_encoder/model.safetensors")
        keys = sorted(text)
        shards = {"model.fp16-00001-of-00002.safetensors": keys[: len(keys) // 2],
                  "model.fp16-00002-of-00002.safetensors": keys[len(keys) // 2:]}
        for shard, names in shards.items():
            files[f"text_encoder/{shard}"] = _bytes({k: text[k] for k in names})
        files["text_encoder/model.safetensors.index.fp16.json"] = json.dumps({
            "metadata": {"total_size": sum(t.numel() * 2 for t in text.values())},
            "weight_map": {k: shard for shard, names in shards.items() for k in names}}).encode()
        for twin in ("unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.fp16.bin",
                     "text_encoder/pytorch_model.bin", "text_encoder/pytorch_model.bin.index.json",
                     "text_encoder/flax_model.msgpack", "vae/diffusion_pytorch_model.onnx", "unet/onnx/model.onnx",
                     "onnx/unet/model.onnx", "v1-5-pruned-emaonly.safetensors", "v1-5-pruned.ckpt", "README.md",
                     ".gitattributes"):
            files[twin] = b"not for runai " + twin.encode()
        _state["files"] = files
    return _state["files"]


def tokenizer_repo_files():
    source = tiny_source("v1") / "tokenizer"
    files = {p.name: p.read_bytes() for p in source.iterdir()}
    files.update({"config.json": b"{}", "model.safetensors": b"weights", "pytorch_model.bin": b"weights",
                  "flax_model.msgpack": b"weights", "tf_model.h5": b"weights"})
    return files


class PullTests(SynchronousTestCase):
    def setUp(self):
        self.hub = StandInHub({
            REPO: Repo(tiny_repo_files()),
            "gated-org/secret": Repo({"secret.safetensors": _bytes({"w": torch.ones(2)})}, token="hf_right_token"),
            "gated-org/tiny-sd": Repo(tiny_repo_files(), token="hf_right_token", public_info=True),
            "single-org/files": Repo({"a.safetensors": _bytes({"w": torch.ones(2)}),
                                      "sub/b.safetensors": _bytes({"w": torch.zeros(3)}), "a.ckpt": b"pickle"}),
            "openai/clip-vit-large-patch14": Repo(tokenizer_repo_files()),
            "old-org/bin-only": Repo({"model_index.json": b'{"unet": ["diffusers", "UNet2DConditionModel"]}',
                                      "unet/config.json": b"{}", "unet/diffusion_pytorch_model.bin": b"pickle"}),
        }).start()
        self.addCleanup(self.hub.stop)
        self.models = Path(os.path.realpath(self.mktemp()))
        self.models.mkdir()
        self.environ = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_ENDPOINT")}
        self.environ.update(HF_ENDPOINT=self.hub.endpoint, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
        self.patch(os, "environ", self.environ)

    def pull(self, *argv):
        stdout, stderr = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", stdout)
        self.patch(sys, "stderr", stderr)
        status = main.main(["pull", *argv, "--model-dir", str(self.models)])
        return status, stdout.getvalue(), stderr.getvalue()

    def installed(self, repo=REPO):
        folder = self.models / repo
        return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}

    def everything(self):
        return sorted(p.relative_to(self.models).as_posix() for p in self.models.rglob("*"))

    def assertLoads(self, name=REPO):
        """The library lists it as a served diffusers model and runai's loader loads it."""
        from runai.models.cache import ModelLoader
        from runai.models.library import ModelLibrary

        library = ModelLibrary(self.models)
        [entry] = [e for e in library.scan() if e.name == name]
        self.assertEqual((entry.format, entry.version, entry.served, entry.error), ("diffusers", "v1", True, None))
        loaded = ModelLoader(torch.device("cpu"), torch.float32, library=library).get(entry.path, name)
        return loaded.pipe

    def test_a_diffusers_repo_brings_only_what_runai_uses(self):
        status, out, err = self.pull(REPO)
        self.assertEqual(status, 0, err)
        files = tiny_repo_files()
        configs = {p for p in files if "/" in p and p.endswith((".json", ".txt")) and ".fp16" not in p
                   and "onnx/" not in p and ".bin" not in p}
        wanted = configs | {"model_index.json", "unet/diffusion_pytorch_model.safetensors",
                            "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"}
        self.assertEqual(self.installed(), wanted)
        self.assertEqual(sorted(self.hub.downloads), sorted(wanted))
        for path in wanted:
            self.assertEqual((self.models / REPO / path).read_bytes(), files[path], path)
        self.assertEqual(self.everything(), ["test-org", "test-org/tiny-sd"] + sorted(
            f"test-org/tiny-sd/{p}" for p in {q for w in wanted for q in _parents(w)}))
        self.assertIn(f"{REPO}: {len(wanted)} files", out)
        pipe = self.assertLoads()
        source = load_file(str(tiny_source("v1") / "unet/diffusion_pytorch_model.safetensors"))
        for key, value in pipe.unet.state_dict().items():
            self.assertTrue(torch.equal(value, source[key]), key)

    def test_variant_fp16_takes_the_fp16_files_under_the_plain_names(self):
        status, _, err = self.pull(REPO, "--variant", "fp16")
        self.assertEqual(status, 0, err)
        files = tiny_repo_files()
        installed = self.installed()
        self.assertEqual({p for p in installed if "safetensors" in p}, {
            "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
            "text_encoder/model-00001-of-00002.safetensors", "text_encoder/model-00002-of-00002.safetensors",
            "text_encoder/model.safetensors.index.json"})
        self.assertEqual((self.models / REPO / "unet/diffusion_pytorch_model.safetensors").read_bytes(),
                         files["unet/diffusion_pytorch_model.fp16.safetensors"])
        tensors, _ = read_safetensors_header(str(self.models / REPO / "unet/diffusion_pytorch_model.safetensors"))
        self.assertEqual({t.dtype for t in tensors.values()}, {"F16"})
        # The VAE has no fp16 variant: its plain weights, and never both precisions.
        self.assertEqual((self.models / REPO / "vae/diffusion_pytorch_model.safetensors").read_bytes(),
                         files["vae/diffusion_pytorch_model.safetensors"])
        self.assertNotIn("text_encoder/model.safetensors", self.hub.downloads)
        index = json.loads((self.models / REPO / "text_encoder/model.safetensors.index.json").read_text())
        self.assertEqual(set(index["weight_map"].values()),
                         {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"})
        pipe = self.assertLoads()
        half = _half(tiny_source("v1") / "text_encoder/model.safetensors")
        for key, value in pipe.text_encoder.state_dict().items():
            if key in half:
                self.assertTrue(torch.equal(value, half[key].float()), key)

    def test_base_fetches_tokenizers_only(self):
        status, out, err = self.pull("--base", "sd15")
        self.assertEqual(status, 0, err)
        served = set(tokenizer_repo_files())
        self.assertEqual(self.installed("openai/clip-vit-large-patch14"), served & set(hub_files.CLIP_TOKENIZER_FILES))
        self.assertTrue({"vocab.json", "merges.txt"} <= served and "config.json" in served)
        self.assertFalse(any(p.endswith((".safetensors", ".bin", ".msgpack", ".h5")) for p in self.hub.downloads))
        # Again: already there, nothing fetched.
        before = list(self.hub.requests)
        status, _, err = self.pull("--base", "sd2")
        self.assertEqual((status, self.hub.requests), (0, before))
        self.assertIn("already in", err)

    def test_bases_name_the_folders_the_loaders_search(self):
        from runai.models import flowconfigs, singlefile, singlefile_xl

        self.assertEqual(hub_files.CLIP_L[0], singlefile.TOKENIZER_FOLDERS[0])
        self.assertEqual((hub_files.CLIP_L[0], hub_files.CLIP_G[0]),
                         (singlefile_xl.CLIP_L_FOLDER, singlefile_xl.BIG_G_FOLDER))
        self.assertEqual({hub_files.CLIP_L[0], hub_files.CLIP_G[0], hub_files.T5XXL[0]},
                         set(flowconfigs.TOKENIZER_MODELS.values()))
        self.assertEqual(set(hub_files.BASES), {"sd15", "sd2", "sdxl", "sd3", "flux"})

    def test_offline_fails_in_one_line_leaving_nothing(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            closed = f"http://127.0.0.1:{s.getsockname()[1]}"
        self.environ["HF_ENDPOINT"] = closed
        for argv in ([REPO], ["--base", "sdxl"]):
            status, out, err = self.pull(*argv)
            self.assertEqual((status, out), (1, ""))
            self.assertEqual(len(err.splitlines()), 1, err)
            self.assertIn(f"runai pull: cannot reach {closed} (offline?)", err)
            self.assertEqual(self.everything(), [])
        from huggingface_hub import constants
        self.assertEqual(constants.HF_HUB_OFFLINE, True)  # as the tests' environment set it, restored

    def test_gated_without_a_token(self):
        status, out, err = self.pull("gated-org/secret")
        self.assertEqual((status, out, self.everything()), (1, "", []))
        self.assertEqual(err, "runai pull: gated-org/secret is gated: it needs HF_TOKEN set to a token with access "
                              "(accept its terms on its Hub page)\n")
        self.environ["HF_TOKEN"] = "hf_wrong"
        self.assertEqual(self.pull("gated-org/secret")[0], 1)
        self.environ["HF_TOKEN"] = "hf_right_token"
        status, _, err = self.pull("gated-org/secret")
        self.assertEqual(status, 0, err)
        self.assertEqual(self.installed("gated-org/secret"), {"secret.safetensors"})

    def test_gated_files_of_a_listed_repo(self):
        status, out, err = self.pull("gated-org/tiny-sd")
        self.assertEqual((status, out, self.everything()), (1, "", []))
        self.assertEqual(err, "runai pull: gated-org/tiny-sd is gated: it needs HF_TOKEN set to a token with access "
                              "(accept its terms on its Hub page)\n")
        self.assertIn(("GET", "/api/models/gated-org/tiny-sd"), self.hub.requests)  # listed: the files refused
        self.environ["HF_TOKEN"] = "hf_right_token"
        status, _, err = self.pull("gated-org/tiny-sd", "--variant", "fp16")
        self.assertEqual(status, 0, err)
        self.assertLoads("gated-org/tiny-sd")

    def test_no_such_repo_or_revision(self):
        status, _, err = self.pull("nobody/nothing")
        self.assertEqual((status, self.everything()), (1, []))
        self.assertEqual(err, f"runai pull: no such repo nobody/nothing on {self.hub.endpoint} "
                              "(a private one needs HF_TOKEN with access)\n")
        status, _, err = self.pull(REPO, "--revision", "v9")
        self.assertEqual((status, self.everything()), (1, []))
        self.assertIn("has no such revision", err)

    def test_single_file_repos(self):
        status, _, err = self.pull("single-org/files")
        self.assertEqual((status, self.everything()), (1, []))
        self.assertEqual(err, "runai pull: single-org/files: the repository holds 2 .safetensors files; choose one "
                              "with --file NAME: a.safetensors, sub/b.safetensors\n")
        status, _, err = self.pull("single-org/files", "--file", "sub/b.safetensors")
        self.assertEqual(status, 0, err)
        self.assertEqual(self.installed("single-org/files"), {"sub/b.safetensors"})
        self.assertEqual(self.hub.downloads, ["sub/b.safetensors"])
        status, _, err = self.pull("single-org/files", "--file", "a.ckpt")
        self.assertEqual(status, 1)
        self.assertIn("already exists", err)

    def test_an_existing_folder_is_replaced_only_with_force(self):
        (self.models / "single-org" / "files").mkdir(parents=True)
        (self.models / "single-org" / "files" / "old.safetensors").write_bytes(b"old")
        status, _, err = self.pull("single-org/files", "--file", "a.safetensors")
        self.assertEqual((status, self.hub.requests), (1, []))
        self.assertIn("already exists; remove it first, or pull with --force", err)
        status, _, err = self.pull("single-org/files", "--file", "a.safetensors", "--force")
        self.assertEqual(status, 0, err)
        self.assertEqual(self.installed("single-org/files"), {"a.safetensors"})
        self.assertEqual(self.everything(), ["single-org", "single-org/files", "single-org/files/a.safetensors"])

    def test_the_model_folder(self):
        stdout, stderr = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", stdout)
        self.patch(sys, "stderr", stderr)
        status = main.main(["pull", REPO, "--model-dir", str(self.models / "typo")])
        self.assertEqual((status, self.hub.requests), (1, []))
        self.assertIn("typo does not exist (--model-dir)", stderr.getvalue())
        home = Path(self.mktemp()).absolute()
        self.patch(pull, "default_model_dir", lambda: str(home / "stablediffusion"))
        status = main.main(["pull", "single-org/files", "--file", "a.safetensors"])
        self.assertEqual(status, 0, stderr.getvalue())
        self.assertTrue((home / "stablediffusion/single-org/files/a.safetensors").is_file())
        self.assertIn("single-org/files: 1 file", stdout.getvalue())

    def test_names_that_are_not_org_slash_name(self):
        for name in ("../etc", "/etc/passwd", "a/b/c", "a/..", "..a/b", "org", "a/.hidden", "a b/c", "a/b\n"):
            status, _, err = self.pull(name)
            self.assertEqual(status, 1, name)
            self.assertIn("is not a Hub repository name", err)
        self.assertEqual((self.hub.requests, self.everything()), ([], []))

    def test_nothing_is_written_through_a_link(self):
        outside = Path(self.mktemp()).absolute()
        outside.mkdir()
        (self.models / "single-org").symlink_to(outside)
        status, _, err = self.pull("single-org/files", "--file", "a.safetensors")
        self.assertEqual((status, self.hub.requests, list(outside.iterdir())), (1, [], []))
        self.assertIn("is a link or leads outside the model folder", err)

    def test_a_broken_download_resumes(self):
        broken = "unet/diffusion_pytorch_model.safetensors"
        self.hub.refused.add(broken)  # answered 403: everything else arrives
        status, _, err = self.pull(REPO)
        self.assertEqual(status, 1)
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertIn("the same command resumes", err)
        partial = self.models / "test-org" / ".tiny-sd.partial"
        self.assertTrue((partial / "model_index.json").is_file())
        self.assertNotIn(broken, self.hub.downloads)
        self.assertFalse((self.models / REPO).exists())
        first = list(self.hub.downloads)
        self.hub.refused.clear()
        self.hub.downloads.clear()
        status, _, err = self.pull(REPO)
        self.assertEqual(status, 0, err)
        # Only what had not arrived is fetched again.
        self.assertIn(broken, self.hub.downloads)
        self.assertEqual(set(self.hub.downloads) & set(first), set())
        self.assertEqual(set(self.hub.downloads) | set(first), {f"{p}" for p in self.installed()})
        self.assertFalse(partial.exists())
        self.assertEqual((self.models / REPO / broken).read_bytes(), tiny_repo_files()[broken])
        self.assertLoads()

    def test_in_its_own_process_without_torch(self):
        script = ("import sys; from runai.cli.main import main; status = main(sys.argv[1:]); "
                  "assert not [m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers')]; sys.exit(status)")
        environ = dict(self.environ, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="0", HF_HOME=self.mktemp())
        done = subprocess.run([sys.executable, "-c", script, "pull", "single-org/files", "--file", "a.safetensors",
                               "-m", str(self.models)], env=environ, capture_output=True, text=True, timeout=120)
        self.assertEqual(done.returncode, 0, done.stderr)
        size = len(self.hub.repos["single-org/files"].files["a.safetensors"])
        self.assertEqual(done.stdout, f"single-org/files: 1 file, {size} B in {self.models}/single-org/files\n")
        self.assertIn("100%", done.stderr)  # huggingface_hub's progress bar
        self.assertEqual(self.installed("single-org/files"), {"a.safetensors"})
        self.assertFalse(os.path.exists(environ["HF_HOME"]))  # nothing written outside the model folder

    def test_a_refused_selection_leaves_nothing(self):
        status, _, err = self.pull("old-org/bin-only")
        self.assertEqual((status, self.everything()), (1, []))
        self.assertEqual(err, "runai pull: old-org/bin-only: unet/ has no .safetensors weights (only "
                              "diffusion_pytorch_model.bin, which runai does not fetch)\n")
        self.assertEqual(self.hub.downloads, ["model_index.json"])

    def test_a_retry_with_another_variant_keeps_one_precision(self):
        self.hub.refused.add("unet/diffusion_pytorch_model.fp16.safetensors")
        self.assertEqual(self.pull(REPO, "--variant", "fp16")[0], 1)
        partial = self.models / "test-org" / ".tiny-sd.partial"
        self.assertTrue((partial / "text_encoder/model.fp16-00001-of-00002.safetensors").is_file())
        status, _, err = self.pull(REPO)
        self.assertEqual(status, 0, err)
        self.assertEqual({p for p in self.installed() if p.startswith("text_encoder/")},
                         {"text_encoder/config.json", "text_encoder/model.safetensors"})
        self.assertFalse(partial.exists())
        self.assertLoads()

    def test_choosing_files(self):
        listing = ["model_index.json", "unet/config.json", "unet/w.safetensors", "unet/w.fp16.safetensors",
                   "unet/w.bin", "vae/w.bf16.safetensors", "vae/config.json", "text_encoder/pytorch_model.bin",
                   "text_encoder/config.json", "unet/../../x.json", "flax/unet/w.msgpack"]
        index = {"_class_name": "X", "unet": ["diffusers", "U"], "vae": ["diffusers", "V"],
                 "safety_checker": [None, None], "../up": ["a", "b"]}
        with self.assertRaises(hub_files.SelectionError) as raised:
            hub_files.diffusers_files(listing, index)
        self.assertIn("vae/ has only bf16 weights: pull with --variant bf16", str(raised.exception))
        chosen = hub_files.diffusers_files(listing, index, "bf16")
        self.assertEqual(chosen, {"model_index.json": "model_index.json", "unet/config.json": "unet/config.json",
                                  "unet/w.safetensors": "unet/w.safetensors", "vae/config.json": "vae/config.json",
                                  "vae/w.bf16.safetensors": "vae/w.safetensors"})
        index["text_encoder"] = ["transformers", "T"]
        with self.assertRaises(hub_files.SelectionError) as raised:
            hub_files.diffusers_files(listing, index, "bf16")
        self.assertIn("text_encoder/ has no .safetensors weights (only pytorch_model.bin", str(raised.exception))


def _parents(path):
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
