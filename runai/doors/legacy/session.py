# -*- test-case-name: runai.test.test_legacy_session -*-
"""One legacy connection's requests: dispatch, its state, and its jobs' replies.

The :class:`Session` belongs to its protocol (:class:`runai.doors.legacy.protocol.RunaiProtocol`)
and holds what is the connection's own: its jobs by the client's ``id``, whether it has
shown the token, the ``history_get`` being sent. It turns requests into calls on the core
(:class:`runai.core.service.Core`) and, as the listener of its jobs, the core's events into
replies (:mod:`runai.doors.legacy.replies`).
"""

import hmac

from twisted.internet import defer, threads
from twisted.logger import Logger
from zope.interface import implementer

from runai.core import errors
from runai.core.interfaces import IJobListener
from runai.core.requests import ConvertRequest, GenerationRequest
from runai.core.upscale import UpscaleRequest
from runai.doors.legacy import history, memory, replies
from runai.doors.legacy.parse import Cancel, ListModels, Ping, reqtype, request_id
from runai.models import embeddings, loras, upscalers


@implementer(IJobListener)
class Session:
    log = Logger()

    def __init__(self, proto, factory):
        self.proto = proto
        self.factory = factory
        self.core = factory.core
        self.jobs = {}  # the client's id -> Job, for jobs queued or running
        self.authenticated = False  # has sent a request with the token (when one is needed)
        self.history_get = None  # the history_get being sent now: one at a time

    # Requests --------------------------------------------------------------------------

    def message(self, payload):
        """Handle one request. Returns a Deferred when it is parsed off the reactor thread:
        the protocol holds the connection's next requests until it fires, to keep order."""
        factory = self.factory
        pool = factory.parse_pool
        try:
            if pool is not None and len(payload) > factory.parse_in_thread_bytes:
                # JSON and base64 of a large request (an img2img canvas) take tenths of a
                # second: long enough to stall every other client's replies.
                return self._in_pool(factory.parse, payload)
            obj, error = factory.decode(payload)
            if error is not None:
                self.dispatch(None, None, error)
            elif pool is not None and factory.reads_images(obj):
                return self._in_pool(factory.build, obj)
            else:
                self.dispatch(*factory.build(obj))
        except Exception:
            self._handling_failed(None)
        return None

    def _in_pool(self, f, *args):
        d = threads.deferToThreadPool(self.factory.reactor, self.factory.parse_pool, f, *args)
        d.addCallback(lambda parsed: self.dispatch(*parsed))
        d.addErrback(self._handling_failed)
        return d

    def _handling_failed(self, failure):
        # A bug must cost one request, not the connection and the client's other jobs.
        self.log.failure("A request could not be handled", failure)
        self.send_error(errors.RunaiError(errors.INTERNAL, "the server failed to handle this request"))

    def dispatch(self, obj, request, error):
        """Answer a parsed message: ``(obj, request, error)`` from the factory's parse."""
        if obj is not None:
            try:
                # Before the request's own errors: a stranger learns nothing of the server.
                self._authenticate(obj)
            except errors.RunaiError as e:
                error = e
        if error is not None:
            rt, rid = (reqtype(obj), request_id(obj)) if obj is not None else (None, None)
            self.log.info("Refused a request: {code}: {message}", code=error.code, message=error.message)
            self.core.refused(error)
            self.send_error(error, rt, rid)
            if error.code == errors.UNAUTHORIZED:
                self.proto.close()
            return
        if self.proto.closing:
            return
        if isinstance(request, Ping):
            queued, busy = self.core.status()
            self.send(replies.pong(request.id, queued, busy, self.core.workers_alive()))
        elif isinstance(request, Cancel):
            self.cancel(request.id)
        elif isinstance(request, (GenerationRequest, ConvertRequest, UpscaleRequest)):
            self.submit(request)
        elif isinstance(request, history.HistoryRequest):
            history.answer(self.core.store, self, request)
        elif isinstance(request, memory.MemoryRequest):
            memory.answer(self.core, self, request)
        elif isinstance(request, ListModels):
            self.list_models(request)

    def _authenticate(self, obj):
        token = self.factory.token
        if token is None:
            return
        given = obj.get("token")
        # Constant-time: the comparison must not tell an attacker how much of a guess was right.
        if not isinstance(given, str) or not hmac.compare_digest(given.encode("utf-8", "surrogatepass"), token):
            raise errors.RunaiError(errors.UNAUTHORIZED, "this server needs a valid 'token' in every request")
        self.authenticated = True

    def submit(self, request):
        if request.id is not None and request.id in self.jobs:
            self.send_error(
                errors.RunaiError(errors.BAD_REQUEST, f"a job with id {request.id!r} is already queued or running"),
                request.action, request.id,
            )
            return
        try:
            job = self.core.submit(request, self, self)
        except errors.RunaiError as e:
            self.send_error(e, request.action, request.id)
            return
        if request.id is not None and job.state in ("queued", "running"):
            self.jobs[request.id] = job

    def list_models(self, request):
        def failed(failure):
            self.log.failure("Listing the model folder failed", failure)
            self.send_error(errors.RunaiError(errors.INTERNAL, "the model folder could not be listed"),
                            request.what, request.id)

        if request.what == "embeddings":
            def refused(failure):
                failure.trap(errors.RunaiError)
                self.send_error(failure.value, "embeddings", request.id)

            pool = self.core.pool
            args = (embeddings.for_model, self.core.model_dir, request.model)
            d = threads.deferToThreadPool(self.factory.reactor, pool, *args) if pool is not None \
                else defer.maybeDeferred(*args)
            d.addCallback(lambda listed: self.send(replies.embeddings(listed, request.model, request.id)))
            d.addErrback(refused).addErrback(failed)
            return
        if request.what == "loras":
            pool = self.core.pool
            d = (threads.deferToThreadPool(self.factory.reactor, pool, loras.files, self.core.model_dir)
                 if pool is not None else defer.maybeDeferred(loras.files, self.core.model_dir))
            d.addCallbacks(lambda listed: self.send(replies.loras(listed, request.id)), failed)
            return
        if request.what == "upscalers":
            pool = self.core.pool
            d = (threads.deferToThreadPool(self.factory.reactor, pool, upscalers.listing, self.core.model_dir)
                 if pool is not None else defer.maybeDeferred(upscalers.listing, self.core.model_dir))
            d.addCallbacks(lambda listed: self.send(replies.upscalers(listed, request.id)), failed)
            return
        self.core.list_models().addCallbacks(lambda listed: self.send(replies.models(*listed, request.id)), failed)

    def cancel(self, job_id):
        if job_id is None:
            self.cancel_running()
            return
        job = self.jobs.get(job_id)
        if job is None:
            self.send_error(errors.RunaiError(errors.NOT_FOUND, f"this connection has no job with id {job_id!r}"),
                            "cancel", job_id)
            return
        self.core.cancel(job)

    def cancel_running(self):
        """The legacy ``c`` packet: cancel this client's running job, if it has one."""
        self.core.cancel_running(self)

    def quit(self):
        """The legacy ``x`` packet."""
        if self.factory.token is not None and not self.authenticated:
            # A control packet carries no token: only a client that has shown it may stop us.
            self.proto.close()
            return
        self.factory.quit_requested(self.proto)

    def lost(self):
        """The connection is gone: its waiting jobs are dropped, its running one cancelled."""
        self.core.owner_gone(self)
        self.jobs.clear()

    # Replies ---------------------------------------------------------------------------

    def send(self, message):
        self.proto.send_message(message)

    def send_error(self, error, reqtype=None, request_id=None):
        self.send(replies.error(error, reqtype, request_id))

    def when_writable(self):
        return self.proto.when_writable()

    @property
    def closing(self):
        return self.proto.closing

    # IJobListener (reactor thread) -----------------------------------------------------

    def _reply(self, job, message):
        self.send(replies.of_request(job.request, message))

    def job_queued(self, job, position):
        if position:  # the legacy protocol never says "position 0"
            self._reply(job, replies.queued(position))

    def job_progress(self, job, step, total, preview=None):
        self._reply(job, replies.progress(step, total, preview))

    def job_image(self, job, image):
        self._reply(job, replies.image(job.request, image))

    def job_done(self, job, result, seconds):
        self._forget(job)
        if isinstance(job.request, ConvertRequest):
            self._reply(job, replies.converted(result, seconds))
        else:
            self._reply(job, replies.done(result, seconds))

    def job_failed(self, job, error):
        self._forget(job)
        self.send_error(error, job.request.action, job.id)

    def _forget(self, job):
        if job.id is not None and self.jobs.get(job.id) is job:
            del self.jobs[job.id]
