# -*- test-case-name: runai.test.test_core -*-
"""The core that every front door talks to: one back end, one model library, one policy.

A door hands :meth:`Core.submit` a validated request (:mod:`runai.core.requests`), the
owner it stands for (a connection) and its own :class:`IJobListener`. The core checks
what no single door can (input images waiting across all clients, the NSFW policy),
records the job in the history when there is one, logs it, and passes it to the back end.
It knows no wire format: doors turn its events and errors into theirs.
"""

from twisted.internet import defer, threads
from twisted.logger import Logger
from zope.interface import implementer

from runai.core import errors
from runai.core import memory as memory_ops
from runai.core.interfaces import IJobListener
from runai.core.jobs import Job, Listeners, NullListener
from runai.core.requests import ConvertRequest
from runai.core.upscale import UpscaleRequest


def _input_bytes(request):
    images = (getattr(request, "pixels", None), getattr(request, "mask", None)) + getattr(request, "images", ())
    return sum(len(image.data) for image in images if image is not None)


def _held_bytes(job):
    return _input_bytes(job.request) + job.held_bytes


@implementer(IJobListener)
class _JobLog(NullListener):
    """Logs how each job ended."""

    log = Logger(namespace="runai.core.service.Core")

    def job_done(self, job, result, seconds):
        if isinstance(job.request, ConvertRequest):
            self.log.info("Job {serial} done: {source} converted into {path} in {seconds:.2f}s",
                          serial=job.serial, source=result.source, path=result.path, seconds=seconds)
        else:
            self.log.info("Job {serial} done: {count} image(s) in {seconds:.2f}s",
                          serial=job.serial, count=result, seconds=seconds)

    def job_failed(self, job, error):
        self.log.info("Job {serial} failed: {code}: {message}", serial=job.serial, code=error.code,
                      message=error.message)


_JOB_LOG = _JobLog()


