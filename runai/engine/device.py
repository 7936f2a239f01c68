# -*- test-case-name: runai.test.test_engine -*-
"""Which device the engine runs on, and in which precision (imports torch)."""

import torch

from runai.core import errors

DTYPES = {
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}


def resolve_device(device="auto"):
    """A ``torch.device`` from "auto", "cpu", "cuda" or "cuda:N"; RunaiError if unusable."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise errors.RunaiError(errors.INTERNAL, f"bad device {device!r}: {e}")
    if resolved.type == "cpu":
        return resolved
    if resolved.type != "cuda":
        raise errors.RunaiError(
            errors.INTERNAL, f"unsupported device {device!r}; use auto, cpu, cuda or cuda:N"
        )
    if not torch.cuda.is_available():
        raise errors.RunaiError(
            errors.INTERNAL, f"device {device!r} was asked for, but CUDA is not available here"
        )
    count = torch.cuda.device_count()
    if resolved.index is not None and resolved.index >= count:
        raise errors.RunaiError(
            errors.INTERNAL, f"device {device!r} was asked for, but there are only {count} CUDA devices"
        )
    return resolved


def resolve_dtype(dtype, device):
    """A ``torch.dtype``: "auto" is float16 on CUDA (half the memory, tensor cores), else
    float32 (half precision is slow, and partly unsupported, on CPUs)."""
    if dtype in (None, "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
    elif dtype in DTYPES:
        return DTYPES[dtype]
    raise errors.RunaiError(
        errors.INTERNAL, f"unsupported dtype {dtype!r}; use auto, float16, bfloat16 or float32"
    )
