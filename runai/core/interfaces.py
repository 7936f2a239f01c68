# -*- test-case-name: runai.test.test_queue,runai.test.test_core -*-
"""The interfaces between the core, its front doors and its back ends.

A front door (the legacy socket, HTTP) turns its wire format into core requests and hands
them to :class:`runai.core.service.Core` with an :class:`IJobListener` of its own, which
turns job events back into its wire format. A back end (:class:`IBackend`) runs the
jobs: today a queue of local workers (:class:`IWorker`), one thread each owning a device.
"""

from zope.interface import Attribute, Interface


class IJobListener(Interface):
    """Hears what happens to one job. Every call is made on the reactor thread."""

    def job_queued(job, position):
        """The back end took ``job``: it waits behind ``position`` others (0: it runs
        now). Told first, before any other event, and again when the position changes."""

    def job_progress(job, step, total, preview=None):
        """A denoising step (or conversion stage) of ``job`` is done; ``preview``: a small
        PNG of the picture so far, when the request asked for one at this step."""

    def job_image(job, image):
        """``job`` produced ``image`` (a :class:`runai.core.jobs.ImageResult`-like object:
        ``png``, ``seed``, ``width``, ``height``, ``index``, maybe ``withheld`` and
        ``nsfw_checked``)."""

    def job_done(job, result, seconds):
        """``job`` ended well: ``result`` is the image count, or a conversion's result."""

    def job_failed(job, error):
        """``job`` ended with ``error``, a :class:`runai.core.errors.RunaiError` (a cancel
        is ``cancelled``, a shutdown ``shutting_down`` or ``cancelled``)."""


class IWorker(Interface):
    """Runs one job at a time on a device it owns."""

    def run(job):
        """Run ``job``; a Deferred that fires with its result, or fails with a RunaiError.

        Progress and images reach ``job.listener`` on the reactor thread meanwhile; the job
        stops at its next step once ``job.cancel_event`` is set."""

    def loaded_models():
        """Paths of the models loaded on this worker now."""


class IBackend(Interface):
    """Where jobs go: a queue of local workers today; remote workers later."""

    queued = Attribute("How many jobs wait.")
    busy = Attribute("True while a job runs.")
    workers_alive = Attribute("How many workers can take jobs now (local threads, or remote workers "
                              "seen lately).")

    def submit(job):
        """Take ``job``; raises RunaiError (``queue_full``, ``shutting_down``) if it cannot."""

    def cancel(job):
        """Cancel a waiting job now, or a running one at its next step."""

    def cancel_running(owner):
        """Cancel the running jobs of ``owner``."""

    def drop_owner(owner):
        """``owner`` went away: its waiting jobs fail as cancelled, its running ones are
        cancelled. Returns the jobs it dropped from the queue."""

    def jobs_of(owner):
        """``owner``'s jobs, running first, then waiting in order."""

    def jobs():
        """Every job, running and waiting."""

    def loaded_models():
        """Paths of the models loaded on any worker."""
