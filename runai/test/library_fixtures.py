"""A model folder laid out as users have them, with tiny models in every format and
version, and header-only checkpoints with the real key names and shapes of SD 1.x, 2.x
and SDXL. Built once per test process, in a temporary folder, never in the repository.

Tiny single files are made by runai's own export (diffusers -> LDM layout), which the
layout tests check against diffusers' own single-file loader.
"""

import atexit
import contextlib
import json
import os
import shutil
import struct
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch

from twisted.logger import LogLevel, globalLogPublisher

from runai.models import checkpoint
from runai.models import convert
from runai.models import ldm_layout
from runai.test.tiny import build_tiny_pipeline

V2_WIDTH = 64  # the tiny v2 model's text width, where SD 2 has 1024 (v1's tiny one has 32)

_state = {}


def forbid_hub(testcase, pipeline_class):
    """Make every Hub download, and ``pipeline_class.from_single_file`` (which would reach
    for one), fail for the rest of ``testcase``; returns the list of calls tried."""
    import huggingface_hub

    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("a network or Hub call")

    for name in ("hf_hub_download", "snapshot_download"):
        testcase.patch(huggingface_hub, name, refuse)
    testcase.patch(pipeline_class, "from_single_file", classmethod(refuse))
    return calls


def _root():
    if "root" not in _state:
        root = Path(os.path.realpath(tempfile.mkdtemp(prefix="runai-library-")))
        atexit.register(shutil.rmtree, str(root), True)
        _state["root"] = root
    return _state["root"]


def tiny_source(kind):
    """A tiny diffusers folder outside the model folder: v1, v2, v1-inpaint, v2-v."""
    if kind not in _state:
        path = _root() / "sources" / kind
        if kind == "v1":
            build_tiny_pipeline(path, seed=1)
        elif kind == "v1-inpaint":
            build_tiny_pipeline(path, seed=3, in_channels=9)
        elif kind == "v2":
            build_tiny_pipeline(path, seed=2, version="v2", cross_attention_dim=V2_WIDTH)
        elif kind == "v2-v":
            build_tiny_pipeline(path, seed=4, version="v2", cross_attention_dim=V2_WIDTH,
                                prediction_type="v_prediction")
        else:
            raise KeyError(kind)
        _state[kind] = path
    return _state[kind]


def ldm_state(kind):
    """The tiny model's weights in the LDM layout, as tensors."""
    key = ("ldm", kind)
    if key not in _state:
        _state[key] = convert.diffusers_to_ldm(tiny_source(kind))[0]
    return _state[key]


