# -*- test-case-name: runai.test.test_memory_doors -*-
"""The memory actions over the socket: ``unload``, ``reload``, ``memory``.

Wire formats (each reply carries the client's ``id``)::

    {"action": "unload"}  -> {"action": "unload", "unloaded": 1}
    {"action": "reload"}  -> {"action": "reload", "loaded": 1}
    {"action": "memory"}  -> {"action": "memory", "ram": {"free", "used", "total"},
                              "devices": [{"device": "cuda:0", "system": {...}, "active": {...},
                                           "allocated": {...}, "reserved": {...},
                                           "inactive": {...}, "events": {...}}]}

``unload`` drops every loaded model from every worker's device (after the job each is
running) and says how many; ``reload`` loads again the model each worker used last (0
when it is still loaded, or none was used yet). ``memory``: this process's memory, and
each worker's device as AUTOMATIC1111's ``/sdapi/v1/memory`` tells a CUDA device
(``{"device": "cpu", "error": "unavailable"}`` for one without CUDA); a ``--broker``
front has no workers of its own: ``devices`` is empty and ``unload`` answers 0.
"""

from dataclasses import dataclass

from twisted.logger import Logger

from runai.core import errors

MEMORY_ACTIONS = ("unload", "reload", "memory")

log = Logger(namespace="runai.doors.legacy.memory")


@dataclass(frozen=True)
class MemoryRequest:
    action: str
    id: object = None


def parse_memory(action, rid=None):
    """The request of one of :data:`MEMORY_ACTIONS`: they take no fields."""
    return MemoryRequest(action, rid)


def answer(core, session, request):
    """Ask the core, and send the answer (or an error) on ``session``."""
    if request.action == "unload":
        d = core.unload_models().addCallback(lambda n: {"action": "unload", "unloaded": n})
    elif request.action == "reload":
        d = core.reload_models().addCallback(lambda n: {"action": "reload", "loaded": n})
    else:
        d = core.memory().addCallback(lambda figures: {"action": "memory", **figures})

    def failed(failure):
        error = failure.value
        if isinstance(error, errors.RunaiError):
            session.send_error(error, request.action, request.id)
            return
        log.failure("The {action} action failed", failure, action=request.action)
        session.send_error(errors.RunaiError(errors.INTERNAL, f"{request.action} failed"), request.action,
                           request.id)

    d.addCallback(lambda message: session.send(dict(message, id=request.id)))
    d.addErrback(failed)
    return d
