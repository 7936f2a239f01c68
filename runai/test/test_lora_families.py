"""LoRAs on the other families (runai.models.lora_apply): SDXL's kohya files in the
original (SGM) UNet names with two text encoders, FLUX.1's in BFL's names (through
diffusers' converter), SD3's in diffusers' names; each merged exactly as diffusers' own
``load_lora_weights`` + ``fuse_lora`` merges it, and taken out bit for bit."""

import atexit
import shutil
import tempfile
from pathlib import Path

import torch
from twisted.trial.unittest import SynchronousTestCase

from runai.core import errors
from runai.engine.engine import Engine
from runai.families import for_pipeline
from runai.models import ldm_layout, lora_apply
from runai.models.loras import LoraRef
from runai.test import lora_fixtures as lf
from runai.test.test_lora_apply import needs_peft

_built = {}


def tiny(kind):
    if "root" not in _built:
        root = Path(tempfile.mkdtemp(prefix="runai-lora-families-"))
        atexit.register(shutil.rmtree, str(root), True)
        _built["root"] = root
    if kind not in _built:
        from runai.test.tiny_flow import build_tiny_flux_pipeline, build_tiny_sd3_pipeline
        from runai.test.tiny_xl import build_tiny_sdxl_pipeline

        build = {"sdxl": build_tiny_sdxl_pipeline, "flux": build_tiny_flux_pipeline, "sd3": build_tiny_sd3_pipeline}
        _built[kind] = str(build[kind](_built["root"] / kind))
    return _built[kind]


def weights(pipe, components):
    return {f"{c}.{k}": v.detach().clone() for c in components for k, v in getattr(pipe, c).state_dict().items()}


class FamilyCase(SynchronousTestCase):
    kind = None
    components = ()

    def setUp(self):
        needs_peft()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        self.addCleanup(torch.set_num_threads, threads)
        self.engine = Engine(device="cpu")
        self.pipe = self.engine.load(tiny(self.kind))
        self.folder = Path(self.mktemp())

    def check_as_diffusers_merges(self, state, weight=0.8):
        path = lf.save(self.folder / "lora.safetensors", state)
        base = weights(self.pipe, self.components)
        lora_apply.apply(self.engine.loader, for_pipeline(self.pipe), (LoraRef("lora", str(path), weight, weight),))
        ours = weights(self.pipe, self.components)
        lora_apply.apply(self.engine.loader, for_pipeline(self.pipe), ())
        after = weights(self.pipe, self.components)
        self.assertTrue(all(torch.equal(base[k], after[k]) for k in base))
        reference = Engine(device="cpu").load(tiny(self.kind))
        reference.load_lora_weights(str(self.folder), weight_name="lora.safetensors", adapter_name="x")
        reference.fuse_lora(lora_scale=weight, components=list(self.components))
        reference.unload_lora_weights()
        theirs = weights(reference, self.components)
        changed = [k for k in base if not torch.equal(base[k], ours[k])]
        self.assertTrue(changed)
        for key in base:
            self.assertTrue(torch.equal(ours[key], theirs[key]), (key, torch.equal(base[key], theirs[key])))
        return changed


class SdxlTests(FamilyCase):
    kind = "sdxl"
    components = ("unet", "text_encoder", "text_encoder_2")

    def test_a_kohya_lora_in_sgm_names_with_both_text_encoders(self):
        unet = self.pipe.unet
        # kohya writes SDXL's UNet with the original model's names: from diffusers' ones here.
        state = {k: v for k, v in unet.state_dict().items()}
        ldm = ldm_layout.unet_to_ldm(state, dict(unet.config), sdxl=True)
        by_tensor = {id(v): k[len(ldm_layout.UNET):-len(".weight")] for k, v in ldm.items() if k.endswith(".weight")}
        chosen = lf.modules_of(unet, ("attn1.to_q", "attn2.to_k", "attn2.to_out.0", "ff.net.2", "proj_in",
                                      "resnets.0.conv1", "resnets.0.time_emb_proj", "downsamplers.0.conv"))
        sgm = {path: by_tensor[id(state[path + ".weight"])] for path in chosen}
        kohya = lf.kohya_state([("lora_unet_", unet, p) for p in chosen], seed=7)
        for path, name in sgm.items():
            old, new = lf.kohya_name("lora_unet_", path), "lora_unet_" + name.replace(".", "_")
            for part in (".lora_down.weight", ".lora_up.weight", ".alpha"):
                kohya[new + part] = kohya.pop(old + part)
        kohya.update(lf.kohya_state([("lora_te1_", self.pipe.text_encoder, p) for p in
                                     lf.modules_of(self.pipe.text_encoder, ("mlp.fc1",))], seed=8))
        kohya.update(lf.kohya_state([("lora_te2_", self.pipe.text_encoder_2, p) for p in
                                     lf.modules_of(self.pipe.text_encoder_2, ("mlp.fc2",))], seed=9))
        changed = self.check_as_diffusers_merges(kohya)
        self.assertEqual({k.split(".")[0] for k in changed}, set(self.components))
        self.assertTrue(any("downsamplers" in k for k in changed) and any("time_emb_proj" in k for k in changed))