class Core:
    """``backend`` runs jobs (:class:`runai.core.interfaces.IBackend`); ``library`` lists
    the model folder; ``recorder`` (a :class:`runai.history.recorder.Recorder`, or None)
    keeps the history; ``reactor`` and ``pool`` run the library's scans off the reactor
    thread (``pool`` None: in line, for tests)."""

    log = Logger()
    # --metrics: a runai.ops.metrics.Metrics that hears every job and refusal; None: off.
    metrics = None

    # Queued jobs hold their clients' images until they run: bound that memory.
    max_queued_input_bytes_per_owner = 128 * 1024 * 1024
    max_queued_input_bytes = 512 * 1024 * 1024

    def __init__(self, backend, library, reactor, pool=None, recorder=None, refuse_unchecked=False,
                 log_prompts=False):
        self.backend = backend
        self.library = library
        self.reactor = reactor
        self.pool = pool
        self.recorder = recorder
        # What to do when a client asks for the NSFW filter and its model is not installed:
        # refuse, or generate and say in each image reply that it was not checked.
        self.refuse_unchecked = refuse_unchecked
        self.log_prompts = log_prompts

    @property
    def model_dir(self):
        return self.library.model_dir

    @property
    def store(self):
        """The history store, for doors that answer history requests; None without --db."""
        return self.recorder.store if self.recorder is not None else None

    # Jobs ------------------------------------------------------------------------------

    def submit(self, request, owner, listener, held_bytes=0):
        """Queue ``request`` for ``owner``; returns its Job, or raises RunaiError (the job
        was not queued, and ``listener`` hears nothing of it). ``held_bytes``: what the door
        keeps for the job beyond the request, counted with its images."""
        try:
            return self._submit(request, owner, listener, held_bytes)
        except errors.RunaiError as e:
            self.refused(e)
            raise

    def refused(self, error):
        """A door answered ``error`` (a RunaiError) instead of making a job: counted with
        --metrics (once per error, whichever door or the core says it first)."""
        if self.metrics is not None:
            self.metrics.count_refused(error)

    def _submit(self, request, owner, listener, held_bytes):
        self._check_input_bytes(owner, _input_bytes(request) + held_bytes)
        if getattr(request, "nsfw_filter", False) and request.safety_checker is None:
            if self.refuse_unchecked:
                raise errors.RunaiError(
                    errors.SAFETY_CHECKER_MISSING,
                    "do_nsfw_filter was asked for, but the safety checker is not installed: put "
                    "CompVis/stable-diffusion-safety-checker in the model folder",
                )
            self.log.warn("do_nsfw_filter asked for, but no safety checker is installed: "
                          "images go out marked nsfw_checked=false")
        listeners = [listener, _JOB_LOG]
        if self.metrics is not None:  # first: it marks a failed job's error before the door answers it
            listeners.insert(0, self.metrics.job_listener(listener))
        if self.recorder is not None and not isinstance(request, (ConvertRequest, UpscaleRequest)):
            listeners.append(self.recorder.listener(request))
        job = Job(request, owner, Listeners(*listeners))
        job.held_bytes = held_bytes
        self.backend.submit(job)
        self._log_job(job)
        return job

    def _log_job(self, job):
        request = job.request
        if isinstance(request, ConvertRequest):
            self.log.info("Job {serial}: convert {model} into {target}",
                          serial=job.serial, model=request.model_name, target=request.target_name)
            return
        if isinstance(request, UpscaleRequest):
            self.log.info("Job {serial}: upscale {n} picture(s) with {upscaler}", serial=job.serial,
                          n=request.image_count, upscaler=request.upscaler)
            return
        self.log.info("Job {serial}: {action} of {model}, {n} image(s), {steps} steps, {w}x{h}",
                      serial=job.serial, action=request.action, model=request.model_name,
                      n=request.image_count, steps=request.steps, w=request.width, h=request.height)
        if self.log_prompts:
            # Only when asked for: twistd writes debug events too, and prompts are private.
            self.log.debug("Job {serial} prompt: {prompt!r}, negative: {negative!r}", serial=job.serial,
                           prompt=request.prompt, negative=request.negative_prompt)

    def _check_input_bytes(self, owner, size):
        if not size:
            return
        jobs = self.backend.jobs()
        mine = sum(_held_bytes(job) for job in jobs if job.owner is owner)
        everyone = sum(_held_bytes(job) for job in jobs)
        if mine + size > self.max_queued_input_bytes_per_owner or everyone + size > self.max_queued_input_bytes:
            raise errors.RunaiError(
                errors.QUEUE_FULL,
                "too many input images are waiting in the queue; send this request when earlier ones are done",
            )

    def cancel(self, job):
        self.backend.cancel(job)

    def cancel_running(self, owner):
        self.backend.cancel_running(owner)

    def owner_gone(self, owner):
        """``owner`` disconnected: its waiting jobs fail as cancelled (their listeners,
        the history among them, hear it), its running ones stop at their next step."""
        return self.backend.drop_owner(owner)

    def status(self):
        """``(queued, busy)`` of the back end."""
        return self.backend.queued, self.backend.busy

    def workers_alive(self):
        """How many workers can take jobs: this server's, or the broker's workers seen lately."""
        return self.backend.workers_alive

    # Memory (runai.core.memory): the back end's workers, between jobs ---------------------

    def unload_models(self):
        """A Deferred of how many models left the devices (each worker's, after its job)."""
        return memory_ops.unload(self.backend)

    def reload_models(self):
        """A Deferred of how many models the workers loaded again (each the one it used last)."""
        return memory_ops.reload(self.backend)

    def memory(self):
        """A Deferred of ``{"ram": {...}, "devices": [{...}, ...]}`` (:func:`runai.core.memory.memory`)."""
        return memory_ops.memory(self.backend)

    # Models ----------------------------------------------------------------------------

    def list_models(self):
        """A Deferred of ``(entries, loaded paths)``: a fresh scan of the model folder, so
        that the list follows the disk, run off the reactor thread (a cold scan reads
        file headers)."""
        loaded = self.backend.loaded_models()
        if self.pool is None:
            d = defer.maybeDeferred(self.library.scan)
        else:
            d = threads.deferToThreadPool(self.reactor, self.pool, self.library.scan)
        return d.addCallback(lambda entries: (entries, loaded))
