"""LoRAs merged into a loaded model and taken out again (runai.models.lora_apply,
runai.models.lora_files), through the real engine on tiny random models, against
diffusers' own ``load_lora_weights`` + ``fuse_lora`` where diffusers takes the format."""

import atexit
import importlib.util
import shutil
import tempfile
from pathlib import Path

import torch
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from runai.core import errors
from runai.engine.engine import Engine
from runai.families import for_pipeline
from runai.models import lora_apply
from runai.models.loras import LoraRef
from runai.test import lora_fixtures as lf
from runai.test.test_engine import generate, request, tiny_model

_root = []
# What the tiny SD 1.x LoRAs patch: attention, the transformers' 1x1 projections, the
# feed-forward, a 3x3 convolution (LoCon) in the UNet; the MLP of the text encoder.
UNET_MODULES = ("attn1.to_q", "attn1.to_k", "attn2.to_v", "attn2.to_out.0", "proj_in", "proj_out",
                "ff.net.2", "up_blocks.0.resnets.0.conv1")
TE_MODULES = ("mlp.fc1", "mlp.fc2")


def root():
    if not _root:
        path = Path(tempfile.mkdtemp(prefix="runai-loras-"))
        atexit.register(shutil.rmtree, str(path), True)
        _root.append(path)
    return _root[0]


def needs_peft():
    if importlib.util.find_spec("peft") is None:
        raise SkipTest("diffusers' LoRA loaders need peft (the test extra)")


class LoraTestCase(SynchronousTestCase):
    def setUp(self):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        self.addCleanup(torch.set_num_threads, threads)
        self.engine = Engine(device="cpu")
        self.pipe = self.engine.load(tiny_model())

    def targets(self, unet=UNET_MODULES, te=TE_MODULES, pipe=None):
        pipe = pipe or self.pipe
        return ([("lora_unet_", pipe.unet, n) for n in lf.modules_of(pipe.unet, unet)]
                + [("lora_te_", pipe.text_encoder, n) for n in lf.modules_of(pipe.text_encoder, te)])

    def lora(self, name, state, metadata=None, suffix=".safetensors"):
        path = root() / (name + suffix)
        if suffix == ".safetensors":
            lf.save(path, state, metadata)
        else:
            torch.save(state, str(path))
        return str(path)

    def kohya(self, name="style", seed=0, **kwargs):
        return self.lora(name, lf.kohya_state(self.targets(), seed=seed, **kwargs))

    def weights(self):
        return {f"{c}.{k}": v.detach().clone() for c in ("unet", "text_encoder")
                for k, v in getattr(self.engine.pipe, c).state_dict().items()}

    def png(self, *refs, **overrides):
        return generate(self.engine, request(loras=tuple(refs), **overrides)).images[0].png

    def apply(self, *refs):
        lora_apply.apply(self.engine.loader, for_pipeline(self.engine.pipe), refs)