class FluxTests(FamilyCase):
    kind = "flux"
    components = ("transformer",)

    def peft_state(self, endings, seed):
        transformer = self.pipe.transformer
        g = torch.Generator().manual_seed(seed)
        state = {}
        for path in lf.modules_of(transformer, endings):
            weight = transformer.get_submodule(path).weight
            state[f"transformer.{path}.lora_A.weight"] = torch.randn(4, weight.shape[1], generator=g) * 0.3
            state[f"transformer.{path}.lora_B.weight"] = torch.randn(weight.shape[0], 4, generator=g) * 0.3
        return state

    def test_a_diffusers_format_lora(self):
        state = self.peft_state(("attn.to_q", "attn.add_v_proj", "single_transformer_blocks.0.proj_out"), 10)
        changed = self.check_as_diffusers_merges(state)
        self.assertIn("transformer.single_transformer_blocks.0.proj_out.weight", changed)

    def test_kohya_names_of_diffusers_modules_and_what_the_converter_refuses(self):
        peft = self.peft_state(("attn.to_k", "ff.net.2"), 12)
        kohya = {}
        for key, tensor in peft.items():
            module, part = key[len("transformer."):].rsplit(".", 2)[0], key.rsplit(".", 2)[1]
            kohya[f"lora_transformer_{module.replace('.', '_')}.{'lora_down' if part == 'lora_A' else 'lora_up'}"
                  ".weight"] = tensor
        merged = []
        for name, state in (("peft", peft), ("kohya", kohya)):
            path = lf.save(self.folder / f"{name}.safetensors", state)
            lora_apply.apply(self.engine.loader, for_pipeline(self.pipe), (LoraRef(name, str(path), 1, 0.7),))
            merged.append(weights(self.pipe, self.components))
        lora_apply.apply(self.engine.loader, for_pipeline(self.pipe), ())
        self.assertTrue(all(torch.equal(merged[0][k], merged[1][k]) for k in merged[0]))
        # BFL's names go through diffusers' converter, which knows only FLUX.1's real sizes.
        bfl = lf.save(self.folder / "bfl.safetensors", {
            "lora_unet_single_blocks_0_linear1.lora_down.weight": torch.ones(4, 32),
            "lora_unet_single_blocks_0_linear1.lora_up.weight": torch.ones(224, 4)})
        e = self.assertRaises(errors.RunaiError, lora_apply.apply, self.engine.loader, for_pipeline(self.pipe),
                              (LoraRef("bfl", str(bfl), 1, 1),))
        self.assertEqual(e.code, errors.BAD_REQUEST)


class Sd3Tests(FamilyCase):
    kind = "sd3"
    components = ("transformer",)

    def test_a_diffusers_format_lora(self):
        transformer = self.pipe.transformer
        g = torch.Generator().manual_seed(11)
        state = {}
        for path in lf.modules_of(transformer, ("attn.to_q", "attn.add_k_proj", "ff.net.2")):
            weight = transformer.get_submodule(path).weight
            state[f"transformer.{path}.lora_A.weight"] = torch.randn(4, weight.shape[1], generator=g) * 0.3
            state[f"transformer.{path}.lora_B.weight"] = torch.randn(weight.shape[0], 4, generator=g) * 0.3
        self.check_as_diffusers_merges(state, weight=0.6)
