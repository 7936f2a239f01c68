# -*- test-case-name: runai.test.test_upscalers -*-
"""What an upscaler file's keys say: its architecture and its scale.

ESRGAN-family files as ``spandrel`` detects them: ESRGAN (the old ``model.N`` layout),
Real-ESRGAN and BSRGAN (RRDBNet's newer names), Real-ESRGAN's compact SRVGGNet. Read from
``{name: shape}`` alone, so that the reactor can tell an upscaler from a checkpoint
without loading a tensor. Real-ESRGAN's ``.pth`` files keep their weights under
``params_ema`` (or ``params``): :func:`unwrap` takes them out, as spandrel does.

Torch-free, and imports nothing of runai: :mod:`runai.models.classify` asks it too.
"""

import math
import re
from dataclasses import dataclass
from typing import Optional

# The keys a saved state dict may nest the weights under, and prefixes a training
# wrapper adds (spandrel's canonicalize_state_dict, in its order).
WRAPPERS = ("model_state_dict", "state_dict", "params_ema", "params-ema", "params", "model", "net")
PREFIXES = ("module.", "netG.")
ESRGAN, COMPACT = "ESRGAN", "Compact"
MAX_SCALE = 16

_OLD_RRDB = ("model.0.weight", "model.1.sub.0.RDB1.conv1.0.weight")
_REAL_ESRGAN = ("conv_first.weight", "body.0.rdb1.conv1.weight", "conv_body.weight", "conv_last.weight")
_BSRGAN = ("conv_first.weight", "RRDB_trunk.0.RDB1.conv1.weight", "trunk_conv.weight", "conv_last.weight")
_UPCONV = re.compile(r"(?:upconv|conv_up)(\d)\.weight$")
_SEQ = re.compile(r"^model\.(\d+)\.")
_BODY = re.compile(r"^body\.(\d+)\.")


@dataclass(frozen=True)
class Arch:
    """An upscaler's architecture (spandrel's id) and how many times larger it paints."""

    name: str
    scale: int


def unwrap(state):
    """The weights of a saved upscaler: out of ``params_ema`` and the like, without a
    ``module.`` prefix. ``state`` is any mapping; what is not one is returned as is."""
    if not isinstance(state, dict):
        return state
    for key in WRAPPERS:
        if isinstance(state.get(key), dict):
            state = state[key]
            break
    if len(state) == 1:
        single = next(iter(state.values()))
        if isinstance(single, dict):
            state = single
    for prefix in PREFIXES:
        if state and all(isinstance(k, str) and k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _shape(shapes, key):
    shape = shapes.get(key)
    return tuple(shape) if isinstance(shape, (tuple, list)) else None


def _unshuffle(in_channels, out_channels):
    """Real-ESRGAN x2/x1 models see their input pixel-unshuffled: 4 or 16 times the channels."""
    if in_channels and out_channels and in_channels in (out_channels * 4, out_channels * 16):
        return int(math.sqrt(in_channels // out_channels))
    return 1


def _esrgan(shapes):
    if all(k in shapes for k in _OLD_RRDB):
        indexes = [int(m.group(1)) for m in map(_SEQ.match, shapes) if m]
        length = max(indexes) + 1
        log2 = (length - 5) // 3
        last = _shape(shapes, f"model.{length - 1}.weight")
    elif all(k in shapes for k in _REAL_ESRGAN) or all(k in shapes for k in _BSRGAN):
        log2 = max((int(m.group(1)) for m in map(_UPCONV.match, shapes) if m), default=0)
        last = _shape(shapes, "conv_last.weight")
    else:
        return None
    first = _shape(shapes, "model.0.weight") or _shape(shapes, "conv_first.weight")
    if first is None or len(first) != 4 or last is None or len(last) != 4 or not 0 <= log2 <= 4:
        return None
    return Arch(ESRGAN, max(1, 2 ** log2 // _unshuffle(first[1], last[0])))


def _compact(shapes):
    first = _shape(shapes, "body.0.weight")
    if first is None or len(first) != 4 or "body.1.weight" not in shapes:
        return None
    highest = max(int(m.group(1)) for m in map(_BODY.match, shapes) if m)
    bias = _shape(shapes, f"body.{highest}.bias")
    if not bias or len(bias) != 1:
        return None
    for out_channels in (first[1], 3, 4, 1):  # spandrel's guess: as many out as in, else RGB
        scale = math.isqrt(bias[0] // out_channels) if bias[0] % out_channels == 0 else 0
        if scale and scale * scale * out_channels == bias[0]:
            return Arch(COMPACT, scale)
    return None


def detect(shapes) -> Optional[Arch]:
    """The :class:`Arch` of an upscaler's ``{name: shape}`` (already :func:`unwrap`-ped),
    or None for anything else."""
    try:
        arch = _esrgan(shapes) or _compact(shapes)
    except (TypeError, ValueError, IndexError):
        return None
    if arch is None or not 1 <= arch.scale <= MAX_SCALE:
        return None
    return arch
