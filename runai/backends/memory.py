# -*- test-case-name: runai.test.test_idle_unload,runai.test.test_memory_doors -*-
"""Unloading, reloading and measuring a worker's models: the worker-thread side of
``--idle-unload``, ``unload``/``reload``/``memory`` (socket) and A1111's
``/sdapi/v1/unload-checkpoint``, ``/reload-checkpoint`` and ``/memory``.

Every function here but :func:`remembered` runs in the worker's own thread (they touch
torch and the engine); torch is imported inside them, so the reactor may import this module.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Remembered:
    """A model the worker had loaded, as its last job named it: what a reload loads."""
    path: str
    name: str
    modules: tuple = ()


def remembered(engine):
    """The model ``engine`` used last, or None (a snapshot: worker thread)."""
    current = getattr(getattr(engine, "loader", None), "current", None)
    if current is None:
        return None
    return Remembered(current.path, current.name, tuple(current.modules))


def unload(engine):
    """Drop every model ``engine`` holds (and the NSFW checker's), free their memory (the
    garbage collector, then CUDA's cache); the number of models that were loaded."""
    count = len(engine.loader.loaded_paths)
    engine.unload()
    return count


def reload(engine, model):
    """Load ``model`` (a :class:`Remembered`) again; 1 if it was loaded from disk now, 0 if
    it was still loaded (or there is nothing to load)."""
    if model is None:
        return 0
    before = engine.load_count
    engine.load(model.path, model.name, model.modules)
    return engine.load_count - before


def device_memory(device):
    """What ``device`` (a torch.device) holds, as A1111's ``cuda`` dict of ``/sdapi/v1/memory``
    (``system``, ``active``, ``allocated``, ``reserved``, ``inactive``, ``events``), with
    ``device`` added; on a device without CUDA, ``{"device": ..., "error": "unavailable"}``."""
    import torch

    name = str(device)
    if getattr(device, "type", None) != "cuda" or not torch.cuda.is_available():
        return {"device": name, "error": "unavailable"}
    try:
        free, total = torch.cuda.mem_get_info(device)
        stats = torch.cuda.memory_stats(device)
    except Exception as e:  # a driver that answers nothing: say so, as A1111 does
        return {"device": name, "error": f"{type(e).__name__}: {e}"[:300]}

    def pair(key):
        return {"current": int(stats.get(f"{key}.all.current", 0)), "peak": int(stats.get(f"{key}.all.peak", 0))}

    return {
        "device": name,
        "system": {"free": int(free), "used": int(total - free), "total": int(total)},
        "active": pair("active_bytes"),
        "allocated": pair("allocated_bytes"),
        "reserved": pair("reserved_bytes"),
        "inactive": pair("inactive_split_bytes"),
        "events": {"retries": int(stats.get("num_alloc_retries", 0)), "oom": int(stats.get("num_ooms", 0))},
    }
