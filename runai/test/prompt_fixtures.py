"""A model folder for the prompt tests (emphasis, embeddings, both doors), and embedding
files of every format, written on the fly with random vectors.

``prompt_models()`` holds v1/tiny, sdxl/base and sd3/medium (the shared tiny builders) and
an ``embeddings/`` folder the tests write into and clean up after themselves.
"""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from runai.core.fields import DictFields
from runai.core.requests import Limits, generation_request

_root = None
SD_WIDTH = 32  # v1/tiny's text encoder
XL_WIDTHS = (16, 32)  # sdxl/base's two encoders: clip_l, clip_g
SD3_WIDTHS = (16, 32)  # sd3/medium's two CLIP encoders


def prompt_models():
    """The folder (a realpath), built on first use."""
    global _root
    if _root is None:
        from runai.test.tiny import build_tiny_pipeline
        from runai.test.tiny_flow import build_tiny_sd3_pipeline
        from runai.test.tiny_xl import build_tiny_sdxl_pipeline

        root = Path(os.path.realpath(tempfile.mkdtemp(prefix="runai-prompts-")))
        atexit.register(shutil.rmtree, root, True)
        build_tiny_pipeline(root / "v1" / "tiny")
        build_tiny_sdxl_pipeline(root / "sdxl" / "base")
        build_tiny_sd3_pipeline(root / "sd3" / "medium")
        (root / "embeddings").mkdir()
        _root = root
    return _root


def vectors(rows, width, seed=0, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, width, generator=generator) * scale


def write_embedding(test, name, fmt, tensors, **extra):
    """Write an embedding file of ``fmt`` under ``embeddings/`` (removed at the test's end);
    ``tensors``: one tensor, or ``{"clip_l": ..., "clip_g": ...}``. Returns its path."""
    folder = prompt_models() / "embeddings"
    suffix = {"pt": ".pt", "parameterdict": ".pt", "emb_params": ".safetensors", "diffusers": ".bin",
              "diffusers-safetensors": ".safetensors", "pair": ".safetensors", "pair-pt": ".pt"}[fmt]
    path = folder / (name + suffix)
    if fmt == "pt":
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": tensors}, "name": name,
                    "step": extra.get("step", 100), "sd_checkpoint": "abcdef12", "sd_checkpoint_name": "base"}, path)
    elif fmt == "parameterdict":
        params = torch.nn.ParameterDict({"*": torch.nn.Parameter(tensors)})
        torch.save({"string_to_token": {"*": 265}, "string_to_param": params, "name": name}, path)
    elif fmt == "emb_params":
        save_file({"emb_params": tensors.contiguous()}, str(path))
    elif fmt == "diffusers":
        torch.save({f"<{name}>": tensors}, path)
    elif fmt == "diffusers-safetensors":
        save_file({f"<{name}>": tensors.contiguous()}, str(path))
    elif fmt == "pair":
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    elif fmt == "pair-pt":
        torch.save(dict(tensors), path)
    test.addCleanup(lambda: path.unlink(missing_ok=True))
    return path


def core_request(model, prompt, negative="", **options):
    """A txt2img request through the core's parser (which finds the embeddings)."""
    fields = dict(model=model, prompt=prompt, negative_prompt=negative, steps=2, width=64, height=64, seed=7)
    fields.update(options)
    return generation_request("txt2img", DictFields(fields), prompt_models(), Limits())


_engine = None


def shared_engine():
    """One engine for the modules: the three models stay loaded between tests."""
    global _engine
    if _engine is None:
        from runai.engine.engine import Engine
        from runai.models.library import ModelLibrary

        _engine = Engine(device="cpu", dtype="float32", library=ModelLibrary(prompt_models()), cache_models=3)
    return _engine


def png(engine, request):
    images = []
    engine.generate(request, lambda step, total: None, images.append, lambda: False)
    [image] = images
    return image.png