class MergeTests(LoraTestCase):
    def test_a_kohya_lora_at_0_8_gives_diffusers_own_image(self):
        needs_peft()
        path = self.kohya()
        ours = self.png(LoraRef("style", path, 0.8, 0.8))
        reference = Engine(device="cpu")
        pipe = reference.load(tiny_model())
        pipe.load_lora_weights(str(root()), weight_name="style.safetensors", adapter_name="style")
        pipe.fuse_lora(lora_scale=0.8)
        theirs = generate(reference, request()).images[0].png
        # The same arithmetic as peft's merge (B @ A, times alpha / rank times the weight,
        # added to W; a 3x3 LoCon as a convolution): the same bits, so the same image.
        self.assertEqual(ours, theirs)
        self.assertNotEqual(ours, self.png())

    def test_text_encoder_attention_as_peft_merges_it(self):
        # diffusers 0.42 with transformers 5 drops a text encoder's attention LoRA on load
        # (its adapter path), so peft's own layers, merged, are the reference here.
        needs_peft()
        import copy

        from peft import LoraConfig, inject_adapter_in_model

        te = self.pipe.text_encoder
        names = lf.modules_of(te, ("q_proj", "v_proj", "out_proj"))
        state = lf.kohya_state([("lora_te_", te, n) for n in names])
        self.apply(LoraRef("te", self.lora("te-attention", state), 0.8, 0.8))
        ours = {n: te.get_submodule(n).weight.detach().clone() for n in names}
        self.apply()
        config = LoraConfig(r=4, lora_alpha=2, target_modules=["q_proj", "v_proj", "out_proj"])
        theirs = inject_adapter_in_model(config, copy.deepcopy(te), adapter_name="default")
        for n in names:
            layer, key = theirs.get_submodule(n), lf.kohya_name("lora_te_", n)
            layer.lora_A["default"].weight.data.copy_(state[key + ".lora_down.weight"])
            layer.lora_B["default"].weight.data.copy_(state[key + ".lora_up.weight"])
            layer.scale_layer(0.8)
            layer.merge()
            self.assertTrue(torch.equal(ours[n], layer.base_layer.weight), n)

    def test_weight_zero_and_the_next_job_without_it_give_the_base_image(self):
        path = self.kohya()
        base, before = self.png(), self.weights()
        self.assertEqual(self.png(LoraRef("style", path, 0.0, 0.0)), base)
        self.assertNotEqual(self.png(LoraRef("style", path, 0.8, 0.8)), base)
        self.assertEqual(self.png(), base)
        after = self.weights()
        self.assertTrue(all(torch.equal(before[k], after[k]) for k in before))
        # Only the text encoders, then only the UNet: each changes the picture on its own.
        te_only, unet_only = self.png(LoraRef("style", path, 1, 0)), self.png(LoraRef("style", path, 0, 1))
        self.assertEqual(len({base, te_only, unet_only}), 3)
        self.assertEqual(self.png(), base)

    def test_the_same_set_twice_merges_once_and_reads_once(self):
        path = self.kohya()
        ref = LoraRef("style", path, 0.8, 0.8)
        first = self.png(ref)
        merged = self.engine.loader.current.loras
        self.assertEqual((merged.merges, self.engine.loader.loras.reads), (1, 1))
        self.assertEqual(self.png(ref, seed=1234), first)
        self.assertEqual((merged.merges, self.engine.loader.loras.reads), (1, 1))
        self.png(LoraRef("style", path, 0.5, 0.8))  # another weight: another set, the file read already
        self.assertEqual((merged.merges, self.engine.loader.loras.reads), (2, 1))
        self.assertGreater(self.engine.loader.used_bytes, self.engine.loader.current.nbytes - merged.nbytes)

    def test_two_loras_at_once_each_with_its_weight(self):
        a, b = self.kohya("a", seed=1), self.kohya("b", seed=2, rank=2, alpha=None)
        base = self.weights()
        self.apply(LoraRef("a", a, 0.8, 0.8), LoraRef("b", b, 0.5, -0.3))
        both = self.weights()
        state_a = lf.kohya_state(self.targets(), seed=1)
        state_b = lf.kohya_state(self.targets(), seed=2, rank=2, alpha=None)
        key = "lora_unet_" + lf.modules_of(self.pipe.unet, ("attn1.to_q",))[0].replace(".", "_")
        name = "unet." + lf.modules_of(self.pipe.unet, ("attn1.to_q",))[0] + ".weight"
        up_a, down_a = state_a[key + ".lora_up.weight"], state_a[key + ".lora_down.weight"]
        up_b, down_b = state_b[key + ".lora_up.weight"], state_b[key + ".lora_down.weight"]
        expected = base[name] + 0.8 * (2.0 / 4) * (up_a @ down_a) - 0.3 * (up_b @ down_b)
        torch.testing.assert_close(both[name], expected)
        self.apply(LoraRef("a", a, 0.8, 0.8))
        self.assertFalse(torch.equal(self.weights()[name], both[name]))
        self.apply()
        self.assertTrue(torch.equal(self.weights()[name], base[name]))

    def test_a_pt_file_is_read_with_the_restricted_unpickler(self):
        state = lf.kohya_state(self.targets(), seed=3)
        safe = self.lora("same", state)
        pt = self.lora("same", state, suffix=".pt")
        self.apply(LoraRef("same", safe, 1, 1))
        from_safetensors = self.weights()
        self.apply(LoraRef("same", pt, 1, 1))
        self.assertTrue(all(torch.equal(v, self.weights()[k]) for k, v in from_safetensors.items()))

        class Evil:
            def __reduce__(self):
                import os
                return (os.system, ("true",))
        evil = root() / "evil.pt"
        torch.save({"lora_unet_x.lora_down.weight": torch.zeros(1), "payload": Evil()}, str(evil))
        e = self.assertRaises(errors.RunaiError, self.apply, LoraRef("evil", str(evil), 1, 1))
        self.assertEqual(e.code, errors.MODEL_LOAD_FAILED)
        self.assertIn("refused to unpickle", e.message)