def reference(kind):
    """The tiny model ``kind`` as diffusers itself loads it."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(str(tiny_source(kind)), local_files_only=True,
                                                   safety_checker=None, low_cpu_mem_usage=False)


def assertSameWeights(test, loaded, reference, components=("unet", "vae", "text_encoder")):
    """Every weight of every component equal: diffusers' single-file loader leaves a
    weight it did not find at its random initial value, silently, so sampling is not enough."""
    for component in components:
        mine, theirs = getattr(loaded, component).state_dict(), getattr(reference, component).state_dict()
        test.assertEqual(set(mine), set(theirs), component)
        different = [k for k in theirs if not torch.equal(mine[k], theirs[k])]
        test.assertEqual(different, [], component)


def capture_warnings(test):
    """The warnings and errors logged from now until ``test`` ends."""
    events = []

    def observe(event):
        if event.get("log_level") in (LogLevel.warn, LogLevel.error):
            events.append(event)

    globalLogPublisher.addObserver(observe)
    test.addCleanup(globalLogPublisher.removeObserver, observe)
    return events


# -- .ckpt as pytorch_lightning wrote them -------------------------------------------------------


class _FakeModule:
    """Puts stand-in modules into sys.modules while a pickle is written, so that the file
    names the very globals a real SD 1.x checkpoint names."""

    def __init__(self, names):
        self.names = names
        self.saved = {}

    def __enter__(self):
        for name, attrs in self.names.items():
            self.saved[name] = sys.modules.get(name)
            module = types.ModuleType(name)
            for attr, value in attrs.items():
                setattr(module, attr, value)
            sys.modules[name] = module
        return self

    def __exit__(self, *exc):
        for name, old in self.saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old


class ModelCheckpoint:
    pass


ModelCheckpoint.__module__ = "pytorch_lightning.callbacks.model_checkpoint"


def scalar(dtype, data):  # numpy 1.x's numpy.core.multiarray.scalar, by name only
    raise AssertionError("never called: only pickled")


scalar.__module__ = "numpy.core.multiarray"


class _OldNumpyScalar:
    """Pickles as numpy 1.x pickled a float64 scalar."""

    def __reduce__(self):
        return scalar, (np.dtype("float64"), b"\x00" * 6 + b"\xf8?")


def write_lightning_ckpt(path, state):
    """A .ckpt shaped like the SD 1.x releases: the weights under "state_dict", beside a
    pytorch_lightning callback state holding numpy scalars (of numpy 1.x and 2.x)."""
    packages = {
        "pytorch_lightning": {},
        "pytorch_lightning.callbacks": {},
        "pytorch_lightning.callbacks.model_checkpoint": {"ModelCheckpoint": ModelCheckpoint},
        "numpy.core.multiarray": {"scalar": scalar},
    }
    with _FakeModule(packages):
        torch.save({
            "epoch": 6,
            "global_step": 840000,
            "pytorch-lightning_version": "1.4.2",
            "state_dict": state,
            "callbacks": {ModelCheckpoint: {
                "monitor": None, "best_model_score": _OldNumpyScalar(), "best_model_path": "",
                "current_score": np.float64(0.25), "dtype": np.dtype("float32"),
            }},
        }, str(path))
    return Path(path)


# -- header-only checkpoints -------------------------------------------------------------------

DTYPE_BYTES = {"F16": 2, "F32": 4, "BF16": 2}


def write_header_only(path, shapes, dtype="F16", metadata=None, pad_to=None):
    """A valid .safetensors header for ``shapes`` followed by *sparse* data: as big on
    paper as the real thing, a few KB on disk. ``pad_to`` makes it at least that big."""
    header = {}
    offset = 0
    for name in sorted(shapes):
        n = DTYPE_BYTES[dtype]
        for d in shapes[name]:
            n *= d
        header[name] = {"dtype": dtype, "shape": list(shapes[name]), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        f.truncate(max(8 + len(raw) + offset, pad_to or 0))
    return path


def real_layout(version, inpainting=False):
    """``{key: shape}`` of a real SD 1.5 / 2.1 checkpoint, from runai's shipped configs and
    export mapping, built on the meta device (no memory, no weights)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from runai.models import sdconfigs

    configs = sdconfigs.SD15 if version == "v1" else sdconfigs.SD21
    unet_config = dict(configs["unet"], in_channels=9 if inpainting else 4)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
        vae = AutoencoderKL.from_config(configs["vae"])
        text = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in configs["text_encoder"].items()
                                               if k != "architectures"}))
    state = {}
    state.update(ldm_layout.unet_to_ldm(unet.state_dict(), unet_config))
    state.update(ldm_layout.vae_to_ldm(vae.state_dict(), configs["vae"]))
    text_state = text.state_dict()
    state.update(ldm_layout.clip_to_ldm(text_state) if version == "v1" else ldm_layout.open_clip_to_ldm(text_state))
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    if version == "v2":
        # What the released 2.x files have beyond diffusers' 23 layers: OpenCLIP's last
        # layer (unused by SD 2) and its projection.
        shapes["cond_stage_model.model.text_projection"] = (1024, 1024)
        shapes["cond_stage_model.model.logit_scale"] = ()
    else:
        shapes["cond_stage_model.transformer.text_model.embeddings.position_ids"] = (1, 77)
    return shapes


# Keys and shapes as they are in the released files, written down from them; the tests
# check that real_layout() reproduces them.
KNOWN_SD15 = {
    "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
    "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
    "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
    "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight": (1280, 768),
    "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
    "model.diffusion_model.time_embed.0.weight": (1280, 320),
    "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
    "first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3),
    "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
    "first_stage_model.decoder.up.3.block.0.conv1.weight": (512, 512, 3, 3),
    "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
    "first_stage_model.quant_conv.weight": (8, 8, 1, 1),
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
    "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": (77, 768),
    "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
    "cond_stage_model.transformer.text_model.final_layer_norm.weight": (768,),
}

KNOWN_SD21 = {
    "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320),
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
    "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
    "model.diffusion_model.output_blocks.11.1.proj_out.weight": (320, 320),
    "cond_stage_model.model.token_embedding.weight": (49408, 1024),
    "cond_stage_model.model.positional_embedding": (77, 1024),
    "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": (3072, 1024),
    "cond_stage_model.model.transformer.resblocks.22.mlp.c_fc.weight": (4096, 1024),
    "cond_stage_model.model.ln_final.weight": (1024,),
}

# SDXL base: two text encoders (CLIP-L, OpenCLIP bigG), a 2048-wide context, and size
# conditioning (label_emb). A subset: what classification looks at and some more.
SDXL_BASE = {
    "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
    "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
    "model.diffusion_model.input_blocks.4.1.proj_in.weight": (640, 640),
    "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (640, 2048),
    "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight": (1280, 2048),
    "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
    "conditioner.embedders.1.model.token_embedding.weight": (49408, 1280),
    "conditioner.embedders.1.model.positional_embedding": (77, 1280),
    "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight": (3840, 1280),
    "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": (1280,),
    "conditioner.embedders.1.model.text_projection": (1280, 1280),
    "first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3),
}


# -- the model folder ---------------------------------------------------------------------------


def _export(kind, dst):
    dst.parent.mkdir(parents=True, exist_ok=True)
    convert.diffusers_to_single_file(tiny_source(kind), dst)
    return dst


