# -*- test-case-name: runai.test.test_lora_apply -*-
"""Reading LoRA files into the patches :mod:`runai.models.lora_apply` merges, and keeping
the ones read in a small LRU bounded by bytes.

Worker side (torch). A file is read with :func:`runai.models.checkpoint.load_state_dict`:
a ``.safetensors`` as it is, a ``.pt``/``.ckpt`` only through runai's restricted
unpickler, never a plain ``torch.load``. Its keys are grouped by the module they patch,
each group a :class:`Patch` of one kind:

* ``lora``: kohya/A1111 ``lora_down``/``lora_up`` (LoCon too, and its ``lora_mid``),
  diffusers' and peft's ``lora_A``/``lora_B`` (and the older ``lora.down``/``lora.up``,
  ``lora_linear_layer``), with an ``alpha`` where the trainer wrote one;
* ``loha``: LyCORIS ``hada_w1_a`` ... ``hada_w2_b`` (and the CP cores ``hada_t1``/``hada_t2``);
* ``lokr``: LyCORIS ``lokr_w1``/``lokr_w2`` or their ``_a``/``_b`` factors (and ``lokr_t2``);
* ``full``: LyCORIS's whole-weight differences (``diff``).

What runai does not merge (DoRA's magnitudes, bias differences, IA3, ...) is refused with
the part named: a LoRA is merged whole or not at all.
"""

import collections
import json
import os
import re
from dataclasses import dataclass, field

from runai.core import errors
from runai.models import checkpoint, lora_keys
from runai.models.errors import CheckpointError

# What one part of a module's patch is called, as the formats spell it: key suffix -> part.
_PARTS = [
    (re.compile(r"\.(?:lora_down|lora\.down|lora_linear_layer\.down)\.weight$"), "down"),
    (re.compile(r"\.(?:lora_up|lora\.up|lora_linear_layer\.up)\.weight$"), "up"),
    (re.compile(r"\.lora_A(?:\.[A-Za-z0-9_]+)?\.weight$"), "down"),
    (re.compile(r"\.lora_B(?:\.[A-Za-z0-9_]+)?\.weight$"), "up"),
    (re.compile(r"\.lora_mid\.weight$"), "mid"),
    (re.compile(r"\.alpha$"), "alpha"),
    (re.compile(r"\.(hada_w[12]_[ab]|hada_t[12]|lokr_w[12](?:_[ab])?|lokr_t2|diff)$"), None),
]
# The LoRA files the store keeps read, in bytes of tensors, when the model cache has no
# byte budget; with one, the store takes at most a quarter of it (see LoraStore).
DEFAULT_STORE_BYTES = 1 << 30


@dataclass
class Patch:
    """What one LoRA file says about one module: its kind, its tensors by part name
    (``down``, ``up``, ``mid``; ``hada_w1_a`` ...; ``lokr_w1`` ...; ``diff``), its alpha."""

    kind: str
    tensors: dict = field(default_factory=dict)
    alpha: object = None


@dataclass
class LoraNetwork:
    """A LoRA file read: its patches by the module key it names them with."""

    path: str
    patches: dict  # module key -> Patch
    family: str  # what it was trained for, as lora_keys.family_of says
    nbytes: int
    metadata: dict = field(default_factory=dict)


def _split(key):
    """``(module key, part)`` of one state-dict key; part None where runai has no use for it."""
    for pattern, part in _PARTS:
        match = pattern.search(key)
        if match:
            return key[:match.start()], part or match.group(1)
    return None, None


def _kind(part):
    if part in ("down", "up", "mid"):
        return "lora"
    if part.startswith("hada_"):
        return "loha"
    if part.startswith("lokr_"):
        return "lokr"
    return "full"


