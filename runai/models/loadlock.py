# -*- test-case-name: runai.test.test_concurrent_loads,runai.test.test_cache_companions -*-
"""One model load at a time in the whole process, and one read from disk for workers that
want the same model at once.

diffusers' and transformers' loaders patch torch for the whole process while they build a
model, not for their own thread: ``torch.set_default_dtype``, ``torch.nn.init``'s functions
swapped for no-ops (``no_init_weights``), ``torch.linspace``, and, where accelerate is
installed, ``torch.nn.Module.register_parameter``, so that every new parameter lands on the
meta device. Each saves what it finds and puts it back when it is done. Two loads in two
threads (two workers of one server, each with its own device) therefore see each other's
patches: one builds its modules on the meta device and fails ("Unsupported device type
'meta'", "Cannot copy out of meta tensor; no data!"), and a patch saved by one load while
the other's was in place outlives both, which breaks every later load (issue 23). runai's
own single-file assembly (:mod:`runai.models.assemble`) builds its text encoders under
transformers' ``no_init_weights`` and its UNet and VAE from their configs on the meta
device, which meets the same patches, and reads ``.ckpt`` files under torch's
``safe_globals``, a process-wide allow-list that the first load to finish takes away from
the other (:mod:`runai.models.checkpoint`: "refused to unpickle it").

So they are made safe by being serialised, through this module's one lock: every call into
diffusers' or transformers' loaders (``from_pretrained``, a model's ``from_config``), and into
runai code that builds modules on the meta device or under such a patch, holds
:func:`loading`. The lock is re-entrant, since loads nest (a single file's assembly inside
a load). It is never held while a job generates: a worker waits for another's load only
when it loads too.

:func:`load_once` is :class:`runai.models.cache.ModelLoader`'s way in: besides holding the
lock, it lets loaders that wait for the same model (same file, same bytes on disk, same
model folder and precision) take a copy of the one just loaded onto their own device
instead of reading the disk again.
"""

import copy
import threading
from contextlib import contextmanager

from twisted.logger import Logger

from runai.models import sources

log = Logger()

_lock = threading.RLock()


@contextmanager
def loading():
    """Hold the process's one load lock (re-entrant); released on the way out, also when
    the load raises, so that a failed load fails only its own jobs."""
    with _lock:
        yield


class _Share:
    """The loaders that want one model, and what they may copy instead of reading it."""

    def __init__(self):
        self.wanting = 0
        self.template = None
        self.sources = ()  # the template's other files, as they were when it was loaded


# Guards _shares alone; never held while waiting for the load lock.
_books = threading.Lock()
_shares = {}


def _module_tensors(pipe):
    """Every parameter and buffer of ``pipe``'s module components (a tied weight once)."""
    import torch

    seen = {}
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            for tensor in list(component.parameters()) + list(component.buffers()):
                seen[id(tensor)] = tensor
    return list(seen.values())


class _Template:
    """A pipeline's structure as it was loaded, before anyone ran it, sharing its weights.

    Its own deep copy of everything that is not a weight (modules, configs, scheduler,
    tokenizer): the loader that loaded the model goes on to run it at once, and running
    changes the pipeline's scheduler, attributes and, for a float16 decode, its VAE's
    precision, while the copy is made. The weights are only read, in the precision
    each had when the template was made.
    """

    def __init__(self, pipe):
        tensors = _module_tensors(pipe)
        self.dtypes = {id(t): t.dtype for t in tensors}
        self.pipe = copy.deepcopy(pipe, {id(t): t for t in tensors})

    def copy_to(self, device):
        """An independent pipeline with every weight copied to ``device`` (never through
        the source's device, which may have no room for a second copy)."""
        import torch

        memo = {}
        for tensor in _module_tensors(self.pipe):
            moved = tensor.detach().to(device=device, dtype=self.dtypes[id(tensor)], copy=True)
            if isinstance(tensor, torch.nn.Parameter):
                moved = torch.nn.Parameter(moved, requires_grad=tensor.requires_grad)
            memo[id(tensor)] = moved
        return copy.deepcopy(self.pipe, memo)


def load_once(key, device, load, name):
    """``load()``'s pipeline, loaded under the load lock; or, when another loader that
    wanted the same ``key`` at the same time has just loaded it, a copy of that pipeline
    on ``device``, its own (weights, scheduler, everything), made without reading the disk.

    ``key`` says what must be equal for a copy to be as good as a load: the path, its
    bytes on disk, the model folder and the precision; and the other files the load was
    built from (companions, configs: :mod:`runai.models.sources`) must not have changed
    since, or the waiting loader reads them from disk itself. A copy is offered only while
    some loader waits for the same key, so a model loaded alone costs nothing more.
    """
    import torch

    with _books:
        share = _shares.setdefault(key, _Share())
        share.wanting += 1
    try:
        with loading():
            template = share.template
            stale = template is not None and sources.changed(share.sources)
            if stale:
                # A companion file was replaced since that load: it is not this model any more.
                log.info("{name}: its file {path} changed since another worker loaded it; reading it from disk",
                         name=name, path=stale)
            elif template is not None:
                try:
                    pipe = template.copy_to(device)
                except torch.OutOfMemoryError:
                    raise  # reading it from disk would not fit either
                except Exception:
                    # Never a failed job for the sake of a shortcut: read it as if alone.
                    log.failure("{name}: copying the model another worker loaded failed; reading it from disk",
                                name=name)
                else:
                    log.info("{name}: copied onto {device} from the load another worker just made",
                             name=name, device=str(device))
                    sources.add(share.sources)  # the copy is built from the same files
                    return pipe
            with sources.recording() as used:
                pipe = load()
            with _books:
                others = share.wanting > 1
            if others:
                try:
                    share.template, share.sources = _Template(pipe), tuple(used)
                except Exception:
                    log.failure("{name}: the model cannot be copied; the other workers read it from disk",
                                name=name)
            return pipe
    finally:
        with _books:
            share.wanting -= 1
            if not share.wanting:
                # No one else waits: the template, and the weights it shares, go.
                share.template, share.sources = None, ()
                if _shares.get(key) is share:
                    del _shares[key]