def model_folder():
    """The shared model folder (a realpath). Do not write into it; copy what you change.

    ====================================  =====================================
    runwayml/stable-diffusion-v1-5/       tiny v1, diffusers (a base model)
    stabilityai/stable-diffusion-2-1-base/ tiny v2, diffusers (a base model)
    openai/clip-vit-large-patch14/        a transformers folder: not a model
    v1/both/, both.safetensors, both.ckpt the same tiny v1 in three formats
    v1/pair.safetensors, pair.ckpt       no folder: .safetensors wins
    v1/old.ckpt                          a pytorch_lightning-style .ckpt
    v1/inpaint.safetensors               tiny v1 inpainting (9 channels)
    v1/misplaced.safetensors             v2 weights in the v1 folder
    v1/vae.safetensors                   a VAE alone: listed, not served
    v1/sub/deep/nested.safetensors       found at any depth
    v2/tiny.safetensors                  tiny v2, epsilon
    v2/vpred.safetensors + vpred.yaml    tiny v2; the side-car says v-prediction
    sdxl/base.safetensors                header-only SDXL: listed, served (cannot load)
    v1/outside.safetensors               a link to a file outside: skipped
    ====================================  =====================================
    """
    if "models" in _state:
        return _state["models"]
    models = _root() / "models"
    shutil.copytree(tiny_source("v1"), models / "runwayml" / "stable-diffusion-v1-5")
    shutil.copytree(tiny_source("v2"), models / "stabilityai" / "stable-diffusion-2-1-base")
    clip = models / "openai" / "clip-vit-large-patch14"
    clip.mkdir(parents=True)
    (clip / "config.json").write_text("{}")
    write_header_only(clip / "model.safetensors", {"text_model.embeddings.position_ids": (1, 77)})
    v1 = models / "v1"
    shutil.copytree(tiny_source("v1"), v1 / "both")
    both = _export("v1", v1 / "both.safetensors")
    write_lightning_ckpt(v1 / "both.ckpt", ldm_state("v1"))
    shutil.copy(both, v1 / "pair.safetensors")
    write_lightning_ckpt(v1 / "pair.ckpt", ldm_state("v1"))
    write_lightning_ckpt(v1 / "old.ckpt", ldm_state("v1"))
    _export("v1-inpaint", v1 / "inpaint.safetensors")
    _export("v2", v1 / "misplaced.safetensors")
    from safetensors.torch import save_file

    vae_only = {k: v for k, v in ldm_state("v1").items() if k.startswith("first_stage_model.")}
    save_file({k.removeprefix("first_stage_model."): v.contiguous() for k, v in vae_only.items()},
              str(v1 / "vae.safetensors"))
    (v1 / "sub" / "deep").mkdir(parents=True)
    shutil.copy(both, v1 / "sub" / "deep" / "nested.safetensors")
    _export("v2", models / "v2" / "tiny.safetensors")
    _export("v2-v", models / "v2" / "vpred.safetensors")
    # Only the parameterization matters to runai; real side-cars are whole LDM configs.
    (models / "v2" / "vpred.yaml").write_text(
        "model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n  params:\n"
        "    parameterization: \"v\"\n    unet_config:\n      params:\n        context_dim: 1024\n"
    )
    write_header_only(models / "sdxl" / "base.safetensors", SDXL_BASE)
    outside = _root() / "outside.safetensors"
    shutil.copy(both, outside)
    os.symlink(outside, v1 / "outside.safetensors")
    _state["models"] = models
    return models


EXPECTED = {
    # name: (version, format, inpainting, prediction_type, served)
    "runwayml/stable-diffusion-v1-5": ("v1", "diffusers", False, "epsilon", True),
    "stabilityai/stable-diffusion-2-1-base": ("v2", "diffusers", False, "epsilon", True),
    "v1/both": ("v1", "diffusers", False, "epsilon", True),
    "v1/both.safetensors": ("v1", "safetensors", False, "epsilon", True),
    "v1/both.ckpt": ("v1", "ckpt", False, "epsilon", True),
    "v1/pair.safetensors": ("v1", "safetensors", False, "epsilon", True),
    "v1/pair.ckpt": ("v1", "ckpt", False, "epsilon", True),
    "v1/old.ckpt": ("v1", "ckpt", False, "epsilon", True),
    "v1/inpaint.safetensors": ("v1", "safetensors", True, "epsilon", True),
    "v1/misplaced.safetensors": ("v2", "safetensors", False, "epsilon", True),
    "v1/vae.safetensors": ("unknown", "safetensors", False, None, False),
    "v1/sub/deep/nested.safetensors": ("v1", "safetensors", False, "epsilon", True),
    "v2/tiny.safetensors": ("v2", "safetensors", False, "epsilon", True),
    "v2/vpred.safetensors": ("v2", "safetensors", False, "v_prediction", True),
    "sdxl/base.safetensors": ("sdxl", "safetensors", False, None, True),
}


@contextlib.contextmanager
def counting_reads():
    """Count the bytes runai.models.checkpoint reads, by shadowing ``open`` in that module alone.

    Yields an object whose ``bytes`` grows with every read.
    """
    counter = types.SimpleNamespace(bytes=0)

    def counting_open(*args, **kwargs):
        f = open(*args, **kwargs)
        read = f.read

        def counted(*a):
            data = read(*a)
            counter.bytes += len(data)
            return data

        f.read = counted
        return f

    checkpoint.open = counting_open
    try:
        yield counter
    finally:
        del checkpoint.open
