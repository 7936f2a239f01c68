"""Reading checkpoint files without trusting them.

Three ways in, from cheapest to dearest:

* :func:`read_safetensors_header` reads a ``.safetensors`` file's header (an 8-byte
  length and a JSON table of names, dtypes and shapes) and nothing else, so classifying a
  7 GB file costs two small reads.
* :func:`ckpt_tensor_shapes` walks a ``.ckpt`` pickle *statically*: a small stack machine
  that understands the opcodes but never imports, calls or constructs anything, so even a
  hostile pickle can only be read, never run. It gives the same names and shapes.
* :func:`load_state_dict` returns tensors. A ``.ckpt`` goes through torch's weights-only
  unpickler, with exactly the harmless globals that real Stable Diffusion 1.x checkpoints
  name allowed as inert stand-ins. There is no fallback to unrestricted unpickling: a file
  it refuses stays refused.

The first two are torch-free, so the reactor thread can classify models; torch is
imported only by :func:`load_state_dict`, which only the worker thread calls.
"""

import io
import json
import os
import pickletools
import struct
import zipfile
from dataclasses import dataclass

SAFETENSORS_SUFFIX = ".safetensors"
CKPT_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# The safetensors library refuses headers above 100 MB; a real SD header is ~100 KB.
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024
# A real SD checkpoint's data.pkl is well under 1 MB; the tensors live in other entries.
MAX_PICKLE_BYTES = 64 * 1024 * 1024
# Bounds the static walk of a legacy (non-zip) pickle, which has no size up front.
MAX_PICKLE_OPS = 20_000_000


class CheckpointError(Exception):
    """A checkpoint that cannot be read, or that was refused; ``message`` is for people."""

    def __init__(self, message):
        super().__init__(message)
        self.message = message


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


# -- static pickle walk ----------------------------------------------------------------


@dataclass(frozen=True)
class _Global:
    module: str
    name: str

    @property
    def path(self):
        return f"{self.module}.{self.name}"


class _Opaque:
    """Whatever a pickle would have built by calling something: never built here."""


@dataclass(frozen=True)
class _TensorStub:
    shape: tuple


_REBUILD_TENSOR = {
    "torch._utils._rebuild_tensor",
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_tensor_v3",
}
_REBUILD_PARAMETER = {"torch._utils._rebuild_parameter", "torch._utils._rebuild_parameter_with_state"}
_DICT_FACTORIES = {"collections.OrderedDict", "builtins.dict", "__builtin__.dict"}

# Opcodes whose argument is the value they push.
_VALUE_OPS = {
    "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT",
    "STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE",
    "BINUNICODE8", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8",
}


def _shape(value):
    if isinstance(value, tuple) and all(isinstance(d, int) and not isinstance(d, bool) for d in value):
        return value
    return None


def _apply(func, args):
    if isinstance(func, _Global) and isinstance(args, tuple):
        if func.path in _REBUILD_TENSOR and len(args) >= 3 and _shape(args[2]) is not None:
            return _TensorStub(args[2])
        if func.path in _REBUILD_PARAMETER and args and isinstance(args[0], _TensorStub):
            return args[0]
        if func.path in _DICT_FACTORIES:
            return {}
    return _Opaque()


