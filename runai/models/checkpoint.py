# -*- test-case-name: runai.test.test_checkpoint -*-
"""Reading checkpoint files without trusting them.

Three ways in, from cheapest to dearest:

* :func:`read_safetensors_header` reads a ``.safetensors`` file's header (an 8-byte
  length and a JSON table of names, dtypes and shapes) and nothing else, so classifying a
  7 GB file costs two small reads.
* :func:`runai.models.pickle_walk.ckpt_tensor_shapes` walks a ``.ckpt`` pickle
  *statically*: a small stack machine that understands the opcodes but never imports,
  calls or constructs anything, so even a hostile pickle can only be read, never run. It
  gives the same names and shapes. :func:`tensor_shapes` takes either kind of file.
* :func:`load_state_dict` returns tensors. A ``.ckpt`` goes through torch's weights-only
  unpickler, with exactly the harmless globals that real Stable Diffusion 1.x checkpoints
  name allowed as inert stand-ins. There is no fallback to unrestricted unpickling: a file
  it refuses stays refused.

The first two are torch-free, so the reactor thread can classify models; torch is
imported only by :func:`load_state_dict`, which only the worker thread calls.
"""

import json
import os
import struct
import zipfile
from dataclasses import dataclass

from runai.models import loadlock
from runai.models.errors import CheckpointError
from runai.models.pickle_walk import ckpt_tensor_shapes, state_dict_of

SAFETENSORS_SUFFIX = ".safetensors"
CKPT_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# The safetensors library refuses headers above 100 MB; a real SD header is ~100 KB.
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024


# -- safetensors ----------------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple


def read_safetensors_header(path):
    """``({name: TensorInfo}, metadata)`` from the header of a ``.safetensors`` file.

    Reads 8 bytes and the header, never the tensor data: classification must cost the
    same for a 2 MB file and a 7 GB one.
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) != 8:
                raise CheckpointError("the file is too short to be a .safetensors file")
            (length,) = struct.unpack("<Q", head)
            if length > MAX_SAFETENSORS_HEADER or length + 8 > size:
                raise CheckpointError(f"a header of {length} bytes cannot be right for a file of {size} bytes")
            raw = f.read(length)
    except OSError as e:
        raise CheckpointError(f"cannot read the file: {e.strerror or e}")
    if len(raw) != length:
        raise CheckpointError("the file ends inside its header")
    try:
        table = json.loads(raw)
    except (ValueError, RecursionError):
        raise CheckpointError("the header is not JSON")
    if not isinstance(table, dict):
        raise CheckpointError("the header is not a JSON object")
    metadata = table.pop("__metadata__", None)
    if not isinstance(metadata, dict):
        metadata = {}
    data_size = size - 8 - length
    tensors = {}
    for name, entry in table.items():
        if not isinstance(entry, dict):
            raise CheckpointError(f"tensor {name[:100]!r} has no header entry")
        shape, dtype, offsets = entry.get("shape"), entry.get("dtype"), entry.get("data_offsets")
        if (
            not isinstance(shape, list)
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
            or not isinstance(dtype, str)
            or not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)
        ):
            raise CheckpointError(f"tensor {name[:100]!r} has a malformed header entry")
        if not 0 <= offsets[0] <= offsets[1] <= data_size:
            # Checked here, from the size alone, so that a truncated download is named as
            # such at once instead of failing later inside a load.
            raise CheckpointError(f"tensor {name[:100]!r} lies beyond the end of the file (truncated?)")
        tensors[name] = TensorInfo(dtype, tuple(shape))
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def tensor_shapes(path):
    """``({name: shape}, metadata)`` of a checkpoint file, read without loading tensors."""
    suffix = os.path.splitext(str(path))[1].lower()
    if suffix == SAFETENSORS_SUFFIX:
        tensors, metadata = read_safetensors_header(path)
        return {k: v.shape for k, v in tensors.items()}, metadata
    if suffix in CKPT_SUFFIXES:
        return ckpt_tensor_shapes(path), {}
    raise CheckpointError(f"not a checkpoint file type: {suffix!r}")


# -- loading tensors (torch) ------------------------------------------------------------


class _Inert:
    """Stands in for a class that a checkpoint names but whose objects we never need.

    It accepts any arguments and any state and keeps none of them: nothing a pickle says
    about it can make it do anything.
    """

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __repr__(self):
        return f"<inert {type(self).__name__}>"


class ModelCheckpoint(_Inert):
    """pytorch_lightning's callback; SD 1.x checkpoints keep its state (a best score)."""


