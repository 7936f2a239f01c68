"""Shared server state: dispatches requests, tracks clients, shuts down when told to.

One factory serves every connection; it holds the one :class:`runai.core.queue.Worker`, so
all clients share one queue.
"""

import base64
import hmac
from pathlib import Path

from twisted.internet import defer, threads
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger

import runai
from runai.core import errors
from runai.doors.legacy import framing
from runai.doors.legacy import history
from runai.doors.legacy.protocol import RunaiProtocol
from runai.models.library import ModelLibrary
from runai.core.requests import (
    Cancel, ConvertRequest, GenerationRequest, Limits, ListModels, Ping, decode_message, parse_request, reqtype,
    request_id,
)
from runai.core.queue import Job


class AutoShutdown:
    """Stops the server ``timeout`` seconds after start, or after the last client left,
    unless a client is connected by then: what the legacy Krita plugin expects of a
    server it starts itself."""

    log = Logger()

    def __init__(self, clock, timeout, stop):
        self.clock = clock
        self.timeout = timeout
        self.stop = stop
        self._call = None

    def arm(self, why):
        self.disarm()
        self._call = self.clock.callLater(self.timeout, self._fire, why)

    def disarm(self):
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _fire(self, why):
        self._call = None
        self.log.info("Auto-shutdown: no client {why} for {timeout}s; stopping", why=why, timeout=self.timeout)
        self.stop()


def _input_bytes(request):
    images = (getattr(request, "pixels", None), getattr(request, "mask", None))
    return sum(len(image.data) for image in images if image is not None)