def _walk_pickle(stream, max_ops=MAX_PICKLE_OPS):
    """The object a pickle describes, with tensors as stubs and every call left undone."""
    stack, marks, memo = [], [], {}

    def pop_mark():
        if not marks:
            raise CheckpointError("malformed pickle (no mark)")
        start = marks.pop()
        items = stack[start:]
        del stack[start:]
        return items

    for count, (op, arg, _) in enumerate(pickletools.genops(stream)):
        if count > max_ops:
            raise CheckpointError("the pickle is too long to classify")
        name = op.name
        if name in _VALUE_OPS:
            stack.append(arg)
        elif name in ("PROTO", "FRAME"):
            pass
        elif name == "STOP":
            return stack.pop() if stack else None
        elif name == "MARK":
            marks.append(len(stack))
        elif name == "NONE":
            stack.append(None)
        elif name in ("NEWTRUE", "NEWFALSE"):
            stack.append(name == "NEWTRUE")
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = stack[-1]
        elif name == "MEMOIZE":
            memo[len(memo)] = stack[-1]
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            stack.append(memo.get(arg))
        elif name == "GLOBAL":
            module, _, qualname = arg.partition(" ")
            stack.append(_Global(module, qualname))
        elif name == "STACK_GLOBAL":
            qualname, module = stack.pop(), stack.pop()
            stack.append(_Global(str(module), str(qualname)))
        elif name == "EMPTY_DICT":
            stack.append({})
        elif name == "EMPTY_LIST":
            stack.append([])
        elif name in ("EMPTY_SET",):
            stack.append(set())
        elif name == "EMPTY_TUPLE":
            stack.append(())
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            n = int(name[-1])
            items = tuple(stack[-n:])
            del stack[-n:]
            stack.append(items)
        elif name == "TUPLE":
            stack.append(tuple(pop_mark()))
        elif name == "LIST":
            stack.append(pop_mark())
        elif name == "DICT":
            items = pop_mark()
            stack.append(_pairs_into({}, items))
        elif name == "FROZENSET":
            pop_mark()
            stack.append(_Opaque())
        elif name == "ADDITEMS":
            pop_mark()
        elif name == "SETITEM":
            value, key = stack.pop(), stack.pop()
            _pairs_into(stack[-1], [key, value])
        elif name == "SETITEMS":
            items = pop_mark()
            _pairs_into(stack[-1], items)
        elif name == "APPEND":
            item = stack.pop()
            if isinstance(stack[-1], list):
                stack[-1].append(item)
        elif name == "APPENDS":
            items = pop_mark()
            if isinstance(stack[-1], list):
                stack[-1].extend(items)
        elif name == "BINPERSID":
            stack[-1] = _Opaque()
        elif name == "PERSID":
            stack.append(_Opaque())
        elif name == "REDUCE":
            args = stack.pop()
            stack[-1] = _apply(stack[-1], args)
        elif name == "NEWOBJ":
            stack.pop()
            stack[-1] = _Opaque()
        elif name == "NEWOBJ_EX":
            del stack[-2:]
            stack[-1] = _Opaque()
        elif name == "BUILD":
            stack.pop()
        elif name in ("OBJ", "INST"):
            pop_mark()
            stack.append(_Opaque())
        elif name == "POP":
            stack.pop()
        elif name == "POP_MARK":
            pop_mark()
        elif name == "DUP":
            stack.append(stack[-1])
        else:
            # EXT*, out-of-band buffers: nothing a torch checkpoint uses.
            raise CheckpointError(f"unsupported pickle opcode {name}")
    raise CheckpointError("the pickle has no end")


def _pairs_into(target, items):
    if isinstance(target, dict):
        for i in range(0, len(items) - 1, 2):
            try:
                target[items[i]] = items[i + 1]
            except TypeError:
                pass  # an unhashable key: not a state dict entry anyway
    return target


def _state_dict_of(obj):
    # Lightning checkpoints nest the weights under "state_dict", sometimes twice.
    for _ in range(4):
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
    return obj


class _BoundedReader:
    """A file as :mod:`pickletools` reads it, where no read may ask for more than what is
    left of the file, nor more than MAX_PICKLE_BYTES in all: the lengths in a pickle come
    from the file itself, and a 13-byte file may declare a 32 TB string."""

    def __init__(self, f):
        size = os.fstat(f.fileno()).st_size
        self._f = f
        self._left = max(0, min(size - f.tell(), MAX_PICKLE_BYTES))

    def read(self, n):
        if n is None or n < 0:
            raise CheckpointError("malformed pickle (unbounded read)")
        if n > self._left:
            raise CheckpointError(f"malformed pickle: it declares {n} bytes where at most {self._left} can follow")
        data = self._f.read(n)
        self._left -= len(data)
        return data

    def readline(self):
        # pickletools wants the newline: a line cut at the bound fails there, as it should.
        data = self._f.readline(self._left)
        self._left -= len(data)
        return data


