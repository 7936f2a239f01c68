# -*- test-case-name: runai.test.test_taesd -*-
"""TAESD decoders in the model folder: where they lie, and their weights as diffusers'
``AutoencoderTiny`` decoder, for full-size live previews.

A family names its decoder (``taesd``, ``taesdxl``, ``taesd3``, ``taef1``:
:attr:`runai.families.base.LatentFormat.taesd`). Two layouts are looked for, in this order:

- AUTOMATIC1111's and ComfyUI's single file, ``VAE-approx/<name>_decoder.safetensors`` or
  ``vae_approx/<name>_decoder.safetensors``: the original TAESD decoder's keys (``1.weight``,
  ``3.conv.0.weight``, ...) or diffusers' (``decoder.layers.0.weight``, ...);
- a diffusers ``AutoencoderTiny`` folder (``config.json`` and
  ``diffusion_pytorch_model.safetensors``): ``madebyollin/<name>``, ``<name>``,
  ``VAE-approx/<name>`` or ``vae_approx/<name>``.

Everything resolves inside the model folder (links to elsewhere are refused), safetensors
only, and a file too big to be a TAESD decoder is refused before it is read. Only the
decoder is kept. Torch and diffusers are imported inside :func:`load_decoder`: it runs in
the worker.
"""

import os
from dataclasses import dataclass
from pathlib import Path

from runai.models.errors import LoadError
from runai.models.paths import check_tree, contained, read_json

FOLDERS = ("VAE-approx", "vae_approx")
WEIGHTS = "diffusion_pytorch_model.safetensors"
# TAESD's decoders are about 5 MB (float32); anything much bigger is something else.
MAX_BYTES = 64 * 1024 * 1024
# Bounds on what a config or a file may describe, so that no config builds a huge network.
MAX_CHANNELS = 1024
MAX_STAGES = 8
MAX_BLOCKS = 16


@dataclass(frozen=True)
class Found:
    """A TAESD decoder found in the model folder: ``path`` (resolved), ``name`` (relative
    to the model folder, for the log), ``weights`` (the safetensors file) and whether it
    is a diffusers folder."""

    path: Path
    name: str
    weights: Path
    folder: bool

    def signature(self):
        """What changes when the weights are replaced (mtime and size), None when gone."""
        try:
            stat = self.weights.stat()
        except OSError:
            return None
        return (stat.st_mtime_ns, stat.st_size)


def find(model_dir, name):
    """The first of ``name``'s decoder layouts present in ``model_dir``, or None.

    Raises LoadError for one that is present but leads outside the model folder.
    """
    model_dir = Path(os.path.realpath(model_dir))
    candidates = [(f"{folder}/{name}_decoder.safetensors", False) for folder in FOLDERS]
    candidates += [(f"{prefix}{name}", True) for prefix in ("madebyollin/", "", *(f + "/" for f in FOLDERS))]
    for relative, folder in candidates:
        path = model_dir / relative
        if not os.path.lexists(path):
            continue
        if folder and not os.path.isfile(path / "config.json"):
            continue  # a folder of that name that is not a diffusers model (a file, say)
        resolved = contained(model_dir, path)
        if resolved is None:
            raise LoadError(f"{relative} is a link to a place outside the model folder")
        if folder:
            if not resolved.is_dir():
                continue
            weights = contained(model_dir, resolved / WEIGHTS)
            if weights is None:
                raise LoadError(f"{relative}/{WEIGHTS} is a link to a place outside the model folder")
            return Found(resolved, relative, weights, True)
        if resolved.is_file():
            return Found(resolved, relative, resolved, False)
    return None


def load_decoder(model_dir, found, device, dtype):
    """``found``'s decoder (diffusers' ``AutoencoderTiny.decoder``), in eval mode on
    ``device`` in ``dtype``, and its latent channels. Raises LoadError for anything that
    is not a TAESD decoder in safetensors."""
    import torch

    try:
        size = found.weights.stat().st_size
    except OSError as e:
        raise LoadError(f"cannot read {found.name}: {e.strerror}")
    if size > MAX_BYTES:
        raise LoadError(f"{found.name} is {size} bytes, too big for a TAESD decoder (at most {MAX_BYTES})")
    if found.folder:
        check_tree(model_dir, found.path)
        config = read_json(Path(os.path.realpath(model_dir)), found.path / "config.json")
        if config is None or config.get("_class_name") != "AutoencoderTiny":
            raise LoadError(f"{found.name}/config.json is not an AutoencoderTiny's config")
        state = _read(found, lambda key: key.startswith("decoder."))
        state = {key[len("decoder.layers."):]: value for key, value in state.items()
                 if key.startswith("decoder.layers.")}
        layout = _config_layout(config, found.name)
    else:
        state = _file_keys(_read(found, lambda key: True), found.name)
        layout = _state_layout(state, found.name)
    decoder = _build(layout, found.name)
    try:
        decoder.layers.load_state_dict(state, strict=True)
    except (RuntimeError, KeyError, ValueError) as e:
        raise LoadError(f"{found.name} does not fit a TAESD decoder: {str(e).splitlines()[0][:300]}")
    decoder.requires_grad_(False)
    return decoder.to(device=torch.device(device), dtype=dtype).eval(), layout["latent_channels"]