class RunaiFactory(ServerFactory):
    protocol = RunaiProtocol
    log = Logger()

    # Bounds on what clients together can make the server hold; tests may lower them.
    max_connections = 64
    max_queued_input_bytes_per_client = 128 * 1024 * 1024
    max_queued_input_bytes = 512 * 1024 * 1024
    # Requests larger than this are parsed in the reactor's thread pool, not on the reactor.
    parse_in_thread_bytes = 256 * 1024

    def __init__(self, worker, model_dir, clock, stop=None, packet_size=framing.DEFAULT_PACKET_SIZE,
                 max_message_size=framing.DEFAULT_MAX_MESSAGE_SIZE, idle_timeout=60.0,
                 auto_shutdown=False, timeout=60.0, limits=Limits(), refuse_unchecked=False, token=None,
                 log_prompts=False, store=None):
        self.worker = worker
        # The history (runai.history.store.Store) with --db; None: nothing is written anywhere.
        self.store = store
        # A shared secret for servers listening beyond loopback; None: no token needed.
        self.token = token.encode("utf-8") if isinstance(token, str) else token
        # What to do when a client asks for the NSFW filter and its model is not installed:
        # refuse, or generate and say in each image reply that it was not checked.
        self.refuse_unchecked = refuse_unchecked
        self.log_prompts = log_prompts
        self.model_dir = Path(model_dir).resolve()
        # What the models action lists; it caches what it has read, by size and mtime.
        self.library = ModelLibrary(self.model_dir)
        self.clock = clock
        self.stop = stop
        self.packet_size = packet_size
        self.max_message_size = max_message_size
        self.idle_timeout = idle_timeout
        self.limits = limits
        self.clients = set()
        self.auto_shutdown = AutoShutdown(clock, timeout, self._stop_server) if auto_shutdown else None

    # Lifecycle -----------------------------------------------------------------------

    def server_started(self):
        if self.auto_shutdown is not None:
            self.auto_shutdown.arm("connected")

    def _stop_server(self):
        if self.stop is not None:
            self.stop()

    def client_connected(self, proto):
        self.clients.add(proto)
        self.log.debug("Client connected: {peer}", peer=proto.transport.getPeer())
        if self.auto_shutdown is not None:
            self.auto_shutdown.disarm()

    def client_lost(self, proto):
        self.clients.discard(proto)
        queued = [job for job in self.worker.jobs_of(proto) if job.state == "queued"] if self.store is not None else ()
        self.worker.drop_owner(proto)
        for job in queued:  # dropped without a job_failed: record them here
            self.store.failed(getattr(job, "stored", None), errors.JobCancelled("the client disconnected"))
        proto.jobs.clear()
        if self.auto_shutdown is not None and not self.clients:
            self.auto_shutdown.arm("reconnected")

    # Requests ------------------------------------------------------------------------

    def message_received(self, proto, payload):
        """Handle one request. Returns a Deferred when it is parsed off the reactor thread:
        the protocol holds the connection's next requests until it fires, to keep order."""
        if len(payload) > self.parse_in_thread_bytes and self._pool() is not None:
            # JSON, base64 and image headers of a large request (an img2img canvas) take
            # tenths of a second: long enough to stall every other client's replies.
            d = threads.deferToThreadPool(self.clock, self._pool(), self._parse, payload)
            d.addCallback(lambda parsed: self._dispatch(proto, *parsed))
            d.addErrback(self._handling_failed, proto)
            return d
        try:
            self._dispatch(proto, *self._parse(payload))
        except Exception:
            self._handling_failed(None, proto)
        return None

    def _handling_failed(self, failure, proto):
        # A bug must cost one request, not the connection and the client's other jobs.
        self.log.failure("A request could not be handled", failure)
        proto.send_error(errors.RunaiError(errors.INTERNAL, "the server failed to handle this request"))

    def _pool(self):
        get_pool = getattr(self.clock, "getThreadPool", None)
        return None if get_pool is None else get_pool()

    def _parse(self, payload):
        """``(obj, request, error)`` of a message; touches no connection state, so that it
        may run in a thread."""
        obj = None
        try:
            obj = decode_message(payload)
            return obj, parse_request(obj, self.model_dir, self.limits), None
        except errors.RunaiError as e:
            return obj, None, e

    def _dispatch(self, proto, obj, request, error):
        if obj is not None:
            try:
                # Before the request's own errors: a stranger learns nothing of the server.
                self._authenticate(proto, obj)
            except errors.RunaiError as e:
                error = e
        if error is not None:
            rt, rid = (reqtype(obj), request_id(obj)) if obj is not None else (None, None)
            self.log.info("Refused a request: {code}: {message}", code=error.code, message=error.message)
            proto.send_error(error, rt, rid)
            if error.code == errors.UNAUTHORIZED:
                proto.close()
            return
        if proto.closing:
            return
        if isinstance(request, Ping):
            proto.send_message({
                "action": "pong", "version": runai.__version__, "id": request.id,
                "queued": self.worker.queued, "busy": self.worker.busy,
            })
        elif isinstance(request, Cancel):
            self.cancel(proto, request.id)
        elif isinstance(request, GenerationRequest):
            self.enqueue(proto, request)
        elif isinstance(request, history.HistoryRequest):
            history.answer(self.store, proto, request)
        elif isinstance(request, ListModels):
            self.list_models(proto, request)
        elif isinstance(request, ConvertRequest):
            self.enqueue_convert(proto, request)

    def list_models(self, proto, request):
        """Answer ``models`` from a fresh scan of the model folder, so that the list
        follows the disk; off the reactor thread, since a cold scan reads file headers."""
        loaded = self.worker.loaded_models()

        def send(entries):
            proto.send_message({"action": "models", "models": [e.to_wire(loaded) for e in entries],
                                "id": request.id})

        def failed(failure):
            self.log.failure("Listing the model folder failed", failure)
            proto.send_error(errors.RunaiError(errors.INTERNAL, "the model folder could not be listed"),
                             "models", request.id)

        pool = self._pool()
        if pool is None:
            d = defer.maybeDeferred(self.library.scan)  # a test clock: no threads
        else:
            d = threads.deferToThreadPool(self.clock, pool, self.library.scan)
        d.addCallbacks(send, failed)

    def _submit(self, proto, request):
        """Queue ``request`` as this connection's job; None (the client told why) if refused."""
        if request.id is not None and request.id in proto.jobs:
            proto.send_error(
                errors.RunaiError(errors.BAD_REQUEST, f"a job with id {request.id!r} is already queued or running"),
                request.action, request.id,
            )
            return None
        job = Job(request, proto, self)
        try:
            self.worker.submit(job)
        except errors.RunaiError as e:
            proto.send_error(e, request.action, request.id)
            return None
        if request.id is not None and job.state in ("queued", "running"):
            proto.jobs[request.id] = job
        return job

    def enqueue_convert(self, proto, request):
        """A conversion is heavy (it loads a whole model): it waits its turn in the queue."""
        job = self._submit(proto, request)
        if job is None:
            return
        self.log.info("Job {serial}: convert {model} into {target}",
                      serial=job.serial, model=request.model_name, target=request.target_name)

    def _authenticate(self, proto, obj):
        if self.token is None:
            return
        given = obj.get("token")
        # Constant-time: the comparison must not tell an attacker how much of a guess was right.
        if not isinstance(given, str) or not hmac.compare_digest(given.encode("utf-8", "surrogatepass"), self.token):
            raise errors.RunaiError(errors.UNAUTHORIZED, "this server needs a valid 'token' in every request")
        proto.authenticated = True

    def buildProtocol(self, addr):
        if len(self.clients) >= self.max_connections:
            self.log.warn("Refusing a connection from {addr}: already {n} clients", addr=addr, n=len(self.clients))
            return None
        return super().buildProtocol(addr)

    def _check_input_bytes(self, proto, request):
        """Queued jobs hold their clients' images until they run: bound that memory."""
        size = _input_bytes(request)
        if not size:
            return
        mine = sum(_input_bytes(job.request) for job in self.worker.jobs_of(proto))
        everyone = sum(_input_bytes(job.request) for client in self.clients for job in self.worker.jobs_of(client))
        if mine + size > self.max_queued_input_bytes_per_client or everyone + size > self.max_queued_input_bytes:
            raise errors.RunaiError(
                errors.QUEUE_FULL,
                "too many input images are waiting in the queue; send this request when earlier ones are done",
            )

    def enqueue(self, proto, request):
        try:
            self._check_input_bytes(proto, request)
        except errors.RunaiError as e:
            proto.send_error(e, request.action, request.id)
            return
        if request.nsfw_filter and request.safety_checker is None:
            if self.refuse_unchecked:
                proto.send_error(errors.RunaiError(
                    errors.SAFETY_CHECKER_MISSING,
                    "do_nsfw_filter was asked for, but the safety checker is not installed: put "
                    "CompVis/stable-diffusion-safety-checker in the model folder",
                ), request.action, request.id)
                return
            self.log.warn("do_nsfw_filter asked for, but no safety checker is installed: "
                          "images go out marked nsfw_checked=false")
        job = self._submit(proto, request)
        if job is None:
            return
        if self.store is not None:
            job.stored = self.store.begin(request)
        self.log.info("Job {serial}: {action} of {model}, {n} image(s), {steps} steps, {w}x{h}",
                      serial=job.serial, action=request.action, model=request.model_name,
                      n=request.image_count, steps=request.steps, w=request.width, h=request.height)
        if self.log_prompts:
            # Only when asked for: twistd writes debug events too, and prompts are private.
            self.log.debug("Job {serial} prompt: {prompt!r}, negative: {negative!r}", serial=job.serial,
                           prompt=request.prompt, negative=request.negative_prompt)

    def cancel(self, proto, job_id):
        if job_id is None:
            self.cancel_running(proto)
            return
        job = proto.jobs.get(job_id)
        if job is None:
            proto.send_error(errors.RunaiError(errors.NOT_FOUND, f"this connection has no job with id {job_id!r}"),
                             "cancel", job_id)
            return
        self.worker.cancel(job)

    def cancel_running(self, proto):
        """The legacy ``c`` packet: cancel this client's running job, if it has one."""
        running = self.worker.running
        if running is not None and running.owner is proto:
            self.worker.cancel(running)

    def quit_requested(self, proto):
        if self.token is not None and not getattr(proto, "authenticated", False):
            # A control packet carries no token: only a client that has shown it may stop us.
            proto.close()
            return
        if self.auto_shutdown is not None:
            self.log.info("A client asked the server to quit")
            self._stop_server()
        else:
            # Without --auto-shutdown the server is not the client's to stop; the legacy
            # client only means "I am done", so end that one connection.
            proto.close()

    # Job listener (called on the reactor thread) ---------------------------------------

    def _reply(self, job, message):
        message.setdefault("reqtype", job.request.action)
        message["id"] = job.id
        job.owner.send_message(message)

    def job_queued(self, job, position):
        self._reply(job, {"action": "queued", "position": position})

    def job_progress(self, job, step, total):
        self._reply(job, {"action": 4, "step": step, "total": total})

    def job_image(self, job, image):
        about = {"seed": image.seed, "width": image.width, "height": image.height, "index": image.index}
        if getattr(image, "withheld", False):
            # No "image" key: a legacy client ignores this message instead of showing it.
            self._reply(job, dict(about, action="withheld", reason="nsfw"))
            return
        if self.store is not None:
            self.store.add_image(getattr(job, "stored", None), image)
        message = {
            "image": base64.b64encode(image.png).decode("ascii"),
            "pos_x": job.request.pos_x, "pos_y": job.request.pos_y,
        }
        message.update(about)
        checked = getattr(image, "nsfw_checked", None)
        if checked is not None:
            message["nsfw_checked"] = checked
        self._reply(job, message)

    def job_done(self, job, count, seconds):
        self._forget(job)
        if self.store is not None:
            self.store.finish(getattr(job, "stored", None), "done", seconds=seconds)
        if isinstance(job.request, ConvertRequest):
            result = count  # a runai.models.convert.ConvertResult
            self.log.info("Job {serial} done: {source} converted into {path} in {seconds:.2f}s",
                          serial=job.serial, source=result.source, path=result.path, seconds=seconds)
            self._reply(job, {"action": "done", "path": result.path, "source": result.source,
                              "format": "diffusers", "version": result.version, "seconds": round(seconds, 3)})
            return
        self.log.info("Job {serial} done: {count} image(s) in {seconds:.2f}s",
                      serial=job.serial, count=count, seconds=seconds)
        self._reply(job, {"action": "done", "images": count, "seconds": round(seconds, 3)})

    def job_failed(self, job, error):
        self._forget(job)
        if self.store is not None:
            self.store.failed(getattr(job, "stored", None), error)
        self.log.info("Job {serial} failed: {code}: {message}",
                      serial=job.serial, code=error.code, message=error.message)
        job.owner.send_error(error, job.request.action, job.id)

    def _forget(self, job):
        if job.id is not None and job.owner.jobs.get(job.id) is job:
            del job.owner.jobs[job.id]
