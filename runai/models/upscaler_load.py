# -*- test-case-name: runai.test.test_upscalers -*-
"""Loading an upscaler file with spandrel, in the worker thread only.

The weights are read safely first: a ``.safetensors`` file by safetensors, a pickle
(``.pth``, ``.pt``, ``.ckpt``) by runai's restricted unpickler
(:func:`runai.models.checkpoint.load_object`: tensors and plain containers only). spandrel
gets the state dict, never the path: given a path it would try ``torch.jit.load`` for
some suffixes. The loaded models are kept in a small LRU, by file size and modification
time, so that a second job with the same upscaler pays no load.
"""

import os
import threading
from collections import OrderedDict

from twisted.logger import Logger

from runai.core import errors
from runai.models import checkpoint, upscaler_keys
from runai.models.errors import CheckpointError

log = Logger()

MAX_LOADED = 2

_loaded = OrderedDict()  # (path, size, mtime, device, dtype) -> spandrel ImageModelDescriptor
_lock = threading.Lock()


def state_dict(path):
    """``{name: tensor}`` of an upscaler file, read safely; raises CheckpointError."""
    if str(path).lower().endswith(".safetensors"):
        return checkpoint.load_state_dict(path)
    import torch

    state = upscaler_keys.unwrap(checkpoint.state_dict_of(checkpoint.load_object(path)))
    if not isinstance(state, dict):
        raise CheckpointError("the file holds no state dict")
    return {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def _dtype(descriptor, device, dtype):
    """The engine's half precision on an accelerator where the architecture takes it;
    float32 elsewhere."""
    import torch

    if device.type == "cpu":
        return torch.float32
    if dtype == torch.float16 and descriptor.supports_half:
        return dtype
    if dtype == torch.bfloat16 and descriptor.supports_bfloat16:
        return dtype
    return torch.float32


def load(path, name, device, dtype):
    """The spandrel ImageModelDescriptor of the upscaler at ``path`` (resolved, inside the
    model folder), on ``device``, in eval mode; raises RunaiError(MODEL_LOAD_FAILED)."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise errors.RunaiError(errors.MODEL_LOAD_FAILED, f"cannot read upscaler {name!r}: {e.strerror or e}")
    key = (str(path), st.st_size, st.st_mtime_ns, str(device), str(dtype))
    with _lock:
        found = _loaded.get(key)
        if found is not None:
            _loaded.move_to_end(key)
            return found
    try:
        weights = state_dict(path)
    except CheckpointError as e:
        raise errors.RunaiError(errors.MODEL_LOAD_FAILED, f"cannot read upscaler {name!r}: {e.message}")
    import spandrel

    try:
        descriptor = spandrel.ModelLoader().load_from_state_dict(weights)
    except Exception as e:  # spandrel's UnsupportedModelError, or shapes that do not fit
        raise errors.RunaiError(errors.MODEL_LOAD_FAILED,
                                f"upscaler {name!r} cannot be loaded: {type(e).__name__}: {str(e)[:200]}")
    del weights
    if not isinstance(descriptor, spandrel.ImageModelDescriptor):
        raise errors.RunaiError(errors.MODEL_LOAD_FAILED, f"{name!r} is not an image upscaler")
    descriptor.to(device=device, dtype=_dtype(descriptor, device, dtype)).eval()
    log.info("loaded upscaler {name}: {arch} x{scale}", name=name, arch=descriptor.architecture.id,
             scale=descriptor.scale)
    with _lock:
        _loaded[key] = descriptor
        while len(_loaded) > MAX_LOADED:
            _loaded.popitem(last=False)
    return descriptor


def forget():
    """Drop every loaded upscaler (memory pressure, tests)."""
    with _lock:
        _loaded.clear()