def _read(found, wanted):
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(found.weights), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys() if wanted(key)}
    except (SafetensorError, OSError, ValueError) as e:
        raise LoadError(f"{found.name} is not a readable safetensors file: {str(e)[:300]}")


def _file_keys(state, name):
    """A single file's decoder keys in diffusers' numbering: the original's layer 0 is a
    clamp without weights, which diffusers' decoder does outside its layers."""
    if any(key.startswith("decoder.layers.") for key in state):
        return {key[len("decoder.layers."):]: value for key, value in state.items()
                if key.startswith("decoder.layers.")}
    out = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if not head.isdigit() or int(head) < 1 or not rest:
            raise LoadError(f"{name} is not a TAESD decoder (it holds {key[:100]!r})")
        out[f"{int(head) - 1}.{rest}"] = value
    return out


def _state_layout(state, name):
    """The decoder's shape read from its weights: a conv in, stages of blocks each ended
    by a conv (upsampling between them), the last conv to RGB."""
    try:
        last = max(int(key.partition(".")[0]) for key in state)
        latent_channels = state["0.weight"].shape[1]
        blocks, channels, count = [], [], 0
        for i in range(2, last + 1):
            if f"{i}.conv.0.weight" in state:
                count += 1
            elif f"{i}.weight" in state:
                blocks.append(count)
                channels.append(state[f"{i}.weight"].shape[1])
                count = 0
        out_channels = state[f"{last}.weight"].shape[0]
    except (KeyError, ValueError, IndexError, AttributeError):
        raise LoadError(f"{name} is not a TAESD decoder (its layers do not follow TAESD's)")
    return _checked(dict(latent_channels=int(latent_channels), out_channels=int(out_channels),
                         num_blocks=tuple(blocks), block_out_channels=tuple(int(c) for c in channels)), name)


def _config_layout(config, name):
    try:
        layout = _config_values(config)
    except (TypeError, ValueError):
        raise LoadError(f"{name}/config.json does not describe a TAESD decoder")
    return _checked(layout, name)


def _config_values(config):
    """The decoder's part of an AutoencoderTiny config (its defaults are TAESD's)."""
    return dict(latent_channels=config.get("latent_channels", 4), out_channels=config.get("out_channels", 3),
                num_blocks=tuple(config.get("num_decoder_blocks", (3, 3, 3, 1))),
                block_out_channels=tuple(config.get("decoder_block_out_channels", (64, 64, 64, 64))),
                upsampling_scaling_factor=config.get("upsampling_scaling_factor", 2),
                act_fn=config.get("act_fn", "relu"), upsample_fn=config.get("upsample_fn", "nearest"))


def _checked(layout, name):
    def count(value, top):
        return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= top

    stages = layout["num_blocks"]
    good = (count(layout["latent_channels"], MAX_CHANNELS) and layout["latent_channels"] > 0
            and count(layout["out_channels"], 4) and layout["out_channels"] > 0
            and 0 < len(stages) <= MAX_STAGES and len(layout["block_out_channels"]) == len(stages)
            and all(count(n, MAX_BLOCKS) for n in stages)
            and all(count(c, MAX_CHANNELS) and c > 0 for c in layout["block_out_channels"])
            and count(layout.get("upsampling_scaling_factor", 2), 4)
            and layout.get("act_fn", "relu") in ("relu", "silu", "swish", "mish", "gelu")
            and layout.get("upsample_fn", "nearest") in ("nearest", "nearest-exact", "bilinear", "bicubic"))
    if not good:
        raise LoadError(f"{name} does not describe a TAESD decoder of a sensible size")
    return layout


def _build(layout, name):
    from diffusers import AutoencoderTiny

    try:
        model = AutoencoderTiny(
            latent_channels=layout["latent_channels"], out_channels=layout["out_channels"],
            num_decoder_blocks=layout["num_blocks"], decoder_block_out_channels=layout["block_out_channels"],
            # The encoder is dropped: the smallest one that builds.
            num_encoder_blocks=(1,), encoder_block_out_channels=(1,),
            upsampling_scaling_factor=layout.get("upsampling_scaling_factor", 2),
            act_fn=layout.get("act_fn", "relu"), upsample_fn=layout.get("upsample_fn", "nearest"))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise LoadError(f"{name} does not describe a TAESD decoder: {str(e)[:300]}")
    return model.decoder
