# -*- test-case-name: runai.test.test_openai -*-
"""A request's job: its images gathered for one reply, or sent as server-sent events.

Streaming (``"stream": true``) answers ``text/event-stream`` at once, so that the client
sees the job accepted while it waits in the queue (an SSE comment per queue position),
then up to ``partial_images`` (0 to 3) ``image_generation.partial_image``
(``image_edit.partial_image``) events, each a live preview of the picture so far (the
core's latent preview, scaled up to the requested size), and one
``image_generation.completed`` (``image_edit.completed``) event per image, in order, as
each batch ends. A job that fails after the stream began ends it with an ``error`` event.
"""

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from runai.core import errors
from runai.core.interfaces import IJobListener
from runai.doors.openai import replies


@implementer(IJobListener)
class OpenAIJob:
    """Listens to one job; ``result`` fires with its images, or fails with its
    RunaiError. ``on_image``, ``on_queued`` and ``on_preview``, when set, hear each
    image, queue position and live preview."""

    def __init__(self):
        self.images = []
        self.result = Deferred()
        self.on_image = None
        self.on_queued = None
        self.on_preview = None

    def job_queued(self, job, position):
        if self.on_queued is not None:
            self.on_queued(position)

    def job_progress(self, job, step, total, preview=None):
        if preview is not None and self.on_preview is not None:
            self.on_preview(preview)

    def job_image(self, job, image):
        self.images.append(image)
        if self.on_image is not None:
            self.on_image(image)

    def job_done(self, job, result, seconds):
        self.result.callback(self.images)

    def job_failed(self, job, error):
        self.result.errback(error)


class EventStream:
    """Sends ``listener``'s images to ``request`` as events named ``prefix.completed``;
    ``off_reactor(f, *args)`` encodes each (a Deferred), one after the other."""

    log = Logger()

    def __init__(self, request, listener, core_request, reply, prefix, off_reactor):
        self.request = request
        self.core_request = core_request
        self.reply = reply
        self.prefix = prefix
        self.off_reactor = off_reactor
        self._chain = succeed(None)  # images go out in order, each once encoded
        self._partials = 0
        request.setHeader("content-type", "text/event-stream")
        request.setHeader("cache-control", "no-cache")
        listener.on_image = self._image
        listener.on_queued = self._queued
        listener.on_preview = self._preview
        listener.result.addCallbacks(self._done, self._failed)
        self._write(b": accepted\n\n")

    def _live(self):
        return not self.request.finished and not getattr(self.request, "gone", False)

    def _write(self, data):
        if self._live():
            self.request.write(data)

    def _queued(self, position):
        self._write(f": queued, {position} ahead\n\n".encode("ascii"))

    def _preview(self, png):
        if self._partials >= self.reply.partial_images:
            return
        index = self._partials
        self._partials += 1
        self._chain.addCallback(lambda _: self._send_preview(index, png))

    def _send_preview(self, index, png):
        if not self._live():
            return None

        def sent(payload):
            self._write(replies.partial_event(self.prefix, index, payload, self.core_request, self.reply))
        return self.off_reactor(replies.encode_preview, png, self.core_request, self.reply).addCallback(sent)

    def _image(self, image):
        if getattr(image, "withheld", False):
            return
        self._chain.addCallback(lambda _: self._send(image))

    def _send(self, image):
        if not self._live():
            return None

        def sent(encoded):
            payload, _ = encoded
            self._write(replies.completed_event(self.prefix, image, payload, self.core_request, self.reply))
        return self.off_reactor(replies.encode, image, self.reply).addCallback(sent)

    def _done(self, images):
        self._chain.addCallbacks(lambda _: self._finish(), self._broken)

    def _failed(self, failure):
        error = failure.value if failure.check(errors.RunaiError) else self._internal(failure)

        def end(result):
            if isinstance(result, Failure):  # an image that could not be sent: logged
                self._internal(result)
            self._finish(replies.error_event(error))
        self._chain.addBoth(end)

    def _broken(self, failure):
        self._finish(replies.error_event(self._internal(failure)))

    def _internal(self, failure):
        self.log.failure("An OpenAI image stream failed", failure)
        return errors.RunaiError(errors.INTERNAL, "the server failed to send this image")

    def _finish(self, last=None):
        if self._live():
            if last is not None:
                self.request.write(last)
            self.request.finish()
