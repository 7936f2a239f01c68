# -*- test-case-name: runai.test.test_memory_doors -*-
"""Unload, reload and memory: what the doors ask of the back end between jobs.

A worker that can do these provides :class:`IMemoryControl` (today
:class:`runai.backends.local.LocalWorker`, in ``twistd runai`` and in each
``twistd runai-worker``); each runs them on the worker's own thread, after the job it is
running. A back end without such workers here (a ``--broker`` front: its workers are
other processes) answers for this process alone: nothing unloaded, no device.

Torch-free, wire-format-free: the memory figures are plain dicts of numbers.
"""

import os

from twisted.internet import defer
from zope.interface import Interface

NO_LOCAL_WORKER = "no worker in this process: the workers are runai-worker processes"


class IMemoryControl(Interface):
    """A worker whose models can be unloaded, reloaded and measured on demand."""

    def unload():
        """A Deferred of how many models left the device."""

    def reload():
        """A Deferred of how many models were loaded from disk again (what was last used)."""

    def memory():
        """A Deferred of its device's figures: ``{"device", "system", "active", "allocated",
        "reserved", "inactive", "events"}`` on CUDA, ``{"device", "error"}`` elsewhere."""


def _workers(backend):
    return [w for w in getattr(backend, "workers", ()) if IMemoryControl.providedBy(w)]


def _first_error(failure):
    """A worker's own failure (a RunaiError the doors answer with), not gatherResults' wrapper."""
    failure.trap(defer.FirstError)
    return failure.value.subFailure


def _each(backend, call):
    """A Deferred of the list of ``call(worker)``'s results, for every local worker."""
    return defer.gatherResults([call(w) for w in _workers(backend)], consumeErrors=True).addErrback(_first_error)


def unload(backend):
    """A Deferred of how many models left every local worker's device."""
    return _each(backend, lambda w: w.unload()).addCallback(sum)


def reload(backend):
    """A Deferred of how many models were loaded again on the local workers."""
    return _each(backend, lambda w: w.reload()).addCallback(sum)


def memory(backend):
    """A Deferred of ``{"ram": {"free", "used", "total"}, "devices": [...]}``: this
    process's memory, and each local worker's device (none on a front)."""
    return _each(backend, lambda w: w.memory()).addCallback(lambda devices: {"ram": ram(), "devices": devices})


def ram():
    """This process's memory as AUTOMATIC1111 tells it: ``used`` is what the process holds
    (its resident set), ``total`` the machine's memory, ``free`` the difference. From
    ``/proc`` and ``os.sysconf``; ``{"error": ...}`` where they say nothing."""
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        total = os.sysconf("SC_PHYS_PAGES") * page
        with open("/proc/self/statm", "rb") as f:
            used = int(f.read().split()[1]) * page
    except (OSError, ValueError, IndexError, AttributeError) as e:
        return {"error": f"{type(e).__name__}: {e}"[:300]}
    return {"free": max(0, total - used), "used": used, "total": total}