def _peft_alphas(metadata):
    """``{component prefix: (lora_alpha, r, alpha_pattern, rank_pattern)}`` from diffusers'
    ``lora_adapter_metadata`` (what ``save_lora_weights`` writes for peft adapters)."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except ValueError:
        return {}
    found = {}
    if not isinstance(flat, dict):
        return found
    for key, value in flat.items():
        prefix, _, name = key.rpartition(".")
        found.setdefault(prefix, {})[name] = value
    return found


def _metadata_alpha(peft, module_key):
    """The alpha diffusers' metadata gives ``module_key``'s adapter, or None."""
    for prefix, config in peft.items():
        if not module_key.startswith(prefix + "."):
            continue
        inner = module_key[len(prefix) + 1:]
        for pattern, alpha in (config.get("alpha_pattern") or {}).items():
            if re.search(rf"(^|\.){re.escape(pattern)}$", inner):
                return float(alpha)
        alpha = config.get("lora_alpha")
        if isinstance(alpha, (int, float)):
            return float(alpha)
    return None


def parse(path, state, metadata=None, label=None):
    """The :class:`LoraNetwork` of a LoRA file's ``state`` (its tensors); raises RunaiError."""
    import torch

    label = label or os.path.basename(path)
    metadata = metadata or {}
    patches = {}
    refused = []
    for key, tensor in state.items():
        module, part = _split(key)
        if module is None:
            refused.append(key)
            continue
        if part == "alpha":
            patches.setdefault(module, Patch(kind="lora")).alpha = float(tensor.float().item())
            continue
        patch = patches.setdefault(module, Patch(kind=_kind(part)))
        if patch.tensors and patch.kind != _kind(part):
            raise errors.RunaiError(errors.BAD_REQUEST,
                                    f"LoRA {label!r} mixes two kinds of network on one module ({module[:120]})")
        patch.kind = _kind(part)
        patch.tensors[part] = tensor
    if refused:
        raise errors.RunaiError(
            errors.BAD_REQUEST,
            f"LoRA {label!r} holds parts runai does not merge (DoRA, bias or norm differences, IA3, ...): "
            f"{', '.join(sorted(refused)[:3])[:300]}",
        )
    peft = _peft_alphas(metadata)
    for module, patch in list(patches.items()):
        if not patch.tensors:
            del patches[module]  # an alpha alone
            continue
        missing = _missing(patch)
        if missing:
            raise errors.RunaiError(errors.BAD_REQUEST, f"LoRA {label!r} lacks {missing} for {module[:120]}")
        if patch.alpha is None and patch.kind == "lora" and peft:
            patch.alpha = _metadata_alpha(peft, module)
    if not patches:
        raise errors.RunaiError(errors.BAD_REQUEST, f"{label!r} holds no LoRA weights")
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    nbytes = sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor))
    return LoraNetwork(path=str(path), patches=patches, family=lora_keys.family_of(shapes, metadata),
                       nbytes=nbytes, metadata=metadata)


def _missing(patch):
    have = patch.tensors
    if patch.kind == "lora":
        return next((p for p in ("down", "up") if p not in have), None)
    if patch.kind == "loha":
        return next((p for p in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b") if p not in have), None)
    if patch.kind == "lokr":
        for n in ("1", "2"):
            if f"lokr_w{n}" not in have and not (f"lokr_w{n}_a" in have and f"lokr_w{n}_b" in have):
                return f"lokr_w{n}"
    return None


def read(path, label=None):
    """A LoRA file's ``(state, metadata)``: tensors on the CPU; raises RunaiError."""
    label = label or os.path.basename(path)
    try:
        state = checkpoint.load_state_dict(path)
        metadata = checkpoint.read_safetensors_header(path)[1] if str(path).lower().endswith(".safetensors") else {}
    except CheckpointError as e:
        raise errors.RunaiError(errors.MODEL_LOAD_FAILED, f"cannot read LoRA {label!r}: {e.message}")
    return state, metadata


class LoraStore:
    """The LoRA files read lately, by path and disk signature, in an LRU bounded by the
    bytes of their tensors (host memory). ``reads`` counts files read from disk."""

    def __init__(self, max_bytes=DEFAULT_STORE_BYTES):
        self.max_bytes = max_bytes
        self._files = collections.OrderedDict()
        self.reads = 0

    @property
    def nbytes(self):
        return sum(network.nbytes for network in self._files.values())

    def get(self, path, label=None, convert=None):
        """The :class:`LoraNetwork` of the file at ``path`` (read once per size and
        modification time); ``convert(state) -> state``, where given, is a family's own
        converter (diffusers') applied to the tensors first."""
        st = os.stat(path)
        key = (str(path), st.st_size, st.st_mtime_ns, getattr(convert, "key", None))
        network = self._files.get(key)
        if network is not None:
            self._files.move_to_end(key)
            return network
        state, metadata = read(path, label)
        if convert is not None:
            state = convert(state, metadata)
        network = parse(path, state, metadata, label)
        self.reads += 1
        for old in [k for k in self._files if k[0] == key[0]]:
            del self._files[old]  # the same file before it changed on disk
        self._files[key] = network
        while len(self._files) > 1 and self.nbytes > self.max_bytes:
            self._files.popitem(last=False)
        return network

    def clear(self):
        self._files.clear()