class NumpyDType(_Inert):
    """numpy.dtype, which the callback's numpy scalars are pickled with."""


class NumpyScalar(_Inert):
    """A numpy scalar (e.g. the callback's best score); its bytes are dropped."""


def numpy_scalar(*args):
    return NumpyScalar()


class ParameterDict(_Inert):
    """torch's ``nn.ParameterDict``, in which textual-inversion embeddings saved with torch
    1.11 and earlier keep their vectors: only its ``_parameters`` mapping is kept (the
    unpickler has made its tensors already); nothing of a module is built."""

    def __setstate__(self, state):
        params = state.get("_parameters") if isinstance(state, dict) else None
        self._parameters = dict(params) if isinstance(params, dict) else {}


# Exactly the globals that Stable Diffusion 1.x checkpoints (saved by pytorch_lightning
# with numpy 1.x, or re-saved with numpy 2.x) reference outside the tensors, each mapped
# to an inert stand-in rather than to the real thing.
STAND_INS = [
    (ModelCheckpoint, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
    (numpy_scalar, "numpy.core.multiarray.scalar"),
    (numpy_scalar, "numpy._core.multiarray.scalar"),
    (NumpyDType, "numpy.dtype"),
    (ParameterDict, "torch.nn.modules.container.ParameterDict"),
] + [
    (NumpyDType, f"numpy.dtypes.{name}DType")
    for name in ("Float64", "Float32", "Float16", "Int64", "Int32", "Int16", "Int8",
                 "UInt64", "UInt32", "UInt16", "UInt8", "Bool")
]


def _torch_load_restricted(path):
    import torch

    mmap = zipfile.is_zipfile(path)
    # safe_globals is process-wide: another thread's load leaving its own would take the
    # stand-ins away from this one (runai.models.loadlock).
    with loadlock.loading(), torch.serialization.safe_globals(STAND_INS):
        # mmap: a 4 GB checkpoint is paged in as its tensors are used, not read up front.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def _refusal(message):
    """The line of torch's weights-only message that says what it refused.

    torch wraps it in advice a server should not act on (allow-list the global, load
    without weights_only) and a pointer to its documentation; the line that names the
    global ("GLOBAL posix.system whose module posix is blocked") is the one to keep.
    """
    message = message.split("Check the documentation of torch.load", 1)[0]
    lines = [line.strip() for line in message.split("WeightsUnpickler error:")[-1].splitlines()]
    named = [line for line in lines if "GLOBAL" in line]
    lines = named or [line for line in lines if line and "weights_only" not in line]
    reason = lines[-1].split(" Please use", 1)[0] if lines else ""
    return reason.removeprefix("Weights only load failed.").strip() or "unsupported content"


def load_state_dict(path):
    """``{name: tensor}`` of a ``.safetensors`` or ``.ckpt`` file, on the CPU.

    Raises CheckpointError, whose message says why (a refused global included).
    """
    suffix = os.path.splitext(str(path))[1].lower()
    if suffix == SAFETENSORS_SUFFIX:
        try:
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        except (OSError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"cannot read the checkpoint: {type(e).__name__}: {str(e)[:300]}")
    obj = state_dict_of(load_object(path))
    if not isinstance(obj, dict):
        raise CheckpointError("the checkpoint holds no state dict")
    import torch

    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def load_object(path):
    """The object in a torch pickle (``.ckpt``, ``.pt``, ``.bin``), on the CPU, through the
    restricted unpickler: tensors, plain containers and numbers, and the inert stand-ins of
    :data:`STAND_INS`. Raises CheckpointError, whose message says why (a refused global
    included)."""
    import pickle

    suffix = os.path.splitext(str(path))[1].lower()
    try:
        if suffix not in CKPT_SUFFIXES:
            raise CheckpointError(f"not a checkpoint file type: {suffix!r}")
        return _torch_load_restricted(str(path))
    except CheckpointError:
        raise
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refused to unpickle it: {_refusal(str(e))[:300]} (only tensors and a few harmless "
            "globals are allowed in a .ckpt; convert it to .safetensors with a tool you trust)"
        )
    except (OSError, RuntimeError, ValueError, EOFError) as e:
        raise CheckpointError(f"cannot read the checkpoint: {type(e).__name__}: {str(e)[:300]}")
