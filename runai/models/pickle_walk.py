# -*- test-case-name: runai.test.test_pickle_walk -*-
"""The tensors' names and shapes in a torch ``.ckpt``, read without unpickling it.

A small stack machine walks the pickle *statically*: it understands the opcodes but never
imports, calls or constructs anything, so even a hostile pickle can only be read, never
run. Tensors come out as stubs that keep their shape; whatever a pickle would have built
by calling something stays opaque. Every read is bounded by the size of the file: the
lengths in a pickle come from the file itself.

Torch-free: the reactor thread classifies models with it (through
:func:`runai.models.checkpoint.tensor_shapes`).
"""

import io
import os
import pickletools
import struct
import zipfile
from dataclasses import dataclass

from runai.models.errors import CheckpointError

# A real SD checkpoint's data.pkl is well under 1 MB; the tensors live in other entries.
MAX_PICKLE_BYTES = 64 * 1024 * 1024
# Bounds the static walk of a legacy (non-zip) pickle, which has no size up front.
MAX_PICKLE_OPS = 20_000_000


@dataclass(frozen=True)
class _Global:
    module: str
    name: str

    @property
    def path(self):
        return f"{self.module}.{self.name}"


class _Opaque:
    """Whatever a pickle would have built by calling something: never built here. The
    state a pickle gives it (``BUILD``) is kept as data, where it is a dict."""

    state = None


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


def walk(stream, max_ops=MAX_PICKLE_OPS):
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
            state = stack.pop()
            if isinstance(stack[-1], _Opaque) and isinstance(state, dict):
                stack[-1].state = state
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


def state_dict_of(obj):
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


def tensor_shape(value):
    """The shape of a tensor in what :func:`read_object` returns; None for anything else."""
    return value.shape if isinstance(value, _TensorStub) else None


def opaque_state(value):
    """The state (a dict) a pickle gave an object it would have built, or None."""
    return value.state if isinstance(value, _Opaque) else None


def read_object(path):
    """The object a torch pickle file (``.ckpt``, ``.pt``, ``.bin``) describes, with tensors
    as stubs (:func:`tensor_shape`) and every call left undone."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                entries = [i for i in archive.infolist() if i.filename.endswith("data.pkl")]
                if not entries:
                    raise CheckpointError("the archive has no data.pkl: not a torch checkpoint")
                entry = min(entries, key=lambda i: i.filename.count("/"))
                if entry.file_size > MAX_PICKLE_BYTES:
                    raise CheckpointError("the checkpoint's pickle is too large to classify")
                return walk(io.BytesIO(archive.read(entry)))
        # The pre-1.6 format: a magic number, a protocol version and system info,
        # each a pickle of its own, then the object.
        with open(path, "rb") as f:
            reader = _BoundedReader(f)
            for _ in range(3):
                walk(reader)
            return walk(reader)
    except CheckpointError:
        raise
    except (OSError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"cannot read the file: {getattr(e, 'strerror', None) or e}")
    except (ValueError, IndexError, KeyError, EOFError, struct.error, UnicodeDecodeError) as e:
        raise CheckpointError(f"not a readable torch checkpoint ({type(e).__name__})")


def ckpt_tensor_shapes(path):
    """``{name: shape}`` of the tensors in a torch ``.ckpt``, without unpickling it."""
    obj = state_dict_of(read_object(path))
    if not isinstance(obj, dict):
        raise CheckpointError("the checkpoint holds no state dict")
    return {k: v.shape for k, v in obj.items() if isinstance(k, str) and isinstance(v, _TensorStub)}