def ckpt_tensor_shapes(path):
    """``{name: shape}`` of the tensors in a torch ``.ckpt``, without unpickling it."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                entries = [i for i in archive.infolist() if i.filename.endswith("data.pkl")]
                if not entries:
                    raise CheckpointError("the archive has no data.pkl: not a torch checkpoint")
                entry = min(entries, key=lambda i: i.filename.count("/"))
                if entry.file_size > MAX_PICKLE_BYTES:
                    raise CheckpointError("the checkpoint's pickle is too large to classify")
                obj = _walk_pickle(io.BytesIO(archive.read(entry)))
        else:
            # The pre-1.6 format: a magic number, a protocol version and system info,
            # each a pickle of its own, then the object.
            with open(path, "rb") as f:
                reader = _BoundedReader(f)
                for _ in range(3):
                    _walk_pickle(reader)
                obj = _walk_pickle(reader)
    except CheckpointError:
        raise
    except (OSError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"cannot read the file: {getattr(e, 'strerror', None) or e}")
    except (ValueError, IndexError, KeyError, EOFError, struct.error, UnicodeDecodeError) as e:
        raise CheckpointError(f"not a readable torch checkpoint ({type(e).__name__})")
    obj = _state_dict_of(obj)
    if not isinstance(obj, dict):
        raise CheckpointError("the checkpoint holds no state dict")
    return {k: v.shape for k, v in obj.items() if isinstance(k, str) and isinstance(v, _TensorStub)}


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


# Exactly the globals that Stable Diffusion 1.x checkpoints (saved by pytorch_lightning
# with numpy 1.x, or re-saved with numpy 2.x) reference outside the tensors, each mapped
# to an inert stand-in rather than to the real thing.
STAND_INS = [
    (ModelCheckpoint, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
    (numpy_scalar, "numpy.core.multiarray.scalar"),
    (numpy_scalar, "numpy._core.multiarray.scalar"),
    (NumpyDType, "numpy.dtype"),
] + [
    (NumpyDType, f"numpy.dtypes.{name}DType")
    for name in ("Float64", "Float32", "Float16", "Int64", "Int32", "Int16", "Int8",
                 "UInt64", "UInt32", "UInt16", "UInt8", "Bool")
]


def _torch_load_restricted(path):
    import torch

    mmap = zipfile.is_zipfile(path)
    with torch.serialization.safe_globals(STAND_INS):
        # mmap: a 4 GB checkpoint is paged in as its tensors are used, not read up front.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def load_state_dict(path):
    """``{name: tensor}`` of a ``.safetensors`` or ``.ckpt`` file, on the CPU.

    Raises CheckpointError, whose message says why (a refused global included).
    """
    import pickle

    suffix = os.path.splitext(str(path))[1].lower()
    try:
        if suffix == SAFETENSORS_SUFFIX:
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        if suffix not in CKPT_SUFFIXES:
            raise CheckpointError(f"not a checkpoint file type: {suffix!r}")
        obj = _torch_load_restricted(str(path))
    except CheckpointError:
        raise
    except pickle.UnpicklingError as e:
        # torch's message names the global; the advice it gives (allow-list it) is not
        # one a server should act on.
        reason = str(e).split("Please use", 1)[0].split("WeightsUnpickler error:")[-1].strip()
        reason = reason.splitlines()[-1].strip() if reason else "unsupported content"
        raise CheckpointError(
            f"refused to unpickle it: {reason[:300]} (only tensors and a few harmless "
            "globals are allowed in a .ckpt; convert it to .safetensors with a tool you trust)"
        )
    except (OSError, RuntimeError, ValueError, EOFError) as e:
        raise CheckpointError(f"cannot read the checkpoint: {type(e).__name__}: {str(e)[:300]}")
    obj = _state_dict_of(obj)
    if not isinstance(obj, dict):
        raise CheckpointError("the checkpoint holds no state dict")
    import torch

    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
