# -*- test-case-name: runai.test.test_memory_doors -*-
"""AUTOMATIC1111's ``POST /sdapi/v1/unload-checkpoint``, ``POST /sdapi/v1/reload-checkpoint``
and ``GET /sdapi/v1/memory``, answered by the core (:mod:`runai.core.memory`).

Both POSTs answer ``{}`` as A1111 does, once the workers have done it (after the job each
is running). A reload loads again the model each worker used last (runai has no one
"current" model: each request names its own); with nothing used yet, it loads nothing.
"""

from runai.core.memory import NO_LOCAL_WORKER


def cuda(devices):
    """A1111's ``cuda`` entry from the core's ``devices``: the first CUDA device's figures
    (``system``, ``active``, ``allocated``, ``reserved``, ``inactive``, ``events``), else
    ``{"error": ...}`` as A1111 says it on a machine without CUDA."""
    for device in devices:
        if "error" not in device:
            return {k: v for k, v in device.items() if k != "device"}
    if devices:
        return {"error": devices[0]["error"]}
    return {"error": NO_LOCAL_WORKER}


def routes(core):
    """The routes, as :class:`runai.doors.http.api.Api` keys them."""
    return {
        (b"POST", "unload-checkpoint"): lambda request: core.unload_models().addCallback(lambda _: {}),
        (b"POST", "reload-checkpoint"): lambda request: core.reload_models().addCallback(lambda _: {}),
        (b"GET", "memory"): lambda request: core.memory().addCallback(
            lambda figures: {"ram": figures["ram"], "cuda": cuda(figures["devices"])}),
    }
