# -*- test-case-name: runai.test.test_cli_pull -*-
"""Which of a Hub repository's files runai uses, from its listing alone (``runai pull``).

Torch-free and network-free: names in, names out. A diffusers repository gives
``model_index.json`` and, for each component it names, its configs and tokenizer files
and one set of ``.safetensors`` weights (one precision: the ``--variant``'s where the
component has it, else the plain ones); never the ``.bin``/``.ckpt``/``.onnx``/``.msgpack``
twins, nor ``flax``/``onnx``/``openvino`` folders, nor single files lying beside the
folders. Variant weights are installed under the plain names, since runai loads a folder's
plain files (``diffusion_pytorch_model.fp16.safetensors`` becomes
``diffusion_pytorch_model.safetensors``). Single files need only the tokenizers of their
base family (:data:`BASES`): runai ships the rest of the configs.
"""

import json
import posixpath
import re

# What a tokenizer folder of each kind needs (the files present are fetched; the loaders
# want vocab.json and merges.txt or a tokenizer.json for CLIP, a tokenizer.json or
# spiece.model for T5).
CLIP_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                        "special_tokens_map.json")
T5_TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer_config.json", "special_tokens_map.json")

CLIP_L = ("openai/clip-vit-large-patch14", CLIP_TOKENIZER_FILES)
CLIP_G = ("laion/CLIP-ViT-bigG-14-laion2B-39B-b160k", CLIP_TOKENIZER_FILES)
T5XXL = ("google/t5-v1_1-xxl", T5_TOKENIZER_FILES)

# ``--base``: the repositories (and their files) that single files of a family need, where
# runai's loaders look for them (runai.models.singlefile, singlefile_xl, flowconfigs; a
# test keeps them the same). SD 2.x's tokenizer is CLIP's BPE too.
BASES = {
    "sd15": (CLIP_L,),
    "sd2": (CLIP_L,),
    "sdxl": (CLIP_L, CLIP_G),
    "sd3": (CLIP_L, CLIP_G, T5XXL),
    "flux": (CLIP_L, T5XXL),
}

CONFIG_SUFFIXES = (".json", ".txt", ".model")
OTHER_WEIGHTS = (".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".onnx", ".onnx_data", ".h5", ".pb", ".ot", ".gguf")
_WEIGHTS = re.compile(r"(?P<stem>[^.]+)(?:\.(?P<variant>[A-Za-z0-9_]+))?(?P<shard>-\d+-of-\d+)?\.safetensors")
_INDEX = re.compile(r"(?P<stem>[^.]+)\.safetensors\.index(?:\.(?P<variant>[A-Za-z0-9_]+))?\.json")
_SAFE_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._ +()-]*")


class SelectionError(Exception):
    """Why the repository's files do not make a model runai can pull, in one line."""


def safe_path(name):
    """Whether a repository path is plain: relative, ``/``-separated, no ``..``, no hidden part."""
    parts = name.split("/")
    return all(_SAFE_PART.fullmatch(p) and ".." not in p for p in parts) and len(name) <= 500


def _weights(name):
    """``(plain name, variant)`` of a ``.safetensors`` weight file or its shard index, else None."""
    m = _WEIGHTS.fullmatch(name)
    if m:
        return f"{m['stem']}{m['shard'] or ''}.safetensors", m["variant"]
    m = _INDEX.fullmatch(name)
    if m:
        return f"{m['stem']}.safetensors.index.json", m["variant"]
    return None


def components(model_index):
    """The component folders that ``model_index.json`` (parsed) names: keys not starting
    with ``_`` whose value is ``[library, class]`` with both set."""
    return sorted(key for key, value in model_index.items()
                  if not key.startswith("_") and isinstance(value, list) and len(value) == 2
                  and all(isinstance(v, str) for v in value) and safe_path(key) and "/" not in key)


def diffusers_files(listing, model_index, variant=None):
    """``{repository path: path to install it at}`` for a diffusers repository."""
    chosen = {"model_index.json": "model_index.json"}
    for component in components(model_index):
        inside = [p.split("/", 1)[1] for p in listing if p.startswith(component + "/") and safe_path(p)]
        inside = [name for name in inside if "/" not in name]  # never flax/, onnx/ and the like
        groups, others = {}, []
        for name in inside:
            weights = _weights(name)
            if weights is not None:
                groups.setdefault(weights[1], []).append((name, weights[0]))
            elif name.endswith(OTHER_WEIGHTS) or ".bin.index" in name:
                others.append(name)
            elif name.endswith(CONFIG_SUFFIXES):
                chosen[f"{component}/{name}"] = f"{component}/{name}"
        if variant in groups:
            group = groups[variant]
        elif None in groups:
            group = groups[None]
        elif groups:
            have = ", ".join(sorted(groups))
            raise SelectionError(f"{component}/ has only {have} weights: pull with --variant {sorted(groups)[0]}")
        elif others:
            raise SelectionError(f"{component}/ has no .safetensors weights (only {', '.join(sorted(others))}, "
                                 "which runai does not fetch)")
        else:
            group = []
        chosen.update((f"{component}/{name}", f"{component}/{plain}") for name, plain in group)
    return chosen


def single_files(listing, file=None):
    """``{path: path}`` of a repository without ``model_index.json``: its one ``.safetensors``
    file, or ``file``."""
    weights = sorted(p for p in listing if p.endswith(".safetensors") and safe_path(p))
    if file is not None:
        if file not in weights:
            raise SelectionError(f"the repository has no file {file!r} among its .safetensors files"
                                 + (f" ({', '.join(weights)})" if weights else ""))
        return {file: file}
    if not weights:
        raise SelectionError("the repository has neither model_index.json nor a .safetensors file")
    if len(weights) > 1:
        raise SelectionError(f"the repository holds {len(weights)} .safetensors files; choose one with --file "
                             f"NAME: {', '.join(weights)}")
    return {weights[0]: weights[0]}


def base_files(listing, wanted):
    """``{path: path}`` of the tokenizer files ``wanted`` that the repository has (at its top)."""
    chosen = {name: name for name in wanted if name in listing}
    if not chosen:
        raise SelectionError(f"the repository has none of {', '.join(wanted)}")
    return chosen


def rewrite_index(text, renames):
    """A shard index (``*.safetensors.index.json``) whose ``weight_map`` names the installed files."""
    index = json.loads(text)
    names = {posixpath.basename(a): posixpath.basename(b) for a, b in renames.items()}
    index["weight_map"] = {k: names.get(v, v) for k, v in index.get("weight_map", {}).items()}
    return json.dumps(index, indent=2)