class LycorisTests(LoraTestCase):
    def merged(self, state, name, weight=0.7):
        self.apply(LoraRef(name, self.lora(name, state), weight, weight))
        after = self.weights()
        self.apply()
        return after

    def test_loha_delta_equals_the_hand_computation(self):
        targets = self.targets(unet=("attn1.to_q", "up_blocks.0.resnets.0.conv1"), te=("mlp.fc1",))
        state = lf.kohya_state(targets, kind="loha", rank=3, alpha=1.5, seed=4)
        base, after = self.weights(), self.merged(state, "loha")
        for prefix, component, path in targets:
            key, name = lf.kohya_name(prefix, path), ("unet." if prefix == "lora_unet_" else "text_encoder.") + path
            w = base[name + ".weight"]
            d = ((state[key + ".hada_w1_a"] @ state[key + ".hada_w1_b"])
                 * (state[key + ".hada_w2_a"] @ state[key + ".hada_w2_b"])).reshape(w.shape)
            torch.testing.assert_close(after[name + ".weight"], w + 0.7 * (1.5 / 3) * d)

    def test_lokr_delta_equals_the_hand_computation(self):
        targets = self.targets(unet=("attn2.to_k", "proj_in"), te=("mlp.fc2",))
        state = lf.kohya_state(targets, kind="lokr", rank=2, alpha=1.0, seed=5)
        base, after = self.weights(), self.merged(state, "lokr")
        for prefix, component, path in targets:
            key, name = lf.kohya_name(prefix, path), ("unet." if prefix == "lora_unet_" else "text_encoder.") + path
            w = base[name + ".weight"]
            d = torch.kron(state[key + ".lokr_w1"], state[key + ".lokr_w2_a"] @ state[key + ".lokr_w2_b"])
            torch.testing.assert_close(after[name + ".weight"], w + 0.7 * (1.0 / 2) * d.reshape(w.shape))

    def test_a_diffusers_peft_format_lora_equals_its_kohya_twin(self):
        kohya = lf.kohya_state(self.targets(te=("q_proj",)), seed=6, alpha=None)
        peft = {}
        for key, tensor in kohya.items():
            module, part = key.split(".", 1)
            for prefix, component, path in self.targets(te=("q_proj",)):
                if lf.kohya_name(prefix, path) == module:
                    head = ("unet." if prefix == "lora_unet_" else "text_encoder.text_model.") + path
                    peft[head + (".lora_A.weight" if "down" in part else ".lora_B.weight")] = tensor
        a, b = self.merged(kohya, "k-twin"), self.merged(peft, "p-twin")
        self.assertTrue(all(torch.equal(a[k], b[k]) for k in a))


    def test_a_peft_lora_with_diffusers_metadata_merges_as_diffusers_does(self):
        needs_peft()
        import json

        kohya = lf.kohya_state(self.targets(te=()), seed=13, alpha=None)
        peft = {}
        for prefix, component, path in self.targets(te=()):
            key = lf.kohya_name(prefix, path)
            peft[f"unet.{path}.lora_A.weight"] = kohya[key + ".lora_down.weight"]
            peft[f"unet.{path}.lora_B.weight"] = kohya[key + ".lora_up.weight"]
        meta = {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 3, "unet.target_modules": [
            path for _, _, path in self.targets(te=())]})}
        path = self.lora("peft-meta", peft, meta)
        self.apply(LoraRef("peft-meta", path, 0.9, 0.9))
        ours = self.weights()
        self.apply()
        reference = Engine(device="cpu").load(tiny_model())
        reference.load_lora_weights(str(root()), weight_name="peft-meta.safetensors", adapter_name="m")
        reference.fuse_lora(lora_scale=0.9, components=["unet"])
        reference.unload_lora_weights()
        theirs = {f"unet.{k}": v for k, v in reference.unet.state_dict().items()}
        self.assertTrue(all(torch.equal(ours[k], v) for k, v in theirs.items()))
        self.assertFalse(all(torch.equal(ours[k], v) for k, v in self.weights().items()))


class RefusalTests(LoraTestCase):
    def test_an_sdxl_lora_on_an_sd1_model_names_it_and_changes_nothing(self):
        header = {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 32),
                  "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(128, 4),
                  "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 32),
                  "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(128, 4)}
        path = self.lora("xl-style", header)
        good = self.kohya()
        self.apply(LoraRef("style", good, 1, 1))
        before = self.weights()
        e = self.assertRaises(errors.RunaiError, self.png, LoraRef("style", good, 1, 1),
                              LoraRef("xl-style", path, 1, 1))
        self.assertEqual(e.code, errors.BAD_REQUEST)
        self.assertIn("'xl-style'", e.message)
        self.assertIn("SDXL", e.message)
        after = self.weights()
        self.assertTrue(all(torch.equal(before[k], after[k]) for k in before))

    def test_keys_that_match_nothing_or_do_not_fit(self):
        nothing = self.lora("nothing", {"lora_unet_no_such_module.lora_down.weight": torch.zeros(2, 8),
                                        "lora_unet_no_such_module.lora_up.weight": torch.zeros(8, 2)})
        e = self.assertRaises(errors.RunaiError, self.apply, LoraRef("nothing", nothing, 1, 1))
        self.assertIn("matches nothing", e.message)
        name = lf.kohya_name("lora_unet_", lf.modules_of(self.pipe.unet, ("attn2.to_k",))[0])
        wrong = self.lora("wrong", {name + ".lora_down.weight": torch.zeros(4, 768),
                                    name + ".lora_up.weight": torch.zeros(320, 4)})
        e = self.assertRaises(errors.RunaiError, self.apply, LoraRef("wrong", wrong, 1, 1))
        self.assertEqual(e.code, errors.BAD_REQUEST)
        self.assertIn("SD 1.x", e.message)  # its cross-attention width says so
        dora = self.lora("dora", {name + ".lora_down.weight": torch.zeros(4, 32), name + ".lora_up.weight":
                                  torch.zeros(64, 4), name + ".dora_scale": torch.zeros(1, 32)})
        e = self.assertRaises(errors.RunaiError, self.apply, LoraRef("dora", dora, 1, 1))
        self.assertIn("dora_scale", e.message)
