"""Tiny LoRA files for the tests, made on the fly: kohya/A1111, LoHa and LoKr factors
written by hand for the modules of a loaded tiny model, a diffusers/peft-format one, and
header-only files (no tensor data) for the torch-free listing tests."""

import json
import struct
from pathlib import Path


def write_lora_header(path, modules=("lora_unet_down_blocks_0_attentions_0_proj_in",), rank=4, width=32,
                      metadata=None):
    """A ``.safetensors`` LoRA whose header is all there is (zeros for data)."""
    header, offset = {}, 0
    for module in modules:
        for part, shape in ((".lora_down.weight", [rank, width]), (".lora_up.weight", [width, rank]),
                            (".alpha", [])):
            n = 2
            for d in shape:
                n *= d
            header[module + part] = {"dtype": "F16", "shape": shape, "data_offsets": [offset, offset + n]}
            offset += n
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + b"\x00" * offset)
    return path


def kohya_name(prefix, module_path):
    """kohya's flattened name of a module: ``lora_unet_`` + the path with "." as "_";
    text encoders as transformers 4 named them (``text_model.``), as real LoRAs do."""
    if prefix.startswith("lora_te") and not module_path.startswith("text_model."):
        module_path = "text_model." + module_path
    return prefix + module_path.replace(".", "_")


def modules_of(component, endings):
    return [name for name, _ in component.named_modules() if name.endswith(tuple(endings))]


def kohya_state(targets, rank=4, alpha=2.0, seed=0, std=0.3, kind="lora"):
    """A kohya-format state dict for ``targets``: ``[(prefix, component, module path)]``.
    ``kind`` "lora", "loha" or "lokr" (LoKr on even-sized weights only)."""
    import torch

    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return (torch.randn(shape, generator=g) * std).contiguous()

    state = {}
    for prefix, component, path in targets:
        weight = component.get_submodule(path).weight
        out, rest = weight.shape[0], weight[0].numel()
        key = kohya_name(prefix, path)
        if kind == "lora":
            state[key + ".lora_down.weight"] = rand(rank, *weight.shape[1:])
            state[key + ".lora_up.weight"] = rand(out, rank, *((1, 1) if weight.dim() == 4 else ()))
        elif kind == "loha":
            for n in ("1", "2"):
                state[key + f".hada_w{n}_a"] = rand(out, rank)
                state[key + f".hada_w{n}_b"] = rand(rank, rest)
        elif kind == "lokr":
            state[key + ".lokr_w1"] = rand(2, 2)
            state[key + ".lokr_w2_a"] = rand(out // 2, rank)
            state[key + ".lokr_w2_b"] = rand(rank, rest // 2)
        if alpha is not None:
            state[key + ".alpha"] = torch.tensor(float(alpha))
    return state


def save(path, state, metadata=None):
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=metadata)
    return path
